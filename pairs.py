"""Image + mask pairs: synthesised by a run, and whether they can train a segmentation network.

A run whose data has tissue masks trains a mask decoder beside its image decoder (train.py,
`autoencoder.build_mask_decoder`), so every latent the diffusion model generates decodes to
an image and its tissue mask (`synthesize`; predict.py --pairs writes them). This is label
synthesis in the manner of DatasetGAN (Zhang et al. 2021): a small head, trained on the
latents of the real images and their masks, labels what the generator makes.

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

import numpy as np

import config as cfg
import masks
import metrics
import oracle
import runs


def synthesize(
    run: runs.Run, n: int, options: cfg.SamplingOptions, condition: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """n pairs of the run: (images float32 (n, S, S, 1) in [-1, 1], masks uint8 (n, S, S) class
    indices), the samples of `runs.generate` (unconditional, or under the label `condition`)
    and their masks from the run's mask decoder (`runs.decode_masks`; load the run with
    mask_decoder=True)."""
    samples = runs.generate(run, n, options, condition=condition, progress=False)
    return samples.images, runs.decode_masks(run, samples.latents, options.batch_size)


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


def _number(x) -> float | None:
    """A finite float, or None (JSON null) for NaN/inf."""
    return float(x) if x is not None and np.isfinite(x) else None
