import errno
import io
import tarfile

import pytest
import webdataset as wds

from pipeline.records import compute_uid
from pipeline.outdir import atomic_write
from pipeline.write import TAR_MTIME, _atomic_write, shard_of, write_tar


def test_shard_of_is_a_monotone_range_partition():
    uids = sorted(compute_uid(f"http://h.test/{i}.jpg", "c") for i in range(2000))
    shards = [shard_of(u, 7) for u in uids]
    assert shards == sorted(shards)  # sorted uids -> non-decreasing shards: shards are uid ranges
    assert set(shards) == set(range(7))
    counts = [shards.count(k) for k in range(7)]
    assert max(counts) - min(counts) < 0.25 * 2000 / 7  # uniform hashes -> balanced ranges
    assert shard_of("0" * 32, 5) == 0 and shard_of("f" * 32, 5) == 4
    assert all(shard_of(u, 1) == 0 for u in uids[:50])


def _samples(n=3):
    return [
        {"uid": compute_uid(f"u{i}", "c"), "TEXT": f"caption {i}", "_image": bytes([i]) * 10, "SAMPLE_ID": i, "stored_width": 1}
        for i in range(n)
    ]


def test_tar_is_reproducible_and_readable_by_webdataset(tmp_path):
    samples = sorted(_samples(), key=lambda s: s["uid"])
    outs = []
    for _ in range(2):
        buf = io.BytesIO()
        size, sha = write_tar(buf, samples, "jpg", "TEXT")
        assert size == len(buf.getvalue())
        outs.append((buf.getvalue(), sha))
    assert outs[0] == outs[1]
    path = tmp_path / "000000.tar"
    path.write_bytes(outs[0][0])
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert all(m.mtime == TAR_MTIME and m.uid == 0 and m.uname == "" for m in members)
        assert [m.name for m in members][:3] == [f"{samples[0]['uid']}.{e}" for e in ("jpg", "json", "txt")]
    got = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [g["__key__"] for g in got] == [s["uid"] for s in samples]
    assert got[1]["txt"] == b"caption 1" or got[1]["txt"].decode() in {s["TEXT"] for s in samples}
    assert b"_image" not in got[0]["json"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.bin"

    def boom(f):
        f.write(b"partial")
        raise ValueError("disk on fire")

    with pytest.raises(ValueError):
        _atomic_write(str(target), boom)
    assert list(tmp_path.iterdir()) == []
    _atomic_write(str(target), lambda f: f.write(b"whole"))
    assert target.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


class _FullDisk:
    """A file whose writes (or close) fail like a full disk: ENOSPC."""

    def __init__(self, f, at: str):
        self.f, self.at = f, at

    def write(self, data):
        if self.at == "write":
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def close(self):
        self.f.close()
        if self.at == "close":
            raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("at", ["write", "close"])
def test_a_full_disk_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch, at):
    from apache_beam.io.filesystems import FileSystems

    target = tmp_path / "stats.json"
    atomic_write(str(target), lambda f: f.write(b"old"))
    real_create = FileSystems.create
    monkeypatch.setattr(FileSystems, "create", lambda path, *a, **kw: _FullDisk(real_create(path, *a, **kw), at))
    with pytest.raises(OSError) as err:
        atomic_write(str(target), lambda f: f.write(b"new"))
    assert err.value.errno == errno.ENOSPC  # pipeline.cli says it in one line
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["stats.json"]
    monkeypatch.undo()  # space freed: the re-run completes
    atomic_write(str(target), lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_a_read_only_directory_is_an_os_error_with_nothing_left(tmp_path, monkeypatch):
    from apache_beam.io.filesystems import FileSystems

    def read_only(path, *a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(FileSystems, "create", read_only)
    with pytest.raises(OSError) as err:
        atomic_write(str(tmp_path / "shards" / "000000.tar"), lambda f: f.write(b"x"))
    assert err.value.errno == errno.EROFS and list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_in_a_directory_named_with_brackets(tmp_path):
    out = tmp_path / "out[1]" / "meta"
    atomic_write(str(out / "000000.parquet"), lambda f: f.write(b"one"))
    atomic_write(str(out / "000000.parquet"), lambda f: f.write(b"two"))
    assert (out / "000000.parquet").read_bytes() == b"two" and [p.name for p in out.iterdir()] == ["000000.parquet"]


# -- the streaming shard writer -------------------------------------------------------------------

import hashlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.records import Reject, reject_row, rejects_schema  # noqa: E402
from pipeline.write import META_KEY, META_ROW_GROUP_ROWS, _WriteShardFn, meta_schema  # noqa: E402

INPUT = pa.schema([("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string())])


def _shard_values(n: int, n_rejects: int = 5, t5_dim: int = 8, seed: int = 0) -> list[tuple]:
    """What GroupByKey hands the writer for one shard: samples, rejects and the expected count."""
    rng = np.random.default_rng(seed)
    values = []
    for i in range(n):
        url, text = f"http://h.test/{i}.jpg", f"caption {i}"
        values.append(("sample", {
            "uid": compute_uid(url, text), "SAMPLE_ID": i, "URL": url, "TEXT": text, "shard": 0,
            "_image": rng.bytes(int(rng.integers(50, 400))), "stored_width": 64, "stored_height": 64,
            "clip_similarity": float(rng.random()), "_t5": rng.standard_normal((int(rng.integers(2, 9)), t5_dim)).astype(np.float16),
            "t5_len": 0, "t5_truncated": False,
        }))
    for j in range(n_rejects):
        url = f"http://h.test/r{j}.jpg"
        rec = {"uid": compute_uid(url, "x"), "SAMPLE_ID": 10_000 + j, "URL": url, "shard": 0}
        values.append(("reject", reject_row(rec, Reject("download", "http_404", "404 Not Found"))))
    values.append(("expect", n + n_rejects))
    return values


def _write_shard(out, values, scratch=None, t5_store="both", t5_dtype="float16") -> dict:
    fn = _WriteShardFn(str(out), meta_schema(INPUT), rejects_schema(pa.int64()), "jpg", "TEXT", "fp", scratch_dir=scratch,
                       t5_store=t5_store, t5_dtype=t5_dtype)
    fn.setup()
    (footer,) = list(fn.process((0, (v for v in values)), num_shards=1))  # a one-pass iterable, as a runner may give
    return footer


def _files(out) -> dict:
    return {p: (out / p).read_bytes() for p in ("shards/000000.tar", "rejects/000000.parquet", "meta/000000.parquet")}


def _reference_shard(values) -> dict:
    """The writer before issue 14, kept as the straightforward in-memory reference: every sample in
    one list, sorted by uid; tar with write_tar; each parquet with one pq.write_table."""
    samples = sorted((v for k, v in values if k == "sample"), key=lambda s: s["uid"])
    rejects = sorted((v for k, v in values if k == "reject"), key=lambda r: (2, r["uid"], r["reason"], str(r["SAMPLE_ID"])))
    tar = io.BytesIO()
    write_tar(tar, samples, "jpg", "TEXT")
    rej = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rejects, schema=rejects_schema(pa.int64())), rej, compression="zstd")
    schema = meta_schema(INPUT)
    rows = [{k: s.get(k) for k in schema.names} | {"t5": s["_t5"].astype("<f2").tobytes(), "t5_dtype": "float16", "t5_scale": 1.0}
            for s in samples]
    return {"tar": tar.getvalue(), "rejects": rej.getvalue(), "rows": rows}


@pytest.mark.parametrize("n", [0, 37])
def test_streaming_writer_matches_the_in_memory_reference(tmp_path, n):
    values = _shard_values(n)
    footer = _write_shard(tmp_path, values)
    got, ref = _files(tmp_path), _reference_shard(values)
    assert got["shards/000000.tar"] == ref["tar"]
    assert got["rejects/000000.parquet"] == ref["rejects"]
    assert footer["tar"] == {"path": "shards/000000.tar", "bytes": len(ref["tar"]), "sha256": hashlib.sha256(ref["tar"]).hexdigest()}
    assert footer["samples"] == n and footer["rejects"] == 5 and footer["rejects_by_reason"] == {"download": {"http_404": 5}}
    # Up to META_ROW_GROUP_ROWS rows the meta file is one row group: the same bytes as one write_table.
    table = pa.Table.from_pylist(ref["rows"], schema=meta_schema(INPUT))
    table = table.replace_schema_metadata({META_KEY: json.dumps(footer, sort_keys=True).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    assert got["meta/000000.parquet"] == buf.getvalue()


def test_arrival_order_does_not_change_a_byte_and_meta_is_row_groups(tmp_path):
    n = META_ROW_GROUP_ROWS + 234
    values = _shard_values(n, n_rejects=7)
    shuffled = list(values)
    random.Random(1).shuffle(shuffled)
    f1, f2 = _write_shard(tmp_path / "a", values), _write_shard(tmp_path / "b", shuffled)
    assert f1 == f2
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b
    assert a["shards/000000.tar"] == _reference_shard(values)["tar"]
    pf = pq.ParquetFile(io.BytesIO(a["meta/000000.parquet"]))
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [META_ROW_GROUP_ROWS, 234]
    table = pf.read()
    assert table.column("uid").to_pylist() == sorted(v["uid"] for k, v in values if k == "sample")
    assert json.loads(table.schema.metadata[META_KEY])["samples"] == n


def test_meta_row_group_closes_at_the_t5_byte_cap(tmp_path, monkeypatch):
    import pipeline.write as write

    monkeypatch.setattr(write, "META_ROW_GROUP_T5_BYTES", 1000)  # tiny arrays: 32-144 bytes each
    values = _shard_values(60, t5_dim=8)
    _write_shard(tmp_path, values)
    pf = pq.ParquetFile(tmp_path / "meta/000000.parquet")
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    assert sum(sizes) == 60 and len(sizes) > 3
    rows = pf.read().to_pylist()
    bounds = np.cumsum([0] + sizes)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        t5 = [len(r["t5"]) for r in rows[lo:hi]]
        assert sum(t5[:-1]) < 1000 and (hi == 60 or sum(t5) >= 1000)


def test_scratch_file_is_removed_on_success_and_on_error(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    _write_shard(tmp_path / "ok", _shard_values(20), scratch=str(scratch))
    assert list(scratch.iterdir()) == []
    broken = _shard_values(20)[:-1] + [("expect", 99)]  # a stage lost rows: the writer refuses
    with pytest.raises(RuntimeError, match="accounting broken"):
        _write_shard(tmp_path / "bad", broken, scratch=str(scratch))
    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "bad" / "shards").exists() or not any((tmp_path / "bad" / "shards").iterdir())


# -- T5 storage: --t5-store x --t5-dtype, read back by the trainer's reader ----------------------------

from train.data import T5_MEMBERS, _raw_samples, load_t5_member  # noqa: E402

# Relative error bounds of the stored values (round to nearest: half a unit in the last place).
REL_ERR = {"float16": 0.0, "bfloat16": 2**-8, "float8": 2**-4}


@pytest.mark.parametrize("store", ["tar", "meta", "both"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float8"])
def test_every_store_and_dtype_reads_back_through_the_trainer(tmp_path, store, dtype):
    values = _shard_values(12, t5_dim=8)
    for _, v in values[:12]:
        v["t5_len"] = len(v["_t5"])
    _write_shard(tmp_path, values, t5_store=store, t5_dtype=dtype)
    originals = {v["uid"]: v["_t5"].astype(np.float32) for k, v in values if k == "sample"}
    ext = {"float16": "t5.npy", "bfloat16": "t5.bf16", "float8": "t5.f8"}[dtype]
    with tarfile.open(tmp_path / "shards/000000.tar") as tar:
        names = [m.name for m in tar.getmembers()]
    assert sum(n.endswith("." + ext) for n in names) == (12 if store != "meta" else 0)
    assert not any(n.endswith(e) for n in names for e in (".t5.npy", ".t5.bf16", ".t5.f8") if e != "." + ext)
    meta = pq.read_table(tmp_path / "meta/000000.parquet").to_pylist()
    assert all((r["t5"] is None) == (store == "tar") for r in meta)
    assert {r["t5_dtype"] for r in meta} == {{"float8": "float8_e4m3fn"}.get(dtype, dtype)}
    got = {}
    for sample in _raw_samples([str(tmp_path / "shards/000000.tar")]):
        e = next(e for e in T5_MEMBERS if e in sample)
        js = json.loads(sample["json"])
        assert (js["t5_scale"] == 1.0) == (dtype != "float8")
        got[sample["__key__"]] = load_t5_member(e, sample[e], js)
    assert got.keys() == originals.keys()
    for uid, x in originals.items():
        y = got[uid].astype(np.float32)
        assert y.shape == x.shape
        peak = np.abs(x).max()
        # float8: relative to the value, but no finer than its smallest subnormal step (scale x 2^-9)
        bound = REL_ERR[dtype] * np.abs(x) + (peak / 448 * 2**-10 if dtype == "float8" else 0)
        assert np.all(np.abs(y - x) <= bound + 1e-12), (dtype, np.abs(y - x).max())


def test_float8_scales_values_beyond_its_range_instead_of_clipping(tmp_path):
    values = _shard_values(3, t5_dim=8)
    big = values[0][1]
    big["_t5"] = np.array([[3000.0, -2500.0, 0.5, 1e-3] * 2, [60000.0, 1.0, -1.0, 0.0] * 2], dtype=np.float16)
    big["t5_len"] = 2
    _write_shard(tmp_path, values, t5_dtype="float8")
    meta = {r["uid"]: r for r in pq.read_table(tmp_path / "meta/000000.parquet").to_pylist()}
    assert meta[big["uid"]]["t5_scale"] == pytest.approx(60000.0 / 448, rel=1e-6)
    sample = next(s for s in _raw_samples([str(tmp_path / "shards/000000.tar")]) if s["__key__"] == big["uid"])
    y = load_t5_member("t5.f8", sample["t5.f8"], json.loads(sample["json"]))
    assert y.max() == pytest.approx(60000.0, rel=1e-6) and y.min() == pytest.approx(-2500.0, rel=2**-4)
    assert y[0, 0] == pytest.approx(3000.0, rel=2**-4)


def test_old_datasets_and_the_default_are_float16_npy(tmp_path):
    """A shard without t5_dtype / t5_scale (written before issue 14) reads as it always did, and the
    default writer's tar member is the same .npy as before."""
    x = np.arange(12, dtype=np.float16).reshape(3, 4)
    buf = io.BytesIO()
    np.save(buf, x.astype("<f2"), allow_pickle=False)
    assert np.array_equal(load_t5_member("t5.npy", buf.getvalue(), {"t5_len": 3}), x)
    values = _shard_values(4, t5_dim=8)
    _write_shard(tmp_path, values, t5_store="tar")
    with tarfile.open(tmp_path / "shards/000000.tar") as tar:
        npys = [m for m in tar.getmembers() if m.name.endswith(".t5.npy")]
        assert len(npys) == 4
        first = npys[0].name.split(".")[0]
        arr = np.load(io.BytesIO(tar.extractfile(npys[0]).read()), allow_pickle=False)
    ref = next(v["_t5"] for k, v in values if k == "sample" and v["uid"] == first)
    assert arr.dtype == np.dtype("<f2") and np.array_equal(arr, ref)
