"""Reproducible tiny-model builds: the same seed gives the same bytes, whatever ran before.

What a small model learns on CPU depends on more than its seed: the number of threads (how sums
are split), the kernels chosen, the state of every RNG, and -- in a process that already ran other
work -- the allocation history (buffer alignment changes MKL's code path). A tiny model's borderline
decisions then differ between two machines, or between a fresh clone and a warm one. So a build:

  - runs in a fresh interpreter (`run_isolated`: `sys.executable -m pipeline.testbed.models.build`)
    whose environment pins every thread pool to one thread and MKL to its strict reproducible mode
    (`BUILD_ENV`), with Python's hash seed fixed;
  - and inside it, under `deterministic(seed)` (every builder is decorated with `reproducible`, so
    a direct call gets this part too): one intra-op thread, deterministic algorithms,
    Python's, numpy's and torch's RNGs seeded (the builders also use their own seeded generators);
  - writes nothing that depends on the clock or the machine's paths: JSON with sorted keys where the
    builder owns the format, safetensors metadata with one key, no timings in the model folders
    (build times go to the cache's test_models.json, which also holds the paths).

`tree_digest(dir)` is the sha256 of every file under a folder; tests compare two builds with it.

    python -m pipeline.testbed.models.build {clip,nsfw,toxicity,t5,t5_pretrained} OUT_DIR [--seed 0] [--options JSON]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("clip", "nsfw", "toxicity", "t5", "t5_pretrained")

from pipeline.testbed.models.determinism import BUILD_ENV


def tree_digest(root: str | os.PathLike) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def build(kind: str, out_dir: str | os.PathLike, seed: int = 0, **options) -> Path:
    """Build one tiny model in this process (every builder runs under `deterministic`); returns its path."""
    from pipeline.compat import ensure_torch_compat

    ensure_torch_compat()
    out = Path(out_dir)
    if kind == "clip":
        from pipeline.testbed.models.clip import build_tiny_clip

        return build_tiny_clip(out, seed=seed, **options)
    if kind == "nsfw":
        from pipeline.testbed.models.clip import build_nsfw_head

        return build_nsfw_head(out, seed=seed, **options)
    if kind == "toxicity":
        from pipeline.testbed.models.toxicity import build_tiny_detoxify

        return build_tiny_detoxify(out, seed=seed, **options)
    if kind == "t5":
        from pipeline.testbed.models.t5 import build_tiny_t5

        return build_tiny_t5(out, seed=seed, **options)
    if kind == "t5_pretrained":
        from pipeline.testbed.models.t5_pretrain import build_tiny_t5_pretrained

        return build_tiny_t5_pretrained(out, seed=seed, **options)
    raise ValueError(f"unknown model kind {kind!r}; one of {KINDS}")


def isolated_env() -> dict[str, str]:
    """This process's environment with BUILD_ENV applied and this checkout's packages first on the path."""
    import pipeline

    env = {**os.environ, **BUILD_ENV}
    src = str(Path(pipeline.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def run_isolated(kind: str, out_dir: str | os.PathLike, seed: int = 0, **options) -> float:
    """Build one tiny model in a fresh interpreter with `BUILD_ENV`; returns the seconds it took."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; one of {KINDS}")
    cmd = [sys.executable, "-m", "pipeline.testbed.models.build", kind, str(Path(out_dir).resolve()), "--seed", str(seed)]
    if options:
        cmd += ["--options", json.dumps(options, sort_keys=True)]
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=isolated_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building the tiny {kind} model failed (exit {done.returncode}): {' '.join(cmd)}")
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build one tiny test model reproducibly (see the module docstring).")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", default="{}", help="JSON object of builder keyword arguments")
    args = parser.parse_args(argv)
    try:  # once, before any inter-op work; a fresh interpreter allows it
        import torch

        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    build(args.kind, args.out_dir, seed=args.seed, **json.loads(args.options))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
