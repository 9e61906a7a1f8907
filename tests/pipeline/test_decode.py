"""pipeline/decode.py: the Decode and Resize stage functions over the run's ImageConfig."""

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ImageConfig
from pipeline.decode import decode_record, resize_record
from pipeline.records import Reject


def encoded(w, h, fmt="JPEG", colour=(200, 30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, fmt)
    return buf.getvalue()


def test_decode_then_resize_fills_the_record():
    record = {"uid": "a" * 32, "_body": encoded(640, 480)}
    cfg = ImageConfig(image_size=256)
    decoded = decode_record(record, cfg)
    assert "_body" not in decoded and "_body" in record  # the input record is not mutated
    assert (decoded["original_width"], decoded["original_height"], decoded["source_format"]) == (640, 480, "jpeg")
    assert decoded["_bgr"].dtype == np.uint8 and decoded["_bgr"].shape[2] == 3
    resized = resize_record(decoded, cfg)
    assert "_bgr" not in resized
    assert (resized["stored_width"], resized["stored_height"]) == (256, 256)  # center crop, then down to image_size
    assert resized["image_bytes"] == len(resized["_image"]) and resized["image_sha256"] == hashlib.sha256(resized["_image"]).hexdigest()
    stored = Image.open(io.BytesIO(resized["_image"]))
    assert stored.format == "JPEG" and stored.size == (256, 256)
    b, g, r = (int(v) for v in np.asarray(stored.convert("RGB"))[128, 128][::-1])
    assert abs(r - 200) < 8 and abs(g - 30) < 8 and abs(b - 40) < 8


def test_small_images_are_never_upscaled_and_png_is_lossless():
    decoded = decode_record({"uid": "b" * 32, "_body": encoded(100, 90, "PNG")}, ImageConfig(image_size=256, min_image_size=64))
    out = resize_record(decoded, ImageConfig(image_size=256, encode_format="png", encode_quality=9))
    assert (out["stored_width"], out["stored_height"]) == (90, 90)
    assert Image.open(io.BytesIO(out["_image"])).getpixel((45, 45)) == (200, 30, 40)


@pytest.mark.parametrize("body, cfg, reason", [
    (encoded(50, 200), ImageConfig(min_image_size=64), "too_small"),
    (encoded(400, 100), ImageConfig(max_aspect_ratio=3.0), "aspect_ratio"),
    (encoded(300, 300), ImageConfig(max_image_pixels=300 * 300 - 1), "decompression_bomb"),
    (b"<html>not an image</html>", ImageConfig(), "not_an_image"),
    (encoded(300, 300)[:400], ImageConfig(), "truncated"),
])
def test_decode_rejects_with_the_run_settings(body, cfg, reason):
    with pytest.raises(Reject) as err:
        decode_record({"uid": "c" * 32, "_body": body}, cfg)
    assert (err.value.stage, err.value.reason) == ("decode", reason)
