"""metrics.py on inputs with known answers: SSIM against an independent NumPy SSIM and against
hand-computed constant images, the nearest-neighbour search, MS-SSIM diversity, FID and KID
against closed forms."""

import numpy as np
import pytest
import tensorflow as tf

import metrics


def images(n, size=16, seed=0):
    """n smooth random images (n, size, size, 1) in [-1, 1] (blurred noise: SSIM between them is well below 1)."""
    x = np.random.default_rng(seed).standard_normal((n, size // 4, size // 4, 1))
    return np.tanh(tf.image.resize(x, (size, size)).numpy()).astype(np.float32)


def perturbed(x, scale, seed):
    """x plus Gaussian noise of standard deviation `scale`, clipped to [-1, 1]."""
    noise = np.random.default_rng(seed).standard_normal(x.shape)
    return np.clip(x + scale * noise, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------- an independent SSIM

# Wang et al. (2003), finest scale first; written out here, not read from metrics.MSSSIM_WEIGHTS.
WANG_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def blur(x):
    """The 11×11 Gaussian (sigma 1.5, sum 1) weighted mean of every window of a 2-D array, 'valid' region only."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    g /= g.sum()
    rows = np.apply_along_axis(np.convolve, 1, x, g, mode="valid")
    return np.apply_along_axis(np.convolve, 0, rows, g, mode="valid")


def ssim_maps(x, y):
    """The luminance and contrast-structure maps of SSIM (K1 = 0.01, K2 = 0.03, L = 1) of 2-D images in [0, 1]."""
    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    return (2 * mx * my + c1) / (mx**2 + my**2 + c1), (2 * cxy + c2) / (vx + vy + c2)


def unit(image):
    """One (H, W, 1) image in [-1, 1] as a float64 (H, W) array in [0, 1]."""
    return (np.asarray(image, np.float64)[..., 0] + 1.0) / 2.0


def numpy_ssim(a, b):
    """SSIM of two (H, W, 1) images in [-1, 1], on [0, 1]: the mean of the SSIM map over the valid region."""
    luminance, cs = ssim_maps(unit(a), unit(b))
    return float(np.mean(luminance * cs))


def numpy_msssim(a, b, scales):
    """MS-SSIM of two (H, W, 1) images in [-1, 1] with the first `scales` weights renormalised:
    Π mean(cs_k)^w_k over the finer scales × mean(SSIM)^w at the coarsest, each clipped at 0,
    halving the image by 2×2 means between scales (sizes that stay even, as 22 and 64 px: TF pads odd ones)."""
    weights = np.array(WANG_WEIGHTS[:scales]) / sum(WANG_WEIGHTS[:scales])
    x, y, value = unit(a), unit(b), 1.0
    for k, w in enumerate(weights):
        if k:
            h = x.shape[0] // 2
            x, y = (z.reshape(h, 2, h, 2).mean(axis=(1, 3)) for z in (x, y))
        luminance, cs = ssim_maps(x, y)
        value *= max(0.0, float(np.mean(luminance * cs if k == scales - 1 else cs))) ** w
    return value


# ---------------------------------------------------------------------------- SSIM


def test_ssim_of_an_image_with_itself_is_one():
    x = images(3, 24, seed=1)
    np.testing.assert_allclose(metrics.ssim(x, x).numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.diag(metrics.pairwise_ssim(x, x).numpy()), 1.0, atol=1e-6)


@pytest.mark.parametrize("a, b", [(0.0, 0.2), (-1.0, 1.0), (0.6, 0.9)])
def test_ssim_of_constant_images_is_the_luminance_term_on_zero_one(a, b):
    """Constant images have no variance, so the contrast-structure term is C2 / C2 = 1 and SSIM is
    (2 a' b' + C1) / (a'² + b'² + C1) of the values mapped to [0, 1], C1 = (0.01 · 1)². The same
    formula on [-1, 1] with L = 2 gives a different value (0.0099 instead of 0.9836 for 0.0 vs 0.2):
    this pins the [0, 1] mapping. Tolerance 3e-3: tf.image.ssim takes variances as E[x²] − μ² in
    float32, which for a constant image is a few ulps (~1e-6) instead of 0, and divided by C2 = 9e-4
    that moves the contrast term; over a 41 × 41 grid of constants in [-1, 1] the error is at most 2e-3."""
    x, y = np.full((2, 16, 16, 1), a, np.float32), np.full((2, 16, 16, 1), b, np.float32)
    p, q = (a + 1) / 2, (b + 1) / 2
    expected = (2 * p * q + 1e-4) / (p**2 + q**2 + 1e-4)
    on_minus_one_one = (2 * a * b + 4e-4) / (a**2 + b**2 + 4e-4)
    assert abs(expected - on_minus_one_one) > 0.05
    if (a, b) == (0.0, 0.2):
        assert expected == pytest.approx(0.6001 / 0.6101) and on_minus_one_one == pytest.approx(0.0004 / 0.0404)
    np.testing.assert_allclose(metrics.ssim(x, y).numpy(), expected, atol=3e-3)
    np.testing.assert_allclose(metrics.pairwise_ssim(x, y).numpy(), expected, atol=3e-3)


def test_ssim_matches_an_independent_numpy_ssim():
    """metrics.ssim (each pair (x_i, y_i)) and metrics.pairwise_ssim (every pair) against numpy_ssim above,
    on random 24-px images and noisy copies (about 0.8 against a copy, about 0 and negative between
    unrelated images, so the check is not only near 1). Tolerance 1e-4: float32 against float64."""
    x = (np.random.default_rng(3).uniform(-1, 1, (3, 24, 24, 1)) * 0.8).astype(np.float32)
    y = perturbed(x, 0.3, seed=4)
    expected = np.array([[numpy_ssim(a, b) for b in y] for a in x])
    assert 0.5 < np.diag(expected).min() and np.diag(expected).max() < 0.95 and expected.min() < 0
    np.testing.assert_allclose(metrics.ssim(x, y).numpy(), np.diag(expected), atol=1e-4)
    np.testing.assert_allclose(metrics.pairwise_ssim(x, y).numpy(), expected, atol=1e-4)


# ---------------------------------------------------------------------------- the brain's box


def framed(size=32, box=(6, 20, 9, 27), seed=0):
    """A black (−1) image with random tissue in rows box[0]:box[1], columns box[2]:box[3]; returns it and
    the box as a 0/1 (size, size) array."""
    r0, r1, c0, c1 = box
    x = -np.ones((size, size, 1), np.float32)
    x[r0:r1, c0:c1] = np.random.default_rng(seed).uniform(-0.6, 1.0, (r1 - r0, c1 - c0, 1))
    mask = np.zeros((size, size))
    mask[r0:r1, c0:c1] = 1
    return x, mask


def test_brain_box_is_the_bounding_box_of_the_tissue_or_the_whole_blank_image():
    """An L-shaped brain: its bounding rectangle, not the pixels themselves; a blank image: all of it;
    a pixel just below BRAIN_THRESHOLD (on [0, 1]) is background, one above is brain."""
    x = -np.ones((2, 12, 12, 1), np.float32)
    x[0, 2:9, 3, 0] = 0.5  # vertical bar, rows 2..8, column 3
    x[0, 8, 3:10, 0] = 0.5  # horizontal bar, row 8, columns 3..9
    x[0, 0, 0, 0] = 2 * (metrics.BRAIN_THRESHOLD - 0.01) - 1  # dim: not brain
    box = metrics.brain_box(x).numpy()
    expected = np.zeros((12, 12))
    expected[2:9, 3:10] = 1
    np.testing.assert_array_equal(box[0], expected)
    np.testing.assert_array_equal(box[1], np.ones((12, 12)))
    x[1, 11, 11, 0] = 2 * (metrics.BRAIN_THRESHOLD + 0.01) - 1
    assert metrics.brain_box(x).numpy()[1].sum() == 1


def test_brain_ssim_and_psnr_score_only_the_box():
    """Against numpy: brain_ssim is the mean of numpy's SSIM map over the windows centred in the box,
    brain_psnr 10 log10(4 / MSE over the box). Errors outside the box leave brain_psnr alone, and
    brain_ssim too beyond the windows' reach (5 px), but lower the whole-image SSIM."""
    x, mask = framed()  # box rows 6..19: its windows reach rows 1..24
    y = perturbed(x, 0.2, seed=1)
    y_outside, y_far = y.copy(), y.copy()
    y_outside[mask == 0] = 0.5  # bright background where x is black
    y_far[25:] = 0.5
    luminance, cs = ssim_maps(unit(x), unit(y))
    windows = mask[5:-5, 5:-5] == 1
    expected_ssim = float(np.mean((luminance * cs)[windows]))
    expected_psnr = 10 * np.log10(4.0 / np.mean((x[..., 0].astype(np.float64) - y[..., 0])[mask == 1] ** 2))
    for pred in (y, y_far):
        assert float(metrics.brain_ssim(x[None], pred[None])[0]) == pytest.approx(expected_ssim, abs=1e-4)
    for pred in (y, y_outside):
        assert float(metrics.brain_psnr(x[None], pred[None])[0]) == pytest.approx(expected_psnr, abs=1e-3)
    assert float(metrics.ssim(x[None], y_far[None])[0]) < float(metrics.ssim(x[None], y[None])[0]) - 0.02
    assert metrics.brain_ssim(x[None], x[None]).numpy() == pytest.approx([1.0], abs=1e-6)


def test_pairwise_brain_ssim_uses_each_querys_box():
    """pairwise_ssim(brain=True)[i, j] = brain_ssim(a_i, b_j), the box of a_i, for two different boxes."""
    a = np.stack([framed(box=(4, 22, 6, 26), seed=2)[0], framed(box=(10, 28, 3, 20), seed=3)[0]])
    b = np.stack([perturbed(a[0], 0.3, seed=4), perturbed(a[1], 0.3, seed=5), framed(seed=6)[0]])
    got = metrics.pairwise_ssim(a, b, brain=True).numpy()
    expected = [[float(metrics.brain_ssim(a[i : i + 1], b[j : j + 1])[0]) for j in range(3)] for i in range(2)]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got[0, 0] > got[0, 2] and got[1, 1] > got[1, 2]
    nearest = metrics.nearest_ssim(a, b, brain=True)
    assert nearest.index.tolist() == [0, 1]


# ---------------------------------------------------------------------------- reconstruction losses


def test_reconstruction_losses_on_zero_one():
    """mse and l1 on [0, 1] (a quarter and a half of their [-1, 1] values); l1_ssim = 0.16 L1 + 0.84 (1 − SSIM);
    each is per image and 0 for a perfect reconstruction."""
    x = images(2, size=24)
    y = perturbed(x, 0.2, seed=8)
    diff = x.astype(np.float64) - y
    np.testing.assert_allclose(metrics.mse_loss(x, y).numpy(), np.mean(diff**2, axis=(1, 2, 3)) / 4, rtol=1e-5)
    np.testing.assert_allclose(metrics.l1_loss(x, y).numpy(), np.mean(np.abs(diff), axis=(1, 2, 3)) / 2, rtol=1e-5)
    ssim = np.array([numpy_ssim(a, b) for a, b in zip(x, y, strict=True)])
    expected = 0.16 * np.mean(np.abs(diff), axis=(1, 2, 3)) / 2 + 0.84 * (1 - ssim)
    np.testing.assert_allclose(metrics.l1_ssim_loss(x, y).numpy(), expected, atol=1e-4)
    for loss in metrics.RECONSTRUCTION_LOSSES.values():
        np.testing.assert_allclose(loss(x, x).numpy(), [0.0, 0.0], atol=1e-6)


# ---------------------------------------------------------------------------- nearest neighbours


def test_nearest_ssim_finds_planted_duplicates_across_batches_and_chunks(monkeypatch):
    """Nine distractors in batches of 3, 4 and 2, searched two references at a time: a noisy copy
    of reference 5 and an exact copy of reference 8 find those (index across batches and chunks,
    the image itself, the score of numpy_ssim), a third query the best of the numpy_ssim loop."""
    references = images(9, seed=2)
    queries = np.stack([perturbed(references[5], 0.05, seed=7), references[8], images(1, seed=9)[0]])
    expected = np.array([[numpy_ssim(q, r) for r in references] for q in queries])
    assert np.sort(expected[:2], axis=1)[:, -2].max() < 0.9  # the planted copies stand out
    monkeypatch.setattr(metrics, "PAIRWISE_BUDGET", 3 * 16 * 16 * 2)  # chunks of 2 references
    got = metrics.nearest_ssim(queries, [references[:3], references[3:7], references[7:]])
    assert got.index.dtype == np.int64 and got.scores.dtype == np.float64 and got.images.dtype == np.float32
    assert got.index.tolist() == [5, 8, int(expected[2].argmax())]
    np.testing.assert_array_equal(got.images, references[got.index])
    np.testing.assert_allclose(got.scores, expected.max(axis=1), atol=1e-4)
    assert got.scores[1] == pytest.approx(1.0, abs=1e-6)


def test_nearest_ssim_ties_go_to_the_first_reference(monkeypatch):
    """The query's exact copy appears three times: twice in one batch (one chunk), once in a later
    batch; the first copy (index 1) wins. Also with one array of references instead of batches."""
    x, distractors = images(1, seed=5), images(3, seed=6)
    references = np.concatenate([distractors[:1], x, x, distractors[1:], x])  # x at 1, 2 and 5
    got = metrics.nearest_ssim(x, [references[:3], references[3:]])
    assert got.index.tolist() == [1] and got.scores[0] == pytest.approx(1.0, abs=1e-6)
    assert metrics.nearest_ssim(x, references).index.tolist() == [1]
    monkeypatch.setattr(metrics, "PAIRWISE_BUDGET", 16 * 16)  # one reference per chunk
    assert metrics.nearest_ssim(x, [references[:3], references[3:]]).index.tolist() == [1]


# ---------------------------------------------------------------------------- MS-SSIM diversity


def test_msssim_scales_fit_the_image():
    """The coarsest of k scales, size / 2^(k-1), must be ≥ 11 px: 21 px fits one, 22 px two, 176 px five."""
    expected = {11: 1, 16: 1, 21: 1, 22: 2, 43: 2, 44: 3, 64: 3, 128: 4, 175: 4, 176: 5, 256: 5}
    assert {size: metrics.msssim_scales(size) for size in expected} == expected


@pytest.mark.parametrize("size, scales", [(16, 1), (22, 2), (64, 3)])
def test_msssim_diversity_matches_an_independent_msssim(size, scales):
    """Identical images give 1; four distinct ones the mean over their six pairs of numpy_msssim with
    as many scales as fit (at 16 px that is plain SSIM). Tolerance 1e-4: float32 against float64."""
    same = np.repeat(images(1, size), 4, axis=0)
    assert metrics.msssim_diversity(same) == (pytest.approx(1.0, abs=1e-5), scales)
    x = images(4, size, seed=3)
    pairs = [numpy_msssim(x[i], x[j], scales) for i in range(4) for j in range(i + 1, 4)]
    if scales == 1:
        assert pairs == pytest.approx([max(0.0, numpy_ssim(x[i], x[j])) for i in range(4) for j in range(i + 1, 4)])
    value, got_scales = metrics.msssim_diversity(x)
    assert got_scales == scales and value == pytest.approx(np.mean(pairs), abs=1e-4)
    assert np.mean(pairs) < 0.9  # distinct images: not the trivial 1
    assert metrics.msssim_diversity(x[:1]) == (None, scales)


# ---------------------------------------------------------------------------- FID


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    l1, l2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    # Commuting covariances (diagonal, or diagonal in one rotated basis Q): ||Δμ||² + Σ (√λ1 − √λ2)².
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(l1), mu2, np.diag(l2)) == pytest.approx(expected, rel=1e-9)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    rotated = metrics.frechet_distance(mu1, q @ np.diag(l1) @ q.T, mu2, q @ np.diag(l2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)
    # A full covariance and a multiple c² of it: Tr(S + c² S − 2 c S) = (1 − c)² Tr S.
    a = rng.standard_normal((5, 5))
    full = a @ a.T + 0.1 * np.eye(5)
    assert metrics.frechet_distance(mu1, full, mu1, 4.0 * full) == pytest.approx(np.trace(full), rel=1e-9)
    assert metrics.frechet_distance(mu1, full, mu2, full) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-7)
    # A singular (rank 2) covariance, as with fewer samples than features, still gives 0 against itself.
    low = a[:, :2] @ a[:, :2].T
    assert metrics.frechet_distance(mu1, low, mu1, low) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_non_commuting_2x2_covariances():
    """For 2×2 M = S1 S2 (positive eigenvalues): Tr √M = √(Tr M + 2 √det M), since (√λ1 + √λ2)² =
    λ1 + λ2 + 2 √(λ1 λ2). A closed form that needs no matrix square root."""
    s1, s2 = np.diag([1.0, 4.0]), np.array([[2.0, 1.0], [1.0, 2.0]])
    m = s1 @ s2
    trace_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = 1.0**2 + 2.0**2 + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    got = metrics.frechet_distance(np.zeros(2), s1, np.array([1.0, -2.0]), s2)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got != pytest.approx(5.0 + np.sum((np.sqrt([1.0, 4.0]) - np.sqrt([1.0, 3.0])) ** 2), rel=1e-3)


def test_fid_of_feature_sets():
    # By hand: first coordinates with means 1 and 2, variances (ddof = 1) 2 and 3; a constant second one.
    a, b = [[0.0, 1.0], [2.0, 1.0]], [[1.0, 1.0], [1.0, 1.0], [4.0, 1.0]]
    assert metrics.fid(a, b) == pytest.approx(1 + (np.sqrt(2) - np.sqrt(3)) ** 2)
    x = np.random.default_rng(1).standard_normal((50, 8))
    assert metrics.fid(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_one_dimensional_features():
    """The same sets in 1-d (np.cov of one column is 0-d: fid must still take (n, 1) features):
    means 1 and 2, variances 2 and 3 (ddof 1)."""
    assert metrics.fid([[0.0], [2.0]], [[1.0], [1.0], [4.0]]) == pytest.approx(1 + (np.sqrt(2) - np.sqrt(3)) ** 2)


def test_fid_of_large_samples_approaches_the_closed_form():
    """20,000 points each of two 4-d Gaussians with covariances diagonal in one rotated basis:
    the closed form is ||Δμ||² + Σ (√λ1 − √λ2)² = 5.4395. Over 100 seeds this estimate has a
    standard deviation of 0.052 and no visible bias: 0.2 is ~4 standard deviations."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    l1, l2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([4.0, 1.0, 2.0, 0.25])
    mu2 = np.array([1.0, -1.0, 0.5, 0.0])
    expected = np.sum(mu2**2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert expected == pytest.approx(5.4395, abs=1e-4)
    a = (rng.standard_normal((20000, 4)) * np.sqrt(l1)) @ q.T
    b = mu2 + (rng.standard_normal((20000, 4)) * np.sqrt(l2)) @ q.T
    assert metrics.fid(a, b) == pytest.approx(expected, abs=0.2)


# ---------------------------------------------------------------------------- KID


def test_kid_known_answers():
    # 1-d by hand, k(x, y) = (x y + 1)³: Kxx off-diagonal 1, Kyy 7³ = 343, Kxy mean (1 + 1 + 27 + 64) / 4.
    assert metrics.kid(np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])) == pytest.approx(1 + 343 - 2 * 23.25)
    # Against a direct double loop over pairs, d = 3 (so k = (x·y / 3 + 1)³).
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((5, 3)) + 0.5

    def k(p, q):
        return (p @ q / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert metrics.kid(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_of_signs_by_counting():
    """Features ±1 in 1-d: k(x, y) = (x y + 1)³ is 8 for equal signs, 0 otherwise. For a set with
    a plus and b minus signs and one with c and e: 8 [(a(a−1) + b(b−1)) / (n(n−1)) + (c(c−1) +
    e(e−1)) / (m(m−1)) − 2 (ac + be) / (nm)]. With n² for n(n−1) the tiny case would give −3, not
    −4/3. As the sets grow with proportions ½ and ¾ the value nears the population MMD²,
    Σ_j C(3, j) (E xʲ − E yʲ)² = 3 (0 − ½)² + 3 (1 − 1)² + (0 − ½)² = 1 (E x = E x³ = 0 and ½,
    E x² = 1), up to O(1/n) (there is no sampling noise: 0.02 is ample at n = 1000)."""

    def signs(plus, minus):
        return np.array([[1.0]] * plus + [[-1.0]] * minus)

    def by_counting(a, b, c, e):
        n, m = a + b, c + e
        return 8 * ((a * (a - 1) + b * (b - 1)) / (n * (n - 1)) + (c * (c - 1) + e * (e - 1)) / (m * (m - 1)))

    assert metrics.kid(signs(2, 2), signs(3, 1)) == pytest.approx(8 / 3 + 4 - 8)
    for a, b, c, e in [(2, 2, 3, 1), (5, 1, 2, 7), (500, 500, 750, 250)]:
        expected = by_counting(a, b, c, e) - 16 * (a * c + b * e) / ((a + b) * (c + e))
        assert metrics.kid(signs(a, b), signs(c, e)) == pytest.approx(expected, rel=1e-9)
    assert metrics.kid(signs(500, 500), signs(750, 250)) == pytest.approx(1.0, abs=0.02)


def test_kid_is_unbiased():
    """Two independent samples of N(0, I) (2,000 × 4-d) give ≈ 0: over 40 seeds this estimate has a
    standard deviation of 0.0034, so 0.02 is ~6 of them, while a shift by 1 gives > 0.5. The same
    set twice is not 0 but exactly (2/n)(mean off-diagonal k − mean diagonal k) < 0, as the unbiased
    form drops the diagonal from Kxx and Kyy but not from Kxy (a biased MMD² would give 0)."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2000, 4)), rng.standard_normal((2000, 4))
    assert abs(metrics.kid(a, b)) < 0.02
    assert metrics.kid(a, b + 1.0) > 0.5
    small = a[:300]
    kernel = (small @ small.T / 4 + 1) ** 3
    off_diagonal = (kernel.sum() - np.trace(kernel)) / (300 * 299)
    expected = 2 / 300 * (off_diagonal - np.mean(np.diag(kernel)))
    assert expected < 0 and metrics.kid(small, small) == pytest.approx(expected, rel=1e-6)
