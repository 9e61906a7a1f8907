"""The arguments of `kiln train` and `kiln sample` (and `python -m train.trainer` / `train.sample`).

Light on purpose: argparse and json only, no torch, because `kiln --help` builds these parsers.

    kiln train --config PRESET --data DATASET_DIR --workdir DIR [--max-steps N] [--time-budget-s S]
               [--resume] [--holdout-fraction F] [--override key=value ...]
    kiln sample --base CKPT [--sr256 CKPT] [--sr1024 CKPT] (--prompts prompts.parquet | --from-shards DIR [--n 8])
                --out grid.png [--guidance W ...] [--steps N ...] [--aug-level A ...] [--seed S]

`--override train.lr=3e-4` takes JSON values where they parse (numbers, true/false, lists) and
strings otherwise; keys are the preset's dotted keys and unknown ones are refused (train.config).
"""

from __future__ import annotations

import argparse
import json


def parse_overrides(items: list[str] | None) -> dict:
    """["train.lr=3e-4", "unet.dim_mults=[1,2]", "name=x"] -> {"train.lr": 0.0003, ...}."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--override wants key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="PRESET", help="preset name in train/configs/ or a JSON file")
    p.add_argument("--data", required=True, metavar="DATASET_DIR", help="a `kiln prepare` output directory")
    p.add_argument("--workdir", required=True, metavar="DIR", help="checkpoints, metrics, samples go here")
    p.add_argument("--max-steps", type=int, default=None, metavar="N", help="total steps to reach [train.max_steps]")
    p.add_argument("--time-budget-s", type=float, default=None, metavar="S", help="stop (and checkpoint) after S seconds of training")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --workdir")
    p.add_argument("--holdout-fraction", type=float, default=0.0, metavar="F",
                   help="share of samples (by uid hash) never trained on, for evaluation [0]")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (e.g. train.lr=3e-4)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... [cuda:LOCAL_RANK if available, else cpu]")
    p.add_argument("--cache", default="auto", choices=("auto", "always", "never"),
                   help="decode the training split into memory [auto: when it fits in 2 GiB]")
    p.add_argument("--num-workers", type=int, default=None, metavar="N",
                   help="DataLoader workers decoding shards, per process [train.num_workers; unset: min(8, cores) "
                   "on CUDA, 0 on CPU]")


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, metavar="CKPT", help="base stage checkpoint (.safetensors)")
    p.add_argument("--sr256", default=None, metavar="CKPT", help="first super-resolution stage (optional)")
    p.add_argument("--sr1024", default=None, metavar="CKPT", help="second super-resolution stage (optional; needs --sr256)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", metavar="PROMPTS.parquet", help="prompts embedded by `kiln embed-prompts`")
    src.add_argument("--from-shards", metavar="DATASET_DIR", help="use held-out samples' captions and T5 arrays")
    p.add_argument("--n", type=int, default=8, help="samples to take with --from-shards [8]")
    p.add_argument("--holdout-fraction", type=float, default=None, metavar="F",
                   help="with --from-shards: the held-out share [the base checkpoint's]")
    p.add_argument("--out", required=True, metavar="GRID.png")
    p.add_argument("--guidance", type=float, nargs="+", default=None, metavar="W",
                   help="classifier-free guidance weight per stage (one value: every stage) [each config's]")
    p.add_argument("--steps", type=int, nargs="+", default=None, metavar="N", help="sampling steps per stage [each config's]")
    p.add_argument("--aug-level", type=float, nargs="+", default=None, metavar="A",
                   help="noise augmentation of the low-res input per SR stage [each config's, Imagen: 0.25]")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="[each config's]")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw weights [ema]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="[cuda if available, else cpu]")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per sampling batch [16]")


def per_stage(values, n: int, name: str) -> list:
    """A per-stage flag's values for `n` stages: none given -> [None] * n, one -> repeated."""
    if values is None:
        return [None] * n
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        raise ValueError(f"--{name} takes one value or one per stage ({n}), got {len(values)}")
    return list(values)
