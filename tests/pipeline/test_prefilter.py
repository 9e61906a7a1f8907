import pytest

from pipeline.config import PrefilterConfig
from pipeline.prefilter import choose_duplicate, prefilter_row
from pipeline.records import Reject, compute_uid

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
    ],
)
def test_prefilter_rejects_with_specific_reason(kw, reason):
    with pytest.raises(Reject) as exc:
        prefilter_row(row(**kw), CFG)
    assert exc.value.stage == "prefilter"
    assert exc.value.reason == reason
    assert exc.value.detail


@pytest.mark.parametrize("kw", [{}, {"WIDTH": None, "HEIGHT": None}, {"WIDTH": 0, "HEIGHT": 0}, {"URL": "HTTPS://Img.Example.test/x"}])
def test_prefilter_passes(kw):
    assert prefilter_row(row(**kw), CFG) is None


def test_uid_is_stable_and_distinguishes_null_from_empty():
    # Pinned value: changing the uid scheme would silently re-key every existing dataset.
    assert compute_uid("http://img.example.test/b.jpg", "a cat") == "cd653d3265ab044548af029f3128171d"
    assert len(compute_uid("u", "c")) == 32
    assert compute_uid(None, "c") != compute_uid("", "c")
    assert compute_uid("u", "c") != compute_uid("u", "c ")
    assert compute_uid("ab", "c") != compute_uid("a", "bc")


def test_choose_duplicate_is_order_independent():
    rows = [row(SAMPLE_ID=9), row(SAMPLE_ID=3), row(SAMPLE_ID=5)]
    for perm in (rows, rows[::-1], rows[1:] + rows[:1]):
        kept, dropped = choose_duplicate(list(perm))
        assert kept["SAMPLE_ID"] == 3
        assert sorted(r["SAMPLE_ID"] for r in dropped) == [5, 9]
