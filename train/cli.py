"""`kiln train` and `kiln sample`: argument parsers (light: no torch import) and entry points.

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
import sys


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


def main_train(args: argparse.Namespace) -> int:
    from train.config import load_config
    from train.trainer import train

    try:
        cfg = load_config(args.config, parse_overrides(args.override))
    except (FileNotFoundError, KeyError, TypeError, ValueError) as err:
        print(f"kiln train: error: {err}", file=sys.stderr)
        return 2
    trainer = train(cfg, args.data, args.workdir, max_steps=args.max_steps, time_budget_s=args.time_budget_s,
                    device=args.device, resume=args.resume, holdout_fraction=args.holdout_fraction, cache=args.cache)
    print(json.dumps(trainer.summary))
    return 0


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


def _per_stage(values, n: int, name: str) -> list:
    if values is None:
        return [None] * n
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        raise ValueError(f"--{name} takes one value or one per stage ({n}), got {len(values)}")
    return list(values)


def main_sample(args: argparse.Namespace) -> int:
    import torch

    from train.sample import Stage, load_prompts, run_cascade, save_grid, shard_prompts
    from train.trainer import load_checkpoint

    if args.sr1024 and not args.sr256:
        print("kiln sample: error: --sr1024 needs --sr256 (the cascade is base -> sr256 -> sr1024)", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = [p for p in (args.base, args.sr256, args.sr1024) if p]
    names = ["base", "sr256", "sr1024"][: len(paths)]
    try:
        guidance = _per_stage(args.guidance, len(paths), "guidance")
        steps = _per_stage(args.steps, len(paths), "steps")
        aug = [None] + _per_stage(args.aug_level, len(paths) - 1, "aug-level") if len(paths) > 1 else [None]
        stages = [Stage.load(p, device=device, weights=args.weights, guidance_weight=g, steps=s, aug_level=a,
                             sampler=args.sampler) for p, g, s, a in zip(paths, guidance, steps, aug)]
        if args.prompts:
            captions, arrays, _ = load_prompts(args.prompts)
        else:
            frac = args.holdout_fraction
            if frac is None:
                frac = float(load_checkpoint(args.base)["metadata"].get("holdout_fraction", 0.0))
            captions, arrays, _ = shard_prompts(args.from_shards, args.n, split="holdout", holdout_fraction=frac)
        outputs = run_cascade(stages, arrays, seed=args.seed, device=device, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as err:
        print(f"kiln sample: error: {err}", file=sys.stderr)
        return 2
    labels = [f"{n} ({st.cfg.data.resolution}px)" for n, st in zip(names, stages)]
    path = save_grid(outputs[-1], captions, args.out, rows=outputs, row_labels=labels)
    print(f"kiln sample: {len(captions)} prompts through {' -> '.join(names)}; wrote {path}")
    return 0
