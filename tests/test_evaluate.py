"""evaluate.py: finding the Inception weights without any download, FID/KID through InceptionV3,
the memorisation figure, and the command end to end on one tiny trained run (metrics.json,
mirror images in the search, one-line errors). The metric arithmetic is tested in test_metrics.py."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import config as cfg
import dataset
import evaluate
import figures
import metrics
import runs
from conftest import copy_of, snapshot
from test_metrics import images, numpy_ssim
from test_predict import copy_run


@pytest.fixture
def no_keras_cache(tmp_path, monkeypatch):
    """Keras' model cache is an empty folder: the InceptionV3 weights are 'not downloaded'."""
    empty = tmp_path / "keras-cache"
    empty.mkdir()
    monkeypatch.setattr(evaluate, "keras_cache_folders", lambda: [str(empty)])
    return str(empty)


def asymmetric_pngs(folder, n, row):
    """n 32×32 PNGs of a bright bar against the left edge (width 4 + 2i, rows row … row + 15 + i)
    on a faint left-to-right ramp: no image is close to any image's mirror."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        image = np.tile(np.linspace(0, 60, 32), (32, 1))
        image[row : row + 16 + i, : 4 + 2 * i] = 220
        paths.append(os.path.join(folder, f"slice_{row}_{i}.png"))
        Image.fromarray(image.astype(np.uint8)).save(paths[-1])
    return paths


def test_with_mirrors_puts_each_mirror_after_all_the_images(tmp_path):
    """dataset.with_mirrors + nearest_ssim: the mirror of training image 2 is found as reference
    n + 2 with SSIM 1; without the mirrors its best match is far below 1."""
    paths = asymmetric_pngs(tmp_path, 5, row=4)
    train = evaluate.load_images(paths, 16, 2)
    query = train[2:3, :, ::-1]
    with_mirrors = dataset.with_mirrors(dataset.make_dataset(paths, 16, 2, shuffle=False))
    got = metrics.nearest_ssim(query, with_mirrors.as_numpy_iterator())
    assert got.index.tolist() == [5 + 2] and got.scores[0] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(got.images[0], query[0])
    assert metrics.nearest_ssim(query, train).scores[0] < 0.9


# ---------------------------------------------------------------------------- Inception weights


def test_inception_weights_are_only_looked_up_never_downloaded(tmp_path, no_keras_cache):
    path, reason = evaluate.find_inception_weights(None)
    assert path is None and "InceptionV3 ImageNet weights not found" in reason and no_keras_cache in reason
    path, reason = evaluate.find_inception_weights(str(tmp_path / "nope.h5"))
    assert path is None and reason == f"--inception-weights {tmp_path / 'nope.h5'}: no such file"
    cached = os.path.join(no_keras_cache, evaluate.INCEPTION_NOTOP)
    open(cached, "wb").close()
    assert evaluate.find_inception_weights(None) == (cached, "")


NULL_SCORES = {"fid": None, "kid": None, "fid_real": None, "kid_real": None}


def test_inception_scores_are_null_with_the_reason(tmp_path, no_keras_cache):
    """No weights, unreadable weights, and too few images: all four scores null, and fid_note says why."""
    scores = evaluate.inception_scores(images(3), images(3), images(3), None, batch_size=4)
    assert {k: scores[k] for k in NULL_SCORES} == NULL_SCORES
    assert "InceptionV3 ImageNet weights not found" in scores["fid_note"] and "pytorch-fid" in scores["fid_note"]
    bad = tmp_path / "inception.h5"
    bad.write_text("not an HDF5 file")
    scores = evaluate.inception_scores(images(3), images(3), images(3), str(bad), batch_size=4)
    assert {k: scores[k] for k in NULL_SCORES} == NULL_SCORES
    assert scores["fid_note"].startswith(f"cannot read {bad}")
    scores = evaluate.inception_scores(images(3), images(3), images(1), str(bad), batch_size=4)
    assert {k: scores[k] for k in NULL_SCORES} == NULL_SCORES
    assert scores["fid_note"] == "needs at least 2 samples, real and training images, got 3, 3 and 1"


@pytest.mark.slow
def test_fid_and_kid_through_inception_v3(tmp_path, monkeypatch):
    """A randomly initialised InceptionV3 saved to a file stands in for the ImageNet weights. fid/kid
    are samples vs real and fid_real/kid_real real vs training: metrics.fid and metrics.kid (spied
    on, not replaced) get exactly the features of those pairs, taken here with a second model loaded
    from the same file. (Each 2048-d FID costs two 2048 × 2048 eigendecompositions, so none is redone.)"""
    import keras

    weights = str(tmp_path / "random_inception.weights.h5")
    keras.applications.InceptionV3(
        include_top=False, weights=None, pooling="avg", input_shape=(299, 299, 3)
    ).save_weights(weights)
    calls = {}

    def spying_on(name):
        measure = getattr(metrics, name)

        def spy(a, b):
            value = measure(a, b)
            calls[value] = (name, a, b)
            return value

        return spy

    for name in ("fid", "kid"):
        monkeypatch.setattr(metrics, name, spying_on(name))
    samples, real, train = images(4, seed=5), images(3, seed=6), images(3, seed=7)
    scores = evaluate.inception_scores(samples, real, train, weights, batch_size=4)
    assert len(calls) == 4
    model = evaluate.inception_model(weights)
    fs, fr, ft = (metrics.inception_features(model, x, batch_size=4) for x in (samples, real, train))
    assert fs.shape == (4, 2048) and np.all(np.isfinite(fs))
    for key, pair in [("fid", (fs, fr)), ("kid", (fs, fr)), ("fid_real", (fr, ft)), ("kid_real", (fr, ft))]:
        assert np.isfinite(scores[key]), key
        name, a, b = calls[scores[key]]
        assert name == key.split("_")[0], key
        np.testing.assert_allclose(a, pair[0], rtol=1e-5, atol=1e-9, err_msg=key)
        np.testing.assert_allclose(b, pair[1], rtol=1e-5, atol=1e-9, err_msg=key)
    assert scores["fid"] >= 0 and scores["fid_real"] >= 0
    assert weights in scores["fid_note"] and "pytorch-fid" in scores["fid_note"]
    assert "4 samples vs 3 validation images" in scores["fid_note"] and "3 training images" in scores["fid_note"]


# ---------------------------------------------------------------------------- the memorisation figure


def test_memorisation_figure_shows_the_closest_samples_with_their_training_images(monkeypatch):
    """The 8 of 10 samples of highest SSIM (ties in sample order), each above its reference image,
    named after the training file (index ≥ 4 training paths: that file's mirror). The two real
    images after the samples in `nearest` score higher but are not samples: left out."""
    shown = {}
    monkeypatch.setattr(figures, "image_grid", lambda *args, **kwargs: shown.update(args=args, kwargs=kwargs))
    samples = images(10, seed=8)
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.2, 0.95, 0.3, 0.4, 0.6, 0.7, 0.99, 0.99])
    index = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3])
    references = images(12, seed=9)
    nearest = metrics.Nearest(scores, index, references)
    paths = [f"/data/s{i}.png" for i in range(4)]
    evaluate.memorisation_figure(samples, nearest, paths, "/out/memorisation.png", title="demo")
    (grid, path), labels = shown["args"], shown["kwargs"]["cell_labels"]
    order = [5, 1, 3, 9, 8, 2, 7, 6]
    np.testing.assert_array_equal(grid[0], samples[order])  # the top row
    np.testing.assert_array_equal(grid[1], references[order])  # below each, its training image
    assert labels[:8] == ["SSIM 0.950", "SSIM 0.900", "SSIM 0.900", "SSIM 0.700"] + [
        f"SSIM {s:.3f}" for s in (0.6, 0.5, 0.4, 0.3)
    ]
    assert labels[8:] == ["s1\n(mirror)", "s1", "s3", "s1", "s0", "s2", "s3\n(mirror)", "s2\n(mirror)"]
    assert path == "/out/memorisation.png" and shown["kwargs"]["title"].startswith("demo: the 8 closest")


# ---------------------------------------------------------------------------- the command


def test_autoencoder_scores_average_over_images_not_batches(tiny_run):
    """Batches of 2, 2 and 1: the mean over the 5 images of numpy_ssim and of 10 log10(2² / MSE)."""
    run = runs.load_run(tiny_run, encoder=True)
    _, splits = runs.run_splits(run.config)
    paths = splits["train"][:5]
    scores = evaluate.autoencoder_scores(run, paths, batch_size=2)
    x = evaluate.load_images(paths, 16, 5)
    recon = run.autoencoder.decoder(run.autoencoder.encoder(x)).numpy()
    assert scores["ae_ssim"] == pytest.approx(
        np.mean([numpy_ssim(a, b) for a, b in zip(x, recon, strict=True)]), abs=1e-4
    )
    mse = np.mean((x.astype(np.float64) - recon) ** 2, axis=(1, 2, 3))
    assert scores["ae_psnr"] == pytest.approx(np.mean(10 * np.log10(4.0 / mse)), abs=1e-3)
    assert scores["ae_brain_ssim"] == pytest.approx(float(np.mean(metrics.brain_ssim(x, recon))), abs=1e-5)
    assert scores["ae_brain_psnr"] == pytest.approx(float(np.mean(metrics.brain_psnr(x, recon))), abs=1e-4)


def test_evaluate_writes_metrics_json_and_the_memorisation_figure(tiny_run, no_keras_cache, tmp_path, capsys):
    """The real-image metrics have known answers (no model involved): each validation image's best
    numpy_ssim over the training images and their mirror images (the run flips), and the SSIM of
    the two validation images (one MS-SSIM scale at 16 px)."""
    tiny_run = copy_of(tiny_run, tmp_path / "tiny")  # it writes into the run: not into the shared one
    before = snapshot(tiny_run)
    assert evaluate.main(["--run", tiny_run, "--n", "6", "--steps", "3", "--batch-size", "6"]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(tiny_run, "metrics.json")) as f:
        m = json.load(f)
    after = snapshot(tiny_run)
    figure = os.path.join(tiny_run, "figures", "memorisation.png")
    assert after.pop("metrics.json") and after.pop("figures/memorisation.png")
    assert after == before  # nothing else written into the run
    with Image.open(figure) as png:
        assert png.format == "PNG" and png.width > png.height > 100
    assert m["memorisation_figure"] == figure

    assert (m["run"], m["n"], m["sampler"], m["steps"], m["seed"], m["image_size"]) == ("tiny", 6, "ddim", 3, 0, 16)
    config = runs.read_config(tiny_run)
    assert config.data.flip is True and m["nn_includes_mirrors"] is True
    assert (m["n_train"], m["n_validation"], m["n_real"], m["nn_reference_images"]) == (21, 2, 2, 42)
    assert m["tensorflow"] == tf.__version__ and m["device"].startswith(("CPU", "NVIDIA", "GPU"))

    _, splits = runs.run_splits(config)
    real = evaluate.load_images(splits["validate"], 16, 2)
    train = evaluate.load_images(splits["train"], 16, 8)
    train = np.concatenate([train, train[:, :, ::-1]])
    best = [max(numpy_ssim(r, t) for t in train) for r in real]
    assert m["real_nn_ssim_median"] == pytest.approx(np.median(best), abs=1e-4)
    assert m["real_msssim_diversity"] == pytest.approx(max(0.0, numpy_ssim(real[0], real[1])), abs=1e-4)
    assert m["msssim_scales"] == 1  # 16 px: one 11-px scale

    assert m["sample_nn_ssim_median"] <= m["sample_nn_ssim_max"] <= 1 + 1e-6
    assert 0 < m["ae_ssim"] <= 1 and 0 < m["ae_psnr"] < 100
    assert 0 < m["ae_brain_ssim"] <= 1 and 0 < m["ae_brain_psnr"] < 100
    best_in_box = metrics.pairwise_ssim(real, train, brain=True).numpy().max(axis=1)
    assert m["real_nn_brain_ssim_median"] == pytest.approx(np.median(best_in_box), abs=1e-4)
    assert -1 <= m["sample_nn_brain_ssim_median"] <= 1
    assert 0 <= m["sample_msssim_diversity"] <= 1
    assert {k: m[k] for k in NULL_SCORES} == NULL_SCORES
    assert "InceptionV3 ImageNet weights not found" in m["fid_note"] and no_keras_cache in m["fid_note"]
    assert "pytorch-fid" in m["fid_note"]
    assert "fid_real" in printed and "null" in printed and "InceptionV3 ImageNet weights not found" in printed
    assert f"wrote {os.path.join(tiny_run, 'metrics.json')}" in printed


@pytest.mark.parametrize("flip", [True, False])
def test_nearest_neighbours_include_mirror_images_when_the_run_flips(
    flip, tiny_run, tmp_path, no_keras_cache, monkeypatch
):
    """evaluate.evaluate on asymmetric images with 'samples' that are the mirror of training image 2
    and a copy of training image 4: with flip, the mirror is found (SSIM 1, reference index 5 + 2,
    "(mirror)" in the figure); without, only the copy scores 1 and the mirror far less."""
    run = runs.load_run(copy_run(tiny_run, tmp_path / "run"), encoder=True)
    run.config.data.flip = flip
    train_paths = asymmetric_pngs(tmp_path / "data", 5, row=4)
    splits = {"train": train_paths, "validate": asymmetric_pngs(tmp_path / "data", 2, row=10), "test": []}
    train = evaluate.load_images(train_paths, 16, 4)
    samples = np.stack([train[2, :, ::-1], train[4]])
    monkeypatch.setattr(runs, "generate", lambda *args, **kwargs: SimpleNamespace(images=samples))
    found, real_search, shown = [], metrics.nearest_ssim, {}
    monkeypatch.setattr(
        metrics, "nearest_ssim", lambda q, r, brain=False: found.append(real_search(q, r, brain)) or found[-1]
    )
    monkeypatch.setattr(figures, "image_grid", lambda *args, **kwargs: shown.update(names=kwargs["cell_labels"][2:]))

    m = evaluate.evaluate(run, str(tmp_path / "data"), splits, 2, cfg.SamplingOptions(steps=3, batch_size=4))
    nearest = found[0]
    assert (m["nn_includes_mirrors"], m["nn_reference_images"]) == (flip, 10 if flip else 5)
    assert m["sample_nn_ssim_max"] == pytest.approx(1.0, abs=1e-6)
    if flip:
        assert nearest.index[:2].tolist() == [5 + 2, 4]
        np.testing.assert_allclose(nearest.scores[:2], 1.0, atol=1e-6)
        assert shown["names"] == ["slice_4_2\n(mirror)", "slice_4_4"]
    else:
        assert nearest.index[1] == 4 and nearest.scores[1] == pytest.approx(1.0, abs=1e-6)
        assert nearest.scores[0] < 0.9 and m["sample_nn_ssim_median"] < 0.95
        assert shown["names"][0] == "slice_4_4"


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
