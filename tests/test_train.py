"""train.py end to end on tiny sizes: the run directory, a NaN stop, and a MirroredStrategy
run on two logical CPU devices (kills, resume and bad input: test_reliability.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import config as cfg
import hardware
import runs
import train
from conftest import ROOT, RUN_FLAGS, TINY, copy_of, history_epochs


def test_end_to_end_run_directory(tiny_data, tmp_path):
    out = tmp_path / "run"
    code = train.main(TINY + ["--data", tiny_data, "--out", str(out), "--ae-epochs", "1", "--ldm-epochs", "2"])
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["scale_factor"] > 0 and saved["data"]["image_size"] == 16
    # T = 20: β scaled by 1000 / T (the end capped at 0.999), written out with the terminal ᾱ
    # = Π (1 - β_t) and the range of the scaled training latents that samplers clip to.
    betas = np.linspace(0.005, 0.999, 20)
    assert (saved["diffusion"]["beta_start"], saved["diffusion"]["beta_end"]) == pytest.approx((0.005, 0.999))
    assert saved["terminal_alpha_bar"] == pytest.approx(np.prod(1 - betas), rel=1e-4)
    assert saved["latent_max_abs"] > 1.0  # unit-std latents reach beyond ±1
    for name in ["encoder", "decoder", "unet", "unet_ema"]:
        assert (out / f"{name}.weights.h5").stat().st_size > 0
    assert history_epochs(out / "history_autoencoder.csv") == [0]
    assert history_epochs(out / "history_diffusion.csv") == [0, 1]
    with open(out / "history_autoencoder.csv") as f:
        header = f.readline()
    assert "val_ssim" in header and "val_psnr" in header
    for figure in ["autoencoder_loss", "diffusion_loss", "reconstructions", "samples"]:
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000
    assert list((out / "logs" / "diffusion").rglob("events.out.tfevents.*"))
    assert list((out / "logs" / "diffusion" / "samples").glob("events.out.tfevents.*"))
    assert [p.name for p in sorted((out / "checkpoints" / "diffusion").iterdir())] == [
        "epoch-0001.weights.h5",
        "epoch-0002.weights.h5",
    ]


def test_non_finite_loss_stops_with_one_line_and_keeps_the_good_checkpoint(tiny_ae_run, tiny_data, tmp_path, capsys):
    """An absurd diffusion learning rate blows the loss up in epoch 2: exit 1, one clear
    line naming the stage and epoch, epoch 1's checkpoint still loadable and finite."""
    out = copy_of(tiny_ae_run, tmp_path / "run")
    argv = RUN_FLAGS + ["--data", tiny_data, "--out", out, "--ldm-epochs", "3"]
    # Epoch 1 at a sane rate, then resume with a rate that overflows the weights.
    assert train.main(argv + ["--stage", "ldm", "--ldm-epochs", "1"]) == 0
    capsys.readouterr()
    code = train.main(argv + ["--stage", "ldm", "--lr", "1e30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: diffusion loss became") and "in epoch 2" in err[0], err
    checkpoints = os.path.join(out, "checkpoints", "diffusion")
    assert sorted(os.listdir(checkpoints)) == ["epoch-0001.weights.h5"]
    model = runs.build_diffusion(cfg.load_config(os.path.join(out, "config.json")))
    model.load_weights(os.path.join(checkpoints, "epoch-0001.weights.h5"))
    assert all(np.isfinite(w).all() for w in model.network.get_weights())
    assert not os.path.exists(os.path.join(tiny_ae_run, "checkpoints", "diffusion"))  # a copied run writes to its copy


def test_unknown_preset_is_one_line(capsys):
    assert train.main(["--preset", "huge"]) == 1
    assert capsys.readouterr().err.strip() == "error: unknown preset 'huge'; choose one of demo, oasis, seed"


@pytest.mark.slow
def test_xla_run_trains_both_stages(tiny_data, tmp_path, capsys):
    """--xla on (what `auto` picks on an AVX2 CPU in float32): both fits compile with XLA."""
    out = tmp_path / "run"
    assert train.main(RUN_FLAGS + ["--data", tiny_data, "--out", str(out), "--xla", "on"]) == 0
    assert "XLA: on" in capsys.readouterr().out
    assert cfg.load_config(out / "config.json").train.xla == "on"
    assert history_epochs(out / "history_diffusion.csv") == [0]
    assert (out / "unet_ema.weights.h5").stat().st_size > 0


def test_xla_auto_is_on_only_for_float32_on_a_cpu_without_onednn(monkeypatch):
    monkeypatch.setattr(hardware.tf.config, "list_physical_devices", lambda kind=None: [])
    monkeypatch.setattr(hardware, "onednn_enabled", lambda: False)  # an AVX2 CPU
    assert hardware.resolve_xla("auto", "float32") is True
    assert hardware.resolve_xla("auto", "mixed_bfloat16") is False
    assert hardware.resolve_xla("off", "float32") is False and hardware.resolve_xla("on", "mixed_bfloat16") is True
    monkeypatch.setattr(hardware, "onednn_enabled", lambda: True)  # a CPU with AVX512-BF16/AMX
    assert hardware.resolve_xla("auto", "float32") is False
    monkeypatch.setattr(hardware.tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"])
    monkeypatch.setattr(hardware, "onednn_enabled", lambda: False)
    assert hardware.resolve_xla("auto", "float32") is False  # GPUs: not measured, off


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
