"""The pure side of `kiln recheck` (pipeline.recheck): verdicts, the report, the HEAD fetcher and the
job's settings. Shared by the command (pipeline.recheck) and its Beam job (pipeline.recheck_job),
which import this module and never each other."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pipeline.fetch import Fetcher, FetchResult
# robots.txt and tdmrep.json verdicts (pipeline.hostrules.check_url) and HEAD verdicts (pipeline.fetch),
# with the protocol ("signal") each belongs to, as pipeline.consent.PROTOCOLS groups them.
UNAVAILABLE_REASONS = ("robotstxt_unavailable", "tdmrep_unavailable")
SIGNALS = ("robots_txt", "tdmrep", "x_robots_tag")
ON_UNAVAILABLE = ("drop", "report")
RULES_BATCH = 64  # origins per FetchRules batch (fetched on threads), as pipeline.optout
HEAD_ACCEPT = "*/*"
_HEAD_FALLBACK_STATUSES = (405, 501)  # Method Not Allowed / Not Implemented: ask with a 1-byte GET
_DETAIL_CHARS = 300
NO_ORIGIN = ""
# The parent's stats.json "flags" keys reused here (pipeline.config SETTINGS keys).
_DOWNLOAD_KEYS = ("download_timeout", "connect_timeout", "retries", "max_redirects", "per_host_concurrency", "per_host_buckets",
                  "per_host_rate", "download_threads", "user_agent_token", "disallowed_directives", "allow_hosts")
_OVERRIDABLE = ("download_timeout", "retries", "per_host_concurrency", "per_host_buckets", "per_host_rate", "download_threads",
                "user_agent_token", "allow_hosts")  # this command's flags of the same names


# ---------------------------------------------------------------------------------------------
# Pure functions


def signal_of(reason: str) -> str:
    """The protocol an opt-out reason belongs to: robots_txt, tdmrep or x_robots_tag."""
    if reason.startswith("robotstxt_"):
        return "robots_txt"
    if reason.startswith("tdmrep_") or reason == "tdm_reservation":
        return "tdmrep"
    if reason.startswith("robots_"):  # download/robots_<directive>: X-Robots-Tag
        return "x_robots_tag"
    raise ValueError(f"not an opt-out reason: {reason!r}")


def head_verdict(result: FetchResult) -> tuple[str, str | None, str]:
    """(outcome, reason, detail) of one HEAD: ("optout", "robots_noai" / "tdm_reservation", ...) when a
    response on the way (redirect hops included) opts out; ("ok", None, status) when none does;
    ("head_failed", reason, detail) when the server could not be asked (not an opt-out)."""
    reason = result.reason
    if reason == "tdm_reservation" or (reason or "").startswith("robots_"):
        return "optout", reason, result.detail[:_DETAIL_CHARS]
    status = result.status or 0
    # A HEAD's 2xx has no body: the fetcher calls that empty_body; a 1-byte GET's is a body.
    if reason is None or (reason == "empty_body" and 200 <= status < 300):
        return "ok", None, str(status)
    return "head_failed", reason, result.detail[:_DETAIL_CHARS]


def rules_summary(rules) -> dict:
    """One origin's line of the report: what its robots.txt and tdmrep.json answered."""
    return {"origin": rules.origin, "robots": rules.robots, "robots_detail": rules.robots_detail,
            "tdmrep": rules.tdmrep, "tdmrep_detail": rules.tdmrep_detail,
            "fetched_at": dt.datetime.fromtimestamp(rules.fetched_at, dt.timezone.utc).isoformat(timespec="seconds")}


def head_counts(counts: dict, enabled: bool) -> dict:
    """The report's "head" section: URLs asked with a HEAD, and why the failed ones failed."""
    header_optouts = sum(n for r, n in counts.get("optout", {}).items() if signal_of(r) == "x_robots_tag" or r == "tdm_reservation")
    sent = sum(counts.get("ok", {}).values()) + sum(counts.get("head_failed", {}).values()) + header_optouts if enabled else 0
    return {"enabled": enabled, "urls": sent, "optouts": header_optouts, "failed": dict(sorted(counts.get("head_failed", {}).items()))}


def build_report(flagged: list[dict], counts: dict, origins: list[dict], on_unavailable: str, head: dict) -> tuple[list[str], dict]:
    """(sorted uids to drop, the report's result part) from what the job wrote.

    `flagged`: {"uid", "origin", "reason", "detail"} per opt-out or unavailable verdict; `counts`:
    {outcome: {reason: n}}; `origins`: one rules_summary per origin, with "samples" and "flagged".
    """
    dropped, held = {}, {}
    for row in sorted(flagged, key=lambda r: r["uid"]):
        entry = {"reason": row["reason"], "signal": signal_of(row["reason"]), "origin": row["origin"], "detail": row["detail"]}
        if row["reason"] in UNAVAILABLE_REASONS and on_unavailable == "report":
            held[row["uid"]] = entry
        else:
            dropped[row["uid"]] = entry
    by_reason: dict = {}
    by_signal = {s: 0 for s in SIGNALS}
    for entry in dropped.values():
        by_reason[entry["reason"]] = by_reason.get(entry["reason"], 0) + 1
        by_signal[entry["signal"]] += 1
    origins = sorted(origins, key=lambda o: o["origin"])
    unavailable = [o for o in origins if "unavailable" in (o["robots"], o["tdmrep"])]
    hosts = {f"robots_{s}": sum(1 for o in origins if o["robots"] == s) for s in ("ok", "none", "unavailable", "off")}
    hosts.update({f"tdmrep_{s}": sum(1 for o in origins if o["tdmrep"] == s) for s in ("ok", "none", "unavailable", "off")})
    result = {
        "samples_checked": sum(sum(v.values()) for v in counts.values()),
        "hosts_checked": len(origins),
        "dropped": len(dropped),
        "dropped_by_signal": by_signal,
        "dropped_by_reason": dict(sorted(by_reason.items())),
        "outcomes": {k: dict(sorted(v.items())) for k, v in sorted(counts.items())},
        "hosts": hosts,
        "head": head,
        "unavailable": {
            "policy": on_unavailable,
            "meaning": ("RFC 9309 2.3.1.4: an unreachable robots.txt (5xx, 429, network failure) is a complete disallow; "
                        "a tdmrep.json that is unavailable reserves TDM rights, as in kiln prepare. "
                        + ("Their samples are listed (dropped)." if on_unavailable == "drop"
                           else "Their samples are NOT listed: they are in \"held\" for a later recheck.")),
            "hosts": unavailable,
            "samples": sum(o["samples"] for o in unavailable),
        },
        "dropped_uids": dropped,
        "held_uids": held,
        "origins": origins,
    }
    return list(dropped), result


def _counts_of(lines) -> dict:
    counts: dict = {}
    for outcome, reason, n in lines:
        counts.setdefault(outcome, {})[reason or "-"] = counts.get(outcome, {}).get(reason or "-", 0) + n
    return counts


# ---------------------------------------------------------------------------------------------
# HEAD through the safe fetcher


class HeadFetcher(Fetcher):
    """The safe fetcher sending HEAD instead of GET. Everything else is Fetcher's own: the address
    check of every hop (--allow-hosts), redirects, retries, Retry-After, the per-URL deadline, the
    per-host slots and the X-Robots-Tag / tdm-reservation checks on every response. A HEAD's 2xx comes
    back as reason "empty_body" (no body): `head_verdict` reads it as "ok"."""

    def _request_bytes(self, target, accept: str) -> bytes:
        get = super()._request_bytes(target, accept)
        return b"HEAD" + get[len(b"GET"):]

    def _read_response(self, response, deadline, options):
        # http.client was told GET: tell it the truth, so it reads no body whatever Content-Length says.
        response._method = "HEAD"  # noqa: SLF001 - http.client's own switch for body-less responses
        response.length = None
        response.chunked = False
        return super()._read_response(response, deadline, options)


def head_url(head_fetcher: Fetcher, get_fetcher: Fetcher, url: str, on_throttle=None) -> FetchResult:
    """HEAD `url`; a 405/501 answer is asked again with a GET cut after its first byte."""
    result = head_fetcher.fetch(url, on_throttle, accept=HEAD_ACCEPT, max_bytes=1, truncate=True)
    if result.reason in {f"http_{s}" for s in _HEAD_FALLBACK_STATUSES}:
        result = get_fetcher.fetch(url, on_throttle, accept=HEAD_ACCEPT, max_bytes=1, truncate=True)
    return result


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class RecheckConfig:
    parent: str
    out: str
    url_col: str
    download: object  # pipeline.config.DownloadConfig: fetcher settings, politeness, UA token, allow-hosts
    ai_crawler_tokens: tuple
    rules_ttl_s: float = 86400.0
    robots_txt: bool = True
    tdmrep: bool = True
    head: bool = True
    on_unavailable: str = "drop"
    overwrite: bool = False
    quiet: bool = False

