"""dataset.py: finding slices, bad files, load_image and the tf.data pipeline.

Every input is a tiny image written into tmp_path, so expected values
can be worked out by hand.
"""

import os
import pathlib
import warnings

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import dataset
import prepare
from cli import UserError
from dataset import SPLITS

# ----------------------------------------------------------------------------- helpers


def save_png(path, array):
    """Write `array` as a PNG (creating folders); returns the path as str."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)
    return str(path)


def gray(value, size=8):
    """A uniform 8-bit gray square."""
    return np.full((size, size), value, np.uint8)


def make_layout(root, counts=(3, 2, 1), seg=True):
    """An OASIS-layout folder with `counts` images per split (+ seg masks)."""
    for split, n in zip(SPLITS, counts, strict=True):
        for i in range(n):
            save_png(root / f"keras_png_slices_{split}" / f"case_{i}.png", gray(10 * i))
            if seg:
                save_png(root / f"keras_png_slices_seg_{split}" / f"case_{i}.png", gray(255))  # white matter
    return root


def truncated_png(path, keep):
    """A valid PNG cut to its first `keep` bytes (keep < 0: all but the last -keep)."""
    noise = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    save_png(path, noise)
    data = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(data[:keep])
    return str(path)


def load(path, size):
    return dataset.load_image(str(path), size).numpy()


# ----------------------------------------------------------------------------- finding images


def test_find_splits_reads_the_oasis_layout_and_never_the_masks(tmp_path):
    make_layout(tmp_path, counts=(3, 2, 1), seg=True)
    splits = dataset.find_splits(tmp_path)
    assert tuple(splits) == SPLITS
    assert {k: [pathlib.Path(p).name for p in v] for k, v in splits.items()} == {
        "train": ["case_0.png", "case_1.png", "case_2.png"],
        "validate": ["case_0.png", "case_1.png"],
        "test": ["case_0.png"],
    }
    for split, paths in splits.items():
        assert all(pathlib.Path(p).is_absolute() for p in paths)
        assert all(pathlib.Path(p).parent.name == f"keras_png_slices_{split}" for p in paths)


def test_flat_folder_split_is_deterministic_disjoint_and_seeded(tmp_path):
    names = [f"img_{i:02d}.png" for i in range(40)]
    for name in names:
        save_png(tmp_path / name, gray(100))
    first = dataset.find_splits(tmp_path, val_fraction=0.1, test_fraction=0.05, seed=0)
    again = dataset.find_splits(tmp_path, val_fraction=0.1, test_fraction=0.05, seed=0)
    other = dataset.find_splits(tmp_path, val_fraction=0.1, test_fraction=0.05, seed=1)

    assert first == again
    assert {k: len(v) for k, v in first.items()} == {"train": 34, "validate": 4, "test": 2}
    every = [pathlib.Path(p).name for paths in first.values() for p in paths]
    assert sorted(every) == names  # each file in exactly one split
    assert all(paths == sorted(paths) for paths in first.values())
    assert other["validate"] != first["validate"]


def test_tiny_flat_folders_train_on_everything(tmp_path):
    names = [save_png(tmp_path / f"{i}.png", gray(0)) for i in range(2)]
    assert dataset.find_splits(tmp_path) == {"train": names, "validate": [], "test": []}
    names.append(save_png(tmp_path / "2.png", gray(0)))
    assert {k: len(v) for k, v in dataset.find_splits(tmp_path).items()} == {"train": 1, "validate": 1, "test": 1}


def test_bad_fractions_are_data_errors(tmp_path):
    for i in range(3):
        save_png(tmp_path / f"{i}.png", gray(0))
    with pytest.raises(UserError, match="fractions must be >= 0 with a sum < 1, got 0.6 and 0.5"):
        dataset.find_splits(tmp_path, val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(UserError, match="3 item.s. are too few to hold out 0.5 for validation and 0.45 for test"):
        dataset.find_splits(tmp_path, val_fraction=0.5, test_fraction=0.45)


@pytest.mark.parametrize(
    "make_bad, why",
    [
        (lambda p: truncated_png(p, keep=300), "cut in the image data"),
        (lambda p: truncated_png(p, keep=-12), "IEND chunk missing"),
        (lambda p: truncated_png(p, keep=-1), "last byte of the IEND CRC missing (PIL's verify passes this one)"),
        (lambda p: p.write_text("not an image\n"), "text file named .png"),
        (lambda p: p.write_bytes(b""), "empty file"),
    ],
)
def test_check_images_sets_aside_files_tensorflow_cannot_decode(tmp_path, make_bad, why):
    import tensorflow as tf

    good = save_png(tmp_path / "good.png", gray(7))
    bad = tmp_path / "bad.png"
    make_bad(bad)
    assert dataset.check_images([good, bad]) == ([good], [str(bad)]), why
    with pytest.raises(tf.errors.InvalidArgumentError):  # what would have stopped training
        dataset.load_image(str(bad), 8)


def test_only_png_files_count(tmp_path):
    jpeg = tmp_path / "photo.png"
    Image.fromarray(gray(5)).save(jpeg, format="JPEG")
    assert dataset.check_images([jpeg]) == ([], [str(jpeg)])
    with pytest.raises(ValueError, match="not a PNG file"):
        dataset.describe_png(jpeg)


def test_check_images_accepts_every_png_flavour(tmp_path):
    paths = [
        save_png(tmp_path / "l8.png", gray(1)),
        save_png(tmp_path / "l16.png", np.full((4, 4), 40000, np.uint16)),
        save_png(tmp_path / "rgb.png", np.zeros((4, 4, 3), np.uint8)),
        save_png(tmp_path / "rgba.png", np.zeros((4, 4, 4), np.uint8)),
        save_png(tmp_path / "bw.png", np.eye(4, dtype=bool)),
    ]
    assert dataset.check_images(paths) == (paths, [])


def test_find_splits_skips_bad_files_with_one_warning(tmp_path):
    make_layout(tmp_path, counts=(3, 1, 1), seg=False)
    train = tmp_path / "keras_png_slices_train"
    truncated_png(train / "cut.png", keep=-1)
    (train / "notes.png").write_text("hello")

    with pytest.warns(UserWarning) as caught:
        splits = dataset.find_splits(tmp_path)

    assert len(caught) == 1
    message = str(caught[0].message)
    assert "2 unreadable" in message and "cut.png" in message and "notes.png" in message
    assert [pathlib.Path(p).name for p in splits["train"]] == ["case_0.png", "case_1.png", "case_2.png"]


def test_good_folders_give_no_warning(tmp_path):
    make_layout(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset.find_splits(tmp_path)


def test_missing_empty_and_unusable_folders_are_data_errors(tmp_path):
    with pytest.raises(UserError, match="data folder not found: .*nowhere"):
        dataset.find_splits(tmp_path / "nowhere")
    with pytest.raises(UserError, match="data folder not found"):
        prepare.resolve_data_dir(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="no PNG images in"):
        dataset.find_splits(tmp_path)  # empty
    (tmp_path / "keras_png_slices_train").mkdir()
    with pytest.raises(UserError, match="no PNG images in .*keras_png_slices_train"):
        dataset.find_splits(tmp_path)
    (tmp_path / "keras_png_slices_train" / "a.png").write_text("text")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error alone, no warning before it: one line for the user
        with pytest.raises(UserError, match="all 1 PNG files are unreadable"):
            dataset.find_splits(tmp_path)


# ----------------------------------------------------------------------------- load_image


def test_black_and_white_8bit_map_to_minus_one_and_one(tmp_path):
    black = load(save_png(tmp_path / "black.png", gray(0, 32)), 16)
    white = load(save_png(tmp_path / "white.png", gray(255, 32)), 16)
    assert black.shape == (16, 16, 1) and black.dtype == np.float32
    np.testing.assert_allclose(black, -1.0, atol=1e-6)
    np.testing.assert_allclose(white, 1.0, atol=1e-6)


def test_resizing_is_antialiased(tmp_path):
    stripes = np.zeros((16, 16), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: a 2x shrink averages them to mid-gray
    out = load(save_png(tmp_path / "stripes.png", stripes), 8)
    np.testing.assert_allclose(out[:, 1:-1], 0.0, atol=1e-5)  # border pixels see one side only


def test_16bit_values_scale_by_65535(tmp_path):
    values = np.array([[0, 65535], [32768, 13107]], np.uint16)
    out = load(save_png(tmp_path / "deep.png", values), 2)[..., 0]
    np.testing.assert_allclose(out, values / 65535 * 2 - 1, atol=1e-5)
    assert out[0, 1] == pytest.approx(1.0)


def test_rgb_becomes_itu601_gray(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[1, 0] = (0, 0, 255)
    rgb[1, 1] = (255, 255, 255)
    out = load(save_png(tmp_path / "rgb.png", rgb), 2)[..., 0]
    expected = np.array([[0.2989, 0.5870], [0.1140, 1.0]]) * 2 - 1
    np.testing.assert_allclose(out, expected, atol=2e-3)


def test_rgba_alpha_composites_onto_black(tmp_path):
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (255, 255, 255, 255)  # opaque white
    rgba[0, 1] = (255, 255, 255, 0)  # transparent: background
    out = load(save_png(tmp_path / "rgba.png", rgba), 2)
    assert out.shape == (2, 2, 1)
    # resized 1x2 -> 2x2: rows repeat, columns keep their value; TF's gray
    # weights sum to 0.9999, hence the tolerance
    np.testing.assert_allclose(out[..., 0], [[1.0, -1.0], [1.0, -1.0]], atol=1e-3)


# ----------------------------------------------------------------------------- make_dataset


def distinct_images(folder, n, size=8):
    """n uniform images with gray levels 0, 20, 40, ...; returns the sorted paths."""
    return [save_png(folder / f"{i:02d}.png", gray(20 * i, size)) for i in range(n)]


def batch_levels(ds):
    """The gray level (0..255) of each image of each batch, in order."""
    return [[round((float(img.mean()) + 1) / 2 * 255) for img in batch.numpy()] for batch in ds]


def test_batches_have_the_promised_shape_dtype_and_range(tmp_path):
    paths = distinct_images(tmp_path, 5, size=12)
    ds = dataset.make_dataset(paths, 6, 2, shuffle=False)
    assert ds.element_spec.shape.as_list() == [None, 6, 6, 1]
    batches = [b.numpy() for b in ds]
    assert [b.shape for b in batches] == [(2, 6, 6, 1), (2, 6, 6, 1), (1, 6, 6, 1)]
    assert all(b.dtype == np.float32 and b.min() >= -1 and b.max() <= 1 for b in batches)
    assert batch_levels(ds) == [[0, 20], [40, 60], [80]]  # no shuffle: file order
    dropped = dataset.make_dataset(paths, 6, 2, shuffle=False, drop_remainder=True)
    assert dropped.element_spec.shape.as_list() == [2, 6, 6, 1] and len(list(dropped)) == 2


def test_shuffle_is_seeded_and_changes_every_pass(tmp_path):
    paths = distinct_images(tmp_path, 12)
    ds = dataset.make_dataset(paths, 8, 12, shuffle=True, seed=3, repeat=True)
    epoch1, epoch2 = batch_levels(ds.take(2))
    assert sorted(epoch1) == sorted(epoch2) == [20 * i for i in range(12)]
    assert epoch1 != sorted(epoch1) and epoch1 != epoch2
    again = dataset.make_dataset(paths, 8, 12, shuffle=True, seed=3, repeat=True)
    assert batch_levels(again.take(2)) == [epoch1, epoch2]
    one_pass = dataset.make_dataset(paths, 8, 12, shuffle=True, seed=3)
    assert batch_levels(one_pass) == batch_levels(one_pass) == [epoch1]


def test_every_iterator_gives_the_same_stream_however_far_another_one_read():
    """Keras reads a batch from an iterator of its own before a distributed fit, and that
    iterator's prefetching runs on: the stream must not depend on how far it got (with
    Dataset.shuffle(reshuffle_each_iteration=True) it does, once it reaches the next pass)."""
    stream = dataset.seeded_passes(5, seed=11, flip=True)
    fresh = [tuple(map(int, pair)) for pair in dataset.seeded_passes(5, seed=11, flip=True).take(15)]
    early = iter(stream)
    for _ in range(8):  # into the second pass
        next(early)
    assert [tuple(map(int, pair)) for pair in stream.take(15)] == fresh
    passes = [sorted(index for index, _ in fresh[i : i + 5]) for i in (0, 5, 10)]
    assert passes == [list(range(5))] * 3  # every index once per pass
    assert len({tuple(index for index, _ in fresh[i : i + 5]) for i in (0, 5, 10)}) == 3  # a new order each
    assert {coin for _, coin in fresh} == {0, 1}
    unshuffled = dataset.seeded_passes(5, seed=11, shuffle=False, repeat=False)
    assert [tuple(map(int, pair)) for pair in unshuffled] == [(i, 0) for i in range(5)]


def test_repeat_keeps_going(tmp_path):
    paths = distinct_images(tmp_path, 3)
    ds = dataset.make_dataset(paths, 8, 2, repeat=True, drop_remainder=True, seed=0)
    assert len(list(ds.take(7))) == 7


def test_skip_starts_exactly_at_a_later_batch_of_the_same_stream(tmp_path):
    """What a resumed run relies on: order and flips of batch k on are the same with skip = k·B."""
    left = np.zeros((8, 8), np.uint8)
    left[:, :4] = 255
    paths = [save_png(tmp_path / f"{i:02d}.png", left // (1 + i)) for i in range(5)]  # 5 distinct images
    options = dict(shuffle=True, flip=True, seed=7, repeat=True, drop_remainder=True)
    full = [b.numpy() for b in dataset.make_dataset(paths, 8, 2, **options).take(9)]
    resumed = [b.numpy() for b in dataset.make_dataset(paths, 8, 2, skip=3 * 2, **options).take(6)]
    np.testing.assert_array_equal(np.stack(full[3:]), np.stack(resumed))
    # Not trivially equal: batches cross epochs (5 images, batch 2) and differ from each other.
    assert not np.array_equal(full[3], full[4])


def test_in_memory_gives_the_same_batches_as_streaming(tmp_path):
    """Shuffle, flips, repeat and skip act on indices in memory and on names when streaming:
    the same seed must give the same images, so a run's batches do not depend on the choice."""
    left = np.zeros((12, 12), np.uint8)
    left[:, :5] = 255
    paths = [save_png(tmp_path / f"{i:02d}.png", left // (1 + i)) for i in range(7)]
    options = dict(shuffle=True, flip=True, seed=5, repeat=True, drop_remainder=True, skip=4)
    streamed = np.stack([b.numpy() for b in dataset.make_dataset(paths, 8, 3, **options).take(6)])
    cached = np.stack([b.numpy() for b in dataset.make_dataset(paths, 8, 3, in_memory=True, **options).take(6)])
    np.testing.assert_array_equal(streamed, cached)
    assert len({float(img.mean()) for img in streamed.reshape(-1, 64)}) > 3  # not all one image

    # The in-memory pipeline reads no file after it is built.
    ds = dataset.make_dataset(paths, 8, 3, in_memory=True, **options)
    for p in paths:
        pathlib.Path(p).unlink()
    np.testing.assert_array_equal(np.stack([b.numpy() for b in ds.take(6)]), cached)


def test_in_memory_uint8_gives_the_streamed_batches_within_half_a_grey_level(tmp_path):
    """8-bit PNGs at the training size come back exactly; resized, within half a grey level."""
    rng = np.random.default_rng(2)
    paths = [save_png(tmp_path / f"{i:02d}.png", rng.integers(0, 256, (12, 12), dtype=np.uint8)) for i in range(5)]
    options = dict(shuffle=True, flip=True, seed=3, repeat=True, drop_remainder=True, skip=2)
    for size, tolerance in ((12, 0.0), (8, 1 / 255 + 1e-6)):
        streamed = np.stack([b.numpy() for b in dataset.make_dataset(paths, size, 2, **options).take(5)])
        cached = np.stack(
            [b.numpy() for b in dataset.make_dataset(paths, size, 2, in_memory="uint8", **options).take(5)]
        )
        assert cached.dtype == np.float32 and cached.shape == streamed.shape == (5, 2, size, size, 1)
        np.testing.assert_allclose(cached, streamed, rtol=0, atol=tolerance)
        assert np.abs(cached - streamed).max() > 0 if tolerance else True  # resized: really rounded


def test_in_memory_kind_float32_then_uint8_then_streaming(monkeypatch):
    monkeypatch.setattr(dataset, "IN_MEMORY_BYTES", 4 * 8 * 8 * 4)
    assert dataset.in_memory_kind(4, 8) is True
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(dataset, "UINT8_MEMORY_SHARE", memory // (5 * 8 * 8))  # room for 5 uint8 images
    assert dataset.in_memory_kind(5, 8) == "uint8"
    assert dataset.in_memory_kind(6, 8) is False


def test_in_memory_none_chooses_by_size(tmp_path, monkeypatch):
    paths = distinct_images(tmp_path, 4)
    monkeypatch.setattr(dataset, "IN_MEMORY_BYTES", 4 * 8 * 8 * 4)  # exactly four 8×8 float32 images
    ds = dataset.make_dataset(paths, 8, 4, shuffle=False, in_memory=None)
    pathlib.Path(paths[0]).unlink()
    assert batch_levels(ds) == [[0, 20, 40, 60]]  # decoded before the file went away
    monkeypatch.setattr(dataset, "IN_MEMORY_BYTES", 4 * 8 * 8 * 4 - 1)
    streamed = dataset.make_dataset(paths[1:] + paths[:1], 8, 4, shuffle=False, in_memory=None)
    assert batch_levels(streamed) == [[20, 40, 60]]  # streamed: the missing file is skipped when read


def test_flip_mirrors_left_right(tmp_path):
    half = np.zeros((8, 8), np.uint8)
    half[:, :4] = 255  # left half white
    paths = [save_png(tmp_path / f"{i:02d}.png", half) for i in range(16)]
    original = load(paths[0], 8)
    mirror = original[:, ::-1]
    assert mirror[0, -1, 0] == pytest.approx(1.0) and mirror[0, 0, 0] == pytest.approx(-1.0)

    images = np.concatenate([b.numpy() for b in dataset.make_dataset(paths, 8, 4, shuffle=False, flip=True, seed=0)])
    flipped = [np.allclose(img, mirror) for img in images]
    kept = [np.allclose(img, original) for img in images]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each image is one or the other
    assert 0 < sum(flipped) < 16  # probability 2 * 2**-16 of failing by chance
    again = np.concatenate([b.numpy() for b in dataset.make_dataset(paths, 8, 4, shuffle=False, flip=True, seed=0)])
    np.testing.assert_array_equal(images, again)

    unflipped = np.concatenate([b.numpy() for b in dataset.make_dataset(paths, 8, 4, shuffle=False)])
    assert all(np.allclose(img, original) for img in unflipped)


def disc(size=32, radius=9, centre=(16, 12), value=200):
    """A bright disc of `radius` at (row, col) `centre` on black, uint8 (size, size)."""
    yy, xx = np.mgrid[:size, :size]
    return (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2) * value).astype(np.uint8)


def test_augmented_geometry_and_intensity_follow_their_bounds():
    """A disc moved by at most the shift and scaled by at most the zoom bound (its centre of mass and
    area), the background black, values in [-1, 1]; no change at all with zero bounds; the same
    key gives the same image, another key another one."""
    image = tf.constant(disc()[..., None] / 127.5 - 1.0, tf.float32)
    bounds = dataset.Augmentation()
    none = dataset.Augmentation(degrees=0, scale=0, shift=0, gain=0, log_gamma=0)
    key = tf.constant([3, 4], tf.int64)
    np.testing.assert_allclose(dataset.augmented(image, none, key).numpy(), image.numpy(), atol=1e-5)
    area = float(np.sum(image.numpy() > 0))
    centre = np.argwhere(image.numpy()[..., 0] > 0).mean(axis=0)
    moved_any = False
    for k in range(12):
        out = dataset.augmented(image, bounds, tf.constant([k, 1], tf.int64)).numpy()
        assert out.min() >= -1.0 and out.max() <= 1.0 and out.shape == image.shape
        assert np.all(out[:, 29:] == -1.0) and np.all(out[:2] == -1.0)  # far from the disc: still black
        inside = out[..., 0] > 0
        shift = np.abs(np.argwhere(inside).mean(axis=0) - centre)
        assert shift.max() <= bounds.shift * 32 + 1.0  # + a pixel of rasterisation
        assert (1 - bounds.scale) ** 2 * 0.85 <= inside.sum() / area <= (1 + bounds.scale) ** 2 * 1.15
        moved_any |= shift.max() > 0.5
    assert moved_any
    again = dataset.augmented(image, bounds, tf.constant([5, 1], tf.int64)).numpy()
    np.testing.assert_array_equal(again, dataset.augmented(image, bounds, tf.constant([5, 1], tf.int64)).numpy())
    assert not np.array_equal(again, dataset.augmented(image, bounds, tf.constant([6, 1], tf.int64)).numpy())


def test_augmented_streams_skip_exactly_and_differ_every_pass(tmp_path):
    """With augment, skip = k·B still starts at batch k of the same stream (the draws follow the
    stream position), in memory as when streaming; one image seen twice is changed differently."""
    paths = [save_png(tmp_path / f"{i}.png", disc(centre=(16, 10 + 2 * i))) for i in range(3)]
    options = dict(shuffle=True, flip=True, seed=2, repeat=True, drop_remainder=True, augment=dataset.Augmentation())
    full = np.stack([b.numpy() for b in dataset.make_dataset(paths, 32, 2, **options).take(6)])
    resumed = np.stack([b.numpy() for b in dataset.make_dataset(paths, 32, 2, skip=4, **options).take(4)])
    np.testing.assert_array_equal(full[2:], resumed)
    cached = np.stack([b.numpy() for b in dataset.make_dataset(paths, 32, 2, in_memory=True, **options).take(6)])
    np.testing.assert_allclose(cached, full, atol=1e-6)
    plain = dataset.make_dataset(paths, 32, 2, **{**options, "augment": None})
    assert not np.allclose(full, np.stack([b.numpy() for b in plain.take(6)]))
    images = full.reshape(12, 32, 32)
    assert len({img.tobytes() for img in images}) == 12  # 3 images, 4 passes: never the same change twice


def test_a_file_broken_after_the_check_is_skipped_not_fatal(tmp_path):
    paths = distinct_images(tmp_path, 3)
    pathlib.Path(paths[1]).write_text("overwritten")
    assert batch_levels(dataset.make_dataset(paths, 8, 4, shuffle=False)) == [[0, 40]]


def test_no_paths_is_a_data_error():
    with pytest.raises(UserError, match="no image files"):
        dataset.make_dataset([], 8, 2)
