"""spade.train: the SPADE decoder fine-tuned from a decoder, the encoder left as it was."""

import numpy as np
import pytest

import config as cfg
import runs
import spade
from cli import UserError


def tiny_config() -> cfg.RunConfig:
    config = cfg.preset("demo")
    config.data.image_size = 16
    config.autoencoder.ae_base_channels, config.autoencoder.latent_channels = 8, 2
    return config


def pairs(n=4, size=16, seed=0):
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 4, size=(n, size, size)).astype(np.uint8)
    images = (classes[..., None] / 1.5 - 1.0).astype(np.float32)  # each class its own grey level
    return images, classes


def test_training_moves_the_decoder_and_the_modulations_not_the_encoder():
    config = tiny_config()
    autoencoder = runs.build_autoencoder(config)
    encoder_before = [w.copy() for w in autoencoder.encoder.get_weights()]
    decoder_before = [w.copy() for w in autoencoder.decoder.get_weights()]
    model, loss = spade.train(config, autoencoder.encoder, autoencoder.decoder, *pairs(), steps=3, batch_size=2)
    assert np.isfinite(loss)
    assert all(np.array_equal(a, b) for a, b in zip(encoder_before, autoencoder.encoder.get_weights(), strict=True))
    assert autoencoder.encoder.trainable  # frozen only while the SPADE decoder trained
    # The decoder it was made from keeps its weights; the copy and the modulations learned.
    assert all(np.array_equal(a, b) for a, b in zip(decoder_before, autoencoder.decoder.get_weights(), strict=True))
    block = "level0_block0"
    assert not np.allclose(
        model.get_layer(block).get_weights()[0], autoencoder.decoder.get_layer(block).get_weights()[0]
    )
    assert np.abs(model.get_layer("level0_modulation").get_weights()[0]).max() > 0


def test_a_loss_that_is_not_finite_is_one_error_line():
    config = tiny_config()
    autoencoder = runs.build_autoencoder(config)
    images, classes = pairs()
    with pytest.raises(UserError, match="the SPADE decoder's loss is not finite; nothing saved"):
        spade.train(config, autoencoder.encoder, autoencoder.decoder, images * np.nan, classes, steps=2, batch_size=2)
