"""croissant.json: the dataset as Croissant 1.0 JSON-LD, with the Responsible-AI (RAI 1.0) fields.

Croissant (MLCommons, http://mlcommons.org/croissant/1.0) describes a dataset's files and the
records in them so that a loader (mlcroissant, TFDS, Hugging Face, Kaggle, OpenML) can read it
without knowing the format; its RAI vocabulary (http://mlcommons.org/croissant/RAI/) adds how the
data was collected, its biases, limitations, personal information and uses.

- distribution: manifest.json and stats.json as FileObjects with their sha256; the tars, meta
  parquet and rejects parquet files as FileSets (`includes` globs, relative to this file's folder);
  and, up to PER_FILE_LIMIT shards, every tar and rejects file as a FileObject with the sha256
  manifest.json records for it (above that, manifest.json -- its own sha256 here -- lists them);
- recordSet "meta": every column of the meta parquet files (the input's own columns, then kiln's,
  SHARDS.md's table), keyed by uid; recordSet "rejects": every column of the rejects files. Each
  field's dataType follows its Arrow type; its description is pipeline.records' doc for it;
- rai:*: built from stats.json and the recount (pipeline.card.facts), the same facts as the card.

The tests validate the file with mlcroissant and read the meta record set through it.
"""

from __future__ import annotations

import json

import hashlib
import re
from urllib.parse import quote

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.card.facts import Facts, pct
from pipeline.card.hub import licence_metadata
from pipeline.card.summary import blocklist_entries, collection_period, model_label, opt_out_protocols, safety_filters
from pipeline.records import FIELDS_BY_NAME, META, rejects_schema

CROISSANT_1_0 = "http://mlcommons.org/croissant/1.0"
RAI_1_0 = "http://mlcommons.org/croissant/RAI/1.0"
# The Croissant 1.0 specification's recommended JSON-LD context (its Appendix 1), with the two terms
# mlcroissant's 1.0 context adds (equivalentProperty, samplingRate): mlcroissant warns on any other.
CONTEXT = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "sc": "https://schema.org/",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "dct": "http://purl.org/dc/terms/",
    "citeAs": "cr:citeAs",
    "equivalentProperty": "cr:equivalentProperty",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}
PARQUET, TAR, JSON = "application/x-parquet", "application/x-tar", "application/json"
PER_FILE_LIMIT = 1000  # shards up to which each tar/rejects file is also a FileObject with its sha256
META_SET, REJECTS_SET, TAR_SET = "meta-parquet-files", "rejects-parquet-files", "shard-tar-files"


def data_type(arrow_type) -> str:
    """A Croissant 1.0 atomic dataType for an Arrow type (the exact Arrow type goes in the field's
    description): integers sc:Integer, floats sc:Float, booleans sc:Boolean, dates sc:Date /
    sc:DateTime, everything else -- strings, and binary cells read as bytes -- sc:Text."""
    import pyarrow as pa

    t = arrow_type
    if pa.types.is_boolean(t):
        return "sc:Boolean"
    if pa.types.is_integer(t):
        return "sc:Integer"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "sc:Float"
    if pa.types.is_date(t):
        return "sc:Date"
    if pa.types.is_timestamp(t):
        return "sc:DateTime"
    return "sc:Text"


def _field_id(record_set: str, column: str) -> str:
    return f"{record_set}/{quote(column, safe='')}"


def _fields(record_set: str, file_set: str, schema, describe) -> list[dict]:
    out = []
    for f in schema:
        out.append({
            "@type": "cr:Field",
            "@id": _field_id(record_set, f.name),
            "name": f.name,
            "description": f"{describe(f.name)} (Arrow type {f.type}{'' if f.nullable else ', never null'})",
            "dataType": data_type(f.type),
            "source": {"fileSet": {"@id": file_set}, "extract": {"column": f.name}},
        })
    return out


def meta_description(facts: Facts):
    cols = facts.columns

    def describe(name: str) -> str:
        rf = FIELDS_BY_NAME.get(name)
        if rf is not None and rf.kind == META:
            return rf.doc
        role = {cols.get("url"): "the image URL (--url-col)", cols.get("caption"): "the caption (--caption-col)",
                cols.get("id"): "the input row id (--id-col)"}.get(name)
        return f"input column, as in the input metadata: {role}" if role else "input column, as in the input metadata"
    return describe


REJECT_DOCS = {
    "uid": "key of the rejected row (a duplicate shares its kept twin's uid)",
    "SAMPLE_ID": "the input row's --id-col value",
    "url": "the input row's --url-col value",
    "stage": "the stage that rejected the row (pipeline.records.STAGES)",
    "reason": "why, one of the closed vocabulary of SHARDS.md",
    "detail": "human-readable specifics (status line, refused address, list and entry), at most 1000 characters",
    "shard": "the shard number",
    "toxicity": "caption toxicity the row had when it was rejected (null for stages it never reached)",
    "clip_similarity": "CLIP similarity the row had when it was rejected (null for stages it never reached)",
    "punsafe": "punsafe the row had when it was rejected (null for stages it never reached)",
}


def _sha256(path: str) -> str | None:
    if not FileSystems.exists(path):
        return None
    h = hashlib.sha256()
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(text: str) -> str:
    """Card Markdown (bold, code) as plain text."""
    return re.sub(r"\*\*|`", "", text)


def build_croissant(facts: Facts, pretty_name: str, language: list[str] | None = None,
                    marker: tuple[str, str] | None = None) -> dict:
    """croissant.json's object. `marker`: (key, text) of pipeline.outdir's JSON marker, first."""
    from pipeline.card.render import limitation_items, uses_items

    st, base = facts.stats, facts.dataset_dir
    distribution = []
    for name in ("manifest.json", "stats.json"):
        digest = _sha256(f"{base}/{name}")
        if digest:
            distribution.append({"@type": "cr:FileObject", "@id": name, "name": name, "contentUrl": name,
                                 "encodingFormat": JSON, "sha256": digest,
                                 "description": {"manifest.json": "every shard's files, sample count, bytes and sha256 (SHARDS.md)",
                                                 "stats.json": "the run: funnel, accounting checks, flags, models, consent record"}[name]})
    distribution += [
        {"@type": "cr:FileSet", "@id": TAR_SET, "name": "shards", "encodingFormat": TAR, "includes": "shards/*.tar",
         "description": ("webdataset tar shards: KEY.jpg (or .png/.webp), KEY.txt, KEY.json and the T5 member per kept "
                         "sample, sorted by uid; each tar's sha256 is in manifest.json")},
        {"@type": "cr:FileSet", "@id": META_SET, "name": "meta", "encodingFormat": PARQUET, "includes": "meta/*.parquet",
         "description": "one row per kept sample of each shard, in the tar's order (recordSet meta)"},
        {"@type": "cr:FileSet", "@id": REJECTS_SET, "name": "rejects", "encodingFormat": PARQUET,
         "includes": "rejects/*.parquet", "description": "one row per rejected input row, with its stage and reason (recordSet rejects)"},
    ]
    if len(facts.shards) <= PER_FILE_LIMIT:
        for s in facts.shards:
            for path, digest, fmt in ((s.get("tar"), s.get("sha256"), TAR), (s.get("rejects"), s.get("rejects_sha256"), PARQUET)):
                if path and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest):
                    distribution.append({"@type": "cr:FileObject", "@id": path, "name": path, "contentUrl": path,
                                         "encodingFormat": fmt, "sha256": digest})

    meta_schema = facts.meta_schema
    if meta_schema is None:  # no shards: kiln's own columns
        import pyarrow as pa

        meta_schema = pa.schema([pa.field(f.name, f.dtype) for f in FIELDS_BY_NAME.values() if f.kind == META])
    rej_schema = facts.rejects_schema if facts.rejects_schema is not None else rejects_schema()
    record_sets = [
        {"@type": "cr:RecordSet", "@id": "meta", "name": "meta",
         "description": f"the kept samples: {facts.kept:,} rows, one per image-caption pair (SHARDS.md's meta table)",
         "key": {"@id": _field_id("meta", "uid")},
         "field": _fields("meta", META_SET, meta_schema, meta_description(facts))},
        {"@type": "cr:RecordSet", "@id": "rejects", "name": "rejects",
         "description": f"the rejected input rows: {facts.rejected:,} rows, each with its stage and reason",
         "field": _fields("rejects", REJECTS_SET, rej_schema, lambda n: REJECT_DOCS.get(n, "column of the rejects table"))},
    ]

    _, licence_sentence = licence_metadata(facts)
    out = {}
    if marker:
        out[marker[0]] = marker[1]
    out.update({
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": [CROISSANT_1_0, RAI_1_0],
        "name": pretty_name,
        "description": (f"Image-caption pairs prepared by kiln {st.get('kiln_version')} from {facts.input_rows:,} rows of "
                        f"web metadata: {facts.kept:,} kept ({pct(facts.kept, facts.input_rows)}), {facts.rejected:,} "
                        "rejected with a stage and a reason. Layout: kiln's SHARDS.md (webdataset tars + Parquet); "
                        "the dataset card is README.md."),
        "license": {"@type": "sc:CreativeWork", "name": "per-sample licences of the source metadata",
                    "description": licence_sentence + " Images remain the property of their rights holders."},
        "keywords": ["image-text pairs", "text-to-image", "webdataset", "kiln"],
        "isLiveDataset": False,
        "distribution": distribution,
        "recordSet": record_sets,
    })
    from pipeline.card.summary import derivation

    derived = derivation(st)
    if derived:  # a `kiln subset` child: schema.org's isBasedOn names the parent dataset
        p = derived["parent"]
        out["isBasedOn"] = {"@type": "sc:Dataset", "name": str(p.get("path")), "url": str(p.get("path")),
                            "identifier": f"kiln config_fingerprint {p.get('config_fingerprint')}",
                            "description": (f"kiln subset of this dataset ({p.get('kept') or 0:,} samples) by "
                                            + "; ".join(_rule_text(r) for r in derived["rules"]) + "; stats.json → subset "
                                            "holds the rules and the parent's card sha256")}
    if st.get("finished_at"):
        out["dateCreated"] = st["finished_at"]
    if language:
        out["inLanguage"] = list(language)
    out.update(rai_fields(facts, limitation_items, uses_items))
    return out


def rai_fields(facts: Facts, limitation_items, uses_items) -> dict:
    st, flags = facts.stats, facts.stats.get("flags", {})
    files = (st.get("input") or {}).get("files") or []
    period = collection_period(st)
    protocols = opt_out_protocols(facts)
    blocklists = blocklist_entries(facts)
    consent = (st.get("consent") or {}) if isinstance(st.get("consent"), dict) else {}

    if protocols is None:
        opt_out = ("Opt-outs: X-Robots-Tag response headers were honoured; this run predates kiln's robots.txt, TDMRep, "
                   "opt-out list and C2PA support, so a reservation expressed only there was not honoured.")
    else:
        parts = []
        for p in protocols:
            if not p["enabled"]:
                parts.append(f"{p['title']}: off")
                continue
            text = f"{p['title']}: {p['rows_removed']:,} rows removed"
            if "origins_consulted" in p:
                text += (f", {p.get('origins_consulted') or 0:,} origins consulted, {p.get('origins_unavailable') or 0:,} "
                         f"unavailable ({p.get('on_unavailable')}: every URL of such an origin removed)")
            parts.append(text)
        opt_out = ("Opt-outs honoured before anything was kept (the rejects table holds every removed row): "
                   + "; ".join(parts) + ".")
    collection = (
        f"The image URLs and alt-text captions come from {len(files)} input metadata file(s) ({facts.input_rows:,} rows). "
        f"kiln's fetcher downloaded each image once, identifying itself as "
        f"{consent.get('user_agent') or 'kiln (token ' + str(flags.get('user_agent_token')) + ')'}: http/https only, no private "
        "addresses, every redirect re-checked, no cookies or credentials. "
        f"Collection period: {period['start'] or 'unknown'} to {period['end'] or 'unknown'} ({period['basis']}). "
        + opt_out
    )
    preprocessing = [
        f"{f['stage']} ({f['mode']}): {f['in']:,} in, {f['out']:,} out, {f['rejected']:,} rejected"
        + (": " + ", ".join(f"{r} {n:,}" for r, n in sorted(f['reasons'].items(), key=lambda kv: (-kv[1], kv[0]))) if f['reasons'] else "")
        for f in facts.funnel
    ]
    preprocessing.append(
        f"images resized to at most {flags.get('image_size')} px ({flags.get('resize_mode')}), stored as "
        f"{flags.get('encode_format')}; exact (URL, caption) duplicates removed")
    if blocklists and blocklists["lists"]:
        preprocessing.append("blocklists: " + "; ".join(
            f"{b['name']} (sha256 {str(b['sha256'])[:16]}, entries "
            + ", ".join(f"{k} {n:,}" for k, n in sorted(b['entries'].items())) + f", {b['rows_removed']:,} rows removed)"
            for b in blocklists["lists"]))
    tools = []
    for name, info in sorted((st.get("models") or {}).items()):
        if isinstance(info, dict):
            tools.append(f"{name}: {model_label(info, '(unnamed)')}, sha256 {info.get('sha256')}")
    filters = [f"{f['title']}: mode {f['mode']}, {f['threshold_flag']} {f['threshold']}, {f['rows_removed']:,} rows removed"
               for f in safety_filters(facts) if f["mode"] != "off"]

    biases, limits = limitation_items(facts)
    out = {
        "rai:dataCollection": collection,
        "rai:dataCollectionType": ["Web Scraping"],
        "rai:dataCollectionRawData": (
            "Input metadata: " + ", ".join(f"{f.get('path')} ({f.get('rows')} rows)" for f in files[:20])
            + (f" and {len(files) - 20} more (stats.json)" if len(files) > 20 else "")
            + ". The images were downloaded from the URLs listed there."),
        "rai:dataCollectionMissingData": (
            f"{facts.rejected:,} input rows were not kept; each is a row of rejects/ with its stage, reason and detail "
            "(unreachable or changed URLs, opt-outs, filters). Their images were not stored."),
        "rai:dataPreprocessingProtocol": preprocessing,
        "rai:machineAnnotationTools": tools + filters,
        "rai:dataBiases": [_plain(b) for b in biases],
        "rai:dataLimitations": [_plain(x) for x in limits],
        "rai:personalSensitiveInformation": [
            "Images may show identifiable people, including minors, and personal information (faces, names in captions, "
            "documents, locations); nothing in kiln detects or removes it.",
            "Captions are web alt-text and may name people or contain sensitive attributes (gender, age, ethnicity, "
            "religion, health) as the web described them.",
            "URLs identify the pages and sites the images were published on.",
        ],
        "rai:dataUseCases": [_plain(u) for u in uses_items()],
        "rai:dataReleaseMaintenancePlan": (
            "Not recorded by the run: the publisher states who maintains this copy and how to request removal. A sample "
            "is removed by deleting its rows and tar members and rewriting its shard's files and manifest.json; "
            "`kiln card DATASET_DIR` regenerates this file, the card and the training summary."),
    }
    if period["start"] and period["end"]:
        # The RAI 1.0 specification's table spells it ...Timeframe, its text and mlcroissant ...TimeFrame: both.
        out["rai:dataCollectionTimeframe"] = out["rai:dataCollectionTimeFrame"] = [period["start"], period["end"]]
    return out


def _rule_text(rule: dict) -> str:
    """A subset rule in a few words: its name and its settings (stats.json's subset.rules entry)."""
    rest = {k: v for k, v in rule.items() if k not in ("rule", "reasons")}
    return f"{rule.get('rule')} {json.dumps(rest, sort_keys=True, default=str)}" if rest else str(rule.get("rule"))
