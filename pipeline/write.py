"""Write stage: group each shard's samples and rejects, and write its three files atomically.

A shard is a fixed range of the uid space (`shard_of`), so which shard a row lands in depends only
on its uid and the number of shards, never on worker timing: shards are reproducible, and a re-run
can skip the ranges that are already complete before downloading anything.

Per shard, in this order, each under a temporary name and renamed into place:
  shards/NNNNNN.tar        webdataset: KEY.jpg, KEY.json, KEY.txt (+ KEY.t5.*), sorted by uid, fixed mtime
  rejects/NNNNNN.parquet   every row of this uid range that was rejected, with stage and reason
  meta/NNNNNN.parquet      one row per kept sample; its footer carries the shard's accounting and
                           the tar's size and sha256, so it is written last and marks the shard done

Memory does not grow with the shard: the grouped values are read once, each sample's tar members
and meta row are appended to a local scratch file (`tempfile`, in TMPDIR unless `scratch_dir` is
given; removed on success and on error) and only (uid, offset, lengths) stays in memory. The index
is sorted by uid, then the tar is streamed from the scratch file, and the meta parquet is written in
row groups (`META_ROW_GROUP_ROWS`, `META_ROW_GROUP_T5_BYTES`). Only the rejects (small rows) are
held whole. The bytes depend on the shard's content only, never on the order its values arrive in.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tarfile
import tempfile

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from pipeline.outdir import atomic_write
from pipeline.t5store import encode_t5
from pipeline.records import JSON_EXCLUDED, META_FIELDS, STAGE_PREFILTER, STAGES, TRANSIENT_FIELDS, kiln_column_clashes

TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed, so identical samples give identical tars
META_KEY = b"kiln.shard"  # parquet footer key holding the shard's accounting (JSON)
# A meta row group closes after this many rows, or earlier once its `t5` cells reach the byte cap,
# so the writer holds at most one row group of rows (SHARDS.md). Fixed numbers: the cuts depend on
# the shard's content only, so the file's bytes do too. 16 MiB of t5 is 128 rows of T5-XXL at 16
# tokens: bench/writer_memory.py measured a 64 MiB cap still adding ~230 MB to the writer's peak
# at 2,000 samples (a group's rows, its Arrow table and its encoded pages are alive together).
META_ROW_GROUP_ROWS = 1000
META_ROW_GROUP_T5_BYTES = 16 * 2**20
COPY_CHUNK = 8 * 2**20  # bytes per read when copying the local meta file to the output

def shard_of(uid: str, num_shards: int) -> int:
    """The shard holding `uid`: uid space cut into `num_shards` equal ranges (uids are uniform)."""
    return (int(uid[:16], 16) * num_shards) >> 64


def shard_name(shard: int) -> str:
    return f"{shard:06d}"


def meta_schema(input_schema: pa.Schema) -> pa.Schema:
    """meta/NNNNNN.parquet: the input's columns, unchanged, then kiln's (pipeline.records.META_FIELDS)."""
    clash = kiln_column_clashes(input_schema.names)
    if clash:
        raise ValueError(f"input columns {clash} clash with columns kiln adds; rename them in the input")
    return pa.schema(list(input_schema) + [pa.field(f.name, f.dtype, nullable=f.name != "uid") for f in META_FIELDS])


def _json_default(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def sample_json(record: dict) -> bytes:
    """KEY.json: the sample's meta row (input columns and kiln's) without the binary columns, plus
    the JSON-only fields (toxicity_scores); keys sorted so the bytes are reproducible."""
    clean = {k: v for k, v in record.items() if k not in TRANSIENT_FIELDS and k not in JSON_EXCLUDED}
    return json.dumps(clean, sort_keys=True, ensure_ascii=False, default=_json_default).encode("utf-8")


def stored_sample(s: dict, t5_store: str = "tar", t5_dtype: str = "float16") -> tuple[dict, tuple | None, bytes | None]:
    """(the record with t5_dtype / t5_scale set, its T5 tar member (ext, bytes) or None, its meta `t5`
    bytes or None), as `--t5-store` and `--t5-dtype` say (pipeline/t5store.py)."""
    if s.get("_t5") is None:
        return s, None, None
    ext, member, column, dtype_name, scale = encode_t5(s["_t5"], t5_dtype)
    s = {**s, "t5_dtype": dtype_name, "t5_scale": scale}
    return s, ((ext, member) if t5_store in ("tar", "both") else None), (column if t5_store in ("meta", "both") else None)


class _HashingWriter:
    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


# Every file kiln writes appears whole or not at all (temp name + rename; on a failure the temp file
# is removed and the error propagates): pipeline.outdir.atomic_write.
_atomic_write = atomic_write


def sample_members(s: dict, image_ext: str, caption_column: str, t5_member: tuple | None = None) -> list[tuple[str, bytes]]:
    """One sample's tar members (name, bytes), in SHARDS.md's extension order; `t5_member`:
    (ext, bytes) from `stored_sample`, or None."""
    members = {
        image_ext: s["_image"],
        "json": sample_json(s),
        "txt": str(s.get(caption_column) or "").encode("utf-8"),
    }
    if t5_member is not None:
        members[t5_member[0]] = t5_member[1]
    return [(f"{s['uid']}.{ext}", members[ext]) for ext in sorted(members)]


def _write_tar_members(f, samples_members) -> tuple[int, str]:
    """Stream a tar of each sample's members (an iterable of member lists, already in uid order)
    into `f`; return (bytes, sha256)."""
    hw = _HashingWriter(f)
    with tarfile.open(fileobj=hw, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for members in samples_members:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return hw.size, hw.sha.hexdigest()


def write_tar(f, samples: list[dict], image_ext: str, caption_column: str, t5_store: str = "tar", t5_dtype: str = "float16") -> tuple[int, str]:
    """Stream a webdataset tar of `samples` (already sorted) into `f`; return (bytes, sha256)."""

    def members(s):
        s, t5_member, _ = stored_sample(s, t5_store, t5_dtype)
        return sample_members(s, image_ext, caption_column, t5_member)

    return _write_tar_members(f, (members(s) for s in samples))


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _stage_rank(stage: str) -> int:
    return STAGES.index(stage) if stage in STAGES else len(STAGES)


def meta_row(s: dict, names, t5_column: bytes | None = None) -> dict:
    """A sample's meta/NNNNNN.parquet row: the meta schema's columns; `t5`: from `stored_sample`."""
    row = {k: s.get(k) for k in names}
    row["t5"] = t5_column
    return row


class _Scratch:
    """A shard's samples, spilled to a local temporary file as they arrive: only (uid, offset,
    member bytes, meta row bytes) per sample stays in memory. The file has no name on disk once
    created (tempfile.TemporaryFile), so it is gone when closed, on an error, or if the process dies."""

    def __init__(self, scratch_dir: str | None):
        self.f = tempfile.TemporaryFile(prefix="kiln-shard-", dir=scratch_dir)
        self.index: list[tuple[str, int, int, int]] = []
        self.end = 0

    def add(self, uid: str, members: list, row: dict) -> None:
        a = pickle.dumps(members, protocol=pickle.HIGHEST_PROTOCOL)
        b = pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)
        self.f.seek(self.end)
        self.f.write(a)
        self.f.write(b)
        self.index.append((uid, self.end, len(a), len(b)))
        self.end += len(a) + len(b)

    def sort(self) -> None:
        self.index.sort(key=lambda e: e[0])

    def _read(self, offset: int, n: int):
        self.f.seek(offset)
        data = self.f.read(n)
        if len(data) != n:
            raise OSError(f"scratch file {self.f.name}: read {len(data)} of {n} bytes at {offset}")
        return pickle.loads(data)

    def members(self):
        for _, offset, a, _ in self.index:
            yield self._read(offset, a)

    def rows(self):
        for _, offset, a, b in self.index:
            yield self._read(offset + a, b)

    def close(self) -> None:
        self.f.close()


def write_meta(f, rows, schema: pa.Schema, scratch_dir: str | None = None) -> None:
    """meta/NNNNNN.parquet from an iterable of rows (uid order) into `f`, one row group at a time
    (META_ROW_GROUP_ROWS rows, fewer once the group's `t5` cells reach META_ROW_GROUP_T5_BYTES).
    The parquet is built in a local temporary file (ParquetWriter wants a seekable local file;
    `f` may be on gs://) and copied into `f`."""
    with tempfile.TemporaryFile(prefix="kiln-meta-", dir=scratch_dir) as local:
        with pq.ParquetWriter(local, schema, compression="zstd") as writer:
            group: list[dict] = []
            t5_bytes, groups = 0, 0
            for row in rows:
                group.append(row)
                t5_bytes += len(row.get("t5") or b"")
                if len(group) >= META_ROW_GROUP_ROWS or t5_bytes >= META_ROW_GROUP_T5_BYTES:
                    writer.write_table(pa.Table.from_pylist(group, schema=schema))
                    group, t5_bytes, groups = [], 0, groups + 1
            if group or not groups:  # a shard with no kept sample still gets its (empty) table
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
        local.seek(0)
        shutil.copyfileobj(local, f, COPY_CHUNK)


class _WriteShardFn(beam.DoFn):
    def __init__(self, output_dir, meta_schema, rejects_schema, image_ext, caption_column, config_fingerprint, scratch_dir=None,
                 t5_store="tar", t5_dtype="float16"):
        self.output_dir = output_dir.rstrip("/")
        self.meta_schema = meta_schema
        self.rejects_schema = rejects_schema
        self.image_ext = image_ext
        self.caption_column = caption_column
        self.config_fingerprint = config_fingerprint
        self.scratch_dir = scratch_dir
        self.t5_store, self.t5_dtype = t5_store, t5_dtype

    def setup(self):
        self.n_samples = Metrics.counter("kiln", "write/samples")
        self.n_shards = Metrics.counter("kiln", "write/shards")

    def process(self, shard_items, num_shards):
        shard, items = shard_items
        scratch = _Scratch(self.scratch_dir)
        try:
            footer = self._write(shard, items, num_shards, scratch)
        finally:
            scratch.close()
        self.n_samples.inc(footer["samples"])
        self.n_shards.inc()
        yield footer

    def _write(self, shard, items, num_shards, scratch: _Scratch) -> dict:
        rejects, expected = [], 0
        names = self.meta_schema.names
        for kind, value in items:  # read once: a runner may stream the grouped values
            if kind == "sample":
                s, t5_member, t5_column = stored_sample(value, self.t5_store, self.t5_dtype)
                scratch.add(s["uid"], sample_members(s, self.image_ext, self.caption_column, t5_member), meta_row(s, names, t5_column))
            elif kind == "reject":
                rejects.append(value)
            else:
                expected += value
        scratch.sort()
        n_samples = len(scratch.index)
        rejects.sort(key=lambda r: (_stage_rank(r["stage"]), r["uid"], r["reason"], str(r["SAMPLE_ID"])))
        # Every candidate routed to this shard after the prefilter must come back as a sample or a
        # reject; anything else means a stage lost rows, and the run must not pretend otherwise.
        later_rejects = sum(1 for r in rejects if r["stage"] != STAGE_PREFILTER)
        if n_samples + later_rejects != expected:
            raise RuntimeError(
                f"accounting broken in shard {shard_name(shard)}: {expected} candidates went in, "
                f"{n_samples} samples + {later_rejects} rejects came out"
            )
        name = shard_name(shard)
        base = self.output_dir

        tar_info = {}

        def tar_fn(f):
            tar_info["bytes"], tar_info["sha256"] = _write_tar_members(f, scratch.members())

        atomic_write(f"{base}/shards/{name}.tar", tar_fn)

        rej_rows = [{**r, "shard": shard} for r in rejects]
        rej_bytes = _parquet_bytes(pa.Table.from_pylist(rej_rows, schema=self.rejects_schema))
        atomic_write(f"{base}/rejects/{name}.parquet", lambda f: f.write(rej_bytes))

        by_reason: dict = {}
        for r in rejects:
            by_reason.setdefault(r["stage"], {}).setdefault(r["reason"], 0)
            by_reason[r["stage"]][r["reason"]] += 1
        footer = {
            "shard": shard,
            "num_shards": num_shards,
            "config_fingerprint": self.config_fingerprint,
            "samples": n_samples,
            "candidates": expected,
            "rejects": len(rejects),
            "rejects_by_reason": by_reason,
            "tar": {"path": f"shards/{name}.tar", "bytes": tar_info["bytes"], "sha256": tar_info["sha256"]},
            "rejects_file": {"path": f"rejects/{name}.parquet", "bytes": len(rej_bytes), "sha256": hashlib.sha256(rej_bytes).hexdigest()},
        }
        schema = self.meta_schema.with_metadata({META_KEY: json.dumps(footer, sort_keys=True).encode()})
        atomic_write(f"{base}/meta/{name}.parquet", lambda f: write_meta(f, scratch.rows(), schema, self.scratch_dir))
        return footer


class WriteShards(beam.PTransform):
    """(shard, ("sample"|"reject"|"expect", value)) -> one footer dict per shard written."""

    def __init__(self, output_dir, meta_schema, rejects_schema, num_shards, image_ext="jpg", caption_column="TEXT", config_fingerprint="",
                 scratch_dir=None, t5_store="tar", t5_dtype="float16"):
        super().__init__()
        self.args = (output_dir, meta_schema, rejects_schema, image_ext, caption_column, config_fingerprint, scratch_dir, t5_store, t5_dtype)
        self.num_shards = num_shards

    def expand(self, keyed_items):
        return (
            keyed_items
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteFiles" >> beam.ParDo(_WriteShardFn(*self.args), num_shards=beam.pvalue.AsSingleton(self.num_shards))
        )
