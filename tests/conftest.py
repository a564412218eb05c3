"""Shared pytest set-up: quiet TensorFlow logs, a fresh Keras state per test, and the tiny
data set and tiny trained run that the train, predict and evaluate tests share."""

import csv
import fcntl
import hashlib
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny networks: 16×16 images → 4×4×2 latents → a two-level UNet of width 8, T = 20.
TINY = (
    "--image-size 16 --ae-base-channels 8 --ae-channel-mults 1 2 4 --latent-channels 2 "
    "--unet-dim 8 --unet-dim-mults 1 2 --unet-groups 4 --attn-heads 2 --attn-dim-head 8 --timesteps 20 "
    "--batch-size 4 --ae-steps-per-epoch 3 --ldm-steps-per-epoch 3 --sample-every 1 --precision float32 --xla off "
    "--condition none --checkpoint-minutes 0 --mask-decoder-steps 10 --spade-decoder-steps 4"
).split()

# A one-level UNet and a ×2 autoencoder (8×8×2 latents): fewer layers to trace than TINY
# alone, same code paths. One epoch of 3 steps per stage.
RUN_FLAGS = TINY + "--unet-dim-mults 1 --ae-channel-mults 1 2 --ae-epochs 1 --ldm-epochs 1 --sample-every 0".split()


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts with float32 policy and a fixed seed, whatever the last one set."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


def made_once(tmp_path_factory, name: str, make) -> str:
    """The folder `name` that `make(path)` writes, made once per test session for all its
    pytest-xdist workers (`make test` runs two): in the workers' common temporary folder, under
    a file lock, so a worker that needs it while another makes it waits and then reuses it,
    instead of training the same tiny run again. Without xdist, in this session's folder."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker's folder lies in the session's
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # what a failed attempt left
            make(str(path))
            done.touch()
    return str(path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """24 PNGs of bright ellipses of varying size on black, 32×32, in a flat folder."""

    def make(folder):
        os.makedirs(folder)
        yy, xx = np.mgrid[:32, :32]
        for i in range(24):
            a, b = 6 + i % 5, 8 + i % 7
            inside = ((xx - 16) / a) ** 2 + ((yy - 16) / b) ** 2 <= 1
            Image.fromarray((inside * (120 + 5 * i)).astype(np.uint8)).save(f"{folder}/slice_{i:02d}.png")

    return made_once(tmp_path_factory, "pngs", make)


@pytest.fixture(scope="session")
def tiny_ae_run(tiny_data, tmp_path_factory):
    """A RUN_FLAGS run whose autoencoder stage is done (train.py --stage ae): copy it first."""
    import train

    def make(out):
        assert train.main(RUN_FLAGS + ["--data", tiny_data, "--out", out, "--stage", "ae"]) == 0

    return made_once(tmp_path_factory, "tiny_ae", make)


def copy_of(run_dir: str, dest) -> str:
    """A copy of a whole run directory at `dest` (which must not exist)."""
    shutil.copytree(run_dir, dest)
    return str(dest)


@pytest.fixture(scope="session")
def tiny_run(tiny_ae_run, tiny_data, tmp_path_factory):
    """A fully trained RUN_FLAGS run (the diffusion stage on a copy of `tiny_ae_run`), shared
    by the predict and evaluate tests: copy it before changing it."""
    import train

    def make(out):
        copy_of(tiny_ae_run, out)
        assert train.main(RUN_FLAGS + ["--data", tiny_data, "--out", out, "--stage", "ldm"]) == 0

    return made_once(tmp_path_factory, "tiny", make)


def snapshot(folder) -> dict:
    """{relative path: sha256} of every file, and {relative path + "/": ""} of every folder,
    under `folder`: compare two to assert that nothing was written."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder) + "/"] = ""
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def history_epochs(path) -> list[int]:
    """The epoch column of a history CSV."""
    with open(path, newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]
