"""The tiny test models: reproducible builds (same seed -> same bytes, whatever ran before) and a
cache whose location does not depend on where the package is installed.

A build of the same seed must give the same bytes in a fresh interpreter (how the cache builds) and
in a process that first ran unrelated multi-threaded torch work and consumed its RNGs: a tiny model's
borderline decisions otherwise change from one clone or machine to the next (PITFALLS.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.testbed import models as testmodels
from pipeline.testbed.models.build import isolated_env, run_isolated, tree_digest

# Small configurations of every builder (seconds each); the cached models use the defaults.
SMALL = {
    "clip": {"steps": 12, "rows": 200, "held_out": 60, "check": False},
    "nsfw": {"input_dim": 64},
    "toxicity": {"clean_rows": 200, "n_toxic": 200, "eval_rows": 60, "epochs": 2, "check": False},
    "t5": {},
}

# A build script run in a fresh interpreter with build.BUILD_ENV. With OTHER_WORK it first runs
# unrelated torch work on several threads, consumes the RNGs and leaves odd-sized allocations alive;
# then it builds, in this same process. Prints {name: {file: sha256}}.
_BUILD_SCRIPT = r"""
import json, random, sys
from pathlib import Path
import numpy as np
import torch
from pipeline.compat import ensure_torch_compat
ensure_torch_compat()
out, plan, other_work = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1"
threads = torch.get_num_threads()
if other_work:
    threads = 4
    torch.set_num_threads(threads)
    x = torch.randn(509, 771)
    for _ in range(4):
        x = torch.tanh(x @ x.T[:, :771] / 30)
    keep = [torch.empty(97 * i + 13) for i in range(300)]
    torch.nn.Linear(64, 64)(torch.randn(33, 64)).sum().backward()
    random.random(); np.random.rand(7)
from pipeline.testbed.models import build_test_models
from pipeline.testbed.models.build import build, tree_digest
digest = {}
if plan == "all":
    build_test_models(out, seed=0, isolated=False)
    digest["all"] = tree_digest(out)
else:
    for name, (kind, seed, options) in plan.items():
        build(kind, out / name, seed=seed, **options)
        digest[name] = tree_digest(out / name)
assert torch.get_num_threads() == threads, "a build did not restore the caller's thread count"
print("DIGEST " + json.dumps(digest, sort_keys=True))
"""


def _build(out: Path, plan, other_work: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, str(out), json.dumps(plan), "1" if other_work else "0"],
                          env=isolated_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("DIGEST ")][-1]
    return json.loads(line[len("DIGEST "):])


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def test_small_builds_give_the_same_bytes_fresh_and_after_other_work(tmp_path):
    """Every builder (small configurations): a fresh interpreter and a process that ran other
    multi-threaded torch work first write byte-identical files; another seed writes other bytes
    (so the comparison does see the weights)."""
    plan = {kind: (kind, 0, options) for kind, options in SMALL.items()}
    fresh = _build(tmp_path / "fresh", {**plan, "toxicity-seed1": ("toxicity", 1, SMALL["toxicity"])}, other_work=False)
    after = _build(tmp_path / "after", plan, other_work=True)
    for kind in SMALL:
        assert fresh[kind], kind
        assert _differences(fresh[kind], after[kind]) == [], kind
    # The folders hold the model files themselves, not just a card.
    assert {"checkpoint.ckpt", "tokenizer.json", "vocab.txt", "config.json"} <= set(fresh["toxicity"])
    assert {"open_clip_model.safetensors", "calibration.json"} <= set(fresh["clip"])
    assert {"model.safetensors", "spiece.model", "tokenizer.json"} <= set(fresh["t5"])
    assert "checkpoint.ckpt" in _differences(fresh["toxicity"], fresh["toxicity-seed1"])


def test_run_isolated_builds_what_an_in_process_build_writes(tmp_path):
    """The cache's path (one fresh interpreter per model) and an in-process build agree."""
    run_isolated("nsfw", tmp_path / "iso", seed=0, **SMALL["nsfw"])
    inproc = _build(tmp_path / "inproc", {"nsfw": ("nsfw", 0, SMALL["nsfw"])}, other_work=True)
    assert _differences(tree_digest(tmp_path / "iso"), inproc["nsfw"]) == []


@pytest.mark.slow
def test_cached_models_rebuild_byte_for_byte_after_other_work(tmp_path):
    """The real, full-size builds the tests use: rebuilt in a process that first ran other torch
    work, every file equals the cached copy (built in fresh interpreters, maybe long ago)."""
    cached = testmodels.cached_test_models()
    root = Path(cached["clip"]).parent
    want = {k: v for k, v in tree_digest(root).items() if k != "test_models.json"}  # paths and build times
    got = {k: v for k, v in _build(tmp_path / "again", "all", other_work=True)["all"].items() if k != "test_models.json"}
    assert {"toxicity/checkpoint.ckpt", "clip/open_clip_model.safetensors", "clip/calibration.json",
            "t5/model.safetensors", "nsfw/nsfw_head.safetensors"} <= set(want)
    assert _differences(want, got) == []
    print(f"\n{len(want)} files byte-identical; toxicity/checkpoint.ckpt sha256 {want['toxicity/checkpoint.ckpt'][:16]}")


# ---------------------------------------------------------------------------------------------
# Where the cache lives


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("KILN_TEST_MODELS", "KILN_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_cache_location_follows_the_environment_not_the_package(clean_env, tmp_path):
    package_root = Path(testmodels.__file__).resolve().parents[3]
    assert testmodels.kiln_cache_dir() == tmp_path / "home" / ".cache" / "kiln"
    assert testmodels.tiny_models_dir() == tmp_path / "home" / ".cache" / "kiln" / "test-models"
    assert package_root not in testmodels.tiny_models_dir().parents
    clean_env.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid per the XDG spec: ignored
    assert testmodels.kiln_cache_dir() == tmp_path / "home" / ".cache" / "kiln"
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert testmodels.tiny_models_dir() == tmp_path / "xdg" / "kiln" / "test-models"
    clean_env.setenv("KILN_CACHE_DIR", str(tmp_path / "kc"))
    assert testmodels.tiny_models_dir() == tmp_path / "kc" / "test-models"
    clean_env.setenv("KILN_TEST_MODELS", str(tmp_path / "tm"))
    assert testmodels.tiny_models_dir() == tmp_path / "tm"


def test_cached_test_models_builds_once_into_the_cache(clean_env, tmp_path):
    calls = []

    def fake_build(out, seed=0, **_):
        calls.append(Path(out))
        Path(out).mkdir(parents=True)
        (Path(out) / "clip").mkdir()
        manifest = {"seed": seed, "clip": str(Path(out) / "clip"), "min_clip_similarity": 0.5}
        (Path(out) / "test_models.json").write_text(json.dumps(manifest))
        return manifest

    clean_env.setattr(testmodels, "build_test_models", fake_build)
    clean_env.setenv("KILN_CACHE_DIR", str(tmp_path / "kc"))
    root = tmp_path / "kc" / "test-models"
    (root / ".building-999999").mkdir(parents=True)  # left by a killed build
    first = testmodels.cached_test_models(seed=3)
    target = root / f"{testmodels._builders_fingerprint()}-seed3"
    assert first["clip"] == str(target / "clip") and (target / "clip").is_dir()
    assert not list(root.glob(".building-*"))
    assert testmodels.cached_test_models(seed=3) == first and len(calls) == 1
