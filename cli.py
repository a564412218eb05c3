"""Command-line plumbing shared by the scripts (train.py, predict.py, evaluate.py).

A mistake the user can fix (a bad flag, a missing folder, a run that does not fit) is
one `error: ...` line on stderr and exit status 1, never a traceback:

    UserError      the exception library code raises for such a mistake
    FlagParser     argparse whose errors become a UserError (not a usage block and status 2)
    cli(run, argv) calls a script's `run(argv)` and turns UserError / dataset.DataError into
                   that line; `--debug` on the command line or OASIS_LDM_DEBUG=1 shows the
                   traceback instead
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import keras

import dataset


class UserError(Exception):
    """A problem the user can fix (flags, paths, run directory): one line, exit code 1."""


class FlagParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad value, invalid choice) raise UserError, so that
    `cli` prints them as one line, instead of a usage block and exit status 2."""

    def error(self, message):
        raise UserError(f"{message} (see python {self.prog} --help)")


def cli(run_fn, argv: list[str] | None) -> int:
    """Call `run_fn(argv)` for a command-line entry point (train, predict, evaluate).

    A UserError or DataError becomes one `error: ...` line on stderr and exit status 1,
    unless --debug is in argv or OASIS_LDM_DEBUG is set (then the traceback shows).
    Warnings are printed as one `warning: ...` line each, when they happen.
    The global Keras dtype policy is restored afterwards, so a caller in the same
    process (a test, a notebook) does not inherit mixed precision.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    policy = keras.config.dtype_policy()
    try:
        with warnings.catch_warnings():  # restores showwarning afterwards
            warnings.showwarning = _one_line_warning
            run_fn(argv)
    except (UserError, dataset.DataError) as e:
        if "--debug" in argv or os.environ.get("OASIS_LDM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        keras.config.set_dtype_policy(policy)
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """`warnings.showwarning` for the scripts: `warning: MESSAGE` on stderr, no source line."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)
