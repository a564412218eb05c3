"""Generate brain MRI slices with a trained run: sample latents, decode, write PNGs.

    python predict.py                                 # the newest run under runs/, 16 DDIM samples
    python predict.py --run runs/demo --n 64 --steps 100 --seed 3
    python predict.py --run demo --sampler ddpm --out /tmp/samples

Options: --run RUN (a folder, or a name under runs/; default: the run whose config.json
is newest), --n 16, --sampler ddim|ddpm, --steps 50 (DDIM only, at most T; DDPM runs all T),
--eta 0.0 (DDIM noise, 0 = deterministic), --seed 0, --batch-size 16, --out DIR
(default RUN/predictions), --debug (tracebacks instead of one-line errors; or set
OASIS_LDM_DEBUG=1).

Writes to --out:
    samples.png          a grid of all samples
    sample_000.png ...   one 8-bit grayscale PNG per sample, at the run's image size
    denoising.png        the first few samples from noise to image: latent (channel 0)
                         and its decoding at about six states, columns labelled with t
    interpolation.png    samples decoded along a spherical interpolation (slerp) between
                         the initial noises of samples 0 and 1

Sampling uses the EMA UNet (unet_ema.weights.h5) and the decoder (decoder.weights.h5) of
the run, rebuilt from its config.json, in float32 whatever precision the run trained in
(its weights are float32; bf16 compute would give slightly other images). Batch b is
sampled with a seed derived from (--seed, b), so the same --seed and --batch-size give
byte-identical files.

This module also holds what evaluate.py shares: finding and loading a run
(`resolve_run`, `load_run`) and batched sampling (`generate`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import os
import re
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import config as cfg  # noqa: E402
import dataset  # noqa: E402
import figures  # noqa: E402
import train  # noqa: E402
from train import UserError  # noqa: E402

RUNS_ROOT = "runs"
DEFAULT_STEPS = 50  # DDIM steps when --steps is not given (T when the run has fewer)
DENOISING_STATES = 6  # columns of denoising.png (fewer when the sampler has fewer steps)
DENOISING_SAMPLES = 4  # samples (row pairs) in denoising.png
INTERPOLATION_POINTS = 8  # images in interpolation.png, both ends included


# ---------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """A trained run, ready to sample: `diffusion.ema_network` holds unet_ema.weights.h5,
    `autoencoder.decoder` holds decoder.weights.h5 (the encoder is loaded only on request)."""

    directory: str
    config: cfg.RunConfig
    autoencoder: keras.Model
    diffusion: keras.Model

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.directory))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        h = self.config.latent_size
        return (h, h, self.config.autoencoder.latent_channels)


def resolve_run(run: str | None, runs_root: str = RUNS_ROOT) -> str:
    """The run folder for --run: a path, a name under `runs_root`, or (None) the run under
    `runs_root` whose config.json was written last. UserError when there is none."""
    if run is None:
        configs = glob.glob(os.path.join(runs_root, "*", "config.json"))
        if not configs:
            raise UserError(f"no runs under {runs_root}/: train one first (python train.py --out {runs_root}/NAME) or pass --run")
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


def load_run(run_dir: str, encoder: bool = False) -> Run:
    """Rebuild the models of `run_dir` from its config.json and load the trained weights
    (the encoder's too when `encoder`).

    UserError (one line) for a folder without config.json, an unreadable config, a run
    whose stages are not trained yet, and weights that do not fit the config.
    """
    config = read_config(run_dir)
    needed = ["decoder.weights.h5", "unet_ema.weights.h5"] + (["encoder.weights.h5"] if encoder else [])
    missing = [name for name in needed if not os.path.exists(os.path.join(run_dir, name))]
    if missing or config.scale_factor is None:
        what = ", ".join(missing) if missing else "no latent scale factor in config.json"
        raise UserError(f"{run_dir} is not fully trained yet ({what}); finish it with: python train.py --out {run_dir} --resume")

    with dtype_policy("float32"):  # whatever precision it trained in (its weights are float32)
        autoencoder = train.build_autoencoder(config)
        diffusion = train.build_diffusion(config)
    load_weights(autoencoder.decoder, os.path.join(run_dir, "decoder.weights.h5"))
    load_weights(diffusion.ema_network, os.path.join(run_dir, "unet_ema.weights.h5"))
    if encoder:
        load_weights(autoencoder.encoder, os.path.join(run_dir, "encoder.weights.h5"))
    return Run(run_dir, config, autoencoder, diffusion)


@contextlib.contextmanager
def dtype_policy(name: str):
    """Build the Keras layers made inside with the dtype policy `name`, then restore the global one.

    Layers take the global policy when they are created; train.py sets it for training (e.g.
    mixed_bfloat16 on a CPU with bf16 units) and leaves it set, so without this a model
    loaded in the same process after training would compute in bf16 and give other images.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


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


# ---------------------------------------------------------------------------- sampling


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


def batch_seed(seed: int, index: int) -> int:
    """The sampler seed of batch `index` for the user's `seed`, in [0, 2**31).

    Derived by NumPy's SeedSequence, so distinct (seed, index) pairs do not share noise
    (seed + index would: batch 1 of seed 0 would repeat batch 0 of seed 1).
    """
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] >> 1)


def sampler_steps(config: cfg.RunConfig, sampler: str, steps: int) -> int:
    """Number of network evaluations of one sample: DDIM's `steps`, DDPM's T."""
    return steps if sampler == "ddim" else config.diffusion.timesteps


def choose_steps(config: cfg.RunConfig, steps: int | None) -> int:
    """--steps as given, or (None) DEFAULT_STEPS capped at the run's T."""
    return min(DEFAULT_STEPS, config.diffusion.timesteps) if steps is None else steps


def check_sampling_args(config: cfg.RunConfig, n: int, sampler: str, steps: int, eta: float, seed: int, batch_size: int) -> None:
    """UserError for sampling options the run cannot honour (checked before any work)."""
    T = config.diffusion.timesteps
    if n < 1 or batch_size < 1:
        raise UserError(f"--n and --batch-size must be positive, got {n} and {batch_size}")
    if sampler == "ddim" and not 1 <= steps <= T:
        raise UserError(f"--steps must be in [1, {T}] (the run's T), got {steps}")
    if eta < 0:
        raise UserError(f"--eta must be >= 0, got {eta}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")


def decode(run: Run, latents: np.ndarray, batch_size: int) -> np.ndarray:
    """Images (N, H, W, 1) in [-1, 1] of scaled latents (N, h, w, c): decoder(latents / scale_factor)."""
    out = [run.autoencoder.decoder(latents[i:i + batch_size] / run.config.scale_factor, training=False).numpy()
           for i in range(0, len(latents), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, *latents.shape[1:3], 1), np.float32)


def generate(run: Run, n: int, sampler: str = "ddim", steps: int = 50, eta: float = 0.0, seed: int = 0,
             batch_size: int = 16, num_states: int = 0, progress: bool = True) -> Samples:
    """n decoded samples of the EMA UNet, in batches of `batch_size` (a progress bar over batches).

    num_states: K = 0, or 2..(steps + 1) states of each sample's reverse process to keep
    (see `Samples`). Batch b uses `batch_seed(seed, b)`.
    """
    check_sampling_args(run.config, n, sampler, steps, eta, seed, batch_size)
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    bar = keras.utils.Progbar(len(sizes), unit_name="batch") if progress else None
    latents, states, timesteps = [], [], None
    for b, size in enumerate(sizes):
        out = run.diffusion.sample(size, run.latent_shape, sampler=sampler, steps=steps, eta=eta,
                                   seed=batch_seed(seed, b), num_intermediates=num_states)
        if num_states:
            out, batch_states, timesteps = out
            states.append(batch_states.numpy())
        latents.append(out.numpy())
        if bar:
            bar.update(b + 1)
    latents = np.concatenate(latents)
    return Samples(
        images=decode(run, latents, batch_size),
        latents=latents,
        states=np.concatenate(states, axis=1) if num_states else None,
        timesteps=timesteps,
    )


def slerp(a: np.ndarray, b: np.ndarray, fractions) -> np.ndarray:
    """Spherical interpolation between two noise tensors of the same shape.

    For each fraction u in [0, 1]:  sin((1 - u) θ) / sin θ · a + sin(u θ) / sin θ · b,
    with θ the angle between a and b flattened. u = 0 gives a, u = 1 gives b, and for
    |a| = |b| the norm stays |a| along the way (a linear mix would shrink it, and the
    UNet was only trained on noise of the norm of N(0, I)). Falls back to the linear mix
    when a and b are (anti)parallel, where the formula is undefined.

    Returns float32 (len(fractions), *a.shape).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    u = np.asarray(fractions, np.float64).reshape((-1,) + (1,) * a.ndim)
    cos = np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b))
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(theta) < 1e-6:
        return ((1 - u) * a + u * b).astype(np.float32)
    return ((np.sin((1 - u) * theta) * a + np.sin(u * theta) * b) / np.sin(theta)).astype(np.float32)


def interpolate(run: Run, noise_a: np.ndarray, noise_b: np.ndarray, points: int, sampler: str, steps: int,
                eta: float, seed: int) -> np.ndarray:
    """Decoded samples (points, H, W, 1) started from slerp(noise_a, noise_b) at evenly spaced
    fractions 0 … 1; noise_*: (h, w, c) initial noises x_T. With DDIM and eta = 0 the two ends
    are exactly the samples of noise_a and noise_b."""
    noises = slerp(noise_a, noise_b, np.linspace(0.0, 1.0, points))
    latents = run.diffusion.sample(points, run.latent_shape, sampler=sampler, steps=steps, eta=eta,
                                   seed=batch_seed(seed, 0), initial_noise=noises)
    return decode(run, latents.numpy(), points)


# ---------------------------------------------------------------------------- writing


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats → uint8 by round((x + 1) · 127.5), clipped to [0, 255]; shape kept."""
    return np.clip(np.round((np.asarray(images, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_pngs(images: np.ndarray, out_dir: str) -> list[str]:
    """One 8-bit grayscale PNG per image (N, H, W, 1), named sample_000.png …, written atomically.

    sample_*.png files left in `out_dir` by an earlier call with a larger --n are removed,
    so the folder always holds exactly this call's samples. Returns the paths.
    """
    width = max(3, len(str(len(images) - 1)))
    paths = [os.path.join(out_dir, f"sample_{i:0{width}d}.png") for i in range(len(images))]
    for old in glob.glob(os.path.join(out_dir, "sample_*.png")):
        if re.fullmatch(r"sample_\d+\.png", os.path.basename(old)) and old not in paths:
            os.remove(old)
    for pixels, path in zip(to_uint8(images), paths):
        tmp = f"{path}.tmp"
        Image.fromarray(pixels[:, :, 0], mode="L").save(tmp, format="PNG")
        os.replace(tmp, path)
    return paths


def make_output_folder(out_dir: str) -> None:
    """Create `out_dir` and check that it takes files, before any sampling; UserError if not."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {out_dir}: {e.strerror}") from None
    train.check_writable(out_dir)


def sampler_label(sampler: str, steps: int, eta: float, config: cfg.RunConfig) -> str:
    """E.g. "DDIM 50 steps, eta 0" or "DDPM 1000 steps", for figure titles and tables."""
    if sampler == "ddim":
        return f"DDIM {steps} steps, eta {eta:g}"
    return f"DDPM {config.diffusion.timesteps} steps"


def write_predictions(run: Run, out_dir: str, n: int, sampler: str, steps: int, eta: float, seed: int,
                      batch_size: int) -> list[str]:
    """Sample and write every output file of predict.py to `out_dir` (an existing folder); returns
    the file names written."""
    num_states = min(DENOISING_STATES, sampler_steps(run.config, sampler, steps) + 1)
    samples = generate(run, n, sampler, steps, eta, seed, batch_size, num_states=num_states)
    label = f"{run.name}: {sampler_label(sampler, steps, eta, run.config)}, seed {seed}"

    figures.image_grid(samples.images, os.path.join(out_dir, "samples.png"), title=label)
    written = ["samples.png"]
    pngs = save_pngs(samples.images, out_dir)

    shown = samples.states[:, :DENOISING_SAMPLES]
    k, s = shown.shape[:2]
    decoded = decode(run, shown.reshape((k * s, *shown.shape[2:])), batch_size).reshape((k, s, *samples.images.shape[1:]))
    figures.denoising(shown, decoded, samples.timesteps, os.path.join(out_dir, "denoising.png"),
                      title=f"{label}: noise → sample")
    written.append("denoising.png")

    if n >= 2:
        noise_a, noise_b = samples.states[0, 0], samples.states[0, 1]
        images = interpolate(run, noise_a, noise_b, INTERPOLATION_POINTS, sampler, steps, eta, seed)
        fractions = np.linspace(0.0, 1.0, INTERPOLATION_POINTS)
        figures.image_strip(images, [f"{u:.2f}" for u in fractions], os.path.join(out_dir, "interpolation.png"),
                            title=f"{label}: slerp from the noise of sample 0 to that of sample 1")
        written.append("interpolation.png")
    else:
        print("interpolation.png skipped: it needs --n 2 or more")
        if os.path.exists(os.path.join(out_dir, "interpolation.png")):  # an earlier call's
            os.remove(os.path.join(out_dir, "interpolation.png"))
    return written + [os.path.basename(pngs[0]) + (f" … {os.path.basename(pngs[-1])}" if len(pngs) > 1 else "")]


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = train.FlagParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help=f"run folder, or a name under {RUNS_ROOT}/ (default: the newest run)")
    parser.add_argument("--n", type=int, default=16, help="number of samples (default: 16)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="default: ddim")
    parser.add_argument("--steps", type=int, help=f"DDIM steps, in [1, T] (default: {DEFAULT_STEPS}, or T if smaller; DDPM uses all T)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="same seed and batch size, same images (default: 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per sampler call (default: 16)")
    parser.add_argument("--out", help="output folder (default: RUN/predictions)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    return parser.parse_args(argv)


def run(argv: list[str]) -> None:
    args = parse_args(argv)
    run_dir = resolve_run(args.run)
    config = read_config(run_dir)
    args.steps = choose_steps(config, args.steps)
    check_sampling_args(config, args.n, args.sampler, args.steps, args.eta, args.seed, args.batch_size)
    loaded = load_run(run_dir)
    out_dir = args.out or os.path.join(run_dir, "predictions")
    make_output_folder(out_dir)
    print(f"run {run_dir}: {args.n} sample{'s' if args.n != 1 else ''}, {sampler_label(args.sampler, args.steps, args.eta, loaded.config)}, "
          f"seed {args.seed}", flush=True)
    written = write_predictions(loaded, out_dir, args.n, args.sampler, args.steps, args.eta, args.seed, args.batch_size)
    print(f"wrote {out_dir}: {', '.join(written)}")


def main(argv: list[str] | None = None) -> int:
    return train.cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
