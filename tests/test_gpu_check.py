"""gpu_check.py without a GPU: one setting measured in this process with tiny networks (the
settings over 2 replicas are what test_distributed.py checks), the resume check's verdicts,
the table replacing the block between the markers of a BENCHMARKS.md and nothing else, and
the one-line refusal on a machine without a GPU."""

import os
import subprocess
import sys

import tensorflow as tf

import gpu_check
from conftest import ROOT


def test_one_setting_trains_both_stages_and_reports_images_per_s():
    config = gpu_check.run_config(gpu_check.GpuCheckConfig(tiny=True))
    assert config.data.image_size == 16 and config.train.batch_size == 4
    result = gpu_check.measure(config, "mixed_float16", "off", tf.distribute.get_strategy(), steps=2)
    assert result["failed"] == [], result
    assert result["optimizer"] == "LossScaleOptimizer" and result["replicas"] == 1
    assert result["steps_per_execution"] == 2 and result["xla"] is False
    assert result["autoencoder_images_per_s"] > 0 and result["unet_images_per_s"] > 0


def test_resume_check_reads_train_pys_exit_and_its_resume_line(monkeypatch, tmp_path):
    calls = []

    def fake_run(stdout, code=0):
        def run(command, **kwargs):
            calls.append(command)
            return subprocess.CompletedProcess(command, code, stdout, "error: boom")

        return run

    check = gpu_check.GpuCheckConfig(tiny=True, data="pngs")
    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run("resuming the diffusion model after epoch 1\n"))
    assert gpu_check.resume_check(check, str(tmp_path)) == []
    fresh, resumed = calls
    assert "--resume" not in fresh and resumed[-3:] == ["--resume", "--ldm-epochs", "2"]
    assert fresh[fresh.index("--data") + 1] == "pngs" and "--checkpoint-minutes" in fresh
    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run("done\n"))
    assert gpu_check.resume_check(check, str(tmp_path)) == [
        "train.py --resume did not continue after diffusion epoch 1"
    ]
    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run("", code=1))
    assert gpu_check.resume_check(check, str(tmp_path))[0].startswith("train.py (fresh) exited 1: error: boom")


def test_table_replaces_only_the_block_between_the_markers(tmp_path):
    report = {
        "date": "2026-12-02",
        "tiny": False,
        "gpus": [{"name": "NVIDIA H200", "compute_capability": "9.0"}],
        "tensorflow": "2.21.0",
        "keras": "3.15.0",
        "steps": 20,
        "batch": 64,
        "auto": {"precision": "mixed_bfloat16", "xla": True, "strategy": "default"},
        "resume_failed": [],
        "results": [
            {
                "precision": "mixed_bfloat16",
                "xla": True,
                "replicas": 1,
                "steps_per_execution": 20,
                "autoencoder_images_per_s": 900.5,
                "unet_images_per_s": 1200.0,
                "failed": [],
            },
            {
                "precision": "float32",
                "xla": False,
                "replicas": 2,
                "steps_per_execution": 1,
                "autoencoder_images_per_s": 10.0,
                "unet_images_per_s": 20.0,
                "failed": ["diffusion: loss nan"],
            },
        ],
    }
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\nbefore\n\n{gpu_check.BEGIN}\nold table\n{gpu_check.END}\n\nafter\n")
    gpu_check.write_benchmarks(str(path), gpu_check.table(report))
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "old table" not in text
    assert "NVIDIA H200 (compute capability 9.0)" in text and "precision mixed_bfloat16, XLA on" in text
    assert "| mixed_bfloat16 | on | 1 | 20 | 900.5 | 1200.0 | finite |" in text
    assert "| float32 | off | 2 | 1 | 10.0 | 20.0 | diffusion: loss nan |" in text
    gpu_check.write_benchmarks(str(tmp_path / "new.md"), gpu_check.table(report))  # no markers: appended
    assert (tmp_path / "new.md").read_text().startswith("\n\n## GPU check\n\n" + gpu_check.BEGIN)


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
