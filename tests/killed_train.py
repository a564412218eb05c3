"""Run train.py in this process and SIGKILL it at a named point (for tests/test_reliability.py).

    python tests/killed_train.py POINT [train.py flags...]

SIGKILL cannot be caught: no `finally`, no atexit, no flushed buffers, exactly like the
OOM killer or a pulled plug. POINT is one of KILL_POINTS.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import latent_data  # noqa: E402
import train  # noqa: E402


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def after(cls, method, when):
    """Make cls.method run as before, then die if when(self, *args) is true."""
    original = getattr(cls, method)

    def patched(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if when(self, *args):
            die()

    setattr(cls, method, patched)


def kill_during_autoencoder_epoch_2():
    """Mid-epoch: after the 2nd batch of the autoencoder's 2nd epoch."""
    after(
        train.StopOnNonFiniteLoss,
        "on_train_batch_end",
        lambda cb, batch, *_: cb.stage == train.AE and cb.epoch == 1 and batch == 1,
    )


def kill_between_stages():
    """After the autoencoder's weights are saved, before the latent scale factor is."""

    def encode(*args, **kwargs):
        die()

    latent_data.encode_training_set = encode


def kill_after_diffusion_checkpoint_1():
    """Right after the diffusion stage's first checkpoint was renamed into place."""
    after(train.EpochCheckpoint, "on_epoch_end", lambda cb, epoch, *_: train.LDM in cb.directory and epoch == 0)


def kill_while_writing_diffusion_checkpoint_2():
    """The 2nd diffusion checkpoint is written to its temporary file, not yet renamed."""
    replace = os.replace

    def patched(src, dst, **kwargs):
        if "partial-epoch-0002" in str(src) and train.LDM in str(src):
            die()
        replace(src, dst, **kwargs)

    os.replace = patched


def kill_at_diffusion_epoch_2():
    """As the diffusion stage's 2nd epoch begins (on every worker of a cluster: the NaN check
    is the one callback that non-chief workers have too)."""

    def begin(cb, epoch, logs=None):
        if cb.stage == train.LDM and epoch == 1:
            die()
        cb.epoch = epoch

    train.StopOnNonFiniteLoss.on_epoch_begin = begin


KILL_POINTS = {
    "autoencoder-epoch-2": kill_during_autoencoder_epoch_2,
    "between-stages": kill_between_stages,
    "after-diffusion-checkpoint-1": kill_after_diffusion_checkpoint_1,
    "writing-diffusion-checkpoint-2": kill_while_writing_diffusion_checkpoint_2,
    "diffusion-epoch-2": kill_at_diffusion_epoch_2,
}

if __name__ == "__main__":
    KILL_POINTS[sys.argv[1]]()
    sys.exit(train.main(sys.argv[2:]))
