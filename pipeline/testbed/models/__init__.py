"""Tiny models built locally, in the real on-disk formats, for tests and `make demo`.

Nothing here downloads anything: weights cannot come from a hub on this machine, so the real
loading code (open_clip's `local-dir:` schema, Detoxify's checkpoint format, safetensors NSFW
heads) is exercised with models we train or initialise ourselves:

  clip/       a tiny open_clip model trained contrastively on synthetic-web pairs, so its
              similarity really separates true captions from mismatched ones (calibration.json
              holds the measured threshold)
  nsfw.safetensors   LAION's NSFW head architecture sized for that CLIP, deterministic weights
  toxicity/   a Detoxify-format checkpoint over a tiny BERT with a locally built WordPiece vocab
  t5/         a tiny T5 v1.1-shaped encoder (random init) with a SentencePiece tokenizer trained on
              synthetic captions, saved with save_pretrained so the real from_pretrained path loads it

`cached_test_models()` builds them once into `.kiln-cache/test-models/` (keyed by the builders'
source, so editing a builder rebuilds) and is what the test suite and the demo use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CACHE = REPO_ROOT / ".kiln-cache" / "test-models"


def _builders_fingerprint() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(here.glob("*.py")):
        h.update(p.name.encode() + p.read_bytes())
    # The builders also depend on the synthetic web, the caption set and the scorers' save formats.
    for p in [here.parent / "synth.py", here.parent / "toxic_captions.py", *sorted((here.parents[2] / "filters").glob("*.py"))]:
        if p.exists():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:12]


def build_test_models(out_dir: str | Path, seed: int = 0) -> dict:
    """Build every tiny model into `out_dir`; returns their paths and the prepare flags that use them."""
    from pipeline.compat import ensure_torch_compat

    ensure_torch_compat()
    from pipeline.testbed.models.clip import build_nsfw_head, build_tiny_clip
    from pipeline.testbed.models.t5 import build_tiny_t5
    from pipeline.testbed.models.toxicity import build_tiny_detoxify

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.time()
    clip_dir = Path(build_tiny_clip(out / "clip", seed=seed))
    timings["clip_s"] = round(time.time() - t0, 1)
    config = json.loads((clip_dir / "open_clip_config.json").read_text())
    embed_dim = config["model_cfg"]["embed_dim"]
    t0 = time.time()
    nsfw = Path(build_nsfw_head(out / "nsfw", input_dim=embed_dim, seed=seed))
    timings["nsfw_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    tox_dir = Path(build_tiny_detoxify(out / "toxicity", seed=seed))
    timings["toxicity_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    t5_dir = Path(build_tiny_t5(out / "t5", seed=seed))
    timings["t5_s"] = round(time.time() - t0, 1)
    calibration = json.loads((clip_dir / "calibration.json").read_text())
    manifest = {
        "seed": seed,
        "clip": str(clip_dir),
        "nsfw": str(nsfw),
        "toxicity": str(tox_dir),
        "t5": str(t5_dir),
        "min_clip_similarity": calibration["min_clip_similarity"],
        "build_seconds": timings,
    }
    (out / "test_models.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def prepare_flags(models: dict) -> list[str]:
    """`kiln prepare` flags that run every model filter on the tiny models."""
    return [
        "--toxicity-model", f"local:{models['toxicity']}",
        "--clip-model", f"local-dir:{models['clip']}",
        "--nsfw-head", models["nsfw"],
        "--min-clip-similarity", str(models["min_clip_similarity"]),
        "--t5-model", f"local:{models['t5']}",
    ]


def cached_test_models(cache_dir: str | Path | None = None, seed: int = 0) -> dict:
    """Build the tiny models once per builder version; later calls reuse them."""
    root = Path(cache_dir or os.environ.get("KILN_TEST_MODELS", DEFAULT_CACHE))
    target = root / f"{_builders_fingerprint()}-seed{seed}"
    manifest = target / "test_models.json"
    if manifest.exists():
        return json.loads(manifest.read_text())
    tmp = root / f".building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    models = build_test_models(tmp, seed=seed)
    # Paths inside point at tmp; rewrite them for the final location, then rename atomically.
    fixed = {k: (v.replace(str(tmp), str(target)) if isinstance(v, str) else v) for k, v in models.items()}
    (tmp / "test_models.json").write_text(json.dumps(fixed, indent=2))
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads(manifest.read_text())


def main(args) -> int:
    models = build_test_models(args.dir, seed=args.seed)
    print(json.dumps(models, indent=2))
    print("\nuse with kiln prepare:\n  " + " ".join(prepare_flags(models)))
    return 0
