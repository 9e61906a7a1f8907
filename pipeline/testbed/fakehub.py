"""A fake Hugging Face hub and release host on 127.0.0.1, for testing `kiln models fetch` offline.

    hub = FakeHub()
    hub.add_repo("org/name", {"config.json": b"...", "model.safetensors": Path(...)})  # -> its commit id
    hub.add_release("/owner/repo/releases/download/v1/file.ckpt", Path(...))
    hub.drop_once("/owner/repo/releases/download/v1/file.ckpt")   # first GET is cut mid-file
    with hub:                                   # serving; hub.url is "http://127.0.0.1:PORT"
        os.environ["HF_ENDPOINT"] = hub.url     # huggingface_hub resolves files here

It answers exactly what `huggingface_hub.hf_hub_download` asks (huggingface_hub/file_download.py):
HEAD and GET `/{repo}/resolve/{revision}/{filename}` (revision: the repo's commit id or "main"),
with `X-Repo-Commit`, `ETag` (the sha256 of the bytes, as the hub gives for LFS files; a quoted
value), `Content-Length` and `Accept-Ranges`; Range requests get 206 + Content-Range. A missing
file is a 404 with `X-Error-Code: EntryNotFound` (a missing repo `RepoNotFound`, an unknown
revision `RevisionNotFound`), as the real hub says it. Release files are plain GETs with Range
support. `requests` records (method, path, Range header) of every request.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["FakeHub"]


def _bytes(content: bytes | str | Path) -> bytes:
    if isinstance(content, Path):
        return content.read_bytes()
    return content.encode() if isinstance(content, str) else bytes(content)


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo -> {"commit": str, "files": {filename: bytes}}
        self.releases: dict[str, bytes] = {}  # path -> bytes
        self.dropping: set[str] = set()  # paths whose next GET is cut mid-file
        self.requests: list[tuple[str, str, str | None]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content ------------------------------------------------------------------------------

    def add_repo(self, repo: str, files: dict[str, bytes | str | Path]) -> str:
        """Serve `files` as hub repo `repo`; returns its (fake, content-derived) 40-hex commit id."""
        data = {name: _bytes(c) for name, c in files.items()}
        h = hashlib.sha1(repo.encode())  # noqa: S324 - a fake commit id
        for name in sorted(data):
            h.update(name.encode() + hashlib.sha256(data[name]).digest())
        commit = h.hexdigest()
        self.repos[repo] = {"commit": commit, "files": data}
        return commit

    def add_release(self, path: str, content: bytes | str | Path) -> str:
        """Serve `content` at `path` (e.g. "/owner/repo/releases/download/v1/x.ckpt"); returns its URL."""
        self.releases["/" + path.lstrip("/")] = _bytes(content)
        return self.url + "/" + path.lstrip("/")

    def drop_once(self, path: str) -> None:
        """The next GET of `path` (a release path or "/{repo}/resolve/{rev}/{file}") sends half the
        bytes, then closes the connection."""
        self.dropping.add("/" + path.lstrip("/"))

    # -- serving ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- handling -----------------------------------------------------------------------------

    def _lookup(self, path: str) -> tuple[bytes | None, dict, int]:
        """(content, extra headers, status) for a request path."""
        if "/resolve/" in path:
            repo, rest = path.lstrip("/").split("/resolve/", 1)
            revision, _, filename = rest.partition("/")
            entry = self.repos.get(repo)
            if entry is None:
                return None, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, 404
            if revision not in ("main", entry["commit"]):
                return None, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, 404
            headers = {"X-Repo-Commit": entry["commit"]}
            content = entry["files"].get(filename)
            if content is None:
                return None, {**headers, "X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}, 404
            headers["ETag"] = f'"{hashlib.sha256(content).hexdigest()}"'
            return content, headers, 200
        content = self.releases.get(path)
        return (content, {}, 200) if content is not None else (None, {}, 404)

    def _handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = req.path.split("?", 1)[0]
        rng = req.headers.get("Range")
        self.requests.append(("HEAD" if head else "GET", path, rng))
        content, headers, status = self._lookup(path)
        if content is None:
            body = b'{"error": "not found"}'
            req.send_response(status)
            for k, v in headers.items():
                req.send_header(k, v)
            req.send_header("Content-Type", "application/json")
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            if not head:
                req.wfile.write(body)
            return
        start, end = 0, len(content) - 1
        if rng and rng.startswith("bytes="):
            first, _, last = rng[len("bytes="):].partition("-")
            start = int(first) if first else 0
            end = min(int(last), len(content) - 1) if last else len(content) - 1
            if start >= len(content):
                req.send_response(416)
                req.send_header("Content-Range", f"bytes */{len(content)}")
                req.send_header("Content-Length", "0")
                req.end_headers()
                return
            status = 206
        body = content[start:end + 1]
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Accept-Ranges", "bytes")
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("Content-Length", str(len(body)))
        if status == 206:
            req.send_header("Content-Range", f"bytes {start}-{end}/{len(content)}")
        req.end_headers()
        if head:
            return
        if path in self.dropping and not head:
            self.dropping.discard(path)
            req.wfile.write(body[: max(1, len(body) // 2)])
            req.wfile.flush()
            req.close_connection = True
            import socket

            try:
                req.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        req.wfile.write(body)
