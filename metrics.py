"""Image metrics on images in [-1, 1]: SSIM and PSNR, nearest-neighbour SSIM, MS-SSIM diversity, FID and KID;
and the Dice overlap of tissue masks.

Conventions: SSIM and MS-SSIM are computed on images mapped to [0, 1] with max_val = 1
(`unit_range`: the literature's and TensorFlow's convention), with tf.image.ssim's 11-px
Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03; PSNR on the dynamic range 2 of [-1, 1]
(the same as [0, 1] with max_val 1). FID and KID take feature sets (N, d) (evaluate.py
extracts them with InceptionV3, `inception_features`).

The brain-box versions (`brain_ssim`, `brain_psnr`) score only the brain's bounding box of
the real image (`brain_box`): on a skull-stripped slice most of the frame is black
background, which any network reconstructs, so the whole-image scores are mostly
background; the box scores are the anatomy's.

Used by runs.py (the autoencoder's training metrics `ssim`, `psnr`, `brain_ssim`,
`brain_psnr`) and evaluate.py.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

# Standard MS-SSIM weights of the five scales (Wang et al. 2003), finest first.
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_FILTER = 11  # tf.image.ssim's default filter size
# Elements of one broadcast image tensor in the pairwise SSIM (a few such live at once).
PAIRWISE_BUDGET = 2**23
INCEPTION_SIZE = 299  # InceptionV3's input side
# A pixel above this on [0, 1] is brain (OASIS and the demo set are skull-stripped: background 0).
BRAIN_THRESHOLD = 0.05


# ---------------------------------------------------------------------------- SSIM and PSNR


def unit_range(images) -> tf.Tensor:
    """Images in [-1, 1] → float32 in [0, 1]: (x + 1) / 2. The range SSIM and MS-SSIM are computed on.

    SSIM is not invariant to shifting both images: its luminance term
    (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) collapses where window means are near 0,
    which on [-1, 1] is mid-grey tissue (means 0.05 and 0.0 give 0.14 there, 0.999 on
    [0, 1]). The literature and TensorFlow's docs use non-negative images with max_val 1.
    """
    return (tf.cast(images, tf.float32) + 1.0) / 2.0


def ssim(y_true, y_pred):
    """SSIM of each image pair, (B, H, W, C) in [-1, 1] → (B,), computed on [0, 1] with max_val 1
    (see `unit_range`); 11-px Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, as tf.image.ssim.

    Per image, not the batch mean: as a Keras metric the running Mean then weights every image
    once, whatever the batch sizes, and a replica's empty batch (the last, smaller batch of a
    split across devices) adds nothing instead of the NaN of a mean over no images.
    """
    return tf.image.ssim(unit_range(y_true), unit_range(y_pred), max_val=1.0)


def psnr(y_true, y_pred):
    """PSNR in dB of each image pair, (B, H, W, C) in [-1, 1] → (B,) (dynamic range 2; the same as
    [0, 1] with max_val 1). Per image for the reasons `ssim` gives."""
    return tf.image.psnr(tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32), max_val=2.0)


def brain_box(images) -> tf.Tensor:
    """The brain's bounding box of each image, (B, H, W, C) in [-1, 1] → float32 (B, H, W) in {0, 1}:
    1 on the rows and columns that hold a pixel above `BRAIN_THRESHOLD` (on [0, 1], any
    channel), i.e. the smallest axis-aligned rectangle around the brain; all 1 for an image
    without one (a blank slice is scored whole)."""
    brain = tf.reduce_any(unit_range(images) > BRAIN_THRESHOLD, axis=-1)  # (B, H, W)
    rows = tf.reduce_any(brain, axis=2, keepdims=True)  # (B, H, 1)
    cols = tf.reduce_any(brain, axis=1, keepdims=True)  # (B, 1, W)
    box = tf.cast(tf.logical_and(rows, cols), tf.float32)
    empty = tf.reduce_any(brain, axis=[1, 2], keepdims=True)
    return tf.where(empty, box, tf.ones_like(box))


def _masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """The mean of `values` (..., h, w) over the last two axes, weighted by `mask` (broadcastable,
    in {0, 1}); the plain mean where the mask is empty."""
    mask = tf.broadcast_to(mask, tf.shape(values))
    total = tf.reduce_sum(mask, axis=[-2, -1])
    inside = tf.math.divide_no_nan(tf.reduce_sum(values * mask, axis=[-2, -1]), total)
    return tf.where(total > 0, inside, tf.reduce_mean(values, axis=[-2, -1]))


def _window_box(images) -> tf.Tensor:
    """`brain_box` (B, H, W) cropped by the SSIM window's half-width to (B, H − 10, W − 10): the
    local SSIM map (tf.image.ssim's return_index_map) has one value per whole 11-px window."""
    half = SSIM_FILTER // 2
    return brain_box(images)[:, half:-half, half:-half]


def brain_ssim(y_true, y_pred):
    """SSIM inside the brain's box of `y_true` (`brain_box`), (B, H, W, C) in [-1, 1] → (B,): the mean
    of tf.image.ssim's local SSIM map (same window and constants as `ssim`, on [0, 1]) over the
    11-px windows centred in the box. Images need H, W ≥ 11."""
    local = tf.image.ssim(unit_range(y_true), unit_range(y_pred), max_val=1.0, return_index_map=True)
    return _masked_mean(local, _window_box(y_true))


def brain_psnr(y_true, y_pred):
    """PSNR in dB inside the brain's box of `y_true`, (B, H, W, C) in [-1, 1] → (B,): 10 log10(2² / MSE)
    with the MSE over the box's pixels (all channels), dynamic range 2 as `psnr`."""
    error = tf.reduce_mean(tf.square(tf.cast(y_true, tf.float32) - tf.cast(y_pred, tf.float32)), axis=-1)
    mse = _masked_mean(error, brain_box(y_true))
    return 10.0 * tf.math.log(4.0 / mse) / tf.math.log(10.0)


# ---------------------------------------------------------------------------- reconstruction losses

L1_SSIM_ALPHA = 0.84  # Zhao et al. 2017, "Loss Functions for Image Restoration with Neural Networks"


def l1_loss(y_true, y_pred):
    """Mean absolute error of each image pair on [0, 1], (B, H, W, C) in [-1, 1] → (B,)."""
    return tf.reduce_mean(tf.abs(unit_range(y_true) - unit_range(y_pred)), axis=[1, 2, 3])


def l1_ssim_loss(y_true, y_pred):
    """(1 − α) L1 + α (1 − SSIM) of each image pair on [0, 1], α = `L1_SSIM_ALPHA`, (B, H, W, C) in
    [-1, 1] → (B,): SSIM's local structure term sharpens edges that the L1 term alone blurs."""
    return (1.0 - L1_SSIM_ALPHA) * l1_loss(y_true, y_pred) + L1_SSIM_ALPHA * (1.0 - ssim(y_true, y_pred))


def mse_loss(y_true, y_pred):
    """Mean squared error of each image pair on [0, 1], (B, H, W, C) in [-1, 1] → (B,): a quarter of
    the MSE on [-1, 1]."""
    return tf.reduce_mean(tf.square(unit_range(y_true) - unit_range(y_pred)), axis=[1, 2, 3])


RECONSTRUCTION_LOSSES = {"mse": mse_loss, "l1": l1_loss, "l1_ssim": l1_ssim_loss}


@tf.function(reduce_retracing=True, autograph=False)  # `brain` is a Python bool
def pairwise_ssim(a: tf.Tensor, b: tf.Tensor, brain: bool = False) -> tf.Tensor:
    """SSIM of every pair: a (n, H, W, 1), b (m, H, W, 1) in [-1, 1] → (n, m), computed on [0, 1];
    with `brain`, inside the brain's box of each image of `a` (as `brain_ssim(a_i, b_j)`).

    One broadcast tf.image.ssim call on (n, 1, ...) against (1, m, ...): no Python loop.
    """
    if not brain:
        return tf.image.ssim(unit_range(a)[:, None], unit_range(b)[None], max_val=1.0)
    local = tf.image.ssim(unit_range(a)[:, None], unit_range(b)[None], max_val=1.0, return_index_map=True)
    return _masked_mean(local, _window_box(a)[:, None])


@dataclass
class Nearest:
    """For n query images, the reference image of highest SSIM to each.

    scores: float64 (n,) in [-1, 1]; index: int64 (n,), that reference's position in the
    reference stream; images: float32 (n, H, W, 1), the reference itself.
    """

    scores: np.ndarray
    index: np.ndarray
    images: np.ndarray


def nearest_ssim(queries: np.ndarray, references, brain: bool = False) -> Nearest:
    """For each query image, the reference image of highest SSIM (ties: the first); with
    `brain`, of highest SSIM inside the query's brain box (`brain_ssim`).

    queries: (n, H, W, 1) in [-1, 1]; references: an iterable of (m_i, H, W, 1) batches
    (e.g. a tf.data.Dataset, so the training set never has to fit in memory), or one
    array. Each query against itself gives 1.
    """
    if isinstance(references, np.ndarray):
        references = [references]
    queries = tf.constant(queries, tf.float32)
    best = np.full(len(queries), -np.inf)
    index = np.full(len(queries), -1, np.int64)
    images = np.zeros(queries.shape, np.float32)
    per_chunk = max(1, PAIRWISE_BUDGET // int(np.prod(queries.shape)))
    seen = 0
    for batch in references:
        batch = np.asarray(batch, np.float32)
        for start in range(0, len(batch), per_chunk):
            chunk = batch[start : start + per_chunk]
            scores = pairwise_ssim(queries, tf.constant(chunk), brain).numpy()
            top = scores.argmax(axis=1)
            better = scores[np.arange(len(top)), top] > best
            best[better] = scores[better, top[better]]
            index[better] = seen + start + top[better]
            images[better] = chunk[top[better]]
        seen += len(batch)
    return Nearest(best, index, images)


def msssim_scales(image_size: int) -> int:
    """How many of the five MS-SSIM scales fit: the coarsest, image_size / 2^(k-1), must be ≥ 11."""
    return max(1, min(len(MSSSIM_WEIGHTS), 1 + int(math.floor(math.log2(image_size / SSIM_FILTER)))))


def msssim_diversity(images: np.ndarray) -> tuple[float | None, int]:
    """Mean MS-SSIM over all n(n-1)/2 pairs of images (n, H, W, 1) in [-1, 1], and the scale count.

    Identical images give 1; lower means more diverse. Uses `msssim_scales(H)` scales with
    renormalised weights (see the module docstring). None for fewer than 2 images.
    """
    n, size = len(images), images.shape[1]
    scales = msssim_scales(size)
    if n < 2:
        return None, scales
    weights = np.array(MSSSIM_WEIGHTS[:scales]) / np.sum(MSSSIM_WEIGHTS[:scales])
    i, j = np.triu_indices(n, k=1)
    per_chunk = max(1, PAIRWISE_BUDGET // int(np.prod(images.shape[1:])))
    images = tf.constant(images, tf.float32)
    total = 0.0
    for start in range(0, len(i), per_chunk):
        a = tf.gather(images, i[start : start + per_chunk])
        b = tf.gather(images, j[start : start + per_chunk])
        total += float(
            tf.reduce_sum(
                tf.image.ssim_multiscale(unit_range(a), unit_range(b), max_val=1.0, power_factors=tuple(weights))
            )
        )
    return total / len(i), scales


# ---------------------------------------------------------------------------- FID and KID


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix, by eigendecomposition
    (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein²) distance of N(mu1, s1) and N(mu2, s2):

        ||mu1 - mu2||² + Tr(s1) + Tr(s2) - 2 Tr(sqrt(s1 s2)).

    Tr(sqrt(s1 s2)) = Σ sqrt(λ_i) over the eigenvalues λ_i of sqrt(s1) s2 sqrt(s1), which
    is symmetric PSD and similar to s1 s2: no general matrix square root (scipy) needed.
    mu: (d,), s: (d, d) symmetric PSD. Returns a float ≥ 0 (round-off below 0 is clipped).
    """
    mu1, mu2, s1, s2 = (np.asarray(x, np.float64) for x in (mu1, mu2, s1, s2))
    root = _sqrt_psd(s1)
    inner = root @ s2 @ root
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2.0), 0.0, None)))
    return max(0.0, float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID of two feature sets (n, d) and (m, d): the Fréchet distance of their Gaussian fits
    (mean, covariance with ddof = 1). Needs n, m ≥ 2."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    # atleast_2d: np.cov of one feature column is 0-d
    cov_a, cov_b = (np.atleast_2d(np.cov(x, rowvar=False)) for x in (a, b))
    return frechet_distance(a.mean(0), cov_a, b.mean(0), cov_b)


def kid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """KID: the unbiased estimate of MMD² with the kernel k(x, y) = (x·y / d + 1)³ (Bińkowski et al. 2018).

        Σ_{i≠j} k(x_i, x_j) / (n(n-1)) + Σ_{i≠j} k(y_i, y_j) / (m(m-1)) - 2 Σ_{i,j} k(x_i, y_j) / (nm)

    over all of both sets (no subsets). Zero in expectation when both sets come from the
    same distribution, so it can be slightly negative. Needs n, m ≥ 2.
    """
    x, y = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    d, n, m = x.shape[1], len(x), len(y)

    def kernel(p, q):
        return (p @ q.T / d + 1.0) ** 3

    kxx, kyy = kernel(x, x), kernel(y, y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2.0 * kernel(x, y).mean()
    )


# ---------------------------------------------------------------------------- masks


def dice(reference: np.ndarray, predicted: np.ndarray, classes=(1, 2, 3)) -> np.ndarray:
    """Dice overlap per image and class of two class-index masks (N, H, W) (or one (H, W)).

    For class k: 2 |R_k ∩ P_k| / (|R_k| + |P_k|), in [0, 1] (1: the same pixels); NaN where
    neither mask has the class (nothing to overlap). Returns float64 (N, len(classes)),
    one row per image; average with `mean_dice`. `classes` defaults to the three tissues of
    `masks.CLASS_NAMES` (CSF, grey, white matter), background left out as is usual: it is
    most of the frame and would score near 1 for any brain-shaped mask.
    """
    reference, predicted = np.asarray(reference), np.asarray(predicted)
    if reference.shape != predicted.shape:
        raise ValueError(f"dice: masks of shapes {reference.shape} and {predicted.shape}")
    if reference.ndim == 2:
        reference, predicted = reference[None], predicted[None]
    scores = np.empty((len(reference), len(classes)))
    for j, k in enumerate(classes):
        r, p = reference == k, predicted == k
        both = r.sum(axis=(1, 2)) + p.sum(axis=(1, 2))
        overlap = (r & p).sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            scores[:, j] = np.where(both > 0, 2.0 * overlap / both, np.nan)
    return scores


def mean_dice(scores: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean over classes of the per-class means, per-class means (K,)) of `dice`'s (N, K)
    scores; a class's mean skips the images where it is NaN (absent from both masks), and
    is NaN where it is absent from every image (then left out of the overall mean)."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class absent everywhere: NaN, said above
        per_class = np.nanmean(scores, axis=0)
        overall = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return overall, per_class


def nearest_mask_dice(queries: np.ndarray, references: np.ndarray, classes=(1, 2, 3)) -> tuple[np.ndarray, np.ndarray]:
    """For each query mask (N, H, W) the reference mask (M, H, W) it overlaps best: (its mean
    Dice over `classes`, as `dice` and `mean_dice` score one pair, float64 (N,); its index,
    int (N,)). The memorisation check for masks: near 1 means a copied reference mask.
    Computed as one matrix product per class, (N, H·W) × (H·W, M)."""
    queries, references = np.asarray(queries), np.asarray(references)
    if queries.shape[1:] != references.shape[1:] or not len(references):
        raise ValueError(f"nearest_mask_dice: masks of shapes {queries.shape} and {references.shape}")
    per_class = []
    for k in classes:
        q = (queries == k).reshape(len(queries), -1).astype(np.float32)
        r = (references == k).reshape(len(references), -1).astype(np.float32)
        both = q.sum(axis=1)[:, None] + r.sum(axis=1)[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class.append(np.where(both > 0, 2.0 * (q @ r.T) / both, np.nan))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a pair without any of the classes: NaN
        scores = np.nanmean(np.stack(per_class), axis=0)  # (N, M)
    index = np.argmax(np.nan_to_num(scores, nan=-1.0), axis=1)
    return scores[np.arange(len(queries)), index].astype(np.float64), index


def inception_features(model, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Features (N, 2048) of images (N, H, W, 1) in [-1, 1]: bilinear resize to 299×299, gray
    repeated to 3 channels; [-1, 1] is already InceptionV3's input range (preprocess_input "tf")."""
    out = []
    for start in range(0, len(images), batch_size):
        x = tf.image.resize(
            tf.constant(images[start : start + batch_size], tf.float32), (INCEPTION_SIZE, INCEPTION_SIZE)
        )
        out.append(model(tf.clip_by_value(tf.repeat(x, 3, axis=-1), -1.0, 1.0), training=False).numpy())
    return np.concatenate(out)
