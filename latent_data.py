"""The diffusion stage's training data: the training set's latents, the condition labels and
tissue masks that go with them row for row, and the endless batches the UNet trains on.

    latents = encode_training_set(encoder, config, splits["train"])       # (N, h, w, C)
    labels = find_conditions(config, data_dir, splits)                      # before writing
    train_masks = find_training_masks(config, data_dir, splits)             # (n, S, S) uint8
    batches = latent_batches(latents * scale, B, seed,
                             cond=training_conditions(config, labels),      # (N, K)
                             tissue_classes=training_masks(config, train_masks))

Row order is the one invariant here: with `flip` on, the latents are the training images
followed by their mirror images (N = 2n), and every table that goes with them
(conditions, masks) is laid out the same way, mirrored masks included.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import cli
import conditioning
import config as cfg
import dataset
import masks


def encode_training_set(encoder: keras.Model, config: cfg.RunConfig, paths: list[str]) -> np.ndarray:
    """Unscaled latents (N, h, w, C) float32 of every training image, plus their mirror
    images when `flip` is on (the diffusion stage's augmentation, computed once).

    Kept in memory for the whole stage instead of re-encoding every epoch: 16 KB per
    slice at 32×32×4, so about 300 MB for OASIS's ~9,600 training slices and their flips.
    """
    images = dataset.make_dataset(paths, config.data.image_size, config.train.batch_size, shuffle=False)
    if config.data.flip:
        images = dataset.with_mirrors(images)
    return np.concatenate([encoder(x, training=False).numpy() for x in images])


def latent_batches(
    latents: np.ndarray,
    batch_size: int,
    seed: int,
    skip: int = 0,
    cond: np.ndarray | None = None,
    tissue_classes: np.ndarray | None = None,
    mask_input: str = "pixels",
) -> tf.data.Dataset:
    """Endless batches (B, h, w, C) of `latents`, in a seeded order that changes every pass;
    with `cond` (N, K) and/or `tissue_classes` (N, S, S) uint8 tissue masks (class indices),
    dicts {"latents": (B, h, w, C), "cond": (B, K), "tissue": (B, h, w, M)} of matching rows,
    "tissue" being the UNet's mask input `masks.mask_input(classes, h, mask_input)`.

    The shuffle and `skip` act on indices, so skipping the latents that the done epochs
    used (a resumed run) costs no copying: with the same seed, skip = k·B starts exactly
    at batch k of the unskipped stream. The masks stay class indices in memory and become
    the UNet's input batch by batch: as pixels (4 f² float32 channels a latent cell) a table
    of them would take 16 × the indices' bytes (5 GB for 10,000 OASIS slices and their
    mirror images at 128 × 128).
    """
    with tf.device("/CPU:0"):  # not on GPU:0 first: tf.data captures the table on the host
        latents = tf.constant(latents)
        cond_table = None if cond is None else tf.constant(cond, tf.float32)
        class_table = None if tissue_classes is None else tf.constant(tissue_classes, tf.uint8)
    size = int(latents.shape[1])
    if tissue_classes is not None:
        channels = masks.mask_input(np.zeros((0, *tissue_classes.shape[1:]), np.uint8), size, mask_input).shape[-1]

    def tissue_of(index):
        # masks.mask_input itself (NumPy), so training sees exactly what sampling passes the UNet
        tissue = tf.numpy_function(
            lambda classes: masks.mask_input(classes, size, mask_input), [tf.gather(class_table, index)], tf.float32
        )
        return tf.ensure_shape(tissue, (None, size, size, channels))

    def gather(index):
        batch = tf.gather(latents, index)
        if cond_table is None and class_table is None:
            return batch
        batch = {"latents": batch}
        if cond_table is not None:
            batch["cond"] = tf.gather(cond_table, index)
        if class_table is not None:
            batch["tissue"] = tissue_of(index)
        return batch

    return (
        dataset.seeded_passes(len(latents), seed)
        .map(lambda index, _: index)
        .skip(skip)
        .batch(batch_size, drop_remainder=True)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(dataset.without_autotune())
    )


def training_conditions(config: cfg.RunConfig, labels) -> np.ndarray | None:
    """The UNet's cond input (N, K) float32 of every training image, in the order of the
    latents of `encode_training_set` (so twice over when `flip` adds mirror images: a mirror
    keeps its slice position, age, ...); None for a run not conditioned on labels."""
    names = config.label_conditions
    if not names:
        return None
    raw = labels.values["train"][:, [labels.columns.index(name) for name in names]]
    cond = conditioning.normalise(config.condition_stats, raw)
    return np.concatenate([cond, cond]) if config.data.flip else cond


def find_conditions(config: cfg.RunConfig, data_dir, splits: dict):
    """The data's labels (dataset.Labels) for a run conditioned on labels, with its condition
    statistics measured on the training split when not saved yet; None otherwise."""
    names = config.label_conditions
    if not names:
        return None
    labels = dataset.find_labels(data_dir, splits)
    if labels is None:
        raise cli.UserError(
            f"--condition {','.join(names)} needs labels, but {data_dir} has no {dataset.LABELS} (and its file "
            f"names carry no slice index); add one, or train unconditionally with --condition none"
        )
    if config.condition_stats is None:
        config.condition_stats = conditioning.condition_stats(names, labels.columns, labels.values["train"])
    return labels


def find_training_masks(config: cfg.RunConfig, data_dir, splits: dict) -> np.ndarray | None:
    """The training split's tissue masks, uint8 class indices (N, S, S) at the run's image size
    (nearest neighbour) in the order of splits["train"], for a run conditioned on masks or
    training a mask decoder (`mask_decoder_steps`); None for neither, or for a mask decoder
    on data without masks. Every split's masks are paired and read first (`masks.find_masks`,
    `masks.check_masks`; the training split's once, by `masks.load_masks`): a missing,
    orphaned, mis-sized or mis-valued mask is one error line naming the file, before anything
    is written."""
    if not (config.mask_channels or config.train.mask_decoder_steps):
        return None
    paths = masks.find_masks(data_dir, splits)
    if paths is None and not config.mask_channels:
        return None
    if paths is None:
        raise cli.UserError(
            f"--condition {cfg.MASK} needs tissue masks, but {data_dir} has no "
            f"{masks.SEG_FOLDER.format('<split>')} folders; train without it (--condition "
            f"{','.join(config.label_conditions) or 'none'})"
        )
    for split in ("validate", "test"):
        masks.check_masks(splits[split], paths[split])
    return masks.load_masks(paths["train"], config.data.image_size, images=splits["train"])


def training_masks(config: cfg.RunConfig, train_masks: np.ndarray | None) -> np.ndarray | None:
    """The training masks the UNet is conditioned on, uint8 class indices (N, S, S) in the order
    of the latents of `encode_training_set` (`masks_in_latent_order`; `latent_batches` makes
    them the UNet's input, `--mask-input`). None for a run not conditioned on masks."""
    if train_masks is None or not config.mask_channels:
        return None
    return masks_in_latent_order(config, train_masks)


def masks_in_latent_order(config: cfg.RunConfig, train_masks: np.ndarray) -> np.ndarray:
    """The training masks (N, S, S) in the order of the latents of `encode_training_set`: with
    `flip`, the mirror images' masks, mirrored, follow (2N, S, S)."""
    return np.concatenate([train_masks, train_masks[:, :, ::-1]]) if config.data.flip else train_masks
