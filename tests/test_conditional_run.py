"""A conditioned run end to end, on an OASIS-1-like release made from real MRI.

The release: six "subjects", each the MNI152 T1 template of the demo set (real MRI,
coarsened to 3 mm and with its own intensity gain) as an Analyze volume in the OASIS-1
folder layout with its tissue classes as the FSL_SEG segmentation, and a clinical CSV
giving them fake ages, sexes, CDRs and MMSEs (blanks for the young controls, as in OASIS).
`dataset.py convert-oasis1 --clinical` turns it into PNG slices with labels.csv and masks;
train.py trains the tiny networks of conftest with `--condition slice,age,sex,cdr,mask`
(two epochs of each stage); then sampling with every subset of the variables and masks,
predict.py's conditions, masks and errors, and evaluate.py's conditioning metrics (exact
resume with conditions and masks: tests/test_conditioning.py).
"""

import csv
import itertools
import json
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import cli
import config as cfg
import dataset
import evaluate
import masks
import oracle
import pairs
import predict
import prepare
import runs
import train
from conftest import RUN_FLAGS, copy_of

# One pytest-xdist worker runs this file (make test: --dist loadfile), so the trained run is made once.

CONDITION = ["--condition", "slice,age,sex,cdr,mask", "--ae-epochs", "2", "--ldm-epochs", "2"]
# ID, sex, age, MMSE, CDR (blank MMSE and CDR: a young control, as in OASIS-1)
SUBJECTS = [
    ("OAS1_0001_MR1", "F", 74, 29, 0.0),
    ("OAS1_0002_MR1", "M", 55, 28, 0.0),
    ("OAS1_0003_MR1", "F", 81, 22, 1.0),
    ("OAS1_0004_MR1", "M", 23, None, None),
    ("OAS1_0005_MR1", "F", 68, 26, 0.5),
    ("OAS1_0006_MR1", "M", 90, 18, 2.0),
]


def write_release(src, clinical_csv):
    """The release described in the module docstring, under `src`, and its clinical CSV."""
    template, tissue = (v[::3, ::3, ::3] for v in prepare._mni152_volumes())  # RAS, 3 mm
    # Analyze volumes are stored radiologically (to Left, Anterior, Superior)
    las, las_tissue = template[::-1].astype(np.float32), tissue[::-1]
    for i, (session, *_rest) in enumerate(SUBJECTS):
        folder = src / "disc1" / session / "PROCESSED" / "MPRAGE" / "T88_111"
        folder.mkdir(parents=True)
        volume = (las * (0.8 + 0.08 * i)).astype(np.int16)
        name = f"{session}_mpr_n4_anon_111_t88_masked_gfc"
        nib.save(nib.AnalyzeImage(volume, np.eye(4)), folder / f"{name}.hdr")
        (src / "disc1" / session / "FSL_SEG").mkdir()
        nib.save(nib.AnalyzeImage(las_tissue, np.eye(4)), src / "disc1" / session / "FSL_SEG" / f"{name}_fseg.hdr")
    with open(clinical_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "M/F", "Hand", "Age", "Educ", "SES", "MMSE", "CDR", "eTIV", "nWBV", "ASF", "Delay"])
        for session, sex, age, mmse, cdr in SUBJECTS:
            blank = "" if cdr is None else None
            writer.writerow([session, sex, "R", age, "", "", blank or mmse, blank or cdr, 1500, 0.75, 1.2, "N/A"])


@pytest.fixture(scope="session")  # session, not module: xdist may interleave other files' tests
def release(tmp_path_factory):
    """The converted release: an OASIS-layout folder with labels.csv and tissue masks."""
    root = tmp_path_factory.mktemp("oasis1")
    write_release(root / "raw", root / "oasis_cross-sectional.csv")
    out = root / "png"
    assert (
        prepare.main(
            [
                "convert-oasis1",
                str(root / "raw"),
                "--out",
                str(out),
                "--clinical",
                str(root / "oasis_cross-sectional.csv"),
            ]
        )
        == 0
    )
    return str(out)


MASK_DECODER_BATCH_SIZES = []  # what cond_run's mask decoder was trained at


@pytest.fixture(scope="session")
def cond_run(release, tmp_path_factory):
    """A run of every condition (the mask too), its autoencoder at a batch size of its own."""
    out = str(tmp_path_factory.mktemp("runs") / "cond")
    flags = RUN_FLAGS + CONDITION + ["--data", release, "--out", out, "--ae-batch-size", "2"]
    batches_of = pairs.mask_decoder_batches

    def mask_decoder_batches(latents, train_masks, batch_size, seed):
        MASK_DECODER_BATCH_SIZES.append(batch_size)
        return batches_of(latents, train_masks, batch_size, seed)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pairs, "mask_decoder_batches", mask_decoder_batches)
        assert train.main(flags) == 0
    return out


def test_conversion_writes_the_labels_and_masks_training_needs(release):
    splits = dataset.find_splits(release)
    found = masks.find_masks(release, splits)
    assert all(len(found[split]) == len(splits[split]) > 0 for split in dataset.SPLITS)
    classes = np.concatenate([masks.read_mask(path).ravel() for path in found["train"]])
    assert set(np.unique(classes).tolist()) == {0, 1, 2, 3}
    with open(os.path.join(release, dataset.LABELS), newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"slice", "age", "sex", "cdr", "mmse"} <= set(rows[0])
    young = [r for r in rows if "OAS1_0004" in r["file"]]
    assert young and all(r["cdr"] == "" and r["mmse"] == "" for r in young)  # unknown, never 0
    assert {float(r["sex"]) for r in rows} == {0.0, 1.0}  # M → 0, F → 1


@pytest.mark.slow
def test_a_conditioned_run_records_its_statistics_and_samples_every_subset(cond_run, release, tmp_path):
    config = json.load(open(os.path.join(cond_run, "config.json")))
    stats = config["condition_stats"]
    assert list(stats) == ["slice", "age", "sex", "cdr"]  # the mask has no statistics
    assert config["condition"]["condition"] == ["slice", "age", "sex", "cdr", "mask"]
    assert stats["sex"]["categories"] == [0.0, 1.0] and stats["age"]["categories"] is None
    assert stats["slice"]["min"] == 0.0 and stats["slice"]["max"] == 1.0
    # Statistics of the training split only, unknowns left out.
    labels = dataset.find_labels(release, dataset.find_splits(release))
    train_labels = labels.values["train"]
    age, cdr = (train_labels[:, labels.columns.index(name)] for name in ("age", "cdr"))
    assert (stats["age"]["min"], stats["age"]["max"]) == (np.nanmin(age), np.nanmax(age))
    assert stats["age"]["mean"] == pytest.approx(np.nanmean(age))
    assert stats["cdr"]["known"] == np.isfinite(cdr).sum()
    assert not os.path.exists(os.path.join(cond_run, "figures", "conditions.png"))  # predict.py renders it

    run = runs.load_run(cond_run)
    assert run.diffusion.ema_network.mask_channels == 16  # 4 classes × the 2 × 2 pixels of a latent cell
    _, mask_paths = runs.split_masks(run.config)
    tissue = masks.read_mask(mask_paths[len(mask_paths) // 2])  # 256 px: generate resizes it
    asked = {"slice": 0.6, "age": 80.0, "sex": 1.0, "cdr": 1.0, "mask": tissue}
    seen = []
    for k in range(len(asked) + 1):
        for subset in itertools.combinations(asked, k):
            images = runs.generate(
                run,
                2,
                cfg.SamplingOptions(steps=3, seed=1),
                progress=False,
                condition={v: asked[v] for v in subset if v != "mask"},
                tissue_masks=asked["mask"] if "mask" in subset else None,
                guidance=3.0,
            ).images
            assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()
            seen.append(images)
    assert len(seen) == 32
    # Conditions change the samples (the same seed and noise otherwise), and so does the mask alone.
    assert not np.allclose(seen[0], seen[-1])
    assert not np.allclose(seen[0], seen[5])  # seen[5]: the mask alone
    # The sampler compiled once per kind of input (nothing; labels; a mask; both), whatever the values.
    assert run.sampler._ddim_fn.experimental_get_tracing_count() == 4

    # The run trained a SPADE decoder (TINY: 4 steps): a latent generated for a mask decodes
    # through it, given that mask; a latent without one through the plain decoder.
    assert run.spade_decoder is not None and run.spade_decoder.name == "spade_decoder"
    classes = np.stack([masks.resize_mask(tissue, 16)] * 2)
    samples = runs.generate(run, 2, cfg.SamplingOptions(steps=3, seed=1), tissue_masks=classes, progress=False)
    np.testing.assert_allclose(samples.images, runs.decode(run, samples.latents, 2, tissue_masks=classes), atol=1e-6)
    assert np.abs(samples.images - runs.decode(run, samples.latents, 2)).max() > 1e-4  # its 4 steps moved it
    unconditional = runs.generate(run, 2, cfg.SamplingOptions(steps=3, seed=1), progress=False)
    np.testing.assert_array_equal(unconditional.images, runs.decode(run, unconditional.latents, 2))
    # A run that should have one but lacks it is refused before anything is built.
    copy = copy_of(cond_run, tmp_path / "run")
    os.remove(os.path.join(copy, "spade_decoder.weights.h5"))
    with pytest.raises(cli.UserError, match=r"not fully trained yet \(spade_decoder.weights.h5\)"):
        runs.load_run(copy)


@pytest.mark.slow
def test_predict_takes_conditions_and_refuses_what_the_run_cannot_honour(cond_run, tiny_run, tmp_path, capsys):
    bad, tall = tmp_path / "bad.png", tmp_path / "tall.png"
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(bad)
    masks.write_mask(np.zeros((8, 4), np.uint8), tall)
    out = tmp_path / "p"
    args = ["--run", cond_run, "--n", "2", "--steps", "3", "--out", str(out)]
    assert predict.main(args + ["--condition", "age=95", "sex=0", "--guidance", "2.5"]) == 0
    captured = capsys.readouterr()
    assert "age=95, sex=0, guidance 2.5" in captured.out
    assert "warning: condition age=95 is outside the training range" in captured.err
    assert {"samples.png", "conditions.png", "interpolation.png", "masks.png"} <= set(os.listdir(out))

    cases = [
        (["--run", cond_run, "--condition", "height=3"], "not conditioned on 'height'; its condition variables are"),
        (["--run", cond_run, "--condition", "sex=0.5"], "sex=0.5: not one of the training values 0, 1"),
        (["--run", cond_run, "--condition", "age"], "expected NAME=NUMBER"),
        (["--run", cond_run, "--sweep", "mmse"], "--sweep mmse: the run is not conditioned on it"),
        (["--run", tiny_run, "--condition", "slice=0.5"], "trained without conditioning; it cannot take slice"),
        (["--run", tiny_run, "--mask", str(bad)], "was trained without tissue masks (--condition mask)"),
        (["--run", cond_run, "--mask", str(bad)], "holds grey level(s) [7] outside the classes"),
        (["--run", cond_run, "--mask", str(tall)], "is 4x8; masks must be square"),
        (["--run", tiny_run, "--pairs", "2"], "has no mask decoder (mask_decoder.weights.h5)"),
        (["--run", cond_run, "--pairs", "2", "--mask", str(bad)], "--pairs and --mask"),
        (["--run", cond_run, "--pairs", "0"], "--pairs must be positive, got 0"),
    ]
    for argv, message in cases:
        assert predict.main(argv + ["--out", str(tmp_path / "never")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_evaluate_reports_conditioning_errors_and_the_guidance_sweep(cond_run, tmp_path, capsys, monkeypatch):
    run_dir = copy_of(cond_run, tmp_path / "run")
    argv = ["--run", run_dir, "--n", "4", "--steps", "3", "--guidance", "1,3", "--oracle-steps", "5"]
    argv += ["--segmenter-steps", "5"]
    assert evaluate.main(argv) == 0
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["condition_variables"] == ["slice", "age", "sex", "cdr"] and metrics["guidance"] == 1.0
    for key in ("cond_slice_mae", "cond_slice_mae_unconditional", "cond_slice_mae_real"):
        assert 0.0 <= metrics[key] <= 1.0, key  # slice positions lie in [0, 1]
    for key in ("cond_slice_oracle_mae", "cond_age_mae", "cond_sex_mae", "cond_cdr_mae"):
        for kind in ("samples", "unconditional", "real"):
            value = metrics[f"{key}_{kind}"]
            assert value is None or value >= 0, (key, kind)
    assert 0 <= metrics["cond_sex_mae_real"] <= 1  # sex is 0 or 1
    assert [entry["guidance"] for entry in metrics["guidance_sweep"]] == [1.0, 3.0]
    first = metrics["guidance_sweep"][0]
    assert first["cond_slice_mae"] == metrics["cond_slice_mae"]
    assert first["sample_nn_ssim_median"] == pytest.approx(metrics["sample_nn_ssim_median"])
    assert os.path.exists(os.path.join(run_dir, "oracle", "oracle.json"))
    out = capsys.readouterr().out
    assert "guidance sweep" in out and "tissue masks (the segmentation oracle's Dice), guidance 1:" in out
    # Tissue masks: Dice per class and overall, for samples, unconditional samples and real images.
    for kind in ("samples", "unconditional", "real", "autoencoder"):
        values = [metrics[f"mask_dice_{kind}{part}"] for part in ("", "_csf", "_grey_matter", "_white_matter")]
        assert all(v is None or 0.0 <= v <= 1.0 for v in values), (kind, values)
        assert values[0] is not None, kind
    assert [entry["guidance"] for entry in metrics["mask_guidance_sweep"]] == [1.0, 3.0]
    assert metrics["mask_guidance_sweep"][0]["mask_dice_samples"] == metrics["mask_dice_samples"]
    assert metrics["segmenter"]["steps"] == 5
    assert os.path.exists(os.path.join(run_dir, "oracle", "segmenter.json"))
    # Image + mask pairs: faithfulness, memorisation and usefulness (seg_*: trained on 192 real
    # pairs, as many synthetic ones, both; judged on the 48 test slices).
    for key in ("pair_dice", "mask_nn_dice_median", "mask_nn_dice_max", "real_mask_nn_dice_median"):
        assert metrics[key] is not None and 0.0 <= metrics[key] <= 1.0, key
    for name in ("real_only", "synthetic_only", "real_plus_synthetic"):
        assert 0.0 <= metrics[f"seg_dice_{name}"] <= 1.0, name
        assert {f"seg_dice_{name}_{c}" for c in ("csf", "grey_matter", "white_matter")} <= set(metrics)
    assert (metrics["seg_pairs_real_only"], metrics["seg_pairs_synthetic_only"]) == (192, 192)
    assert metrics["seg_pairs_real_plus_synthetic"] == 384 and metrics["seg_test_pairs"] == 48
    assert "image + mask pairs (pairs.py):" in out

    # The segmentation oracle is cached in the run: asked again with the same settings, it loads
    # instead of training (test_oracle.py tests both oracles' caches).
    def no_training(*args, **kwargs):
        raise AssertionError("the cached oracle was trained again")

    monkeypatch.setattr(oracle, "train_segmenter", no_training)
    assert pairs.segmentation_oracle(runs.load_run(run_dir), 5, 16).info["steps"] == 5


@pytest.mark.slow
def test_predict_generates_for_given_masks_and_draws_masks_png(cond_run, tmp_path, capsys):
    _, mask_paths = runs.split_masks(runs.read_config(cond_run))
    chosen = [mask_paths[0], mask_paths[-1]]
    out = tmp_path / "p"
    argv = ["--run", cond_run, "--n", "4", "--steps", "3", "--out", str(out), "--format", "png", "nifti"]
    assert predict.main(argv + ["--mask", *chosen, "--condition", "slice=0.5"]) == 0
    assert "slice=0.5, 2 masks, guidance 3" in capsys.readouterr().out
    assert {"masks.png", "sample_003.png", "sample_003.nii.gz"} <= set(os.listdir(out))
    # Sample i was asked for mask i mod 2, and says so in its NIfTI header.
    described = nib.load(out / "sample_002.nii.gz").header["descrip"].tobytes().decode()
    assert described.startswith(f"oasis-ldm cond #2 mask={os.path.basename(chosen[0])} seed 0"), described
    # The files are those of runs.generate with the same masks and seed.
    run = runs.load_run(cond_run)
    tissue = predict.read_mask_files(chosen)
    want = runs.generate(
        run,
        4,
        cfg.SamplingOptions(steps=3),
        condition={"slice": 0.5},
        tissue_masks=tissue[[0, 1, 0, 1]],
        progress=False,
    ).images
    np.testing.assert_array_equal(np.asarray(Image.open(out / "sample_001.png")), predict.to_uint8(want[1])[:, :, 0])
    # masks.png: one row per mask, the mask then MASK_COLUMNS samples.
    grid = runs.mask_grid(run, tissue, runs.MASK_COLUMNS, cfg.SamplingOptions(steps=3, eta=0.0))
    assert grid.shape == (2, runs.MASK_COLUMNS, 16, 16, 1) and np.isfinite(grid).all()
    assert not np.allclose(grid[0], grid[1])  # the same noises, another mask


@pytest.mark.slow
def test_pairs_are_written_in_the_release_format_and_read_back_through_the_pairing(cond_run, tmp_path, capsys):
    out = tmp_path / "p"
    argv = ["--run", cond_run, "--pairs", "3", "--steps", "3", "--out", str(out), "--format", "png", "nifti"]
    assert predict.main(argv) == 0
    assert {"pairs.png", "sample_002.png", "sample_002_seg.png", "sample_002_seg.nii.gz"} <= set(os.listdir(out))
    assert not (out / "sample_003.png").exists()
    assert MASK_DECODER_BATCH_SIZES == [2]  # trained once, at the autoencoder's batch size
    # The masks are the mask decoder's of the samples' latents (the same seed: the same samples).
    run = runs.load_run(cond_run, mask_decoder=True)
    samples = runs.generate(run, 3, cfg.SamplingOptions(steps=3), progress=False)
    decoded = runs.decode_masks(run, samples.latents, 16)
    assert decoded.shape == (3, 16, 16) and decoded.dtype == np.uint8
    # Their images are those latents decoded given those masks by the run's SPADE decoder.
    images, classes = pairs.synthesize(run, 3, cfg.SamplingOptions(steps=3))
    np.testing.assert_array_equal(classes, decoded)
    np.testing.assert_allclose(images, runs.decode(run, samples.latents, 16, tissue_masks=decoded), atol=1e-6)
    assert np.abs(images - samples.images).max() > 1e-4  # not the plain decoder's
    # Round trip: the pairs laid out as a data folder pair up and read back as the same classes.
    root = tmp_path / "data"
    for i in range(3):
        for folder, ending in (("keras_png_slices_train", ".png"), ("keras_png_slices_seg_train", "_seg.png")):
            (root / folder).mkdir(parents=True, exist_ok=True)
            os.replace(out / f"sample_{i:03d}{ending}", root / folder / f"sample_{i:03d}.png")
    splits = {"train": dataset.find_splits(root)["train"], "validate": [], "test": []}
    found = masks.find_masks(root, splits)
    masks.check_masks(splits["train"], found["train"])  # sizes and grey levels of the release
    np.testing.assert_array_equal(masks.load_masks(found["train"], 16), decoded)
    nifti = np.asarray(nib.load(out / "sample_001_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(nifti[:, :, 0].T[::-1], decoded[1])  # the image's orientation
    # A later call without --pairs leaves no stale mask or pairs.png behind.
    assert predict.main(["--run", cond_run, "--n", "2", "--steps", "3", "--out", str(out)]) == 0
    assert not any(name.endswith("_seg.png") for name in os.listdir(out)) and not (out / "pairs.png").exists()
