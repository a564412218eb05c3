"""Training across processes with MultiWorkerMirroredStrategy, proven on one machine.

Two worker processes on 127.0.0.1 (TF_CONFIG with free ports chosen here, tiny networks,
CPU) against one process that mirrors the same global batch over 2 logical CPU devices:
a dead worker ends the other within seconds (no --worker-timeout: the broken connection
does it), --resume on both finishes the run,
only the chief wrote files, and the weights are the single process's.
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from conftest import ROOT, RUN_FLAGS, history_epochs

KILLED_TRAIN = os.path.join(ROOT, "tests", "killed_train.py")
TRAIN = os.path.join(ROOT, "train.py")


def free_ports(n):
    """n TCP ports that were free a moment ago (bound to port 0, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def worker(index, ports, args, kill_point=None):
    """train.py as worker `index` of a cluster on `ports` (a Popen, output captured)."""
    env = dict(os.environ)
    env["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
    )
    command = [sys.executable, KILLED_TRAIN, kill_point] if kill_point else [sys.executable, TRAIN]
    return subprocess.Popen(
        command + args + ["--strategy", "multiworker"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def h5_arrays(path):
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def relative_files(folder):
    return sorted(
        os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(p)
    )


@pytest.mark.slow
def test_two_workers_killed_and_resumed_train_as_one_mirrored_process_and_only_the_chief_writes(tiny_data, tmp_path):
    """One chain (each TensorFlow process costs seconds of start-up and tracing): two workers
    train both stages; worker 1 dies as diffusion epoch 2 begins; the chief gives up within
    seconds with one line; --resume on both finishes; the weights equal those of an
    uninterrupted single process mirroring the same global batch over 2 logical CPUs."""
    # Two epochs of each stage, with validation: every per-epoch path (Keras' model build
    # before each validation, the cached validation iterator) runs twice.
    flags = RUN_FLAGS + ["--data", tiny_data, "--ae-epochs", "2", "--ldm-epochs", "2", "--sample-every", "0"]
    # --xla on: XLA is turned off over 2 replicas with one warning line (the weights are unchanged by it).
    reference_flags = flags + ["--out", str(tmp_path / "mirrored"), "--strategy", "mirrored", "--xla", "on"]
    mirrored = textwrap.dedent(f"""
        import sys, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import train
        sys.exit(train.main({reference_flags!r}))
    """)
    reference = subprocess.Popen(
        [sys.executable, "-c", mirrored], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    chief_out, other_out = str(tmp_path / "chief"), str(tmp_path / "other")
    ports = free_ports(2)
    # Worker 1 has its own --out, so that anything it wrote would show: it must write nothing.
    chief = worker(0, ports, flags + ["--out", chief_out])
    other = worker(1, ports, flags + ["--out", other_out], "diffusion-epoch-2")
    code, _, err = finish(other)
    assert code == -signal.SIGKILL, err[-3000:]
    died = time.monotonic()
    code, _, err = finish(chief)
    waited = time.monotonic() - died
    assert code == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "lost contact with another worker" in errors[0] and "--resume" in errors[0], err[-3000:]
    assert "Traceback" not in err
    assert waited < 30, waited  # the chief's own epoch end, its failed collective and its exit
    assert not os.path.exists(other_out)
    assert history_epochs(os.path.join(chief_out, "history_diffusion.csv")) == [0]

    # Resume as on a shared file system: every worker reads the chief's run directory.
    ports = free_ports(2)
    for process in [worker(i, ports, flags + ["--out", chief_out, "--resume"]) for i in (0, 1)]:
        code, stdout, err = finish(process)
        assert code == 0, err[-3000:]
        assert "resuming the diffusion model after epoch 1" in stdout
    assert history_epochs(os.path.join(chief_out, "history_autoencoder.csv")) == [0, 1]
    assert history_epochs(os.path.join(chief_out, "history_diffusion.csv")) == [0, 1]
    with open(os.path.join(chief_out, "history_autoencoder.csv")) as f:
        assert "val_ssim" in f.readline()
    code, out, err = finish(reference)
    assert code == 0, err[-3000:]
    assert "replicas: 2" in out and "XLA: off" in out  # the mirrored reference's log, like each worker's
    assert [line for line in err.splitlines() if line.startswith("warning: --xla")] == [
        "warning: --xla on is turned off: XLA cannot compile a train step over 2 replicas"
    ]

    # The chief wrote exactly what a single process writes (TensorBoard event names carry host and time).
    def comparable(folder):
        return [name for name in relative_files(folder) if "events.out" not in name]

    assert comparable(chief_out) == comparable(tmp_path / "mirrored")
    # The same global batches, draws and initial weights, and a resume that restarts the
    # stream and the draw counters where the checkpoint left them: the weights can differ
    # only by the order of float32 sums in the all-reduce (between processes, against within
    # one). Measured after 6 + 6 steps: at most 1.2e-7, one float32 rounding step of a weight
    # near 1; the tolerance is 10× that. (A wrong data split, draw or resumed counter differs
    # by ~1e-3 after one Adam step.)
    for name in ("encoder", "decoder", "unet", "unet_ema"):
        ours = h5_arrays(os.path.join(chief_out, f"{name}.weights.h5"))
        theirs = h5_arrays(tmp_path / "mirrored" / f"{name}.weights.h5")
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=1e-6, err_msg=f"{name}: {key}")
