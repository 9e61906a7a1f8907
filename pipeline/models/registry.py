"""The model registry: one JSON file per model in `registry/` (plus `sets.json`), validated on load.

An entry (see registry/*.json):

    name         the folder it is fetched into (DIR/<name>/) and the name `kiln models` takes
    role         toxicity | clip | nsfw | t5
    description  one line
    source       {"kind": "hub", "repo", "revision"} or {"kind": "url", "urls": [...]} (+ "hub" for the
                 companion files of a url model, e.g. Detoxify's transformers config/tokenizer)
    files        [{"path": where it lands under DIR/<name>/,
                   "url": a release URL  |  "filename": the file in the hub repo (repo/revision from the
                   file, else source, else source.hub),
                   "size": int|null, "sha256": hex|null, "sha256_source": where the hash is stated|null,
                   optional "sha256_prefix" (+ _source), "git_blob_sha1" (+ _source)}]
    license, embed_dim (clip/nsfw input width, t5 d_model, or null), threshold (+ threshold_source)
    flag         the kiln flag the folder feeds (--toxicity-model, --clip-model, --nsfw-head, --t5-model)
    layout       local (spec "local:<name>") | local-dir ("local-dir:<name>") | file ("<name>/<head>")
    head         (layout file) the file --nsfw-head takes; convert: a converter module (filters.<convert>)
                 that must turn the fetched file into `head` first
    notes        optional

A hash or size is only ever one a public source states (named in *_source) or null; null ones are
hashed on first fetch and recorded in DIR/models.json.

The registry folder is `registry/` next to this file, or $KILN_MODEL_REGISTRY, or the `path`
argument. Every problem is one `RegistryError` line naming the file and the field.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError

__all__ = ["ROLES", "LAYOUTS", "Registry", "RegistryError", "UnknownModel", "file_origin", "get", "load_registry", "registry_dir",
           "resolve_names", "spec_for"]

ROLES = ("toxicity", "clip", "nsfw", "t5")
LAYOUTS = ("local", "local-dir", "file")
FLAGS = {"toxicity": "--toxicity-model", "clip": "--clip-model", "nsfw": "--nsfw-head", "t5": "--t5-model"}
ENV = "KILN_MODEL_REGISTRY"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX40 = re.compile(r"[0-9a-f]{40}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class RegistryError(UserError):
    """The registry itself is malformed (a file, an entry, a field): exit 2."""


class UnknownModel(UserError):
    """A name that is neither a model nor a set of the registry: exit 2."""


@dataclass
class Registry:
    path: Path
    models: dict[str, dict] = field(default_factory=dict)
    sets: dict[str, dict] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(self.models) + sorted(self.sets)


def registry_dir(path: str | os.PathLike | None = None) -> Path:
    if path:
        return Path(path).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    return Path(__file__).resolve().parent / "registry"


def _check_file_entry(where: str, f: object, source: dict) -> None:
    def bad(what: str) -> RegistryError:
        return RegistryError(f"{where}: {what}")

    if not isinstance(f, dict):
        raise bad("must be an object")
    path = f.get("path")
    if not isinstance(path, str) or not path or path.startswith("/") or ".." in Path(path).parts or "\\" in path:
        raise bad("'path' must be a relative path inside the model's folder")
    has_url, has_name = "url" in f, "filename" in f
    if has_url == has_name:
        raise bad("needs exactly one of 'url' (a release URL) or 'filename' (a file of the hub repo)")
    if has_url and not (isinstance(f["url"], str) and re.match(r"https?://[^/]+/", f["url"])):
        raise bad("'url' must be an http(s) URL")
    if has_name:
        if not isinstance(f["filename"], str) or not f["filename"]:
            raise bad("'filename' must be a non-empty string")
        base = source if source.get("kind") == "hub" else (source.get("hub") or {})
        repo, rev = f.get("repo") or base.get("repo"), f.get("revision") or base.get("revision")
        if not isinstance(repo, str) or not repo or not isinstance(rev, str) or not rev:
            raise bad("a hub file needs a repo and a revision (in the file, or the hub source / source.hub)")
    size = f.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise bad("'size' must be a non-negative integer or null")
    sha = f.get("sha256")
    if sha is not None:
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise bad("'sha256' must be 64 lowercase hex digits or null")
        if not isinstance(f.get("sha256_source"), str) or not f["sha256_source"].strip():
            raise bad("a pinned 'sha256' needs 'sha256_source' (where the hash is stated publicly)")
    prefix = f.get("sha256_prefix")
    if prefix is not None and (not isinstance(prefix, str) or not re.fullmatch(r"[0-9a-f]{6,63}", prefix)):
        raise bad("'sha256_prefix' must be 6-63 lowercase hex digits")
    blob = f.get("git_blob_sha1")
    if blob is not None and (not isinstance(blob, str) or not _HEX40.fullmatch(blob)):
        raise bad("'git_blob_sha1' must be 40 lowercase hex digits")


def validate_entry(entry: object, where: str) -> dict:
    """Check one model entry; returns it. RegistryError names `where` and the field."""
    if not isinstance(entry, dict):
        raise RegistryError(f"{where}: an entry must be a JSON object")

    def need(key: str, kinds, what: str):
        if not isinstance(entry.get(key), kinds) or isinstance(entry.get(key), bool):
            raise RegistryError(f"{where}: '{key}' must be {what}")
        return entry[key]

    name = need("name", str, "a string")
    if not _NAME.fullmatch(name):
        raise RegistryError(f"{where}: 'name' {name!r} must be letters, digits, '.', '_' or '-' (it is a folder name)")
    if name in ("models.json", "models") or name.endswith(".tmp"):
        raise RegistryError(f"{where}: 'name' {name!r} is reserved (DIR/models.json lives beside the model folders)")
    where = f"{where} ({name})"
    role = need("role", str, f"one of {', '.join(ROLES)}")
    if role not in ROLES:
        raise RegistryError(f"{where}: 'role' must be one of {', '.join(ROLES)}, not {role!r}")
    need("description", str, "a string")
    need("license", str, "a string")
    source = need("source", dict, "an object")
    kind = source.get("kind")
    if kind == "hub":
        if not isinstance(source.get("repo"), str) or not isinstance(source.get("revision"), str) or not source["revision"]:
            raise RegistryError(f"{where}: a hub source needs 'repo' and 'revision' (a commit, or 'main' said in 'notes')")
    elif kind == "url":
        urls = source.get("urls")
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise RegistryError(f"{where}: a url source needs 'urls', a non-empty list of URLs")
    else:
        raise RegistryError(f"{where}: 'source.kind' must be 'hub' or 'url'")
    files = need("files", list, "a non-empty list")
    if not files:
        raise RegistryError(f"{where}: 'files' must be a non-empty list")
    seen = set()
    for i, f in enumerate(files):
        _check_file_entry(f"{where}: files[{i}]", f, source)
        if f["path"] in seen:
            raise RegistryError(f"{where}: files[{i}]: path {f['path']!r} is listed twice")
        seen.add(f["path"])
    dim = entry.get("embed_dim")
    if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
        raise RegistryError(f"{where}: 'embed_dim' must be a positive integer or null")
    thr = entry.get("threshold")
    if thr is not None and (not isinstance(thr, int | float) or isinstance(thr, bool)):
        raise RegistryError(f"{where}: 'threshold' must be a number or null")
    if thr is not None and not isinstance(entry.get("threshold_source"), str):
        raise RegistryError(f"{where}: a 'threshold' needs 'threshold_source' (its citation)")
    flag = need("flag", str, "the kiln flag it feeds")
    if flag != FLAGS[role]:
        raise RegistryError(f"{where}: 'flag' of a {role} model is {FLAGS[role]}, not {flag!r}")
    layout = need("layout", str, f"one of {', '.join(LAYOUTS)}")
    if layout not in LAYOUTS:
        raise RegistryError(f"{where}: 'layout' must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if layout == "file":
        head = entry.get("head")
        if not isinstance(head, str) or not head:
            raise RegistryError(f"{where}: layout 'file' needs 'head', the file the flag takes")
        if entry.get("convert") is None and head not in seen:
            raise RegistryError(f"{where}: 'head' {head!r} is not one of its files (and no 'convert' makes it)")
    convert = entry.get("convert")
    if convert is not None and (not isinstance(convert, str) or not re.fullmatch(r"[a-z_][a-z0-9_]*", convert)):
        raise RegistryError(f"{where}: 'convert' must name a converter module (filters.<convert>)")
    if "notes" in entry and not isinstance(entry["notes"], str):
        raise RegistryError(f"{where}: 'notes' must be a string")
    return entry


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RegistryError(f"registry file {path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RegistryError(f"registry file {path}: cannot be read ({err})") from None


def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """Every model entry and set of the registry folder, validated (RegistryError on the first problem)."""
    root = registry_dir(path)
    if not root.is_dir():
        raise RegistryError(f"the model registry {root} is not a folder" + (f" (${ENV})" if os.environ.get(ENV) else ""))
    reg = Registry(path=root)
    set_files = []
    for p in sorted(root.glob("*.json")):
        data = _read_json(p)
        if p.name == "sets.json" or (isinstance(data, dict) and data.get("kind") == "set"):
            set_files.append((p, data))
            continue
        entry = validate_entry(data, f"registry file {p.name}")
        if entry["name"] in reg.models:
            raise RegistryError(f"registry file {p.name}: model {entry['name']!r} is also defined in another file")
        if p.stem != entry["name"]:
            raise RegistryError(f"registry file {p.name}: holds model {entry['name']!r}; name the file {entry['name']}.json")
        reg.models[entry["name"]] = entry
    for p, data in set_files:
        sets = data.get("sets") if isinstance(data, dict) and "sets" in data else {data.get("name"): data}
        if not isinstance(sets, dict):
            raise RegistryError(f"registry file {p.name}: 'sets' must be an object {{name: {{members: [...]}}}}")
        for name, s in sets.items():
            where = f"registry file {p.name}: set {name!r}"
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise RegistryError(f"{where}: a set needs a name of letters, digits, '.', '_' or '-'")
            if not isinstance(s, dict) or not isinstance(s.get("members"), list) or not s["members"]:
                raise RegistryError(f"{where}: needs 'members', a non-empty list of model names")
            for m in s["members"]:
                if m not in reg.models:
                    raise RegistryError(f"{where}: member {m!r} is not a model of the registry")
            if name in reg.models or name in reg.sets:
                raise RegistryError(f"{where}: the name is already a model or a set")
            reg.sets[name] = {"name": name, "description": str(s.get("description", "")), "members": list(s["members"])}
    return reg


def _unknown(name: str, reg: Registry) -> UnknownModel:
    close = difflib.get_close_matches(name, reg.names(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "`kiln models list` shows them"
    return UnknownModel(f"no model or set named {name!r} in the registry ({reg.path}); {hint}")


def get(name: str, registry: Registry | None = None) -> dict:
    """The entry of model `name` (a set: {"name", "description", "members"}); UnknownModel with close matches."""
    reg = registry or load_registry()
    if name in reg.models:
        return reg.models[name]
    if name in reg.sets:
        return reg.sets[name]
    raise _unknown(name, reg)


def resolve_names(names: list[str], registry: Registry) -> list[dict]:
    """The model entries `names` name (sets expanded to their members), each once, in order."""
    out: dict[str, dict] = {}
    for n in names:
        if n in registry.sets:
            for m in registry.sets[n]["members"]:
                out.setdefault(m, registry.models[m])
        elif n in registry.models:
            out.setdefault(n, registry.models[n])
        else:
            raise _unknown(n, registry)
    return list(out.values())


def spec_for(entry: dict) -> str:
    """The spec the entry's kiln flag takes for its folder, relative to the models DIR."""
    name, layout = entry["name"], entry["layout"]
    if layout == "local":
        return f"local:{name}"
    if layout == "local-dir":
        return f"local-dir:{name}"
    return f"{name}/{entry['head']}"


def file_origin(entry: dict, f: dict) -> dict:
    """Where one file comes from: {"kind": "url", "url"} or {"kind": "hub", "repo", "revision", "filename"}."""
    if "url" in f:
        return {"kind": "url", "url": f["url"]}
    source = entry["source"]
    base = source if source.get("kind") == "hub" else (source.get("hub") or {})
    return {"kind": "hub", "repo": f.get("repo") or base.get("repo"), "revision": f.get("revision") or base.get("revision"),
            "filename": f["filename"]}
