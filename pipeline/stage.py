"""The one Beam adapter that every per-record stage uses: a pure function over a batch, on threads.

A stage function takes one record and returns the updated record or raises `Reject`. `ThreadedStage`
feeds it batches (from BatchElements) and runs the batch on a per-worker thread pool: Pillow, cv2
and socket I/O release the GIL, so one worker process keeps several cores busy. Rejects leave on
the "rejects" tagged output with the stage and reason; an unexpected exception in a stage function
becomes a reject with reason `<stage>_error`-style detail instead of failing the whole bundle.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.records import Reject, reject_row

class StageCounters:
    """Beam counters per stage (Dataflow's UI shows them live; stats.json records them), the one
    counters class every stage uses: `<stage>/in`, `/out`, `/rejected`, `/busy_ms`, and
    `reject/<stage>/<reason>`. The finalizer checks in == out + rejected per stage."""

    def __init__(self, stage: str):
        self.stage = stage
        self.n_in = Metrics.counter("kiln", f"{stage}/in")
        self.n_out = Metrics.counter("kiln", f"{stage}/out")
        self.n_rej = Metrics.counter("kiln", f"{stage}/rejected")
        self.busy_ms = Metrics.counter("kiln", f"{stage}/busy_ms")

    def reject(self, rej: Reject):
        self.n_rej.inc()
        Metrics.counter("kiln", f"reject/{rej.stage}/{rej.reason}").inc()


class _ThreadedStageFn(beam.DoFn):
    def __init__(self, stage: str, make_fn: Callable[[], Callable[[dict], dict]], threads: int, error_reason: str, columns):
        self.stage = stage
        self.make_fn = make_fn
        self.threads = threads
        self.error_reason = error_reason
        self.columns = columns

    def setup(self):
        # Built once per worker process. A make_fn that loads a torch model calls
        # pipeline.compat.ensure_torch_compat() first: Beam workers are fresh processes.
        self.fn = self.make_fn()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"kiln-{self.stage}")
        self.counters = StageCounters(self.stage)

    def _apply(self, record: dict):
        try:
            return self.fn(record), None
        except Reject as rej:
            return record, rej
        except Exception as err:  # noqa: BLE001 - hostile input must not crash the bundle
            return record, Reject(self.stage, self.error_reason, f"{type(err).__name__}: {err}")

    def process(self, batch):
        t0 = time.perf_counter()
        self.counters.n_in.inc(len(batch))
        results = list(self.pool.map(self._apply, batch)) if len(batch) > 1 else [self._apply(batch[0])]
        self.counters.busy_ms.inc(int((time.perf_counter() - t0) * 1000))
        for record, rej in results:
            if rej is None:
                self.counters.n_out.inc()
                yield record
            else:
                self.counters.reject(rej)
                yield beam.pvalue.TaggedOutput("rejects", reject_row(record, rej, self.columns.url_col, self.columns.id_col))

    def teardown(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


class ThreadedStage(beam.PTransform):
    """records -> {"main": records, "rejects": reject rows}, batched and threaded per worker."""

    def __init__(self, stage: str, make_fn, columns, threads: int = 2, batch_size: int = 32, error_reason: str = "error"):
        """`columns`: the run's InputConfig (which input columns hold the URL and the row id)."""
        super().__init__()
        self.stage, self.make_fn, self.columns = stage, make_fn, columns
        self.threads, self.batch_size, self.error_reason = threads, batch_size, error_reason

    def expand(self, records):
        out = (
            records
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.batch_size)
            | "Apply" >> beam.ParDo(_ThreadedStageFn(self.stage, self.make_fn, self.threads, self.error_reason, self.columns)).with_outputs("rejects", main="main")
        )
        return {"main": out.main, "rejects": out.rejects}
