"""runs.py: run folders made by earlier versions of the code still load and sample as they did."""

import os

import numpy as np

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
