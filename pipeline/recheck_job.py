"""The Beam job of `kiln recheck` (pipeline/recheck.py: the command, its settings and the pure parts).

Kept apart so that `kiln --help` does not import Beam. The graph, every step labelled:

    MetaFiles ─► ReadKept ─► Recheck/KeyByOriginBucket ─┬─► Origins ─► DistinctOrigins ─► FetchRules ─► ToBuckets ─┐
                                                        └──────────────────────────────────────────► JoinRules ◄─┘
        ─► Recheck/Check ─► outcomes ─► Flagged ─► WriteFlagged;  CountOutcomes ─► WriteCounts
                          └► origins  ─► GroupOrigin ─► MergeOrigin ─► WriteOrigins
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.fetch import Fetcher
from pipeline.recheck_rules import (NO_ORIGIN, RULES_BATCH, UNAVAILABLE_REASONS, HeadFetcher, RecheckConfig, head_url, head_verdict,
                              rules_summary)


_DRAIN_AT = 1024  # outcomes decided by the rules alone that are let out before the next row is read


class _ReadKeptFn(beam.DoFn):
    """A meta parquet path -> (uid, url) of every kept sample in it, read in batches."""

    def __init__(self, url_col: str):
        self.url_col = url_col

    def process(self, path):
        import pyarrow.parquet as pq
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=["uid", self.url_col]):
                for uid, url in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    yield uid, "" if url is None else str(url).strip()


class _FetchRulesFn(beam.DoFn):
    """A batch of distinct origins -> (origin, HostRules), fetched on threads (as pipeline.optout)."""

    def __init__(self, cfg: RecheckConfig):
        self.cfg = cfg

    def setup(self):
        self.fetcher = Fetcher(self.cfg.download.fetch_config())
        self.pool = ThreadPoolExecutor(min(32, self.cfg.download.threads), thread_name_prefix="kiln-recheck-rules")
        self.n_origins = Metrics.counter("kiln", "recheck/origins")

    def _fetch(self, origin):
        from pipeline.hostrules import fetch_host_rules

        return origin, fetch_host_rules(self.fetcher, origin, robots=self.cfg.robots_txt, tdmrep=self.cfg.tdmrep)

    def process(self, origins):
        for origin, rules in self.pool.map(self._fetch, origins):
            self.n_origins.inc()
            yield origin, rules

    def teardown(self):
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "fetcher", None) is not None:
            self.fetcher.close()


class _RecheckFn(beam.DoFn):
    """((origin, bucket), {"rows": [(uid, url)], "rules": [HostRules]}) -> one outcome per row
    {"uid", "origin", "outcome", "reason", "detail"}, and "origins": (origin, (summary, rows, flagged)).

    Rules first (no request); the URLs they allow get one HEAD each, at most c_b in flight and at most
    rate * c_b / K started per second for this bucket (HostBudget), a 429/503 pausing and halving it."""

    def __init__(self, cfg: RecheckConfig):
        self.cfg = cfg

    def setup(self):
        from pipeline.download import bucket_shares

        dl = self.cfg.download
        self.shares = bucket_shares(dl.per_host_concurrency, dl.per_host_buckets)
        self.fetch_cfg = dl.fetch_config()
        self.head_fetcher = HeadFetcher(self.fetch_cfg)
        self.get_fetcher = Fetcher(self.fetch_cfg)
        self.pool = ThreadPoolExecutor(dl.threads, thread_name_prefix="kiln-recheck-head")
        self.fresh: dict = {}
        self.lock = threading.Lock()
        self.n_head = Metrics.counter("kiln", "recheck/head")

    def _current(self, origin, rules):
        """The origin's rules, fetched again once they are older than the TTL (RFC 9309 §2.4)."""
        if time.time() - rules.fetched_at <= self.cfg.rules_ttl_s:
            return rules
        with self.lock:
            again = self.fresh.get(origin)
            if again is None or time.time() - again.fetched_at > self.cfg.rules_ttl_s:
                from pipeline.hostrules import fetch_host_rules

                again = self.fresh[origin] = fetch_host_rules(self.get_fetcher, origin, robots=self.cfg.robots_txt,
                                                              tdmrep=self.cfg.tdmrep)
            return again

    def process(self, element):
        (origin, bucket), grouped = element
        rules = next(iter(grouped["rules"]), None)
        if origin == NO_ORIGIN or rules is None:  # a URL the fetcher refuses before connecting: nothing to ask
            for uid, _url in grouped["rows"]:
                yield {"uid": uid, "origin": origin, "outcome": "no_origin", "reason": None, "detail": ""}
            return
        tally = {"rows": 0, "flagged": 0, "rules": rules}
        decided: list = []  # outcomes that needed no request, drained by _head_all as it pulls rows
        for outcome in self._head_all(origin, self._checked(origin, grouped["rows"], tally, decided), self.shares[bucket], decided):
            tally["flagged"] += outcome["outcome"] in ("optout", "unavailable")
            yield outcome
        if tally["rows"]:
            yield beam.pvalue.TaggedOutput("origins", (origin, (rules_summary(tally["rules"]), tally["rows"], tally["flagged"])))

    def _checked(self, origin: str, rows, tally: dict, decided: list):
        """The rows as they come (a big host's group is never held in memory): (uid, url) for a row
        that needs a HEAD; None after a row decided without one (its outcome put in `decided`)."""
        from pipeline.hostrules import check_url

        token, ai = self.cfg.download.user_agent_token, self.cfg.ai_crawler_tokens
        for uid, url in rows:
            tally["rows"] += 1
            tally["rules"] = rules = self._current(origin, tally["rules"])
            verdict = check_url(url, rules, token, ai)
            if verdict is None and self.cfg.head:
                yield uid, url
                continue
            if verdict is None:
                decided.append({"uid": uid, "origin": origin, "outcome": "ok", "reason": None, "detail": "no HEAD"})
            else:
                outcome = "unavailable" if verdict[0] in UNAVAILABLE_REASONS else "optout"
                decided.append({"uid": uid, "origin": origin, "outcome": outcome, "reason": verdict[0], "detail": verdict[1]})
            yield None

    def _head_all(self, origin: str, todo, limit: int, decided: list):
        """HEAD the (uid, url) items of `todo` with at most `limit` in flight (and the bucket's rate),
        yielding each outcome as it is known; None items only mean "drain `decided`"."""
        from pipeline.download import HostBudget

        dl = self.cfg.download
        budget = HostBudget(limit, dl.per_host_rate * limit / dl.per_host_concurrency)
        lock = threading.Lock()
        throttled: set = set()
        pending: dict = {}

        def run(uid, url):
            def on_throttle(wait_s):  # on the fetch thread: a 429/503 pauses and narrows this bucket
                with lock:
                    throttled.add(uid)
                    budget.throttle(time.monotonic(), wait_s)

            return head_url(self.head_fetcher, self.get_fetcher, url, on_throttle)

        def pull():
            """The next row to HEAD, StopIteration at the end, or None to let `yield_now` out first."""
            while True:
                item = next(todo, StopIteration)
                yield_now.extend(decided)
                decided.clear()
                if item is not None:
                    return item
                if len(yield_now) >= _DRAIN_AT:
                    return None

        yield_now: list = []
        nxt = pull()
        while True:
            yield from yield_now
            yield_now.clear()
            if nxt is None:
                nxt = pull()
                continue
            if nxt is StopIteration and not pending:
                return
            now = time.monotonic()
            with lock:
                ready = budget.ready_at(now) if nxt is not StopIteration else None
                start = ready is not None and ready <= now
                if start:
                    budget.start(now)
            if start:
                uid, url = nxt
                pending[self.pool.submit(run, uid, url)] = uid
                self.n_head.inc()
                nxt = pull()
                continue
            timeout = None if ready is None else ready - now
            if not pending:
                time.sleep(timeout)  # rate-limited, nothing in flight: wait for the next start
                continue
            done, _ = wait(list(pending), timeout=timeout, return_when=FIRST_COMPLETED)
            for future in done:
                uid = pending.pop(future)
                result = future.result()
                with lock:
                    budget.done(uid in throttled)
                outcome, reason, detail = head_verdict(result)
                yield {"uid": uid, "origin": origin, "outcome": outcome, "reason": reason, "detail": detail}

    def teardown(self):
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        for name in ("head_fetcher", "get_fetcher"):
            if getattr(self, name, None) is not None:
                getattr(self, name).close()


def _merge_origin(kv):
    origin, parts = kv
    parts = sorted(parts, key=lambda p: p[0]["fetched_at"])
    summary = dict(parts[0][0])
    summary["samples"] = sum(p[1] for p in parts)
    summary["flagged"] = sum(p[2] for p in parts)
    return summary


class Recheck(beam.PTransform):
    """(uid, url) -> {"outcomes": one dict per row, "origins": one summary dict per origin}."""

    def __init__(self, cfg: RecheckConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, rows):
        from pipeline.optout import optout_key

        buckets = self.cfg.download.per_host_buckets
        keyed = rows | "KeyByOriginBucket" >> beam.Map(lambda r: (optout_key(r[1], r[0], buckets), r))
        rules = (
            keyed
            | "Origins" >> beam.Map(lambda kv: kv[0][0])
            | "DistinctOrigins" >> beam.Distinct()
            | "RealOrigins" >> beam.Filter(lambda o: o != NO_ORIGIN)
            | "BatchOrigins" >> beam.BatchElements(min_batch_size=1, max_batch_size=RULES_BATCH)
            | "FetchRules" >> beam.ParDo(_FetchRulesFn(self.cfg))
            | "ToBuckets" >> beam.FlatMap(lambda kv: [((kv[0], b), kv[1]) for b in range(buckets)])
        )
        checked = (
            {"rows": keyed, "rules": rules}
            | "JoinRules" >> beam.CoGroupByKey()
            | "Check" >> beam.ParDo(_RecheckFn(self.cfg)).with_outputs("origins", main="outcomes")
        )
        origins = checked.origins | "GroupOrigin" >> beam.GroupByKey() | "MergeOrigin" >> beam.Map(_merge_origin)
        return {"outcomes": checked.outcomes, "origins": origins}


def build_pipeline(p, cfg: RecheckConfig, meta_paths: list[str], prefix: str) -> None:
    """The job: writes `prefix`-flagged*, -counts*, -origins* (JSON lines) for the driver to merge."""
    from apache_beam.io import WriteToText

    rows = p | "MetaFiles" >> beam.Create(meta_paths) | "ReadKept" >> beam.ParDo(_ReadKeptFn(cfg.url_col))
    out = rows | "Recheck" >> Recheck(cfg)
    outcomes = out["outcomes"]
    (outcomes
     | "Flagged" >> beam.Filter(lambda o: o["outcome"] in ("optout", "unavailable"))
     | "FlaggedJson" >> beam.Map(lambda o: json.dumps({k: o[k] for k in ("uid", "origin", "reason", "detail")}, sort_keys=True))
     | "WriteFlagged" >> WriteToText(f"{prefix}-flagged", ".jsonl"))
    (outcomes
     | "OutcomeKey" >> beam.Map(lambda o: (o["outcome"], o["reason"]))
     | "CountOutcomes" >> beam.combiners.Count.PerElement()
     | "CountsJson" >> beam.Map(lambda kv: json.dumps([kv[0][0], kv[0][1], kv[1]]))
     | "WriteCounts" >> WriteToText(f"{prefix}-counts", ".jsonl"))
    (out["origins"]
     | "OriginsJson" >> beam.Map(lambda o: json.dumps(o, sort_keys=True))
     | "WriteOrigins" >> WriteToText(f"{prefix}-origins", ".jsonl"))
