"""croissant.json (pipeline/card/croissant.py): mlcroissant validates it and reads the records through it.

`consent_dataset` writes a small dataset by hand, file by file as SHARDS.md lays it out (two shards,
every meta column of pipeline.records, rejects of the blocklist and optout stages and of every
opt-out protocol, a consent record in stats.json); tests/pipeline/test_training_summary.py uses it
too. The slow test at the end runs the real `kiln prepare` on the synthetic web instead.
"""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.accounting import Ledger
from pipeline.card import CardError, write_card
from pipeline.outdir import CROISSANT_NAME, JSON_MARKER_KEY
from pipeline.records import META_FIELDS, rejects_schema
from pipeline.write import META_KEY, meta_schema
from tests.pipeline.test_card_facts import _jpeg, lowercase_dataset  # noqa: F401 - a fixture

INPUT_SCHEMA = pa.schema([("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string()), ("LICENSE", pa.string())])
# (url, source_bytes) of the kept rows, per shard: hosts with and without ports, www., IPv6, upper case.
KEPT = {
    0: [("https://www.a.example/1.jpg", 5000), ("http://a.example/2.png", 700), ("http://b.example:8080/3.jpg", 9000),
        ("https://c.example:443/4.jpg", 1200), ("http://d.example:80/5.jpg", 300), ("http://E.Example/6.jpg", 450)],
    1: [("http://[2001:db8::1]:8443/7.jpg", 2500), ("http://b.example:8080/8.jpg", 4100), ("https://f.example/9.webp", 800),
        ("https://g.example/10.jpg", 60), ("https://h.example/11.jpg", 75), ("https://i.example/12.jpg", None),
        ("https://j.example/13.jpg", 3300), ("https://k.example/14.jpg", 20)],
}
# (stage, reason, detail) of the rejected rows, per shard.
REJECTS = {
    0: [("prefilter", "duplicate", "same uid as kept"), ("blocklist", "blocklist_url_sha256", "child-safety: url_sha256 " + "ab" * 32),
        ("blocklist", "blocklist_domain", "my list: domain bad.example"), ("optout", "robotstxt_disallowed", "Disallow: /"),
        ("optout", "robotstxt_unavailable", "robots.txt: 503"), ("optout", "tdmrep_reserved", "location /*"),
        ("toxicity", "toxic", "0.93"), ("download", "robots_noai", "X-Robots-Tag: noai"), ("download", "http_404", "404 Not Found")],
    1: [("optout", "optout_list", "optout.txt: x.example"), ("optout", "robotstxt_ai_optout", "GPTBot"),
        ("download", "tdm_reservation", "tdm-reservation: 1"), ("decode", "blocklist_pdq", "child-safety: pdq " + "0f" * 32 + " within 3 bits of x"),
        ("decode", "c2pa_not_allowed", "c2pa.ai_training notAllowed"), ("decode", "blocklist_image_sha256", "child-safety: image_sha256 " + "cd" * 32),
        ("clip", "clip_similarity_low", "0.1"), ("nsfw", "punsafe_high", "0.9")],
}
STAGE_MODES = {"prefilter": "filter", "blocklist": "filter", "optout": "filter", "toxicity": "filter", "download": "filter",
               "decode": "filter", "resize": "filter", "clip": "filter", "nsfw": "filter", "t5": "off"}
CONSENT = {
    "user_agent": "kiln/0.1.0 (+https://github.com/kiln-data/kiln; compatible; kiln)", "user_agent_token": "kiln",
    "protocols": {
        "robots_txt": {"enabled": True, "ai_tokens": ["CCBot", "GPTBot"], "ttl_s": 86400.0, "origins": 14, "origins_no_rules": 3,
                       "origins_unavailable": 2, "on_unavailable": "disallow"},
        "tdmrep": {"enabled": True, "origins": 14, "origins_with_file": 1, "origins_unavailable": 1, "on_unavailable": "reserve", "header": True},
        "x_robots_tag": {"enabled": True, "directives": ["noai", "noimageai", "noindex", "noimageindex"]},
        "optout_list": {"enabled": True, "files": [{"path": "/lists/optout.txt", "sha256": "9" * 64, "domains": 2, "prefixes": 1}]},
        "c2pa": {"enabled": True, "reader": "c2pa-python 0.10.0"},
    },
    "blocklists": [
        {"name": "child-safety", "path": "/lists/cs.txt", "sha256": "1" * 64, "entries": {"url_sha256": 2, "pdq": 3, "image_sha256": 1},
         "pdq_threshold": 31},
        {"name": "my list", "path": "/lists/mine.txt", "sha256": "2" * 64, "entries": {"domain": 1}, "pdq_threshold": 31},
    ],
}
STARTED, FINISHED = "2026-11-30T10:00:00+00:00", "2026-11-30T11:30:00+00:00"


def _uid(shard: int, i: int, tag: str = "k") -> str:
    return hashlib.sha256(f"{tag}{shard}:{i}".encode()).hexdigest()[:32]


def _tar(uids) -> bytes:
    buf = io.BytesIO()
    jpeg = _jpeg((40, 120, 200))
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for uid in sorted(uids):
            for ext, data in ((".jpg", jpeg), (".txt", b"caption")):
                info = tarfile.TarInfo(uid + ext)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def consent_dataset(root: Path, *, consent: bool = True, resumed: int = 0) -> Path:
    """A two-shard dataset as `kiln prepare` lays it out (SHARDS.md), with stats.json and manifest.json."""
    for sub in ("shards", "meta", "rejects"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    schema = meta_schema(INPUT_SCHEMA)
    entries, n = [], 0
    for shard in (0, 1):
        name = f"{shard:06d}"
        rows = []
        for i, (url, nbytes) in enumerate(KEPT[shard]):
            n += 1
            row = {f.name: None for f in schema}
            row.update({"SAMPLE_ID": n, "URL": url, "TEXT": f"caption {n}", "LICENSE": "?", "uid": _uid(shard, i),
                        "stored_width": 64, "stored_height": 64, "original_width": 100 + n, "original_height": 90,
                        "source_format": "jpeg", "image_bytes": 1000 + n, "image_sha256": "e" * 64, "source_bytes": nbytes,
                        "pdq_hash": "5" * 64, "pdq_quality": 80, "final_url": url, "http_status": 200,
                        "content_type": "image/jpeg", "toxicity": 0.01, "toxicity_label": "toxicity",
                        "clip_similarity": 0.31, "punsafe": 0.02})
            rows.append(row)
        rows.sort(key=lambda r: r["uid"])
        tar = _tar(r["uid"] for r in rows)
        (root / "shards" / f"{name}.tar").write_bytes(tar)
        rej_rows = [{"uid": _uid(shard, i, "r"), "SAMPLE_ID": 1000 + i, "url": f"http://r{i}.example/x.jpg", "stage": st,
                     "reason": reason, "detail": detail, "shard": shard, "toxicity": None, "clip_similarity": None, "punsafe": None}
                    for i, (st, reason, detail) in enumerate(REJECTS[shard])]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rej_rows, schema=rejects_schema()), buf, compression="zstd")
        (root / "rejects" / f"{name}.parquet").write_bytes(buf.getvalue())
        footer = {"shard": shard, "num_shards": 2, "config_fingerprint": "fp", "samples": len(rows)}
        table = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata({META_KEY: json.dumps(footer).encode()})
        pq.write_table(table, root / "meta" / f"{name}.parquet", compression="zstd")
        entries.append({"shard": name, "tar": f"shards/{name}.tar", "samples": len(rows), "bytes": len(tar),
                        "sha256": hashlib.sha256(tar).hexdigest(), "meta": f"meta/{name}.parquet", "rejects": f"rejects/{name}.parquet",
                        "rejected": len(rej_rows), "rejects_sha256": hashlib.sha256(buf.getvalue()).hexdigest()})
    kept = sum(e["samples"] for e in entries)
    rejected = sum(e["rejected"] for e in entries)
    manifest = {"format": "kiln-shards/1", "num_shards": 2, "samples": kept, "shards": entries}
    funnel = Ledger.from_files(str(root)).funnel(STAGE_MODES, kept + rejected)
    stats = {
        "kiln_version": "0.1.0", "git_commit": "c0ffee", "config_fingerprint": "fp", "started_at": STARTED, "finished_at": FINISHED,
        "duration_s": 5400.0, "input": {"pattern": "/data/in.parquet", "files": [{"path": "/data/in.parquet", "rows": kept + rejected, "bytes": 4096}],
                                        "rows": kept + rejected},
        "flags": {"url_col": "URL", "caption_col": "TEXT", "id_col": "SAMPLE_ID", "max_bytes": 33554432, "max_redirects": 5,
                  "download_timeout": 20.0, "retries": 2, "per_host_concurrency": 16, "user_agent_token": "kiln",
                  "disallowed_directives": ["noai", "noimageai", "noindex", "noimageindex"], "allow_hosts": "",
                  "max_toxicity": 0.5, "toxicity_model": "original", "toxicity_labels": [], "min_clip_similarity": 0.28,
                  "clip_model": "ViT-B-32:openai", "max_punsafe": 0.5, "nsfw_head": "nsfw-b32", "image_size": 1024,
                  "resize_mode": "center_crop", "encode_format": "jpg", "t5_max_length": 128},
        "command": "kiln prepare --input /data/in.parquet --output /out", "stage_modes": STAGE_MODES,
        "models": {"toxicity": {"spec": "original", "sha256": "7" * 64}, "clip": {"spec": "ViT-B-32:openai", "sha256": "8" * 64}},
        "kept": kept, "rejected": rejected, "num_shards": 2, "accounting": {"ok": True}, "funnel": funnel,
        "this_run": {"shards_skipped": resumed, "shards_written": 2 - resumed},
    }
    if consent:
        stats["consent"] = CONSENT
    (root / "stats.json").write_text(json.dumps(stats, indent=2))
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


@pytest.fixture
def dataset(tmp_path):
    out = consent_dataset(tmp_path / "ds")
    write_card(str(out))
    return out


def _kept_rows(out: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "meta").glob("*.parquet"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mlcroissant_dataset(path: Path):
    mlc = pytest.importorskip("mlcroissant")
    ds = mlc.Dataset(jsonld=str(path))  # raises mlcroissant's ValidationError on any error
    assert not ds.metadata.ctx.issues.errors
    return ds


def test_mlcroissant_validates_and_reads_every_kept_and_rejected_row(dataset):
    ds = _mlcroissant_dataset(dataset / CROISSANT_NAME)
    meta = [r for r in ds.records(record_set="meta")]
    assert len(meta) == _kept_rows(dataset) == 14
    uids = sorted(u for p in sorted((dataset / "meta").glob("*.parquet")) for u in pq.read_table(p, columns=["uid"])["uid"].to_pylist())
    assert sorted(r["meta/uid"].decode() for r in meta) == uids
    by_uid = {r["meta/uid"].decode(): r for r in meta}
    row = pq.read_table(dataset / "meta/000001.parquet").to_pylist()[0]
    got = by_uid[row["uid"]]
    assert got["meta/source_bytes"] == row["source_bytes"] and got["meta/URL"].decode() == row["URL"]
    assert got["meta/stored_width"] == 64 and got["meta/t5"] is None
    rejects = [r for r in ds.records(record_set="rejects")]
    stats = json.loads((dataset / "stats.json").read_text())
    assert len(rejects) == stats["rejected"] == 17
    assert sorted(r["rejects/reason"].decode() for r in rejects) == sorted(x[1] for rows in REJECTS.values() for x in rows)


def test_every_meta_and_rejects_column_is_a_field_typed_by_its_arrow_type(dataset):
    doc = json.loads((dataset / CROISSANT_NAME).read_text())
    sets = {rs["@id"]: rs for rs in doc["recordSet"]}
    meta_fields = {f["name"]: f for f in sets["meta"]["field"]}
    schema = pq.read_schema(dataset / "meta/000000.parquet")
    assert list(meta_fields) == schema.names  # the input's columns, then kiln's, in the file's order
    assert {f.name for f in META_FIELDS} <= set(meta_fields)
    want = {"int64": "sc:Integer", "int32": "sc:Integer", "float": "sc:Float", "double": "sc:Float", "bool": "sc:Boolean",
            "string": "sc:Text", "binary": "sc:Text"}
    for f in schema:
        assert meta_fields[f.name]["dataType"] == want[str(f.type)], f.name
        assert meta_fields[f.name]["source"] == {"fileSet": {"@id": "meta-parquet-files"}, "extract": {"column": f.name}}
        assert f"Arrow type {f.type}" in meta_fields[f.name]["description"]
    assert "bytes downloaded" in meta_fields["source_bytes"]["description"]
    assert sets["meta"]["key"] == {"@id": "meta/uid"}
    assert [f["name"] for f in sets["rejects"]["field"]] == pq.read_schema(dataset / "rejects/000000.parquet").names


def test_files_are_described_with_their_format_and_sha256(dataset):
    doc = json.loads((dataset / CROISSANT_NAME).read_text())
    assert next(iter(doc)) == JSON_MARKER_KEY  # kiln's own file (pipeline.outdir)
    assert doc["conformsTo"] == ["http://mlcommons.org/croissant/1.0", "http://mlcommons.org/croissant/RAI/1.0"]
    dist = {d["@id"]: d for d in doc["distribution"]}
    for name in ("manifest.json", "stats.json"):
        assert dist[name]["sha256"] == _sha256(dataset / name) and dist[name]["encodingFormat"] == "application/json"
    assert {(d["includes"], d["encodingFormat"]) for d in dist.values() if d["@type"] == "cr:FileSet"} == {
        ("shards/*.tar", "application/x-tar"), ("meta/*.parquet", "application/x-parquet"), ("rejects/*.parquet", "application/x-parquet")}
    for shard in json.loads((dataset / "manifest.json").read_text())["shards"]:
        assert dist[shard["tar"]]["sha256"] == shard["sha256"] == _sha256(dataset / shard["tar"])
        assert dist[shard["rejects"]]["sha256"] == _sha256(dataset / shard["rejects"])
        assert dist[shard["tar"]]["contentUrl"] == shard["tar"]


def test_many_shards_are_described_by_their_file_sets_and_manifest_json(tmp_path, monkeypatch):
    from pipeline.card import croissant

    monkeypatch.setattr(croissant, "PER_FILE_LIMIT", 1)  # this dataset has 2 shards
    out = consent_dataset(tmp_path / "ds")
    write_card(str(out))
    doc = json.loads((out / CROISSANT_NAME).read_text())
    assert sorted(d["@id"] for d in doc["distribution"]) == [
        "manifest.json", "meta-parquet-files", "rejects-parquet-files", "shard-tar-files", "stats.json"]
    assert sum(1 for _ in _mlcroissant_dataset(out / CROISSANT_NAME).records(record_set="meta")) == 14


def test_responsible_ai_fields_come_from_the_run(dataset):
    doc = json.loads((dataset / CROISSANT_NAME).read_text())
    assert doc["rai:dataCollectionTimeframe"] == doc["rai:dataCollectionTimeFrame"] == [STARTED, FINISHED]
    assert doc["rai:dataCollectionType"] == ["Web Scraping"]
    text = doc["rai:dataCollection"]
    assert CONSENT["user_agent"] in text
    # Rows removed per protocol, as the rejects say: robots.txt 3 (disallowed, ai_optout, unavailable) ...
    for fragment in ("robots.txt (RFC 9309): 3 rows removed, 14 origins consulted, 2 unavailable",
                     "TDMRep (W3C: tdmrep.json and the tdm-reservation header): 2 rows removed",
                     "X-Robots-Tag response header: 1 rows removed", "offline opt-out list (--optout-list): 1 rows removed",
                     "C2PA training-and-mining assertion in the image: 1 rows removed"):
        assert fragment in text, fragment
    assert any("child-safety" in p and "3 rows removed" in p for p in doc["rai:dataPreprocessingProtocol"])
    assert any(p.startswith("blocklist (filter): 30 in, 28 out, 2 rejected") for p in doc["rai:dataPreprocessingProtocol"])
    assert any("CLIP filtering is value-laden" in b for b in doc["rai:dataBiases"])
    assert all("**" not in x for x in doc["rai:dataBiases"] + doc["rai:dataLimitations"])
    assert any("identifiable people" in x for x in doc["rai:personalSensitiveInformation"])
    assert any(u.startswith("Intended:") for u in doc["rai:dataUseCases"])


def test_a_resumed_run_states_no_collection_start(tmp_path):
    out = consent_dataset(tmp_path / "ds", resumed=1)
    write_card(str(out))
    doc = json.loads((out / CROISSANT_NAME).read_text())
    assert "rai:dataCollectionTimeframe" not in doc and "kept from an earlier run" in doc["rai:dataCollection"]
    _mlcroissant_dataset(out / CROISSANT_NAME)


def test_a_run_before_source_bytes_and_consent_still_gets_a_valid_croissant(lowercase_dataset):  # noqa: F811
    write_card(str(lowercase_dataset))
    ds = _mlcroissant_dataset(lowercase_dataset / CROISSANT_NAME)
    assert sum(1 for _ in ds.records(record_set="meta")) == 4
    doc = json.loads((lowercase_dataset / CROISSANT_NAME).read_text())
    assert "predates kiln's robots.txt" in doc["rai:dataCollection"]
    assert "url" in [f["name"] for f in doc["recordSet"][0]["field"]]  # this run's --url-col


def test_a_users_croissant_json_is_never_replaced(tmp_path):
    out = consent_dataset(tmp_path / "ds")
    (out / CROISSANT_NAME).write_text('{"@context": {}, "name": "mine"}\n')
    with pytest.raises(CardError, match=r"croissant.json is not a file kiln wrote .*move it away and re-run$"):
        write_card(str(out))
    assert (out / CROISSANT_NAME).read_text() == '{"@context": {}, "name": "mine"}\n'
    assert not (out / "README.md").exists() and not (out / "training_summary.md").exists()


@pytest.mark.slow
def test_kiln_prepare_writes_a_croissant_that_mlcroissant_reads(tmp_path):
    """The real pipeline over the synthetic web (no models): prepare's own write_card writes the documents."""
    from pipeline.prepare import run
    from pipeline.testbed import prepare_config
    from pipeline.testbed.server import SynthServer
    from pipeline.testbed.synth import synthesize

    web = synthesize(tmp_path / "web", rows=120, seed=11, failure_rate=0.2)
    out = tmp_path / "dataset"
    with SynthServer(web) as s:
        run(prepare_config(str(web.metadata_path), str(out), s.allow_hosts, "--quiet", "--image-size", "64",
                           "--download-timeout", "3", "--samples-per-shard", "40", "--toxicity", "off", "--clip", "off",
                           "--nsfw", "off", "--t5", "off", "--no-c2pa"), [])
    for name in ("README.md", CROISSANT_NAME, "training_summary.md", "training_summary.json"):
        assert (out / name).stat().st_size > 0, name
    ds = _mlcroissant_dataset(out / CROISSANT_NAME)
    kept = json.loads((out / "stats.json").read_text())["kept"]
    assert sum(1 for _ in ds.records(record_set="meta")) == kept == _kept_rows(out) > 0
    summary = json.loads((out / "training_summary.json").read_text())
    top = summary["2_list_of_data_sources"]["2.3_data_crawled_and_scraped_from_online_sources"]["top_domains_by_bytes"]
    assert top["recorded"] and top["bytes_total"] == sum(
        b for p in (out / "meta").glob("*.parquet") for b in pq.read_table(p, columns=["source_bytes"])["source_bytes"].to_pylist())
