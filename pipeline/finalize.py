"""After the Beam job: check the accounting from the files on disk, then write manifest.json,
stats.json and `_SUCCESS` (last), in that order.

The checks read what a consumer would read -- parquet footers and file listings -- rather than
trusting the job's own counters, and compare them with the input row count taken straight from the
input parquet footers. The job's Beam counters are cross-checked where the run processed every shard.
"""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.records import STAGES
from pipeline.write import META_KEY, shard_name


class AccountingError(RuntimeError):
    """input rows != kept + rejected (overall, per stage or per shard): the run has failed."""


def match(pattern: str) -> list:
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
    for m in match(f"{output_dir}/meta/*.parquet"):
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
    reasons: dict[str, dict[str, int]] = {s: {} for s in STAGES}
    for f in footers.values():
        for stage, by_reason in f["rejects_by_reason"].items():
            for reason, n in by_reason.items():
                reasons.setdefault(stage, {}).setdefault(reason, 0)
                reasons[stage][reason] += n
    funnel, current = [], input_rows
    for stage in STAGES:
        rejected = sum(reasons.get(stage, {}).values())
        mode = (modes or {}).get(stage, "filter")
        if mode == "off" and not rejected:
            continue
        funnel.append({"stage": stage, "mode": mode, "in": current, "out": current - rejected, "rejected": rejected,
                       "reasons": dict(sorted(reasons.get(stage, {}).items()))})
        current -= rejected
    return funnel


def check_accounting(output_dir: str, input_rows: int, footers: dict[int, dict], counters: dict | None) -> dict:
    """Every check that must hold for the run to count; raises AccountingError listing the failures."""
    checks = []

    def check(name, ok, detail):
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    num_shards = {f["num_shards"] for f in footers.values()}
    check("one shard count", len(num_shards) == 1, f"footers name num_shards {sorted(num_shards)}")
    n = num_shards.pop() if len(num_shards) == 1 else 0
    missing = [shard_name(i) for i in range(n) if i not in footers]
    extra = [shard_name(i) for i in footers if i >= n]
    check("all shards complete", not missing and not extra, f"missing {missing[:10]}, unexpected {extra[:10]}")
    fingerprints = {f["config_fingerprint"] for f in footers.values()}
    check("one configuration", len(fingerprints) <= 1, f"{len(fingerprints)} different configuration fingerprints")

    tars = {m.path.rsplit("/", 1)[-1]: m.size_in_bytes for m in match(f"{output_dir}/shards/*.tar")}
    rej_files = {m.path.rsplit("/", 1)[-1]: m.size_in_bytes for m in match(f"{output_dir}/rejects/*.parquet")}
    bad_files = []
    for i, f in sorted(footers.items()):
        name = shard_name(i)
        if tars.get(f"{name}.tar") != f["tar"]["bytes"]:
            bad_files.append(f"shards/{name}.tar: {tars.get(name + '.tar')} bytes on disk, footer says {f['tar']['bytes']}")
        if rej_files.get(f"{name}.parquet") != f["rejects_file"]["bytes"]:
            bad_files.append(f"rejects/{name}.parquet: size differs from its footer")
        with FileSystems.open(f["_meta_path"]) as fh:
            meta_rows = pq.ParquetFile(fh).metadata.num_rows
        if meta_rows != f["samples"]:
            bad_files.append(f"meta/{name}.parquet: {meta_rows} rows, footer says {f['samples']} samples")
        later = sum(v for s, r in f["rejects_by_reason"].items() if s != STAGES[0] for v in r.values())
        if f["samples"] + later != f["candidates"]:
            bad_files.append(f"shard {name}: {f['candidates']} candidates != {f['samples']} kept + {later} rejected")
    check("shard files match their footers", not bad_files, "; ".join(bad_files[:10]) or "all shards consistent")

    kept = sum(f["samples"] for f in footers.values())
    rejected = sum(f["rejects"] for f in footers.values())
    check("input rows == kept + rejected", input_rows == kept + rejected, f"{input_rows} input rows, {kept} kept + {rejected} rejected = {kept + rejected}")

    if counters:
        read = counters.get("read/rows")
        if read is not None:
            check("rows read by the job == rows in the input footers", read == input_rows, f"job read {read}, footers hold {input_rows}")
        for stage in STAGES:
            c_in, c_out, c_rej = (counters.get(f"{stage}/{k}") for k in ("in", "out", "rejected"))
            if c_in is None:
                continue
            c_out, c_rej = c_out or 0, c_rej or 0
            check(f"{stage}: in == out + rejected (this run's counters)", c_in == c_out + c_rej, f"in {c_in}, out {c_out}, rejected {c_rej}")
        ran = [s for s in STAGES if counters.get(f"{s}/in") is not None]
        for a, b in zip(ran, ran[1:]):
            a_out, b_in = counters.get(f"{a}/out", 0), counters[f"{b}/in"]
            check(f"{a} out == {b} in (this run's counters)", a_out == b_in, f"{a_out} vs {b_in}")
        if ran and counters.get("write/samples") is not None:
            last_out = counters.get(f"{ran[-1]}/out", 0)
            check(f"{ran[-1]} out == samples written", last_out == counters["write/samples"], f"{last_out} vs {counters['write/samples']}")
    failures = [c for c in checks if not c["ok"]]
    result = {"ok": not failures, "input_rows": input_rows, "kept": kept, "rejected": rejected, "checks": checks}
    if failures:
        err = AccountingError("accounting failed:\n  " + "\n  ".join(f"{c['name']}: {c['detail']}" for c in failures))
        err.result = result
        raise err
    return result


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
    from pipeline.write import _atomic_write

    data = (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")
    _atomic_write(path, lambda f: f.write(data))
