"""Command-line plumbing shared by the scripts (train.py, predict.py, evaluate.py, dataset.py).

A mistake the user can fix (a bad flag, a missing folder, a bad file, a run that does not
fit) is one `error: ...` line on stderr and exit status 1, never a traceback:

    UserError         the one exception library code raises for such a mistake
    FlagParser        argparse whose errors become a UserError (not a usage block and status 2)
    cli(run, argv)    calls a script's `run(argv)` and turns a UserError into that line;
                      `--debug` on the command line or OASIS_LDM_DEBUG=1 shows the traceback instead
    quiet_tensorflow  called by each script before it imports TensorFlow: hides the start-up notices
    add_sampling_arguments / sampling_options
                      predict.py's and evaluate.py's sampling flags, and the one
                      `config.SamplingOptions` built from them

This module imports neither TensorFlow nor Keras, so that the pure-Python library files
(conditioning.py, config.py) can use `UserError` without loading them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import warnings

import config as cfg

RUNS_ROOT = "runs"  # where --run looks for a run name, and the newest run


class UserError(Exception):
    """A problem the user can fix (flags, paths, data, run directory): one line, exit code 1."""


class FlagParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad value, invalid choice) raise UserError, so that
    `cli` prints them as one line, instead of a usage block and exit status 2."""

    def error(self, message):
        raise UserError(f"{message} (see python {self.prog} --help)")


def cli(run_fn, argv: list[str] | None) -> int:
    """Call `run_fn(argv)` for a command-line entry point.

    A UserError becomes one `error: ...` line on stderr and exit status 1, unless --debug
    is in argv or OASIS_LDM_DEBUG is set (then the traceback shows). Warnings are printed
    as one `warning: ...` line each, when they happen.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with warnings.catch_warnings():  # restores showwarning afterwards
            warnings.showwarning = _one_line_warning
            run_fn(argv)
    except UserError as e:
        if "--debug" in argv or os.environ.get("OASIS_LDM_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """`warnings.showwarning` for the scripts: `warning: MESSAGE` on stderr, no source line."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


# ---------------------------------------------------------------------------- TensorFlow's start-up

# What TensorFlow 2.21 writes to stderr while it loads and probes for a GPU, before its own log
# level applies (absl's pre-initialisation logging ignores TF_CPP_MIN_LOG_LEVEL): the notice
# that oneDNN is on, CUDA probing on a machine without a GPU, the CPU-instructions notice.
STARTUP_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog|"
    r"[IW]\d{4} .*\] |"  # absl info and warning lines: "I0000 00:00:17... 2404 port.cc:153] ..."
    r"E\d{4} .*failed call to cuInit|"  # no GPU driver: expected on a CPU machine
    r"To enable the following instructions:"  # the second line of cpu_feature_guard's notice
)


def quiet_tensorflow() -> None:
    """Import TensorFlow and list the GPUs with its start-up notices hidden.

    Does nothing when the user set TF_CPP_MIN_LOG_LEVEL (they choose what to see). Otherwise
    sets it to 2 (TensorFlow's own warnings and errors still show; Python warnings are not
    affected) and captures file descriptor 2 while TensorFlow loads: lines of
    `STARTUP_NOISE` are dropped, every other line is written to stderr afterwards; and drops
    TensorFlow's "triggered tf.function retracing" advice from its Python logger.
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    with _captured_stderr() as captured:
        import tensorflow as tf  # here: the capture must surround the first import

        tf.config.list_physical_devices("GPU")  # CUDA's probing writes here, not later
    kept = [line for line in captured() if not STARTUP_NOISE.match(line)]
    if kept:
        print("\n".join(kept), file=sys.stderr, flush=True)
    # samplers.Sampler compiles one trace per batch shape and kind of condition on purpose
    # (predict.py's figures need several); TensorFlow's advice to avoid that is noise here.
    tf.get_logger().addFilter(lambda record: "triggered tf.function retracing" not in record.getMessage())


@contextlib.contextmanager
def _captured_stderr():
    """Send file descriptor 2 to a temporary file inside the block; yields a function that
    returns the file's lines once the block is left."""
    sys.stderr.flush()
    saved = os.dup(2)
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", "replace").splitlines())


# ---------------------------------------------------------------------------- sampling flags


def add_sampling_arguments(parser: argparse.ArgumentParser, n: int) -> None:
    """The flags predict.py and evaluate.py share: --run, --n (default `n`), one flag per field
    of `config.SamplingOptions` but `guidance` (each script has its own: evaluate.py takes a
    list), and --precision."""
    parser.add_argument("--run", help=f"run folder, or a name under {RUNS_ROOT}/ (default: the newest run)")
    parser.add_argument("--n", type=int, default=n, help=f"number of samples (default: {n})")
    cfg.add_dataclass_arguments(parser, cfg.SamplingOptions, cfg.SamplingOptions(), exclude=("guidance",))
    parser.add_argument(
        "--precision",
        choices=cfg.PRECISIONS,
        default="float32",
        help="compute precision of the UNet and decoder; the sampler state stays float32; auto: mixed_bfloat16 "
        "on a CPU with AMX (as train.py's --precision auto), else float32 (default: float32)",
    )


def sampling_options(args: argparse.Namespace, config: cfg.RunConfig, guidance: float) -> cfg.SamplingOptions:
    """The `SamplingOptions` of parsed flags for the run of `config`, steps resolved; UserError for
    options the run cannot honour (checked before any work)."""
    fields = {name: getattr(args, name) for name in ("sampler", "steps", "eta", "seed", "batch_size")}
    options = cfg.SamplingOptions(**fields, guidance=guidance).resolved(config.diffusion.timesteps)
    try:
        options.validate(config.diffusion.timesteps, args.n)
    except ValueError as e:
        raise UserError(str(e)) from None
    return options
