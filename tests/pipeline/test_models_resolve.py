"""The one model resolver (pipeline.models.resolve) and the path a user takes with it:
`kiln models fetch` from a fake hub on 127.0.0.1 -> `kiln models verify` -> `kiln prepare --models DIR`,
with registry names and with the default flags; and the newcomer's one line without models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.models.resolve import ModelNotHere, resolve
from pipeline.testbed.models import cached_test_models, prepare_flags
from tests.pipeline.test_models_cli import hub, registry, run as kiln_models, tiny  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]


# -- the grammar ------------------------------------------------------------------------------------


def test_local_is_one_prefix_for_every_kind(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "head.safetensors").write_bytes(b"x")
    assert resolve("toxicity", f"local:{folder}").loader_spec == f"local:{folder}"
    assert resolve("t5", f"local:{folder}").loader_spec == f"local:{folder}"
    assert resolve("clip", f"local:{folder}").loader_spec == f"local-dir:{folder}"
    assert resolve("clip", f"local-dir:{folder}").loader_spec == f"local-dir:{folder}"  # the old prefix works
    assert resolve("nsfw", f"local:{folder}").loader_spec == str(folder / "head.safetensors")  # the one head in it
    assert resolve("nsfw", f"local:{folder / 'head.safetensors'}").loader_spec == str(folder / "head.safetensors")
    (folder / "other.pt").write_bytes(b"x")
    with pytest.raises(ModelNotHere, match="holds 2 head files"):
        resolve("nsfw", f"local:{folder}")
    with pytest.raises(ModelNotHere, match="does not exist"):
        resolve("t5", f"local:{tmp_path / 'nope'}")


def test_library_names_and_hub_ids_pass_through_to_the_loaders():
    # the loaders look for these in the local caches (and say so in one line when they are not there)
    assert resolve("toxicity", "original").loader_spec == "original"
    assert resolve("clip", "ViT-B-32:openai").loader_spec == "ViT-B-32:openai"
    assert resolve("t5", "google/t5-v1_1-xxl").loader_spec == "google/t5-v1_1-xxl"
    assert resolve("t5", "google/t5-v1_1-xxl").record["name"] == "t5-v1_1-xxl"


def test_a_registry_name_needs_a_models_folder(tmp_path):
    with pytest.raises(ModelNotHere, match=r"kiln models fetch nsfw-b32 --to models/.*--models models/"):
        resolve("nsfw", "nsfw-b32")
    with pytest.raises(ModelNotHere, match="does not exist"):
        resolve("nsfw", "nsfw-b32", str(tmp_path / "none"))
    (tmp_path / "models.json").write_text(json.dumps({"format": 1, "models": {}}))
    with pytest.raises(ModelNotHere, match=f"nsfw-b32 is not in --models {tmp_path}"):
        resolve("nsfw", "nsfw-b32", str(tmp_path))


def test_a_revision_not_in_the_cache_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotHere, match=r"revision abc123 of org/t5 is not in this machine's Hugging Face cache"):
        resolve("t5", "org/t5@abc123")


def _models_json(root: Path, models: dict) -> Path:
    (root / "models.json").write_text(json.dumps({"format": 1, "models": models}))
    return root


def test_a_model_of_another_role_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    _models_json(tmp_path, {"x": {"role": "t5", "dir": "x", "spec": "local:x", "files": {}}})
    with pytest.raises(ModelNotHere, match="is a t5 model, not a clip model"):
        resolve("clip", "x", str(tmp_path))


# -- the user's path ----------------------------------------------------------------------------------


def _kiln(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    from pipeline.testbed.server import SynthServer
    from pipeline.testbed.synth import synthesize

    w = synthesize(tmp_path_factory.mktemp("rweb"), rows=60, seed=5, failure_rate=0.1, mismatch_rate=0.1, toxic_rate=0.05)
    with SynthServer(w) as server:
        yield w, server


def _common(web, out: Path) -> list[str]:
    w, server = web
    return ["prepare", "--input", str(w.metadata_path), "--output", str(out), "--allow-hosts", server.allow_hosts,
            "--quiet", "--image-size", "64", "--samples-per-shard", "30", "--no-card",
            "--min-clip-similarity", str(cached_test_models()["min_clip_similarity"])]


def _shards(out: Path) -> dict:
    """What a run decided, per uid: kept (with its scores to 5 decimals: a model's float output may
    differ in the last bit with the batch it ran in) or rejected (stage, reason)."""
    got = {}
    for p in sorted((out / "meta").glob("*.parquet")):
        for r in pq.read_table(p).to_pylist():
            got[r["uid"]] = ("kept",) + tuple(round(r[k], 5) for k in ("toxicity", "clip_similarity", "punsafe") if r.get(k) is not None)
    for p in sorted((out / "rejects").glob("*.parquet")):
        for r in pq.read_table(p).to_pylist():
            got[r["uid"]] = (r["stage"], r["reason"])
    return got


@pytest.mark.slow
def test_fetch_verify_prepare_with_models_dir(registry, hub, web, tmp_path, capsys):  # noqa: F811
    """fetch -> verify -> prepare --models DIR naming the registry models: the same shards, the same
    outcome for every row as the run naming the same files with local:, and stats.json records where each came from."""
    dest = tmp_path / "models"
    code, out, err = kiln_models(capsys, "models", "--registry", str(registry), "fetch", "tiny-defaults", "--to", str(dest))
    assert code == 0, err
    assert kiln_models(capsys, "models", "verify", str(dest))[0] == 0

    a, b = tmp_path / "by-name", tmp_path / "by-path"
    r = _kiln(*_common(web, a), "--models", str(dest), "--toxicity-model", "tiny-detoxify", "--clip-model", "tiny-clip",
              "--nsfw-head", "tiny-nsfw", "--t5-model", "tiny-t5")
    assert r.returncode == 0, r.stderr
    r = _kiln(*_common(web, b), "--toxicity-model", f"local:{dest / 'tiny-detoxify'}", "--clip-model", f"local:{dest / 'tiny-clip'}",
              "--nsfw-head", f"local:{dest / 'tiny-nsfw'}", "--t5-model", f"local:{dest / 'tiny-t5'}")
    assert r.returncode == 0, r.stderr
    assert _shards(a) == _shards(b) and _shards(a)
    stats = json.loads((a / "stats.json").read_text())
    manifest = json.loads((dest / "models.json").read_text())["models"]
    for role, name in (("toxicity", "tiny-detoxify"), ("clip", "tiny-clip"), ("nsfw", "tiny-nsfw"), ("t5", "tiny-t5")):
        prov = stats["models"][role]["provenance"]
        assert prov["name"] == name and prov["license"] == "apache-2.0"
        assert prov["files"] == {k: v["sha256"] for k, v in manifest[name]["files"].items()}
    assert stats["flags"]["models"] == str(dest)
    r = _kiln("card", str(a))  # the card shows where each model came from
    assert r.returncode == 0, r.stderr
    card = (a / "README.md").read_text()
    for name in ("tiny-detoxify", "tiny-clip", "tiny-nsfw", "tiny-t5"):
        assert f"(kiln registry: `{name}`)" in card
    assert "licence: apache-2.0" in card and manifest["tiny-t5"]["files"]["model.safetensors"]["sha256"] in card


@pytest.mark.slow
def test_default_flags_take_every_model_from_the_models_dir(web, tmp_path):
    """`kiln prepare --models DIR` with no model flag: each default (Detoxify original, ViT-B/32,
    LAION's B/32 head, T5 v1.1 XXL) is the registry model of that name in DIR -- here the tiny models
    laid out and recorded as `kiln models fetch laion400m-defaults` lays them out."""
    tiny_models = cached_test_models()
    dest = tmp_path / "models"
    layout = {"detoxify-original": ("toxicity", tiny_models["toxicity"], "local:detoxify-original"),
              "ViT-B-32-openai": ("clip", tiny_models["clip"], "local-dir:ViT-B-32-openai"),
              "t5-v1_1-xxl": ("t5", tiny_models["t5"], "local:t5-v1_1-xxl")}
    records = {}
    for name, (role, src, spec) in layout.items():
        shutil.copytree(src, dest / name)
        records[name] = {"role": role, "dir": name, "spec": spec, "files": {}, "license": "test"}
    (dest / "nsfw-b32").mkdir()
    shutil.copy(tiny_models["nsfw"], dest / "nsfw-b32" / "nsfw_head.safetensors")
    records["nsfw-b32"] = {"role": "nsfw", "dir": "nsfw-b32", "spec": "nsfw-b32/nsfw_head.safetensors", "files": {}, "license": "test"}
    _models_json(dest, records)

    a, b = tmp_path / "defaults", tmp_path / "explicit"
    r = _kiln(*_common(web, a), "--models", str(dest))
    assert r.returncode == 0, r.stderr
    r = _kiln(*_common(web, b), *prepare_flags(tiny_models))
    assert r.returncode == 0, r.stderr
    assert _shards(a) == _shards(b)
    stats = json.loads((a / "stats.json").read_text())
    assert {role: stats["models"][role]["provenance"]["name"] for role in ("toxicity", "clip", "nsfw", "t5")} == {
        "toxicity": "detoxify-original", "clip": "ViT-B-32-openai", "nsfw": "nsfw-b32", "t5": "t5-v1_1-xxl"}
    assert stats["command"].count("--models") == 1


def test_newcomer_without_models_gets_one_line_naming_the_fetch_command(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"URL": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["a red circle"]}), tmp_path / "x.parquet")
    for d in ("hf", "torch"):
        (tmp_path / d).mkdir()
    env = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1"}
    r = _kiln("prepare", "--input", str(tmp_path / "x.parquet"), "--output", str(tmp_path / "out"), env=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("kiln prepare: error: the default models are not on this machine (--toxicity-model "
                               "detoxify-original, --clip-model ViT-B-32-openai, --nsfw-head nsfw-b32, --t5-model t5-v1_1-xxl)")
    assert "`kiln models fetch laion400m-defaults --to models/` and re-run with --models models/" in lines[0]
    assert not (tmp_path / "out").exists()
