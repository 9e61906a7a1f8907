"""`kiln models list | show | fetch | verify` against a fake hub on 127.0.0.1 (pipeline/testbed/fakehub.py)
serving the tiny models of pipeline/testbed/models in the real repo layouts and file names, through a
test registry (--registry) that pins some of their real hashes. Offline: nothing leaves 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main as kiln
from pipeline.models.registry import RegistryError, load_registry, resolve_names, spec_for
from pipeline.testbed.fakehub import FakeHub
from pipeline.testbed.models import cached_test_models

REPO_ROOT = Path(__file__).resolve().parents[2]
RELEASE = "/owner/tiny-detoxify/releases/download/v1/toxic_tiny.ckpt"
HEAD_RELEASE = "/owner/tiny-nsfw/releases/download/v1/nsfw_head.safetensors"
MIRRORED = "/laion/mirror-only/releases/download/v1/head.safetensors"
KERAS_ZIP = "/laion/nsfw/raw/abc/clip_autokeras_tiny.zip"
KERAS_BYTES = b"PK\x03\x04 not really a zip, the converter is faked"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Evil:
    """Pickled into a .pth: torch's weights_only loader must refuse it (a global outside plain tensors)."""

    def __reduce__(self):
        return (print, ("this would have run",))


@pytest.fixture(scope="module")
def tiny():
    return {k: Path(v) if isinstance(v, str) and v.startswith("/") else v for k, v in cached_test_models().items()}


@pytest.fixture
def hub(tiny, monkeypatch, tmp_path):
    h = FakeHub()
    tox, clip, t5 = tiny["toxicity"], tiny["clip"], tiny["t5"]
    with h:
        h.add_release(RELEASE, tox / "checkpoint.ckpt")
        h.add_release(HEAD_RELEASE, Path(tiny["nsfw"]))
        h.add_release(MIRRORED, Path(tiny["nsfw"]))
        h.add_release(KERAS_ZIP, KERAS_BYTES)
        h.tox_commit = h.add_repo("tiny/bert-tokenizer", {n: tox / n for n in
                                                          ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json")})
        h.clip_commit = h.add_repo("tiny/clip", {n: clip / n for n in ("open_clip_config.json", "open_clip_model.safetensors")})
        h.t5_commit = h.add_repo("tiny/t5", {n: t5 / n for n in
                                            ("config.json", "spiece.model", "tokenizer.json", "tokenizer_config.json", "model.safetensors")})
        evil = tmp_path / "evil.pth"
        import torch

        torch.save({"weight": torch.zeros(2), "payload": Evil()}, evil)
        h.add_release("/owner/evil/releases/download/v1/head.pth", evil)
        evil.unlink()
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


def _entry(name, role, source, files, **kw):
    flag = {"toxicity": "--toxicity-model", "clip": "--clip-model", "nsfw": "--nsfw-head", "t5": "--t5-model"}[role]
    layout = {"toxicity": "local", "clip": "local-dir", "nsfw": "file", "t5": "local"}[role]
    return {"name": name, "role": role, "description": f"tiny {role}", "source": source, "files": files,
            "license": "apache-2.0", "embed_dim": kw.pop("embed_dim", None), "threshold": None, "flag": flag,
            "layout": layout, **kw}


@pytest.fixture
def registry(tmp_path, tiny, hub):
    """A registry of the tiny models on the fake hub; some files pinned with their real sha256."""
    tox, clip, head = tiny["toxicity"], tiny["clip"], Path(tiny["nsfw"])
    entries = [
        _entry("tiny-detoxify", "toxicity",
               {"kind": "url", "urls": [hub.url + RELEASE], "hub": {"repo": "tiny/bert-tokenizer", "revision": hub.tox_commit}},
               [{"path": "checkpoint.ckpt", "url": hub.url + RELEASE, "size": (tox / "checkpoint.ckpt").stat().st_size,
                 "sha256": sha(tox / "checkpoint.ckpt"), "sha256_source": "test: computed from the built file"}]
               + [{"path": n, "filename": n, "size": None, "sha256": None, "sha256_source": None}
                  for n in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json")]),
        _entry("tiny-clip", "clip", {"kind": "hub", "repo": "tiny/clip", "revision": hub.clip_commit},
               [{"path": "open_clip_config.json", "filename": "open_clip_config.json", "sha256": None},
                {"path": "open_clip_model.safetensors", "filename": "open_clip_model.safetensors",
                 "sha256": sha(clip / "open_clip_model.safetensors"), "sha256_source": "test"}], embed_dim=64),
        _entry("tiny-nsfw", "nsfw", {"kind": "url", "urls": [hub.url + HEAD_RELEASE]},
               [{"path": "nsfw_head.safetensors", "url": hub.url + HEAD_RELEASE, "sha256": None}], head="nsfw_head.safetensors"),
        _entry("tiny-t5", "t5", {"kind": "hub", "repo": "tiny/t5", "revision": "main"},
               [{"path": n, "filename": n, "sha256": None} for n in
                ("config.json", "spiece.model", "tokenizer.json", "tokenizer_config.json", "model.safetensors")]),
        _entry("bad-pin", "nsfw", {"kind": "url", "urls": [hub.url + HEAD_RELEASE]},
               [{"path": "nsfw_head.safetensors", "url": hub.url + HEAD_RELEASE, "sha256": "0" * 64,
                 "sha256_source": "test: deliberately wrong"}], head="nsfw_head.safetensors"),
        _entry("evil-head", "nsfw", {"kind": "url", "urls": [hub.url + "/owner/evil/releases/download/v1/head.pth"]},
               [{"path": "head.pth", "url": hub.url + "/owner/evil/releases/download/v1/head.pth"}], head="head.pth"),
        _entry("missing-file", "t5", {"kind": "hub", "repo": "tiny/t5", "revision": "main"},
               [{"path": "config.json", "filename": "config.json"}, {"path": "pytorch_model.bin", "filename": "pytorch_model.bin"}]),
        _entry("tiny-keras", "nsfw", {"kind": "url", "urls": [hub.url + KERAS_ZIP]},
               [{"path": "clip_autokeras_tiny.zip", "url": hub.url + KERAS_ZIP, "size": len(KERAS_BYTES),
                 "sha256": hashlib.sha256(KERAS_BYTES).hexdigest(), "sha256_source": "test"}],
               head="nsfw_head.safetensors", convert="nsfw_keras"),
        _entry("mirrored-head", "nsfw", {"kind": "url", "urls": ["https://releases.invalid" + MIRRORED]},
               [{"path": "head.safetensors", "url": "https://releases.invalid" + MIRRORED,
                 "sha256": sha(head), "sha256_source": "test"}], head="head.safetensors"),
    ]
    reg = tmp_path / "registry"
    reg.mkdir()
    for e in entries:
        (reg / f"{e['name']}.json").write_text(json.dumps(e, indent=1))
    (reg / "sets.json").write_text(json.dumps({"sets": {"tiny-defaults": {
        "description": "every tiny model", "members": ["tiny-detoxify", "tiny-clip", "tiny-nsfw", "tiny-t5"]}}}))
    return reg


def run(capsys, *argv):
    code = kiln(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("kiln models") and ": error:" in ln]


# --------------------------------------------------------------------------------------------
# The shipped registry


def test_shipped_registry_validates_and_names_every_model():
    reg = load_registry()
    assert {"detoxify-original", "detoxify-unbiased", "detoxify-multilingual", "ViT-B-32-openai", "ViT-L-14-openai",
            "ViT-H-14-laion2b_s32b_b79k", "nsfw-h14", "nsfw-b32", "nsfw-l14", "t5-v1_1-xxl", "flan-t5-xxl"} <= set(reg.models)
    members = [e["name"] for e in resolve_names(["laion400m-defaults"], reg)]
    assert members == ["detoxify-original", "ViT-B-32-openai", "nsfw-b32", "t5-v1_1-xxl"]
    for e in reg.models.values():
        for f in e["files"]:
            assert (f.get("sha256") is None) or f.get("sha256_source"), (e["name"], f["path"])
        if e["source"]["kind"] == "hub" and e["source"]["revision"] == "main":
            assert "main" in e.get("notes", ""), e["name"]
    assert reg.models["nsfw-b32"]["convert"] == "nsfw_keras"
    assert spec_for(reg.models["detoxify-original"]) == "local:detoxify-original"
    assert spec_for(reg.models["ViT-B-32-openai"]) == "local-dir:ViT-B-32-openai"
    assert spec_for(reg.models["nsfw-b32"]) == "nsfw-b32/nsfw_head.safetensors"
    assert spec_for(reg.models["nsfw-h14"]) == "nsfw-h14/h14_nsfw.pth"


def test_malformed_registry_is_one_line(tmp_path, capsys):
    reg = tmp_path / "reg"
    reg.mkdir()
    good = json.loads((REPO_ROOT / "pipeline/models/registry/nsfw-b32.json").read_text())
    good["files"][0]["sha256"] = "ABC"
    (reg / "nsfw-b32.json").write_text(json.dumps(good))
    with pytest.raises(RegistryError, match=r"nsfw-b32.json \(nsfw-b32\): files\[0\]: 'sha256' must be 64 lowercase hex"):
        load_registry(reg)
    code, out, err = run(capsys, "models", "--registry", str(reg), "list")
    assert code == 2 and len(error_lines(err)) == 1 and "sha256" in err


# --------------------------------------------------------------------------------------------
# list / show / unknown names


def test_list_and_show(registry, capsys):
    code, out, err = run(capsys, "models", "--registry", str(registry), "list")
    assert code == 0
    for name in ("tiny-detoxify", "tiny-clip", "tiny-nsfw", "tiny-t5", "tiny-defaults"):
        assert name in out
    code, out, _ = run(capsys, "models", "--registry", str(registry), "show", "tiny-clip")
    assert code == 0 and json.loads(out)["source"]["repo"] == "tiny/clip"


def test_unknown_name_suggests_close_matches(registry, capsys, tmp_path):
    code, out, err = run(capsys, "models", "--registry", str(registry), "fetch", "tiny-detox", "--to", str(tmp_path / "m"))
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and "did you mean tiny-detoxify" in lines[0]
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------------------------
# fetch -> verify


def test_fetch_set_lays_out_loadable_folders_then_verify_and_tamper(registry, hub, tmp_path, capsys):
    dest = tmp_path / "models"
    code, out, err = run(capsys, "models", "--registry", str(registry), "fetch", "tiny-defaults", "--to", str(dest))
    assert code == 0, err
    assert f"--toxicity-model local:{dest / 'tiny-detoxify'}" in out
    assert f"--nsfw-head {dest / 'tiny-nsfw' / 'nsfw_head.safetensors'}" in out
    manifest = json.loads((dest / "models.json").read_text())
    assert manifest["format"] == 1
    m = manifest["models"]
    assert {k: m[k]["spec"] for k in m} == {"tiny-detoxify": "local:tiny-detoxify", "tiny-clip": "local-dir:tiny-clip",
                                            "tiny-nsfw": "tiny-nsfw/nsfw_head.safetensors", "tiny-t5": "local:tiny-t5"}
    assert m["tiny-detoxify"]["files"]["checkpoint.ckpt"]["pinned"] is True
    assert m["tiny-detoxify"]["files"]["vocab.txt"]["pinned"] is False
    assert m["tiny-clip"]["role"] == "clip" and m["tiny-clip"]["embed_dim"] == 64 and m["tiny-clip"]["dir"] == "tiny-clip"
    for name, rec in m.items():
        for rel, f in rec["files"].items():
            p = dest / name / rel
            assert p.is_file() and f["size"] == p.stat().st_size and f["sha256"] == sha(p)
    assert not (dest / ".kiln-staging").exists()
    assert sorted(p.name for p in (dest / "tiny-clip").iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]

    # the folders load with the stages' own local loaders
    from embed.t5 import check_model_dir
    from filters.nsfw import load_nsfw_state_dict
    from filters.toxicity import ToxicityScorer

    from filters.clip_similarity import _check_open_clip_dir

    assert _check_open_clip_dir(dest / "tiny-clip", "local-dir:tiny-clip").endswith("open_clip_model.safetensors")
    check_model_dir(dest / "tiny-t5")
    assert load_nsfw_state_dict(dest / "tiny-nsfw" / "nsfw_head.safetensors")[0]
    scorer = ToxicityScorer(f"local:{dest / 'tiny-detoxify'}")
    assert len(scorer.score(["a red bicycle"])) == 1

    # verify passes; a tampered file is one line naming it; exit 1
    code, out, err = run(capsys, "models", "verify", str(dest))
    assert code == 0, err
    cfg = dest / "tiny-clip" / "open_clip_config.json"
    cfg.write_bytes(cfg.read_bytes().replace(b"{", b"[", 1))  # same size, other bytes
    vocab = dest / "tiny-detoxify" / "vocab.txt"
    vocab.write_text(vocab.read_text() + "extra\n")
    (dest / "tiny-t5" / "spiece.model").unlink()
    code, out, err = run(capsys, "models", "verify", str(dest))
    assert code == 1
    problems = [ln for ln in err.splitlines() if ln.startswith("kiln models verify: ")]
    assert len(problems) == 3
    assert problems[0].startswith("kiln models verify: tiny-clip/open_clip_config.json: sha256 ")
    assert f"models.json says {m['tiny-clip']['files']['open_clip_config.json']['sha256']}" in problems[0]
    assert problems[1].startswith("kiln models verify: tiny-detoxify/vocab.txt: size ")
    assert problems[2] == "kiln models verify: tiny-t5/spiece.model: missing"
    assert len(error_lines(err)) == 1

    # a re-fetch repairs exactly what is wrong and keeps what is right
    hub.requests.clear()
    code, out, err = run(capsys, "models", "--registry", str(registry), "fetch", "tiny-defaults", "--to", str(dest))
    assert code == 0, err
    fetched = {p for (method, p, _) in hub.requests if method == "GET"}
    assert fetched == {"/tiny/bert-tokenizer/resolve/%s/vocab.txt" % hub.tox_commit, "/tiny/t5/resolve/main/spiece.model",
                       "/tiny/clip/resolve/%s/open_clip_config.json" % hub.clip_commit}
    assert run(capsys, "models", "verify", str(dest))[0] == 0


def test_fetch_through_the_installed_command(registry, hub, tmp_path):
    """The real `kiln` entry point in a fresh interpreter: HF_ENDPOINT from the environment, exit codes."""
    dest = tmp_path / "m"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "pipeline.cli", "models", "--registry", str(registry)]
    done = subprocess.run([*cmd, "fetch", "tiny-clip", "--to", str(dest)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"--clip-model local-dir:{dest / 'tiny-clip'}"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "models", "verify", str(dest)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_cut_download_is_resumed_with_a_range_request(registry, hub, tmp_path, capsys, tiny):
    hub.drop_once(RELEASE)
    dest = tmp_path / "m"
    code, out, err = run(capsys, "models", "--registry", str(registry), "fetch", "tiny-detoxify", "--to", str(dest))
    assert code == 0, err
    gets = [(p, r) for (m, p, r) in hub.requests if m == "GET" and p == RELEASE]
    assert len(gets) == 2 and gets[0][1] is None and gets[1][1].startswith("bytes=") and gets[1][1] != "bytes=0-"
    assert sha(dest / "tiny-detoxify" / "checkpoint.ckpt") == sha(tiny["toxicity"] / "checkpoint.ckpt")


def test_part_file_of_an_earlier_run_is_resumed(registry, hub, tmp_path, capsys, tiny):
    dest = tmp_path / "m"
    data = (tiny["toxicity"] / "checkpoint.ckpt").read_bytes()
    part = dest / ".kiln-staging" / "tiny-detoxify" / "checkpoint.ckpt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])
    code, out, err = run(capsys, "models", "--registry", str(registry), "fetch", "tiny-detoxify", "--to", str(dest))
    assert code == 0, err
    assert ("GET", RELEASE, "bytes=1000-") in hub.requests
    assert (dest / "tiny-detoxify" / "checkpoint.ckpt").read_bytes() == data


def test_wrong_pinned_sha256_installs_nothing(registry, hub, tmp_path, capsys, tiny):
    dest = tmp_path / "m"
    code, out, err = run(capsys, "models", "--registry", str(registry), "fetch", "bad-pin", "--to", str(dest))
    assert code == 1
    lines = error_lines(err)
    assert len(lines) == 1
    assert "bad-pin/nsfw_head.safetensors: sha256 mismatch: expected " + "0" * 64 in lines[0]
    assert f"got {sha(Path(tiny['nsfw']))}" in lines[0]
    assert not (dest / "bad-pin").exists()
    assert not list((dest / ".kiln-staging").rglob("*.safetensors*"))
    assert "bad-pin" not in json.loads((dest / "models.json").read_text())["models"] if (dest / "models.json").exists() else True


def test_pickle_that_carries_code_is_refused_and_removed(registry, hub, tmp_path, capsys):
    dest = tmp_path / "m"
    code, out, err = run(capsys, "models", "--registry", str(registry), "fetch", "evil-head", "--to", str(dest))
    assert code == 1
    lines = error_lines(err)
    assert len(lines) == 1 and "evil-head/head.pth: a pickle that carries code" in lines[0] and "print" in lines[0]
    assert "this would have run" not in out + err
    assert not (dest / "evil-head").exists() and not list(dest.rglob("head.pth*"))


def test_missing_hub_file_names_repo_and_file(registry, hub, tmp_path, capsys):
    code, out, err = run(capsys, "models", "--registry", str(registry), "fetch", "missing-file", "--to", str(tmp_path / "m"))
    assert code == 1
    lines = error_lines(err)
    assert len(lines) == 1
    assert "tiny/t5" in lines[0] and "pytorch_model.bin" in lines[0] and "404" in lines[0]


def test_mirror_replaces_the_release_host(registry, hub, tmp_path, capsys):
    dest = tmp_path / "m"
    code, out, err = run(capsys, "models", "--registry", str(registry), "fetch", "mirrored-head", "--to", str(dest),
                         "--mirror", hub.url)
    assert code == 0, err
    assert ("GET", MIRRORED, None) in hub.requests
    assert (dest / "mirrored-head" / "head.safetensors").is_file()


def test_refused_connection_is_one_line(registry, hub, tmp_path, capsys, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    code, out, err = run(capsys, "models", "--registry", str(registry), "fetch", "tiny-clip", "--to", str(tmp_path / "a"))
    assert code == 1
    assert len(error_lines(err)) == 1 and "connection refused" in err and f"127.0.0.1:{port}" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, "models", "--registry", str(registry), "fetch", "mirrored-head", "--to", str(tmp_path / "b"),
                         "--mirror", f"http://127.0.0.1:{port}")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "connection refused" in err


def test_verify_without_models_json(tmp_path, capsys):
    code, out, err = run(capsys, "models", "verify", str(tmp_path))
    assert code == 1 and len(error_lines(err)) == 1 and "models.json" in err


def test_a_file_that_needs_converting_is_converted_and_recorded(registry, hub, tmp_path, capsys, monkeypatch, tiny):
    import shutil

    from pipeline.models import fetch

    calls = []

    def fake_convert(module, src, dst):
        calls.append((module, src.name, dst.name))
        assert src.read_bytes() == KERAS_BYTES
        shutil.copyfile(tiny["nsfw"], dst)

    monkeypatch.setattr(fetch, "convert", fake_convert)
    dest = tmp_path / "m"
    code, out, err = run(capsys, "models", "--registry", str(registry), "fetch", "tiny-keras", "--to", str(dest))
    assert code == 0, err
    assert calls == [("nsfw_keras", "clip_autokeras_tiny.zip", "nsfw_head.safetensors")]
    rec = json.loads((dest / "models.json").read_text())["models"]["tiny-keras"]
    assert rec["spec"] == "tiny-keras/nsfw_head.safetensors" and rec["convert"] == "nsfw_keras" and rec["converted"] is True
    assert rec["files"]["nsfw_head.safetensors"] == {"sha256": sha(Path(tiny["nsfw"])), "size": Path(tiny["nsfw"]).stat().st_size,
                                                     "pinned": False}
    assert out.strip() == f"--nsfw-head {dest / 'tiny-keras' / 'nsfw_head.safetensors'}"
    assert run(capsys, "models", "verify", str(dest))[0] == 0


def test_a_failed_conversion_leaves_the_download_and_says_what_to_run(registry, hub, tmp_path, capsys, monkeypatch):
    from pipeline.models import fetch

    monkeypatch.setattr(fetch, "convert", lambda module, src, dst: "not a Keras SavedModel zip")
    dest = tmp_path / "m"
    code, out, err = run(capsys, "models", "--registry", str(registry), "fetch", "tiny-keras", "--to", str(dest))
    assert code == 0, err
    assert "not converted (not a Keras SavedModel zip)" in err
    assert f"python -m filters.nsfw_keras {dest / 'tiny-keras' / 'clip_autokeras_tiny.zip'}" in out
    rec = json.loads((dest / "models.json").read_text())["models"]["tiny-keras"]
    assert rec["converted"] is False and list(rec["files"]) == ["clip_autokeras_tiny.zip"]


def test_cut_hub_download_is_retried(registry, hub, tmp_path, capsys, tiny):
    """huggingface_hub's own retry after a cut connection (it may restart the file); the result is whole."""
    path = f"/tiny/clip/resolve/{hub.clip_commit}/open_clip_model.safetensors"
    hub.drop_once(path)
    dest = tmp_path / "m"
    code, out, err = run(capsys, "models", "--registry", str(registry), "fetch", "tiny-clip", "--to", str(dest))
    assert code == 0, err
    gets = [r for (m, p, r) in hub.requests if m == "GET" and p == path]
    assert len(gets) == 2
    assert sha(dest / "tiny-clip" / "open_clip_model.safetensors") == sha(tiny["clip"] / "open_clip_model.safetensors")


def test_a_new_source_in_the_registry_refetches_unpinned_files(registry, hub, tmp_path, capsys):
    dest = tmp_path / "m"
    assert run(capsys, "models", "--registry", str(registry), "fetch", "tiny-t5", "--to", str(dest))[0] == 0
    entry = json.loads((registry / "tiny-t5.json").read_text())
    entry["source"]["revision"] = hub.t5_commit  # "main" -> a pinned commit: recorded hashes no longer vouch
    (registry / "tiny-t5.json").write_text(json.dumps(entry))
    hub.requests.clear()
    assert run(capsys, "models", "--registry", str(registry), "fetch", "tiny-t5", "--to", str(dest))[0] == 0
    assert len([1 for (m, p, _) in hub.requests if m == "GET"]) == 5
    assert json.loads((dest / "models.json").read_text())["models"]["tiny-t5"]["source"]["revision"] == hub.t5_commit
