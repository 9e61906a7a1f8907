"""Download stage: polite to each host for the whole job, with many requests in flight per worker.

Politeness across workers. Shards are uid ranges, so one host's URLs reach every worker; a limit
kept inside each worker lets W workers hit a host W times as hard (img2dataset #62, #331). So the
stage keys every row by (host, bucket) -- host: the URL's host:port (`fetch.host_of`); bucket:
crc32(uid) mod B, B = --per-host-buckets -- and groups by that key. A GroupByKey hands each key's
rows to exactly one `process` call on one worker, which lets at most c_b of them be in flight,
where the c_b of a host's B buckets add up to K = --per-host-concurrency (`bucket_shares`). So at
most K requests to one host are in flight for the whole job, whatever the number of workers. The
same split applies to --per-host-rate: bucket b starts at most rate * c_b / K URLs per second.

What holds, and what does not (no store is shared between workers):
- The K bound holds for every URL's first host, on any runner, as long as one key is processed
  once at a time. A runner that re-runs a failed or straggling bundle while the first attempt is
  still fetching (Spark speculation, a zombie worker) can briefly exceed it.
- A redirect to another host is outside its own host's budget; each worker process still holds
  every host:port, redirect targets included, to K (the Fetcher's own per-process limit).
- A 429 or 503 (`HostBudget.throttle`) pauses every bucket of that host *in this worker* for the
  Retry-After (capped at the fetcher's max_retry_after_s, 10 s; else its backoff) and halves that
  bucket's window (requests in flight and, with a rate, the rate); successes grow it back. Buckets
  on other workers slow down when they get their own 429s, which a throttling server sends to
  each of them: the host's total load falls with every bucket that hears one, not all at once.

Throughput. A bucket at its limit does not hold up the worker: `process` returns as soon as a
thread is free that no open group may use, so Beam hands over the next group while the open ones
continue; up to --download-threads requests are in flight across groups, emitted as they finish.
A host with one URL is one small group among many. `finish_bundle` runs the open groups to the end.
Rows waiting for their bucket's budget have not started: the per-URL deadline starts with the fetch.

Counters: `download/throttled` (429/503 answers seen), `download/hosts` (distinct hosts), and for
the TOP_HOSTS hosts with the most URLs `host/<host:port>/urls|ok|throttled` -- a bounded set,
chosen in the pipeline after summing per host, never one counter per host seen.
"""

from __future__ import annotations

import threading
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.records import STAGE_DOWNLOAD, Reject
from pipeline.records import reject_row
from pipeline.stage import StageCounters

TOP_HOSTS = 20  # hosts (most URLs first) whose own counters reach stats.json
NO_HOST = ""  # key of URLs the fetcher refuses before connecting: no host to be polite to
_MIN_WINDOW = 1 / 16  # with a rate, a throttled bucket slows down to 1/16 of it at most


def bucket_shares(concurrency: int, buckets: int) -> list[int]:
    """Requests in flight each of a host's buckets may have: K split over B, summing to K exactly."""
    if not 1 <= buckets <= concurrency:
        raise ValueError(f"need 1 <= buckets <= concurrency, got {buckets} buckets for {concurrency}")
    return [concurrency // buckets + (1 if b < concurrency % buckets else 0) for b in range(buckets)]


def download_key(url, uid, buckets: int) -> tuple[str, int]:
    """(host:port, bucket) of a row: the bucket from the uid alone, so it is the same in every process."""
    from pipeline.fetch import host_of

    host = host_of(str(url).strip())
    return (NO_HOST if host is None else host, zlib.crc32(str(uid).encode("utf-8")) % buckets)


class HostBudget:
    """One bucket's share of a host's budget in one worker: requests in flight, start rate, back-off.

    `limit` (c_b) requests in flight and `rate` URL starts per second (0: none). The window starts
    at `limit`; a 429/503 halves it (once per pause) and pauses the host until the time asked for;
    every success that was not throttled grows it by 1/window (by one per window of successes, as
    TCP's congestion avoidance does), below 1 by doubling. In flight: at most max(1, floor(window));
    rate: rate * window / limit. `pause` is a one-item list [until] that this worker's buckets of
    the same host share. Pure: every method takes the time, so tests drive it with plain numbers.
    """

    def __init__(self, limit: int, rate: float = 0.0, pause: list | None = None):
        self.limit, self.rate = limit, rate
        self.window = float(limit)
        self.in_flight = 0
        self.next_start = float("-inf")
        self.pause = pause if pause is not None else [float("-inf")]
        self._cut_until = float("-inf")  # answers within one pause halve the window once

    def cap(self) -> int:
        return max(1, int(self.window))

    def ready_at(self, now: float) -> float | None:
        """The earliest time a request may start (`now` if it may start now); None while the
        window is full (a finished request frees a slot)."""
        if self.in_flight >= self.cap():
            return None
        return max(now, self.pause[0], self.next_start)

    def start(self, now: float) -> None:
        self.in_flight += 1
        if self.rate:
            self.next_start = max(now, self.next_start) + self.limit / (self.rate * self.window)

    def done(self, throttled: bool) -> None:
        self.in_flight -= 1
        if not throttled:
            self.window = min(self.limit, self.window * 2 if self.window < 1 else self.window + 1 / self.window)

    def throttle(self, now: float, wait_s: float) -> None:
        if now >= self._cut_until:
            self.window = max(_MIN_WINDOW if self.rate else 1.0, self.window / 2)
        self._cut_until = max(self._cut_until, now + wait_s)
        self.pause[0] = max(self.pause[0], now + wait_s)


class _Group:
    """One key's rows being downloaded: the rows not yet started, the budget, per-host tallies."""

    def __init__(self, host: str, rows, budget: HostBudget):
        self.host, self.rows, self.budget = host, iter(rows), budget
        self.exhausted = False
        self.urls = self.ok = self.throttled = 0


def _windowed(out):
    if isinstance(out, beam.pvalue.TaggedOutput):
        return beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, MIN_TIMESTAMP, [GlobalWindow()]))
    return WindowedValue(out, MIN_TIMESTAMP, [GlobalWindow()])


class _DownloadFn(beam.DoFn):
    """((host, bucket), rows) -> records with `_body`, "rejects", and "hosts" tallies per group."""

    def __init__(self, cfg, columns, consent=None):
        self.cfg, self.columns, self.consent = cfg, columns, consent

    def setup(self):
        from pipeline.fetch import Fetcher

        overrides = {} if self.consent is None else {"tdm_header": self.consent.tdmrep, "x_robots_tag": self.consent.x_robots_tag}
        self.fetcher = Fetcher(self.cfg.fetch_config(**overrides))  # one per worker process, shared by its threads
        self.threads = self.cfg.threads
        self.max_open = 4 * self.threads  # groups open at once (each waits for its budget or a thread)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kiln-download")
        self.shares = bucket_shares(self.cfg.per_host_concurrency, self.cfg.per_host_buckets)
        self.counters = StageCounters(STAGE_DOWNLOAD)
        self.n_throttled = Metrics.counter("kiln", f"{STAGE_DOWNLOAD}/throttled")
        self.lock = threading.Lock()  # budgets: fetch threads report 429/503s while this thread plans

    def start_bundle(self):
        self.groups: list[_Group] = []  # open groups, in arrival order (started round-robin)
        self.pending: dict = {}  # future -> its group
        self.pauses: dict[str, list] = {}  # host -> [until, open groups of it]: shared back-off

    def process(self, element):
        (host, bucket), rows = element
        if host == NO_HOST:  # refused before any connection: nothing to be polite to
            budget = HostBudget(self.threads)
        else:
            pause = self.pauses.setdefault(host, [float("-inf"), 0])
            pause[1] += 1
            share = self.shares[bucket]
            budget = HostBudget(share, self.cfg.per_host_rate * share / self.cfg.per_host_concurrency, pause)
        self.groups.append(_Group(host, rows, budget))
        yield from self._run(take_more=True)

    def finish_bundle(self):
        for out in self._run(take_more=False):
            yield _windowed(out)

    def _run(self, take_more: bool):
        """Start what the budgets allow, emit what finished. take_more: return once the worker could
        use another group (a free thread no open group may take now); else finish every group."""
        while self.groups or self.pending:
            wake = self._start_ready()
            yield from self._emit_finished()
            free = len(self.pending) < self.threads
            if take_more and free and len(self.groups) < self.max_open:
                return
            if not self.groups and not self.pending:
                break
            timeout = None if wake is None or not free else max(0.0, wake - time.monotonic())
            if self.pending:
                wait(list(self.pending), timeout=timeout, return_when=FIRST_COMPLETED)
            elif timeout is not None:
                time.sleep(timeout)

    def _start_ready(self) -> float | None:
        """Submit every row whose budget allows it now; the earliest time another one may start."""
        wake = None
        for group in self.groups:
            while not group.exhausted and len(self.pending) < self.threads:
                now = time.monotonic()
                with self.lock:
                    at = group.budget.ready_at(now)
                if at is None:
                    break
                if at > now:
                    wake = at if wake is None else min(wake, at)
                    break
                record = next(group.rows, None)  # rows are read here, on the bundle's thread only
                if record is None:
                    group.exhausted = True
                    break
                with self.lock:
                    group.budget.start(now)
                group.urls += 1
                self.counters.n_in.inc()
                self.pending[self.pool.submit(self._fetch, group, record)] = group
        return wake

    def _fetch(self, group: _Group, record):
        throttles = []

        def on_throttle(wait_s: float):
            throttles.append(wait_s)
            with self.lock:
                group.budget.throttle(time.monotonic(), wait_s)

        return record, self.fetcher.fetch(str(record[self.columns.url_col]).strip(), on_throttle), len(throttles)

    def _emit_finished(self):
        for future in [f for f in self.pending if f.done()]:
            group = self.pending.pop(future)
            record, result, throttles = future.result()
            with self.lock:
                group.budget.done(throttled=throttles > 0)
            group.throttled += throttles
            self.n_throttled.inc(throttles)
            yield self._emit(record, result, group)
        still_open = []
        for group in self.groups:
            if group.exhausted and group.budget.in_flight == 0:
                yield from self._close(group)
            else:
                still_open.append(group)
        self.groups = still_open

    def _close(self, group: _Group):
        if group.host != NO_HOST:
            pause = self.pauses[group.host]
            pause[1] -= 1
            if pause[1] == 0:
                del self.pauses[group.host]
            yield beam.pvalue.TaggedOutput("hosts", (group.host, (group.urls, group.ok, group.throttled)))

    def _emit(self, record, result, group: _Group):
        self.counters.busy_ms.inc(int(result.elapsed_s * 1000))
        if result.ok:
            group.ok += 1
            self.counters.n_out.inc()
            record = dict(record)
            record["_body"] = result.body
            record["source_bytes"] = len(result.body)
            record["final_url"] = result.final_url
            record["http_status"] = result.status
            record["content_type"] = result.content_type
            return record
        rej = Reject(STAGE_DOWNLOAD, result.reason, result.detail)
        self.counters.reject(rej)
        return beam.pvalue.TaggedOutput("rejects", reject_row(record, rej, self.columns.url_col, self.columns.id_col))

    def teardown(self):
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "fetcher", None) is not None:
            self.fetcher.close()


def _sum_tallies(tallies):
    urls = ok = throttled = 0
    for u, o, t in tallies:
        urls, ok, throttled = urls + u, ok + o, throttled + t
    return urls, ok, throttled


def _host_counters(top):
    for host, (urls, ok, throttled) in top:
        Metrics.counter("kiln", f"host/{host}/urls").inc(urls)
        Metrics.counter("kiln", f"host/{host}/ok").inc(ok)
        Metrics.counter("kiln", f"host/{host}/throttled").inc(throttled)
    return []


def top_hosts(counters: dict) -> list[dict]:
    """stats.json's per-host table from the run's counters: [{"host", "urls", "ok", "throttled"}],
    most URLs first (the TOP_HOSTS hosts the stage reported)."""
    table: dict[str, dict] = {}
    for name, value in counters.items():
        if name.startswith("host/"):
            host, _, field = name[len("host/"):].rpartition("/")
            table.setdefault(host, {"host": host})[field] = value
    return sorted(table.values(), key=lambda row: (-row.get("urls", 0), row["host"]))


class Download(beam.PTransform):
    """records -> {"main": records with `_body` bytes, "rejects": reject rows}.

    `cfg`: the run's DownloadConfig (--per-host-concurrency, --per-host-buckets, --per-host-rate,
    --download-threads); `columns`: its InputConfig (the URL and id columns); `consent`: its
    ConsentConfig (whether X-Robots-Tag and the tdm-reservation header are honoured; None: both are)."""

    def __init__(self, cfg, columns, consent=None):
        super().__init__()
        self.cfg, self.columns, self.consent = cfg, columns, consent

    def expand(self, records):
        url_col, buckets = self.columns.url_col, self.cfg.per_host_buckets
        out = (
            records
            | "KeyByHostBucket" >> beam.Map(lambda r: (download_key(r[url_col], r["uid"], buckets), r))
            | "GroupByHostBucket" >> beam.GroupByKey()
            | "Fetch" >> beam.ParDo(_DownloadFn(self.cfg, self.columns, self.consent)).with_outputs("rejects", "hosts", main="main")
        )
        per_host = out.hosts | "SumPerHost" >> beam.CombinePerKey(_sum_tallies)
        _ = (
            per_host
            | "CountHosts" >> beam.combiners.Count.Globally()
            | "HostsCounter" >> beam.FlatMap(lambda n: Metrics.counter("kiln", f"{STAGE_DOWNLOAD}/hosts").inc(n) or [])
        )
        _ = (
            per_host
            | "TopHosts" >> beam.combiners.Top.Of(TOP_HOSTS, key=lambda kv: (kv[1][0], kv[0]))
            | "TopHostCounters" >> beam.FlatMap(_host_counters)
        )
        return {"main": out.main, "rejects": out.rejects}
