"""Brain MRI slices as PNG files: finding them, streaming them, and making them.

Everything that touches image files lives here; the rest of the project only
sees batches of float32 images, shape (B, size, size, 1), values in [-1, 1].

Data layout ("OASIS layout", the one of the OASIS keras_png_slices download)::

    root/
      keras_png_slices_train/      *.png   training images
      keras_png_slices_validate/   *.png
      keras_png_slices_test/       *.png
      keras_png_slices_seg_*/      *.png   segmentation masks, never used
      labels.csv                           optional: numeric labels of each image

A flat folder of PNG files is accepted too; it is then split by file (not by
subject), deterministically, see `find_splits`; its labels.csv lies in it.

labels.csv (optional) gives each image numeric labels ("conditions")::

    file,slice,age,sex
    keras_png_slices_train/mni152_z050.png,0.25,74,1
    keras_png_slices_train/mni152_z051.png,0.26,,1

`file` is the PNG's path relative to the data root, with forward slashes (just
the name in a flat folder); the other columns are numbers, an empty cell is
unknown (NaN, never 0). Every usable image needs a row. Without the file,
names of the OASIS PNG release (``case_001_slice_12.nii.png``) give a
`slice` label; see `find_labels`.

What this module provides:

- `find_splits` / `check_images`: list the images of each split, and set aside,
  with one warning, the files that cannot be decoded (truncated, corrupt, not a
  PNG), so that no bad file can stop training in the middle of an epoch.
- `find_labels` / `Labels`: the optional per-image numeric labels of each
  split, from labels.csv (or OASIS PNG file names), validated and aligned with
  `find_splits`' lists.
- `make_dataset` / `load_image`: a streaming `tf.data` pipeline (files are read
  and decoded as batches are needed, so memory does not grow with the number
  of files), or for a small training set the same batches gathered from images
  decoded once into memory; with `labels`, (images, labels) batches.
- `ensure_demo_dataset`: the default data set, axial slices of the MNI ICBM152
  T1 template that the nilearn package ships (offline, no download), written
  once to `data/demo`, with a labels.csv (the slice's height).
- `convert_oasis1`: the raw OASIS-1 release (Analyze volumes) to the layout
  above, split by subject, with a labels.csv (slice height, and with the
  clinical CSV age, sex, CDR, MMSE, nWBV, eTIV).
- A command line: ``python dataset.py demo | convert-oasis1 | inspect`` (see
  ``python dataset.py -h``).

Folders are written atomically: into a temporary sibling folder that is renamed
into place at the end, so an interrupted run never leaves a folder that looks
complete. Errors a user can cause raise `UserError`; the command line prints
its message as one line and exits with status 1 (``--debug`` or
``OASIS_LDM_DEBUG=1`` shows the traceback instead).

TensorFlow is imported inside the functions that need it, so that the
command line starts in a fraction of a second and without TensorFlow's
start-up logs.
"""

from __future__ import annotations

import argparse
import collections
import csv
import importlib.util
import json
import math
import os
import pathlib
import posixpath
import random
import re
import shutil
import sys
import uuid
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cli import UserError

if TYPE_CHECKING:
    import tensorflow as tf

SPLITS = ("train", "validate", "test")
SPLIT_FOLDER = "keras_png_slices_{}"  # .format(split); the OASIS download's names
CANVAS = 256  # side of the PNG slices this module writes, as in the OASIS download
MANIFEST = "manifest.json"  # written last into folders this module makes
LABELS = "labels.csv"  # optional per-image numeric labels, in the data root (see find_labels)
IN_MEMORY_BYTES = 256 * 2**20  # make_dataset(in_memory=None) keeps a training set this small in memory

# A slice is "near-empty", and not written, when its brain area is below this
# fraction of the largest axial slice of the same volume.
MIN_SLICE_AREA = 0.05

# The 8 bytes every PNG file starts with, and the 12 it ends with: the IEND
# chunk (length 0, type, CRC). PIL's verify() accepts a file cut inside the
# IEND chunk; TensorFlow's decoder doesn't.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"

# Files of the nilearn package used by the demo data set (nilearn/datasets/data).
MNI152_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
# Held-out slabs of the demo set: (centre as a fraction of the brain-bearing slices, bottom
# to top; slices). Contiguous slabs, so a held-out slice is a new height, not the neighbour
# of a training slice 1 mm away.
DEMO_SLABS = {"validate": ((0.35, 8), (0.65, 8)), "test": ((0.2, 4), (0.8, 4))}
DEMO_GUARD = 3  # slices left out on each side of a slab: held-out slices are >= 4 mm from training ones
# 1: every 10th slice to validate, every 20th to test (neighbours of training slices); 2: no labels.csv
DEMO_VERSION = 3

# How many bad paths a warning or an error message names before "...".
SHOW_PATHS = 3

# Label columns: identifier-like names (case kept). Image names of the OASIS PNG release,
# whose slice index gives a `slice` label when there is no labels.csv.
LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
OASIS_PNG_NAME = re.compile(r"case_(\d+)_slice_(\d+)\.nii\.png")
OASIS_PNG_SOURCE = "file names (case_NNN_slice_N)"

# The OASIS-1 cross-sectional clinical CSV (oasis_cross-sectional.csv): its ID column,
# and {its column: our label}. Sex is coded M -> 0, F -> 1.
OASIS1_ID = "ID"
OASIS1_CLINICAL = {"Age": "age", "M/F": "sex", "CDR": "cdr", "MMSE": "mmse", "nWBV": "nwbv", "eTIV": "etiv"}
OASIS1_SEX = {"M": 0.0, "F": 1.0}


# ----------------------------------------------------------------------------- finding images


def find_splits(root, val_fraction: float = 0.1, test_fraction: float = 0.05, seed: int = 0) -> dict[str, list[str]]:
    """The usable PNG images of each split under `root`.

    `root` is either an OASIS-layout folder (the split folders decide) or a
    flat folder of PNGs, split by file with `val_fraction` / `test_fraction`
    of the files (rounded; at least one each from 3 files on) chosen
    by a shuffle seeded with `seed`. Files are split before they are checked,
    so a bad file never moves another one to a different split.

    Returns {split: sorted absolute paths} with the keys of `SPLITS`; the
    validate and test lists may be empty. Files that cannot be decoded are left
    out, with one warning naming how many and the first few.
    Raises `UserError` when `root` is missing or holds no usable training image.
    """
    root = _existing_folder(root)
    candidates = _split_candidates(root, val_fraction, test_fraction, seed)
    if not candidates["train"]:
        raise UserError(f"no PNG images in {root / SPLIT_FOLDER.format('train')}")
    splits, bad = {}, []
    for split, paths in candidates.items():
        splits[split], bad_here = check_images(paths)
        bad += bad_here
    if not splits["train"]:  # before the warning: one line for the user, not two
        raise UserError(f"no usable training image in {root}: all {len(candidates['train'])} PNG files are unreadable")
    if bad:
        warnings.warn(
            f"skipping {len(bad)} unreadable PNG file(s) under {root}: {_some(bad)} "
            f"(`python dataset.py inspect {root}` lists them all)",
            stacklevel=2,
        )
    return splits


def check_images(paths) -> tuple[list[str], list[str]]:
    """Split `paths` into (good, bad), keeping their order.

    A file is bad when it cannot be opened, is not a PNG, is truncated or has a
    corrupt chunk, or has no pixels; see `describe_png`.
    """
    good, bad = [], []
    for path in paths:
        try:
            describe_png(path)
        except ValueError:
            bad.append(str(path))
        else:
            good.append(str(path))
    return good, bad


def describe_png(path) -> tuple[tuple[int, int], str]:
    """((width, height), PIL mode) of a complete, decodable PNG file.

    Checks the signature, that the file ends with the IEND chunk (a truncated
    file doesn't), every chunk's CRC (PIL's verify), and the size.
    Raises ValueError with the reason otherwise (unreadable file included).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - len(PNG_END)))
            tail = f.read()
        if head != PNG_SIGNATURE:
            raise ValueError("not a PNG file")
        if tail != PNG_END:
            raise ValueError("truncated (no IEND chunk at the end)")
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            size, mode = image.size, image.mode
    except ValueError:
        raise
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise ValueError(f"unreadable: {err}") from err
    if min(size) < 1:
        raise ValueError(f"empty image {size[0]}x{size[1]}")
    return size, mode


def resolve_data_dir(data_dir: str | None) -> pathlib.Path:
    """The data folder to train on: `data_dir`, or the demo data set (made on
    first use) when it is None. Raises `UserError` if `data_dir` is missing."""
    if data_dir is None:
        return ensure_demo_dataset()
    return _existing_folder(data_dir)


def _existing_folder(path) -> pathlib.Path:
    """`path` as a Path; UserError unless it is an existing folder."""
    folder = pathlib.Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"data folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"not a folder: {folder}")
    return folder


def _split_candidates(root: pathlib.Path, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """{split: sorted absolute paths of the *.png files}, nothing checked yet.

    OASIS layout when `root/keras_png_slices_train` exists, otherwise the
    PNG files directly in `root`, split by `_split_keys`.
    """
    if (root / SPLIT_FOLDER.format("train")).is_dir():
        return {split: _png_files(root / SPLIT_FOLDER.format(split)) for split in SPLITS}
    files = _png_files(root)
    if not files:
        raise UserError(
            f"no PNG images in {root}: expected a {SPLIT_FOLDER.format('train')}/ folder or *.png files in it"
        )
    names = {os.path.basename(path): path for path in files}
    assignment = _split_keys(sorted(names), val_fraction, test_fraction, seed)
    return {split: sorted(names[name] for name in keys) for split, keys in assignment.items()}


def _png_files(folder: pathlib.Path) -> list[str]:
    """Sorted absolute paths of the *.png files (any case) directly in `folder`;
    empty when the folder doesn't exist."""
    if not folder.is_dir():
        return []
    return sorted(os.path.abspath(p) for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())


def _split_keys(keys: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Deterministic split of distinct `keys` (file names, or subjects).

    The sorted keys are shuffled with `random.Random(seed)`; the first
    round(n * test_fraction) go to test, the next round(n * val_fraction) to
    validate, the rest to train. From 3 keys on, a fraction > 0 gets at least
    one key; below that everything goes to train.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(
            f"validation and test fractions must be >= 0 with a sum < 1, got {val_fraction} and {test_fraction}"
        )
    order = sorted(keys)
    random.Random(seed).shuffle(order)

    def held_out(fraction: float) -> int:
        at_least = 1 if fraction > 0 and len(order) >= 3 else 0
        return max(at_least, round(len(order) * fraction))

    n_test, n_val = held_out(test_fraction), held_out(val_fraction)
    if n_test + n_val >= len(order):
        raise UserError(
            f"{len(order)} item(s) are too few to hold out {val_fraction:g} for validation "
            f"and {test_fraction:g} for test"
        )
    return {
        "train": sorted(order[n_test + n_val :]),
        "validate": sorted(order[n_test : n_test + n_val]),
        "test": sorted(order[:n_test]),
    }


def _some(paths: list[str]) -> str:
    """The first few of `paths`, comma-separated, '...' when there are more."""
    shown = ", ".join(str(p) for p in paths[:SHOW_PATHS])
    return shown + (", ..." if len(paths) > SHOW_PATHS else "")


# ----------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class Labels:
    """Numeric labels ("conditions") of the images of each split.

    columns: label names in file order, e.g. ("slice", "age").
    values: {split: float32 (len(splits[split]), len(columns))}, row i the labels
        of image i of `find_splits`' list for that split; NaN = unknown.
    source: where they come from: "labels.csv", or `OASIS_PNG_SOURCE`.
    """

    columns: tuple[str, ...]
    values: dict[str, np.ndarray]
    source: str


def find_labels(root, splits: dict[str, list[str]]) -> Labels | None:
    """The labels of the images in `splits` (what `find_splits(root)` returns), or None.

    From `root/labels.csv` when it exists (see the module docstring): a header
    with a `file` column and identifier-like label columns, then one row per
    image; empty cells are unknown (NaN). Rows for files that exist but are not
    in `splits` (set aside as unreadable, segmentation masks) are ignored.
    Otherwise, when every image is named as in the OASIS PNG release
    (``case_001_slice_12.nii.png``): one column `slice`, the slice index scaled
    to 0..1 over each case's slices in all splits (0.5 for a lone slice).
    Otherwise None.

    Raises `UserError` for a malformed labels.csv: no `file` or no label
    column, a bad or repeated column name, a row of the wrong length, a file
    named twice or missing under `root`, a usable image without a row, a value
    of a usable image's row that is not a finite number (``80``, ``0.5``,
    ``1e-3`` are numbers; ``nan``, ``inf``, ``M`` are not).
    """
    root = _existing_folder(root)
    if (root / LABELS).is_file():
        return _read_labels_csv(root, splits)
    names = [os.path.basename(path) for paths in splits.values() for path in paths]
    if names and all(OASIS_PNG_NAME.fullmatch(name) for name in names):
        return _oasis_png_labels(splits)
    return None


def _read_labels_csv(root: pathlib.Path, splits: dict[str, list[str]]) -> Labels:
    """`find_labels` from root/labels.csv."""
    path = root / LABELS
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
        rows = [(line, row) for line, row in enumerate(csv.reader(f), start=1) if any(cell.strip() for cell in row)]
    if not rows:
        raise UserError(f"{path} is empty: expected a header `file,<label>,...`")
    header = [cell.strip() for cell in rows[0][1]]
    if "file" not in header:
        raise UserError(f"{path} has no `file` column (header: {','.join(header)})")
    repeated = sorted(name for name, n in collections.Counter(header).items() if n > 1)
    if repeated:
        raise UserError(f"{path}: column {repeated[0]!r} appears more than once in the header")
    bad_names = [name for name in header if name != "file" and not LABEL_NAME.fullmatch(name)]
    if bad_names:
        raise UserError(
            f"{path}: {len(bad_names)} bad column name(s), e.g. {bad_names[0]!r}: "
            "use letters, digits and underscores, not starting with a digit"
        )
    columns = tuple(name for name in header if name != "file")
    if not columns:
        raise UserError(f"{path} has no label column, only `file`")
    file_at = header.index("file")
    label_at = [header.index(name) for name in columns]

    table, duplicates, short = {}, [], []  # table: {file: (line, row)}
    for line, row in rows[1:]:
        if len(row) != len(header) or not row[file_at].strip():
            short.append(line)
            continue
        name = posixpath.normpath(row[file_at].strip())  # "./a.png" is "a.png"
        if name in table:
            duplicates.append(name)
        table.setdefault(name, (line, row))
    if short:
        raise UserError(
            f"{path}: {len(short)} row(s) without {len(header)} cells or without a file, e.g. line {short[0]}"
        )
    if duplicates:
        raise UserError(f"{path}: {len(duplicates)} file(s) with more than one row, e.g. {duplicates[0]}")
    absent = [  # ".." or "/..." would leave the data folder
        name for name in table if name.startswith("/") or name.split("/")[0] == ".." or not (root / name).is_file()
    ]
    if absent:
        raise UserError(f"{path}: {len(absent)} row(s) name files that are not under {root}, e.g. {absent[0]}")
    keys = {split: [_relative_name(root, p) for p in paths] for split, paths in splits.items()}
    unlabelled = [name for names in keys.values() for name in names if name not in table]
    if unlabelled:
        raise UserError(f"{path}: {len(unlabelled)} image(s) have no row, e.g. {unlabelled[0]}")

    numbers, bad_values = {}, []  # only the rows of usable images: the others are ignored
    for name in sorted({name for names in keys.values() for name in names}, key=lambda name: table[name][0]):
        line, row = table[name]
        numbers[name] = [_label_value(row[at]) for at in label_at]
        bad_values += [
            f"line {line}: {column} of {name} is {row[at].strip()!r}"
            for column, at, value in zip(columns, label_at, numbers[name], strict=True)
            if value is None
        ]
    if bad_values:
        raise UserError(f"{path}: {len(bad_values)} value(s) are not finite numbers, e.g. {bad_values[0]}")
    values = {
        split: np.array([numbers[name] for name in names], np.float32).reshape(len(names), len(columns))
        for split, names in keys.items()
    }
    return Labels(columns, values, LABELS)


def _label_value(cell: str) -> float | None:
    """The number in a labels.csv cell: NaN when empty, None when it is not a
    finite number (text, nan, inf, or too large for float32)."""
    cell = cell.strip()
    if not cell:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) and abs(value) <= float(np.finfo(np.float32).max) else None


def _relative_name(root: pathlib.Path, path: str) -> str:
    """`path` relative to `root` with forward slashes: its `file` in labels.csv."""
    return pathlib.PurePath(os.path.relpath(path, os.path.abspath(root))).as_posix()


def _oasis_png_labels(splits: dict[str, list[str]]) -> Labels:
    """`find_labels` from OASIS PNG names: `slice` scaled to 0..1 within each case."""
    parsed = {
        split: [OASIS_PNG_NAME.fullmatch(os.path.basename(path)).groups() for path in paths]
        for split, paths in splits.items()
    }
    span = {}  # case -> (lowest, highest) slice index over all splits
    for case, index in (pair for pairs in parsed.values() for pair in pairs):
        low, high = span.get(int(case), (int(index), int(index)))
        span[int(case)] = (min(low, int(index)), max(high, int(index)))

    def position(case: str, index: str) -> float:
        low, high = span[int(case)]
        return 0.5 if high == low else (int(index) - low) / (high - low)

    values = {
        split: np.array([position(*pair) for pair in pairs], np.float32).reshape(len(pairs), 1)
        for split, pairs in parsed.items()
    }
    return Labels(("slice",), values, OASIS_PNG_SOURCE)


def _write_labels(folder: pathlib.Path, columns: list[str], rows: list[tuple[str, list[float | None]]]) -> None:
    """Write folder/labels.csv: a `file` column then `columns`; rows of (file relative
    to `folder`, values), None written as an empty (unknown) cell."""
    with open(folder / LABELS, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", *columns])
        for name, values in rows:
            writer.writerow([name, *("" if v is None else f"{v:.8g}" for v in values)])


# ----------------------------------------------------------------------------- tf.data pipeline


def make_dataset(
    paths,
    image_size: int,
    batch_size: int,
    *,
    shuffle: bool = True,
    flip: bool = False,
    seed: int | None = None,
    drop_remainder: bool = False,
    repeat: bool = False,
    skip: int = 0,
    in_memory: bool | None = False,
    labels: np.ndarray | None = None,
) -> tf.data.Dataset:
    """A dataset of image batches, float32 (B, image_size, image_size, 1) in [-1, 1],
    streamed from the files or (in_memory) decoded once and gathered from memory;
    with `labels`, of (images, labels) batches, labels float32 (B, K).

    paths: PNG files, best checked first (`find_splits` does).
    labels: float32 (len(paths), K), row i the labels of paths[i] (a split of
        `find_labels`' values); NaN (unknown) is kept. They travel with their
        image through shuffle, repeat and skip, and flips leave them alone: the
        images are the same, in the same order, as without labels.
    shuffle: a new order every pass of the repeated stream (`seeded_passes`): the
        indices of the files are shuffled before decoding, so no image buffer is
        needed. A single pass (repeat False) has one order, whichever iterator reads it.
    flip: mirror each image left-right with probability 1/2, anew each pass.
    seed: the same seed gives the same order and flips, in every iterator of the
        dataset and in every process; None: a random seed, drawn once here.
    drop_remainder: drop the last, smaller batch.
    repeat: repeat forever (then give `fit` a `steps_per_epoch`).
    skip: images of the stream to pass over before the first batch, without
        decoding them. With a seed, ``skip = k · batch_size`` starts the stream
        exactly at batch k of the unskipped one (order and flips alike): a
        resumed run goes on where it stopped.
    in_memory: False streams (each image is read, decoded and resized when a
        batch needs it); True decodes and resizes every image once, before the
        first batch, and keeps them (N·size²·4 bytes); None chooses True when
        that is at most `IN_MEMORY_BYTES`. Order, flips and `skip` are the same
        either way (the seeded shuffle permutes indices instead of names), so
        both give identical batches: the choice only moves the decoding cost
        off the training steps (on 2 CPU cores the streaming decode competes
        with the train step for the same cores).

    A file that still fails to decode (changed since it was checked) is skipped
    with a logged warning rather than stopping training, its labels with it (in
    memory: it is left out of the decoded set, which then orders the remaining
    images differently).
    """
    import tensorflow as tf  # here, not at the top: see the module docstring

    paths = [str(p) for p in paths]
    if not paths:
        raise UserError("no image files to make a dataset from")
    if labels is not None:
        labels = np.asarray(labels, np.float32)
        if labels.ndim != 2 or len(labels) != len(paths):
            raise ValueError(f"labels must be ({len(paths)}, K) for {len(paths)} paths, got shape {labels.shape}")
    if in_memory is None:
        in_memory = len(paths) * image_size * image_size * 4 <= IN_MEMORY_BYTES
    if in_memory:
        decoded, kept = _decode_all(paths, image_size)
        count = len(decoded)
        if labels is not None:
            labels = labels[kept]

        def load(index):  # image `index` of `decoded`
            return tf.gather(decoded, index)

    else:
        names, count = tf.constant(paths), len(paths)

        def load(index):
            return load_image(tf.gather(names, index), image_size)

    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    # Indices and coins, not files: skip passes over images without reading them.
    stream = seeded_passes(count, seed, shuffle=shuffle, flip=flip, repeat=repeat)
    if skip:
        stream = stream.skip(skip)
    label_table = None if labels is None else tf.constant(labels)

    def flipped(index, coin):
        image = load(index)
        image = tf.where(coin == 1, tf.reverse(image, axis=[1]), image)
        return image if label_table is None else (image, tf.gather(label_table, index))

    images = stream.map(flipped, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
    images = images.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    return images.with_options(without_autotune()) if in_memory else images


def seeded_passes(count: int, seed: int, *, shuffle: bool = True, flip: bool = False, repeat: bool = True):
    """A dataset of (index, coin) int64 scalar pairs: pass p = 0, 1, ... (one pass unless
    `repeat`) visits every index of range(count) once, in the order
    stateless_shuffle(range(count), seed=(seed, p)) (range order without `shuffle`), each
    with a coin in {0, 1} (1 = mirror the image; always 0 without `flip`).

    A pure function of (seed, p), so every iterator of the dataset gives the same stream.
    `Dataset.shuffle(seed=..., reshuffle_each_iteration=True)` would not: all iterators of a
    dataset draw their passes' seeds from one shared generator, so how far an earlier
    iterator read changes the order of the next one. Keras reads a batch from one such
    iterator to build a model under a distribution strategy, and its prefetching runs on
    for a while: that made a resumed multi-worker run's stream depend on timing.
    """
    import tensorflow as tf

    passes = tf.data.Dataset.counter() if repeat else tf.data.Dataset.range(1)

    def one_pass(p):
        order_seed, coin_seed = tf.unstack(tf.random.experimental.stateless_split(tf.stack([seed, p]), 2))
        order = tf.range(count, dtype=tf.int64)
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(order, seed=order_seed)
        if flip:
            coins = tf.random.stateless_uniform([count], coin_seed, minval=0, maxval=2, dtype=tf.int64)
        else:
            coins = tf.zeros([count], tf.int64)
        return order, coins

    return passes.map(one_pass).unbatch()


def _decode_all(paths: list[str], image_size: int) -> tuple[tf.Tensor, np.ndarray]:
    """Every image of `paths` decoded: (float32 (M, size, size, 1), int64 (M,) their
    indices in `paths`); a file that fails to decode is left out, with a logged warning.
    UserError when none decodes."""
    import tensorflow as tf

    pairs = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), paths))
    decoded = pairs.map(lambda i, path: (i, load_image(path, image_size)), num_parallel_calls=tf.data.AUTOTUNE)
    batches = list(decoded.ignore_errors(log_warning=True).batch(256).prefetch(tf.data.AUTOTUNE))
    if not batches:
        raise UserError(f"none of the {len(paths)} image files could be decoded, e.g. {paths[0]}")
    return tf.concat([images for _, images in batches], axis=0), np.concatenate([i.numpy() for i, _ in batches])


def without_autotune() -> tf.data.Options:
    """tf.data options that turn the autotuner off, for pipelines that only gather from memory.

    On 2 CPU cores the autotuner's background work made most epochs of the demo's autoencoder
    fit 1.7× slower (819 against 480 ms a step, XLA, float32, at random epochs): the gathering
    needs no tuning, and the cores are the train step's.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def with_mirrors(images: tf.data.Dataset) -> tf.data.Dataset:
    """`images` (batches), then the same batches mirrored left-right: what the diffusion
    stage trains on when `flip` is on (each training image's latent and its mirror's).
    (images, labels) batches keep their labels, mirrored or not."""
    import tensorflow as tf

    def mirrored(x, *labels):
        return (tf.reverse(x, axis=[2]), *labels) if labels else tf.reverse(x, axis=[2])

    return images.concatenate(images.map(mirrored))


def load_image(path, image_size: int) -> tf.Tensor:
    """One PNG file as float32 (image_size, image_size, 1) in [-1, 1].

    8- and 16-bit PNGs alike (black -> -1, full scale -> +1). Colour images
    become gray with the ITU-R 601 weights (0.299 R + 0.587 G + 0.114 B, as
    PIL's convert("L")); an alpha channel is composited onto black. The image
    is resized with antialiasing (a plain squeeze or stretch: the slices are
    square). Works eagerly and inside `tf.data.Dataset.map`.
    """
    import tensorflow as tf

    # Decoding to uint16 scales 8-bit values by 257, so both depths share one path.
    image = tf.io.decode_png(tf.io.read_file(path), channels=0, dtype=tf.uint16)
    image = tf.image.convert_image_dtype(image, tf.float32)  # [0, 1]
    image = _to_gray(image)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    image = tf.clip_by_value(image, 0.0, 1.0) * 2.0 - 1.0
    return tf.ensure_shape(image, [image_size, image_size, 1])


def _to_gray(image: tf.Tensor) -> tf.Tensor:
    """(H, W, C) float in [0, 1] with C = 1 (gray), 2 (gray + alpha), 3 (RGB)
    or 4 (RGBA) -> (H, W, 1); alpha multiplies (composites onto black)."""
    import tensorflow as tf

    channels = tf.shape(image)[-1]
    return tf.switch_case(
        channels - 1,
        [
            lambda: image,
            lambda: image[..., :1] * image[..., 1:2],
            lambda: tf.image.rgb_to_grayscale(image[..., :3]),
            lambda: tf.image.rgb_to_grayscale(image[..., :3]) * image[..., 3:4],
        ],
    )


# ----------------------------------------------------------------------------- writing slices


def _axial_view(slice_xy: np.ndarray) -> np.ndarray:
    """An axial slice of a RAS volume (axis 0 to the patient's right, axis 1 to
    anterior), shown as radiologists do: anterior at the top, the patient's
    right on the image's left. (X, Y) -> (Y, X)."""
    return slice_xy[::-1, ::-1].T


def _scale_to_uint8(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """`volume` mapped linearly from [low, high] to [0, 255], clipped, as uint8.
    With low >= 0 the black background stays 0."""
    scaled = (volume.astype(np.float32) - low) / max(high - low, 1e-6)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def _on_canvas(image: np.ndarray, size: int = CANVAS) -> np.ndarray:
    """A 2-D uint8 image centred on a black size x size canvas, shrunk first
    (keeping its aspect ratio) if it doesn't fit."""
    height, width = image.shape
    if max(height, width) > size:
        scale = size / max(height, width)
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(new_size, Image.Resampling.LANCZOS))
        height, width = image.shape
    canvas = np.zeros((size, size), np.uint8)
    top, left = (size - height) // 2, (size - width) // 2
    canvas[top : top + height, left : left + width] = image
    return canvas


def _brain_slices(volume: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(index, radiological view) of each axial slice of a RAS uint8 volume
    (X, Y, Z) that is not near-empty (see MIN_SLICE_AREA)."""
    areas = np.count_nonzero(volume, axis=(0, 1))
    keep = np.flatnonzero(areas >= max(1, MIN_SLICE_AREA * areas.max()))
    return [(int(k), _axial_view(volume[:, :, k])) for k in keep]


def _write_png(image: np.ndarray, path: pathlib.Path) -> None:
    """A 2-D uint8 array as an 8-bit gray PNG."""
    Image.fromarray(image).save(path)


def _make_split_folders(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Create the OASIS-layout folders of each split in `root`; {split: folder}."""
    folders = {split: root / SPLIT_FOLDER.format(split) for split in SPLITS}
    for folder in folders.values():
        folder.mkdir()
    return folders


def _build_atomically(out, build, replace: bool = False) -> pathlib.Path:
    """Make the folder `out` with `build(tmp_folder) -> manifest dict`, atomically.

    `build` fills a temporary sibling folder, the manifest is written last, and
    the folder is renamed to `out`: `out` exists only when complete. The
    temporary folder is removed if `build` fails; one left by a killed process
    (`.NAME.partial-*`) is never read and may be deleted. With `replace`, an
    existing `out` (one this module made) is moved aside only once the new
    folder is complete, then deleted.
    """
    out = pathlib.Path(out).expanduser()
    if not replace and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; remove it or choose another output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.partial-{tag}"
    tmp.mkdir()  # unlike tempfile.mkdtemp, keeps the user's default permissions
    try:
        manifest = build(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if replace and out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # replaces an empty `out`, fails on a non-empty one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _count_pngs(root: pathlib.Path) -> dict[str, int]:
    """{split: number of PNG files} of an OASIS-layout folder."""
    return {split: len(_png_files(root / SPLIT_FOLDER.format(split))) for split in SPLITS}


# ----------------------------------------------------------------------------- demo data set


def ensure_demo_dataset(out="data/demo") -> pathlib.Path:
    """The demo data set in `out`, made on first use; returns `out`.

    Axial slices of the MNI ICBM152 2009a symmetric T1 template (one averaged
    adult brain, 1 mm voxels) that the nilearn package ships, so nothing is
    downloaded. nilearn's copy is already skull-stripped (brain on black), so
    the brain mask is simply "intensity > 0". Slices are 256x256 uint8 PNGs,
    brain centred, anterior up, in the OASIS layout. Validation and test are
    contiguous slabs at other heights than the training slices (`DEMO_SLABS`,
    `demo_splits`), so held-out metrics measure slices the model has not seen
    a 1-mm neighbour of. labels.csv gives each slice its `slice` label, its
    height within the brain-bearing slices, 0 (lowest) .. 1 (highest).

    Idempotent: returns at once when `out` holds a complete demo set of this
    version (its manifest exists); an older demo set there is replaced, in one
    rename. Raises `UserError` when `out` holds something else.
    """
    out = pathlib.Path(out).expanduser()
    manifest = out / MANIFEST
    if manifest.is_file():
        made = json.loads(manifest.read_text())
        if made.get("version") == DEMO_VERSION:
            return out
        if not str(made.get("source", "")).startswith("nilearn"):
            raise UserError(f"{out} holds another data set (its {MANIFEST} is not the demo set's)")
        return _build_atomically(out, _write_demo_slices, replace=True)
    try:
        return _build_atomically(out, _write_demo_slices)
    except OSError:
        if (out / MANIFEST).is_file():  # another process made it meanwhile
            return out
        raise


def demo_splits(n: int) -> list[str | None]:
    """The split of each of n slices, bottom to top: "validate" and "test" in the slabs of
    `DEMO_SLABS`, None (left out) within `DEMO_GUARD` slices of a slab, "train" elsewhere."""
    splits: list[str | None] = ["train"] * n
    for split, slabs in DEMO_SLABS.items():
        for centre, size in slabs:
            first = round(centre * (n - 1) - (size - 1) / 2)
            for i in range(max(0, first - DEMO_GUARD), min(n, first + size + DEMO_GUARD)):
                if splits[i] == "train":
                    splits[i] = None
            for i in range(first, first + size):
                splits[i] = split
    return splits


def _write_demo_slices(folder: pathlib.Path) -> dict:
    """Write the demo PNG slices into `folder` (OASIS layout) and their labels.csv
    (`slice`: see `_slice_positions`); return the manifest."""
    volume = _mni152_uint8()
    folders = _make_split_folders(folder)
    counts = dict.fromkeys(SPLITS, 0)
    slices = _brain_slices(volume)
    rows, n = [], len(slices)
    for (z, image), split, position in zip(slices, demo_splits(n), _slice_positions(n), strict=True):
        if split is None:
            continue
        name = f"mni152_z{z:03d}.png"
        _write_png(_on_canvas(image), folders[split] / name)
        rows.append((f"{folders[split].name}/{name}", [position]))
        counts[split] += 1
    _write_labels(folder, ["slice"], rows)
    return {
        "source": f"nilearn {MNI152_T1}",
        "version": DEMO_VERSION,
        "split": f"held-out slabs {DEMO_SLABS}, {DEMO_GUARD} slices left out on each side",
        "slices": counts,
        "labels": ["slice"],
    }


def _slice_positions(n: int) -> list[float]:
    """The `slice` label of each of a volume's n brain-bearing slices (`_brain_slices`),
    bottom to top: i / (n - 1), so 0 (lowest) .. 1 (highest); 0.5 for a lone slice."""
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def _mni152_uint8() -> np.ndarray:
    """The nilearn MNI152 T1 template as a RAS uint8 volume cropped to the brain.

    Intensities: the window goes from half the 1st percentile of the brain
    voxels (CSF dark) to their 99.9th percentile (white matter near white),
    like OASIS's T1 slices. Background stays 0.
    """
    import nibabel as nib

    path = _nilearn_data_folder() / MNI152_T1
    if not path.is_file():
        raise UserError(f"the MNI152 template is missing from the nilearn package: {path}")
    volume = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, dtype=np.float32)
    brain = volume > 0
    low = 0.5 * np.percentile(volume[brain], 1)
    high = np.percentile(volume[brain], 99.9)
    xs, ys = np.flatnonzero(brain.any(axis=(1, 2))), np.flatnonzero(brain.any(axis=(0, 2)))
    cropped = volume[xs[0] : xs[-1] + 1, ys[0] : ys[-1] + 1, :]
    return _scale_to_uint8(cropped, low, high)


def _nilearn_data_folder() -> pathlib.Path:
    """nilearn's bundled data folder, found without importing nilearn (slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the nilearn package is needed for the demo data set: pip install -r requirements.txt")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


# ----------------------------------------------------------------------------- OASIS-1 converter


def convert_oasis1(
    src, out, val_fraction: float = 0.1, test_fraction: float = 0.05, seed: int = 0, clinical=None
) -> dict[str, int]:
    """Convert the OASIS-1 cross-sectional release to PNG slices in the OASIS layout.

    src: the extracted release; every ``*_t88_masked_gfc.hdr`` below it is used
        (``OAS1_0001_MR1/PROCESSED/MPRAGE/T88_111/...``, any disc folders above).
    out: the new folder (must not exist, or be empty); written atomically.
    clinical: None, or the release's clinical table ``oasis_cross-sectional.csv``
        (``ID,M/F,Hand,Age,Educ,SES,MMSE,CDR,eTIV,nWBV,ASF,Delay``, one row per
        session, ID like ``OAS1_0001_MR1``): see labels.csv below.

    Split by subject (``OAS1_0001``, so a subject's MR1 and MR2 sessions stay
    together), deterministically (`_split_keys` with `seed`), never by slice.
    Each volume is scaled to 0..255 by its own 99.5th percentile of brain
    voxels; near-empty axial slices are skipped; slices are centred on a
    256x256 canvas, named ``OAS1_0001_MR1_slice_088.png``.

    Orientation: Analyze headers carry no orientation, and nibabel reads them
    as radiological storage (axes to Left, Anterior, Superior: 'LAS'). The
    volume is turned to RAS with that assumption and cut along its third axis
    (axial), then shown anterior up, patient's right on the left.

    labels.csv: `slice`, the slice's height within its volume's brain-bearing
    slices, i / (n - 1) bottom to top (as the demo set's); with `clinical` also
    age, sex (M -> 0, F -> 1), cdr, mmse, nwbv, etiv (`OASIS1_CLINICAL`) of the
    session's row, or of another session of the subject when the session has
    none. Blank cells (young controls have no CDR or MMSE) stay empty: unknown.
    Sessions without any row get empty clinical cells and one warning.

    Returns {split: slices written}. A volume that cannot be read is skipped
    with one warning; `UserError` when `src` or `clinical` is missing, the
    clinical table is malformed, or nothing is usable.
    """
    src = _existing_folder(src)
    table = None if clinical is None else _read_oasis1_clinical(clinical)
    volumes = sorted(src.rglob("*_t88_masked_gfc.hdr"), key=lambda p: p.name)
    if not volumes:
        raise UserError(f"no OASIS-1 volumes (*_t88_masked_gfc.hdr) under {src}")
    copies = collections.Counter(_oasis_session(p) for p in volumes)
    repeated = sorted(session for session, n in copies.items() if n > 1)
    if repeated:  # their slices would overwrite each other
        raise UserError(
            f"{len(repeated)} session(s) found more than once under {src}, e.g. {repeated[0]}; keep one copy"
        )
    subjects = _split_keys(sorted({_oasis_subject(p) for p in volumes}), val_fraction, test_fraction, seed)
    split_of = {subject: split for split, members in subjects.items() for subject in members}

    def build(folder: pathlib.Path) -> dict:
        counts, skipped, rows = _write_oasis1_slices(folder, volumes, split_of)
        if not counts["train"]:
            raise UserError(f"no usable OASIS-1 volume for the training split under {src}")
        columns, unmatched = ["slice"], []
        if table is not None:
            columns += list(OASIS1_CLINICAL.values())
            found = {session: _oasis1_clinical_row(table, session) for session in {s for s, _, _ in rows}}
            unmatched = sorted(session for session, row in found.items() if row is None)
            blank = [None] * len(OASIS1_CLINICAL)
            rows = [(session, name, values + (found[session] or blank)) for session, name, values in rows]
        _write_labels(folder, columns, [(name, values) for _, name, values in rows])
        return {
            "source": f"OASIS-1 {src}",
            "subjects": {split: len(members) for split, members in subjects.items()},
            "slices": counts,
            "skipped_volumes": skipped,
            "labels": columns,
            **({} if table is None else {"clinical": str(clinical), "sessions_without_clinical": unmatched}),
        }

    manifest = json.loads((_build_atomically(out, build) / MANIFEST).read_text())
    if manifest["skipped_volumes"]:
        skipped = manifest["skipped_volumes"]
        warnings.warn(f"skipped {len(skipped)} unreadable or empty volume(s): {_some(skipped)}", stacklevel=2)
    if manifest.get("sessions_without_clinical"):
        unmatched = manifest["sessions_without_clinical"]
        warnings.warn(
            f"{len(unmatched)} session(s) have no row in {clinical}, their clinical labels are left empty: "
            f"{_some(unmatched)}",
            stacklevel=2,
        )
    return manifest["slices"]


def _write_oasis1_slices(
    folder: pathlib.Path, volumes: list[pathlib.Path], split_of: dict[str, str]
) -> tuple[dict[str, int], list[str], list[tuple[str, str, list[float | None]]]]:
    """Write the slices of each volume into its subject's split folder under
    `folder`; return ({split: slices written}, volumes skipped as unreadable,
    [(session, file relative to `folder`, [slice label])] of each slice written)."""
    folders = _make_split_folders(folder)
    counts, skipped, rows = dict.fromkeys(SPLITS, 0), [], []
    for done, path in enumerate(volumes, start=1):
        session = _oasis_session(path)
        split = split_of[_oasis_subject(path)]
        try:
            slices = _brain_slices(_oasis1_uint8(path))
        except ValueError:
            skipped.append(str(path))
            slices = []
        for (z, image), position in zip(slices, _slice_positions(len(slices)), strict=True):
            name = f"{session}_slice_{z:03d}.png"
            _write_png(_on_canvas(image), folders[split] / name)
            rows.append((session, f"{folders[split].name}/{name}", [position]))
        counts[split] += len(slices)
        _progress(done, len(volumes), "volumes converted")
    return counts, skipped, rows


def _read_oasis1_clinical(path) -> dict[str, list[float | None]]:
    """{session ID: [age, sex, cdr, mmse, nwbv, etiv]} from the OASIS-1 clinical CSV,
    None for a blank cell; sex M -> 0, F -> 1. UserError when the file is missing,
    lacks the ID column or one of `OASIS1_CLINICAL`, names an ID twice, or holds a
    value that is not a number (or a sex other than M or F)."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"clinical file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [name.strip() for name in reader.fieldnames or []]
        rows = [{key.strip(): (cell or "").strip() for key, cell in row.items() if key} for row in reader]
    if OASIS1_ID not in header:
        raise UserError(f"{path} has no {OASIS1_ID} column (header: {','.join(header)})")
    missing = [name for name in OASIS1_CLINICAL if name not in header]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}")
    table = {}
    for line, row in enumerate(rows, start=2):
        session = row[OASIS1_ID]
        if not session:
            continue
        if session in table:
            raise UserError(f"{path}: {session} has more than one row (line {line})")
        values = []
        for name in OASIS1_CLINICAL:
            cell = row[name]
            if name == "M/F" and cell:
                if cell not in OASIS1_SEX:
                    raise UserError(f"{path}: {session} (line {line}) has M/F {cell!r}, expected M or F")
                values.append(OASIS1_SEX[cell])
                continue
            value = _label_value(cell)
            if value is None:
                raise UserError(f"{path}: {session} (line {line}) has {name} {cell!r}, not a number")
            values.append(None if math.isnan(value) else value)
        table[session] = values
    return table


def _oasis1_clinical_row(table: dict[str, list[float | None]], session: str) -> list[float | None] | None:
    """The clinical values of `session` ('OAS1_0001_MR1'): its own row, else the first
    (in ID order) of another session of its subject, else None."""
    if session in table:
        return table[session]
    subject = "_".join(session.split("_")[:2]) + "_"
    others = sorted(key for key in table if key.startswith(subject))
    return table[others[0]] if others else None


def _oasis_subject(path: pathlib.Path) -> str:
    """'OAS1_0001' from '.../OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc.hdr'."""
    return "_".join(path.name.split("_")[:2])


def _oasis_session(path: pathlib.Path) -> str:
    """'OAS1_0001_MR1' from '.../OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc.hdr'."""
    return "_".join(path.name.split("_")[:3])


def _oasis1_uint8(path: pathlib.Path) -> np.ndarray:
    """An OASIS-1 Analyze volume as RAS uint8 (X, Y, Z), 0 outside the brain,
    the 99.5th percentile of brain voxels -> 255. ValueError if it can't be read
    or has no brain voxel."""
    import nibabel as nib

    try:
        image = nib.as_closest_canonical(nib.load(path))
        volume = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises OSError, ImageFileError, EOFError, ...
        raise ValueError(f"{path}: {err}") from err
    volume = volume.reshape(volume.shape[:3])  # drop a trailing time axis of length 1
    brain = volume > 0
    if not brain.any():
        raise ValueError(f"{path}: no brain voxel")
    return _scale_to_uint8(volume, 0.0, np.percentile(volume[brain], 99.5))


def _progress(done: int, total: int, label: str) -> None:
    """A counter on stderr, rewritten in place on a terminal; elsewhere (a log
    file) only the final count is written."""
    terminal = sys.stderr.isatty()
    if terminal or done == total:
        start = "\r" if terminal else ""
        end = "\n" if done == total else ""
        print(f"{start}{done}/{total} {label}", end=end, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    """The command line; returns the exit status (0 ok, 1 data error).
    Warnings are printed as one "warning: ..." line each, after the command."""
    args = _parser().parse_args(argv)
    debug = args.debug or os.environ.get("OASIS_LDM_DEBUG", "") not in ("", "0")
    with warnings.catch_warnings(record=True) as caught:
        try:
            status = args.command(args)
        except (UserError, OSError) as err:
            if debug:
                raise
            print(f"error: {err}", file=sys.stderr)
            status = 1
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dataset.py", description="Brain MRI PNG slices: make the demo set, convert OASIS-1, inspect a folder."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks (or set OASIS_LDM_DEBUG=1)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", parents=[common], help="make the demo data set (MNI152 template slices)")
    demo.add_argument("--out", default="data/demo", help="output folder (default: %(default)s)")
    demo.set_defaults(command=_demo_command)

    convert = commands.add_parser(
        "convert-oasis1", parents=[common], help="OASIS-1 Analyze volumes -> PNG slices, split by subject"
    )
    convert.add_argument("src", help="the extracted OASIS-1 release (disc folders or OAS1_*_MR1 folders)")
    convert.add_argument("--out", required=True, help="new output folder")
    convert.add_argument(
        "--val", type=float, default=0.1, help="subjects' fraction for validation (default: %(default)s)"
    )
    convert.add_argument("--test", type=float, default=0.05, help="subjects' fraction for test (default: %(default)s)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the subject split (default: %(default)s)")
    convert.add_argument(
        "--clinical",
        metavar="CSV",
        help="oasis_cross-sectional.csv: add age, sex (M 0, F 1), cdr, mmse, nwbv, etiv to labels.csv",
    )
    convert.set_defaults(command=_convert_command)

    inspect = commands.add_parser("inspect", parents=[common], help="image counts, sizes and unreadable files")
    inspect.add_argument("dir", help="an OASIS-layout folder or a flat folder of PNGs")
    inspect.set_defaults(command=_inspect_command)
    return parser


def _demo_command(args) -> int:
    out = ensure_demo_dataset(args.out)
    counts = _count_pngs(out)
    print(f"demo data set in {out}: " + ", ".join(f"{split} {n}" for split, n in counts.items()) + " slices")
    return 0


def _convert_command(args) -> int:
    counts = convert_oasis1(args.src, args.out, args.val, args.test, args.seed, clinical=args.clinical)
    print(f"wrote {args.out}: " + ", ".join(f"{split} {n}" for split, n in counts.items()) + " slices")
    return 0


def _inspect_command(args) -> int:
    """Print per split: image count, sizes and modes seen, unreadable files; then
    the label columns (`find_labels`), each with its range, number of distinct
    values and of unknown ones. Exit status 1 when no training image is usable
    (or labels.csv is malformed)."""
    root = _existing_folder(args.dir)
    layout = "OASIS layout" if (root / SPLIT_FOLDER.format("train")).is_dir() else "flat folder, split by file (seed 0)"
    print(f"{root}: {layout}")
    usable = {}
    for split, paths in _split_candidates(root, 0.1, 0.05, 0).items():
        sizes, modes, bad, usable[split] = collections.Counter(), collections.Counter(), [], []
        for path in paths:
            try:
                (width, height), mode = describe_png(path)
            except ValueError as err:
                bad.append(f"{path}: {err}")
                continue
            sizes[f"{width}x{height}"] += 1
            modes[mode] += 1
            usable[split].append(path)
        print(f"  {split:<9} {len(usable[split]):>6} images  sizes: {_tally(sizes)}  modes: {_tally(modes)}")
        for line in bad:
            print(f"    unreadable {line}")
    segmentation = sorted(p.name for p in root.glob("keras_png_slices_seg_*") if p.is_dir())
    if segmentation:
        print(f"  ignored (segmentation masks): {', '.join(segmentation)}")
    if not usable["train"]:
        raise UserError(f"no usable training image in {root}")
    labels = find_labels(root, usable)
    if labels is None:
        print(f"  labels: none (no {LABELS})")
        return 0
    print(f"  labels from {labels.source}: {len(labels.columns)} column(s)")
    every = np.concatenate(list(labels.values.values()), axis=0)
    width = max(len(column) for column in labels.columns)
    for column, values in zip(labels.columns, every.T, strict=True):
        known = values[~np.isnan(values)]
        span = f"min {known.min():g}  max {known.max():g}" if known.size else "min -  max -"
        print(f"    {column:<{width}}  {span}  distinct {len(np.unique(known))}  missing {values.size - known.size}")
    return 0


def _tally(counter: collections.Counter) -> str:
    """'256x256 (120), 128x128 (3)', or '-' when empty."""
    return ", ".join(f"{key} ({n})" for key, n in counter.most_common()) or "-"


if __name__ == "__main__":
    sys.exit(main())
