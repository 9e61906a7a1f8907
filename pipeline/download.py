"""Download stage: many requests in flight per worker, through the safe fetcher.

A blocking request per element would leave a worker idle on every slow server. `_DownloadFn`
submits each batch's URLs to a per-worker thread pool and keeps up to `--download-threads` requests
running across batches, emitting records as their downloads finish; one stalled URL holds one
slot until its deadline, not the whole batch. `finish_bundle` drains what is left, so nothing is
lost at a bundle boundary.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.records import STAGE_DOWNLOAD, Reject
from pipeline.records import reject_row
from pipeline.stage import StageCounters


class _DownloadFn(beam.DoFn):
    def __init__(self, cfg, columns):
        self.cfg, self.columns = cfg, columns

    def setup(self):
        from pipeline.fetch import Fetcher

        self.fetcher = Fetcher(self.cfg.fetch_config())  # one per worker process, shared by its threads
        self.max_in_flight = self.cfg.threads
        self.pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="kiln-download")
        self.counters = StageCounters(STAGE_DOWNLOAD)

    def start_bundle(self):
        self.pending = deque()

    def _fetch(self, record):
        return record, self.fetcher.fetch(str(record[self.columns.url_col]).strip())

    def _emit(self, done):
        record, result = done.result()
        self.counters.busy_ms.inc(int(result.elapsed_s * 1000))
        if result.ok:
            self.counters.n_out.inc()
            record = dict(record)
            record["_body"] = result.body
            record["final_url"] = result.final_url
            record["http_status"] = result.status
            record["content_type"] = result.content_type
            return record
        rej = Reject(STAGE_DOWNLOAD, result.reason, result.detail)
        self.counters.reject(rej)
        return beam.pvalue.TaggedOutput("rejects", reject_row(record, rej, self.columns.url_col, self.columns.id_col))

    def _drain(self, block_until: int):
        """Emit finished downloads; block while more than `block_until` are still in flight."""
        while self.pending:
            done = [f for f in self.pending if f.done()]
            if not done and len(self.pending) > block_until:
                wait(self.pending, return_when=FIRST_COMPLETED)
                continue
            if not done:
                return
            for f in done:
                self.pending.remove(f)
                yield self._emit(f)

    def process(self, batch):
        self.counters.n_in.inc(len(batch))
        for record in batch:
            self.pending.append(self.pool.submit(self._fetch, record))
            yield from self._drain(block_until=self.max_in_flight)

    def finish_bundle(self):
        for out in self._drain(block_until=0):
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, MIN_TIMESTAMP, [GlobalWindow()]))
            else:
                yield WindowedValue(out, MIN_TIMESTAMP, [GlobalWindow()])

    def teardown(self):
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "fetcher", None) is not None:
            self.fetcher.close()


class Download(beam.PTransform):
    """records -> {"main": records with `_body` bytes, "rejects": reject rows}.

    `cfg`: the run's DownloadConfig (`--download-threads` requests in flight per worker);
    `columns`: its InputConfig (the URL and id columns)."""

    def __init__(self, cfg, columns, batch_size: int = 64):
        super().__init__()
        self.cfg, self.columns, self.batch_size = cfg, columns, batch_size

    def expand(self, records):
        out = (
            records
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.batch_size)
            | "Fetch" >> beam.ParDo(_DownloadFn(self.cfg, self.columns)).with_outputs("rejects", main="main")
        )
        return {"main": out.main, "rejects": out.rejects}
