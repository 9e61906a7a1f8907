"""Issue 12: every bad input to `kiln prepare` gets one clear line, before any work, and touches nothing.

Table-driven, through the real CLI in a subprocess, as a user meets it. Each case builds its world in
tmp_path (a good metadata parquet, then one thing wrong), runs `kiln prepare`, and asserts:
  * the exit code (2: a usage mistake to fix in the command; 1: a run that failed),
  * exactly one non-empty stderr line, `kiln prepare: error: ...`, naming the thing (`expect`),
  * no traceback anywhere,
  * nothing under tmp_path changed (no file created, modified or deleted), unless the case says so.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]


def kiln(*argv: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], capture_output=True, text=True, timeout=180,
                          cwd=cwd or ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def snapshot(root: Path) -> dict:
    """Every path under root -> its kind and content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def good_table(n: int = 4) -> pa.Table:
    return pa.table({
        "URL": [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)],
        "TEXT": [f"a red circle number {i}" for i in range(n)],
        "WIDTH": pa.array([512] * n, pa.int64()),
        "HEIGHT": pa.array([512] * n, pa.int64()),
    })


def write(tmp: Path, table: pa.Table, name: str = "meta.parquet") -> str:
    path = tmp / name
    pq.write_table(table, path)
    return str(path)


# Every model off unless a case turns one on: the input/output/flag checks come before any model.
NO_MODELS = ["--toxicity", "off", "--clip", "off", "--nsfw", "off", "--t5", "off"]


def base(tmp: Path, *extra: str, table: pa.Table | None = None) -> list[str]:
    return ["prepare", "--input", write(tmp, table if table is not None else good_table()), "--output", str(tmp / "out"), *NO_MODELS, *extra]


def _options_file(tmp: Path, text: str) -> str:
    path = tmp / "opts.yaml"
    path.write_text(text)
    return str(path)


# (id, argv builder, exit code, a fragment the one line must contain)
FLAG_CASES: list = [
    ("samples-per-shard-0", lambda t: base(t, "--samples-per-shard", "0"), 2, "--samples-per-shard"),
    ("samples-per-shard-negative", lambda t: base(t, "--samples-per-shard", "-5"), 2, "--samples-per-shard"),
    ("encode-quality-500", lambda t: base(t, "--encode-quality", "500"), 2, "--encode-quality"),
    ("image-size-0", lambda t: base(t, "--image-size", "0"), 2, "--image-size"),
    ("allow-hosts-url", lambda t: base(t, "--allow-hosts", "http://127.0.0.1"), 2, "--allow-hosts"),
    ("allow-hosts-no-port", lambda t: base(t, "--allow-hosts", "127.0.0.1"), 2, "--allow-hosts"),
    ("unknown-runner", lambda t: base(t, "--runner", "NoSuchRunner"), 2, "--runner NoSuchRunner"),
    ("misspelt-kiln-flag", lambda t: base(t, "--samples-per-shrad", "5"), 2, "--samples-per-shard"),
    ("misspelt-beam-flag", lambda t: base(t, "--direct_num_worker", "2"), 2, "--direct_num_workers"),
    ("bad-beam-value", lambda t: base(t, "--direct_num_workers", "two"), 2, "--direct_num_workers"),
    ("stray-argument", lambda t: base(t, "stray.parquet"), 2, "stray.parquet"),
    ("not-an-int", lambda t: base(t, "--min-image-size", "abc"), 2, "--min-image-size"),
    ("missing-output", lambda t: ["prepare", "--input", write(t, good_table()), *NO_MODELS], 2, "--output"),
    ("nan-threshold", lambda t: base(t, "--min-clip-similarity", "nan"), 2, "finite"),
    ("infinite-timeout", lambda t: base(t, "--connect-timeout", "inf"), 2, "--connect-timeout"),
    ("device-not-a-device", lambda t: base(t, "--device", "potato"), 2, "--device"),
    ("options-file-is-a-directory", lambda t: base(t, "--options", str(t)), 2, "directory"),
    ("options-file-binary", lambda t: (t / "o.yaml").write_bytes(b"runner: \x80\xff\n") and base(t, "--options", str(t / "o.yaml")), 2, "UTF-8"),
    ("nsfw-head-empty", lambda t: base(t, "--clip", "score", "--nsfw", "filter", "--nsfw-head", ""), 2, "--nsfw-head"),
    ("options-file-missing", lambda t: base(t, "--options", str(t / "nope.yaml")), 2, "nope.yaml"),
    ("options-file-bad-kiln-value", lambda t: base(t, "--options", _options_file(t, "kiln:\n  samples_per_shard: -3\n")), 2, "samples_per_shard"),
    ("options-file-unknown-kiln-key", lambda t: base(t, "--options", _options_file(t, "kiln:\n  sample_per_shard: 3\n")), 2, "sample_per_shard"),
    ("options-file-not-yaml", lambda t: base(t, "--options", _options_file(t, "runner: [unclosed\n")), 2, "opts.yaml"),
    ("options-file-typo-beam-option", lambda t: base(t, "--options", _options_file(t, "runnr: DirectRunner\n")), 2, "runnr"),
]

INPUT_CASES: list = [
    ("no-match", lambda t: ["prepare", "--input", str(t / "none-*.parquet"), "--output", str(t / "out"), *NO_MODELS], 2, "none-*.parquet"),
    ("missing-caption-column", lambda t: base(t, table=good_table().drop(["TEXT"])), 2, "--caption-col"),
    ("wrong-url-column-name", lambda t: base(t, "--url-col", "url"), 2, "--url-col"),
    ("clash-uid", lambda t: base(t, table=good_table().append_column("uid", pa.array(["x"] * 4))), 2, "uid"),
    ("clash-punsafe", lambda t: base(t, table=good_table().append_column("punsafe", pa.array([0.1] * 4))), 2, "punsafe"),
]

def _out_with(t: Path, rel: str, text: str = "mine") -> Path:
    path = t / "out" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return t


def _not_parquet(t: Path) -> list[str]:
    (t / "meta.parquet").write_text("URL,TEXT\nhttp://127.0.0.1:9/a.jpg,a cat\n")
    return ["prepare", "--input", str(t / "meta.parquet"), "--output", str(t / "out"), *NO_MODELS]


def _truncated(t: Path) -> list[str]:
    argv = base(t)
    data = (t / "meta.parquet").read_bytes()
    (t / "meta.parquet").write_bytes(data[: len(data) // 2])
    return argv


def _input_dir(t: Path) -> list[str]:
    base(t)
    return ["prepare", "--input", str(t), "--output", str(t / "out"), *NO_MODELS]


def _replace(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, array)


INPUT_CASES += [
    ("input-not-parquet", _not_parquet, 2, "meta.parquet"),
    ("input-truncated", _truncated, 2, "meta.parquet"),
    ("input-is-a-directory", _input_dir, 2, "directory"),
    ("url-column-int64", lambda t: base(t, table=_replace(good_table(), "URL", pa.array([1, 2, 3, 4], pa.int64()))), 2, "URL"),
    ("width-column-text", lambda t: base(t, table=_replace(good_table(), "WIDTH", pa.array(["wide"] * 4))), 2, "WIDTH"),
    ("clash-shard", lambda t: base(t, table=good_table().append_column("shard", pa.array([1] * 4))), 2, "shard"),
]

OUTPUT_CASES = [
    ("output-is-a-file", lambda t: (t / "out").write_text("mine") and base(t), 2, "out"),
    # The user's README.md is never replaced by the card: not without --overwrite, not with it.
    ("output-has-users-readme", lambda t: base(_out_with(t, "README.md", "# my notes\n")), 2, "README.md"),
    ("overwrite-users-readme", lambda t: base(_out_with(t, "README.md", "# my notes\n"), "--overwrite"), 2, "README.md"),
    # Files kiln did not write: refused without --overwrite (kiln never decides they may go).
    ("output-has-foreign-files", lambda t: base(_out_with(t, "shards/my_notes.txt")), 2, "my_notes.txt"),
    ("output-has-foreign-parquet", lambda t: base(_out_with(t, "meta/analysis.csv")), 2, "analysis.csv"),
    ("output-finished-garbage-stats", lambda t: base(_out_with(_out_with(t, "_SUCCESS", ""), "stats.json", "{not json")), 2, "stats.json"),
]

CASES = FLAG_CASES + INPUT_CASES + OUTPUT_CASES


@pytest.mark.parametrize("name, build, code, expect", CASES, ids=[c[0] for c in CASES])
def test_prepare_bad_input_is_one_line(tmp_path, name, build, code, expect):
    argv = build(tmp_path)
    before = snapshot(tmp_path)
    r = kiln(*argv)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("kiln prepare: error: "), r.stderr
    assert expect in lines[0], lines[0]
    assert snapshot(tmp_path) == before, "a refused run changed files"


def test_debug_shows_the_traceback(tmp_path):
    r = kiln(*base(tmp_path, "--samples-per-shard", "0"), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr
    r = kiln(*base(tmp_path, "--samples-per-shard", "0"), env={"KILN_DEBUG": "1"})
    assert "Traceback" in r.stderr


# -- end to end: the job runs to the end, accounts for every row, and keeps every file of the user's --


def _accounted(out: Path, rows: int) -> dict:
    import json

    stats = json.loads((out / "stats.json").read_text())
    assert stats["accounting"]["ok"] is True, stats["accounting"]
    assert stats["kept"] + stats["rejected"] == rows
    assert (out / "_SUCCESS").exists()
    return stats


def _rejects(out: Path) -> dict:
    table = pa.concat_tables(pq.read_table(p) for p in sorted((out / "rejects").glob("*.parquet")))
    return {(s, r) for s, r in zip(table.column("stage").to_pylist(), table.column("reason").to_pylist())}


@pytest.mark.slow
def test_overwrite_deletes_only_kilns_files(tmp_path):
    """--overwrite over a finished output holding the user's files in kiln's own folders: kiln's
    files are redone, every file of the user's is kept byte for byte."""
    argv = base(tmp_path, "--samples-per-shard", "2")
    r = kiln(*argv, "--no-card")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    mine = {"shards/my_notes.txt": "notes", "meta/analysis.csv": "a,b\n1,2\n", "card_plots/my_plot.png": "png",
            "README.md": "# my own readme\n", "000000.tar": "not a shard of kiln's"}
    for rel, text in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    r = kiln(*argv, "--no-card", "--overwrite")
    assert r.returncode == 0, r.stderr
    _accounted(out, 4)
    for rel, text in mine.items():
        assert (out / rel).read_text() == text, rel


@pytest.mark.slow
def test_output_named_with_glob_characters(tmp_path):
    """An --output whose name holds [ ] * ? is written, accounted and resumed like any other (kiln
    never reads an output path as a glob)."""
    out = tmp_path / "run[1]*?"
    argv = ["prepare", "--input", write(tmp_path, good_table()), "--output", str(out), *NO_MODELS,
            "--samples-per-shard", "2"]
    r = kiln(*argv)
    assert r.returncode == 0, r.stderr
    _accounted(out, 4)
    assert (out / "README.md").exists()
    r = kiln(*argv)
    assert r.returncode == 0 and "already complete" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_malformed_rows_are_rejects_and_the_job_finishes(tmp_path):
    """One bad row costs one reject row, never the job: text that is not UTF-8, a null URL, a
    caption of spaces, NaN / infinite / negative / huge declared sizes, a file:// URL."""
    bad_text = pa.array([b"a red circle", b"caption \xff\xfe broken", b"a blue star", b"   ", b"a green square",
                         b"a cat", b"a dog", b"a bird", b"a red circle"], pa.binary()).view(pa.string())
    table = pa.table({
        "URL": ["http://127.0.0.1:9/0.jpg", "http://127.0.0.1:9/1.jpg", None, "http://127.0.0.1:9/3.jpg",
                "http://127.0.0.1:9/4.jpg", "http://127.0.0.1:9/5.jpg", "http://127.0.0.1:9/6.jpg", "file:///etc/passwd",
                "http://127.0.0.1:9/0.jpg"],
        "TEXT": bad_text,
        "WIDTH": pa.array([512, 512, 512, 512, float("nan"), float("inf"), -3.0, 1e12, 512], pa.float64()),
        "HEIGHT": pa.array([512.0] * 9, pa.float64()),
    })
    out = tmp_path / "out"
    r = kiln("prepare", "--input", write(tmp_path, table), "--output", str(out), *NO_MODELS)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    _accounted(out, 9)
    reasons = _rejects(out)
    for expected in [("prefilter", "invalid_utf8"), ("prefilter", "url_missing"), ("prefilter", "caption_empty"),
                     ("prefilter", "declared_size_invalid"), ("prefilter", "url_scheme"), ("prefilter", "duplicate")]:
        assert expected in reasons, (expected, reasons)


# -- models: a model kiln cannot load is one line naming the flag, before any work -----------------


def _code_pickle(path: Path) -> Path:
    """A checkpoint as torch.save writes it whose unpickling would call a function (here print):
    what a malicious .ckpt / .pt looks like. kiln must refuse it, not run it."""
    import torch

    class Payload:
        def __reduce__(self):
            return (print, ("this line must never be printed",))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": Payload()}}, path)
    return path


def _no_weights_env(t: Path) -> dict:
    for d in ("hf", "torch"):
        (t / d).mkdir(exist_ok=True)
    return {"HF_HOME": str(t / "hf"), "TORCH_HOME": str(t / "torch"), "HF_HUB_OFFLINE": "1"}


def _defaults(t: Path) -> tuple[list[str], dict]:
    # The newcomer's first command: default flags, on a machine that has no model weights.
    return ["prepare", "--input", write(t, good_table()), "--output", str(t / "out")], _no_weights_env(t)


MODEL_CASES = [
    ("defaults-without-weights", _defaults, "kiln models fetch laion400m-defaults --to models/"),
    ("defaults-with-nsfw-off", lambda t: (_defaults(t)[0] + ["--nsfw", "off"], _no_weights_env(t)), "--toxicity-model detoxify-original"),
    ("models-dir-missing", lambda t: (_defaults(t)[0] + ["--models", str(t / "nomodels")], {}), "kiln models fetch laion400m-defaults"),
    ("t5-local-folder-missing", lambda t: (base(t, "--t5", "embed", "--t5-model", f"local:{t / 'no-t5'}"), {}), "--t5-model local:"),
    ("t5-hub-id-not-cached", lambda t: (base(t, "--t5", "embed"), _no_weights_env(t)), "(--t5-model t5-v1_1-xxl): fetch them"),
    ("clip-not-cached", lambda t: (base(t, "--clip", "filter"), _no_weights_env(t)), "(--clip-model ViT-B-32-openai): fetch them"),
    ("toxicity-pickle-with-code",
     lambda t: (_code_pickle(t / "tox" / "checkpoint.ckpt") and base(t, "--toxicity", "filter", "--toxicity-model", f"local:{t / 'tox'}"), {}),
     "carries code"),
]


@pytest.mark.parametrize("name, build, expect", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_prepare_model_that_cannot_load_is_one_line(tmp_path, name, build, expect):
    argv, env = build(tmp_path)
    before = snapshot(tmp_path)
    r = kiln(*argv, env=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert "this line must never be printed" not in r.stdout + r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("kiln prepare: error: "), r.stderr
    assert expect in lines[0], lines[0]
    assert snapshot(tmp_path) == before, "a refused run changed files"


# -- the other commands' flags -------------------------------------------------------------------------

OTHER_CASES = [
    ("synth-rows-negative", lambda t: ["synth", "--rows", "-1", "--out", str(t / "web")], "synth", "rows"),
    ("synth-rate-above-one", lambda t: ["synth", "--rows", "3", "--out", str(t / "web"), "--failure-rate", "2"], "synth", "failure_rate"),
    ("synth-size-range-inverted", lambda t: ["synth", "--rows", "3", "--out", str(t / "web"), "--size-range", "500", "10"], "synth", "size_range"),
    ("synth-out-under-a-file", lambda t: (t / "f").write_text("x") and ["synth", "--rows", "3", "--out", str(t / "f" / "web")], "synth", "--out"),
    ("card-samples-negative", lambda t: ["card", str(t), "--samples", "-1"], "card", "--samples"),
]


@pytest.mark.parametrize("name, build, cmd, expect", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_other_commands_bad_flags_are_one_line(tmp_path, name, build, cmd, expect):
    argv = build(tmp_path)
    before = snapshot(tmp_path)
    r = kiln(*argv)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"kiln {cmd}: error: "), r.stderr
    assert expect in lines[0], lines[0]
    assert snapshot(tmp_path) == before
