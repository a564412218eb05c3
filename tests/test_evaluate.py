"""evaluate.py: the metric arithmetic on inputs with known answers (FID, KID, nearest-neighbour
SSIM, MS-SSIM diversity), finding the Inception weights without any download, and the
command end to end on one tiny trained run (metrics.json, one-line errors)."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import evaluate
import runs
from conftest import snapshot
from test_predict import copy_run


@pytest.fixture
def no_keras_cache(tmp_path, monkeypatch):
    """Keras' model cache is an empty folder: the InceptionV3 weights are 'not downloaded'."""
    empty = tmp_path / "keras-cache"
    empty.mkdir()
    monkeypatch.setattr(evaluate, "keras_cache_folders", lambda: [str(empty)])
    return str(empty)


def images(n, size=16, seed=0):
    """n smooth random images (n, size, size, 1) in [-1, 1] (blurred noise: SSIM between them is well below 1)."""
    x = np.random.default_rng(seed).standard_normal((n, size // 4, size // 4, 1))
    return np.tanh(tf.image.resize(x, (size, size)).numpy()).astype(np.float32)


# ---------------------------------------------------------------------------- FID and KID


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    s1, s2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    # Diagonal covariances: ||Δμ||² + Σ (√s1 − √s2)².
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert evaluate.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # A full covariance and a multiple c² of it: Tr(S + c² S − 2 c S) = (1 − c)² Tr S.
    a = rng.standard_normal((5, 5))
    full = a @ a.T + 0.1 * np.eye(5)
    assert evaluate.frechet_distance(mu1, full, mu1, 4.0 * full) == pytest.approx(np.trace(full), rel=1e-9)
    assert evaluate.frechet_distance(mu1, full, mu2, full) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-7)
    # A singular (rank 2) covariance, as with fewer samples than features, still gives 0 against itself.
    low = a[:, :2] @ a[:, :2].T
    assert evaluate.frechet_distance(mu1, low, mu1, low) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_feature_sets():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 8))
    assert evaluate.fid(x, x) == pytest.approx(0.0, abs=1e-8)
    # Large samples of N(0, I) and N(1, 4 I) in 4-d: close to 4·1² + 4·(1 − 2)² = 8.
    a = rng.standard_normal((20000, 4))
    b = 1.0 + 2.0 * rng.standard_normal((20000, 4))
    assert evaluate.fid(a, b) == pytest.approx(8.0, rel=0.03)


def test_kid_known_answers():
    # 1-d by hand, k(x, y) = (x y + 1)³: Kxx off-diagonal 1, Kyy 7³ = 343, Kxy mean (1 + 1 + 27 + 64) / 4.
    assert evaluate.kid(np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])) == pytest.approx(1 + 343 - 2 * 23.25)
    # Against a direct double loop over pairs.
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((5, 3)) + 0.5

    def k(p, q):
        return (p @ q / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert evaluate.kid(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    # Unbiased: two samples of one distribution give ≈ 0; a shifted one clearly more.
    a, b = rng.standard_normal((2000, 4)), rng.standard_normal((2000, 4))
    assert abs(evaluate.kid(a, b)) < 0.01
    assert evaluate.kid(a, b + 1.0) > 0.5
    assert abs(evaluate.kid(a, a)) < 0.01  # the same set twice: only the diagonal terms differ, O(1/n)


# ---------------------------------------------------------------------------- SSIM metrics


def test_nearest_ssim_of_a_set_against_itself_is_one():
    x = images(5)
    np.testing.assert_allclose(evaluate.nearest_ssim(x, x), 1.0, atol=1e-5)


def test_nearest_ssim_matches_a_loop_over_pairs(monkeypatch):
    queries, references = images(3, seed=1), images(7, seed=2)
    expected = [max(float(tf.image.ssim(q[None], r[None], max_val=2.0)[0]) for r in references) for q in queries]
    monkeypatch.setattr(evaluate, "PAIRWISE_BUDGET", 3 * 16 * 16 * 2)  # chunks of 2 references
    batches = [references[:4], references[4:]]  # and references arriving in batches
    got = evaluate.nearest_ssim(queries, batches)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert max(expected) < 0.9  # the test images are not near-copies of each other


def test_msssim_scales_fit_the_image():
    assert [evaluate.msssim_scales(s) for s in (11, 16, 21, 22, 64, 128, 176, 256)] == [1, 1, 1, 2, 3, 4, 5, 5]


@pytest.mark.parametrize("size", [16, 64])
def test_msssim_diversity(size):
    same = np.repeat(images(1, size), 4, axis=0)
    value, scales = evaluate.msssim_diversity(same)
    assert value == pytest.approx(1.0, abs=1e-5) and scales == evaluate.msssim_scales(size)
    x = images(4, size, seed=3)
    weights = np.array(evaluate.MSSSIM_WEIGHTS[:scales]) / sum(evaluate.MSSSIM_WEIGHTS[:scales])
    pairs = [
        float(tf.image.ssim_multiscale(x[i][None], x[j][None], 2.0, power_factors=tuple(weights))[0])
        for i in range(4)
        for j in range(i + 1, 4)
    ]
    assert evaluate.msssim_diversity(x)[0] == pytest.approx(np.mean(pairs), abs=1e-6)
    assert np.mean(pairs) < 0.9
    assert evaluate.msssim_diversity(x[:1])[0] is None


# ---------------------------------------------------------------------------- Inception weights


def test_inception_weights_are_only_looked_up_never_downloaded(tmp_path, no_keras_cache):
    path, reason = evaluate.find_inception_weights(None)
    assert path is None and "InceptionV3 ImageNet weights not found" in reason and no_keras_cache in reason
    path, reason = evaluate.find_inception_weights(str(tmp_path / "nope.h5"))
    assert path is None and reason == f"--inception-weights {tmp_path / 'nope.h5'}: no such file"
    cached = os.path.join(no_keras_cache, evaluate.INCEPTION_NOTOP)
    open(cached, "wb").close()
    assert evaluate.find_inception_weights(None) == (cached, "")


def test_unloadable_inception_weights_give_null_scores_with_the_reason(tmp_path):
    bad = tmp_path / "inception.h5"
    bad.write_text("not an HDF5 file")
    scores = evaluate.inception_scores(images(3), images(3), str(bad), batch_size=4)
    assert scores["fid"] is None and scores["kid"] is None
    assert scores["fid_note"].startswith(f"cannot read {bad}")


@pytest.mark.slow
def test_fid_and_kid_through_inception_v3(tmp_path):
    """A randomly initialised InceptionV3 saved to a file stands in for the ImageNet weights."""
    import keras

    weights = str(tmp_path / "random_inception.weights.h5")
    keras.applications.InceptionV3(
        include_top=False, weights=None, pooling="avg", input_shape=(299, 299, 3)
    ).save_weights(weights)
    scores = evaluate.inception_scores(images(4, seed=5), images(4, seed=6), weights, batch_size=4)
    assert scores["fid"] > 0 and np.isfinite(scores["kid"]) and weights in scores["fid_note"]


# ---------------------------------------------------------------------------- the command


def test_autoencoder_scores_average_over_images_not_batches(tiny_run):
    run = runs.load_run(tiny_run, encoder=True)
    _, splits = evaluate.run_splits(run.config)
    paths = splits["train"][:5]  # batches of 2, 2, 1
    ssim, psnr = evaluate.autoencoder_scores(run, paths, batch_size=2)
    x = evaluate.load_images(paths, 16, 5)
    recon = run.autoencoder.decoder(run.autoencoder.encoder(x)).numpy()
    assert ssim == pytest.approx(float(np.mean(tf.image.ssim(x, recon, 2.0))), abs=1e-5)
    assert psnr == pytest.approx(float(np.mean(tf.image.psnr(x, recon, 2.0))), abs=1e-4)


def test_evaluate_writes_metrics_json(tiny_run, no_keras_cache, capsys):
    before = snapshot(tiny_run)
    assert evaluate.main(["--run", tiny_run, "--n", "6", "--steps", "3", "--batch-size", "6"]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(tiny_run, "metrics.json")) as f:
        m = json.load(f)
    after = snapshot(tiny_run)
    assert after.pop("metrics.json") and after == before  # nothing else written into the run

    assert (m["run"], m["n"], m["sampler"], m["steps"], m["seed"], m["image_size"]) == ("tiny", 6, "ddim", 3, 0, 16)
    assert (m["n_train"], m["n_validation"], m["n_real"], m["nn_reference_images"]) == (21, 2, 2, 21)
    assert m["tensorflow"] == tf.__version__ and m["device"].startswith(("CPU", "NVIDIA", "GPU"))
    assert -1 <= m["ae_ssim"] <= 1 and 0 < m["ae_psnr"] < 100
    for key in ["sample_nn_ssim_median", "sample_nn_ssim_max", "real_nn_ssim_median"]:
        assert -1 <= m[key] <= 1, key
    assert m["sample_nn_ssim_median"] <= m["sample_nn_ssim_max"]
    assert m["msssim_scales"] == 1  # 16 px: one 11-px scale
    for key in ["sample_msssim_diversity", "real_msssim_diversity"]:
        assert 0 <= m[key] <= 1, key
    assert m["fid"] is None and m["kid"] is None
    assert "InceptionV3 ImageNet weights not found" in m["fid_note"] and no_keras_cache in m["fid_note"]
    assert "fid" in printed and "null" in printed and "InceptionV3 ImageNet weights not found" in printed
    assert f"wrote {os.path.join(tiny_run, 'metrics.json')}" in printed


@pytest.mark.parametrize("case", ["no data", "no encoder", "no runs"])
def test_errors_are_one_line_and_write_nothing(case, tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = str(tmp_path / "run")
    if case == "no runs":
        argv, message = [], "error: no runs under runs/: train one first"
    elif case == "no encoder":
        copy_run(tiny_run, run, without=["encoder.weights.h5"])
        argv, message = ["--run", run], f"error: {run} is not fully trained yet (encoder.weights.h5)"
    else:
        copy_run(tiny_run, run)
        with open(os.path.join(run, "config.json")) as f:
            config = json.load(f)
        config["data"]["data"] = "/no/such/folder"
        with open(os.path.join(run, "config.json"), "w") as f:
            json.dump(config, f)
        argv, message = ["--run", run], "error: data folder not found: /no/such/folder"
    before = snapshot(tmp_path)
    assert evaluate.main(argv + ["--n", "2", "--steps", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert snapshot(tmp_path) == before
