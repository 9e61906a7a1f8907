"""pipeline.c2pa_check: the C2PA training-and-mining assertion, read from real signed images.

The signed images are made here, offline: a small picture from PIL, a throwaway ES256 certificate
chain from `cryptography` (a root CA and a leaf with digitalSignature and the emailProtection EKU,
the profile c2pa-rs accepts for signing), and c2pa-python's Builder + Signer writing a manifest
with a `c2pa.training-mining` / `cawg.training-mining` assertion into the image. The chain is
trusted by nobody (the reader reports `signingCredential.untrusted`), which the check does not
require. Each signature takes a few tens of milliseconds.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline import c2pa_check
from pipeline.c2pa_check import MARKER, decide, reader_version, training_mining

c2pa = pytest.importorskip("c2pa")

from pipeline.testbed.c2pa_sign import CREATED  # noqa: E402 - after the importorskip


def picture(fmt: str = "JPEG", size=(64, 48), color=(200, 40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def tm(label: str = "c2pa.training-mining", **entries: str) -> dict:
    """A training-and-mining assertion: tm(c2pa_ai_training="notAllowed") -> c2pa.ai_training."""
    return {"label": label, "data": {"entries": {
        k.replace("_", ".", 1): {"use": v} for k, v in entries.items()}}}


@pytest.fixture(scope="module")
def credentials() -> tuple[bytes, bytes]:
    """(PEM chain leaf+root, PEM PKCS#8 key of the leaf): the synthetic web's throw-away ES256 chain."""
    pytest.importorskip("cryptography")
    from pipeline.testbed.c2pa_sign import credentials as make

    return make()


@pytest.fixture(scope="module")
def sign(credentials):
    """sign(mime, source bytes, assertions, edit=False) -> the signed bytes.

    edit=True signs an edit of `source` (which may carry its own manifest): the source becomes the
    parent ingredient and the new manifest the active one."""
    chain, key = credentials

    def _sign(mime: str, source: bytes, assertions: list[dict], edit: bool = False) -> bytes:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain, key, None))
        manifest = {"claim_generator_info": [{"name": "kiln-tests", "version": "0"}],
                    "assertions": assertions if edit else [CREATED, *assertions]}
        builder = c2pa.Builder(manifest)
        if edit:
            builder.set_intent(c2pa.C2paBuilderIntent.EDIT)
            builder.add_ingredient({"title": "parent", "relationship": "parentOf"}, mime, io.BytesIO(source))
        out = io.BytesIO()
        builder.sign(signer, mime, io.BytesIO(source), out)
        return out.getvalue()

    return _sign


@pytest.fixture
def no_reader(monkeypatch):
    """Fail the test if the C2PA library is consulted at all."""
    def boom(*a, **k):
        raise AssertionError("the C2PA reader was called")
    monkeypatch.setattr(c2pa_check, "_read_store", boom)


# --- no manifest: the fast path ------------------------------------------------------------------

@pytest.mark.parametrize("fmt,mime", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", None),
                                      ("GIF", "image/gif")])
def test_plain_image_is_no_manifest_without_the_reader(fmt, mime, no_reader):
    assert training_mining(picture(fmt), mime) == (None, "no_manifest")


def test_empty_and_tiny_inputs_are_no_manifest(no_reader):
    assert training_mining(b"", "image/jpeg") == (None, "no_manifest")
    assert training_mining(b"jumb c2pa", None) == (None, "no_manifest")  # both words, not the marker


def test_marker_in_a_jpeg_without_jumbf_is_no_manifest():
    """The marker bytes where no manifest can be (a JPEG comment): the reader runs and finds none."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "JPEG", comment=b"text about " + MARKER)
    assert MARKER in buf.getvalue()
    assert training_mining(buf.getvalue(), "image/jpeg") == (None, "no_manifest")


# --- unreadable: never raises, never rejects -----------------------------------------------------

@pytest.mark.parametrize("mime", ["image/jpeg", None, "application/octet-stream"])
@pytest.mark.parametrize("data", [
    MARKER,
    b"\x00\x00\x00\x20jumb\x00\x00\x00\x18" + MARKER + b"\x00" * 12,
    b"\xff\xd8\xff\xeb\x00\x20JP\x00\x01\x00\x00\x00\x01\x00\x00\x00\x18jumb" + MARKER + b"\xff" * 40,
    bytes(range(256)) * 20 + MARKER + bytes(range(256)) * 20,
], ids=["marker", "jumbf-box", "jpeg-app11-cut", "noise"])
def test_garbage_with_the_marker_is_unreadable(data, mime):
    use, detail = training_mining(data, mime)
    assert use is None
    assert detail.startswith("unreadable: ") and len(detail) > len("unreadable: ")
    assert len(detail) < 200 and "\n" not in detail


def test_truncated_and_corrupted_signed_images_are_unreadable(sign):
    signed = sign("image/jpeg", picture(), [tm(c2pa_ai_training="notAllowed")])
    store = signed.find(MARKER)
    cut = training_mining(signed[:store + 2000], "image/jpeg")  # the manifest store cut short
    assert cut[0] is None and cut[1].startswith("unreadable: "), cut
    broken = bytearray(signed)
    broken[store + 4:store + 20] = b"\x00" * 16  # the store's description box (its UUID) zeroed
    broken[store:store + 8] = MARKER  # ...but the marker still there
    use, detail = training_mining(bytes(broken), "image/jpeg")
    assert use is None and (detail.startswith("unreadable: ") or detail == "no_manifest"), detail


def test_not_bytes_is_unreadable_not_an_exception():
    assert training_mining(None, None)[1].startswith("unreadable: ")
    assert training_mining(12, "image/jpeg")[0] is None


# --- signed images -------------------------------------------------------------------------------

def test_signed_jpeg_not_allowed(sign):
    signed = sign("image/jpeg", picture(), [tm(c2pa_ai_training="notAllowed")])
    assert MARKER in signed
    assert training_mining(signed, "image/jpeg") == ("notAllowed", "c2pa.ai_training=notAllowed")


def test_signed_jpeg_allowed(sign):
    signed = sign("image/jpeg", picture(color=(10, 200, 30)), [tm(c2pa_ai_training="allowed")])
    assert training_mining(signed, "image/jpeg") == ("allowed", "c2pa.ai_training=allowed")


def test_most_restrictive_entry_decides(sign):
    mixed = tm(c2pa_ai_training="allowed", c2pa_ai_generative_training="constrained",
               c2pa_data_mining="allowed", c2pa_ai_inference="allowed")
    signed = sign("image/jpeg", picture(), [mixed])
    assert training_mining(signed, "image/jpeg") == ("constrained", "c2pa.ai_generative_training=constrained")
    signed = sign("image/jpeg", picture(), [{**mixed, "data": {"entries": {
        **mixed["data"]["entries"], "c2pa.data_mining": {"use": "notAllowed"}}}}])
    assert training_mining(signed, "image/jpeg") == ("notAllowed", "c2pa.data_mining=notAllowed")


def test_cawg_assertion(sign):
    cawg = tm("cawg.training-mining", cawg_ai_training="notAllowed", cawg_data_mining="allowed")
    signed = sign("image/jpeg", picture(), [cawg])
    assert training_mining(signed, "image/jpeg") == ("notAllowed", "cawg.ai_training=notAllowed")


def test_signed_png_and_mime_variants(sign):
    signed = sign("image/png", picture("PNG"), [tm(c2pa_ai_training="notAllowed")])
    assert MARKER in signed
    want = ("notAllowed", "c2pa.ai_training=notAllowed")
    # the declared type, none, a wrong one, one with parameters, one the library has never heard of
    for mime in ("image/png", None, "", "image/jpeg", "IMAGE/PNG; charset=binary", "application/octet-stream",
                 "x-unknown/whatever"):
        assert training_mining(signed, mime) == want, mime
    assert training_mining(bytearray(signed), "image/png") == want
    assert training_mining(memoryview(signed), "image/png") == want


def test_manifest_without_the_assertion(sign):
    signed = sign("image/jpeg", picture(), [])
    assert training_mining(signed, "image/jpeg") == (None, "no_assertion")


def test_only_the_active_manifest_decides(sign):
    parent = sign("image/jpeg", picture(), [tm(c2pa_ai_training="notAllowed")])
    relaxed = sign("image/jpeg", parent, [tm(c2pa_ai_training="allowed")], edit=True)
    assert training_mining(relaxed, "image/jpeg") == ("allowed", "c2pa.ai_training=allowed")
    silent = sign("image/jpeg", parent, [], edit=True)
    assert training_mining(silent, "image/jpeg") == (None, "no_assertion")
    strict = sign("image/jpeg", sign("image/jpeg", picture(), [tm(c2pa_ai_training="allowed")]),
                  [tm(c2pa_ai_training="notAllowed")], edit=True)
    assert training_mining(strict, "image/jpeg") == ("notAllowed", "c2pa.ai_training=notAllowed")


def test_altered_pixels_still_honoured(sign):
    """The data hash no longer matches (the reader says so), but the signer's reservation stands."""
    signed = bytearray(sign("image/jpeg", picture(size=(128, 96)), [tm(c2pa_ai_training="notAllowed")]))
    signed[-50] ^= 0xFF  # in the entropy-coded pixels, after the manifest
    assert training_mining(bytes(signed), "image/jpeg") == ("notAllowed", "c2pa.ai_training=notAllowed")


# --- the decision on manifest JSON ---------------------------------------------------------------

@pytest.mark.parametrize("assertions,want", [
    ([], (None, "no_assertion")),
    ([{"label": "c2pa.actions", "data": {}}], (None, "no_assertion")),
    ([{"label": "c2pa.training-mining", "data": {"entries": {}}}], (None, "no_assertion")),
    ([{"label": "c2pa.training-mining", "data": {"entries": {"c2pa.ai_training": {"use": "maybe"}}}}],
     (None, "no_assertion")),
    ([{"label": "c2pa.training-mining", "data": "junk"}, {"label": 5}, "junk"], (None, "no_assertion")),
    ([{"label": "c2pa.training-mining.v2", "data": {"entries": {"c2pa.ai_training": {"use": "NotAllowed"}}}}],
     ("notAllowed", "c2pa.ai_training=notAllowed")),
    ([{"label": "cawg.training-mining__1", "data": {"entries": {"cawg.ai_generative_training": {"use": "constrained"}}}},
      {"label": "c2pa.training-mining", "data": {"entries": {"c2pa.ai_training": {"use": "allowed"}}}}],
     ("constrained", "cawg.ai_generative_training=constrained")),
    ([{"label": "c2pa.training-mining", "data": {"entries": {"c2pa.ai_inference": {"use": "notAllowed"},
                                                              "c2pa.ai_training": {"use": "allowed"}}}}],
     ("allowed", "c2pa.ai_training=allowed")),  # inference is not training: its reservation alone keeps the row
    ([{"label": "c2pa.training-mining", "data": {"entries": {"c2pa.ai_training": {"use": "allowed"},
                                                              "c2pa.data_mining": {"use": "allowed"}}}}],
     ("allowed", "c2pa.ai_training=allowed")),  # a tie: the first entry
    ([{"label": "c2pa.training-mining-other", "data": {"entries": {"x": {"use": "notAllowed"}}}}],
     (None, "no_assertion")),
])
def test_decide(assertions, want):
    assert decide({"assertions": assertions}) == want


def test_reader_version():
    v = reader_version()
    assert v and v.startswith("c2pa-python ") and "(c2pa-rs " in v, v
