"""pipeline/records.py: the record's field table, the reject vocabulary, reject rows, uids."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import records
from pipeline.records import (
    JSON_EXCLUDED,
    META_FIELDS,
    RECORD_FIELDS,
    REASONS,
    STAGES,
    TRANSIENT_FIELDS,
    Reject,
    compute_uid,
    kiln_column_clashes,
    reject_row,
    rejects_schema,
)
from pipeline.write import meta_schema, sample_json

REPO = Path(__file__).resolve().parents[2]


def test_uid_is_sha256_of_the_json_pair_as_given():
    want = hashlib.sha256(json.dumps(["http://a.example.test/x.jpg", "a red circle"], ensure_ascii=False,
                                     separators=(",", ":")).encode()).hexdigest()[:32]
    assert compute_uid("http://a.example.test/x.jpg", "a red circle") == want
    assert compute_uid(None, "x") != compute_uid("", "x")  # null and empty are different rows
    assert compute_uid("u", "é") == hashlib.sha256('["u","é"]'.encode()).hexdigest()[:32]
    assert re.fullmatch(r"[0-9a-f]{32}", compute_uid("u", None))


@pytest.mark.parametrize("url, caption", [(b"http://x.test/\xff", "c"), (123, "c"), (float("nan"), None), ("u\ud800", "c"),
                                          ("u", b"\xc3"), ([1, 2], {"a": 1}), (bytearray(b"u"), "c")])
def test_uid_takes_any_value_and_never_collides_with_text(url, caption):
    uid = compute_uid(url, caption)
    assert re.fullmatch(r"[0-9a-f]{32}", uid) and uid == compute_uid(url, caption)
    if not isinstance(url, str):
        assert uid != compute_uid(str(url), caption)
        assert uid != compute_uid(repr(url), caption)
    assert compute_uid(b"u", "c") != compute_uid("u", "c")  # bytes are never taken for the text they may spell


def test_as_text_makes_any_value_a_writable_string():
    assert records.as_text(b"ok \xff") == "ok \\xff"
    assert records.as_text("lone \udc80").encode("utf-8")
    assert records.as_text(7) == "7" and records.as_text("é") == "é"


def test_reject_row_of_an_undecodable_record_is_a_valid_rejects_row():
    record = {"uid": "e" * 32, "URL": b"http://x.test/\xff", "SAMPLE_ID": "id-\udc80"}
    row = reject_row(record, Reject("prefilter", "invalid_utf8", "URL: not valid UTF-8 \ud800"))
    assert row["url"] == "http://x.test/\\xff"
    table = pa.Table.from_pylist([{**row, "SAMPLE_ID": None}], schema=rejects_schema(pa.string()))
    assert table.column("detail").to_pylist()[0].startswith("URL: not valid UTF-8")


def test_field_table_is_consistent():
    names = [f.name for f in RECORD_FIELDS]
    assert len(names) == len(set(names))
    for f in RECORD_FIELDS:
        assert f.stage in STAGES or f.stage in ("read", "route"), f
        assert (f.dtype is not None) == (f.kind == records.META), f
    assert {"shard", "_unreadable", "_body", "_bgr", "_image", "_t5"} == TRANSIENT_FIELDS
    assert set(JSON_EXCLUDED) == {"clip_image_embedding", "t5"}


def _shards_md_meta_table() -> list[tuple[str, str]]:
    """(column, type) rows of SHARDS.md's kiln meta-column table, in order."""
    text = (REPO / "SHARDS.md").read_text()
    section = text.split("## `meta/NNNNNN.parquet`", 1)[1].split("\n## ", 1)[0]
    rows, in_table = [], False
    for line in section.splitlines():
        if line.startswith("| column | type |"):
            in_table = True
            continue
        if in_table and line.startswith("| ---"):
            continue
        if in_table and line.startswith("| `"):
            cols, dtype = line.split("|")[1:3]
            rows += [(c, dtype.strip()) for c in re.findall(r"`([^`]+)`", cols)]
        elif in_table:
            break  # the table ends at its first non-row line: a blank line splits it
    return rows


def test_shards_md_meta_table_equals_what_the_writer_writes():
    documented = _shards_md_meta_table()
    schema = meta_schema(pa.schema([("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string())]))
    spelled = {"float": "float32", "double": "float64"}  # pyarrow's str() of float types vs SHARDS.md's names
    written = [(f.name, spelled.get(str(f.type), str(f.type))) for f in schema][3:]
    assert documented == written
    assert [n for n, _ in documented] == [f.name for f in META_FIELDS]


def test_shards_md_names_every_reject_reason():
    text = (REPO / "SHARDS.md").read_text()
    for stage, reasons in REASONS.items():
        line = next(l for l in text.splitlines() if l.startswith(f"- `{stage}`:"))
        block = text[text.index(line):].split("\n- `", 1)[0]
        for reason in reasons:
            assert f"`{reason}`" in block, (stage, reason)


def test_input_columns_that_clash_with_kiln_fields_are_named():
    assert kiln_column_clashes(["URL", "TEXT", "uid", "punsafe", "shard", "WIDTH"]) == ["punsafe", "shard", "uid"]
    assert kiln_column_clashes([f.name for f in RECORD_FIELDS]) == sorted(f.name for f in RECORD_FIELDS)  # transient ones too
    assert kiln_column_clashes(["url", "caption", "key"]) == []
    with pytest.raises(ValueError, match=r"\['uid'\]"):
        meta_schema(pa.schema([("uid", pa.string()), ("URL", pa.string())]))


def test_reject_row_is_the_one_shape_of_a_rejection():
    record = {"uid": "a" * 32, "key": 7, "url": "http://x.example.test/a.jpg", "shard": 3, "toxicity": 0.1,
              "clip_similarity": 0.05, "_body": b"x"}
    row = reject_row(record, Reject("clip", "clip_similarity_low", "0.05 < 0.28"), url_col="url", id_col="key")
    assert row == {"uid": "a" * 32, "SAMPLE_ID": 7, "url": "http://x.example.test/a.jpg", "stage": "clip",
                   "reason": "clip_similarity_low", "detail": "0.05 < 0.28", "shard": 3, "toxicity": 0.1,
                   "clip_similarity": 0.05, "punsafe": None, "duplicate_of": None}
    dup = reject_row(record, Reject("dedup", "duplicate_pdq", "hamming 4", duplicate_of="b" * 32), url_col="url", id_col="key")
    assert dup["stage"] == "dedup" and dup["duplicate_of"] == "b" * 32
    table = pa.Table.from_pylist([row], schema=rejects_schema(pa.int64()))
    assert table.column("SAMPLE_ID").to_pylist() == [7]
    # Before routing a row has no shard; a long detail is cut; http_<code> is a download reason.
    row = reject_row({"uid": "b" * 32, "URL": None}, Reject("download", "http_451", "x" * 5000))
    assert row["shard"] is None and row["url"] is None and len(row["detail"]) == 1000


@pytest.mark.parametrize("stage, reason", [("download", "http_teapot"), ("decode", "toxic"), ("later", "x"), ("nsfw", "nsfw_error")])
def test_reject_row_refuses_reasons_outside_the_vocabulary(stage, reason):
    with pytest.raises(ValueError, match="not in pipeline.records.REASONS"):
        reject_row({"uid": "c" * 32}, Reject(stage, reason))


def test_key_json_holds_the_meta_row_without_binaries_or_transients():
    record = {"uid": "d" * 32, "URL": "http://x.example.test/a.jpg", "TEXT": "a cat", "shard": 0, "_image": b"jpg",
              "_t5": np.zeros((2, 4), np.float16), "t5": b"\0" * 16, "t5_len": np.int32(2), "clip_image_embedding": b"\0\0",
              "toxicity_scores": {"toxicity": 0.01}, "clip_similarity": np.float32(0.5)}
    js = json.loads(sample_json(record))
    assert js == {"uid": "d" * 32, "URL": "http://x.example.test/a.jpg", "TEXT": "a cat", "t5_len": 2,
                  "toxicity_scores": {"toxicity": 0.01}, "clip_similarity": 0.5}
    assert sample_json(record) == sample_json(dict(reversed(list(record.items()))))  # keys sorted: same bytes


def test_every_field_a_stage_sets_is_in_the_field_table():
    """A key any pipeline module writes into a record is a RECORD_FIELDS entry, so kiln_column_clashes
    (and so inspect_input) refuses an input column that it would overwrite."""
    set_keys = set()
    for path in sorted((REPO / "pipeline").glob("*.py")):
        text = path.read_text()
        set_keys |= set(re.findall(r'\b(?:record|row)\["([A-Za-z_][A-Za-z0-9_]*)"\]\s*=(?!=)', text))
        set_keys |= set(re.findall(r'\b(?:record|row)\.setdefault\("([A-Za-z_][A-Za-z0-9_]*)"', text))
    assert {"uid", "shard", "_body"} <= set_keys  # the scan sees the stages
    assert set_keys <= set(records.FIELDS_BY_NAME), set_keys - set(records.FIELDS_BY_NAME)
