"""GPU throughput of kiln's three GPU jobs and of the trainer's loader, in one run: rates and MFU.

    .venv/bin/python bench/gpu.py [--out gpu.json] [--only t5,clip,train,loader]   # on a GPU: < 8 min
    .venv/bin/python bench/gpu.py --tiny [--out tiny.json]                         # any CPU: < 60 s
    .venv/bin/python bench/gpu.py --only loader                                    # the loader figures, CPU
    bench/gpu.sh                                                                   # the GPU run, logged

Prints a table and writes the figures as JSON (--out). Every model has random weights built here:
nothing is downloaded. MFU = model FLOPs / time / the GPU's dense bf16 peak (PEAK_BF16_TFLOPS, by
`torch.cuda.get_device_name`; --peak-tflops for another GPU); on CPU no MFU, achieved TFLOP/s only.

t5      The T5-XXL encoder (T5 v1.1 XXL's config: d_model 4096, 24 layers, 64 heads x 64, gated-GELU
        d_ff 10240; random init, bf16) encoding LAION-like captions through the EmbedT5 stage's own
        code: pipeline.model_stages.embed_captions on Beam batches formed as the stage forms them,
        i.e. embed.t5.T5Embedder.embed's length-sorted passes at embed.batching.pad_width widths under
        the --t5-max-tokens budget. Two Beam batchings, same captions, same process:
          records  256 captions per Beam batch (T5_RECORDS_PER_BATCH: the stage on CPU, and on GPU
                   before --t5-batch-tokens)
          tokens   Beam batches of t5_batch_tokens() caption tokens (65,536 on a GPU: 4 passes' worth),
                   filled as beam.BatchElements(min=max=budget, element_size_fn=CaptionTokenCount) does
        Caption lengths (T5 tokens, EOS included): log-normal, median 12, sigma 0.75, cut to [2, 128]:
        mean 15.9, p99 69, 0.6% above 77, 0.08% at the 128 cap (LAION-400M alt-text is of this shape:
        median about a dozen T5 tokens, a long tail). The captions are words that are one token each
        of the tiny test tokenizer (bench/embed.py), so the lengths are exact; the encoder is the
        XXL-shaped one. MFU counts 2 x non-embedding parameters x REAL tokens: padding positions and
        the filler rows of short passes are computed but not counted, nor are attention scores
        (PaLM's MFU convention); `mfu_padded` counts padding too (what the GPU actually ran).
clip    open_clip ViT-B/32 and ViT-L/14 (random weights) through the CLIP stage's own function,
        pipeline.model_stages.score_images: decode of the stored JPEG (kiln's DCT-reduced decode),
        preprocessing, the image tower, the caption tower and the similarity, in batches of
        --clip-batch. Also each part alone: decode + preprocess (CPU), the image tower on
        preprocessed pixels (GPU). Stored images: photo-like JPEGs (photo_like_jpeg: a photograph's
        spectrum plus film grain, quality 90) at --stored-px (1024: kiln prepare's --image-size
        default), a pool of distinct images cycled. Published: clip-retrieval 2,500 img/s (B/32) and
        312 img/s (L/14) per A100.
train   The base64 preset (1.74B-parameter Efficient U-Net, 64 px, bf16 autocast, Adafactor, EMA,
        grad clip) through train.trainer.Trainer.train_step on a synthetic in-memory dataset (written
        in the shard layout, cached by CachedSource: random 16-token "T5-XXL" arrays padded to
        text_max_len 128, as real shards would be). FLOPs of one step by torch's FlopCounterMode
        (forward + backward). Published: NVIDIA's JAX Imagen, A100-80G bf16: 107 img/s per GPU
        (500M base), 27.4 img/s (2B base).
loader  The trainer's streaming loader on ONE core (train.data.StreamingSource, num_workers=0, one
        torch thread): tar read, JPEG decode, resize, T5 array load, collate, for samples stored at
        --loader-stored-px (1024) feeding the base64 stage (64 px), with JPEG draft decoding
        (train.decode, the loader's path) and with full decode (the path before it), in alternating
        rounds, median round. img/s per core; training img/s / that = loader cores one GPU needs.
--tiny  Tiny stand-ins on CPU (tiny T5, tiny CLIP, tiny-base, 256 px stored): exercises every code
        path above in well under a minute; its figures measure nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.compat import ensure_torch_compat  # noqa: E402

ensure_torch_compat()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets; the first name
# contained in torch.cuda.get_device_name() wins (so "H100 PCIe" before "H100", "L40S" before "L4").
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)
PUBLISHED = {
    "clip_img_s_per_a100": {"ViT-B-32": 2500.0, "ViT-L-14": 312.0},  # clip-retrieval
    "imagen_jax_img_s_per_a100": {"500M base": 107.0, "2B base": 27.4},  # NVIDIA JAX Imagen, A100-80G bf16
}
LENGTH_MEDIAN, LENGTH_SIGMA, T5_MAX_LENGTH = 12, 0.75, 128


def peak_for(gpu_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s for a torch.cuda.get_device_name(), or None for a GPU not in the table."""
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in gpu_name), None)


def peak_tflops(device: torch.device, override: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", override
    name = torch.cuda.get_device_name(device)
    return name, override or peak_for(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def photo_like_jpeg(side: int, seed: int, quality: int = 90) -> bytes:
    """A square JPEG with a photograph's spectrum: octaves of smooth noise whose amplitude falls with
    frequency, plus film grain (sigma 3.5 levels): ~260 KB at 1024 px, quality 90, a web photo's size.
    Flat synthetic drawings decode several times faster than photographs and would flatter the decoder."""
    g = np.random.default_rng(seed)
    acc = np.full((side, side, 3), 128.0, np.float32)
    for k, amp in zip(range(2, 9), (1.5, 1.0, 0.7, 0.45, 0.3, 0.2, 0.125)):
        small = ((g.standard_normal((2**k, 2**k, 3)) * 40) + 128).clip(0, 255).astype(np.uint8)
        acc += (np.asarray(Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC), np.float32) - 128) * amp
    acc += g.standard_normal((side, side, 1)) * 3.5 + g.standard_normal((side, side, 3)) * 1.75
    buf = io.BytesIO()
    Image.fromarray(acc.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def web_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(LENGTH_MEDIAN), LENGTH_SIGMA, n)), 2, T5_MAX_LENGTH).astype(int)


# ----------------------------------------------------------------------------------------------
# T5


def beam_token_batches(records: list[dict], size_fn, budget: int) -> list[list[dict]]:
    """What beam.BatchElements(min_batch_size=budget, max_batch_size=budget, element_size_fn=size_fn)
    makes of one bundle (apache_beam.transforms.util._GlobalWindowsBatchingDoFn): a batch is closed
    when the next element would take it over the budget."""
    batches, batch, running = [], [], 0
    for r in records:
        size = size_fn(r)
        if batch and running + size > budget:
            batches.append(batch)
            batch, running = [], 0
        batch.append(r)
        running += size
    return batches + ([batch] if batch else [])


def plan_stats(emb, batches: list[list[dict]], size_fn) -> dict:
    """The forward passes T5Embedder.embed runs for these Beam batches (embed.batching.plan_batches)."""
    from embed.batching import pad_width, plan_batches
    from embed.t5 import MIN_TOKENS_PER_PASS

    passes = []  # (padded positions incl. filler rows, real tokens)
    for b in batches:
        lengths = [size_fn(r) for r in b]
        for p in plan_batches(lengths, emb.max_tokens_per_batch, emb.max_batch_size, emb.window, max_width=emb.max_length):
            width = pad_width(max(lengths[i] for i in p), emb.max_length)
            rows = max(len(p), -(-MIN_TOKENS_PER_PASS // width))
            passes.append((width * rows, sum(lengths[i] for i in p)))
    padded = np.array([p for p, _ in passes])
    return {
        "beam_batches": len(batches),
        "captions_per_beam_batch": sum(map(len, batches)) / len(batches),
        "passes_per_beam_batch": len(passes) / len(batches),
        "padded_tokens_per_pass_mean": float(padded.mean()),
        "share_of_padded_tokens_in_passes_ge_4096": float(padded[padded >= 4096].sum() / padded.sum()),
        "padding_share": 1.0 - sum(r for _, r in passes) / float(padded.sum()),
        "padded_tokens": int(padded.sum()),
    }


def bench_t5(a, device: torch.device, work: Path, peak: float | None) -> dict:
    from bench.embed import SHAPES, nonembedding_params, web_like_captions
    from embed.t5 import T5Embedder
    from pipeline.config import ModelsConfig, T5Config
    from pipeline.model_stages import T5_RECORDS_PER_BATCH, CaptionTokenCount, embed_captions, t5_batch_tokens
    from pipeline.testbed.models.t5 import build_tiny_t5

    t0 = time.perf_counter()
    tiny = build_tiny_t5(work / "tiny-t5", seed=0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = T5Config(model=f"local:{tiny}", max_length=T5_MAX_LENGTH)
    emb = T5Embedder(cfg.model, device=device, dtype=dtype, max_length=T5_MAX_LENGTH)
    shape = "tiny T5 (d_model 64, 2 layers)"
    if not a.tiny:
        # The XXL-shaped encoder is built in place (seconds on a GPU) and put into the embedder made
        # from the tiny T5's folder, whose tokenizer it keeps: the 9.6 GB save + load through
        # T5Embedder's loading path is bench/embed.py's business; the batching and encoding are kiln's.
        from transformers import T5Config as HFT5Config
        from transformers import T5EncoderModel

        hf = HFT5Config(vocab_size=32128, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dropout_rate=0.0,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False,
                        **SHAPES["t5-xxl-shape"])
        torch.manual_seed(0)
        with torch.device(device):
            model = T5EncoderModel(hf)
        emb.model = model.to(dtype).eval().requires_grad_(False)
        emb.d_model = hf.d_model
        shape = "T5-XXL encoder (d_model 4096, 24 layers, 64 heads, gated-GELU d_ff 10240)"
    n_params = nonembedding_params(emb.model)
    captions, lengths = web_like_captions(emb.tokenizer, a.t5_captions)
    records = [{"uid": str(i), "TEXT": c} for i, c in enumerate(captions)]
    count = CaptionTokenCount(cfg)
    assert [count(r) for r in records[:256]] == lengths[:256], "the captions do not have their target token counts"
    budget = t5_batch_tokens(cfg, ModelsConfig(device=str(device))) or 4 * emb.max_tokens_per_batch
    modes = {
        "records": [records[i:i + T5_RECORDS_PER_BATCH] for i in range(0, len(records), T5_RECORDS_PER_BATCH)],
        "tokens": beam_token_batches(records, count, budget),
    }
    print(f"t5: {shape}, {n_params / 1e6:,.2f} M non-embedding params, {str(dtype)[6:]}; {len(captions)} captions, "
          f"{sum(lengths)} real tokens (mean {np.mean(lengths):.1f}, median {np.median(lengths):.0f}, max {max(lengths)}); "
          f"pass budget {emb.max_tokens_per_batch} padded tokens, Beam batch budget {budget} tokens; "
          f"set up in {time.perf_counter() - t0:.0f}s", flush=True)
    for batches in modes.values():  # warm-up: kernels for every width, allocator, cuBLAS heuristics
        embed_captions(emb, batches[0], cfg)
    out = {"model": shape, "non_embedding_params": n_params, "dtype": str(dtype)[6:], "captions": len(captions),
           "real_tokens": int(sum(lengths)), "length_distribution": {
               "kind": "log-normal", "median": LENGTH_MEDIAN, "sigma": LENGTH_SIGMA, "cut": [2, T5_MAX_LENGTH],
               "mean": float(np.mean(lengths)), "p99": float(np.percentile(lengths, 99)),
               "share_above_77": float(np.mean(np.array(lengths) > 77))},
           "pass_budget_padded_tokens": emb.max_tokens_per_batch, "beam_batch_budget_tokens": budget,
           "flops_per_real_token": 2 * n_params, "modes": {}}
    for mode, batches in modes.items():
        stats = plan_stats(emb, batches, count)
        sync(device)
        t0 = time.perf_counter()
        for b in batches:
            embed_captions(emb, b, cfg)
        sync(device)
        dt = time.perf_counter() - t0
        row = {**stats, "seconds": dt, "captions_per_s": len(captions) / dt, "real_tokens_per_s": sum(lengths) / dt,
               "achieved_tflops": 2 * n_params * sum(lengths) / dt / 1e12}
        if peak:
            row["mfu"] = row["achieved_tflops"] / peak
            row["mfu_padded"] = 2 * n_params * stats["padded_tokens"] / dt / 1e12 / peak
        out["modes"][mode] = row
        print(f"  {mode}: {row['captions_per_s']:.0f} captions/s in {dt:.1f}s", flush=True)
    out["ratio_tokens_over_records"] = out["modes"]["tokens"]["captions_per_s"] / out["modes"]["records"]["captions_per_s"]
    del emb
    return out


# ----------------------------------------------------------------------------------------------
# CLIP


def _tiny_clip_dir(work: Path) -> str:
    """A random-init tiny CLIP in open_clip's local-dir schema (the testbed's tiny shape, untrained)."""
    import open_clip
    from safetensors.torch import save_file

    from pipeline.testbed.models.clip import TINY_CLIP_CFG, TINY_PREPROCESS_CFG

    out = work / "tiny-clip"
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": TINY_PREPROCESS_CFG}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{out}", device="cpu")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return f"local-dir:{out}"


def bench_clip(a, device: torch.device, work: Path, peak: float | None) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    from filters.clip_similarity import ClipScorer
    from pipeline.config import ClipConfig
    from pipeline.model_stages import _decode_for_clip, score_images

    t0 = time.perf_counter()
    pool = [photo_like_jpeg(a.stored_px, seed=s) for s in range(a.image_pool)]
    print(f"clip: {len(pool)} distinct photo-like JPEGs at {a.stored_px} px, mean {np.mean([len(p) for p in pool]) / 1e3:.0f} KB, "
          f"made in {time.perf_counter() - t0:.0f}s", flush=True)
    specs = [("tiny CLIP", _tiny_clip_dir(work))] if a.tiny else [("ViT-B-32", "ViT-B-32:random"), ("ViT-L-14", "ViT-L-14:random")]
    cfg = ClipConfig(clip_mode="score", nsfw_mode="off", nsfw_head=None)
    rows = []
    for name, spec in specs:
        n = a.clip_images if name != "ViT-L-14" else max(a.clip_batch, a.clip_images // 2)
        records = [{"uid": str(i), "TEXT": f"a photo number {i} of a scene", "_image": pool[i % len(pool)]} for i in range(n)]
        chunks = [records[i:i + a.clip_batch] for i in range(0, n, a.clip_batch)]
        clip = ClipScorer.from_spec(spec, device=device, batch_size=a.clip_batch)
        score_images((clip, None), chunks[0], cfg)  # warm-up
        # decode + preprocess alone (CPU)
        t0 = time.perf_counter()
        pixels = []
        for c in chunks:
            pixels.append(clip.preprocess(_decode_for_clip(c, clip.image_size), channel_order="bgr"))
        t_pre = time.perf_counter() - t0
        # the image tower alone, on preprocessed pixels
        with torch.inference_mode(), clip._autocast():
            with FlopCounterMode(display=False) as counter:
                clip.model.encode_image(clip._to_input(pixels[0]))
            flops_per_image = counter.get_total_flops() / len(pixels[0])
            sync(device)
            t0 = time.perf_counter()
            for p in pixels:
                clip.model.encode_image(clip._to_input(p))
            sync(device)
            t_model = time.perf_counter() - t0
        # the CLIP stage's function end to end
        sync(device)
        t0 = time.perf_counter()
        for c in chunks:
            score_images((clip, None), c, cfg)
        sync(device)
        t_e2e = time.perf_counter() - t0
        row = {"model": name, "images": n, "batch": a.clip_batch, "input_px": clip.image_size, "stored_px": a.stored_px,
               "decode_preprocess_img_s": n / t_pre, "image_tower_img_s": n / t_model, "stage_img_s": n / t_e2e,
               "image_tower_gflop_per_image": flops_per_image / 1e9,
               "image_tower_achieved_tflops": flops_per_image * n / t_model / 1e12}
        if peak:
            row["image_tower_mfu"] = row["image_tower_achieved_tflops"] / peak
        published = PUBLISHED["clip_img_s_per_a100"].get(name)
        if published:
            row["published_clip_retrieval_img_s_per_a100"] = published
        rows.append(row)
        print(f"  {name}: stage {row['stage_img_s']:.0f} img/s (decode+preprocess {row['decode_preprocess_img_s']:.0f}, "
              f"image tower {row['image_tower_img_s']:.0f})", flush=True)
        del clip
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# Training and the loader


def write_dataset(root: Path, images: list[bytes], side: int, d_model: int, t5_len: int = 16, seed: int = 0) -> Path:
    """A dataset in the shard layout (SHARDS.md) that train.data reads: one tar, a manifest."""
    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    tar_path = root / "shards" / "000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, jpg in enumerate(images):
            key = f"{i:08x}" + "0" * 24
            npy = io.BytesIO()
            np.save(npy, (rng.standard_normal((t5_len, d_model)) * 0.2).astype(np.float16))
            meta = {"uid": key, "stored_width": side, "stored_height": side}
            for ext, data in (("jpg", jpg), ("json", json.dumps(meta).encode()), ("t5.npy", npy.getvalue()),
                              ("txt", f"a photo number {i}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    manifest = {"samples": len(images), "shards": [{"tar": "shards/000000.tar", "samples": len(images)}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def bench_train(a, device: torch.device, work: Path, peak: float | None) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from train.config import load_config
    from train.trainer import Trainer

    preset = "tiny-base" if a.tiny else "base64"
    batch = a.train_batch
    while True:
        cfg = load_config(preset, {"train.batch_size": batch, "train.log_every": 0, "train.sample_every": 0,
                                   "train.ckpt_every": 0})
        side = cfg.data.resolution
        pool = [photo_like_jpeg(side, seed=s) for s in range(8)]
        data = write_dataset(work / f"train-data-{batch}", [pool[i % len(pool)] for i in range(max(batch, 16))], side,
                             cfg.unet.text_dim)
        trainer = None
        try:
            t0 = time.perf_counter()
            trainer = Trainer(cfg, data, work / f"train-run-{batch}", device=device, cache="always", log=None)
            setup_s = time.perf_counter() - t0
            for _ in range(a.warmup):
                trainer.train_step()
            sync(device)
            with FlopCounterMode(display=False) as counter:
                trainer.train_step()
            flops = counter.get_total_flops()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(a.train_steps):
                trainer.train_step()
            sync(device)
            dt = time.perf_counter() - t0
            break
        except torch.cuda.OutOfMemoryError:
            del trainer
            torch.cuda.empty_cache()
            if batch <= 1:
                raise
            print(f"  train: batch {batch} is out of memory; trying {batch // 2}", flush=True)
            batch //= 2
    steps_s = a.train_steps / dt
    out = {"preset": preset, "params": trainer.model.num_params(), "batch": batch, "resolution": cfg.data.resolution,
           "precision": cfg.train.precision if device.type == "cuda" else "fp32", "optimizer": cfg.train.optimizer,
           "text_max_len": cfg.data.text_max_len, "steps": a.train_steps, "setup_s": setup_s,
           "img_s": steps_s * batch, "gflop_per_step": flops / 1e9, "achieved_tflops": flops * steps_s / 1e12}
    if peak:
        out["mfu"] = out["achieved_tflops"] / peak
    if not a.tiny:
        out["published_imagen_jax_img_s_per_a100"] = PUBLISHED["imagen_jax_img_s_per_a100"]
    print(f"  train: {preset} {out['params'] / 1e6:,.0f}M params, batch {batch}: {out['img_s']:.1f} img/s", flush=True)
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


@contextlib.contextmanager
def full_decode():
    """train.data as it was before train.decode: every stored pixel decoded, then resized."""
    import train.data as data
    from train.decode import open_at_size

    original = data.open_at_size
    data.open_at_size = lambda blob, size: open_at_size(blob, None)
    try:
        yield
    finally:
        data.open_at_size = original


def bench_loader(a, work: Path) -> dict:
    from train.config import load_config
    from train.data import ImageSpec, StreamingSource, _resize_center_crop, shard_urls
    from train.decode import open_at_size

    preset = "tiny-base" if a.tiny else "base64"
    spec = ImageSpec.from_config(load_config(preset))
    stored = a.loader_stored_px
    t0 = time.perf_counter()
    pool = [photo_like_jpeg(stored, seed=100 + s) for s in range(a.image_pool)]
    data = write_dataset(work / "loader-data", [pool[i % len(pool)] for i in range(a.loader_samples)], stored, spec.d_model)
    print(f"loader: {a.loader_samples} samples stored at {stored} px ({len(pool)} distinct photo-like JPEGs, mean "
          f"{np.mean([len(p) for p in pool]) / 1e3:.0f} KB), 16-token T5 arrays of d_model {spec.d_model}, for {preset} "
          f"({spec.resolution} px); made in {time.perf_counter() - t0:.0f}s", flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: the figure is per DataLoader worker
    batch = 32
    rates: dict[str, list[float]] = {"full_decode": [], "draft": []}
    decode_rates: dict[str, list[float]] = {"full_decode": [], "draft": []}  # the image alone: decode + resize
    try:
        for _ in range(a.loader_rounds):
            for mode in rates:
                t0 = time.perf_counter()
                for blob in pool * max(1, 64 // len(pool)):
                    _resize_center_crop(open_at_size(blob, spec.resolution if mode == "draft" else None), spec.resolution)
                decode_rates[mode].append(len(pool) * max(1, 64 // len(pool)) / (time.perf_counter() - t0))
                # Exactly one epoch from a fresh source: every sample decoded once, every one yielded
                # once (the shuffle buffer fills at the start and drains at the end of the epoch).
                src = StreamingSource(shard_urls(data), spec, batch_size=batch, seed=0, num_workers=0, shuffle_buffer=64)
                with full_decode() if mode == "full_decode" else contextlib.nullcontext():
                    t0 = time.perf_counter()
                    for _ in range(a.loader_samples // batch):
                        src.next()
                    rates[mode].append(a.loader_samples // batch * batch / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(threads)
    med = {m: statistics.median(v) for m, v in rates.items()}
    dec = {m: statistics.median(v) for m, v in decode_rates.items()}
    out = {"preset": preset, "stored_px": stored, "resolution": spec.resolution, "samples": a.loader_samples,
           "rounds": a.loader_rounds, "img_s_per_core_full_decode": med["full_decode"], "img_s_per_core_draft": med["draft"],
           "speedup": med["draft"] / med["full_decode"], "rounds_img_s": rates,
           "decode_only_img_s_per_core_full_decode": dec["full_decode"], "decode_only_img_s_per_core_draft": dec["draft"],
           "decode_only_rounds_img_s": decode_rates,
           "load_average": os.getloadavg(), "cores": os.cpu_count()}
    print(f"  loader: {med['draft']:.0f} img/s per core with draft decoding, {med['full_decode']:.0f} with full decode", flush=True)
    return out


# ----------------------------------------------------------------------------------------------


def print_table(res: dict) -> None:
    def pct(x):
        return f"{100 * x:5.1f}%" if x is not None else "    --"

    print(f"\n{res['device']}, bf16 peak {res['peak_bf16_tflops'] or '--'} TFLOP/s, torch {res['torch']}"
          + ("   [--tiny: code paths only, figures mean nothing]" if res["tiny"] else ""))
    if "t5" in res:
        t = res["t5"]
        print(f"\nT5 ({t['model']}), {t['captions']} captions, mean {t['length_distribution']['mean']:.1f} tokens")
        print(f"{'Beam batches':<14} {'cap/s':>9} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'MFU pad':>7} "
              f"{'cap/batch':>9} {'passes/batch':>12} {'pad tok/pass':>12} {'>=4k':>5} {'padding':>7}")
        for mode, r in t["modes"].items():
            print(f"{mode:<14} {r['captions_per_s']:>9.0f} {r['real_tokens_per_s']:>10.0f} {r['achieved_tflops']:>8.2f} "
                  f"{pct(r.get('mfu')):>6} {pct(r.get('mfu_padded')):>7} {r['captions_per_beam_batch']:>9.0f} "
                  f"{r['passes_per_beam_batch']:>12.1f} {r['padded_tokens_per_pass_mean']:>12.0f} "
                  f"{r['share_of_padded_tokens_in_passes_ge_4096']:>5.0%} {r['padding_share']:>7.1%}")
        print(f"tokens / records: {t['ratio_tokens_over_records']:.2f}x  (MFU: real tokens only; 'MFU pad' counts padding)")
    if "clip" in res:
        print(f"\nCLIP stage (decode {res['clip'][0]['stored_px']} px JPEG + preprocess + both towers), img/s")
        print(f"{'model':<10} {'stage':>8} {'decode+pre':>11} {'img tower':>10} {'GFLOP/img':>10} {'tower MFU':>9} {'published/A100':>15}")
        for r in res["clip"]:
            pub = r.get("published_clip_retrieval_img_s_per_a100")
            print(f"{r['model']:<10} {r['stage_img_s']:>8.0f} {r['decode_preprocess_img_s']:>11.0f} {r['image_tower_img_s']:>10.0f} "
                  f"{r['image_tower_gflop_per_image']:>10.2f} {pct(r.get('image_tower_mfu')):>9} {pub if pub else '--':>15}")
    if "train" in res:
        r = res["train"]
        print(f"\nTraining step ({r['preset']}, {r['params'] / 1e6:,.0f}M params, batch {r['batch']}, {r['resolution']} px, "
              f"{r['precision']}, {r['optimizer']}): {r['img_s']:.1f} img/s, {r['gflop_per_step']:,.0f} GFLOP/step, "
              f"{r['achieved_tflops']:.2f} TFLOP/s, MFU {pct(r.get('mfu')).strip()}"
              + ("; NVIDIA JAX Imagen per A100: 107 img/s (500M), 27.4 (2B)" if "published_imagen_jax_img_s_per_a100" in r else ""))
    if "loader" in res:
        r = res["loader"]
        print(f"\nLoader, one core ({r['stored_px']} px stored -> {r['resolution']} px): {r['img_s_per_core_draft']:.0f} img/s "
              f"with draft decoding, {r['img_s_per_core_full_decode']:.0f} with full decode ({r['speedup']:.1f}x); the image "
              f"alone (decode + resize): {r['decode_only_img_s_per_core_draft']:.0f} vs {r['decode_only_img_s_per_core_full_decode']:.0f}")
        if "train" in res:
            print(f"loader cores per GPU at the training rate above: {res['loader_cores_per_gpu']:.1f} with draft decoding, "
                  f"{res['loader_cores_per_gpu_full_decode']:.1f} with full decode")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models on CPU: every code path in < 60 s, no real figures")
    ap.add_argument("--only", default="t5,clip,train,loader", help="comma-separated parts [all: t5,clip,train,loader]")
    ap.add_argument("--device", default=None, help="[cuda if available, else cpu; cpu with --tiny]")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU [PEAK_BF16_TFLOPS by name]")
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    ap.add_argument("--workdir", default=None, help="[a temp dir, removed]")
    ap.add_argument("--t5-captions", type=int, default=None, help="[32768; --tiny: 256]")
    ap.add_argument("--clip-images", type=int, default=None, help="per model; L/14 gets half [4096; --tiny: 32]")
    ap.add_argument("--clip-batch", type=int, default=None, help="Beam batch and CLIP batch [256; --tiny: 16]")
    ap.add_argument("--stored-px", type=int, default=None, help="stored JPEG side for the CLIP stage [1024; --tiny: 256]")
    ap.add_argument("--image-pool", type=int, default=None, help="distinct JPEGs, cycled [32; --tiny: 2]")
    ap.add_argument("--train-batch", type=int, default=None, help="[64, halved on out-of-memory; --tiny: 4]")
    ap.add_argument("--train-steps", type=int, default=None, help="timed steps [10; --tiny: 2]")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps first [2]")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads [--tiny: 1 (fastest for tiny tensors, and on a shared machine); else torch's]")
    ap.add_argument("--loader-stored-px", type=int, default=None, help="[1024; --tiny: 256]")
    ap.add_argument("--loader-samples", type=int, default=None, help="a multiple of 32 [512; --tiny: 64]")
    ap.add_argument("--loader-rounds", type=int, default=None, help="alternating full/draft rounds [3; --tiny: 1]")
    a = ap.parse_args(argv)
    parts = [p.strip() for p in a.only.split(",") if p.strip()]
    unknown = set(parts) - {"t5", "clip", "train", "loader"}
    if unknown:
        ap.error(f"--only: unknown part(s) {sorted(unknown)}; choose from t5, clip, train, loader")
    defaults = {  # (GPU run, --tiny)
        "t5_captions": (32768, 256), "clip_images": (4096, 32), "clip_batch": (256, 16), "stored_px": (1024, 256),
        "image_pool": (32, 2), "train_batch": (64, 4), "train_steps": (10, 2), "loader_stored_px": (1024, 256),
        "loader_samples": (512, 64), "loader_rounds": (3, 1), "threads": (None, 1),
    }
    for k, (full, tiny) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, tiny if a.tiny else full)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cpu" if a.tiny or not torch.cuda.is_available() else "cuda"))
    name, peak = peak_tflops(device, a.peak_tflops)
    res = {"device": name, "peak_bf16_tflops": peak, "torch": torch.__version__, "tiny": a.tiny, "parts": parts,
           "cpu_cores": os.cpu_count(), "load_average_before": os.getloadavg()}
    tmp = tempfile.mkdtemp(prefix="kiln-bench-gpu-") if a.workdir is None else None
    work = Path(a.workdir or tmp)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        if "t5" in parts:
            res["t5"] = bench_t5(a, device, work, peak)
        if "clip" in parts:
            res["clip"] = bench_clip(a, device, work, peak)
        if "train" in parts:
            res["train"] = bench_train(a, device, work, peak)
        if "loader" in parts:
            res["loader"] = bench_loader(a, work)
            if "train" in res:
                res["loader_cores_per_gpu"] = res["train"]["img_s"] / res["loader"]["img_s_per_core_draft"]
                res["loader_cores_per_gpu_full_decode"] = res["train"]["img_s"] / res["loader"]["img_s_per_core_full_decode"]
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t_start
    res["load_average_after"] = os.getloadavg()
    print_table(res)
    print(f"\n{res['seconds']:.0f}s in all")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2, default=float))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
