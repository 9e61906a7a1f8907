import subprocess
import sys

import apache_beam as beam
import pyarrow.parquet as pq
import pytest

from pipeline.cli import build_parser, main
from pipeline.testbed import prepare_config
from pipeline.config import parse_prepare
from pipeline.prepare import build_pipeline


def kiln(*argv):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("cmd", [[], ["prepare"], ["synth"], ["serve"], ["demo"], ["make-test-models"], ["embed-prompts"], ["card"], ["train"], ["sample"], ["eval"], ["rate"], ["subset"], ["recheck"], ["models"]])
def test_help_for_every_command(cmd):
    r = kiln(*cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: kiln" in r.stdout


def test_every_subcommand_is_listed():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) >= {"prepare", "synth", "serve", "demo", "make-test-models", "embed-prompts", "card", "train", "sample", "eval", "rate", "subset", "recheck", "models"}


def test_prepare_flags_and_beam_passthrough():
    cfg, extra = parse_prepare(["--input", "x.parquet", "--output", "out", "--nsfw-head", "h.safetensors",
                                "--direct_running_mode=multi_processing"])
    assert cfg.image.image_size == 1024 and cfg.image.resize_mode == "center_crop" and cfg.output.samples_per_shard == 10_000
    assert extra == ["--direct_running_mode=multi_processing"]


def test_unknown_flag_on_a_non_beam_command_is_an_error():
    with pytest.raises(SystemExit):
        main(["synth", "--rows", "3", "--out", "x", "--bogus"])


def test_prepare_without_input_files_fails_clearly(tmp_path):
    r = kiln("prepare", "--input", str(tmp_path / "none-*.parquet"), "--output", str(tmp_path / "out"), "--nsfw", "off")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kiln prepare: error: no input files match {str(tmp_path / 'none-*.parquet')!r}: check --input"), lines


def test_synth_command_writes_a_web(tmp_path):
    r = kiln("synth", "--rows", "40", "--out", str(tmp_path / "web"), "--seed", "3")
    assert r.returncode == 0, r.stderr
    t = pq.read_table(tmp_path / "web" / "metadata.parquet")
    assert t.num_rows == 40
    assert t.column_names == ["SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "LICENSE", "NSFW", "similarity"]


def test_graph_has_the_labelled_stages(tmp_path):
    meta = tmp_path / "m.parquet"
    import pyarrow as pa

    schema = pa.schema([("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string())])
    pq.write_table(pa.Table.from_pylist([], schema=schema), meta)
    cfg = prepare_config(str(meta), str(tmp_path / "out"), "", "--nsfw", "off")
    p = beam.Pipeline()
    build_pipeline(p, cfg, schema, frozenset(), "fp")
    proto = p.to_runner_api()
    names = {t.unique_name for t in proto.components.transforms.values()}
    for label in ("ReadMetadata", "Prefilter", "Download", "Decode", "Resize", "WriteShards"):
        assert label in names, (label, sorted(n for n in names if "/" not in n))
