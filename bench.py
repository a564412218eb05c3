"""Speed and memory of oasis-ldm, each against a re-implementation of the original design's approach.

    python bench.py                     # the original's sizes, median of 3 repeats
    python bench.py --quick             # demo-size networks, 2 repeats, no XLA
    python bench.py --only unet data    # some of the four measurements
    python bench.py --only sampling --keep-others   # re-measure one, keep the rest of bench.json
    python bench.py --render bench.json # measure nothing, re-write BENCHMARKS.md from the JSON

Writes bench.json (the figures) and BENCHMARKS.md (the same figures as tables, with the
machine and settings). Every figure is a ratio against a baseline measured in the same
process (or, for memory, the same run). Warm-up calls (tracing, compilation) are excluded;
each time is the median of the repeats, with min and max. The baselines are original.py's.

What is measured (the original design's approach → ours):

1. UNet training throughput, images/s, on random latents. Baseline
   `original.original_unet_step`: an eager `GradientTape` step with t and ε drawn in NumPy,
   float32. Ours: the compiled `LatentDiffusion.train_step` that train.py runs (EMA update
   included) in float32 and in mixed precision (bf16 on a CPU, fp16 on a GPU), each with
   XLA off and on. A second baseline, "original's UNet, compiled":
   `original.PlainOriginalUNet`, a plain-Keras re-implementation of the original's UNet,
   trained by that same compiled step in float32 with Keras' own Adam (ours uses
   `keras_fixes.FusedAdam`): the reference that times elsewhere are calibrated by.
2. Autoencoder training throughput, images/s, on random images: the same comparison
   (`original.original_autoencoder_step` against train.py's compiled fit step, metrics
   included).
3. Seconds to `samples` decoded images. Baseline `original.original_sampler`: one image at a
   time, eagerly, T DDPM steps with NumPy arithmetic between UNet calls. Ours: what
   predict.py runs, the compiled batched DDPM (T steps), DDIM and DPM-Solver++(2M)
   samplers, then one decoder call, float32. The baseline's images are independent and
   identical in cost, so it times one image and multiplies by `samples`
   (`--baseline-sample-steps` times only some of the T steps and scales by T / steps).
4. Data: images/s and peak resident memory over one epoch of N PNG slices (copies of the
   demo set, in a temporary folder), each approach in its own subprocess: the streaming
   `dataset.make_dataset` against `original.original_load_all` (decode every file into one
   NumPy array, then batch from it).

The eager baselines share the project's networks (the `seed` preset's: layout "original"),
noise schedule and loss, so only the method differs. Networks are untrained: speed does not
depend on the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import glob
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import cli  # noqa: E402  (first: quiets TensorFlow before it loads)

cli.quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import config as cfg  # noqa: E402
import dataset  # noqa: E402
import hardware  # noqa: E402
import original  # noqa: E402
import prepare  # noqa: E402
import runs  # noqa: E402
from diffusion import LatentDiffusion, make_schedule  # noqa: E402
from samplers import Sampler  # noqa: E402

BENCHMARKS = ("unet", "ae", "sampling", "data")
option = cfg.option


@dataclass
class BenchConfig:
    """Sizes and repeats of one benchmark run (defaults: the full run, the original's sizes)."""

    only: tuple[str, ...] = option(BENCHMARKS, f"which benchmarks to run, of {' '.join(BENCHMARKS)}")
    repeats: int = option(3, "timed repeats of each measurement (the median is reported)")
    warmup: int = option(1, "untimed calls before timing (tracing and compilation happen here)")
    latent_size: int = option(32, "UNet: latent height and width")
    latent_channels: int = option(1, "UNet: latent channels")
    unet_dim: int = option(64, "UNet base width")
    unet_dim_mults: tuple[int, ...] = option((1, 2, 4, 8), "UNet width multipliers")
    unet_batch: int = option(64, "UNet training batch size")
    unet_steps: int = option(2, "UNet training steps per timed repeat")
    ae_image_size: int = option(128, "autoencoder: image height and width")
    ae_base_channels: int = option(64, "autoencoder width at full resolution (×4 at the latent)")
    ae_batch: int = option(16, "autoencoder training batch size")
    ae_steps: int = option(1, "autoencoder training steps per timed repeat")
    timesteps: int = option(200, "diffusion steps T (the original's 200)")
    samples: int = option(16, "images per sampling measurement")
    ddim_steps: int = option(50, "DDIM steps")
    dpmpp_steps: int = option(20, "DPM-Solver++(2M) steps")
    baseline_sample_steps: int = option(0, "reverse steps the baseline sampler times per repeat (0: all T)")
    data_images: int = option(10000, "PNG slices in the data benchmark")
    data_image_size: int = option(128, "data benchmark: images are resized to this size")
    data_batch: int = option(64, "data benchmark: batch size")
    xla: bool = option(True, "also time the XLA-compiled variants of our training steps")
    keep_others: bool = option(
        False, "with --only: keep the other benchmarks' results from --json (same mode and CPU model only)"
    )
    markdown: str = option("BENCHMARKS.md", "where to write the tables")
    json: str = option("bench.json", "where to write the figures as JSON")


MODES = {
    "full": BenchConfig(),
    # The demo preset's widths, 8 samples, no XLA variants (their compilation is slow).
    "quick": BenchConfig(
        repeats=2,
        unet_dim=32,
        unet_dim_mults=(1, 2, 4),
        unet_batch=32,
        unet_steps=1,
        ae_image_size=64,
        ae_base_channels=16,
        ae_batch=16,
        samples=8,
        baseline_sample_steps=20,
        data_images=4000,
        xla=False,
    ),
    # For the test that keeps bench.py working: tiny everything, figures meaningless.
    "smoke": BenchConfig(
        repeats=1,
        warmup=1,
        latent_size=8,
        unet_dim=8,
        unet_dim_mults=(1,),  # one level: half the layers to trace
        unet_batch=2,
        unet_steps=1,
        ae_image_size=16,
        ae_base_channels=4,
        ae_batch=2,
        timesteps=10,
        samples=2,
        ddim_steps=5,
        dpmpp_steps=3,
        baseline_sample_steps=3,
        data_images=24,
        data_image_size=16,
        data_batch=8,
        xla=False,
    ),
}


# ---------------------------------------------------------------------------- timing


def time_calls(fn, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` after `warmup` untimed ones; `fn` must block
    until its work is done (return a NumPy value, not a pending tensor)."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def summary(values) -> dict:
    """{"median", "min", "max", "n"} of a list of numbers."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def throughput(seconds: list[float], images_per_call: int) -> dict:
    """images/s of each timed call, summarised."""
    return summary([images_per_call / s for s in seconds])


def mixed_precision() -> str:
    """The mixed policy of this machine: fp16 on a GPU (tensor cores), bf16 on a CPU."""
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


def variants(bench: BenchConfig) -> list[tuple[str, bool]]:
    """(precision, xla) pairs that "ours" is measured in."""
    return [(p, xla) for p in ("float32", mixed_precision()) for xla in ((False, True) if bench.xla else (False,))]


def variant_name(precision: str, xla: bool) -> str:
    return f"{precision}{', XLA' if xla else ''}"


def default_variant(machine: dict, measured=()) -> str:
    """The variant train.py runs on the measured machine. Given the `measured` variant names:
    when train.py would use XLA (a CPU without oneDNN, e.g. an AVX2 one) but the run measured
    no XLA variants (`--no-xla`, the quick and smoke modes), the same precision without it."""
    name = variant_name(machine["train_py_precision"], machine["train_py_xla"])
    return name if not measured or name in measured else variant_name(machine["train_py_precision"], False)


def run_config(bench: BenchConfig, precision: str = "float32", xla: bool = False) -> cfg.RunConfig:
    """The `seed` preset (the original's design and networks, layout "original") at the benchmark's sizes."""
    config = cfg.preset("seed")
    config.data.image_size = bench.latent_size * 4
    config.autoencoder.latent_channels = bench.latent_channels
    config.autoencoder.ae_base_channels = bench.ae_base_channels
    config.unet.unet_dim, config.unet.unet_dim_mults = bench.unet_dim, tuple(bench.unet_dim_mults)
    config.diffusion.timesteps = bench.timesteps
    config.train.precision, config.train.xla = precision, "on" if xla else "off"
    return config


def compiled_step(model: keras.Model, batch) -> callable:
    """A call of `model`'s compiled train function (the one fit() runs) on a fixed batch."""
    model.make_train_function()
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    return lambda: float(model.train_function(iterator)["loss"])


# ---------------------------------------------------------------------------- 1, 2: training


def bench_unet(bench: BenchConfig) -> dict:
    """UNet training images/s: the original's eager step against our compiled variants."""
    shape = (bench.latent_size, bench.latent_size, bench.latent_channels)
    x0 = np.random.default_rng(0).standard_normal((bench.unet_batch, *shape)).astype(np.float32)
    images = bench.unet_batch * bench.unet_steps
    config = run_config(bench)
    schedule = make_schedule("linear", bench.timesteps)

    with hardware.dtype_policy("float32"):
        unet = runs.build_diffusion(config).network
        optimizer = keras.optimizers.Adam(config.train.lr)
    rng = np.random.default_rng(0)
    seconds = time_calls(
        lambda: [original.original_unet_step(unet, optimizer, schedule, x0, rng) for _ in range(bench.unet_steps)],
        bench.warmup,
        bench.repeats,
    )
    result = {"baseline": throughput(seconds, images), "params": unet.count_params(), "layout": config.unet.unet_layout}
    keras.backend.clear_session()  # drop this model's graphs before the next one

    def build(config):
        model = runs.build_diffusion(config)
        runs.compile_diffusion(model, config)
        return model

    result["ours"] = time_compiled_variants(bench, "unet", build, x0, bench.unet_steps, images)

    # The original's UNet (plain Keras) in our compiled step, float32, XLA off.
    with hardware.dtype_policy("float32"):
        u = config.unet
        sizes = (u.unet_dim, u.unet_dim_mults, u.unet_groups, u.attn_heads, u.attn_dim_head)
        network = original.PlainOriginalUNet(bench.latent_size, bench.latent_channels, *sizes, name="original_unet")
        model = LatentDiffusion(
            network, runs.noise_schedule(config), config.diffusion.ema_decay, seed=config.train.seed
        )
        model.build((None, *shape))
        # Keras' own Adam, not runs.make_optimizer's fused one: this row is the reference that
        # every time in BENCHMARKS.md and the issues is calibrated by, so its step stays as defined.
        model.compile(optimizer=keras.optimizers.Adam(config.train.lr), jit_compile=False)
    step = compiled_step(model, x0)
    seconds = time_calls(lambda: [step() for _ in range(bench.unet_steps)], bench.warmup, bench.repeats)
    result["original_compiled"] = throughput(seconds, images)
    result["original_compiled_params"] = network.count_params()
    print(
        f"  unet original's UNet, compiled, float32: {result['original_compiled']['median']:.1f} images/s", flush=True
    )
    keras.backend.clear_session()
    return result


def bench_autoencoder(bench: BenchConfig) -> dict:
    """Autoencoder training images/s: the original's eager step against our compiled variants."""
    size = bench.ae_image_size
    x = np.random.default_rng(0).uniform(-1, 1, (bench.ae_batch, size, size, 1)).astype(np.float32)
    images = bench.ae_batch * bench.ae_steps
    config = run_config(bench)
    config.data.image_size = size

    with hardware.dtype_policy("float32"):
        autoencoder = runs.build_autoencoder(config)
        optimizer = keras.optimizers.Adam(config.train.ae_lr)
    seconds = time_calls(
        lambda: [original.original_autoencoder_step(autoencoder, optimizer, x) for _ in range(bench.ae_steps)],
        bench.warmup,
        bench.repeats,
    )
    result = {"baseline": throughput(seconds, images), "params": autoencoder.count_params()}
    result["layout"] = autoencoder.layout
    keras.backend.clear_session()  # drop this model's graphs before the next one

    def build(config):
        config.data.image_size = size
        autoencoder = runs.build_autoencoder(config)
        runs.compile_autoencoder(autoencoder, config)
        return autoencoder

    result["ours"] = time_compiled_variants(bench, "autoencoder", build, (x, x), bench.ae_steps, images)
    return result


def time_compiled_variants(bench: BenchConfig, label: str, build, batch, steps: int, images: int) -> dict:
    """{variant name: images/s} of train.py's compiled train step in each (precision, XLA)
    variant; `build(config)` returns the compiled model for a config of `run_config`."""
    out = {}
    for precision, xla in variants(bench):
        with hardware.dtype_policy(precision):
            model = build(run_config(bench, precision, xla))
        step = compiled_step(model, batch)
        seconds = time_calls(lambda step=step: [step() for _ in range(steps)], bench.warmup, bench.repeats)
        name = variant_name(precision, xla)
        out[name] = throughput(seconds, images)
        print(f"  {label} {name}: {out[name]['median']:.1f} images/s", flush=True)
        keras.backend.clear_session()  # drop this model's graphs before the next one
    return out


# ---------------------------------------------------------------------------- 3: sampling


def bench_sampling(bench: BenchConfig) -> dict:
    """Seconds to `samples` decoded images: the original's sampler against predict.py's."""
    config = run_config(bench)
    h, c = bench.latent_size, bench.latent_channels
    with hardware.dtype_policy("float32"):  # predict.py samples in float32
        diffusion = runs.build_diffusion(config)
        decoder = runs.build_autoencoder(config).decoder
    unet, schedule, n = diffusion.ema_network, diffusion.schedule, bench.samples

    steps = bench.baseline_sample_steps or bench.timesteps
    rng = np.random.default_rng(0)
    for _ in range(bench.warmup):  # eager code has nothing to trace: one step warms it up
        original.original_sampler(unet, decoder, schedule, (h, h, c), 1, rng)
    per_image = time_calls(
        lambda: original.original_sampler(unet, decoder, schedule, (h, h, c), steps, rng), 0, bench.repeats
    )
    if steps < bench.timesteps:
        # The decoder call is in each repeat too; scaling it by T / steps overstates the
        # baseline by at most (T / steps - 1) decoder calls, which is small next to T UNet calls.
        per_image = [s * bench.timesteps / steps for s in per_image]
    result = {"baseline": summary([s * n for s in per_image]), "baseline_steps_timed": steps, "ours": {}}

    compiled = Sampler(unet, schedule)  # one per network, as runs.Run holds: traces are reused

    def ours(name, sampler_steps):
        latents = compiled.sample((n, h, h, c), cfg.SamplingOptions(name, sampler_steps, seed=0))
        return decoder(latents, training=False).numpy()  # (predict.py divides by the scale factor first)

    for sampler, sampler_steps in (("ddpm", bench.timesteps), ("ddim", bench.ddim_steps), ("dpmpp", bench.dpmpp_steps)):
        seconds = time_calls(functools.partial(ours, sampler, sampler_steps), bench.warmup, bench.repeats)
        result["ours"][sampler] = summary(seconds)
        print(f"  sampling {sampler}: {result['ours'][sampler]['median']:.2f} s", flush=True)
    keras.backend.clear_session()  # drop this model's graphs before the next one
    return result


# ---------------------------------------------------------------------------- 4: data


def make_slices(folder: str, count: int) -> list[str]:
    """`count` PNG slices in `folder`: the demo set's files copied round-robin (real MRI PNGs,
    the OASIS slices' size). Returns their paths."""
    demo = prepare.ensure_demo_dataset(os.path.join(folder, "demo"))
    sources = sorted(glob.glob(os.path.join(demo, dataset.SPLIT_FOLDER.format("*"), "*.png")))
    sources = [path for path in sources if "_seg_" not in path]  # images, not the tissue masks beside them
    out = os.path.join(folder, "slices")
    os.makedirs(out)
    paths = []
    for i in range(count):
        paths.append(os.path.join(out, f"slice_{i:05d}.png"))
        shutil.copyfile(sources[i % len(sources)], paths[-1])
    return paths


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB.

    Linux: VmHWM of /proc/self/status, which starts afresh at exec. (getrusage's ru_maxrss
    would not do: a child inherits its parent's peak across fork and exec, so every worker
    would report at least bench.py's own peak.) Elsewhere: ru_maxrss (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def data_worker(approach: str, folder: str, image_size: int, batch_size: int) -> dict:
    """One epoch over the PNGs in `folder` with one approach; run in a fresh process.

    Returns images, seconds (from the first file read to the last batch), images/s, the
    peak RSS after importing TensorFlow (before any data) and at the end, in MiB.
    """
    paths = sorted(glob.glob(os.path.join(folder, "*.png")))
    tf.constant(0)  # start the TF runtime before the baseline memory reading
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    count = 0
    if approach == "stream":
        for batch in dataset.make_dataset(paths, image_size, batch_size, shuffle=True, seed=0):
            count += int(batch.shape[0])
    elif approach == "load_all":
        images = original.original_load_all(paths, image_size)
        order = np.random.default_rng(0).permutation(len(images))
        for i in range(0, len(images), batch_size):
            count += int(tf.convert_to_tensor(images[order[i : i + batch_size]]).shape[0])
    else:
        raise ValueError(f"unknown approach {approach!r}")
    seconds = time.perf_counter() - start
    return {
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "rss_after_import_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
    }


def bench_data(bench: BenchConfig) -> dict:
    """Streaming against load-everything over `data_images` PNGs, each in its own subprocess
    (peak memory is per process), `repeats` times each (at least once)."""
    result = {"images": bench.data_images}
    with tempfile.TemporaryDirectory(prefix="oasis-ldm-bench-") as tmp:
        make_slices(tmp, bench.data_images)
        folder = os.path.join(tmp, "slices")
        for approach in ("load_all", "stream"):
            reports = []
            for _ in range(max(1, bench.repeats)):
                command = [sys.executable, os.path.abspath(__file__), "data-worker", approach, folder]
                command += [str(bench.data_image_size), str(bench.data_batch)]
                out = subprocess.run(command, capture_output=True, text=True, check=False)
                if out.returncode:
                    raise RuntimeError(f"data worker {approach} failed:\n{out.stderr[-2000:]}")
                reports.append(json.loads(out.stdout.strip().splitlines()[-1]))
                if reports[-1]["images"] != bench.data_images:
                    raise RuntimeError(
                        f"data worker {approach} saw {reports[-1]['images']} of {bench.data_images} images"
                    )
            side = "baseline" if approach == "load_all" else "ours"
            keys = ("images_per_s", "peak_rss_mb", "rss_after_import_mb")
            result[side] = {key: summary([r[key] for r in reports]) for key in keys}
            print(
                f"  data {approach}: {result[side]['images_per_s']['median']:.0f} images/s, "
                f"peak {statistics.median(r['peak_rss_mb'] for r in reports):.0f} MiB",
                flush=True,
            )
    return result


# ---------------------------------------------------------------------------- report


def machine() -> dict:
    """CPU model, cores, GPUs, library versions: what a reader needs to compare numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = [
        tf.config.experimental.get_device_details(g).get("device_name", g.name)
        for g in tf.config.list_physical_devices("GPU")
    ]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpus": gpus,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "date": datetime.date.today().isoformat(),
        "train_py_precision": hardware.resolve_precision("auto"),
        "train_py_xla": hardware.resolve_xla("auto", hardware.resolve_precision("auto")),
    }


def headline(results: dict) -> dict:
    """The ratios the README quotes. Training speedups are for train.py's CPU/GPU defaults
    (precision and XLA "auto"), the configuration users get."""
    figures = {}
    measured = {name for part in ("unet", "ae") if part in results for name in results[part]["ours"]}
    default = default_variant(results["machine"], measured)
    if "unet" in results:
        u = results["unet"]
        figures["unet_train_speedup"] = u["ours"][default]["median"] / u["baseline"]["median"]
        # the same compiled step, float32: the two UNet implementations alone
        figures["unet_ours_over_original_compiled"] = u["ours"]["float32"]["median"] / u["original_compiled"]["median"]
    if "ae" in results:
        figures["ae_train_speedup"] = results["ae"]["ours"][default]["median"] / results["ae"]["baseline"]["median"]
    if "sampling" in results:
        s = results["sampling"]
        figures["sampling_speedup_ddim50"] = s["baseline"]["median"] / s["ours"]["ddim"]["median"]
        figures["sampling_speedup_ddpm200"] = s["baseline"]["median"] / s["ours"]["ddpm"]["median"]
        figures["sampling_speedup_dpmpp20"] = s["baseline"]["median"] / s["ours"]["dpmpp"]["median"]
    if "data" in results:
        d = results["data"]
        figures["data_peak_rss_ratio"] = d["ours"]["peak_rss_mb"]["median"] / d["baseline"]["peak_rss_mb"]["median"]
        grown = [d[k]["peak_rss_mb"]["median"] - d[k]["rss_after_import_mb"]["median"] for k in ("ours", "baseline")]
        figures["data_rss_growth_ratio"] = grown[0] / max(grown[1], 1e-9)
        figures["data_images_per_s"] = d["ours"]["images_per_s"]["median"]
        if "ae" in results:
            figures["data_over_ae_train_rate"] = figures["data_images_per_s"] / results["ae"]["ours"][default]["median"]
    return figures


def _cell(stats: dict, fmt: str) -> str:
    return f"{stats['median']:{fmt}} ({stats['min']:{fmt}}–{stats['max']:{fmt}})"


def _training_table(title: str, part: dict, what: str, baseline: str, default: str) -> list[str]:
    """A training measurement's table: the eager baseline, the original's UNet compiled (when
    `part` has it: the UNet's), each variant of ours, in images/s and × the eager baseline."""
    base = part["baseline"]["median"]
    lines = [
        f"### {title}",
        "",
        what,
        "",
        "| method | images/s, median (min–max) | × baseline |",
        "| --- | --- | --- |",
        f"| original: {baseline} | {_cell(part['baseline'], '.1f')} | 1.00 |",
    ]
    if "original_compiled" in part:
        lines.append(
            "| original's UNet, compiled: plain-Keras re-implementation, our compiled train step, float32 | "
            f"{_cell(part['original_compiled'], '.1f')} | {part['original_compiled']['median'] / base:.2f} |"
        )
    for name, stats in part["ours"].items():
        mark = " (train.py default)" if name == default else ""
        lines.append(
            f"| ours: compiled train step, {name}{mark} | {_cell(stats, '.1f')} | {stats['median'] / base:.2f} |"
        )
    return lines + [""]


def command(bench: BenchConfig, mode: str) -> str:
    """The bench.py command line of `bench`: the mode and the flags whose values differ from
    the mode's (--markdown and --json left out)."""
    words = ["python bench.py"] + ([] if mode == "full" else ["--mode", mode])
    for f in dataclasses.fields(BenchConfig):
        value = getattr(bench, f.name)
        if f.name in ("markdown", "json") or value == getattr(MODES[mode], f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, *map(str, value if isinstance(value, tuple) else [value])]
    return " ".join(words)


def markdown(results: dict, bench: BenchConfig, mode: str) -> str:
    """BENCHMARKS.md's generated part: the machine and settings, the headline figures, one
    table per measurement."""
    m, h = results["machine"], results["headline"]
    default = default_variant(m)
    lines = [
        "# Benchmarks",
        "",
        f"Made by `{command(bench, mode)}` on {m['date']}; numbers are "
        f"medians of {bench.repeats} timed repeats after {bench.warmup} warm-up call(s), with (min–max). Each "
        "ratio is against a baseline measured in the same run: original.py's re-implementation of the "
        "original design's approach. bench.py's docstring describes the methods.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, GPU: {', '.join(m['gpus']) or 'none'}",
        f"- Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}",
        f"- Mode: {mode}",
        f"- train.py's defaults on this machine: precision {m['train_py_precision']}, "
        f"XLA {'on' if m['train_py_xla'] else 'off'}",
        "",
        "## Headline",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    lines += [
        f"| `{key}` | {value:,.0f} |" if value >= 1000 else f"| `{key}` | {value:.3g} |" for key, value in h.items()
    ]
    lines.append("")

    if "unet" in results:
        u = results["unet"]
        lines += _training_table(
            "1. UNet training",
            u,
            f"Latents {bench.latent_size}×{bench.latent_size}×{bench.latent_channels}, UNet dim {bench.unet_dim} × "
            f"{tuple(bench.unet_dim_mults)}, layout {u['layout']} ({u['params']:,} parameters; the plain-Keras "
            f"re-implementation: {u['original_compiled_params']:,}), batch {bench.unet_batch}, {bench.unet_steps} "
            "step(s) per repeat. Ours and the original's UNet, compiled, run in LatentDiffusion.train_step (EMA "
            "update included).",
            "eager GradientTape, t and ε drawn in NumPy, float32",
            default,
        )
    if "ae" in results:
        a = results["ae"]
        lines += _training_table(
            "2. Autoencoder training",
            a,
            f"Images {bench.ae_image_size}×{bench.ae_image_size}, autoencoder layout {a['layout']}, base width "
            f"{bench.ae_base_channels} ({a['params'] / 1e6:.2f} M parameters), batch {bench.ae_batch}, "
            f"{bench.ae_steps} step(s) per repeat. Ours includes the SSIM and PSNR metrics.",
            "eager GradientTape, float32",
            default,
        )
    if "sampling" in results:
        s, n, t = results["sampling"], bench.samples, bench.timesteps
        k = s["baseline_steps_timed"]
        timed = f"{k} of the {t} steps of one image, scales to {t} steps and" if k < t else "one image and"
        lines += [
            "### 3. Sampling",
            "",
            f"Seconds to {n} decoded images at the UNet size above, T = {t}, float32 (as predict.py). The "
            f"baseline works one image at a time, so it times {timed} multiplies by {n}.",
            "",
            "| method | seconds, median (min–max) | × baseline |",
            "| --- | --- | --- |",
            f"| original: eager, one image at a time, DDPM {t} steps, NumPy arithmetic | "
            f"{_cell(s['baseline'], '.2f')} | 1.00 |",
        ]
        methods = (
            ("ddpm", "DDPM", t),
            ("ddim", "DDIM", bench.ddim_steps),
            ("dpmpp", "DPM-Solver++(2M)", bench.dpmpp_steps),
        )
        for key, name, steps in methods:
            ratio = s["baseline"]["median"] / s["ours"][key]["median"]
            lines.append(
                f"| ours: compiled, batched, {name} {steps} steps | {_cell(s['ours'][key], '.2f')} | {ratio:.1f} |"
            )
        lines.append("")
    if "data" in results:
        d = results["data"]
        lines += [
            "### 4. Data",
            "",
            f"One epoch over {d['images']} PNG slices (256×256, copies of the demo set) resized to "
            f"{bench.data_image_size}×{bench.data_image_size}, batch {bench.data_batch}, each approach in a fresh "
            'subprocess. "After import" is the process\'s peak RSS once TensorFlow is loaded, before any data; '
            '"growth" is peak RSS minus it.',
            "",
            "| method | images/s | peak RSS, MiB | after import, MiB | growth, MiB |",
            "| --- | --- | --- | --- | --- |",
        ]
        for label, key in (("original: load everything into NumPy", "baseline"), ("ours: streaming tf.data", "ours")):
            peak, base = d[key]["peak_rss_mb"]["median"], d[key]["rss_after_import_mb"]["median"]
            lines.append(
                f"| {label} | {_cell(d[key]['images_per_s'], '.0f')} | {peak:.0f} | {base:.0f} | {peak - base:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> tuple[BenchConfig, str, str | None]:
    """Two passes, as train.py's --preset: the mode first, then every flag defaults to its value."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--mode", choices=sorted(MODES), default="full")
    pre.add_argument("--quick", action="store_true")
    known, _ = pre.parse_known_args(argv)
    mode = "quick" if known.quick else known.mode

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mode", choices=sorted(MODES), default="full", help="full (the original's sizes), quick, smoke (tests)"
    )
    parser.add_argument("--quick", action="store_true", help="same as --mode quick")
    parser.add_argument(
        "--render", metavar="BENCH_JSON", help="measure nothing: re-write --markdown from an earlier bench.json"
    )
    cfg.add_dataclass_arguments(parser, BenchConfig, MODES[mode])
    args = parser.parse_args(argv)
    bench = cfg.dataclass_from_args(BenchConfig, args)
    unknown = set(bench.only) - set(BENCHMARKS)
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {' '.join(sorted(unknown))}; choose from {' '.join(BENCHMARKS)}")
    return bench, mode, args.render


# BENCHMARKS.md from this line on is written by hand (profiles, measurements that are not
# bench.py's) and kept as it is when bench.py re-writes the tables above it.
KEPT_MARKER = "<!-- written by hand from here on: bench.py keeps it -->"


def write_markdown(results: dict, bench: BenchConfig, mode: str) -> None:
    """`markdown(...)` to bench.markdown, atomically, keeping the file's hand-written tail
    (from `KEPT_MARKER` on) if it has one."""
    kept = ""
    if os.path.exists(bench.markdown):
        with open(bench.markdown) as f:
            old = f.read()
        if KEPT_MARKER in old:
            kept = "\n" + old[old.index(KEPT_MARKER) :]
    tmp = bench.markdown + ".tmp"
    with open(tmp, "w") as f:
        f.write(markdown(results, bench, mode) + kept)
    os.replace(tmp, bench.markdown)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["data-worker"]:  # internal: one data approach in a fresh process
        approach, folder, size, batch = argv[1:5]
        print(json.dumps(data_worker(approach, folder, int(size), int(batch))))
        return 0
    bench, mode, render = parse_args(argv)
    if render:
        with open(render) as f:
            results = json.load(f)
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in results["settings"].items()}
        write_markdown(results, BenchConfig(**{**settings, "markdown": bench.markdown}), results["mode"])
        print(f"wrote {bench.markdown} from {render}")
        return 0
    results = {"mode": mode, "settings": dataclasses.asdict(bench), "machine": machine()}
    if bench.keep_others and os.path.exists(bench.json):
        with open(bench.json) as f:
            earlier = json.load(f)
        if earlier["mode"] != mode or earlier["machine"]["cpu"] != results["machine"]["cpu"]:
            raise SystemExit(
                f"error: --keep-others: {bench.json} was measured in --mode {earlier['mode']} on "
                f"{earlier['machine']['cpu']}; this is --mode {mode} on {results['machine']['cpu']}: re-run all"
            )
        results.update({name: earlier[name] for name in BENCHMARKS if name in earlier and name not in bench.only})
    print(f"bench.py --mode {mode} on {results['machine']['cpu']} ({results['machine']['cores']} cores)", flush=True)
    steps = {"unet": bench_unet, "ae": bench_autoencoder, "sampling": bench_sampling, "data": bench_data}
    for name in BENCHMARKS:
        if name in bench.only:
            print(f"{name}:", flush=True)
            start = time.perf_counter()
            with hardware.dtype_policy("float32"):  # each benchmark sets its own; nothing leaks out
                results[name] = steps[name](bench)
            print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    results["headline"] = headline(results)
    cfg.write_json_atomic(results, bench.json)
    write_markdown(results, bench, mode)
    for key, value in results["headline"].items():
        print(f"{key}: {value:.3g}")
    print(f"wrote {bench.markdown}, {bench.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
