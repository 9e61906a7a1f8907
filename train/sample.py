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
`sample` section. The output is one PNG: a row per stage, a column per prompt, captions below.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw, ImageFont

from train.text import collate_text, decode_t5_bytes

__all__ = ["Stage", "load_prompts", "run_cascade", "save_grid", "shard_prompts"]

PROMPTS_FOOTER_KEY = b"kiln.t5"  # = pipeline.embed_prompts.FOOTER_KEY (train/ does not import pipeline/)


def load_prompts(path: str | Path) -> tuple[list[str], list[np.ndarray], dict]:
    """(prompts, float16 [t5_len, d_model] arrays, the footer's kiln.t5 dict) of an embed-prompts file."""
    pf = pq.ParquetFile(str(path))
    meta = pf.schema_arrow.metadata or {}
    if PROMPTS_FOOTER_KEY not in meta:
        raise ValueError(f"{path} has no {PROMPTS_FOOTER_KEY.decode()} footer: make it with `kiln embed-prompts`")
    info = json.loads(meta[PROMPTS_FOOTER_KEY])
    table = pf.read(columns=["prompt", "t5_len", "t5"]).to_pydict()
    d_model = int(info["d_model"])
    arrays = []
    for prompt, n, b in zip(table["prompt"], table["t5_len"], table["t5"]):
        a = decode_t5_bytes(b, d_model)
        if a.shape[0] != n:
            raise ValueError(f"{path}: prompt {prompt!r} has t5_len {n} but {a.shape[0]} rows")
        arrays.append(a)
    return table["prompt"], arrays, info


def shard_prompts(data_dir: str | Path, n: int, *, split: str = "holdout", holdout_fraction: float = 0.0,
                  keep=None) -> tuple[list[str], list[np.ndarray], list]:
    """(captions, T5 arrays, Records) of the first `n` samples of a split of a dataset."""
    from train.data import ImageSpec, load_records

    # Pixels are not needed here, only text; decode at a token size to keep it cheap.
    spec = ImageSpec(resolution=8, text_max_len=1)
    if split == "holdout" and holdout_fraction <= 0:
        split = "all"  # nothing held out: any sample will do (the caller was told via the checkpoint)
    records = load_records(data_dir, spec, split=split, holdout_fraction=holdout_fraction, keep=keep, limit=n)
    if not records:
        raise ValueError(f"no {split} samples in {data_dir} (holdout_fraction {holdout_fraction})")
    return [r.caption for r in records], [r.text for r in records], records


@dataclass
class Stage:
    """A loaded cascade stage and how to sample it (defaults from its config's `sample` section)."""

    model: torch.nn.Module
    cfg: object  # train.config.Config
    step: int = 0
    guidance_weight: float | None = None
    steps: int | None = None
    aug_level: float | None = None
    sampler: str | None = None
    threshold: str | None = None

    @classmethod
    def load(cls, path: str | Path, device="cpu", weights: str = "ema", **settings) -> Stage:
        from train.trainer import load_stage

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
    `batch_size` prompts, so a prompt's images do not depend on which others share its batch size."""
    from train.diffusion import sample

    if not stages or stages[0].cfg.stage != "base":
        raise ValueError("a cascade starts with a base stage")
    for s in stages[1:]:
        if s.cfg.stage != "sr":
            raise ValueError(f"stage {s.cfg.name} after the base must be a super-resolution stage")
    outputs: list[list[torch.Tensor]] = [[] for _ in stages]
    for start in range(0, len(arrays), batch_size):
        chunk = list(arrays[start : start + batch_size])
        prev = None
        for i, st in enumerate(stages):
            text, mask = collate_text(chunk, st.cfg.data.text_max_len)
            if text.shape[-1] != st.cfg.unet.text_dim:
                raise ValueError(f"stage {st.cfg.name} wants text_dim {st.cfg.unet.text_dim}, prompts have "
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


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def save_grid(images, captions: Sequence[str] | None, path: str | Path, *, rows: Sequence[torch.Tensor] | None = None,
              row_labels: Sequence[str] | None = None, min_cell: int = 128, caption_lines: int = 4) -> Path:
    """A PNG grid: one column per image, captions under each column. `images` is [N, 3, H, W] in
    [-1, 1] (one row); `rows` gives several rows of the same N prompts (e.g. one per cascade
    stage), each scaled up to the largest (nearest neighbour for small images, so pixels stay
    visible). Written atomically."""
    rows = list(rows) if rows is not None else [images]
    n = rows[0].shape[0]
    cell = max(min_cell, max(r.shape[-1] for r in rows))
    font = _font()
    line_h = 13
    text_h = line_h * caption_lines + 6 if captions else 0
    label_w = 96 if row_labels else 0
    pad = 4
    width = label_w + n * (cell + pad) + pad
    height = len(rows) * (cell + pad) + pad + text_h
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for ri, row in enumerate(rows):
        y = pad + ri * (cell + pad)
        if row_labels:
            draw.text((4, y + cell // 2 - 6), str(row_labels[ri]), fill=(0, 0, 0), font=font)
        for ci in range(n):
            a = ((row[ci].detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            im = Image.fromarray(a)
            if im.size[0] != cell:
                im = im.resize((cell, cell), Image.Resampling.NEAREST if im.size[0] * 2 <= cell else Image.Resampling.BICUBIC)
            grid.paste(im, (label_w + pad + ci * (cell + pad), y))
    if captions:
        y0 = len(rows) * (cell + pad) + pad
        chars = max(8, cell // 6)
        for ci, cap in enumerate(captions):
            lines = textwrap.wrap(cap, chars)[:caption_lines]
            for li, line in enumerate(lines):
                draw.text((label_w + pad + ci * (cell + pad), y0 + li * line_h), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    from train.cli import add_sample_args, main_sample

    p = argparse.ArgumentParser(prog="python -m train.sample", description="sample the cascade")
    add_sample_args(p)
    return main_sample(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
