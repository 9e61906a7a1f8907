"""`kiln prepare` through Beam's portable job API equals the DirectRunner, byte for byte.

Spark and Flink run a Python pipeline through Beam's portable runner: the graph is translated to the
runner API proto and submitted to a job service, the SDK harness unpickles every DoFn, encodes every
element with the coders the proto names, materialises the side inputs, and the job's metrics come
back through the job service's GetJobMetrics. Their job servers cannot start here (PITFALLS.md: they
are fetched from the internet at run time); Beam's in-process job service
(`--runner=PortableRunner --job_endpoint=embed --environment_type=LOOPBACK`) goes through the same
job API, so this is the test of everything a cluster run adds to a local one.

The end-to-end tests run `kiln prepare` as a user types it (the CLI, in a fresh process), with every
stage on, on the tiny local models and the synthetic web served from 127.0.0.1, once per runner into
the same --output path (the first output is moved aside before the second run), and compare.

Byte for byte needs every model score to be a function of its sample alone: which samples share a
model's batch depends on Beam's bundles and BatchElements' timing, which differ between runners and
between runs. Before filters/passes.py, two DirectRunner runs of this very job already differed in
the last bits of punsafe (1.7e-6 relative), toxicity (5e-7) and clip_similarity (2e-7).
"""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.prepare import _counters
from pipeline.progress import ProgressPrinter, counts_from_metrics, format_line
from pipeline.records import STAGES
from pipeline.testbed.models import cached_test_models, prepare_flags
from pipeline.testbed.server import SynthServer
from pipeline.testbed.synth import FAILURE_KINDS, synthesize

REPO = Path(__file__).resolve().parents[2]
PORTABLE = ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]
ROWS = 120

# stats.json fields that may differ between the two runs, and why. Everything else must be equal.
DIFFERING = {
    ("started_at",): "wall-clock time",
    ("finished_at",): "wall-clock time",
    ("duration_s",): "wall-clock time",
    ("beam_options",): "the runner flags themselves",
    ("command",): "the command line, which carries the runner flags",
    ("this_run", "stage_busy_s"): "time spent per stage",
}
BUSY_COUNTER = "/busy_ms"  # this_run.counters' <stage>/busy_ms: time spent per stage (ms)
# The dataset card's lines that print those fields (README.md is compared without them).
RUN_TIME_DOCS = ("croissant.json", "training_summary.json", "training_summary.md")
CARD_LINES_FROM_DIFFERING = ("Image–caption pairs prepared by kiln", "- **When:**", "- **Runner:**",
                             "- **Busy time per stage", "kiln prepare --input ")


def _leaves(node, path=()) -> dict:
    if isinstance(node, dict):
        return {k: v for key, val in node.items() for k, v in _leaves(val, (*path, key)).items()}
    if isinstance(node, list):
        return {k: v for i, val in enumerate(node) for k, v in _leaves(val, (*path, i)).items()}
    return {path: node}


@pytest.fixture(scope="module")
def models():
    return cached_test_models()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    # Enough planted failures that every kind appears (round(ROWS * 0.35) = 42 >= 37 kinds), and
    # mismatched / toxic captions for the model filters. Each run gets its own server (`runs`): the
    # server remembers which URLs it has answered 429/503 first.
    # One row per opt-out protocol and blocklist kind too: robots.txt/tdmrep.json fetched once per
    # origin and joined to the rows by a CoGroupByKey, through the job API's coders.
    w = synthesize(tmp_path_factory.mktemp("pweb"), rows=ROWS, seed=5, failure_rate=0.35, mismatch_rate=0.1, toxic_rate=0.05,
                   consent_per_kind=1)
    assert round(ROWS * 0.35) >= len(FAILURE_KINDS)
    return w


def kiln_prepare(w, server, models, out: Path, beam_flags: list[str]) -> subprocess.CompletedProcess:
    """`kiln prepare` as a user runs it: every stage on (toxicity, download with consent checks,
    decode, resize, CLIP, NSFW, T5 are all on by default), progress line on."""
    argv = [sys.executable, "-m", "pipeline.cli", "prepare", "--input", str(w.metadata_path), "--output", str(out),
            "--allow-hosts", server.allow_hosts, "--image-size", "64", "--download-timeout", "3",
            "--samples-per-shard", "40", *prepare_flags(models), *w.consent_flags, *beam_flags]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def runs(web, models, tmp_path_factory):
    """{runner: (dataset dir, stats, stderr, wall seconds)} for the DirectRunner and the portable runner."""
    root = tmp_path_factory.mktemp("pruns")
    out = root / "run" / "ds"  # both runs write here: every path they record is the same
    results = {}
    for name, flags in (("direct", []), ("portable", PORTABLE)):
        with SynthServer(web) as server:  # a fresh server: the same answers to the same requests
            t0 = time.monotonic()
            proc = kiln_prepare(web, server, models, out, flags)
            wall = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
        kept = root / name
        kept.mkdir()
        out.rename(kept / "ds")
        results[name] = (kept / "ds", json.loads((kept / "ds" / "stats.json").read_text()), proc.stderr, wall)
        print(f"kiln prepare under {name}: {wall:.1f} s wall ({ROWS} rows, every stage on)")
    return results


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def drop_differing(stats: dict) -> dict:
    out = json.loads(json.dumps(stats))
    for path in DIFFERING:
        node = out
        for key in path[:-1]:
            node = node[key]
        assert path[-1] in node, f"stats.json no longer has {'.'.join(path)}: update DIFFERING"
        del node[path[-1]]
    counters = out["this_run"]["counters"]
    busy = [k for k in counters if k.endswith(BUSY_COUNTER)]
    assert busy, "no <stage>/busy_ms counters: update BUSY_COUNTER"
    for k in busy:
        del counters[k]
    return out


def last_progress_line(stderr: str) -> str:
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.startswith("kiln prepare: read ")]
    assert lines, stderr[-3000:]
    return lines[-1]


def first_difference(a: Path, b: Path) -> str:
    """Where two files of a shard first differ (a tar member, a parquet column or its footer), for
    the assertion message."""
    if a.suffix == ".tar":
        with tarfile.open(a) as ta, tarfile.open(b) as tb:
            for x, y in zip(ta.getmembers(), tb.getmembers()):
                if x.name != y.name or ta.extractfile(x).read() != tb.extractfile(y).read():
                    return f"member {x.name} / {y.name}"
        return "tar headers or member count"
    ta, tb = pq.read_table(a), pq.read_table(b)
    for name in ta.column_names:
        if name not in tb.column_names or ta.column(name) != tb.column(name):
            return f"column {name}"
    return "parquet footer or encoding"


@pytest.mark.slow
def test_shards_meta_and_rejects_are_byte_identical(runs):
    (direct, *_), (portable, *_) = runs["direct"], runs["portable"]
    a, b = files(direct), files(portable)
    assert sorted(a) == sorted(b)
    for sub in ("shards/", "meta/", "rejects/"):
        names = [n for n in a if n.startswith(sub)]
        assert names, sub
        differing = {n: first_difference(direct / n, portable / n) for n in names if a[n] != b[n]}
        assert differing == {}, f"{sub} files differ between the runners"
    # Everything else too (manifest.json, the card's plots, _SUCCESS), but stats.json (next test)
    # and the card's lines that print the fields listed in DIFFERING.
    assert [n for n in a if n not in ("stats.json", "README.md", *RUN_TIME_DOCS) and a[n] != b[n]] == []
    # croissant.json and the training summary state the collection window (the run's start and end):
    # only values that carry those times may differ,
    times = [str(runs[r][1][k]) for r in ("direct", "portable") for k in ("started_at", "finished_at")]
    for n in RUN_TIME_DOCS:
        if n.endswith(".json"):
            da, db = _leaves(json.loads(a[n])), _leaves(json.loads(b[n]))
            assert sorted(da) == sorted(db), n
            # and the sha256 croissant.json gives stats.json, whose bytes differ (next test)
            diff = [(k, da[k], db[k]) for k in da if da[k] != db[k]
                    and not (k[0] == "distribution" and k[-1] == "sha256" and da[(*k[:-1], "contentUrl")] == "stats.json")]
        else:
            la, lb = a[n].decode().splitlines(), b[n].decode().splitlines()
            assert len(la) == len(lb), n
            diff = [(i, x, y) for i, (x, y) in enumerate(zip(la, lb)) if x != y]
        assert all(any(t in str(x) for t in times) for _, x, _ in diff), (n, diff)
    card_a, card_b = a["README.md"].decode().splitlines(), b["README.md"].decode().splitlines()
    assert len(card_a) == len(card_b)
    differing = [(x, y) for x, y in zip(card_a, card_b) if x != y]
    assert differing and all(x.startswith(CARD_LINES_FROM_DIFFERING) for x, _ in differing), differing
    assert any("PortableRunner" in y for _, y in differing)


@pytest.mark.slow
def test_stats_equal_but_for_times_and_runner_flags(runs):
    sa, sb = runs["direct"][1], runs["portable"][1]
    assert drop_differing(sa) == drop_differing(sb)
    assert sb["beam_options"] == {"runner": "PortableRunner", "job_endpoint": "embed", "environment_type": "LOOPBACK"}
    assert not sa["beam_options"].get("runner")


@pytest.mark.slow
def test_every_input_row_is_kept_or_rejected_once_with_every_stage_on(web, runs):
    out, stats, _, _ = runs["portable"]
    input_ids = pq.read_table(web.metadata_path, columns=["SAMPLE_ID"]).column(0).to_pylist()
    kept = [r["SAMPLE_ID"] for p in sorted((out / "meta").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    rejects = [r for p in sorted((out / "rejects").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(kept + [r["SAMPLE_ID"] for r in rejects]) == sorted(input_ids)
    acc = stats["accounting"]
    assert acc["ok"] and acc["input_rows"] == ROWS == stats["kept"] + stats["rejected"] == len(kept) + len(rejects)
    # Every stage ran: each filter rejected something, and every kept sample carries its T5 array.
    assert {r["stage"] for r in rejects} >= {"prefilter", "blocklist", "optout", "toxicity", "download", "decode", "clip"}
    assert stats["stage_modes"] == {"prefilter": "filter", "blocklist": "filter", "optout": "filter", "toxicity": "filter", "download": "filter", "decode": "filter",
                                    "resize": "filter", "clip": "filter", "nsfw": "filter", "t5": "embed"}
    members = [m.name for t in sorted((out / "shards").glob("*.tar")) for m in tarfile.open(t).getmembers()]
    assert len([m for m in members if m.endswith(".t5.npy")]) == len(kept) > 0


@pytest.mark.slow
def test_metrics_through_the_job_api_and_progress_equal_the_direct_runs(runs):
    """this_run.counters come from result.metrics(): under the portable runner, the job service's
    GetJobMetrics. They and the progress line's final counts agree with the DirectRunner's."""
    (_, sa, err_a, _), (_, sb, err_b, _) = runs["direct"], runs["portable"]
    ca = {k: v for k, v in sa["this_run"]["counters"].items() if not k.endswith(BUSY_COUNTER)}
    cb = {k: v for k, v in sb["this_run"]["counters"].items() if not k.endswith(BUSY_COUNTER)}
    assert cb == ca
    assert cb["download/throttled"] > 0  # the planted 429/503 answers, seen by both runs alike
    assert cb["read/rows"] == ROWS and cb["write/samples"] == sb["kept"]
    assert sum(cb.get(f"{stage}/rejected", 0) for stage in STAGES) == sb["rejected"]
    assert sb["this_run"]["shards_written"] == sb["num_shards"] == 3
    assert set(sb["this_run"]["stage_busy_s"]) == set(sa["this_run"]["stage_busy_s"])
    want = format_line({"read": ROWS, "kept": sb["kept"], "rejected": sb["rejected"]}, ROWS, 0, None).split(" | - rows/s")[0]
    assert last_progress_line(err_a).startswith(want)
    assert last_progress_line(err_b).startswith(want)


# -- a focused check of the fix this file found ----------------------------------------------------


class _Gated(beam.DoFn):
    """Counts each element in the "kiln" namespace once `gate` exists (so a poll before that sees none)."""

    def __init__(self, gate: str):
        self.gate = gate

    def process(self, x):
        deadline = time.monotonic() + 120
        while not os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        Metrics.counter("kiln", "read/rows").inc()
        if x % 3:
            Metrics.counter("kiln", "write/samples").inc()
        else:
            Metrics.counter("kiln", "download/rejected").inc()
        yield x


def test_job_metrics_are_asked_again_after_a_poll_while_the_job_runs(tmp_path):
    """Beam's portable PipelineResult keeps its first GetJobMetrics answer: a progress poll while the
    job ran froze the counters that stats.json and the accounting read at the end (all zero here).
    job_metrics asks the job service again on every call."""
    gate = tmp_path / "gate"
    p = beam.Pipeline(options=PipelineOptions(PORTABLE))
    _ = p | beam.Create(range(30)) | beam.ParDo(_Gated(str(gate)))
    result = p.run()
    try:
        ProgressPrinter(result, 30, stream=open(os.devnull, "w")).poll()  # while no element has been counted
    finally:
        gate.touch()
    result.wait_until_finish()
    assert counts_from_metrics(result) == {"read": 30, "kept": 20, "rejected": 10}  # the progress line's final counts
    assert _counters(result) == {"download/rejected": 10, "read/rows": 30, "write/samples": 20}  # stats.json's this_run
