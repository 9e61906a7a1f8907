"""The `blocklist` and `optout` stages: what can be refused before a single image byte is fetched.

    records ─► Blocklist ─► OptOut ─► (caption toxicity) ─► Download

Blocklist: each row against the SAMPLE_ID, URL sha256/md5 and domain entries of every --blocklist
(pipeline.blocklist); pure and per row.

OptOut, in three steps:
  1. each row against every --optout-list (domains, URL prefixes); pure and per row;
  2. the distinct origins (scheme://host:port) of the rows left -> `FetchRules`: robots.txt and
     /.well-known/tdmrep.json fetched ONCE per origin for the whole job, through the same safe
     fetcher as the images (address rules, caps, deadline), many origins at a time on threads;
  3. rows keyed by (origin, bucket) -- the bucket from the uid, as the Download stage keys them, so a
     big host is spread over B groups -- are joined with their origin's rules (CoGroupByKey: the rules
     travel to each of the origin's B groups, never as a side input of every origin) and checked
     (pipeline.hostrules.check_url). A group that starts more than --rules-ttl seconds after its rules
     were fetched fetches them again (once per worker process and origin).

Rows whose URL the fetcher would refuse before connecting (no origin) pass on untouched: the Download
stage rejects them with its own reason. Counters: `optout/origins`, `optout/robots_<status>` and
`optout/tdmrep_<status>` per origin (status: ok, none, unavailable), for stats.json's "consent".
"""

from __future__ import annotations

import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.records import STAGE_BLOCKLIST, STAGE_OPTOUT, Reject, reject_row
from pipeline.stage import StageCounters

NO_ORIGIN = ""
RULES_BATCH = 64  # origins per FetchRules batch (fetched on threads)


def load_lists(consent) -> tuple:
    """(Blocklists or None, [OptOutList]) from the run's ConsentConfig; ConfigError (one line) for a
    missing or malformed file. Called in the driver (to fail before any work, and for stats.json)
    and once per worker process."""
    from pipeline.blocklist import Blocklists, load_blocklist, load_optout_list

    lists = [load_blocklist(p, pdq_threshold=consent.pdq_threshold) for p in consent.blocklist]
    optouts = [load_optout_list(p) for p in consent.optout_list]
    return (Blocklists(lists) if lists else None), optouts


def list_hashes(consent) -> list[str]:
    """sha256 of every list file in flag order (the resume fingerprint takes them)."""
    blocklists, optouts = load_lists(consent)
    return [b.sha256 for b in (blocklists.lists if blocklists else ())] + [o.sha256 for o in optouts]


class _ListsMixin:
    """Loads the run's lists once per worker process and checks they are the files the driver saw."""

    def _load(self):
        blocklists, optouts = load_lists(self.consent)
        got = [b.sha256 for b in (blocklists.lists if blocklists else ())] + [o.sha256 for o in optouts]
        if got != list(self.expected_hashes):
            raise RuntimeError(f"a --blocklist/--optout-list file changed while the job ran (sha256 {got} != {list(self.expected_hashes)})")
        return blocklists, optouts


class _BlocklistFn(_ListsMixin, beam.DoFn):
    def __init__(self, consent, expected_hashes, columns):
        self.consent, self.expected_hashes, self.columns = consent, tuple(expected_hashes), columns

    def setup(self):
        self.blocklists, _ = self._load()
        self.counters = StageCounters(STAGE_BLOCKLIST)

    def process(self, record):
        self.counters.n_in.inc()
        match = self.blocklists.match_row(record.get(self.columns.id_col), str(record[self.columns.url_col]).strip())
        if match is None:
            self.counters.n_out.inc()
            yield record
            return
        rej = Reject(STAGE_BLOCKLIST, match.reason, match.detail)
        self.counters.reject(rej)
        yield beam.pvalue.TaggedOutput("rejects", reject_row(record, rej, self.columns.url_col, self.columns.id_col))


class Blocklist(beam.PTransform):
    """records -> {"main", "rejects"}: the row-level entries of every --blocklist."""

    def __init__(self, consent, expected_hashes, columns):
        super().__init__()
        self.consent, self.expected_hashes, self.columns = consent, expected_hashes, columns

    def expand(self, records):
        out = records | "Match" >> beam.ParDo(_BlocklistFn(self.consent, self.expected_hashes, self.columns)).with_outputs("rejects", main="main")
        return {"main": out.main, "rejects": out.rejects}


def optout_key(url, uid, buckets: int) -> tuple[str, int]:
    """(origin, bucket) of a row; the bucket as pipeline.download.download_key draws it."""
    from pipeline.hostrules import origin_of

    origin = origin_of(str(url).strip())
    return (NO_ORIGIN if origin is None else origin, zlib.crc32(str(uid).encode("utf-8")) % buckets)


class _OptOutListFn(_ListsMixin, beam.DoFn):
    """Step 1: the offline lists. Counts every row into the stage (`optout/in`)."""

    def __init__(self, consent, expected_hashes, columns):
        self.consent, self.expected_hashes, self.columns = consent, tuple(expected_hashes), columns

    def setup(self):
        _, self.optouts = self._load()
        self.counters = StageCounters(STAGE_OPTOUT)

    def process(self, record):
        self.counters.n_in.inc()
        url = str(record[self.columns.url_col]).strip()
        for lst in self.optouts:
            entry = lst.match(url)
            if entry is not None:
                rej = Reject(STAGE_OPTOUT, "optout_list", f"{lst.path}: {entry}")
                self.counters.reject(rej)
                yield beam.pvalue.TaggedOutput("rejects", reject_row(record, rej, self.columns.url_col, self.columns.id_col))
                return
        yield record


class _FetchRulesFn(beam.DoFn):
    """Step 2: a batch of distinct origins -> (origin, HostRules), fetched on threads."""

    def __init__(self, download_cfg, consent):
        self.download_cfg, self.consent = download_cfg, consent

    def setup(self):
        from pipeline.fetch import Fetcher

        self.fetcher = Fetcher(self.download_cfg.fetch_config())
        self.pool = ThreadPoolExecutor(min(32, self.download_cfg.threads), thread_name_prefix="kiln-rules")
        self.n_origins = Metrics.counter("kiln", f"{STAGE_OPTOUT}/origins")
        self.busy_ms = Metrics.counter("kiln", f"{STAGE_OPTOUT}/busy_ms")

    def _fetch(self, origin):
        from pipeline.hostrules import fetch_host_rules

        return origin, fetch_host_rules(self.fetcher, origin, robots=self.consent.robots_txt, tdmrep=self.consent.tdmrep)

    def process(self, origins):
        t0 = time.perf_counter()
        results = list(self.pool.map(self._fetch, origins))
        self.busy_ms.inc(int((time.perf_counter() - t0) * 1000))
        for origin, rules in results:
            self.n_origins.inc()
            Metrics.counter("kiln", f"{STAGE_OPTOUT}/robots_{rules.robots}").inc()
            Metrics.counter("kiln", f"{STAGE_OPTOUT}/tdmrep_{rules.tdmrep}").inc()
            yield origin, rules

    def teardown(self):
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "fetcher", None) is not None:
            self.fetcher.close()


class _CheckFn(beam.DoFn):
    """Step 3: ((origin, bucket), {"rows": [...], "rules": [HostRules]}) -> rows allowed, rejects."""

    def __init__(self, download_cfg, consent, columns):
        self.download_cfg, self.consent, self.columns = download_cfg, consent, columns

    def setup(self):
        self.counters = StageCounters(STAGE_OPTOUT)
        self.fresh: dict[str, object] = {}  # origin -> rules fetched again here after the TTL
        self.lock = threading.Lock()
        self.fetcher = None

    def _current(self, origin, rules):
        if time.time() - rules.fetched_at <= self.consent.rules_ttl_s:
            return rules
        with self.lock:
            again = self.fresh.get(origin)
            if again is None or time.time() - again.fetched_at > self.consent.rules_ttl_s:
                from pipeline.fetch import Fetcher
                from pipeline.hostrules import fetch_host_rules

                if self.fetcher is None:
                    self.fetcher = Fetcher(self.download_cfg.fetch_config())
                again = self.fresh[origin] = fetch_host_rules(self.fetcher, origin, robots=self.consent.robots_txt,
                                                              tdmrep=self.consent.tdmrep)
            return again

    def process(self, element):
        from pipeline.hostrules import check_url

        (origin, _bucket), grouped = element
        rules = list(grouped["rules"])
        rules = rules[0] if rules else None
        token = self.download_cfg.user_agent_token
        for record in grouped["rows"]:
            verdict = None
            if rules is not None:
                rules = self._current(origin, rules)
                verdict = check_url(str(record[self.columns.url_col]).strip(), rules, token, self.consent.ai_crawler_tokens)
            if verdict is None:
                self.counters.n_out.inc()
                yield record
                continue
            rej = Reject(STAGE_OPTOUT, verdict[0], verdict[1])
            self.counters.reject(rej)
            yield beam.pvalue.TaggedOutput("rejects", reject_row(record, rej, self.columns.url_col, self.columns.id_col))

    def teardown(self):
        if getattr(self, "fetcher", None) is not None:
            self.fetcher.close()


class OptOut(beam.PTransform):
    """records -> {"main", "rejects"}: --optout-list, then robots.txt and tdmrep.json (one fetch per origin)."""

    def __init__(self, consent, expected_hashes, download_cfg, columns):
        super().__init__()
        self.consent, self.expected_hashes, self.download_cfg, self.columns = consent, expected_hashes, download_cfg, columns

    def expand(self, records):
        consent, columns = self.consent, self.columns
        listed = records | "OptOutLists" >> beam.ParDo(_OptOutListFn(consent, self.expected_hashes, columns)).with_outputs("rejects", main="main")
        rejects = [listed.rejects]
        if not (consent.robots_txt or consent.tdmrep):
            counters = StageCounters(STAGE_OPTOUT)

            def passed(record):
                counters.n_out.inc()
                return record

            return {"main": listed.main | "Passed" >> beam.Map(passed), "rejects": listed.rejects}
        url_col, buckets = columns.url_col, self.download_cfg.per_host_buckets
        keyed = listed.main | "KeyByOriginBucket" >> beam.Map(lambda r: (optout_key(r[url_col], r["uid"], buckets), r))
        rules = (
            keyed
            | "Origins" >> beam.Map(lambda kv: kv[0][0])
            | "DistinctOrigins" >> beam.Distinct()
            | "RealOrigins" >> beam.Filter(lambda o: o != NO_ORIGIN)
            | "BatchOrigins" >> beam.BatchElements(min_batch_size=1, max_batch_size=RULES_BATCH)
            | "FetchRules" >> beam.ParDo(_FetchRulesFn(self.download_cfg, consent))
            | "ToBuckets" >> beam.FlatMap(lambda kv: [((kv[0], b), kv[1]) for b in range(buckets)])
        )
        checked = (
            {"rows": keyed, "rules": rules}
            | "JoinRules" >> beam.CoGroupByKey()
            | "Check" >> beam.ParDo(_CheckFn(self.download_cfg, consent, columns)).with_outputs("rejects", main="main")
        )
        rejects.append(checked.rejects)
        return {"main": checked.main, "rejects": rejects | "OptOutRejects" >> beam.Flatten()}
