"""oracle.py: label statistics, the masked loss, training on synthetic images whose labels are
visible (background brightness, disc radius), NaN labels, and the run-directory cache; the
segmentation oracle on synthetic images whose classes are visible (intensity bands of an
ellipse and a square), its loss, its training stream (image and mask mirrored together) and
its cache beside the label oracle's."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import dataset
import masks
import metrics
import oracle
from cli import UserError

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


# ---------------------------------------------------------------------------- the segmentation oracle

SEG_LEVELS = np.array([-0.9, -0.3, 0.3, 0.9], np.float32)  # intensity of classes 0..3 in `tissue`


def tissue(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n (16, 16, 1) float32 images in [-1, 1] and their uint8 (n, 16, 16) masks: background 0
    around an ellipse of random centre and radii (class 1), holding a smaller concentric one
    (class 2) and a square at a random place inside it (class 3), each class at its
    intensity (SEG_LEVELS) plus Gaussian noise of std 0.1: the classes are visible."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    classes = np.zeros((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(6.5, 8.5, 2)
        ry, rx = rng.uniform(4.5, 7, 2)
        r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        classes[i][r <= 1] = 1
        classes[i][r <= 0.45] = 2
        top, left = int(round(cy + rng.uniform(-2, 0))), int(round(cx + rng.uniform(-2, 0)))
        classes[i, top : top + 2, left : left + 2] = 3
    images = SEG_LEVELS[classes] + rng.normal(0, 0.1, classes.shape)
    return np.clip(images, -1, 1)[..., None].astype(np.float32), classes


@pytest.fixture(scope="module")
def tissue_data():
    return tissue(256, seed=0), tissue(64, seed=1)


def seg_stream(images, classes, seed: int = 0) -> tf.data.Dataset:
    return oracle.segmentation_stream(images, classes, batch_size=16, seed=seed)


@pytest.fixture(scope="module")
def segmenter(tissue_data):
    (x, y), _ = tissue_data
    return oracle.train_segmenter(seg_stream(x, y), SIZE, steps=150, seed=0)


def test_the_segmenter_segments_visible_classes_far_better_than_an_untrained_one(segmenter, tissue_data):
    """On held-out synthetic images, the mean Dice (metrics.mean_dice, the three non-background
    classes) of the trained segmenter is above 0.8, each class's above 0.6, and that of the same
    network untrained under 0.5."""
    _, (x_test, y_test) = tissue_data
    overall, per_class = metrics.mean_dice(metrics.dice(y_test, segmenter.segment(x_test)))
    untrained = oracle.Segmenter(oracle.build_segmenter(SIZE), {})
    chance, _ = metrics.mean_dice(metrics.dice(y_test, untrained.segment(x_test)))
    assert overall > 0.8 and np.all(per_class > 0.6), (overall, per_class)
    assert chance < 0.5, chance


def test_segment_gives_uint8_class_indices_in_batches_and_refuses_other_shapes(segmenter, tissue_data):
    """uint8 (N, S, S), the argmax of the logits, whatever the batch size; (0, S, S) for no image;
    a ValueError naming the shape it takes for anything else."""
    _, (x_test, _) = tissue_data
    classes = segmenter.segment(x_test, batch_size=5)
    assert classes.dtype == np.uint8 and classes.shape == (len(x_test), SIZE, SIZE)
    logits = segmenter.model(x_test, training=False).numpy()
    assert logits.dtype == np.float32 and logits.shape == (len(x_test), SIZE, SIZE, 4)
    np.testing.assert_array_equal(classes, np.argmax(logits, axis=-1))
    np.testing.assert_array_equal(classes, segmenter.segment(x_test, batch_size=64))
    np.testing.assert_array_equal(segmenter.segment(x_test[:1], batch_size=1), classes[:1])
    empty = segmenter.segment(x_test[:0])
    assert empty.dtype == np.uint8 and empty.shape == (0, SIZE, SIZE)
    assert segmenter.image_size == SIZE and segmenter.classes == 4
    for bad in (x_test[:, :8, :8], x_test[..., 0], np.repeat(x_test, 3, axis=-1)):
        with pytest.raises(ValueError, match=r"takes \(N, 16, 16, 1\) images"):
            segmenter.segment(bad)


def test_segmenter_is_float32_under_a_mixed_policy_and_info_records_the_settings(tissue_data):
    (x, y), (x_test, _) = tissue_data
    keras.config.set_dtype_policy("mixed_bfloat16")
    trained = oracle.train_segmenter(seg_stream(x, y), SIZE, steps=2, seed=3)
    assert keras.config.dtype_policy().name == "mixed_bfloat16"
    assert all(layer.dtype_policy.name == "float32" for layer in trained.model.layers)
    assert trained.model(x_test[:2]).dtype == "float32"
    info = trained.info
    assert info["steps"] == 2 and info["seed"] == 3 and info["image_size"] == SIZE and info["classes"] == 4
    assert info["batch_size"] == 16 and info["seconds"] > 0 and info["created"] and np.isfinite(info["loss"])


def test_build_segmenter_refuses_sizes_it_cannot_halve_twice():
    assert oracle.build_segmenter(8).output_shape == (None, 8, 8, 4)
    assert oracle.build_segmenter(12, classes=3).output_shape == (None, 12, 12, 3)
    for size in (2, 6, 18):
        with pytest.raises(ValueError, match="multiple of 4"):
            oracle.build_segmenter(size)


def test_the_segmentation_loss_is_the_pixel_cross_entropy_plus_the_soft_dice():
    """Known answers: uniform logits give log C; a confident right answer ~0; the Dice term is
    1 − the mean over present classes of 2 Σ p·y / (Σ p + Σ y); the mask may be uint8."""
    masks_ = tf.constant([[[0, 1], [1, 1]]], tf.uint8)
    uniform = tf.zeros((1, 2, 2, 4))
    assert float(oracle.SegmentationLoss()(masks_, uniform)) == pytest.approx(np.log(4), rel=1e-6)
    confident = tf.one_hot(tf.cast(masks_, tf.int32), 4) * 30.0
    assert float(oracle.SegmentationLoss()(masks_, confident)) < 1e-6
    assert float(oracle.SegmentationLoss(dice_weight=1.0)(masks_, confident)) < 1e-6
    # uniform p = 1/4: class 0 → 2·(1/4)/(1 + 1) = 1/4, class 1 → 2·(3/4)/(1 + 3) = 3/8
    with_dice = float(oracle.SegmentationLoss(dice_weight=0.5)(masks_, uniform))
    assert with_dice == pytest.approx(np.log(4) + 0.5 * (1 - (1 / 4 + 3 / 8) / 2), rel=1e-6)


def test_the_stream_mirrors_image_and_mask_together(tissue_data):
    """Every pair the stream gives is a training pair, either as it is or mirrored left-right,
    image and mask alike; both happen; each pass visits every pair once; the same seed gives
    the same stream (in every iterator), another seed another one."""
    (x, y), _ = tissue_data
    x, y = x[:12], y[:12]
    pairs = oracle.segmentation_stream(x, y, batch_size=4, seed=7)
    assert pairs.element_spec[0].shape == (4, SIZE, SIZE, 1) and pairs.element_spec[0].dtype == tf.float32
    assert pairs.element_spec[1].shape == (4, SIZE, SIZE) and pairs.element_spec[1].dtype == tf.uint8
    batches = list(pairs.take(6))  # two passes of 12 pairs
    images = np.concatenate([b[0].numpy() for b in batches])
    classes = np.concatenate([b[1].numpy() for b in batches])
    found, mirrored = [], []
    for image, mask in zip(images, classes, strict=True):
        plain = [i for i in range(len(x)) if np.array_equal(image, x[i])]
        flipped = [i for i in range(len(x)) if np.array_equal(image, x[i, :, ::-1])]
        assert len(plain) + len(flipped) == 1  # the noise makes every image and its mirror unique
        index = (plain + flipped)[0]
        np.testing.assert_array_equal(mask, y[index] if plain else y[index, :, ::-1])
        found.append(index)
        mirrored.append(bool(flipped))
    assert sorted(found[:12]) == sorted(found[12:]) == list(range(12))
    assert 0 < sum(mirrored) < len(mirrored) and found[:12] != found[12:]
    again = np.concatenate([b[0].numpy() for b in pairs.take(6)])
    np.testing.assert_array_equal(again, images)
    other = np.concatenate([b[0].numpy() for b in oracle.segmentation_stream(x, y, 4, seed=8).take(6)])
    assert not np.array_equal(other, images)
    still = np.concatenate([b[0].numpy() for b in oracle.segmentation_stream(x, y, 4, seed=7, flip=False).take(3)])
    assert all(any(np.array_equal(image, original) for original in x) for image in still)


def test_the_stream_refuses_pairs_that_do_not_fit(tissue_data):
    (x, y), _ = tissue_data
    with pytest.raises(ValueError, match="same N and S"):
        oracle.segmentation_stream(x[:4], y[:3], batch_size=2)
    with pytest.raises(ValueError, match="same N and S"):
        oracle.segmentation_stream(x[:4, :8, :8], y[:4], batch_size=2)
    with pytest.raises(ValueError, match="no image"):
        oracle.segmentation_stream(x[:0], y[:0], batch_size=2)


def test_load_segmentation_pairs_reads_images_and_masks_at_a_size(tmp_path):
    """Images as dataset.load_image reads them and masks as masks.load_masks resizes them
    (nearest neighbour), in the order of the paths; a file that is not an image is named."""
    image_paths, mask_paths = [], []
    for i in range(3):
        classes = np.zeros((32, 32), np.uint8)
        classes[4 + i : 20, 8:28] = 1 + i
        image_paths.append(str(tmp_path / f"image_{i}.png"))
        mask_paths.append(str(tmp_path / f"mask_{i}.png"))
        Image.fromarray((classes * 80).astype(np.uint8)).save(image_paths[-1])
        masks.write_mask(classes, mask_paths[-1])
    images, classes = oracle.load_segmentation_pairs(image_paths, mask_paths, SIZE)
    assert images.dtype == np.float32 and images.shape == (3, SIZE, SIZE, 1)
    assert classes.dtype == np.uint8 and classes.shape == (3, SIZE, SIZE)
    for i in range(3):
        np.testing.assert_array_equal(images[i], dataset.load_image(image_paths[i], SIZE).numpy())
    np.testing.assert_array_equal(classes, masks.load_masks(mask_paths, SIZE))
    assert [sorted(np.unique(c).tolist()) for c in classes] == [[0, 1], [0, 2], [0, 3]]
    empty = oracle.load_segmentation_pairs([], [], SIZE)
    assert empty[0].shape == (0, SIZE, SIZE, 1) and empty[1].shape == (0, SIZE, SIZE)
    with pytest.raises(ValueError, match="3 images but 2 masks"):
        oracle.load_segmentation_pairs(image_paths, mask_paths[:2], SIZE)
    (tmp_path / "image_1.png").write_bytes(b"not a PNG")
    with pytest.raises(UserError, match="image_1.png"):
        oracle.load_segmentation_pairs(image_paths, mask_paths, SIZE)


class SegStreams:
    """make_train for load_or_train_segmenter that counts its calls."""

    def __init__(self, images, classes):
        self.images, self.classes, self.calls = images, classes, 0

    def __call__(self):
        self.calls += 1
        return seg_stream(self.images, self.classes)


def test_load_or_train_segmenter_caches_it_beside_the_label_oracle(tmp_path, tissue_data, data):
    """The first call trains and writes oracle/{segmenter.weights.h5, segmenter.json}, leaving the
    label oracle's files alone; the second loads them without calling make_train (same classes);
    other steps, seed or image size train anew, and the last settings cached load again."""
    (x, y), (x_test, _) = tissue_data
    run_dir = str(tmp_path)
    (lx, ly), _ = data
    mean, std = oracle.label_stats(ly)
    label_oracle = oracle.load_or_train_oracle(run_dir, Streams(lx, ly), COLUMNS, mean, std, SIZE, steps=2)
    make = SegStreams(x, y)
    first = oracle.load_or_train_segmenter(run_dir, make, SIZE, steps=3, seed=0)
    assert make.calls == 1
    folder = tmp_path / oracle.ORACLE_FOLDER
    assert sorted(os.listdir(folder)) == ["oracle.json", "oracle.weights.h5", "segmenter.json", "segmenter.weights.h5"]
    info = json.loads((folder / "segmenter.json").read_text())
    assert info == first.info
    assert {"image_size", "classes", "steps", "seed", "seconds", "created", "loss"} <= set(info)
    again = oracle.load_or_train_segmenter(run_dir, never, SIZE, steps=3, seed=0)
    np.testing.assert_array_equal(again.segment(x_test), first.segment(x_test))
    assert again.info == first.info
    loaded_oracle = oracle.load_or_train_oracle(run_dir, never, COLUMNS, mean, std, SIZE, steps=2)
    np.testing.assert_array_equal(loaded_oracle.predict(lx[:8]), label_oracle.predict(lx[:8]))

    oracle.load_or_train_segmenter(run_dir, make, SIZE, steps=4, seed=0)
    assert make.calls == 2
    oracle.load_or_train_segmenter(run_dir, make, SIZE, steps=4, seed=1)
    assert make.calls == 3
    small = SegStreams(x[:, ::2, ::2], y[:, ::2, ::2])
    eight = oracle.load_or_train_segmenter(run_dir, small, 8, steps=4, seed=1)
    assert small.calls == 1 and json.loads((folder / "segmenter.json").read_text())["image_size"] == 8
    loaded = oracle.load_or_train_segmenter(run_dir, never, 8, steps=4, seed=1)
    np.testing.assert_array_equal(loaded.segment(x_test[:, ::2, ::2]), eight.segment(x_test[:, ::2, ::2]))


@pytest.mark.parametrize("damage", ["truncated weights"])  # the others: the label oracle's test (shared code)
def test_a_damaged_segmenter_cache_is_trained_anew(tmp_path, tissue_data, damage):
    """(The json's damage is the label oracle's test: both read it with _read_info.)"""
    (x, y), (x_test, _) = tissue_data
    run_dir = str(tmp_path)
    make = SegStreams(x, y)
    oracle.load_or_train_segmenter(run_dir, make, SIZE, steps=2)
    weights = tmp_path / oracle.ORACLE_FOLDER / "segmenter.weights.h5"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:2000])
    else:
        weights.unlink()
    retrained = oracle.load_or_train_segmenter(run_dir, make, SIZE, steps=2)
    assert make.calls == 2
    loaded = oracle.load_or_train_segmenter(run_dir, never, SIZE, steps=2)
    np.testing.assert_array_equal(loaded.segment(x_test), retrained.segment(x_test))


def test_a_kill_while_replacing_the_segmenter_leaves_no_json_and_write_errors_are_one_line(
    tmp_path, tissue_data, monkeypatch
):
    (x, y), _ = tissue_data
    run_dir = str(tmp_path)
    oracle.load_or_train_segmenter(run_dir, SegStreams(x, y), SIZE, steps=2)

    def killed(model, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(oracle.runs, "save_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        oracle.load_or_train_segmenter(run_dir, SegStreams(x, y), SIZE, steps=3)
    assert not (tmp_path / oracle.ORACLE_FOLDER / "segmenter.json").exists()
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^cannot write the segmenter to .*file.oracle: .*$"):
        oracle.load_or_train_segmenter(str(tmp_path / "file"), SegStreams(x, y), SIZE, steps=1)
