"""`kiln prepare` end to end on the synthetic web served from 127.0.0.1.

Every planted failure must end as its specific reject reason, every clean row as a readable
sample, both DirectRunner modes must produce byte-identical output, and re-runs must complete a
partial output to exactly what a clean run writes.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.testbed import prepare_config
from pipeline.finalize import AccountingError, check_accounting, count_input_rows, read_footers
from pipeline.config import ConfigError
from pipeline.prepare import run
from pipeline.records import compute_uid
from pipeline.testbed.server import SynthServer
from pipeline.testbed.synth import synthesize

pytestmark = pytest.mark.slow

IMAGE_SIZE = 256
MULTI = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    w = synthesize(root, rows=320, seed=7, failure_rate=0.3)
    with SynthServer(w) as server:
        yield w, server


def prepare(web_server, out: Path, *flags, beam=()):
    w, server = web_server
    args = prepare_config(str(w.metadata_path), str(out), server.allow_hosts, "--quiet", "--image-size", str(IMAGE_SIZE),
                        "--download-timeout", "3", "--samples-per-shard", "60",
                        "--toxicity", "off", "--clip", "off", "--nsfw", "off", "--t5", "off", *flags)
    return run(args, list(beam))


@pytest.fixture(scope="module")
def clean_run(web, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "inproc"
    stats = prepare(web, out)
    return out, stats


def tree_bytes(root: Path) -> dict:
    """Every output file except stats.json, the card README.md, croissant.json and the training
    summary (they record the run's times and Beam options) -> its bytes. The card's plots are
    compared: they depend on the data alone."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() not in RUN_RECORDS}


RUN_RECORDS = ("stats.json", "README.md", "croissant.json", "training_summary.json", "training_summary.md")


def read_rejects(out: Path) -> list[dict]:
    return [r for p in sorted((out / "rejects").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def read_meta(out: Path) -> list[dict]:
    return [r for p in sorted((out / "meta").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_every_planted_case_ends_where_the_ground_truth_says(web, clean_run):
    w, _ = web
    out, stats = clean_run
    truth = pq.read_table(w.ground_truth_path).to_pylist()
    kept = {r["SAMPLE_ID"] for r in read_meta(out)}
    rejected = {r["SAMPLE_ID"]: r for r in read_rejects(out)}
    assert len(kept) + len(rejected) == len(truth)
    wrong = []
    for t in truth:
        sid = t["SAMPLE_ID"]
        if t["expected_stage"] is None:
            if sid not in kept:
                wrong.append((t["kind"], "expected kept", rejected.get(sid, {}).get("reason"), rejected.get(sid, {}).get("detail")))
        else:
            got = rejected.get(sid)
            if got is None or (got["stage"], got["reason"]) != (t["expected_stage"], t["expected_reason"]):
                wrong.append((t["kind"], t["expected_reason"], got and got["reason"], got and got["detail"]))
    assert not wrong, wrong
    kinds = {t["kind"] for t in truth}
    for kind in ("http_404", "stall", "slow_drip", "decompression_bomb", "redirect_other_port", "redirect_127_0_0_2",
                 "redirect_ipv6_loopback", "robots_noai", "robots_otherbot", "retry_429", "retry_503", "duplicate"):
        assert kind in kinds
    assert stats["accounting"]["ok"]
    assert stats["accounting"]["input_rows"] == len(truth) == stats["kept"] + stats["rejected"]


def test_rejects_name_stage_reason_and_detail(clean_run):
    out, _ = clean_run
    rej = read_rejects(out)
    assert rej and all(r["stage"] and r["reason"] and r["uid"] for r in rej)
    refused = [r for r in rej if r["reason"] == "private_address"]
    assert refused and all("allow-hosts" in r["detail"] or "loopback" in r["detail"] for r in refused)


def test_shards_read_back_with_webdataset_and_pyarrow(web, clean_run):
    w, _ = web
    out, stats = clean_run
    truth = {t["SAMPLE_ID"]: t for t in pq.read_table(w.ground_truth_path).to_pylist()}
    meta = {r["uid"]: r for r in read_meta(out)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == len(meta) == stats["kept"] > 150
    seen = 0
    for shard in manifest["shards"]:
        keys = []
        for sample in wds.WebDataset(str(out / shard["tar"]), shardshuffle=False):
            key = sample["__key__"]
            keys.append(key)
            row = meta[key]
            t = truth[row["SAMPLE_ID"]]
            caption = sample["txt"].decode()
            assert caption == row["TEXT"] == t["TEXT"]
            assert key == compute_uid(row["URL"], row["TEXT"])
            img = Image.open(io.BytesIO(sample["jpg"]))
            side = min(IMAGE_SIZE, t["true_width"], t["true_height"])
            assert img.size == (side, side) and img.mode == "RGB"
            assert (row["original_width"], row["original_height"]) == (t["true_width"], t["true_height"])
            assert (row["stored_width"], row["stored_height"]) == (side, side)
            assert json.loads(sample["json"])["uid"] == key
            seen += 1
        assert keys == sorted(keys) and len(keys) == shard["samples"]
    assert seen == len(meta)


def test_multiprocess_runner_gives_byte_identical_output(web, clean_run, tmp_path):
    out, _ = clean_run
    stats = prepare(web, tmp_path / "multi", beam=MULTI)
    assert stats["accounting"]["ok"]
    assert tree_bytes(tmp_path / "multi") == tree_bytes(out)


def test_rerun_into_complete_output_does_nothing(web, clean_run):
    out, _ = clean_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    stats = prepare(web, out)
    assert stats["this_run"] == {"skipped": True}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_partial_output_is_completed_to_the_clean_result(web, clean_run, tmp_path):
    out, _ = clean_run
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    # What a run killed mid-way leaves: no _SUCCESS/manifest/stats, a shard whose meta never got
    # written (tar and rejects renamed, meta not), one missing entirely, and a stale temp file.
    for name in ("_SUCCESS", "manifest.json", "stats.json", "meta/000001.parquet", "meta/000003.parquet",
                 "shards/000003.tar", "rejects/000003.parquet"):
        (partial / name).unlink()
    (partial / "shards" / "000002.tar.tmp-deadbeef0000").write_bytes(b"half a tar")
    stats = prepare(web, partial)
    assert stats["this_run"]["shards_skipped"] == stats["num_shards"] - 2
    assert tree_bytes(partial) == tree_bytes(out)


def test_changed_settings_do_not_resume_silently(web, clean_run, tmp_path):
    out, _ = clean_run
    partial = tmp_path / "p"
    shutil.copytree(out, partial)
    (partial / "_SUCCESS").unlink()
    with pytest.raises(ConfigError, match="other input files or settings"):
        prepare(web, partial, "--min-image-size", "100")
    with pytest.raises(ConfigError, match="complete but was made from other"):
        prepare(web, out, "--min-image-size", "100")


def test_accounting_fails_loudly_when_rows_go_missing(web, clean_run, tmp_path):
    w, _ = web
    out, _ = clean_run
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    n, _ = count_input_rows(str(w.metadata_path))
    footers = read_footers(str(broken))
    assert check_accounting(str(broken), n, footers, None)["ok"]
    with pytest.raises(AccountingError, match=r"input rows == kept \+ rejected"):
        check_accounting(str(broken), n + 1, footers, None)
    (broken / "rejects" / "000000.parquet").write_bytes(b"")
    with pytest.raises(AccountingError, match="rejects/000000.parquet"):
        check_accounting(str(broken), n, footers, None)
    (broken / "meta" / "000002.parquet").unlink()
    with pytest.raises(AccountingError, match="missing"):
        check_accounting(str(broken), n, read_footers(str(broken)), None)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupted_run_stops_cleanly_and_resumes_to_the_clean_result(web, clean_run, tmp_path, sig, code, word):
    """Ctrl-C (to the whole process group, as a terminal sends it) or SIGTERM while shards are being
    written: one line, no traceback, no temp file; the re-run completes to the clean run's bytes."""
    w, server = web
    out = tmp_path / "interrupted"
    argv = [sys.executable, "-m", "pipeline.cli", "prepare", "--input", str(w.metadata_path), "--output", str(out),
            "--allow-hosts", server.allow_hosts, "--image-size", str(IMAGE_SIZE), "--download-timeout", "3",
            "--samples-per-shard", "60", "--toxicity", "off", "--clip", "off", "--nsfw", "off", "--t5", "off"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 120
    while not (out / "shards").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr + stdout, stderr
    last = [ln for ln in stderr.splitlines() if ln.strip()][-1]
    assert last.startswith(f"kiln prepare: {word}"), stderr
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "a temp file was left behind"
    assert not (out / "_SUCCESS").exists()
    rerun = subprocess.run(argv + ["--quiet"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert tree_bytes(out) == tree_bytes(clean_run[0])
