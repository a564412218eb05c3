"""What depends on the machine: compute precision, XLA, and the Keras dtype policy they set.

`--precision auto` and `--xla auto` are resolved here (train.py, predict.py, evaluate.py,
bench.py), from what the machine reports, never from a global: see `resolve_precision` and
`resolve_xla`; BENCHMARKS.md has the measurements behind the choices.
"""

from __future__ import annotations

import contextlib
import os

import keras
import tensorflow as tf


def resolve_precision(precision: str) -> str:
    """`precision` as given, or for `auto`:

    * on a GPU machine, by the first GPU's compute capability: mixed_bfloat16 from 8.0
      (Ampere, Hopper, ...: bf16 tensor cores, float32's exponent range, no loss scaling),
      mixed_float16 on 7.x (Volta, Turing: fp16 tensor cores only; with loss scaling),
      float32 below 7.0 or when TensorFlow does not report it;
    * on a CPU-only machine: mixed_bfloat16 with AMX (its bf16 tile units: 1.3–2.4× float32's
      training throughput), else float32. A CPU with AVX512-BF16 but no AMX gains too little
      from bf16 for what it costs (BENCHMARKS.md: an Intel one ran the UNet's step slower in
      bf16, an AMD EPYC the whole demo 1.02× faster, with samples that followed their
      conditions less well).
    """
    if precision != "auto":
        return precision
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        major = gpu_compute_capability(gpus[0])[0]
        return "mixed_bfloat16" if major >= 8 else "mixed_float16" if major == 7 else "float32"
    return "mixed_bfloat16" if "amx_bf16" in cpu_flags() else "float32"


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
