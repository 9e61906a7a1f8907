"""Photo-like JPEGs for the synthetic web: throughput measured on content that decodes like the web's.

The synthetic web's drawn shapes (synth.py) are flat colour: libjpeg decodes them several times
faster than photographs of the same size, because almost every DCT coefficient is zero. A download
benchmark on them flatters the decoder. `photoize` replaces the picture behind each "ok" JPEG of a
synthesized web with a crop of one of the real photographs scikit-image ships in its package
(astronaut, coffee, chelsea, rocket, motorcycle, Hubble deep field), rescaled to the same width and
height with bicubic filtering, plus a fixed film-grain field (Gaussian, sigma 3.9 levels in
luminance, half that per colour channel): the rescaled crops are smoother than a camera's output,
and the grain restores the high-frequency detail that makes a photograph's JPEG large and slow to
decode. Encoded as JPEG quality 90 (4:2:0, Pillow's default), 640-1600 px files average ~270 KB,
as a web photograph of that size does.

Everything is a function of the seed and the file's name, so a photoized web is byte-identical on
every run. Captions still describe the drawn scene: a photoized web is for measuring throughput,
not for training or for filters that read the captions against the pixels.
"""

from __future__ import annotations

import io
import random
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipeline.testbed.synth import SynthWeb

# scikit-image's bundled colour photographs (files inside the wheel: nothing is downloaded).
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")
JPEG_QUALITY = 90
GRAIN_SIGMA = 3.9  # luminance grain, 8-bit levels; tuned so 640-1600 px files average ~270 KB
MIN_CROP = 0.6  # a crop spans 60-100% of the source's limiting side
_GRAIN_SIDE = 2048  # one grain field per seed; each image takes a window at a random offset


@lru_cache(maxsize=1)
def _sources() -> tuple[Image.Image, ...]:
    try:
        from importlib.resources import files

        root = files("skimage.data")
    except ModuleNotFoundError:
        raise RuntimeError("photo-like content needs scikit-image (pip install -e '.[bench]'; `make venv` installs it)") from None
    out = []
    for name in PHOTOS:
        with Image.open(root / name) as im:
            out.append(im.convert("RGB"))
    return tuple(out)


@lru_cache(maxsize=2)
def _grain(seed: int) -> np.ndarray:
    """[side, side, 3] int16 film grain: one luminance field shared by the channels plus weaker chroma noise."""
    g = np.random.default_rng(seed)
    luma = g.standard_normal((_GRAIN_SIDE, _GRAIN_SIDE, 1), dtype=np.float32) * GRAIN_SIGMA
    chroma = g.standard_normal((_GRAIN_SIDE, _GRAIN_SIDE, 3), dtype=np.float32) * (GRAIN_SIGMA / 2)
    return np.rint(luma + chroma).clip(-127, 127).astype(np.int16)


def photo_jpeg(width: int, height: int, key: str, seed: int = 0) -> bytes:
    """A photo-like JPEG of exactly width x height, determined by (key, seed)."""
    if width > _GRAIN_SIDE or height > _GRAIN_SIDE:
        raise ValueError(f"photo_jpeg makes at most {_GRAIN_SIDE} px a side, asked {width}x{height}")
    rng = random.Random(f"{seed}:{key}")
    sources = _sources()
    src = sources[rng.randrange(len(sources))]
    sw, sh = src.size
    # The largest crop of the target's aspect ratio, scaled by MIN_CROP..1, at a random place.
    f = rng.uniform(MIN_CROP, 1.0)
    cw = min(sw, sh * width / height) * f
    ch = cw * height / width
    x0, y0 = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
    if rng.random() < 0.5:
        src = src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    picture = src.resize((width, height), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    grain = _grain(seed)
    ox, oy = rng.randrange(_GRAIN_SIDE - width + 1), rng.randrange(_GRAIN_SIDE - height + 1)
    pixels = (np.asarray(picture, dtype=np.int16) + grain[oy : oy + height, ox : ox + width]).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def photoize(web: SynthWeb, seed: int = 0, threads: int = 4) -> dict:
    """Replace the image of every "ok" JPEG row of `web` with `photo_jpeg` of the same size, in place.

    The metadata (URLs, declared sizes) and routes are unchanged; only the pixels (and file sizes)
    are. Returns {"files": n, "bytes": total, "mean_bytes": ...}.
    """
    truth = pq.read_table(web.ground_truth_path, columns=["kind", "format", "image_file", "true_width", "true_height"]).to_pylist()
    jobs = sorted({(t["image_file"], t["true_width"], t["true_height"]) for t in truth if t["kind"] == "ok" and t["format"] == "jpeg"})
    _sources(), _grain(seed)  # build once, before the threads share them

    def write(job):
        name, w, h = job
        data = photo_jpeg(w, h, name, seed)
        (web.images_dir / name).write_bytes(data)
        return len(data)

    with ThreadPoolExecutor(max_workers=threads) as pool:  # Pillow's resize and encoder release the GIL
        sizes = list(pool.map(write, jobs))
    total = sum(sizes)
    return {"files": len(sizes), "bytes": total, "mean_bytes": total / max(1, len(sizes))}
