"""Decode a stored image at the size a cascade stage needs: JPEG draft (DCT-domain) decoding.

A sample stored at 1024 px feeds the 64 px base stage as well as the SR stages. Decoding its JPEG
in full and then shrinking it 16x spends most of the loader's time on pixels that are averaged away.
libjpeg can instead run the inverse DCT at 1/2, 1/4 or 1/8 scale (Pillow's `Image.draft`), so a
1024 px JPEG comes out at 128 px for the 64 px stage and only that is resized. Measured per core on
photo-like 1024 px JPEGs (~260 KB; bench/gpu.py --only loader, bench/README.md "Trainer loader"):
decode + resize 166 img/s vs 68 with full decode; the whole loader for base64 (tar, T5 array,
collate) 98 vs 55. Entropy decoding, which draft does not shorten, is what remains.

    img = open_at_size(data, 64)     # PIL RGB image, loaded; shorter side >= 64 if the stored one is
    # then train.data's resize: shorter side to 64 (box filter), centre square

`open_at_size` asks for the smallest DCT scale whose output still has BOTH sides >= `size`
(Pillow's draft rounds the scale down to 1, 1/2, 1/4 or 1/8 so the result is never smaller than
asked), so the stage's resize that follows only ever shrinks, exactly as after a full decode, and
an image is never upscaled by the draft. Non-JPEG images (PNG, WebP) decode in full: draft is a
no-op for them. A JPEG whose sides are already within 2x of `size` decodes at full scale.

What changes: the pixels differ from full decode + box resize by rounding only. The DCT-domain
reduction averages each 8x8 block's frequencies rather than its pixels, and libjpeg's reduced-size
IDCT rounds at another point; after the stage's box resize the result is a slightly different
area average of the same picture. Measured on photo-like 1024 px JPEGs (quality 90, ~260 KB; the
test's content): mean |difference| 0.53 levels of 255 at 64 px, 0.54 at 128, 0.69 at 256, 0.79 at
512; the mean difference (a uniform offset from rounding at another point) +0.48, -0.08, -0.26 and
-0.50 levels, i.e. at most ~0.004 in the model's [-1, 1] units; the largest single difference 2, 3,
5 and 10 levels (tests/train/test_decode.py bounds it). The stage's tensors keep their shape, dtype
and value range: uint8 [3, R, R] before make_example scales them to [-1, 1].
"""

from __future__ import annotations

import io

from PIL import Image

__all__ = ["open_at_size"]


def open_at_size(data: bytes, size: int | None) -> Image.Image:
    """`data` (image bytes) -> a loaded RGB PIL image; a JPEG is decoded at the smallest DCT scale
    (1, 1/2, 1/4, 1/8) whose width and height are both still >= `size` (None: full size).

    Raises what Pillow raises for a file that does not decode (OSError, ValueError, SyntaxError,
    Image.DecompressionBombError): train.data counts those as `bad_image`."""
    with Image.open(io.BytesIO(data)) as im:
        if size is not None and im.format == "JPEG":
            im.draft("RGB", (int(size), int(size)))  # before load(): only then does libjpeg scale the IDCT
        im.load()  # decode now: a truncated or corrupt file fails here, not later
        return im.convert("RGB")
