"""training_summary.json / .md (pipeline/card/summary.py): the draft EU training-content summary.

Its numbers are recounted here from the files, independently of pipeline/card: the domains' bytes
from the meta parquet (pyarrow + urllib.parse), the rows each opt-out protocol and blocklist removed
from the rejects parquet. The dataset is tests/pipeline/test_croissant.py's hand-written one.
"""

import collections
import json
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest

from pipeline.card import CardError, write_card
from pipeline.card.facts import Facts, host_of
from pipeline.card.summary import top_domains
from pipeline.outdir import JSON_MARKER_KEY, SUMMARY_JSON_NAME, SUMMARY_MARKER, SUMMARY_MD_NAME
from tests.pipeline.test_card_facts import lowercase_dataset  # noqa: F401 - a fixture
from tests.pipeline.test_croissant import CONSENT, FINISHED, STARTED, consent_dataset

PROVIDER = "**[TO BE COMPLETED BY THE PROVIDER]**"
# docs/consent.md's table: protocol -> the (stage, reason) pairs it removes rows with.
PROTOCOL_REASONS = {
    "robots_txt": {("optout", "robotstxt_disallowed"), ("optout", "robotstxt_ai_optout"), ("optout", "robotstxt_unavailable")},
    "tdmrep": {("optout", "tdmrep_reserved"), ("optout", "tdmrep_unavailable"), ("download", "tdm_reservation")},
    "x_robots_tag": {("download", f"robots_{d}") for d in ("noai", "noimageai", "noindex", "noimageindex")},
    "optout_list": {("optout", "optout_list")},
    "c2pa": {("decode", "c2pa_not_allowed")},
}


@pytest.fixture
def dataset(tmp_path):
    out = consent_dataset(tmp_path / "ds")
    write_card(str(out))
    return out


def _summary(out) -> dict:
    return json.loads((out / SUMMARY_JSON_NAME).read_text())


def _crawl(summary: dict) -> dict:
    return summary["2_list_of_data_sources"]["2.3_data_crawled_and_scraped_from_online_sources"]


def _recount_bytes_per_host(out) -> tuple[collections.Counter, int]:
    """Bytes downloaded per host of the URL column, from the meta parquet files alone."""
    per_host, missing = collections.Counter(), 0
    for path in sorted((out / "meta").glob("*.parquet")):
        table = pq.read_table(path, columns=["URL", "source_bytes"])
        for url, n in zip(table["URL"].to_pylist(), table["source_bytes"].to_pylist()):
            if n is None:
                missing += 1
                continue
            parts = urlsplit(url)
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            if parts.port not in (None, 80, 443):
                host = f"{host}:{parts.port}"
            per_host[host] += n
    return per_host, missing


def test_top_domains_are_the_top_tenth_by_bytes_recounted_from_the_meta_parquet(dataset):
    per_host, missing = _recount_bytes_per_host(dataset)
    total = sum(per_host.values())
    ranked = sorted(per_host.items(), key=lambda kv: (-kv[1], kv[0]))
    n_top = -(-len(per_host) // 10)  # ceil(10% of the domains)
    top = _crawl(_summary(dataset))["top_domains_by_bytes"]
    assert top["recorded"] and top["percent_of_domains"] == 10
    assert (top["domains_total"], top["domains_listed"], top["bytes_total"], top["rows_without_bytes"]) == (len(per_host), n_top, total, missing)
    assert [(d["domain"], d["bytes"], d["share"]) for d in top["domains"]] == [(h, b, b / total) for h, b in ranked[:n_top]]
    # The hand-made dataset: 12 hosts (port 8080 kept, :443 and :80 dropped, www. not folded, IPv6 bracketed), one row without bytes.
    assert set(per_host) >= {"b.example:8080", "www.a.example", "a.example", "c.example", "d.example", "e.example", "[2001:db8::1]:8443"}
    assert [(d["domain"], d["bytes"]) for d in top["domains"]] == [("b.example:8080", 13100), ("www.a.example", 5000)]
    assert (len(per_host), missing, total) == (12, 1, 27505)
    # The Markdown table carries the same rows.
    md = (dataset / SUMMARY_MD_NAME).read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert rows == [f"| {i} | {h} | {b:,} | {100 * b / total:.2f}% |" for i, (h, b) in enumerate(ranked[:n_top], 1)]
    assert f"{n_top} domain(s) holding {sum(b for _, b in ranked[:n_top]):,} of {total:,} bytes" in md
    assert "1 kept rows have no source_bytes value and are not counted" in md


def test_rows_removed_per_opt_out_protocol_and_blocklist_recount_from_the_rejects(dataset):
    rejects = [r for p in sorted((dataset / "rejects").glob("*.parquet"))
               for r in pq.read_table(p, columns=["stage", "reason", "detail"]).to_pylist()]
    by_pair = collections.Counter((r["stage"], r["reason"]) for r in rejects)
    section = _summary(dataset)["3_data_processing_aspects"]
    protocols = {p["protocol"]: p for p in section["3.1_respect_of_reservation_of_rights"]["protocols"]}
    assert list(protocols) == list(PROTOCOL_REASONS)
    for name, pairs in PROTOCOL_REASONS.items():
        assert protocols[name]["rows_removed"] == sum(by_pair[p] for p in pairs), name
        assert protocols[name]["enabled"] is True
    assert {k: v for k, v in protocols["robots_txt"].items() if k.startswith("origins") or k.startswith("on_")} == {
        "origins_consulted": 14, "origins_unavailable": 2, "on_unavailable": "disallow",
        "on_unavailable_means": "treated as a complete disallow (RFC 9309 §2.3.1.4): every URL of the origin removed"}
    assert protocols["tdmrep"]["origins_unavailable"] == 1 and protocols["tdmrep"]["on_unavailable"] == "reserve"
    # Blocklists: per list, from the detail's "NAME: " prefix; all together, from the reasons.
    per_list = collections.Counter((r["detail"].split(": ", 1)[0], r["reason"]) for r in rejects if r["reason"].startswith("blocklist_"))
    bl = section["3.2_removal_of_illegal_content"]["blocklists"]
    assert bl["rows_removed"] == sum(per_list.values()) == 4 and bl["rows_not_attributed_to_a_list"] == 0
    for entry, want in zip(bl["lists"], CONSENT["blocklists"]):
        assert (entry["name"], entry["sha256"], entry["entries"]) == (want["name"], want["sha256"], want["entries"])
        assert entry["rows_removed_by_reason"] == {reason: n for (name, reason), n in sorted(per_list.items()) if name == want["name"]}
    md = (dataset / SUMMARY_MD_NAME).read_text()
    assert "| robots.txt (RFC 9309) | yes | 3 | 14 | 2 |" in md
    assert "| child-safety | `1111111111111111` | image_sha256 1, pdq 3, url_sha256 2 | blocklist_image_sha256 1, blocklist_pdq 1, blocklist_url_sha256 1 |" in md


def test_safety_filters_crawler_and_period_come_from_stats_json(dataset):
    s = _summary(dataset)
    stats = json.loads((dataset / "stats.json").read_text())
    crawl = _crawl(s)
    assert crawl["crawler"] == {"name": "kiln", "version": "0.1.0", "user_agent": CONSENT["user_agent"], "user_agent_token": "kiln"}
    period = crawl["collection_period"]
    assert (period["start"], period["end"]) == (STARTED, FINISHED) == (stats["started_at"], stats["finished_at"])
    assert "started_at / finished_at" in period["basis"] and "does not record when each image was fetched" in period["basis"]
    filters = {f["stage"]: f for f in s["3_data_processing_aspects"]["3.2_removal_of_illegal_content"]["safety_filters"]}
    assert set(filters) == {"toxicity", "nsfw"}
    assert (filters["toxicity"]["threshold_flag"], filters["toxicity"]["threshold"], filters["toxicity"]["rows_removed"]) == ("--max-toxicity", 0.5, 1)
    assert (filters["nsfw"]["threshold"], filters["nsfw"]["rows_removed"], filters["nsfw"]["mode"]) == (0.5, 1, "filter")
    assert filters["toxicity"]["model_sha256"] == "7" * 64
    quality = s["3_data_processing_aspects"]["3.3_other_information"]["quality_filters"]
    assert [(f["stage"], f["threshold"], f["rows_removed"]) for f in quality] == [("clip", 0.28, 1)]
    md = (dataset / SUMMARY_MD_NAME).read_text()
    assert f"- Period of data collection: {STARTED} to {FINISHED} — the run's start and end" in md
    assert "- Caption toxicity (Detoxify): mode `filter`, threshold `--max-toxicity 0.5` (reject above)" in md


def test_what_kiln_cannot_know_is_marked_for_the_provider(dataset):
    s = _summary(dataset)
    assert next(iter(s)) == JSON_MARKER_KEY
    marked = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("provider_must_complete") is True:
                marked.append(path)
            for k, v in node.items():
                walk(v, f"{path}/{k}")
    walk(s, "")
    for key in ("1.1_provider_identification/provider_name_and_contact", "1.2_model_identification/versioned_model_names",
                "1.2_model_identification/date_of_placement_on_the_union_market", "2.4_user_data", "2.5_synthetic_data",
                "2.6_other_sources", "commercially_licensed_by_rightsholders", "code_of_practice_signatory"):
        assert any(p.endswith(key) for p in marked), key
    md = (dataset / SUMMARY_MD_NAME).read_text()
    assert md.startswith(SUMMARY_MARKER + "\n")
    for heading in ("## 1. General information", "### 1.1 Provider identification", "### 1.2 Model identification",
                    "## 2. List of data sources", "### 2.3 Data crawled and scraped from online sources", "### 2.5 Synthetic data",
                    "## 3. Data processing aspects", "### 3.1 Respect of reservation of rights", "### 3.2 Removal of illegal content"):
        assert heading in md, heading
    assert md.count(PROVIDER) >= 15
    assert "- Provider name and contact details: " + PROVIDER in md and "### 2.4 User data\n\n" + PROVIDER in md


def test_a_run_before_source_bytes_and_consent_says_what_is_not_recorded(lowercase_dataset):  # noqa: F811
    write_card(str(lowercase_dataset))
    s = _summary(lowercase_dataset)
    top = _crawl(s)["top_domains_by_bytes"]
    assert top["recorded"] is False and top["rows_without_bytes"] == 4 and top["why"].startswith("not recorded")
    r = s["3_data_processing_aspects"]["3.1_respect_of_reservation_of_rights"]
    assert r["protocols"] is None and "no consent record" in r["not_recorded_why"]
    assert s["3_data_processing_aspects"]["3.2_removal_of_illegal_content"]["blocklists"] is None
    md = (lowercase_dataset / SUMMARY_MD_NAME).read_text()
    assert "Bytes per domain: not recorded" in md
    # The card falls back to the X-Robots-Tag table of its time.
    card = (lowercase_dataset / "README.md").read_text()
    assert "It does not read robots.txt, TDM reservation protocols" in card and "### Blocklists" not in card


def test_the_summary_is_deterministic_and_never_replaces_a_users_file(dataset):
    first = {n: (dataset / n).read_bytes() for n in (SUMMARY_JSON_NAME, SUMMARY_MD_NAME)}
    write_card(str(dataset))  # kiln's own files: replaced, byte for byte the same
    assert {n: (dataset / n).read_bytes() for n in first} == first
    for name, mine in ((SUMMARY_MD_NAME, "# My summary\n"), (SUMMARY_JSON_NAME, '{"mine": true, "kiln:generated": "x"}\n')):
        (dataset / name).write_text(mine)
        with pytest.raises(CardError, match=rf"{name} is not a file kiln wrote .*move it away and re-run$"):
            write_card(str(dataset))
        assert (dataset / name).read_text() == mine
        (dataset / name).write_bytes(first[name])


def test_host_of_and_the_top_share_rounding():
    assert host_of("http://B.Example:8080/x") == "b.example:8080" and host_of("https://b.example:443/x") == "b.example"
    assert host_of("http://[2001:DB8::1]:80/x") == "[2001:db8::1]" and host_of("http://www.a.example/") == "www.a.example"
    assert host_of(None) == host_of("not a url") == host_of("http://a.example:99999/x") == "(no host)"

    def listed(counts: dict) -> list[str]:
        facts = Facts("/d", {}, {})
        facts.source_bytes_by_host.update(counts)
        facts.source_bytes_rows = len(counts)
        return [d["domain"] for d in top_domains(facts)["domains"]]
    assert listed({f"h{i}.example": 10 + i for i in range(10)}) == ["h9.example"]  # 10 domains: 1
    assert listed({f"h{i}.example": 10 + i for i in range(11)}) == ["h10.example", "h9.example"]  # 11: ceil(1.1) = 2
    assert listed({f"h{i}.example": 10 + i for i in range(30)}) == ["h29.example", "h28.example", "h27.example"]  # 30: 3, not 4
    assert listed({"b.example": 5, "a.example": 5, "c.example": 1}) == ["a.example"]  # a tie: by name
