"""Reliability guarantees of train.py, each proven by a run that could break them:
SIGKILL at several points then --resume (every epoch once, the same weights as an
uninterrupted run under op determinism), and bad input (one line, exit 1, nothing written)."""

import builtins
import glob
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

import cli
import train
from conftest import ROOT, RUN_FLAGS, TINY, history_epochs, snapshot
from test_dataset import save_png
from test_masks import oasis_png_layout

KILLED_TRAIN = os.path.join(ROOT, "tests", "killed_train.py")


def h5_arrays(path):
    """{dataset path: array} of every array in a .weights.h5 file."""
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def train_process(args, kill_point=None):
    """train.py in a fresh process (killed at `kill_point` if given); returns CompletedProcess."""
    command = (
        [sys.executable, KILLED_TRAIN, kill_point] if kill_point else [sys.executable, os.path.join(ROOT, "train.py")]
    )
    return subprocess.run(command + args, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_run(tiny_data, tmp_path):
    """One run killed four times (mid-epoch, between the stages, right after a checkpoint,
    while a checkpoint is being written), resumed after each kill: it finishes with every
    epoch in the histories exactly once, no partial file, and, with --deterministic, the
    very weights of a run that was never interrupted."""
    flags = RUN_FLAGS + ["--data", tiny_data, "--ae-epochs", "2", "--ldm-epochs", "2", "--deterministic"]
    # The autoencoder at a batch size of its own: a resumed stream must skip in its units.
    flags += ["--ae-batch-size", "2"]
    # One step per call into TensorFlow, so that the mid-epoch kill point (a batch's end) exists.
    flags += ["--steps-per-execution", "1"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    uninterrupted = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py")] + flags + ["--out", straight],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    for i, point in enumerate(
        ["autoencoder-epoch-2", "between-stages", "after-diffusion-checkpoint-1", "writing-diffusion-checkpoint-2"]
    ):
        result = train_process(flags + ["--out", killed] + (["--resume"] if i else []), kill_point=point)
        assert result.returncode == -signal.SIGKILL, (point, result.stderr[-3000:])
    assert os.path.exists(os.path.join(killed, "checkpoints", "diffusion", "partial-epoch-0002.weights.h5"))
    assert not os.path.exists(os.path.join(killed, "unet.weights.h5"))

    result = train_process(flags + ["--out", killed, "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming the diffusion model after epoch 1" in result.stdout
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read()[-3000:]

    for stage in ["autoencoder", "diffusion"]:
        assert history_epochs(os.path.join(killed, f"history_{stage}.csv")) == [0, 1]
        assert [os.path.basename(p) for p in sorted(glob.glob(os.path.join(killed, "checkpoints", stage, "*")))] == [
            "epoch-0001.weights.h5",
            "epoch-0002.weights.h5",
        ]
    for name in ["encoder", "decoder", "unet", "unet_ema"]:
        ours, reference = (
            h5_arrays(os.path.join(killed, f"{name}.weights.h5")),
            h5_arrays(os.path.join(straight, f"{name}.weights.h5")),
        )
        assert ours.keys() == reference.keys() and ours
        for key in ours:
            np.testing.assert_allclose(ours[key], reference[key], rtol=0, atol=1e-6, err_msg=f"{name}: {key}")
    # The final checkpoints hold the same optimizer state and random-stream counters too.
    ours = h5_arrays(os.path.join(killed, "checkpoints", "diffusion", "epoch-0002.weights.h5"))
    reference = h5_arrays(os.path.join(straight, "checkpoints", "diffusion", "epoch-0002.weights.h5"))
    assert ours.keys() == reference.keys()
    for key in ours:
        np.testing.assert_allclose(ours[key], reference[key], rtol=0, atol=1e-6, err_msg=key)


def write_garbage_pngs(folder, n):
    folder.mkdir()
    for i in range(n):
        (folder / f"slice_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * i)
    return str(folder)


BAD_INPUT = {
    "missing data": (["--data", "{tmp}/nowhere"], "data folder not found: {tmp}/nowhere"),
    "empty data": (["--data", "{tmp}/empty"], "no PNG images in {tmp}/empty"),
    "unreadable data": (
        ["--data", "{tmp}/garbage"],
        "no usable training image in {tmp}/garbage: all 3 PNG files are unreadable",
    ),
    "size vs levels": (["--image-size", "20"], "--image-size 20 must be divisible by 8"),
    "zero epochs": (["--ae-epochs", "0"], "--ae-epochs must be positive, got 0"),
    "negative epochs": (["--ldm-epochs", "-2"], "--ldm-epochs must be positive, got -2"),
    "zero batch": (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    "zero lr": (["--lr", "0"], "--lr must be positive, got 0.0"),
    "unknown precision": (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    "unknown flag": (["--epochs", "3"], "unrecognized arguments: --epochs 3"),
    "bad number": (["--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
    "out inside a file": (["--out", "{tmp}/notes.txt/run"], "cannot create {tmp}/notes.txt/run: Not a directory"),
    "existing run": (["--out", "{tmp}/old"], "{tmp}/old already holds a run; add --resume to continue it"),
    "resume nothing": (["--out", "{tmp}/new", "--resume"], "{tmp}/new holds no run (no config.json) to resume"),
    "mask without masks": (["--condition", "mask"], "--condition mask needs tissue masks, but"),
    "mis-sized mask": (
        ["--data", "{tmp}/masked", "--condition", "slice,mask"],
        "mask {tmp}/masked/keras_png_slices_seg_validate/seg_102_slice_11.nii.png is 4x4, its image",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_exit_1_and_writes_nothing(case, tiny_data, tmp_path, capsys):
    flags, message = BAD_INPUT[case]
    (tmp_path / "empty").mkdir()
    write_garbage_pngs(tmp_path / "garbage", 5)  # a flat folder: 3 train, 1 validate, 1 test
    (tmp_path / "notes.txt").write_text("not a folder")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text('{"precious": true}')
    oasis_png_layout(tmp_path / "masked")  # an OASIS PNG release with one mask of the wrong size
    save_png(tmp_path / "masked" / "keras_png_slices_seg_validate" / "seg_102_slice_11.nii.png", np.zeros((4, 4), "u1"))
    before = snapshot(tmp_path)
    argv = TINY + ["--data", tiny_data, "--out", str(tmp_path / "new")] + [f.format(tmp=tmp_path) for f in flags]

    code = train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: " + message.format(tmp=tmp_path)), err
    assert snapshot(tmp_path) == before  # nothing written, not even an empty run folder


def test_full_disk_is_refused_before_training(tiny_data, tmp_path, monkeypatch, capsys):
    """The 1 MiB probe write goes to /dev/full (ENOSPC): one line, and no run folder is left."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    real_open = builtins.open

    def full_disk(path, *args, **kwargs):
        return real_open("/dev/full" if str(path).endswith(".write-test") else path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    out = tmp_path / "run"
    code = train.main(TINY + ["--data", tiny_data, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"error: cannot write to {out}: No space left on device"], err
    assert not out.exists()


def test_debug_flag_and_variable_show_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(cli.UserError, match="must be positive"):
        train.main(["--lr", "0", "--out", str(tmp_path / "a"), "--debug"])
    monkeypatch.setenv("OASIS_LDM_DEBUG", "1")
    with pytest.raises(cli.UserError, match="invalid choice"):
        train.main(["--precision", "fp8"])


@pytest.mark.slow
def test_resume_over_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_run, tiny_data, tmp_path, capsys):
    """The newest diffusion checkpoint cut to its first 1,000 bytes (a partial copy, a failing
    disk): --resume warns once naming it, continues from the one before, and every epoch is in
    the history once; with every checkpoint damaged, one error line and exit 1."""
    from conftest import copy_of

    run = copy_of(tiny_run, tmp_path / "run")
    flags = RUN_FLAGS + ["--data", tiny_data, "--out", run, "--resume"]
    assert train.main(flags + ["--ldm-epochs", "3"]) == 0  # checkpoints of epochs 1, 2, 3
    folder = os.path.join(run, "checkpoints", "diffusion")
    newest = os.path.join(folder, "epoch-0003.weights.h5")
    with open(newest, "r+b") as f:
        f.truncate(1000)
    capsys.readouterr()
    assert train.main(flags + ["--ldm-epochs", "4"]) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "skipping a checkpoint" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and newest in warned[0], captured.err
    assert "resuming the diffusion model after epoch 2" in captured.out
    assert history_epochs(os.path.join(run, "history_diffusion.csv")) == [0, 1, 2, 3]
    assert os.path.getsize(newest) > 1000  # epoch 3 trained again and saved whole

    for path in glob.glob(os.path.join(folder, "*.weights.h5")):
        with open(path, "r+b") as f:
            f.truncate(1000)
    assert train.main(flags + ["--ldm-epochs", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: none of the 3 checkpoint(s) in ") and "Traceback" not in "".join(err)
    assert sum("skipping a checkpoint" in line for line in err) == 3
