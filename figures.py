"""Matplotlib figures shared by train.py, predict.py and evaluate.py.

Every function takes arrays (images NHWC float in [-1, 1], as everywhere in the project)
and a PNG path, and writes the figure atomically. Images are drawn with the gray colormap
and fixed limits [-1, 1], so black background is black and white matter is bright: no
inversion (the original inverted images to make up for a colormap).

Uses matplotlib's object-oriented `Figure` API, not pyplot: no global figure state and no
GUI backend is involved, so this works on a headless machine and inside tests.
"""

from __future__ import annotations

import csv
import os

import numpy as np
from matplotlib.figure import Figure


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write `fig` to `path` through a temporary file, so a kill never leaves half a PNG."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)


def read_history(csv_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Columns of a Keras `CSVLogger` file as float arrays, keyed by header name.

    CSVLogger writes "NA" for metrics it never saw (e.g. val_loss without validation
    data); such all-NA columns are dropped.
    """
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {}
    for key in rows[0] if rows else []:
        values = np.array([float(r[key]) if r[key] not in ("", "NA") else np.nan for r in rows])
        if not np.all(np.isnan(values)):
            columns[key] = values
    return columns


def loss_curves(csv_path: str | os.PathLike, path: str | os.PathLike, title: str) -> None:
    """Training (and validation, when logged) loss per epoch, log-scaled.

    Other metrics in the CSV (for example `val_ssim`) get a second panel each.
    """
    history = read_history(csv_path)
    if not history:
        return
    epochs = history["epoch"] + 1
    extra = [k for k in history if k not in ("epoch", "loss", "val_loss", "learning_rate") and not k.startswith("val_")]
    fig = Figure(figsize=(5 + 4 * len(extra), 3.6))
    axes = fig.subplots(1, 1 + len(extra), squeeze=False)[0]
    axes[0].plot(epochs, history["loss"], label="train")
    if "val_loss" in history:
        axes[0].plot(epochs, history["val_loss"], label="validation")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].set_title(title)
    axes[0].legend()
    for ax, key in zip(axes[1:], extra, strict=True):
        ax.plot(epochs, history[key], label="train")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    save_figure(fig, path)


def image_grid(
    images: np.ndarray,
    path: str | os.PathLike,
    title: str = "",
    ncols: int = 8,
    row_labels=(),
    column_labels=(),
    cell_labels=None,
) -> None:
    """The project's one grid of images in [-1, 1], without axes.

    images: (N, H, W, 1), laid out in rows of `ncols` (the last row may be short), or
        (R, C, H, W, 1), R rows of C images (e.g. conditions.png: rows = values of one
        condition, columns = seeds; memorisation.png: samples above their training images).
    row_labels: one label per row, left of it; column_labels: one per column, above the first
        row; cell_labels: one per image (flat, in image order), above it (e.g. SSIM values).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 5:
        nrows, ncols = images.shape[:2]
        images = images.reshape((-1, *images.shape[2:]))
    else:
        ncols = min(ncols, len(images))
        nrows = -(-len(images) // ncols)
    labels = list(cell_labels) if cell_labels is not None else []
    lines = max((str(label).count("\n") + 1 for label in labels), default=0)
    label_room = 0.15 * (lines + 1) if labels else 0.0  # 0.3 inch for one line of fontsize 8
    fig = Figure(
        figsize=(1.5 * ncols + (0.9 if len(row_labels) else 0), (1.5 + label_room) * nrows + (0.5 if title else 0.1))
    )
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if i < len(images):
            ax.imshow(images[i, :, :, 0], cmap="gray", vmin=-1, vmax=1)
            if labels:
                ax.set_title(str(labels[i]), fontsize=8)
    for r, label in enumerate(row_labels):
        axes[r, 0].set_ylabel(str(label), fontsize=9)
    for c, label in enumerate(column_labels):
        axes[0, c].set_title(str(label), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def reconstructions(originals: np.ndarray, latents: np.ndarray, recons: np.ndarray, path: str | os.PathLike) -> None:
    """Three rows, as the original's figure: originals | first latent channel | reconstructions.

    originals, recons: (N, H, W, 1) in [-1, 1]; latents: (N, h, w, C), unscaled, shown
    with its own colour limits since its range is whatever the encoder learned.
    """
    n = len(originals)
    fig = Figure(figsize=(1.6 * n, 5.2))
    axes = fig.subplots(3, n, squeeze=False)
    rows = [
        ("original", originals, dict(cmap="gray", vmin=-1, vmax=1)),
        ("latent (ch. 0)", latents, dict(cmap="viridis")),
        ("reconstruction", recons, dict(cmap="gray", vmin=-1, vmax=1)),
    ]
    for r, (label, images, style) in enumerate(rows):
        for i in range(n):
            ax = axes[r, i]
            ax.imshow(np.asarray(images[i])[:, :, 0], **style)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label)
    save_figure(fig, path)


# Scaled latents have unit standard deviation (train.py divides by their std), so ±3σ
# covers them; a fixed range keeps the noise → sample columns of a figure comparable.
LATENT_LIMITS = (-3.0, 3.0)


def denoising(latents: np.ndarray, images: np.ndarray, timesteps, path: str | os.PathLike, title: str = "") -> None:
    """The reverse process of a few samples: columns are states from noise (left) to sample (right).

    latents: (K, S, h, w, C) scaled latents x_t of S samples at K states (first channel
        shown, limits `LATENT_LIMITS`); images: (K, S, H, W, 1) in [-1, 1], those latents
        decoded; timesteps: (K,) the number of noising steps of each state (T … 0), used
        as column titles. Two rows per sample: its latent, then its decoded image.
    """
    latents, images = np.asarray(latents), np.asarray(images)
    k, s = latents.shape[:2]
    fig = Figure(figsize=(1.5 * k + 0.8, 1.5 * 2 * s + (0.4 if title else 0)))
    axes = fig.subplots(2 * s, k, squeeze=False)
    low, high = LATENT_LIMITS
    for j in range(k):
        axes[0, j].set_title(f"t = {int(timesteps[j])}")
        for i in range(s):
            axes[2 * i, j].imshow(latents[j, i, :, :, 0], cmap="viridis", vmin=low, vmax=high)
            axes[2 * i + 1, j].imshow(images[j, i, :, :, 0], cmap="gray", vmin=-1, vmax=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for i in range(s):
        axes[2 * i, 0].set_ylabel(f"#{i} latent")
        axes[2 * i + 1, 0].set_ylabel(f"#{i} decoded")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
