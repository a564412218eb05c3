"""Image + mask pairs: the mask decoder that labels a run's samples, the pairs it makes, and
whether they can train a segmentation network; and how faithfully a mask-conditioned run
follows the masks it is asked for (evaluate.py's mask_dice_* and pair_* / seg_* metrics).

A run whose data has tissue masks trains a mask decoder beside its image decoder
(`train_mask_decoder`, called by train.py after the autoencoder), so every latent the
diffusion model generates decodes to an image and its tissue mask (`synthesize`;
predict.py --pairs writes them). This is label synthesis in the manner of DatasetGAN
(Zhang et al. 2021): a small head, trained on the latents of the real images and their
masks, labels what the generator makes.

Mask faithfulness (`mask_metrics`) and the pairs' measurements (`pair_metrics`) are judged
by the run's `segmentation_oracle` (oracle.py, cached in the run).

How useful such pairs are is measured as the literature measures it (e.g. Akbar et al.
2024, for 2-D brain MRI): the same segmentation network, `oracle.build_segmenter` trained by
`oracle.train_segmenter` with the same steps, batch and seed, is trained on the real
training pairs, on as many synthetic pairs, and on both, and each is judged by its Dice on
the real test split (`usefulness`). Synthetic-only Dice near real-only Dice says the pairs
carry what a segmenter needs; real + synthetic above real-only says they add something.

Two more checks of the pairs (`pair_scores`): whether a pair's mask matches its image, as
the segmentation oracle (trained on real pairs) segments the image (`pair_dice`); and
whether the masks are new, not copies of training masks: each generated mask's best Dice
with any training mask (or its mirror image), beside the same for the real validation
masks (`metrics.nearest_mask_dice`).

Dice is `metrics.dice` / `metrics.mean_dice`'s: per tissue class (CSF, grey matter, white
matter), averaged over the images where the class occurs, and the mean of the three.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

import config as cfg
import dataset
import hardware
import masks
import metrics
import oracle
import runs
from autoencoder import build_mask_decoder
from cli import UserError

# ---------------------------------------------------------------------------- the mask decoder


def mask_decoder_batches(latents: np.ndarray, train_masks: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    """Endless (latents (B, h, w, C), masks (B, S, S)) batches of matching rows, in a seeded
    order that changes every pass (`dataset.seeded_passes`)."""
    with tf.device("/CPU:0"):  # not on GPU:0 first: tf.data captures the tables on the host
        latent_table, mask_table = tf.constant(latents), tf.constant(train_masks)
    return (
        dataset.seeded_passes(len(latents), seed)
        .map(lambda index, _: (tf.gather(latent_table, index), tf.gather(mask_table, index)))
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(dataset.without_autotune())
    )


def train_mask_decoder(
    latents: np.ndarray, train_masks: np.ndarray, path: str, steps: int, batch_size: int, seed: int
) -> keras.Model:
    """Fit a mask decoder (`autoencoder.build_mask_decoder`, float32) on unscaled latents
    (N, h, w, C) and their images' masks (N, S, S), row for row (train.py passes the training
    latents with their mirror images and the masks in the same order): `steps` batches,
    `oracle.fit_steps` (Adam 1e-3 cosine-decayed) with oracle.SegmentationLoss (cross-entropy
    + soft Dice), initial weights from `seed`; writes the weights to `path` (atomically).
    UserError for unmatched rows or a loss that is not finite (nothing written). Seconds on a
    CPU: BENCHMARKS.md."""
    if len(train_masks) != len(latents):
        raise UserError(f"{len(latents)} training latents but {len(train_masks)} masks; check the data folder")
    keras.utils.set_random_seed(seed)
    with hardware.dtype_policy("float32"):  # small: float32 everywhere, as the oracles
        model = build_mask_decoder(latents.shape[-1], train_masks.shape[1] // latents.shape[1])
    print(f"mask decoder: {steps} steps on {len(latents)} latents and their masks", flush=True)
    batches = mask_decoder_batches(latents, train_masks, batch_size, seed)
    loss = oracle.SegmentationLoss(oracle.SEGMENTER_DICE_WEIGHT)
    seconds, last = oracle.fit_steps(model, loss, batches, steps, verbose=2)
    print(f"mask decoder: loss {last:.4f}, {seconds:.0f} s", flush=True)
    if not np.isfinite(last):
        raise UserError("the mask decoder's loss is not finite; nothing saved")
    runs.save_weights(model, path)
    return model


# ---------------------------------------------------------------------------- pairs


def synthesize(
    run: runs.Run, n: int, options: cfg.SamplingOptions, condition: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """n pairs of the run: (images float32 (n, S, S, 1) in [-1, 1], masks uint8 (n, S, S) class
    indices), `runs.paired` of the samples of `runs.generate` (unconditional, or under the
    label `condition`): their masks from the run's mask decoder (load the run with
    mask_decoder=True), their images decoded given those masks by its SPADE decoder, if any."""
    samples = runs.generate(run, n, options, condition=condition, progress=False)
    return runs.paired(run, samples, options.batch_size)


def dice_scores(reference: np.ndarray, predicted: np.ndarray, key: str) -> dict:
    """{key: mean Dice over the tissue classes, key_<class>: per class} of two mask stacks."""
    overall, per_class = metrics.mean_dice(metrics.dice(reference, predicted))
    scores = {key: _number(overall)}
    for name, value in zip(masks.CLASS_NAMES[1:], per_class, strict=True):
        scores[f"{key}_{name}"] = _number(value)
    return scores


def pair_scores(
    pairs: tuple[np.ndarray, np.ndarray], judge: oracle.Segmenter, train_masks: np.ndarray, real_masks: np.ndarray
) -> dict:
    """pair_dice (and per class): the pairs' masks against the oracle's segmentation of their
    images; mask_nn_dice_median / max: each pair's mask against its closest training mask
    (train_masks and their mirror images), median and max; real_mask_nn_dice_median: the
    same for the real validation masks `real_masks` (the yardstick)."""
    images, classes = pairs
    references = np.concatenate([train_masks, train_masks[:, :, ::-1]])
    generated, _ = metrics.nearest_mask_dice(classes, references)
    real, _ = metrics.nearest_mask_dice(real_masks, references) if len(real_masks) else (np.zeros(0), None)
    return {
        **dice_scores(classes, judge.segment(images), "pair_dice"),
        "mask_nn_dice_median": _number(np.median(generated)),
        "mask_nn_dice_max": _number(np.max(generated)),
        "real_mask_nn_dice_median": _number(np.median(real)) if len(real) else None,
    }


def usefulness(
    training_sets: dict[str, tuple[np.ndarray, np.ndarray]],
    test: tuple[np.ndarray, np.ndarray],
    steps: int,
    batch_size: int,
    seed: int = 0,
) -> dict:
    """Train one segmenter per training set ({name: (images (N, S, S, 1), masks (N, S, S))}),
    each with `oracle.train_segmenter` (the same steps, batch and seed; image and mask flipped
    together), and judge each on the `test` pairs: {seg_dice_<name>: mean Dice, and per
    class seg_dice_<name>_<class>, seg_pairs_<name>: its number of pairs}."""
    test_images, test_masks = test
    scores = {}
    for name, (images, classes) in training_sets.items():
        print(f"segmenter on {len(images)} {name.replace('_', ' ')} pairs, {steps} steps", flush=True)
        stream = oracle.segmentation_stream(images, classes, batch_size, seed=seed)
        segmenter = oracle.train_segmenter(stream, images.shape[1], steps=steps, seed=seed)
        scores.update(dice_scores(test_masks, segmenter.segment(test_images), f"seg_dice_{name}"))
        scores[f"seg_pairs_{name}"] = len(images)
    return scores


# ---------------------------------------------------------------------------- evaluate.py's measurements


def segmentation_oracle(run: runs.Run, steps: int, batch_size: int) -> oracle.Segmenter:
    """The run's segmentation oracle: loaded from RUN/oracle/ or trained there on the real
    training images and their masks (flipped together)."""
    config = run.config
    images, masks_ = runs.split_masks(config, "train")

    def make_train():
        loaded = oracle.load_segmentation_pairs(images, masks_, config.data.image_size)
        return oracle.segmentation_stream(*loaded, batch_size, seed=config.train.seed)

    return oracle.load_or_train_segmenter(
        run.directory, make_train, config.data.image_size, steps=steps, seed=config.train.seed
    )


def mask_metrics(run: runs.Run, n: int, options: cfg.SamplingOptions, guidance: list[float], steps: int) -> dict:
    """evaluate.py's mask_dice_* metrics (its docstring says what each is) and
    `mask_guidance_sweep`: n samples asked for the validation masks (cycled), at each guidance
    weight, n unconditional samples, the real validation slices and the autoencoder's
    reconstructions of them, each segmented by the `segmentation_oracle` and scored against
    the masks."""
    config = run.config
    images, mask_paths = runs.split_masks(config, "validate")
    if not images:
        raise UserError("mask metrics need validation images (their masks are what samples are asked for)")
    real, real_masks = oracle.load_segmentation_pairs(images, mask_paths, config.data.image_size)
    requested = real_masks[np.arange(n) % len(real_masks)]
    print(f"segmentation oracle (cached in {os.path.join(run.directory, oracle.ORACLE_FOLDER)})", flush=True)
    judge = segmentation_oracle(run, steps, options.batch_size)
    sweep = []
    for w in guidance:
        print(f"guidance {w:g}: sampling {n} images for the masks of {len(real)} validation images", flush=True)
        samples = runs.generate(run, n, options, tissue_masks=requested, guidance=w).images
        sweep.append({"guidance": w, **dice_scores(requested, judge.segment(samples), "mask_dice_samples")})
    print(f"{n} unconditional samples (the chance level of the masks' Dice)", flush=True)
    unconditional = runs.generate(run, n, options).images
    return {
        **{key: value for key, value in sweep[0].items() if key != "guidance"},
        **dice_scores(requested, judge.segment(unconditional), "mask_dice_unconditional"),
        **dice_scores(real_masks, judge.segment(real), "mask_dice_real"),
        **dice_scores(
            real_masks,
            judge.segment(runs.reconstruct(run, real, options.batch_size, tissue_masks=real_masks)),
            "mask_dice_autoencoder",
        ),
        "mask_requests": f"the masks of the {len(real)} real (validation) images, cycled to {n}; labels unknown",
        "segmenter": {key: judge.info.get(key) for key in ("steps", "seconds", "loss")},
        "mask_guidance_sweep": sweep,
    }


def pair_metrics(run: runs.Run, options: cfg.SamplingOptions, steps: int) -> dict:
    """evaluate.py's pair_* and seg_* metrics (the module docstring: what they mean): as many
    pairs as the training split has images (`synthesize`), their `pair_scores` and their
    `usefulness` against the real training pairs, judged on the test split."""
    config, size, batch = run.config, run.config.data.image_size, options.batch_size
    real_train = oracle.load_segmentation_pairs(*runs.split_masks(config, "train"), size)
    test = oracle.load_segmentation_pairs(*runs.split_masks(config, "test"), size)
    _, validation_masks = oracle.load_segmentation_pairs(*runs.split_masks(config, "validate"), size)
    if not len(test[0]):
        raise UserError("the usefulness of image + mask pairs is judged on the test split, which is empty")
    count = len(real_train[0])
    print(f"{count} image + mask pairs (unconditional samples, the mask decoder's masks)", flush=True)
    synthetic = synthesize(run, count, options)
    judge = segmentation_oracle(run, steps, batch)
    both = tuple(np.concatenate([r, s]) for r, s in zip(real_train, synthetic, strict=True))
    sets = {"real_only": real_train, "synthetic_only": synthetic, "real_plus_synthetic": both}
    return {
        **pair_scores(synthetic, judge, real_train[1], validation_masks),
        **usefulness(sets, test, steps, batch, seed=config.train.seed),
        "seg_steps": steps,
        "seg_test_pairs": len(test[0]),
    }


def _number(x) -> float | None:
    """A finite float, or None (JSON null) for NaN/inf."""
    return float(x) if x is not None and np.isfinite(x) else None
