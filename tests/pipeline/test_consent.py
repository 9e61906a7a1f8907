"""Issue 15 end to end: a synthetic web with every opt-out protocol and blocklist kind planted.

The consent web (pipeline.testbed.synth, consent_per_kind > 0) serves robots.txt and tdmrep.json on
its main site and on six more origins (127.0.0.1 ports and localhost): kiln's own group, `*`, AI
crawler groups, wildcards and `$`, Allow overriding Disallow, a 404, a 500 and a slow robots.txt,
a tdmrep.json with a reservation and one answering 500, the tdm-reservation header, an offline
opt-out list, and blocklist entries of every kind (PDQ matched on a re-encoded, resized copy).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, fingerprint, parse_prepare
from pipeline.consent import rows_removed
from pipeline.prepare import run
from pipeline.testbed import prepare_config
from pipeline.testbed.server import SynthServer
from pipeline.testbed.synth import CONSENT_KINDS, CONSENT_SITES, synthesize

ROOT = Path(__file__).resolve().parents[2]
MODELS_OFF = ("--toxicity", "off", "--clip", "off", "--nsfw", "off", "--t5", "off")


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("consent-web")
    w = synthesize(root, rows=90, seed=11, failure_rate=0.0, consent_per_kind=2)
    with SynthServer(w) as server:
        yield w, server


@pytest.fixture(scope="module")
def consent_run(web, tmp_path_factory):
    w, server = web
    out = tmp_path_factory.mktemp("consent-ds") / "ds"
    cfg = prepare_config(str(w.metadata_path), str(out), server.allow_hosts, "--quiet", "--image-size", "64",
                         "--download-timeout", "5", "--samples-per-shard", "40", *MODELS_OFF, *w.consent_flags)
    stats = run(cfg, [])
    hits = {(site, path): server.hits(path, site) for site in (None, *CONSENT_SITES)
            for path in ("/robots.txt", "/.well-known/tdmrep.json")}
    return out, stats, hits


def _rows(out: Path, kind: str) -> list[dict]:
    return [r for p in sorted((out / kind).glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


pytestmark = pytest.mark.slow


def test_every_planted_opt_out_and_blocklist_row_ends_with_its_reason(web, consent_run):
    w, _ = web
    out, stats, _ = consent_run
    truth = pq.read_table(w.ground_truth_path).to_pylist()
    assert {t["kind"] for t in truth} >= set(CONSENT_KINDS)
    kept = {r["SAMPLE_ID"] for r in _rows(out, "meta")}
    rejected = {r["SAMPLE_ID"]: r for r in _rows(out, "rejects")}
    wrong = []
    for t in truth:
        got = rejected.get(t["SAMPLE_ID"])
        if t["expected_stage"] is None:
            if t["SAMPLE_ID"] not in kept:
                wrong.append((t["kind"], "expected kept", got and (got["stage"], got["reason"], got["detail"])))
        elif got is None or (got["stage"], got["reason"]) != (t["expected_stage"], t["expected_reason"]):
            wrong.append((t["kind"], t["expected_reason"], got and (got["stage"], got["reason"], got["detail"])))
    assert not wrong, wrong
    assert stats["accounting"]["ok"] and stats["kept"] + stats["rejected"] == len(truth)
    # Rows removed per protocol, as the card and the summary count them, equal the planted rows.
    removed = rows_removed(stats["funnel"])
    per_kind = {k: sum(1 for t in truth if t["kind"] == k) for k in CONSENT_KINDS}
    assert removed["robots_txt"] == sum(n for k, n in per_kind.items() if CONSENT_KINDS[k][3] and CONSENT_KINDS[k][3].startswith("robotstxt"))
    assert removed["tdmrep"] == per_kind["tdmrep_reserved"] + per_kind["tdmrep_500"] + per_kind["tdm_header"]
    assert removed["optout_list"] == per_kind["optout_listed"]
    assert removed["blocklists"] == sum(n for k, n in per_kind.items() if k.startswith("blocklist_"))


def test_rules_are_fetched_once_per_origin(consent_run):
    _, stats, hits = consent_run
    for (site, path), n in hits.items():
        if (site, path) in (("broken", "/robots.txt"), ("tdm500", "/.well-known/tdmrep.json")):
            assert 1 <= n <= 3, (site, path, n)  # a 500 is retried (--retries 2) within the one fetch
        elif site == "localhost":
            assert n == 0, (site, path, n)  # its rows are all blocklisted by domain: no row left to need its rules
        else:
            assert n == 1, (site, path, n)
    robots = stats["consent"]["protocols"]["robots_txt"]
    tdm = stats["consent"]["protocols"]["tdmrep"]
    assert robots["origins"] == len(CONSENT_SITES)  # the main site and every extra site but localhost (see above)
    assert robots["origins_unavailable"] == 1  # the 500
    assert robots["origins_no_rules"] == 2  # 404s: norules, tdm500
    assert tdm["origins_with_file"] == 1 and tdm["origins_unavailable"] == 1


def test_no_blocklisted_image_reaches_the_output(web, consent_run):
    w, _ = web
    out, _, _ = consent_run
    truth = pq.read_table(w.ground_truth_path).to_pylist()
    blocked = [t for t in truth if t["kind"].startswith("blocklist_")]
    served = [(w.images_dir / t["image_file"]).read_bytes() for t in blocked]
    assert served and all(len(b) > 200 for b in served)
    files = [p for p in out.rglob("*") if p.is_file()]
    for path in files:
        data = path.read_bytes()
        for t, body in zip(blocked, served):
            assert body[64:192] not in data, (t["kind"], path)
        for t in blocked:
            if path.suffix == ".tar":
                assert t["uid"].encode() not in data, (t["kind"], path)
    for r in _rows(out, "rejects"):
        if r["reason"].startswith("blocklist_"):
            assert "synth-blocklist" in r["detail"] and len(r["detail"]) < 300
            # only ids and hashes: no URL, no scores
            assert r["url"] is None and r["uid"] and all(r[k] is None for k in ("toxicity", "clip_similarity", "punsafe"))


def test_kept_samples_record_pdq_and_source_bytes(web, consent_run):
    w, _ = web
    out, _, _ = consent_run
    truth = {t["uid"]: t for t in pq.read_table(w.ground_truth_path).to_pylist()}
    meta = _rows(out, "meta")
    assert meta
    for r in meta:
        assert len(r["pdq_hash"]) == 64 and int(r["pdq_hash"], 16) >= 0
        assert 0 <= r["pdq_quality"] <= 100
        assert r["source_bytes"] == (w.images_dir / truth[r["uid"]]["image_file"]).stat().st_size


def test_switching_protocols_off_keeps_those_rows(web, tmp_path):
    w, server = web
    before = server.hits("/robots.txt")
    cfg = prepare_config(str(w.metadata_path), str(tmp_path / "off"), server.allow_hosts, "--quiet", "--image-size", "64",
                         "--download-timeout", "5", "--samples-per-shard", "40", *MODELS_OFF,
                         "--no-robots-txt", "--no-tdmrep", "--no-x-robots-tag", "--no-c2pa")
    stats = run(cfg, [])
    assert server.hits("/robots.txt") == before  # not even fetched
    reasons = {(r["stage"], r["reason"]) for r in _rows(tmp_path / "off", "rejects")}
    assert not {r for _, r in reasons} & {"robotstxt_disallowed", "robotstxt_ai_optout", "robotstxt_unavailable",
                                           "tdmrep_reserved", "tdmrep_unavailable", "tdm_reservation", "optout_list"}
    assert not any(r.startswith("blocklist_") for _, r in reasons)
    assert not {"blocklist", "optout"} & {s["stage"] for s in stats["funnel"]}
    assert stats["consent"]["protocols"]["robots_txt"]["enabled"] is False


def test_list_files_are_part_of_the_resume_fingerprint(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("domain example.com\n")
    cfg, _ = parse_prepare(["--input", "x", "--output", "y", "--blocklist", str(lst)])
    from pipeline.optout import list_hashes

    a = fingerprint(cfg, [], list_hashes(cfg.consent))
    lst.write_text("domain example.org\n")
    assert fingerprint(cfg, [], list_hashes(cfg.consent)) != a


def test_blocklist_flag_repeats_and_a_bad_file_is_one_line(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("domain example.com\n")
    b.write_text("not-a-kind 123\n")
    cfg, _ = parse_prepare(["--input", "x", "--output", "y", "--blocklist", str(a), "--blocklist", str(b)])
    assert cfg.consent.blocklist == (str(a), str(b))
    from pipeline.optout import load_lists

    with pytest.raises(ConfigError) as err:
        load_lists(cfg.consent)
    assert str(b) in str(err.value) and "\n" not in str(err.value)
    meta = tmp_path / "m.parquet"
    import pyarrow as pa

    pq.write_table(pa.table({"URL": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["a red circle"]}), meta)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "prepare", "--input", str(meta), "--output", str(tmp_path / "o"),
                           "--blocklist", str(b), *MODELS_OFF], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and str(b) in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1, proc.stderr
    assert not (tmp_path / "o").exists()


def test_the_run_writes_a_card_croissant_and_summary_that_recount_from_the_files(web, consent_run):
    """Done-when of issue 15 on the run itself: the card's tables, a croissant.json mlcroissant
    validates and reads, and a training summary whose numbers recount from the parquet files."""
    import collections
    import json

    from pipeline.consent import PROTOCOLS, PROTOCOL_TITLES
    from tests.pipeline.test_croissant import _mlcroissant_dataset
    from tests.pipeline.test_training_summary import PROTOCOL_REASONS, _recount_bytes_per_host

    w, _ = web
    out, stats, _ = consent_run
    kept, rejects = _rows(out, "meta"), _rows(out, "rejects")
    # croissant.json: valid, and every kept row readable through it.
    ds = _mlcroissant_dataset(out / "croissant.json")
    assert len(list(ds.records(record_set="meta"))) == len(kept) == stats["kept"]
    # training_summary.json: rows removed per protocol and per blocklist kind, from the rejects files.
    summary = json.loads((out / "training_summary.json").read_text())
    by_pair = collections.Counter((r["stage"], r["reason"]) for r in rejects)
    protocols = {p["protocol"]: p for p in summary["3_data_processing_aspects"]["3.1_respect_of_reservation_of_rights"]["protocols"]}
    assert set(protocols) == set(PROTOCOLS)
    for name, pairs in PROTOCOL_REASONS.items():
        assert protocols[name]["rows_removed"] == sum(by_pair[p] for p in pairs), name
        assert protocols[name]["rows_removed"] > 0 or name == "x_robots_tag", name  # X-Robots-Tag rows: failure kinds (rate 0 here)
    assert protocols["robots_txt"]["origins_consulted"] == len(CONSENT_SITES)
    bl = summary["3_data_processing_aspects"]["3.2_removal_of_illegal_content"]["blocklists"]
    assert bl["rows_removed"] == sum(n for (_, reason), n in by_pair.items() if reason.startswith("blocklist_")) > 0
    # The top domains by bytes: a recount from the meta parquet.
    per_host, missing = _recount_bytes_per_host(out)
    total = sum(per_host.values())
    ranked = sorted(per_host.items(), key=lambda kv: (-kv[1], kv[0]))
    top = summary["2_list_of_data_sources"]["2.3_data_crawled_and_scraped_from_online_sources"]["top_domains_by_bytes"]
    assert missing == 0 and top["bytes_total"] == total > 0
    assert [(d["domain"], d["bytes"]) for d in top["domains"]] == ranked[:-(-len(per_host) // 10)]
    # The card: one opt-out row per protocol, the blocklist by name, the new stages in the funnel.
    card = (out / "README.md").read_text()
    for name in PROTOCOLS:
        assert PROTOCOL_TITLES[name] in card, name
    assert "synth-blocklist" in card
    assert {"blocklist", "optout"} <= {s["stage"] for s in stats["funnel"]}
    for stage in ("blocklist", "optout"):
        assert any(line.startswith("|") and f"| {stage} " in line.replace("`", "") for line in card.splitlines()), stage
