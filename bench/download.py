"""Download + resize + write: kiln vs img2dataset, and the bare CPU floor, in one run.

    .venv/bin/python bench/download.py [--rows 2000] [--image-size 256 1024]

One synthetic web of clean JPEG URLs (longer side 640 .. 1600 px, like ANCHORS.md) served from
127.0.0.1 by another process. `--content photos` (the default): crops of scikit-image's bundled
photographs with film grain, JPEG q90, ~270 KB a file (pipeline/testbed/photos.py), which decode
like the web's photographs; `--content shapes`: the synthetic web's flat drawn shapes, which
decode several times faster and flatter every decoder. For each image size, in the same process tree and on the same web:
  img2dataset  webdataset output, center_crop, processes_count=2, thread_count=16, no upscaling
  kiln         `kiln prepare` (filters off: there are none yet), in-process DirectRunner and
               multi_processing with 2 workers, timed from start to finished shards + manifest
  floor        bytes already in memory, 2 processes: cv2 decode + center crop + area resize +
               JPEG q95 encode (the ANCHORS.md floor), and kiln's own decode/resize/encode
               functions (JPEG draft decoding, resized on the source's grid) -- no network, no Beam, no writing
Prints images/s for each and the ratios kiln/img2dataset and kiln/floor, and the CPU each one
used per image (user + system, all its threads and processes; the web server's own CPU separately):
on a machine that other work also loads, wall-clock rates swing with the load and CPU ms per image
does not.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.compat import set_quiet_env  # noqa: E402

set_quiet_env()


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and of its children that have been waited for."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _pid_cpu_s(pid: int) -> float:
    """CPU seconds of a running process (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


class Measure:
    """Wall seconds, CPU seconds of the contender (this process + waited-for children) and of the
    web server, over a `with` block."""

    def __init__(self, server_pid: int | None = None):
        self.server_pid = server_pid

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), _cpu_s()
        self.s0 = _pid_cpu_s(self.server_pid) if self.server_pid else 0.0
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t0, _cpu_s() - self.c0
        self.server = (_pid_cpu_s(self.server_pid) - self.s0) if self.server_pid else 0.0


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
    return len(resize_and_encode(d.bgr, ImageConfig(image_size=size), (d.original_width, d.original_height))[0])


class _Timed:
    """fn(job) in a pool worker, returning the CPU seconds it took (the worker is single-threaded)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, job):
        c0 = time.process_time()
        self.fn(job)
        return time.process_time() - c0


def run_floor(fn, blobs: list[bytes], image_size: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of a 2-process pool's work on every blob, imports excluded."""
    timed = _Timed(fn)
    # Each worker runs one image first (its imports, cv2's and img2dataset's resizer module's, are
    # not part of the floor): a warm-up map could hand every warm-up job to the same worker.
    with mp.get_context("spawn").Pool(2, initializer=timed, initargs=((blobs[0], image_size),)) as pool:
        t0 = time.perf_counter()
        cpu = sum(pool.map(timed, [(b, image_size) for b in blobs], chunksize=16))
        return time.perf_counter() - t0, cpu


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
    ap.add_argument("--content", choices=("photos", "shapes"), default="photos", help="what the JPEGs show (see above)")
    ap.add_argument("--web", default=None, help="reuse a web this benchmark synthesised before (WORKDIR/web) instead of making one")
    ap.add_argument("--skip-multiprocess", action="store_true")
    a = ap.parse_args()

    from pipeline.testbed.synth import SynthWeb, synthesize

    work = Path(a.workdir or tempfile.mkdtemp(prefix="kiln-bench-"))
    t0 = time.perf_counter()
    if a.web:
        web = SynthWeb.load(a.web)
    else:
        web = synthesize(work / "web", rows=a.rows, seed=123, failure_rate=0.0, size_range=(640, 1600), formats=("jpeg",))
        if a.content == "photos":
            from pipeline.testbed.photos import photoize

            photoize(web)
    blobs = [p.read_bytes() for p in sorted(web.images_dir.rglob("*")) if p.is_file()]
    print(f"web: {web.rows} JPEG URLs at {web.root}, mean {sum(map(len, blobs)) / len(blobs) / 1e3:.0f} KB a file "
          f"({time.perf_counter() - t0:.1f}s to make or load)")
    meta = str(web.metadata_path)
    results = []
    # The web is served by another process, as a real one would be: in-process it would share
    # kiln's GIL (and not img2dataset's), which would skew the comparison.
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(web.root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(Path(__file__).resolve().parent.parent))
    try:
        _wait_for(web.base_url)
        for size in a.image_size:
            row = {"image_size": size, "load_avg_1m": round(os.getloadavg()[0], 2)}

            def record(name, m, n):
                row[name] = n / m.wall  # images/s
                row[f"{name}_cpu_ms"] = 1000 * m.cpu / n  # its own CPU per image
                if m.server:
                    row[f"{name}_server_cpu_ms"] = 1000 * m.server / n  # the web server's CPU per image

            out = work / f"i2d-{size}"
            shutil.rmtree(out, ignore_errors=True)
            with Measure(server.pid) as m:
                run_img2dataset(meta, str(out), size)
            record("img2dataset", m, count_img2dataset(str(out)))
            with Measure(server.pid) as m:
                _, kept = run_kiln(meta, str(work / f"kiln-{size}"), web.allow_hosts, size, [])
            record("kiln_inprocess", m, kept)
            if not a.skip_multiprocess:
                with Measure(server.pid) as m:
                    _, kept = run_kiln(meta, str(work / f"kiln-mp-{size}"), web.allow_hosts, size,
                                       ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
                record("kiln_multiprocess", m, kept)
            for name, fn in (("floor_cv2", _floor_cv2), ("floor_kiln_fns", _floor_kiln)):
                wall, cpu = run_floor(fn, blobs, size)
                row[name], row[f"{name}_cpu_ms"] = len(blobs) / wall, 1000 * cpu / len(blobs)
            row["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
            results.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    finally:
        server.terminate()
        server.wait(10)

    print(f"\n{'size':>5} {'img2dataset':>12} {'kiln 1proc':>11} {'kiln 2proc':>11} {'floor cv2':>10} {'floor kiln':>11}   kiln/i2d  kiln/floor-cv2  kiln/floor-kiln")
    for r in results:
        best = max(r["kiln_inprocess"], r.get("kiln_multiprocess", 0))
        print(f"{r['image_size']:>5} {r['img2dataset']:>10.1f}/s {r['kiln_inprocess']:>9.1f}/s {r.get('kiln_multiprocess', float('nan')):>9.1f}/s "
              f"{r['floor_cv2']:>8.1f}/s {r['floor_kiln_fns']:>9.1f}/s   {best / r['img2dataset']:6.2f}x  {best / r['floor_cv2']:12.2f}x  {best / r['floor_kiln_fns']:13.2f}x")
    print("(images/s, wall clock from start to finished shards; floors: bytes in memory, 2 processes, no network/Beam/writes)")
    print(f"\n{'size':>5} {'img2dataset':>12} {'kiln 1proc':>11} {'kiln 2proc':>11} {'floor cv2':>10} {'floor kiln':>11}   CPU ms per image")
    for r in results:
        print(f"{r['image_size']:>5} {r['img2dataset_cpu_ms']:>12.1f} {r['kiln_inprocess_cpu_ms']:>11.1f} {r.get('kiln_multiprocess_cpu_ms', float('nan')):>11.1f} "
              f"{r['floor_cv2_cpu_ms']:>10.1f} {r['floor_kiln_fns_cpu_ms']:>11.1f}")
        print(f"{'':>5} {r['img2dataset_server_cpu_ms']:>12.1f} {r['kiln_inprocess_server_cpu_ms']:>11.1f} {r.get('kiln_multiprocess_server_cpu_ms', float('nan')):>11.1f}"
              f"{'':>23}   + the web server's")
    print("(user + system CPU of each contender's processes and threads per image; floors: the pool's work only;"
          " load average over 1 min: "
          + ", ".join(f"{r['load_avg_1m']}-{r['load_avg_1m_end']} at {r['image_size']}" for r in results) + ")")


if __name__ == "__main__":
    main()
