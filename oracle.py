"""The oracles: small networks trained on real training slices that judge generated ones.

The label oracle, a small CNN, reads a slice's label variables off the image. evaluate.py
uses it to check conditional samples: a sample asked for age 80 should look, to a regressor
trained on real slices, like an 80-year-old's slice. The segmentation oracle, a small UNet,
segments a slice into the tissue classes of `masks.CLASS_NAMES`; evaluate.py segments
images generated for a requested mask and compares the two by Dice (`metrics.dice`). This
module owns both networks, their training (masked regression on the training split's
labels; pixel-wise classification of the training split's (image, mask) pairs) and their
cache in a run directory:

    RUN/oracle/oracle.weights.h5     the label oracle's weights
    RUN/oracle/oracle.json           {"columns", "mean", "std", "image_size", "steps", "seed",
                                      "seconds" (training time), "created", "loss"}
    RUN/oracle/segmenter.weights.h5  the segmentation oracle's weights
    RUN/oracle/segmenter.json        {"image_size", "classes", "steps", "seed", "dice_weight",
                                      "batch_size", "seconds", "created", "loss"}

``load_or_train_oracle`` loads the cache when oracle.json matches what is asked for (same
columns, label statistics, image size, steps and seed) and trains (and writes) it otherwise;
``load_or_train_segmenter`` does the same with segmenter.json (same image size, classes,
steps, seed and Dice weight). The segmenter's training (`train_segmenter`,
`segmentation_stream`, `load_segmentation_pairs`) takes any arrays of pairs, not only a
run's, so that segmenters trained on real, synthetic or mixed pairs can be compared.

What the oracle can and cannot tell
-----------------------------------
It measures whether a sample carries the visual cues that distinguish the variable in the
real training slices. Its error on real held-out slices (|oracle(real) − true label|) is the
floor to compare the sample error (|oracle(sample) − requested label|) with: a conditional
model that does what it is asked gets near that floor, one that ignores the condition gets
the error of predicting the label's mean. It cannot tell whether a sample is anatomically
right (a regressor can be fooled by images no radiologist would accept), and for variables
the images barely show (age, CDR on a single slice) its real-slice error is large, so the
sample error is only meaningful relative to it. It is trained on the same training split as
the diffusion model, so it rewards the cues of those subjects; a memorised training slice
scores as well as a real one.

Network (float32 whatever the global dtype policy; 143k weights for K = 3):
conv3×3 16 → four stride-2 conv3×3 (32, 64, 64, 128), each GroupNormalization (8 groups) +
SiLU → global average pooling → Dense(64, SiLU) → Dense(K), the last zero-initialised so
that training starts from the label means (and a column with no known value stays there).
Inputs (B, H, W, 1) float32 in [-1, 1]; outputs (B, K) float32 normalised labels
(y − mean) / std. Loss: per column, the MSE over the rows whose label is known (NaN =
unknown), averaged over the K columns (a column unknown in the whole batch adds 0). Adam,
learning rate 1e-3 cosine-decayed to 0 over the steps.

Training runs once per run (the cache); its cost is in BENCHMARKS.md. Prediction is far
cheaper than sampling.

What the segmentation oracle can and cannot tell
------------------------------------------------
Dice(requested mask, segment(sample)) measures whether a sample shows each tissue where the
mask asks for it, as a segmenter trained on real slices sees it. Its Dice on real held-out
slices against their own masks, Dice(true mask, segment(real)), is the ceiling: the oracle's
own error, which a generated image cannot beat except by being easier to segment than a real
one (e.g. flat, cartoon-like tissue), so a sample Dice near the ceiling is as good as the
oracle can judge, and the gap to it is what the mask conditioning loses. It cannot tell
whether the image is a plausible MRI (bands of the right grey levels in the right places
score well), nor judge a class the masks barely hold: a class absent from both masks of an
image gives NaN there (left out of `metrics.mean_dice`), and one with a few pixels gives a
noisy 0 or 1 (the demo set's masks hold almost no CSF: 0.03% of the training pixels, one
pixel of the validate split at 64 px, so its CSF Dice means nothing; read the per-class
Dice). Like the label oracle it is trained on the diffusion model's own training split.

Segmentation network (float32 whatever the global dtype policy; 119k weights for 4 classes):
a UNet of three levels of widths (16, 32, 64), each two conv3×3 + GroupNormalization
(8 groups) + SiLU, the first of each lower level with stride 2; back up by nearest
upsampling ×2, concatenation with the level's skip and two such convs at its width; a
conv1×1 to the class logits. Inputs (B, S, S, 1) float32 in [-1, 1], S a multiple of 4;
outputs (B, S, S, classes) float32 logits. Loss (`SegmentationLoss`): pixel cross-entropy
+ 1 × (1 − soft Dice over the batch, averaged over the classes present), the Dice term for
the small classes, which the cross-entropy alone learns late or never. Adam, learning rate
1e-3 cosine-decayed to 0 over the steps; batches mirrored left-right, image and mask together.

Measured on the demo set at 64 px (train split 94 slices, batch 16; Dice on the validate
split's 16 slices; 2 CPU cores of an AMD EPYC with avx512_bf16, float32):
    steps  loss         seconds  grey matter  white matter  (CSF: see above)
    300    CE + Dice    21.6     0.940        0.906
    600    CE + Dice    42.5     0.944        0.914
    300    CE alone     22.4     0.933        0.894
    600    CE alone     42.3     0.944        0.915
(about 70 ms a step, XLA no faster; seed 1 instead of 0: within 0.003.) 600 steps (the default,
as the label oracle's) gain under 0.01 on these slices over 300; the training split of a
real data set is a hundred times larger and more varied. The Dice term helps the small
classes: on the training slices it learns the demo's CSF (Dice 0.56 after 600 steps, 0
without), and in tests/test_oracle.py's synthetic images a 2×2 px class reaches 0.97-1.0
after 100 steps (0.50-0.73 without; two seeds).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

import config as cfg
import dataset
import hardware
import keras_fixes
import masks
import runs
from cli import UserError

ORACLE_FOLDER = "oracle"  # inside a run directory
WEIGHTS_FILE = "oracle.weights.h5"
INFO_FILE = "oracle.json"
LEARNING_RATE = 1e-3
WIDTHS = (16, 32, 64, 64, 128)  # the first conv keeps the size, each next one halves it
GROUPS = 8
HIDDEN = 64

SEGMENTER_WEIGHTS_FILE = "segmenter.weights.h5"
SEGMENTER_INFO_FILE = "segmenter.json"
SEGMENTER_WIDTHS = (16, 32, 64)  # per level; each next level halves the size
SEGMENTER_STEPS = 600  # the measurement behind it: the module docstring
SEGMENTER_DICE_WEIGHT = 1.0  # the soft Dice term of SegmentationLoss


# ---------------------------------------------------------------------------- labels


def label_stats(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), each (K,) float64, of the columns of an (N, K) array, NaN = unknown.

    NaN is ignored; a column with no known value gets mean 0 and std 1, a constant column
    std 1 (so that (y − mean) / std is always defined). std is the population std (ddof 0).
    """
    labels = np.asarray(labels, np.float64)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (N, K), got shape {labels.shape}")
    known = np.isfinite(labels)
    count = known.sum(axis=0)
    values = np.where(known, labels, 0.0)
    mean = values.sum(axis=0) / np.maximum(count, 1)
    var = np.where(known, (values - mean) ** 2, 0.0).sum(axis=0) / np.maximum(count, 1)
    std = np.sqrt(var)
    std = np.where((count > 0) & (std > 0) & np.isfinite(std), std, 1.0)
    return mean, std


def _check_stats(columns: Sequence[str], mean, std) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """columns as a tuple of str and mean, std as (K,) float64; ValueError when they do not fit."""
    columns = tuple(str(c) for c in columns)
    mean, std = np.asarray(mean, np.float64).reshape(-1), np.asarray(std, np.float64).reshape(-1)
    if not columns or mean.shape != (len(columns),) or std.shape != (len(columns),):
        raise ValueError(f"{len(columns)} columns need (K,) mean and std, got {mean.shape} and {std.shape}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        raise ValueError("mean must be finite and std finite and > 0 (use label_stats)")
    return columns, mean, std


class MaskedMSE(keras.losses.Loss):
    """Masked MSE on normalised targets: y_true (B, K) in the labels' units with NaN = unknown,
    y_pred (B, K) normalised. With m = [y known] and z = (y − mean) / std,

        loss = 1/K Σ_k  Σ_b m_bk (ŷ_bk − z_bk)² / max(1, Σ_b m_bk)

    Unknown targets are replaced by 0 before any arithmetic, so they give no NaN gradient."""

    def __init__(self, mean, std, name: str = "masked_mse"):
        super().__init__(name=name, reduction="sum_over_batch_size")
        self.label_mean = np.asarray(mean, np.float32)
        self.label_std = np.asarray(std, np.float32)

    def call(self, y_true, y_pred):
        y_true, y_pred = tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)
        known = tf.math.is_finite(y_true)
        target = (tf.where(known, y_true, 0.0) - self.label_mean) / self.label_std
        squared = tf.where(known, tf.square(y_pred - target), 0.0)
        count = tf.reduce_sum(tf.cast(known, tf.float32), axis=0)
        return tf.reduce_mean(tf.reduce_sum(squared, axis=0) / tf.maximum(count, 1.0))


# ---------------------------------------------------------------------------- the network


def build_network(image_size: int, k: int) -> keras.Model:
    """The oracle CNN, (B, image_size, image_size, 1) float32 in [-1, 1] → (B, k) float32 normalised
    labels, built in float32 whatever the global dtype policy."""
    with hardware.dtype_policy("float32"):
        images = keras.Input((image_size, image_size, 1), name="images")
        x = images
        for i, width in enumerate(WIDTHS):
            x = keras.layers.Conv2D(width, 3, strides=1 if i == 0 else 2, padding="same", name=f"conv{i}")(x)
            x = keras.layers.GroupNormalization(min(GROUPS, width), name=f"norm{i}")(x)
            x = keras.layers.Activation("silu", name=f"act{i}")(x)
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        x = keras.layers.Dense(HIDDEN, activation="silu", name="hidden")(x)
        labels = keras.layers.Dense(k, kernel_initializer="zeros", dtype="float32", name="labels")(x)
        return keras.Model(images, labels, name="oracle")


# ---------------------------------------------------------------------------- the oracle


@dataclasses.dataclass
class Oracle:
    """A trained oracle: `model` maps (B, H, W, 1) float32 images in [-1, 1] to (B, K) float32
    normalised predictions; label = prediction × std + mean."""

    model: keras.Model
    columns: tuple[str, ...]
    mean: np.ndarray  # (K,) float64 training-label means (NaN ignored)
    std: np.ndarray  # (K,) float64 training-label stds (NaN ignored; 1.0 where 0 or undefined)
    info: dict  # what oracle.json holds

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, K) float64 predictions in the labels' own units (de-normalised) of (N, H, W, 1)
        images in [-1, 1], H = W = the oracle's image size."""
        images = np.asarray(images, np.float32)
        expected = tuple(self.model.input_shape[1:])
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"the oracle takes (N, {', '.join(map(str, expected))}) images, got {images.shape}")
        if not len(images):
            return np.zeros((0, len(self.columns)))
        normalised = self.model.predict(images, batch_size=batch_size, verbose=0)
        return np.asarray(normalised, np.float64) * self.std + self.mean


def fit_steps(
    model: keras.Model, loss: keras.losses.Loss, train: tf.data.Dataset, steps: int, verbose=0, jit_compile=False
):
    """Fit `model` for `steps` batches of the endless dataset `train` with `loss`, Adam at
    `LEARNING_RATE` cosine-decayed to 0 over the steps (the oracles', the mask decoder's and
    the SPADE decoder's recipe), compiled by XLA when `jit_compile`; returns (seconds, the
    loss's mean over the steps)."""
    model.compile(
        optimizer=keras_fixes.FusedAdam(keras.optimizers.schedules.CosineDecay(LEARNING_RATE, steps)),
        loss=loss,
        jit_compile=jit_compile,
    )
    model.optimizer.build(model.trainable_variables)  # now, not in the first trace: see keras_fixes.FitFixes
    start = time.perf_counter()
    history = model.fit(train, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=verbose)
    return time.perf_counter() - start, float(history.history["loss"][-1])


def train_oracle(
    train: tf.data.Dataset,
    columns: Sequence[str],
    mean,
    std,
    image_size: int,
    steps: int = 600,
    seed: int = 0,
) -> Oracle:
    """Fit a new oracle for `steps` batches of `train`, an endless dataset of (images (B, H, W, 1)
    float32 in [-1, 1], labels (B, K) float32 in the labels' units, NaN = unknown), with the
    loss MaskedMSE(mean, std). keras.utils.set_random_seed(seed) makes the initial weights
    reproducible (the order of the batches is the dataset's)."""
    columns, mean, std = _check_stats(columns, mean, std)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    label_shape = train.element_spec[1].shape
    if label_shape.rank is not None and label_shape[-1] not in (None, len(columns)):
        raise ValueError(f"the dataset has {label_shape[-1]} label columns, expected {len(columns)}")
    keras.utils.set_random_seed(seed)
    model = build_network(image_size, len(columns))
    seconds, loss = fit_steps(model, MaskedMSE(mean, std), train, steps)
    info = {
        "columns": list(columns),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "image_size": int(image_size),
        "steps": int(steps),
        "seed": int(seed),
        "seconds": round(seconds, 2),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loss": loss if np.isfinite(loss) else None,  # mean masked MSE over the steps (normalised units)
    }
    return Oracle(model, columns, mean, std, info)


# ---------------------------------------------------------------------------- the cache


def _matches(info: dict, columns, mean, std, image_size: int, steps: int, seed: int) -> bool:
    """Whether oracle.json's `info` describes an oracle trained with these settings."""
    try:
        return (
            tuple(info["columns"]) == columns
            and np.allclose(np.asarray(info["mean"], np.float64), mean, rtol=1e-9, atol=0)
            and np.allclose(np.asarray(info["std"], np.float64), std, rtol=1e-9, atol=0)
            and info["image_size"] == image_size
            and info["steps"] == steps
            and info["seed"] == seed
        )
    except (KeyError, TypeError, ValueError):
        return False


def _load_cached(folder: str, columns, mean, std, image_size: int, steps: int, seed: int) -> Oracle | None:
    """The oracle cached in `folder` when its oracle.json matches and its weights load, else None."""
    info_path, weights_path = os.path.join(folder, INFO_FILE), os.path.join(folder, WEIGHTS_FILE)
    info = _read_info(info_path)
    if info is None or not _matches(info, columns, mean, std, image_size, steps, seed):
        return None
    if not os.path.isfile(weights_path):
        return None
    model = build_network(image_size, len(columns))
    try:
        runs.load_weights(model, weights_path, built_from=info_path)
    except UserError:
        return None
    return Oracle(model, columns, mean, std, info)


def load_or_train_oracle(
    run_dir: str,
    make_train: Callable[[], tf.data.Dataset],
    columns: Sequence[str],
    mean,
    std,
    image_size: int,
    steps: int = 600,
    seed: int = 0,
) -> Oracle:
    """The oracle cached in run_dir/oracle/ when it was trained with these settings (make_train is
    then not called); otherwise train_oracle(make_train(), ...) and cache it. A missing, damaged or
    unreadable cache is trained anew. oracle.json is removed before the weights are replaced and
    written after them (both atomically), so a kill never leaves a json beside other weights."""
    columns, mean, std = _check_stats(columns, mean, std)
    folder = os.path.join(run_dir, ORACLE_FOLDER)
    cached = _load_cached(folder, columns, mean, std, image_size, steps, seed)
    if cached is not None:
        return cached
    oracle = train_oracle(make_train(), columns, mean, std, image_size, steps=steps, seed=seed)
    _write_cache(folder, oracle.model, WEIGHTS_FILE, INFO_FILE, oracle.info, "the oracle")
    return oracle


def _read_info(path: str) -> dict | None:
    """A cache's json as a dict; None when it is missing, unreadable or not a JSON object."""
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _write_cache(folder: str, model: keras.Model, weights_file: str, info_file: str, info: dict, what: str) -> None:
    """Write `model`'s weights and `info` into `folder` as a cache: the json is removed before
    the weights are replaced and written after them (both atomically), so a kill never leaves
    a json beside other weights. An OSError becomes a one-line UserError naming `what`."""
    try:
        os.makedirs(folder, exist_ok=True)
        info_path = os.path.join(folder, info_file)
        if os.path.lexists(info_path):
            os.remove(info_path)
        runs.save_weights(model, os.path.join(folder, weights_file))
        cfg.write_json_atomic(info, info_path)
    except OSError as e:
        raise UserError(f"cannot write {what} to {folder}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------- the segmentation oracle


def build_segmenter(image_size: int, classes: int = len(masks.CLASS_NAMES)) -> keras.Model:
    """The segmentation UNet, (B, S, S, 1) float32 in [-1, 1] → (B, S, S, classes) float32 logits,
    S = image_size (a multiple of 4), built in float32 whatever the global dtype policy."""
    scale = 2 ** (len(SEGMENTER_WIDTHS) - 1)
    if image_size < scale or image_size % scale:
        raise ValueError(f"the segmenter takes images whose size is a multiple of {scale}, got {image_size}")
    if classes < 2:
        raise ValueError(f"the segmenter needs at least 2 classes, got {classes}")

    def block(x, width: int, strides: int, name: str):
        x = keras.layers.Conv2D(width, 3, strides=strides, padding="same", name=f"{name}_conv")(x)
        x = keras.layers.GroupNormalization(min(GROUPS, width), name=f"{name}_norm")(x)
        return keras.layers.Activation("silu", name=f"{name}_act")(x)

    with hardware.dtype_policy("float32"):
        images = keras.Input((image_size, image_size, 1), name="images")
        x, skips = images, []
        for i, width in enumerate(SEGMENTER_WIDTHS):  # level i: size S / 2^i (its first conv halves it)
            x = block(x, width, 1 if i == 0 else 2, f"down{i}a")
            x = block(x, width, 1, f"down{i}b")
            skips.append(x)
        for i in reversed(range(len(SEGMENTER_WIDTHS) - 1)):
            x = keras.layers.UpSampling2D(2, name=f"up{i}_resize")(x)
            x = keras.layers.Concatenate(name=f"up{i}_skip")([x, skips[i]])
            x = block(x, SEGMENTER_WIDTHS[i], 1, f"up{i}a")
            x = block(x, SEGMENTER_WIDTHS[i], 1, f"up{i}b")
        logits = keras.layers.Conv2D(classes, 1, dtype="float32", name="logits")(x)
        return keras.Model(images, logits, name="segmenter")


class SegmentationLoss(keras.losses.Loss):
    """Pixel-wise cross-entropy of (B, S, S, C) logits against (B, S, S) class indices (any
    integer dtype, or float holding integers), averaged over the pixels; with dice_weight > 0,
    plus dice_weight × (1 − the soft Dice of the softmax, per class over the batch, averaged
    over the classes present in the batch's masks)."""

    def __init__(self, dice_weight: float = 0.0, name: str = "segmentation_loss"):
        super().__init__(name=name, reduction="sum_over_batch_size")
        self.dice_weight = float(dice_weight)

    def call(self, y_true, y_pred):
        y_pred = tf.cast(y_pred, tf.float32)
        y_true = tf.cast(tf.reshape(y_true, tf.shape(y_pred)[:-1]), tf.int32)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y_true, logits=y_pred))
        if self.dice_weight:
            probs = tf.nn.softmax(y_pred)
            onehot = tf.one_hot(y_true, tf.shape(y_pred)[-1])
            axes = tf.range(tf.rank(y_pred) - 1)
            overlap = tf.reduce_sum(probs * onehot, axis=axes)
            total = tf.reduce_sum(probs, axis=axes) + tf.reduce_sum(onehot, axis=axes)
            present = tf.cast(tf.reduce_sum(onehot, axis=axes) > 0, tf.float32)
            soft = 2.0 * overlap / tf.maximum(total, 1e-6)
            soft_dice = tf.reduce_sum(soft * present) / tf.maximum(tf.reduce_sum(present), 1.0)
            loss = loss + self.dice_weight * (1.0 - soft_dice)
        return loss


@dataclasses.dataclass
class Segmenter:
    """A trained segmenter: `model` maps (B, S, S, 1) float32 images in [-1, 1] to
    (B, S, S, classes) float32 logits; `segment` gives the class indices."""

    model: keras.Model
    info: dict  # what segmenter.json holds

    @property
    def image_size(self) -> int:
        return int(self.model.input_shape[1])

    @property
    def classes(self) -> int:
        return int(self.model.output_shape[-1])

    def segment(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 class indices (N, S, S) (the argmax of the logits) of (N, S, S, 1) images in
        [-1, 1], S = the segmenter's image size; (0, S, S) for no image."""
        images = np.asarray(images, np.float32)
        size = self.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 1):
            raise ValueError(f"the segmenter takes (N, {size}, {size}, 1) images, got {images.shape}")
        out = np.zeros((len(images), size, size), np.uint8)
        chunk = max(1, batch_size) * 16  # predict's logits for this many images at a time, not all N
        for start in range(0, len(images), chunk):
            logits = self.model.predict(images[start : start + chunk], batch_size=batch_size, verbose=0)
            out[start : start + chunk] = np.argmax(logits, axis=-1)
        return out


def train_segmenter(
    train: tf.data.Dataset,
    image_size: int,
    steps: int = SEGMENTER_STEPS,
    seed: int = 0,
    classes: int = len(masks.CLASS_NAMES),
    dice_weight: float = SEGMENTER_DICE_WEIGHT,
) -> Segmenter:
    """Fit a new segmenter for `steps` batches of `train`, an endless dataset of (images
    (B, S, S, 1) float32 in [-1, 1], masks (B, S, S) class indices in 0..classes − 1), e.g.
    `segmentation_stream`'s, with `SegmentationLoss(dice_weight)`; Adam, learning rate 1e-3
    cosine-decayed to 0 over the steps. keras.utils.set_random_seed(seed) makes the initial
    weights reproducible (the order of the batches is the dataset's)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    image_spec, mask_spec = train.element_spec
    if image_spec.shape.rank != 4 or tuple(image_spec.shape[1:]) not in ((image_size, image_size, 1), (None,) * 3):
        raise ValueError(f"the dataset's images are {image_spec.shape}, expected (B, {image_size}, {image_size}, 1)")
    if mask_spec.shape.rank != 3:
        raise ValueError(f"the dataset's masks are {mask_spec.shape}, expected (B, {image_size}, {image_size})")
    keras.utils.set_random_seed(seed)
    model = build_segmenter(image_size, classes)
    seconds, loss = fit_steps(model, SegmentationLoss(dice_weight), train, steps)
    batch = image_spec.shape[0]
    info = {
        "image_size": int(image_size),
        "classes": int(classes),
        "steps": int(steps),
        "seed": int(seed),
        "dice_weight": float(dice_weight),
        "batch_size": None if batch is None else int(batch),
        "seconds": round(seconds, 2),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loss": loss if np.isfinite(loss) else None,  # mean loss over the steps
    }
    return Segmenter(model, info)


def load_segmentation_pairs(image_paths, mask_paths, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (N, S, S, 1) in [-1, 1], masks uint8 (N, S, S)) of paired files, S =
    image_size: the images read as `dataset.load_image` reads them, the masks by
    `masks.load_masks` (nearest neighbour). UserError naming the first file that fails."""
    image_paths, mask_paths = [str(p) for p in image_paths], [str(p) for p in mask_paths]
    if len(image_paths) != len(mask_paths):
        raise ValueError(f"{len(image_paths)} images but {len(mask_paths)} masks")
    classes = masks.load_masks(mask_paths, image_size)
    return load_images(image_paths, image_size), classes


def load_images(image_paths, image_size: int) -> np.ndarray:
    """Images float32 (N, S, S, 1) in [-1, 1] of `image_paths`, S = image_size, read as
    `dataset.load_image` reads them (in parallel). UserError naming the first file that fails."""
    image_paths = [str(p) for p in image_paths]
    if not image_paths:
        return np.zeros((0, image_size, image_size, 1), np.float32)
    decoded = tf.data.Dataset.from_tensor_slices(image_paths).map(
        lambda path: dataset.load_image(path, image_size), num_parallel_calls=tf.data.AUTOTUNE
    )
    try:
        images = np.concatenate([batch.numpy() for batch in decoded.batch(256)])
    except tf.errors.OpError:
        for path in image_paths:  # which one: the parallel read does not say
            try:
                dataset.load_image(path, image_size)
            except tf.errors.OpError as err:
                raise UserError(f"cannot decode image {path}: {err.message.splitlines()[0]}") from None
        raise
    return images


def segmentation_stream(images: np.ndarray, classes: np.ndarray, batch_size: int, seed: int = 0, flip: bool = True):
    """The endless training dataset of `train_segmenter`: batches (images float32 (B, S, S, 1),
    masks uint8 (B, S, S)) of the pairs `images` (N, S, S, 1) and `classes` (N, S, S), every
    pass a new order (`dataset.seeded_passes(N, seed, flip=flip)`, a pure function of the
    seed), and with `flip` each pair mirrored left-right with probability 1/2, image and mask
    together. The arrays are kept in memory (N·S²·5 bytes)."""
    images, classes = np.asarray(images, np.float32), np.asarray(classes, np.uint8)
    if images.ndim != 4 or images.shape[-1] != 1 or classes.shape != images.shape[:3]:
        raise ValueError(
            f"images (N, S, S, 1) and masks (N, S, S) of the same N and S, got {images.shape} and {classes.shape}"
        )
    if not len(images):
        raise ValueError("no image and mask pairs to make a dataset from")
    with tf.device("/CPU:0"):  # tf.data reads the tables on the host
        image_table, mask_table = tf.constant(images), tf.constant(classes)

    def pair(index, coin):
        image, mask = tf.gather(image_table, index), tf.gather(mask_table, index)
        mirror = tf.equal(coin, 1)
        return tf.where(mirror, tf.reverse(image, axis=[1]), image), tf.where(mirror, tf.reverse(mask, axis=[1]), mask)

    pairs = dataset.seeded_passes(len(images), seed, flip=flip).map(pair)
    return (
        pairs.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(dataset.without_autotune())
    )


def _segmenter_matches(info: dict, image_size: int, steps: int, seed: int, classes: int, dice_weight: float) -> bool:
    """Whether segmenter.json's `info` describes a segmenter trained with these settings."""
    try:
        return (
            info["image_size"] == image_size
            and info["classes"] == classes
            and info["steps"] == steps
            and info["seed"] == seed
            and float(info["dice_weight"]) == float(dice_weight)
        )
    except (KeyError, TypeError, ValueError):
        return False


def load_or_train_segmenter(
    run_dir: str,
    make_train: Callable[[], tf.data.Dataset],
    image_size: int,
    steps: int = SEGMENTER_STEPS,
    seed: int = 0,
    classes: int = len(masks.CLASS_NAMES),
    dice_weight: float = SEGMENTER_DICE_WEIGHT,
) -> Segmenter:
    """The segmenter cached in run_dir/oracle/ (segmenter.weights.h5, segmenter.json) when it was
    trained with these settings (make_train is then not called); otherwise
    train_segmenter(make_train(), ...) and cache it, as `load_or_train_oracle` does (a missing,
    damaged or unreadable cache is trained anew; the json goes before the weights are replaced
    and comes back after them; an OSError while writing is a one-line UserError)."""
    folder = os.path.join(run_dir, ORACLE_FOLDER)
    info_path, weights_path = os.path.join(folder, SEGMENTER_INFO_FILE), os.path.join(folder, SEGMENTER_WEIGHTS_FILE)
    info = _read_info(info_path)
    if (
        info is not None
        and _segmenter_matches(info, image_size, steps, seed, classes, dice_weight)
        and os.path.isfile(weights_path)
    ):
        model = build_segmenter(image_size, classes)
        try:
            runs.load_weights(model, weights_path, built_from=info_path)
            return Segmenter(model, info)
        except UserError:
            pass  # damaged: trained anew below
    segmenter = train_segmenter(
        make_train(), image_size, steps=steps, seed=seed, classes=classes, dice_weight=dice_weight
    )
    _write_cache(folder, segmenter.model, SEGMENTER_WEIGHTS_FILE, SEGMENTER_INFO_FILE, segmenter.info, "the segmenter")
    return segmenter
