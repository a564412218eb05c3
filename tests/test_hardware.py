"""hardware.py: what `--precision auto` and `--xla auto` pick on each kind of device (GPUs
stood in for by monkeypatched device lists), and the oneDNN probe."""

import json
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
        ([], "avx2 fma", "float32"),
    ],
)
def test_precision_auto_per_device(monkeypatch, gpus, flags, expected):
    """No probe on these: a GPU, AMX or no AVX512-BF16 decide alone."""
    fake_machine(monkeypatch, gpus, flags=flags)
    monkeypatch.setattr(hardware, "probe_cpu_precision", lambda: pytest.fail("probed"))
    assert hardware.resolve_precision("auto") == expected
    assert hardware.resolve_precision("float32") == "float32"  # given: kept


def test_avx512_bf16_without_amx_is_probed_once_and_cached(monkeypatch, tmp_path, capsys):
    """bf16 1.5× faster: mixed_bfloat16, printed once, cached per CPU model and oneDNN setting (a
    second call measures nothing); on another CPU model a bf16 only 1.05× faster gives float32;
    a damaged cache file is measured anew and rewritten."""
    monkeypatch.setenv("OASIS_LDM_CACHE", str(tmp_path))
    fake_machine(monkeypatch, flags="model name\t: Fast bf16 CPU\nflags : avx512f avx512_bf16\n")
    calls = []

    def measure(gain):
        def run():
            calls.append(gain)
            return {"float32": 0.3 * gain, "bfloat16": 0.3}

        return run

    monkeypatch.setattr(hardware, "measure_conv_step", measure(1.5))
    assert hardware.resolve_precision("auto") == "mixed_bfloat16"
    assert "1.50× as fast as float32 here: mixed_bfloat16" in capsys.readouterr().out
    assert hardware.resolve_precision("auto") == "mixed_bfloat16" and calls == [1.5]
    monkeypatch.setattr(hardware, "cpu_flags", lambda: "model name\t: Slow bf16 CPU\nflags : avx512_bf16\n")
    monkeypatch.setattr(hardware, "measure_conv_step", measure(1.05))
    assert hardware.resolve_precision("auto") == "float32" and calls == [1.5, 1.05]
    cached = json.loads((tmp_path / hardware.PROBE_FILE).read_text())
    assert sorted(entry["precision"] for entry in cached.values()) == ["float32", "mixed_bfloat16"]
    assert all(key.endswith("oneDNN off") for key in cached)
    (tmp_path / hardware.PROBE_FILE).write_text("{not json")
    assert hardware.resolve_precision("auto") == "float32" and calls == [1.5, 1.05, 1.05]
    assert len(json.loads((tmp_path / hardware.PROBE_FILE).read_text())) == 1


def test_the_conv_probe_measures_both_dtypes():
    seconds = hardware.measure_conv_step(rounds=1, calls=1)
    assert set(seconds) == {"float32", "bfloat16"} and all(0 < s < 60 for s in seconds.values())


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
