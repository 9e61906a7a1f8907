"""`kiln train`, `kiln sample` and `kiln eval` as the `kiln` CLI (pipeline/cli.py) wires them in.

The parsers come from train.args (no torch); each entry point imports its torch-heavy module only
when its command runs, so `kiln --help` answers at once. The commands themselves live beside what
they run -- `train.trainer.main_train`, `train.sample.main_sample`, `train.eval.main_eval` -- which is
also what `python -m train.trainer` (and torchrun) and `python -m train.sample` call. `kiln eval`
goes through pipeline.evaluation, which hands train.eval the metrics module (CLIP score, FID, KID).
"""

from __future__ import annotations

import argparse

from train.args import add_eval_args, add_sample_args, add_train_args, parse_overrides

__all__ = ["add_eval_args", "add_sample_args", "add_train_args", "main_eval", "main_sample", "main_train",
           "parse_overrides"]


def main_train(args: argparse.Namespace) -> int:
    from train.trainer import main_train as run  # torch: only when the command runs

    return run(args)


def main_sample(args: argparse.Namespace) -> int:
    from train.sample import main_sample as run  # torch: only when the command runs

    return run(args)


def main_eval(args: argparse.Namespace, metrics=None) -> int:
    """`kiln eval` without the metrics module (the synthetic suite and prompt files only); the
    `kiln` command calls pipeline.evaluation.main_eval, which hands the metrics in."""
    from train.eval import main_eval as run  # torch: only when the command runs

    return run(args, metrics)
