"""train.py end to end on tiny sizes: the run directory, a NaN stop, XLA, the checkpoint interval,
steps per execution and resuming across precisions (kills, resume and bad input:
test_reliability.py; strategies: test_distributed.py, test_multiworker.py)."""

import json
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import cli
import config as cfg
import dataset
import hardware
import runs
import train
from conftest import RUN_FLAGS, TINY, copy_of, history_epochs, snapshot


def test_end_to_end_run_directory(tiny_data, tmp_path, capsys):
    """Both stages with XLA on (what `auto` picks on an AVX2 CPU in float32); the autoencoder
    one pass over the training images at a batch size of its own."""
    out = tmp_path / "run"
    argv = TINY + ["--data", tiny_data, "--out", str(out), "--ae-epochs", "1", "--ldm-epochs", "2", "--xla", "on"]
    argv += ["--ae-batch-size", "2", "--ae-steps-per-epoch", "0"]
    argv += ["--schedule", "linear"]  # the β range written below (the demo preset's is cosine)
    assert train.main(argv) == 0
    printed = capsys.readouterr().out
    assert "XLA: on" in printed
    steps = len(dataset.find_splits(tiny_data)["train"]) // 2
    assert f"\n{steps}/{steps} - " in printed  # Keras' line for the autoencoder's epoch
    assert cfg.load_config(out / "config.json").train.xla == "on"
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
    for figure in ["autoencoder_loss", "diffusion_loss", "reconstructions"]:
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000
    assert not (out / "figures" / "samples.png").exists()  # predict.py's, not drawn twice
    assert list((out / "logs" / "diffusion").rglob("events.out.tfevents.*"))
    assert list((out / "logs" / "diffusion" / "samples").glob("events.out.tfevents.*"))
    assert [p.name for p in sorted((out / "checkpoints" / "diffusion").iterdir())] == [
        "epoch-0001.weights.h5",
        "epoch-0002.weights.h5",
    ]


def test_non_finite_loss_stops_with_one_line_and_keeps_the_good_checkpoint(tiny_run, tiny_data, tmp_path, capsys):
    """An absurd diffusion learning rate blows the loss up in epoch 2: exit 1, one clear
    line naming the stage and epoch, epoch 1's checkpoint still loadable and finite."""
    out = copy_of(tiny_run, tmp_path / "run")  # diffusion epoch 1 trained at a sane rate
    argv = RUN_FLAGS + ["--data", tiny_data, "--out", out, "--ldm-epochs", "3"]
    code = train.main(argv + ["--stage", "ldm", "--lr", "1e30"])  # a rate that overflows the weights
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: diffusion loss became") and "in epoch 2" in err[0], err
    checkpoints = os.path.join(out, "checkpoints", "diffusion")
    assert sorted(os.listdir(checkpoints)) == ["epoch-0001.weights.h5"]
    model = runs.build_diffusion(cfg.load_config(os.path.join(out, "config.json")))
    model.load_weights(os.path.join(checkpoints, "epoch-0001.weights.h5"))
    assert all(np.isfinite(w).all() for w in model.network.get_weights())
    assert sorted(os.listdir(os.path.join(tiny_run, "checkpoints", "diffusion"))) == ["epoch-0001.weights.h5"]


def test_unknown_preset_is_one_line(capsys):
    assert train.main(["--preset", "huge"]) == 1
    assert capsys.readouterr().err.strip() == "error: unknown preset 'huge'; choose one of demo, oasis, seed"


def test_a_reopened_run_keeps_its_settings_and_names_the_typed_ones_it_ignores(tmp_path):
    """--stage ldm (and --resume) take the saved config.json: resumable flags apply, a setting typed
    with another value than the saved one (--seed, --prediction) is named in one warning and
    ignored, and one typed with the saved value is not named."""
    saved = cfg.preset("demo")
    saved.train.out = str(tmp_path)
    cfg.save_config(saved, os.path.join(tmp_path, "config.json"))
    argv = ["--out", str(tmp_path), "--stage", "ldm", "--seed", "3", "--prediction", "v", "--lr", "5e-4"]
    argv += ["--schedule", "cosine"]  # the saved value
    config, args = train.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved = train.resolve_config(config, args, argv)
    assert (resolved.train.seed, resolved.diffusion.prediction, resolved.train.lr) == (0, "eps", 5e-4)
    assert [str(w.message) for w in caught] == [
        f"--prediction, --seed ignored: {tmp_path}/config.json decides them for a reopened run"
    ]


# ---------------------------------------------------------------------------- checkpoints and resume


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class SavingModel:
    """What EpochCheckpoint needs of a model: save_weights (writes a small file)."""

    def save_weights(self, path):
        with open(path, "w") as f:
            f.write("weights")


def test_checkpoints_every_few_minutes_and_after_the_last_epoch(tmp_path):
    clock = FakeClock()
    callback = train.EpochCheckpoint(str(tmp_path), keep=10, epochs=6, minutes=5, clock=clock)
    callback.set_model(SavingModel())
    callback.on_train_begin()
    for epoch, minutes in enumerate([2, 4, 6, 8, 9.5, 10]):  # each epoch ends at this minute
        clock.now = 60 * minutes
        callback.on_epoch_end(epoch)
    # 6 min ≥ 5 after the start, 11.5 would be next (not reached); the last epoch always.
    assert sorted(os.listdir(tmp_path)) == ["epoch-0003.weights.h5", "epoch-0006.weights.h5"]
    every = train.EpochCheckpoint(str(tmp_path / "every"), keep=2, epochs=3, minutes=0, clock=clock)
    every.set_model(SavingModel())
    for epoch in range(3):
        every.on_epoch_end(epoch)
    assert sorted(os.listdir(tmp_path / "every")) == ["epoch-0002.weights.h5", "epoch-0003.weights.h5"]


@pytest.mark.parametrize(
    "given, examples, expected",
    [
        (50, 800, (50, 25)),  # given steps keep their number: the largest divisor up to 32
        (3, 800, (3, 3)),
        (97, 800, (97, 1)),
        (0, 9664, (150, 30)),  # one pass of 151 batches of 64 (a prime): 5 executions of 30
        (0, 19328, (300, 30)),  # 302 = 2 · 151: 10 of 30
        (0, 100, (1, 1)),  # fewer examples than a batch: one step
    ],
)
def test_steps_per_execution_divides_the_epoch(given, examples, expected):
    assert runs.epoch_steps(given, examples, 64, 32) == expected


def test_scale_with_replicas_scales_both_batches_and_rates_once():
    config = cfg.preset("demo")
    train.scale_with_replicas(config, 4)
    t = config.train
    assert (t.batch_size, t.ae_batch_size) == (64, 16)
    assert (t.lr, t.ae_lr) == pytest.approx((4e-3, 2e-3))  # the demo's 2e-3 and 1e-3, × sqrt(4)
    assert t.scale_with_replicas is False
    config = cfg.preset("oasis")  # no autoencoder batch of its own: it follows --batch-size
    train.scale_with_replicas(config, 2)
    assert (config.train.ae_batch_size, config.train.autoencoder_batch_size) == (None, 128)


def test_steps_per_execution_is_one_under_a_strategy():
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        assert runs.epoch_steps(50, 800, 64, 32) == (50, 1)


def dense_checkpoint(path, precision):
    """A tiny compiled model whose optimizer is built, saved with its state to `path`."""
    with hardware.dtype_policy(precision):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer=runs.make_optimizer(1e-3), loss="mse")
    model.optimizer.build(model.trainable_variables)
    model.save_weights(str(path))
    return model


def test_resume_in_another_kind_of_precision_is_refused(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    scaled = dense_checkpoint(folder / "epoch-0001.weights.h5", "mixed_float16")
    assert type(scaled.optimizer).__name__ == "LossScaleOptimizer"
    train.check_loss_scaling(str(folder), "mixed_float16")  # the same kind: passes
    for precision in ("float32", "mixed_bfloat16"):
        with pytest.raises(cli.UserError, match="resume with --precision mixed_float16"):
            train.check_loss_scaling(str(folder), precision)
    (folder / "epoch-0001.weights.h5").unlink()
    dense_checkpoint(folder / "epoch-0002.weights.h5", "float32")
    train.check_loss_scaling(str(folder), "mixed_bfloat16")  # Adam either way: passes
    with pytest.raises(cli.UserError, match="resume with --precision float32 or mixed_bfloat16"):
        train.check_loss_scaling(str(folder), "mixed_float16")


def test_restore_keeps_a_loss_scale_optimizer_built_once(tmp_path):
    """compile builds the optimizer: restore_latest must not build it again (a second set of
    LossScaleOptimizer variables, a warning, the loss scale reset)."""
    saved = dense_checkpoint(tmp_path / "epoch-0003.weights.h5", "mixed_float16")
    saved.optimizer.dynamic_scale.assign(4.0)
    saved.save_weights(str(tmp_path / "epoch-0003.weights.h5"))
    with hardware.dtype_policy("mixed_float16"):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer=runs.make_optimizer(1e-3), loss="mse")
    model.optimizer.build(model.trainable_variables)  # as FitFixes.compile does for our models
    count = len(model.optimizer.variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train.restore_latest(model, str(tmp_path), 1e-3) == 3
    assert len(model.optimizer.variables) == count == len(saved.optimizer.variables)
    assert float(model.optimizer.dynamic_scale.numpy()) == 4.0


def test_restore_under_a_cosine_schedule_continues_along_it(tmp_path):
    """--lr-schedule cosine: the restored step counter drives the schedule (restore_latest gets
    None, constant_rate), so the rate after the restore is the schedule's at that step."""
    assert train.constant_rate("cosine", 1e-3) is None
    assert train.constant_rate("constant", 1e-3) == 1e-3

    def model():
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        m.compile(optimizer=runs.make_optimizer(runs.learning_rate(1e-3, "cosine", 100)), loss="mse")
        m.optimizer.build(m.trainable_variables)
        return m

    saved = model()
    x = np.ones((8, 3), np.float32)
    saved.fit(x, np.zeros((8, 2), np.float32), batch_size=2, epochs=10, verbose=0)  # 40 steps
    saved.save_weights(str(tmp_path / "epoch-0010.weights.h5"))
    restored = model()
    assert train.restore_latest(restored, str(tmp_path), None) == 10
    assert int(restored.optimizer.iterations.numpy()) == 40
    expected = float(runs.learning_rate(1e-3, "cosine", 100)(40))
    assert float(restored.optimizer.learning_rate.numpy()) == pytest.approx(expected, rel=1e-6)
    assert 0.05e-3 < expected < 1e-3


def test_resume_with_mixed_float16_over_float32_checkpoints_is_one_line_and_changes_nothing(
    tiny_run, tiny_data, tmp_path, capsys
):
    out = copy_of(tiny_run, tmp_path / "run")
    before = snapshot(out)
    argv = RUN_FLAGS + ["--data", tiny_data, "--out", out, "--resume", "--ldm-epochs", "2"]
    assert train.main(argv + ["--precision", "mixed_float16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without float16 loss scaling" in err[0], err
    assert "--precision float32 or mixed_bfloat16" in err[0]
    assert snapshot(out) == before  # config.json not rewritten with the refused precision
