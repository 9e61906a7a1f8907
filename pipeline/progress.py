"""A live progress line for `kiln prepare`: rows read / kept / rejected, rate, elapsed, ETA.

    kiln prepare: read 41,000/41,000 100.0% | kept 20,112 | rejected 9,870 | done 73.1% | 412 rows/s | 0:01:13 | eta 0:00:27

Why not Beam's metrics: on the DirectRunner (Beam 2.77, in_memory and multi_processing alike)
`Pipeline.run()` blocks until the job has finished and only then returns a result, so there is no
result to poll while the job runs (checked: run() returns after the job's whole duration, in state
DONE). Local runs therefore count rows with `ProgressTap`s -- pass-through ParDos at three places
in the graph (rows read, rows kept, rows rejected) -- that write their running counts to small
files in a local temporary directory (one file per DoFn instance, replaced atomically, at most
every `flush_s`); `ProgressPrinter` sums the files from a background thread. That works the same
in-process and with worker processes on the same machine (multi_processing, or a portable runner
with LOOPBACK workers). On runners whose `run()` returns at once (Dataflow), the printer polls
`result.metrics()` instead, from the stages' own Beam counters.

Counts are for the display only: a retried bundle may count twice. stats.json's accounting
comes from the files the job wrote, never from these.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid

import apache_beam as beam

TAP_NAMES = ("read", "kept", "rejected")
# Runners whose workers share this machine's filesystem (so taps can write where we read).
LOCAL_RUNNERS = ("DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner", "FnApiRunner", "PrismRunner")


# -- worker side: taps -----------------------------------------------------------------------------


class _ProgressTapFn(beam.DoFn):
    """Counts the elements passing through and yields them unchanged."""

    def __init__(self, progress_dir: str, name: str, flush_s: float = 0.5):
        self.progress_dir, self.name, self.flush_s = progress_dir, name, flush_s

    def setup(self):
        self.path = os.path.join(self.progress_dir, f"{self.name}.{os.getpid()}.{uuid.uuid4().hex}.json")
        self.count = 0
        self.flushed = -1
        self.last_flush = 0.0

    def _flush(self):
        if self.count == self.flushed:
            return
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"name": self.name, "count": self.count}, f)
            os.replace(tmp, self.path)
        except OSError:
            return  # the printer has gone (directory removed): progress is best effort
        self.flushed, self.last_flush = self.count, time.monotonic()

    def process(self, element):
        self.count += 1
        if time.monotonic() - self.last_flush >= self.flush_s:
            self._flush()
        yield element

    def finish_bundle(self):
        self._flush()

    def teardown(self):
        self._flush()


def tap(pcoll, progress_dir: str | None, name: str, label: str | None = None):
    """`pcoll` with a counting tap named `name` when `progress_dir` is set, else `pcoll` itself."""
    if not progress_dir:
        return pcoll
    if name not in TAP_NAMES:
        raise ValueError(f"progress tap name must be one of {TAP_NAMES}, got {name!r}")
    return pcoll | (label or f"Progress/{name}") >> beam.ParDo(_ProgressTapFn(progress_dir, name))


def tap_all(pcolls: list, progress_dir: str | None, name: str) -> list:
    """A tap on each of `pcolls` (e.g. every stage's rejects, before they are flattened: a tap
    after the Flatten would only count once every stage feeding it has finished)."""
    return [tap(pc, progress_dir, name, label=f"Progress/{name}/{i}") for i, pc in enumerate(pcolls)]


def read_taps(progress_dir: str) -> dict[str, int]:
    """{tap name: count} summed over every tap file in `progress_dir`."""
    out = dict.fromkeys(TAP_NAMES, 0)
    for path in glob.glob(os.path.join(progress_dir, "*.json")):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue  # replaced or removed while we read it: the next poll sees it
        out[data["name"]] = out.get(data["name"], 0) + int(data["count"])
    return out


def runs_locally(options) -> bool:
    """Whether the job's workers share this machine's filesystem (taps can report to us)."""
    from apache_beam.options.pipeline_options import PortableOptions, StandardOptions

    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) or runner is None else type(runner).__name__
    if name is None or name.rsplit(".", 1)[-1] in LOCAL_RUNNERS:
        return True
    return (options.view_as(PortableOptions).environment_type or "").upper() == "LOOPBACK"


class LocalProgress:
    """A temporary directory for the taps of one local run, and the printer that reads it.

        progress = LocalProgress()
        build_pipeline(..., progress_dir=progress.dir)
        with progress.printer(input_rows):
            p.run().wait_until_finish()
        progress.close()
    """

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="kiln-progress-")

    @classmethod
    def for_run(cls, options, enabled: bool = True) -> LocalProgress | None:
        """A LocalProgress when enabled and the runner's workers are local, else None."""
        return cls() if enabled and runs_locally(options) else None

    def printer(self, input_rows: int, **kw) -> ProgressPrinter:
        return ProgressPrinter(self.dir, input_rows, **kw)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# -- driver side: the printer ----------------------------------------------------------------------


def job_metrics(result):
    """`result.metrics()`, asked of the runner afresh on every call.

    Beam's portable PipelineResult (PortableRunner, and FlinkRunner / SparkRunner, which extend it)
    keeps its first GetJobMetrics answer for good (Beam 2.77,
    apache_beam/runners/portability/portable_runner.py, `PipelineResult.metrics`): one progress poll
    while the job runs would freeze the counters that stats.json and the accounting read when it
    has finished. Dropping that cached answer makes each call ask the job service again."""
    from apache_beam.runners.portability.portable_runner import PipelineResult as PortableResult

    if isinstance(result, PortableResult):
        result._metrics = None  # noqa: SLF001 - Beam's cache of the first answer (see above)
    return result.metrics()


def counts_from_metrics(result) -> dict[str, int] | None:
    """{read, kept, rejected} from a running job's Beam counters (namespace "kiln"), or None."""
    from apache_beam.metrics.metric import MetricsFilter

    from pipeline.records import STAGES

    try:
        res = job_metrics(result).query(MetricsFilter().with_namespace("kiln"))
    except Exception:  # noqa: BLE001 - a runner that cannot report metrics while running
        return None
    c = collections.Counter()
    for counter in res.get("counters", []):
        value = counter.committed if counter.committed is not None else counter.attempted
        c[counter.key.metric.name] += value or 0
    return {
        "read": c["read/rows"],
        "kept": c["write/samples"],
        "rejected": sum(c[f"{stage}/rejected"] for stage in STAGES),
    }


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_line(counts: dict[str, int], input_rows: int, elapsed_s: float, rate: float | None) -> str:
    read, kept, rejected = counts.get("read", 0), counts.get("kept", 0), counts.get("rejected", 0)
    done = kept + rejected
    pct = lambda k: f"{100.0 * k / input_rows:5.1f}%" if input_rows else "  -  "  # noqa: E731
    parts = [
        f"kiln prepare: read {read:,}/{input_rows:,} {pct(read)}",
        f"kept {kept:,}",
        f"rejected {rejected:,}",
        f"done {pct(done).strip()}",
        f"{rate:,.0f} rows/s" if rate is not None else "- rows/s",
        _hms(elapsed_s),
    ]
    if rate and input_rows > done:
        parts.append(f"eta {_hms((input_rows - done) / rate)}")
    return " | ".join(parts)


class ProgressPrinter:
    """Prints one progress line every `interval_s` from a background thread while a job runs.

    `source` is a LocalProgress directory (a path the job's taps write to) or a PipelineResult of a
    runner whose run() returns at once (its Beam counters are polled). On a TTY the line is
    rewritten in place with a carriage return; otherwise one plain line is printed per interval in
    which the counts changed (and at least every `quiet_every` intervals). `stop()` prints the
    final line.
    """

    def __init__(self, source, input_rows: int, interval_s: float = 2.0, stream=None, quiet_every: int = 15):
        self.source = source
        self.input_rows = int(input_rows or 0)
        self.interval_s = interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.quiet_every = quiet_every
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        self._history: collections.deque = collections.deque(maxlen=16)  # (t, done) for the rate
        self._last_counts = None
        self._since_print = 0
        self._width = 0
        self.lines_printed = 0

    def counts(self) -> dict[str, int] | None:
        if isinstance(self.source, (str, os.PathLike)):
            return read_taps(os.fspath(self.source))
        return counts_from_metrics(self.source)

    def _rate(self, now: float, done: int) -> float | None:
        self._history.append((now, done))
        t_first, d_first = self._history[0]
        if now - t_first > 0 and done > d_first:
            return (done - d_first) / (now - t_first)
        elapsed = now - self._t0
        return done / elapsed if done and elapsed > 0 else None

    def poll(self, final: bool = False) -> str | None:
        """Read the counts and print a line (if due); returns the line printed, if any."""
        counts = self.counts()
        if counts is None:
            return None
        now = time.monotonic()
        done = counts.get("kept", 0) + counts.get("rejected", 0)
        elapsed = now - self._t0
        rate = (done / elapsed if elapsed > 0 and done else None) if final else self._rate(now, done)
        line = format_line(counts, self.input_rows, elapsed, rate)
        changed = counts != self._last_counts
        self._last_counts = counts
        self._since_print += 1
        if final and not changed and self.lines_printed and not self.tty:
            return None  # the last periodic line already says it
        if not (final or changed or self._since_print >= self.quiet_every):
            return None
        self._since_print = 0
        if self.tty:
            pad = " " * max(0, self._width - len(line))
            self._width = len(line)
            self.stream.write("\r" + line + pad + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.lines_printed += 1
        return line

    def _run(self):
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a display must never break the job
                pass

    def start(self) -> ProgressPrinter:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="kiln-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self, final: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
            self._thread = None
        if final:
            try:
                self.poll(final=True)
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> ProgressPrinter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(final=exc[0] is None)
