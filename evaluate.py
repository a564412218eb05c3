"""Measure a trained run and write RUN/metrics.json.

    python evaluate.py                                # the newest run under runs/, 64 DDIM samples
    python evaluate.py --run runs/demo --n 256 --steps 100
    python evaluate.py --run runs/oasis --inception-weights ~/inception_v3_notop.h5

Options (`python evaluate.py --help`): --run RUN (a folder, or a name under runs/; default:
the newest run), --n 64 samples, --sampler ddim|dpmpp|ddpm, --steps (DDIM: 50, DPM-Solver++:
20, at most T), --eta 0.0, --seed 0, --batch-size 16, --precision (of the networks, default
float32), --max-train N (compare with at most N training images in the nearest-neighbour
search, evenly spaced; default 0 = all), --inception-weights PATH (InceptionV3 "notop"
weights for FID/KID), --guidance W[,W...] (conditioned runs: classifier-free guidance
weights, the first gives the headline metrics, more make a sweep; default 3),
--oracle-steps 600 (training steps of the conditioning oracle), --segmenter-steps 600 (of
the segmentation oracle, for runs conditioned on masks), --debug.

Metrics (SSIM and MS-SSIM on images mapped from [-1, 1] to [0, 1] with max_val = 1,
11-px Gaussian filter, as tf.image.ssim; see metrics.unit_range for why not on [-1, 1]):
    ae_ssim, ae_psnr            autoencoder reconstruction of every validation image (mean)
    ae_brain_ssim, ae_brain_psnr  the same inside the brain's bounding box of each image
                                (metrics.brain_box): the anatomy's score, where the whole
                                image's is mostly black background
    sample_nn_ssim_median       per sample, the highest SSIM to any image the diffusion model
                                trained on (the training images and, when the run flips, their
                                mirror images); median
    sample_nn_ssim_max          ... and the largest: near 1 means a memorised training image
    real_nn_ssim_median         the same for validation images, the yardstick for the above:
                                how close a real slice the model never saw is to the training set
    sample_nn_brain_ssim_median, real_nn_brain_ssim_median
                                the same two searched and scored inside the brain's box of
                                the sample (or validation image)
    sample_msssim_diversity     mean MS-SSIM over all pairs of samples (lower = more diverse)
    real_msssim_diversity       the same over the real images
    fid, kid                    Fréchet and kernel Inception distances, samples vs real images
    fid_real, kid_real          the same for real vs real (validation vs as many training
                                images): the scale to read fid and kid against

"Real images" are up to n validation images, evenly spaced over the sorted split (the
data folder and split are the run's: config.data.data, find_splits with the run's seed).

A run trained with --condition is measured at the first --guidance weight w on samples
asked for (all errors are medians of absolute differences, in the label's units):
  - slice-conditioned runs: slice evenly spaced over its training range (sample i gets
    min + i (max − min) / (n − 1), the other variables unknown). These are also the samples
    of the metrics above (sample_nn_*, diversity), so they compare with an unconditional run's.
        cond_slice_mae                |requested slice − the slice label of the sample's
                                      nearest training image (the SSIM search above)|
        cond_slice_mae_unconditional  the same for unconditional samples of the same run
                                      against the same requests: the chance level
        cond_slice_mae_real           validation images: |their slice − their nearest
                                      training image's|, the floor (4 mm gaps on the demo set)
  - every run: the labels of the real images, all variables at once (sample i gets real
    image i mod n_real's: samples "generated for the held-out slices' labels"), judged by
    the oracle, a small CNN regressor trained on the real training slices and their labels
    (oracle.py, cached in RUN/oracle/, --oracle-steps; there: what it can and cannot tell):
        cond_<var>_mae_samples        |oracle(sample) − requested value|
        cond_<var>_mae_unconditional  |oracle(unconditional sample) − the same request|
        cond_<var>_mae_real           |oracle(validation image) − its label|: the oracle's error
    (for the slice: cond_slice_oracle_mae_*, beside the nearest-neighbour cond_slice_mae).
`--guidance 1,2,3,5` repeats the conditioned samples at each weight and reports their
conditioning errors beside sample_nn_ssim_median and the diversity (`guidance_sweep` in
metrics.json): the trade-off between following the condition and looking like the data.

A run trained with --condition mask is also asked for the tissue masks of the real
(validation) images, the mask alone (sample i gets real image i mod n_real's mask, the
label variables unknown), and judged by the segmentation oracle, a small segmentation UNet
trained on the real training pairs (oracle.py, cached in RUN/oracle/, --segmenter-steps;
there: what it can and cannot tell). Dice is metrics.dice's, per tissue class (CSF, grey
matter, white matter; background left out), averaged over the images where the class
occurs, and mean_dice's mean over the three classes:
        mask_dice_samples             Dice(requested mask, oracle(sample)); at each --guidance
                                      weight in `mask_guidance_sweep`
        mask_dice_unconditional       Dice(the same masks, oracle(unconditional sample)):
                                      chance, what a sample that ignores the mask scores
        mask_dice_real                Dice(validation mask, oracle(its image)): the oracle's
                                      own accuracy, the ceiling
        mask_dice_autoencoder         Dice(validation mask, oracle(the autoencoder's
                                      reconstruction of its image, decoded as a sample for
                                      that mask is: by the SPADE decoder, given the mask,
                                      when the run has one)): the ceiling of its samples
        mask_dice_<kind>_<class>      the same per class (csf, grey_matter, white_matter)

A run with a mask decoder (trained when its data has masks) is also measured on image +
mask pairs (pairs.py: the method, and what each number can tell), as many as the training
split has images, unconditional samples with the mask decoder's masks:
        pair_dice                     Dice(a pair's mask, oracle(its image)), beside
                                      mask_dice_real (or the oracle's Dice on real slices)
        mask_nn_dice_median, _max     a pair's mask against its closest training mask (or
                                      mirror): near 1 = a copied mask
        real_mask_nn_dice_median      the same for the validation masks: the yardstick
        seg_dice_real_only            the segmentation network trained on the real training
        seg_dice_synthetic_only       pairs, on as many synthetic pairs, and on both (the same
        seg_dice_real_plus_synthetic  steps, --segmenter-steps), each judged on the real test
                                      split; per class too; seg_pairs_*: the pairs each used

Also writes RUN/figures/memorisation.png: the 8 samples closest to an image the model
trained on, each above that image, with their SSIM.

MS-SSIM needs 2^(scales-1) × 11 pixels for the 11-px filter at its coarsest scale, so it
uses as many of the standard five scales as the image size allows (3 at 64 px, 4 at
128 px, 1 = plain SSIM at 16 px) with the standard weights of those scales renormalised
to sum to 1; metrics.json records the count (`msssim_scales`). Compare only equal counts.

FID and KID use keras.applications.InceptionV3(include_top=False, pooling="avg")
features (2048-d) of the images resized to 299×299 and repeated to 3 channels. The
ImageNet weights are never downloaded: they are read from --inception-weights or from
Keras' cache (~/.keras/models/, or $KERAS_HOME/models/); without them fid and kid are
null and `fid_note` says why. FID from a few dozen images is biased upward: compare
values only at the same n. KID (unbiased MMD², kernel (x·y/d + 1)³) is unbiased at any n.
Keras' InceptionV3 is not the network published FIDs use (pytorch-fid's port of the
TF-slim Inception graph), so these values compare only with each other, not with papers.

metrics.json also records n, the sampler, steps, seed, the run, TensorFlow and Keras
versions and the device, so that no number is quoted without its conditions.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import cli  # noqa: E402  (first: quiets TensorFlow before it loads)

cli.quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import conditioning  # noqa: E402
import config as cfg  # noqa: E402
import dataset  # noqa: E402
import figures  # noqa: E402
import hardware  # noqa: E402
import metrics  # noqa: E402
import oracle  # noqa: E402
import pairs  # noqa: E402
import runs  # noqa: E402

INCEPTION_NOTOP = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"  # Keras' cache name
FID_NOTE = (
    "Keras InceptionV3 (ImageNet) features, not pytorch-fid's port of the TF-slim graph that published FIDs use: "
    "compare with this project's values only, at equal n"
)
MEMORISATION_PAIRS = 8  # columns of memorisation.png


# ---------------------------------------------------------------------------- SSIM-based metrics


# ---------------------------------------------------------------------------- FID and KID


def find_inception_weights(path: str | None) -> tuple[str | None, str]:
    """(weights file, "") or (None, why not). Only looks at files: nothing is downloaded.

    `path` (--inception-weights) wins; else the file Keras would have cached (see
    `keras_cache_folders`).
    """
    if path:
        path = os.path.expanduser(path)
        return (path, "") if os.path.isfile(path) else (None, f"--inception-weights {path}: no such file")
    folders = keras_cache_folders()
    for folder in folders:
        candidate = os.path.join(folder, INCEPTION_NOTOP)
        if os.path.isfile(candidate):
            return candidate, ""
    return None, (
        f"InceptionV3 ImageNet weights not found ({INCEPTION_NOTOP} in "
        f"{' or '.join(folders)}); pass --inception-weights PATH"
    )


def keras_cache_folders() -> list[str]:
    """Where keras.utils.get_file keeps downloaded models: $KERAS_HOME/models or ~/.keras/models,
    and /tmp/.keras/models (its fallback when the home folder is not writable)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return [os.path.join(home, "models"), os.path.join("/tmp", ".keras", "models")]


def inception_model(weights_path: str) -> keras.Model:
    """InceptionV3 without its classifier, global-average pooled: (B, 299, 299, 3) in [-1, 1] → (B, 2048).

    Built with weights=None and loaded from `weights_path`, so Keras never tries to download;
    UserError when the file is unreadable or holds other weights.
    """
    with hardware.dtype_policy("float32"):
        model = keras.applications.InceptionV3(
            include_top=False,
            weights=None,
            pooling="avg",
            input_shape=(metrics.INCEPTION_SIZE, metrics.INCEPTION_SIZE, 3),
        )
    runs.load_weights(model, weights_path, built_from="InceptionV3(include_top=False)")
    return model


def inception_scores(
    samples: np.ndarray, real: np.ndarray, train: np.ndarray, weights: str | None, batch_size: int
) -> dict:
    """{"fid", "kid"} of samples vs real (validation) images, {"fid_real", "kid_real"} of real vs
    `train` (training images, as many as real), and "fid_note"; null scores and the reason
    whenever they cannot be computed. All images (N, H, W, 1) in [-1, 1]."""
    null = {"fid": None, "kid": None, "fid_real": None, "kid_real": None}
    path, reason = find_inception_weights(weights)
    if path is None:
        return {**null, "fid_note": f"{reason}; {FID_NOTE}"}
    if min(len(samples), len(real), len(train)) < 2:
        counts = f"{len(samples)}, {len(real)} and {len(train)}"
        return {**null, "fid_note": f"needs at least 2 samples, real and training images, got {counts}"}
    try:
        model = inception_model(path)
    except cli.UserError as e:
        return {**null, "fid_note": str(e)}
    fs, fr, ft = (metrics.inception_features(model, x, batch_size) for x in (samples, real, train))
    return {
        "fid": metrics.fid(fs, fr),
        "kid": metrics.kid(fs, fr),
        "fid_real": metrics.fid(fr, ft),
        "kid_real": metrics.kid(fr, ft),
        "fid_note": f"InceptionV3 ({path}) pool features of {len(samples)} samples vs {len(real)} validation "
        f"images (fid_real: those vs {len(train)} training images); FID is biased at small n. {FID_NOTE}",
    }


# ---------------------------------------------------------------------------- the run's data


def load_images(paths: list[str], image_size: int, batch_size: int) -> np.ndarray:
    """Images (N, size, size, 1) in [-1, 1], in the order of `paths` (empty (0, size, size, 1) if none)."""
    if not paths:
        return np.zeros((0, image_size, image_size, 1), np.float32)
    return np.concatenate(list(dataset.make_dataset(paths, image_size, batch_size, shuffle=False).as_numpy_iterator()))


def evenly_spaced(paths: list[str], k: int) -> list[str]:
    """At most k of `paths`, evenly spaced over the list (all of them when k ≤ 0 or k ≥ len)."""
    if k <= 0 or k >= len(paths):
        return list(paths)
    return [paths[i] for i in np.linspace(0, len(paths) - 1, k).round().astype(int)]


AE_SCORES = {  # metrics.json key: per-image metric of (x, decoder(encoder(x)))
    "ae_ssim": metrics.ssim,
    "ae_psnr": metrics.psnr,
    "ae_brain_ssim": metrics.brain_ssim,
    "ae_brain_psnr": metrics.brain_psnr,
}


def autoencoder_scores(run: runs.Run, paths: list[str], batch_size: int) -> dict[str, float | None]:
    """The means over the images of `paths` of each `AE_SCORES` metric of decoder(encoder(x))
    against x (SSIM, PSNR in dB, whole and in the brain's box); None each without images."""
    if not paths:
        return dict.fromkeys(AE_SCORES)
    totals, count = dict.fromkeys(AE_SCORES, 0.0), 0
    for x in dataset.make_dataset(paths, run.config.data.image_size, batch_size, shuffle=False):
        recon = run.autoencoder.decoder(run.autoencoder.encoder(x, training=False), training=False)
        for key, metric in AE_SCORES.items():
            totals[key] += float(tf.reduce_sum(metric(x, recon)))
        count += int(x.shape[0])
    return {key: total / count for key, total in totals.items()}


def device_name() -> str:
    """The GPU's name (first GPU) or the CPU's model and core count, for metrics.json."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return (
            f"{details.get('device_name', 'GPU')} (×{len(gpus)})"
            if len(gpus) > 1
            else details.get("device_name", "GPU")
        )
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores"


def memorisation_figure(
    samples: np.ndarray, nearest: metrics.Nearest, train_paths: list[str], path: str, title: str
) -> None:
    """memorisation.png: the MEMORISATION_PAIRS samples of highest SSIM to a training image
    (or mirror image), each above that image. nearest: of `samples` first (more may follow);
    its index counts the training images, then (≥ len(train_paths)) their mirror images."""
    k = min(MEMORISATION_PAIRS, len(samples))
    order = np.argsort(-nearest.scores[: len(samples)], kind="stable")[:k]
    names = []
    for i in nearest.index[order]:
        stem = os.path.splitext(os.path.basename(train_paths[i % len(train_paths)]))[0]
        names.append(stem + ("\n(mirror)" if i >= len(train_paths) else ""))  # on its own line: names are long
    figures.image_grid(
        np.stack([samples[order], nearest.images[order]]),
        path,
        title=f"{title}: the {k} closest to a training image (bottom)",
        cell_labels=[f"SSIM {s:.3f}" for s in nearest.scores[order]] + names,
    )


# ---------------------------------------------------------------------------- metrics.json


def _number(x) -> float | None:
    """A finite float, or None (JSON null) for None/NaN/inf."""
    return None if x is None or not math.isfinite(float(x)) else float(x)


DESCRIPTIONS = {
    "ae_ssim": "autoencoder reconstruction SSIM, validation",
    "ae_psnr": "autoencoder reconstruction PSNR (dB), validation",
    "ae_brain_ssim": "the same SSIM inside the brain's box",
    "ae_brain_psnr": "the same PSNR (dB) inside the brain's box",
    "sample_nn_ssim_median": "samples: median SSIM to the nearest training image (or mirror)",
    "sample_nn_ssim_max": "samples: max of that (≈1 = memorised image)",
    "real_nn_ssim_median": "validation: the same, the yardstick for the two above",
    "sample_nn_brain_ssim_median": "samples: the nearest-image SSIM inside the brain's box",
    "real_nn_brain_ssim_median": "validation: the same, its yardstick",
    "sample_msssim_diversity": "samples: mean pairwise MS-SSIM (lower = more diverse)",
    "real_msssim_diversity": "real: mean pairwise MS-SSIM",
    "fid": "Fréchet Inception distance, samples vs real",
    "kid": "kernel Inception distance, samples vs real",
    "fid_real": "FID, validation vs training images (the scale for fid)",
    "kid_real": "KID, validation vs training images",
}


def _shown(value) -> str:
    return "null" if value is None else f"{value:.4g}"


def format_table(results: dict) -> str:
    """The metrics as an aligned text table, with the conditions above and notes below."""
    head = (
        f"run {results['run']}: n = {results['n']} samples ({results['sampler_label']}, seed {results['seed']}), "
        f"{results['n_real']} real (validation) images, {results['nn_reference_images']} training images; "
        f"MS-SSIM {results['msssim_scales']} scale(s); {results['device']}, TF {results['tensorflow']}"
    )
    rows = [head, "", f"{'metric':<26}{'value':>10}  meaning"]
    for key, meaning in DESCRIPTIONS.items():
        rows.append(f"{key:<26}{_shown(results.get(key)):>10}  {meaning}")
    masked = [key for key in results if key.startswith("mask_dice_")]
    if masked:
        first = results["mask_guidance_sweep"][0]["guidance"]
        rows.append(f"tissue masks (the segmentation oracle's Dice), guidance {first:g}:")
        rows += [f"{key:<40}{_shown(results[key]):>10}" for key in masked]
        rows += [
            f"  w = {entry['guidance']:<6g}{_shown(entry['mask_dice_samples']):>10}  mask_dice_samples"
            for entry in results["mask_guidance_sweep"][1:]
        ]
    paired = [key for key in results if key.startswith(("pair_dice", "mask_nn_", "real_mask_nn_", "seg_"))]
    if paired:
        rows.append("image + mask pairs (pairs.py):")
        rows += [f"{key:<40}{_shown(results[key]):>10}" for key in paired]
    conditioned = [key for key in results if key.startswith("cond_")]
    if conditioned:
        rows.append(f"conditioned on {', '.join(results['condition_variables'])}, guidance {results['guidance']:g}:")
        rows += [f"{key:<32}{_shown(results[key]):>10}" for key in conditioned]
        rows.append("guidance sweep: " + ", ".join(k for k in results["guidance_sweep"][0] if k != "guidance"))
        for entry in results["guidance_sweep"]:
            rows.append(
                f"  w = {entry['guidance']:<6g}"
                + "".join(f"{_shown(v):>10}" for k, v in entry.items() if k != "guidance")
            )
    rows.append("")
    rows.append(f"fid_note: {results['fid_note']}")
    rows += [f"note: {note}" for note in results["notes"]]
    return "\n".join(rows)


# ---------------------------------------------------------------------------- conditioning


@dataclass
class ConditionData:
    """What the conditioning metrics need of a conditioned run's data (n samples).

    names: the run's condition variables (K); train_labels: raw (len(train_paths), K) labels
    of the training images searched for nearest neighbours, in their order; real_labels:
    raw (n_real, K) labels of the real images; held_out: {name: (n,)} the real images'
    labels, cycled to n (sample i is asked for real image i mod n_real's); sweep: for a
    slice-conditioned run {"slice": (n,) evenly spaced over the training range} (the other
    variables unknown), else None; train_paths_all / train_labels_all: the whole training
    split and its raw labels, for the oracle.
    """

    names: tuple[str, ...]
    train_labels: np.ndarray
    real_labels: np.ndarray
    held_out: dict
    sweep: dict | None
    train_paths_all: list[str]
    train_labels_all: np.ndarray

    @property
    def headline(self) -> dict:
        """What the headline samples are asked for: the slice sweep, or the held-out labels."""
        return self.sweep or self.held_out


def condition_data(config, data_dir, splits, train_paths, real_paths, n) -> ConditionData:
    """The run's labels for the images evaluate() uses (UserError when the data has none)."""
    names = tuple(config.condition_stats)
    labels = dataset.find_labels(data_dir, splits)
    if labels is None or any(name not in labels.columns for name in names):
        raise cli.UserError(f"{data_dir} has no labels for {', '.join(names)}, which the run is conditioned on")
    columns = [labels.columns.index(name) for name in names]
    row_of = {path: labels.values[split][i, columns] for split, paths in splits.items() for i, path in enumerate(paths)}
    real = np.array([row_of[p] for p in real_paths]).reshape(-1, len(names))
    if not len(real):
        raise cli.UserError("conditioning metrics need validation images (their labels are what samples are asked for)")
    cycled = real[np.arange(n) % len(real)]
    return ConditionData(
        names=names,
        train_labels=np.array([row_of[p] for p in train_paths]).reshape(-1, len(names)),
        real_labels=real,
        held_out={name: cycled[:, k] for k, name in enumerate(names)},
        sweep={"slice": conditioning.sweep_values(config.condition_stats, "slice", n)} if "slice" in names else None,
        train_paths_all=list(splits["train"]),
        train_labels_all=labels.values["train"][:, columns],
    )


def median_abs_error(predicted: np.ndarray, wanted: np.ndarray) -> float | None:
    """Median of |predicted − wanted| over the entries where both are known (None if none)."""
    error = np.abs(np.asarray(predicted, np.float64) - np.asarray(wanted, np.float64))
    error = error[np.isfinite(error)]
    return float(np.median(error)) if len(error) else None


def slice_error(nearest: metrics.Nearest, data: ConditionData, wanted: np.ndarray) -> float | None:
    """Median |wanted − the slice label of each query's nearest training image| (an index
    ≥ the number of training images is a mirror image, which keeps its slice)."""
    found = data.train_labels[nearest.index % len(data.train_labels), data.names.index("slice")]
    return median_abs_error(found, wanted)


def oracle_errors(predicted: np.ndarray, wanted, data: ConditionData, kind: str) -> dict:
    """{cond_<var>_mae_<kind>: median |oracle prediction − wanted value|} per condition variable
    (the slice's: cond_slice_oracle_mae_<kind>, beside the nearest-neighbour cond_slice_mae).
    predicted: (N, K); wanted: {name: (N,)} or an (N, K) array."""
    errors = {}
    for k, name in enumerate(data.names):
        target = wanted[name] if isinstance(wanted, dict) else wanted[:, k]
        key = "cond_slice_oracle_mae" if name == "slice" else f"cond_{name}_mae"
        errors[f"{key}_{kind}"] = median_abs_error(predicted[:, k], target)
    return errors


def fit_oracle(run: runs.Run, data: ConditionData, steps: int, batch_size: int) -> oracle.Oracle:
    """The run's oracle for its condition variables: loaded from RUN/oracle/ or trained there."""
    config = run.config
    mean, std = oracle.label_stats(data.train_labels_all)

    def make_train():
        return dataset.make_dataset(
            data.train_paths_all,
            config.data.image_size,
            batch_size,
            flip=True,
            seed=config.train.seed,
            repeat=True,
            drop_remainder=True,
            labels=data.train_labels_all.astype(np.float32),
            in_memory=None,
        )

    return oracle.load_or_train_oracle(
        run.directory, make_train, data.names, mean, std, config.data.image_size, steps=steps, seed=config.train.seed
    )


def parse_guidance(text: str) -> list[float]:
    """--guidance "1,2,3,5" → [1.0, 2.0, 3.0, 5.0]; UserError for anything else."""
    try:
        values = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise cli.UserError(f"--guidance {text!r}: expected comma-separated weights, e.g. 1,2,3,5")
    return values


def evaluate(
    run: runs.Run,
    data_dir: str,
    splits: dict[str, list[str]],
    n: int,
    options: cfg.SamplingOptions,
    max_train: int = 0,
    inception_weights: str | None = None,
    guidance: list[float] | None = None,
    oracle_steps: int = 600,
    segmenter_steps: int = oracle.SEGMENTER_STEPS,
) -> dict:
    """Every metric of the module docstring for `run`, with its conditions, as a JSON-ready dict.

    data_dir, splits: the run's data folder and {"train", "validate", "test": image paths} (`runs.run_splits`).
    options: how to sample (`config.SamplingOptions`, steps resolved); guidance: classifier-free
    guidance weights of a conditioned run (the first gives the headline metrics; default
    [options.guidance]); oracle_steps: its training steps; segmenter_steps: the segmentation
    oracle's (runs conditioned on masks).
    """
    started = time.time()
    config = run.config
    size = config.data.image_size
    real_paths = evenly_spaced(splits["validate"], n)
    train_paths = evenly_spaced(splits["train"], max_train)
    notes = []
    if not splits["validate"]:
        notes.append("no validation images: ae_* and real_* metrics are null")

    guidance = list(guidance or [options.guidance])
    batch_size, T = options.batch_size, config.diffusion.timesteps
    data = condition_data(config, data_dir, splits, train_paths, real_paths, n) if config.condition_stats else None
    asked = ""
    if data:
        what = "slice evenly spaced" if data.sweep else f"the labels of {len(real_paths)} validation images"
        asked = f", asked for {what}, guidance {guidance[0]:g}"
    print(f"sampling {n} images ({options.label(T)}{asked})", flush=True)

    def sample(condition, w):
        return runs.generate(run, n, options, condition=condition, guidance=w).images

    samples = sample(data.headline if data else None, guidance[0])
    real = load_images(real_paths, size, batch_size)

    print(f"autoencoder on {len(splits['validate'])} validation images", flush=True)
    ae_scores = autoencoder_scores(run, splits["validate"], batch_size)

    print(
        f"nearest training image (SSIM) of {len(samples)} samples and {len(real)} real images "
        f"among {len(train_paths)} training images" + (" and their mirror images" if config.data.flip else ""),
        flush=True,
    )
    # Stage 2 trained on the training images and, with --flip, their mirror images: search both.
    references = dataset.make_dataset(train_paths, size, batch_size, shuffle=False)
    if config.data.flip:
        references = dataset.with_mirrors(references)
    nearest = metrics.nearest_ssim(np.concatenate([samples, real]), references.as_numpy_iterator())
    brain_nn = metrics.nearest_ssim(np.concatenate([samples, real]), references.as_numpy_iterator(), brain=True)
    cond_scores = {}
    if data:
        cond_scores = conditioned_metrics(
            run, data, samples, real, nearest, references, sample, guidance, oracle_steps, batch_size
        )
    mask_scores = pairs.mask_metrics(run, n, options, guidance, segmenter_steps) if config.mask_channels else {}
    pair_scores = pairs.pair_metrics(run, options, segmenter_steps) if run.mask_decoder is not None else {}
    sample_nn, real_nn = nearest.scores[: len(samples)], nearest.scores[len(samples) :]
    figure = os.path.join(run.directory, "figures", "memorisation.png")
    memorisation_figure(samples, nearest, train_paths, figure, title=f"{run.name}: {len(samples)} samples")

    print("MS-SSIM diversity", flush=True)
    sample_div, scales = metrics.msssim_diversity(samples)
    real_div, _ = metrics.msssim_diversity(real)

    print("FID / KID", flush=True)
    train_for_fid = load_images(evenly_spaced(splits["train"], len(real)), size, batch_size)
    inception = inception_scores(samples, real, train_for_fid, inception_weights, batch_size)
    if len(train_paths) < len(splits["train"]):
        notes.append(
            f"nearest neighbours among {len(train_paths)} of {len(splits['train'])} training images (--max-train)"
        )

    return {
        "run": run.name,
        "run_dir": os.path.abspath(run.directory),
        "n": n,
        "sampler": options.sampler,
        "steps": options.network_evaluations(T),
        "eta": options.eta if options.sampler == "ddim" else None,
        "seed": options.seed,
        "sampler_label": options.label(T),
        "precision": run.diffusion.ema_network.dtype_policy.name,  # the networks' (--precision)
        "image_size": size,
        "data": data_dir,
        "n_train": len(splits["train"]),
        "n_validation": len(splits["validate"]),
        "n_real": len(real),
        "nn_reference_images": len(train_paths) * (2 if config.data.flip else 1),
        "nn_includes_mirrors": config.data.flip,
        "msssim_scales": scales,
        **{key: _number(value) for key, value in ae_scores.items()},
        "sample_nn_ssim_median": _number(np.median(sample_nn)),
        "sample_nn_ssim_max": _number(np.max(sample_nn)),
        "real_nn_ssim_median": _number(np.median(real_nn)) if len(real_nn) else None,
        "sample_nn_brain_ssim_median": _number(np.median(brain_nn.scores[: len(samples)])),
        "real_nn_brain_ssim_median": _number(np.median(brain_nn.scores[len(samples) :])) if len(real_nn) else None,
        "sample_msssim_diversity": _number(sample_div),
        "real_msssim_diversity": _number(real_div),
        "fid": _number(inception["fid"]),
        "kid": _number(inception["kid"]),
        "fid_real": _number(inception["fid_real"]),
        "kid_real": _number(inception["kid_real"]),
        "fid_note": inception["fid_note"],
        **cond_scores,
        **mask_scores,
        **pair_scores,
        "memorisation_figure": figure,
        "notes": notes,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "device": device_name(),
        "seconds": round(time.time() - started, 1),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def conditioned_metrics(run, data, samples, real, nearest, references, sample, guidance, oracle_steps, batch_size):
    """The cond_* metrics of the module docstring and the guidance sweep (see `evaluate`).

    samples: asked for data.headline at guidance[0]; nearest: of samples, then of real;
    references: the nearest-neighbour search's training stream; sample(condition, w): n
    samples of the run (the same seeds).
    """
    n = len(samples)
    print(f"oracle for {', '.join(data.names)} (cached in {os.path.join(run.directory, oracle.ORACLE_FOLDER)})")
    judge = fit_oracle(run, data, oracle_steps, batch_size)
    first = metrics.Nearest(nearest.scores[:n], nearest.index[:n], nearest.images[:n])
    real_nearest = metrics.Nearest(nearest.scores[n:], nearest.index[n:], nearest.images[n:])

    sweep = []
    for w in guidance:
        if w == guidance[0]:
            images, found = samples, first
        else:
            print(f"guidance {w:g}: sampling {n} images", flush=True)
            images = sample(data.headline, w)
            found = metrics.nearest_ssim(images, references.as_numpy_iterator())
        entry = {"guidance": w}
        if data.sweep:
            entry["cond_slice_mae"] = slice_error(found, data, data.sweep["slice"])
            print(f"guidance {w:g}: sampling {n} images for the held-out labels (the oracle's)", flush=True)
            asked_held_out = sample(data.held_out, w)
        else:
            asked_held_out = images
        entry.update(oracle_errors(judge.predict(asked_held_out), data.held_out, data, "samples"))
        entry["sample_nn_ssim_median"] = _number(np.median(found.scores))
        entry["sample_msssim_diversity"] = _number(metrics.msssim_diversity(images)[0])
        sweep.append(entry)

    print("unconditional samples (the chance level)", flush=True)
    unconditional = sample(None, 1.0)
    scores = {key: value for key, value in sweep[0].items() if key.startswith("cond_")}
    if data.sweep:
        plain = metrics.nearest_ssim(unconditional, references.as_numpy_iterator())
        scores["cond_slice_mae_unconditional"] = slice_error(plain, data, data.sweep["slice"])
        scores["cond_slice_mae_real"] = slice_error(real_nearest, data, data.real_labels[:, data.names.index("slice")])
    scores.update(oracle_errors(judge.predict(unconditional), data.held_out, data, "unconditional"))
    scores.update(oracle_errors(judge.predict(real), data.real_labels, data, "real"))
    requests = f"the labels of the {len(data.real_labels)} real (validation) images, cycled to {n}"
    return {
        "guidance": guidance[0],
        "condition_variables": list(data.names),
        "condition_requests": (
            f"slice evenly spaced over the training range for cond_slice_mae and the headline "
            f"samples; {requests} for the oracle's"
        )
        if data.sweep
        else requests,
        **scores,
        "oracle": {key: judge.info.get(key) for key in ("steps", "seconds", "loss")},
        "guidance_sweep": sweep,
    }


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.FlagParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_sampling_arguments(parser, n=64)
    parser.add_argument(
        "--max-train",
        type=int,
        default=0,
        help="nearest-neighbour search among at most this many training images (default: 0 = all)",
    )
    parser.add_argument("--inception-weights", help="InceptionV3 notop .h5 weights for FID/KID (default: Keras' cache)")
    parser.add_argument(
        "--guidance",
        default=f"{cfg.SamplingOptions.guidance:g}",
        help="conditioned runs: classifier-free guidance weight(s), comma-separated (e.g. 1,2,3,5: a sweep; "
        f"the first gives the headline metrics) (default: {cfg.SamplingOptions.guidance:g})",
    )
    parser.add_argument(
        "--oracle-steps", type=int, default=600, help="training steps of the conditioning oracle (default: 600)"
    )
    parser.add_argument(
        "--segmenter-steps",
        type=int,
        default=oracle.SEGMENTER_STEPS,
        help=f"runs conditioned on masks: the segmentation oracle's training steps (default: {oracle.SEGMENTER_STEPS})",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    return parser.parse_args(argv)


def run(argv: list[str]) -> None:
    args = parse_args(argv)
    run_dir = runs.resolve_run(args.run)
    config = runs.read_config(run_dir)
    guidance = parse_guidance(args.guidance)
    options = cli.sampling_options(args, config, guidance=guidance[0])
    for flag, steps in (("--oracle-steps", args.oracle_steps), ("--segmenter-steps", args.segmenter_steps)):
        if steps < 1:
            raise cli.UserError(f"{flag} must be positive, got {steps}")
    data_dir, splits = runs.run_splits(config)  # before the models: a missing data folder fails at once
    pairs_too = os.path.exists(os.path.join(run_dir, runs.MASK_DECODER_WEIGHTS))
    loaded = runs.load_run(run_dir, encoder=True, precision=args.precision, mask_decoder=pairs_too)
    runs.check_writable(run_dir)  # metrics.json goes there: fail now, not after the work
    results = evaluate(
        loaded,
        data_dir,
        splits,
        args.n,
        options,
        args.max_train,
        args.inception_weights,
        guidance,
        args.oracle_steps,
        args.segmenter_steps,
    )
    path = os.path.join(loaded.directory, "metrics.json")
    cfg.write_json_atomic(results, path)
    print()
    print(format_table(results))
    print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> int:
    return cli.cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
