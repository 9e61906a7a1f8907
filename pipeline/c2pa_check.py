"""C2PA training-and-mining: what an image's embedded Content Credentials say about AI use.

`training_mining(data, mime)` reads the C2PA manifest store embedded in the image bytes (with
c2pa-python, the Content Authenticity Initiative's reader) and returns the most restrictive `use`
("notAllowed" > "constrained" > "allowed") over every entry of the ACTIVE manifest's
training-and-mining assertions:

  * C2PA 1.x `c2pa.training-mining` (entries `c2pa.ai_training`, `c2pa.ai_generative_training`,
    `c2pa.data_mining`, `c2pa.ai_inference`),
  * CAWG `cawg.training-mining` (entries `cawg.*`),

matched with any `.vN` version and `__N` instance suffix. Every entry of those assertions counts,
named above or not, except `*.ai_inference`: using an image as a model's input at inference time is
not what a training dataset does, so a reservation of inference alone keeps the row. With it comes a short detail: the deciding entry (`c2pa.ai_training=notAllowed`,
the first entry with the winning value), `no_manifest`, `no_assertion` (a manifest without such an
assertion, or none of its entries with a known `use`), `unreadable: <error>` or
`unavailable: <error>` (c2pa-python cannot be imported). The decode stage rejects the row as
`c2pa_not_allowed` when the use is "notAllowed".

Choices:

  * Fast path. Nearly no image carries a manifest, so the bytes are first searched for
    b"jumdc2pa": the JUMBF description-box type `jumd` followed by the first four bytes of the C2PA
    manifest store's type UUID (63327061-0011-0010-8000-00AA00389B71, "c2pa..."). Every binary
    embedding of a manifest store carries it whole, at the start of the store (JPEG APP11, PNG
    caBX, WebP/RIFF C2PA chunk, GIF application extension, BMFF/HEIF uuid box, TIFF tag), and it is
    eight bytes, so chance matches in compressed pixels are rare (and then cost one reader call
    that finds nothing). Without it: (None, "no_manifest"), and c2pa-python is not even imported.
    One `bytes.find`: about 0.5 ms per MB, a small fraction of decoding the same bytes.
  * Only manifests embedded in the bytes are read. A remote (cloud) manifest referenced only from
    XMP is not fetched: the reader runs with `verify.remote_manifest_fetch` and `verify.ocsp_fetch`
    off, so the decode stage does no network I/O. Such an image reads as "no_manifest".
  * Only the active manifest decides: an ingredient's (an earlier edit's) assertion is the history
    of another asset; the asset's current signer states its own terms in the active manifest.
  * Trust is not required. A manifest signed by a certificate outside any trust list, or one whose
    data hash no longer matches (the pixels were altered after signing), still states its signer's
    reservation, and honouring a reservation never needs proof; the reader's validation status is
    therefore not consulted.
  * An unreadable manifest is NOT a rejection: a store that the reader cannot parse (truncated,
    corrupt, an unsupported container) returns (None, "unreadable: ...") and the row goes on to
    decode. A corrupt manifest is not a machine-readable opt-out -- there is no assertion to
    honour, only bytes that look like one -- and rejecting on it would let any damaged or forged
    JUMBF fragment remove images under a consent reason they never stated.
  * Never raises for bad input bytes: every reader error becomes "unreadable: ...".

c2pa-python is imported lazily (the first image with the marker, or `reader_version()`) and the
import -- or its failure -- is cached, as is the reader's settings Context (one per process: a
forked worker builds its own).
"""

from __future__ import annotations

import io
import json
import os
import re
import threading

MARKER = b"jumdc2pa"  # JUMBF `jumd` box type + the C2PA manifest store UUID's first four bytes

LABELS = ("c2pa.training-mining", "cawg.training-mining")
RANK = {"allowed": 0, "constrained": 1, "notAllowed": 2}
_USE = {k.lower(): k for k in RANK}  # tolerate case: "NotAllowed", "notallowed" -> "notAllowed"
_SUFFIX = re.compile(r"(?:__\d+)?$")  # assertion instance suffix: label__1
_VERSION = re.compile(r"\.v\d+$")  # assertion version suffix: label.v2
_READER_SETTINGS = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
_ERROR_CHARS = 160

_lock = threading.Lock()
_lib = None  # the c2pa module, once imported
_lib_error: str | None = None  # why it could not be, once tried
_context = None  # (pid, c2pa.Context) for the reader's settings


def _c2pa():
    """The c2pa module, or None (then `_lib_error` says why); imported once per process."""
    global _lib, _lib_error
    if _lib is None and _lib_error is None:
        with _lock:
            if _lib is None and _lib_error is None:
                try:
                    import c2pa

                    _lib = c2pa
                except Exception as e:  # ImportError, or a native library that fails to load
                    _lib_error = _short(e)
    return _lib


def _reader_context(c2pa):
    """A Context with the reader's settings (no network), built once per process; None: defaults."""
    global _context
    pid = os.getpid()
    ctx = _context
    if ctx is not None and ctx[0] == pid:
        return ctx[1]
    with _lock:
        if _context is None or _context[0] != pid:
            try:
                _context = (pid, c2pa.Context(settings=c2pa.Settings.from_dict(_READER_SETTINGS)))
            except Exception:
                # Settings this library version does not know: its defaults (which embed-only reads
                # do not change) rather than no reading at all.
                _context = (pid, None)
        return _context[1]


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    text = text[0].strip() if text else ""
    return (text or type(e).__name__)[:_ERROR_CHARS]


def _is_not_found(c2pa, e: BaseException) -> bool:
    nf = getattr(c2pa.C2paError, "ManifestNotFound", None)
    return (isinstance(nf, type) and isinstance(e, nf)) or str(e).startswith("ManifestNotFound")


def _is_not_supported(c2pa, e: BaseException) -> bool:
    ns = getattr(c2pa.C2paError, "NotSupported", None)
    return (isinstance(ns, type) and isinstance(e, ns)) or str(e).startswith("NotSupported")


def _read_store(c2pa, data: bytes, mime: str | None) -> dict | None:
    """The manifest store as JSON (a dict), or None when there is none. Raises on anything else.

    With the given MIME type first (parameters dropped); when there is none, or the library refuses
    it, with the type detected from the bytes."""
    ctx = _reader_context(c2pa)
    fmt = (mime or "").split(";", 1)[0].strip().lower() or None
    formats = [fmt, None] if fmt else [None]
    for i, f in enumerate(formats):
        try:
            with c2pa.Reader(f, io.BytesIO(data), None, ctx) as reader:
                return json.loads(reader.json())
        except Exception as e:
            if isinstance(e, c2pa.C2paError) and _is_not_found(c2pa, e):
                return None
            if i + 1 < len(formats) and isinstance(e, c2pa.C2paError) and _is_not_supported(c2pa, e):
                continue
            raise
    return None  # unreachable


def _base_label(label) -> str:
    return _VERSION.sub("", _SUFFIX.sub("", label, count=1)) if isinstance(label, str) else ""


def decide(manifest: dict) -> tuple[str | None, str]:
    """The most restrictive use over the training-and-mining entries of one manifest (its JSON)."""
    best, best_key = None, None
    for assertion in manifest.get("assertions") or ():
        if not isinstance(assertion, dict) or _base_label(assertion.get("label")) not in LABELS:
            continue
        data = assertion.get("data")
        entries = data.get("entries") if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            continue
        for key, entry in entries.items():
            if str(key).endswith("ai_inference"):
                continue  # not training or mining: see the module docstring
            use = entry.get("use") if isinstance(entry, dict) else None
            use = _USE.get(use.lower()) if isinstance(use, str) else None
            if use is not None and (best is None or RANK[use] > RANK[best]):
                best, best_key = use, key
    if best is None:
        return None, "no_assertion"
    return best, f"{best_key}={best}"


def training_mining(data: bytes, mime: str | None) -> tuple[str | None, str]:
    """(use, detail) from the active C2PA manifest embedded in `data`; see the module docstring.

    use: "notAllowed" | "constrained" | "allowed" | None (no manifest, no assertion, unreadable)."""
    if not isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(memoryview(data))
        except TypeError as e:  # not bytes-like at all
            return None, f"unreadable: {_short(e)}"
    if data.find(MARKER) < 0:
        return None, "no_manifest"
    c2pa = _c2pa()
    if c2pa is None:
        return None, f"unavailable: {_lib_error}"
    try:
        store = _read_store(c2pa, bytes(data), mime)
    except Exception as e:
        return None, f"unreadable: {_short(e)}"
    if not store:
        return None, "no_manifest"
    manifests = store.get("manifests")
    active = store.get("active_manifest")
    manifest = manifests.get(active) if isinstance(manifests, dict) and isinstance(active, str) else None
    if not isinstance(manifest, dict):
        return None, "unreadable: no active manifest"
    return decide(manifest)


def reader_version() -> str | None:
    """"c2pa-python X.Y.Z (c2pa-rs A.B.C)", or None when c2pa-python cannot be imported."""
    c2pa = _c2pa()
    if c2pa is None:
        return None
    py = getattr(c2pa, "__version__", None)
    if not py or py == "unknown":
        try:
            from importlib.metadata import version

            py = version("c2pa-python")
        except Exception:
            py = "unknown"
    try:
        rs = c2pa.sdk_version()
    except Exception:
        return f"c2pa-python {py}"
    return f"c2pa-python {py} (c2pa-rs {rs})"
