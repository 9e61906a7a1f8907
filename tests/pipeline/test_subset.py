"""`kiln subset` end to end on a real `kiln prepare` output (synthetic web on 127.0.0.1, models off).

The child accounts for every parent sample (kept, or a `subset` reject naming its rule), copies
kept samples byte for byte, opens no network connection, resumes to byte-identical output, and can
itself be subset. One parent per module (~10 s); each subset run takes a few seconds.
"""

import hashlib
import json
import socket
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as kiln
from pipeline.prepare import run as prepare_run
from pipeline.records import REASONS, STAGE_SUBSET
from pipeline.testbed import prepare_config
from pipeline.testbed.server import SynthServer
from pipeline.testbed.synth import synthesize

pytestmark = pytest.mark.slow
RUN_RECORDS = ("stats.json", "README.md", "croissant.json", "training_summary.json", "training_summary.md")


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A finished `kiln prepare` output with T5 arrays in the tars and the meta (the tiny local T5,
    built in ~6 s; the image models are off: their scores are null, which --where must handle)."""
    from pipeline.testbed.models.build import run_isolated

    root = tmp_path_factory.mktemp("sweb")
    run_isolated("t5", root / "t5", seed=0)
    w = synthesize(root / "web", rows=120, seed=3, failure_rate=0.2)
    out = root / "parent"
    with SynthServer(w) as server:
        cfg = prepare_config(str(w.metadata_path), str(out), server.allow_hosts, "--quiet", "--image-size", "64",
                             "--download-timeout", "3", "--samples-per-shard", "40", "--t5-store", "both",
                             "--toxicity", "off", "--clip", "off", "--nsfw", "off", "--t5-model", f"local:{root / 't5'}")
        stats = prepare_run(cfg, [])
    assert stats["kept"] >= 60 and stats["num_shards"] == 3
    return out


def subset(parent, out, *flags) -> int:
    return kiln(["subset", str(parent), "--out", str(out), "--quiet", *map(str, flags)])


def rows(out: Path, sub: str) -> list[dict]:
    return [r for p in sorted((out / sub).glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def tar_members(out: Path) -> dict:
    """{member name: bytes} over every tar of a dataset."""
    found = {}
    for p in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(p) as tar:
            found.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return found


def tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() not in RUN_RECORDS}


def test_accounting_equals_the_parents_kept_and_bytes_are_the_parents(parent, tmp_path):
    child = tmp_path / "child"
    assert subset(parent, child, "--min-stored-size", 64, "--where", "source_bytes > 6000 and pdq_quality >= 20",
                  "--licenses", "https://creativecommons.org/licenses/by/4.0/,https://creativecommons.org/licenses/by-sa/4.0/") == 0
    p_meta, c_meta, c_rej = rows(parent, "meta"), rows(child, "meta"), rows(child, "rejects")
    stats = json.loads((child / "stats.json").read_text())
    # Every parent sample is in the child exactly once: kept or a subset reject with a known reason.
    assert sorted(r["uid"] for r in c_meta + c_rej) == sorted(r["uid"] for r in p_meta)
    assert stats["input"]["rows"] == len(p_meta) == stats["kept"] + stats["rejected"]
    assert stats["accounting"]["ok"] and len(c_meta) == stats["kept"] and 0 < stats["kept"] < len(p_meta)
    assert {r["stage"] for r in c_rej} == {STAGE_SUBSET}
    assert {r["reason"] for r in c_rej} <= set(REASONS[STAGE_SUBSET])
    by_uid = {r["uid"]: r for r in p_meta}
    for r in c_rej:  # the reason is the first failing rule, in the stated order
        row = by_uid[r["uid"]]
        lic_ok = row["LICENSE"] in ("https://creativecommons.org/licenses/by/4.0/", "https://creativecommons.org/licenses/by-sa/4.0/")
        where_ok = row["source_bytes"] > 6000 and row["pdq_quality"] >= 20
        want = "license_not_allowed" if not lic_ok else "too_small" if min(row["stored_width"], row["stored_height"]) < 64 else "where"
        assert r["reason"] == want and not (lic_ok and where_ok), (r, row)
        assert r["url"] == row["URL"] and r["SAMPLE_ID"] == row["SAMPLE_ID"]
    for r in c_meta:  # the kept rows are the parent's rows, unchanged
        assert r == by_uid[r["uid"]]
    kept_uids = {r["uid"] for r in c_meta}
    p_members, c_members = tar_members(parent), tar_members(child)
    assert {n.split(".")[0] for n in c_members} == kept_uids
    assert all(c_members[n] == p_members[n] for n in c_members)  # images, captions, KEY.json, T5: byte for byte
    assert sum(n.endswith(".t5.npy") for n in c_members) == len(kept_uids)
    assert all(r["t5"] for r in c_meta)  # --t5-store both: the meta copy travels too
    assert set(c_members) == {n for n in p_members if n.split(".")[0] in kept_uids}
    # Its card, Croissant and training summary name the parent.
    card = (child / "README.md").read_text()
    assert "## Derived from a parent dataset" in card and str(parent) in card
    parent_stats = json.loads((parent / "stats.json").read_text())
    assert parent_stats["config_fingerprint"] in card and hashlib.sha256((parent / "README.md").read_bytes()).hexdigest() in card
    assert json.loads((child / "croissant.json").read_text())["isBasedOn"]["url"] == str(parent)
    mlc = pytest.importorskip("mlcroissant")
    assert len(list(mlc.Dataset(jsonld=str(child / "croissant.json")).records("meta"))) == len(c_meta)  # validates, reads
    assert json.loads((child / "training_summary.json").read_text())["derived_from"]["parent"]["path"] == str(parent)


def test_keeping_everything_reproduces_the_parents_files(parent, tmp_path):
    child = tmp_path / "all"
    assert subset(parent, child) == 0
    for p in sorted((parent / "shards").glob("*.tar")):
        assert (child / "shards" / p.name).read_bytes() == p.read_bytes()
    for p in sorted((parent / "meta").glob("*.parquet")):
        assert pq.read_table(child / "meta" / p.name).equals(pq.read_table(p))
    assert json.loads((child / "manifest.json").read_text())["shards"][0]["sha256"] == \
        json.loads((parent / "manifest.json").read_text())["shards"][0]["sha256"]


def test_no_network_connection_is_opened(parent, tmp_path, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("kiln subset must not open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert subset(parent, tmp_path / "offline", "--where", "pdq_quality >= 30", "--dedup-exact") == 0
    assert attempts == []
    assert json.loads((tmp_path / "offline" / "stats.json").read_text())["accounting"]["ok"]


def test_uid_lists_blocklists_and_optout_lists(parent, tmp_path):
    p_meta = rows(parent, "meta")
    uids = sorted(r["uid"] for r in p_meta)
    keep = uids[: len(uids) // 2]
    # DataComp's format: a sorted structured array of (high, low) uint64 halves of the 128-bit uid.
    pairs = np.array(sorted((int(u[:16], 16), int(u[16:], 16)) for u in keep), dtype=np.dtype("u8,u8"))
    np.save(tmp_path / "keep.npy", pairs)
    (tmp_path / "drop.txt").write_text(f"# dropped\n{keep[0]}\n{keep[1].upper()}\n")
    blocked = sorted(keep[2:])[:3]
    row = {r["uid"]: r for r in p_meta}
    (tmp_path / "block.txt").write_text(
        "# name: test-list\n"
        f"url_sha256 {hashlib.sha256(row[blocked[0]]['URL'].encode()).hexdigest()}\n"
        f"image_sha256 {row[blocked[1]]['image_sha256']}\n"
        f"pdq {row[blocked[2]]['pdq_hash']}\n"
        f"image_md5 {'0' * 32}\n")
    child = tmp_path / "lists"
    assert subset(parent, child, "--keep-uids", tmp_path / "keep.npy", "--drop-uids", tmp_path / "drop.txt",
                  "--blocklist", tmp_path / "block.txt") == 0
    reasons = {r["uid"]: (r["reason"], r["url"], r["detail"]) for r in rows(child, "rejects")}
    kept = {r["uid"] for r in rows(child, "meta")}
    assert reasons[keep[0]][0] == reasons[keep[1]][0] == "uid_dropped"
    assert all(reasons[u][0] == "uid_not_listed" for u in uids[len(uids) // 2:] if u not in blocked)
    for u, reason in zip(blocked, ("blocklist_url_sha256", "blocklist_image_sha256", "blocklist_pdq")):
        if reasons[u][0] != reason:  # a PDQ entry may also match a near-identical synthetic image listed earlier
            assert reason == "blocklist_pdq" and reasons[u][0].startswith("blocklist_")
        assert reasons[u][1] is None and reasons[u][2].startswith("test-list: ")  # a blocklist reject carries no URL
    assert kept and kept <= set(keep[2:]) - set(blocked)
    stats = json.loads((child / "stats.json").read_text())
    assert stats["subset"]["rules"][0]["lists"][0]["not_applied"] == {"image_md5": 1}


def test_resume_and_rerun_give_byte_identical_output(parent, tmp_path):
    flags = ("--where", "pdq_quality >= 30 or source_bytes < 7000", "--dedup-exact")
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    assert subset(parent, clean, *flags) == 0
    assert subset(parent, resumed, *flags) == 0
    for name in ("_SUCCESS", "manifest.json", "stats.json", "meta/000001.parquet", "meta/000002.parquet", "shards/000002.tar"):
        (resumed / name).unlink()  # an interrupted run: shard 0 complete (its meta file is written last), the rest not
    assert subset(parent, resumed, *flags) == 0
    assert tree_bytes(resumed) == tree_bytes(clean)
    assert json.loads((resumed / "stats.json").read_text())["this_run"]["shards_skipped"] == 1
    assert subset(parent, clean, *flags) == 0  # complete: nothing to do
    assert subset(parent, clean, "--where", "pdq_quality >= 31") == 2  # other rules: refused, one line


def test_subset_of_a_subset(parent, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert subset(parent, first, "--where", "pdq_quality >= 20") == 0
    assert subset(first, second, "--where", "source_bytes >= 7000") == 0
    s1, s2 = (json.loads((d / "stats.json").read_text()) for d in (first, second))
    assert s2["input"]["rows"] == s1["kept"] == s2["kept"] + s2["rejected"]
    assert s2["subset"]["parent"]["path"] == str(first)
    assert s2["subset"]["parent"]["subset"]["parent"]["path"] == str(parent)
    assert "The parent is itself a subset of" in (second / "README.md").read_text()
    assert all(r["source_bytes"] >= 7000 and r["pdq_quality"] >= 20 for r in rows(second, "meta"))


def test_mistakes_are_one_line(parent, tmp_path, capsys):
    cases = [
        ((tmp_path / "nowhere", tmp_path / "c1"), [], "does not exist"),
        ((parent, tmp_path / "c2"), ["--where", "clip_sim > 0.3"], "unknown column 'clip_sim'"),
        ((parent, tmp_path / "c3"), ["--where", "punsafe <"], "position 10"),
        ((parent, tmp_path / "c4"), ["--licenses", "cc0", "--license-col", "LICENCE"], "no column 'LICENCE'"),
        ((parent, parent / "inside"), [], "inside it"),
        ((parent, tmp_path / "c5"), ["--keep-uids", tmp_path / "missing.npy"], "--keep-uids"),
        ((parent, tmp_path / "c7"), ["--decontaminate-cosine", "0.9"], "needs --decontaminate"),
        # The parent was made with --clip off: no stored embeddings to compare evaluation images with.
        ((parent, tmp_path / "c8"), ["--decontaminate", tmp_path, "--decontaminate-cosine", "0.9"], "no CLIP image embeddings"),
    ]
    for (par, out), flags, words in cases:
        capsys.readouterr()
        code = kiln(["subset", str(par), "--out", str(out), *map(str, flags)])
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("kiln subset: error: ") and words in lines[0], (code, err)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert kiln(["subset", str(unfinished), "--out", str(tmp_path / "c6")]) == 2
    assert "no _SUCCESS" in capsys.readouterr().err
    assert not (parent / "inside").exists()


def test_dedup_removes_duplicates_of_kept_samples_only(parent, tmp_path):
    from pipeline.dedup import hamming, pdq_int

    child = tmp_path / "dedup"
    assert subset(parent, child, "--dedup-exact", "--dedup-pdq", 64) == 0
    kept = {r["uid"]: r for r in rows(child, "meta")}
    dups = [r for r in rows(child, "rejects") if r["reason"].startswith("duplicate_")]
    assert dups, "the synthetic web has near-duplicate drawings at 64 bits"
    by_uid = {r["uid"]: r for r in rows(parent, "meta")}
    for r in dups:
        assert r["duplicate_of"] in kept
        assert hamming(pdq_int(by_uid[r["uid"]]["pdq_hash"]), pdq_int(kept[r["duplicate_of"]]["pdq_hash"])) <= 64
    rules = json.loads((child / "stats.json").read_text())["subset"]["rules"]
    assert rules[-1]["rule"] == "dedup" and rules[-1]["pdq_radius"] == 64 and rules[-1]["exact"] is True


def test_the_trainer_reads_a_subset(parent, tmp_path):
    from tests.train.conftest import MICRO

    child = tmp_path / "train-child"
    assert subset(parent, child, "--where", "t5_len >= 1 and pdq_quality >= 20") == 0
    overrides = {**MICRO, "unet.text_dim": 64}  # the tiny T5's d_model
    argv = ["train", "--config", "tiny-base", "--data", str(child), "--workdir", str(tmp_path / "run"), "--max-steps", "2"]
    for k, v in overrides.items():
        argv += ["--override", f"{k}={json.dumps(v)}"]
    assert kiln(argv) == 0
    assert any((tmp_path / "run").rglob("*.safetensors"))


def test_decontaminate_removes_samples_near_an_evaluation_image(parent, tmp_path):
    import shutil

    web_images = parent.parent / "web" / "images"
    # PNG originals (lossless, so the stored PDQ of the decoded download is the file's) of samples
    # whose PDQ is usable (quality >= 50: pipeline.dedup.PDQ_MIN_QUALITY).
    picked = [r for r in rows(parent, "meta") if r["URL"].endswith(".png") and r["pdq_quality"] >= 50][:3]
    assert len(picked) == 3
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    for r in picked:
        shutil.copy(web_images / r["URL"].rsplit("/", 1)[-1], evaluation)
    child = tmp_path / "decontaminated"
    assert subset(parent, child, "--decontaminate", evaluation) == 0
    rejects = {r["uid"]: r for r in rows(child, "rejects")}
    for r in picked:
        assert rejects[r["uid"]]["reason"] == "eval_overlap"
        assert rejects[r["uid"]]["duplicate_of"] == r["URL"].rsplit("/", 1)[-1]


def test_a_damaged_parent_fails_the_run_in_one_line(parent, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(parent, damaged)
    tar = damaged / "shards" / "000001.tar"
    data = bytearray(tar.read_bytes())
    data[512 + 10] ^= 0x01  # inside the first member's bytes: the tar still reads, its sha256 no longer matches
    tar.write_bytes(bytes(data))
    capsys.readouterr()
    assert kiln(["subset", str(damaged), "--out", str(tmp_path / "child")]) == 1
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and "shards/000001.tar does not match its footer's sha256" in lines[0], lines
    assert not (tmp_path / "child" / "meta" / "000001.parquet").exists()


@pytest.mark.parametrize("beam_flags", [
    ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],  # the job API of Spark/Flink
])
def test_other_runners_write_the_same_bytes(parent, tmp_path, beam_flags):
    flags = ("--where", "pdq_quality >= 50", "--dedup-exact", "--dedup-pdq", 64)
    assert subset(parent, tmp_path / "inproc", *flags) == 0
    assert subset(parent, tmp_path / "other", *flags, *beam_flags) == 0
    assert tree_bytes(tmp_path / "other") == tree_bytes(tmp_path / "inproc")
