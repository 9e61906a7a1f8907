"""What the consent checks cost per image, against named baselines measured in the same run.

    .venv/bin/python bench/consent.py [--n 50] [--size 1024x768]

  1. PDQ as kiln computes it (pipeline.blocklist.pdq_of: downscaled to <= 512 px with area
     averaging, then pdqhash) against pdqhash on the full decoded image (the baseline), and the
     Hamming distance between the two hashes over --n photo-like images (PDQ reduces every image to
     64x64 luma, so the downscale moves only a few of its 256 bits; the default match threshold is 31);
  2. C2PA (pipeline.c2pa_check.training_mining) on an image without a manifest (the marker search
     only) and on a signed one (the full c2pa-python read), against decoding the same JPEG with
     Pillow (the baseline every image pays anyway);
  3. the blocklist row check (URL sha256 + md5 + domain walk) against a 1,000-entry list, per row.

Single-threaded, on whatever else the machine is doing: compare the ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.blocklist import Blocklist, Blocklists, pdq_of  # noqa: E402
from pipeline.c2pa_check import training_mining  # noqa: E402


def photo(rng, w, h):
    """Smooth random structure plus fine noise: roughly a photograph's spectrum."""
    base = Image.fromarray(rng.integers(0, 255, (h // 24, w // 24, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(base).astype(np.int16) + rng.integers(-12, 12, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def per_call_ms(fn, args_list) -> float:
    fn(args_list[0])
    t0 = time.perf_counter()
    for a in args_list:
        fn(a)
    return (time.perf_counter() - t0) / len(args_list) * 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--size", default="1024x768")
    args = ap.parse_args(argv)
    w, h = (int(x) for x in args.size.split("x"))
    rng = np.random.default_rng(0)
    images = [photo(rng, w, h) for _ in range(args.n)]

    import pdqhash

    def full(a):
        return np.packbits(pdqhash.compute(a)[0].astype(np.uint8)).tobytes().hex()

    t_full = per_call_ms(full, images)
    t_ours = per_call_ms(lambda a: pdq_of(a, bgr=False), images)
    dist = [bin(int(full(a), 16) ^ int(pdq_of(a, bgr=False)[0], 16)).count("1") for a in images]
    print(f"PDQ at {w}x{h}: full-size pdqhash (baseline) {t_full:.1f} ms, kiln's pdq_of {t_ours:.1f} ms "
          f"-> {t_full / t_ours:.2f}x faster; distance to the full-size hash: median {int(np.median(dist))}, "
          f"max {max(dist)} of 256 bits (threshold 31)")

    jpegs = []
    for a in images[: min(20, len(images))]:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    t_decode = per_call_ms(lambda d: np.asarray(Image.open(io.BytesIO(d)).convert("RGB")), jpegs)
    t_marker = per_call_ms(lambda d: training_mining(d, "image/jpeg"), jpegs)
    line = (f"C2PA on {np.mean([len(j) for j in jpegs]) / 1e6:.2f} MB JPEGs: Pillow decode (baseline) {t_decode:.2f} ms; "
            f"no manifest {t_marker:.3f} ms ({100 * t_marker / t_decode:.1f}% of the decode)")
    try:
        from pipeline.testbed.c2pa_sign import sign, training_mining as assertion

        signed = [sign(j, "image/jpeg", [assertion(c2pa_ai_training="notAllowed")]) for j in jpegs[:5]]
        assert all(training_mining(s, "image/jpeg")[0] == "notAllowed" for s in signed)
        t_signed = per_call_ms(lambda d: training_mining(d, "image/jpeg"), signed)
        line += f"; signed {t_signed:.2f} ms ({t_signed / t_decode:.2f}x the decode)"
    except ImportError as e:  # cryptography missing: the signed case cannot be built here
        line += f"; signed: not measured ({e})"
    print(line)

    entries = {"url_sha256": {f"{i:064x}" for i in range(1000)}, "url_md5": {f"{i:032x}" for i in range(1000)},
               "domain": {f"host{i}.example" for i in range(1000)}}
    lists = Blocklists([Blocklist(name="bench", path="-", sha256="0" * 64, entries=entries)])
    urls = [f"https://cdn{i % 97}.img.example.org/a/b/{i}.jpg" for i in range(20000)]
    t_row = per_call_ms(lambda u: lists.match_row(None, u), urls)
    print(f"blocklist row check (3,000 entries): {t_row * 1000:.1f} us per row")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
