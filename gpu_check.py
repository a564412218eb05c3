"""Check a GPU machine in one command: both stages train at the `oasis` preset's sizes in each
precision, XLA off and on, on one GPU and mirrored over all of them, and a run resumes.

    make gpu-check                   # installs TensorFlow's CUDA libraries (requirements-gpu.txt), then this
    python gpu_check.py              # the same, where they are installed
    python gpu_check.py --steps 50   # longer timings
    python gpu_check.py --allow-cpu --tiny   # tiny networks on the CPU: what the test suite runs

For each setting it builds and compiles the models as train.py does (`runs.build_*`,
`runs.compile_*`: loss scaling, XLA and steps per execution as train.py would choose them),
fits one untimed epoch of `--steps` steps (tracing, compilation) and one timed epoch on
random images and latents of the preset's batch, and asserts finite losses and weights.
mixed_bfloat16 runs where the GPU has compute capability 8.0 or more; XLA is never used
with several replicas (hardware.resolve_xla), so the mirrored setting runs once per
precision. Then `train.py --preset oasis` trains a few steps of both stages on the demo
data set, is resumed for one more diffusion epoch, and must continue after epoch 1.

Prints images/s of each setting and what `--precision auto`, `--xla auto` and `--strategy
auto` pick here; writes gpu_check.json and the table between the gpu-check markers in
BENCHMARKS.md. Exit 1 after all settings ran if any check failed, with one line for each.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
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
import hardware  # noqa: E402
import runs  # noqa: E402
from config import option  # noqa: E402

BEGIN, END = "<!-- gpu-check: written by gpu_check.py -->", "<!-- /gpu-check -->"
TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
# --tiny: the test suite's networks (16 px, 8×8×2 latents, a one-level UNet of width 8, T = 20).
TINY_FLAGS = (
    "--image-size 16 --ae-base-channels 8 --ae-channel-mults 1 2 --ae-blocks-per-level 1 --latent-channels 2 "
    "--unet-dim 8 --unet-dim-mults 1 --unet-groups 4 --attn-heads 2 --attn-dim-head 8 --timesteps 20 --batch-size 4"
).split()


@dataclass
class GpuCheckConfig:
    steps: int = option(20, "timed train steps per stage and setting (after an untimed epoch of as many)")
    precisions: tuple[str, ...] = option(
        ("float32", "mixed_float16", "mixed_bfloat16"),
        "precisions to try; mixed_bfloat16 only on compute capability 8.0 or more",
    )
    xla: tuple[str, ...] = option(("off", "on"), "XLA settings to try on one device")
    tiny: bool = option(False, "tiny networks at 16 px: checks this script, not the machine")
    allow_cpu: bool = option(False, "run without a GPU (on the CPU, mirrored over 2 logical CPU devices)")
    data: str = option("", "PNG folder for the resume check ('': the demo data set, made on first use)")
    out: str = option("gpu_check.json", "where the measurements are written")
    benchmarks: str = option("BENCHMARKS.md", "the file whose gpu-check table is rewritten ('' for none)")


def run_config(check: GpuCheckConfig) -> cfg.RunConfig:
    """The `oasis` preset (or, with --tiny, TINY_FLAGS on it), as train.py would parse it."""
    parser = argparse.ArgumentParser()
    cfg.add_config_arguments(parser, cfg.preset("oasis"))
    return cfg.config_from_args(parser.parse_args(TINY_FLAGS if check.tiny else []), "oasis")


class EpochTimes(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.start  # the last epoch's


def fit_and_time(model: keras.Model, data: tf.data.Dataset, steps: int, batch: int) -> tuple[float, list[str]]:
    """Images/s of the second of two `steps`-step epochs, and what failed (non-finite loss or weights)."""
    timer = EpochTimes()
    history = model.fit(data, epochs=2, steps_per_epoch=steps, verbose=0, callbacks=[timer], shuffle=False)
    failed = [f"loss {v}" for v in history.history["loss"] if not math.isfinite(v)]
    if not all(np.isfinite(w).all() for w in model.get_weights()):
        failed.append("non-finite weights")
    return steps * batch / timer.seconds, failed


def measure(config: cfg.RunConfig, precision: str, xla: str, strategy, steps: int) -> dict:
    """Train both stages for 2 × `steps` steps in `precision` with --xla `xla` under `strategy`."""
    config = copy.deepcopy(config)
    config.train.precision, config.train.xla = precision, xla
    batch, size = config.train.batch_size, config.data.image_size
    h, c = config.latent_size, config.autoencoder.latent_channels
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch, size, size, 1)).astype(np.float32)
    latents = rng.standard_normal((batch, h, h, c)).astype(np.float32)
    with hardware.dtype_policy(precision), strategy.scope():
        _, per_execution = runs.epoch_steps(steps, 0, batch, config.train.steps_per_execution)
        xla_used = runs.train_with_xla(config)
        autoencoder = runs.build_autoencoder(config)
        runs.compile_autoencoder(autoencoder, config, per_execution)
        diffusion = runs.build_diffusion(config)
        runs.compile_diffusion(diffusion, config, per_execution)
    ae_rate, ae_failed = fit_and_time(
        autoencoder, tf.data.Dataset.from_tensors((images, images)).repeat(), steps, batch
    )
    unet_rate, unet_failed = fit_and_time(diffusion, tf.data.Dataset.from_tensors(latents).repeat(), steps, batch)
    return {
        "precision": precision,
        "xla": xla_used,
        "replicas": strategy.num_replicas_in_sync,
        "steps_per_execution": per_execution,
        "optimizer": type(diffusion.optimizer).__name__,
        "autoencoder_images_per_s": round(ae_rate, 1),
        "unet_images_per_s": round(unet_rate, 1),
        "failed": [f"autoencoder: {f}" for f in ae_failed] + [f"diffusion: {f}" for f in unet_failed],
    }


def resume_check(check: GpuCheckConfig, folder: str) -> list[str]:
    """train.py on the demo data set for a few steps of both stages, then --resume for one more
    diffusion epoch: it must resume after epoch 1 and finish. What failed, as lines."""
    out = os.path.join(folder, "run")
    flags = ["--preset", "oasis", *(TINY_FLAGS if check.tiny else [])]
    flags += "--ae-epochs 1 --ldm-epochs 1 --ae-steps-per-epoch 4 --ldm-steps-per-epoch 4 --sample-every 0".split()
    flags += ["--checkpoint-minutes", "0", "--out", out] + (["--data", check.data] if check.data else [])
    for extra in ([], ["--resume", "--ldm-epochs", "2"]):
        result = subprocess.run([sys.executable, TRAIN, *flags, *extra], capture_output=True, text=True)
        if result.returncode:
            return [
                f"train.py {' '.join(extra) or '(fresh)'} exited {result.returncode}: {result.stderr.strip()[-300:]}"
            ]
    if "resuming the diffusion model after epoch 1" not in result.stdout:
        return ["train.py --resume did not continue after diffusion epoch 1"]
    return []


def device_summary() -> list[dict]:
    return [
        {
            "name": tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name),
            "compute_capability": ".".join(map(str, hardware.gpu_compute_capability(gpu))),
        }
        for gpu in tf.config.list_physical_devices("GPU")
    ]


def table(report: dict) -> str:
    """The Markdown block between the gpu-check markers."""
    auto = report["auto"]
    devices = ", ".join(f"{d['name']} (compute capability {d['compute_capability']})" for d in report["gpus"]) or (
        "no GPU (CPU)"
    )
    lines = [
        BEGIN,
        f"Measured {report['date']} by `python gpu_check.py{' --tiny' if report['tiny'] else ''}` on {devices}; "
        f"TensorFlow {report['tensorflow']}, Keras {report['keras']}; {report['steps']} timed steps per stage "
        f"after as many untimed ones, batch {report['batch']}, random data at the `oasis` sizes"
        f"{' (tiny networks)' if report['tiny'] else ''}. `auto` picks here: precision {auto['precision']}, "
        f"XLA {'on' if auto['xla'] else 'off'} on one device, strategy {auto['strategy']}. "
        f"Resume check: {'passed' if not report['resume_failed'] else '; '.join(report['resume_failed'])}.",
        "",
        "| precision | XLA | replicas | steps / execution | autoencoder images/s | UNet images/s | checks |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['precision']} | {'on' if r['xla'] else 'off'} | {r['replicas']} | {r['steps_per_execution']} | "
            f"{r['autoencoder_images_per_s']} | {r['unet_images_per_s']} | {'; '.join(r['failed']) or 'finite'} |"
        )
    return "\n".join(lines + [END])


def write_benchmarks(path: str, block: str) -> None:
    """Replace the block between the markers in `path` (append it, under a heading, when absent)."""
    text = open(path).read() if os.path.exists(path) else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n## GPU check\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run(argv: list[str]) -> None:
    parser = cli.FlagParser(description=__doc__.split("\n\n")[0])
    cfg.add_dataclass_arguments(parser, GpuCheckConfig, GpuCheckConfig())
    check = cfg.dataclass_from_args(GpuCheckConfig, parser.parse_args(argv))
    unknown = set(check.precisions) - set(cfg.PRECISIONS) | set(check.xla) - {"off", "on"}
    if unknown or "auto" in check.precisions:
        raise cli.UserError(
            f"unknown --precisions/--xla value(s): {', '.join(sorted(unknown | {'auto'} & set(check.precisions)))}"
        )
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not check.allow_cpu:
        raise cli.UserError(
            "TensorFlow sees no GPU: install its CUDA libraries with `make gpu-check` (requirements-gpu.txt), "
            "check `nvidia-smi`, or add --allow-cpu to run this on the CPU"
        )
    if not gpus:  # before TensorFlow starts its devices: 2 logical CPUs stand in for 2 GPUs
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    config = run_config(check)
    major = hardware.gpu_compute_capability(gpus[0])[0] if gpus else 0
    precisions = [p for p in check.precisions if p != "mixed_bfloat16" or major >= 8 or not gpus]
    devices = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
    settings = [(p, x, tf.distribute.get_strategy()) for p in precisions for x in check.xla]
    if len(devices) > 1:
        settings += [(p, "off", tf.distribute.MirroredStrategy(devices)) for p in precisions]
    results = []
    for precision, xla, strategy in settings:
        result = measure(config, precision, xla, strategy, check.steps)
        results.append(result)
        print(
            f"{precision:15s} XLA {'on ' if result['xla'] else 'off'} {result['replicas']} replica(s): autoencoder "
            f"{result['autoencoder_images_per_s']} images/s, UNet {result['unet_images_per_s']} images/s; "
            f"{'; '.join(result['failed']) or 'finite'}",
            flush=True,
        )
    with tempfile.TemporaryDirectory() as folder:
        resume_failed = resume_check(check, folder)
    print(f"resume: {'; '.join(resume_failed) or 'continues after epoch 1'}")
    auto_precision = hardware.resolve_precision("auto")
    report = {
        "date": datetime.date.today().isoformat(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "gpus": device_summary(),
        "tiny": check.tiny,
        "steps": check.steps,
        "batch": config.train.batch_size,
        "auto": {
            "precision": auto_precision,
            "xla": hardware.resolve_xla("auto", auto_precision),
            "strategy": "mirrored" if len(gpus) > 1 else "default",
        },
        "results": results,
        "resume_failed": resume_failed,
    }
    print(
        f"auto picks: precision {auto_precision}, XLA {'on' if report['auto']['xla'] else 'off'}, "
        f"strategy {report['auto']['strategy']}"
    )
    with open(check.out, "w") as f:
        json.dump(report, f, indent=2)
    if check.benchmarks:
        write_benchmarks(check.benchmarks, table(report))
    failed = [
        f"{r['precision']}, XLA {r['xla']}, {r['replicas']} replica(s): {f}" for r in results for f in r["failed"]
    ]
    failed += [f"resume: {f}" for f in resume_failed]
    if failed:
        raise cli.UserError("gpu check failed: " + " | ".join(failed))


def main(argv: list[str] | None = None) -> int:
    return cli.cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
