"""latent_data.py: the diffusion stage's training rows, in the latents' order, and their batches."""

import numpy as np
import pytest

import config as cfg
import latent_data
import masks


def test_training_masks_follow_the_latents_order_mirrors_included():
    """encode_training_set lists the images, then their mirror images (with --flip): the masks
    the UNet is conditioned on must be listed the same way; none for a run without the mask."""
    config = cfg.preset("demo")
    config.data.image_size = 8
    config.autoencoder.ae_channel_mults = (1, 2)  # ×2: a 4×4 latent
    classes = np.zeros((2, 8, 8), np.uint8)
    classes[0, :, :2] = 3  # image 0: white matter in its two left columns
    classes[1, :4] = 1  # image 1: CSF in its top half
    in_order = latent_data.training_masks(config, classes)
    assert in_order.dtype == np.uint8 and in_order.shape == (4, 8, 8)
    np.testing.assert_array_equal(in_order[:2], classes)
    np.testing.assert_array_equal(in_order[2, :, 6:], 3)  # image 0's mirror: the right columns
    np.testing.assert_array_equal(in_order[2, :, :6], 0)
    np.testing.assert_array_equal(in_order[3], classes[1])  # a top half mirrors onto itself
    config.data.flip = False
    np.testing.assert_array_equal(latent_data.training_masks(config, classes), classes)
    assert latent_data.training_masks(config, None) is None
    config.condition.condition = ("slice",)  # masks read for the mask decoder only
    assert latent_data.training_masks(config, classes) is None


@pytest.mark.parametrize("mask_input", cfg.MASK_INPUTS)
def test_latent_batches_build_each_rows_mask_input(mask_input):
    """latent_batches keeps the masks as class indices and gives each batch the UNet's input of
    its own rows (masks.mask_input at the latent size), beside their latents and conditions,
    in the same seeded order with and without them, and from a skip exactly as unskipped."""
    rng = np.random.default_rng(0)
    rows = 6
    latents = np.broadcast_to(np.arange(rows, dtype=np.float32)[:, None, None, None], (rows, 4, 4, 2)).copy()
    cond = np.arange(rows, dtype=np.float32)[:, None] / 10
    classes = rng.integers(0, 4, (rows, 8, 8)).astype(np.uint8)
    batches = latent_data.latent_batches(latents, 4, seed=3, cond=cond, tissue_classes=classes, mask_input=mask_input)
    plain = latent_data.latent_batches(latents, 4, seed=3)
    seen = []
    for batch, alone in zip(batches.take(4), plain.take(4), strict=True):
        index = batch["latents"].numpy()[:, 0, 0, 0].astype(int)
        np.testing.assert_array_equal(alone.numpy()[:, 0, 0, 0], index)
        np.testing.assert_array_equal(batch["cond"].numpy()[:, 0], cond[index, 0])
        tissue = batch["tissue"].numpy()
        np.testing.assert_array_equal(tissue, masks.mask_input(classes[index], 4, mask_input))
        assert tissue.shape == (4, 4, 4, 16 if mask_input == "pixels" else 4) and tissue.dtype == np.float32
        seen.extend(index)
    assert sorted(seen[:rows]) == list(range(rows))  # the first pass holds every row once
    skipped = latent_data.latent_batches(latents, 4, seed=3, skip=8, tissue_classes=classes, mask_input=mask_input)
    third = next(iter(skipped))
    np.testing.assert_array_equal(third["latents"].numpy()[:, 0, 0, 0], seen[8:12])
    assert "cond" not in third
    element = batches.element_spec["tissue"]
    assert element.shape.as_list() == [None, 4, 4, 16 if mask_input == "pixels" else 4]
