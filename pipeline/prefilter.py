"""Prefilter: the checks that need only the metadata row, run before anything is downloaded.

`prefilter_row` is a pure function over one metadata row; `choose_duplicate` picks, among rows that
share a uid (same url + caption), the one to keep. `Prefilter` and `Dedup` are their Beam adapters.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.records import STAGE_PREFILTER, Reject, RejectRow

ALLOWED_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class PrefilterConfig:
    min_caption_chars: int = 3
    max_caption_chars: int = 1000  # LAION alt-texts beyond this are mostly keyword spam / page text
    min_image_size: int = 64  # shorter side, px: the cascade's base stage is 64x64
    max_aspect_ratio: float = 3.0  # a center crop of a 3:1 image keeps only a third of it
    url_column: str = "URL"
    caption_column: str = "TEXT"
    width_column: str = "WIDTH"
    height_column: str = "HEIGHT"


def _declared_size(row: dict, cfg: PrefilterConfig) -> tuple[int, int] | None:
    """WIDTH/HEIGHT from the metadata when both are present and positive; None when unknown."""
    w, h = row.get(cfg.width_column), row.get(cfg.height_column)
    try:
        w, h = int(w), int(h)
    except (TypeError, ValueError):
        return None
    return (w, h) if w > 0 and h > 0 else None


def prefilter_row(row: dict, cfg: PrefilterConfig) -> None:
    """Raise `Reject` (stage "prefilter") if the row cannot become a sample; return None if it passes.

    Order matters only for which reason a doubly bad row gets: URL first, then caption, then size.
    """
    url = row.get(cfg.url_column)
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

    caption = row.get(cfg.caption_column)
    if caption is None:
        raise Reject(STAGE_PREFILTER, "caption_missing", "TEXT is null")
    stripped = str(caption).strip()
    if not stripped:
        raise Reject(STAGE_PREFILTER, "caption_empty", f"caption is {len(caption)} whitespace characters")
    if len(stripped) < cfg.min_caption_chars:
        raise Reject(STAGE_PREFILTER, "caption_too_short", f"{len(stripped)} < {cfg.min_caption_chars} characters")
    if len(stripped) > cfg.max_caption_chars:
        raise Reject(STAGE_PREFILTER, "caption_too_long", f"{len(stripped)} > {cfg.max_caption_chars} characters")

    size = _declared_size(row, cfg)
    if size is not None:
        w, h = size
        if min(w, h) < cfg.min_image_size:
            raise Reject(STAGE_PREFILTER, "declared_too_small", f"declared {w}x{h} < {cfg.min_image_size} px")
        if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
            raise Reject(
                STAGE_PREFILTER, "declared_aspect_ratio", f"declared {w}x{h}, ratio {max(w, h) / min(w, h):.2f} > {cfg.max_aspect_ratio}"
            )


def _duplicate_order(row: dict) -> tuple:
    """Sort key among duplicates: smallest SAMPLE_ID first, then the row's canonical JSON (total order)."""
    sid = row.get("SAMPLE_ID")
    return (sid is None, str(type(sid)), sid if sid is not None else 0, json.dumps(row, sort_keys=True, default=str))


def choose_duplicate(rows: list[dict]) -> tuple[dict, list[dict]]:
    """Return (kept, dropped) for rows that share a uid. Deterministic whatever the input order."""
    ordered = sorted(rows, key=_duplicate_order)
    return ordered[0], ordered[1:]


def reject_row(row: dict, stage: str, reason: str, detail: str, url_column: str = "URL") -> dict:
    """A rejects-table row (plus the shard routing key) for an input row."""
    out = RejectRow(row["uid"], row.get("SAMPLE_ID"), row.get(url_column), stage, reason, detail).as_dict()
    return out


class _PrefilterFn(beam.DoFn):
    def __init__(self, cfg: PrefilterConfig):
        self.cfg = cfg

    def setup(self):
        self.n_in = Metrics.counter("kiln", f"{STAGE_PREFILTER}/in")
        self.n_passed = Metrics.counter("kiln", f"{STAGE_PREFILTER}/passed_row_checks")
        self.n_rej = Metrics.counter("kiln", f"{STAGE_PREFILTER}/rejected")

    def process(self, row):
        self.n_in.inc()
        try:
            prefilter_row(row, self.cfg)
        except Reject as rej:
            self.n_rej.inc()
            Metrics.counter("kiln", f"reject/{rej.stage}/{rej.reason}").inc()
            yield beam.pvalue.TaggedOutput("rejects", reject_row(row, rej.stage, rej.reason, rej.detail, self.cfg.url_column))
            return
        self.n_passed.inc()
        yield row


class _DedupFn(beam.DoFn):
    def setup(self):
        # The prefilter's "out" is counted here, after dedup, so in == out + rejected holds.
        self.n_out = Metrics.counter("kiln", f"{STAGE_PREFILTER}/out")
        self.n_rej = Metrics.counter("kiln", f"{STAGE_PREFILTER}/rejected")

    def process(self, uid_rows, url_column: str):
        _, rows = uid_rows
        kept, dropped = choose_duplicate(list(rows))
        self.n_out.inc()
        yield kept
        for row in dropped:
            # A prefilter reject: the row passed the row checks but repeats a kept one.
            self.n_rej.inc()
            Metrics.counter("kiln", f"reject/{STAGE_PREFILTER}/duplicate").inc()
            yield beam.pvalue.TaggedOutput(
                "rejects", reject_row(row, STAGE_PREFILTER, "duplicate", f"same url+caption as SAMPLE_ID {kept.get('SAMPLE_ID')}", url_column)
            )


class Prefilter(beam.PTransform):
    """rows (with uid) -> {"main": rows that pass, "rejects": reject rows}; then dedup by uid."""

    def __init__(self, cfg: PrefilterConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, rows):
        checked = rows | "CheckRow" >> beam.ParDo(_PrefilterFn(self.cfg)).with_outputs("rejects", main="main")
        deduped = (
            checked.main
            | "KeyByUid" >> beam.Map(lambda r: (r["uid"], r))
            | "GroupByUid" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(_DedupFn(), self.cfg.url_column).with_outputs("rejects", main="main")
        )
        rejects = (checked.rejects, deduped.rejects) | "MergeRejects" >> beam.Flatten()
        return {"main": deduped.main, "rejects": rejects}
