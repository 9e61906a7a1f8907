"""pipeline/read.py: every input check before any work (inspect_input), and rows read so that no
value can kill the job (ReadMetadata): each input row comes out once, as a sample candidate or, via
the prefilter, as a reject with a known reason."""

import math
import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, ImageConfig, InputConfig, PrefilterConfig
from pipeline.finalize import count_input_rows
from pipeline.prefilter import Prefilter, prefilter_row
from pipeline.read import InputInfo, ReadMetadata, inspect_input, rows_from_table
from pipeline.records import Reject, compute_uid, known_reason, reject_row, rejects_schema
from pipeline.write import meta_schema

COLS = InputConfig(input="unused")
GOOD_URL = "http://img.example.test/a.jpg"


def _bad(b: bytes) -> pa.Array:
    """Bytes stored in a *string* column as they are (as a foreign writer may): no UTF-8 check."""
    return pa.array(b, pa.binary()).view(pa.string())


def _write(path, table: pa.Table, **kw) -> str:
    pq.write_table(table, path, **kw)
    return str(path)


def _table(n=3, **extra) -> pa.Table:
    cols = {"SAMPLE_ID": list(range(n)), "URL": [f"http://img.example.test/{i}.jpg" for i in range(n)],
            "TEXT": [f"caption number {i}" for i in range(n)], "WIDTH": [640] * n, "HEIGHT": [480] * n}
    cols.update(extra)
    return pa.table(cols)


def _refused(pattern: str, columns: InputConfig = COLS) -> str:
    with pytest.raises(ConfigError) as exc:
        inspect_input(pattern, columns)
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg  # one line
    assert exc.value.exit_code == 2
    return msg


# -- inspect_input ---------------------------------------------------------------------------------


def test_inspect_input_reports_rows_files_schema_and_id_type(tmp_path):
    a = _write(tmp_path / "a.parquet", _table(5), row_group_size=2)
    _write(tmp_path / "b.parquet", _table(3))
    info = inspect_input(str(tmp_path / "*.parquet"), COLS)
    assert isinstance(info, InputInfo)
    rows, files = count_input_rows(str(tmp_path / "*.parquet"))
    assert (info.rows, info.files) == (rows, files) == (8, files)
    assert [f["path"] for f in info.files] == [a, str(tmp_path / "b.parquet")]
    assert info.schema.names == ["SAMPLE_ID", "URL", "TEXT", "WIDTH", "HEIGHT"]
    assert info.id_type == pa.int64()
    assert inspect_input(a, InputConfig(input=a, id_col="nope")).id_type is None


def test_no_file_matches(tmp_path):
    msg = _refused(str(tmp_path / "nothing*.parquet"))
    assert "no input files match" in msg and "nothing*.parquet" in msg


@pytest.mark.parametrize("suffix", ["", "/"])
def test_a_directory_is_refused_with_the_glob_to_pass(tmp_path, suffix):
    _write(tmp_path / "a.parquet", _table())
    msg = _refused(str(tmp_path) + suffix)
    assert "is a directory" in msg and f"{tmp_path}/*.parquet" in msg


def test_a_glob_matching_a_directory_is_refused(tmp_path):
    (tmp_path / "sub.parquet").mkdir()
    _write(tmp_path / "a.parquet", _table())
    msg = _refused(str(tmp_path / "sub.parquet"))
    assert "is a directory" in msg and "sub.parquet/*.parquet" in msg


@pytest.mark.parametrize(
    "name, content",
    [
        ("notes.parquet", b"URL,TEXT\nhttp://x,y\n"),  # a CSV named .parquet
        ("empty.parquet", b""),
        ("cut.parquet", None),  # a real file cut in half
    ],
)
def test_a_file_that_is_not_parquet_or_is_cut_short_is_named(tmp_path, name, content):
    _write(tmp_path / "a.parquet", _table())
    good = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / name).write_bytes(good[: len(good) // 2] if content is None else content)
    msg = _refused(str(tmp_path / "*.parquet"))
    assert str(tmp_path / name) in msg and "not a readable Parquet file" in msg


def test_files_with_different_schemas_are_named(tmp_path):
    _write(tmp_path / "a.parquet", _table())
    _write(tmp_path / "b.parquet", _table().drop_columns(["WIDTH"]).append_column("LICENSE", pa.array(["cc"] * 3)))
    msg = _refused(str(tmp_path / "*.parquet"))
    assert str(tmp_path / "b.parquet") in msg and str(tmp_path / "a.parquet") in msg
    assert "'WIDTH'" in msg and "'LICENSE'" in msg


@pytest.mark.parametrize("col, flag", [("URL", "--url-col"), ("TEXT", "--caption-col")])
def test_a_missing_url_or_caption_column_names_the_flag_and_the_columns(tmp_path, col, flag):
    path = _write(tmp_path / "a.parquet", _table().drop_columns([col]))
    msg = _refused(path)
    assert f"input has no {col!r} column ({flag})" in msg and f"pass {flag} NAME" in msg
    assert "'SAMPLE_ID'" in msg and path in msg


@pytest.mark.parametrize(
    "col, values, typename",
    [
        ("URL", pa.array([1, 2, 3], pa.int64()), "int64"),
        ("TEXT", pa.array([1.5, 2.5, 3.5]), "double"),
        ("URL", pa.array([None] * 3, pa.null()), "null"),
        ("TEXT", pa.array([["a"], ["b"], ["c"]]), "list<"),
    ],
)
def test_a_url_or_caption_column_that_is_not_text_is_refused(tmp_path, col, values, typename):
    path = _write(tmp_path / "a.parquet", _table().set_column(1 if col == "URL" else 2, col, values))
    msg = _refused(path)
    assert f"input column {col!r}" in msg and f"is {typename}" in msg and "not text" in msg and path in msg


@pytest.mark.parametrize("col, values", [("WIDTH", pa.array(["640"] * 3)), ("HEIGHT", pa.array([True] * 3)),
                                         ("WIDTH", pa.array([b"6"] * 3))])
def test_declared_size_columns_must_be_numeric(tmp_path, col, values):
    t = _table()
    path = _write(tmp_path / "a.parquet", t.set_column(t.schema.get_field_index(col), col, values))
    msg = _refused(path)
    assert f"input column {col!r}" in msg and "not a number" in msg and path in msg


@pytest.mark.parametrize("clash", ["uid", "punsafe", "shard", "toxicity_scores", "_body", "_unreadable"])
def test_columns_named_like_kiln_fields_are_refused(tmp_path, clash):
    path = _write(tmp_path / "a.parquet", _table(**{clash: [1, 2, 3]}))
    msg = _refused(path)
    assert f"[{clash!r}] clash with fields kiln adds" in msg


def test_duplicate_column_names_are_refused(tmp_path):
    t = pa.table([pa.array(["http://x.test/a"]), pa.array(["a caption"]), pa.array([1]), pa.array([2])],
                 names=["URL", "TEXT", "ID", "ID"])
    msg = _refused(_write(tmp_path / "a.parquet", t))
    assert "more than one column named ['ID']" in msg


def test_binary_and_dictionary_text_columns_are_accepted(tmp_path):
    t = _table()
    t = t.set_column(1, "URL", pa.array([u.encode() for u in t.column("URL").to_pylist()], pa.large_binary()))
    t = t.set_column(2, "TEXT", t.column("TEXT").dictionary_encode())
    assert inspect_input(_write(tmp_path / "a.parquet", t), COLS).rows == 3


# -- rows_from_table -------------------------------------------------------------------------------


def test_valid_rows_read_like_pyarrow_with_the_uid():
    t = _table(LICENSE=["cc", None, "by"])
    rows = list(rows_from_table(t, COLS))
    assert [{k: v for k, v in r.items() if k != "uid"} for r in rows] == t.to_pylist()
    assert all(r["uid"] == compute_uid(r["URL"], r["TEXT"]) and "_unreadable" not in r for r in rows)


def test_invalid_utf8_marks_the_row_and_keeps_what_is_readable():
    t = pa.table({"SAMPLE_ID": [1, 2, 3, 4],
                  "URL": _bad([GOOD_URL.encode(), b"http://x.test/\xff.jpg", GOOD_URL.encode(), None]),
                  "TEXT": _bad([b"a good caption", b"a fine caption", b"caf\xe9 latin-1", b"\xc3"]),
                  "LICENSE": _bad([b"cc", b"cc", b"cc", b"\x80bad"])})
    rows = list(rows_from_table(t, COLS))
    assert "_unreadable" not in rows[0] and rows[0]["TEXT"] == "a good caption"
    assert rows[1]["_unreadable"] == ("invalid_utf8", "URL: not valid UTF-8 (byte 0xff at offset 14)")
    assert rows[1]["URL"] == "http://x.test/\\xff.jpg" and rows[1]["SAMPLE_ID"] == 2
    assert rows[2]["_unreadable"][1] == "TEXT: not valid UTF-8 (byte 0xe9 at offset 3)" and rows[2]["URL"] == GOOD_URL
    assert rows[3]["_unreadable"][0] == "invalid_utf8" and "TEXT" in rows[3]["_unreadable"][1] and "LICENSE" in rows[3]["_unreadable"][1]
    # The uid of an undecodable value is over its bytes: never the uid of the escaped text.
    assert rows[1]["uid"] != compute_uid(rows[1]["URL"], rows[1]["TEXT"])
    assert rows[1]["uid"] == compute_uid(b"http://x.test/\xff.jpg", "a fine caption")
    assert len({r["uid"] for r in rows}) == 4
    # Every one becomes a prefilter reject that the rejects table takes as it is.
    rej = []
    for r in rows[1:]:
        with pytest.raises(Reject) as exc:
            prefilter_row(r, PrefilterConfig())
        assert exc.value.reason == "invalid_utf8"
        rej.append(reject_row(r, exc.value))
    table = pa.Table.from_pylist(rej, schema=rejects_schema(pa.int64()))
    assert table.column("url").to_pylist() == ["http://x.test/\\xff.jpg", GOOD_URL, None]
    assert table.column("SAMPLE_ID").to_pylist() == [2, 3, 4]


def test_binary_url_and_caption_are_decoded_other_binary_columns_are_not():
    t = pa.table({"URL": pa.array([GOOD_URL.encode()], pa.binary()), "TEXT": pa.array(["é a caption".encode()], pa.large_binary()),
                  "EMB": pa.array([b"\x00\xff"], pa.binary())})
    (row,) = rows_from_table(t, COLS)
    assert row["URL"] == GOOD_URL and row["TEXT"] == "é a caption" and row["EMB"] == b"\x00\xff"
    assert row["uid"] == compute_uid(GOOD_URL, "é a caption")  # the same uid as the string column would give


def test_nested_and_dictionary_text_is_decoded_value_by_value():
    t = pa.table({"URL": pa.array([GOOD_URL] * 2).dictionary_encode(), "TEXT": ["a caption", "another caption"],
                  "TAGS": pa.array([["x", "y"], None], pa.list_(pa.string())),
                  "KV": pa.array([[("k", "v")], []], pa.map_(pa.string(), pa.string())),
                  "ST": pa.array([{"a": "b", "n": 1}, None])})
    rows = list(rows_from_table(t, COLS))
    assert rows[0]["URL"] == GOOD_URL and rows[0]["TAGS"] == ["x", "y"] and rows[0]["KV"] == [("k", "v")]
    assert rows[0]["ST"] == {"a": "b", "n": 1} and rows[1]["ST"] is None
    bad = pa.table({"URL": [GOOD_URL], "TEXT": ["a caption"], "TAGS": pa.array([[b"ok", b"\xfe"]], pa.list_(pa.binary())).cast(pa.list_(pa.binary())).view(pa.list_(pa.string()))})
    (row,) = rows_from_table(bad, COLS)
    assert row["_unreadable"][0] == "invalid_utf8" and row["TAGS"] == ["ok", "\\xfe"]


def test_a_value_pyarrow_cannot_convert_marks_only_its_row():
    # A timestamp beyond Python's datetime range makes to_pylist raise for the whole column.
    ts = pa.array([0, 400_000_000_000_000_000], pa.int64()).view(pa.timestamp("us"))
    t = pa.table({"URL": [GOOD_URL, GOOD_URL + "?2"], "TEXT": ["a caption", "a caption"], "TS": ts})
    rows = list(rows_from_table(t, COLS))
    assert "_unreadable" not in rows[0]
    assert rows[1]["_unreadable"][0] == "unreadable_value" and rows[1]["TS"] is None and "TS" in rows[1]["_unreadable"][1]


# -- ReadMetadata + Prefilter on Beam ----------------------------------------------------------------


def _run(path: str, columns: InputConfig, check):
    """ReadMetadata | Prefilter on a TestPipeline; `check(main, rejects)` runs on the collected outputs."""
    with TestPipeline() as p:
        rows = p | "ReadMetadata" >> ReadMetadata(columns)
        pre = rows | "Prefilter" >> Prefilter(PrefilterConfig(), ImageConfig(), columns)
        main = pre["main"] | "TagMain" >> beam.Map(lambda r: ("main", r))
        rej = pre["rejects"] | "TagRejects" >> beam.Map(lambda r: ("reject", r))
        both = (main, rej) | beam.Flatten() | beam.combiners.ToList()

        def _check(outputs):
            (items,) = outputs
            check([r for k, r in items if k == "main"], [r for k, r in items if k == "reject"])

        assert_that(both, _check)


def test_read_metadata_turns_every_bad_value_into_a_reject(tmp_path):
    t = pa.table({
        "SAMPLE_ID": list(range(8)),
        "URL": _bad([GOOD_URL.encode(), b"http://x.test/\xff", None, b"ftp://x.test/a", GOOD_URL.encode() + b"?5",
                     GOOD_URL.encode() + b"?6", GOOD_URL.encode() + b"?7", GOOD_URL.encode()]),
        "TEXT": pa.array([b"a red circle", b"a caption", b"a caption", b"a caption", b"\xff\xfe", None, b"a caption",
                          b"a red circle"], pa.binary()),
        "WIDTH": [640.0, 640.0, 640.0, 640.0, 640.0, 640.0, math.inf, 640.0],
        "HEIGHT": [480.0, 480.0, 480.0, 480.0, 480.0, 480.0, 480.0, math.nan],
    })
    path = _write(tmp_path / "in.parquet", t, row_group_size=3)
    columns = InputConfig(input=path)
    info = inspect_input(path, columns)
    expected = {1: "invalid_utf8", 2: "url_missing", 3: "url_scheme", 4: "invalid_utf8", 5: "caption_missing",
                6: "declared_size_invalid", 7: "duplicate"}

    def check(main, rejects):
        assert [r["SAMPLE_ID"] for r in main] == [0]
        assert main[0]["TEXT"] == "a red circle" and main[0]["uid"] == compute_uid(GOOD_URL, "a red circle")
        assert {r["SAMPLE_ID"]: r["reason"] for r in rejects} == expected
        assert all(r["stage"] == "prefilter" and known_reason(r["stage"], r["reason"]) for r in rejects)
        assert {r["SAMPLE_ID"]: r["url"] for r in rejects}[1] == "http://x.test/\\xff"
        pa.Table.from_pylist(rejects, schema=rejects_schema(info.id_type))  # valid rejects rows
        schema = meta_schema(info.schema)
        pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in main], schema=schema)  # valid meta rows

    _run(path, columns, check)


# -- fuzz: malformed rows never kill the job, and every row is accounted for ---------------------------

_HOSTS = st.sampled_from(["img.example.test", "a.b.test", "xn--nxasmq6b.test", "ünïcode.test", "127.0.0.1", "[::1]", ""])
_TEXT_BYTES = st.one_of(
    st.none(),
    st.binary(max_size=40),  # mostly invalid UTF-8
    st.text(max_size=40).map(lambda s: s.encode()),  # any unicode, odd categories included
    st.sampled_from(["", "   ", "\t\n", "\u200b\u200b", "a", "ab", "\x00\x00\x00", "🎨🖼️ emoji caption", "x" * 1200]).map(str.encode),
    st.builds(lambda h, p: f"http://{h}/{p}".encode(), _HOSTS, st.text(max_size=20)),
    st.builds(lambda s, h: f"{s}://{h}/a.jpg".encode(), st.sampled_from(["ftp", "file", "data", "javascript", "HTTPS", "gopher"]), _HOSTS),
    st.sampled_from([b"http://x.test:99999/a", b"http://[::1/a", b"http:///a", b"//x.test/a", b"http://x.test/" + b"a" * 5000]),
)
_SIDES = st.one_of(st.none(), st.just(math.nan), st.just(math.inf), st.just(-math.inf),
                   st.floats(-1e12, 1e12, allow_nan=False), st.integers(0, 4096).map(float), st.just(1e300))


@st.composite
def _inputs(draw):
    n = draw(st.integers(1, 30))
    urls = draw(st.lists(_TEXT_BYTES, min_size=n, max_size=n))
    caps = draw(st.lists(_TEXT_BYTES, min_size=n, max_size=n))
    # Rows repeated verbatim exercise the dedup.
    for i in draw(st.lists(st.integers(0, n - 1), max_size=3)):
        urls[i], caps[i] = urls[0], caps[0]
    widths = draw(st.lists(_SIDES, min_size=n, max_size=n))
    heights = draw(st.lists(_SIDES, min_size=n, max_size=n))
    caption_binary = draw(st.booleans())
    size_ints = draw(st.booleans())
    if size_ints:  # an integer column cannot hold NaN/inf: those become nulls
        fix = lambda v: None if v is None or not math.isfinite(v) or abs(v) > 2**62 else int(v)  # noqa: E731
        widths, heights = [fix(v) for v in widths], [fix(v) for v in heights]
    return urls, caps, widths, heights, caption_binary, size_ints


def _fuzz_table(urls, caps, widths, heights, caption_binary, size_ints) -> pa.Table:
    n = len(urls)
    return pa.table({
        "SAMPLE_ID": pa.array(range(n), pa.int64()),
        "URL": _bad(urls),
        "TEXT": pa.array(caps, pa.binary()) if caption_binary else _bad(caps),
        "WIDTH": pa.array(widths, pa.int64() if size_ints else pa.float64()),
        "HEIGHT": pa.array(heights, pa.int64() if size_ints else pa.float64()),
    })


def _utf8(b) -> bool:
    try:
        b is None or b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_inputs())
def test_fuzz_read_and_prefilter_without_beam(data):
    """The pure functions: every row gives a pass or a Reject with a known reason; rejects and kept
    rows make valid rejects / meta table rows."""
    table = _fuzz_table(*data)
    urls, caps = data[0], data[1]
    rows = list(rows_from_table(table, COLS))
    assert [r["SAMPLE_ID"] for r in rows] == list(range(len(urls)))
    kept, rejects = [], []
    for raw_u, raw_c, row in zip(urls, caps, rows):
        try:
            prefilter_row(row, PrefilterConfig(), ImageConfig(), COLS)
        except Reject as rej:
            assert rej.stage == "prefilter" and known_reason(rej.stage, rej.reason), rej
            if not (_utf8(raw_u) and _utf8(raw_c)):
                assert rej.reason == "invalid_utf8"
            rejects.append(reject_row(row, rej))
        else:
            assert _utf8(raw_u) and _utf8(raw_c) and isinstance(row["URL"], str) and isinstance(row["TEXT"], str)
            assert row["uid"] == compute_uid(row["URL"], row["TEXT"])
            kept.append(row)
    pa.Table.from_pylist(rejects, schema=rejects_schema(pa.int64()))
    schema = meta_schema(table.schema)
    pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in kept], schema=schema)


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_inputs())
def test_fuzz_read_metadata_and_prefilter_on_beam_account_for_every_row(tmp_path, data):
    """The job's first two steps on Beam: the pipeline finishes, every input row is in main or the
    rejects exactly once (by its unique SAMPLE_ID), every reject has a known reason."""
    urls, caps = data[0], data[1]
    path = _write(tmp_path / "fuzz.parquet", _fuzz_table(*data), row_group_size=7)
    columns = InputConfig(input=path)
    info = inspect_input(path, columns)
    assert info.rows == len(urls)
    bad = {i for i, (u, c) in enumerate(zip(urls, caps)) if not (_utf8(u) and _utf8(c))}

    def check(main, rejects):
        ids = sorted([r["SAMPLE_ID"] for r in main] + [r["SAMPLE_ID"] for r in rejects])
        assert ids == list(range(len(urls)))
        assert len({r["uid"] for r in main}) == len(main)  # dedup: one kept row per uid
        for r in rejects:
            assert r["stage"] == "prefilter" and known_reason(r["stage"], r["reason"]), r
            if r["SAMPLE_ID"] in bad:
                assert r["reason"] == "invalid_utf8", r
        assert not bad & {r["SAMPLE_ID"] for r in main}
        pa.Table.from_pylist(rejects, schema=rejects_schema(info.id_type))

    _run(path, columns, check)
    os.remove(path)
