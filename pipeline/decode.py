"""Decode and Resize stages: Beam adapters over pipeline.image's pure functions."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pipeline.image import DEFAULT_MAX_PIXELS, ResizeConfig, decode_image, resize_and_encode
from pipeline.records import STAGE_DECODE, STAGE_RESIZE
from pipeline.stage import ThreadedStage


@dataclass(frozen=True)
class DecodeConfig:
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_image_size: int = 64
    max_aspect_ratio: float = 3.0
    draft_target: int | None = None  # set to the stored image size so large JPEGs decode reduced


def decode_record(record: dict, cfg: DecodeConfig) -> dict:
    """Stage function: `_body` bytes -> `_bgr` array plus the original size and format."""
    record = dict(record)
    decoded = decode_image(
        record.pop("_body"),
        max_pixels=cfg.max_pixels,
        min_image_size=cfg.min_image_size,
        max_aspect_ratio=cfg.max_aspect_ratio,
        draft_target=cfg.draft_target,
    )
    record["_bgr"] = decoded.bgr
    record["original_width"] = decoded.original_width
    record["original_height"] = decoded.original_height
    record["source_format"] = decoded.source_format
    return record


def resize_record(record: dict, cfg: ResizeConfig) -> dict:
    """Stage function: `_bgr` -> `_image` (encoded bytes) with the stored size and its sha256."""
    record = dict(record)
    data, width, height = resize_and_encode(record.pop("_bgr"), cfg)
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


def Decode(cfg: DecodeConfig, threads: int = 2, batch_size: int = 16) -> ThreadedStage:
    return ThreadedStage(STAGE_DECODE, _Bind(decode_record, cfg), threads, batch_size, error_reason="decode_error")


def Resize(cfg: ResizeConfig, threads: int = 2, batch_size: int = 16) -> ThreadedStage:
    return ThreadedStage(STAGE_RESIZE, _Bind(resize_record, cfg), threads, batch_size, error_reason="resize_error")
