"""The SPADE decoder: the run's image decoder, also given the tissue mask, for images generated for a mask.

A mask-conditioned UNet lays the tissue out in the 16 × 16 latent as the mask asks, but the
plain decoder draws the detail of the 64 × 64 image (thin CSF, the grey–white boundary) from
the latent alone. SPADE-LDM (Fernandez et al. 2022, MONAI's 2-D brain MRI tutorial) gives
the decoder the mask as well: every level's features are modulated by it
(`autoencoder.MaskModulation`, after SPADE, Park et al. 2019), so the image's tissue
boundaries follow the mask at the image's resolution.

Here the SPADE decoder is made from the trained decoder (`build`: its weights copied, the
modulations starting at zero, so before training it decodes exactly as the decoder) and
fine-tuned after stage 1 (`train`, called by train.py with --spade-decoder-steps) on the
training images and their masks, mirrored together: x → decoder(encoder(x), one_hot(mask))
≈ x with the autoencoder's loss, the encoder frozen. The plain decoder stays as it is: it
decodes every latent that has no mask (unconditional samples, the autoencoder's metrics),
the SPADE decoder every latent generated for a mask (`runs.decode(..., tissue_masks=...)`).

What it buys and costs (mask_dice_samples, reconstruction PSNR, seconds): BENCHMARKS.md.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import config as cfg
import hardware
import metrics
import oracle
from autoencoder import build_decoder, copy_weights
from cli import UserError
from config import MASK_CLASSES

WEIGHTS = "spade_decoder.weights.h5"


def build(config: cfg.RunConfig, decoder: keras.Model | None = None) -> keras.Model:
    """The SPADE decoder of `config`'s autoencoder: [latent (B, h, w, C) unscaled, one-hot mask
    (B, H, W, MASK_CLASSES)] -> image (B, H, W, 1) float32 in [-1, 1], under the dtype policy in
    force; with `decoder`, its weights copied in (so it decodes as `decoder` does)."""
    model = build_decoder(**config.autoencoder_kwargs(), mask_classes=MASK_CLASSES)
    if decoder is not None:
        copy_weights(decoder, model)
    return model


def one_hot(classes) -> tf.Tensor:
    """Class indices (B, H, W) -> float32 one-hot (B, H, W, MASK_CLASSES): the SPADE decoder's mask."""
    return tf.one_hot(tf.cast(classes, tf.int32), MASK_CLASSES, dtype=tf.float32)


def train(
    config: cfg.RunConfig,
    encoder: keras.Model,
    decoder: keras.Model,
    images: np.ndarray,
    classes: np.ndarray,
    steps: int,
    batch_size: int,
    xla: bool = False,
) -> tuple[keras.Model, float]:
    """Fine-tune a SPADE decoder made from `decoder` for `steps` batches of the training pairs
    (images float32 (N, S, S, 1) in [-1, 1], masks uint8 (N, S, S); `oracle.segmentation_stream`:
    seeded order, mirrored together) with the autoencoder's loss (--ae-loss) and the oracles'
    recipe (`oracle.fit_steps`: Adam from 1e-3, cosine-decayed to 0), in float32, compiled by
    XLA when `xla`, `encoder` frozen; initial weights of the modulations from
    config.train.seed. Returns (the SPADE decoder, its mean loss). UserError for a loss that
    is not finite."""
    keras.utils.set_random_seed(config.train.seed)
    with hardware.dtype_policy("float32"):  # small: float32, as the mask decoder
        spade = build(config, decoder)
        image_in = keras.Input(images.shape[1:], name="image")
        mask_in = keras.Input((*images.shape[1:3], MASK_CLASSES), name="tissue")
        latent = encoder(image_in, training=False)
        trainer = keras.Model([image_in, mask_in], spade([latent, mask_in]))
    batches = oracle.segmentation_stream(images, classes, batch_size, seed=config.train.seed).map(
        lambda x, m: ((x, one_hot(m)), x)
    )
    print(f"SPADE decoder: {steps} steps on {len(images)} training images and their masks", flush=True)
    encoder.trainable = False  # its latents are what the UNet learned; only the decoder adapts
    try:
        loss = metrics.RECONSTRUCTION_LOSSES[config.train.ae_loss]
        seconds, last = oracle.fit_steps(trainer, loss, batches, steps, verbose=2, jit_compile=xla)
    finally:
        encoder.trainable = True
    print(f"SPADE decoder: loss {last:.4f}, {seconds:.0f} s", flush=True)
    if not np.isfinite(last):
        raise UserError("the SPADE decoder's loss is not finite; nothing saved")
    return spade, last
