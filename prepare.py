"""Making data sets of brain MRI PNG slices in the layout dataset.py reads, and the command line.

- `ensure_demo_dataset`: the default data set, axial slices of the MNI ICBM152
  T1 template that the nilearn package ships (offline, no download), written
  once to `data/demo`, with a labels.csv (the slice's height) and tissue masks
  (the template's grey- and white-matter maps).
- `convert_oasis1`: the raw OASIS-1 release (Analyze volumes) to the OASIS
  layout, split by subject, with a labels.csv (slice height, and with the
  clinical CSV age, sex, CDR, MMSE, nWBV, eTIV), and masks from FSL_SEG.
- `resolve_data_dir`: the data folder a script trains or evaluates on: the
  demo set (made on first use) or an existing folder.
- `main`: the command line, run as ``python dataset.py demo | convert-oasis1 |
  inspect`` (see ``python dataset.py -h``).

The layout, labels.csv and the reading side (`find_splits`, `find_labels`) are
dataset.py's. Folders are written atomically: into a temporary sibling folder
that is renamed into place at the end, so an interrupted run never leaves a
folder that looks complete. Errors a user can cause raise `UserError`; the
command line prints its message as one line and exits with status 1
(``--debug`` or ``OASIS_LDM_DEBUG=1`` shows the traceback instead).

This module uses no TensorFlow itself; importing dataset.py loads it.
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
import shutil
import sys
import uuid
import warnings

import numpy as np
from PIL import Image

import cli
import masks
from cli import UserError
from dataset import (
    CANVAS,
    LABELS,
    MANIFEST,
    SPLIT_FOLDER,
    SPLITS,
    _existing_folder,
    _label_value,
    _png_files,
    _some,
    _split_candidates,
    _split_keys,
    describe_png,
    find_labels,
)

# A slice is "near-empty", and not written, when its brain area is below this
# fraction of the largest axial slice of the same volume.
MIN_SLICE_AREA = 0.05

# Files of the nilearn package used by the demo data set (nilearn/datasets/data).
MNI152_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI152_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"  # grey-matter probability, T1's grid
MNI152_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"  # white-matter probability
# Held-out slabs of the demo set: (centre as a fraction of the brain-bearing slices, bottom
# to top; slices). Contiguous slabs, so a held-out slice is a new height, not the neighbour
# of a training slice 1 mm away.
DEMO_SLABS = {"validate": ((0.35, 8), (0.65, 8)), "test": ((0.2, 4), (0.8, 4))}
DEMO_GUARD = 3  # slices left out on each side of a slab: held-out slices are >= 4 mm from training ones
# 1: every 10th slice to validate, every 20th to test (neighbours of training slices); 2: no labels.csv;
# 3: no tissue masks; 4: masks with almost no CSF (the 0..255 probability maps read as 0..1)
DEMO_VERSION = 5

# The OASIS-1 cross-sectional clinical CSV (oasis_cross-sectional.csv): its ID column,
# and {its column: our label}. Sex is coded M -> 0, F -> 1.
OASIS1_ID = "ID"
OASIS1_CLINICAL = {"Age": "age", "M/F": "sex", "CDR": "cdr", "MMSE": "mmse", "nWBV": "nwbv", "eTIV": "etiv"}
OASIS1_SEX = {"M": 0.0, "F": 1.0}


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


def _on_canvas(image: np.ndarray, size: int = CANVAS, resample=Image.Resampling.LANCZOS) -> np.ndarray:
    """A 2-D uint8 image centred on a black (class 0) size x size canvas, shrunk first
    (keeping its aspect ratio, with `resample`: NEAREST for a mask) if it doesn't fit."""
    height, width = image.shape
    if max(height, width) > size:
        scale = size / max(height, width)
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(new_size, resample))
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


def _write_labels(folder: pathlib.Path, columns: list[str], rows: list[tuple[str, list[float | None]]]) -> None:
    """Write folder/labels.csv: a `file` column then `columns`; rows of (file relative
    to `folder`, values), None written as an empty (unknown) cell."""
    with open(folder / LABELS, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", *columns])
        for name, values in rows:
            writer.writerow([name, *("" if v is None else f"{v:.8g}" for v in values)])


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
    height within the brain-bearing slices, 0 (lowest) .. 1 (highest). The seg
    folders give each slice its tissue mask (`_mni152_volumes`, `masks.py`).

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


def resolve_data_dir(data_dir: str | None) -> pathlib.Path:
    """The data folder to train or evaluate on: `data_dir`, or the demo data set (made on
    first use) when it is None. Raises `UserError` if `data_dir` is not an existing folder."""
    if data_dir is None:
        return ensure_demo_dataset()
    return _existing_folder(data_dir)


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
    """Write the demo PNG slices into `folder` (OASIS layout), their tissue masks (the seg
    folders, `masks.py`'s format, same names) and labels.csv (`slice`: see
    `_slice_positions`); return the manifest."""
    volume, tissue = _mni152_volumes()
    folders = _make_split_folders(folder)
    mask_folders = masks.seg_folders(folder)
    for mask_folder in mask_folders.values():
        mask_folder.mkdir()
    counts = dict.fromkeys(SPLITS, 0)
    slices = _brain_slices(volume)
    rows, n = [], len(slices)
    for (z, image), split, position in zip(slices, demo_splits(n), _slice_positions(n), strict=True):
        if split is None:
            continue
        name = f"mni152_z{z:03d}.png"
        _write_png(_on_canvas(image), folders[split] / name)
        mask = _on_canvas(_axial_view(tissue[:, :, z]), resample=Image.Resampling.NEAREST)
        masks.write_mask(mask, mask_folders[split] / masks.mask_name(name))
        rows.append((f"{folders[split].name}/{name}", [position]))
        counts[split] += 1
    _write_labels(folder, ["slice"], rows)
    return {
        "source": f"nilearn {MNI152_T1}",
        "masks": f"argmax of background, CSF, grey matter ({MNI152_GM}), white matter ({MNI152_WM})",
        "version": DEMO_VERSION,
        "split": f"held-out slabs {DEMO_SLABS}, {DEMO_GUARD} slices left out on each side",
        "slices": counts,
        "labels": ["slice"],
    }


def _slice_positions(n: int) -> list[float]:
    """The `slice` label of each of a volume's n brain-bearing slices (`_brain_slices`),
    bottom to top: i / (n - 1), so 0 (lowest) .. 1 (highest); 0.5 for a lone slice."""
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def _mni152_volumes() -> tuple[np.ndarray, np.ndarray]:
    """The nilearn MNI152 T1 template as a RAS uint8 volume cropped to the brain, and its
    tissue classes on the same voxels (uint8, `masks.CLASS_NAMES` indices).

    Intensities: the window goes from half the 1st percentile of the brain
    voxels (CSF dark) to their 99.9th percentile (white matter near white),
    like OASIS's T1 slices. Background stays 0.

    Tissue: the argmax of four probabilities per voxel: background 1 outside the brain
    and 0 inside; grey and white matter from the template's probability maps (stored as
    0..255, divided by 255);
    CSF = max(0, 1 − GM − WM) inside it; "the brain" is where the uint8 image is above 0, so
    the mask's brain is exactly the image's.
    """
    import nibabel as nib

    def load(name: str) -> np.ndarray:
        path = _nilearn_data_folder() / name
        if not path.is_file():
            raise UserError(f"the MNI152 template is missing from the nilearn package: {path}")
        return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, dtype=np.float32)

    volume, grey, white = load(MNI152_T1), load(MNI152_GM), load(MNI152_WM)
    # nilearn ships the probability maps as 0..255 (uint8 NIfTI): back to probabilities in [0, 1].
    grey, white = grey / 255.0, white / 255.0
    brain = volume > 0
    low = 0.5 * np.percentile(volume[brain], 1)
    high = np.percentile(volume[brain], 99.9)
    xs, ys = np.flatnonzero(brain.any(axis=(1, 2))), np.flatnonzero(brain.any(axis=(0, 2)))
    crop = (slice(xs[0], xs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(None))
    image = _scale_to_uint8(volume[crop], low, high)
    shown = image > 0  # the brain as the image shows it (voxels below the window are black)
    grey, white = grey[crop], white[crop]
    csf = np.maximum(0.0, 1.0 - grey - white)
    probabilities = np.stack([~shown, shown * csf, shown * grey, shown * white], axis=-1)
    return image, np.argmax(probabilities, axis=-1).astype(np.uint8)


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
        scan, ID like ``OAS1_0001_MR1``): see labels.csv below.

    Split by subject (``OAS1_0001``, so a subject's MR1 and MR2 scans stay
    together), deterministically (`_split_keys` with `seed`), never by slice.
    Each volume is scaled to 0..255 by its own 99.5th percentile of brain
    voxels; near-empty axial slices are skipped; slices are centred on a
    256x256 canvas, named ``OAS1_0001_MR1_slice_088.png``.

    Masks: where every scan has its FSL tissue segmentation (``FSL_SEG/*_fseg.hdr`` below
    `src`, on the same T88 grid), each slice's mask is written under its own name into the
    seg folders (`masks.py`: background, CSF, grey and white matter as 0, 85, 170, 255);
    where only some scans have one, none is written, with one warning. A segmentation that
    cannot be read skips its scan, like an unreadable volume.

    Orientation: Analyze headers carry no orientation, and nibabel reads them
    as radiological storage (axes to Left, Anterior, Superior: 'LAS'). The
    volume is turned to RAS with that assumption and cut along its third axis
    (axial), then shown anterior up, patient's right on the left.

    labels.csv: `slice`, the slice's height within its volume's brain-bearing
    slices, i / (n - 1) bottom to top (as the demo set's); with `clinical` also
    age, sex (M -> 0, F -> 1), cdr, mmse, nwbv, etiv (`OASIS1_CLINICAL`) of the
    scan's row, or of another scan of the subject when the scan has
    none. Blank cells (young controls have no CDR or MMSE) stay empty: unknown.
    Scans without any row get empty clinical cells and one warning.

    Returns {split: slices written}. A volume that cannot be read is skipped
    with one warning; `UserError` when `src` or `clinical` is missing, the
    clinical table is malformed, or nothing is usable.
    """
    src = _existing_folder(src)
    table = None if clinical is None else _read_oasis1_clinical(clinical)
    volumes = sorted(src.rglob("*_t88_masked_gfc.hdr"), key=lambda p: p.name)
    if not volumes:
        raise UserError(f"no OASIS-1 volumes (*_t88_masked_gfc.hdr) under {src}")
    copies = collections.Counter(_oasis_scan(p) for p in volumes)
    repeated = sorted(scan for scan, n in copies.items() if n > 1)
    if repeated:  # their slices would overwrite each other
        raise UserError(f"{len(repeated)} scan(s) found more than once under {src}, e.g. {repeated[0]}; keep one copy")
    subjects = _split_keys(sorted({_oasis_subject(p) for p in volumes}), val_fraction, test_fraction, seed)
    split_of = {subject: split for split, members in subjects.items() for subject in members}
    segmentations = {_oasis_scan(p): p for p in src.rglob("*_fseg.hdr")}
    without = sorted({_oasis_scan(p) for p in volumes} - set(segmentations))
    if segmentations and without:  # masks for some images only: a data set masks.find_masks refuses
        warnings.warn(
            f"{len(without)} scan(s) have no FSL_SEG segmentation ({_some(without)}): no masks written", stacklevel=2
        )
    use_masks = bool(segmentations) and not without

    def build(folder: pathlib.Path) -> dict:
        counts, skipped, rows = _write_oasis1_slices(folder, volumes, split_of, segmentations if use_masks else None)
        if not counts["train"]:
            raise UserError(f"no usable OASIS-1 volume for the training split under {src}")
        columns, unmatched = ["slice"], []
        if table is not None:
            columns += list(OASIS1_CLINICAL.values())
            found = {scan: _oasis1_clinical_row(table, scan) for scan in {s for s, _, _ in rows}}
            unmatched = sorted(scan for scan, row in found.items() if row is None)
            blank = [None] * len(OASIS1_CLINICAL)
            rows = [(scan, name, values + (found[scan] or blank)) for scan, name, values in rows]
        _write_labels(folder, columns, [(name, values) for _, name, values in rows])
        return {
            "source": f"OASIS-1 {src}",
            "subjects": {split: len(members) for split, members in subjects.items()},
            "slices": counts,
            "skipped_volumes": skipped,
            "labels": columns,
            "masks": "FSL_SEG" if use_masks else None,
            **({} if table is None else {"clinical": str(clinical), "scans_without_clinical": unmatched}),
        }

    manifest = json.loads((_build_atomically(out, build) / MANIFEST).read_text())
    if manifest["skipped_volumes"]:
        skipped = manifest["skipped_volumes"]
        warnings.warn(f"skipped {len(skipped)} unreadable or empty volume(s): {_some(skipped)}", stacklevel=2)
    if manifest.get("scans_without_clinical"):
        unmatched = manifest["scans_without_clinical"]
        warnings.warn(
            f"{len(unmatched)} scan(s) have no row in {clinical}, their clinical labels are left empty: "
            f"{_some(unmatched)}",
            stacklevel=2,
        )
    return manifest["slices"]


def _write_oasis1_slices(
    folder: pathlib.Path,
    volumes: list[pathlib.Path],
    split_of: dict[str, str],
    segmentations: dict[str, pathlib.Path] | None = None,
) -> tuple[dict[str, int], list[str], list[tuple[str, str, list[float | None]]]]:
    """Write the slices of each volume into its subject's split folder under
    `folder`, and with `segmentations` ({scan: FSL_SEG volume}, one for every scan) each
    slice's mask into the seg folders; return ({split: slices written}, volumes skipped as
    unreadable (a segmentation included), [(scan, file relative to `folder`, [slice label])]
    of each slice written)."""
    folders = _make_split_folders(folder)
    mask_folders = masks.seg_folders(folder) if segmentations else {}
    for mask_folder in mask_folders.values():
        mask_folder.mkdir()
    counts, skipped, rows = dict.fromkeys(SPLITS, 0), [], []
    for done, path in enumerate(volumes, start=1):
        scan = _oasis_scan(path)
        split = split_of[_oasis_subject(path)]
        try:
            volume = _oasis1_uint8(path)
            tissue = _oasis1_tissue(segmentations[scan], volume.shape) if segmentations else None
            slices = _brain_slices(volume)
        except ValueError:
            skipped.append(str(path))
            slices = []
        for (z, image), position in zip(slices, _slice_positions(len(slices)), strict=True):
            name = f"{scan}_slice_{z:03d}.png"
            _write_png(_on_canvas(image), folders[split] / name)
            if tissue is not None:
                mask = _on_canvas(_axial_view(tissue[:, :, z]), resample=Image.Resampling.NEAREST)
                masks.write_mask(mask, mask_folders[split] / masks.mask_name(name))
            rows.append((scan, f"{folders[split].name}/{name}", [position]))
        counts[split] += len(slices)
        _progress(done, len(volumes), "volumes converted")
    return counts, skipped, rows


def _read_oasis1_clinical(path) -> dict[str, list[float | None]]:
    """{scan ID: [age, sex, cdr, mmse, nwbv, etiv]} from the OASIS-1 clinical CSV,
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
        scan = row[OASIS1_ID]
        if not scan:
            continue
        if scan in table:
            raise UserError(f"{path}: {scan} has more than one row (line {line})")
        values = []
        for name in OASIS1_CLINICAL:
            cell = row[name]
            if name == "M/F" and cell:
                if cell not in OASIS1_SEX:
                    raise UserError(f"{path}: {scan} (line {line}) has M/F {cell!r}, expected M or F")
                values.append(OASIS1_SEX[cell])
                continue
            value = _label_value(cell)
            if value is None:
                raise UserError(f"{path}: {scan} (line {line}) has {name} {cell!r}, not a number")
            values.append(None if math.isnan(value) else value)
        table[scan] = values
    return table


def _oasis1_clinical_row(table: dict[str, list[float | None]], scan: str) -> list[float | None] | None:
    """The clinical values of `scan` ('OAS1_0001_MR1'): its own row, else the first
    (in ID order) of another scan of its subject, else None."""
    if scan in table:
        return table[scan]
    subject = "_".join(scan.split("_")[:2]) + "_"
    others = sorted(key for key in table if key.startswith(subject))
    return table[others[0]] if others else None


def _oasis_subject(path: pathlib.Path) -> str:
    """'OAS1_0001' from '.../OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc.hdr'."""
    return "_".join(path.name.split("_")[:2])


def _oasis_scan(path: pathlib.Path) -> str:
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


def _oasis1_tissue(path: pathlib.Path, shape: tuple[int, ...]) -> np.ndarray:
    """An OASIS-1 FSL_SEG volume (``*_fseg.hdr``: 0 background, 1 CSF, 2 grey, 3 white
    matter, on the T88 grid of its scan) as RAS uint8 class indices of `masks.CLASS_NAMES`.
    ValueError if it can't be read, is not on its image's grid (`shape`) or holds another value."""
    import nibabel as nib

    try:
        volume = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)
    except Exception as err:  # nibabel raises OSError, ImageFileError, EOFError, ...
        raise ValueError(f"{path}: {err}") from err
    volume = volume.reshape(volume.shape[:3])
    if volume.shape != tuple(shape):
        raise ValueError(f"{path}: shape {volume.shape}, its image's is {tuple(shape)}")
    if not np.isin(volume, range(len(masks.CLASS_NAMES))).all():
        raise ValueError(f"{path}: values outside 0..{len(masks.CLASS_NAMES) - 1}")
    return volume.astype(np.uint8)


def _progress(done: int, total: int, label: str) -> None:
    """A counter on stderr, rewritten in place on a terminal; elsewhere (a log
    file) only the final count is written."""
    terminal = sys.stderr.isatty()
    if terminal or done == total:
        start = "\r" if terminal else ""
        end = "\n" if done == total else ""
        print(f"{start}{done}/{total} {label}", end=end, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """The command line (`python dataset.py COMMAND ...`; `argv` defaults to sys.argv[1:]);
    returns the exit status: 0, or 1 after one `error: ...` line (see `cli.cli`)."""
    return cli.cli(run, argv)


def run(argv: list[str]) -> None:
    """Parse `argv` and run its command. An OSError (an output folder that cannot be
    written, a file that cannot be read) becomes a `UserError`: one line, like the others."""
    args = _parser().parse_args(argv)
    try:
        args.command(args)
    except OSError as err:
        raise UserError(str(err)) from err


def _parser() -> argparse.ArgumentParser:
    parser = cli.FlagParser(
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


def _demo_command(args) -> None:
    out = ensure_demo_dataset(args.out)
    counts = _count_pngs(out)
    print(f"demo data set in {out}: " + ", ".join(f"{split} {n}" for split, n in counts.items()) + " slices")


def _convert_command(args) -> None:
    counts = convert_oasis1(args.src, args.out, args.val, args.test, args.seed, clinical=args.clinical)
    print(f"wrote {args.out}: " + ", ".join(f"{split} {n}" for split, n in counts.items()) + " slices")


def _inspect_command(args) -> None:
    """Print per split: image count, sizes and modes seen, unreadable files; then
    the label columns (`find_labels`), each with its range, number of distinct
    values and of unknown ones. `UserError` when no training image is usable
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
    if not usable["train"]:
        raise UserError(f"no usable training image in {root}")
    _inspect_masks(root, usable)
    labels = find_labels(root, usable)
    if labels is None:
        print(f"  labels: none (no {LABELS})")
        return
    print(f"  labels from {labels.source}: {len(labels.columns)} column(s)")
    every = np.concatenate(list(labels.values.values()), axis=0)
    width = max(len(column) for column in labels.columns)
    for column, values in zip(labels.columns, every.T, strict=True):
        known = values[~np.isnan(values)]
        span = f"min {known.min():g}  max {known.max():g}" if known.size else "min -  max -"
        print(f"    {column:<{width}}  {span}  distinct {len(np.unique(known))}  missing {values.size - known.size}")


def _inspect_masks(root: pathlib.Path, usable: dict[str, list[str]]) -> None:
    """Print the masks (`masks.pair_masks`): per split how many images have one, the class
    frequencies over all readable masks, then every image without a mask, mask without an
    image and mask `masks.read_paired_mask` refuses (the reason of each)."""
    pairing = masks.pair_masks(root, usable)
    if pairing is None:
        print(f"  masks: none (no {masks.SEG_FOLDER.format('<split>')} folder)")
        return
    counts, problems = np.zeros(len(masks.CLASS_NAMES), np.int64), []
    for split, images in usable.items():
        found = [(image, mask) for image, mask in zip(images, pairing.masks[split], strict=True) if mask]
        for image, mask in found:
            try:
                counts += np.bincount(masks.read_paired_mask(image, mask).ravel(), minlength=len(counts))
            except UserError as err:
                problems.append(f"bad {err}")
        print(f"  masks     {split:<9} {len(found):>6} of {len(images)} images")
    shares = counts / max(1, counts.sum())
    print("    classes: " + "  ".join(f"{n} {100 * f:.1f} %" for n, f in zip(masks.CLASS_NAMES, shares, strict=True)))
    problems += [f"no mask for {image}" for image in pairing.missing(usable)]
    problems += [f"mask without an image: {path}" for paths in pairing.orphans.values() for path in paths]
    for line in problems:
        print(f"    {line}")


def _tally(counter: collections.Counter) -> str:
    """'256x256 (120), 128x128 (3)', or '-' when empty."""
    return ", ".join(f"{key} ({n})" for key, n in counter.most_common()) or "-"
