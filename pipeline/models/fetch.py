"""Fetching registry models into DIR/<name>/ and recording them in DIR/models.json; verifying them later.

Every file is downloaded into DIR/.kiln-staging/<name>/ (hub files with huggingface_hub's
`hf_hub_download(local_dir=...)`, which honours HF_ENDPOINT and resumes its own `.incomplete`
files; release URLs with `download_url`, which resumes a `.part` file with Range requests), then
checked -- size and sha256 where the registry pins them (sha256 prefix and git blob id too),
`torch.load(weights_only=True)` for pickled weights, a header read for safetensors -- and only then
renamed into place, so a file appears whole or not at all. A file that fails a check is deleted
and the run stops with one RunFailed line naming the file, what was expected and what came.

DIR/models.json (written atomically after each model) is what the stages' resolver reads:

    {"format": 1, "models": {NAME: {"role", "dir": NAME, "spec": "local:NAME" | "local-dir:NAME" |
     "NAME/head.safetensors", "files": {RELPATH: {"sha256", "size", "pinned"}}, "license", "source",
     "embed_dim", "threshold", "flag", ...}}}

Specs are relative to DIR, so the folder can move (or be baked into an image).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from filters.weights import sha256_file  # kiln's one file-hash helper
from pipeline.errors import RunFailed, UserError
from pipeline.models.registry import file_origin, spec_for

__all__ = ["FORMAT", "MANIFEST", "convert", "download_url", "fetch_models", "read_manifest", "sha256_file", "verify_dir"]

FORMAT = 1
MANIFEST = "models.json"
STAGING = ".kiln-staging"
PICKLE_SUFFIXES = (".ckpt", ".pth", ".bin", ".pt")
CHUNK = 1 << 20
USER_AGENT = "kiln-models/1"


# --------------------------------------------------------------------------------------------
# Progress


class Progress:
    """One updating line on stderr when it is a terminal; silent otherwise."""

    def __init__(self, label: str, total: int | None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label, self.total, self.done, self._last = label, total, 0, 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last > 0.2:
            self._last = now
            total = f"/{_human(self.total)}" if self.total else ""
            pct = f" {100 * self.done / self.total:5.1f}%" if self.total else ""
            self.stream.write(f"\r{self.label}: {_human(self.done)}{total}{pct}\033[K")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write(f"\r{self.label}: {_human(self.done)} done\033[K\n")
            self.stream.flush()


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


# --------------------------------------------------------------------------------------------
# Hashing


def git_blob_sha1(path: str | os.PathLike) -> str:
    """The git object id of the file's bytes (`git hash-object`)."""
    size = os.path.getsize(path)
    h = hashlib.sha1(f"blob {size}\0".encode())  # noqa: S324 - git's object id, not a security hash
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Release URLs: a small resumable downloader


def mirrored(url: str, mirror: str | None) -> str:
    """`url` with its scheme and host replaced by `mirror` (which may carry a path prefix)."""
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return mirror.rstrip("/") + path


def _host(url: str) -> str:
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


def download_url(url: str, dest: str | os.PathLike, label: str, expected_size: int | None = None,
                 retries: int = 4, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` (written as `dest.part`, resumed with a Range request after a cut
    connection -- in this call, up to `retries` times, or in a later run), renamed to `dest` when
    complete. RunFailed: HTTP errors, a refused/unreachable host, a size that does not match."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if expected_size is not None and have > expected_size:
            part.unlink()
            have = 0
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        if have:
            req.add_header("Range", f"bytes={have}-")
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s) URLs of the registry
        except urllib.error.HTTPError as err:
            if err.code == 416 and have and (expected_size is None or have == expected_size):
                break  # the .part is already complete
            raise RunFailed(f"{label}: {url} answered HTTP {err.code} {err.reason}"
                            + (" (no such file there)" if err.code == 404 else "")) from None
        except urllib.error.URLError as err:
            reason = err.reason
            what = (f"connection refused by {_host(url)}" if isinstance(reason, ConnectionRefusedError)
                    else f"cannot reach {_host(url)} ({reason})")
            raise RunFailed(f"{label}: {what} -- check the network, or pass --mirror URL") from None
        except (TimeoutError, socket.timeout, ConnectionError) as err:
            attempt += 1
            if attempt > retries:
                raise RunFailed(f"{label}: {url}: {err or type(err).__name__} after {retries} retries -- re-run to resume") from None
            time.sleep(min(2.0, 0.2 * attempt))
            continue
        with resp:
            status = getattr(resp, "status", 200)
            mode = "ab" if (have and status == 206) else "wb"
            start = have if mode == "ab" else 0
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else expected_size
            progress = Progress(label, total)
            progress.done = start
            try:
                with open(part, mode) as out:
                    for chunk in iter(lambda: resp.read(CHUNK), b""):
                        out.write(chunk)
                        progress.update(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
            except (http.client.IncompleteRead, ConnectionError, TimeoutError, socket.timeout) as err:
                progress.close()
                attempt += 1
                if attempt > retries:
                    raise RunFailed(f"{label}: the connection to {_host(url)} kept breaking "
                                    f"({type(err).__name__}); re-run the same command to resume") from None
                time.sleep(min(2.0, 0.2 * attempt))
                continue
            progress.close()
            got = part.stat().st_size
            if total is not None and got < total:
                attempt += 1
                if attempt > retries:
                    raise RunFailed(f"{label}: got {got} of {total} bytes; re-run the same command to resume")
                continue
            break
    got = part.stat().st_size
    if expected_size is not None and got != expected_size:
        part.unlink()
        raise RunFailed(f"{label}: the download is {got} bytes, the registry says {expected_size}; it was not installed")
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------------
# Hub files


@contextlib.contextmanager
def _hub_online():
    """`kiln models fetch` is an explicit request to download: lift HF_HUB_OFFLINE for its calls only."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


_REACHED: set[str] = set()


def _probe(url: str, label: str, what: str) -> None:
    """Fail fast, in one line, when `url`'s host refuses connections or does not resolve (huggingface_hub
    would retry for half a minute, logging each retry)."""
    parts = urllib.parse.urlsplit(url)
    key = f"{parts.scheme}://{parts.netloc}"
    if key in _REACHED:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=15).close()
    except ConnectionRefusedError:
        raise RunFailed(f"{label}: connection refused by {what} {key} -- check the network, or set HF_ENDPOINT to a mirror") from None
    except OSError as err:
        raise RunFailed(f"{label}: cannot reach {what} {key} ({err.strerror or err}) -- check the network, or set "
                        "HF_ENDPOINT to a mirror") from None
    _REACHED.add(key)


def download_hub(repo: str, revision: str, filename: str, staging: Path, label: str) -> Path:
    """hf_hub_download into `staging` (resumable); its errors as one RunFailed line."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.utils import logging as hf_logging

    _probe(_endpoint(), label, "the hub at")
    hf_logging.set_verbosity_error()
    if not sys.stderr.isatty():
        huggingface_hub.utils.disable_progress_bars()
    try:
        with _hub_online():
            got = huggingface_hub.hf_hub_download(repo_id=repo, filename=filename, revision=revision,
                                                  local_dir=str(staging), endpoint=_endpoint())
    except hf_errors.RemoteEntryNotFoundError:
        raise RunFailed(f"{label}: the hub repo {repo} (revision {revision}) has no file {filename} (404)") from None
    except hf_errors.RevisionNotFoundError:
        raise RunFailed(f"{label}: the hub repo {repo} has no revision {revision}") from None
    except hf_errors.RepositoryNotFoundError:
        raise RunFailed(f"{label}: no hub repo {repo} at {_endpoint()} (or it is private/gated: log in with `hf auth login`)") from None
    except hf_errors.LocalEntryNotFoundError as err:
        cause = err.__cause__ or err.__context__
        raise RunFailed(f"{label}: cannot reach the hub at {_endpoint()} ({_first_line(cause or err)}) -- check the "
                        "network, or set HF_ENDPOINT to a mirror") from None
    except hf_errors.HfHubHTTPError as err:
        raise RunFailed(f"{label}: the hub answered {_first_line(err)}") from None
    except hf_errors.FileMetadataError as err:
        raise RunFailed(f"{label}: {_endpoint()} does not answer like a Hugging Face hub ({_first_line(err)})") from None
    return Path(got)


def _first_line(err: BaseException) -> str:
    text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return text if len(text) <= 160 else text[:157] + "..."


# --------------------------------------------------------------------------------------------
# Checks


def _check_weights(path: Path, entry: dict, rel: str) -> None:
    """A pickled checkpoint must load with torch.load(weights_only=True); a safetensors file must
    have a readable header. RunFailed (the caller deletes the file) otherwise."""
    label = f"{entry['name']}/{rel}"
    if path.suffix in PICKLE_SUFFIXES:
        import pickle
        import warnings

        import torch

        from filters.weights import pickle_refusal

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                try:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as err:
                    if "mmap" not in str(err):
                        raise
                    torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot mmap
        except pickle.UnpicklingError as err:
            code = pickle_refusal(err)
            if code:
                raise RunFailed(f"{label}: a pickle that carries code ({code}) is refused because loading it could run "
                                "that code; it was not installed") from None
            raise RunFailed(f"{label}: not a PyTorch checkpoint ({_first_line(err)}); it was not installed") from None
        except (EOFError, RuntimeError) as err:
            raise RunFailed(f"{label}: truncated or not a PyTorch checkpoint ({_first_line(err)}); it was not installed") from None
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu"):
                pass
        except SafetensorError as err:
            raise RunFailed(f"{label}: truncated or not a safetensors file ({_first_line(err)}); it was not installed") from None


def _check_file(path: Path, entry: dict, f: dict) -> dict:
    """Size, sha256 (+ prefix, git blob id) and loadability of a staged file; {"sha256", "size", "pinned"}."""
    label = f"{entry['name']}/{f['path']}"
    size = path.stat().st_size
    if f.get("size") is not None and size != f["size"]:
        raise RunFailed(f"{label}: size mismatch: expected {f['size']} bytes, got {size}; it was not installed")
    digest = sha256_file(path)
    if f.get("sha256") and digest != f["sha256"]:
        raise RunFailed(f"{label}: sha256 mismatch: expected {f['sha256']}, got {digest}; it was not installed")
    if f.get("sha256_prefix") and not digest.startswith(f["sha256_prefix"]):
        raise RunFailed(f"{label}: sha256 mismatch: expected {f['sha256_prefix']}..., got {digest}; it was not installed")
    if f.get("git_blob_sha1"):
        blob = git_blob_sha1(path)
        if blob != f["git_blob_sha1"]:
            raise RunFailed(f"{label}: git blob id mismatch: expected {f['git_blob_sha1']}, got {blob}; it was not installed")
    _check_weights(path, entry, f["path"])
    pinned = bool(f.get("sha256"))
    return {"sha256": digest, "size": size, "pinned": pinned}


# --------------------------------------------------------------------------------------------
# models.json


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.exists():
        return {"format": FORMAT, "models": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFailed(f"{path} is not valid JSON ({err}); delete it and fetch again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("models"), dict):
        raise RunFailed(f"{path} is not a kiln models.json of format {FORMAT}; delete it and fetch again")
    return data


def _write_manifest(root: Path, data: dict) -> None:
    tmp = root / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST)


def _record(entry: dict, files: dict) -> dict:
    rec = {
        "role": entry["role"], "dir": entry["name"], "spec": spec_for(entry), "files": files,
        "license": entry["license"], "source": entry["source"], "embed_dim": entry.get("embed_dim"),
        "threshold": entry.get("threshold"), "flag": entry["flag"],
    }
    if entry.get("threshold_source"):
        rec["threshold_source"] = entry["threshold_source"]
    if entry.get("convert"):
        rec["convert"] = entry["convert"]
        rec["converted"] = entry["head"] in files
    return rec


# --------------------------------------------------------------------------------------------
# fetch / verify


def _installed_ok(final: Path, f: dict, known: dict | None) -> dict | None:
    """The record of an already installed file that still matches its pin (or models.json), else None."""
    if not final.is_file():
        return None
    want = f.get("sha256") or (known or {}).get("sha256")
    if not want:
        return None
    size = final.stat().st_size
    if f.get("size") is not None and size != f["size"]:
        return None
    digest = sha256_file(final)
    return {"sha256": digest, "size": size, "pinned": bool(f.get("sha256"))} if digest == want else None


def convert(module: str, src: Path, dst: Path) -> str | None:
    """Run `python -m filters.<module> SRC DST --force` (e.g. filters.nsfw_keras: LAION's autokeras zip ->
    a safetensors head); None on success, else the converter's last line of stderr."""
    import importlib.util
    import subprocess

    try:
        found = importlib.util.find_spec(f"filters.{module}")
    except ImportError:
        found = None
    if found is None:
        return f"filters.{module} is not installed"
    import filters

    env = dict(os.environ)
    src_root = str(Path(filters.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src_root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    done = subprocess.run([sys.executable, "-m", f"filters.{module}", str(src), str(dst), "--force"],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        return lines[-1].strip() if lines else f"exit {done.returncode}"
    return None if dst.is_file() else f"filters.{module} wrote no {dst.name}"


def fetch_model(entry: dict, root: Path, manifest: dict, mirror: str | None = None, log=None) -> dict:
    """Fetch every file of `entry` into root/<name>/ (atomic per file); returns its models.json record."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    name = entry["name"]
    target = root / name
    staging = root / STAGING / name
    before = manifest["models"].get(name) or {}
    # hashes recorded for another source (the registry moved to a new revision or URL) vouch for nothing
    known = before.get("files", {}) if before.get("source") == entry["source"] else {}
    files: dict[str, dict] = {}
    changed = False
    for f in entry["files"]:
        rel = f["path"]
        final = target / rel
        label = f"{name}/{rel}"
        kept = _installed_ok(final, f, known.get(rel))
        if kept is not None:
            files[rel] = kept
            continue
        changed = True
        origin = file_origin(entry, f)
        if origin["kind"] == "url":
            staged = download_url(mirrored(origin["url"], mirror), staging / rel, label, expected_size=f.get("size"))
        else:
            staged = download_hub(origin["repo"], origin["revision"], origin["filename"], staging, label)
            if origin["filename"] != rel:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, staging / rel)
                staged = staging / rel
        try:
            files[rel] = _check_file(staged, entry, f)
        except UserError:
            staged.unlink(missing_ok=True)
            raise
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)
        log(f"kiln models: {label} ({_human(files[rel]['size'])}, sha256 {files[rel]['sha256'][:12]}"
            f"{', pinned' if files[rel]['pinned'] else ', recorded'})")
    if entry.get("convert"):
        head = target / entry["head"]
        if changed or not head.is_file():
            src = target / entry["files"][0]["path"]
            problem = convert(entry["convert"], src, head)
            if problem:
                log(f"kiln models: {name}: not converted ({problem}); convert it yourself: "
                    f"python -m filters.{entry['convert']} {src} {head}")
            else:
                log(f"kiln models: {name}/{entry['head']} converted with filters.{entry['convert']}")
        if head.is_file():  # verify re-hashes the converted head too
            files[entry["head"]] = {"sha256": sha256_file(head), "size": head.stat().st_size, "pinned": False}
    shutil.rmtree(staging, ignore_errors=True)
    return _record(entry, files)


def fetch_models(entries: list[dict], root: str | os.PathLike, mirror: str | None = None, log=None) -> dict:
    """Fetch `entries` into `root`, updating root/models.json after each model; returns the manifest."""
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(root)
    for entry in entries:
        manifest["models"][entry["name"]] = fetch_model(entry, root, manifest, mirror=mirror, log=log)
        _write_manifest(root, manifest)
    staging = root / STAGING
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    return manifest


def verify_dir(root: str | os.PathLike) -> list[str]:
    """Every problem of root's models (a missing file, a size or sha256 that differs from models.json),
    one line each; [] when all is well. RunFailed when there is no models.json."""
    root = Path(root).expanduser()
    if not (root / MANIFEST).is_file():
        raise RunFailed(f"{root} has no {MANIFEST}: it is not a folder `kiln models fetch --to` wrote")
    manifest = read_manifest(root)
    problems = []
    for name, rec in sorted(manifest["models"].items()):
        base = root / rec.get("dir", name)
        for rel, want in sorted((rec.get("files") or {}).items()):
            path = base / rel
            label = f"{rec.get('dir', name)}/{rel}"
            if not path.is_file():
                problems.append(f"{label}: missing")
                continue
            size = path.stat().st_size
            if size != want.get("size"):
                problems.append(f"{label}: size {size}, models.json says {want.get('size')}")
                continue
            digest = sha256_file(path)
            if digest != want.get("sha256"):
                problems.append(f"{label}: sha256 {digest}, models.json says {want.get('sha256')}")
    return problems
