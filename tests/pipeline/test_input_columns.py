"""Input columns by flag: another corpus's column names (lowercase `url`/`caption`, its own id)
through the whole job, the shard contract and the dataset card; and clear refusals."""

import json
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError
from pipeline.prepare import run
from pipeline.records import compute_uid
from pipeline.testbed import prepare_config
from pipeline.testbed.server import SynthServer
from pipeline.testbed.synth import synthesize

pytestmark = pytest.mark.slow

RENAME = {"URL": "url", "TEXT": "caption", "SAMPLE_ID": "key", "WIDTH": "width", "HEIGHT": "height"}
COLUMN_FLAGS = ["--url-col", "url", "--caption-col", "caption", "--id-col", "key", "--width-col", "width", "--height-col", "height"]
MODELS_OFF = ["--toxicity", "off", "--clip", "off", "--nsfw", "off", "--t5", "off"]


@pytest.fixture(scope="module")
def lowercase_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cols")
    web = synthesize(root / "web", rows=120, seed=11, failure_rate=0.3)
    table = pq.read_table(web.metadata_path)
    lower = table.rename_columns([RENAME.get(n, n) for n in table.column_names])
    meta_path = root / "lower.parquet"
    pq.write_table(lower, meta_path)
    out = root / "out"
    with SynthServer(web) as server:
        cfg = prepare_config(str(meta_path), str(out), server.allow_hosts, "--quiet", "--image-size", "64",
                             "--download-timeout", "3", "--samples-per-shard", "40", *MODELS_OFF, *COLUMN_FLAGS)
        stats = run(cfg, [])
        yield web, lower, out, stats, server


def test_lowercase_columns_run_end_to_end_with_the_same_uids(lowercase_run):
    web, lower, out, stats, _ = lowercase_run
    assert stats["accounting"]["ok"] and stats["accounting"]["input_rows"] == lower.num_rows
    meta = [r for p in sorted((out / "meta").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    rejects = [r for p in sorted((out / "rejects").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert meta and rejects and len(meta) + len(rejects) == lower.num_rows
    # The input's own columns are kept under their own names; kiln's uid is over (url, caption).
    first = pq.read_table(sorted((out / "meta").glob("*.parquet"))[0]).schema.names
    assert first[: len(lower.column_names)] == lower.column_names and "URL" not in first
    for row in meta:
        assert row["uid"] == compute_uid(row["url"], row["caption"])
    # Rejects carry the row's own id and URL from the named columns.
    by_key = {r["key"]: r for r in lower.to_pylist()}
    for rej in rejects:
        assert rej["SAMPLE_ID"] in by_key and rej["url"] == by_key[rej["SAMPLE_ID"]]["url"]
    # Declared sizes come from width/height: planted tiny declared sizes are caught in the prefilter.
    truth = pq.read_table(web.ground_truth_path).to_pylist()
    declared = {t["SAMPLE_ID"] for t in truth if t["expected_reason"] == "declared_too_small"}
    assert declared and declared <= {r["SAMPLE_ID"] for r in rejects if r["reason"] == "declared_too_small"}


def test_lowercase_columns_reach_the_tar_and_the_stats(lowercase_run):
    _, _, out, stats, _ = lowercase_run
    with tarfile.open(out / "shards" / "000000.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted(n[:-5] for n in files if n.endswith(".json"))
    assert keys
    for key in keys:
        js = json.loads(files[f"{key}.json"])
        assert files[f"{key}.txt"].decode() == js["caption"] and "shard" not in js and "TEXT" not in js
    assert stats["flags"]["url_col"] == "url" and stats["flags"]["caption_col"] == "caption"
    assert "--url-col url --caption-col caption --id-col key" in stats["command"]
    card = (out / "README.md").read_text()
    assert "--caption-col caption" in card


def test_missing_or_clashing_columns_are_refused_before_any_work(lowercase_run, tmp_path):
    web, lower, _, _, server = lowercase_run
    lower_path = tmp_path / "lower.parquet"
    pq.write_table(lower, lower_path)
    with pytest.raises(ConfigError, match=r"input has no 'URL' column \(--url-col\).*pass --url-col NAME"):
        run(prepare_config(str(lower_path), str(tmp_path / "o1"), server.allow_hosts, "--quiet", *MODELS_OFF), [])
    clash = tmp_path / "clash.parquet"
    pq.write_table(pq.read_table(web.metadata_path).append_column("shard", pa.array([1] * lower.num_rows)), clash)
    with pytest.raises(ConfigError, match=r"\['shard'\] clash with fields kiln adds"):
        run(prepare_config(str(clash), str(tmp_path / "o2"), server.allow_hosts, "--quiet", *MODELS_OFF), [])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # nothing written


def test_the_cli_says_which_flag_to_pass(lowercase_run, tmp_path):
    _, lower, _, _, _ = lowercase_run
    path = tmp_path / "lower.parquet"
    pq.write_table(lower, path)
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "prepare", "--input", str(path), "--output", str(tmp_path / "o"),
                        *MODELS_OFF], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "input has no 'URL' column (--url-col)" in lines[0], r.stderr
