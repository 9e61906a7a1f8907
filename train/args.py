"""The arguments of `kiln train`, `kiln sample` and `kiln eval` (and `python -m train.trainer` / `train.sample`).

Light on purpose: argparse and json only, no torch, because `kiln --help` builds these parsers.

    kiln train --config PRESET --data DATASET_DIR --workdir DIR [--max-steps N] [--time-budget-s S [--fit-schedule]]
               [--resume] [--holdout-fraction F] [--override key=value ...]
    kiln sample --base CKPT [--sr256 CKPT] [--sr1024 CKPT] (--prompts prompts.parquet | --from-shards DIR [--n 8])
                [--out grid.png] [--out-dir DIR [--per-prompt N] [--overwrite]]
                [--guidance W ...] [--steps N ...] [--aug-level A ...] [--seed S]
    kiln eval (SAMPLE_DIR ... | --base CKPT ... --prompts P.parquet --guidance 1,3,5,8) --out-dir DIR
              [--suite synthetic | --prompt-file FILE] [--data DATASET_DIR] [--clip SPEC] [--features SPEC]
    kiln eval (--suite synthetic [--data DATASET_DIR] | --prompt-file FILE) --write-prompts PROMPTS.txt

`--override train.lr=3e-4` takes JSON values where they parse (numbers, true/false, lists) and
strings otherwise; keys are the preset's dotted keys and unknown ones are refused (train.config).
"""

from __future__ import annotations

import argparse
import json

THRESHOLDS = ("dynamic", "static", "none")  # train.diffusion.sample's `threshold`


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
    p.add_argument("--fit-schedule", action="store_true",
                   help="with --time-budget-s: time the first steps and set train.max_steps to what fits the budget, "
                        "so the learning-rate schedule ends when the budget does")
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
    p.add_argument("--out", default=None, metavar="GRID.png",
                   help="a grid PNG: a row per stage, a column per prompt (its first sample)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="every image as a PNG (DIR/STAGE/PROMPT-SAMPLE.png) and DIR/samples.parquet "
                   "listing them (docs/eval.md); give --out, --out-dir or both")
    p.add_argument("--per-prompt", type=int, default=1, metavar="N",
                   help="with --out-dir: samples per prompt, seeds SEED .. SEED+N-1 [1]")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier `kiln sample --out-dir` output in DIR (deletes only the files its "
                   "samples.parquet lists)")
    p.add_argument("--guidance", type=float, nargs="+", default=None, metavar="W",
                   help="classifier-free guidance weight per stage (one value: every stage) [each config's]")
    p.add_argument("--steps", type=int, nargs="+", default=None, metavar="N", help="sampling steps per stage [each config's]")
    p.add_argument("--aug-level", type=float, nargs="+", default=None, metavar="A",
                   help="noise augmentation of the low-res input per SR stage [each config's, Imagen: 0.25]")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="[each config's]")
    p.add_argument("--threshold", choices=THRESHOLDS, default=None,
                   help="x0 thresholding at every stage: Imagen's dynamic, static clipping to [-1, 1], or none "
                   "[each config's]")
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


def _guidance_list(text: str) -> list[float]:
    """"1,3,5,8" -> [1.0, 3.0, 5.0, 8.0] (argparse type: a bad value is a one-line usage error)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers (e.g. 1,3,5,8), got {text!r}") from None


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """`kiln eval` (train.eval; docs/eval.md). Which flags go together is checked by train.eval."""
    p.add_argument("samples", nargs="*", metavar="SAMPLE_DIR",
                   help="`kiln sample --out-dir` directories to score (one per guidance weight of a sweep)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="where eval.json, report.html, plots/ (and, with --base, samples/w*/) go")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier `kiln eval` output in --out-dir (deletes only the files its eval.json lists)")
    what = p.add_argument_group("what to score")
    what.add_argument("--suite", default=None, metavar="NAME",
                      help="`synthetic`: the built-in compositional suite over the synthetic web's caption grammar, "
                      "scored from pixels")
    what.add_argument("--prompt-file", default=None, metavar="FILE",
                      help="prompts grouped by category: DrawBench's CSV (Prompts,Category), PartiPrompts' TSV "
                      "(Prompt<TAB>Category...), or one prompt per line")
    what.add_argument("--write-prompts", default=None, metavar="PROMPTS.txt",
                      help="write the suite's (or --prompt-file's) prompts one per line, print the `kiln "
                      "embed-prompts` command that embeds them with the run's T5, and stop")
    what.add_argument("--suite-n", type=int, default=64, metavar="N",
                      help="synthetic suite: held-out prompts per scene size (1, 2 and 3 shapes) [64]")
    what.add_argument("--stage", default=None, choices=("base", "sr256", "sr1024"),
                      help="score this stage's images [the last stage sampled]")
    data = p.add_argument_group("held-out data and metrics")
    data.add_argument("--data", default=None, metavar="DATASET_DIR",
                      help="the training shards: the synthetic suite keeps only combinations no caption there has; "
                      "FID/KID compare with their held-out images")
    data.add_argument("--holdout-fraction", type=float, default=None, metavar="F",
                      help="the held-out share of --data for FID/KID [the base checkpoint's, else the samples']")
    data.add_argument("--clip", default=None, metavar="SPEC",
                      help="CLIP score with this CLIP (any spec kiln's model resolver loads, e.g. ViT-B-32:openai, "
                      "local:DIR)")
    data.add_argument("--models", default=None, metavar="DIR",
                      help="a `kiln models fetch` folder, where registry names of --clip / --features resolve")
    data.add_argument("--features", default=None, metavar="SPEC",
                      help="FID and KID in this feature space: inception:PATH, clip:SPEC, torchscript:PATH")
    data.add_argument("--fid", action="store_true", help="compute FID and KID (needs --features and --data)")
    data.add_argument("--reference-n", type=int, default=2000, metavar="N",
                      help="held-out images FID/KID compare with, at most [2000]")
    data.add_argument("--kid-subset-size", type=int, default=1000, metavar="N",
                      help="KID subset size, capped at the smaller set [1000]")
    data.add_argument("--kid-subsets", type=int, default=100, metavar="N", help="KID subsets [100]")
    data.add_argument("--sr-n", type=int, default=64, metavar="N",
                      help="SR stages (--sr256 / --sr1024 with --data, with or without --base): held-out shard images "
                      "each is scored on, against the true image and bicubic; 0 skips this with --base [64]")
    data.add_argument("--lowres-noise", type=float, default=0.0, metavar="SIGMA",
                      help="SR scoring: add Gaussian noise of this std ([-1, 1] pixel units, clipped) to each "
                      "low-res input before the stage and bicubic see it, a stand-in for a base stage's errors "
                      "(what noise conditioning augmentation is for); the truth stays clean [0]")
    gen = p.add_argument_group("sampling first (instead of SAMPLE_DIRs)")
    gen.add_argument("--base", default=None, metavar="CKPT", help="base stage checkpoint")
    gen.add_argument("--sr256", default=None, metavar="CKPT", help="first super-resolution stage (optional)")
    gen.add_argument("--sr1024", default=None, metavar="CKPT", help="second super-resolution stage (needs --sr256)")
    gen.add_argument("--prompts", default=None, metavar="PROMPTS.parquet",
                     help="the prompts embedded by `kiln embed-prompts` (the sampler never runs a text encoder)")
    gen.add_argument("--guidance", type=_guidance_list, default=None, metavar="W,W,...",
                     help="the base stage's guidance weights to sweep, e.g. 1,3,5,8 [its config's]")
    gen.add_argument("--per-prompt", type=int, default=1, metavar="N", help="samples per prompt [1]")
    gen.add_argument("--steps", type=int, nargs="+", default=None, metavar="N", help="sampling steps per stage")
    gen.add_argument("--aug-level", type=float, nargs="+", default=None, metavar="A", help="per SR stage")
    gen.add_argument("--sampler", choices=("ddim", "ddpm"), default=None)
    gen.add_argument("--threshold", choices=THRESHOLDS, default=None,
                     help="x0 thresholding at every stage: dynamic, static or none [each config's]")
    gen.add_argument("--weights", choices=("ema", "model"), default="ema")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed; the suite's draw too [0]")
    gen.add_argument("--device", default=None, help="[cuda if available, else cpu]")
    gen.add_argument("--batch-size", type=int, default=16, help="prompts per sampling batch [16]")
