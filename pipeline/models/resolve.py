"""One resolver: what a model flag names -> what the stage's loader opens, and where it came from.

Every model flag (--toxicity-model, --clip-model, --nsfw-head, --t5-model) takes one grammar:

    local:PATH           a folder (or, for --nsfw-head, a file) on this machine, for every kind
                         (`local-dir:PATH`, open_clip's own prefix, keeps working)
    NAME                 a model of kiln's registry (`kiln models list`), taken from --models DIR,
                         the folder `kiln models fetch NAME --to DIR` wrote
    ORG/REPO[@REV]       a hub id in this machine's Hugging Face cache (T5; `hf-hub:ORG/REPO[@REV]`
                         for open_clip); @REV pins a revision (a commit, tag or branch)
    a library's own name what the library resolves from its local cache (Detoxify `original`,
                         open_clip `ViT-B-32:openai`): kiln never downloads at run time

The flags' defaults are the libraries' names for the models of the `laion400m-defaults` set, so with
`--models DIR` the default run takes each of them from DIR. `resolve` returns the spec the stage's
loader takes (`local:` / `local-dir:` / a file path / the name unchanged) and a provenance record
(the spec given, the registry name, the licence, the source, every file's sha256) that stats.json
and the card show. A model that is not there raises `ModelNotHere`: one line naming the flag, what is
missing and the one command that fetches it. Used by `kiln prepare` (pipeline.prepare),
`kiln embed-prompts`, and the Dockerfile (through `kiln models fetch`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pipeline.errors import UserError

__all__ = ["ALIASES", "DEFAULT_SET", "FLAGS", "ModelNotHere", "Resolved", "resolve"]

FLAGS = {"toxicity": "--toxicity-model", "clip": "--clip-model", "nsfw": "--nsfw-head", "t5": "--t5-model"}
DEFAULT_SET = "laion400m-defaults"
# The libraries' own names for models of the registry (the flags' defaults among them).
ALIASES = {
    "original": "detoxify-original", "unbiased": "detoxify-unbiased", "multilingual": "detoxify-multilingual",
    "ViT-B-32:openai": "ViT-B-32-openai", "ViT-L-14:openai": "ViT-L-14-openai",
    "ViT-H-14:laion2b_s32b_b79k": "ViT-H-14-laion2b_s32b_b79k",
    "google/t5-v1_1-xxl": "t5-v1_1-xxl", "google/flan-t5-xxl": "flan-t5-xxl",
}
_HEAD_SUFFIXES = (".safetensors", ".pth", ".pt")


class ModelNotHere(UserError, ValueError):
    """A model flag names a model that is not on this machine (or not in --models DIR). Exit 2."""

    def __init__(self, message: str, role: str = "", name: str | None = None):
        super().__init__(message)
        self.role, self.name = role, name


@dataclasses.dataclass(frozen=True)
class Resolved:
    role: str
    spec: str  # what the user gave (or the default)
    loader_spec: str  # what the stage's loader takes
    record: dict  # provenance: spec, name, license, source, files (sha256) where known


def _fetch_hint(name: str, models_dir: str | None) -> str:
    to = models_dir or "models/"
    return f"fetch it with `kiln models fetch {name} --to {to}` and pass --models {to}"


def _local(role: str, spec: str) -> Resolved:
    flag = FLAGS[role]
    path = Path(os.path.expanduser(spec.split(":", 1)[1])).resolve()
    if not path.exists():
        raise ModelNotHere(f"{flag} {spec}: {path} does not exist; pass an existing folder"
                           f"{' or file' if role == 'nsfw' else ''}, or a registry model with --models DIR", role)
    if role == "nsfw":
        if path.is_dir():
            heads = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _HEAD_SUFFIXES)
            if len(heads) != 1:
                raise ModelNotHere(f"{flag} {spec}: the folder holds {len(heads)} head files (.safetensors/.pth/.pt), "
                                   f"not one; name the file: {flag} local:{path}/FILE", role)
            path = heads[0]
        loader = str(path)
    elif role == "clip":
        loader = f"local-dir:{path}"
    else:
        loader = f"local:{path}"
    return Resolved(role, spec, loader, {"spec": spec, "path": str(path)})


def _manifest(models_dir: str) -> dict:
    from pipeline.models.fetch import MANIFEST, read_manifest

    root = Path(models_dir).expanduser()
    if not (root / MANIFEST).is_file():
        what = "does not exist" if not root.exists() else f"has no {MANIFEST}"
        raise ModelNotHere(f"--models {models_dir} {what}: fill it with `kiln models fetch {DEFAULT_SET} --to {models_dir}`")
    return read_manifest(root)


def _from_dir(role: str, spec: str, name: str, rec: dict, models_dir: str) -> Resolved:
    flag = FLAGS[role]
    root = Path(models_dir).expanduser().resolve()
    if rec.get("role") != role:
        raise ModelNotHere(f"{flag} {spec}: {name} in --models {models_dir} is a {rec.get('role')} model, not a {role} "
                           f"model; pick one with `kiln models list`", role, name)
    if rec.get("convert") and not rec.get("converted"):
        raise ModelNotHere(f"{flag} {spec}: {name} in {models_dir} was fetched but not converted; run "
                           f"`kiln models fetch {name} --to {models_dir}` again (it converts with python -m filters.{rec['convert']})",
                           role, name)
    rel = rec["spec"]
    if rel.startswith(("local:", "local-dir:")):
        prefix, sub = rel.split(":", 1)
        loader = f"{prefix}:{root / sub}"
    else:
        loader = str(root / rel)
    record = {"spec": spec, "name": name, "models_dir": str(root), "license": rec.get("license"),
              "source": rec.get("source"), "files": {k: v.get("sha256") for k, v in sorted(rec.get("files", {}).items())}}
    return Resolved(role, spec, loader, record)


def _hub_revision(role: str, spec: str) -> Resolved:
    """ORG/REPO@REV (T5) or hf-hub:ORG/REPO@REV (open_clip): that revision's folder in the local HF cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    flag = FLAGS[role]
    body = spec[len("hf-hub:"):] if spec.startswith("hf-hub:") else spec
    repo, rev = body.rsplit("@", 1)
    try:
        path = Path(snapshot_download(repo_id=repo, revision=rev, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise ModelNotHere(f"{flag} {spec}: revision {rev} of {repo} is not in this machine's Hugging Face cache and kiln "
                           f"downloads nothing at run time ({type(err).__name__}); download it on a machine with network "
                           f"(`huggingface-cli download {repo} --revision {rev}`) or pass {flag} local:DIR", role) from None
    loader = f"local-dir:{path}" if role == "clip" else f"local:{path}"
    return Resolved(role, spec, loader, {"spec": spec, "repo": repo, "revision": rev, "path": str(path)})


def resolve(role: str, spec: str, models_dir: str | None = None) -> Resolved:
    """What the `role` stage's loader opens for the flag value `spec` (see the module docstring)."""
    if role not in FLAGS:
        raise ValueError(f"unknown model role {role!r}")
    flag = FLAGS[role]
    spec = (spec or "").strip()
    if not spec:
        raise ModelNotHere(f"{flag} is empty: name a model (`kiln models list`), local:PATH, or turn the stage off", role)
    if spec.startswith(("local:", "local-dir:")):
        return _local(role, spec)
    name = ALIASES.get(spec, spec)
    if models_dir:
        models = _manifest(models_dir)["models"]
        if name in models:
            return _from_dir(role, spec, name, models[name], models_dir)
    from pipeline.models.registry import load_registry

    registry = load_registry()
    if name in registry.models:
        if models_dir:
            raise ModelNotHere(f"{flag} {spec}: {name} is not in --models {models_dir}; {_fetch_hint(name, models_dir)}", role, name)
        if spec == name:  # a registry name (not a library's own name a cache may hold): only a fetched folder has it
            raise ModelNotHere(f"{flag} {spec} is a model of kiln's registry and is not on this machine; "
                               f"{_fetch_hint(name, None)}", role, name)
    if "@" in spec and "/" in spec and role in ("t5", "clip"):
        return _hub_revision(role, spec)
    return Resolved(role, spec, spec, {"spec": spec, **({"name": name} if name in registry.models else {})})
