"""`kiln recheck PARENT --out FILE`: ask every kept sample's host again, today, whether it opts out.

Consent changes after a dataset is made: a site adds `Disallow` for kiln or for an AI crawler to its
robots.txt, publishes a tdmrep.json, or starts sending `X-Robots-Tag: noai`. A static dataset cannot
follow that unless someone asks again. This command asks, with exactly the rules `kiln prepare` used,
and writes the uids whose owners now opt out, one per line, sorted: the list `kiln subset PARENT
--drop-uids FILE` reads. A JSON report goes beside it (FILE.json).

    meta/*.parquet (uid, URL) ─► key by (origin, bucket) ─► robots.txt + tdmrep.json once per origin
      ─► each URL checked against its origin's rules (pipeline.hostrules.check_url, as the OptOut stage)
      ─► the URLs still allowed: one HEAD each through the safe fetcher (X-Robots-Tag, tdm-reservation)
      ─► flagged uids + counts + one line per origin ─► FILE (uid list) and FILE.json (the report)

A Beam job, not a thread pool in the driver: a 400M-row parent is ~400M HEADs and a few million
origins. Grouped by (origin, crc32(uid) mod B) as the Download stage groups them, one host's URLs are
split over B groups, each on one worker with its share c_b of K = --per-host-concurrency requests in
flight (pipeline.download.bucket_shares) and of --per-host-rate, so at most K HEADs reach one host at
once for the whole job however many workers run, and a 429/503 slows that bucket down
(pipeline.download.HostBudget). The rules of an origin are fetched once for the whole job (and again
only after --rules-ttl, RFC 9309 §2.4) and joined to its B groups, as `kiln prepare`'s OptOut stage does.

What the parent recorded is reused (stats.json "flags"): the URL column, --allow-hosts, the user-agent
token, --ai-crawler-tokens, the X-Robots-Tag directives, timeouts, retries and politeness settings;
each has a flag to override it. Every protocol is checked whatever the parent's switches were: a
recheck exists to find opt-outs (--no-robots-txt, --no-tdmrep, --no-head turn one off).

Unavailable rules. A robots.txt that answers 5xx/429 or cannot be reached is RFC 9309 §2.3.1.4's
complete disallow, and `kiln prepare` rejects every URL of that origin (robotstxt_unavailable; likewise
tdmrep_unavailable). `--on-unavailable drop` (the default) does the same here: those uids are listed,
with that reason. `--on-unavailable report` lists only positive opt-outs; the uids of origins whose
rules were unavailable go to the report's "held" section and to "unavailable_hosts", for a later
recheck to decide (a host that is down for an hour would otherwise empty the dataset of its samples).
Either way the report names every unavailable origin and why. URLs of such an origin get no HEAD.

A HEAD that fails (404, timeout, a redirect to a private address) is not an opt-out: the uid is kept
and the failure counted under the report's "head" section. A server answering 405/501 to HEAD is
asked with a GET cut after its first byte instead (the headers are what matter).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from dataclasses import dataclass

from pipeline.errors import RunFailed, UserError
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


def config_from(args: argparse.Namespace, flags: dict) -> RecheckConfig:
    """The parent's recorded flags (stats.json "flags"), overridden by this command's flags."""
    from pipeline.config import SETTINGS, DownloadConfig

    def parent(key):
        value = flags.get(key, SETTINGS[key].default)
        return tuple(value) if isinstance(value, list) else value

    values = {SETTINGS[key].name: parent(key) for key in _DOWNLOAD_KEYS}
    for key in _OVERRIDABLE:
        if getattr(args, key, None) is not None:
            values[SETTINGS[key].name] = getattr(args, key)
    try:
        download = DownloadConfig(**values)
        download.fetch_config()  # a bad --allow-hosts, timeout or UA token: ValueError naming it
    except ValueError as err:
        raise UserError(str(err)) from None
    if download.per_host_buckets > download.per_host_concurrency:
        raise UserError(f"--per-host-buckets {download.per_host_buckets} is above --per-host-concurrency "
                        f"{download.per_host_concurrency}: lower the buckets or raise the concurrency")
    if download.per_host_rate < 0 or download.threads < 1:
        raise UserError("--per-host-rate must be >= 0 and --download-threads >= 1")
    ai = args.ai_crawler_tokens
    ai_tokens = tuple(t.strip() for t in ai.split(",") if t.strip()) if ai is not None else parent("ai_crawler_tokens")
    url_col = args.url_col or parent("url_col")
    cfg = RecheckConfig(parent=args.parent.rstrip("/"), out=args.out, url_col=url_col, download=download,
                        ai_crawler_tokens=tuple(ai_tokens), rules_ttl_s=float(parent("rules_ttl")),
                        robots_txt=not args.no_robots_txt, tdmrep=not args.no_tdmrep, head=not args.no_head,
                        on_unavailable=args.on_unavailable, overwrite=args.overwrite, quiet=args.quiet)
    if not (cfg.robots_txt or cfg.tdmrep or cfg.head):
        raise UserError("--no-robots-txt, --no-tdmrep and --no-head together leave nothing to check; drop one of them")
    return cfg


def read_parent(parent: str) -> tuple[dict, list[str]]:
    """(stats.json, the meta parquet paths in shard order) of a finished `kiln prepare` output; a
    UserError (one line) for anything else."""
    from apache_beam.io.filesystems import FileSystems

    from pipeline.outdir import join

    parent = parent.rstrip("/")
    if not FileSystems.exists(join(parent, "_SUCCESS")):
        raise UserError(f"{parent}: no _SUCCESS, so not a finished `kiln prepare` output; finish the run (re-run the same "
                        f"kiln prepare command) or give a finished dataset directory")
    try:
        with FileSystems.open(join(parent, "stats.json")) as f:
            stats = json.loads(f.read())
        with FileSystems.open(join(parent, "manifest.json")) as f:
            manifest = json.loads(f.read())
        metas = [join(parent, s["meta"]) for s in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{parent}: stats.json / manifest.json unreadable ({type(err).__name__}: {err}); "
                        f"run `kiln prepare` again on it") from None
    return stats, metas


def _check_columns(meta_paths: list[str], url_col: str) -> None:
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    if not meta_paths:
        return
    with FileSystems.open(meta_paths[0]) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    if url_col not in names or "uid" not in names:
        raise UserError(f"{meta_paths[0]} has no column {url_col!r} (columns: {', '.join(names[:12])}...); "
                        f"pass the URL column with --url-col")


def _job_files(prefix: str) -> list[str]:
    from apache_beam.io.filesystems import FileSystems

    from pipeline.outdir import escape_glob

    return sorted(m.path for r in FileSystems.match([escape_glob(prefix) + "*"]) for m in r.metadata_list)


def _remove_beam_temp(prefix: str) -> None:
    """Beam's WriteToText stages its files in beam-temp-<name>-<hex>/ beside them and removes it when the
    job succeeds; a failed or interrupted job leaves it. Locally it goes here (the name carries this
    run's unique prefix, so it is ours)."""
    import os
    import shutil

    from pipeline.outdir import is_local

    if not is_local(prefix):
        return
    folder, name = os.path.split(os.path.abspath(prefix))
    for entry in os.listdir(folder):
        if entry.startswith(f"beam-temp-{name}-") and os.path.isdir(os.path.join(folder, entry)):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def _read_lines(prefix: str) -> tuple[list, list[str]]:
    """JSON lines of every file the job wrote under `prefix`, and those files' paths."""
    from apache_beam.io.filesystems import FileSystems

    paths = _job_files(prefix)
    items = []
    for path in paths:
        with FileSystems.open(path) as f:
            items += [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]
    return items, paths


def run(cfg: RecheckConfig, beam_argv: list[str] = (), test_pipeline=None) -> dict:
    """Recheck `cfg.parent`; write cfg.out (uid list) and cfg.out + ".json" (report). Returns the report."""
    import os
    import uuid

    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import __version__
    from pipeline.fetch import DEFAULT_USER_AGENT
    from pipeline.outdir import atomic_write, delete_files, is_local

    stats, meta_paths = read_parent(cfg.parent)
    report_path = cfg.out + ".json"
    for path in (cfg.out, report_path):
        if FileSystems.exists(path) and not cfg.overwrite:
            raise UserError(f"{path} exists; pass --overwrite to replace it, or choose another --out")
        if is_local(path) and os.path.isdir(path):
            raise UserError(f"{path} is a directory; --out names a file")
    if is_local(cfg.out) and not os.path.isdir(os.path.dirname(os.path.abspath(cfg.out))):
        raise UserError(f"--out {cfg.out}: its folder does not exist; create it first")
    _check_columns(meta_paths, cfg.url_col)

    started = dt.datetime.now(dt.timezone.utc)
    prefix = f"{cfg.out}.tmp-{uuid.uuid4().hex[:12]}"
    written: list[str] = []
    import apache_beam as beam

    from pipeline.recheck_job import build_pipeline

    try:
        p = test_pipeline if test_pipeline is not None else beam.Pipeline(options=PipelineOptions(list(beam_argv)))
        build_pipeline(p, cfg, meta_paths, prefix)
        p.run().wait_until_finish()
        flagged, f1 = _read_lines(f"{prefix}-flagged")
        counts, f2 = _read_lines(f"{prefix}-counts")
        origins, f3 = _read_lines(f"{prefix}-origins")
        written = f1 + f2 + f3
    finally:
        delete_files(written or _job_files(prefix))  # the job's own files only: every name carries this run's prefix
        _remove_beam_temp(prefix)
    counts = _counts_of(counts)
    uids, result = build_report(flagged, counts, origins, cfg.on_unavailable, head_counts(counts, cfg.head))
    dl = cfg.download
    report = {
        "kiln_version": __version__,
        "command": "kiln recheck",
        "parent": cfg.parent,
        "parent_fingerprint": stats.get("config_fingerprint"),
        "parent_finished_at": stats.get("finished_at"),
        "parent_kept": stats.get("kept"),
        "checked_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "uid_list": os.path.basename(cfg.out) if is_local(cfg.out) else cfg.out,
        "settings": {
            "url_col": cfg.url_col, "user_agent": DEFAULT_USER_AGENT, "user_agent_token": dl.user_agent_token,
            "ai_crawler_tokens": list(cfg.ai_crawler_tokens), "disallowed_directives": list(dl.disallowed_directives),
            "robots_txt": cfg.robots_txt, "tdmrep": cfg.tdmrep, "head": cfg.head, "on_unavailable": cfg.on_unavailable,
            "per_host_concurrency": dl.per_host_concurrency, "per_host_buckets": dl.per_host_buckets,
            "per_host_rate": dl.per_host_rate, "download_timeout_s": dl.timeout_s, "retries": dl.retries,
            "allow_hosts": dl.allow_hosts, "rules_ttl_s": cfg.rules_ttl_s,
        },
        **result,
    }
    if result["samples_checked"] != stats.get("kept", result["samples_checked"]):
        raise RunFailed(f"recheck saw {result['samples_checked']} samples but {cfg.parent}/stats.json says {stats.get('kept')} "
                        f"were kept; the parent changed or the job lost rows -- re-run")
    atomic_write(report_path, lambda f: f.write((json.dumps(report, indent=1, sort_keys=False) + "\n").encode()))
    atomic_write(cfg.out, lambda f: f.write("".join(f"{u}\n" for u in uids).encode()))  # last: what subset reads
    if not cfg.quiet:
        by = ", ".join(f"{k} {v}" for k, v in result["dropped_by_reason"].items()) or "none"
        print(f"kiln recheck: {result['samples_checked']} samples on {result['hosts_checked']} hosts -> {len(uids)} now opt out "
              f"({by}); {len(result['unavailable']['hosts'])} host(s) with unavailable rules "
              f"({'dropped' if cfg.on_unavailable == 'drop' else 'held, not listed'})")
        print(f"  uid list: {cfg.out}   report: {report_path}")
    return report


# ---------------------------------------------------------------------------------------------
# CLI


def add_recheck_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("parent", metavar="PARENT", help="a finished `kiln prepare` output directory")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the uid list to write (one per line, sorted; for `kiln subset --drop-uids`); the report goes to FILE.json")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE and FILE.json if they exist")
    parser.add_argument("--on-unavailable", choices=ON_UNAVAILABLE, default="drop",
                        help="origins whose robots.txt/tdmrep.json answer 5xx/429 or cannot be reached: drop their samples "
                        "(RFC 9309's complete disallow, as kiln prepare does) or only report them [drop]")
    parser.add_argument("--no-robots-txt", action="store_true", help="do not fetch robots.txt")
    parser.add_argument("--no-tdmrep", action="store_true", help="do not fetch /.well-known/tdmrep.json")
    parser.add_argument("--no-head", action="store_true",
                        help="no per-URL HEAD (X-Robots-Tag, tdm-reservation header): rule files only, one or two requests per host")
    g = parser.add_argument_group("settings read from the parent's stats.json unless given")
    g.add_argument("--url-col", help="meta column holding the URL")
    g.add_argument("--allow-hosts", help="comma-separated exact host:port pairs allowed despite a non-public address")
    g.add_argument("--user-agent-token", help="our robots.txt / X-Robots-Tag token")
    g.add_argument("--ai-crawler-tokens", help="comma-separated robots.txt tokens whose own group disallowing a URL is an opt-out")
    g.add_argument("--per-host-concurrency", type=int, help="HEADs in flight to one host for the whole job")
    g.add_argument("--per-host-buckets", type=int, help="groups each host's URLs are split into (<= concurrency)")
    g.add_argument("--per-host-rate", type=float, help="HEADs started per second to one host for the whole job (0: no limit)")
    g.add_argument("--download-timeout", type=float, help="total deadline per request in seconds")
    g.add_argument("--retries", type=int, help="extra attempts on 429/5xx/connection errors")
    g.add_argument("--download-threads", type=int, help="requests in flight per worker process")
    parser.add_argument("--quiet", action="store_true", help="no summary printout")


def main_recheck(args: argparse.Namespace, beam_argv: list[str] = ()) -> int:
    from pipeline.beam_yaml import check_beam_args

    stats, _ = read_parent(args.parent)
    cfg = config_from(args, stats.get("flags") or {})
    check_beam_args(list(beam_argv), tuple(a for a in ("--out", "--overwrite", "--on-unavailable", "--no-robots-txt", "--no-tdmrep",
                                                        "--no-head", "--url-col", "--allow-hosts", "--user-agent-token",
                                                        "--ai-crawler-tokens", "--per-host-concurrency", "--per-host-buckets",
                                                        "--per-host-rate", "--download-timeout", "--retries", "--download-threads",
                                                        "--quiet")))
    run(cfg, beam_argv)
    return 0
