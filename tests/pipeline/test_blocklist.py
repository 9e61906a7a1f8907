"""pipeline.blocklist: the list formats, every kind's match, PDQ on re-encoded copies, one-line errors."""

import hashlib
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipeline.blocklist import Blocklists, load_blocklist, load_optout_list, pdq_of
from pipeline.config import ConfigError


def _photo(seed=0, w=640, h=480):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    return np.asarray(img)


def _jpeg(arr, q=90, scale=1.0):
    img = Image.fromarray(arr)
    if scale != 1.0:
        img = img.resize((int(img.width * scale), int(img.height * scale)), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _decode(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_every_kind_matches_and_names_the_list(tmp_path):
    url = "https://Images.Example.com/a/b.jpg"
    body = b"\xff\xd8some jpeg bytes"
    f = tmp_path / "l.txt"
    f.write_text("# name: csam-hashes-v2\n# pdq_threshold: 20\n\n"
                 "sample_id 42\n"
                 f"url_sha256 {hashlib.sha256(url.encode()).hexdigest().upper()}\n"
                 f"url_md5 {hashlib.md5(b'http://x.org/1.png').hexdigest()}\n"
                 "domain bad.example.org\n"
                 f"image_sha256 {hashlib.sha256(body).hexdigest()}\n"
                 f"image_md5 {hashlib.md5(b'other').hexdigest()}\n")
    b = load_blocklist(str(f))
    assert b.name == "csam-hashes-v2" and b.pdq_threshold == 20
    assert b.counts() == {"sample_id": 1, "url_sha256": 1, "url_md5": 1, "domain": 1, "image_sha256": 1, "image_md5": 1}
    assert b.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    lists = Blocklists([b])
    assert lists.match_row(42, "http://ok.org/x.jpg").reason == "blocklist_sample_id"
    m = lists.match_row("7", url)
    assert m.reason == "blocklist_url_sha256" and m.detail.startswith("csam-hashes-v2: url_sha256 ")
    assert lists.match_row(None, "http://x.org/1.png").kind == "url_md5"
    assert lists.match_row(None, "http://cdn.BAD.example.org:8080/p.jpg").detail == "csam-hashes-v2: domain bad.example.org"
    assert lists.match_row(None, "http://example.org/p.jpg") is None  # a parent of a listed domain is not listed
    assert lists.match_row(None, "http://notbad.example.org/p.jpg") is None
    assert lists.match_image_bytes(body).reason == "blocklist_image_sha256"
    assert lists.match_image_bytes(b"other").reason == "blocklist_image_md5"
    assert lists.match_image_bytes(b"fine") is None
    assert lists.needs_image_bytes and not lists.needs_pdq


def test_csv_form_and_first_list_wins(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.txt"
    a.write_text("kind,value\ndomain,example.com\n")
    b.write_text("# name: second\ndomain example.com\nsample_id abc\n")
    lists = Blocklists([load_blocklist(str(a)), load_blocklist(str(b))])
    assert lists.match_row("abc", "http://example.com/1").detail == "second: sample_id abc"  # ids before domains
    assert lists.match_row(None, "http://www.example.com/1").list_name == "a.csv"


@pytest.mark.parametrize("text,needle", [
    ("url_sha256 abc\n", "64 hex digits"),
    ("colour red\n", "unknown kind"),
    ("domain\n", "has no value"),
    ("domain https://example.com/\n", "host name"),
    ("# pdq_threshold: 300\n", "0 to 256"),
])
def test_a_malformed_line_is_one_line_naming_file_and_line(tmp_path, text, needle):
    f = tmp_path / "bad.txt"
    f.write_text("# ok\n" + text)
    with pytest.raises(ConfigError) as err:
        load_blocklist(str(f))
    msg = str(err.value)
    assert f"--blocklist {f}: line 2" in msg and needle in msg and "\n" not in msg


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_blocklist(str(tmp_path / "nope.txt"))
    assert "--blocklist" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        load_optout_list(str(tmp_path / "nope.txt"))


def test_pdq_matches_reencoded_and_resized_copies_not_other_images(tmp_path):
    orig = _photo(1)
    h, q = pdq_of(orig, bgr=False)
    assert len(h) == 64 and 0 <= q <= 100
    assert pdq_of(orig[:, :, ::-1], bgr=True)[0] == h  # the same pixels given as BGR
    f = tmp_path / "pdq.txt"
    f.write_text(f"pdq {h}\n")
    lists = Blocklists([load_blocklist(str(f))])
    assert lists.needs_pdq and not lists.needs_image_bytes
    for q_, scale in ((60, 0.75), (40, 0.5), (95, 1.3)):
        copy = _decode(_jpeg(orig, q_, scale))
        m = lists.match_pdq(pdq_of(copy, bgr=False)[0])
        assert m is not None and m.reason == "blocklist_pdq", (q_, scale)
    for seed in range(2, 8):
        assert lists.match_pdq(pdq_of(_photo(seed), bgr=False)[0]) is None


def test_pdq_of_large_image_is_close_to_full_resolution_hash():
    import pdqhash

    big = _photo(3, 2048, 1536)
    full = np.packbits(pdqhash.compute(big)[0].astype(np.uint8)).tobytes().hex()
    ours = pdq_of(big, bgr=False)[0]
    dist = bin(int(full, 16) ^ int(ours, 16)).count("1")
    assert dist <= 16, dist


def test_pdq_threshold_from_flag_and_file(tmp_path):
    orig = _photo(4)
    h, _ = pdq_of(orig, bgr=False)
    flipped = format(int(h, 16) ^ ((1 << 20) - 1), "064x")  # 20 bits away
    f = tmp_path / "p.txt"
    f.write_text(f"pdq {h}\n")
    assert Blocklists([load_blocklist(str(f), pdq_threshold=31)]).match_pdq(flipped) is not None
    assert Blocklists([load_blocklist(str(f), pdq_threshold=10)]).match_pdq(flipped) is None
    f.write_text(f"# pdq_threshold: 25\npdq {h}\n")
    assert Blocklists([load_blocklist(str(f), pdq_threshold=10)]).match_pdq(flipped).detail.endswith(f"within 20 bits of {h}")


def test_optout_list_domains_and_prefixes(tmp_path):
    f = tmp_path / "o.txt"
    f.write_text("# registry export\nArtist.Example\nhttps://Gallery.Example.net/private/\n")
    o = load_optout_list(str(f))
    assert o.domains == {"artist.example"} and len(o.prefixes) == 1
    assert o.match("http://www.artist.example/a.jpg") == "artist.example"
    assert o.match("https://gallery.example.net/private/1.jpg") == "https://gallery.example.net/private/"
    assert o.match("https://GALLERY.example.net/private/x/y.png") is not None
    assert o.match("https://gallery.example.net/Private/1.jpg") is None  # the path compares exactly
    assert o.match("http://gallery.example.net/private/1.jpg") is None  # another scheme
    assert o.match("https://gallery.example.net/public/1.jpg") is None
    assert o.match("not a url") is None
    f.write_text("ftp://x.org/\n")
    with pytest.raises(ConfigError) as err:
        load_optout_list(str(f))
    assert f"--optout-list {f}: line 1" in str(err.value)
