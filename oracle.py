"""The label oracle: a small CNN that reads a slice's label variables off the image.

evaluate.py uses it to check conditional samples: a sample asked for age 80 should look, to
a regressor trained on real slices, like an 80-year-old's slice. This module owns the
oracle's network, its training (masked regression on the training split's labels), and its
cache in a run directory:

    RUN/oracle/oracle.weights.h5     the network's weights
    RUN/oracle/oracle.json           {"columns", "mean", "std", "image_size", "steps", "seed",
                                      "seconds" (training time), "created", "loss"}

``load_or_train_oracle`` loads the cache when oracle.json matches what is asked for (same
columns, label statistics, image size, steps and seed) and trains (and writes) it otherwise.

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
import hardware
import runs
from cli import UserError

ORACLE_FOLDER = "oracle"  # inside a run directory
WEIGHTS_FILE = "oracle.weights.h5"
INFO_FILE = "oracle.json"
LEARNING_RATE = 1e-3
WIDTHS = (16, 32, 64, 64, 128)  # the first conv keeps the size, each next one halves it
GROUPS = 8
HIDDEN = 64


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
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(LEARNING_RATE, steps)),
        loss=MaskedMSE(mean, std),
        jit_compile=False,
    )
    model.optimizer.build(model.trainable_variables)  # now, not in the first trace: see keras_fixes.FitFixes
    start = time.perf_counter()
    history = model.fit(train, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    loss = float(history.history["loss"][-1])
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
    try:
        with open(info_path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not _matches(info, columns, mean, std, image_size, steps, seed):
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
    try:
        os.makedirs(folder, exist_ok=True)
        info_path = os.path.join(folder, INFO_FILE)
        if os.path.lexists(info_path):
            os.remove(info_path)
        runs.save_weights(oracle.model, os.path.join(folder, WEIGHTS_FILE))
        cfg.write_json_atomic(oracle.info, info_path)
    except OSError as e:
        raise UserError(f"cannot write the oracle to {folder}: {e.strerror or e}") from None
    return oracle
