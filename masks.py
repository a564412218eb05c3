"""Tissue masks: the segmentation PNGs beside the slices, found, checked and read.

The OASIS PNG release ships a mask beside every slice, in a folder of its own per split::

    root/
      keras_png_slices_train/       case_001_slice_12.nii.png  ...
      keras_png_slices_seg_train/   seg_001_slice_12.nii.png   ...

A mask is an 8-bit grey PNG of its image's size holding 4 classes as grey levels
(`CLASS_VALUES`): background 0, CSF 85, grey matter 170, white matter 255. The mask of an
image lies in the seg folder of the image's split and is named as the release names it
(`mask_name`): ``case_NNN_slice_K.nii.png`` → ``seg_NNN_slice_K.nii.png``; an image of any
other name (the demo set's, `convert-oasis1`'s) has a mask of its own name.

Masks are in use when any split has a seg folder (`find_masks`); then every image must
have its mask and every mask its image, or the data set is refused with one line naming
a file. A flat folder of PNGs has no masks. Class indices 0..3 (`read_mask`) are what the
rest of the project sees; a mask is resized with nearest neighbours only (`resize_mask`),
so no resize invents a class between two others.

Errors a user can cause raise `cli.UserError`. No TensorFlow here.
"""

from __future__ import annotations

import os
import pathlib
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cli import UserError
from dataset import SPLIT_FOLDER, SPLITS, _png_files, describe_png

CLASS_NAMES = ("background", "csf", "grey_matter", "white_matter")
CLASS_VALUES = (0, 85, 170, 255)  # grey level of class k in the release's PNG masks
SEG_FOLDER = "keras_png_slices_seg_{}"  # .format(split)
OASIS_IMAGE_NAME = re.compile(r"case_(\d+_slice_\d+\.nii\.png)")  # its mask: "seg_" + group 1

_CLASS_OF_VALUE = np.full(256, 255, np.uint8)  # grey level → class index; 255 = not a class value
_CLASS_OF_VALUE[list(CLASS_VALUES)] = np.arange(len(CLASS_VALUES))


def mask_name(image_name: str) -> str:
    """The file name of an image's mask: ``case_001_slice_12.nii.png`` → ``seg_001_slice_12.nii.png``
    (the OASIS release's rule); any other name is its own mask's name."""
    match = OASIS_IMAGE_NAME.fullmatch(image_name)
    return f"seg_{match.group(1)}" if match else image_name


def seg_folders(root) -> dict[str, pathlib.Path]:
    """{split: root/keras_png_slices_seg_<split>} for every split (existing or not)."""
    return {split: pathlib.Path(root) / SEG_FOLDER.format(split) for split in SPLITS}


@dataclass(frozen=True)
class MaskPairing:
    """Which mask goes with which image (`pair_masks`).

    masks: {split: the mask path of each image of the split's list, None where it is missing}.
    orphans: {split: mask paths of the seg folder whose image is not in the image folder}.
    """

    masks: dict[str, list[str | None]]
    orphans: dict[str, list[str]]

    def missing(self, splits: dict[str, list[str]]) -> list[str]:
        """The images of `splits` (the lists paired) that have no mask."""
        return [
            image
            for split, images in splits.items()
            for image, mask in zip(images, self.masks[split], strict=True)
            if mask is None
        ]


def pair_masks(root, splits: dict[str, list[str]]) -> MaskPairing | None:
    """Pair each image of `splits` (what `dataset.find_splits(root)` returns) with its mask
    by file name (`mask_name`); None when `root` has no seg folder (no masks in use).

    A mask is an orphan when no PNG of its split's image folder has its name, so an image
    set aside as unreadable does not make its mask one. Nothing is read here: sizes and
    values are `check_masks`'.
    """
    root = pathlib.Path(root)
    folders = seg_folders(root)
    if not any(folder.is_dir() for folder in folders.values()):
        return None
    masks, orphans = {}, {}
    for split, images in splits.items():
        present = {os.path.basename(path) for path in _png_files(folders[split])}
        every_image = {mask_name(os.path.basename(path)) for path in _png_files(root / SPLIT_FOLDER.format(split))}
        names = [mask_name(os.path.basename(path)) for path in images]
        masks[split] = [str(folders[split] / name) if name in present else None for name in names]
        orphans[split] = [str(folders[split] / name) for name in sorted(present - every_image)]
    return MaskPairing(masks, orphans)


def find_masks(root, splits: dict[str, list[str]]) -> dict[str, list[str]] | None:
    """`pair_masks`, for training: {split: mask paths}, item i the mask of splits[split][i],
    or None without seg folders. Raises `UserError` naming a file for an image without its
    mask (a split with images but no seg folder included) and for a mask without its image."""
    pairing = pair_masks(root, splits)
    if pairing is None:
        return None
    missing = pairing.missing(splits)
    if missing:
        split = next(split for split, images in splits.items() if missing[0] in images)
        expected = seg_folders(root)[split] / mask_name(os.path.basename(missing[0]))
        more = f" ({len(missing)} images have none)" if len(missing) > 1 else ""
        raise UserError(f"no mask for {missing[0]}: expected {expected}{more}")
    orphans = [path for paths in pairing.orphans.values() for path in paths]
    if orphans:
        more = f" ({len(orphans)} masks have none)" if len(orphans) > 1 else ""
        raise UserError(f"mask {orphans[0]} has no image of its name in the split's image folder{more}")
    return pairing.masks


def read_mask(path) -> np.ndarray:
    """A mask PNG as uint8 class indices (H, W) in 0..3 (`CLASS_NAMES`).

    Raises `UserError` naming the file when it is unreadable, not 8-bit grey (mode L), or
    holds a grey level outside `CLASS_VALUES`."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            values = np.asarray(image)
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ...)
        raise UserError(f"mask {path} is unreadable: {err}") from err
    if mode != "L":
        raise UserError(
            f"mask {path} is not an 8-bit grey PNG (mode {mode}); its classes are grey levels {CLASS_VALUES}"
        )
    classes = _CLASS_OF_VALUE[values]
    if (classes == 255).any():
        bad = sorted(set(np.unique(values).tolist()) - set(CLASS_VALUES))
        raise UserError(f"mask {path} holds grey level(s) {bad[:5]} outside the classes {CLASS_VALUES}")
    return classes


def write_mask(classes: np.ndarray, path) -> None:
    """uint8 class indices (H, W) in 0..3 written as the release's 8-bit grey PNG."""
    Image.fromarray(np.asarray(CLASS_VALUES, np.uint8)[classes]).save(path)


def resize_mask(classes: np.ndarray, size: int) -> np.ndarray:
    """Class indices (H, W) resized to (size, size) by nearest neighbour: the classes stay
    a subset of the input's, and a mask of the target size comes back unchanged."""
    if classes.shape == (size, size):
        return classes
    return np.asarray(Image.fromarray(classes).resize((size, size), Image.Resampling.NEAREST))


def load_masks(paths, size: int, images=None) -> np.ndarray:
    """The masks at `paths` as uint8 class indices (N, size, size), each resized by nearest
    neighbour (`resize_mask`): the masks of a split at the run's image size. With `images`
    (the masks' images, in the same order) each mask is checked against its image as it is
    read (`read_paired_mask`)."""
    if images is None:
        read = [read_mask(path) for path in paths]
    else:
        read = [read_paired_mask(image, path) for image, path in zip(images, paths, strict=True)]
    classes = [resize_mask(c, size) for c in read]
    return np.stack(classes) if classes else np.zeros((0, size, size), np.uint8)


def mask_input(classes: np.ndarray, size: int, kind: str) -> np.ndarray:
    """What the UNet of a mask-conditioned run takes (modules.UNet's ``tissue``, where all zeros
    means "unknown"): class indices (N, S, S) on a size × size grid of cells (the latent's),
    `kind` "pixels" (`mask_pixels`) or "area" (`mask_fractions`). Every cell sums to 1."""
    if kind == "pixels":
        return mask_pixels(classes, size)
    if kind == "area":
        return mask_fractions(classes, size)
    raise ValueError(f"unknown mask input {kind!r}")


def mask_pixels(classes: np.ndarray, size: int) -> np.ndarray:
    """Class indices (N, S, S) in 0..3 → float32 (N, size, size, 4 f²), f = S / size: the one-hot
    map, each f × f cell's pixels stacked in its channels (space-to-depth: channel 4 (f·i + j)
    + k is class k at pixel (i, j) of the cell), ÷ f², so a cell sums to 1 as in
    `mask_fractions`, which is the sum of its f² groups of 4 channels. Unlike the fractions it
    keeps every pixel: thin CSF is rarely any cell's largest share. ValueError when S is not a
    multiple of `size`."""
    one_hot, f = _cells(classes, size)
    n, c = len(one_hot), len(CLASS_VALUES)
    return one_hot.transpose(0, 1, 3, 2, 4, 5).reshape(n, size, size, f * f * c) / (f * f)


def mask_fractions(classes: np.ndarray, size: int) -> np.ndarray:
    """Class indices (N, S, S) in 0..3 → float32 (N, size, size, 4): in each cell of a size × size
    grid, the fraction of its (S / size)² pixels in each class (the one-hot map averaged over
    the cell, "area" downsampling). Every cell sums to 1. ValueError when S is not a multiple
    of `size`."""
    one_hot, _ = _cells(classes, size)
    return one_hot.mean(axis=(2, 4))


def _cells(classes: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """The one-hot map of class indices (N, S, S) as (N, size, f, size, f, 4) float32, and f = S / size."""
    classes = np.asarray(classes)
    n, height, width = classes.shape
    if height != width or height % size:
        raise ValueError(f"masks of {height}x{width} cannot be pooled onto a {size}x{size} grid")
    f = height // size
    one_hot = np.eye(len(CLASS_VALUES), dtype=np.float32)[classes]
    return one_hot.reshape(n, size, f, size, f, len(CLASS_VALUES)), f


def read_paired_mask(image: str, mask: str) -> np.ndarray:
    """`read_mask`, and a `UserError` naming both files when the mask is not its image's size."""
    classes = read_mask(mask)
    (width, height), _ = describe_png(image)
    if classes.shape != (height, width):
        raise UserError(f"mask {mask} is {classes.shape[1]}x{classes.shape[0]}, its image {image} is {width}x{height}")
    return classes


def check_masks(images: list[str], masks: list[str]) -> np.ndarray:
    """Read every mask (`read_paired_mask`) beside its image; return the pixel count of each
    class over all of them, int64 (4,). The first bad mask raises its `UserError`."""
    counts = np.zeros(len(CLASS_VALUES), np.int64)
    for image, mask in zip(images, masks, strict=True):
        counts += np.bincount(read_paired_mask(image, mask).ravel(), minlength=len(CLASS_VALUES))
    return counts
