"""Peak memory of the shard writer for one shard of N samples, at N and 10 N, in one run.

    .venv/bin/python bench/writer_memory.py [--n 200] [--factor 10] [--t5-store both]

Two writers, each run in a fresh subprocess per N (so one run's peak cannot hide in another's):
  streaming  pipeline.write._WriteShardFn (issue 14): each grouped value is spilled once to a local
             scratch file, only (uid, offset, lengths) is kept; tar streamed from scratch, meta
             parquet in row groups
  in-memory  the writer before issue 14 (kept below as the named baseline): every sample in a list,
             sorted, one tar, one pq.write_table of every meta row
Both get what a runner gives the writer after GroupByKey: an iterable (a generator here, not a
list) of ("sample", record) / ("reject", row) / ("expect", n). A record is shaped like a 1024 px
LAION sample: JPEG-sized bytes (150-300 KB, uniform; random bytes behind a JPEG marker, since the
writer never decodes them) and a T5-XXL-shaped float16 array [16, 4096] (131 KB), generated lazily
from a seed so the feeder holds one sample at a time.

Peak = ru_maxrss of the child (the kernel's high-water mark of resident memory, which includes
Arrow's and numpy's buffers; tracemalloc would miss Arrow's memory pool, which is where a
row group is built). The child also reports its RSS after imports and before the first value
("base"), so "growth" = peak - base is what writing the shard added. The goal (issue 14):
peak(10 N) / peak(N) <= 1.3 for the streaming writer.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

JPEG_BYTES = (150_000, 300_000)
T5_SHAPE = (16, 4096)  # LAION's mean caption length (16 tokens with EOS) x T5-XXL's d_model


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def shard_values(n: int, seed: int = 0):
    """The writer's grouped values for one shard, generated one at a time."""
    import numpy as np

    from pipeline.records import Reject, compute_uid, reject_row

    rng = np.random.default_rng(seed)
    n_rejects = n // 10
    for i in range(n):
        url, text = f"http://bench.test/{i}.jpg", f"a photo of thing number {i} on a table"
        image = b"\xff\xd8\xff\xe0" + rng.bytes(int(rng.integers(*JPEG_BYTES)) - 4)
        yield "sample", {
            "uid": compute_uid(url, text), "SAMPLE_ID": i, "URL": url, "TEXT": text, "shard": 0,
            "_image": image, "stored_width": 1024, "stored_height": 1024, "original_width": 1200,
            "original_height": 1024, "source_format": "jpeg", "image_bytes": len(image),
            "image_sha256": hashlib.sha256(image).hexdigest(), "final_url": url, "http_status": 200,
            "content_type": "image/jpeg", "clip_similarity": 0.31,
            "clip_image_embedding": rng.standard_normal(512).astype("<f2").tobytes(),
            "_t5": (rng.standard_normal(T5_SHAPE, dtype=np.float32) * 0.2).astype(np.float16),
            "t5_len": T5_SHAPE[0], "t5_truncated": False,
        }
    for j in range(n_rejects):
        url = f"http://bench.test/r{j}.jpg"
        yield "reject", reject_row({"uid": compute_uid(url, "x"), "SAMPLE_ID": n + j, "URL": url, "shard": 0},
                                   Reject("download", "http_404", "404 Not Found"))
    yield "expect", n + n_rejects


def in_memory_write(out: str, items, meta_schema, rejects_schema) -> dict:
    """The writer before issue 14 (pipeline/write.py at 59d356a, _WriteShardFn.process), the baseline."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.write import META_KEY, _stage_rank, write_tar

    samples, rejects, expected = [], [], 0
    for kind, value in items:
        if kind == "sample":
            samples.append(value)
        elif kind == "reject":
            rejects.append(value)
        else:
            expected += value
    samples.sort(key=lambda s: s["uid"])
    rejects.sort(key=lambda r: (_stage_rank(r["stage"]), r["uid"], r["reason"], str(r["SAMPLE_ID"])))
    Path(out, "shards").mkdir(parents=True)
    with open(Path(out, "shards/000000.tar"), "wb") as f:
        size, sha = write_tar(f, samples, "jpg", "TEXT")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rejects, schema=rejects_schema), buf, compression="zstd")
    meta_rows = [{k: s.get(k) for k in meta_schema.names} for s in samples]
    for row, s in zip(meta_rows, samples):
        row["t5"] = s["_t5"].astype("<f2").tobytes()
    table = pa.Table.from_pylist(meta_rows, schema=meta_schema)
    table = table.replace_schema_metadata({META_KEY: json.dumps({"samples": len(samples), "tar": sha}).encode()})
    meta = io.BytesIO()
    pq.write_table(table, meta, compression="zstd")
    Path(out, "meta").mkdir()
    Path(out, "meta/000000.parquet").write_bytes(meta.getvalue())
    return {"samples": len(samples), "bytes": size}


def child(writer: str, n: int, out: str, t5_store: str) -> None:
    import pyarrow as pa

    from pipeline.records import rejects_schema
    from pipeline.write import _WriteShardFn, meta_schema

    input_schema = pa.schema([("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string())])
    ms, rs = meta_schema(input_schema), rejects_schema(pa.int64())
    base_kb = _rss_kb()
    t0 = time.perf_counter()
    if writer == "streaming":
        fn = _WriteShardFn(out, ms, rs, "jpg", "TEXT", "bench", **_t5_kwargs(t5_store))
        fn.setup()
        (footer,) = list(fn.process((0, shard_values(n)), num_shards=1))
        samples, tar_bytes = footer["samples"], footer["tar"]["bytes"]
    else:
        r = in_memory_write(out, shard_values(n), ms, rs)
        samples, tar_bytes = r["samples"], r["bytes"]
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"writer": writer, "n": n, "samples": samples, "tar_bytes": tar_bytes, "base_kb": base_kb,
                      "peak_kb": peak_kb, "seconds": seconds}))


def _t5_kwargs(t5_store: str) -> dict:
    """The streaming writer's T5 storage settings, where this version of the writer has them."""
    import inspect

    from pipeline.write import _WriteShardFn

    params = inspect.signature(_WriteShardFn.__init__).parameters
    return {"t5_store": t5_store} if "t5_store" in params else {}


def measure(writer: str, n: int, t5_store: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-writer-") as tmp:
        out = subprocess.run([sys.executable, __file__, "--child", writer, "--n", str(n), "--out", f"{tmp}/out",
                              "--t5-store", t5_store], capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(f"{writer} N={n} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="samples in the small shard")
    ap.add_argument("--factor", type=int, default=10, help="the large shard has n x factor samples")
    ap.add_argument("--t5-store", default="both", choices=("tar", "meta", "both"),
                    help="where the streaming writer puts T5 (the in-memory baseline always stored both)")
    ap.add_argument("--child", choices=("streaming", "in-memory"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.n, args.out, args.t5_store)
        return
    sizes = (args.n, args.n * args.factor)
    print(f"one shard, 1024 px: JPEG {JPEG_BYTES[0] // 1000}-{JPEG_BYTES[1] // 1000} KB + T5 float16 {T5_SHAPE}; "
          f"streaming writer with --t5-store {args.t5_store}; peak = ru_maxrss of a fresh process per run")
    print(f"{'writer':<11} {'N':>6} {'tar MB':>8} {'base MB':>8} {'peak MB':>8} {'growth MB':>10} {'s':>6}")
    results = {}
    for writer in ("streaming", "in-memory"):
        for n in sizes:
            r = measure(writer, n, args.t5_store)
            results[writer, n] = r
            print(f"{writer:<11} {n:>6} {r['tar_bytes'] / 1e6:>8.0f} {r['base_kb'] / 1024:>8.0f} {r['peak_kb'] / 1024:>8.0f} "
                  f"{(r['peak_kb'] - r['base_kb']) / 1024:>10.0f} {r['seconds']:>6.1f}")
    small, large = sizes
    for writer in ("streaming", "in-memory"):
        a, b = results[writer, small], results[writer, large]
        growth = (b["peak_kb"] - b["base_kb"]) / max(1, a["peak_kb"] - a["base_kb"])
        print(f"{writer:<11} peak({large}) / peak({small}) = {b['peak_kb'] / a['peak_kb']:.2f}x   "
              f"growth({large}) / growth({small}) = {growth:.2f}x")
    s, m = results["streaming", large], results["in-memory", large]
    print(f"at N={large}: streaming peak / in-memory peak = {s['peak_kb'] / m['peak_kb']:.2f}x (goal for the ratio above: <= 1.3x)")


if __name__ == "__main__":
    main()
