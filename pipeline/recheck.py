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

from pipeline.errors import RunFailed, UserError

from pipeline.recheck_rules import (  # noqa: F401 - re-exported: the command's public names
    UNAVAILABLE_REASONS, SIGNALS, ON_UNAVAILABLE, RULES_BATCH, HEAD_ACCEPT, NO_ORIGIN, _DOWNLOAD_KEYS, _OVERRIDABLE, signal_of, head_verdict, rules_summary, head_counts, build_report, _counts_of, HeadFetcher, head_url, RecheckConfig)


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
