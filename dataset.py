"""Brain MRI slices as PNG files: finding them, their labels, and streaming them.

The rest of the project only sees batches of float32 images, shape
(B, size, size, 1), values in [-1, 1]. Writing data sets (the demo set, the
OASIS-1 converter) and the command line live in prepare.py.

Data layout ("OASIS layout", the one of the OASIS keras_png_slices download)::

    root/
      keras_png_slices_train/      *.png   training images
      keras_png_slices_validate/   *.png
      keras_png_slices_test/       *.png
      keras_png_slices_seg_*/      *.png   optional tissue masks, one per image (masks.py)
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

Errors a user can cause raise `cli.UserError`. Run as a script, this file is
the command line of prepare.py: ``python dataset.py demo | convert-oasis1 |
inspect`` (see ``python dataset.py -h``).
"""

from __future__ import annotations

if __name__ == "__main__":  # the command line: hide TensorFlow's start-up notices
    import cli

    cli.quiet_tensorflow()

import collections  # noqa: E402
import csv  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import posixpath  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from cli import UserError  # noqa: E402

SPLITS = ("train", "validate", "test")
SPLIT_FOLDER = "keras_png_slices_{}"  # .format(split); the OASIS download's names
CANVAS = 256  # side of the PNG slices prepare.py writes, as in the OASIS download
MANIFEST = "manifest.json"  # written last into the folders prepare.py makes
LABELS = "labels.csv"  # optional per-image numeric labels, in the data root (see find_labels)
IN_MEMORY_BYTES = 256 * 2**20  # make_dataset(in_memory=None) keeps a set this small in memory, as float32
UINT8_MEMORY_SHARE = 8  # ... and a larger one as uint8 if it takes at most 1/8 of the machine's memory


@dataclass(frozen=True)
class Augmentation:
    """The random changes `make_dataset(augment=...)` makes to each image, all drawn uniformly
    within ± these bounds: what a real MRI slice of another head or scanner may look like.

    Geometry (one affine map about the image centre, bilinear, background outside):
    rotation by ±`degrees`, scaling by 1 ± `scale`, shift by ± `shift` of the side along
    each axis. Intensity, on [0, 1] (where the background is 0 and stays 0): x → clip(g ·
    x^γ, 0, 1) with gain g in 1 ± `gain` and γ = exp(±`log_gamma`).
    """

    degrees: float = 10.0
    scale: float = 0.1
    shift: float = 0.05
    gain: float = 0.1
    log_gamma: float = 0.2


AUGMENT_SALT = 0x5EED  # folded into the seed, so the augmentation's draws differ from the order's

# The 8 bytes every PNG file starts with, and the 12 it ends with: the IEND
# chunk (length 0, type, CRC). PIL's verify() accepts a file cut inside the
# IEND chunk; TensorFlow's decoder doesn't.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"

# How many bad paths a warning or an error message names before "...".
SHOW_PATHS = 3

# Label columns: identifier-like names (case kept). Image names of the OASIS PNG release,
# whose slice index gives a `slice` label when there is no labels.csv.
LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
OASIS_PNG_NAME = re.compile(r"case_(\d+)_slice_(\d+)\.nii\.png")
OASIS_PNG_SOURCE = "file names (case_NNN_slice_N)"


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


# ----------------------------------------------------------------------------- tf.data pipeline


def make_dataset(
    paths,
    image_size: int,
    batch_size: int,
    *,
    shuffle: bool = True,
    flip: bool = False,
    augment: Augmentation | None = None,
    seed: int | None = None,
    drop_remainder: bool = False,
    repeat: bool = False,
    skip: int = 0,
    in_memory: bool | str | None = False,
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
    augment: an `Augmentation` applied to every image (after the flip), its draws a
        pure function of (seed, the image's position in the stream), so `skip` and
        every iterator see the same augmented images; None: none.
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
        first batch, and keeps them as float32 (N·size²·4 bytes); "uint8" keeps
        them as 8-bit grey levels (N·size² bytes: OASIS's 9,664 slices at 128 px
        take 158 MB instead of 633 MB), exact for 8-bit PNGs at `image_size`,
        within half a grey level (1/255) of the float32 images otherwise; None
        (`in_memory_kind`) chooses True up to `IN_MEMORY_BYTES`, else "uint8" up
        to 1/`UINT8_MEMORY_SHARE` of the machine's memory, else streams. Order,
        flips and `skip` are the same every way (the seeded shuffle permutes
        indices instead of names), so all give the same batches: the choice only
        moves the decoding cost off the training steps (on 2 CPU cores the
        streaming decode competes with the train step for the same cores; with
        several GPUs it would starve them). The table is built on the host
        (`/CPU:0`), where tf.data reads it.

    A file that still fails to decode (changed since it was checked) is skipped
    with a logged warning rather than stopping training, its labels with it (in
    memory: it is left out of the decoded set, which then orders the remaining
    images differently).
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise UserError("no image files to make a dataset from")
    if labels is not None:
        labels = np.asarray(labels, np.float32)
        if labels.ndim != 2 or len(labels) != len(paths):
            raise ValueError(f"labels must be ({len(paths)}, K) for {len(paths)} paths, got shape {labels.shape}")
    if in_memory is None:
        in_memory = in_memory_kind(len(paths), image_size)
    if in_memory:
        with tf.device("/CPU:0"):  # not on GPU:0 first: tf.data captures the table on the host
            decoded, kept = _decode_all(paths, image_size)
            if in_memory == "uint8":  # x = u / 127.5 - 1 for 8-bit PNGs (load_image), so this inverts it
                decoded = tf.cast(tf.round((decoded + 1.0) * 127.5), tf.uint8)
        count = len(decoded)
        if labels is not None:
            labels = labels[kept]

        def load(index):  # image `index` of `decoded`, float32 in [-1, 1]
            image = tf.gather(decoded, index)
            if image.dtype == tf.float32:
                return image
            # load_image's own arithmetic (8 bits as 16, then [0, 1] → [-1, 1]), so 8-bit PNGs match bit for bit
            return tf.image.convert_image_dtype(tf.cast(image, tf.uint16) * 257, tf.float32) * 2.0 - 1.0

    else:
        names, count = tf.constant(paths), len(paths)

        def load(index):
            return load_image(tf.gather(names, index), image_size)

    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    # Indices and coins, not files: skip passes over images without reading them.
    # enumerate() numbers the stream's images before the skip, so a skipped stream keeps their numbers.
    stream = seeded_passes(count, seed, shuffle=shuffle, flip=flip, repeat=repeat).enumerate()
    if skip:
        stream = stream.skip(skip)
    label_table = None if labels is None else tf.constant(labels)
    augment_seed = tf.constant([seed, AUGMENT_SALT], tf.int64)

    def flipped(position, index_coin):
        index, coin = index_coin
        image = load(index)
        image = tf.where(coin == 1, tf.reverse(image, axis=[1]), image)
        if augment is not None:
            image = augmented(image, augment, tf.random.experimental.stateless_fold_in(augment_seed, position))
        return image if label_table is None else (image, tf.gather(label_table, index))

    images = stream.map(flipped, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
    images = images.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    return images.with_options(without_autotune()) if in_memory else images


def augmented(image: tf.Tensor, augment: Augmentation, key: tf.Tensor) -> tf.Tensor:
    """`image` (H, W, 1) float32 in [-1, 1] changed as `augment` says, with the draws of the
    stateless seed `key` (2,) int64: the same key gives the same image. Result in [-1, 1]."""
    u = tf.random.stateless_uniform([6], seed=key, minval=-1.0, maxval=1.0)
    size = tf.cast(tf.shape(image)[0], tf.float32)
    angle = u[0] * augment.degrees * math.pi / 180.0
    zoom = 1.0 + u[1] * augment.scale
    shift = u[2:4] * augment.shift * size
    # The transform maps output pixel (x, y) to the input point it samples:
    # p_in = A (p_out − c − shift) + c, A = R(−angle) / zoom, c the centre.
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    c = (size - 1.0) / 2.0
    dx, dy = c + shift[0], c + shift[1]
    transform = tf.stack([cos, sin, c - cos * dx - sin * dy, -sin, cos, c + sin * dx - cos * dy, 0.0, 0.0])
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform[None],
        output_shape=tf.shape(image)[:2],
        fill_value=-1.0,  # black background
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
    gain = 1.0 + u[4] * augment.gain
    gamma = tf.exp(u[5] * augment.log_gamma)
    unit = tf.clip_by_value((moved + 1.0) / 2.0, 0.0, 1.0)
    return tf.clip_by_value(gain * unit**gamma, 0.0, 1.0) * 2.0 - 1.0


def in_memory_kind(count: int, image_size: int) -> bool | str:
    """What `make_dataset(in_memory=None)` does with `count` images of `image_size`²: True (float32)
    up to `IN_MEMORY_BYTES`, "uint8" up to 1/`UINT8_MEMORY_SHARE` of the physical memory, else
    False (stream)."""
    pixels = count * image_size * image_size
    if pixels * 4 <= IN_MEMORY_BYTES:
        return True
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not reported (e.g. not Linux): stream
        return False
    return "uint8" if pixels <= memory // UINT8_MEMORY_SHARE else False


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
    pairs = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), paths))
    decoded = pairs.map(lambda i, path: (i, load_image(path, image_size)), num_parallel_calls=tf.data.AUTOTUNE)
    batches = list(decoded.ignore_errors(log_warning=True).batch(256).prefetch(tf.data.AUTOTUNE))
    if not batches:
        raise UserError(f"none of the {len(paths)} image files could be decoded, e.g. {paths[0]}")
    return tf.concat([images for _, images in batches], axis=0), np.concatenate([i.numpy() for i, _ in batches])


def without_autotune() -> tf.data.Options:
    """tf.data options that turn the autotuner off, for pipelines that only gather from memory.

    The gathering needs no tuning, and the autotuner's background work competes with the
    train step for the same CPU cores, which slows training on a machine with few of them.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def with_mirrors(images: tf.data.Dataset) -> tf.data.Dataset:
    """`images` (batches), then the same batches mirrored left-right: what the diffusion
    stage trains on when `flip` is on (each training image's latent and its mirror's).
    (images, labels) batches keep their labels, mirrored or not."""

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


if __name__ == "__main__":
    import sys

    import prepare

    sys.exit(prepare.main())
