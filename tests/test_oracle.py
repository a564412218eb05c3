"""oracle.py: label statistics, the masked loss, training on synthetic images whose labels are
visible (background brightness, disc radius), NaN labels, and the run-directory cache."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import oracle

SIZE = 16
COLUMNS = ("age", "radius")


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n (16, 16, 1) float32 images in [-1, 1] and their (n, 2) float32 labels: "age" in [50, 90]
    sets the background brightness (-0.9 at 50 to -0.1 at 90), "radius" in [2, 6] px that of a
    centred bright disc (0.8); Gaussian noise of std 0.05 on top."""
    rng = np.random.default_rng(seed)
    age, radius = rng.uniform(50, 90, n), rng.uniform(2, 6, n)
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    distance = np.sqrt(yy**2 + xx**2)
    background = -0.9 + 0.8 * (age - 50) / 40
    images = np.where(distance[None] <= radius[:, None, None], 0.8, background[:, None, None])
    images = images + rng.normal(0, 0.05, images.shape)
    images = np.clip(images, -1, 1)[..., None].astype(np.float32)
    return images, np.stack([age, radius], axis=1).astype(np.float32)


def stream(images, labels, batch: int = 32) -> tf.data.Dataset:
    """The endless training stream train_oracle takes."""
    return tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(batch)


@pytest.fixture(scope="module")
def data():
    return synthetic(512, seed=0), synthetic(128, seed=1)


# ---------------------------------------------------------------------------- label_stats and the loss


def test_label_stats_ignores_nan_and_gives_std_one_for_constant_and_empty_columns():
    labels = np.array([[1.0, 5.0, np.nan], [3.0, 5.0, np.nan], [np.nan, 5.0, np.nan], [5.0, 5.0, np.nan]])
    mean, std = oracle.label_stats(labels)
    assert mean.dtype == std.dtype == np.float64 and mean.shape == std.shape == (3,)
    np.testing.assert_allclose(mean, [3.0, 5.0, 0.0])
    np.testing.assert_allclose(std, [np.std([1.0, 3.0, 5.0]), 1.0, 1.0])


def test_masked_mse_ignores_unknown_targets_without_nan_gradients():
    """Per column, the mean squared error over the known rows of (y - mean) / std; a column unknown
    in every row adds 0; the gradient is finite (and 0 where the target is unknown)."""
    loss = oracle.MaskedMSE(mean=[10.0, 0.0, 0.0], std=[2.0, 1.0, 1.0])
    y_true = tf.constant([[12.0, np.nan, np.nan], [np.nan, 1.0, np.nan], [10.0, 3.0, np.nan]])
    y_pred = tf.Variable(tf.zeros((3, 3)))
    with tf.GradientTape() as tape:
        value = loss(y_true, y_pred)
    gradient = tape.gradient(value, y_pred).numpy()
    # column 0: targets 1, 0 → MSE 0.5; column 1: targets 1, 3 → MSE 5; column 2: nothing
    assert float(value) == pytest.approx((0.5 + 5.0 + 0.0) / 3)
    assert np.all(np.isfinite(gradient))
    assert gradient[1, 0] == gradient[0, 1] == 0 and np.all(gradient[:, 2] == 0)


# ---------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(data):
    (x, y), _ = data
    mean, std = oracle.label_stats(y)
    return oracle.train_oracle(stream(x, y), COLUMNS, mean, std, SIZE, steps=200, seed=0)


def test_oracle_reads_visible_labels_far_better_than_the_mean(trained, data):
    """On held-out synthetic images, the MAE of each label is under 0.3× that of predicting the
    training mean."""
    (_, y), (x_test, y_test) = data
    predicted = trained.predict(x_test)
    mae = np.abs(predicted - y_test).mean(axis=0)
    chance = np.abs(y.mean(axis=0) - y_test).mean(axis=0)
    assert np.all(mae < 0.3 * chance), (mae, chance)


def test_predict_is_in_the_labels_units(trained, data):
    """De-normalised: predictions × std + mean of the network's normalised output, in [50, 90] and
    [2, 6] give or take, float64 (N, K); batch size does not change them."""
    _, (x_test, _) = data
    predicted = trained.predict(x_test, batch_size=7)
    assert predicted.dtype == np.float64 and predicted.shape == (len(x_test), 2)
    normalised = trained.model(x_test, training=False).numpy()
    np.testing.assert_allclose(predicted, normalised * trained.std + trained.mean, rtol=1e-5)
    np.testing.assert_allclose(predicted, trained.predict(x_test, batch_size=128), rtol=1e-5)
    assert 45 < predicted[:, 0].min() and predicted[:, 0].max() < 95
    assert 1 < predicted[:, 1].min() and predicted[:, 1].max() < 7
    assert trained.predict(x_test[:0]).shape == (0, 2)
    with pytest.raises(ValueError, match="takes"):
        trained.predict(x_test[:, :8, :8])


def test_training_info_and_float32_under_a_mixed_policy(data):
    """The network is float32 even when the global policy is mixed_bfloat16 (which is restored),
    and info records the settings."""
    (x, y), _ = data
    mean, std = oracle.label_stats(y)
    keras.config.set_dtype_policy("mixed_bfloat16")
    trained = oracle.train_oracle(stream(x, y), COLUMNS, mean, std, SIZE, steps=2, seed=3)
    assert keras.config.dtype_policy().name == "mixed_bfloat16"
    assert all(layer.dtype_policy.name == "float32" for layer in trained.model.layers)
    info = trained.info
    assert info["columns"] == list(COLUMNS) and info["steps"] == 2 and info["seed"] == 3
    assert info["image_size"] == SIZE and info["mean"] == mean.tolist() and info["std"] == std.tolist()
    assert info["seconds"] > 0 and info["created"] and np.isfinite(info["loss"])


def test_nan_labels_train_to_finite_predictions(data):
    """ "radius" unknown in half the rows still trains; a third column unknown everywhere stays at
    its mean (the last layer starts at zero and gets no gradient for it)."""
    (x, y), (x_test, _) = data
    y = np.concatenate([y, np.full((len(y), 1), np.nan, np.float32)], axis=1)
    y[::2, 1] = np.nan
    mean, std = oracle.label_stats(y)
    mean[2] = 7.0  # as if the statistics came from elsewhere
    trained = oracle.train_oracle(stream(x, y), (*COLUMNS, "cdr"), mean, std, SIZE, steps=30, seed=0)
    predicted = trained.predict(x_test)
    assert np.isfinite(trained.info["loss"])
    assert np.all(np.isfinite(predicted))
    np.testing.assert_allclose(predicted[:, 2], 7.0, atol=1e-6)
    assert all(np.all(np.isfinite(w)) for w in trained.model.get_weights())


def test_bad_statistics_are_refused(data):
    (x, y), _ = data
    with pytest.raises(ValueError, match="std"):
        oracle.train_oracle(stream(x, y), COLUMNS, [0.0, 0.0], [1.0, 0.0], SIZE, steps=1)
    with pytest.raises(ValueError, match="columns"):
        oracle.train_oracle(stream(x, y), COLUMNS, [0.0], [1.0], SIZE, steps=1)
    with pytest.raises(ValueError, match="label columns"):
        oracle.train_oracle(stream(x, y), ("age", "radius", "cdr"), [0.0] * 3, [1.0] * 3, SIZE, steps=1)


# ---------------------------------------------------------------------------- the cache


class Streams:
    """make_train for load_or_train_oracle that counts its calls."""

    def __init__(self, images, labels):
        self.images, self.labels, self.calls = images, labels, 0

    def __call__(self):
        self.calls += 1
        return stream(self.images, self.labels)


def never():
    raise AssertionError("make_train was called: the cache was not used")


def test_load_or_train_caches_the_oracle_in_the_run_directory(tmp_path, data):
    """The first call trains and writes oracle/{oracle.weights.h5, oracle.json} (nothing else
    left behind); the second loads them without calling make_train, with the same predictions."""
    (x, y), (x_test, _) = data
    run_dir = str(tmp_path)
    mean, std = oracle.label_stats(y)
    make = Streams(x, y)
    first = oracle.load_or_train_oracle(run_dir, make, COLUMNS, mean, std, SIZE, steps=3, seed=0)
    assert make.calls == 1
    folder = tmp_path / oracle.ORACLE_FOLDER
    assert sorted(os.listdir(folder)) == ["oracle.json", "oracle.weights.h5"]
    info = json.loads((folder / "oracle.json").read_text())
    assert info == first.info
    assert {"columns", "mean", "std", "image_size", "steps", "seed", "seconds", "created"} <= set(info)

    again = oracle.load_or_train_oracle(run_dir, never, COLUMNS, mean, std, SIZE, steps=3, seed=0)
    np.testing.assert_array_equal(again.predict(x_test), first.predict(x_test))
    assert again.columns == COLUMNS and again.info == first.info
    np.testing.assert_array_equal(again.mean, mean)
    np.testing.assert_array_equal(again.std, std)


def test_load_or_train_retrains_when_settings_change(tmp_path, data):
    """Other steps, seed, label means or columns train anew (and replace the cache)."""
    (x, y), (x_test, _) = data
    run_dir = str(tmp_path)
    mean, std = oracle.label_stats(y)
    make = Streams(x, y)
    oracle.load_or_train_oracle(run_dir, make, COLUMNS, mean, std, SIZE, steps=3, seed=0)
    oracle.load_or_train_oracle(run_dir, make, COLUMNS, mean, std, SIZE, steps=4, seed=0)
    assert make.calls == 2
    oracle.load_or_train_oracle(run_dir, make, COLUMNS, mean, std, SIZE, steps=4, seed=1)
    assert make.calls == 3
    oracle.load_or_train_oracle(run_dir, make, COLUMNS, mean + 1, std, SIZE, steps=4, seed=1)
    assert make.calls == 4
    one = Streams(x, y[:, :1])
    single = oracle.load_or_train_oracle(run_dir, one, ("age",), mean[:1], std[:1], SIZE, steps=4, seed=1)
    assert one.calls == 1 and single.predict(x_test).shape == (len(x_test), 1)
    folder = tmp_path / oracle.ORACLE_FOLDER
    assert json.loads((folder / "oracle.json").read_text())["columns"] == ["age"]
    loaded = oracle.load_or_train_oracle(run_dir, never, ("age",), mean[:1], std[:1], SIZE, steps=4, seed=1)
    np.testing.assert_array_equal(loaded.predict(x_test), single.predict(x_test))


@pytest.mark.parametrize("damage", ["garbage weights", "truncated weights", "no weights", "garbage json"])
def test_a_damaged_cache_is_trained_anew(tmp_path, data, damage):
    (x, y), (x_test, _) = data
    run_dir = str(tmp_path)
    mean, std = oracle.label_stats(y)
    make = Streams(x, y)
    oracle.load_or_train_oracle(run_dir, make, COLUMNS, mean, std, SIZE, steps=2)
    weights = tmp_path / oracle.ORACLE_FOLDER / "oracle.weights.h5"
    if damage == "garbage weights":
        weights.write_bytes(b"not an HDF5 file" * 100)
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:2000])
    elif damage == "no weights":
        weights.unlink()
    else:
        (tmp_path / oracle.ORACLE_FOLDER / "oracle.json").write_text('{"columns": ["age", "rad')
    retrained = oracle.load_or_train_oracle(run_dir, make, COLUMNS, mean, std, SIZE, steps=2)
    assert make.calls == 2
    assert np.all(np.isfinite(retrained.predict(x_test)))
    loaded = oracle.load_or_train_oracle(run_dir, never, COLUMNS, mean, std, SIZE, steps=2)
    np.testing.assert_array_equal(loaded.predict(x_test), retrained.predict(x_test))


def test_a_kill_while_replacing_the_cache_leaves_no_json_beside_other_weights(tmp_path, data, monkeypatch):
    """oracle.json goes before the weights are replaced: interrupted there, the next call trains."""
    (x, y), _ = data
    run_dir = str(tmp_path)
    mean, std = oracle.label_stats(y)
    oracle.load_or_train_oracle(run_dir, Streams(x, y), COLUMNS, mean, std, SIZE, steps=2)

    def killed(model, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(oracle.runs, "save_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        oracle.load_or_train_oracle(run_dir, Streams(x, y), COLUMNS, mean, std, SIZE, steps=3)
    assert not (tmp_path / oracle.ORACLE_FOLDER / "oracle.json").exists()


def test_the_seed_makes_training_reproducible(data):
    (x, y), (x_test, _) = data
    mean, std = oracle.label_stats(y)
    a, b, c = (oracle.train_oracle(stream(x, y), COLUMNS, mean, std, SIZE, steps=5, seed=s) for s in (4, 4, 5))
    np.testing.assert_allclose(a.predict(x_test), b.predict(x_test), rtol=1e-5)
    assert not np.allclose(a.predict(x_test), c.predict(x_test), rtol=1e-3)
