"""Prefilter: the checks that need only the metadata row, run before anything is downloaded.

`prefilter_row` is a pure function over one metadata row; `choose_duplicate` picks, among rows that
share a uid (same url + caption), the one to keep. `Prefilter` is their Beam adapter (row checks,
then dedup by uid).
"""

from __future__ import annotations

import decimal
import json
import math
import numbers
import urllib.parse

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.config import ImageConfig, InputConfig, PrefilterConfig
from pipeline.records import STAGE_PREFILTER, Reject, reject_row
from pipeline.stage import StageCounters

ALLOWED_SCHEMES = ("http", "https")


def _text_value(row: dict, col: str, missing_reason: str, what: str) -> str:
    """The row's `col` value as text, or Reject: null -> `missing_reason`, bytes that are not UTF-8
    -> invalid_utf8, any other non-text value (a number, NaN, ...) -> not_text."""
    value = row.get(col)
    if value is None:
        raise Reject(STAGE_PREFILTER, missing_reason, f"{what} ({col}) is null")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise Reject(STAGE_PREFILTER, "invalid_utf8", f"{col}: {_utf8_error(err)}") from None
    if not isinstance(value, str):
        raise Reject(STAGE_PREFILTER, "not_text", f"{what} ({col}) is {type(value).__name__} {_short(value)}, not text")
    return value


def _utf8_error(err: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start})"


def _short(value, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _check_url(row: dict, columns: InputConfig) -> None:
    url = _text_value(row, columns.url_col, "url_missing", "URL")
    url = url.strip()
    if not url:
        raise Reject(STAGE_PREFILTER, "url_missing", "URL is empty")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as err:
        raise Reject(STAGE_PREFILTER, "url_invalid", f"{err}") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise Reject(STAGE_PREFILTER, "url_scheme", f"scheme {scheme or '(none)'!r} not in {ALLOWED_SCHEMES}")
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as err:
        raise Reject(STAGE_PREFILTER, "url_invalid", f"{err}") from None
    if not host:
        raise Reject(STAGE_PREFILTER, "url_invalid", "URL has no host")


def _check_caption(row: dict, cfg: PrefilterConfig, columns: InputConfig) -> None:
    caption = _text_value(row, columns.caption_col, "caption_missing", "caption")
    stripped = caption.strip()
    if not stripped:
        raise Reject(STAGE_PREFILTER, "caption_empty", f"caption is {len(caption)} whitespace characters")
    if len(stripped) < cfg.min_caption_chars:
        raise Reject(STAGE_PREFILTER, "caption_too_short", f"{len(stripped)} < {cfg.min_caption_chars} characters")
    if len(stripped) > cfg.max_caption_chars:
        raise Reject(STAGE_PREFILTER, "caption_too_long", f"{len(stripped)} > {cfg.max_caption_chars} characters")


def _declared_side(value, col: str, image: ImageConfig) -> int | None:
    """One declared side in px; None when unknown (null, NaN, 0); Reject declared_size_invalid when
    it cannot be a size: not a number, infinite, negative, or above --max-image-pixels (no image that
    wide could pass the decoder's pixel limit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, decimal.Decimal)):
        raise Reject(STAGE_PREFILTER, "declared_size_invalid", f"{col} is {type(value).__name__} {_short(value)}, not a number")
    try:
        number = float(value)
    except (OverflowError, ValueError):  # a Decimal beyond float's range
        number = math.inf
    if math.isnan(number):
        return None
    if math.isinf(number) or number < 0:
        raise Reject(STAGE_PREFILTER, "declared_size_invalid", f"{col} is {_short(value)}")
    side = int(value) if isinstance(value, numbers.Integral) else int(number)
    if side > image.max_image_pixels:
        raise Reject(STAGE_PREFILTER, "declared_size_invalid", f"{col} is {side} px, above --max-image-pixels {image.max_image_pixels}")
    return side or None


def _declared_size(row: dict, columns: InputConfig, image: ImageConfig = ImageConfig()) -> tuple[int, int] | None:
    """The declared (width, height) (--width-col/--height-col) when both are known and positive;
    None when either is unknown (absent, null, NaN, 0); Reject when either is not a usable size."""
    w = _declared_side(row.get(columns.width_col), columns.width_col, image)
    h = _declared_side(row.get(columns.height_col), columns.height_col, image)
    return (w, h) if w and h else None


def _check_declared_size(row: dict, image: ImageConfig, columns: InputConfig) -> None:
    size = _declared_size(row, columns, image)
    if size is not None:
        w, h = size
        if min(w, h) < image.min_image_size:
            raise Reject(STAGE_PREFILTER, "declared_too_small", f"declared {w}x{h} < {image.min_image_size} px")
        if max(w, h) / min(w, h) > image.max_aspect_ratio:
            raise Reject(
                STAGE_PREFILTER, "declared_aspect_ratio", f"declared {w}x{h}, ratio {max(w, h) / min(w, h):.2f} > {image.max_aspect_ratio}"
            )


def _check_readable(row: dict) -> None:
    """A row pipeline.read could not read as it is (invalid UTF-8 in a text column, ...) carries
    `_unreadable` = (reason, detail)."""
    problem = row.get("_unreadable")
    if problem:
        reason, detail = problem
        raise Reject(STAGE_PREFILTER, reason, detail)


def prefilter_row(row: dict, cfg: PrefilterConfig, image: ImageConfig = ImageConfig(), columns: InputConfig = InputConfig()) -> None:
    """Raise `Reject` (stage "prefilter") if the row cannot become a sample; return None if it passes.

    `image` gives the size rules applied to the declared size; `columns` the input's column names.
    Any value of any type gives a pass or a Reject, never another exception. Order matters only for
    which reason a doubly bad row gets: readability first, then URL, caption, declared size.
    """
    _check_readable(row)
    _check_url(row, columns)
    _check_caption(row, cfg, columns)
    _check_declared_size(row, image, columns)


def _id_order(sid) -> tuple:
    """A sort key for an id of any type: numbers and text by value (NaN after the numbers), anything
    else (a struct, a list, ...) by its canonical JSON, so ids never need to be comparable."""
    if isinstance(sid, float) and math.isnan(sid):
        return (1, 0)
    if isinstance(sid, (numbers.Real, str, bytes)) and not isinstance(sid, bool):
        return (0, sid)
    return (0, json.dumps(sid, sort_keys=True, default=str))


def _duplicate_order(row: dict, id_col: str) -> tuple:
    """Sort key among duplicates: smallest id (--id-col) first, then the row's canonical JSON (total order)."""
    sid = row.get(id_col)
    return (sid is None, str(type(sid)), _id_order(sid) if sid is not None else (0, 0), json.dumps(row, sort_keys=True, default=str))


def choose_duplicate(rows: list[dict], id_col: str = "SAMPLE_ID") -> tuple[dict, list[dict]]:
    """Return (kept, dropped) for rows that share a uid. Deterministic whatever the input order."""
    ordered = sorted(rows, key=lambda r: _duplicate_order(r, id_col))
    return ordered[0], ordered[1:]


class _PrefilterFn(beam.DoFn):
    def __init__(self, cfg: PrefilterConfig, image: ImageConfig, columns: InputConfig):
        self.cfg, self.image, self.columns = cfg, image, columns

    def setup(self):
        self.counters = StageCounters(STAGE_PREFILTER)
        self.n_passed = Metrics.counter("kiln", f"{STAGE_PREFILTER}/passed_row_checks")

    def process(self, row):
        self.counters.n_in.inc()
        try:
            prefilter_row(row, self.cfg, self.image, self.columns)
        except Reject as rej:
            self.counters.reject(rej)
            yield beam.pvalue.TaggedOutput("rejects", reject_row(row, rej, self.columns.url_col, self.columns.id_col))
            return
        self.n_passed.inc()
        yield row


class _DedupFn(beam.DoFn):
    def __init__(self, columns: InputConfig):
        self.columns = columns

    def setup(self):
        # The prefilter's "out" is counted here, after dedup, so in == out + rejected holds.
        self.counters = StageCounters(STAGE_PREFILTER)

    def process(self, uid_rows):
        _, rows = uid_rows
        kept, dropped = choose_duplicate(list(rows), self.columns.id_col)
        self.counters.n_out.inc()
        yield kept
        for row in dropped:
            # A prefilter reject: the row passed the row checks but repeats a kept one.
            rej = Reject(STAGE_PREFILTER, "duplicate", f"same url+caption as {self.columns.id_col} {kept.get(self.columns.id_col)}")
            self.counters.reject(rej)
            yield beam.pvalue.TaggedOutput("rejects", reject_row(row, rej, self.columns.url_col, self.columns.id_col))


class Prefilter(beam.PTransform):
    """rows (with uid) -> {"main": rows that pass, "rejects": reject rows}; then dedup by uid."""

    def __init__(self, cfg: PrefilterConfig, image: ImageConfig, columns: InputConfig):
        super().__init__()
        self.cfg, self.image, self.columns = cfg, image, columns

    def expand(self, rows):
        checked = rows | "CheckRow" >> beam.ParDo(_PrefilterFn(self.cfg, self.image, self.columns)).with_outputs("rejects", main="main")
        deduped = (
            checked.main
            | "KeyByUid" >> beam.Map(lambda r: (r["uid"], r))
            | "GroupByUid" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(_DedupFn(self.columns)).with_outputs("rejects", main="main")
        )
        rejects = (checked.rejects, deduped.rejects) | "MergeRejects" >> beam.Flatten()
        return {"main": deduped.main, "rejects": rejects}
