import decimal
import math

import numpy as np
import pytest

from pipeline.config import ImageConfig, InputConfig, PrefilterConfig
from pipeline.prefilter import choose_duplicate, prefilter_row
from pipeline.records import REASONS, Reject, compute_uid

CFG = PrefilterConfig()


def row(**kw):
    base = {"SAMPLE_ID": 1, "URL": "http://img.example.test/a.jpg", "TEXT": "a red circle", "WIDTH": 640, "HEIGHT": 480}
    base.update(kw)
    return base


@pytest.mark.parametrize(
    "kw, reason",
    [
        ({"URL": None}, "url_missing"),
        ({"URL": ""}, "url_missing"),
        ({"URL": "   "}, "url_missing"),
        ({"URL": "file:///etc/passwd"}, "url_scheme"),
        ({"URL": "ftp://127.0.0.1/x.jpg"}, "url_scheme"),
        ({"URL": "data:image/png;base64,AAAA"}, "url_scheme"),
        ({"URL": "javascript:alert(1)"}, "url_scheme"),
        ({"URL": "http:///nohost.jpg"}, "url_invalid"),
        ({"URL": "http://h.example.test:99999/x"}, "url_invalid"),
        ({"TEXT": None}, "caption_missing"),
        ({"TEXT": ""}, "caption_empty"),
        ({"TEXT": " \t\n "}, "caption_empty"),
        ({"TEXT": "ab"}, "caption_too_short"),
        ({"TEXT": "x" * 5000}, "caption_too_long"),
        ({"WIDTH": 40, "HEIGHT": 32}, "declared_too_small"),
        ({"WIDTH": 1600, "HEIGHT": 200}, "declared_aspect_ratio"),
        # Values of the wrong kind: a reject with its own reason, never an exception.
        ({"URL": b"http://img.example.test/\xff.jpg"}, "invalid_utf8"),
        ({"TEXT": b"caf\xe9 au lait"}, "invalid_utf8"),
        ({"URL": 12345}, "not_text"),
        ({"URL": math.nan}, "not_text"),
        ({"TEXT": 3.5}, "not_text"),
        ({"TEXT": ["a", "list"]}, "not_text"),
        ({"_unreadable": ("invalid_utf8", "LICENSE: not valid UTF-8")}, "invalid_utf8"),
        ({"_unreadable": ("unreadable_value", "TS: OverflowError")}, "unreadable_value"),
        ({"WIDTH": math.inf}, "declared_size_invalid"),
        ({"HEIGHT": -math.inf}, "declared_size_invalid"),
        ({"WIDTH": -640}, "declared_size_invalid"),
        ({"WIDTH": 10**30}, "declared_size_invalid"),
        ({"WIDTH": 1e300}, "declared_size_invalid"),
        ({"WIDTH": decimal.Decimal("Infinity")}, "declared_size_invalid"),
        ({"WIDTH": decimal.Decimal("sNaN")}, "declared_size_invalid"),
        ({"WIDTH": "640"}, "declared_size_invalid"),
        ({"WIDTH": True}, "declared_size_invalid"),
        ({"HEIGHT": b"480"}, "declared_size_invalid"),
    ],
)
def test_prefilter_rejects_with_specific_reason(kw, reason):
    with pytest.raises(Reject) as exc:
        prefilter_row(row(**kw), CFG)
    assert exc.value.stage == "prefilter"
    assert exc.value.reason == reason
    assert exc.value.detail


@pytest.mark.parametrize("kw", [{}, {"WIDTH": None, "HEIGHT": None}, {"WIDTH": 0, "HEIGHT": 0}, {"URL": "HTTPS://Img.Example.test/x"},
                                {"WIDTH": math.nan, "HEIGHT": 480}, {"WIDTH": np.float32("nan"), "HEIGHT": np.int64(480)},
                                {"WIDTH": np.int32(640), "HEIGHT": np.float64(480.0)}, {"WIDTH": decimal.Decimal("640"), "HEIGHT": 480.7},
                                {"URL": b"http://img.example.test/ok.jpg", "TEXT": "caf\u00e9 au lait".encode()},
                                {"TEXT": "\U0001f3a8 emoji, \u200b zero width, \u0301 combining"}])
def test_prefilter_passes(kw):
    assert prefilter_row(row(**kw), CFG) is None


def test_new_prefilter_reasons_are_in_the_vocabulary():
    for reason in ("invalid_utf8", "not_text", "unreadable_value", "declared_size_invalid"):
        assert reason in REASONS["prefilter"]


def test_declared_side_limit_follows_max_image_pixels():
    image = ImageConfig(max_image_pixels=10_000)
    assert prefilter_row(row(WIDTH=100, HEIGHT=100), CFG, image) is None
    with pytest.raises(Reject) as exc:
        prefilter_row(row(WIDTH=10_001, HEIGHT=5_000), CFG, image)
    assert exc.value.reason == "declared_size_invalid" and "WIDTH" in exc.value.detail and "--max-image-pixels" in exc.value.detail


def test_other_column_names_are_followed():
    cols = InputConfig(input="x", url_col="url", caption_col="caption", width_col="w", height_col="h")
    good = {"url": "http://img.example.test/a.jpg", "caption": "a red circle", "w": 640, "h": 480}
    assert prefilter_row(good, CFG, ImageConfig(), cols) is None
    for kw, reason in (({"caption": b"\xff"}, "invalid_utf8"), ({"w": -1}, "declared_size_invalid"), ({"url": 7}, "not_text")):
        with pytest.raises(Reject) as exc:
            prefilter_row({**good, **kw}, CFG, ImageConfig(), cols)
        assert exc.value.reason == reason


def test_uid_is_stable_and_distinguishes_null_from_empty():
    # Pinned value: changing the uid scheme would silently re-key every existing dataset.
    assert compute_uid("http://img.example.test/b.jpg", "a cat") == "cd653d3265ab044548af029f3128171d"
    assert len(compute_uid("u", "c")) == 32
    assert compute_uid(None, "c") != compute_uid("", "c")
    assert compute_uid("u", "c") != compute_uid("u", "c ")
    assert compute_uid("ab", "c") != compute_uid("a", "bc")


@pytest.mark.parametrize("ids", [[{"a": 2}, {"a": 1}], [[2], [1]], [math.nan, 3.0], [None, 4], [b"b", b"a"]])
def test_choose_duplicate_takes_ids_of_any_type(ids):
    rows = [row(SAMPLE_ID=i) for i in ids]
    kept, dropped = choose_duplicate(list(rows))
    kept_reversed, _ = choose_duplicate(list(reversed(rows)))
    assert kept is kept_reversed and len(dropped) == 1  # the same row whatever the order, no TypeError


def test_choose_duplicate_is_order_independent():
    rows = [row(SAMPLE_ID=9), row(SAMPLE_ID=3), row(SAMPLE_ID=5)]
    for perm in (rows, rows[::-1], rows[1:] + rows[:1]):
        kept, dropped = choose_duplicate(list(perm))
        assert kept["SAMPLE_ID"] == 3
        assert sorted(r["SAMPLE_ID"] for r in dropped) == [5, 9]
