"""`kiln eval`: score a cascade's samples -- a compositional suite read from pixels, CLIP score, FID
and KID -- over a guidance sweep, into eval.json, two trade-off plots and an HTML report.

    # the built-in suite: held-out prompts of the synthetic web's grammar, embedded with the run's T5
    kiln eval --suite synthetic --data DATASET --write-prompts suite.txt      # prints the next command:
    kiln embed-prompts suite.txt -o suite.parquet --t5-model SPEC
    kiln eval --base CKPT [--sr256 CKPT] --prompts suite.parquet --suite synthetic --data DATASET \\
              --guidance 1,3,5,8 --out-dir eval/ [--clip SPEC] [--features SPEC]
    # samples already written by `kiln sample --out-dir` (one directory per guidance weight)
    kiln eval samples/w1 samples/w3 --out-dir eval/ [--suite synthetic | --prompt-file drawbench.csv] ...
    # SR stages alone, against the true image of held-out shard samples (also done with --base and --data)
    kiln eval --sr256 CKPT [--sr1024 CKPT] --data DATASET --out-dir eval-sr/ [--sr-n 64] [--aug-level 0]
              [--lowres-noise 0]

docs/eval.md says what each number means. The pieces:

    prompt files    DrawBench's CSV (`Prompts,Category`), PartiPrompts' TSV (`Prompt<TAB>Category...`)
                    or one prompt per line (`read_prompt_file`), read from the user's copy: kiln
                    bundles none. Categories group every score.
    synthetic suite `synthetic_suite`: 1-, 2- and 3-shape scenes of the web's grammar
                    (train.evaluate), keeping only combinations (scene_key) that no caption of the
                    training shards has (`training_combinations`, from --data). Each caption is scored
                    in every category it states (train.evaluate.categories_of), from pixels.
    statistics      accuracy with a 95% Wilson interval, and a chance level: what these same images
                    score against the category's OTHER prompts (all pairs, or a seeded sample of them)
                    -- the accuracy of a model that draws like this one but ignores the prompt.
    SR stages       `sr_pairs`: held-out shard images at the stage's output size (the centre window
                    for a random-crop stage) and their low-res twins, made as training makes them;
                    `train.sample.upscale` runs the stage on them; `sr_scores`: PSNR of SR and of
                    bicubic against the truth, and of SR downsampled against its input, each with
                    a 95% Student-t interval (`t_interval`).
    metrics         CLIP score, FID and KID come from kiln's metrics module through `MetricHooks`:
                    train/ imports nothing from embed/ or pipeline/ (DESIGN.md), so the `kiln eval`
                    command (pipeline.evaluation) hands them in.

The sampler never runs a text encoder (DESIGN.md), so prompts reach `kiln eval --base` embedded:
`--write-prompts` writes them one per line and prints the `kiln embed-prompts` command (with the
T5 spec of --data's stats.json when there is one).

Output directory (--out-dir): eval.json (written first marked incomplete, last complete, listing
every file kiln wrote there), report.html, plots/*.png, sr/<slot>.png (an SR stage's examples:
low-res | bicubic | SR | truth) and, when it sampled, samples/w<W>/ (each a
`kiln sample --out-dir` directory). A directory holding anything else is refused; an earlier
complete output needs --overwrite, and only the files its eval.json lists are deleted.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from train.atomic import atomic_write
from train.errors import ConfigError, DatasetError, UserError, one_line
from train.evaluate import (
    CATEGORIES,
    COLOURS,
    OPPOSITE,
    POSITIONS,
    ROWS,
    SHAPES,
    Scene,
    ShapeSpec,
    categories_of,
    describe,
    judge,
    parse_caption,
    read_image,
    scene_key,
)

if TYPE_CHECKING:  # torch is imported where it is used: `kiln eval --write-prompts` runs without it
    import torch

__all__ = [
    "EVAL_FILE",
    "SR_SCORES",
    "SUITES",
    "MetricHooks",
    "Prompt",
    "SRPairs",
    "check_eval_dir",
    "main_eval",
    "read_prompt_file",
    "score_synthetic",
    "sr_pairs",
    "sr_scores",
    "synthetic_suite",
    "t_interval",
    "training_combinations",
    "wilson_interval",
]

SUITES = ("synthetic",)
EVAL_FILE = "eval.json"
EVAL_FORMAT = "kiln-eval/1"
REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
PLOT_NAMES = ("fid_vs_clip", "accuracy_vs_guidance")  # plots/<name>.png
SAMPLES_DIR = "samples"
_KILN_FILE = re.compile(r"report\.html|plots/[a-z_]+\.png|sr/sr(?:256|1024)\.png")
_KILN_SAMPLES = re.compile(r"samples/w[0-9][0-9.e+-]*")
Z95 = 1.959963984540054  # two-sided 95% normal quantile
MAX_CHANCE_PAIRS = 50_000  # a category's chance level uses every pair up to this many, else a seeded sample
REPORT_MAX_IMAGES = 24  # per category and run in report.html
SR_DIR = "sr"  # sr/<slot>.png: an SR stage's examples, low-res | bicubic | SR | truth
SR_GRID_SAMPLES = 6  # held-out samples shown per SR stage


# --------------------------------------------------------------------------------------------
# Prompt files


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str


class PromptFileError(UserError, ValueError):
    """A prompt file that is missing, not UTF-8 or not one of the three formats."""


def read_prompt_file(path: str | Path) -> tuple[list[Prompt], str]:
    """(prompts in file order, format) of a prompt file: "drawbench" (CSV with a `Prompts` and a
    `Category` column, quoted as CSV quotes), "parti" (TSV with a `Prompt` and a `Category` column,
    no quoting) or "lines" (one prompt per non-blank line, category "all"). The format is told by
    the header line; a .csv / .tsv file without its header is refused. Every problem is a
    PromptFileError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"--prompt-file {path} {'is a directory' if path.is_dir() else 'does not exist'}: give "
                              "DrawBench's CSV, PartiPrompts' TSV or a text file with one prompt per line")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise PromptFileError(f"{path}: line {line} is not UTF-8 ({err.reason}); save the file as UTF-8") from err
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise PromptFileError(f"{path} holds no prompts")
    head = lines[first]

    def is_header(fields: list[str]) -> bool:
        names = [f.strip().lower() for f in fields]
        return bool(names) and names[0] in ("prompt", "prompts") and any(n in ("category", "categories") for n in names)

    if "\t" in head and is_header(head.split("\t")):
        prompts, kind = _read_tsv(path, lines, first), "parti"
    elif "," in head and is_header(next(csv.reader([head]), [])):
        prompts, kind = _read_csv(path, text), "drawbench"
    elif path.suffix.lower() in (".csv", ".tsv"):
        want = "Prompts,Category (DrawBench)" if path.suffix.lower() == ".csv" else "Prompt<TAB>Category (PartiPrompts)"
        raise PromptFileError(f"{path}: line {first + 1} is not a header; a {path.suffix.lower()} prompt file starts "
                              f"with {want}")
    else:
        prompts = [Prompt(line.strip(), "all") for line in lines if line.strip()]
        kind = "lines"
    if not prompts:
        raise PromptFileError(f"{path} holds a header but no prompts")
    return prompts, kind


def _column(path: Path, header: list[str], name: str, line: int) -> int:
    names = [h.strip().lower() for h in header]
    for want in (name.lower(), name.lower() + "s"):
        if want in names:
            return names.index(want)
    raise PromptFileError(f"{path}: line {line}: the header has no {name} column (it has {', '.join(header)})")


def _read_tsv(path: Path, lines: list[str], first: int) -> list[Prompt]:
    header = lines[first].split("\t")
    p, c = _column(path, header, "Prompt", first + 1), _column(path, header, "Category", first + 1)
    out = []
    for number, line in enumerate(lines[first + 1:], start=first + 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) <= max(p, c):
            raise PromptFileError(f"{path}: line {number} has {len(fields)} tab-separated fields, the header "
                                  f"{len(header)}: each line is Prompt<TAB>Category...")
        if not fields[p].strip():
            raise PromptFileError(f"{path}: line {number} has an empty prompt")
        out.append(Prompt(fields[p].strip(), fields[c].strip() or "uncategorised"))
    return out


def _read_csv(path: Path, text: str) -> list[Prompt]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    out: list[Prompt] = []
    header = None
    start = 1
    try:
        for row in reader:
            if not any(f.strip() for f in row):
                start = reader.line_num + 1
                continue
            if header is None:
                header = row
                p = _column(path, header, "Prompt", reader.line_num)
                c = _column(path, header, "Category", reader.line_num)
            elif len(row) <= max(p, c):
                raise PromptFileError(f"{path}: line {start} has {len(row)} field{'s' * (len(row) != 1)}, expected "
                                      f"{len(header)} ({','.join(header)}); quote a prompt that holds a comma")
            elif "\n" in row[p] or "\r" in row[p]:
                raise PromptFileError(f"{path}: line {start}: the prompt spans several lines; `kiln embed-prompts` "
                                      "reads one prompt per line")
            elif not row[p].strip():
                raise PromptFileError(f"{path}: line {start} has an empty prompt")
            else:
                out.append(Prompt(row[p].strip(), row[c].strip() or "uncategorised"))
            start = reader.line_num + 1
    except csv.Error as err:
        raise PromptFileError(f"{path}: line {reader.line_num}: not valid CSV ({one_line(err)})") from err
    return out


# --------------------------------------------------------------------------------------------
# The synthetic suite


def training_combinations(data_dir: str | Path) -> tuple[set, int, int]:
    """(scene_key of every caption of the dataset in the web's grammar, captions read, of those in
    the grammar). Reads every shard's captions (KEY.txt), both splits: a combination the model
    could have seen anywhere in the data is not held out."""
    from train.data import ImageSpec, load_records  # torch: only when the suite is checked against data

    keys: set = set()
    seen = [0, 0]

    def collect(meta: dict, caption: str) -> bool:
        seen[0] += 1
        scene = parse_caption(caption)
        if scene is not None:
            seen[1] += 1
            keys.add(scene_key(scene))
        return False  # nothing is decoded: the captions are all this needs

    load_records(data_dir, ImageSpec(resolution=8, text_max_len=1), split="all", keep=collect)
    return keys, seen[0], seen[1]


def _draw_scene(rng: random.Random, n: int) -> Scene:
    """A scene of `n` shapes drawn as the web draws them (distinct colours; a square canvas, so a
    row of three may run either way)."""
    colours = rng.sample(list(COLOURS), n + 1)
    kinds = [rng.choice(SHAPES) for _ in range(n)]
    if n == 1:
        positions: tuple = (rng.choice(POSITIONS),)
    elif n == 2:
        first = rng.choice(tuple(OPPOSITE))
        positions = (first, OPPOSITE[first])
    else:
        positions = ROWS[rng.choice(tuple(ROWS))]
    return Scene(colours[0], tuple(ShapeSpec(k, c, p) for k, c, p in zip(kinds, colours[1:], positions)))


def synthetic_suite(n_per_size: int, seed: int = 0, exclude: set | frozenset = frozenset()) -> list[Scene]:
    """Up to `n_per_size` scenes of 1, 2 and 3 shapes each (in that order), every one a distinct
    combination (scene_key) not in `exclude`, drawn uniformly with a seeded RNG. Fewer where the
    held-out combinations run out (the caller says so)."""
    rng = random.Random(f"kiln-synthetic-suite:{seed}")
    out: list[Scene] = []
    for n in (1, 2, 3):
        taken: set = set()
        for _ in range(200 * n_per_size):
            if len(taken) >= n_per_size:
                break
            scene = _draw_scene(rng, n)
            key = scene_key(scene)
            if key not in taken and key not in exclude:
                taken.add(key)
                out.append(scene)
    return out


# --------------------------------------------------------------------------------------------
# Statistics


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (95% by default); (nan, nan) for n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (0.0 if k <= 0 else max(0.0, centre - half)), (1.0 if k >= n else min(1.0, centre + half))


def _mean_ci(values: np.ndarray) -> dict:
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    mean = float(v.mean()) if n else float("nan")
    half = Z95 * float(v.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def score_synthetic(images: Sequence, scenes: Sequence[Scene], groups: Sequence | None = None, *,
                    seed: int = 0) -> dict:
    """Score pictures against the scenes their prompts state, per category (train.evaluate.judge).

    `groups`: which images share a prompt (default: none do); a chance pair never joins two of the
    same group. Returns {"categories": {name: {n, correct, accuracy, ci95, chance}}, "mean_accuracy"
    (over the categories present), "per_image": [{category: correct}]}."""
    readings = [read_image(im) for im in images]
    groups = list(range(len(scenes))) if groups is None else list(groups)
    per_image: list[dict] = [{} for _ in scenes]
    cats = {}
    rng = np.random.default_rng(seed)
    for cat in CATEGORIES:
        idx = [i for i, sc in enumerate(scenes) if cat in categories_of(sc)]
        if not idx:
            continue
        for i in idx:
            per_image[i][cat] = judge(cat, scenes[i], readings[i])
        correct = sum(per_image[i][cat] for i in idx)
        if len(idx) ** 2 <= MAX_CHANCE_PAIRS:
            pairs = [(i, j) for i in idx for j in idx if groups[i] != groups[j]]
        else:  # too many to try all: a seeded sample of them
            a = rng.choice(idx, size=MAX_CHANCE_PAIRS)
            b = rng.choice(idx, size=MAX_CHANCE_PAIRS)
            pairs = [(int(i), int(j)) for i, j in zip(a, b) if groups[i] != groups[j]]
        chance = (sum(judge(cat, scenes[i], readings[j]) for i, j in pairs) / len(pairs)) if pairs else float("nan")
        lo, hi = wilson_interval(correct, len(idx))
        cats[cat] = {"n": len(idx), "correct": int(correct), "accuracy": correct / len(idx), "ci95": [lo, hi],
                     "chance": chance}
    mean = float(np.mean([c["accuracy"] for c in cats.values()])) if cats else float("nan")
    return {"categories": cats, "mean_accuracy": mean, "per_image": per_image}


# --------------------------------------------------------------------------------------------
# What kiln eval needs from the metrics module


@dataclass
class MetricHooks:
    """CLIP score, feature extraction, FID and KID, handed in by the `kiln eval` command
    (pipeline.evaluation, from kiln's metrics module): train/ imports nothing from embed/ or
    pipeline/ (DESIGN.md). Images are lists of HWC uint8 RGB arrays.

    load_clip(spec)       -> score(images, captions) -> float array, one CLIP score per image
    load_features(spec)   -> features(images) -> [N, D] array
    fid(a, b)             -> float, between two feature arrays
    kid(a, b, subset_size, subsets, seed) -> (mean, std)"""

    load_clip: Callable[[str], Callable[[list, list], np.ndarray]]
    load_features: Callable[[str], Callable[[list], np.ndarray]]
    fid: Callable[[np.ndarray, np.ndarray], float]
    kid: Callable[..., tuple[float, float]]


# --------------------------------------------------------------------------------------------
# The output directory


def _read_eval_index(root: Path) -> dict | None:
    try:
        info = json.loads((root / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") == EVAL_FORMAT else None


def _eval_files(root: Path, info: dict) -> list[Path]:
    """kiln's files in an eval directory, by exact name: the listed report and plots, every file of
    the listed sample directories (their own samples.parquet says which), eval.json."""
    from train.sample import _read_index

    out = [root / f for f in info.get("files", []) if isinstance(f, str) and _KILN_FILE.fullmatch(f)]
    for d in info.get("sample_dirs", []):
        if isinstance(d, str) and _KILN_SAMPLES.fullmatch(d):
            found = _read_index(root / d)
            if found is not None:
                out += found.kiln_files()
    return [p for p in out if p.is_file()] + [root / EVAL_FILE]


def check_eval_dir(out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """As train.sample.check_sample_dir, for `kiln eval --out-dir`: a new or empty directory, an
    interrupted eval (redone), or a complete earlier one with --overwrite. Returns its files."""
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out-dir {root} is a file: give a directory")
    parent = next((p for p in root.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"--out-dir {root}: {parent} is a file, not a directory; give a path in a directory")
    if not root.exists() or not any(root.iterdir()):
        return []
    info = _read_eval_index(root)
    if info is None:
        raise UserError(f"--out-dir {root} is not empty and was not written by `kiln eval` (no {EVAL_FILE} of "
                        "kiln's): give a new or empty directory; kiln never writes over files it did not write")
    if info.get("complete") and not overwrite:
        raise UserError(f"--out-dir {root} holds an earlier `kiln eval` output: pass --overwrite to replace it "
                        f"(only the files its {EVAL_FILE} lists are deleted), or give another directory")
    return _eval_files(root, info)


def _clear(root: Path, files: Sequence[Path]) -> None:
    for f in files:
        f.unlink(missing_ok=True)
    for d in sorted({f.parent for f in files}, key=lambda p: len(p.parts), reverse=True):
        while d != root and d.is_dir() and root in d.parents and not any(d.iterdir()):
            d.rmdir()
            d = d.parent


def _write_json(path: Path, obj: dict) -> None:
    text = json.dumps(_finite(obj), indent=1, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _finite(obj):
    """NaN / inf -> null: eval.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# kiln eval


def _w(value: float) -> str:
    return f"{value:g}"


def _check_flags(args: argparse.Namespace, metrics: MetricHooks | None) -> None:
    """Every flag combination checked before any work (one line each, exit 2)."""
    if args.suite is not None and args.suite not in SUITES:
        raise ConfigError(f"unknown suite {args.suite!r}: the built-in suite is `synthetic`; for DrawBench or "
                          "PartiPrompts give --prompt-file FILE (your copy of their CSV / TSV)")
    if args.suite and args.prompt_file:
        raise ConfigError("--suite and --prompt-file are two sources of prompts: give one")
    if args.suite_n < 1:
        raise ConfigError(f"--suite-n must be >= 1, got {args.suite_n}")
    if args.write_prompts:
        if not (args.suite or args.prompt_file):
            raise ConfigError("--write-prompts writes the prompts of --suite synthetic or --prompt-file FILE: give one")
        return
    generating = args.base is not None
    if generating and args.samples:
        raise ConfigError("give SAMPLE_DIRs to score, or --base CKPT to sample first, not both")
    if not generating and not args.samples and not _sr_only(args):
        raise ConfigError("nothing to score: give SAMPLE_DIRs written by `kiln sample --out-dir`, --base CKPT "
                          "--prompts PROMPTS.parquet to sample first, or --sr256 CKPT --data DATASET to score an SR "
                          "stage on held-out images")
    if not args.out_dir:
        raise ConfigError("--out-dir DIR is required: where eval.json, report.html and plots/ go")
    if args.lowres_noise and not ((args.sr256 or args.sr1024) and args.data and args.sr_n > 0):
        raise ConfigError("--lowres-noise perturbs the held-out low-res inputs SR stages are scored on: it goes with "
                          "--sr256 and/or --sr1024, --data DATASET and --sr-n >= 1")
    if _sr_only(args) or (generating and (args.sr256 or args.sr1024)):
        _check_sr_flags(args)
    if not generating and not _sr_only(args):
        given = [f for f, v in (("--prompts", args.prompts), ("--guidance", args.guidance), ("--sr256", args.sr256),
                                ("--sr1024", args.sr1024), ("--steps", args.steps), ("--aug-level", args.aug_level))
                 if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} set how to sample: they go with --base CKPT, not with SAMPLE_DIRs")
    elif generating:
        if args.sr1024 and not args.sr256:
            raise ConfigError("--sr1024 needs --sr256 (the cascade is base -> sr256 -> sr1024)")
        if not args.prompts:
            if args.suite == "synthetic":
                raise ConfigError("--suite synthetic with --base needs the suite's prompts embedded with the run's T5 "
                                  "(the sampler never runs a text encoder): `kiln eval --suite synthetic --data DATASET "
                                  "--write-prompts suite.txt` prints the `kiln embed-prompts` command; then add "
                                  "--prompts suite.parquet")
            raise ConfigError("--base needs --prompts PROMPTS.parquet, made by `kiln embed-prompts` (the sampler never "
                              "runs a text encoder; `--write-prompts` turns a --prompt-file into its input)")
        if args.per_prompt < 1 or args.batch_size < 1:
            raise ConfigError(f"--per-prompt and --batch-size must be >= 1, got {args.per_prompt} and {args.batch_size}")
        if any(n < 1 for n in args.steps or []):
            raise ConfigError(f"--steps must be >= 1 per stage, got {' '.join(map(str, args.steps))}")
        for flag, values in (("--guidance", args.guidance), ("--aug-level", args.aug_level)):
            if any(not math.isfinite(v) or v < 0 for v in values or []):
                raise ConfigError(f"{flag} takes finite numbers >= 0, got {' '.join(map(str, values))}")
        if args.guidance is not None and not args.guidance:
            raise ConfigError("--guidance takes comma-separated weights, e.g. 1,3,5,8")
        sampled = ("base", "sr256", "sr1024")[: 1 + bool(args.sr256) + bool(args.sr1024)]
        if args.stage and args.stage not in sampled:
            raise ConfigError(f"--stage {args.stage}: the cascade given samples {', '.join(sampled)} only")
    if args.fid and not args.features:
        raise ConfigError("--fid needs --features SPEC (inception:PATH, clip:SPEC or torchscript:PATH): the feature "
                          "space FID and KID are computed in")
    if args.features and not args.data:
        raise ConfigError("FID and KID need --data DATASET_DIR: the held-out shard images the samples are compared with")
    if args.holdout_fraction is not None and not 0 <= args.holdout_fraction < 1:
        raise ConfigError(f"--holdout-fraction must be in [0, 1), got {args.holdout_fraction}")
    for flag, value, low in (("--reference-n", args.reference_n, 2), ("--kid-subset-size", args.kid_subset_size, 2),
                             ("--kid-subsets", args.kid_subsets, 1)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if (args.clip or args.features) and metrics is None:
        raise ConfigError("--clip and --features need kiln's metrics module: run them through the `kiln eval` command")


def _sr_only(args) -> bool:
    """`kiln eval --sr256 CKPT [--sr1024 CKPT] --data DATASET`: SR stages scored on held-out images."""
    return args.base is None and not args.samples and bool(args.sr256 or args.sr1024)


def _check_sr_flags(args) -> None:
    if args.sr_n < 0 or (_sr_only(args) and args.sr_n < 1):
        low = "0 (0 skips SR scoring)" if args.base else "1"
        raise ConfigError(f"--sr-n must be >= {low}, got {args.sr_n}")
    if any(not (math.isfinite(v) and 0 <= v <= 1) for v in args.aug_level or []):
        raise ConfigError(f"--aug-level takes levels in [0, 1], got {' '.join(map(str, args.aug_level))}")
    if not (math.isfinite(args.lowres_noise) and 0 <= args.lowres_noise <= 2):
        raise ConfigError(f"--lowres-noise is a noise std in [0, 2] ([-1, 1] pixel units), got {args.lowres_noise}")
    if not _sr_only(args):
        return
    if not args.data:
        raise ConfigError("scoring an SR stage needs --data DATASET_DIR: its held-out shard images are the true "
                          "high-res pictures the stage's output is compared with")
    given = [f for f, v in (("--prompts", args.prompts), ("--guidance", args.guidance), ("--suite", args.suite),
                            ("--prompt-file", args.prompt_file), ("--clip", args.clip), ("--features", args.features),
                            ("--fid", args.fid or None), ("--stage", args.stage)) if v is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} score samples drawn from prompts: add --base CKPT to sample the cascade "
                          "(without it, --sr256 / --sr1024 are scored on held-out images of --data only)")
    if args.batch_size < 1 or any(n < 1 for n in args.steps or []):
        raise ConfigError(f"--batch-size and --steps must be >= 1, got {args.batch_size} and {args.steps}")


def _t5_hint(data: str | None) -> str:
    """`--t5-model SPEC [--t5-max-length N]` of the dataset's stats.json, or a placeholder."""
    if data:
        try:
            t5 = json.loads((Path(data) / "stats.json").read_text())["models"]["t5"]
            hint = f"--t5-model {t5['spec']}"
            return hint + (f" --t5-max-length {t5['max_length']}" if t5.get("max_length") else "")
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return "--t5-model SPEC  # the T5 the training shards were embedded with (their stats.json: models.t5)"


def _held_out(args) -> tuple[set | None, dict]:
    """(combinations to exclude or None, the eval.json note) of the synthetic suite's held-out rule."""
    if not args.data:
        note = ("held-out NOT checked (no --data): the suite's combinations may occur in the training captions; "
                "give --data DATASET_DIR to keep only unseen ones")
        return None, {"data": None, "checked": False, "note": note}
    keys, read, grammar = training_combinations(args.data)
    note = (f"held-out: combinations (background + each shape's colour, kind, position) that none of the {read} "
            f"captions of {args.data} has ({grammar} in the web's grammar, {len(keys)} distinct)")
    return keys, {"data": str(args.data), "checked": True, "captions": read, "grammar_captions": grammar,
                  "training_combinations": len(keys), "note": note}


def _write_prompts(args) -> int:
    out = Path(args.write_prompts)
    if out.is_dir():
        raise UserError(f"--write-prompts {out} is a directory: give a file name, e.g. {out / 'prompts.txt'}")
    if args.suite:
        exclude, held = _held_out(args)
        scenes = synthetic_suite(args.suite_n, args.seed, exclude or frozenset())
        texts = [describe(s) for s in scenes]
        what = f"{len(texts)} synthetic-suite prompts ({held['note']})"
        if len(texts) < 3 * args.suite_n:
            what += f"; only {len(texts)} of {3 * args.suite_n} held-out combinations were found"
    else:
        prompts, kind = read_prompt_file(args.prompt_file)
        texts = list(dict.fromkeys(p.text for p in prompts))
        what = f"{len(texts)} distinct prompts of {args.prompt_file} ({kind})"
    atomic_write(out, lambda tmp: tmp.write_text("".join(t + "\n" for t in texts), encoding="utf-8"))
    target = out.with_suffix(".parquet")
    print(f"kiln eval: wrote {what} to {out}\nembed them with the run's T5 (the sampler never runs a text encoder):\n"
          f"  kiln embed-prompts {out} -o {target} {_t5_hint(args.data)}\n"
          f"then: kiln eval --base CKPT --prompts {target} "
          f"{'--suite synthetic' if args.suite else f'--prompt-file {args.prompt_file}'} --out-dir DIR ...")
    return 0


@dataclass
class _Run:
    """One sample directory being scored (one guidance weight of a sweep)."""

    directory: Path
    guidance: float
    stage: str
    rows: list[dict]  # the scored stage's rows (possibly without excluded prompts)
    info: dict
    result: dict


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _reference_images(args, resolution: int, holdout_fraction: float) -> tuple[list[np.ndarray], dict]:
    from train.data import ImageSpec, SkipCounts, load_records

    split = "holdout" if holdout_fraction > 0 else "all"
    counts = SkipCounts()
    spec = ImageSpec(resolution=resolution, text_max_len=1, min_stored_size=resolution)
    records = load_records(args.data, spec, split=split, holdout_fraction=holdout_fraction, limit=args.reference_n,
                           counts=counts)
    if len(records) < 2:
        raise DatasetError(f"--data {args.data}: {len(records)} {split} images of at least {resolution} px to compare "
                           f"with (holdout_fraction {holdout_fraction}; skipped: {counts.skipped()}); FID and KID need "
                           "more: train with --holdout-fraction, or give --holdout-fraction")
    note = (f"{len(records)} held-out images of {args.data} (holdout_fraction {holdout_fraction})" if split == "holdout"
            else f"{len(records)} images of {args.data}: the checkpoint held nothing out, so these include training "
                 "images (train with --holdout-fraction for a fair FID)")
    images = [r.image.permute(1, 2, 0).numpy() for r in records]
    return images, {"data": str(args.data), "split": split, "holdout_fraction": holdout_fraction, "n": len(images),
                    "resolution": resolution, "note": note}


def _score_run(run: _Run, out: Path, args, suite: bool, clip, features, reference, metrics: MetricHooks | None) -> None:
    images = [_load_png(run.directory / r["path"]) for r in run.rows]
    prompts = [r["prompt"] for r in run.rows]
    where = run.directory.relative_to(out) if out in run.directory.parents else run.directory
    result: dict = {"guidance": run.guidance, "samples": str(where), "stage": run.stage, "images": len(images),
                    "prompts": len({r["prompt_index"] for r in run.rows}),
                    "threshold": _stage_setting(run.info, run.stage, "threshold"),
                    "saturation": saturation(images)}
    if suite:
        scenes = [parse_caption(p) for p in prompts]
        result["synthetic"] = score_synthetic(images, scenes, [r["prompt_index"] for r in run.rows], seed=args.seed)
    if clip is not None:
        scores = np.asarray(clip(images, prompts), dtype=np.float64).reshape(-1)
        if len(scores) != len(images):
            raise RuntimeError(f"the CLIP scorer gave {len(scores)} scores for {len(images)} images")
        by_cat: dict[str, list[float]] = {}
        for r, s in zip(run.rows, scores):
            by_cat.setdefault(r["category"] or "all", []).append(float(s))
        result["clip_score"] = {**_mean_ci(scores), "categories": {c: _mean_ci(np.array(v)) for c, v in by_cat.items()},
                                "per_image": [float(s) for s in scores]}
    if features is not None:
        feats = np.asarray(features(images), dtype=np.float64)
        ref = reference["features"]
        subset = min(args.kid_subset_size, len(feats), len(ref))
        kid_mean, kid_std = metrics.kid(feats, ref, subset_size=subset, subsets=args.kid_subsets, seed=args.seed)
        try:
            result["fid"] = float(metrics.fid(feats, ref))
        except ValueError as err:  # e.g. far fewer images than feature dimensions: no usable square root
            result["fid"], result["fid_error"] = float("nan"), one_line(err)
        result["kid"] = {"mean": float(kid_mean), "std": float(kid_std), "subset_size": subset, "subsets": args.kid_subsets}
        if len(feats) < feats.shape[1]:
            result["fid_note"] = (f"{len(feats)} images for {feats.shape[1]}-d features: FID is biased upward at this "
                                  "size (papers report FID-10K or -30K); compare runs of equal size only")
    run.result = result


def saturation(images) -> dict:
    """How much of the images is clipped: the share of channel values at 0 or 255 (the 8-bit PNG's
    limits), over all images and per image (mean with a 95% t interval). Imagen's static thresholding
    at high guidance saturates; dynamic thresholding should keep this near the data's own share."""
    per = np.array([float(np.mean((a == 0) | (a == 255))) for a in (np.asarray(i) for i in images)], dtype=np.float64)
    m = _mean_ci(per)
    return {"fraction": m["mean"], "ci95": m["ci95"], "images": m["n"]}


def _stage_setting(info: dict, stage: str, key: str):
    for st in info.get("stages", []):
        if st.get("stage") == stage:
            return st.get(key)
    return None


def _summary_line(result: dict) -> str:
    parts = [f"w={_w(result['guidance'])}: {result['images']} images"]
    syn = result.get("synthetic")
    if syn:
        parts += [f"{c} {v['accuracy']:.0%} [{v['ci95'][0]:.0%}, {v['ci95'][1]:.0%}] (chance {v['chance']:.0%})"
                  for c, v in syn["categories"].items()]
    if "saturation" in result:
        parts.append(f"saturated {result['saturation']['fraction']:.2%} ({result.get('threshold') or '?'} threshold)")
    if "clip_score" in result:
        parts.append(f"CLIP score {result['clip_score']['mean']:.4g}")
    if "fid" in result:
        parts.append(f"FID {result['fid']:.4g}, KID {result['kid']['mean']:.4g} ± {result['kid']['std']:.2g}")
    return "; ".join(parts)


def main_eval(args: argparse.Namespace, metrics: MetricHooks | None = None) -> int:
    """`kiln eval` (train.args.add_eval_args). Bad input raises a UserError before any work (one
    line, exit 2); `metrics` (pipeline.evaluation) is needed for --clip and --features."""
    _check_flags(args, metrics)
    if args.write_prompts:
        return _write_prompts(args)
    out = Path(args.out_dir)
    replace = check_eval_dir(out, args.overwrite)
    if _sr_only(args):
        return _main_sr(args, out, replace)
    suite = args.suite == "synthetic"
    prompt_file = read_prompt_file(args.prompt_file)[0] if args.prompt_file else None
    if args.data:
        from train.data import check_dataset

        check_dataset(args.data)
    from train.sample import load_prompts, read_sample_dir

    dirs = [read_sample_dir(d) for d in args.samples]
    for d in dirs:
        if args.stage and args.stage not in [s["stage"] for s in d.info["stages"]]:
            raise UserError(f"SAMPLE_DIR {d.root} has no {args.stage} images (stages: "
                            f"{', '.join(s['stage'] for s in d.info['stages'])}); give another --stage")
    embedded: dict[str, np.ndarray] = {}
    if args.base:
        texts, arrays, _ = load_prompts(args.prompts)
        embedded = dict(zip(texts, arrays))
        if prompt_file is not None:  # the prompt file says which prompts, and their categories
            missing = [p.text for p in prompt_file if p.text not in embedded]
            if missing:
                raise UserError(f"{len(missing)} of the {len(prompt_file)} prompts of {args.prompt_file} are not in "
                                f"{args.prompts} (first: {missing[0]!r}): embed the file's prompts "
                                f"(`kiln eval --prompt-file {args.prompt_file} --write-prompts PROMPTS.txt` prints how)")
            todo = [(p.text, p.category) for p in prompt_file]
        else:
            todo = [(t, None) for t in texts]
        pool, where = [t for t, _ in todo], str(args.prompts)
    else:
        pool, where = [r["prompt"] for d in dirs for r in d.rows], "a SAMPLE_DIR"
    held, excluded = None, set()
    if suite:
        bad = next((p for p in pool if parse_caption(p) is None), None)
        if bad is not None:
            raise UserError(f"--suite synthetic: {where} holds a prompt that is not a caption of the synthetic web's "
                            f"grammar ({bad!r}); write the suite's prompts with --write-prompts")
        exclude, held = _held_out(args)
        if exclude is not None:
            excluded = {p for p in pool if scene_key(parse_caption(p)) in exclude}
            if len(excluded) == len(set(pool)):
                raise UserError(f"--suite synthetic: every prompt's combination occurs in the captions of {args.data}, "
                                "so none is held out; write a held-out suite with `kiln eval --suite synthetic --data "
                                f"{args.data} --write-prompts suite.txt`")
            held["excluded_prompts"] = len(excluded)
    # Every model before anything is written or deleted: a bad spec or checkpoint stops here, in one line.
    cascade = _load_cascade(args) if args.base else None
    clip = metrics.load_clip(args.clip) if args.clip else None
    features = metrics.load_features(args.features) if args.features else None
    sr_jobs = []  # every SR stage of the cascade, scored on --data's held-out images
    if cascade is not None and args.data and args.sr_n > 0 and len(cascade[0]) > 1:
        stages, paths, _ = cascade
        sr_jobs = _sr_jobs(args, list(zip(("sr256", "sr1024"), paths[1:], stages[1:])))

    settings = {k: getattr(args, k) for k in ("samples", "base", "sr256", "sr1024", "prompts", "guidance", "per_prompt",
                                              "steps", "aug_level", "sampler", "threshold", "weights", "seed", "suite", "suite_n",
                                              "prompt_file", "data", "clip", "features", "reference_n",
                                              "kid_subset_size", "kid_subsets", "stage", "sr_n", "lowres_noise")}
    # Until the last write, eval.json lists every file this run may write (so an interrupted run is
    # cleaned up by the next) and marks the directory as kiln's.
    info: dict = {"format": EVAL_FORMAT, "complete": False, "settings": settings,
                  "files": [REPORT_FILE, *(f"{PLOTS_DIR}/{n}.png" for n in PLOT_NAMES), *(j.grid for j in sr_jobs)],
                  "sample_dirs": []}
    _clear(out, replace)
    out.mkdir(parents=True, exist_ok=True)
    if cascade is not None:
        dirs = _sample_sweep(args, cascade, out, info, [(t, embedded[t], c) for t, c in todo if t not in excluded])
    else:
        _write_json(out / EVAL_FILE, info)  # marks the directory as kiln's until the last write

    runs = []
    category = {p.text: p.category for p in prompt_file or []}
    for d in dirs:
        stage = args.stage or d.info["stages"][-1]["stage"]
        rows = [{**r, "category": category.get(r["prompt"], r["category"])}
                for r in d.stage_rows(stage) if r["prompt"] not in excluded]
        if not rows:
            raise UserError(f"{d.root}: none of its {stage} images is left to score (held-out rule: every prompt's "
                            f"combination occurs in {args.data})")
        runs.append(_Run(d.root, float(d.info["stages"][0]["guidance_weight"]), stage, rows, d.info, {}))
    runs.sort(key=lambda r: r.guidance)
    sizes = {(r["width"], r["height"]) for run in runs for r in run.rows}
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
        raise UserError(f"the SAMPLE_DIRs hold images of different sizes ({listed}): score one stage of one cascade "
                        "at a time (--stage)")

    reference = None
    if features is not None:
        frac = args.holdout_fraction
        if frac is None:
            frac = float(runs[0].info.get("holdout_fraction") or 0.0)
        ref_images, reference = _reference_images(args, runs[0].rows[0]["width"], frac)
        reference["features"] = np.asarray(features(ref_images), dtype=np.float64)
    for run in runs:
        _score_run(run, out, args, suite, clip, features, reference, metrics)
        print(f"kiln eval: {_summary_line(run.result)}", flush=True)

    sr = {}
    for job in sr_jobs:
        sr[job.name] = _score_sr(out, job, args, cascade[2])
        print(f"kiln eval: {_sr_summary(sr[job.name])}", flush=True)
    plots = _plots(out, runs)
    report = _report(out, runs, plots, held, suite, reference, sr)
    info.update({
        "complete": True,
        "stage": runs[0].stage,
        "suite": args.suite,
        "prompt_file": str(args.prompt_file) if args.prompt_file else None,
        "held_out": held,
        "clip": {"spec": args.clip} if args.clip else None,
        "features": {"spec": args.features} if args.features else None,
        "reference": {k: v for k, v in reference.items() if k != "features"} if reference else None,
        "runs": [r.result for r in runs],
        "sr": sr or None,
        "plots": plots,
        "report": REPORT_FILE,
        "files": [REPORT_FILE, *plots.values(), *(j.grid for j in sr_jobs)],
    })
    _write_json(out / EVAL_FILE, info)
    if held:
        print(f"kiln eval: {held['note']}")
    print(f"kiln eval: wrote {out / EVAL_FILE}, {out / report}" + "".join(f", {out / p}" for p in plots.values())
          + "".join(f", {out / j.grid}" for j in sr_jobs))
    return 0


def _load_cascade(args) -> tuple[list, list, str]:
    """(stages, checkpoint paths, device) of --base / --sr256 / --sr1024 (train.sample.load_cascade)."""
    import torch

    from train.args import per_stage
    from train.device import check_device
    from train.sample import load_cascade

    paths = [p for p in (args.base, args.sr256, args.sr1024) if p]
    try:
        steps = per_stage(args.steps, len(paths), "steps")
        aug = per_stage(args.aug_level, len(paths) - 1, "aug-level") if len(paths) > 1 else []
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_device(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    stages = load_cascade(paths, device=device, weights=args.weights, steps=steps, aug_level=aug, sampler=args.sampler,
                          threshold=args.threshold)
    return stages, paths, device


def _sample_sweep(args, cascade, out: Path, info: dict, chosen: list[tuple[str, np.ndarray, str | None]]) -> list:
    """Sample the cascade once per guidance weight into out/samples/w<W>/ (train.sample.write_samples,
    as `kiln sample --out-dir` does); returns the directories read back."""
    from train.sample import read_sample_dir, write_samples

    stages, paths, device = cascade
    weights = list(dict.fromkeys(args.guidance or [float(stages[0].setting("guidance_weight"))]))
    info["sample_dirs"] = [f"{SAMPLES_DIR}/w{_w(w)}" for w in weights]
    _write_json(out / EVAL_FILE, info)  # marks the directory as kiln's while it samples
    for w, rel in zip(weights, info["sample_dirs"]):
        stages[0].guidance_weight = float(w)  # Imagen sweeps the base (64 px) model's guidance
        print(f"kiln eval: sampling {len(chosen)} prompts x {args.per_prompt} at w={_w(w)} into {out / rel}", flush=True)
        write_samples(stages, paths, [c[0] for c in chosen], [c[1] for c in chosen], out / rel,
                      categories=[c[2] for c in chosen], per_prompt=args.per_prompt, seed=args.seed, device=device,
                      batch_size=args.batch_size, source=str(args.prompts), weights=args.weights)
    return [read_sample_dir(out / rel) for rel in info["sample_dirs"]]


# --------------------------------------------------------------------------------------------
# SR stages against the true image (held-out shard images: the only place one exists)


@dataclass
class SRPairs:
    """Held-out shard images for one SR stage: the true image at the size the stage outputs and
    its low-res twin, both made by the stage's own preprocessing (train.data.make_example: shorter
    side resized and centre-cropped to data.resolution, then -- for a random-crop stage -- the
    centre data.crop_size window; the low-res input area-downsampled from exactly those pixels)."""

    truth: torch.Tensor  # [N, 3, S, S] in [-1, 1]
    lowres: torch.Tensor  # [N, 3, L, L] in [-1, 1]
    arrays: list  # the samples' T5 arrays from the shards (float16 [t5_len, d_model])
    keys: list[str]
    captions: list[str]
    info: dict  # data, split, holdout_fraction, n, scored_size, lowres_size, crop, note


def sr_pairs(cfg, data_dir: str | Path, n: int, holdout_fraction: float) -> SRPairs:
    """The first `n` samples of `data_dir`'s held-out split (in shard order, as `kiln sample
    --from-shards` picks them) that the stage of `cfg` would train on (stored side >= its
    min_stored_size: the truth is never an upscaled picture). With holdout_fraction 0 nothing was
    held out: every split is read and the note says so. A dataset the stage cannot read (T5 of
    another width) or without such samples is a DatasetError (one line)."""
    import torch

    from train.data import ImageSpec, Record, SkipCounts, check_dataset, load_records, make_example

    spec = ImageSpec.from_config(cfg)
    check_dataset(data_dir, spec)
    split = "holdout" if holdout_fraction > 0 else "all"
    counts = SkipCounts()
    records = load_records(data_dir, spec, split=split, holdout_fraction=holdout_fraction, limit=n, counts=counts)
    if not records:
        raise DatasetError(f"--data {data_dir}: no {split} images of at least {spec.min_stored_size} px for the "
                           f"{cfg.name} stage (holdout_fraction {holdout_fraction}; skipped: {counts.skipped()}): give "
                           "the dataset the stage was trained on (or --holdout-fraction)")
    crop = None
    if spec.random_crop:  # a deterministic window in place of training's random one: the centre
        c, r = spec.crop_size, spec.resolution
        at = (r - c) // 2
        records = [Record(x.key, x.image[:, at : at + c, at : at + c], x.text, x.caption, x.meta) for x in records]
        crop = {"size": c, "of": r, "top": at, "left": at}
        spec = ImageSpec(resolution=c, lowres_resolution=spec.lowres_size, text_max_len=spec.text_max_len)
    examples = [make_example(x, spec) for x in records]
    truth = torch.stack([e["image"] for e in examples])
    lowres = torch.stack([e["lowres"] for e in examples])
    note = (f"the first {len(records)} held-out images of {data_dir} (holdout_fraction {holdout_fraction})"
            if split == "holdout" else
            f"the first {len(records)} images of {data_dir}: the checkpoint held nothing out, so these include "
            "training images (train with --holdout-fraction for a fair score)")
    if crop:
        note += f"; the centre {crop['size']} px window of each {crop['of']} px image (the stage trains on crops)"
    info = {"data": str(data_dir), "split": split, "holdout_fraction": holdout_fraction, "n": len(records),
            "scored_size": int(truth.shape[-1]), "lowres_size": int(lowres.shape[-1]), "crop": crop, "note": note,
            "skipped": counts.skipped()}
    return SRPairs(truth, lowres, [x.text for x in records], [x.key for x in records], [x.caption for x in records],
                   info)


def t_interval(values) -> dict:
    """{"mean", "ci95", "n", "interval": "t"}: the mean and its two-sided 95% Student-t interval
    (n - 1 degrees of freedom; tens of samples, so t rather than the normal z). n < 2: no interval."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    mean = float(v.mean()) if n else float("nan")
    half = float(stats.t.ppf(0.975, n - 1)) * float(v.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n, "interval": "t"}


SR_SCORES = ("psnr_sr", "psnr_bicubic", "psnr_gain", "consistency", "consistency_bicubic")


def perturb_lowres(lowres: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """`kiln eval --lowres-noise SIGMA`: the low-res inputs plus Gaussian noise of std `sigma` in
    [-1, 1] pixel units, clipped to [-1, 1] (a stand-in for the errors of the stage below, which an
    SR stage sees in a cascade and never in the shards), drawn from `seed` so every stage and run
    scored with the same seed sees the same noise. sigma 0 returns the inputs unchanged."""
    import torch

    if not sigma:
        return lowres
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(lowres.shape, generator=g, dtype=torch.float32)
    return (lowres.float() + float(sigma) * noise).clamp(-1, 1).to(lowres.dtype)


def sr_scores(sr: torch.Tensor, truth: torch.Tensor, lowres: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Per-image scores in dB (train.evaluate.psnr, [-1, 1] pixels, data range 2) of SR outputs
    against the true images, and the bicubic baseline (low-res upsampled bicubically, clipped to
    [-1, 1]; returned too):

        psnr_sr              SR output vs truth
        psnr_bicubic         bicubic vs truth
        psnr_gain            psnr_sr - psnr_bicubic, per image (paired)
        consistency          SR output area-downsampled to the low-res size (as training makes
                             the low-res input) vs the low-res input: does it keep what it was given
        consistency_bicubic  the same for bicubic (its round trip is not exact either)"""
    import torch.nn.functional as F

    from train.diffusion import upsample_lowres
    from train.evaluate import psnr

    if truth.shape != sr.shape or len(lowres) != len(sr):
        raise ValueError(f"SR {tuple(sr.shape)}, truth {tuple(truth.shape)}, low-res {tuple(lowres.shape)}")
    bicubic = upsample_lowres(lowres.float(), truth.shape[-1], "bicubic").clamp(-1, 1)

    def down(x: torch.Tensor) -> torch.Tensor:  # as train.data.make_example makes the low-res input
        return F.interpolate(x.float(), size=tuple(lowres.shape[-2:]), mode="area")

    p_sr, p_bic = psnr(sr, truth), psnr(bicubic, truth)
    scores = {"psnr_sr": p_sr, "psnr_bicubic": p_bic, "psnr_gain": p_sr - p_bic,
              "consistency": psnr(down(sr), lowres), "consistency_bicubic": psnr(down(bicubic), lowres)}
    return {k: v.double().numpy() for k, v in scores.items()}, bicubic


@dataclass
class _SRJob:
    """One SR stage to score: its slot (sr256 / sr1024), checkpoint, loaded Stage, data, aug level."""

    name: str
    checkpoint: str
    stage: object  # train.sample.Stage
    pairs: SRPairs
    aug_level: float

    @property
    def grid(self) -> str:
        return f"{SR_DIR}/{self.name}.png"


def _sr_jobs(args, named: list[tuple[str, str, object]]) -> list[_SRJob]:
    """The SR stages of `named` [(slot, checkpoint, Stage)] with their held-out pairs, read before
    anything is written (a dataset the stage cannot read stops here). aug level: --aug-level, else 0
    (a true low-res image is clean; the stage's sampling default is for the base's outputs)."""
    from train.args import per_stage
    from train.sample import _checkpoint_holdout

    try:
        aug = per_stage(args.aug_level, len(named), "aug-level")
    except ValueError as err:
        raise ConfigError(str(err)) from err
    jobs = []
    for (name, path, stage), a in zip(named, aug):
        frac = args.holdout_fraction if args.holdout_fraction is not None else _checkpoint_holdout(path)
        pairs = sr_pairs(stage.cfg, args.data, args.sr_n, frac)
        jobs.append(_SRJob(name, str(path), stage, pairs, float(a) if a is not None else 0.0))
    return jobs


def _score_sr(out: Path, job: _SRJob, args, device) -> dict:
    """Run one SR stage on its held-out low-res images; its eval.json entry, and sr/<slot>.png."""
    from train.grid import save_grid
    from train.sample import upscale

    st, pairs = job.stage, job.pairs
    lowres = perturb_lowres(pairs.lowres, args.lowres_noise, args.seed)
    sr = upscale(st, lowres, pairs.arrays, seed=args.seed, device=device, batch_size=args.batch_size,
                 aug_level=job.aug_level)
    per, bicubic = sr_scores(sr, pairs.truth, lowres)
    k = min(SR_GRID_SAMPLES, len(sr))
    captions = [f"SR {per['psnr_sr'][i]:.1f} dB, bicubic {per['psnr_bicubic'][i]:.1f} dB; {pairs.captions[i]}"
                for i in range(k)]
    size, low = pairs.info["scored_size"], pairs.info["lowres_size"]
    noisy = f" + noise {args.lowres_noise:g}" if args.lowres_noise else ""
    save_grid(None, captions, out / job.grid, rows=[lowres[:k], bicubic[:k], sr[:k], pairs.truth[:k]],
              row_labels=[f"low-res {low}px{noisy}", f"bicubic {size}px", f"SR {size}px", f"truth {size}px"])
    d = st.cfg.data
    return {
        "stage": job.name, "checkpoint": job.checkpoint, "checkpoint_step": st.step, "config": st.cfg.name,
        "resolution": d.resolution, "lowres_resolution": d.lowres_resolution,
        **pairs.info,
        "settings": {"steps": int(st.setting("steps")), "sampler": st.setting("sampler"),
                     "guidance_weight": float(st.setting("guidance_weight")), "threshold": st.setting("threshold"),
                     "aug_level": job.aug_level, "lowres_noise": args.lowres_noise, "seed": args.seed,
                     "batch_size": args.batch_size,
                     "weights": args.weights},
        **{name: t_interval(per[name]) for name in SR_SCORES},
        "per_sample": [{"key": key, "caption": cap, **{name: float(per[name][i]) for name in SR_SCORES}}
                       for i, (key, cap) in enumerate(zip(pairs.keys, pairs.captions))],
        "grid": job.grid,
    }


def _sr_summary(r: dict) -> str:
    def f(name: str, sign: str = "") -> str:
        v = r[name]
        return f"{v['mean']:{sign}.2f} dB [{v['ci95'][0]:{sign}.2f}, {v['ci95'][1]:{sign}.2f}]"

    where = f", centre {r['crop']['size']} px crops" if r["crop"] else ""
    sigma = r["settings"].get("lowres_noise")
    where += f", low-res + noise std {sigma:g}" if sigma else ""
    where += f", aug level {r['settings']['aug_level']:g}" if r["settings"].get("aug_level") else ""
    return (f"{r['stage']} ({r['config']}, {r['lowres_size']} -> {r['scored_size']} px{where}, {r['n']} "
            f"{'held-out ' if r['split'] == 'holdout' else ''}images): SR {f('psnr_sr')}, bicubic {f('psnr_bicubic')}, "
            f"SR - bicubic {f('psnr_gain', '+')}; consistency {f('consistency')} (bicubic "
            f"{r['consistency_bicubic']['mean']:.2f} dB); 95% t intervals")


def _main_sr(args, out: Path, replace: list[Path]) -> int:
    """`kiln eval --sr256 CKPT [--sr1024 CKPT] --data DATASET`: SR stages only, no prompts."""
    import torch

    from train.args import per_stage
    from train.device import check_device
    from train.sample import Stage

    check_device(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    slots = [(n, p) for n, p in (("sr256", args.sr256), ("sr1024", args.sr1024)) if p]
    try:
        steps = per_stage(args.steps, len(slots), "steps")
    except ValueError as err:
        raise ConfigError(str(err)) from err
    named = []
    for (name, path), n in zip(slots, steps):
        stage = Stage.load(path, device=device, weights=args.weights, steps=n, sampler=args.sampler)
        if stage.cfg.stage != "sr":
            raise ConfigError(f"the {name} checkpoint {path} holds a {stage.cfg.stage} stage ({stage.cfg.name}); "
                              f"{name} needs a super-resolution stage")
        named.append((name, path, stage))
    jobs = _sr_jobs(args, named)
    settings = {k: getattr(args, k) for k in ("sr256", "sr1024", "data", "sr_n", "lowres_noise", "holdout_fraction",
                                              "steps", "aug_level", "sampler", "weights", "seed", "batch_size")}
    info: dict = {"format": EVAL_FORMAT, "complete": False, "settings": settings,
                  "files": [REPORT_FILE, *(j.grid for j in jobs)], "sample_dirs": []}
    _clear(out, replace)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / EVAL_FILE, info)  # marks the directory as kiln's until the last write
    sr = {}
    for job in jobs:
        sr[job.name] = _score_sr(out, job, args, device)
        print(f"kiln eval: {_sr_summary(sr[job.name])}", flush=True)
    report = _report(out, [], {}, None, False, None, sr)
    info.update({"complete": True, "stage": None, "runs": [], "sr": sr, "plots": {}, "report": report,
                 "files": [REPORT_FILE, *(j.grid for j in jobs)]})
    _write_json(out / EVAL_FILE, info)
    print(f"kiln eval: wrote {out / EVAL_FILE}, {out / report}" + "".join(f", {out / j.grid}" for j in jobs))
    return 0


# --------------------------------------------------------------------------------------------
# Plots and the report


def _plots(out: Path, runs: list[_Run]) -> dict[str, str]:
    """plots/fid_vs_clip.png (with CLIP score and FID) and plots/accuracy_vs_guidance.png (with the
    synthetic suite); {name: path relative to out}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {}
    res = [r.result for r in runs]
    if all("fid" in r and "clip_score" in r for r in res):
        fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
        x, y = [r["clip_score"]["mean"] for r in res], [r["fid"] for r in res]
        ax.plot(x, y, "o-", color="tab:blue")
        for xi, yi, r in zip(x, y, res):
            ax.annotate(f"w={_w(r['guidance'])}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("CLIP score (higher: follows the prompt)")
        ax.set_ylabel("FID (lower: closer to held-out images)")
        ax.set_title("Guidance trade-off (Imagen Fig. 4)", fontsize=10)
        made["fid_vs_clip"] = _save(fig, out, "fid_vs_clip")
    if all("synthetic" in r for r in res) and res:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ws = np.array([r["guidance"] for r in res])
        spread = 0.012 * max(float(np.ptp(ws)), 1.0)  # categories side by side, so the intervals do not overlap
        for i, cat in enumerate(CATEGORIES):
            vals = [r["synthetic"]["categories"].get(cat) for r in res]
            if not all(vals):
                continue
            colour = f"C{i}"
            acc = np.array([v["accuracy"] for v in vals])
            lo = np.clip(acc - np.array([v["ci95"][0] for v in vals]), 0, None)  # rounding: never below 0
            hi = np.clip(np.array([v["ci95"][1] for v in vals]) - acc, 0, None)
            x = ws + (i - (len(CATEGORIES) - 1) / 2) * spread
            ax.errorbar(x, acc, yerr=[lo, hi], fmt="o-", color=colour, capsize=3, label=cat)
            ax.plot(x, [v["chance"] for v in vals], ":", color=colour, linewidth=1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("guidance weight w (base stage)")
        ax.set_ylabel("accuracy (95% Wilson interval); dotted: chance")
        ax.set_title("Synthetic suite, held-out prompts", fontsize=10)
        ax.legend(fontsize=8, loc="best")
        made["accuracy_vs_guidance"] = _save(fig, out, "accuracy_vs_guidance")
    return made


def _save(fig, out: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    rel = f"{PLOTS_DIR}/{name}.png"
    fig.tight_layout()
    atomic_write(out / rel, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return rel


def _sr_report(sr: dict) -> str:
    """The SR section of report.html: a table of every stage's scores, then its example grid."""
    e = html.escape

    def cell(v: dict, sign: str = "") -> str:
        return f"{v['mean']:{sign}.2f}<br>[{v['ci95'][0]:{sign}.2f}, {v['ci95'][1]:{sign}.2f}]"

    head = ["stage", "config", "px", "images", "SR vs truth", "bicubic vs truth", "SR − bicubic", "consistency",
            "bicubic consistency"]
    parts = ["<h2>Super-resolution stages against the true image</h2><p class='note'>PSNR in dB on [-1, 1] pixels, "
             "mean and 95% Student-t interval over the images (SR − bicubic: of the per-image differences). "
             "Consistency: the output area-downsampled to the low-res size against the low-res input.</p>"
             "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in sr.values():
        size = f"{r['lowres_size']} → {r['scored_size']}"
        size += f"<br>(centre crop of {r['crop']['of']})" if r["crop"] else ""
        cells = [e(r["stage"]), e(r["config"]), size, str(r["n"]), cell(r["psnr_sr"]), cell(r["psnr_bicubic"]),
                 cell(r["psnr_gain"], "+"), cell(r["consistency"]), cell(r["consistency_bicubic"])]
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    for r in sr.values():
        parts.append(f"<h3>{e(r['stage'])}: low-res | bicubic | SR | truth</h3><p class='note'>{e(r['note'])}</p>"
                     f"<img class='plot' src='{e(r['grid'])}' alt='{e(r['stage'])} examples'>")
    return "".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;width:132px}
figure img{width:128px;height:128px;image-rendering:pixelated;border:2px solid #ccc}
figure.ok img{border-color:#2a2}figure.no img{border-color:#c22}figcaption{font-size:11px;line-height:1.2}
.note{color:#555;font-size:13px}img.plot{max-width:100%;margin-right:1em}"""


def _fmt(v, pct=True) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.0%}" if pct else f"{v:.4g}"


def _report(out: Path, runs: list[_Run], plots: dict, held: dict | None, suite: bool, reference: dict | None,
            sr: dict | None = None) -> str:
    """report.html: self-contained (inline CSS, no scripts), images linked relative to it."""
    e = html.escape
    res = [r.result for r in runs]
    what = [f"{len(runs)} run(s), stage {e(runs[0].stage)}"] if runs else []
    what += [f"SR stage(s) {e(', '.join(sr))} on held-out images"] if sr else []
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>kiln eval</title><style>{_CSS}</style></head>"
             f"<body><h1>kiln eval</h1><p class='note'>{'; '.join(what)}; "
             f"numbers are explained in kiln's docs/eval.md.</p>"]
    if sr:
        parts.append(_sr_report(sr))
    if not runs:
        parts.append("</body></html>\n")
        text = "".join(parts)
        atomic_write(out / REPORT_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return REPORT_FILE
    if held:
        parts.append(f"<p class='note'>{e(held['note'])}</p>")
    if reference:
        parts.append(f"<p class='note'>FID / KID reference: {e(reference['note'])}</p>")
    head = ["w", "images"]
    cats = [c for c in CATEGORIES if suite and all(c in r["synthetic"]["categories"] for r in res)]
    head += [f"{c}<br>(chance)" for c in cats] + (["mean acc."] if suite else [])
    has_clip, has_fid = all("clip_score" in r for r in res), all("fid" in r for r in res)
    head += (["CLIP score"] if has_clip else []) + (["FID", "KID"] if has_fid else [])
    parts.append("<h2>Scores</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
    for r in res:
        cells = [_w(r["guidance"]), str(r["images"])]
        for c in cats:
            v = r["synthetic"]["categories"][c]
            cells.append(f"{_fmt(v['accuracy'])} [{_fmt(v['ci95'][0])}, {_fmt(v['ci95'][1])}]<br>({_fmt(v['chance'])})")
        if suite:
            cells.append(_fmt(r["synthetic"]["mean_accuracy"]))
        if has_clip:
            cells.append(_fmt(r["clip_score"]["mean"], pct=False))
        if has_fid:
            cells += [_fmt(r["fid"], pct=False), f"{_fmt(r['kid']['mean'], pct=False)} ± {_fmt(r['kid']['std'], pct=False)}"]
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    if plots:
        parts.append("<h2>Plots</h2>" + "".join(f"<img class='plot' src='{e(p)}' alt='{e(n)}'>" for n, p in plots.items()))
    parts.append("<h2>Samples by category</h2>")
    groups: dict[str, list[tuple[int, int]]] = {}
    for ri, run in enumerate(runs):
        for i, row in enumerate(run.rows):
            names = list(run.result["synthetic"]["per_image"][i]) if suite else [row["category"] or "all"]
            for name in names:
                groups.setdefault(name, []).append((ri, i))
    order = [c for c in CATEGORIES if c in groups] + sorted(c for c in groups if c not in CATEGORIES)
    for name in order:
        parts.append(f"<h3>{e(name)}</h3>")
        for ri, run in enumerate(runs):
            items = [i for r, i in groups[name] if r == ri]
            if not items:
                continue
            shown = items[:REPORT_MAX_IMAGES]
            parts.append(f"<p class='note'>w={_w(run.guidance)}: {len(shown)} of {len(items)} images</p><div class='grid'>")
            for i in shown:
                row = run.rows[i]
                src = os.path.relpath(run.directory / row["path"], out).replace(os.sep, "/")
                mark, cls = "", ""
                if suite:
                    ok = run.result["synthetic"]["per_image"][i][name]
                    mark, cls = ("✓ " if ok else "✗ "), (" class='ok'" if ok else " class='no'")
                if "clip_score" in run.result:
                    mark += f"CLIP {run.result['clip_score']['per_image'][i]:.3g} "
                parts.append(f"<figure{cls}><img src='{e(src)}' alt=''><figcaption>{e(mark)}{e(row['prompt'])}"
                             f"</figcaption></figure>")
            parts.append("</div>")
    parts.append("</body></html>\n")
    text = "".join(parts)
    atomic_write(out / REPORT_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return REPORT_FILE
