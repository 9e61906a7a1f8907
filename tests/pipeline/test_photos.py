"""Photo-like content for the synthetic web (pipeline/testbed/photos.py): deterministic, the
declared size, JPEGs that weigh and decode like photographs, only the "ok" JPEGs replaced."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipeline.image import decode_image
from pipeline.testbed import photos, synth


def test_photo_jpeg_is_deterministic_and_exactly_sized():
    a = photos.photo_jpeg(1203, 801, "abc.jpg")
    assert a == photos.photo_jpeg(1203, 801, "abc.jpg")
    assert a != photos.photo_jpeg(1203, 801, "abd.jpg")
    assert a != photos.photo_jpeg(1203, 801, "abc.jpg", seed=1)
    with Image.open(io.BytesIO(a)) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (1203, 801))
    d = decode_image(a)
    assert (d.original_width, d.original_height) == (1203, 801)


def test_photo_jpeg_carries_photographic_detail():
    """Far more bytes per pixel than the drawn shapes at the same size, and real texture: the
    mean absolute difference between neighbouring pixels is that of a photograph, not of flat colour."""
    data = photos.photo_jpeg(1024, 768, "detail.jpg")
    assert 0.15 < len(data) / (1024 * 768) < 1.0  # measured: 0.26-0.32 bytes a pixel at q90
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.int16)
    grad = np.abs(np.diff(arr, axis=1)).mean()
    assert 2.0 < grad < 30.0
    shapes = synth._Picture(1024, 768, "blue", (), "jpeg", 90).encode()
    assert len(data) > 5 * len(shapes)


def test_photoize_replaces_only_ok_jpegs(tmp_path):
    web = synth.synthesize(tmp_path / "web", rows=40, seed=3, failure_rate=0.3, size_range=(640, 900), formats=("jpeg", "png"))
    before = {p.name: p.read_bytes() for p in web.images_dir.iterdir()}
    meta, routes = web.metadata_path.read_bytes(), (web.root / "routes.json").read_text()
    stats = photos.photoize(web)
    after = {p.name: p.read_bytes() for p in web.images_dir.iterdir()}
    truth = pq.read_table(web.ground_truth_path).to_pylist()
    ok_jpegs = {t["image_file"]: (t["true_width"], t["true_height"]) for t in truth if t["kind"] == "ok" and t["format"] == "jpeg"}
    assert stats["files"] == len(ok_jpegs) > 0
    assert stats["bytes"] == sum(len(after[n]) for n in ok_jpegs)
    for name in after:
        if name in ok_jpegs:
            assert after[name] != before[name]
            with Image.open(io.BytesIO(after[name])) as im:
                assert im.size == ok_jpegs[name]
        else:
            assert after[name] == before[name]  # planted failures, PNGs: untouched
    assert web.metadata_path.read_bytes() == meta and (web.root / "routes.json").read_text() == routes
    assert json.loads((web.root / "web.json").read_text())["rows"] == 40
    # Deterministic: a second photoize of the same web writes the same bytes.
    photos.photoize(web)
    assert {p.name: p.read_bytes() for p in web.images_dir.iterdir()} == after
