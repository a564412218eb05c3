"""dataset.py labels: labels.csv and find_labels, and labelled make_dataset batches.

As in test_dataset.py, every input is tiny and written into tmp_path.
"""

import csv
import math
import pathlib

import numpy as np
import pytest

import dataset
from cli import UserError
from dataset import SPLITS
from test_dataset import gray, make_layout, save_png


def write_csv(path, rows):
    """`rows` (lists of cells) as a CSV file; returns the path."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def read_csv(path):
    """{file: {column: cell}} of a labels.csv."""
    with open(path, newline="") as f:
        return {row.pop("file"): row for row in csv.DictReader(f)}


def layout_with_labels(root):
    """make_layout (3, 2, 1) and a labels.csv in scrambled row order: slice = 10 · i (the
    gray level), age = 70 + i, unknown for validate's case_1."""
    make_layout(root, counts=(3, 2, 1), seg=True)
    rows = [["file", "slice", "age"]]
    for split, n in zip(SPLITS, (3, 2, 1), strict=True):
        for i in range(n):
            age = "" if (split, i) == ("validate", 1) else str(70 + i)
            rows.append([f"keras_png_slices_{split}/case_{i}.png", str(10 * i), age])
    write_csv(root / "labels.csv", [rows[0]] + rows[:0:-1])
    return root


# ----------------------------------------------------------------------------- find_labels


def test_labels_csv_is_read_in_split_order_with_unknowns_as_nan(tmp_path):
    layout_with_labels(tmp_path)
    splits = dataset.find_splits(tmp_path)
    labels = dataset.find_labels(tmp_path, splits)

    assert labels.columns == ("slice", "age") and labels.source == "labels.csv"
    assert set(labels.values) == set(SPLITS)
    assert all(v.dtype == np.float32 and v.shape == (len(splits[s]), 2) for s, v in labels.values.items())
    np.testing.assert_array_equal(labels.values["train"], [[0, 70], [10, 71], [20, 72]])
    np.testing.assert_array_equal(labels.values["validate"], [[0, 70], [10, np.nan]])  # never 0
    np.testing.assert_array_equal(labels.values["test"], [[0, 70]])


def test_labels_csv_accepts_number_formats_and_rows_for_set_aside_files(tmp_path):
    """Ints, decimals, exponents, spaces; "./" and rows for a file find_splits set aside
    (unreadable) or never lists (a segmentation mask): ignored."""
    for i in range(4):
        save_png(tmp_path / f"slice_{i:02d}.png", gray(i))
    (tmp_path / "broken.png").write_text("not a PNG")
    save_png(tmp_path / "keras_png_slices_seg_x" / "seg.png", gray(0))
    write_csv(
        tmp_path / "labels.csv",
        [
            ["file", "Age", "p_2"],  # the header's case is kept
            ["slice_00.png", "80", "0.5"],
            ["./slice_01.png", " 1e-3 ", "-2"],
            ["slice_02.png", "+7.", ".25"],
            ["slice_03.png", "-0", "1E2"],
            ["broken.png", "oops", ""],
            ["keras_png_slices_seg_x/seg.png", "1", "1"],
        ],
    )
    with pytest.warns(UserWarning, match="1 unreadable"):
        splits = dataset.find_splits(tmp_path, val_fraction=0, test_fraction=0)
    labels = dataset.find_labels(tmp_path, splits)
    assert labels.columns == ("Age", "p_2")
    np.testing.assert_allclose(labels.values["train"], [[80, 0.5], [1e-3, -2], [7, 0.25], [0, 100]])
    assert labels.values["validate"].shape == (0, 2)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([["name", "age"], ["a.png", "1"]], "has no `file` column .header: name,age."),
        ([["file"], ["a.png"]], "has no label column, only `file`"),
        ([["file", "age", "age"], ["a.png", "1", "2"]], "column 'age' appears more than once"),
        ([["file", "age", ""], ["a.png", "1", "2"]], "1 bad column name.s., e.g. ''"),
        ([["file", "a b", "1st", "ok"], ["a.png", "1", "2", "3"]], "2 bad column name.s., e.g. 'a b'"),
        ([["file", "age"], ["a.png", "1", "2"], ["b.png"]], "2 row.s. without 2 cells or without a file, e.g. line 2"),
        (
            [["file", "age"], ["a.png", "1"], ["b.png", "1"], ["./a.png", "2"]],
            "1 file.s. with more than one row.*a.png",
        ),
        (
            [["file", "age"], ["a.png", "1"], ["b.png", "1"], ["gone.png", "1"], ["../a.png", "1"]],
            "2 row.s. name files that are not under .*, e.g. gone.png",
        ),
        ([["file", "age"], ["a.png", "1"]], "1 image.s. have no row, e.g. b.png"),
        ([["file", "age"], ["a.png", "M"], ["b.png", "nan"]], "2 value.s. are not finite.*line 2: age of a.png is 'M'"),
        (
            [["file", "age"], ["a.png", "1"], ["b.png", "-inf"]],
            "1 value.s. are not finite.*line 3: age of b.png is '-inf'",
        ),
        ([["file", "age"], ["a.png", "1e39"], ["b.png", "1"]], "line 2: age of a.png is '1e39'"),  # float32 overflow
        ([], "is empty"),
    ],
)
def test_malformed_labels_csv_is_a_one_line_data_error(tmp_path, rows, message):
    for name in ("a.png", "b.png"):
        save_png(tmp_path / name, gray(0))
    write_csv(tmp_path / "labels.csv", rows)
    splits = {"train": [str(tmp_path / "a.png"), str(tmp_path / "b.png")], "validate": [], "test": []}
    with pytest.raises(UserError, match=message) as caught:
        dataset.find_labels(tmp_path, splits)
    assert "\n" not in str(caught.value)


def test_oasis_png_names_give_a_slice_label_per_case(tmp_path):
    """Case 1 has slices 10..14 spread over two splits; case 2 a single slice (0.5)."""
    for split, case, index in [("train", 1, 10), ("train", 1, 14), ("train", 2, 7), ("validate", 1, 11)]:
        save_png(tmp_path / f"keras_png_slices_{split}" / f"case_{case:03d}_slice_{index}.nii.png", gray(1))
    labels = dataset.find_labels(tmp_path, dataset.find_splits(tmp_path))
    assert labels.columns == ("slice",) and labels.source == "file names (case_NNN_slice_N)"
    np.testing.assert_allclose(labels.values["train"], [[0], [1], [0.5]])  # sorted: 001_slice_10, _14, 002
    np.testing.assert_allclose(labels.values["validate"], [[0.25]])
    assert labels.values["test"].shape == (0, 1)

    save_png(tmp_path / "keras_png_slices_test" / "other.png", gray(1))  # one name that doesn't match: none
    assert dataset.find_labels(tmp_path, dataset.find_splits(tmp_path)) is None


def test_no_labels_csv_and_other_names_mean_no_labels(tmp_path):
    make_layout(tmp_path)
    assert dataset.find_labels(tmp_path, dataset.find_splits(tmp_path)) is None


# ----------------------------------------------------------------------------- make_dataset(labels=...)


def half_bright(folder, n):
    """n images, left half 255 // (1 + i): distinct means, and a flip shows."""
    left = np.zeros((8, 8), np.uint8)
    left[:, :4] = 255
    return [save_png(folder / f"{i:02d}.png", left // (1 + i)) for i in range(n)]


def image_labels(paths):
    """(N, 2): each image's mean in [-1, 1] (what identifies it, flipped or not), and NaN
    for odd i, i otherwise (unknowns must survive)."""
    means = [dataset.load_image(p, 8).numpy().mean() for p in paths]
    return np.array([[m, math.nan if i % 2 else i] for i, m in enumerate(means)], np.float32)


def assert_rows_match(images, rows, labels):
    """Each row of `rows` is the whole row of `labels` (NaN included) of the image beside it."""
    assert len(images) == len(rows)
    for image, row in zip(images, rows, strict=True):
        j = np.argmin(np.abs(labels[:, 0] - image.mean()))
        assert abs(labels[j, 0] - image.mean()) < 1e-6
        np.testing.assert_array_equal(row, labels[j])


@pytest.mark.parametrize("in_memory", [False, True])
def test_labelled_batches_hold_the_same_images_with_their_own_labels(tmp_path, in_memory):
    paths = half_bright(tmp_path, 7)
    labels = image_labels(paths)
    options = dict(shuffle=True, flip=True, seed=5, repeat=True, drop_remainder=True, in_memory=in_memory)

    plain = np.stack([b.numpy() for b in dataset.make_dataset(paths, 8, 3, skip=2 * 3, **options).take(6)])
    ds = dataset.make_dataset(paths, 8, 3, skip=2 * 3, labels=labels, **options)
    assert ds.element_spec[0].shape.as_list() == [3, 8, 8, 1] and ds.element_spec[1].shape.as_list() == [3, 2]
    pairs = [(x.numpy(), y.numpy()) for x, y in ds.take(6)]
    images, rows = np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])
    np.testing.assert_array_equal(images, plain)  # order and flips as without labels
    assert rows.dtype == np.float32
    assert_rows_match(images.reshape(-1, 8, 8, 1), rows.reshape(-1, 2), labels)
    assert np.isnan(rows[..., 1]).any() and not np.isnan(rows[..., 0]).any()  # NaN survives
    assert not np.array_equal(images[0], images[1])  # not trivially equal

    # skip = k · B starts at batch k of the unskipped stream, labels included.
    full = [(x.numpy(), y.numpy()) for x, y in dataset.make_dataset(paths, 8, 3, labels=labels, **options).take(8)]
    np.testing.assert_array_equal(np.stack([x for x, _ in full[2:]]), images[: len(full) - 2])
    np.testing.assert_array_equal(np.stack([y for _, y in full[2:]]), rows[: len(full) - 2])


def test_labelled_batches_are_the_same_in_memory_and_streamed(tmp_path):
    paths = half_bright(tmp_path, 5)
    labels = image_labels(paths)
    options = dict(shuffle=True, flip=True, seed=2, repeat=True, skip=3, labels=labels)
    streamed = [(x.numpy(), y.numpy()) for x, y in dataset.make_dataset(paths, 8, 2, **options).take(5)]
    cached = [(x.numpy(), y.numpy()) for x, y in dataset.make_dataset(paths, 8, 2, in_memory=True, **options).take(5)]
    for (x1, y1), (x2, y2) in zip(streamed, cached, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_file_broken_after_the_check_drops_its_label_too(tmp_path, in_memory):
    paths = half_bright(tmp_path, 6)
    labels = image_labels(paths)
    pathlib.Path(paths[2]).write_text("overwritten")
    ds = dataset.make_dataset(paths, 8, 4, seed=1, labels=labels, in_memory=in_memory)
    pairs = [(x.numpy(), y.numpy()) for x, y in ds]  # one epoch: each iteration shuffles anew
    images, rows = np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs])
    assert len(images) == len(rows) == 5
    assert labels[2, 0] not in rows[:, 0]
    assert_rows_match(images, rows, labels)


def test_unshuffled_labels_keep_the_file_order(tmp_path):
    paths = half_bright(tmp_path, 5)
    labels = image_labels(paths)
    batches = list(dataset.make_dataset(paths, 8, 2, shuffle=False, labels=labels))
    assert [tuple(y.shape) for _, y in batches] == [(2, 2), (2, 2), (1, 2)]
    np.testing.assert_array_equal(np.concatenate([y.numpy() for _, y in batches]), labels)


def test_labels_must_match_the_paths(tmp_path):
    paths = half_bright(tmp_path, 3)
    with pytest.raises(ValueError, match=r"labels must be \(3, K\) for 3 paths, got shape \(2, 1\)"):
        dataset.make_dataset(paths, 8, 2, labels=np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        dataset.make_dataset(paths, 8, 2, labels=np.zeros(3))


def test_with_mirrors_keeps_the_labels(tmp_path):
    paths = half_bright(tmp_path, 3)
    labels = image_labels(paths)
    ds = dataset.with_mirrors(dataset.make_dataset(paths, 8, 3, shuffle=False, labels=labels))
    (x1, y1), (x2, y2) = [(x.numpy(), y.numpy()) for x, y in ds]
    np.testing.assert_array_equal(x2, x1[:, :, ::-1])
    np.testing.assert_array_equal(y1, labels)
    np.testing.assert_array_equal(y2, labels)
    plain = [x.numpy() for x in dataset.with_mirrors(dataset.make_dataset(paths, 8, 3, shuffle=False))]
    np.testing.assert_array_equal(np.stack(plain), np.stack([x1, x2]))  # unlabelled batches: as before
