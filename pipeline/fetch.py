"""A safe, thread-safe HTTP(S) image fetcher: the download stage's only way onto the network.

Every hop is parsed, scheme-checked, resolved and address-checked before one byte is sent; the
socket connects to exactly the address that was checked (http.client never resolves anything), so
DNS rebinding between check and connect is impossible. Each URL has one total deadline covering
DNS, waiting for a per-host slot, connects, TLS, every redirect and retry (including the waits)
and every byte of headers and body; bodies are capped in bytes. Failures come back as a
`FetchResult` whose `reason` is one of `records.REASONS["download"]` or `http_<status>`.

Stdlib only (socket, ssl, http.client, ipaddress): img2dataset's urllib downloader follows
redirects anywhere and has no byte cap or total deadline (see docs/PITFALLS.md).
"""

from __future__ import annotations

import email.utils
import http.client
import io
import ipaddress
import logging
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote, urljoin, urlsplit

from pipeline import __version__

log = logging.getLogger(__name__)

DEFAULT_USER_AGENT = f"kiln/{__version__} (+https://github.com/kiln-data/kiln; compatible; kiln)"

_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# "Slow down" answers (Too Many Requests, Service Unavailable): besides the retry, the caller's
# on_throttle hears of each one, so the Download stage can slow the whole host down.
_THROTTLE_STATUSES = frozenset({429, 503})
_CHUNK_BYTES = 64 * 1024
# getaddrinfo has no timeout, so lookups run on a shared pool and the caller waits only until its
# deadline. 32 threads cover the fetch threads of a typical worker; a lookup that hangs past its
# deadline keeps a pool thread until the system resolver gives up, never the fetch.
_DNS_THREADS = 32
_HOSTNAME = re.compile(r"[a-z0-9_.\-]+")
_PORT = re.compile(r"[0-9]{1,5}")
# Request-target characters http.client would refuse (controls, space) and non-ASCII (IRIs as
# found in alt-text datasets): percent-encoded as UTF-8, the way browsers send them.
_UNSAFE_TARGET_CHARS = re.compile(r"[\x00-\x20\x7f-\U0010ffff]+")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+")


@dataclass(frozen=True)
class FetchConfig:
    timeout_s: float = 20.0  # total deadline per URL: DNS, slot wait, connects, redirects, retries + waits, body
    connect_timeout_s: float = 5.0  # per address tried (still bounded by the total deadline)
    read_timeout_s: float = 10.0  # max silence on the socket (still bounded by the total deadline)
    max_bytes: int = 32 * 2**20  # body cap: refused on Content-Length above it, cut when streaming passes it
    max_redirects: int = 5
    retries: int = 2  # extra attempts per URL (shared by all hops) for 429, 500/502/503/504, refused/reset
    backoff_base_s: float = 0.5  # wait base * 2**n (+ up to 10% jitter) unless Retry-After says otherwise
    max_retry_after_s: float = 10.0  # a longer Retry-After (or one past the deadline) ends the fetch
    per_host_concurrency: int = 16  # simultaneous requests per (host, port) across this Fetcher's threads
    user_agent_token: str = "kiln"  # matched against UA-scoped X-Robots-Tag directives ("kiln: noai")
    user_agent: str = DEFAULT_USER_AGENT  # sent on every request
    disallowed_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    x_robots_tag: bool = True  # False: X-Robots-Tag is not checked at all
    tdm_header: bool = True  # TDMRep's `tdm-reservation: 1` response header ends the fetch (tdm_reservation)
    # Exact (host, port) pairs allowed although their addresses are not public (tests, local
    # mirrors): host as written in the URL, lowercased, IPv6 without brackets. Also accepts the
    # --allow-hosts string form, see parse_allow_hosts.
    allow_hosts: frozenset = frozenset()

    def __post_init__(self):
        for name in ("timeout_s", "connect_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FetchConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_redirects", "retries", "backoff_base_s", "max_retry_after_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"FetchConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_bytes < 1 or self.per_host_concurrency < 1:
            raise ValueError("FetchConfig.max_bytes and per_host_concurrency must be >= 1")
        # The UA goes into the request verbatim: a CR/LF would let it inject headers.
        if not _PRINTABLE_ASCII.fullmatch(self.user_agent or ""):
            raise ValueError(f"FetchConfig.user_agent must be printable ASCII, got {self.user_agent!r}")
        if not self.user_agent_token.strip():
            raise ValueError("FetchConfig.user_agent_token must not be empty")
        object.__setattr__(self, "disallowed_directives", tuple(d.strip().lower() for d in self.disallowed_directives))
        object.__setattr__(self, "allow_hosts", _normalize_allow_hosts(self.allow_hosts))


@dataclass
class FetchResult:
    url: str
    body: bytes | None  # None on failure
    reason: str | None  # None on success; else a records.REASONS["download"] entry or f"http_{status}"
    detail: str = ""  # status line, refused address and category, directive, byte counts, ...
    status: int | None = None  # last HTTP status seen
    final_url: str | None = None  # last URL requested (or refused)
    content_type: str | None = None
    attempts: int = 0  # requests tried for this URL: one per redirect hop plus one per retry
    redirects: int = 0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.reason is None and self.body is not None


class _Stop(Exception):
    """Ends a fetch with a reject reason; raised deep inside, caught once in Fetcher.fetch."""

    def __init__(self, reason: str, detail: str, status: int | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.status = status


class _Transient(Exception):
    """A connection failure worth retrying: refused, reset, or a body cut short."""


_DEFAULT_ACCEPT = "image/*,*/*;q=0.8"


@dataclass(frozen=True)
class _CallOptions:
    """Fetcher.fetch's per-call keyword arguments, carried down to the request and the body read."""

    accept: str  # Accept header
    max_bytes: int  # body cap for this call
    truncate: bool  # a body above the cap is cut at it and returned, not refused as too_large
    check_optouts: bool  # False: X-Robots-Tag and tdm-reservation are not checked (rule files)


# ---------------------------------------------------------------------------------------------
# Pure helpers: addresses, --allow-hosts, X-Robots-Tag, tdm-reservation, Retry-After


_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ...
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS over IPv6
    )
)
# First match wins. ipaddress's is_private/is_global are not enough on their own: CGNAT is not
# is_private, 6to4/NAT64 addresses embedding private IPv4 are is_global, and the answers changed
# between Python versions. Anything not listed falls back to `not is_global` -> "reserved".
_V4_CATEGORIES = tuple(
    (ipaddress.IPv4Network(net), category)
    for net, category in (
        ("0.0.0.0/32", "unspecified"),
        ("0.0.0.0/8", "reserved"),  # "this network": Linux connects 0.x.x.x to the local host
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "cgnat"),  # RFC 6598 shared address space
        ("169.254.0.0/16", "link_local"),
        ("192.0.0.0/24", "reserved"),  # IETF protocol assignments
        ("192.0.2.0/24", "documentation"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("198.18.0.0/15", "benchmark"),
        ("192.88.99.0/24", "reserved"),  # deprecated 6to4 relay anycast
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    )
)
_V6_CATEGORIES = tuple(
    (ipaddress.IPv6Network(net), category)
    for net, category in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "private"),  # RFC 8215 local-use NAT64
        ("::/8", "reserved"),  # IPv4-compatible and other legacy forms
        ("100::/64", "reserved"),  # discard-only
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("2001:2::/48", "benchmark"),
        ("fe80::/10", "link_local"),
        ("fec0::/10", "private"),  # deprecated site-local
        ("fc00::/7", "private"),  # unique local
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def address_category(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """None if `ip` is globally routable, else why not ("loopback", "private", "metadata", ...).

    Pure: looks only at the address. Raises ValueError on a string that is not an IP address.
    """
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.split("%", 1)[0])  # a zone id does not change the category
    elif ip.version == 6:
        ip = ipaddress.IPv6Address(int(ip))  # drop any scope id so set lookups compare values
    if ip in _METADATA_ADDRESSES:  # before link_local/cgnat/private so it is named specifically
        return "metadata"
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            # An AF_INET6 socket to ::ffff:a.b.c.d reaches the IPv4 host; resolvers return IPv4 as
            # AF_INET, so a mapped answer is refused whatever it embeds.
            return "ipv4_mapped"
        embedded = ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:
            # 6to4 and NAT64 gateways forward to the embedded IPv4 address: judge that one.
            return address_category(embedded)
        table = _V6_CATEGORIES
    else:
        table = _V4_CATEGORIES
    for network, category in table:
        if ip in network:
            return category
    return None if ip.is_global else "reserved"


def _host_key(host: str) -> str:
    """The allow-hosts spelling of a host: lowercased; IP literals in their canonical form."""
    host = host.strip().lower()
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


def parse_allow_hosts(spec: str | Iterable[str]) -> frozenset:
    """Parse --allow-hosts: "127.0.0.1:8080,[::1]:9000,example.test:443" -> {(host, port), ...}.

    Every item needs an explicit port; IPv6 addresses go in brackets. Raises ValueError naming
    the bad item.
    """
    items = spec.split(",") if isinstance(spec, str) else spec
    pairs = set()
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        if "://" in item or "/" in item or any(c.isspace() for c in item):
            raise ValueError(f"--allow-hosts item {raw!r}: expected HOST:PORT (no scheme, path or spaces)")
        if item.startswith("["):
            host, bracket, rest = item[1:].partition("]")
            if not bracket or not rest.startswith(":"):
                raise ValueError(f"--allow-hosts item {raw!r}: expected [IPv6]:PORT")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"--allow-hosts item {raw!r}: {host!r} is not an IPv6 address") from None
            port_text = rest[1:]
        else:
            host, colon, port_text = item.rpartition(":")
            if not colon or not host:
                raise ValueError(f"--allow-hosts item {raw!r}: missing port, expected HOST:PORT")
            if ":" in host:
                raise ValueError(f"--allow-hosts item {raw!r}: write IPv6 addresses in brackets, e.g. [::1]:9000")
        if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"--allow-hosts item {raw!r}: port must be 1-65535")
        pairs.add((_host_key(host), int(port_text)))
    return frozenset(pairs)


def _normalize_allow_hosts(value) -> frozenset:
    if isinstance(value, str):
        return parse_allow_hosts(value)
    pairs = set()
    for item in value:
        if isinstance(item, str):
            pairs |= parse_allow_hosts([item])
        else:
            host, port = item
            pairs.add((_host_key(str(host)), int(port)))
    return frozenset(pairs)


# Directives that take a value after a colon, so "name: value" is not a user-agent scope.
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_UA_TOKEN = re.compile(r"[a-z0-9_.\-]+")


def _header_values(headers, name: str) -> list[str]:
    if hasattr(headers, "get_all"):  # http.client.HTTPMessage / email.message.Message
        return headers.get_all(name) or []
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return [value for key, value in pairs if key.lower() == name.lower()]


def is_disallowed_by_robots(headers, user_agent_token: str, directives: Iterable[str]) -> str | None:
    """The first X-Robots-Tag directive in `directives` that applies to us, or None.

    `headers`: an HTTPMessage, a mapping, or (name, value) pairs. A directive applies when it is
    unscoped or scoped to `user_agent_token` ("kiln: noai"); "otherbot: noai" does not block us.

    Same reading as img2dataset's `downloader.is_disallowed` (every X-Robots-Tag header, split on
    commas, lowercased, "token:" prefix scopes the header), which cannot name the directive and
    misses these cases, handled here (tests/pipeline/test_fetch.py checks both readings):
    - an unscoped directive before a scoped one, "noai, otherbot: noindex" (it treats
      "noai, otherbot" as the UA token and skips the whole header);
    - a valued directive first, "max-image-preview: large, noai" (same: "max-image-preview"
      becomes the UA token);
    - spaces before the colon ("kiln : noai") and a mixed-case configured token;
    - "none", which means "noindex, nofollow".
    Importing img2dataset would also pull torch and wandb into every fetch thread's process.
    """
    wanted = {d.lower() for d in directives}
    token = user_agent_token.strip().lower()
    for value in _header_values(headers, "X-Robots-Tag"):
        scope = None  # a "token:" prefix scopes the rest of this header value
        for item in value.split(","):
            name, colon, rest = item.partition(":")
            name = name.strip().lower()
            if colon and name not in _VALUED_DIRECTIVES and _UA_TOKEN.fullmatch(name):
                scope, item = name, rest
            if scope is not None and scope != token:
                continue
            directive = item.strip().lower()
            if directive in wanted:
                return directive
            if directive == "none" and "noindex" in wanted:
                return "noindex"
    return None


def tdm_reserved(headers) -> str | None:
    """The detail to report if the response reserves TDM rights, else None.

    W3C TDMRep (CG Final Report, 2024-05-10), "TDM Header Field in HTTP Responses" (#sec-tdm-header):
    `tdm-reservation: 1` reserves text-and-data-mining rights on the resource, `0` does not, and
    any other value is a protocol error read as unset (#sec-tdm-reservation). Header names are
    case-insensitive; a value repeated or comma-joined by a proxy counts as reserved if any item is
    "1". `tdm-policy` (a URL to the rightsholder's licensing terms) only goes into the detail.
    `headers`: as for is_disallowed_by_robots.
    """
    values = _header_values(headers, "tdm-reservation")
    if not any(item.strip() == "1" for value in values for item in value.split(",")):
        return None
    detail = "tdm-reservation: " + ", ".join(v.strip() for v in values)
    policies = _header_values(headers, "tdm-policy")
    if policies:
        detail += "; tdm-policy: " + ", ".join(p.strip() for p in policies)
    return detail[:300]


def _retry_after_s(value: str, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date); None if unparseable."""
    value = value.strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP-dates are always GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


# ---------------------------------------------------------------------------------------------
# The fetcher


@dataclass(frozen=True)
class _Target:
    """One hop's URL, checked and split into what the request needs."""

    scheme: str
    host: str  # allow-hosts key: as written, lowercased; IP literals canonical, IPv6 unbracketed
    ascii_host: str  # IDNA form used for DNS, SNI and the Host header
    port: int
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None  # set when the host is an IP literal
    request_target: str  # path?query, percent-encoded where needed
    host_header: str


def _parse_url(url: str) -> _Target:
    """Split a URL into a _Target; userinfo is dropped (never sent), the fragment too."""
    if not isinstance(url, str) or not url.strip():
        raise _Stop("url_invalid", f"not a URL: {url!r}"[:200])
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
        scheme = parts.scheme.lower()
        if not scheme:
            raise _Stop("url_invalid", f"no scheme in {url[:200]!r}")
        if scheme not in _DEFAULT_PORTS:
            raise _Stop("url_scheme", f"scheme {scheme!r} is not http/https: {url[:200]}")
        if not host:
            raise _Stop("url_invalid", f"no host in {url[:200]!r}")
        if port == 0:
            raise _Stop("url_invalid", f"port 0 in {url[:200]!r}")
        port = port or _DEFAULT_PORTS[scheme]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None:
            ascii_host = ip.compressed
        else:
            ascii_host = host.encode("idna").decode("ascii")
            if not _HOSTNAME.fullmatch(ascii_host):
                raise _Stop("url_invalid", f"bad host {host!r}")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        target = _UNSAFE_TARGET_CHARS.sub(lambda m: quote(m.group(), safe=""), target)
    except (ValueError, UnicodeError) as exc:  # bad port, bracket or IDNA label, lone surrogate
        raise _Stop("url_invalid", f"{exc}: {url[:200]!r}") from None
    bracketed = f"[{ascii_host}]" if ip is not None and ip.version == 6 else ascii_host
    host_header = bracketed if port == _DEFAULT_PORTS[scheme] else f"{bracketed}:{port}"
    host_key = ip.compressed if ip is not None else host
    return _Target(scheme, host_key, ascii_host, port, ip, target, host_header)


def host_of(url) -> str | None:
    """The host:port that `url` connects to first ("example.com:443", "[::1]:8080"), as the
    per-host limits count it; None for a URL the fetcher would refuse before any connection."""
    try:
        target = _parse_url(url)
    except _Stop:
        return None
    return f"[{target.host}]:{target.port}" if ":" in target.host else f"{target.host}:{target.port}"


class _DeadlineReader(io.RawIOBase):
    """The socket as http.client reads it, with the deadline enforced on every recv.

    http.client reads the status line and headers line by line, so a per-recv timeout alone
    would let a server that drips one header byte at a time hold us forever. Each recv here waits
    at most min(read_timeout_s, time left) and none starts after the deadline.
    """

    def __init__(self, sock: socket.socket, deadline: float, read_timeout_s: float):
        super().__init__()
        self._sock = sock
        self._deadline = deadline
        self._read_timeout_s = read_timeout_s
        self._file: io.BufferedReader | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        self._sock.settimeout(min(self._read_timeout_s, remaining))
        return self._sock.recv_into(buffer)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        # http.client.HTTPResponse(sock) reads through sock.makefile("rb"). One shared buffer, so
        # the final response can be read after interim (1xx) ones without losing buffered bytes.
        if self._file is None:
            self._file = io.BufferedReader(self)
        return self._file


@dataclass
class _Response:
    status: int
    status_line: str
    content_type: str | None
    location: str | None
    retry_after: str | None
    body: bytes | None  # read only for 2xx


class Fetcher:
    """Fetches image URLs under FetchConfig's rules. Thread-safe; share one per process."""

    def __init__(self, config: FetchConfig, resolver=socket.getaddrinfo):
        self.config = config
        self._resolver = resolver  # called as resolver(host, port, type=socket.SOCK_STREAM)
        self._ssl_context = ssl.create_default_context()  # verifies certificates and hostnames
        self._dns_pool = ThreadPoolExecutor(max_workers=_DNS_THREADS, thread_name_prefix="kiln-dns")
        self._slots_lock = threading.Lock()
        # (host, port) -> [semaphore, threads using it]; entries leave when unused, so the dict
        # holds only hosts with requests in flight.
        self._slots: dict[tuple[str, int], list] = {}

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Release the DNS threads; lookups still queued are dropped."""
        self._dns_pool.shutdown(wait=False, cancel_futures=True)

    def fetch(
        self,
        url: str,
        on_throttle=None,
        *,
        accept: str | None = None,
        max_bytes: int | None = None,
        truncate: bool = False,
        check_optouts: bool = True,
    ) -> FetchResult:
        """Download `url`'s body. Never raises for network or content problems.

        `on_throttle(wait_s)`, if given, is called (on this thread) on every 429 or 503 response,
        retried or not, with the seconds the server asked for: its Retry-After, capped at
        max_retry_after_s, else this attempt's exponential backoff.

        For fetching rule files (pipeline/hostrules.py) rather than images: `accept` replaces the
        Accept header; `max_bytes` replaces the config's cap for this call; `truncate=True` returns a
        body above the cap cut at the cap instead of refusing it as too_large (RFC 9309 §2.5: parse
        at least the first 500 KiB of a robots.txt); `check_optouts=False` skips the X-Robots-Tag
        and tdm-reservation checks. Raises ValueError only for a bad `accept` or `max_bytes`."""
        if accept is not None and not _PRINTABLE_ASCII.fullmatch(accept):
            raise ValueError(f"accept must be printable ASCII, got {accept!r}")  # no header injection
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes!r}")
        options = _CallOptions(
            accept=accept or _DEFAULT_ACCEPT,
            max_bytes=max_bytes or self.config.max_bytes,
            truncate=truncate,
            check_optouts=check_optouts,
        )
        start = time.monotonic()
        result = FetchResult(url=url, body=None, reason=None)
        try:
            self._fetch(url, start + self.config.timeout_s, result, on_throttle, options)
        except _Stop as stop:
            result.body, result.reason, result.detail = None, stop.reason, stop.detail
            if stop.status is not None:
                result.status = stop.status
        except Exception as exc:  # a server tripping something unforeseen costs one row, not the Beam bundle
            log.warning("unexpected error fetching %s", url, exc_info=True)
            result.body, result.reason = None, "connection_error"
            result.detail = f"unexpected {type(exc).__name__}: {exc}"
        result.elapsed_s = time.monotonic() - start
        return result

    def _fetch(self, url: str, deadline: float, result: FetchResult, on_throttle, options: _CallOptions) -> None:
        """Follow redirects and retries for one URL, filling `result`; raises _Stop on failure."""
        cfg = self.config
        current = url
        retries_used = 0
        while True:
            result.final_url = current
            target = _parse_url(current)
            result.attempts += 1
            retry_after = None
            try:
                response = self._request(target, deadline, options)
            except _Transient as exc:
                failure = _Stop("connection_error", str(exc))
            else:
                result.status, result.content_type = response.status, response.content_type
                if 200 <= response.status < 300:
                    if not response.body:
                        raise _Stop("empty_body", f"{response.status_line} with 0 bytes")
                    result.body = response.body
                    return
                if response.status in _REDIRECT_STATUSES and response.location:
                    if result.redirects >= cfg.max_redirects:
                        next_hop = response.location[:200]
                        raise _Stop("too_many_redirects", f"more than {cfg.max_redirects}; next {next_hop}")
                    result.redirects += 1
                    current = urljoin(current, response.location.strip())
                    continue
                failure = _Stop(f"http_{response.status}", response.status_line)
                if response.status not in _RETRY_STATUSES:
                    raise failure
                retry_after = response.retry_after
                if on_throttle is not None and response.status in _THROTTLE_STATUSES:
                    on_throttle(self._throttle_wait(retry_after, retries_used))
            if retries_used >= cfg.retries:
                raise failure
            time.sleep(self._retry_wait(retry_after, retries_used, failure, deadline))
            retries_used += 1

    def _throttle_wait(self, retry_after: str | None, retries_used: int) -> float:
        """The pause a 429/503 asks for: Retry-After capped at max_retry_after_s, else the backoff."""
        wait = _retry_after_s(retry_after) if retry_after is not None else None
        if wait is None:
            wait = self.config.backoff_base_s * 2**retries_used
        return min(wait, self.config.max_retry_after_s)

    def _retry_wait(self, retry_after: str | None, retries_used: int, failure: _Stop, deadline: float) -> float:
        """Seconds to wait before the next try; raises `failure` if waiting is pointless."""
        cfg = self.config
        wait = _retry_after_s(retry_after) if retry_after is not None else None
        if wait is not None and wait > cfg.max_retry_after_s:
            raise _Stop(failure.reason, f"{failure.detail}; Retry-After {wait:g}s above {cfg.max_retry_after_s:g}s")
        if wait is None:
            wait = cfg.backoff_base_s * 2**retries_used * random.uniform(1.0, 1.1)
        if time.monotonic() + wait >= deadline:
            late = f"retry in {wait:.2f}s would pass the {cfg.timeout_s:g}s deadline"
            raise _Stop(failure.reason, f"{failure.detail}; {late}")
        return wait

    def _permitted_addresses(self, target: _Target, deadline: float) -> list[tuple[int, tuple]]:
        """(family, sockaddr) for every resolved address we may connect to; raises _Stop if none."""
        if target.ip is not None:
            family = socket.AF_INET6 if target.ip.version == 6 else socket.AF_INET
            infos = [(family, socket.SOCK_STREAM, 0, "", (target.ip.compressed, target.port))]
        else:
            infos = self._resolve(target, deadline)
        allowed = (target.host, target.port) in self.config.allow_hosts
        permitted, refused, seen = [], [], set()
        for family, _type, _proto, _canonname, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6) or sockaddr[0] in seen:
                continue
            seen.add(sockaddr[0])
            category = address_category(sockaddr[0])
            if category is None or allowed:
                permitted.append((family, sockaddr))
            else:
                refused.append(f"{sockaddr[0]} is {category}")
        if permitted:
            return permitted
        if not refused:
            raise _Stop("dns_error", f"{target.ascii_host}: no IPv4/IPv6 address")
        raise _Stop("private_address", f"{', '.join(refused)}; ({target.host}, {target.port}) not in --allow-hosts")

    def _resolve(self, target: _Target, deadline: float) -> list:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Stop("timeout", f"deadline passed before resolving {target.ascii_host}")
        future = self._dns_pool.submit(self._resolver, target.ascii_host, target.port, type=socket.SOCK_STREAM)
        try:
            return future.result(timeout=remaining)
        except FutureTimeoutError:
            future.cancel()
            raise _Stop("timeout", f"resolving {target.ascii_host} passed the deadline") from None
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            raise _Stop("dns_error", f"{target.ascii_host}: {exc}") from None

    @contextmanager
    def _host_slot(self, key: tuple[str, int], deadline: float):
        """Hold one of the per_host_concurrency slots of `key` (host, port) until the deadline at most."""
        with self._slots_lock:
            entry = self._slots.get(key)
            if entry is None:
                entry = self._slots[key] = [threading.Semaphore(self.config.per_host_concurrency), 0]
            entry[1] += 1
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not entry[0].acquire(timeout=remaining):
                raise _Stop("timeout", f"deadline passed waiting for a request slot for {key}")
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._slots_lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._slots[key]

    def _request(self, target: _Target, deadline: float, options: _CallOptions) -> _Response:
        """One GET to one checked address of `target`, connection closed afterwards."""
        addresses = self._permitted_addresses(target, deadline)
        with self._host_slot((target.host, target.port), deadline):
            phase = "connect"
            sock = None
            try:
                sock = self._connect(addresses, deadline)
                if target.scheme == "https":
                    phase = "TLS handshake"
                    sock.settimeout(self._io_timeout(deadline))
                    sock = self._ssl_context.wrap_socket(sock, server_hostname=target.ascii_host)
                phase = "request"
                sock.settimeout(self._io_timeout(deadline))
                sock.sendall(self._request_bytes(target, options.accept))
                phase = "response headers"
                reader = _DeadlineReader(sock, deadline, self.config.read_timeout_s)
                response = http.client.HTTPResponse(reader, method="GET")
                response.begin()
                while 100 <= response.status < 200:  # interim (103 Early Hints...): http.client skips only 100
                    response.fp = None  # detached, so discarding it does not close the shared reader
                    response = http.client.HTTPResponse(reader, method="GET")
                    response.begin()
                phase = "body"
                return self._read_response(response, deadline, options)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    detail = f"deadline of {self.config.timeout_s:g}s passed during {phase}"
                else:
                    detail = f"no progress within the socket timeout during {phase}"
                raise _Stop("timeout", f"{detail} ({target.host_header})") from None
            except ssl.SSLError as exc:  # includes certificate and hostname verification failures
                raise _Stop("connection_error", f"TLS error with {target.host_header}: {exc}") from None
            except (ConnectionError, http.client.IncompleteRead) as exc:  # refused, reset, cut short
                raise _Transient(f"{phase} ({target.host_header}): {type(exc).__name__}: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:  # unreachable, malformed response
                detail = f"{phase} ({target.host_header}): {type(exc).__name__}: {exc}"
                raise _Stop("connection_error", detail) from None
            finally:
                if sock is not None:
                    sock.close()

    def _io_timeout(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        return min(self.config.read_timeout_s, remaining)

    def _connect(self, addresses: list[tuple[int, tuple]], deadline: float) -> socket.socket:
        """Connect to the first of the checked addresses that answers; raises the last error."""
        error: OSError = TimeoutError("deadline passed before connecting")
        for family, sockaddr in addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(min(self.config.connect_timeout_s, remaining))
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error

    def _request_bytes(self, target: _Target, accept: str) -> bytes:
        # Identity encoding: bodies arrive as served, so the byte cap is the real size and a
        # compressed bomb is never inflated here. Connection: close, since nothing is reused.
        return (
            f"GET {target.request_target} HTTP/1.1\r\n"
            f"Host: {target.host_header}\r\n"
            f"User-Agent: {self.config.user_agent}\r\n"
            f"Accept: {accept}\r\n"
            "Accept-Encoding: identity\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")

    def _read_response(self, response: http.client.HTTPResponse, deadline: float, options: _CallOptions) -> _Response:
        """Check opt-outs and size, then read a 2xx body within the cap and the deadline."""
        cfg = self.config
        status = response.status
        status_line = f"{status} {response.reason}".strip()
        if status < 400 and options.check_optouts:  # an opt-out on a redirect hop covers what it points to
            if cfg.x_robots_tag:
                directive = is_disallowed_by_robots(response.headers, cfg.user_agent_token, cfg.disallowed_directives)
                if directive is not None:
                    values = "; ".join(response.headers.get_all("X-Robots-Tag") or [])
                    raise _Stop(f"robots_{directive}", f"X-Robots-Tag: {values[:500]}", status)
            if cfg.tdm_header:
                reserved = tdm_reserved(response.headers)
                if reserved is not None:
                    raise _Stop("tdm_reservation", reserved, status)
        body = None
        if 200 <= status < 300:
            cap = options.max_bytes
            declared = response.length  # None when chunked or absent
            if declared is not None and declared > cap and not options.truncate:
                raise _Stop("too_large", f"Content-Length {declared} > max_bytes {cap}", status)
            # Reading one byte past the cap tells "exactly at the cap" from "above it"; when
            # truncating, reading stops at the cap and the connection is closed on the rest.
            limit = cap if options.truncate else cap + 1
            chunks, total = [], 0
            while total < limit:
                if time.monotonic() >= deadline:  # a steady drip never trips the per-recv timeout
                    raise TimeoutError("deadline passed")
                chunk = response.read(min(_CHUNK_BYTES, limit - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            if total > cap:
                raise _Stop("too_large", f"body passed max_bytes {cap} while streaming", status)
            if declared is not None and total < min(declared, limit):
                raise http.client.IncompleteRead(b"", declared - total)
            body = b"".join(chunks)
        return _Response(
            status=status,
            status_line=status_line,
            content_type=response.getheader("Content-Type"),
            location=response.getheader("Location"),
            retry_after=response.getheader("Retry-After"),
            body=body,
        )
