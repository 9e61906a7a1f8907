"""Download + resize + write: kiln vs img2dataset, and the bare CPU floor, in one run.

    .venv/bin/python bench/download.py [--rows 2000] [--image-size 256 1024]

One synthetic web of clean JPEG URLs (640x480 .. 1600x1200, like ANCHORS.md) served from
127.0.0.1. For each image size, in the same process tree and on the same web:
  img2dataset  webdataset output, center_crop, processes_count=2, thread_count=16, no upscaling
  kiln         `kiln prepare` (filters off: there are none yet), in-process DirectRunner and
               multi_processing with 2 workers, timed from start to finished shards + manifest
  floor        bytes already in memory, 2 processes: cv2 decode + center crop + area resize +
               JPEG q95 encode (the ANCHORS.md floor), and kiln's own decode/resize/encode
               functions (JPEG draft decoding) -- no network, no Beam, no writing
Prints images/s for each and the ratios kiln/img2dataset and kiln/floor.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.compat import set_quiet_env  # noqa: E402

set_quiet_env()


def run_img2dataset(meta: str, out: str, image_size: int) -> float:
    from img2dataset import download

    t0 = time.perf_counter()
    download(
        url_list=meta, input_format="parquet", url_col="URL", caption_col="TEXT", output_format="webdataset",
        output_folder=out, processes_count=2, thread_count=16, image_size=image_size, resize_mode="center_crop",
        resize_only_if_bigger=True, timeout=10, retries=0, enable_wandb=False, number_sample_per_shard=10_000,
        distributor="multiprocessing", disallowed_header_directives=[],
    )
    return time.perf_counter() - t0


def count_img2dataset(out: str) -> int:
    return sum(json.loads(p.read_text())["successes"] for p in Path(out).glob("*_stats.json"))


def run_kiln(meta: str, out: str, allow: str, image_size: int, beam: list[str]) -> tuple[float, int]:
    from pipeline.testbed import prepare_config
    from pipeline.prepare import run

    args = prepare_config(meta, out, allow, "--quiet", "--overwrite", "--image-size", str(image_size), "--download-timeout", "10",
                        "--toxicity", "off", "--clip", "off", "--nsfw", "off", "--t5", "off")
    t0 = time.perf_counter()
    stats = run(args, beam)
    return time.perf_counter() - t0, stats["kept"]


def _floor_cv2(job):
    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    data, size = job
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    t = min(s, size)
    img = cv2.resize(img, (t, t), interpolation=cv2.INTER_AREA)
    return len(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1])


def _floor_kiln(job):
    import cv2

    from pipeline.config import ImageConfig
    from pipeline.image import decode_image, resize_and_encode

    cv2.setNumThreads(1)
    data, size = job
    d = decode_image(data, draft_target=size)
    return len(resize_and_encode(d.bgr, ImageConfig(image_size=size))[0])


def run_floor(fn, blobs: list[bytes], image_size: int) -> float:
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(fn, [(blobs[0], image_size)] * 4)  # warm the workers' imports
        t0 = time.perf_counter()
        pool.map(fn, [(b, image_size) for b in blobs], chunksize=16)
        return time.perf_counter() - t0


def _wait_for(base_url: str, timeout_s: float = 30.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(base_url + "/", timeout=1)  # noqa: S310 - 127.0.0.1 only
            return
        except urllib.error.HTTPError:
            return  # the server answered (404 for "/")
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"synthetic web at {base_url} did not come up")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--image-size", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-multiprocess", action="store_true")
    a = ap.parse_args()

    from pipeline.testbed.synth import synthesize

    work = Path(a.workdir or tempfile.mkdtemp(prefix="kiln-bench-"))
    t0 = time.perf_counter()
    web = synthesize(work / "web", rows=a.rows, seed=123, failure_rate=0.0, size_range=(640, 1600), formats=("jpeg",))
    print(f"synthesised {a.rows} JPEG URLs in {time.perf_counter() - t0:.1f}s at {work / 'web'}")
    blobs = [p.read_bytes() for p in sorted(web.images_dir.rglob("*")) if p.is_file()]
    meta = str(web.metadata_path)
    results = []
    # The web is served by another process, as a real one would be: in-process it would share
    # kiln's GIL (and not img2dataset's), which would skew the comparison.
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(work / "web")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(Path(__file__).resolve().parent.parent))
    try:
        _wait_for(web.base_url)
        for size in a.image_size:
            row = {"image_size": size}
            out = work / f"i2d-{size}"
            shutil.rmtree(out, ignore_errors=True)
            secs = run_img2dataset(meta, str(out), size)
            row["img2dataset"] = count_img2dataset(str(out)) / secs
            secs, kept = run_kiln(meta, str(work / f"kiln-{size}"), web.allow_hosts, size, [])
            row["kiln_inprocess"] = kept / secs
            if not a.skip_multiprocess:
                secs, kept = run_kiln(meta, str(work / f"kiln-mp-{size}"), web.allow_hosts, size,
                                      ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
                row["kiln_multiprocess"] = kept / secs
            row["floor_cv2"] = len(blobs) / run_floor(_floor_cv2, blobs, size)
            row["floor_kiln_fns"] = len(blobs) / run_floor(_floor_kiln, blobs, size)
            results.append(row)
            print(json.dumps(row))
    finally:
        server.terminate()
        server.wait(10)

    print(f"\n{'size':>5} {'img2dataset':>12} {'kiln 1proc':>11} {'kiln 2proc':>11} {'floor cv2':>10} {'floor kiln':>11}   kiln/i2d  kiln/floor")
    for r in results:
        best = max(r["kiln_inprocess"], r.get("kiln_multiprocess", 0))
        print(f"{r['image_size']:>5} {r['img2dataset']:>10.1f}/s {r['kiln_inprocess']:>9.1f}/s {r.get('kiln_multiprocess', float('nan')):>9.1f}/s "
              f"{r['floor_cv2']:>8.1f}/s {r['floor_kiln_fns']:>9.1f}/s   {best / r['img2dataset']:6.2f}x  {best / r['floor_cv2']:6.2f}x")
    print("(images/s, wall clock from start to finished shards; floors: bytes in memory, 2 processes, no network/Beam/writes)")


if __name__ == "__main__":
    main()
