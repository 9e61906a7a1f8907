"""After the Beam job: check the accounting from the files on disk, then write manifest.json,
stats.json and `_SUCCESS` (last), in that order.

The checks themselves are pipeline.accounting's (one ledger and one check, shared with the dataset
card): the files a consumer would read are compared with the shard footers and with the input row
count taken straight from the input parquet footers. The job's Beam counters are cross-checked
where the run processed every shard.
"""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.accounting import AccountingError, Ledger, check
from pipeline.outdir import atomic_write, join, list_files
from pipeline.write import META_KEY, shard_name

__all__ = ["AccountingError", "build_manifest", "check_accounting", "count_input_rows", "funnel_from", "match",
           "read_footer", "read_footers", "write_json"]


def match(pattern: str) -> list:
    """The files matching the glob `pattern` (the input's --input). Never for a path under the output
    directory: those are listed with pipeline.outdir.list_files, which reads no glob."""
    return sorted((m for r in FileSystems.match([pattern]) for m in r.metadata_list), key=lambda m: m.path)


def count_input_rows(pattern: str) -> tuple[int, list[dict]]:
    """Rows in the input parquet files, from their footers alone (independent of the Beam job)."""
    files = []
    for m in match(pattern):
        with FileSystems.open(m.path) as f:
            files.append({"path": m.path, "bytes": m.size_in_bytes, "rows": pq.ParquetFile(f).metadata.num_rows})
    return sum(f["rows"] for f in files), files


def read_footer(path: str) -> dict | None:
    with FileSystems.open(path) as f:
        md = pq.ParquetFile(f).schema_arrow.metadata or {}
    raw = md.get(META_KEY)
    return json.loads(raw) if raw else None


def read_footers(output_dir: str) -> dict[int, dict]:
    """Footers of every complete shard (meta file present), keyed by shard number."""
    out = {}
    for m in list_files(join(output_dir, "meta")):
        if not re.fullmatch(r"\d{6}\.parquet", m.path.rsplit("/", 1)[-1]):
            continue
        footer = read_footer(m.path)
        if footer is not None:
            footer["_meta_path"], footer["_meta_bytes"] = m.path, m.size_in_bytes
            out[footer["shard"]] = footer
    return out


def funnel_from(input_rows: int, footers: dict[int, dict], modes: dict | None = None) -> list[dict]:
    """Per-stage in/out/rejected and reasons, in stage order, from the shard footers; stages that
    were off in the run are left out (`modes`: stage -> filter | score | off)."""
    return Ledger.from_footers(input_rows, footers).funnel(modes)


def check_accounting(output_dir: str, input_rows: int, footers: dict[int, dict], counters: dict | None) -> dict:
    """Every check that must hold for the run to count: the files against the footers and the input
    row count, and this run's counters; raises AccountingError listing the failures."""
    return check(Ledger.from_files(output_dir), Ledger.from_footers(input_rows, footers), counters=counters)


def build_manifest(footers: dict[int, dict]) -> dict:
    """manifest.json: per shard its files, samples, bytes and sha256 (no timestamps: reproducible)."""
    shards = []
    for i, f in sorted(footers.items()):
        shards.append(
            {
                "shard": shard_name(i),
                "tar": f["tar"]["path"],
                "samples": f["samples"],
                "bytes": f["tar"]["bytes"],
                "sha256": f["tar"]["sha256"],
                "meta": f"meta/{shard_name(i)}.parquet",
                "rejects": f["rejects_file"]["path"],
                "rejected": f["rejects"],
                "rejects_sha256": f["rejects_file"]["sha256"],
            }
        )
    return {"format": "kiln-shards/1", "num_shards": len(shards), "samples": sum(s["samples"] for s in shards), "shards": shards}


def write_json(path: str, obj) -> None:
    """`obj` as JSON at `path`, atomically (pipeline.outdir.atomic_write)."""
    data = (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(data))
