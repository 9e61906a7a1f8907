"""The record: what flows between the stages of `kiln prepare`, written down once.

A record is a dict: the input row's own columns, plus the fields in `RECORD_FIELDS` below, each
set by one stage. A field is either persisted (a column of meta/NNNNNN.parquet and a key of
KEY.json, or KEY.json only) or transient (bytes, pixel arrays and the routing key, which only live
between stages). The meta schema (`pipeline.write.meta_schema`), KEY.json (`sample_json`) and
SHARDS.md's meta table all follow from this table; a test keeps SHARDS.md equal to it.

A failure becomes a reject row, built only by `reject_row`. Stages and reasons are a closed
vocabulary (`STAGES`, `REASONS`) so the rejects table, stats.json and the dataset card group
without parsing free text; `detail` carries the free text (status line, address, directive, sizes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa

# Stage names, in the order a row meets them.
STAGE_PREFILTER = "prefilter"
STAGE_BLOCKLIST = "blocklist"  # hash/id blocklists whose kind is known before download (SAMPLE_ID, URL hash, domain)
STAGE_OPTOUT = "optout"  # machine-readable opt-outs known before download: --optout-list, robots.txt, TDMRep's tdmrep.json
STAGE_TOXICITY = "toxicity"  # caption toxicity: text only, so before any download
STAGE_DOWNLOAD = "download"
STAGE_DECODE = "decode"
STAGE_RESIZE = "resize"
STAGE_CLIP = "clip"  # CLIP image-text similarity
STAGE_NSFW = "nsfw"  # LAION's NSFW head on the same CLIP image embedding
STAGE_T5 = "t5"  # frozen T5 caption embedding, survivors only
STAGE_DEDUP = "dedup"  # `kiln prepare --dedup`: duplicates among the survivors, and overlap with an evaluation set
STAGE_SUBSET = "subset"  # `kiln subset`: a parent dataset's sample left out of the child, with the rule that did it
STAGES = (STAGE_PREFILTER, STAGE_BLOCKLIST, STAGE_OPTOUT, STAGE_TOXICITY, STAGE_DOWNLOAD, STAGE_DECODE, STAGE_RESIZE, STAGE_CLIP, STAGE_NSFW, STAGE_T5,
          STAGE_DEDUP, STAGE_SUBSET)

# Dedup reasons: the same in `kiln prepare --dedup` (stage dedup) and `kiln subset --dedup` (stage subset).
# The reject row's `duplicate_of` names the kept sample (uid) it duplicates; for eval_overlap, the
# evaluation image's name.
DEDUP_REASONS = (
    "duplicate_exact",  # same sha256 of the stored image bytes as a kept sample
    "duplicate_pdq",  # PDQ hash within the Hamming radius of a kept sample's
    "duplicate_semantic",  # CLIP image embedding within the cosine radius of a kept sample's
    "eval_overlap",  # near an image of the --decontaminate evaluation set (PDQ radius or CLIP cosine)
)

# The closed vocabulary of reasons, per stage. Download reasons for HTTP errors are spelled
# f"http_{status}" (http_404, http_410, ...); every model stage also has "<stage>_error" for a record
# its model could not score. `reject_row` refuses a reason outside this table: a new failure mode
# must be named here (and in SHARDS.md) before a stage can emit it.
REASONS = {
    STAGE_PREFILTER: (
        "url_missing",  # null or empty URL
        "url_scheme",  # not http/https (file://, ftp://, data:, ...); detail names the scheme
        "url_invalid",  # unparseable URL / no host
        "caption_missing",  # null caption
        "caption_empty",  # empty or whitespace-only caption
        "caption_too_short",
        "caption_too_long",
        "declared_too_small",  # declared width/height below --min-image-size
        "declared_aspect_ratio",  # declared width/height beyond --max-aspect-ratio
        "declared_size_invalid",  # declared width/height negative, infinite, not numeric, or a side above --max-image-pixels
        "invalid_utf8",  # a text value of the row is not valid UTF-8; detail names the column
        "not_text",  # the URL or caption value is not text (a number, ...); detail names the column and type
        "unreadable_value",  # a value of the row could not be converted from Parquet (out-of-range date, ...)
        "duplicate",  # same uid (url + caption) as a row that was kept
    ),
    # A --blocklist entry matched; detail names the list and the entry (ids and hashes only).
    STAGE_BLOCKLIST: ("blocklist_sample_id", "blocklist_url_sha256", "blocklist_url_md5", "blocklist_domain"),
    STAGE_OPTOUT: (
        "optout_list",  # the URL's domain or a URL prefix is on an --optout-list file; detail names the file and entry
        "robotstxt_disallowed",  # robots.txt disallows the URL for kiln's token (its own group, else `*`)
        "robotstxt_ai_optout",  # robots.txt has a group naming an AI-crawler token (--ai-crawler-tokens) that disallows the URL
        "robotstxt_unavailable",  # robots.txt answered 5xx/429 or could not be fetched: RFC 9309's complete disallow
        "tdmrep_reserved",  # /.well-known/tdmrep.json reserves text-and-data-mining rights for the URL's path
        "tdmrep_unavailable",  # tdmrep.json answered 5xx/429, could not be fetched, or is not valid TDMRep JSON
    ),
    STAGE_TOXICITY: ("toxic", "toxicity_error"),  # max over the chosen Detoxify labels above --max-toxicity
    STAGE_DOWNLOAD: (
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
        "tdm_reservation",  # the response carries TDMRep's `tdm-reservation: 1` header
    ),
    STAGE_DECODE: (
        "not_an_image",  # bytes are not a recognised image (HTML served as image/jpeg, ...)
        "unsupported_format",  # an image format outside the allowed list
        "decompression_bomb",  # declared pixel count above --max-image-pixels (checked before decoding pixels)
        "truncated",  # image data ends early
        "decode_error",
        "too_small",  # decoded shorter side below --min-image-size
        "aspect_ratio",  # decoded aspect ratio beyond --max-aspect-ratio
        # Checked on the downloaded bytes (exact hashes) and the decoded pixels (PDQ), before anything is
        # written; detail names the list and the hash only, and the bytes are dropped.
        "blocklist_image_sha256",
        "blocklist_image_md5",
        "blocklist_pdq",  # PDQ perceptual hash within the list's Hamming threshold
        "c2pa_not_allowed",  # an embedded C2PA manifest's training-and-mining assertion says notAllowed
    ),
    STAGE_RESIZE: ("resize_error",),
    STAGE_CLIP: ("clip_similarity_low", "clip_error"),  # cosine similarity below --min-clip-similarity
    STAGE_NSFW: ("punsafe_high",),  # punsafe above --max-punsafe
    STAGE_T5: ("t5_fp16_overflow", "t5_error"),  # an embedding value outside float16's finite range
    STAGE_DEDUP: DEDUP_REASONS,
    # `kiln subset`: the rule that left a parent sample out; detail names the rule and the values.
    STAGE_SUBSET: (
        "where",  # the --where expression (or a threshold flag) is false or null for the sample
        "license_not_allowed",  # the licence column's value is not in --licenses
        "too_small",  # stored image below --min-stored-size
        "uid_dropped",  # the uid is on a --drop-uids list
        "uid_not_listed",  # --keep-uids was given and the uid is not on it
        "blocklist_sample_id", "blocklist_url_sha256", "blocklist_url_md5", "blocklist_domain",
        "blocklist_image_sha256", "blocklist_pdq",  # a --blocklist entry matched the stored ids/hashes
        "optout_list",  # an --optout-list entry matched the stored URL
        *DEDUP_REASONS,
    ),
}


def known_reason(stage: str, reason: str) -> bool:
    if stage == STAGE_DOWNLOAD and reason.startswith("http_") and reason[5:].isdigit():
        return True
    return reason in REASONS.get(stage, ())


class Reject(Exception):
    """Raised by a pure stage function: the row leaves the pipeline with this stage and reason."""

    def __init__(self, stage: str, reason: str, detail: str = "", duplicate_of: str | None = None):
        super().__init__(f"{stage}/{reason}: {detail}")
        self.stage = stage
        self.reason = reason
        self.detail = detail
        self.duplicate_of = duplicate_of


def _uid_part(value):
    """A value as it enters the uid's JSON: text and None as they are (the pinned scheme); anything
    else (undecodable bytes, a number, ...) tagged with its kind, so it can never equal a text value."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(value).hex()}
    return {type(value).__name__: repr(value)}


def compute_uid(url, caption) -> str:
    """A sample's key: 32 hex chars of sha256 over (url, caption), exactly as given.

    JSON-encoding the pair keeps None distinct from "" and makes the encoding unambiguous.
    Stable across Python versions and runs; usable as a webdataset key (no dots). Any value is
    accepted (a row the prefilter will reject still needs a key): bytes, numbers, NaN and strings
    with lone surrogates hash without raising, and never to the uid of a text value.
    """
    payload = json.dumps([_uid_part(url), _uid_part(caption)], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def as_text(value) -> str:
    """`value` as text that any UTF-8 writer accepts: bytes decoded with undecodable bytes as
    \\xNN escapes, lone surrogates escaped; anything else through str()."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "backslashreplace")
    text = value if isinstance(value, str) else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text




# -- the record's fields ---------------------------------------------------------------------------

META, JSON_ONLY, TRANSIENT = "meta", "json", "transient"


@dataclass(frozen=True)
class RecordField:
    name: str
    stage: str  # the stage that sets it ("read" and "route" are the job's own steps)
    kind: str  # META: meta column + KEY.json key (unless json=False); JSON_ONLY; TRANSIENT
    dtype: pa.DataType | None  # the meta column's type (None: not a meta column)
    doc: str
    json: bool = True  # written to KEY.json (binary columns are not)


RECORD_FIELDS = (
    # In meta-column order (SHARDS.md's table), then the transient fields.
    RecordField("uid", "read", META, pa.string(), "the sample key: sha256 of (url, caption), 32 hex chars"),
    RecordField("shard", "route", TRANSIENT, None, "the shard the uid falls in (the writer's group key)"),
    RecordField("_unreadable", "read", TRANSIENT, None,
                "(reason, detail) when a value of the input row could not be read as it is (invalid UTF-8, ...); the prefilter rejects the row"),
    RecordField("stored_width", STAGE_RESIZE, META, pa.int32(), "px, the image in the tar"),
    RecordField("stored_height", STAGE_RESIZE, META, pa.int32(), "px, the image in the tar"),
    RecordField("original_width", STAGE_DECODE, META, pa.int32(), "px, the downloaded image as decoded, after EXIF orientation"),
    RecordField("original_height", STAGE_DECODE, META, pa.int32(), "px, the downloaded image as decoded, after EXIF orientation"),
    RecordField("source_format", STAGE_DECODE, META, pa.string(), "jpeg, png, webp, gif or bmp: the downloaded file's format"),
    RecordField("image_bytes", STAGE_RESIZE, META, pa.int64(), "bytes of the stored image"),
    RecordField("image_sha256", STAGE_RESIZE, META, pa.string(), "hex sha256 of the stored image bytes"),
    RecordField("source_bytes", STAGE_DOWNLOAD, META, pa.int64(), "bytes downloaded: the image file as the server sent it"),
    RecordField("pdq_hash", STAGE_DECODE, META, pa.string(), "PDQ perceptual hash of the decoded image, 64 hex chars (for blocklists published later)"),
    RecordField("pdq_quality", STAGE_DECODE, META, pa.int32(), "PDQ's quality score, 0-100 (below 50: too flat for matching)"),
    RecordField("final_url", STAGE_DOWNLOAD, META, pa.string(), "the URL the image came from after redirects"),
    RecordField("http_status", STAGE_DOWNLOAD, META, pa.int32(), "HTTP status of the final response"),
    RecordField("content_type", STAGE_DOWNLOAD, META, pa.string(), "the final response's Content-Type, as sent"),
    RecordField("toxicity", STAGE_TOXICITY, META, pa.float32(), "max Detoxify score over --toxicity-labels, in [0, 1]; null if --toxicity off"),
    RecordField("toxicity_label", STAGE_TOXICITY, META, pa.string(), "the label that max came from"),
    RecordField("toxicity_scores", STAGE_TOXICITY, JSON_ONLY, None, "every Detoxify label's score (KEY.json only)"),
    RecordField("clip_similarity", STAGE_CLIP, META, pa.float32(), "cosine similarity of the CLIP image and caption embeddings, in [-1, 1]; null if --clip off"),
    RecordField("punsafe", STAGE_NSFW, META, pa.float32(), "LAION's NSFW head on the CLIP image embedding, in [0, 1]; null if --nsfw off"),
    RecordField("clip_image_embedding", STAGE_CLIP, META, pa.binary(), "the L2-normalised CLIP image embedding: embed_dim float16 values, little-endian; null if --clip off", json=False),
    RecordField("t5_len", STAGE_T5, META, pa.int32(), "tokens in the T5 embedding (EOS included), <= --t5-max-length"),
    RecordField("t5_truncated", STAGE_T5, META, pa.bool_(), "the cleaned caption had more tokens than --t5-max-length and was cut"),
    RecordField("t5_dtype", STAGE_T5, META, pa.string(), "how the T5 values are stored: float16, bfloat16 or float8_e4m3fn (--t5-dtype)"),
    RecordField("t5_scale", STAGE_T5, META, pa.float32(), "stored value x t5_scale = the embedding: max|x| / 448 for float8_e4m3fn, 1.0 otherwise"),
    RecordField("t5", STAGE_T5, META, pa.binary(), "with --t5-store meta|both: the T5 values, t5_len x d_model in t5_dtype, little-endian, row-major; else null", json=False),
    RecordField("_body", STAGE_DOWNLOAD, TRANSIENT, None, "the downloaded bytes"),
    RecordField("_bgr", STAGE_DECODE, TRANSIENT, None, "decoded pixels, uint8 BGR"),
    RecordField("_image", STAGE_RESIZE, TRANSIENT, None, "the stored image, encoded"),
    RecordField("_t5", STAGE_T5, TRANSIENT, None, "the T5 embedding as a float16 array (the writer stores it as --t5-dtype in --t5-store)"),
)
FIELDS_BY_NAME = {f.name: f for f in RECORD_FIELDS}
META_FIELDS = tuple(f for f in RECORD_FIELDS if f.kind == META)
JSON_EXCLUDED = tuple(f.name for f in META_FIELDS if not f.json)  # too big for a per-sample JSON
TRANSIENT_FIELDS = frozenset(f.name for f in RECORD_FIELDS if f.kind == TRANSIENT)
# Scores a rejected record already has travel with it into the rejects table (and are Beam
# distributions while the job runs). The card's tables follow this tuple.
SCORE_FIELDS = ("toxicity", "clip_similarity", "punsafe")


def kiln_column_clashes(input_columns) -> list[str]:
    """Input columns whose names a field kiln adds to a record uses: every entry of RECORD_FIELDS,
    meta columns (uid, toxicity, t5, ...) and transient ones (shard, _body, _unreadable, ...) alike:
    an input column of that name would be silently overwritten (or would overwrite kiln's)."""
    return sorted({str(c) for c in input_columns if str(c) in FIELDS_BY_NAME})


# -- reject rows ---------------------------------------------------------------------------------


def rejects_schema(id_type: pa.DataType | None = None) -> pa.Schema:
    """rejects/NNNNNN.parquet. `SAMPLE_ID` holds the input's --id-col value, in that column's type."""
    return pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("SAMPLE_ID", id_type or pa.int64()),
            pa.field("url", pa.string()),
            pa.field("stage", pa.string(), nullable=False),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("detail", pa.string()),
            pa.field("shard", pa.int32()),
            *(pa.field(name, pa.float32()) for name in SCORE_FIELDS),
            pa.field("duplicate_of", pa.string()),  # dedup / eval_overlap: the kept sample's uid (or eval image) it duplicates
        ]
    )


def reject_row(record: dict, rej: Reject, url_col: str = "URL", id_col: str = "SAMPLE_ID") -> dict:
    """The one way to turn a record (or an input row) and its `Reject` into a rejects-table row.

    The row keeps the routing key (`shard`, None before routing) and the scores the record had --
    except a blocklist match (`blocklist_*`), whose row carries only ids and hashes: no URL (a listed
    URL can be abuse material's address) and no scores; its detail names the list and the matching
    id or hash."""
    if rej.stage not in STAGES or not known_reason(rej.stage, rej.reason):
        raise ValueError(f"reject reason {rej.stage}/{rej.reason} is not in pipeline.records.REASONS")
    blocked = rej.reason.startswith("blocklist_")
    url = None if blocked else record.get(url_col)
    row = {
        "uid": record["uid"],
        "SAMPLE_ID": record.get(id_col),
        "url": None if url is None else as_text(url),  # bytes / odd values still make a valid string cell
        "stage": rej.stage,
        "reason": rej.reason,
        "detail": as_text(rej.detail)[:1000],
        "shard": record.get("shard"),
        **{name: None if blocked else record.get(name) for name in SCORE_FIELDS},
        "duplicate_of": rej.duplicate_of,
    }
    return row
