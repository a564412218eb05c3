"""dataset.py: finding slices, bad files, the tf.data pipeline, the demo set, the OASIS-1 converter, the CLI.

Every input is a tiny image or volume written into tmp_path, so expected values
can be worked out by hand.
"""

import json
import pathlib
import subprocess
import sys
import time
import warnings

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import dataset
from cli import UserError
from dataset import SPLITS

PROJECT = pathlib.Path(__file__).resolve().parents[1]


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
                save_png(root / f"keras_png_slices_seg_{split}" / f"seg_case_{i}.png", gray(255))
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
        dataset.resolve_data_dir(str(tmp_path / "nowhere"))
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


def test_resolve_data_dir_returns_an_existing_folder(tmp_path):
    assert dataset.resolve_data_dir(str(tmp_path)) == tmp_path


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


def test_a_file_broken_after_the_check_is_skipped_not_fatal(tmp_path):
    paths = distinct_images(tmp_path, 3)
    pathlib.Path(paths[1]).write_text("overwritten")
    assert batch_levels(dataset.make_dataset(paths, 8, 4, shuffle=False)) == [[0, 40]]


def test_no_paths_is_a_data_error():
    with pytest.raises(UserError, match="no image files"):
        dataset.make_dataset([], 8, 2)


# ----------------------------------------------------------------------------- command line


def test_cli_missing_folder_is_one_line_and_exit_1(tmp_path, capsys):
    assert dataset.main(["inspect", str(tmp_path / "nowhere")]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: data folder not found: {tmp_path / 'nowhere'}"
    assert captured.out == ""


def test_cli_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(UserError):
        dataset.main(["inspect", str(tmp_path / "nowhere"), "--debug"])
    monkeypatch.setenv("OASIS_LDM_DEBUG", "1")
    with pytest.raises(UserError):
        dataset.main(["inspect", str(tmp_path / "nowhere")])


def test_cli_script_exits_1_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, str(PROJECT / "dataset.py"), "inspect", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: no PNG images in")
    assert "Traceback" not in result.stderr


def test_inspect_reports_counts_sizes_modes_and_bad_files(tmp_path, capsys):
    make_layout(tmp_path, counts=(3, 1, 0))
    save_png(tmp_path / "keras_png_slices_train" / "rgb.png", np.zeros((4, 6, 3), np.uint8))
    (tmp_path / "keras_png_slices_validate" / "broken.png").write_text("x")

    assert dataset.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "OASIS layout" in out
    assert lines["train"].split()[1] == "4" and "8x8 (3)" in lines["train"] and "6x4 (1)" in lines["train"]
    assert "L (3)" in lines["train"] and "RGB (1)" in lines["train"]
    assert lines["validate"].split()[1] == "1" and lines["test"].split()[1] == "0"
    assert "unreadable" in out and "broken.png: not a PNG file" in out
    assert "keras_png_slices_seg_train" in out


def test_inspect_fails_when_nothing_is_usable(tmp_path, capsys):
    (tmp_path / "keras_png_slices_train").mkdir()
    (tmp_path / "keras_png_slices_train" / "a.png").write_text("x")
    assert dataset.main(["inspect", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "a.png: not a PNG file" in captured.out
    assert captured.err.strip() == f"error: no usable training image in {tmp_path}"


# ----------------------------------------------------------------------------- demo data set


def test_demo_dataset_is_made_once_complete_and_atomically(tmp_path):
    out = tmp_path / "demo"
    leftover = tmp_path / ".demo.partial-dead"  # as a killed run leaves it
    save_png(leftover / "keras_png_slices_train" / "junk.png", gray(0, 256))

    assert dataset.ensure_demo_dataset(out) == out
    splits = dataset.find_splits(out)
    assert {k: len(v) for k, v in splits.items()} == {"train": 94, "validate": 16, "test": 8}
    assert not any("junk" in p for paths in splits.values() for p in paths)
    assert list(tmp_path.glob(".demo.partial-*")) == [leftover]  # its own temporary folder is gone
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["slices"] == {split: len(paths) for split, paths in splits.items()}

    brain_anywhere = np.zeros((256, 256), bool)
    for path in splits["train"]:
        with Image.open(path) as image:
            assert image.size == (256, 256) and image.mode == "L"
            brain_anywhere |= np.asarray(image) > 0
    rows, cols = np.nonzero(brain_anywhere)
    assert rows.min() > 20 and cols.min() > 20  # black border all round
    assert abs((rows.min() + rows.max()) / 2 - 127.5) <= 1 and abs((cols.min() + cols.max()) / 2 - 127.5) <= 1

    before = {p: pathlib.Path(p).stat().st_mtime_ns for p in splits["train"]}
    start = time.perf_counter()
    assert dataset.ensure_demo_dataset(out) == out
    assert time.perf_counter() - start < 0.5
    assert {p: pathlib.Path(p).stat().st_mtime_ns for p in splits["train"]} == before


def test_demo_holds_out_slabs_at_least_4_mm_from_any_training_slice(tmp_path):
    """Validation and test are contiguous slabs (two heights each), with 3 slices left out
    on each side, so no held-out slice is a 1-mm neighbour of a training slice."""
    out = dataset.ensure_demo_dataset(tmp_path / "demo")
    heights = {
        split: [int(pathlib.Path(p).stem.split("_z")[1]) for p in paths]
        for split, paths in dataset.find_splits(out).items()
    }
    for split in ("validate", "test"):
        assert min(abs(a - b) for a in heights[split] for b in heights["train"]) == 4
        runs_of_slices = np.split(heights[split], np.flatnonzero(np.diff(heights[split]) != 1) + 1)
        assert [len(r) for r in runs_of_slices] == ([8, 8] if split == "validate" else [4, 4])
    # The splitter alone, 142 slices: the 8-slice validation slab centred at 0.35 · 141 = 49.35
    # is 46..53, the 4-slice test slab at 0.2 · 141 = 28.2 is 27..30, each with 3 left out around.
    splits = dataset.demo_splits(142)
    picked = [splits[i] for i in (0, 23, 24, 27, 30, 31, 45, 46, 53, 54, 141)]
    assert picked == ["train", "train", None, "test", "test", None, None, "validate", "validate", None, "train"]


def test_an_older_demo_set_is_replaced_and_a_foreign_manifest_refused(tmp_path):
    out = tmp_path / "demo"
    save_png(out / "keras_png_slices_train" / "mni152_z001.png", gray(0, 256))
    (out / "manifest.json").write_text(json.dumps({"source": "nilearn x", "slices": {"train": 1}}))  # version 1
    dataset.ensure_demo_dataset(out)
    assert json.loads((out / "manifest.json").read_text())["version"] == dataset.DEMO_VERSION
    assert not (out / "keras_png_slices_train" / "mni152_z001.png").exists()
    assert list(tmp_path.iterdir()) == [out]  # no temporary or old folder left beside it

    other = tmp_path / "other"
    save_png(other / "mine.png", gray(0))
    (other / "manifest.json").write_text(json.dumps({"source": "my scanner"}))
    with pytest.raises(UserError, match="holds another data set"):
        dataset.ensure_demo_dataset(other)
    assert (other / "mine.png").exists()


def test_demo_does_not_overwrite_a_foreign_folder(tmp_path):
    save_png(tmp_path / "demo" / "mine.png", gray(0))
    with pytest.raises(UserError, match="already exists and is not empty"):
        dataset.ensure_demo_dataset(tmp_path / "demo")
    assert (tmp_path / "demo" / "mine.png").exists()


def test_demo_slices_look_like_a_t1_brain(tmp_path):
    """Axial, anterior up, T1 contrast: the mid slice is longer front to back than
    wide and has near-white (white matter) and darker (grey matter, CSF) pixels;
    the lowest slices (cerebellum, at the back of the head) sit in the lower half."""
    out = dataset.ensure_demo_dataset(tmp_path / "demo")
    bottom_to_top = [np.asarray(Image.open(p)) for p in sorted((out / "keras_png_slices_train").glob("*.png"))]
    middle = bottom_to_top[len(bottom_to_top) // 2]
    rows, cols = np.nonzero(middle)
    assert rows.max() - rows.min() > 1.1 * (cols.max() - cols.min())
    brain = middle[middle > 0]
    assert np.percentile(brain, 90) > 200 and np.percentile(brain, 10) < 150
    for low_slice in bottom_to_top[:10]:
        assert np.nonzero(low_slice)[0].mean() > 140  # image centre: 127.5


# ----------------------------------------------------------------------------- OASIS-1 converter

# Six subjects; subject 2 has a second session (MR2), which must land in the same split.
SESSIONS = [f"OAS1_000{i}_MR1" for i in range(1, 7)] + ["OAS1_0002_MR2"]
KEPT_Z = [3, 4, 5, 6, 7, 8]  # z 0, 1, 9 empty; z 2 holds one voxel (near-empty)


def oasis1_volume():
    """A 20x24x10 int16 volume as nibabel reads Analyze: axes to Left, Anterior, Superior.

    A block of brain at z 3..8 with a one-voxel hole at i=2 (patient's right),
    j=21 (anterior): in the PNG it must sit at the block's top-left corner.
    """
    volume = np.zeros((20, 24, 10), np.int16)
    volume[1:19, 1:23, 3:9] = 400
    volume[2, 21, 3:9] = 0
    volume[10, 10, 2] = 400
    return volume


def write_oasis1(src, sessions, disc="disc1"):
    for session in sessions:
        folder = src / disc / session / "PROCESSED" / "MPRAGE" / "T88_111"
        folder.mkdir(parents=True)
        nib.save(nib.AnalyzeImage(oasis1_volume(), np.eye(4)), folder / f"{session}_mpr_n4_anon_111_t88_masked_gfc.hdr")


def test_convert_oasis1_splits_by_subject_and_skips_empty_slices(tmp_path):
    src, out = tmp_path / "oasis", tmp_path / "png"
    write_oasis1(src, SESSIONS + ["OAS1_0007_MR1"])
    next(src.rglob("OAS1_0007_MR1_*.img")).unlink()  # an unreadable volume

    with pytest.warns(UserWarning, match="skipped 1 unreadable or empty volume.*OAS1_0007"):
        counts = dataset.convert_oasis1(src, out, val_fraction=0.2, test_fraction=0.2)

    assert counts == {split: len(list((out / f"keras_png_slices_{split}").glob("*.png"))) for split in SPLITS}
    assert sum(counts.values()) == len(SESSIONS) * len(KEPT_Z)
    subjects = {split: {p.name[:9] for p in (out / f"keras_png_slices_{split}").glob("*.png")} for split in SPLITS}
    assert all(subjects.values())
    assert sum(len(s) for s in subjects.values()) == len(set.union(*subjects.values())) == 6  # no subject twice
    z_written = {int(p.stem[-3:]) for p in out.rglob("*.png")}
    assert z_written == set(KEPT_Z)
    mr2 = next(out.rglob("OAS1_0002_MR2_slice_005.png")).parent
    assert next(out.rglob("OAS1_0002_MR1_slice_005.png")).parent == mr2  # sessions follow their subject

    image = np.asarray(Image.open(next(out.rglob("OAS1_0001_MR1_slice_005.png"))))
    assert image.shape == (256, 256) and image.dtype == np.uint8
    rows, cols = np.nonzero(image)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (22, 18)  # Y rows, X columns
    assert image[rows.min() + 1, cols.min() + 1] == 0  # the anterior-right hole: top-left
    assert image[rows.min() + 1, cols.max() - 1] == 255
    assert image[rows.max() - 1, cols.min() + 1] == 255


def test_convert_oasis1_is_deterministic_and_never_overwrites(tmp_path):
    src = tmp_path / "oasis"
    write_oasis1(src, SESSIONS)
    dataset.convert_oasis1(src, tmp_path / "a", 0.2, 0.2)
    dataset.convert_oasis1(src, tmp_path / "b", 0.2, 0.2)
    listing = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))  # noqa: E731
    assert listing(tmp_path / "a") == listing(tmp_path / "b")
    assert not list(tmp_path.glob(".*.partial-*"))
    with pytest.raises(UserError, match="already exists"):
        dataset.convert_oasis1(src, tmp_path / "a")
    write_oasis1(src, SESSIONS[:1], disc="disc2")  # the same session twice would overwrite slices
    with pytest.raises(UserError, match="1 session.s. found more than once .* OAS1_0001_MR1"):
        dataset.convert_oasis1(src, tmp_path / "c")


def test_convert_oasis1_cli(tmp_path, capsys):
    src, out = tmp_path / "oasis", tmp_path / "png"
    write_oasis1(src, SESSIONS)
    broken = src / "disc1" / "OAS1_0009_MR1_mpr_n4_anon_111_t88_masked_gfc.hdr"
    broken.write_text("not an Analyze header")
    assert dataset.main(["convert-oasis1", str(src), "--out", str(out), "--val", "0.2", "--test", "0.2"]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}: train " in captured.out
    assert captured.err.splitlines() == [
        f"{len(SESSIONS) + 1}/{len(SESSIONS) + 1} volumes converted",  # stderr is no terminal: final count only
        f"warning: skipped 1 unreadable or empty volume(s): {broken}",
    ]
    assert len(dataset.find_splits(out)["train"]) > 0

    assert dataset.main(["convert-oasis1", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.strip() == f"error: data folder not found: {tmp_path / 'nothing'}"
    assert dataset.main(["convert-oasis1", str(out), "--out", str(tmp_path / "x")]) == 1
    assert "no OASIS-1 volumes" in capsys.readouterr().err
