"""kiln's one rule for errors (issue 12).

A user's mistake -- a flag, a path, a file, a model, a dataset -- raises a `UserError` (or a
subclass): the `kiln` command prints ONE line on stderr, `kiln <command>: error: <what, and what to
do>`, and exits with the error's `exit_code` (2: usage -- fix the command; 1: the run failed --
fix the data or the environment and re-run). No traceback unless `--debug` or `KILN_DEBUG=1`.

Anything else is a bug in kiln and keeps its traceback.

Ctrl-C and SIGTERM stop a command with one line (`interrupted`), exit 130 / 143; every file kiln
writes appears atomically, so the re-run starts from a consistent state.

This module imports the standard library only, so every layer (config, readers, model loaders,
the trainer) can raise these without pulling in Beam or torch.
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


class CardError(RunFailed):
    """The dataset's files disagree with stats.json or manifest.json (or the card's metadata breaks
    the Hub's rules): no card is written."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt (exit 143)."""

    exit_code = 143


def one_line(message: object) -> str:
    """`message` as a single line (newlines folded), for stderr."""
    return " ".join(str(message).split())
