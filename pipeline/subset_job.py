"""The Beam side of `kiln subset` (pipeline.subset: the command, the rules, the driver).

Per parent shard, `WriteSubsetShard` reads the meta rows (pass 1: decide every sample with
pipeline.subset.RowRules and the dedup removals), streams the parent tar and copies the kept
samples' members byte for byte into the child tar (pipeline.write's tar writer, same headers),
checking the parent tar's sha256 against its footer as it goes, writes the rejects, then the kept
meta rows unchanged (pass 2) with the child's footer, last. With dedup, `ReadDedupKeys` reads every
parent shard's dedup keys first, `pipeline.dedup.Dedup` finds the removals, and CoGroupByKey joins
them to their shards. Memory per shard: its uids and rejects, one meta batch, one sample's members.
"""

from __future__ import annotations

import hashlib
import json
import tarfile

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.errors import RunFailed
from pipeline.records import STAGE_SUBSET, Reject, reject_row
from pipeline.accounting import shard_path
from pipeline.write import META_KEY, _parquet_bytes, _stage_rank, _write_tar_members, shard_name, shard_of, write_meta

READ_BATCH_ROWS = 1000  # meta rows read at a time (the parent's row groups are at most 1,000 rows)
TAR_READ_CHUNK = 1 << 20  # bytes per read when hashing the rest of a parent tar


def _batches(path: str, columns=None):
    """A parent meta file's rows in uid order, READ_BATCH_ROWS at a time, as dicts."""
    with FileSystems.open(path) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        cols = None if columns is None else [c for c in names if c in columns]
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=cols):
            yield from batch.to_pylist()


class _DedupKeysFn(beam.DoFn):
    """Parent shard -> dedup keys of its samples that pass rules 1-7 (pipeline.dedup.dedup_key)."""

    def __init__(self, plan):
        self.plan = plan

    def setup(self):
        self.rules = self.plan.row_rules()

    def process(self, shard):
        from pipeline.dedup import dedup_key

        cols = self.rules.columns() | {"uid", "image_sha256", "pdq_hash", "pdq_quality", "clip_image_embedding",
                                       "stored_width", "stored_height", "clip_similarity"}
        for row in _batches(f"{self.plan.parent}/{shard_path('meta', shard)}", cols):
            if self.rules.first_failure(row) is None:
                yield dedup_key(row)


class _HashingReader:
    """A file object's reads, hashed (the parent tar is checked against its footer as it is copied)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self):
        while self.read(TAR_READ_CHUNK):
            pass


def _parent_samples(reader, tar_path: str):
    """(key, [(member name, bytes), ...]) per sample of a parent tar, in tar order."""
    key, members = None, []
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k = m.name.split(".", 1)[0]
            if k != key and members:
                yield key, members
                members = []
            key = k
            members.append((m.name, tar.extractfile(m).read()))
    if members:
        yield key, members


class _SubsetShardFn(beam.DoFn):
    """(shard, removals of that shard) -> the child's tar, rejects and meta files; yields the footer."""

    def __init__(self, plan):
        self.plan = plan

    def setup(self):
        self.rules = self.plan.row_rules()
        self.c_in = Metrics.counter("kiln", f"{STAGE_SUBSET}/in")
        self.c_out = Metrics.counter("kiln", f"{STAGE_SUBSET}/out")
        self.c_rej = Metrics.counter("kiln", f"{STAGE_SUBSET}/rejected")
        self.c_read = Metrics.counter("kiln", "read/rows")
        self.c_samples = Metrics.counter("kiln", "write/samples")
        self.c_shards = Metrics.counter("kiln", "write/shards")

    def process(self, item):
        shard, removals = item
        footer = self.write_shard(shard, {r["uid"]: r for r in removals})
        yield footer

    def write_shard(self, shard: int, removed: dict) -> dict:
        from pipeline.outdir import atomic_write

        plan, name = self.plan, shard_name(shard)
        pfoot = plan.parent_footers[shard]
        meta_path = f"{plan.parent}/{shard_path('meta', shard)}"
        order, kept, rejects = [], set(), []
        for row in _batches(meta_path):  # pass 1: decide every sample
            uid = row["uid"]
            order.append(uid)
            rej = self.rules.first_failure(row)
            if rej is None and uid in removed:
                rm = removed[uid]
                rej = Reject(STAGE_SUBSET, rm["reason"], rm.get("detail") or "", duplicate_of=rm.get("duplicate_of"))
            if rej is None:
                kept.add(uid)
            else:
                rejects.append(reject_row({**row, "shard": shard}, rej, plan.rules.url_col, plan.rules.id_col))
        if len(order) != pfoot["samples"]:
            raise RunFailed(f"parent {plan.parent}: {shard_path('meta', shard)} has {len(order)} rows, its footer says "
                            f"{pfoot['samples']}; run `kiln card {plan.parent}` to check the parent")
        tar_info = {}

        def tar_fn(f):
            with FileSystems.open(f"{plan.parent}/{pfoot['tar']['path']}", compression_type=CompressionTypes.UNCOMPRESSED) as src:
                reader = _HashingReader(src)
                tar_info["bytes"], tar_info["sha256"] = _write_tar_members(f, self._kept_members(reader, order, kept, shard))
                reader.drain()
            if reader.sha.hexdigest() != pfoot["tar"]["sha256"]:
                raise RunFailed(f"parent {plan.parent}: {pfoot['tar']['path']} does not match its footer's sha256 (changed or "
                                f"damaged since it was written); run `kiln card {plan.parent}` to check the parent")

        atomic_write(f"{plan.output}/{shard_path('tar', shard)}", tar_fn)
        rejects.sort(key=lambda r: (_stage_rank(r["stage"]), r["uid"], r["reason"], str(r["SAMPLE_ID"])))
        rej_bytes = _parquet_bytes(pa.Table.from_pylist(rejects, schema=plan.rejects_schema))
        atomic_write(f"{plan.output}/{shard_path('rejects', shard)}", lambda f: f.write(rej_bytes))
        by_reason: dict = {}
        for r in rejects:
            by_reason.setdefault(r["stage"], {}).setdefault(r["reason"], 0)
            by_reason[r["stage"]][r["reason"]] += 1
        footer = {
            "shard": shard,
            "num_shards": plan.num_shards,
            "config_fingerprint": plan.fingerprint,
            "samples": len(kept),
            "candidates": len(order),
            "rejects": len(rejects),
            "rejects_by_reason": by_reason,
            "tar": {"path": shard_path("tar", shard), "bytes": tar_info["bytes"], "sha256": tar_info["sha256"]},
            "rejects_file": {"path": shard_path("rejects", shard), "bytes": len(rej_bytes),
                             "sha256": hashlib.sha256(rej_bytes).hexdigest()},
        }
        schema = plan.meta_schema.with_metadata({META_KEY: json.dumps(footer, sort_keys=True).encode()})
        rows = (row for row in _batches(meta_path) if row["uid"] in kept)  # pass 2: the kept rows, unchanged
        atomic_write(f"{plan.output}/meta/{name}.parquet", lambda f: write_meta(f, rows, schema))
        self.c_read.inc(len(order))
        self.c_in.inc(len(order))
        self.c_out.inc(len(kept))
        self.c_rej.inc(len(rejects))
        self.c_samples.inc(len(kept))
        self.c_shards.inc()
        return footer

    def _kept_members(self, reader, order: list, kept: set, shard: int):
        """The parent tar's member lists of the kept samples, checking the tar holds the meta's uids in order."""
        i = 0
        for key, members in _parent_samples(reader, ""):
            if i >= len(order) or key != order[i]:
                want = order[i] if i < len(order) else "the end"
                raise RunFailed(f"parent {self.plan.parent}: {shard_path('tar', shard)} holds {key} where its meta file "
                                f"has {want}; run `kiln card {self.plan.parent}` to check the parent")
            i += 1
            if key in kept:
                yield members
        if i != len(order):
            raise RunFailed(f"parent {self.plan.parent}: {shard_path('tar', shard)} ends after {i} samples, its meta file "
                            f"has {len(order)}")


def build_pipeline(p, plan, todo: list[int]):
    """The job on pipeline `p`: one WriteSubsetShard per shard in `todo`; with dedup, the removals
    computed over every parent shard first and joined to their shards."""
    todo_keyed = p | "ShardsToWrite" >> beam.Create([(s, None) for s in sorted(todo)])
    if plan.rules.dedup is not None:
        from pipeline.dedup import Dedup

        n = plan.num_shards
        keys = (p | "AllParentShards" >> beam.Create(list(range(n)))
                | "SpreadShards" >> beam.Reshuffle()
                | "ReadDedupKeys" >> beam.ParDo(_DedupKeysFn(plan)))
        removals = keys | "Dedup" >> Dedup(plan.rules.dedup, plan.rules.clip_loader)
        keyed_removals = removals | "KeyRemovals" >> beam.Map(lambda r: (shard_of(r["uid"], n), r))
        jobs = ({"todo": todo_keyed, "removed": keyed_removals}
                | "JoinRemovals" >> beam.CoGroupByKey()
                | "OnlyToWrite" >> beam.FlatMap(lambda kv: [(kv[0], list(kv[1]["removed"]))] if list(kv[1]["todo"]) else []))
    else:
        jobs = todo_keyed | "NoRemovals" >> beam.MapTuple(lambda s, _: (s, []))
    return jobs | "SpreadWrites" >> beam.Reshuffle() | "WriteSubsetShard" >> beam.ParDo(_SubsetShardFn(plan))
