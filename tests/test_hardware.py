"""hardware.py: what `--precision auto` and `--xla auto` pick on each kind of device (GPUs
stood in for by monkeypatched device lists), and the oneDNN probe."""

import os
import subprocess
import sys

import pytest

import hardware
from conftest import ROOT


def fake_machine(monkeypatch, gpus=(), onednn=False, flags=""):
    """A machine with physical GPUs of compute capabilities `gpus` ((major, minor) each)."""
    devices = [f"GPU:{i}" for i in range(len(gpus))]
    details = dict(zip(devices, gpus, strict=True))
    monkeypatch.setattr(hardware.tf.config, "list_physical_devices", lambda kind=None: devices if kind == "GPU" else [])
    monkeypatch.setattr(
        hardware.tf.config.experimental, "get_device_details", lambda gpu: {"compute_capability": details[gpu]}
    )
    monkeypatch.setattr(hardware, "onednn_enabled", lambda: onednn)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)


@pytest.mark.parametrize(
    "gpus, flags, expected",
    [
        ([(9, 0)], "", "mixed_bfloat16"),  # H100
        ([(8, 0), (8, 0)], "", "mixed_bfloat16"),  # A100s
        ([(7, 0)], "", "mixed_float16"),  # V100
        ([(7, 5)], "avx512_bf16", "mixed_float16"),  # T4 (a GPU wins over the CPU's bf16)
        ([(6, 1)], "", "float32"),  # P100/GTX 10xx: no tensor cores
        ([], "avx512_bf16 amx_bf16", "mixed_bfloat16"),
        ([], "avx512f avx512_bf16", "float32"),  # bf16 without AMX: too little gain (BENCHMARKS.md)
        ([], "avx2 fma", "float32"),
    ],
)
def test_precision_auto_per_device(monkeypatch, gpus, flags, expected):
    fake_machine(monkeypatch, gpus, flags=flags)
    assert hardware.resolve_precision("auto") == expected
    assert hardware.resolve_precision("float32") == "float32"  # given: kept


def test_gpu_without_a_reported_compute_capability_trains_in_float32(monkeypatch):
    fake_machine(monkeypatch, [(8, 0)])
    monkeypatch.setattr(hardware.tf.config.experimental, "get_device_details", lambda gpu: {})
    assert hardware.gpu_compute_capability("GPU:0") == (0, 0)
    assert hardware.resolve_precision("auto") == "float32"


def test_xla_auto_per_device_and_never_over_several_replicas(monkeypatch):
    fake_machine(monkeypatch, onednn=False)  # an AVX2 CPU
    assert hardware.resolve_xla("auto", "float32") is True
    assert hardware.resolve_xla("auto", "mixed_bfloat16") is False
    assert hardware.resolve_xla("off", "float32") is False and hardware.resolve_xla("on", "mixed_bfloat16") is True
    fake_machine(monkeypatch, onednn=True)  # a CPU with AVX512-BF16/AMX
    assert hardware.resolve_xla("auto", "float32") is False
    fake_machine(monkeypatch, [(8, 0)])  # one GPU: on, whatever the precision
    assert hardware.resolve_xla("auto", "mixed_bfloat16") is True and hardware.resolve_xla("auto", "float32") is True
    # Several replicas (GPUs or logical CPUs): off, even when asked for.
    for setting in ("auto", "on"):
        assert hardware.resolve_xla(setting, "mixed_bfloat16", replicas=2) is False


def test_onednn_enabled_follows_the_environment_variable():
    """TensorFlow reads TF_ENABLE_ONEDNN_OPTS at start-up: check in fresh processes."""
    code = "import hardware; print(hardware.onednn_enabled())"
    answers = []
    for value in ("0", "1"):
        env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": value, "TF_CPP_MIN_LOG_LEVEL": "3"}
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        answers.append(result.stdout.strip().splitlines()[-1])
    assert answers == ["False", "True"]
