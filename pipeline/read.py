"""Reading the metadata: every input check before any work (`inspect_input`), then the rows
(`ReadMetadata`), each with its uid, none lost to a value Python cannot take as it is.

`inspect_input` refuses, with one `ConfigError` line, an input the job could only die on: no file, a
directory, a file that is not Parquet or is cut short, files whose schemas differ, a URL or caption
column that is missing or not text, a declared width/height column that is not numeric, and input
columns named like a field kiln adds to a record (`uid`, `shard`, `punsafe`, ...).

`ReadMetadata` reads the files in row-group batches (`beam.io.ReadFromParquetBatched`), takes every
text column as bytes and decodes each value in Python: a value that is not UTF-8 never raises, the
row instead carries `_unreadable` = ("invalid_utf8", detail) and the prefilter rejects it, with its
URL and id as far as they are readable (undecodable bytes as \\xNN). URL and caption columns stored
as binary are decoded the same way. A value pyarrow cannot convert (a date beyond Python's range,
...) becomes None and the row `_unreadable` ("unreadable_value"). Every input row comes out exactly
once, with `uid` = records.compute_uid(url, caption) (over the raw bytes where they are not UTF-8).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.config import ConfigError, InputConfig
from pipeline.errors import one_line
from pipeline.records import compute_uid, kiln_column_clashes

__all__ = ["InputInfo", "ReadMetadata", "inspect_input", "rows_from_table"]

# What a URL or caption column may hold: text, or bytes that are decoded as UTF-8 per row.
TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())
ROWS_PER_BATCH = 4096  # rows converted to Python at a time (a row group may hold millions)


@dataclass(frozen=True)
class InputInfo:
    """What `inspect_input` found: the row count (from the footers), the files (path, bytes, rows:
    the shape stats.json's "input.files" and the resume fingerprint use), the files' common schema
    (the meta table keeps these columns unchanged) and the --id-col column's type (None if absent)."""

    rows: int
    files: list[dict] = field(default_factory=list)
    schema: pa.Schema = field(default_factory=lambda: pa.schema([]))
    id_type: pa.DataType | None = None


# -- inspect_input -------------------------------------------------------------------------------


def _short(err: BaseException, n: int = 200) -> str:
    text = one_line(err) or type(err).__name__
    return text if len(text) <= n else text[: n - 3] + "..."


def _match(pattern: str) -> list:
    try:
        results = FileSystems.match([pattern])
    except Exception as err:  # noqa: BLE001 - BeamIOError, a bad scheme, missing credentials, ...
        raise ConfigError(f"cannot list input {pattern!r} ({_short(err)}): check --input and access to it") from None
    return sorted((m for r in results for m in r.metadata_list), key=lambda m: m.path)


def _is_local_dir(path: str) -> bool:
    return FileSystems.get_scheme(path) is None and os.path.isdir(path)


def _directory_hint(path: str) -> str:
    return f"--input {path!r} is a directory: pass the files in it, e.g. --input '{path.rstrip('/')}/*.parquet'"


def _open_parquet(path: str) -> tuple[int, pa.Schema]:
    """(rows, arrow schema) from the file's footer, or ConfigError naming the file."""
    try:
        with FileSystems.open(path) as f:
            pf = pq.ParquetFile(f)
            return pf.metadata.num_rows, pf.schema_arrow
    except (PermissionError, FileNotFoundError) as err:
        raise ConfigError(f"cannot read input file {path} ({_short(err)}): check --input and its permissions") from None
    except Exception as err:  # noqa: BLE001 - ArrowInvalid, OSError, EOFError, a footer pyarrow cannot parse
        raise ConfigError(f"input file {path} is not a readable Parquet file, or is cut short or corrupt ({_short(err)}): "
                          "fix or remove it, or narrow --input") from None


def _schema_difference(a: pa.Schema, b: pa.Schema) -> str:
    """How schema `b` differs from `a`, in a few words."""
    a_types, b_types = {f.name: f for f in a}, {f.name: f for f in b}
    parts = []
    missing = [n for n in a.names if n not in b_types]
    extra = [n for n in b.names if n not in a_types]
    if missing:
        parts.append(f"no column(s) {missing}")
    if extra:
        parts.append(f"extra column(s) {extra}")
    for name in a.names:
        if name in b_types and not a_types[name].equals(b_types[name]):
            fa, fb = a_types[name], b_types[name]
            if fa.type != fb.type:
                parts.append(f"{name!r} is {fb.type}, not {fa.type}")
            else:
                parts.append(f"{name!r} is {'nullable' if fb.nullable else 'not nullable'} there")
    if not parts:
        parts.append(f"the columns are in another order: {b.names}")
    return "; ".join(parts)


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return any(t.equals(x) for x in TEXT_TYPES)


def _is_numeric(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_null(t)


def check_columns(schema: pa.Schema, columns: InputConfig, where: str = "the input") -> None:
    """The column checks of `inspect_input` on a schema alone: URL and caption present and text,
    declared width/height numeric where present, no input column named like a kiln field."""
    twice = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if twice:
        raise ConfigError(f"{where} has more than one column named {twice}: rename them so each column name is unique")
    for flag, col, what in (("--url-col", columns.url_col, "URL"), ("--caption-col", columns.caption_col, "caption")):
        if col not in schema.names:
            raise ConfigError(f"input has no {col!r} column ({flag}); the columns of {where} are {schema.names}: "
                              f"pass {flag} NAME to name the right one")
        t = schema.field(col).type
        if not _is_text(t):
            raise ConfigError(f"input column {col!r} ({flag}) in {where} is {t}, not text (string or binary): "
                              f"pass {flag} NAME naming the {what} column, or convert it to string")
    for flag, col in (("--width-col", columns.width_col), ("--height-col", columns.height_col)):
        if col in schema.names and not _is_numeric(schema.field(col).type):
            raise ConfigError(f"input column {col!r} ({flag}) in {where} is {schema.field(col).type}, not a number: "
                              f"convert it to an integer column, or pass {flag} NAME naming a numeric one (or a name the input lacks)")
    clash = kiln_column_clashes(schema.names)
    if clash:
        raise ConfigError(f"input column(s) {clash} clash with fields kiln adds to every sample (in {where}); "
                          "rename or drop them in the input")


def inspect_input(pattern: str, columns: InputConfig) -> InputInfo:
    """Every check of the input that needs no row, from the Parquet footers alone: raises
    `ConfigError` (one line naming the file or column and what to do) for no matching file, a
    directory, a file that is not Parquet or is truncated, files with different schemas, and the
    column problems of `check_columns`. Local paths and any Beam filesystem (gs://, s3://, ...)."""
    if not pattern or not pattern.strip():
        raise ConfigError("--input is empty: pass the metadata parquet file or a glob such as DIR/*.parquet")
    if pattern.endswith("/") or _is_local_dir(pattern):
        raise ConfigError(_directory_hint(pattern))
    matched = _match(pattern)
    if not matched:
        if FileSystems.get_scheme(pattern) is not None and _match(pattern.rstrip("/") + "/*"):
            raise ConfigError(_directory_hint(pattern))  # an object-store "directory": a prefix with objects under it
        raise ConfigError(f"no input files match {pattern!r}: check --input (a Parquet file or a glob such as DIR/*.parquet)")
    files, schema, first = [], None, None
    for m in matched:
        if _is_local_dir(m.path) or m.path.endswith("/"):
            raise ConfigError(_directory_hint(m.path) if len(matched) == 1 else
                              f"--input {pattern!r} matches the directory {m.path}: narrow the glob to the files, e.g. '*.parquet'")
        rows, file_schema = _open_parquet(m.path)
        if schema is None:
            schema, first = file_schema, m.path
        elif not file_schema.equals(schema, check_metadata=False):
            raise ConfigError(f"input file {m.path} has a different schema from {first} ({_schema_difference(schema, file_schema)}): "
                              "every input file must have the same columns and types")
        files.append({"path": m.path, "bytes": m.size_in_bytes, "rows": rows})
    where = first if len(files) == 1 else f"{first} (and the {len(files) - 1} other input file(s))"
    check_columns(schema, columns, where)
    id_type = schema.field(columns.id_col).type if columns.id_col in schema.names else None
    return InputInfo(rows=sum(f["rows"] for f in files), files=files, schema=schema, id_type=id_type)


# -- rows from a table ---------------------------------------------------------------------------

# A decoder turns one Python value of a column read as bytes back into the column's own value,
# decoding bytes as UTF-8 with `errors` ("strict": a bad byte raises UnicodeDecodeError).
Decoder = Callable[[object, str], object]


def _decode_bytes(v, errors):
    return None if v is None else v.decode("utf-8", errors)


def _decoder(t: pa.DataType, force_bytes: bool = False) -> Decoder | None:
    """The decoder for type `t`, or None when `t` holds no text. `force_bytes`: a binary URL/caption."""
    if pa.types.is_dictionary(t):
        return _decoder(t.value_type, force_bytes)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return _decode_bytes
    if force_bytes and (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        return _decode_bytes
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = _decoder(t.value_type)
        return None if inner is None else (lambda v, e: None if v is None else [inner(x, e) for x in v])
    if pa.types.is_map(t):
        kd, id_ = _decoder(t.key_type), _decoder(t.item_type)
        if kd is None and id_ is None:
            return None
        kd, id_ = kd or (lambda v, e: v), id_ or (lambda v, e: v)
        return lambda v, e: None if v is None else [(kd(k, e), id_(x, e)) for k, x in v]
    if pa.types.is_struct(t):
        subs = {t.field(i).name: _decoder(t.field(i).type) for i in range(t.num_fields)}
        subs = {k: d for k, d in subs.items() if d is not None}
        if not subs:
            return None
        return lambda v, e: None if v is None else {k: (subs[k](x, e) if k in subs else x) for k, x in v.items()}
    return None


def _as_bytes_type(t: pa.DataType) -> pa.DataType:
    """`t` with every string type replaced by its binary twin (same layout: casting never validates UTF-8)."""
    if pa.types.is_dictionary(t):
        return _as_bytes_type(t.value_type)  # read dense: to_pylist gives the values either way
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_as_bytes_type(t.value_type)))
    if pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_as_bytes_type(t.value_type)))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_as_bytes_type(t.value_type)), t.list_size)
    if pa.types.is_map(t):
        return pa.map_(_as_bytes_type(t.key_type), t.item_field.with_type(_as_bytes_type(t.item_type)))
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_as_bytes_type(t.field(i).type)) for i in range(t.num_fields)])
    return t


def _as_str_type(t: pa.DataType) -> pa.DataType:
    """A binary URL/caption column's text twin (casting to it checks UTF-8); other types as they are."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_binary(t):
        return pa.string()
    if pa.types.is_large_binary(t):
        return pa.large_string()
    return t


def _utf8_detail(col: str, err: UnicodeDecodeError) -> str:
    return f"{col}: not valid UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start})"


def _values_one_by_one(arr: pa.Array, col: str, problems: dict) -> list:
    """A column that would not convert as a whole: value by value, a failing one None + a problem."""
    out = []
    for i in range(len(arr)):
        try:
            out.append(arr[i].as_py())
        except UnicodeDecodeError as err:
            out.append(None)
            problems.setdefault(i, ("invalid_utf8", _utf8_detail(col, err)))
        except Exception as err:  # noqa: BLE001 - out-of-range timestamps/dates, ... : the row, not the job
            out.append(None)
            problems.setdefault(i, ("unreadable_value", f"{col}: {type(err).__name__}: {_short(err, 120)}"))
    return out


def _column(arr: pa.Array, col: str, decoder: Decoder | None, problems: dict) -> tuple[list, list | None]:
    """(values, raw): the column's Python values (text decoded, undecodable bytes as \\xNN escapes)
    and, for a text column, the values as bytes (the uid of an undecodable row is over them)."""
    if decoder is None:
        try:
            return arr.to_pylist(), None
        except Exception:  # noqa: BLE001
            return _values_one_by_one(arr, col, problems), None
    try:
        # The common case at C speed: the whole batch is valid UTF-8 (validate / a cast to string
        # checks it), so pyarrow's own conversion cannot raise.
        text = arr.cast(_as_str_type(arr.type))
        text.validate(full=True)
        return text.to_pylist(), None
    except Exception:  # noqa: BLE001 - some value is not UTF-8: value by value below
        pass
    try:
        raw = arr.cast(_as_bytes_type(arr.type)).to_pylist()
    except Exception:  # noqa: BLE001 - a nesting pyarrow cannot cast: value by value instead
        return _values_one_by_one(arr, col, problems), None
    values = []
    for i, v in enumerate(raw):
        try:
            values.append(decoder(v, "strict"))
        except UnicodeDecodeError as err:
            problems.setdefault(i, ("invalid_utf8", _utf8_detail(col, err)))
            values.append(decoder(v, "backslashreplace"))
    return values, raw


def _plan(schema: pa.Schema, columns: InputConfig) -> list[tuple[str, Decoder | None]]:
    text_cols = (columns.url_col, columns.caption_col)
    return [(f.name, _decoder(f.type, force_bytes=f.name in text_cols)) for f in schema]


def rows_from_table(table: pa.Table | pa.RecordBatch, columns: InputConfig, plan=None) -> Iterator[dict]:
    """The table's rows as dicts (pyarrow's to_pylist values), text decoded per value, each with its
    `uid`; a row with a value that could not be read carries `_unreadable` = (reason, detail)."""
    plan = plan if plan is not None else _plan(table.schema, columns)
    batches = table.to_batches(max_chunksize=ROWS_PER_BATCH) if isinstance(table, pa.Table) else [table]
    for batch in batches:
        n = batch.num_rows
        problems: dict[int, tuple[str, str]] = {}
        data, raw = {}, {}
        for name, decoder in plan:
            col_problems: dict = {}
            data[name], raw[name] = _column(batch.column(name), name, decoder, col_problems)
            for i, p in col_problems.items():
                if i in problems:
                    problems[i] = (problems[i][0], f"{problems[i][1]}; {p[1]}")
                else:
                    problems[i] = p
        url, cap = columns.url_col, columns.caption_col
        for i in range(n):
            row = {name: data[name][i] for name, _ in plan}
            if i in problems:
                # The uid of a row with undecodable text is over its raw bytes: never a text row's uid.
                u = raw[url][i] if raw.get(url) is not None else row.get(url)
                c = raw[cap][i] if raw.get(cap) is not None else row.get(cap)
                u = row.get(url) if isinstance(u, (bytes, bytearray)) and _decodes(u) else u
                c = row.get(cap) if isinstance(c, (bytes, bytearray)) and _decodes(c) else c
                row["uid"] = compute_uid(u, c)
                row["_unreadable"] = problems[i]
            else:
                row["uid"] = compute_uid(row.get(url), row.get(cap))
            yield row


def _decodes(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# -- the Beam transform --------------------------------------------------------------------------


class _RowsFn(beam.DoFn):
    def __init__(self, columns: InputConfig):
        self.columns = columns

    def setup(self):
        self.n_read = Metrics.counter("kiln", "read/rows")
        self._plans: dict = {}

    def process(self, table):
        key = table.schema
        plan = self._plans.get(key)
        if plan is None:
            # inspect_input refuses these before the job starts; a caller that skipped it fails here
            # rather than have an input column silently overwritten.
            check_columns(table.schema, self.columns)
            plan = self._plans[key] = _plan(table.schema, self.columns)
        for row in rows_from_table(table, self.columns, plan):
            self.n_read.inc()
            yield row


class ReadMetadata(beam.PTransform):
    """PBegin -> one dict per input row, with `uid` (and `_unreadable` where a value could not be
    read); counts `kiln:read/rows`. `pattern` defaults to `columns.input`. Call `inspect_input`
    first: the input checks run there, before any work."""

    def __init__(self, columns: InputConfig, pattern: str | None = None, min_bundle_size: int = 0):
        super().__init__()
        self.columns = columns
        self.pattern = pattern if pattern is not None else columns.input
        self.min_bundle_size = min_bundle_size

    def expand(self, pbegin):
        return (
            pbegin
            | "ReadRowGroups" >> beam.io.ReadFromParquetBatched(self.pattern, min_bundle_size=self.min_bundle_size, validate=False)
            | "DecodeRows" >> beam.ParDo(_RowsFn(self.columns))
        )
