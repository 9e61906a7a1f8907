"""The trainer's side of kiln's one error rule (pipeline.errors, issue 12).

A user's mistake -- a flag, a dataset, a checkpoint -- raises a `UserError`: the `kiln` command
(pipeline.cli) prints one line, `kiln train: error: ...` naming the thing and what to do, and exits
2 (usage) or 1 (`RunFailed`: the run started and its data or environment stopped it). A bug keeps
its traceback. The classes below also subclass the builtin a caller of the library functions
would catch (ValueError, FileNotFoundError), so `except ValueError` around train.* still works.

train/ imports nothing from pipeline/, filters/ or embed/ (docs/DESIGN.md: the trainer reads the
shards as any outside reader would), so the three base classes are defined here again, the same
shape as pipeline.errors': the `kiln` command (pipeline.cli) catches both families. Standard
library only.
"""

from __future__ import annotations

USAGE = 2
FAILED = 1


class UserError(Exception):
    """A user's mistake, reported as one line. `exit_code`: 2 usage (default), 1 a failed run."""

    exit_code = USAGE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class RunFailed(UserError):
    """The run started and could not finish because of its data or environment (exit 1)."""

    exit_code = FAILED


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt (exit 143)."""

    exit_code = 143


def one_line(message: object) -> str:
    """`message` as a single line (newlines folded), for stderr."""
    return " ".join(str(message).split())

__all__ = [
    "FAILED",
    "USAGE",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "Interrupted",
    "MissingFile",
    "NoSamples",
    "RunFailed",
    "UserError",
    "one_line",
    "run_command",
]


class DatasetError(UserError, ValueError):
    """--data is not something a stage can train on (no dataset, no shards, no T5, another d_model)."""


class NoSamples(RunFailed, ValueError):
    """Every sample of the split was skipped (the skip counts say why)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint, train-state file or latest.json that cannot be read, or does not fit this run."""


class MissingFile(UserError, FileNotFoundError):
    """A file named on the command line (or by a checkpoint pointer) does not exist."""


def run_command(name: str, func, *args) -> int:
    """Run `func(*args)` under the error rule, for the `python -m train.trainer` / `train.sample`
    entry points (the `kiln` command does the same in pipeline.cli.main): a UserError is one line on
    stderr and its exit code, Ctrl-C / SIGTERM one line and 130 / 143. KILN_DEBUG=1 shows tracebacks."""
    import os
    import signal
    import sys
    import threading

    debug = os.environ.get("KILN_DEBUG", "").strip().lower() not in ("", "0", "false", "no")

    def on_sigterm(signum, frame):
        raise Interrupted("terminated (SIGTERM)")

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return int(func(*args) or 0)
    except UserError as err:
        if debug:
            raise
        print(f"{name}: error: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:
        if debug:
            raise
        what = "terminated" if isinstance(err, Interrupted) else "interrupted"
        print(f"{name}: {what}; nothing partial was left as a finished file -- re-run with --resume to continue",
              file=sys.stderr)
        return getattr(err, "exit_code", 130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class ConfigError(UserError, ValueError):
    """A preset, an --override or a flag that does not make a valid run."""
