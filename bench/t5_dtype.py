"""Does storing T5 embeddings as float8 change held-out prompt-following? float16 vs float8 shards.

    .venv/bin/python bench/t5_dtype.py [--steps 400] [--prompts 192] [--threads 1]

The recipe of tests/train/test_learning.py (the base-stage colour test), run twice on shards that
differ only in `kiln prepare --t5-dtype`:
  1. the synthetic web (pipeline.testbed.synth, 12,000 rows, seed 11), cut to unambiguous scenes
     (one chromatic shape on a white/black/grey background), served on 127.0.0.1;
  2. `kiln prepare` (tiny T5, 128 px, toxicity/CLIP/NSFW off) twice: --t5-dtype float16 (the
     named baseline) and --t5-dtype float8 (float8_e4m3fn + per-sample scale);
  3. the tiny-base preset trained --steps steps (seed 0; test_learning trains 1,000, ~5 min alone on
     2 idle cores: the default here is fewer so both runs fit ~10 minutes on a busy machine, so the
     absolute accuracies are lower than the test's), on captions whose (colour, shape, background)
     combination is not held out;
  4. --prompts held-out prompts (combinations no training caption has), their T5 arrays read from
     the same shards, sampled with the preset's sampler at guidance w=1 and w=3 (generator seed 0);
     train.evaluate.colour_accuracy judges the shape's colour.
Prints each accuracy with a 95% Wilson interval, and the paired difference float8 - float16 over the
same prompts with a 95% interval (normal approximation on the per-prompt differences). Also the
embedding error float8 introduces: max and RMS |x8 - x16| relative to max|x| per sample.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SYNTH_ROWS, SYNTH_SEED = 12000, 11  # = tests/train/conftest.py
ACHROMATIC = ("white", "black", "grey")
HELDOUT_COMBOS = 0.2  # = tests/train/test_learning.py


def combo_held_out(scene: dict) -> bool:
    key = f"{scene['colour']}|{scene['shape']}|{scene['background']}".encode()
    return hashlib.sha256(key).digest()[0] < 256 * HELDOUT_COMBOS


def build_datasets(root: Path, dtypes) -> dict:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.prepare import run
    from pipeline.testbed import prepare_config
    from pipeline.testbed.models import cached_test_models
    from pipeline.testbed.server import SynthServer
    from pipeline.testbed.synth import synthesize

    models = cached_test_models()
    web = synthesize(root / "web", rows=SYNTH_ROWS, seed=SYNTH_SEED, failure_rate=0.0, size_range=(140, 220), formats=("png",))
    truth = pq.read_table(web.ground_truth_path).to_pylist()

    def unambiguous(t):
        shapes = json.loads(t["shapes"])
        return len(shapes) == 1 and t["background"] in ACHROMATIC and shapes[0]["colour"] not in ACHROMATIC

    keep = {t["SAMPLE_ID"] for t in truth if unambiguous(t)}
    meta = pq.read_table(web.metadata_path)
    metadata = root / "metadata.parquet"
    pq.write_table(pa.Table.from_pylist([r for r in meta.to_pylist() if r["SAMPLE_ID"] in keep], schema=meta.schema), metadata)
    out = {}
    with SynthServer(web) as server:
        for dtype in dtypes:
            t0 = time.perf_counter()
            cfg = prepare_config(str(metadata), str(root / dtype), server.allow_hosts, "--quiet", "--image-size", "128",
                                 "--toxicity", "off", "--clip", "off", "--nsfw", "off", "--t5-model", f"local:{models['t5']}",
                                 "--samples-per-shard", "500", "--t5-dtype", dtype)
            run(cfg, [])
            out[dtype] = root / dtype
            print(f"prepared --t5-dtype {dtype}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def train_and_eval(data: Path, work: Path, steps: int, n_prompts: int) -> dict:
    import torch

    from train.config import load_config
    from train.data import ImageSpec, load_records
    from train.diffusion import sample
    from train.evaluate import colour_accuracy, parse_scene
    from train.text import collate_text
    from train.trainer import Trainer

    def keep_train(meta, caption):
        scene = parse_scene(caption)
        return scene is not None and not combo_held_out(scene)

    def keep_heldout(meta, caption):
        scene = parse_scene(caption)
        return scene is not None and combo_held_out(scene)

    torch.manual_seed(0)
    cfg = load_config("tiny-base", {"train.max_steps": steps, "train.log_every": 0, "train.sample_every": 0, "train.ckpt_every": 0})
    trainer = Trainer(cfg, data, work, keep=keep_train, cache="always", log=None)
    t0 = time.perf_counter()
    trainer.train(max_steps=steps)
    train_s = time.perf_counter() - t0
    records = load_records(data, ImageSpec.from_config(cfg), keep=keep_heldout, limit=n_prompts)
    text, mask = collate_text([r.text for r in records], cfg.data.text_max_len)
    model = trainer.ema_model()
    out = {"train_s": train_s, "uids": [r.key for r in records], "texts": [r.text for r in records]}
    for w in (1.0, 3.0):
        g = torch.Generator().manual_seed(0)
        images = sample(model, (len(records), 3, 32, 32), text, mask, steps=cfg.sample["steps"], guidance_weight=w,
                        generator=g, diffusion=cfg.diffusion)
        res = colour_accuracy(list(images), [r.caption for r in records])
        out[w] = res
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def per_prompt(res: dict) -> list[int]:
    """1 / 0 per judged prompt (colour_accuracy's predicted vs expected)."""
    return [int(p == e) for p, e in zip(res["predicted"], res["expected"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per run (test_learning: 1000)")
    ap.add_argument("--prompts", type=int, default=192, help="held-out prompts (test_learning: 192)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    args = ap.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-t5dtype-") as tmp:
        root = Path(tmp)
        data = build_datasets(root, ("float16", "float8"))
        results = {}
        for dtype, path in data.items():
            results[dtype] = train_and_eval(path, root / f"run-{dtype}", args.steps, args.prompts)
            print(f"trained on --t5-dtype {dtype}: {args.steps} steps in {results[dtype]['train_s']:.0f} s", flush=True)
    a, b = results["float16"], results["float8"]
    same = a["uids"] == b["uids"]
    print(f"\nheld-out prompts: {len(a['uids'])} (same prompts in both runs: {same}); tiny-base, {args.steps} steps, seed 0")
    if same:
        rel = []
        for x16, x8 in zip(a["texts"], b["texts"]):
            x16 = x16.astype(np.float32)
            peak = float(np.abs(x16).max()) or 1.0
            rel.append((float(np.abs(x8 - x16).max()) / peak, float(np.sqrt(np.mean((x8 - x16) ** 2))) / peak))
        rel = np.array(rel)
        print(f"float8 vs float16 embeddings, relative to each sample's max|x|: max error {rel[:, 0].max():.4f}, "
              f"mean RMS error {rel[:, 1].mean():.4f}")
    for w in (1.0, 3.0):
        line = [f"w={w:g}:"]
        for dtype, r in (("float16", a), ("float8", b)):
            acc, k, n = r[w]["accuracy"], r[w]["correct"], r[w]["total"]
            lo, hi = wilson(k, n)
            line.append(f"{dtype} {acc:.1%} [{lo:.1%}, {hi:.1%}]")
        pa_, pb = per_prompt(a[w]), per_prompt(b[w])
        if same and len(pa_) == len(pb):
            d = np.array(pb) - np.array(pa_)
            half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            line.append(f"float8 - float16 = {d.mean():+.1%} [{d.mean() - half:+.1%}, {d.mean() + half:+.1%}] (paired)")
        print("  ".join(line))
    print(f"total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
