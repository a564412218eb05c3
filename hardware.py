"""What depends on the machine: compute precision, XLA, and the Keras dtype policy they set.

`--precision auto` and `--xla auto` are resolved here (train.py, predict.py, evaluate.py,
bench.py), from what the machine reports, never from a global: see `resolve_precision` and
`resolve_xla`; BENCHMARKS.md has the measurements behind the choices.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time

import keras
import tensorflow as tf

from config import write_json_atomic

# --precision auto on a CPU with AVX512-BF16 but no AMX: bf16 must run the probe this much faster.
BF16_MIN_GAIN = 1.1
PROBE_FILE = "cpu_precision.json"  # in `cache_dir()`: the probe's verdict per CPU model and TensorFlow


def resolve_precision(precision: str) -> str:
    """`precision` as given, or for `auto`:

    * on a GPU machine, by the first GPU's compute capability: mixed_bfloat16 from 8.0
      (Ampere, Hopper, ...: bf16 tensor cores, float32's exponent range, no loss scaling),
      mixed_float16 on 7.x (Volta, Turing: fp16 tensor cores only; with loss scaling),
      float32 below 7.0 or when TensorFlow does not report it;
    * on a CPU-only machine: mixed_bfloat16 with AMX (its bf16 tile units), float32 without
      AVX512-BF16; in between, on a CPU with AVX512-BF16 but no AMX, whichever of the two ran
      a convolution's training step faster on this machine (`probe_cpu_precision`, measured
      once and cached): such CPUs differ (BENCHMARKS.md has one of each way).
    """
    if precision != "auto":
        return precision
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        major = gpu_compute_capability(gpus[0])[0]
        return "mixed_bfloat16" if major >= 8 else "mixed_float16" if major == 7 else "float32"
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "mixed_bfloat16"
    if "avx512_bf16" not in flags:
        return "float32"
    return probe_cpu_precision()


def cache_dir() -> str:
    """Where machine measurements are kept: $OASIS_LDM_CACHE, else $XDG_CACHE_HOME/oasis-ldm
    (~/.cache/oasis-ldm)."""
    if os.environ.get("OASIS_LDM_CACHE"):
        return os.environ["OASIS_LDM_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "oasis-ldm")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    for line in cpu_flags().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def probe_cpu_precision(measure=None) -> str:
    """mixed_bfloat16 if a bf16 convolution training step runs at least `BF16_MIN_GAIN` times as
    fast as the float32 one on this CPU, else float32. Measured once per CPU model, core count,
    TensorFlow version and oneDNN setting (`measure_conv_step`, about 2 s), then read from
    `PROBE_FILE` in `cache_dir()`; an unreadable cache is measured anew. `measure`: a
    replacement for `measure_conv_step` (tests)."""
    key = f"{cpu_model()} | {os.cpu_count()} cores | TF {tf.__version__} | oneDNN {'on' if onednn_enabled() else 'off'}"
    path = os.path.join(cache_dir(), PROBE_FILE)
    try:
        with open(path) as f:
            known = json.load(f)
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if isinstance(entry, dict) and entry.get("precision") in ("float32", "mixed_bfloat16"):
        return entry["precision"]
    seconds = (measure or measure_conv_step)()
    gain = seconds["float32"] / seconds["bfloat16"]
    choice = "mixed_bfloat16" if gain >= BF16_MIN_GAIN else "float32"
    print(f"--precision auto: bf16 ran a convolution step {gain:.2f}× as fast as float32 here: {choice}", flush=True)
    known[key] = {"precision": choice, "bf16_gain": round(gain, 3), "seconds": seconds}
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        write_json_atomic(known, path)
    except OSError:  # a read-only home: measured again next time
        pass
    return choice


def measure_conv_step(rounds: int = 5, calls: int = 3) -> dict[str, float]:
    """Median seconds of `calls` forward + backward passes of a 3×3 convolution (batch 16, 32×32,
    64 → 64 channels, the shape of the UNet's first level), in float32 and in bfloat16,
    interleaved over `rounds` so that a noisy neighbour slows both alike."""
    steps = {}
    for dtype in (tf.float32, tf.bfloat16):
        x = tf.random.stateless_normal((16, 32, 32, 64), seed=(0, 1), dtype=dtype)
        w = tf.random.stateless_normal((3, 3, 64, 64), seed=(0, 2), dtype=dtype) * 0.05

        @tf.function
        def step(x=x, w=w):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                loss = tf.reduce_sum(tf.square(tf.nn.conv2d(x, w, 1, "SAME")))
            return tape.gradient(loss, [x, w])

        step()  # trace
        steps[dtype.name] = step
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls):
                step()[0].numpy()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def gpu_compute_capability(gpu) -> tuple[int, int]:
    """(major, minor) CUDA compute capability of a physical GPU device; (0, 0) if unknown."""
    try:
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
    except (ValueError, RuntimeError):
        capability = None
    return tuple(capability) if capability else (0, 0)


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them ("" where there is none to read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def resolve_xla(setting: str, precision: str, replicas: int = 1) -> bool:
    """Whether to compile the train steps with XLA (`jit_compile`) for `--xla` `setting` under a
    strategy of `replicas` replicas.

    Never with more than one replica, whatever the setting (train.py says so for `on`): the
    train step runs inside `strategy.run`, and XLA cannot compile the merge_call that the EMA
    update and the optimizer make there (keras-team/keras#18145, #18627; Keras' own `auto`
    turns XLA off under tf.distribute too). `auto` is otherwise on on a GPU (fused kernels,
    fewer launches), and on a CPU-only machine only where TensorFlow runs without its oneDNN
    kernels, in float32: an AVX2 CPU (TensorFlow 2.21 turns oneDNN off on CPUs without
    AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX), whose own convolutions are slower than the
    code XLA generates; with oneDNN on (the bf16 CPUs) XLA makes the steps slower (BENCHMARKS.md).
    """
    if replicas > 1:
        return False
    if setting != "auto":
        return setting == "on"
    if tf.config.list_physical_devices("GPU"):
        return True
    if precision != "float32":
        return False
    return not onednn_enabled()


def onednn_enabled() -> bool:
    """Whether this TensorFlow process runs its oneDNN CPU kernels: TF_ENABLE_ONEDNN_OPTS when
    set, else TensorFlow's choice for this CPU (on for AVX512-VNNI/BF16, AVX-VNNI or AMX)."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # TensorFlow's own answer (internal API)

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        pass
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if setting is not None:
        return setting.strip().lower() in ("1", "true")
    flags = cpu_flags()
    return any(flag in flags for flag in ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_"))


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
