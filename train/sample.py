"""Sample the cascade: base -> sr256 -> sr1024, each stage optional after the base.

    kiln sample --base runs/base/checkpoints/step_00100000.safetensors \\
                --sr256 runs/sr256/...safetensors [--sr1024 runs/sr1024/...safetensors] \\
                --prompts prompts.parquet --out grid.png [--guidance 5 5 3] [--steps 64 32 16] \\
                [--aug-level 0.25] [--seed 0]
    kiln sample --base ... --from-shards DATASET --n 8 --out grid.png   # held-out shard captions
    kiln sample --base ... --prompts prompts.parquet --out-dir samples/ [--per-prompt 4] [--overwrite]

Prompts come already embedded (the sampler never loads T5, DESIGN.md): a parquet written by
`kiln embed-prompts` (columns prompt, t5_len, t5 = float16 LE [t5_len, d_model]; footer "kiln.t5"
with d_model), or the KEY.t5.npy of held-out shard samples (`--from-shards`, split by the
checkpoint's holdout_fraction).

Each stage loads its checkpoint's EMA weights (`--weights model` for the raw ones) and the config
stored in it; guidance weight, steps, sampler, threshold and aug_level default to that config's
`sample` section. `--out` writes one PNG: a row per stage, a column per prompt, captions below
(train.grid). `--out-dir DIR` writes every image of every stage as DIR/STAGE/PPPPPP-SSS.png
(prompt index, sample index) and DIR/samples.parquet, one row per image (SAMPLES_SCHEMA; its footer
`kiln.samples` holds the stages' settings). Sample k of every prompt uses seed SEED + k, so sample 0
is what `--out` shows. kiln writes DIR/samples.parquet first (marked incomplete) and last (complete):
a DIR that holds anything else is refused, a complete earlier output needs --overwrite, an
interrupted one is redone by re-running the command; either way only the files the old
samples.parquet lists are deleted (`check_sample_dir`). `kiln eval` reads such a directory.

From Python: `sample_to_grid([base_ckpt, sr_ckpt], captions, arrays, "grid.png")` does what the
command does once it has the prompts; `load_cascade` + `run_cascade` give the image tensors;
`write_samples` fills a sample directory; `upscale` runs an SR stage on given low-res images.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from train.args import add_sample_args, per_stage
from train.atomic import atomic_write
from train.checkpoint import load_checkpoint, load_stage
from train.config import Config
from train.device import check_device
from train.data import ImageSpec, SkipCounts, check_dataset, load_records
from train.errors import ConfigError, MissingFile, NoSamples, UserError, one_line, run_command
from train.diffusion import sample
from train.grid import save_grid
from train.text import collate_text, decode_t5_bytes

__all__ = ["SAMPLES_FILE", "SAMPLES_SCHEMA", "STAGE_NAMES", "SampleDir", "Stage", "check_sample_dir", "load_cascade",
           "load_prompts", "main_sample", "read_sample_dir", "run_cascade", "sample_stage", "sample_to_grid",
           "shard_prompts", "upscale", "write_samples"]

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
                device: str | torch.device = "cpu", batch_size: int = 16, offset: int = 0) -> list[torch.Tensor]:
    """Images in [-1, 1] from every stage ([N, 3, R_i, R_i] each), for N prompts' T5 arrays.

    The first stage must be a base stage; each later one (SR) is conditioned on the previous
    stage's output. Stage i's noise comes from a generator seeded by (seed, i), per chunk of
    `batch_size` prompts, so a prompt's images do not depend on which other prompts share its chunk.
    `offset`: the index of arrays[0] in a longer list sampled piecewise (at a multiple of
    `batch_size`): the images are those the whole list would give."""
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
            gen = torch.Generator(device=device).manual_seed(int(seed) * 1000 + i * 100_003 + offset + start)
            out = sample_stage(st, chunk, st.cfg.data.resolution, lowres=prev, generator=gen, device=device)
            outputs[i].append(out.cpu())
            prev = out
    return [torch.cat(o) for o in outputs]


def sample_stage(st: Stage, arrays: Sequence[np.ndarray], size: int, *, lowres: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: str | torch.device = "cpu",
                 aug_level: float | None = None) -> torch.Tensor:
    """One stage's images in [-1, 1], [N, 3, size, size], for N prompts' T5 arrays (one batch),
    with the stage's settings (`Stage.setting`); SR stages take `lowres` (any size: upsampled),
    noise-augmented at `aug_level` [the stage's]."""
    text, mask = collate_text(list(arrays), st.cfg.data.text_max_len)
    if text.shape[-1] != st.cfg.unet.text_dim:
        raise ConfigError(f"stage {st.cfg.name} wants text_dim {st.cfg.unet.text_dim}, prompts have "
                         f"d_model {text.shape[-1]}: embed them with the T5 the shards used")
    aug = float(st.setting("aug_level") if aug_level is None else aug_level)
    return sample(st.model, (len(arrays), st.cfg.unet.channels, size, size), text.to(device), mask.to(device),
                  steps=int(st.setting("steps")), sampler=st.setting("sampler"),
                  guidance_weight=float(st.setting("guidance_weight")), threshold=st.setting("threshold"),
                  lowres=lowres, aug_level=aug, generator=generator, diffusion=st.cfg.diffusion)


@torch.no_grad()
def upscale(st: Stage, lowres: torch.Tensor, arrays: Sequence[np.ndarray], *, seed: int = 0,
            device: str | torch.device = "cpu", batch_size: int = 16, aug_level: float | None = None) -> torch.Tensor:
    """An SR stage run on given low-res images ([N, 3, L, L] in [-1, 1], e.g. held-out shard
    images downsampled as training does) with their T5 arrays: [N, 3, S, S] on the CPU, S = L x
    the stage's resolution / lowres_resolution (so a crop's twin gives the crop). The noise of
    the chunk starting at prompt k comes from a generator seeded by (seed, k) (`kiln eval`'s SR
    scores)."""
    if st.cfg.stage != "sr":
        raise ConfigError(f"stage {st.cfg.name} is a {st.cfg.stage} stage: only an SR stage upscales")
    if len(lowres) != len(arrays):
        raise ValueError(f"{len(lowres)} low-res images for {len(arrays)} T5 arrays")
    d = st.cfg.data
    size = lowres.shape[-1] * d.resolution // d.lowres_resolution
    out = []
    for start in range(0, len(arrays), batch_size):
        gen = torch.Generator(device=device).manual_seed(int(seed) * 1000 + start)
        out.append(sample_stage(st, arrays[start : start + batch_size], size, generator=gen, device=device,
                                lowres=lowres[start : start + batch_size].to(device), aug_level=aug_level).cpu())
    return torch.cat(out)


def load_cascade(checkpoints: Sequence[str | Path], device: str | torch.device = "cpu", weights: str = "ema",
                 *, guidance: Sequence | None = None, steps: Sequence | None = None,
                 aug_level: Sequence | None = None, sampler: str | None = None,
                 threshold: str | None = None) -> list[Stage]:
    """The stages of `checkpoints` (base, then up to two SR stages: STAGE_NAMES), each checked to be
    of its kind. guidance / steps: one value or None (its config's) per stage; aug_level: one per
    SR stage; sampler / threshold: every stage's (None: its config's)."""
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
        stage = Stage.load(path, device=device, weights=weights, guidance_weight=g, steps=n, aug_level=a, sampler=sampler,
                           threshold=threshold)
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
    sampler, threshold) for prompts' T5 arrays and write one PNG: a row per stage, a column per prompt, its
    caption below. What `kiln sample` does once it has the prompts."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    stages = load_cascade(checkpoints, device=device, weights=weights, **settings)
    outputs = run_cascade(stages, arrays, seed=seed, device=device, batch_size=batch_size)
    labels = [f"{n} ({st.cfg.data.resolution}px)" for n, st in zip(STAGE_NAMES, stages)]
    return save_grid(outputs[-1], list(captions), out, rows=outputs, row_labels=labels)


# -- a directory of samples (`kiln sample --out-dir`; `kiln eval` reads it) -------------------------

SAMPLES_FILE = "samples.parquet"
SAMPLES_FOOTER_KEY = b"kiln.samples"  # the footer key that makes a samples.parquet kiln's (JSON, below)
SAMPLES_FORMAT = "kiln-samples/1"
SAMPLES_SCHEMA = pa.schema([
    ("prompt_index", pa.int32()),  # the prompt's row in the prompts (0-based)
    ("sample_index", pa.int32()),  # 0 .. per_prompt - 1
    ("prompt", pa.string()),
    ("category", pa.string()),  # the prompt's category (kiln eval's prompt files); null without one
    ("seed", pa.int64()),  # `--seed` that gives this image as sample 0 (same prompts, same --batch-size)
    ("stage", pa.string()),  # base / sr256 / sr1024
    ("width", pa.int32()),  # px
    ("height", pa.int32()),
    ("guidance", pa.float64()),  # this stage's classifier-free guidance weight
    ("steps", pa.int32()),
    ("sampler", pa.string()),
    ("checkpoint", pa.string()),  # this stage's checkpoint, as given
    ("checkpoint_step", pa.int64()),
    ("path", pa.string()),  # the PNG, relative to the directory: STAGE/PPPPPP-SSS.png
])
_IMAGE_PATH = re.compile(r"(?:" + "|".join(STAGE_NAMES) + r")/\d{6,}-\d{3,}\.png")


def image_path(stage: str, prompt_index: int, sample_index: int) -> str:
    return f"{stage}/{prompt_index:06d}-{sample_index:03d}.png"


@dataclass
class SampleDir:
    """A `kiln sample --out-dir` directory as read back: its rows (SAMPLES_SCHEMA, as dicts) and the
    footer's settings (format, complete, stages, seed, per_prompt, ...)."""

    root: Path
    rows: list[dict]
    info: dict

    def stage_rows(self, stage: str | None = None) -> list[dict]:
        """The rows of one stage (default: the last stage sampled), in (sample, prompt) order."""
        stage = stage or self.info["stages"][-1]["stage"]
        return [r for r in self.rows if r["stage"] == stage]

    def kiln_files(self) -> list[Path]:
        """The files kiln wrote here, by exact name: the listed PNGs that exist, and samples.parquet."""
        out = [self.root / r["path"] for r in self.rows if _IMAGE_PATH.fullmatch(r["path"] or "")]
        return [p for p in dict.fromkeys(out) if p.is_file()] + [self.root / SAMPLES_FILE]


def _read_index(root: Path) -> SampleDir | None:
    """The directory's samples.parquet if kiln wrote it (its footer key), else None."""
    path = root / SAMPLES_FILE
    if not path.is_file():
        return None
    try:
        pf = pq.ParquetFile(str(path))
        meta = pf.schema_arrow.metadata or {}
        if SAMPLES_FOOTER_KEY not in meta:
            return None
        info = json.loads(meta[SAMPLES_FOOTER_KEY])
        rows = pf.read().to_pylist()
    except Exception:  # not Parquet, cut off, bad JSON: not (or no longer) a file kiln can read
        return None
    if not isinstance(info, dict) or info.get("format") != SAMPLES_FORMAT or not info.get("stages"):
        return None
    return SampleDir(root, rows, info)


def read_sample_dir(directory: str | Path, flag: str = "SAMPLE_DIR") -> SampleDir:
    """A complete `kiln sample --out-dir` directory; a UserError (one line) for anything else."""
    root = Path(directory)
    if not root.is_dir():
        raise MissingFile(f"{flag} {root} {'is a file' if root.exists() else 'does not exist'}: give a directory "
                          "written by `kiln sample --out-dir`")
    found = _read_index(root)
    if found is None:
        why = "is not kiln's" if (root / SAMPLES_FILE).exists() else "is missing"
        raise UserError(f"{flag} {root}: {SAMPLES_FILE} {why}; give a directory written by `kiln sample --out-dir`")
    if not found.info.get("complete"):
        raise UserError(f"{flag} {root} holds an interrupted `kiln sample` run: re-run that command to finish it")
    odd = next((r["path"] for r in found.rows if not _IMAGE_PATH.fullmatch(r["path"] or "")), None)
    if odd is not None:  # kiln reads only the names it writes: no path may lead out of the directory
        raise UserError(f"{flag} {root}: {SAMPLES_FILE} lists {odd!r}, not a STAGE/PPPPPP-SSS.png that kiln writes; "
                        "sample it again with `kiln sample --out-dir`")
    missing = [r["path"] for r in found.rows if not (root / r["path"]).is_file()]
    if missing:
        raise UserError(f"{flag} {root}: {len(missing)} of the {len(found.rows)} images {SAMPLES_FILE} lists are "
                        f"missing (first: {missing[0]}); sample it again with `kiln sample --out-dir`")
    return found


def check_sample_dir(out_dir: str | Path, overwrite: bool = False, flag: str = "--out-dir") -> list[Path]:
    """Whether `kiln sample` may write into `out_dir`, before any work; returns the files of an
    earlier run there that the new one replaces (deleted by `write_samples`).

    A new or empty directory is fine. One holding a COMPLETE earlier output needs `overwrite`; an
    interrupted one (samples.parquet still marked incomplete) is redone. Anything else -- a
    directory with files kiln did not write -- is refused (DESIGN.md: nothing of the user's is
    deleted or replaced); only the files the old samples.parquet lists are ever deleted."""
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"{flag} {root} is a file: give a directory")
    parent = next((p for p in root.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"{flag} {root}: {parent} is a file, not a directory; give a path in a directory")
    if not root.exists() or not any(root.iterdir()):
        return []
    found = _read_index(root)
    if found is None:
        raise UserError(f"{flag} {root} is not empty and was not written by `kiln sample` (no {SAMPLES_FILE} of "
                        "kiln's): give a new or empty directory; kiln never writes over files it did not write")
    if found.info.get("complete") and not overwrite:
        raise UserError(f"{flag} {root} holds an earlier `kiln sample` output: pass --overwrite to replace it "
                        f"(only the files its {SAMPLES_FILE} lists are deleted), or give another directory")
    return found.kiln_files()


def _png(image: torch.Tensor, path: Path) -> None:
    a = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    atomic_write(path, lambda tmp: Image.fromarray(a).save(tmp, format="PNG"))


def _write_index(root: Path, rows: list[dict], info: dict) -> None:
    table = pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)
    table = table.replace_schema_metadata({SAMPLES_FOOTER_KEY: json.dumps(info, sort_keys=True).encode()})
    atomic_write(root / SAMPLES_FILE, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _checkpoint_holdout(path: str | Path) -> float:
    """The holdout_fraction a stage was trained with (its checkpoint's metadata; 0 when absent)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return float((f.metadata() or {}).get("holdout_fraction", 0.0))


def write_samples(stages: Sequence[Stage], checkpoints: Sequence[str | Path], prompts: Sequence[str],
                  arrays: Sequence[np.ndarray], out_dir: str | Path, *, categories: Sequence[str | None] | None = None,
                  per_prompt: int = 1, seed: int = 0, device: str | torch.device = "cpu", batch_size: int = 16,
                  replace: Sequence[Path] = (), source: str | None = None, weights: str = "ema",
                  keep_first: bool = False) -> tuple[Path, list[torch.Tensor] | None]:
    """Sample `stages` (load_cascade) for the prompts, `per_prompt` times each (seeds seed ..
    seed + per_prompt - 1), into a sample directory (module docstring). `replace`: the earlier
    run's files (`check_sample_dir`), deleted once nothing of the user's is in the way.
    Returns (the directory, and with `keep_first` every stage's images of sample 0 for a grid)."""
    root = Path(out_dir)
    names = STAGE_NAMES[: len(stages)]
    categories = list(categories) if categories is not None else [None] * len(prompts)
    if not len(prompts) == len(arrays) == len(categories):
        raise ValueError(f"{len(prompts)} prompts, {len(arrays)} T5 arrays, {len(categories)} categories")
    settings = [{"stage": n, "checkpoint": str(c), "step": st.step, "config": st.cfg.name,
                 "resolution": st.cfg.data.resolution, "guidance_weight": float(st.setting("guidance_weight")),
                 "steps": int(st.setting("steps")), "sampler": st.setting("sampler"),
                 "threshold": st.setting("threshold"),
                 "aug_level": float(st.setting("aug_level")) if st.cfg.stage == "sr" else None}
                for n, c, st in zip(names, checkpoints, stages)]
    rows = [{"prompt_index": p, "sample_index": k, "prompt": prompts[p], "category": categories[p], "seed": seed + k,
             "stage": s["stage"], "width": s["resolution"], "height": s["resolution"], "guidance": s["guidance_weight"],
             "steps": s["steps"], "sampler": s["sampler"], "checkpoint": s["checkpoint"], "checkpoint_step": s["step"],
             "path": image_path(s["stage"], p, k)}
            for k in range(per_prompt) for p in range(len(prompts)) for s in settings]
    old = {Path(f) for f in replace}
    in_the_way = [r["path"] for r in rows if (root / r["path"]).exists() and root / r["path"] not in old]
    if in_the_way:
        raise UserError(f"--out-dir {root} already holds {in_the_way[0]}, which kiln did not write: move it or give "
                        "another directory")
    for f in old:
        f.unlink(missing_ok=True)
    for n in STAGE_NAMES:  # an earlier run's stage folders, now empty
        if (root / n).is_dir() and not any((root / n).iterdir()):
            (root / n).rmdir()
    info = {"format": SAMPLES_FORMAT, "complete": False, "stages": settings, "seed": seed, "per_prompt": per_prompt,
            "batch_size": batch_size, "prompts": source, "holdout_fraction": _checkpoint_holdout(checkpoints[0]),
            "weights": weights}
    root.mkdir(parents=True, exist_ok=True)
    _write_index(root, rows, info)  # first: marks the directory as kiln's while the images are written
    first: list[list[torch.Tensor]] | None = [[] for _ in stages] if keep_first else None
    for k in range(per_prompt):
        for start in range(0, len(arrays), batch_size):
            outs = run_cascade(stages, arrays[start : start + batch_size], seed=seed + k, device=device,
                               batch_size=batch_size, offset=start)
            for i, (name, images) in enumerate(zip(names, outs)):
                for j, image in enumerate(images):
                    _png(image, root / image_path(name, start + j, k))
                if first is not None and k == 0:
                    first[i].append(images)
    _write_index(root, rows, {**info, "complete": True})
    return root, [torch.cat(f) for f in first] if first is not None else None


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
    out_dir = getattr(args, "out_dir", None)
    per_prompt = getattr(args, "per_prompt", 1)
    if not args.out and not out_dir:
        raise ConfigError("nothing to write: give --out GRID.png, --out-dir DIR, or both")
    if args.out:
        check_out_file(args.out)
    if per_prompt < 1:
        raise ConfigError(f"--per-prompt must be >= 1, got {per_prompt}")
    if per_prompt > 1 and not out_dir:
        raise ConfigError("--per-prompt needs --out-dir (a grid shows one sample per prompt)")
    replace = check_sample_dir(out_dir, getattr(args, "overwrite", False)) if out_dir else []
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
                    "sampler": args.sampler, "threshold": args.threshold}
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if args.prompts:
        captions, arrays, _ = load_prompts(args.prompts)
        categories, source = None, str(args.prompts)
    else:
        frac = args.holdout_fraction
        if frac is None:
            frac = float(load_checkpoint(args.base)["metadata"].get("holdout_fraction", 0.0))
        captions, arrays, _ = shard_prompts(args.from_shards, args.n, split="holdout", holdout_fraction=frac)
        categories, source = ["held-out shards"] * len(captions), f"held-out samples of {args.from_shards}"
    if not out_dir:
        path = sample_to_grid(paths, captions, arrays, args.out, seed=args.seed, device=args.device,
                              batch_size=args.batch_size, weights=args.weights, **settings)
        print(f"kiln sample: {len(captions)} prompts through {' -> '.join(names)}; wrote {path}")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    stages = load_cascade(paths, device=device, weights=args.weights, **settings)
    root, first = write_samples(stages, paths, captions, arrays, out_dir, categories=categories, per_prompt=per_prompt,
                                seed=args.seed, device=device, batch_size=args.batch_size, replace=replace,
                                source=source, weights=args.weights, keep_first=bool(args.out))
    wrote = f"{len(captions) * per_prompt * len(stages)} images and {root / SAMPLES_FILE}"
    if args.out:
        labels = [f"{n} ({st.cfg.data.resolution}px)" for n, st in zip(names, stages)]
        grid = save_grid(first[-1], list(captions), args.out, rows=first, row_labels=labels)
        wrote += f", and {grid}"
    print(f"kiln sample: {len(captions)} prompts x {per_prompt} through {' -> '.join(names)}; wrote {wrote}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.sample", description="sample the cascade")
    add_sample_args(p)
    return run_command("kiln sample", main_sample, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
