"""masks.py: pairing images with their tissue masks, the checks that refuse bad masks, the
nearest-neighbour resize; and the masks that prepare.py writes (demo set, OASIS-1 FSL_SEG).

Every input is tiny and written into tmp_path (the demo set is made from nilearn's template).
"""

import json
import re

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import dataset
import masks
import metrics
import prepare
from cli import UserError
from test_dataset import save_png
from test_prepare import SESSIONS, oasis1_volume, write_oasis1


def oasis_png_layout(root, cases=(1, 2), slices=(10, 11)):
    """An OASIS-PNG-release-like folder: case_NNN_slice_K.nii.png images in every split
    and their seg_NNN_slice_K.nii.png masks (4 classes in stripes); returns the root."""
    stripes = np.repeat(np.asarray(masks.CLASS_VALUES, np.uint8), 2)[None, :].repeat(8, axis=0)  # 8x8
    for split, offset in zip(dataset.SPLITS, (0, 100, 200), strict=True):
        for case in cases:
            for k in slices:
                name = f"_{case + offset:03d}_slice_{k}.nii.png"
                save_png(root / f"keras_png_slices_{split}" / f"case{name}", np.full((8, 8), 90, np.uint8))
                save_png(root / f"keras_png_slices_seg_{split}" / f"seg{name}", stripes)
    return root


def test_mask_name_follows_the_release_and_keeps_other_names():
    assert masks.mask_name("case_001_slice_12.nii.png") == "seg_001_slice_12.nii.png"
    assert masks.mask_name("mni152_z050.png") == "mni152_z050.png"
    assert masks.mask_name("OAS1_0001_MR1_slice_088.png") == "OAS1_0001_MR1_slice_088.png"
    assert masks.mask_name("case_1.png") == "case_1.png"  # not the release's full pattern


def test_an_oasis_png_folder_pairs_each_image_with_its_mask(tmp_path):
    root = oasis_png_layout(tmp_path)
    splits = dataset.find_splits(root)
    found = masks.find_masks(root, splits)
    assert {split: len(paths) for split, paths in found.items()} == {"train": 4, "validate": 4, "test": 4}
    for split in dataset.SPLITS:
        for image, mask in zip(splits[split], found[split], strict=True):
            assert mask.endswith(f"keras_png_slices_seg_{split}/seg_" + image.split("case_")[1])
    counts = masks.check_masks(splits["train"], found["train"])
    assert counts.tolist() == [4 * 16] * 4  # each class: 2 columns of 8 pixels, 4 masks
    assert np.unique(masks.read_mask(found["train"][0])).tolist() == [0, 1, 2, 3]


def test_no_seg_folder_means_no_masks(tmp_path):
    save_png(tmp_path / "keras_png_slices_train" / "a.png", np.zeros((4, 4), np.uint8))
    assert masks.find_masks(tmp_path, dataset.find_splits(tmp_path)) is None
    save_png(tmp_path / "flat" / "a.png", np.zeros((4, 4), np.uint8))
    assert masks.pair_masks(tmp_path / "flat", dataset.find_splits(tmp_path / "flat")) is None


def test_a_missing_mask_or_a_mask_without_image_is_one_error_naming_the_file(tmp_path):
    root = oasis_png_layout(tmp_path)
    missing = root / "keras_png_slices_seg_validate" / "seg_101_slice_11.nii.png"
    missing.unlink()
    with pytest.raises(UserError) as err:
        masks.find_masks(root, dataset.find_splits(root))
    assert (
        str(err.value)
        == f"no mask for {root / 'keras_png_slices_validate' / 'case_101_slice_11.nii.png'}: expected {missing}"
    )
    save_png(missing, np.zeros((8, 8), np.uint8))

    orphan = save_png(root / "keras_png_slices_seg_test" / "seg_299_slice_1.nii.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(UserError, match=f"mask {re.escape(orphan)} has no image of its name"):
        masks.find_masks(root, dataset.find_splits(root))


def test_a_split_without_its_seg_folder_is_refused_when_another_has_one(tmp_path):
    root = oasis_png_layout(tmp_path)
    for path in (root / "keras_png_slices_seg_test").iterdir():
        path.unlink()
    (root / "keras_png_slices_seg_test").rmdir()
    with pytest.raises(UserError, match=r"no mask for .*case_201_slice_10.nii.png: .* \(4 images have none\)"):
        masks.find_masks(root, dataset.find_splits(root))


def test_an_unreadable_image_does_not_make_its_mask_an_orphan(tmp_path):
    root = oasis_png_layout(tmp_path)
    (root / "keras_png_slices_train" / "case_001_slice_10.nii.png").write_text("not a png")
    with pytest.warns(UserWarning, match="skipping 1 unreadable"):
        splits = dataset.find_splits(root)
    found = masks.find_masks(root, splits)
    assert len(found["train"]) == 3 and not any("seg_001_slice_10" in m for m in found["train"])


@pytest.mark.parametrize(
    "pixels, message",
    [
        (np.full((8, 8), 84, np.uint8), r"holds grey level\(s\) \[84\] outside the classes \(0, 85, 170, 255\)"),
        (np.zeros((8, 8, 3), np.uint8), r"is not an 8-bit grey PNG \(mode RGB\)"),
        (np.zeros((8, 6), np.uint8), r"is 6x8, its image .*case_001_slice_10.nii.png is 8x8"),
    ],
)
def test_a_bad_mask_is_one_error_naming_it(tmp_path, pixels, message):
    root = oasis_png_layout(tmp_path)
    bad = root / "keras_png_slices_seg_train" / "seg_001_slice_10.nii.png"
    save_png(bad, pixels)
    splits = dataset.find_splits(root)
    with pytest.raises(UserError, match=f"^mask {re.escape(str(bad))} {message}"):
        masks.check_masks(splits["train"], masks.find_masks(root, splits)["train"])


def test_an_unreadable_mask_is_one_error_naming_it(tmp_path):
    bad = tmp_path / "seg.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UserError, match=f"^mask {re.escape(str(bad))} is unreadable"):
        masks.read_mask(bad)


def test_write_and_read_round_trip_through_the_release_grey_levels(tmp_path):
    classes = np.random.default_rng(0).integers(0, 4, (16, 12), dtype=np.uint8)
    masks.write_mask(classes, tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as image:
        assert image.mode == "L" and set(np.unique(image).tolist()) == set(masks.CLASS_VALUES)
    np.testing.assert_array_equal(masks.read_mask(tmp_path / "m.png"), classes)


@pytest.mark.parametrize("size", [5, 37, 64, 200])
def test_nearest_resize_keeps_the_class_set_and_the_layout(size):
    rng = np.random.default_rng(size)
    blocky = np.kron(rng.integers(0, 3, (4, 4)).astype(np.uint8), np.ones((16, 16), np.uint8))  # 64x64, classes 0..2
    resized = masks.resize_mask(blocky, size)
    assert resized.shape == (size, size) and resized.dtype == np.uint8
    assert set(np.unique(resized).tolist()) <= set(np.unique(blocky).tolist())
    if size >= 37:  # every 16-px block survives: the same classes, each at its block's centre
        assert set(np.unique(resized).tolist()) == set(np.unique(blocky).tolist())
        centre = (np.arange(4) * 16 + 8) * size // 64
        np.testing.assert_array_equal(resized[np.ix_(centre, centre)], blocky[8::16, 8::16])
    if size == 64:
        assert resized is blocky


def test_the_demo_masks_pair_with_their_slices_and_follow_t1_contrast(tmp_path):
    """Every demo slice has its mask; the mask's brain is the image's; CSF is darkest and
    white matter brightest in the T1 image, as in real T1 MRI."""
    out = prepare.ensure_demo_dataset(tmp_path / "demo")
    splits = dataset.find_splits(out)
    found = masks.find_masks(out, splits)
    assert {s: len(p) for s, p in found.items()} == {"train": 94, "validate": 16, "test": 8}
    means, counts = {k: [] for k in range(4)}, np.zeros(4, np.int64)
    for image_path, mask_path in zip(
        splits["train"] + splits["validate"], found["train"] + found["validate"], strict=True
    ):
        image = np.asarray(Image.open(image_path))
        classes = masks.read_paired_mask(image_path, mask_path)
        np.testing.assert_array_equal(classes > 0, image > 0)
        counts += np.bincount(classes.ravel(), minlength=4)
        for k in range(1, 4):
            if (classes == k).sum() > 50:
                means[k].append(image[classes == k].mean())
    brain = counts[1:].sum()
    assert counts[1] > 0.03 * brain and counts[2] > 0.3 * brain and counts[3] > 0.2 * brain, counts  # ventricles: CSF
    csf, grey, white = (np.median(means[k]) for k in (1, 2, 3))
    assert csf + 30 < grey < white - 30, (csf, grey, white)
    assert "grey matter" in json.loads((out / "manifest.json").read_text())["masks"]


def test_inspect_reports_the_demo_masks(tmp_path, capsys):
    out = prepare.ensure_demo_dataset(tmp_path / "demo")
    first_test = sorted((out / "keras_png_slices_seg_test").iterdir())[0]
    first_test.unlink()
    save_png(out / "keras_png_slices_seg_validate" / "stray.png", np.zeros((256, 256), np.uint8))
    assert prepare.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "masks     train         94 of 94 images" in text and "masks     test           7 of 8 images" in text
    shares = {name: float(text.split(f"{name} ")[1].split(" %")[0]) for name in masks.CLASS_NAMES}
    assert abs(sum(shares.values()) - 100) < 0.3 and shares["background"] > 50 and shares["grey_matter"] > 1
    assert f"no mask for {out / 'keras_png_slices_test' / first_test.name}" in text
    assert f"mask without an image: {out / 'keras_png_slices_seg_validate' / 'stray.png'}" in text


def fseg_volume():
    """The FSL_SEG partner of `oasis1_volume`: CSF in its outer ring, grey matter, white
    matter in the centre (0 wherever the image is 0)."""
    image = oasis1_volume()
    seg = np.where(image > 0, 2, 0).astype(np.uint8)
    seg[3:17, 3:21][image[3:17, 3:21] > 0] = 3
    seg[1:19, 1][image[1:19, 1] > 0] = 1
    return seg


def test_convert_oasis1_writes_masks_from_fsl_seg(tmp_path):
    src, out = tmp_path / "oasis", tmp_path / "png"
    write_oasis1(src, SESSIONS)
    for session in SESSIONS:
        folder = next(src.rglob(session)) / "FSL_SEG"
        folder.mkdir()
        name = f"{session}_mpr_n4_anon_111_t88_masked_gfc_fseg.hdr"
        nib.save(nib.AnalyzeImage(fseg_volume(), np.eye(4)), folder / name)
    prepare.convert_oasis1(src, out)
    splits = dataset.find_splits(out)
    found = masks.find_masks(out, splits)
    for split in dataset.SPLITS:
        assert len(found[split]) == len(splits[split])
        for image, mask in zip(splits[split], found[split], strict=True):
            classes = masks.read_paired_mask(image, mask)
            np.testing.assert_array_equal(classes > 0, np.asarray(Image.open(image)) > 0)
    middle = masks.read_mask(found["train"][2])
    assert set(np.unique(middle).tolist()) == {0, 1, 2, 3}
    assert json.loads((out / "manifest.json").read_text())["masks"] == "FSL_SEG"


def test_convert_oasis1_writes_no_masks_when_some_scans_lack_fsl_seg(tmp_path):
    src, out = tmp_path / "oasis", tmp_path / "png"
    write_oasis1(src, SESSIONS)
    folder = next(src.rglob(SESSIONS[0])) / "FSL_SEG"
    folder.mkdir()
    nib.save(nib.AnalyzeImage(fseg_volume(), np.eye(4)), folder / f"{SESSIONS[0]}_fseg.hdr")
    with pytest.warns(UserWarning, match=r"6 scan\(s\) have no FSL_SEG segmentation .*: no masks written"):
        prepare.convert_oasis1(src, out)
    assert masks.pair_masks(out, dataset.find_splits(out)) is None


def test_load_masks_stacks_the_masks_at_the_image_size(tmp_path):
    root = oasis_png_layout(tmp_path)
    found = masks.find_masks(root, dataset.find_splits(root))
    stacked = masks.load_masks(found["train"], 4)
    assert stacked.shape == (4, 4, 4) and stacked.dtype == np.uint8
    np.testing.assert_array_equal(stacked[0, 0], [0, 1, 2, 3])  # the 2-px stripes, every other column kept
    assert masks.load_masks([], 4).shape == (0, 4, 4)


def test_dice_known_answers():
    reference = np.zeros((2, 4, 4), np.uint8)
    reference[0, :2] = 1  # image 0: 8 px of CSF in the top half, grey matter below
    reference[0, 2:] = 2
    predicted = reference.copy()
    predicted[0, 1] = 2  # 4 CSF pixels called grey matter
    reference[1], predicted[1] = 3, 3  # image 1: all white matter, both agree
    scores = metrics.dice(reference, predicted)
    # CSF: 2·4 / (8 + 4); grey: 2·8 / (8 + 12); white absent from image 0: NaN
    np.testing.assert_allclose(scores[0], [8 / 12, 16 / 20, np.nan])
    np.testing.assert_allclose(scores[1], [np.nan, np.nan, 1.0])
    overall, per_class = metrics.mean_dice(scores)
    np.testing.assert_allclose(per_class, [8 / 12, 0.8, 1.0])
    assert overall == pytest.approx((8 / 12 + 0.8 + 1.0) / 3)
    np.testing.assert_allclose(metrics.dice(reference[0], reference[0]), [[1.0, 1.0, np.nan]])  # one (H, W) pair
    disjoint = metrics.dice(np.full((3, 3), 1), np.full((3, 3), 2), classes=(1, 2))
    assert disjoint.tolist() == [[0.0, 0.0]]
    assert np.isnan(metrics.mean_dice(np.full((2, 3), np.nan))[0])
    with pytest.raises(ValueError, match=r"dice: masks of shapes \(2, 4, 4\) and \(4, 4\)"):
        metrics.dice(reference, reference[0])


def test_mask_fractions_are_the_class_shares_of_each_cell():
    classes = np.zeros((1, 4, 4), np.uint8)
    classes[0, :2, :2] = [[1, 2], [3, 3]]  # top-left cell: one CSF, one grey, two white pixels
    classes[0, 2:, 2:] = 2  # bottom-right cell: all grey matter
    fractions = masks.mask_fractions(classes, 2)
    assert fractions.shape == (1, 2, 2, 4) and fractions.dtype == np.float32
    np.testing.assert_allclose(fractions[0, 0, 0], [0.0, 0.25, 0.25, 0.5])
    np.testing.assert_allclose(fractions[0, 1, 1], [0.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(fractions[0, 0, 1], [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(fractions.sum(axis=-1), 1.0)  # every known cell sums to 1: zeros are free for "unknown"
    np.testing.assert_array_equal(masks.mask_fractions(classes, 4)[0].argmax(-1), classes[0])  # one pixel a cell
    with pytest.raises(ValueError, match="masks of 4x4 cannot be pooled onto a 3x3 grid"):
        masks.mask_fractions(classes, 3)


def test_mask_pixels_keep_every_pixel_and_sum_to_the_fractions():
    classes = np.random.default_rng(0).integers(0, 4, (3, 8, 8)).astype(np.uint8)
    pixels = masks.mask_pixels(classes, 2)  # cells of 4 × 4 pixels
    assert pixels.shape == (3, 2, 2, 64) and pixels.dtype == np.float32
    # channel 4 (4 i + j) + k: class k at pixel (i, j) of the cell, one-hot ÷ 16
    cell = pixels[1, 1, 0].reshape(4, 4, 4)  # the cell of rows 4..7, columns 0..3
    np.testing.assert_array_equal(cell.argmax(-1), classes[1, 4:, :4])
    np.testing.assert_allclose(cell.max(-1), 1 / 16)
    # its 16 groups of 4 channels sum to the class shares of the cell
    np.testing.assert_allclose(pixels.reshape(3, 2, 2, 16, 4).sum(3), masks.mask_fractions(classes, 2), atol=1e-6)
    np.testing.assert_allclose(masks.mask_input(classes, 2, "pixels"), pixels)
    np.testing.assert_allclose(masks.mask_input(classes, 2, "area"), masks.mask_fractions(classes, 2))
    with pytest.raises(ValueError, match="masks of 8x8 cannot be pooled onto a 3x3 grid"):
        masks.mask_pixels(classes, 3)
    with pytest.raises(ValueError, match="unknown mask input 'nearest'"):
        masks.mask_input(classes, 2, "nearest")
