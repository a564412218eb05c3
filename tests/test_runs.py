"""runs.py: run folders made by earlier versions of the code still load and sample as they did."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

import config as cfg
import runs

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_a_seed_run_of_the_original_unet_loads_and_samples_as_when_it_was_made():
    """tests/fixtures/seed_run: a tiny `--preset seed` run (original layouts, 16 px) whose weights
    were written when the original UNet was a layout of modules.UNet, with the 3 DDIM-5 samples of
    seed 7 it gave then. It loads into modules.OriginalUNet and gives the same images."""
    run = runs.load_run(os.path.join(FIXTURES, "seed_run"))
    assert type(run.diffusion.ema_network).__name__ == "OriginalUNet"
    assert run.config.unet.unet_layout == run.config.autoencoder.ae_layout == "original"
    images = runs.generate(run, 3, cfg.SamplingOptions(steps=5, seed=7, batch_size=3), progress=False).images
    expected = np.load(os.path.join(FIXTURES, "seed_run", "expected_samples.npy"))
    assert images.shape == expected.shape == (3, 16, 16, 1)
    np.testing.assert_allclose(images, expected, atol=1e-4)
    assert np.abs(expected).mean() > 0.05  # the decoded samples are not blank


def test_a_run_samples_with_the_prediction_its_config_names(tmp_path):
    """The seed run's config.json predates `prediction`: it reads as "eps" (above: the same images).
    Named "v", the same weights load into a model and a sampler that read the UNet's output as v,
    and sample other images."""
    run = runs.load_run(os.path.join(FIXTURES, "seed_run"))
    assert run.config.diffusion.prediction == run.diffusion.prediction == run.sampler.prediction == "eps"
    copy = tmp_path / "v_run"
    shutil.copytree(os.path.join(FIXTURES, "seed_run"), copy)
    raw = json.loads((copy / "config.json").read_text())
    raw["diffusion"]["prediction"] = "v"
    (copy / "config.json").write_text(json.dumps(raw))
    v_run = runs.load_run(str(copy))
    assert v_run.diffusion.prediction == v_run.sampler.prediction == "v"
    images = runs.generate(v_run, 3, cfg.SamplingOptions(steps=5, seed=7, batch_size=3), progress=False).images
    expected = np.load(os.path.join(FIXTURES, "seed_run", "expected_samples.npy"))
    assert np.all(np.isfinite(images)) and np.abs(images - expected).max() > 0.05


def test_cosine_learning_rate_warms_up_then_decays_to_its_floor():
    """--lr-schedule cosine over 200 steps: 0 → rate over the first 10 (5 %), rate · (f + (1 − f)(1 + cos(π s / S)) / 2)
    over the 190 left, f = 5 %; constant (or no step count): the rate itself."""
    schedule = runs.learning_rate(2e-3, "cosine", total_steps=200)
    at = {step: float(schedule(step)) for step in (0, 5, 10, 105, 200)}
    assert at[0] == 0.0 and at[5] == pytest.approx(1e-3) and at[10] == pytest.approx(2e-3)
    f = runs.FINAL_LR_SHARE
    assert at[105] == pytest.approx(2e-3 * (f + (1 - f) * (1 + np.cos(np.pi * 95 / 190)) / 2), rel=1e-5)
    assert at[200] == pytest.approx(2e-3 * f, rel=1e-5)
    assert runs.learning_rate(2e-3, "constant", 200) == 2e-3 and runs.learning_rate(2e-3, "cosine", 0) == 2e-3


def test_each_stage_compiles_with_its_own_schedule():
    """--ae-lr-schedule for the autoencoder (None: --lr-schedule's), --lr-schedule for the UNet."""
    config = cfg.preset("demo")  # autoencoder cosine, diffusion constant
    config.autoencoder.ae_base_channels = 4
    autoencoder = runs.build_autoencoder(config)
    runs.compile_autoencoder(autoencoder, config, total_steps=100)
    assert float(autoencoder.optimizer.learning_rate) == 0.0  # the warm-up's first step
    config.train.ae_lr_schedule = None
    runs.compile_autoencoder(autoencoder, config, total_steps=100)
    assert float(autoencoder.optimizer.learning_rate) == pytest.approx(config.train.ae_lr)
    config.train.lr_schedule = "cosine"
    runs.compile_autoencoder(autoencoder, config, total_steps=100)
    assert float(autoencoder.optimizer.learning_rate) == 0.0


def test_seeded_rows_sample_in_equal_batches_and_the_batching_changes_no_image(monkeypatch):
    """The figures' grids (conditions.png, masks.png) start every row from the same noises:
    equal batches (one traced sampler graph), the same images as in one batch."""
    assert [runs.equal_batch_size(n, 16) for n in (36, 30, 16, 17, 5)] == [12, 15, 16, 9, 5]
    run = runs.load_run(os.path.join(FIXTURES, "seed_run"))
    shapes, sample = [], run.sampler.sample

    def recorded(shape, *args, **kwargs):
        shapes.append(shape[0])
        return sample(shape, *args, **kwargs)

    monkeypatch.setattr(run.sampler, "sample", recorded)
    options = cfg.SamplingOptions(steps=3, eta=0.0, seed=4)
    grid = runs._seeded_rows(run, 3, 6, dataclasses.replace(options, batch_size=8))
    assert shapes == [6, 6, 6] and grid.shape == (3, 6, 16, 16, 1)
    whole = runs._seeded_rows(run, 3, 6, dataclasses.replace(options, batch_size=18))
    assert shapes[3:] == [18]
    np.testing.assert_allclose(grid, whole, atol=1e-5)
    np.testing.assert_allclose(grid[0], grid[2], atol=1e-5)  # unconditional: every row the same noises
    assert not np.allclose(grid[0, 0], grid[0, 1])
