"""Decode and Resize stages: Beam adapters over pipeline.image's pure functions."""

from __future__ import annotations

import hashlib
from pipeline.config import ImageConfig, InputConfig
from pipeline.image import decode_image, resize_and_encode
from pipeline.records import STAGE_DECODE, STAGE_RESIZE
from pipeline.stage import ThreadedStage


def decode_record(record: dict, cfg: ImageConfig) -> dict:
    """Stage function: `_body` bytes -> `_bgr` array plus the original size and format."""
    record = dict(record)
    decoded = decode_image(
        record.pop("_body"),
        max_pixels=cfg.max_image_pixels,
        min_image_size=cfg.min_image_size,
        max_aspect_ratio=cfg.max_aspect_ratio,
        draft_target=cfg.draft_target,
    )
    record["_bgr"] = decoded.bgr
    record["original_width"] = decoded.original_width
    record["original_height"] = decoded.original_height
    record["source_format"] = decoded.source_format
    return record


def resize_record(record: dict, cfg: ImageConfig) -> dict:
    """Stage function: `_bgr` -> `_image` (encoded bytes) with the stored size and its sha256."""
    record = dict(record)
    # The original size lets a DCT-reduced decode be cropped on the source's pixel grid.
    data, width, height = resize_and_encode(record.pop("_bgr"), cfg, (record["original_width"], record["original_height"]))
    record["_image"] = data
    record["stored_width"] = width
    record["stored_height"] = height
    record["image_bytes"] = len(data)
    record["image_sha256"] = hashlib.sha256(data).hexdigest()
    return record


class _Bind:
    """A picklable `lambda: functools.partial(fn, cfg=cfg)` for ThreadedStage's make_fn."""

    def __init__(self, fn, cfg):
        self.fn, self.cfg = fn, cfg

    def __call__(self):
        fn, cfg = self.fn, self.cfg
        return lambda record: fn(record, cfg)


def Decode(cfg: ImageConfig, columns: InputConfig, batch_size: int = 16) -> ThreadedStage:
    return ThreadedStage(STAGE_DECODE, _Bind(decode_record, cfg), columns, cfg.decode_threads, batch_size, error_reason="decode_error")


def Resize(cfg: ImageConfig, columns: InputConfig, batch_size: int = 16) -> ThreadedStage:
    return ThreadedStage(STAGE_RESIZE, _Bind(resize_record, cfg), columns, cfg.decode_threads, batch_size, error_reason="resize_error")
