"""Image metrics on images in [-1, 1]: SSIM and PSNR, nearest-neighbour SSIM, MS-SSIM diversity, FID and KID.

Conventions: SSIM and MS-SSIM are computed on images mapped to [0, 1] with max_val = 1
(`unit_range`: the literature's and TensorFlow's convention), with tf.image.ssim's 11-px
Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03; PSNR on the dynamic range 2 of [-1, 1]
(the same as [0, 1] with max_val 1). FID and KID take feature sets (N, d) (evaluate.py
extracts them with InceptionV3, `inception_features`).

Used by runs.py (the autoencoder's training metrics `ssim`, `psnr`) and evaluate.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

# Standard MS-SSIM weights of the five scales (Wang et al. 2003), finest first.
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_FILTER = 11  # tf.image.ssim's default filter size
# Elements of one broadcast image tensor in the pairwise SSIM (a few such live at once).
PAIRWISE_BUDGET = 2**23
INCEPTION_SIZE = 299  # InceptionV3's input side


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


@tf.function(reduce_retracing=True)
def pairwise_ssim(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """SSIM of every pair: a (n, H, W, 1), b (m, H, W, 1) in [-1, 1] → (n, m), computed on [0, 1].

    One broadcast tf.image.ssim call on (n, 1, ...) against (1, m, ...): no Python loop.
    """
    return tf.image.ssim(unit_range(a)[:, None], unit_range(b)[None], max_val=1.0)


@dataclass
class Nearest:
    """For n query images, the reference image of highest SSIM to each.

    scores: float64 (n,) in [-1, 1]; index: int64 (n,), that reference's position in the
    reference stream; images: float32 (n, H, W, 1), the reference itself.
    """

    scores: np.ndarray
    index: np.ndarray
    images: np.ndarray


def nearest_ssim(queries: np.ndarray, references) -> Nearest:
    """For each query image, the reference image of highest SSIM (ties: the first).

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
            scores = pairwise_ssim(queries, tf.constant(chunk)).numpy()
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
