"""The run directory and the models its config.json describes.

A run directory (runs/NAME/) holds everything one training run made:

    config.json                                   RunConfig, with the latent scale factor
    encoder.weights.h5, decoder.weights.h5         stage 1 result
    mask_decoder.weights.h5, spade_decoder.weights.h5   after stage 1, when the data has masks
    unet.weights.h5, unet_ema.weights.h5           stage 2 result (sampling uses the EMA)
    checkpoints/{autoencoder,diffusion}/epoch-NNNN.weights.h5    model + optimizer state
    history_autoencoder.csv, history_diffusion.csv
    figures/*.png, logs/{autoencoder,diffusion}/  (TensorBoard)
    predictions/ (predict.py), metrics.json (evaluate.py)

This module owns that folder for every script: creating and probing it, finding the
newest run, reading config.json, building (and compiling, for training) the autoencoder
and the LatentDiffusion model a config describes, saving and loading their weights with
one-line errors, and sampling a loaded run in batches (`generate`, with one
`config.SamplingOptions`; predict.py, evaluate.py and train.py's figures). Checkpoints and
histories are written by train.py's callbacks.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import warnings

import keras
import numpy as np
import tensorflow as tf

import cli
import conditioning
import config as cfg
import dataset
import figures
import hardware
import keras_fixes
import masks
import metrics
import prepare
import spade
from autoencoder import AutoEncoder, build_mask_decoder
from cli import UserError
from diffusion import LatentDiffusion, NoiseSchedule, make_schedule
from modules import OriginalUNet, UNet
from samplers import Sampler

RUNS_ROOT = cli.RUNS_ROOT
MASK_DECODER_WEIGHTS = "mask_decoder.weights.h5"  # train.py's mask decoder (latent -> tissue mask)


# ---------------------------------------------------------------------------- the folder


def check_writable(run_dir: str) -> None:
    """Fail before training, not after an hour, when the run directory can't be written."""
    probe = os.path.join(run_dir, ".write-test")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 2**20)  # 1 MiB: catches a full disk too
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {run_dir}: {e.strerror}") from None


def start_run_dir(config: cfg.RunConfig) -> None:
    """Create the run directory (or reopen it), check that it takes files, save config.json."""
    run_dir = config.train.out
    created = not os.path.exists(run_dir)
    try:
        os.makedirs(os.path.join(run_dir, "figures"), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {run_dir}: {e.strerror}") from None
    try:
        check_writable(run_dir)
    except UserError:
        if created:  # leave no empty run folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    cfg.save_config(config, os.path.join(run_dir, "config.json"))


def resolve_run(run: str | None, runs_root: str = RUNS_ROOT) -> str:
    """The run folder for --run: a path, a name under `runs_root`, or (None) the run under
    `runs_root` whose config.json was written last. UserError when there is none."""
    if run is None:
        configs = glob.glob(os.path.join(runs_root, "*", "config.json"))
        if not configs:
            raise UserError(
                f"no runs under {runs_root}/: train one first (python train.py --out {runs_root}/NAME) or pass --run"
            )
        return os.path.dirname(max(configs, key=os.path.getmtime))
    for candidate in (run, os.path.join(runs_root, run)):
        if os.path.isdir(candidate):
            return candidate
    raise UserError(f"run not found: {run} (neither a folder nor {os.path.join(runs_root, run)})")


def read_config(run_dir: str) -> cfg.RunConfig:
    """The run's config.json; UserError when it is missing or not a RunConfig."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{run_dir} holds no run (no config.json)")
    try:
        return cfg.load_config(config_path)
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{config_path} is not a valid run config: {e}") from None


# ---------------------------------------------------------------------------- the models of a config


def run_splits(config: cfg.RunConfig) -> tuple[str, dict[str, list[str]]]:
    """The run's data folder and its split, exactly as train.py made it (UserError if missing)."""
    data_dir = prepare.resolve_data_dir(config.data.data)
    return os.path.abspath(data_dir), dataset.find_splits(data_dir, seed=config.train.seed)


def build_autoencoder(config: cfg.RunConfig) -> AutoEncoder:
    """The autoencoder of `config`, built (its constructor creates the weights). Under a strategy
    of several replicas (call inside its scope) BatchNorm averages its batch statistics over
    all of them, so that the statistics are the global batch's, as on one device."""
    return AutoEncoder(**config.autoencoder_kwargs(), synchronized=replicas() > 1)


def replicas() -> int:
    """Replicas of the distribution strategy in scope (1 outside any)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


WARMUP_SHARE = 0.05  # --lr-schedule cosine: warm-up over this share of the stage's steps
FINAL_LR_SHARE = 0.05  # ... and decay to this share of the rate


def learning_rate(rate: float, schedule: str = "constant", total_steps: int = 0):
    """The learning rate of a stage of `total_steps` optimizer steps: `rate` (constant), or for
    "cosine" a keras CosineDecay that rises linearly from 0 to `rate` over the first
    `WARMUP_SHARE` of the steps and then follows rate · (f + (1 − f) (1 + cos(π s / S)) / 2),
    f = `FINAL_LR_SHARE`, over the S steps left. The schedule reads the optimizer's step
    counter, which checkpoints keep, so a resumed run goes on along the same curve."""
    if schedule == "constant" or total_steps <= 0:
        return rate
    warmup = max(1, round(WARMUP_SHARE * total_steps))
    return keras.optimizers.schedules.CosineDecay(
        0.0, max(1, total_steps - warmup), alpha=FINAL_LR_SHARE, warmup_target=rate, warmup_steps=warmup
    )


def make_optimizer(rate) -> keras.optimizers.Optimizer:
    """Adam (`keras_fixes.FusedAdam`) at `rate` (a float or a schedule, `learning_rate`); under
    the mixed_float16 policy wrapped in dynamic loss scaling whose replicas agree on skipping a
    step (`keras_fixes.LossScaleOptimizer`). Keras would wrap it in its own `LossScaleOptimizer`,
    which lets one replica's overflow reach every weight."""
    adam = keras_fixes.FusedAdam(rate)
    if keras.config.dtype_policy().name == "mixed_float16":
        return keras_fixes.LossScaleOptimizer(adam)
    return adam


def epoch_steps(steps_per_epoch: int, examples: int, batch_size: int, requested: int) -> tuple[int, int]:
    """(steps per epoch, steps per execution) for --*-steps-per-epoch `steps_per_epoch` (0: one pass
    over `examples` in batches of `batch_size`) and --steps-per-execution `requested`.

    Keras runs whole executions of `steps_per_execution` steps, so it must divide the epoch:
    otherwise an epoch would run more steps than asked, and a resumed run would no longer
    start at the batch where the checkpoint left off. Given steps per epoch keep their
    number, and take the largest divisor up to `requested`; a one-pass epoch is rounded down
    to a whole number of executions of between `requested` / 2 and `requested` steps, the
    size that keeps most of the pass (the stream is endless and seeded, so the few batches
    left over go to the next epoch). Under a tf.distribute strategy (call inside its
    scope) one step per execution: Keras' multi-step loop fails there ("You must feed a
    value for placeholder tensor", keras-team/keras#19246, seen here with MirroredStrategy
    and MultiWorkerMirroredStrategy on CPUs).
    """
    cap = 1 if tf.distribute.has_strategy() else max(1, requested)
    if steps_per_epoch:
        divisors = [k for k in range(1, min(cap, steps_per_epoch) + 1) if steps_per_epoch % k == 0]
        return steps_per_epoch, divisors[-1]
    one_pass = max(1, examples // batch_size)
    # The execution size in [cap/2, cap] that keeps the most of the pass (the larger on ties).
    sizes = range(max(1, min(cap, one_pass) // 2), min(cap, one_pass) + 1)
    execution = max(sizes, key=lambda k: (one_pass // k * k, k))
    return one_pass // execution * execution, execution


def compile_autoencoder(
    autoencoder: AutoEncoder, config: cfg.RunConfig, steps_per_execution: int = 1, total_steps: int = 0
) -> None:
    """Adam on --ae-loss (`metrics.RECONSTRUCTION_LOSSES`) at --ae-lr along --ae-lr-schedule (None: --lr-schedule) over
    `total_steps`; per-image SSIM and PSNR, whole and in the brain's box, as metrics; XLA per
    --xla; `steps_per_execution` (`epoch_steps`). Call inside the strategy's scope (bench.py
    times this step)."""
    t = config.train
    autoencoder.compile(
        optimizer=make_optimizer(learning_rate(t.ae_lr, t.autoencoder_lr_schedule, total_steps)),
        loss=metrics.RECONSTRUCTION_LOSSES[t.ae_loss],
        metrics=[metrics.ssim, metrics.psnr, metrics.brain_ssim, metrics.brain_psnr],
        jit_compile=train_with_xla(config),
        steps_per_execution=steps_per_execution,
    )


def noise_schedule(config: cfg.RunConfig) -> NoiseSchedule:
    """The run's noise schedule (linear β over `DiffusionConfig.beta_range()`, or cosine)."""
    d = config.diffusion
    return make_schedule(d.schedule, d.timesteps, *d.beta_range())


def build_diffusion(config: cfg.RunConfig) -> LatentDiffusion:
    """The UNet of the run's layout (`UNet`, or the original design's `OriginalUNet`) + noise
    schedule + EMA copy, built for the run's latent shape."""
    network = OriginalUNet if config.unet.unet_layout == "original" else UNet
    model = LatentDiffusion(
        network(**config.unet_kwargs()),
        noise_schedule(config),
        ema_decay=config.diffusion.ema_decay,
        min_snr_gamma=config.diffusion.min_snr_gamma,
        seed=config.train.seed,
        cond_dropout=config.condition.cond_dropout,
        mask_dropout=config.condition.mask_dropout,
        uncond_dropout=config.condition.uncond_dropout,
        prediction=config.diffusion.prediction,
    )
    h, c = config.latent_size, config.autoencoder.latent_channels
    model.build((None, h, h, c))
    return model


def compile_diffusion(
    model: LatentDiffusion, config: cfg.RunConfig, steps_per_execution: int = 1, total_steps: int = 0
) -> None:
    """Adam at --lr along --lr-schedule over `total_steps`, XLA per --xla, `steps_per_execution`
    (`epoch_steps`). Call inside the strategy's scope (bench.py times this step)."""
    model.compile(
        optimizer=make_optimizer(learning_rate(config.train.lr, config.train.lr_schedule, total_steps)),
        jit_compile=train_with_xla(config),
        steps_per_execution=steps_per_execution,
    )


def train_with_xla(config: cfg.RunConfig) -> bool:
    """`hardware.resolve_xla` for the run's --xla and --precision (both may be `auto`) and the
    replicas of the strategy in scope."""
    return hardware.resolve_xla(config.train.xla, hardware.resolve_precision(config.train.precision), replicas())


# ---------------------------------------------------------------------------- weights


def save_weights(model: keras.Model, path: str) -> None:
    """`model.save_weights` through a temporary file renamed into place."""
    tmp = path.replace(".weights.h5", ".partial.weights.h5")
    model.save_weights(tmp)
    os.replace(tmp, path)


def load_weights(model: keras.Model, path: str, built_from: str = "config.json") -> None:
    """`model.load_weights(path)`, with a one-line UserError when the file does not fit the model
    ("weights in PATH do not match `built_from` (...)") or cannot be read.

    Keras reports a mismatch as a ValueError of many lines (and a warning per skipped
    container); the message keeps its first sentence, e.g. "A total of 119 objects could
    not be loaded", and the warnings are dropped. Warnings of a successful load are passed on.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except (ValueError, KeyError) as e:
            reason = str(e).strip().split("\n")[0].split(". Example")[0]
            raise UserError(f"weights in {path} do not match {built_from} ({reason})") from None
        except OSError as e:
            raise UserError(f"cannot read {path}: {e}") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# ---------------------------------------------------------------------------- a trained run


@dataclasses.dataclass
class Run:
    """A trained run, ready to sample: `diffusion.ema_network` holds unet_ema.weights.h5,
    `autoencoder.decoder` holds decoder.weights.h5 (the encoder and the mask decoder are
    loaded only on request), `spade_decoder` spade_decoder.weights.h5 when the run has one
    (it decodes the latents generated for a mask), and `sampler` samples with the EMA network
    (one per run, so its traces are reused)."""

    directory: str
    config: cfg.RunConfig
    autoencoder: keras.Model
    diffusion: keras.Model
    mask_decoder: keras.Model | None = None  # mask_decoder.weights.h5, when loaded (load_run(masks=True))
    spade_decoder: keras.Model | None = None  # spade_decoder.weights.h5 (`has_spade_decoder`)
    sampler: Sampler = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self.sampler = Sampler(
            self.diffusion.ema_network, self.diffusion.schedule, prediction=self.diffusion.prediction
        )

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.directory))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        h = self.config.latent_size
        return (h, h, self.config.autoencoder.latent_channels)


def load_run(run_dir: str, encoder: bool = False, precision: str = "float32", mask_decoder: bool = False) -> Run:
    """Rebuild the models of `run_dir` from its config.json and load the trained weights
    (the encoder's too when `encoder`, the mask decoder's when `mask_decoder`). They compute
    in `precision` whatever precision the run trained in (weights are float32 either way;
    `auto` as train.py's --precision): under a mixed policy the UNet and the decoder run in
    bf16/fp16, while the samplers' state and arithmetic and the networks' outputs stay
    float32 (the mask decoder is float32 throughout).

    UserError (one line) for a folder without config.json, an unreadable config, a run
    whose stages are not trained yet (or without the mask decoder asked for), and weights
    that do not fit the config.
    """
    config = read_config(run_dir)
    needed = ["decoder.weights.h5", "unet_ema.weights.h5"] + (["encoder.weights.h5"] if encoder else [])
    needed += [spade.WEIGHTS] if has_spade_decoder(config) else []
    missing = [name for name in needed if not os.path.exists(os.path.join(run_dir, name))]
    if missing or config.scale_factor is None:
        what = ", ".join(missing) if missing else "no latent scale factor in config.json"
        raise UserError(
            f"{run_dir} is not fully trained yet ({what}); finish it with: python train.py --out {run_dir} --resume"
        )

    with hardware.dtype_policy(hardware.resolve_precision(precision)):
        autoencoder = build_autoencoder(config)
        diffusion = build_diffusion(config)
    load_weights(autoencoder.decoder, os.path.join(run_dir, "decoder.weights.h5"))
    load_weights(diffusion.ema_network, os.path.join(run_dir, "unet_ema.weights.h5"))
    if encoder:
        load_weights(autoencoder.encoder, os.path.join(run_dir, "encoder.weights.h5"))
    decoder_of_masks = None
    if mask_decoder:
        path = os.path.join(run_dir, MASK_DECODER_WEIGHTS)
        if not os.path.exists(path):
            raise UserError(
                f"{run_dir} has no mask decoder ({MASK_DECODER_WEIGHTS}): train.py trains one after the "
                "autoencoder when the data has tissue masks (--mask-decoder-steps)"
            )
        with hardware.dtype_policy("float32"):
            decoder_of_masks = build_mask_decoder(config.autoencoder.latent_channels, autoencoder.downsample_factor)
        load_weights(decoder_of_masks, path)
    spade_decoder = None
    if has_spade_decoder(config):
        with hardware.dtype_policy(hardware.resolve_precision(precision)):
            spade_decoder = spade.build(config)
        load_weights(spade_decoder, os.path.join(run_dir, spade.WEIGHTS))
    return Run(run_dir, config, autoencoder, diffusion, decoder_of_masks, spade_decoder)


def has_spade_decoder(config: cfg.RunConfig) -> bool:
    """Whether the run trains (and then has) a SPADE decoder: conditioned on the tissue mask,
    with --spade-decoder-steps."""
    return bool(config.mask_channels and config.train.spade_decoder_steps)


# ---------------------------------------------------------------------------- sampling a run


def batch_seed(seed: int, index: int) -> int:
    """The sampler seed of batch `index` for the user's `seed`, in [0, 2**31).

    Derived by NumPy's SeedSequence, so distinct (seed, index) pairs do not share noise
    (seed + index would: batch 1 of seed 0 would repeat batch 0 of seed 1).
    """
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] >> 1)


@dataclasses.dataclass
class Samples:
    """Output of `generate` for n samples.

    images: (n, H, W, 1) float32 in [-1, 1]; latents: (n, h, w, c) on the training scale
    (× scale_factor); states: (K, n, h, w, c) latents at K states from the initial noise
    (states[0] = x_T) to the sample (states[-1] = latents), or None; timesteps: (K,)
    noising steps of each state (T … 0), or None.
    """

    images: np.ndarray
    latents: np.ndarray
    states: np.ndarray | None = None
    timesteps: np.ndarray | None = None


def _in_batches(fn, x: np.ndarray, batch_size: int, empty: np.ndarray) -> np.ndarray:
    """fn applied to x in slices of `batch_size` along the first axis, as one NumPy array;
    `empty` when x is."""
    out = [np.asarray(fn(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else empty


def decode(run: Run, latents: np.ndarray, batch_size: int, tissue_masks: np.ndarray | None = None) -> np.ndarray:
    """Images (N, H, W, 1) in [-1, 1] of scaled latents (N, h, w, c): decoder(latents / scale_factor),
    or, with `tissue_masks` (uint8 class indices (N, H, W) at the run's image size) and a run
    that has a SPADE decoder, spade_decoder(latents / scale_factor, one_hot(masks))."""
    empty = np.zeros((0, *latents.shape[1:3], 1), np.float32)
    z = latents / run.config.scale_factor
    if tissue_masks is None or run.spade_decoder is None:
        return _in_batches(lambda z: run.autoencoder.decoder(z, training=False), z, batch_size, empty)
    rows = np.arange(len(z))
    return _in_batches(
        lambda r: run.spade_decoder([tf.constant(z[r]), spade.one_hot(tissue_masks[r])], training=False),
        rows,
        batch_size,
        empty,
    )


def paired(run: Run, samples: Samples, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image + mask pairs of generated `samples`: (images (N, H, W, 1) in [-1, 1], masks uint8
    (N, H, W)), the masks read off their latents by the run's mask decoder (`decode_masks`),
    the images their latents decoded given those masks by the SPADE decoder when the run has
    one (`decode`), else the samples' own images."""
    classes = decode_masks(run, samples.latents, batch_size)
    if run.spade_decoder is None:
        return samples.images, classes
    return decode(run, samples.latents, batch_size, tissue_masks=classes), classes


def reconstruct(run: Run, images: np.ndarray, batch_size: int, tissue_masks: np.ndarray | None = None) -> np.ndarray:
    """decoder(encoder(images)) of images (N, H, W, 1) in [-1, 1], in batches (the run loaded
    with its encoder); with `tissue_masks` (uint8 (N, H, W)), decoded as `decode` decodes a
    latent generated for those masks (by the SPADE decoder when the run has one)."""
    if tissue_masks is None or run.spade_decoder is None:
        return _in_batches(lambda x: run.autoencoder(x, training=False), images, batch_size, np.zeros_like(images))
    latents = _in_batches(
        lambda x: run.autoencoder.encoder(x, training=False), images, batch_size, np.zeros((0, 1, 1, 1), np.float32)
    )
    return decode(run, latents * run.config.scale_factor, batch_size, tissue_masks)


def decode_masks(run: Run, latents: np.ndarray, batch_size: int) -> np.ndarray:
    """Tissue masks, uint8 class indices (N, H, W), of scaled latents (N, h, w, c): the argmax of
    mask_decoder(latents / scale_factor), the mask of the image `decode` gives (a loaded
    `run.mask_decoder` needed)."""
    size = run.config.data.image_size
    return _in_batches(
        lambda z: np.argmax(run.mask_decoder(z / run.config.scale_factor, training=False), -1).astype(np.uint8),
        latents,
        batch_size,
        np.zeros((0, size, size), np.uint8),
    )


def network_conditions(run: Run, condition: dict | None, n: int) -> np.ndarray | None:
    """The UNet's cond input (n, K) float32 for `condition` ({variable: one value or n values},
    raw units; see conditioning.requested_values for its errors and warnings), or None when
    nothing is asked for (a conditioned run then samples unconditionally)."""
    raw = conditioning.requested_values(run.config.condition_stats, condition, n)
    if raw is None or np.isnan(raw).all():
        return None
    return conditioning.normalise(run.config.condition_stats, raw)


def image_masks(run: Run, classes: np.ndarray | None, n: int) -> np.ndarray | None:
    """Tissue masks `classes`, uint8 class indices (n, S, S) or one mask (S, S) for all n, at any
    square size, as n masks (n, S', S') at the run's image size S' (nearest neighbour); None
    for None. UserError for a run trained without masks or a wrong number of masks."""
    if classes is None:
        return None
    if not run.config.mask_channels:
        raise UserError("this run was trained without tissue masks (--condition mask); it cannot take a mask")
    classes = np.asarray(classes)
    if classes.ndim == 2:
        classes = np.broadcast_to(classes, (n, *classes.shape))
    if classes.ndim != 3 or len(classes) != n:
        raise UserError(f"expected one mask or {n} masks, got an array of shape {classes.shape}")
    size = run.config.data.image_size
    return np.stack([masks.resize_mask(c, size) for c in classes])


def generate(
    run: Run,
    n: int,
    options: cfg.SamplingOptions | None = None,
    *,
    condition: dict | None = None,
    tissue_masks: np.ndarray | None = None,
    guidance: float | None = None,
    num_states: int = 0,
    progress: bool = True,
    initial_noise: np.ndarray | None = None,
) -> Samples:
    """n decoded samples of the EMA UNet, in batches of `options.batch_size` (a progress bar over batches).

    options: sampler, steps, eta, seed, batch size and guidance weight (default
    `config.SamplingOptions()`: DDIM 50 steps, seed 0); `guidance`, when given, replaces
    options.guidance. condition: for a conditioned run, {variable: value} or {variable: n
    values} in the labels' units (e.g. {"slice": 0.6, "age": 80}); variables left out are
    unknown, and None samples unconditionally. tissue_masks: for a run conditioned on
    masks, uint8 class indices (n, S, S) or one (S, S) mask for all (`image_masks`);
    None: the mask is unknown. The guidance weight w of eps_u + w (eps_c − eps_u) applies
    only with a condition or a mask (1: conditional only; any other w doubles the UNet's
    batch). initial_noise: (n, h, w, c) starting noises x_T, or None to draw them from the
    seeds.

    The sampler's x0 estimate is clipped to ± the run's `latent_max_abs` (the range of the
    training latents; no clipping for runs made before it was recorded): without it, a
    schedule whose last ᾱ is tiny (cosine: 2.4e-9) multiplies any error of the first ε
    estimate by 1/sqrt(ᾱ) ≈ 20,000, and the sample diverges.

    num_states: K = 0, or 2..(steps + 1) states of each sample's reverse process to keep
    (see `Samples`). Batch b uses the seed `batch_seed(options.seed, b)`. ValueError for
    options the run cannot honour (`SamplingOptions.validate`).
    """
    options = options or cfg.SamplingOptions()
    if guidance is not None:
        options = dataclasses.replace(options, guidance=float(guidance))
    T = run.config.diffusion.timesteps
    options = options.resolved(T)
    options.validate(T, n)
    cond = network_conditions(run, condition, n)
    classes = image_masks(run, tissue_masks, n)
    # The UNet's mask input: the masks at the latent's size (`masks.mask_input`).
    mask = (
        None if classes is None else masks.mask_input(classes, run.config.latent_size, run.config.condition.mask_input)
    )
    batch = options.batch_size
    sizes = [min(batch, n - start) for start in range(0, n, batch)]
    bar = keras.utils.Progbar(len(sizes), unit_name="batch") if progress else None
    latents, states, timesteps = [], [], None
    for b, size in enumerate(sizes):
        rows = slice(b * batch, b * batch + size)
        out = run.sampler.sample(
            (size, *run.latent_shape),
            dataclasses.replace(options, seed=batch_seed(options.seed, b)),
            num_intermediates=num_states,
            clip_x0=run.config.latent_max_abs,
            cond=None if cond is None else cond[rows],
            tissue=None if mask is None else mask[rows],
            initial_noise=None if initial_noise is None else initial_noise[rows],
        )
        if num_states:
            out, batch_states, timesteps = out
            states.append(batch_states.numpy())
        latents.append(out.numpy())
        if bar:
            bar.update(b + 1)
    latents = np.concatenate(latents)
    return Samples(
        images=decode(run, latents, batch, tissue_masks=classes),
        latents=latents,
        states=np.concatenate(states, axis=1) if num_states else None,
        timesteps=timesteps,
    )


def condition_grid(
    run: Run,
    variable: str,
    values,
    columns: int,
    options: cfg.SamplingOptions,
    fixed: dict | None = None,
) -> np.ndarray:
    """Decoded samples (len(values), columns, H, W, 1) in [-1, 1]: row r asks for
    `variable` = values[r] (plus the `fixed` conditions), column c starts every row from the
    same initial noise (seeded by `options.seed`), so a row-to-row change is the condition's doing."""
    condition = dict(fixed or {})
    if variable in condition:
        raise UserError(f"condition {variable} is swept in conditions.png; do not also fix it")
    values = np.asarray(values, np.float64)
    condition[variable] = np.repeat(values, columns)
    return _seeded_rows(run, len(values), columns, options, condition=condition)


def _seeded_rows(run: Run, rows: int, columns: int, options: cfg.SamplingOptions, **asked) -> np.ndarray:
    """Decoded samples (rows, columns, H, W, 1) of `generate(run, rows × columns, options,
    **asked)` (its condition and tissue_masks given per sample, row by row), column c
    starting every row from the same initial noise, seeded by `options.seed`.

    In batches of `equal_batch_size` (at most options.batch_size): a last, smaller batch
    would trace the sampler's graph once more (seconds on a CPU), and with the initial noise
    given the samples do not depend on the batching."""
    noise = np.random.default_rng(options.seed).standard_normal((columns, *run.latent_shape)).astype(np.float32)
    options = dataclasses.replace(options, batch_size=equal_batch_size(rows * columns, options.batch_size))
    images = generate(
        run, rows * columns, options, progress=False, initial_noise=np.tile(noise, (rows, 1, 1, 1)), **asked
    ).images
    return images.reshape((rows, columns, *images.shape[1:]))


def equal_batch_size(n: int, most: int) -> int:
    """The smallest batch size that covers n items in as few batches as `most` does:
    ceil(n / ceil(n / most)); every batch has that size when it divides n (36 at most 16 a
    batch: 3 batches of 12, not 16 + 16 + 4)."""
    return -(-n // -(-n // most))


CONDITION_ROWS = 6  # values of the swept variable in conditions.png (a categorical one: its categories)
CONDITION_COLUMNS = 6  # seeds (initial noises) in conditions.png


def conditions_figure(
    run: Run,
    path: str,
    options: cfg.SamplingOptions,
    variable: str | None = None,
    fixed: dict | None = None,
) -> None:
    """conditions.png of a conditioned run: rows sweep `variable` (default: the first condition
    variable) over its training range, columns are seeds (`condition_grid`); DDIM's eta is 0
    here, so that a row differs from the next by its condition only."""
    stats = run.config.condition_stats
    variable = variable or next(iter(stats))
    if variable not in stats:
        raise UserError(f"--sweep {variable}: the run is conditioned on {', '.join(stats)} only")
    values = conditioning.sweep_values(stats, variable, CONDITION_ROWS)
    T = run.config.diffusion.timesteps
    options = dataclasses.replace(options, eta=0.0, steps=min(options.resolved(T).steps, T))
    images = condition_grid(run, variable, values, CONDITION_COLUMNS, options, fixed)
    also = "".join(f", {name} {value:g}" for name, value in (fixed or {}).items())
    figures.image_grid(
        images,
        path,
        title=f"{run.name}: rows {variable}{also}, guidance {options.guidance:g}, {options.label(T)}",
        row_labels=[f"{variable} {v:.2f}" for v in values],
        column_labels=[f"seed {c}" for c in range(CONDITION_COLUMNS)],
    )


MASK_COLUMNS = 5  # seeds (initial noises) in masks.png


def mask_grid(
    run: Run,
    classes: np.ndarray,
    columns: int,
    options: cfg.SamplingOptions,
    condition: dict | None = None,
) -> np.ndarray:
    """Decoded samples (R, columns, H, W, 1) in [-1, 1] for R tissue masks `classes` (R, S, S):
    row r is generated for mask r (plus the label `condition`, if any), column c starts every
    row from the same initial noise (seeded by `options.seed`), so a row-to-row change is the
    mask's doing."""
    classes = np.asarray(classes)
    tissue_masks = np.repeat(classes, columns, axis=0)
    return _seeded_rows(run, len(classes), columns, options, condition=condition, tissue_masks=tissue_masks)


def mask_image(classes: np.ndarray) -> np.ndarray:
    """Class indices (..., S, S) → a grey picture (..., S, S, 1) in [-1, 1] (the release's grey
    levels 0/85/170/255), for figures."""
    return np.asarray(masks.CLASS_VALUES, np.float32)[np.asarray(classes)][..., None] / 127.5 - 1.0


def masks_figure(
    run: Run,
    path: str,
    classes: np.ndarray,
    options: cfg.SamplingOptions,
    row_labels=(),
    condition: dict | None = None,
) -> None:
    """masks.png of a mask-conditioned run: one row per tissue mask of `classes` (R, S, S), the
    mask first (grey levels: background, CSF, grey matter, white matter from dark to light),
    then `MASK_COLUMNS` samples generated for it from the seeds of `mask_grid`; DDIM's eta is
    0 here, so that rows differ by their masks only."""
    T = run.config.diffusion.timesteps
    options = dataclasses.replace(options, eta=0.0, steps=min(options.resolved(T).steps, T))
    size = run.config.data.image_size
    classes = np.stack([masks.resize_mask(c, size) for c in np.asarray(classes)])
    images = mask_grid(run, classes, MASK_COLUMNS, options, condition)
    shown = np.concatenate([mask_image(classes)[:, None], images], axis=1)
    also = "".join(f", {name} {value:g}" for name, value in (condition or {}).items())
    figures.image_grid(
        shown,
        path,
        title=f"{run.name}: images for tissue masks{also}, guidance {options.guidance:g}, {options.label(T)}",
        row_labels=list(row_labels),
        column_labels=["mask"] + [f"seed {c}" for c in range(MASK_COLUMNS)],
    )


def split_masks(config: cfg.RunConfig, split: str = "validate") -> tuple[list[str], list[str]]:
    """(image paths, their mask paths) of one split of the run's data (`run_splits`, paired by
    `masks.find_masks`); UserError when the data folder has no tissue masks."""
    data_dir, splits = run_splits(config)
    paths = masks.find_masks(data_dir, splits)
    if paths is None:
        raise UserError(f"{data_dir} has no tissue masks ({masks.SEG_FOLDER.format(split)}/)")
    return splits[split], paths[split]
