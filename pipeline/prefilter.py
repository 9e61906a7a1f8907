"""Prefilter: the checks that need only the metadata row, run before anything is downloaded.

`prefilter_row` is a pure function over one metadata row; `choose_duplicate` picks, among rows that
share a uid (same url + caption), the one to keep. `Prefilter` is their Beam adapter (row checks,
then dedup by uid).
"""

from __future__ import annotations

import json
import urllib.parse

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.config import ImageConfig, InputConfig, PrefilterConfig
from pipeline.records import STAGE_PREFILTER, Reject, reject_row
from pipeline.stage import StageCounters

ALLOWED_SCHEMES = ("http", "https")


def _declared_size(row: dict, columns: InputConfig) -> tuple[int, int] | None:
    """The declared width/height (--width-col/--height-col) when both are present and positive; None when unknown."""
    w, h = row.get(columns.width_col), row.get(columns.height_col)
    try:
        w, h = int(w), int(h)
    except (TypeError, ValueError):
        return None
    return (w, h) if w > 0 and h > 0 else None


def prefilter_row(row: dict, cfg: PrefilterConfig, image: ImageConfig = ImageConfig(), columns: InputConfig = InputConfig()) -> None:
    """Raise `Reject` (stage "prefilter") if the row cannot become a sample; return None if it passes.

    `image` gives the size rules applied to the declared size; `columns` the input's column names.
    Order matters only for which reason a doubly bad row gets: URL first, then caption, then size.
    """
    url = row.get(columns.url_col)
    if url is None or not str(url).strip():
        raise Reject(STAGE_PREFILTER, "url_missing", "URL is null" if url is None else "URL is empty")
    url = str(url).strip()
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

    caption = row.get(columns.caption_col)
    if caption is None:
        raise Reject(STAGE_PREFILTER, "caption_missing", f"{columns.caption_col} is null")
    if not isinstance(caption, str):
        caption = caption.decode("utf-8", errors="replace") if isinstance(caption, bytes) else str(caption)
    stripped = str(caption).strip()
    if not stripped:
        raise Reject(STAGE_PREFILTER, "caption_empty", f"caption is {len(caption)} whitespace characters")
    if len(stripped) < cfg.min_caption_chars:
        raise Reject(STAGE_PREFILTER, "caption_too_short", f"{len(stripped)} < {cfg.min_caption_chars} characters")
    if len(stripped) > cfg.max_caption_chars:
        raise Reject(STAGE_PREFILTER, "caption_too_long", f"{len(stripped)} > {cfg.max_caption_chars} characters")

    size = _declared_size(row, columns)
    if size is not None:
        w, h = size
        if min(w, h) < image.min_image_size:
            raise Reject(STAGE_PREFILTER, "declared_too_small", f"declared {w}x{h} < {image.min_image_size} px")
        if max(w, h) / min(w, h) > image.max_aspect_ratio:
            raise Reject(
                STAGE_PREFILTER, "declared_aspect_ratio", f"declared {w}x{h}, ratio {max(w, h) / min(w, h):.2f} > {image.max_aspect_ratio}"
            )


def _duplicate_order(row: dict, id_col: str) -> tuple:
    """Sort key among duplicates: smallest id (--id-col) first, then the row's canonical JSON (total order)."""
    sid = row.get(id_col)
    return (sid is None, str(type(sid)), sid if sid is not None else 0, json.dumps(row, sort_keys=True, default=str))


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
