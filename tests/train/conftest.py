"""Shards for the trainer's tests.

`small_shards` (fast tests): a hand-written dataset in the SHARDS.md layout -- two tars with
KEY.jpg / KEY.json / KEY.t5.npy / KEY.txt members in uid order, meta parquet files with the
columns the trainer reads, a manifest -- with images of known pixels at several stored sizes and
random float16 "T5" arrays of known lengths. Built in well under a second.

`synth_dataset` (slow tests): the real thing, built ONCE per session by the project's own
pipeline: `pipeline.testbed.synth.synthesize` draws a synthetic web, `SynthServer` serves it on
127.0.0.1, `pipeline.prepare.run` downloads, resizes (128 px), embeds the captions with the tiny
local T5 (`cached_test_models`) and writes shards -- the same path a user's data takes.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from train.config import load_config

SMALL_D_MODEL = 8

# A U-Net small enough that a step takes milliseconds, reading the 8-dim test "T5".
MICRO = {
    "unet.dim": 8, "unet.dim_mults": [1, 2], "unet.num_res_blocks": [1, 1], "unet.attn_levels": [False, True],
    "unet.cross_attn_levels": [False, False], "unet.heads": 2, "unet.head_dim": 8, "unet.text_dim": SMALL_D_MODEL,
    "unet.cond_dim": 16, "data.resolution": 16, "data.text_max_len": 6, "data.min_stored_size": 64,
    "train.batch_size": 4, "train.warmup_steps": 3, "train.log_every": 2, "train.sample_every": 0,
    "train.ckpt_every": 0, "train.ema_start": 1, "train.ema_decay": 0.9,
}


def micro_cfg(**extra):
    """tiny-base shrunk to MICRO (16 px, 8-dim text)."""
    return load_config("tiny-base", {**MICRO, **extra})


def micro_sr_cfg(**extra):
    """tiny-sr shrunk to MICRO (8 -> 16 px unless overridden)."""
    return load_config("tiny-sr", {**MICRO, "unet.lowres_cond": True, "data.lowres_resolution": 8, **extra})


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`): one
    intra-op thread is fastest, and 2 threads on a busy 2-core box can be ~100x slower (OpenMP
    spin-waits). Restored afterwards so other test modules are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# stored side -> how many samples: 48 px ones must be skipped by a 64 px stage.
SMALL_SIZES = {48: 4, 64: 10, 96: 6, 128: 4}


def _uid(i: int) -> str:
    return hashlib.sha256(f"small-{i}".encode()).hexdigest()[:32]


def small_image(i: int, side: int) -> Image.Image:
    """A picture whose pixels a test can predict: a horizontal gradient in red, a vertical one in
    green, blue fixed per sample; PNG-encoded, so lossless."""
    x = np.linspace(0, 255, side, dtype=np.float32)
    img = np.zeros((side, side, 3), dtype=np.uint8)
    img[..., 0] = x[None, :].round().astype(np.uint8)
    img[..., 1] = x[:, None].round().astype(np.uint8)
    img[..., 2] = (37 * i) % 256
    return Image.fromarray(img)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 946684800, 0o444
    tar.addfile(info, io.BytesIO(data))


def write_small_dataset(root: Path, d_model: int = SMALL_D_MODEL, shards: int = 2) -> list[dict]:
    """Write the dataset; returns one dict per sample (uid, side, t5 array, caption), uid order."""
    rng = np.random.default_rng(0)
    samples = []
    i = 0
    for side, n in SMALL_SIZES.items():
        for _ in range(n):
            t5_len = int(rng.integers(2, 12))
            samples.append({
                "uid": _uid(i), "index": i, "side": side,
                "t5": rng.standard_normal((t5_len, d_model)).astype(np.float16),
                "caption": f"sample {i} at {side} px",
            })
            i += 1
    samples.sort(key=lambda s: s["uid"])
    (root / "shards").mkdir(parents=True)
    (root / "meta").mkdir()
    per = -(-len(samples) // shards)
    manifest = {"format": "kiln-shards/1", "num_shards": shards, "samples": len(samples), "shards": []}
    for k in range(shards):
        part = samples[k * per : (k + 1) * per]
        tar_path = root / "shards" / f"{k:06d}.tar"
        rows = []
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for s in part:
                buf = io.BytesIO()
                small_image(s["index"], s["side"]).save(buf, "PNG")
                meta = {"uid": s["uid"], "TEXT": s["caption"], "stored_width": s["side"], "stored_height": s["side"],
                        "t5_len": len(s["t5"]), "t5_truncated": False}
                npy = io.BytesIO()
                np.save(npy, s["t5"].astype("<f2"))
                # SHARDS.md member order: .jpg/.png, .json, .t5.npy, .txt (a PNG here: lossless pixels)
                _add(tar, f"{s['uid']}.png", buf.getvalue())
                _add(tar, f"{s['uid']}.json", json.dumps(meta, sort_keys=True).encode())
                _add(tar, f"{s['uid']}.t5.npy", npy.getvalue())
                _add(tar, f"{s['uid']}.txt", s["caption"].encode())
                rows.append({"uid": s["uid"], "TEXT": s["caption"], "stored_width": s["side"], "stored_height": s["side"]})
        schema = pa.schema([("uid", pa.string()), ("TEXT", pa.string()), ("stored_width", pa.int32()), ("stored_height", pa.int32())])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "meta" / f"{k:06d}.parquet")
        manifest["shards"].append({"shard": k, "tar": f"shards/{k:06d}.tar", "samples": len(part), "meta": f"meta/{k:06d}.parquet"})
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "_SUCCESS").write_text("")
    return samples


# -- breaking a copy of a dataset (tests of corrupt samples: test_data, test_bad_inputs) ----------


def members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_members(tar_path: Path, items: list[tuple[str, bytes]]) -> None:
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 946684800, 0o444
            tar.addfile(info, io.BytesIO(data))


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def keys(tar_path: Path) -> list[str]:
    return sorted({name.split(".")[0] for name, _ in members(tar_path)})


def big_keys(tar_path: Path, n: int) -> list[str]:
    """Keys of `n` samples a 64 px stage keeps (stored side >= 64), in tar order."""
    out = []
    for name, data in members(tar_path):
        if name.endswith(".json") and json.loads(data)["stored_width"] >= 64:
            out.append(name.split(".")[0])
    return out[:n]


def replace_member(tar_path: Path, key: str, ext: str, data: bytes | None, new_ext: str | None = None) -> None:
    """Replace (or with data None, drop) member KEY.ext; new_ext renames it."""
    items = []
    for name, old in members(tar_path):
        if name == f"{key}.{ext}":
            if data is not None:
                items.append((f"{key}.{new_ext or ext}", data))
        else:
            items.append((name, old))
    write_members(tar_path, items)


def truncate_in_member(tar_path: Path, key: str, ext: str, at_header: bool = False) -> None:
    """Cut the tar in the middle of member KEY.ext's data (a download or copy that stopped), or
    with `at_header` just before the member's header (tarfile then reads a clean, shorter tar)."""
    with tarfile.open(tar_path) as tar:
        m = tar.getmember(f"{key}.{ext}")
    data = tar_path.read_bytes()
    tar_path.write_bytes(data[: m.offset if at_header else m.offset_data + m.size // 2])


def corrupt_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 30, 30)).save(buf, "JPEG", quality=90)
    return buf.getvalue()[:300]  # the header and a little scan data: decoding fails


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_shards")
    samples = write_small_dataset(root)
    return root, samples


# --------------------------------------------------------------------------------------------
# The pipeline-built dataset (slow tests)

SYNTH_ROWS = 12000
SYNTH_SEED = 11
ACHROMATIC = ("white", "black", "grey")
# The web's main port is part of every URL, so of every uid (sha256 of URL and caption), so of the
# shards' order and the trainer's data order. With a fixed port every machine builds byte-identical
# shards (same sha256s), so the learning tests train on the same data in the same order everywhere.
# (Not bit-identical models: CPU kernels' last bits also follow the process's history -- this test
# module run alone and the full suite diverge by step 100 -- so figures move by a few points between
# the two; the bars have margin.) The port sits below Linux's ephemeral range (32768-60999), where
# no client socket is handed it; if something else holds it, a free port stands in.
SYNTH_PORT = 29417


def stable_base_url() -> str | None:
    """http://127.0.0.1:SYNTH_PORT if that port can be bound now, else None (synthesize picks one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the server binds (allow_reuse_address): a previous run's connections in TIME_WAIT
        # do not make the port unusable
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", SYNTH_PORT))
        except OSError:
            return None
    return f"http://127.0.0.1:{SYNTH_PORT}"


def unambiguous_scene(truth: dict) -> bool:
    """One shape of a chromatic colour on a white, black or grey background.

    The tiny T5 is a random-init encoder and close to a bag of words: "a red circle on a green
    background" and "a green circle on a red background" embed almost identically (pooled cosine
    0.9999), so which of two chromatic colours is the shape is not in the text. With an achromatic
    background the caption's chromatic word is the shape's colour, whatever the word order."""
    shapes = json.loads(truth["shapes"])
    return len(shapes) == 1 and truth["background"] in ACHROMATIC and shapes[0]["colour"] not in ACHROMATIC


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """(dataset dir, models) from `kiln prepare` over a served synthetic web; built once.

    The web's metadata is cut to `unambiguous_scene` rows before the pipeline runs (~1000 of
    12000): the same selection as filtering the shards afterwards, without preparing samples no
    test reads."""
    from pipeline.testbed import prepare_config
    from pipeline.prepare import run
    from pipeline.testbed.server import SynthServer
    from pipeline.testbed.synth import synthesize
    from pipeline.testbed.models import cached_test_models

    models = cached_test_models()
    root = tmp_path_factory.mktemp("synth")
    # Longer side 140-220 px (shorter >= 78): every image covers the 64 px SR stage; PNG keeps the
    # drawn colours exact until the pipeline's own JPEG encode.
    web = synthesize(root / "web", rows=SYNTH_ROWS, seed=SYNTH_SEED, failure_rate=0.0, size_range=(140, 220),
                     formats=("png",), base_url=stable_base_url())
    truth = pq.read_table(web.ground_truth_path).to_pylist()
    keep = {t["SAMPLE_ID"] for t in truth if unambiguous_scene(t)}
    meta = pq.read_table(web.metadata_path)
    rows = [r for r in meta.to_pylist() if r["SAMPLE_ID"] in keep]
    metadata = root / "metadata.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=meta.schema), metadata)
    out = root / "dataset"
    with SynthServer(web) as server:
        args = prepare_config(str(metadata), str(out), server.allow_hosts, "--quiet", "--image-size", "128",
                            "--toxicity", "off", "--clip", "off", "--nsfw", "off", "--t5-model", f"local:{models['t5']}",
                            "--samples-per-shard", "500")
        run(args, [])
    return out, models
