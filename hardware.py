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
    """`precision` as given, or for `auto`: mixed_bfloat16 on a CPU-only machine whose CPU reports
    native bf16 (AVX512-BF16 or AMX), float32 elsewhere; on a GPU, choose mixed_float16 or
    mixed_bfloat16 explicitly."""
    if precision != "auto":
        return precision
    if tf.config.list_physical_devices("GPU"):
        return "float32"
    flags = cpu_flags()
    return "mixed_bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them ("" where there is none to read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def resolve_xla(setting: str, precision: str) -> bool:
    """Whether to compile the train steps with XLA (`jit_compile`) for `--xla` `setting`.

    `auto` is on only on a CPU-only machine whose TensorFlow runs without its oneDNN kernels,
    in float32. That is an AVX2 CPU: TensorFlow 2.21 turns oneDNN off by default on CPUs
    without AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX, and its own convolutions are then slower than the code XLA
    generates for the CPU at hand; with oneDNN on (the bf16 CPUs) XLA makes the steps slower
    (BENCHMARKS.md). On a GPU, auto stays off: not measured yet.
    """
    if setting != "auto":
        return setting == "on"
    if precision != "float32" or tf.config.list_physical_devices("GPU"):
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
