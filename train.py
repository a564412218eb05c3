"""Train the latent diffusion model: stage 1 the autoencoder, stage 2 the latent DDPM.

    python train.py                                   # demo preset, demo data set, CPU, minutes
    python train.py --preset oasis --data data/oasis --out runs/oasis
    python train.py --out runs/demo --resume          # continue a killed or finished run

Reads top to bottom: parse flags → prepare the run directory → stage 1 (autoencoder
fit, latent scale factor) → stage 2 (encode the training set once, LatentDiffusion fit
with EMA) → final weights and loss figures (samples: predict.py).

Writes the run directory (its layout: runs.py) through runs.py, which also builds the
models a config describes, and gets the diffusion stage's training rows (latents, labels,
masks) from latent_data.py; this file owns only the training itself: flags, the two fits
with their callbacks (checkpoints, resume, NaN stop), and the distribution strategy. In a
multi-worker cluster (--strategy multiworker) every worker runs this same file, and only
the chief writes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import math
import os
import re
import sys
import time
import warnings

import cli  # noqa: E402  (first: quiets TensorFlow before it loads)

cli.quiet_tensorflow()

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import config as cfg  # noqa: E402
import dataset  # noqa: E402
import figures  # noqa: E402
import hardware  # noqa: E402
import latent_data  # noqa: E402
import oracle  # noqa: E402
import pairs  # noqa: E402
import prepare  # noqa: E402
import runs  # noqa: E402
import spade  # noqa: E402
from autoencoder import AutoEncoder  # noqa: E402
from diffusion import LatentDiffusion  # noqa: E402

# Stage names: checkpoint folders, history files and log folders use them.
AE, LDM = "autoencoder", "diffusion"


# ---------------------------------------------------------------------------- flags


def parse_args(argv: list[str]) -> tuple[cfg.RunConfig, argparse.Namespace]:
    """Two passes: `--preset` first, so that every other flag defaults to the preset's value."""
    pre = cli.FlagParser(add_help=False)
    pre.add_argument("--preset", default="demo")
    known, _ = pre.parse_known_args(argv)
    try:
        defaults = cfg.preset(known.preset)
    except ValueError as e:
        raise cli.UserError(str(e)) from None

    parser = cli.FlagParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", default="demo", choices=sorted(cfg.PRESETS), help="starting point for every default below"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    cfg.add_config_arguments(parser, defaults)
    args = parser.parse_args(argv)
    return cfg.config_from_args(args, known.preset), args


def resolve_config(
    config: cfg.RunConfig, args: argparse.Namespace, argv: list[str], chief: bool = True
) -> cfg.RunConfig:
    """The configuration to train with; reads the run directory, writes nothing.

    A fresh run refuses an --out that already holds a run (on the chief: a cluster's other
    workers may find the config.json their chief has just written), and writes the linear β
    range it resolves (scaled with T unless set) into its config.
    Reopening one (--resume, --stage ldm) takes its saved config.json and applies only the
    flags typed on this command line that do not change the models (epochs, steps, learning
    rates, precision, ...).
    """
    run_dir = config.train.out
    config_path = os.path.join(run_dir, "config.json")
    if not (args.resume or config.train.stage == "ldm"):
        # A non-chief worker may find the config.json its chief has just written.
        if chief and os.path.exists(config_path):
            raise cli.UserError(f"{run_dir} already holds a run; add --resume to continue it, or choose another --out")
        validate(config)
        d = config.diffusion
        d.beta_start, d.beta_end = d.beta_range()
        return config

    if not os.path.exists(config_path):
        raise cli.UserError(f"{run_dir} holds no run (no config.json) to resume")
    saved = runs.read_config(run_dir)
    typed = cfg.explicit_flags(argv)
    for name in typed & RESUMABLE_FLAGS:
        setattr(saved.train, name, getattr(config.train, name))
    # Typed with another value than the saved run's (e.g. --seed with --stage ldm): say so.
    not_applied = typed - RESUMABLE_FLAGS - {"out", "stage"}
    ignored = []
    for section in cfg.SECTIONS:
        wanted, kept = getattr(config, section), getattr(saved, section)
        names = [f.name for f in dataclasses.fields(kept) if f.name in not_applied]
        ignored += ["--" + name.replace("_", "-") for name in names if getattr(wanted, name) != getattr(kept, name)]
    if ignored:
        warnings.warn(f"{', '.join(ignored)} ignored: {config_path} decides them for a reopened run", stacklevel=1)
    saved.train.stage = config.train.stage
    saved.train.out = run_dir  # the run may have been moved or copied since it was made
    validate(saved)
    return saved


# Flags that may change when a run is resumed: they do not change the shape of any model.
RESUMABLE_FLAGS = {
    "ae_epochs",
    "ae_steps_per_epoch",
    "ae_lr",
    "ldm_epochs",
    "ldm_steps_per_epoch",
    "lr",
    "batch_size",
    "ae_batch_size",
    "precision",
    "xla",
    "strategy",
    "worker_timeout",
    "sample_every",
    "keep_checkpoints",
    "checkpoint_minutes",
    "steps_per_execution",
    "deterministic",
}


def validate(config: cfg.RunConfig) -> None:
    try:
        config.validate()
    except ValueError as e:
        raise cli.UserError(str(e)) from None


def make_strategy(name: str, worker_timeout: int = 0) -> tf.distribute.Strategy:
    """auto: MirroredStrategy over all GPUs when there are several, else the default strategy.

    `mirrored` without GPUs mirrors over the logical CPU devices (that is how the tests run
    it); `multiworker` reads the cluster from the TF_CONFIG environment variable. A worker
    that dies breaks its connections, and the others' next collective fails at once (see
    `WorkerLost`); `worker_timeout` > 0 also bounds how long a collective waits for one that
    hangs, but TensorFlow then runs a watchdog thread per collective (BENCHMARKS.md).
    """
    if name == "multiworker":  # before any other TensorFlow call: collectives are configured at start-up
        if not os.environ.get("TF_CONFIG"):
            raise cli.UserError("--strategy multiworker needs the TF_CONFIG environment variable (README, Scale-out)")
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=worker_timeout or None)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run directory: always, but in a multi-worker cluster only
    its chief (task "chief", or worker 0 when there is none; what tf.distribute calls
    `should_checkpoint`). The other workers train in lockstep and write nothing."""
    return strategy.extended.should_checkpoint


class WorkerLost(cli.UserError):
    pass


def fit_or_stop(model: keras.Model, strategy, timeout: int, **fit_args):
    """model.fit(**fit_args); in a multi-worker cluster, a collective that failed or timed out
    (a worker died or hangs) becomes one WorkerLost line instead of a traceback."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return model.fit(**fit_args)
    try:
        return model.fit(**fit_args)
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.CancelledError) as e:
        reason = str(e).strip().splitlines()[0][:200]
        limit = f", or waited {timeout} s for it" if timeout else ""
        raise WorkerLost(
            f"lost contact with another worker (a collective operation failed{limit}: {reason}); "
            f"start every worker again with --resume to continue from the last checkpoint"
        ) from None


# ---------------------------------------------------------------------------- checkpoints


class EpochCheckpoint(keras.callbacks.Callback):
    """Save model + optimizer state as `epoch-NNNN.weights.h5`, atomically, at the end of the
    first epoch that ends `minutes` or more after the last save (or the fit's start), and
    after the stage's last epoch (`epochs`); `minutes` 0: after every epoch.

    At OASIS size a checkpoint (UNet, EMA, Adam's two moments) is ~600 MB: on a fast GPU,
    saving every epoch would take a large share of the time. A run killed between two
    checkpoints resumes from the last one, exactly (the data stream and the draws restart
    at that epoch), repeating the epochs after it. Checkpoints stay at epoch ends.

    Keras's BackupAndRestore writes its weights and its epoch counter as two files in place,
    so a kill between the two leaves a mismatched pair; here the epoch is part of the file
    name and the file is renamed into place once complete. The newest `keep` are kept.
    """

    def __init__(self, directory: str, keep: int, epochs: int, minutes: float = 0.0, clock=time.monotonic):
        super().__init__()
        self.directory, self.keep, self.epochs, self.minutes = directory, max(1, keep), epochs, minutes
        self.clock = clock
        self.last_save = clock()

    def on_train_begin(self, logs=None):
        self.last_save = self.clock()

    def on_epoch_end(self, epoch, logs=None):
        due = self.clock() - self.last_save >= 60 * self.minutes
        if not (due or epoch + 1 >= self.epochs):
            return
        os.makedirs(self.directory, exist_ok=True)
        final = os.path.join(self.directory, f"epoch-{epoch + 1:04d}.weights.h5")
        tmp = os.path.join(self.directory, f"partial-epoch-{epoch + 1:04d}.weights.h5")
        self.model.save_weights(tmp)
        os.replace(tmp, final)
        self.last_save = self.clock()
        for old in list_checkpoints(self.directory)[: -self.keep]:
            os.remove(old)


def list_checkpoints(directory: str) -> list[str]:
    """Complete checkpoints, oldest first (partial ones never match the pattern)."""
    return sorted(glob.glob(os.path.join(directory, "epoch-[0-9][0-9][0-9][0-9].weights.h5")))


def restore_latest(model: keras.Model, directory: str, learning_rate: float | None) -> int:
    """Load the newest checkpoint that loads into a built, compiled `model`; returns its epoch
    (0 if there is none).

    A damaged checkpoint (cut short by a partial copy or a failing disk) is skipped with one
    warning naming it and why, and the next older one is tried; UserError when none loads
    (`run` has refused an optimizer of the other kind already: `check_loss_scaling`). The
    caller truncates the history to the epoch returned. The optimizer must be built first,
    or Keras skips its state without a word (compile builds it: building it again would add
    a second set of a LossScaleOptimizer's variables). The checkpoint also holds the old
    learning rate: `learning_rate` wins; None keeps the optimizer's schedule
    (`runs.learning_rate`), which follows the restored step counter.
    """
    checkpoints = list_checkpoints(directory)
    if not checkpoints:
        return 0
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    for path in reversed(checkpoints):
        try:
            runs.load_weights(model, path, built_from="this run's config.json")
        except cli.UserError as e:
            warnings.warn(f"skipping a checkpoint: {e}", stacklevel=2)
            continue
        if learning_rate is not None:
            model.optimizer.learning_rate = learning_rate
        return int(re.search(r"epoch-(\d+)", os.path.basename(path)).group(1))
    raise cli.UserError(
        f"none of the {len(checkpoints)} checkpoint(s) in {directory} loads (see the warnings above); "
        f"restore them from a copy, or delete the folder to train this stage from scratch"
    )


def constant_rate(schedule: str, rate: float) -> float | None:
    """`rate` for restore_latest when the stage trains at a constant rate; None under a schedule."""
    return rate if schedule == "constant" else None


def check_loss_scaling(directory: str, precision: str) -> None:
    """UserError when a checkpoint in `directory` and a resume in `precision` disagree on loss scaling.

    Under mixed_float16 the optimizer is a LossScaleOptimizer around Adam, otherwise Adam
    alone: Keras would load a checkpoint of the other kind with only a warning and zeros
    for Adam's step count and moments, and the EMA warm-up would start again. The
    .weights.h5 file of a loss-scaled optimizer holds its Adam under
    "optimizer/inner_optimizer". An unreadable file passes: loading it reports the damage.
    """
    scaled = precision == "mixed_float16"
    for path in list_checkpoints(directory):
        try:
            with h5py.File(path, "r") as f:
                saved_scaled = "optimizer/inner_optimizer" in f
        except OSError:
            continue
        if saved_scaled != scaled:
            needed = "mixed_float16" if saved_scaled else "float32 or mixed_bfloat16"
            raise cli.UserError(
                f"{path} was saved {'with' if saved_scaled else 'without'} float16 loss scaling, and this resume "
                f"would train in {precision}: resume with --precision {needed} (the optimizer state, Adam's "
                f"moments and the EMA warm-up, does not carry across)"
            )


def truncate_history(csv_path: str, epochs_done: int) -> None:
    """Drop CSV rows of epochs after the restored checkpoint, so each epoch appears once."""
    if not os.path.exists(csv_path):
        return
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    # A kill while CSVLogger wrote a row can leave it cut short: complete rows only.
    kept = rows[:1] + [r for r in rows[1:] if len(r) == len(rows[0]) and int(r[0]) < epochs_done]
    tmp = csv_path + ".tmp"
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, csv_path)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Like keras' TerminateOnNaN, but raises at once instead of letting the epoch end.

    TerminateOnNaN only sets `stop_training`, after which Keras still runs the epoch-end
    callbacks, and the checkpoint would save NaN weights over the last good state.
    """

    def __init__(self, stage: str):
        super().__init__()
        self.stage, self.epoch = stage, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(
                f"{self.stage} loss became {float(loss)} in epoch {self.epoch + 1} (batch {batch + 1}); "
                f"stopped, the last good checkpoint is kept: lower the learning rate or check the data"
            )


class NonFiniteLoss(cli.UserError):
    pass


def stage_callbacks(
    run_dir: str, stage: str, config: cfg.RunConfig, epochs: int, resumed: bool, chief: bool = True
) -> list[keras.callbacks.Callback]:
    """The callbacks both stages share (all but the NaN check write files: the chief's only).
    Order matters: the NaN check runs first, and the CSV row is written before the
    checkpoint, so a kill in between repeats the row (truncated on resume) rather than losing it."""
    if not chief:
        return [StopOnNonFiniteLoss(stage)]
    return [
        StopOnNonFiniteLoss(stage),
        keras.callbacks.CSVLogger(os.path.join(run_dir, f"history_{stage}.csv"), append=resumed),
        EpochCheckpoint(
            os.path.join(run_dir, "checkpoints", stage),
            config.train.keep_checkpoints,
            epochs,
            config.train.checkpoint_minutes,
        ),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs", stage), profile_batch=0),
    ]


# ---------------------------------------------------------------------------- stage 1


def train_autoencoder(config: cfg.RunConfig, splits: dict, strategy, resumed: bool) -> AutoEncoder:
    """Fit the autoencoder on (x, x) with --ae-loss; validation SSIM and PSNR each epoch.

    The training images are one endless seeded stream (an epoch is `ae_steps_per_epoch`
    batches, or one pass), from memory when the set is small; a resumed run skips the
    images of the epochs already done, so it sees exactly the batches an uninterrupted
    run would.
    """
    run_dir, t = config.train.out, config.train
    size, batch = config.data.image_size, t.autoencoder_batch_size
    chief = is_chief(strategy)
    with strategy.scope():
        steps, per_execution = runs.epoch_steps(
            t.ae_steps_per_epoch, len(splits["train"]), batch, t.steps_per_execution
        )
        autoencoder = runs.build_autoencoder(config)
        runs.compile_autoencoder(autoencoder, config, per_execution, total_steps=t.ae_epochs * steps)
        initial_epoch = (
            restore_latest(
                autoencoder, os.path.join(run_dir, "checkpoints", AE), constant_rate(t.autoencoder_lr_schedule, t.ae_lr)
            )
            if resumed
            else 0
        )

    train_ds = dataset.make_dataset(
        splits["train"],
        size,
        batch,
        flip=config.data.flip,
        augment=dataset.Augmentation() if config.data.augment else None,
        seed=t.seed,
        repeat=True,
        drop_remainder=True,
        skip=initial_epoch * steps * batch,
        in_memory=None,  # decoded once when it fits (the demo set: 1.5 MB as float32; OASIS: 158 MB as uint8)
    ).map(lambda x: (x, x))
    val_ds = None
    if splits["validate"]:
        val_ds = dataset.make_dataset(splits["validate"], size, batch, shuffle=False, in_memory=None)
        val_ds = val_ds.map(lambda x: (x, x))
    history_csv = os.path.join(run_dir, f"history_{AE}.csv")
    if chief:
        truncate_history(history_csv, initial_epoch)
    if initial_epoch:
        print(f"resuming the autoencoder after epoch {initial_epoch}")
    fit_or_stop(
        autoencoder,
        strategy,
        t.worker_timeout,
        x=train_ds,
        validation_data=val_ds,
        # ignore_errors() hides the dataset's length from Keras, which would warn at its end
        validation_steps=-(-len(splits["validate"]) // batch) if val_ds else None,
        epochs=t.ae_epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps,
        callbacks=stage_callbacks(run_dir, AE, config, t.ae_epochs, resumed=initial_epoch > 0, chief=chief),
        shuffle=False,  # the tf.data pipeline shuffles; Keras would only warn
        verbose=2,
    )
    if not chief:
        return autoencoder
    runs.save_weights(autoencoder.encoder, os.path.join(run_dir, "encoder.weights.h5"))
    runs.save_weights(autoencoder.decoder, os.path.join(run_dir, "decoder.weights.h5"))
    figures.loss_curves(
        history_csv, os.path.join(run_dir, "figures", "autoencoder_loss.png"), f"autoencoder ({t.ae_loss})"
    )
    if splits["validate"]:
        originals = next(
            iter(
                dataset.make_dataset(
                    splits["validate"][:: max(1, len(splits["validate"]) // 8)], size, 8, shuffle=False
                )
            )
        )
        latents = autoencoder.encoder(originals, training=False)
        recons = autoencoder.decoder(latents, training=False)
        figures.reconstructions(
            originals.numpy(), latents.numpy(), recons.numpy(), os.path.join(run_dir, "figures", "reconstructions.png")
        )
    return autoencoder


# ---------------------------------------------------------------------------- stage 2


class TensorBoardSamples(keras.callbacks.Callback):
    """Every `every` epochs, decode a few samples of the EMA UNet being trained (unconditional,
    DDIM 50 steps, seed 0) and log them as TensorBoard images."""

    def __init__(self, run: runs.Run, log_dir: str, every: int, n: int = 8):
        super().__init__()
        self.run, self.every, self.n = run, every, n
        self.writer = tf.summary.create_file_writer(log_dir)

    def on_epoch_end(self, epoch, logs=None):
        if not self.every or (epoch + 1) % self.every:
            return
        images = runs.generate(self.run, self.n, cfg.SamplingOptions(batch_size=self.n), progress=False).images
        with self.writer.as_default():
            tf.summary.image("samples", (images + 1.0) / 2.0, step=epoch + 1, max_outputs=self.n)


def train_diffusion(
    config: cfg.RunConfig,
    autoencoder: AutoEncoder,
    latents: np.ndarray,
    strategy,
    resumed: bool,
    cond: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> LatentDiffusion:
    """Fit the UNet on `latents` (N, h, w, C), already × scale factor, conditioned on `cond`
    (N, K) and the tissue masks `mask` (N, S, S), uint8 class indices
    (`latent_data.training_masks`), when given; EMA weights are kept for sampling."""
    for table in (cond, mask):
        if table is not None and len(table) != len(latents):  # an image failed to decode since it was checked
            raise cli.UserError(f"{len(latents)} training latents but {len(table)} conditions; check the data folder")
    run_dir, t = config.train.out, config.train
    chief = is_chief(strategy)
    # The UNet's initial weights from the seed alone, whatever ran before in this process (the
    # mask decoder is trained, or skipped on a resume, between the autoencoder and here).
    keras.utils.set_random_seed(t.seed)
    with strategy.scope():
        steps, per_execution = runs.epoch_steps(
            t.ldm_steps_per_epoch, len(latents), t.batch_size, t.steps_per_execution
        )
        model = runs.build_diffusion(config)
        runs.compile_diffusion(model, config, per_execution, total_steps=t.ldm_epochs * steps)
        initial_epoch = (
            restore_latest(model, os.path.join(run_dir, "checkpoints", LDM), constant_rate(t.lr_schedule, t.lr))
            if resumed
            else 0
        )
    print(
        f"diffusion: {len(latents)} latents of shape {latents.shape[1:]}, {steps} steps per epoch, "
        f"{per_execution} per execution"
    )
    skip = initial_epoch * steps * t.batch_size
    latent_ds = latent_data.latent_batches(
        latents, t.batch_size, t.seed, skip=skip, cond=cond, tissue_classes=mask, mask_input=config.condition.mask_input
    )
    history_csv = os.path.join(run_dir, f"history_{LDM}.csv")
    if chief:
        truncate_history(history_csv, initial_epoch)
    if initial_epoch:
        print(f"resuming the diffusion model after epoch {initial_epoch}")
    callbacks = stage_callbacks(run_dir, LDM, config, t.ldm_epochs, resumed=initial_epoch > 0, chief=chief)
    run = runs.Run(run_dir, config, autoencoder, model)  # samples with the EMA network as it trains
    if chief:
        samples_dir = os.path.join(run_dir, "logs", LDM, "samples")
        callbacks.append(TensorBoardSamples(run, samples_dir, t.sample_every))
    fit_or_stop(
        model,
        strategy,
        t.worker_timeout,
        x=latent_ds,
        epochs=t.ldm_epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps,
        callbacks=callbacks,
        shuffle=False,
        verbose=2,
    )
    if not chief:
        return model
    runs.save_weights(model.network, os.path.join(run_dir, "unet.weights.h5"))
    runs.save_weights(model.ema_network, os.path.join(run_dir, "unet_ema.weights.h5"))
    figures.loss_curves(history_csv, os.path.join(run_dir, "figures", "diffusion_loss.png"), "latent diffusion (ε MSE)")
    # The samples are predict.py's (`make demo` runs it next); TensorBoard has some every --sample-every epochs.
    return model


# ---------------------------------------------------------------------------- main


def scale_with_replicas(config: cfg.RunConfig, replicas: int) -> None:
    """--scale-with-replicas on a fresh run: the global batch × `replicas` (each replica keeps
    --batch-size images) and both learning rates × sqrt(`replicas`), the square-root rule for
    Adam (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
    Algorithms"); config.json records the scaled values, which a resume keeps."""
    t = config.train
    t.batch_size *= replicas
    if t.ae_batch_size is not None:
        t.ae_batch_size *= replicas
    t.lr *= math.sqrt(replicas)
    t.ae_lr *= math.sqrt(replicas)
    t.scale_with_replicas = False  # applied: a resume must not scale again
    print(
        f"scaled for {replicas} replicas: global batch {t.batch_size} (autoencoder {t.autoencoder_batch_size}), "
        f"lr {t.lr:.3g}, ae lr {t.ae_lr:.3g}"
    )


def run(argv: list[str]) -> None:
    config, args = parse_args(argv)
    strategy = make_strategy(config.train.strategy, config.train.worker_timeout)  # first: see make_strategy
    chief = is_chief(strategy)
    config = resolve_config(config, args, argv, chief)
    if config.terminal_alpha_bar is None:  # a fresh run, or one made before it was recorded
        config.terminal_alpha_bar = float(runs.noise_schedule(config).alphas_cumprod[-1])
    # Find the data before anything is written: a bad --data leaves no run directory behind.
    data_dir = prepare.resolve_data_dir(config.data.data)
    splits = dataset.find_splits(data_dir, seed=config.train.seed)
    labels = latent_data.find_conditions(config, data_dir, splits)  # and bad labels neither
    train_masks = latent_data.find_training_masks(config, data_dir, splits)  # nor bad masks
    replicas = strategy.num_replicas_in_sync
    reopened = args.resume or config.train.stage == "ldm"
    if config.train.scale_with_replicas and not reopened:
        scale_with_replicas(config, replicas)
    precision = hardware.resolve_precision(config.train.precision)
    run_dir = config.train.out
    if reopened:  # before config.json is rewritten with this command line's flags
        if not os.path.exists(os.path.join(run_dir, "decoder.weights.h5")):
            check_loss_scaling(os.path.join(run_dir, "checkpoints", AE), precision)
        check_loss_scaling(os.path.join(run_dir, "checkpoints", LDM), precision)
    if chief:  # the other workers of a cluster write nothing (is_chief)
        runs.start_run_dir(config)
    keras.config.set_dtype_policy(precision)
    keras.utils.set_random_seed(config.train.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()  # for the rest of the process: TF has no off switch
    print(cfg.describe(config), flush=True)
    d, terminal = config.diffusion, config.terminal_alpha_bar
    print(
        f"noise schedule: {d.schedule}, T = {d.timesteps}, terminal alpha_bar = {terminal:.3g} "
        f"(SNR {terminal / (1 - terminal):.3g})"
        + ("; training never sees the pure noise that sampling starts from" if terminal > 0.01 else ""),
        flush=True,
    )
    with strategy.scope():
        xla = runs.train_with_xla(config)
    if config.train.xla == "on" and not xla:  # cli prints it as one `warning:` line
        warnings.warn(f"--xla on is turned off: XLA cannot compile a train step over {replicas} replicas", stacklevel=1)
    print(
        f"strategy: {type(strategy).__name__}, replicas: {replicas}, precision: {precision}, "
        f"XLA: {'on' if xla else 'off'}",
        flush=True,
    )

    print(f"data: {', '.join(f'{k} {len(v)}' for k, v in splits.items())} images", flush=True)

    ae_done = config.scale_factor is not None and os.path.exists(os.path.join(run_dir, "decoder.weights.h5"))
    if config.train.stage == "ldm" and not ae_done:
        raise cli.UserError(f"--stage ldm needs a trained autoencoder in {run_dir}; run --stage ae first")

    if ae_done:
        with strategy.scope():
            autoencoder = runs.build_autoencoder(config)
        runs.load_weights(autoencoder.encoder, os.path.join(run_dir, "encoder.weights.h5"))
        runs.load_weights(autoencoder.decoder, os.path.join(run_dir, "decoder.weights.h5"))
        print("autoencoder: trained, loaded from the run directory")
    else:
        autoencoder = train_autoencoder(config, splits, strategy, resumed=args.resume)

    train_diffusion_now = config.train.stage in ("all", "ldm")
    latents = None
    if config.scale_factor is None or train_diffusion_now:
        # Encoded once, for both the scale factor and stage 2 (with the mirror images if --flip).
        latents = latent_data.encode_training_set(autoencoder.encoder, config, splits["train"])
    if config.scale_factor is None:
        config.scale_factor = float(1.0 / latents.std())
        config.latent_max_abs = float(np.abs(latents).max() * config.scale_factor)
        if chief:
            cfg.save_config(config, os.path.join(run_dir, "config.json"))
        print(
            f"latent scale factor: {config.scale_factor:.4f} (1 / std of {latents.size} latent values); "
            f"scaled latents lie within ±{config.latent_max_abs:.2f}, where samplers clip their x0 estimate"
        )

    decoder_done = os.path.exists(os.path.join(run_dir, runs.MASK_DECODER_WEIGHTS))
    if train_masks is not None and config.train.mask_decoder_steps and chief and not decoder_done:
        if latents is None:  # --stage ae on a run whose scale factor is measured: encode for it alone
            latents = latent_data.encode_training_set(autoencoder.encoder, config, splits["train"])
        t = config.train
        pairs.train_mask_decoder(
            latents,
            latent_data.masks_in_latent_order(config, train_masks),
            os.path.join(run_dir, runs.MASK_DECODER_WEIGHTS),
            t.mask_decoder_steps,
            t.autoencoder_batch_size,  # small steps learn more per second here, as for the autoencoder
            t.seed,
        )

    spade_done = os.path.exists(os.path.join(run_dir, spade.WEIGHTS))
    if runs.has_spade_decoder(config) and chief and not spade_done:  # conditioned on masks: train_masks is read
        spade_decoder, _ = spade.train(
            config,
            autoencoder.encoder,
            autoencoder.decoder,
            oracle.load_images(splits["train"], config.data.image_size),
            train_masks,
            config.train.spade_decoder_steps,
            config.train.autoencoder_batch_size,
            xla=xla,
        )
        runs.save_weights(spade_decoder, os.path.join(run_dir, spade.WEIGHTS))

    if train_diffusion_now:
        resumed = args.resume or config.train.stage == "ldm"
        cond, mask = latent_data.training_conditions(config, labels), latent_data.training_masks(config, train_masks)
        scaled = latents * config.scale_factor
        train_diffusion(config, autoencoder, scaled, strategy, resumed=resumed, cond=cond, mask=mask)
    print(f"done: {run_dir}" + (f"; samples: python predict.py --run {run_dir}" if train_diffusion_now else ""))


def main(argv: list[str] | None = None) -> int:
    policy = keras.config.dtype_policy()  # `run` sets the global policy; a caller in this process keeps its own
    try:
        return cli.cli(run, argv)
    finally:
        keras.config.set_dtype_policy(policy)


if __name__ == "__main__":
    sys.exit(main())
