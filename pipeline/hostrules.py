"""Machine-readable opt-outs published once per origin: robots.txt (RFC 9309) and TDMRep's tdmrep.json.

`fetch_host_rules` fetches both files for one origin through the download stage's Fetcher (same
address rules, caps, deadline and redirects) into a small picklable `HostRules`; `check_url` then
decides every URL of that origin without touching the network. Reasons are those of
`records.REASONS["optout"]`.

robots.txt (RFC 9309, https://www.rfc-editor.org/rfc/rfc9309):
- §2.3.1.1: a 2xx body is parsed and its rules followed. protego does the parsing and matching:
  `*` and `$` (§2.2.3), longest match with Allow winning a tie (§2.2.2), case-insensitive
  user-agent tokens (§2.2.1). urllib.robotparser has neither wildcards nor longest match.
- §2.3.1.2: redirects are followed (the Fetcher's max_redirects, 5 by default; the RFC asks for at
  least five) and the rules apply to the origin first asked; more hops than that "MAY" be read as
  unavailable in the RFC's sense, i.e. no rules: robots "none".
- §2.3.1.3: 4xx means no robots.txt, everything is allowed: robots "none". Except 429, which
  kiln reads as the server being overloaded, as Google does for robots.txt.
- §2.3.1.4: 5xx (and 429) or a network failure ("unreachable" in the RFC) means complete
  disallow: robots "unavailable", and every URL of the origin is rejected robotstxt_unavailable.
  Note the names: the RFC's "unavailable" is our "none", its "unreachable" our "unavailable".
- §2.5: at least the first 500 KiB must be parsed; a longer file is cut at ROBOTS_MAX_BYTES
  after its last complete line.
- §2.4: the RFC's 24-hour cache limit is the caller's business; `HostRules.fetched_at` says when.

TDMRep (W3C TDM Reservation Protocol, Community Group Final Report of 2024-05-10, source at
https://github.com/w3c/tdm-reservation-protocol/blob/main/spec/index.html; section ids in brackets):
- "TDM File on the Origin Server" (#sec-tdm-file): /.well-known/tdmrep.json is a JSON array of rules, objects
  with "location" (a path pattern), "tdm-reservation" and an optional "tdm-policy" URL. "The
  most specific match is the first in sequence": the first rule whose location matches decides.
  No match leaves the reservation unset (not reserved).
- "Use of regular expressions" (#sec-tdm-file-regexp): locations use robots.txt's `*` and `$` and matching "SHOULD be
  case sensitive", following Google's robots.txt path matching: protego's matcher again.
- "tdm-reservation" (#sec-tdm-reservation): 1 reserves TDM rights, 0 does not; "Other values are considered protocol
  errors ... unset": such a rule still matches first but reserves nothing.
- "Failure to provide access to such a representation implies that the origin server does not
  implement this protocol": a 2xx that is not JSON at all (an HTML "soft 404", which many sites
  serve for unknown paths) is read as no file, tdmrep "none". A body that starts as JSON but is
  not a valid rule array is "unavailable", as are 5xx, 429 and network failures.
- "Processing priority" (#sec-processing-priority) lets a response's `tdm-reservation` header supersede the file; kiln is
  stricter: the file is checked before download and the header (fetch.tdm_reserved) during it,
  and either one reserving rights rejects the URL.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from urllib.parse import quote

from protego import Protego

from pipeline.fetch import Fetcher, FetchResult, _parse_url, _Stop

ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309 §2.5: parse at least the first 500 KiB
TDMREP_MAX_BYTES = 500 * 1024  # a longer tdmrep.json is not read (tdmrep "unavailable")
ROBOTS_ACCEPT = "text/plain, */*;q=0.1"
TDMREP_ACCEPT = "application/json, */*;q=0.1"
_DETAIL_CHARS = 250  # details stay short and never carry a body
_PATH_CHARS = 150


@dataclass(frozen=True)
class HostRules:
    """Both rule files of one origin, as fetched. Picklable: travels through Beam."""

    origin: str  # "https://example.com:443": scheme://host:port, host as fetch's allow-hosts key, IPv6 in brackets
    fetched_at: float  # time.time() when fetched
    robots: str  # "ok" (2xx, parsed), "none" (4xx but 429: all allowed), "unavailable" (5xx, 429, network...), "off"
    robots_detail: str  # status line or the fetcher's reason: detail, short
    robots_txt: str  # the 2xx body as UTF-8 (errors replaced), at most ROBOTS_MAX_BYTES; "" otherwise
    tdmrep: str  # "ok" (valid tdmrep.json), "none" (4xx but 429, empty or non-JSON 2xx), "unavailable", "off"
    tdmrep_detail: str
    tdmrep_rules: tuple = ()  # ((location, reservation: 1, 0 or None for unset, policy or None), ...) in file order


def origin_of(url) -> str | None:
    """"scheme://host:port" of `url` (IPv6 hosts in brackets); None where the fetcher would refuse
    the URL before connecting (not http/https, no host, bad port, ...)."""
    try:
        target = _parse_url(url)
    except _Stop:
        return None
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"{target.scheme}://{host}:{target.port}"


# ---------------------------------------------------------------------------------------------
# Fetching


def fetch_host_rules(fetcher: Fetcher, origin: str, *, robots: bool = True, tdmrep: bool = True, now=time.time) -> HostRules:
    """GET {origin}/robots.txt and {origin}/.well-known/tdmrep.json through `fetcher`.

    Opt-out headers on the rule files themselves are not checked (check_optouts=False).
    `robots`/`tdmrep` False: that file is not fetched and reads "off". Never raises for network
    or content problems: they become "unavailable" with the fetcher's reason in the detail.
    """
    fetched_at = now()
    base = origin.rstrip("/")
    robots_state, robots_detail, robots_txt = "off", "", ""
    if robots:
        result = fetcher.fetch(
            f"{base}/robots.txt", accept=ROBOTS_ACCEPT, max_bytes=ROBOTS_MAX_BYTES, truncate=True, check_optouts=False
        )
        robots_state, robots_detail, robots_txt = _robots_from(result)
    tdmrep_state, tdmrep_detail, rules = "off", "", ()
    if tdmrep:
        result = fetcher.fetch(
            f"{base}/.well-known/tdmrep.json", accept=TDMREP_ACCEPT, max_bytes=TDMREP_MAX_BYTES, check_optouts=False
        )
        tdmrep_state, tdmrep_detail, rules = _tdmrep_from(result)
    return HostRules(origin, fetched_at, robots_state, robots_detail, robots_txt, tdmrep_state, tdmrep_detail, rules)


def _no_file(result: FetchResult) -> bool:
    """4xx other than 429 (RFC 9309 §2.3.1.3), or more redirects than the fetcher follows (§2.3.1.2)."""
    status = result.status or 0
    if result.reason == "too_many_redirects":
        return True
    return result.reason == f"http_{status}" and 400 <= status < 500 and status != 429


def _failure(result: FetchResult) -> str:
    return f"{result.reason}: {result.detail}"[:_DETAIL_CHARS]


def _robots_from(result: FetchResult) -> tuple[str, str, str]:
    if result.reason == "empty_body":  # a 2xx with no rules in it
        return "ok", f"{result.status}, 0 bytes", ""
    if result.ok:
        body, detail = result.body, f"{result.status}, {len(result.body)} bytes"
        if len(body) >= ROBOTS_MAX_BYTES:
            # Cut at the cap: drop the partial last line, whose rule would be cut short too.
            body = body[: body.rfind(b"\n") + 1]
            detail = f"{result.status}, truncated to {len(body)} bytes (cap {ROBOTS_MAX_BYTES})"
        return "ok", detail, body.decode("utf-8", errors="replace")
    if _no_file(result):
        return "none", _failure(result), ""
    return "unavailable", _failure(result), ""


def _tdmrep_from(result: FetchResult) -> tuple[str, str, tuple]:
    if result.reason == "empty_body":
        return "none", f"{result.status}, 0 bytes", ()
    if result.ok:
        head = result.body.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        if not head:
            return "none", f"{result.status}, blank body", ()
        if head not in (b"[", b"{"):  # an HTML page or other soft 404: no tdmrep.json here
            return "none", f"{result.status}, not JSON ({result.content_type or 'no Content-Type'})"[:_DETAIL_CHARS], ()
        try:
            rules = parse_tdmrep(result.body)
        except ValueError as exc:
            return "unavailable", f"{result.status}, invalid tdmrep.json: {exc}"[:_DETAIL_CHARS], ()
        return "ok", f"{result.status}, {len(rules)} rules", rules
    if _no_file(result):
        return "none", _failure(result), ()
    return "unavailable", _failure(result), ()


def parse_tdmrep(data: bytes | str) -> tuple:
    """((location, reservation, policy), ...) from a tdmrep.json body, in file order.

    reservation: 1, 0, or None where the value is missing or not 0/1 (TDMRep "tdm-reservation":
    other values are protocol errors, read as unset); "1"/"0" strings and true/false are read as
    1/0. policy: the "tdm-policy" string or None. Raises ValueError (short message, no body) if
    `data` is not JSON, not an array, or has an item that is not an object with a string location.
    """
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(document, list):
        raise ValueError(f"top level is a JSON {type(document).__name__}, not an array")
    rules = []
    for index, item in enumerate(document):
        if not isinstance(item, dict) or not isinstance(item.get("location"), str):
            raise ValueError(f"rule {index} is not an object with a string \"location\"")
        policy = item.get("tdm-policy")
        rules.append((item["location"].strip(), _reservation(item.get("tdm-reservation")), policy if isinstance(policy, str) else None))
    return tuple(rules)


def _reservation(value) -> int | None:
    if isinstance(value, str):
        value = value.strip()
    if isinstance(value, (bool, int, float, str)):
        if value in (1, "1"):  # True == 1 == 1.0
            return 1
        if value in (0, "0"):
            return 0
    return None


# ---------------------------------------------------------------------------------------------
# Checking a URL


def check_url(url: str, rules: HostRules, token: str, ai_tokens: tuple[str, ...]) -> tuple[str, str] | None:
    """(reason, detail) if `rules` (fetched for `url`'s origin) opt `url` out, else None.

    In order: robots.txt unavailable (RFC 9309 §2.3.1.4); robots.txt disallows `url` for `token`
    (the group naming it, else `*`: protego's choice); a group naming one of `ai_tokens` itself
    (not through `*`) disallows it; tdmrep.json unavailable; the first tdmrep rule whose location
    matches reserves TDM rights. Matching is on the path and query as the fetcher sends them,
    percent-encoding normalised as protego does. None for a URL the fetcher would refuse anyway.
    """
    try:
        target = _parse_url(url).request_target
    except _Stop:
        return None
    matchable = "http://h" + target  # protego reads a bare "//a/b" path as an authority
    shown = target[:_PATH_CHARS]
    if rules.robots == "unavailable":
        return "robotstxt_unavailable", rules.robots_detail[:_DETAIL_CHARS]
    if rules.robots == "ok":
        parser = _robots_parser(rules.robots_txt)
        if not parser.can_fetch(matchable, token):
            return "robotstxt_disallowed", f"robots.txt group {_group_name(parser, token)!r} disallows {shown}"
        for ai_token in ai_tokens:
            if _group_name(parser, ai_token) == ai_token.strip().lower() and not parser.can_fetch(matchable, ai_token):
                return "robotstxt_ai_optout", f"robots.txt group {ai_token!r} disallows {shown}"
    if rules.tdmrep == "unavailable":
        return "tdmrep_unavailable", rules.tdmrep_detail[:_DETAIL_CHARS]
    if rules.tdmrep == "ok":
        for location, reservation, policy in rules.tdmrep_rules:
            if _location_matches(location, matchable):
                if reservation == 1:
                    detail = f"tdmrep.json location {location[:_PATH_CHARS]!r}, tdm-policy {policy or 'none'}"
                    return "tdmrep_reserved", detail[:_DETAIL_CHARS]
                break  # the first match decides (TDMRep "TDM File on the Origin Server")
    return None


@functools.lru_cache(maxsize=32)  # a parsed 500 KiB file can take megabytes; callers go origin by origin
def _robots_parser(robots_txt: str) -> Protego:
    """One parse per distinct robots.txt per process: check_url runs once per URL."""
    return Protego.parse(robots_txt)


def _group_name(parser: Protego, token: str) -> str | None:
    """The User-agent of the group protego applies to `token` (lowercased; "*" for the fallback),
    None if none. protego keeps the selection private (_get_matching_rule_set, unchanged since
    0.1); tests/pipeline/test_hostrules.py pins it."""
    rule_set = parser._get_matching_rule_set(token)
    return None if rule_set is None else rule_set.user_agent


# Characters that would end or comment out the one-line robots.txt below, or that protego would
# strip: percent-encoded as UTF-8 first, which protego's normalisation reads back the same way.
_LOCATION_UNSAFE = re.compile(r"[\x00-\x20\x7f-\U0010ffff#]+")


@functools.lru_cache(maxsize=4096)
def _location_parser(location: str) -> Protego | None:
    """TDMRep locations are robots.txt path patterns ("Use of regular expressions"), so a one-rule
    robots.txt is their matcher. None for an empty location, which matches nothing."""
    pattern = _LOCATION_UNSAFE.sub(lambda m: quote(m.group(), safe=""), location)
    return Protego.parse(f"User-agent: *\nDisallow: {pattern}\n") if pattern else None


def _location_matches(location: str, matchable: str) -> bool:
    parser = _location_parser(location)
    return parser is not None and not parser.can_fetch(matchable, "*")
