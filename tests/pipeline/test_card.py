"""The dataset card (pipeline/card/) on a dataset made by the real pipeline over the synthetic web.

The card's numbers must be the files' numbers: the funnel is recounted here from the rejects and
meta parquet files and the manifest, independently of pipeline/card/, and compared with the card's
tables; tampering with a rejects file must stop the card. Nothing here reaches the network: the
Hub's `DatasetCard.validate()` posts to huggingface.co, so the metadata is checked offline
(DatasetCardData round trip + the Hub's rules for the fields kiln writes) with every non-loopback
connection refused.
"""

import collections
import contextlib
import json
import re
import shutil
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.card import CardError, add_card_args, main_card, write_card
from pipeline.card.hub import validate_card_metadata
from pipeline.card.render import md
from pipeline.testbed import prepare_config
from pipeline.prepare import run
from pipeline.testbed.server import SynthServer
from pipeline.testbed.synth import synthesize
from pipeline.testbed.models import cached_test_models, prepare_flags

pytestmark = pytest.mark.slow
EXPECTED_PLOTS = ("clip_similarity", "punsafe", "toxicity", "image_sizes", "caption_chars", "t5_len", "samples")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@contextlib.contextmanager
def loopback_only():
    """Refuse every connection and name lookup that is not loopback (the test fails if one is tried)."""
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def check(address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in LOOPBACK and not host.startswith("127."):
            raise OSError(f"test: network access to {address!r} refused")

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *a, **kw):
        check((host,))
        return real_getaddrinfo(host, *a, **kw)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = real_connect, real_connect_ex, real_getaddrinfo


def _prepare(tmp_path_factory, name, *flags):
    root = tmp_path_factory.mktemp(name)
    web = synthesize(root / "web", rows=200, seed=5, failure_rate=0.2, mismatch_rate=0.1, toxic_rate=0.05)
    out = root / "dataset"
    with SynthServer(web) as s:
        # --samples-per-shard 60: several shards, so a missing rejects file is one of many.
        run(prepare_config(str(web.metadata_path), str(out), s.allow_hosts, "--quiet", "--image-size", "128",
                         "--download-timeout", "3", "--samples-per-shard", "60", *flags), [])
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = _prepare(tmp_path_factory, "card", *prepare_flags(cached_test_models()))
    with loopback_only():
        card = write_card(out)
    return out, card


@pytest.fixture(scope="module")
def dataset_filters_off(tmp_path_factory):
    out = _prepare(tmp_path_factory, "card-off", "--toxicity", "off", "--clip", "off", "--nsfw", "off", "--t5", "off")
    with loopback_only():
        card = write_card(out)
    return out, card


def _rows(out: Path, sub: str, columns=None) -> list[dict]:
    return [r for p in sorted((out / sub).glob("*.parquet")) for r in pq.read_table(p, columns=columns).to_pylist()]


def _table(text: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header line starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _int(cell: str) -> int:
    return int(cell.replace(",", "").replace("*", ""))


def test_card_loads_as_a_hub_dataset_card_and_passes_the_hub_rules_offline(dataset):
    from huggingface_hub import DatasetCard, DatasetCardData

    out, card_path = dataset
    assert card_path == out / "README.md"
    with loopback_only():
        card = DatasetCard.load(card_path)
    meta = card.data.to_dict()
    assert meta["task_categories"] == ["text-to-image"]
    assert meta["size_categories"] == ["n<1K"]
    assert meta["language"] == ["en"]
    assert meta["pretty_name"] and "kiln" in meta["tags"]
    # The synthetic web's LICENSE column mixes '?' with Creative Commons URLs.
    assert meta["license"] == "other" and meta["license_name"] == "kiln-per-sample-mix"
    assert "cc-by-sa-4.0" in meta["license_details"] and "unknown" in meta["license_details"]
    assert validate_card_metadata(meta) == []
    assert DatasetCardData(**meta).to_dict() == meta
    assert DatasetCard(str(card)).data.to_dict() == meta
    # The offline rules do reject what the Hub rejects.
    assert validate_card_metadata({**meta, "size_categories": ["lots"]})
    assert validate_card_metadata({**meta, "license": "cc-by-sa"})
    assert validate_card_metadata({**meta, "license_name": "Mixed Licences"})
    for section in ("Motivation", "Composition", "Collection process", "Preprocessing and filtering", "Uses",
                    "Distribution", "Maintenance", "Known limitations and biases", "Questions this card cannot answer"):
        assert re.search(rf"^##+ {section}$", card.text, re.M), section


def test_card_funnel_equals_counts_recomputed_from_shards_and_rejects(dataset):
    out, card_path = dataset
    text = card_path.read_text()
    rejects = _rows(out, "rejects", ["stage", "reason"])
    kept = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "meta").glob("*.parquet"))
    manifest = json.loads((out / "manifest.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    assert manifest["samples"] == kept and len(manifest["shards"]) >= 3
    by_reason = collections.Counter((r["stage"], r["reason"]) for r in rejects)
    input_rows = kept + len(rejects)
    assert input_rows == stats["input"]["rows"] == 200

    card_reasons = {(st, reason): _int(n) for st, reason, n, _ in _table(text, "| stage | reason |")}
    assert card_reasons == dict(by_reason)
    for st, reason, n, pct in _table(text, "| stage | reason |"):
        assert pct == f"{100 * _int(n) / input_rows:.2f}%"

    funnel = _table(text, "| stage | mode | in |")
    *stages, total = funnel
    current = input_rows
    for stage, mode, n_in, n_out, n_rej, pct_in, pct_stage in stages:
        rejected = sum(n for (st, _), n in by_reason.items() if st == stage)
        assert (_int(n_in), _int(n_out), _int(n_rej)) == (current, current - rejected, rejected), stage
        assert mode == stats["stage_modes"][stage]
        assert pct_in == f"{100 * rejected / input_rows:.2f}%"
        current -= rejected
    assert current == kept
    assert total[0] == "**kept**" and (_int(total[2]), _int(total[3]), _int(total[4])) == (input_rows, kept, len(rejects))
    assert {st for st, *_ in stages} >= {st for st, _ in by_reason}
    assert f"**{kept:,} kept (" in text


def test_card_states_every_flag_threshold_model_hash_and_run_fact_of_stats_json(dataset):
    out, card_path = dataset
    text = card_path.read_text()
    stats = json.loads((out / "stats.json").read_text())
    for key, value in stats["flags"].items():
        assert f"| `--{key.replace('_', '-')}` | `{md(value)}` |" in text, key
    for threshold in ("min_clip_similarity", "max_punsafe", "max_toxicity"):
        assert f"--{threshold.replace('_', '-')} {stats['flags'][threshold]}" in text, threshold
    for stage, mode in stats["stage_modes"].items():
        assert f"{stage} `{mode}`" in text
    assert set(stats["models"]) == {"clip", "nsfw", "t5", "toxicity"}
    for name, info in stats["models"].items():
        assert f"**{name}**: sha256 `{info['sha256']}`" in text, name
    for fact in (stats["kiln_version"], stats["git_commit"], stats["started_at"], stats["finished_at"], stats["config_fingerprint"]):
        if fact:
            assert str(fact) in text
    assert "DirectRunner" in text and "apache-beam 2.77.0" in text
    # The exact command the run recorded, as it recorded it (not rebuilt from the flags).
    assert stats["command"].startswith("kiln prepare --input ")
    assert f"same kiln commit):\n\n```\n{stats['command']}\n```\n" in text and "rebuilt from the flags" not in text
    # Opt-outs: each honoured directive with the rows it removed.
    robots = collections.Counter(r["reason"] for r in _rows(out, "rejects", ["reason"]) if r["reason"].startswith("robots_"))
    rows = {d.strip("`"): _int(n) for d, n, _ in _table(text, "| directive honoured |")}
    directives = stats["flags"]["disallowed_directives"]  # a list (a comma-separated string before the config schema)
    assert set(rows) == set(directives.split(",") if isinstance(directives, str) else directives)
    assert {f"robots_{d}": n for d, n in rows.items() if n} == dict(robots) and sum(robots.values()) >= 1
    # Licence mix and top domains of the kept rows.
    licences = collections.Counter(r["LICENSE"] for r in _rows(out, "meta", ["LICENSE"]))
    card_licences = {row[0].strip("`"): _int(row[2]) for row in _table(text, "| LICENSE value |")}
    assert card_licences == dict(licences)
    assert _table(text, "| domain |") == [["127.0.0.1", f"{sum(licences.values()):,}", "100.00%"]]


def test_card_plots_exist_as_png_files_referenced_by_the_card(dataset):
    from PIL import Image

    out, card_path = dataset
    text = card_path.read_text()
    refs = re.findall(r"!\[[^\]]*\]\((card_plots/[^)]+\.png)\)", text)
    assert sorted(refs) == sorted(f"card_plots/{p}.png" for p in EXPECTED_PLOTS)
    for ref in refs:
        data = (out / ref).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, ref
        with Image.open(out / ref) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert "Plot skipped" not in text


def test_card_says_which_plots_it_skipped_when_a_filter_was_off(dataset_filters_off):
    out, card_path = dataset_filters_off
    text = card_path.read_text()
    for col in ("toxicity", "clip_similarity", "punsafe", "t5_len"):
        assert not (out / "card_plots" / f"{col}.png").exists()
        assert f"so the `{col}` column is null" in text, col
    for plot in ("image_sizes", "caption_chars"):
        assert (out / "card_plots" / f"{plot}.png").stat().st_size > 0
    # No NSFW scores: the public card shows no unscreened web images unless asked to.
    assert not (out / "card_plots" / "samples.png").exists()
    assert "no sample grid: the NSFW stage was off" in text and "No NSFW filter ran" in text
    with loopback_only():
        write_card(out, unscreened_samples=True)
    assert (out / "card_plots" / "samples.png").stat().st_size > 0
    assert "not screened by an NSFW model" in (out / "README.md").read_text()


def test_card_is_deterministic(dataset, tmp_path):
    out, card_path = dataset
    copy = tmp_path / out.name  # the default pretty name is the directory's name
    shutil.copytree(out, copy)
    with loopback_only():
        write_card(copy)
    assert (copy / "README.md").read_bytes() == card_path.read_bytes()
    for doc in ("croissant.json", "training_summary.json", "training_summary.md"):  # written beside the card
        assert (copy / doc).read_bytes() == (out / doc).read_bytes(), doc
    for png in (out / "card_plots").glob("*.png"):
        assert (copy / "card_plots" / png.name).read_bytes() == png.read_bytes(), png.name


def test_a_deleted_rejects_file_stops_the_card(dataset, tmp_path):
    out, _ = dataset
    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    (copy / "README.md").unlink()
    victim = sorted((copy / "rejects").glob("*.parquet"))[1]
    victim.unlink()
    with pytest.raises(CardError, match=rf"rejects/{victim.name}: listed in manifest.json but missing"):
        write_card(copy)
    assert not (copy / "README.md").exists()


def test_a_rejects_file_missing_one_row_stops_the_card(dataset, tmp_path):
    out, _ = dataset
    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    victim = max((copy / "rejects").glob("*.parquet"), key=lambda p: pq.ParquetFile(p).metadata.num_rows)
    table = pq.read_table(victim)
    pq.write_table(table.slice(1), victim)
    before = (copy / "README.md").read_bytes()
    with pytest.raises(CardError) as err:
        write_card(copy)
    assert f"rejects/{victim.name}: {table.num_rows - 1} rows, manifest.json says {table.num_rows}" in str(err.value)
    assert "funnel differs" in str(err.value)
    assert (copy / "README.md").read_bytes() == before  # the old card is left alone


def test_stats_that_disagree_with_the_files_stop_the_card(dataset, tmp_path):
    out, _ = dataset
    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    stats = json.loads((copy / "stats.json").read_text())
    stats["kept"] += 1
    (copy / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(CardError, match="stats.json: kept"):
        write_card(copy)


def test_kiln_card_command(dataset, tmp_path, capsys):
    import argparse

    out, card_path = dataset
    copy = tmp_path / "cmd"
    shutil.copytree(out, copy)
    p = argparse.ArgumentParser()
    add_card_args(p)
    with loopback_only():
        assert main_card(p.parse_args([str(copy), "--pretty-name", "Synthetic shapes"])) == 0
    assert "wrote" in capsys.readouterr().out
    assert "pretty_name: Synthetic shapes" in (copy / "README.md").read_text()
    pq.write_table(pa.table({"x": [1]}), copy / "meta" / "999999.parquet")
    # CardError reaches pipeline.cli, which prints it as one line and exits 1 (tests/pipeline/test_outdir.py).
    with pytest.raises(CardError, match="meta/999999.parquet: on disk but not in manifest.json") as err:
        main_card(p.parse_args([str(copy)]))
    assert err.value.exit_code == 1
