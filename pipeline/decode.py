"""Decode and Resize stages: Beam adapters over pipeline.image's pure functions.

Decode is also where the checks on the image itself run, before anything of it is written: the
exact-bytes entries (sha256, md5) of every --blocklist on the downloaded bytes, C2PA's
training-and-mining assertion (pipeline.c2pa_check), then, on the decoded pixels, the PDQ hash --
recorded for every kept sample (meta's pdq_hash) and matched against the lists' pdq entries. A
match leaves as a reject row carrying ids and hashes only; the bytes are dropped with the record.
"""

from __future__ import annotations

import hashlib
from pipeline.config import ImageConfig, InputConfig
from pipeline.image import decode_image, resize_and_encode
from pipeline.records import STAGE_DECODE, STAGE_RESIZE, Reject
from pipeline.stage import ThreadedStage


def decode_record(record: dict, cfg: ImageConfig, blocklists=None, c2pa: bool = False) -> dict:
    """Stage function: `_body` bytes -> `_bgr` array plus the original size, format and PDQ hash.

    `blocklists`: a pipeline.blocklist.Blocklists (or None); `c2pa`: honour an embedded C2PA
    training-and-mining assertion (notAllowed -> reject)."""
    from pipeline.blocklist import pdq_of

    record = dict(record)
    body = record.pop("_body")
    if blocklists is not None and blocklists.needs_image_bytes:
        match = blocklists.match_image_bytes(body)
        if match is not None:
            raise Reject(STAGE_DECODE, match.reason, match.detail)
    if c2pa:
        from pipeline.c2pa_check import training_mining

        use, detail = training_mining(body, record.get("content_type"))
        if use == "notAllowed":
            raise Reject(STAGE_DECODE, "c2pa_not_allowed", detail)
    decoded = decode_image(
        body,
        max_pixels=cfg.max_image_pixels,
        min_image_size=cfg.min_image_size,
        max_aspect_ratio=cfg.max_aspect_ratio,
        draft_target=cfg.draft_target,
    )
    record["_bgr"] = decoded.bgr
    record["original_width"] = decoded.original_width
    record["original_height"] = decoded.original_height
    record["source_format"] = decoded.source_format
    record["pdq_hash"], record["pdq_quality"] = pdq_of(decoded.bgr, bgr=True)
    if blocklists is not None and blocklists.needs_pdq:
        match = blocklists.match_pdq(record["pdq_hash"])
        if match is not None:
            raise Reject(STAGE_DECODE, match.reason, match.detail)
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


class _BindDecode:
    """make_fn of the Decode stage: loads the run's blocklists once per worker process."""

    def __init__(self, cfg, consent, expected_hashes):
        self.cfg, self.consent, self.expected_hashes = cfg, consent, tuple(expected_hashes)

    def __call__(self):
        blocklists = None
        if self.consent is not None and self.consent.blocklist:
            from pipeline.optout import load_lists

            blocklists, optouts = load_lists(self.consent)
            got = [b.sha256 for b in blocklists.lists] + [o.sha256 for o in optouts]
            if got != list(self.expected_hashes):
                raise RuntimeError(f"a --blocklist/--optout-list file changed while the job ran ({got} != {list(self.expected_hashes)})")
        c2pa = bool(self.consent is not None and self.consent.c2pa)
        cfg = self.cfg
        return lambda record: decode_record(record, cfg, blocklists, c2pa)


def Decode(cfg: ImageConfig, columns: InputConfig, batch_size: int = 16, consent=None, expected_hashes=()) -> ThreadedStage:
    """`consent`: the run's ConsentConfig (its --blocklist files and --no-c2pa); `expected_hashes`: the
    sha256 of every list file the driver loaded (pipeline.optout.list_hashes)."""
    return ThreadedStage(STAGE_DECODE, _BindDecode(cfg, consent, expected_hashes), columns, cfg.decode_threads, batch_size,
                         error_reason="decode_error")


def Resize(cfg: ImageConfig, columns: InputConfig, batch_size: int = 16) -> ThreadedStage:
    return ThreadedStage(STAGE_RESIZE, _Bind(resize_record, cfg), columns, cfg.decode_threads, batch_size, error_reason="resize_error")
