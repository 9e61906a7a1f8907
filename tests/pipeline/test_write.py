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
