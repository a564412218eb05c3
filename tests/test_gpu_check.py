"""gpu_check.py on the CPU (--allow-cpu --tiny): every setting trains both stages and stays finite,
2 logical CPU devices stand in for 2 GPUs, the resume continues, and its table replaces the
block between the markers of a BENCHMARKS.md copy, leaving the rest as it was."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_runs_every_setting_on_the_cpu(tiny_data, tmp_path):
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text(
        "# Benchmarks\n\nbefore\n\n<!-- gpu-check: written by gpu_check.py -->\n"
        "old table\n<!-- /gpu-check -->\n\nafter\n"
    )
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, os.path.join(ROOT, "gpu_check.py"), "--allow-cpu", "--tiny", "--steps", "2"]
    command += ["--precisions", "mixed_float16", "--xla", "off", "--out", str(out)]
    command += ["--benchmarks", str(benchmarks), "--data", tiny_data]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    settings = [(r["precision"], r["xla"], r["replicas"]) for r in report["results"]]
    # mixed_float16 only (the loss-scaled optimizer, the setting most likely to break), to keep it short.
    assert settings == [("mixed_float16", False, 1), ("mixed_float16", False, 2)]
    for r in report["results"]:
        assert r["failed"] == [] and r["autoencoder_images_per_s"] > 0 and r["unet_images_per_s"] > 0
        assert r["optimizer"] == "LossScaleOptimizer"
        assert r["steps_per_execution"] == (2 if r["replicas"] == 1 else 1)
    assert report["resume_failed"] == [] and "continues after epoch 1" in result.stdout
    text = benchmarks.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old table" not in text and text.count("| mixed_float16 | off | 2 | 1 |") == 1


def test_gpu_check_without_a_gpu_is_one_line(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "gpu_check.py"), "--out", str(tmp_path / "x.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "TensorFlow sees no GPU" in lines[0] and "make gpu-check" in lines[0], result.stderr
    assert not (tmp_path / "x.json").exists()
