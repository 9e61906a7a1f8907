"""The synthetic web: deterministic generation, truthful ground truth, and the server's planted behaviours.

Every connection goes to 127.0.0.0/8 or ::1, through http.client or raw sockets (urllib would honour
proxy environment variables).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import records
from pipeline.testbed import server as synth_server
from pipeline.testbed import synth


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str, method: str = "GET", timeout: float = 5.0):
    """(status, lower-cased headers, body) for one request; never follows redirects."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""))
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> synth.SynthWeb:
    return synth.synthesize(tmp_path_factory.mktemp("web"), rows=300, seed=0, failure_rate=0.3)


@pytest.fixture(scope="module")
def truth(web) -> list[dict]:
    return pq.read_table(web.ground_truth_path).to_pylist()


@pytest.fixture(scope="module")
def server(web):
    with synth_server.serve(web) as srv:
        yield srv


def row_of(truth: list[dict], kind: str) -> dict:
    return next(r for r in truth if r["kind"] == kind)


def image_bytes(web, row) -> bytes:
    return (web.images_dir / row["image_file"]).read_bytes()


# --- generation -------------------------------------------------------------------------------


def _synth_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "images").iterdir()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    base = f"http://127.0.0.1:{_free_port()}"
    a = synth.synthesize(tmp_path / "a", rows=80, seed=1, failure_rate=0.5, base_url=base)
    b = synth.synthesize(tmp_path / "b", rows=80, seed=1, failure_rate=0.5, base_url=base)
    c = synth.synthesize(tmp_path / "c", rows=80, seed=2, failure_rate=0.5, base_url=base)
    assert a.metadata_path.read_bytes() == b.metadata_path.read_bytes()
    assert a.ground_truth_path.read_bytes() == b.ground_truth_path.read_bytes()
    assert _synth_files(a.root) == _synth_files(b.root)
    assert a.metadata_path.read_bytes() != c.metadata_path.read_bytes()
    assert _synth_files(a.root).keys() != _synth_files(c.root).keys()


def test_metadata_has_laion_schema(web):
    table = pq.read_table(web.metadata_path)
    assert table.schema.names == ["SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "LICENSE", "NSFW", "similarity"]
    assert table.schema.equals(synth.LAION_SCHEMA)
    rows = table.to_pylist()
    assert len(rows) == 300
    assert len({r["SAMPLE_ID"] for r in rows}) == 300
    assert {r["NSFW"] for r in rows} <= {"UNLIKELY", "UNSURE", "NSFW"}
    assert sum(r["LICENSE"] == "?" for r in rows) > 200
    assert all(r["LICENSE"] == "?" or r["LICENSE"].startswith("https://creativecommons.org/") for r in rows)
    assert all(0.28 <= r["similarity"] <= 0.45 for r in rows)


def test_every_kind_planted_with_vocabulary_expectations(web, truth):
    assert len(synth.FAILURE_KINDS) <= 90  # rows * failure_rate here
    # The model-filter kinds are planted only at their own rates (0 here), the consent kinds only with consent_per_kind.
    assert {r["kind"] for r in truth} == set(synth.EXPECTED) - set(synth.FILTER_KINDS) - set(synth.CONSENT_KINDS)  # consent kinds: test_consent
    assert web.kinds == {k: sum(r["kind"] == k for r in truth) for k in synth.EXPECTED
                         if k not in synth.FILTER_KINDS and k not in synth.CONSENT_KINDS}
    for r in truth:
        assert (r["expected_stage"], r["expected_reason"]) == synth.EXPECTED[r["kind"]]
        if r["expected_stage"] is not None:
            assert r["expected_stage"] in (records.STAGE_PREFILTER, records.STAGE_DOWNLOAD, records.STAGE_DECODE)
            assert records.known_reason(r["expected_stage"], r["expected_reason"]), r["kind"]
        assert r["uid"] == records.compute_uid(r["URL"], r["TEXT"])


def test_failures_are_spread_through_the_file(truth):
    failing = [i for i, r in enumerate(truth) if r["kind"] != "ok"]
    assert len(failing) == 90
    for third in range(3):
        assert 15 <= sum(100 * third <= i < 100 * (third + 1) for i in failing) <= 45


def test_duplicates_repeat_a_kept_row_with_a_larger_sample_id(truth):
    by_key: dict[tuple, list[dict]] = {}
    for r in truth:
        by_key.setdefault((r["URL"], r["TEXT"]), []).append(r)
    for group in by_key.values():
        if len(group) > 1:
            group.sort(key=lambda r: r["SAMPLE_ID"])
            assert group[0]["kind"] == "ok"
            assert all(r["kind"] == "duplicate" for r in group[1:])
    assert sum(r["kind"] == "duplicate" for r in truth) == sum(len(g) - 1 for g in by_key.values())


def _nearest_colour(rgb) -> str:
    return min(synth.COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(synth.COLOURS[c], rgb)))


def test_images_match_ground_truth_and_captions(web, truth, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the planted bomb: header only, never decoded
    metadata = {r["SAMPLE_ID"]: r for r in pq.read_table(web.metadata_path).to_pylist()}
    colour_words = re.compile(r"\b(" + "|".join(synth.COLOURS) + r")\b")
    formats = set()
    for r in truth:
        shapes = json.loads(r["shapes"])
        if r["TEXT"] and r["TEXT"].strip() and r["kind"] != "caption_short":
            # The caption names the background and every shape's colour, and no other colour.
            assert set(colour_words.findall(r["TEXT"].lower())) == {r["background"], *(s["colour"] for s in shapes)}, r["TEXT"]
            assert all(s["shape"] in r["TEXT"] for s in shapes)
        if r["format"] is None:
            assert r["true_width"] is None and r["image_file"] is None
            continue
        formats.add(r["format"])
        with Image.open(web.images_dir / r["image_file"]) as img:
            assert img.size == (r["true_width"], r["true_height"])
            assert img.format.lower() == r["format"]
        short = min(r["true_width"], r["true_height"])
        for s in shapes:
            x0, y0, x1, y1 = s["bbox"]
            assert x1 - x0 == y1 - y0 >= short / 5
            assert 0 <= x0 and 0 <= y0 and x1 <= r["true_width"] and y1 <= r["true_height"]
        meta = metadata[r["SAMPLE_ID"]]
        if r["kind"] == "ok" and meta["WIDTH"] is not None:
            assert (meta["WIDTH"], meta["HEIGHT"]) == (r["true_width"], r["true_height"])
    assert formats == {"jpeg", "png", "webp"}


def test_pixels_show_what_the_caption_says(web, truth):
    checked = 0
    for r in truth:
        if r["kind"] != "ok" or checked >= 40:
            continue
        checked += 1
        shapes = json.loads(r["shapes"])
        with Image.open(web.images_dir / r["image_file"]) as img:
            img = img.convert("RGB")
            for s in shapes:
                x0, y0, x1, y1 = s["bbox"]
                assert _nearest_colour(img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))) == s["colour"]
            # A pixel outside every shape shows the (slightly shaded) background colour.
            w, h = img.size
            free = next(
                (x, y)
                for y in range(2, h, 7)
                for x in range(2, w, 7)
                if not any(b[0] - 2 <= x <= b[2] + 2 and b[1] - 2 <= y <= b[3] + 2 for b in (s["bbox"] for s in shapes))
            )
            assert _nearest_colour(img.getpixel(free)) == r["background"]
        # Relations in the caption hold in the drawing.
        if len(shapes) == 2:
            a, b = shapes
            if a["position"] == "left":
                assert a["bbox"][2] < b["bbox"][0]
            if a["position"] == "top":
                assert a["bbox"][3] < b["bbox"][1]


def test_planted_image_sizes(web, truth):
    sizes = {k: (row_of(truth, k)["true_width"], row_of(truth, k)["true_height"]) for k in ("too_small", "too_small_declared", "extreme_aspect")}
    assert sizes == {"too_small": (40, 40), "too_small_declared": (40, 32), "extreme_aspect": (1600, 200)}
    meta = {r["SAMPLE_ID"]: r for r in pq.read_table(web.metadata_path).to_pylist()}
    assert (meta[row_of(truth, "too_small")["SAMPLE_ID"]]["WIDTH"], meta[row_of(truth, "too_small")["SAMPLE_ID"]]["HEIGHT"]) == (512, 512)
    assert meta[row_of(truth, "too_small_declared")["SAMPLE_ID"]]["WIDTH"] == 40
    assert len(row_of(truth, "caption_long")["TEXT"]) == 5000
    ok = [r for r in truth if r["kind"] == "ok"]
    assert sum(min(r["true_width"], r["true_height"]) >= 1024 for r in ok) >= 0.08 * len(ok)
    assert all(0.5 <= r["true_width"] / r["true_height"] <= 1.9 and max(r["true_width"], r["true_height"]) <= 1600 for r in ok)


def test_truncated_jpeg_opens_but_does_not_decode(web, truth):
    path = web.images_dir / row_of(truth, "truncated_jpeg")["image_file"]
    with Image.open(path) as img:
        assert img.format == "JPEG"
        with pytest.raises(OSError):
            img.load()


def test_decompression_bomb_is_small_and_declares_over_200_megapixels(web, truth, monkeypatch):
    path = web.images_dir / row_of(truth, "decompression_bomb")["image_file"]
    assert path.stat().st_size < 100_000
    with pytest.raises(Image.DecompressionBombError):  # Pillow's own limit already refuses it
        Image.open(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(path) as img:  # header only; pixels are never loaded here
        w, h = img.size
    assert w * h > 200_000_000 > 178_956_970


def test_small_failure_rate_takes_kinds_in_order_and_clean_web(tmp_path):
    few = synth.synthesize(tmp_path / "few", rows=10, seed=3, failure_rate=0.5)
    assert set(few.kinds) == {"ok", *synth.FAILURE_KINDS[:5]}
    assert synth.synthesize(tmp_path / "all", rows=4, failure_rate=1.0).kinds["ok"] == 1
    clean = synth.synthesize(tmp_path / "clean", rows=12, seed=4, failure_rate=0.0, size_range=(640, 1600), formats=("jpeg",))
    rows = pq.read_table(clean.ground_truth_path).to_pylist()
    assert {r["kind"] for r in rows} == {"ok"} and {r["format"] for r in rows} == {"jpeg"}
    assert all(640 <= max(r["true_width"], r["true_height"]) <= 1600 for r in rows)


def test_cli_helpers(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    synth.add_synth_args(sub.add_parser("synth"))
    synth_server.add_serve_args(sub.add_parser("serve"))
    args = parser.parse_args(["synth", "--rows", "20", "--out", str(tmp_path / "w"), "--seed", "5", "--failure-rate", "0.2"])
    assert synth.main_synth(args) == 0
    web = synth.SynthWeb.load(tmp_path / "w")
    assert (web.rows, web.seed, web.failure_rate) == (20, 5, 0.2)
    assert web.base_url in capsys.readouterr().out
    assert parser.parse_args(["serve", str(tmp_path / "w")]).dir == str(tmp_path / "w")


# --- server -----------------------------------------------------------------------------------


def test_ok_images_served_with_their_content_type(web, truth, server):
    assert server.allow_hosts == f"127.0.0.1:{web.port}" and server.base_url == web.base_url
    for fmt in ("jpeg", "png", "webp"):
        row = next(r for r in truth if r["kind"] == "ok" and r["format"] == fmt)
        status, headers, body = fetch(row["URL"])
        assert (status, headers["content-type"], body) == (200, synth.CONTENT_TYPES[fmt], image_bytes(web, row))
        status, headers, body = fetch(row["URL"], method="HEAD")
        assert (status, body, int(headers["content-length"])) == (200, b"", len(image_bytes(web, row)))
    assert fetch(f"{web.base_url}/no-such-image.jpg")[0] == 404


@pytest.mark.parametrize("code", [404, 410, 500])
def test_error_statuses(truth, server, code):
    assert fetch(row_of(truth, f"http_{code}")["URL"])[0] == code


@pytest.mark.parametrize("code", [429, 503])
def test_retry_then_image(web, truth, server, code):
    row = row_of(truth, f"retry_{code}")
    status, headers, _ = fetch(row["URL"])
    assert (status, headers["retry-after"]) == (code, "1")
    status, _, body = fetch(row["URL"])
    assert (status, body) == (200, image_bytes(web, row))


def test_redirect_chain_reaches_the_image(web, truth, server):
    row = row_of(truth, "redirect_chain")
    url, statuses = row["URL"], []
    for _ in range(5):
        status, headers, body = fetch(url)
        statuses.append(status)
        if status != 200:
            url = urljoin(url, headers["location"])
            assert urlsplit(url).netloc == urlsplit(web.base_url).netloc
    assert statuses[:4] == [302, 301, 307, 200]
    assert body == image_bytes(web, row)


def test_redirect_loop_never_ends(web, truth, server):
    url, seen = row_of(truth, "redirect_loop")["URL"], set()
    for _ in range(12):
        status, headers, _ = fetch(url)
        assert status == 302
        url = urljoin(url, headers["location"])
        assert url not in seen
        seen.add(url)


def test_private_redirects_lead_to_live_aux_listeners(web, truth, server):
    targets = {
        "redirect_other_port": ("127.0.0.1", web.aux_port),
        "redirect_127_0_0_2": ("127.0.0.2", web.alt_loopback_port),
        "redirect_ipv6_loopback": ("::1", web.ipv6_port),
    }
    for kind, (host, port) in targets.items():
        row = row_of(truth, kind)
        status, headers, _ = fetch(row["URL"])
        location = urlsplit(headers["location"])
        assert (status, location.hostname, location.port) == (302, host, port)
        if (host, port) in server.listeners:  # 127.0.0.2 / ::1 are skipped where they cannot bind
            status, headers, body = fetch(headers["location"])
            assert (status, headers["content-type"], body) == (200, synth.CONTENT_TYPES[row["format"]], image_bytes(web, row))
    assert ("127.0.0.1", web.aux_port) in server.listeners


@pytest.mark.parametrize(
    "kind,tag",
    [("robots_noai", "noai"), ("robots_noimageai", "noimageai"), ("robots_otherbot", "otherbot: noai"), ("robots_noindex", "noindex")],
)
def test_robots_headers(web, truth, server, kind, tag):
    row = row_of(truth, kind)
    status, headers, body = fetch(row["URL"])
    assert (status, headers["x-robots-tag"], body) == (200, tag, image_bytes(web, row))


def test_zero_bytes_and_html_served_as_jpeg(truth, server):
    status, headers, body = fetch(row_of(truth, "zero_bytes")["URL"])
    assert (status, headers["content-length"], body) == (200, "0", b"")
    status, headers, body = fetch(row_of(truth, "html_as_jpeg")["URL"])
    assert (status, headers["content-type"]) == (200, "image/jpeg")
    assert body.lstrip().lower().startswith(b"<!doctype html")


def _open_raw(url: str, timeout: float) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    sock.sendall(f"GET {parts.path} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
    return sock


def test_stall_sends_nothing(truth, server):
    with _open_raw(row_of(truth, "stall")["URL"], timeout=0.5) as sock:
        with pytest.raises(socket.timeout):
            sock.recv(1)


def test_slow_drip_does_not_complete_quickly(truth, server):
    status, headers, _ = fetch(row_of(truth, "slow_drip")["URL"], method="HEAD")
    assert status == 200 and int(headers["content-length"]) >= 200_000
    received = b""
    with _open_raw(row_of(truth, "slow_drip")["URL"], timeout=0.5) as sock:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            assert chunk
            received += chunk
    assert received.startswith(b"HTTP/1.0 200")
    assert len(received) < 2_000  # headers plus a few 64-byte drips


def test_many_concurrent_requests(web, truth, server):
    ok = [r for r in truth if r["kind"] == "ok"][:50]
    urls = [r["URL"] for r in ok] * 6
    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(lambda u: fetch(u)[0], urls))
    assert statuses == [200] * len(urls)
    assert time.monotonic() - t0 < 15


def test_stop_is_prompt_with_stalled_and_dripping_clients(tmp_path):
    web = synth.synthesize(tmp_path / "w", rows=40, seed=6, failure_rate=0.5)
    rows = pq.read_table(web.ground_truth_path).to_pylist()
    server = synth_server.serve(web)
    clients = [_open_raw(row_of(rows, k)["URL"], timeout=5) for k in ("stall", "slow_drip")]
    idle = socket.create_connection(("127.0.0.1", web.port), timeout=5)  # connected, never sends a request
    time.sleep(0.3)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 2.0
    server.stop()  # idempotent
    for sock in clients:
        sock.settimeout(2)
        while sock.recv(65536):  # the server hung up: reads reach EOF instead of blocking
            pass
        sock.close()
    idle.close()
    ours = {f"synth-{port}" for port in (web.port, web.aux_port, web.alt_loopback_port, web.ipv6_port)}
    assert not [t for t in threading.enumerate() if t.name in ours]
    with synth_server.serve(web):  # the ports are free again
        assert fetch(row_of(rows, "ok")["URL"])[0] == 200


def test_plain_background_captions_cover_every_shapeless_scene(truth):
    """The tiny Detoxify trains on these: every caption a planted bomb (no shapes) can get."""
    plain = set(synth.plain_background_captions())
    bombs = [r for r in truth if r["kind"] == "decompression_bomb"]
    assert bombs and all(r["TEXT"] in plain for r in bombs)
    assert len(plain) == len(synth.COLOURS) * len(synth.caption_forms("a plain red background"))
    assert "Clip art of a plain white background" in plain
