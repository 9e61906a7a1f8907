"""Tiny models built locally, in the real on-disk formats, for tests and `make demo`.

Nothing here downloads anything: weights cannot come from a hub on this machine, so the real
loading code (open_clip's `local-dir:` schema, Detoxify's checkpoint format, safetensors NSFW
heads) is exercised with models we train or initialise ourselves:

  clip/       a tiny open_clip model trained contrastively on synthetic-web pairs, so its
              similarity really separates true captions from mismatched ones (calibration.json
              holds the measured threshold)
  nsfw/       LAION's NSFW head architecture sized for that CLIP, deterministic weights
  toxicity/   a Detoxify-format checkpoint over a tiny BERT with a locally built WordPiece vocab
  t5/         a tiny T5 v1.1-shaped encoder (random init) with a SentencePiece tokenizer trained on
              synthetic captions, saved with save_pretrained so the real from_pretrained path loads it

`cached_pretrained_t5(size)` builds, on first use only, the tiny T5 that is actually pretrained
(t5_pretrain.py: span corruption + scene parsing on text only, about 5 CPU minutes; "wide" is its
d_model-128 form) into the same cache, keyed the same way; `bench/learning.py` and `kiln demo --t5-encoder
pretrained` use it. It is not part of `cached_test_models()`, so a fresh clone's tests do not pay for it.

`cached_test_models()` builds them once into the cache (`tiny_models_dir()`: $KILN_TEST_MODELS, else
`test-models/` under $KILN_CACHE_DIR, $XDG_CACHE_HOME/kiln or ~/.cache/kiln), keyed by the builders'
source and the versions of the libraries that shape the bytes, so editing a builder or upgrading
torch rebuilds; the test suite and the demo use it. Every model is built in a fresh interpreter with
one thread and deterministic kernels (build.py), so the same seed gives the same bytes whatever the
calling process ran before.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# Libraries whose versions change what a build writes (kernels, tokenizers, encoders, file formats).
_VERSIONED = ("torch", "transformers", "tokenizers", "open_clip_torch", "sentencepiece", "safetensors", "numpy",
              "pillow", "opencv-python-headless", "opencv-python", "pyarrow")


def kiln_cache_dir() -> Path:
    """kiln's cache folder: $KILN_CACHE_DIR, else $XDG_CACHE_HOME/kiln, else ~/.cache/kiln."""
    if os.environ.get("KILN_CACHE_DIR"):
        return Path(os.environ["KILN_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative value is invalid and ignored
        return Path(xdg) / "kiln"
    return Path.home() / ".cache" / "kiln"


def tiny_models_dir() -> Path:
    """Where `cached_test_models()` keeps its builds: $KILN_TEST_MODELS, else kiln_cache_dir()/test-models."""
    if os.environ.get("KILN_TEST_MODELS"):
        return Path(os.environ["KILN_TEST_MODELS"]).expanduser()
    return kiln_cache_dir() / "test-models"


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": "%d.%d" % sys.version_info[:2], "machine": platform.machine()}
    for name in _VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _builders_fingerprint() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(here.glob("*.py")):
        h.update(p.name.encode() + p.read_bytes())
    # The builders also depend on the synthetic web, the caption set and the scorers' save formats.
    for p in [here.parent / "synth.py", here.parent / "toxic_captions.py", *sorted((here.parents[2] / "filters").glob("*.py"))]:
        if p.exists():
            h.update(p.name.encode() + p.read_bytes())
    h.update(json.dumps(_library_versions(), sort_keys=True).encode())
    return h.hexdigest()[:12]


def build_test_models(out_dir: str | Path, seed: int = 0, *, isolated: bool = True) -> dict:
    """Build every tiny model into `out_dir`; returns their paths and the prepare flags that use them.

    isolated=True (the default, and what the cache uses): each model in a fresh interpreter with
    build.BUILD_ENV, so the bytes depend on the seed only. isolated=False builds in this process
    (still one thread, deterministic kernels, seeded), for debugging a builder.
    """
    from pipeline.testbed.models.build import build, run_isolated

    def one(kind, path, **options) -> float:
        if isolated:
            return run_isolated(kind, path, seed=seed, **options)
        t0 = time.monotonic()
        build(kind, path, seed=seed, **options)
        return time.monotonic() - t0

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {"clip_s": one("clip", out / "clip")}
    clip_dir = out / "clip"
    config = json.loads((clip_dir / "open_clip_config.json").read_text())
    embed_dim = config["model_cfg"]["embed_dim"]
    timings["nsfw_s"] = one("nsfw", out / "nsfw", input_dim=embed_dim)
    timings["toxicity_s"] = one("toxicity", out / "toxicity")
    timings["t5_s"] = one("t5", out / "t5")
    calibration = json.loads((clip_dir / "calibration.json").read_text())
    manifest = {
        "seed": seed,
        "clip": str(clip_dir),
        "nsfw": str(out / "nsfw" / "nsfw_head.safetensors"),
        "toxicity": str(out / "toxicity"),
        "t5": str(out / "t5"),
        "min_clip_similarity": calibration["min_clip_similarity"],
        "build_seconds": {k: round(v, 1) for k, v in timings.items()},
        "isolated": isolated,
    }
    (out / "test_models.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
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


@contextmanager
def _locked(root: Path, name: str = ".lock"):
    """An exclusive lock on `root` (or on one of its builds, by `name`): concurrent test runs wait for
    one build instead of each building."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_test_models(cache_dir: str | Path | None = None, seed: int = 0) -> dict:
    """Build the tiny models once per builder version; later calls reuse them."""
    root = Path(cache_dir) if cache_dir else tiny_models_dir()
    target = root / f"{_builders_fingerprint()}-seed{seed}"
    manifest = target / "test_models.json"
    if manifest.exists():
        return json.loads(manifest.read_text())
    with _locked(root):
        if manifest.exists():  # another process built it while this one waited
            return json.loads(manifest.read_text())
        for stale in root.glob(".building-*"):  # left by a killed build (builds hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".building-{os.getpid()}"
        models = build_test_models(tmp, seed=seed)
        # Paths inside point at tmp; rewrite them for the final location, then rename atomically.
        fixed = {k: (v.replace(str(tmp), str(target)) if isinstance(v, str) else v) for k, v in models.items()}
        (tmp / "test_models.json").write_text(json.dumps(fixed, indent=2, sort_keys=True) + "\n")
        if target.exists():  # a partial folder (no manifest) from an interrupted rename
            shutil.rmtree(target)
        tmp.rename(target)
    return json.loads(manifest.read_text())


def cached_pretrained_t5(size: str = "tiny", cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """The pretrained tiny T5 folder (`kiln prepare --t5-model local:PATH`), built once per builder
    version like the other tiny models: in a fresh interpreter (build.py), under the cache's lock,
    into a scratch folder renamed into place, so a killed build leaves nothing that looks finished."""
    from pipeline.testbed.models.t5_pretrain import SIZES

    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, not {size!r}")
    from pipeline.testbed.models.build import run_isolated

    root = Path(cache_dir) if cache_dir else tiny_models_dir()
    target = root / f"{_builders_fingerprint()}-seed{seed}-t5-pretrained{'' if size == 'tiny' else '-' + size}"
    card = target / "model_card.json"
    if card.exists():
        return target
    # Its own lock and scratch names: it builds while the test models build, and neither clears the
    # other's scratch folder.
    with _locked(root, f".lock-t5-pretrained-{size}"):
        if card.exists():
            return target
        for stale in root.glob(f".pretraining-{size}-*"):  # left by a killed build (builds hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".pretraining-{size}-{os.getpid()}"
        run_isolated("t5_pretrained", tmp, seed=seed, **({} if size == "tiny" else {"size": size}))
        if target.exists():  # a partial folder (no card) from an interrupted rename
            shutil.rmtree(target)
        tmp.rename(target)
    return target


def main(args) -> int:
    models = build_test_models(args.dir, seed=args.seed)
    print(json.dumps(models, indent=2))
    print("\nuse with kiln prepare:\n  " + " ".join(prepare_flags(models)))
    return 0
