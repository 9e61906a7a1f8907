"""The synthetic web's HTTP server: serves a directory written by `pipeline.testbed.synth.synthesize`.

`serve` (class `SynthServer`) serves such a directory on 127.0.0.1 only (the main listener, whose
port is in every URL of the metadata), plus auxiliary listeners on another 127.0.0.1 port, on
127.0.0.2 and on [::1] that serve any file in images/ as a plain image: the planted redirects point
there, so a missing private-address guard shows up as a kept row. routes.json says how each request
target behaves (status, redirects, Retry-After on the first attempt, slow drip, stall; see `_Handler`).
`SynthServer.set_route` changes a route while the server runs (a site that changes its robots.txt,
tdmrep.json or X-Robots-Tag between two runs: `kiln recheck`'s tests), and `requests` /
`max_in_flight` count what each site was asked (politeness checks).
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from pipeline.testbed.synth import CONTENT_TYPES, EXTENSIONS, FORMATS, SynthWeb

_EXTENSION_TYPES = {EXTENSIONS[f]: CONTENT_TYPES[f] for f in FORMATS}


class _State:
    """What every listener of one SynthServer shares: routes, files, stop flag, attempt counts."""

    def __init__(self, web: SynthWeb):
        self.base_url = web.base_url
        self.images = web.images_dir
        self.routes: dict[str, dict] = json.loads((web.root / "routes.json").read_text())
        self.known_files = {p.name for p in self.images.iterdir()}
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._attempts: dict[str, int] = {}
        self._hits: dict[str, int] = {}  # route key -> requests (robots.txt fetched once per origin, ...)
        self._methods: dict[tuple[str, str], int] = {}  # (method, route key) -> requests
        self._in_flight: dict[str, int] = {}  # site ("" for the main listener) -> requests being answered
        self._max_in_flight: dict[str, int] = {}
        self._starts: dict[str, list[float]] = {}  # site -> time.monotonic() of every request it answered
        self._conns: set[socket.socket] = set()

    def hit(self, key: str, method: str = "GET") -> None:
        with self._lock:
            self._hits[key] = self._hits.get(key, 0) + 1
            self._methods[(method, key)] = self._methods.get((method, key), 0) + 1

    def methods(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._methods)

    def enter(self, site: str) -> None:
        with self._lock:
            n = self._in_flight[site] = self._in_flight.get(site, 0) + 1
            self._starts.setdefault(site, []).append(time.monotonic())
            self._max_in_flight[site] = max(n, self._max_in_flight.get(site, 0))

    def leave(self, site: str) -> None:
        with self._lock:
            self._in_flight[site] -= 1

    def starts(self, site: str) -> list[float]:
        with self._lock:
            return list(self._starts.get(site, ()))

    def max_in_flight(self, site: str, reset: bool = False) -> int:
        with self._lock:
            n = self._max_in_flight.get(site, 0)
            if reset:
                self._max_in_flight[site] = self._in_flight.get(site, 0)
            return n

    def hits(self) -> dict[str, int]:
        with self._lock:
            return dict(self._hits)

    def first_attempt(self, key: str) -> bool:
        with self._lock:
            n = self._attempts.get(key, 0)
            self._attempts[key] = n + 1
            return n == 0

    def track(self, conn: socket.socket, on: bool) -> None:
        with self._lock:
            (self._conns.add if on else self._conns.discard)(conn)

    def hang_up_all(self) -> None:
        """Shut down every open client connection, waking handlers blocked in recv/send."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Listener(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # benchmarks open hundreds of connections at once

    def __init__(self, address, state: _State, aux: bool, site: str | None = None):
        self.state, self.aux, self.site = state, aux, site
        super().__init__(address, _Handler)

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(): a reverse DNS lookup that can leave the machine.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):
            return  # clients hanging up mid-response are expected here (timeouts, stop())
        super().handle_error(request, client_address)


class _Listener6(_Listener):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """Serves routes.json; on an auxiliary listener, any file in images/ as a plain image.

    Route keys: "status" (default 200), "file" + "content_type" (body), "body" + "content_type" (an
    inline UTF-8 body, for routes set while serving), "headers" (extra headers),
    "location" (redirect), "loop" (redirect to ?hop=N+1 forever), "first" ({"status", "headers"}
    answered to the first request only), "drip" ({"length", "chunk", "interval"}), "stall", "delay"
    (seconds to wait before answering). A consent site's routes are keyed "@SITE/path".
    """

    protocol_version = "HTTP/1.0"
    timeout = 30  # an idle client cannot hold a handler thread forever
    server: _Listener

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass

    def version_string(self) -> str:
        return "kiln-synth/1"

    def setup(self):
        super().setup()
        self.server.state.track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.state.track(self.connection, False)

    def do_GET(self):
        self._respond(with_body=True)

    def do_HEAD(self):
        self._respond(with_body=False)

    def _respond(self, with_body: bool) -> None:
        try:
            if self.server.aux:
                self._aux(with_body)
            else:
                self._route(with_body)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None, with_body: bool = True):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if not with_body or not body:
            self._left()  # end_headers sends the whole answer
        self.end_headers()
        if with_body and body:
            self._left()
            self.wfile.write(body)

    def _error(self, status: int, headers: dict | None = None, with_body: bool = True):
        page = f"<html><body><h1>{status} {self.responses.get(status, ('',))[0]}</h1></body></html>\n".encode()
        self._send(status, page, "text/html; charset=utf-8", headers, with_body)

    def _aux(self, with_body: bool) -> None:
        name = self.path.partition("?")[0].lstrip("/")
        if name not in self.server.state.known_files:
            return self._error(404, with_body=with_body)
        ctype = _EXTENSION_TYPES.get(name.rpartition(".")[2], "application/octet-stream")
        self._send(200, (self.server.state.images / name).read_bytes(), ctype, with_body=with_body)

    def _route(self, with_body: bool) -> None:
        state = self.server.state
        site = self.server.site or ""
        state.enter(site)
        self._in_flight_site = site  # _send ends the count when the answer goes out
        try:
            self._answer(state, with_body)
        finally:
            self._left()

    def _left(self) -> None:
        """A request stops being in flight when its answer is sent (once): a client that has read a
        HEAD's answer may send its next request before this thread's `finally` runs, and counting
        both would report one more concurrent request than the client ever had."""
        site, self._in_flight_site = getattr(self, "_in_flight_site", None), None
        if site is not None:
            self.server.state.leave(site)

    def _answer(self, state: _State, with_body: bool) -> None:
        prefix = f"@{self.server.site}" if self.server.site else ""
        path, _, query = self.path.partition("?")
        routes = state.routes  # one snapshot: set_route swaps the dict, never edits it in place
        key = prefix + self.path if prefix + self.path in routes else prefix + path
        state.hit(key, self.command)
        route = routes.get(key)
        if route is None:
            return self._error(404, with_body=with_body)
        if route.get("delay") and state.stop.wait(route["delay"]):
            return None
        first = route.get("first")
        if first and state.first_attempt(key):
            return self._error(first["status"], first.get("headers"), with_body)
        if route.get("stall"):
            return self._stall()
        if "drip" in route:
            return self._drip(route, with_body)
        status = route.get("status", 200)
        if route.get("loop"):
            hop = int(parse_qs(query).get("hop", ["0"])[0])
            return self._send(status, b"", "text/html", {"Location": f"{state.base_url}{path}?hop={hop + 1}"}, with_body)
        if "location" in route:
            return self._send(status, b"", "text/html", {"Location": route["location"]}, with_body)
        if "file" in route:
            body = (state.images / route["file"]).read_bytes()
            return self._send(status, body, route["content_type"], route.get("headers"), with_body)
        if "body" in route:
            return self._send(status, route["body"].encode(), route.get("content_type", "text/plain"), route.get("headers"), with_body)
        self._error(status, with_body=with_body)

    def _stall(self) -> None:
        """Send nothing; return when the client hangs up or the server stops."""
        conn = self.connection
        while not self.server.state.stop.is_set():
            readable, _, _ = select.select([conn], [], [], 0.1)
            if readable:
                try:
                    if not conn.recv(4096):
                        break  # client closed its end
                except OSError:
                    break
        self.close_connection = True

    def _drip(self, route: dict, with_body: bool) -> None:
        drip = route["drip"]
        self.send_response(200)
        self.send_header("Content-Type", route["content_type"])
        self.send_header("Content-Length", str(drip["length"]))
        self.end_headers()
        if not with_body:
            return
        chunk = b"\0" * drip["chunk"]
        sent = 0
        while sent < drip["length"] and not self.server.state.stop.wait(drip["interval"]):
            piece = chunk[: drip["length"] - sent]
            self.wfile.write(piece)
            sent += len(piece)


class SynthServer:
    """The synthetic web's HTTP server (a context manager; `serve` returns one already started).

    Main listener: 127.0.0.1:port from web.json. Auxiliary listeners (127.0.0.1:aux_port,
    127.0.0.2:alt_loopback_port, [::1]:ipv6_port; the last two skipped where they cannot bind)
    answer any file in images/ with a plain 200.
    """

    def __init__(self, web: SynthWeb | str | Path):
        self.web = web if isinstance(web, SynthWeb) else SynthWeb.load(web)
        self._state: _State | None = None
        self._listeners: list[_Listener] = []
        self._threads: list[threading.Thread] = []

    @property
    def base_url(self) -> str:
        return self.web.base_url

    @property
    def allow_hosts(self) -> str:
        return self.web.allow_hosts

    @property
    def listeners(self) -> list[tuple[str, int]]:
        """(host, port) of every bound listener, main first."""
        return [listener.server_address[:2] for listener in self._listeners]

    def start(self) -> SynthServer:
        if self._state is not None:
            return self
        self._state = state = _State(self.web)
        web = self.web
        try:
            self._listeners.append(_Listener(("127.0.0.1", web.port), state, aux=False))
            self._listeners.append(_Listener(("127.0.0.1", web.aux_port), state, aux=True))
        except OSError:
            self.stop()
            raise
        try:
            for site, port in sorted((web.sites or {}).items()):
                self._listeners.append(_Listener(("127.0.0.1", port), state, aux=False, site=site))
        except OSError:
            self.stop()
            raise
        for cls, host, port in ((_Listener, "127.0.0.2", web.alt_loopback_port), (_Listener6, "::1", web.ipv6_port)):
            try:
                self._listeners.append(cls((host, port), state, aux=True))
            except OSError:
                pass  # no 127.0.0.2 (macOS) or no IPv6: the redirect then leads nowhere, still rejected
        for listener in self._listeners:
            t = threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name=f"synth-{listener.server_address[1]}")
            t.start()
            self._threads.append(t)
        return self

    def hits(self, path: str, site: str | None = None) -> int:
        """Requests answered for `path` ("/robots.txt") on the main listener or a consent site."""
        return self._state.hits().get((f"@{site}" if site else "") + path, 0) if self._state else 0

    def route(self, key: str) -> dict | None:
        """The route answering `key` ("/robots.txt", "@star/robots.txt", "/img/x.jpg"), None if none."""
        route = self._state.routes.get(key) if self._state else None
        return None if route is None else dict(route)

    def set_route(self, key: str, route: dict | None) -> None:
        """Answer `key` with `route` from the next request on (None: 404), as a site that changes its
        robots.txt, tdmrep.json or an image's headers would. Only while serving; routes.json is not
        touched, so a restarted server serves the web as synthesised."""
        if self._state is None:
            raise RuntimeError("set_route: the server is not running")
        routes = dict(self._state.routes)
        if route is None:
            routes.pop(key, None)
        else:
            routes[key] = dict(route)
        self._state.routes = routes  # one assignment: a handler sees the old routes or the new ones

    def requests(self, path: str, site: str | None = None, method: str | None = None) -> int:
        """Requests answered for `path` on the main listener or a consent site; `method` ("HEAD",
        "GET") counts only those."""
        if self._state is None:
            return 0
        key = (f"@{site}" if site else "") + path
        return sum(n for (m, k), n in self._state.methods().items() if k == key and method in (None, m))

    def request_times(self, site: str | None = None) -> list[float]:
        """time.monotonic() at which the main listener (or a consent site) began answering each request."""
        return self._state.starts(site or "") if self._state else []

    def max_in_flight(self, site: str | None = None, reset: bool = False) -> int:
        """The most requests the main listener (or a consent site) was answering at once since it
        started or since the last reset (`reset=True` starts a new count after reading this one)."""
        if self._state is None:
            return 0
        return self._state.max_in_flight(site or "", reset)

    def stop(self) -> None:
        """Stop all listeners and hang up on open connections (stalled ones included); idempotent."""
        if self._state is None:
            return
        self._state.stop.set()
        # zip: only listeners whose serve_forever runs, as shutdown() waits for that loop to end.
        for listener, _ in zip(self._listeners, self._threads):
            listener.shutdown()
        self._state.hang_up_all()
        for listener in self._listeners:
            listener.server_close()
        deadline = time.monotonic() + 1.0
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._listeners, self._threads, self._state = [], [], None

    def __enter__(self) -> SynthServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(web: SynthWeb | str | Path) -> SynthServer:
    """Start serving a synthesized directory; use as `with serve(d) as server:` or call .stop()."""
    return SynthServer(web).start()



# --------------------------------------------------------------------------------------------
# CLI


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a directory written by `kiln synth`")


def main_serve(args: argparse.Namespace) -> int:
    with serve(args.dir) as server:
        print(f"serving {server.web.root} at {server.base_url}", flush=True)
        print(f"--allow-hosts {server.allow_hosts}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0
