"""Sample the cascade: base -> sr256 -> sr1024, each stage optional after the base.

    kiln sample --base runs/base/checkpoints/step_00100000.safetensors \\
                --sr256 runs/sr256/...safetensors [--sr1024 runs/sr1024/...safetensors] \\
                --prompts prompts.parquet --out grid.png [--guidance 5 5 3] [--steps 64 32 16] \\
                [--aug-level 0.25] [--seed 0]
    kiln sample --base ... --from-shards DATASET --n 8 --out grid.png   # held-out shard captions

Prompts come already embedded (the sampler never loads T5, DESIGN.md): a parquet written by
`kiln embed-prompts` (columns prompt, t5_len, t5 = float16 LE [t5_len, d_model]; footer "kiln.t5"
with d_model), or the KEY.t5.npy of held-out shard samples (`--from-shards`, split by the
checkpoint's holdout_fraction).

Each stage loads its checkpoint's EMA weights (`--weights model` for the raw ones) and the config
stored in it; guidance weight, steps, sampler, threshold and aug_level default to that config's
`sample` section. The output is one PNG: a row per stage, a column per prompt, captions below
(train.grid).

From Python: `sample_to_grid([base_ckpt, sr_ckpt], captions, arrays, "grid.png")` does what the
command does once it has the prompts; `load_cascade` + `run_cascade` give the image tensors.
"""

from __future__ import annotations

import argparse
import math
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from train.args import add_sample_args, per_stage
from train.checkpoint import load_checkpoint, load_stage
from train.config import Config
from train.device import check_device
from train.data import ImageSpec, SkipCounts, check_dataset, load_records
from train.errors import ConfigError, MissingFile, NoSamples, UserError, one_line, run_command
from train.diffusion import sample
from train.grid import save_grid
from train.text import collate_text, decode_t5_bytes

__all__ = ["STAGE_NAMES", "Stage", "load_cascade", "load_prompts", "main_sample", "run_cascade", "sample_to_grid",
           "shard_prompts"]

PROMPTS_FOOTER_KEY = b"kiln.t5"  # = pipeline.embed_prompts.FOOTER_KEY (train/ does not import pipeline/)
PROMPTS_COLUMNS = ("prompt", "t5_len", "t5")  # what the sampler reads of an embed-prompts file
STAGE_NAMES = ("base", "sr256", "sr1024")  # the cascade's stages, in order (and `kiln sample`'s flags)


class PromptsError(UserError, ValueError):
    """A prompts file that is not what `kiln embed-prompts` writes."""


def load_prompts(path: str | Path) -> tuple[list[str], list[np.ndarray], dict]:
    """(prompts, float16 [t5_len, d_model] arrays, the footer's kiln.t5 dict) of an embed-prompts file.
    A file that is missing or not an embed-prompts file raises a UserError (one line)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"no prompts file at {path}{' (a directory)' if path.is_dir() else ''}: "
                          "make one with `kiln embed-prompts PROMPTS.txt -o PROMPTS.parquet`")
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as err:  # pyarrow: ArrowInvalid "not a parquet file", a truncated footer, ...
        raise PromptsError(f"{path} is not a readable Parquet file ({one_line(err)[:160]}): "
                           "make it with `kiln embed-prompts`") from err
    meta = pf.schema_arrow.metadata or {}
    if PROMPTS_FOOTER_KEY not in meta:
        raise PromptsError(f"{path} has no {PROMPTS_FOOTER_KEY.decode()} footer: make it with `kiln embed-prompts`")
    missing = [c for c in PROMPTS_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise PromptsError(f"{path} has no column {', '.join(missing)}: make it with `kiln embed-prompts`")
    try:
        info = json.loads(meta[PROMPTS_FOOTER_KEY])
        d_model = int(info["d_model"])
        table = pf.read(columns=list(PROMPTS_COLUMNS)).to_pydict()
    except Exception as err:
        raise PromptsError(f"{path} is unreadable ({one_line(err)[:160]}): make it again with `kiln embed-prompts`") from err
    arrays = []
    for prompt, n, b in zip(table["prompt"], table["t5_len"], table["t5"]):
        try:
            a = decode_t5_bytes(b, d_model)
        except (TypeError, ValueError) as err:
            raise PromptsError(f"{path}: prompt {prompt!r}: {one_line(err)}; make it again with `kiln embed-prompts`") from err
        if a.shape[0] != n:
            raise PromptsError(f"{path}: prompt {prompt!r} has t5_len {n} but {a.shape[0]} rows")
        arrays.append(a)
    return table["prompt"], arrays, info


def shard_prompts(data_dir: str | Path, n: int, *, split: str = "holdout", holdout_fraction: float = 0.0,
                  keep=None) -> tuple[list[str], list[np.ndarray], list]:
    """(captions, T5 arrays, Records) of the first `n` samples of a split of a dataset."""
    # Pixels are not needed here, only text; decode at a token size to keep it cheap.
    spec = ImageSpec(resolution=8, text_max_len=1)
    check_dataset(data_dir, spec)
    if split == "holdout" and holdout_fraction <= 0:
        split = "all"  # nothing held out: any sample will do (the caller was told via the checkpoint)
    counts = SkipCounts()
    records = load_records(data_dir, spec, split=split, holdout_fraction=holdout_fraction, keep=keep, limit=n,
                           counts=counts)
    if not records:
        raise NoSamples(f"no {split} samples in {data_dir} (holdout_fraction {holdout_fraction}; "
                        f"skipped: {counts.skipped()}): give --from-shards another dataset or --holdout-fraction")
    return [r.caption for r in records], [r.text for r in records], records


@dataclass
class Stage:
    """A loaded cascade stage and how to sample it (defaults from its config's `sample` section)."""

    model: torch.nn.Module
    cfg: Config
    step: int = 0
    guidance_weight: float | None = None
    steps: int | None = None
    aug_level: float | None = None
    sampler: str | None = None
    threshold: str | None = None

    @classmethod
    def load(cls, path: str | Path, device="cpu", weights: str = "ema", **settings) -> Stage:
        model, cfg, step = load_stage(path, weights=weights, device=device)
        return cls(model, cfg, step, **{k: v for k, v in settings.items() if v is not None})

    def setting(self, name: str):
        value = getattr(self, name)
        return self.cfg.sample[name] if value is None else value


@torch.no_grad()
def run_cascade(stages: Sequence[Stage], arrays: Sequence[np.ndarray], *, seed: int = 0,
                device: str | torch.device = "cpu", batch_size: int = 16) -> list[torch.Tensor]:
    """Images in [-1, 1] from every stage ([N, 3, R_i, R_i] each), for N prompts' T5 arrays.

    The first stage must be a base stage; each later one (SR) is conditioned on the previous
    stage's output. Stage i's noise comes from a generator seeded by (seed, i), per chunk of
    `batch_size` prompts, so a prompt's images do not depend on which other prompts share its chunk."""
    if not len(arrays):
        raise ConfigError("no prompts to sample")
    if not stages or stages[0].cfg.stage != "base":
        raise ConfigError("a cascade starts with a base stage")
    for s in stages[1:]:
        if s.cfg.stage != "sr":
            raise ConfigError(f"stage {s.cfg.name} after the base must be a super-resolution stage")
    outputs: list[list[torch.Tensor]] = [[] for _ in stages]
    for start in range(0, len(arrays), batch_size):
        chunk = list(arrays[start : start + batch_size])
        prev = None
        for i, st in enumerate(stages):
            text, mask = collate_text(chunk, st.cfg.data.text_max_len)
            if text.shape[-1] != st.cfg.unet.text_dim:
                raise ConfigError(f"stage {st.cfg.name} wants text_dim {st.cfg.unet.text_dim}, prompts have "
                                 f"d_model {text.shape[-1]}: embed them with the T5 the shards used")
            r = st.cfg.data.resolution
            gen = torch.Generator(device=device).manual_seed(int(seed) * 1000 + i * 100_003 + start)
            out = sample(st.model, (len(chunk), st.cfg.unet.channels, r, r), text.to(device), mask.to(device),
                         steps=int(st.setting("steps")), sampler=st.setting("sampler"),
                         guidance_weight=float(st.setting("guidance_weight")), threshold=st.setting("threshold"),
                         lowres=prev, aug_level=float(st.setting("aug_level")), generator=gen,
                         diffusion=st.cfg.diffusion)
            outputs[i].append(out.cpu())
            prev = out
    return [torch.cat(o) for o in outputs]


def load_cascade(checkpoints: Sequence[str | Path], device: str | torch.device = "cpu", weights: str = "ema",
                 *, guidance: Sequence | None = None, steps: Sequence | None = None,
                 aug_level: Sequence | None = None, sampler: str | None = None) -> list[Stage]:
    """The stages of `checkpoints` (base, then up to two SR stages: STAGE_NAMES), each checked to be
    of its kind. guidance / steps: one value or None (its config's) per stage; aug_level: one per
    SR stage."""
    paths = list(checkpoints)
    if not 1 <= len(paths) <= len(STAGE_NAMES):
        raise ConfigError(f"a cascade has 1 to {len(STAGE_NAMES)} stages ({', '.join(STAGE_NAMES)}), got {len(paths)}")
    guidance = [None] * len(paths) if guidance is None else list(guidance)
    steps = [None] * len(paths) if steps is None else list(steps)
    aug = [None] + ([None] * (len(paths) - 1) if aug_level is None else list(aug_level))
    if not len(guidance) == len(steps) == len(aug) == len(paths):
        raise ConfigError(f"{len(paths)} stages want {len(paths)} guidance weights and steps and {len(paths) - 1} "
                         f"aug levels, got {len(guidance)}, {len(steps)}, {len(aug) - 1}")
    stages = []
    for name, path, g, n, a in zip(STAGE_NAMES, paths, guidance, steps, aug):
        stage = Stage.load(path, device=device, weights=weights, guidance_weight=g, steps=n, aug_level=a, sampler=sampler)
        want = "base" if name == "base" else "sr"
        if stage.cfg.stage != want:
            raise ConfigError(f"the {name} checkpoint {path} holds a {stage.cfg.stage} stage ({stage.cfg.name}); "
                             f"{name} needs a {'base' if want == 'base' else 'super-resolution'} stage")
        stages.append(stage)
    return stages


def sample_to_grid(checkpoints: Sequence[str | Path], captions: Sequence[str], arrays: Sequence[np.ndarray],
                   out: str | Path, *, seed: int = 0, device: str | torch.device | None = None,
                   batch_size: int = 16, weights: str = "ema", **settings) -> Path:
    """Sample the cascade of `checkpoints` (`load_cascade`; settings: guidance, steps, aug_level,
    sampler) for prompts' T5 arrays and write one PNG: a row per stage, a column per prompt, its
    caption below. What `kiln sample` does once it has the prompts."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    stages = load_cascade(checkpoints, device=device, weights=weights, **settings)
    outputs = run_cascade(stages, arrays, seed=seed, device=device, batch_size=batch_size)
    labels = [f"{n} ({st.cfg.data.resolution}px)" for n, st in zip(STAGE_NAMES, stages)]
    return save_grid(outputs[-1], list(captions), out, rows=outputs, row_labels=labels)


def check_out_file(out: str | Path, flag: str = "--out") -> Path:
    """An output file path a command may write (atomically): not a directory, not under a file."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{flag} {out} is a directory: give a file name, e.g. {out / 'grid.png'}")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"{flag} {out}: {parent} is a file, not a directory; give a path in a directory")
    return out


def main_sample(args: argparse.Namespace) -> int:
    """`kiln sample` (train.args.add_sample_args). Bad input raises a UserError (train.errors):
    the kiln CLI prints it as one line and exits 2; no grid is written."""
    if args.sr1024 and not args.sr256:
        raise ConfigError("--sr1024 needs --sr256 (the cascade is base -> sr256 -> sr1024)")
    check_out_file(args.out)
    if args.n < 1 or args.batch_size < 1:
        raise ConfigError(f"--n and --batch-size must be >= 1, got {args.n} and {args.batch_size}")
    if any(n < 1 for n in args.steps or []):
        raise ConfigError(f"--steps must be >= 1 per stage, got {' '.join(map(str, args.steps))}")
    for flag, values in (("--guidance", args.guidance), ("--aug-level", args.aug_level)):
        if any(not math.isfinite(v) or v < 0 for v in values or []):
            raise ConfigError(f"{flag} takes finite numbers >= 0, got {' '.join(map(str, values))}")
    check_device(args.device)
    paths = [p for p in (args.base, args.sr256, args.sr1024) if p]
    names = STAGE_NAMES[: len(paths)]
    try:
        settings = {"guidance": per_stage(args.guidance, len(paths), "guidance"),
                    "steps": per_stage(args.steps, len(paths), "steps"),
                    "aug_level": per_stage(args.aug_level, len(paths) - 1, "aug-level") if len(paths) > 1 else [],
                    "sampler": args.sampler}
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if args.prompts:
        captions, arrays, _ = load_prompts(args.prompts)
    else:
        frac = args.holdout_fraction
        if frac is None:
            frac = float(load_checkpoint(args.base)["metadata"].get("holdout_fraction", 0.0))
        captions, arrays, _ = shard_prompts(args.from_shards, args.n, split="holdout", holdout_fraction=frac)
    path = sample_to_grid(paths, captions, arrays, args.out, seed=args.seed, device=args.device,
                          batch_size=args.batch_size, weights=args.weights, **settings)
    print(f"kiln sample: {len(captions)} prompts through {' -> '.join(names)}; wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.sample", description="sample the cascade")
    add_sample_args(p)
    return run_command("kiln sample", main_sample, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
