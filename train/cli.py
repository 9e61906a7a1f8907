"""`kiln train` and `kiln sample` as the `kiln` CLI (pipeline/cli.py) wires them in.

The parsers come from train.args (no torch); each entry point imports its torch-heavy module only
when its command runs, so `kiln --help` answers at once. The commands themselves live beside what
they run -- `train.trainer.main_train`, `train.sample.main_sample` -- which is also what
`python -m train.trainer` (and torchrun) and `python -m train.sample` call.
"""

from __future__ import annotations

import argparse

from train.args import add_sample_args, add_train_args, parse_overrides

__all__ = ["add_sample_args", "add_train_args", "main_sample", "main_train", "parse_overrides"]


def main_train(args: argparse.Namespace) -> int:
    from train.trainer import main_train as run  # torch: only when the command runs

    return run(args)


def main_sample(args: argparse.Namespace) -> int:
    from train.sample import main_sample as run  # torch: only when the command runs

    return run(args)
