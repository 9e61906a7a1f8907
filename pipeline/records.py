"""What every stage passes along: a sample's key (`uid`) and, for a failure, a reject row.

Stages and reasons are a closed vocabulary so the rejects table, stats.json and the dataset card
can be grouped without parsing free text. `detail` carries the free text (status line, address,
directive, sizes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

# Stage names, in the order a row meets them.
STAGE_PREFILTER = "prefilter"
STAGE_TOXICITY = "toxicity"  # caption toxicity: text only, so before any download
STAGE_DOWNLOAD = "download"
STAGE_DECODE = "decode"
STAGE_RESIZE = "resize"
STAGE_CLIP = "clip"  # CLIP image-text similarity
STAGE_NSFW = "nsfw"  # LAION's NSFW head on the same CLIP image embedding
STAGE_T5 = "t5"  # frozen T5 caption embedding, survivors only
STAGES = (STAGE_PREFILTER, STAGE_TOXICITY, STAGE_DOWNLOAD, STAGE_DECODE, STAGE_RESIZE, STAGE_CLIP, STAGE_NSFW, STAGE_T5)

# Reasons. Download reasons for HTTP errors are built as f"http_{status}" (http_404, http_410, ...).
PREFILTER_REASONS = (
    "url_missing",  # null or empty URL
    "url_scheme",  # not http/https (file://, ftp://, data:, ...); detail names the scheme
    "url_invalid",  # unparseable URL / no host
    "caption_missing",  # null caption
    "caption_empty",  # empty or whitespace-only caption
    "caption_too_short",
    "caption_too_long",
    "declared_too_small",  # WIDTH/HEIGHT from the metadata below --min-image-size
    "declared_aspect_ratio",  # WIDTH/HEIGHT from the metadata beyond --max-aspect-ratio
    "duplicate",  # same uid (url + caption) as a row that was kept
)
DOWNLOAD_REASONS = (
    "private_address",  # resolves to loopback/private/link-local/CGNAT/multicast/metadata/... and not in --allow-hosts
    "url_scheme",  # a redirect to a non-http(s) URL
    "url_invalid",
    "dns_error",
    "connection_error",
    "timeout",  # the total per-URL deadline passed (slow drip, stalled connection, ...)
    "too_many_redirects",
    "too_large",  # Content-Length or streamed bytes above --max-bytes
    "empty_body",  # 200 with zero bytes
    "robots_noai",
    "robots_noimageai",
    "robots_noindex",
    "robots_noimageindex",
    "http_error",  # a non-2xx status that has no http_<code> spelling (never used for standard codes)
)
DECODE_REASONS = (
    "not_an_image",  # bytes are not a recognised image (HTML served as image/jpeg, ...)
    "unsupported_format",  # an image format outside the allowed list
    "decompression_bomb",  # declared pixel count above --max-image-pixels (checked before decoding pixels)
    "truncated",  # image data ends early
    "decode_error",
    "too_small",  # decoded shorter side below --min-image-size
    "aspect_ratio",  # decoded aspect ratio beyond --max-aspect-ratio
)
RESIZE_REASONS = ("resize_error",)
TOXICITY_REASONS = ("toxic",)  # max score over the chosen Detoxify labels above --max-toxicity
CLIP_REASONS = ("clip_similarity_low",)  # cosine similarity below --min-clip-similarity
NSFW_REASONS = ("punsafe_high",)  # punsafe above --max-punsafe
T5_REASONS = ("t5_fp16_overflow",)  # an embedding value outside float16's finite range
# Each model stage also has "<stage>_error" for a record its model could not score.


class Reject(Exception):
    """Raised by a pure stage function: the row leaves the pipeline with this stage and reason."""

    def __init__(self, stage: str, reason: str, detail: str = ""):
        super().__init__(f"{stage}/{reason}: {detail}")
        self.stage = stage
        self.reason = reason
        self.detail = detail


def compute_uid(url: str | None, caption: str | None) -> str:
    """A sample's key: 32 hex chars of sha256 over (url, caption), exactly as given.

    JSON-encoding the pair keeps None distinct from "" and makes the encoding unambiguous.
    Stable across Python versions and runs; usable as a webdataset key (no dots).
    """
    payload = json.dumps([url, caption], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class RejectRow:
    uid: str
    sample_id: object
    url: str | None
    stage: str
    reason: str
    detail: str = ""

    def as_dict(self) -> dict:
        return {
            "uid": self.uid,
            "SAMPLE_ID": self.sample_id,
            "url": self.url,
            "stage": self.stage,
            "reason": self.reason,
            "detail": self.detail[:1000],
        }
