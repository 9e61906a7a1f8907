import io
import tarfile

import pytest
import webdataset as wds

from pipeline.records import compute_uid
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
