"""pipeline/fetch.py against small HTTP servers on loopback; address rules as pure functions.

Nothing here connects outside 127.0.0.0/8 and ::1: hostnames other than IP literals only ever go
to fake resolvers, and "private" targets such as 10.0.0.5 are refused before any socket exists.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline import records
from pipeline.fetch import (
    FetchConfig,
    Fetcher,
    _retry_after_s,
    address_category,
    is_disallowed_by_robots,
    parse_allow_hosts,
    tdm_reserved,
)

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # the fetcher never decodes: any bytes do
DIRECTIVES = FetchConfig().disallowed_directives


# ---------------------------------------------------------------------------------------------
# Test servers


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked responses need it; the client always sends Connection: close

    def do_GET(self):
        site = self.server.site
        with site.lock:
            site.requests.append((self.path, self.headers))
        route = site.routes.get(self.path.split("?", 1)[0])
        if route is None:
            send(self, 404, b"no route", content_type="text/plain")
        else:
            route(self)

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # The client hanging up on a drip or stall is the point of those tests, not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class Site:
    """An HTTP(S) server on a loopback address whose paths map to handler functions."""

    def __init__(self, host: str, tls_context: ssl.SSLContext | None = None):
        self.server = (_Server6 if ":" in host else _Server)((host, 0), _Handler)
        if tls_context is not None:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.server.site = self
        self.host, self.port = host, self.server.server_address[1]
        self.scheme = "https" if tls_context else "http"
        self.routes: dict = {}
        self.requests: list = []  # (path, headers) as received
        self.lock = threading.Lock()
        self.stop = threading.Event()  # stalling handlers return when it is set
        self.active = self.max_active = 0
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{path}"

    @property
    def allow(self) -> frozenset:
        return frozenset({(self.host, self.port)})

    def paths(self) -> list[str]:
        with self.lock:
            return [path for path, _ in self.requests]

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def make_site():
    sites = []

    def make(host: str = "127.0.0.1", tls_context: ssl.SSLContext | None = None) -> Site:
        try:
            site = Site(host, tls_context)
        except OSError as exc:
            pytest.skip(f"cannot listen on {host}: {exc}")
        sites.append(site)
        return site

    yield make
    for site in sites:
        site.close()


@pytest.fixture
def site(make_site) -> Site:
    return make_site()


def send(h, status=200, body=IMAGE, headers=(), content_type="image/png"):
    h.send_response(status)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(body)))
    for name, value in headers:
        h.send_header(name, value)
    h.end_headers()
    h.wfile.write(body)


def reply(status=200, body=IMAGE, headers=(), content_type="image/png"):
    return lambda h: send(h, status, body, headers, content_type)


def redirect(location, status=302, headers=()):
    return reply(status, b"", [("Location", location), *headers], "text/html")


def in_turn(*routes):
    """A route answering its n-th request with routes[n] (the last one repeats)."""
    calls = iter(routes)
    last = [routes[-1]]

    def route(h):
        last[0] = next(calls, last[0])
        last[0](h)

    return route


def _no_dns(*args, **kwargs):
    raise AssertionError(f"real DNS lookup attempted: {args}")


def fetch(url, resolver=_no_dns, **overrides):
    config = FetchConfig(**{"timeout_s": 5.0, "backoff_base_s": 0.01, **overrides})
    with Fetcher(config, resolver=resolver) as fetcher:
        return fetcher.fetch(url)


def fake_resolver(table: dict[str, list[str]]):
    """getaddrinfo over a fixed table; unknown names fail like NXDOMAIN."""
    calls = []

    def resolve(host, port, *args, **kwargs):
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in table[host]
        ]

    resolve.calls = calls
    return resolve


# ---------------------------------------------------------------------------------------------
# Success, status codes, retries


def test_ok_image_and_request_headers(site):
    site.routes["/cat.png"] = reply()
    r = fetch(site.url("/cat.png"), allow_hosts=site.allow)
    assert r.ok and r.reason is None and r.body == IMAGE
    assert (r.status, r.content_type, r.attempts, r.redirects) == (200, "image/png", 1, 0)
    assert r.final_url == site.url("/cat.png")
    _, headers = site.requests[0]
    assert "kiln" in headers["User-Agent"]
    assert headers["Accept-Encoding"] == "identity"
    assert headers["Host"] == f"127.0.0.1:{site.port}"


def test_userinfo_is_dropped_and_path_percent_encoded(site):
    site.routes["/a%20b/%C3%A9.png"] = reply()
    r = fetch(f"http://user:secret@127.0.0.1:{site.port}/a b/é.png#frag", allow_hosts=site.allow)
    assert r.ok
    path, headers = site.requests[0]
    assert path == "/a%20b/%C3%A9.png"
    assert "Authorization" not in headers


@pytest.mark.parametrize("status", [404, 410, 403])
def test_client_errors_are_not_retried(site, status):
    site.routes["/gone"] = reply(status, b"nope", content_type="text/plain")
    r = fetch(site.url("/gone"), allow_hosts=site.allow, retries=3)
    assert (r.reason, r.status, r.attempts, r.body) == (f"http_{status}", status, 1, None)
    assert site.paths() == ["/gone"]


def test_server_error_is_retried_then_reported(site):
    site.routes["/boom"] = reply(500, b"err", content_type="text/plain")
    r = fetch(site.url("/boom"), allow_hosts=site.allow, retries=2)
    assert (r.reason, r.attempts) == ("http_500", 3)
    assert site.paths() == ["/boom"] * 3
    assert "500" in r.detail


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(site, status):
    site.routes["/busy"] = in_turn(reply(status, b"", [("Retry-After", "1")], "text/plain"), reply())
    r = fetch(site.url("/busy"), allow_hosts=site.allow, backoff_base_s=5.0)
    assert r.ok and r.attempts == 2
    assert 0.95 <= r.elapsed_s < 2.5  # waited Retry-After, not the 5 s backoff


def test_retry_after_above_cap_gives_up_at_once(site):
    site.routes["/busy"] = reply(503, b"", [("Retry-After", "3600")], "text/plain")
    r = fetch(site.url("/busy"), allow_hosts=site.allow, max_retry_after_s=10)
    assert (r.reason, r.attempts) == ("http_503", 1)
    assert "Retry-After 3600s" in r.detail and r.elapsed_s < 1


def test_retry_after_past_deadline_gives_up_at_once(site):
    site.routes["/busy"] = reply(429, b"", [("Retry-After", "5")], "text/plain")
    r = fetch(site.url("/busy"), allow_hosts=site.allow, timeout_s=2, max_retry_after_s=10)
    assert (r.reason, r.attempts) == ("http_429", 1)
    assert "deadline" in r.detail and r.elapsed_s < 1


def test_retry_after_parsing():
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert _retry_after_s("7", now) == 7.0
    assert _retry_after_s("Wed, 01 Jan 2025 12:00:30 GMT", now) == 30.0
    assert _retry_after_s("Wed, 01 Jan 2025 11:00:00 GMT", now) == 0.0  # in the past: no wait
    assert _retry_after_s("soon", now) is None


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as probe:  # a port that was free a moment ago and nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    r = fetch(f"http://127.0.0.1:{port}/x", allow_hosts={("127.0.0.1", port)}, retries=2)
    assert (r.reason, r.attempts) == ("connection_error", 3)
    assert "ConnectionRefusedError" in r.detail


def test_interim_responses_are_skipped(site):
    def early_hints(h):
        h.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        send(h)

    site.routes["/hints"] = early_hints
    r = fetch(site.url("/hints"), allow_hosts=site.allow)
    assert r.ok and r.status == 200 and r.body == IMAGE


def test_body_shorter_than_content_length_is_a_connection_error(site):
    def truncated(h):
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        h.wfile.write(b"x" * 10)
        h.close_connection = True

    site.routes["/short"] = truncated
    r = fetch(site.url("/short"), allow_hosts=site.allow, retries=0)
    assert r.reason == "connection_error" and "IncompleteRead" in r.detail


# ---------------------------------------------------------------------------------------------
# Deadline


def drip_body(h):
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.end_headers()
    while not h.server.site.stop.wait(0.1):
        h.wfile.write(b"x")


def drip_headers(h):
    h.wfile.write(b"HTTP/1.1 200 OK\r\n")
    while not h.server.site.stop.wait(0.1):
        h.wfile.write(b"X")  # one never-ending header line


def stall_before_headers(h):
    h.server.site.stop.wait()


def stall_after_headers(h):
    h.send_response(200)
    h.send_header("Content-Length", "1000")
    h.end_headers()
    h.server.site.stop.wait()


@pytest.mark.parametrize("route", [drip_body, drip_headers, stall_before_headers, stall_after_headers])
def test_slow_or_stalled_server_times_out_at_the_deadline(site, route):
    site.routes["/slow"] = route
    start = time.monotonic()
    r = fetch(site.url("/slow"), allow_hosts=site.allow, timeout_s=2.0, read_timeout_s=10.0)
    wall = time.monotonic() - start
    assert r.reason == "timeout" and "deadline" in r.detail
    assert 1.9 <= r.elapsed_s <= wall < 3.0


def test_listener_that_never_accepts_times_out():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel completes the handshake; nobody ever reads or answers
        port = listener.getsockname()[1]
        r = fetch(f"http://127.0.0.1:{port}/x", allow_hosts={("127.0.0.1", port)}, timeout_s=2.0)
    assert r.reason == "timeout" and 1.9 <= r.elapsed_s < 3.0


def test_read_timeout_cuts_silence_before_the_deadline(site):
    site.routes["/stall"] = stall_before_headers
    r = fetch(site.url("/stall"), allow_hosts=site.allow, timeout_s=5.0, read_timeout_s=0.5)
    assert r.reason == "timeout" and "socket timeout" in r.detail
    assert r.elapsed_s < 1.5


def test_waiting_for_a_host_slot_counts_against_the_deadline(site):
    site.routes["/img"] = reply()
    config = FetchConfig(timeout_s=0.6, per_host_concurrency=1, allow_hosts=site.allow)
    with Fetcher(config, resolver=_no_dns) as fetcher:
        with fetcher._host_slot(("127.0.0.1", site.port), time.monotonic() + 5):  # another request holds the only slot
            r = fetcher.fetch(site.url("/img"))
        assert fetcher.fetch(site.url("/img")).ok
    assert r.reason == "timeout" and "slot" in r.detail
    assert 0.55 <= r.elapsed_s < 1.0
    assert site.paths() == ["/img"]  # the waiting request never went out


def test_dns_lookup_is_bounded_by_the_deadline():
    release = threading.Event()

    def hanging_resolver(*args, **kwargs):
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "too late")

    try:
        r = fetch("http://slow-dns.example.test/x", resolver=hanging_resolver, timeout_s=0.5)
    finally:
        release.set()
    assert r.reason == "timeout" and r.elapsed_s < 1.0


# ---------------------------------------------------------------------------------------------
# Size


def test_content_length_over_cap_is_refused_without_reading(site):
    def huge(h):  # declares 10 GB, sends nothing: reading would stall until the deadline
        h.send_response(200)
        h.send_header("Content-Length", str(10 * 2**30))
        h.end_headers()
        h.server.site.stop.wait()

    site.routes["/huge"] = huge
    r = fetch(site.url("/huge"), allow_hosts=site.allow, max_bytes=1000)
    assert r.reason == "too_large" and "Content-Length 10737418240" in r.detail
    assert r.elapsed_s < 1.0


def test_close_delimited_stream_over_cap(site):
    def stream(h):
        h.send_response(200)
        h.end_headers()
        h.wfile.write(b"x" * 5000)
        h.close_connection = True

    site.routes["/stream"] = stream
    r = fetch(site.url("/stream"), allow_hosts=site.allow, max_bytes=1000)
    assert r.reason == "too_large" and r.body is None


def test_chunked_stream_over_cap(site):
    def chunked(h):
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for _ in range(5):
            h.wfile.write(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")

    site.routes["/chunked"] = chunked
    assert fetch(site.url("/chunked"), allow_hosts=site.allow, max_bytes=4999).reason == "too_large"
    r = fetch(site.url("/chunked"), allow_hosts=site.allow, max_bytes=5000)  # exactly at the cap
    assert r.ok and len(r.body) == 5000


def test_zero_bytes_is_empty_body(site):
    site.routes["/empty"] = reply(body=b"")
    r = fetch(site.url("/empty"), allow_hosts=site.allow)
    assert (r.reason, r.status, r.body) == ("empty_body", 200, None)


# ---------------------------------------------------------------------------------------------
# Redirects and the address guard


def test_redirect_chain_of_three(site):
    site.routes["/r3"] = redirect("/r2", 301)  # relative
    site.routes["/r2"] = redirect(site.url("/dir/r1"), 307)  # absolute
    site.routes["/dir/r1"] = redirect("../img", 308)  # relative to /dir/
    site.routes["/img"] = reply()
    r = fetch(site.url("/r3"), allow_hosts=site.allow)
    assert r.ok and r.body == IMAGE
    assert (r.redirects, r.attempts, r.final_url) == (3, 4, site.url("/img"))


def test_redirect_loop(site):
    site.routes["/loop"] = redirect("/loop")
    r = fetch(site.url("/loop"), allow_hosts=site.allow, max_redirects=5)
    assert (r.reason, r.redirects, r.attempts) == ("too_many_redirects", 5, 6)


@pytest.mark.parametrize("target_host", ["127.0.0.1", "127.0.0.2", "::1"])
def test_redirect_to_unlisted_loopback_listener_is_refused(site, make_site, target_host):
    target = make_site(target_host)  # a different port (and maybe address) that serves an image
    target.routes["/img"] = reply()
    site.routes["/go"] = redirect(target.url("/img"))

    allowed_both = fetch(site.url("/go"), allow_hosts=site.allow | target.allow)
    assert allowed_both.ok and allowed_both.redirects == 1  # the target really serves

    r = fetch(site.url("/go"), allow_hosts=site.allow)
    assert r.reason == "private_address"
    assert f"{target_host} is loopback; ({target_host}, {target.port}) not in --allow-hosts" in r.detail
    assert r.final_url == target.url("/img")
    assert target.paths() == ["/img"]  # only the allowed_both request reached it


def test_loopback_without_allow_hosts_is_refused(site):
    site.routes["/go"] = reply()
    r = fetch(site.url("/go"))
    assert r.reason == "private_address" and r.attempts == 1
    assert r.detail == f"127.0.0.1 is loopback; (127.0.0.1, {site.port}) not in --allow-hosts"
    assert site.paths() == []


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/img.png", "data:image/png;base64,AAAA"])
def test_redirect_to_other_scheme(site, location):
    site.routes["/go"] = redirect(location)
    r = fetch(site.url("/go"), allow_hosts=site.allow)
    assert r.reason == "url_scheme" and r.final_url == location


@pytest.mark.parametrize(
    "url, reason",
    [
        ("ftp://127.0.0.1/x.png", "url_scheme"),
        ("javascript:alert(1)", "url_scheme"),
        ("http:///x.png", "url_invalid"),
        ("http://127.0.0.1:99999/x.png", "url_invalid"),
        ("http://[::1/x.png", "url_invalid"),
        ("example.com/x.png", "url_invalid"),
        ("http://exa mple.test/x.png", "url_invalid"),
        ("", "url_invalid"),
        (None, "url_invalid"),
    ],
)
def test_bad_urls(url, reason):
    r = fetch(url)
    assert r.reason == reason and r.attempts == 0


def test_hostname_resolving_to_private_is_refused_without_connecting(monkeypatch):
    connects = []

    def no_connect(*args):
        connects.append(args)
        raise AssertionError("connection attempted")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket, "create_connection", no_connect)
    resolver = fake_resolver({"images.example.test": ["10.0.0.5", "169.254.169.254"]})
    r = fetch("https://images.example.test/cat.jpg", resolver=resolver)
    assert r.reason == "private_address"
    assert r.detail == (
        "10.0.0.5 is private, 169.254.169.254 is metadata; (images.example.test, 443) not in --allow-hosts"
    )
    assert connects == [] and resolver.calls == ["images.example.test"]


def test_ipv4_mapped_answer_is_refused():
    resolver = fake_resolver({"mapped.example.test": ["::ffff:127.0.0.1"]})
    r = fetch("http://mapped.example.test/x", resolver=resolver)
    assert r.reason == "private_address" and "::ffff:127.0.0.1 is ipv4_mapped" in r.detail


def test_allowed_hostname_connects_to_the_resolved_address(site):
    site.routes["/cat.png"] = reply()
    resolver = fake_resolver({"images.example.test": ["127.0.0.1"]})
    r = fetch(f"http://Images.Example.test:{site.port}/cat.png", resolver=resolver,
              allow_hosts=f"images.example.test:{site.port}")
    assert r.ok
    assert site.requests[0][1]["Host"] == f"images.example.test:{site.port}"


def test_dns_failure():
    r = fetch("http://nxdomain.example.test/x", resolver=fake_resolver({}))
    assert r.reason == "dns_error" and "nxdomain.example.test" in r.detail


# ---------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory):
    """A CA and a leaf certificate for images.example.test: (server context, client context)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiln test CA")])

    def builder(subject, key):
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )

    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, encipher_only=False, decipher_only=False)
    ca = (
        builder(ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "images.example.test")]), leaf_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("images.example.test")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    (folder / "leaf.key").write_bytes(leaf_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(folder / "leaf.pem", folder / "leaf.key")
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server, client


def test_https_verifies_the_url_hostname_not_the_ip(make_site, tls_material, monkeypatch):
    server_ctx, client_ctx = tls_material
    monkeypatch.setattr(ssl, "create_default_context", lambda: client_ctx)  # trust the test CA
    tls_site = make_site(tls_context=server_ctx)
    tls_site.routes["/cat.png"] = reply()
    resolver = fake_resolver({"images.example.test": ["127.0.0.1"]})
    allow = {("images.example.test", tls_site.port), ("127.0.0.1", tls_site.port)}

    r = fetch(f"https://images.example.test:{tls_site.port}/cat.png", resolver=resolver, allow_hosts=allow)
    assert r.ok and r.body == IMAGE

    by_ip = fetch(tls_site.url("/cat.png"), allow_hosts=allow)  # certificate names only the hostname
    assert by_ip.reason == "connection_error" and "TLS" in by_ip.detail and by_ip.attempts == 1


def test_https_to_a_plain_http_server_is_a_connection_error(site):
    site.routes["/x"] = reply()
    r = fetch(f"https://127.0.0.1:{site.port}/x", allow_hosts=site.allow, retries=2)
    assert r.reason == "connection_error" and "TLS" in r.detail and r.attempts == 1


# ---------------------------------------------------------------------------------------------
# X-Robots-Tag


@pytest.mark.parametrize(
    "values, reason",
    [
        (["noai"], "robots_noai"),
        (["noimageai"], "robots_noimageai"),
        (["kiln: noai"], "robots_noai"),
        (["noindex, nofollow"], "robots_noindex"),
        (["otherbot: noai", "NoImageIndex"], "robots_noimageindex"),
        (["otherbot: noai"], None),
        (["nofollow, noarchive"], None),
    ],
)
def test_x_robots_tag(site, values, reason):
    site.routes["/img"] = reply(headers=[("X-Robots-Tag", v) for v in values])
    r = fetch(site.url("/img"), allow_hosts=site.allow)
    assert r.reason == reason
    if reason is not None:
        assert r.detail.startswith("X-Robots-Tag: ") and values[-1] in r.detail and r.body is None
        assert reason in records.REASONS[records.STAGE_DOWNLOAD]


def test_x_robots_tag_on_a_redirect_hop(site):
    site.routes["/go"] = redirect("/img", headers=[("X-Robots-Tag", "noai")])
    site.routes["/img"] = reply()
    r = fetch(site.url("/go"), allow_hosts=site.allow)
    assert (r.reason, r.status) == ("robots_noai", 302)
    assert site.paths() == ["/go"]


def _message(*values: str) -> http.client.HTTPMessage:
    raw = "".join(f"X-Robots-Tag: {v}\r\n" for v in values) + "Content-Type: image/png\r\n\r\n"
    return http.client.parse_headers(io.BytesIO(raw.encode("latin-1")))


# img2dataset's reading (downloader.is_disallowed) and ours agree on these ...
AGREED = [
    ("noai",), ("NOAI",), ("noimageai",), ("kiln: noai",), ("KILN: NoImageAI",), ("otherbot: noai",),
    ("otherbot: noai, noindex",), ("nofollow",), ("noarchive, noimageindex",), ("otherbot: noai", "noimageai"),
    ("unavailable_after: 25 Jun 2010 15:00:00 PST",), ("",),
]
# ... and differ on these, where img2dataset misses an opt-out (see is_disallowed_by_robots).
DIFFERENT = {
    ("noai, otherbot: noindex",): "noai",
    ("max-image-preview: large, noai",): "noai",
    ("kiln : noai",): "noai",
    ("none",): "noindex",
}


def test_robots_parsing_against_img2dataset():
    downloader = pytest.importorskip("img2dataset.downloader")
    for values in AGREED:
        ours = is_disallowed_by_robots(_message(*values), "kiln", DIRECTIVES)
        assert (ours is not None) == downloader.is_disallowed(_message(*values), "kiln", DIRECTIVES), values
    for values, expected in DIFFERENT.items():
        assert is_disallowed_by_robots(_message(*values), "kiln", DIRECTIVES) == expected, values
        assert not downloader.is_disallowed(_message(*values), "kiln", DIRECTIVES), values


def test_robots_header_shapes_and_token_case():
    assert is_disallowed_by_robots(_message("otherbot: noai", "noimageai"), "kiln", DIRECTIVES) == "noimageai"
    assert is_disallowed_by_robots({"x-robots-tag": "kiln: noai"}, "Kiln", DIRECTIVES) == "noai"
    assert is_disallowed_by_robots([("X-Robots-Tag", "otherbot: noai")], "kiln", DIRECTIVES) is None
    assert is_disallowed_by_robots(_message("noindex"), "kiln", ("noai",)) is None


# ---------------------------------------------------------------------------------------------
# TDMRep's tdm-reservation header, and switching the opt-out checks off


def test_tdm_reserved_pure():
    assert tdm_reserved({"tdm-reservation": "1"}) == "tdm-reservation: 1"
    assert tdm_reserved([("TDM-Reservation", " 1 "), ("tdm-policy", "https://p.test/policy.json")]) == (
        "tdm-reservation: 1; tdm-policy: https://p.test/policy.json"
    )
    assert tdm_reserved([("tdm-reservation", "0"), ("tdm-reservation", "1")]) is not None  # any "1" reserves
    assert tdm_reserved({"tdm-reservation": "0, 1"}) is not None  # joined by a proxy
    for absent in ({}, {"tdm-reservation": "0"}, {"tdm-reservation": "2"}, {"tdm-reservation": "yes"},
                   {"tdm-reservation": ""}, {"tdm-policy": "https://p.test/"}, {"x-tdm-reservation": "1"}):
        assert tdm_reserved(absent) is None, absent
    raw = "tdm-reservation: 1\r\nTDM-Policy: https://p.test/" + "x" * 1000 + "\r\n\r\n"
    detail = tdm_reserved(http.client.parse_headers(io.BytesIO(raw.encode())))
    assert detail.startswith("tdm-reservation: 1; tdm-policy: https://p.test/") and len(detail) <= 300


@pytest.mark.parametrize("value, reason", [("1", "tdm_reservation"), (" 1", "tdm_reservation"), ("0", None), ("2", None)])
def test_tdm_reservation_header(site, value, reason):
    site.routes["/img"] = reply(headers=[("tdm-reservation", value), ("tdm-policy", "https://p.test/pol")])
    r = fetch(site.url("/img"), allow_hosts=site.allow)
    assert r.reason == reason
    if reason is not None:
        assert (r.body, r.status) == (None, 200)
        assert r.detail == "tdm-reservation: 1; tdm-policy: https://p.test/pol"
        assert reason in records.REASONS[records.STAGE_DOWNLOAD]
    else:
        assert r.ok


def test_tdm_reservation_on_a_redirect_hop(site):
    site.routes["/go"] = redirect("/img", headers=[("TDM-Reservation", "1")])
    site.routes["/img"] = reply()
    r = fetch(site.url("/go"), allow_hosts=site.allow)
    assert (r.reason, r.status) == ("tdm_reservation", 302)
    assert site.paths() == ["/go"]


def test_optout_checks_can_be_switched_off(site):
    site.routes["/tdm"] = reply(headers=[("tdm-reservation", "1")])
    site.routes["/xrt"] = reply(headers=[("X-Robots-Tag", "noai")])
    site.routes["/both"] = reply(headers=[("tdm-reservation", "1"), ("X-Robots-Tag", "noai")])
    config = FetchConfig(timeout_s=5.0, allow_hosts=site.allow)
    with Fetcher(config, resolver=_no_dns) as fetcher:
        assert fetcher.fetch(site.url("/both")).reason == "robots_noai"  # X-Robots-Tag is checked first
        assert fetcher.fetch(site.url("/both"), check_optouts=False).body == IMAGE
    assert fetch(site.url("/tdm"), allow_hosts=site.allow, tdm_header=False).ok
    assert fetch(site.url("/xrt"), allow_hosts=site.allow, tdm_header=False).reason == "robots_noai"
    assert fetch(site.url("/xrt"), allow_hosts=site.allow, x_robots_tag=False).ok
    assert fetch(site.url("/tdm"), allow_hosts=site.allow, x_robots_tag=False).reason == "tdm_reservation"


# ---------------------------------------------------------------------------------------------
# Per-call options for rule files: Accept, max_bytes, truncate


def fetch_with(site, path, **options):
    config = FetchConfig(timeout_s=5.0, backoff_base_s=0.01, allow_hosts=site.allow, max_bytes=2000)
    with Fetcher(config, resolver=_no_dns) as fetcher:
        return fetcher.fetch(site.url(path), **options)


def test_accept_header_override(site):
    site.routes["/robots.txt"] = reply(body=b"User-agent: *\n", content_type="text/plain")
    assert fetch_with(site, "/robots.txt").ok
    assert fetch_with(site, "/robots.txt", accept="text/plain, */*;q=0.1").ok
    assert [headers["Accept"] for _, headers in site.requests] == ["image/*,*/*;q=0.8", "text/plain, */*;q=0.1"]
    config = FetchConfig(allow_hosts=site.allow)
    with Fetcher(config, resolver=_no_dns) as fetcher:
        with pytest.raises(ValueError, match="accept"):
            fetcher.fetch(site.url("/robots.txt"), accept="text/plain\r\nX-Evil: 1")
        with pytest.raises(ValueError, match="max_bytes"):
            fetcher.fetch(site.url("/robots.txt"), max_bytes=0)
    assert len(site.requests) == 2  # refused before any request


def test_max_bytes_override(site):
    site.routes["/big"] = reply(body=b"x" * 3000)
    assert fetch_with(site, "/big").reason == "too_large"  # config cap: 2000
    assert fetch_with(site, "/big", max_bytes=3000).body == b"x" * 3000
    assert fetch_with(site, "/big", max_bytes=100).reason == "too_large"


def _stream(body: bytes, chunked: bool):
    def route(h):
        h.send_response(200)
        if chunked:
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for i in range(0, len(body), 700):
                piece = body[i : i + 700]
                h.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            h.wfile.write(b"0\r\n\r\n")
        else:  # no Content-Length: the body ends when the connection closes
            h.end_headers()
            h.wfile.write(body)
            h.close_connection = True

    return route


def test_truncate_cuts_at_the_cap(site):
    body = bytes(range(256)) * 20  # 5120 bytes
    site.routes["/declared"] = reply(body=body)
    site.routes["/chunked"] = _stream(body, chunked=True)
    site.routes["/stream"] = _stream(body, chunked=False)
    for path in ("/declared", "/chunked", "/stream"):
        r = fetch_with(site, path, max_bytes=1000, truncate=True)
        assert r.ok and r.body == body[:1000], path
        assert fetch_with(site, path, max_bytes=1000).reason == "too_large", path
        assert fetch_with(site, path, max_bytes=len(body), truncate=True).body == body, path  # exactly at the cap


def test_truncate_still_reports_a_body_cut_short(site):
    def short(h):  # declares 1500, sends 500 and hangs up: below the cap, so not a truncation
        h.send_response(200)
        h.send_header("Content-Length", "1500")
        h.end_headers()
        h.wfile.write(b"x" * 500)
        h.close_connection = True

    site.routes["/short"] = short
    assert fetch_with(site, "/short", max_bytes=1000, truncate=True).reason == "connection_error"
    assert fetch_with(site, "/short", max_bytes=400, truncate=True).body == b"x" * 400


# ---------------------------------------------------------------------------------------------
# Per-host concurrency


def test_per_host_concurrency(site):
    def slow(h):
        with site.lock:
            site.active += 1
            site.max_active = max(site.max_active, site.active)
        time.sleep(0.3)
        with site.lock:
            site.active -= 1
        send(h)

    site.routes["/slow"] = slow
    config = FetchConfig(per_host_concurrency=2, allow_hosts=site.allow, timeout_s=5.0)
    with Fetcher(config, resolver=_no_dns) as fetcher, ThreadPoolExecutor(6) as pool:
        results = list(pool.map(fetcher.fetch, [site.url("/slow")] * 6))
        assert fetcher._slots == {}  # slots of idle hosts are dropped: the table stays bounded
    assert all(r.ok for r in results)
    assert site.max_active == 2


# ---------------------------------------------------------------------------------------------
# Pure address rules and --allow-hosts


@pytest.mark.parametrize(
    "ip, category",
    [
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("169.254.1.1", "link_local"),
        ("169.254.169.254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.64.0.1", "cgnat"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "ipv4_mapped"),
        ("::ffff:8.8.8.8", "ipv4_mapped"),
        ("fe80::1", "link_local"),
        ("fe80::1%eth0", "link_local"),
        ("fc00::1", "private"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("0.1.2.3", "reserved"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.1", "documentation"),
        ("2001:db8::1", "documentation"),
        ("198.18.0.1", "benchmark"),
        ("64:ff9b::a00:5", "private"),  # NAT64 of 10.0.0.5
        ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:808:808::1", None),  # 6to4 of 8.8.8.8
        ("8.8.8.8", None),
        ("2606:4700::1", None),
    ],
)
def test_address_category(ip, category):
    assert address_category(ip) == category
    assert address_category(ipaddress.ip_address(ip.split("%")[0])) == category


def test_parse_allow_hosts():
    assert parse_allow_hosts("127.0.0.1:8080,[::1]:9000,example.test:443") == {
        ("127.0.0.1", 8080),
        ("::1", 9000),
        ("example.test", 443),
    }
    assert parse_allow_hosts(" Example.TEST:80 , ,[0:0::1]:81") == {("example.test", 80), ("::1", 81)}
    assert parse_allow_hosts(["a.test:1"]) == {("a.test", 1)}
    assert parse_allow_hosts("") == frozenset()
    assert FetchConfig(allow_hosts="[::1]:9000").allow_hosts == {("::1", 9000)}
    assert FetchConfig(allow_hosts={("LOCALHOST", "80")}).allow_hosts == {("localhost", 80)}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("127.0.0.1", "missing port"),
        (":80", "missing port"),
        ("::1:9000", "brackets"),
        ("[::1]", r"\[IPv6\]:PORT"),
        ("[nothost]:80", "not an IPv6 address"),
        ("host.test:0", "1-65535"),
        ("host.test:65536", "1-65535"),
        ("host.test:http", "1-65535"),
        ("http://host.test:80", "no scheme"),
    ],
)
def test_parse_allow_hosts_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_allow_hosts(spec)


def test_config_validation():
    with pytest.raises(ValueError, match="user_agent"):
        FetchConfig(user_agent="kiln\r\nX-Evil: 1")
    with pytest.raises(ValueError, match="timeout_s"):
        FetchConfig(timeout_s=0)
    assert FetchConfig(disallowed_directives=("NoAI",)).disallowed_directives == ("noai",)
