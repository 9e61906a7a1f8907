"""T5 caption embedding: kiln's length-bucketed encoder vs the naive padded one, in one run.

    .venv/bin/python bench/embed.py [--n 2000] [--naive-n 512] [--device cpu|cuda] [--peak-tflops 989]
                                    [--shape t5-small-shape|t5-xxl-shape] [--max-tokens N] [--threads N]

Same model, same captions, same process. Two caption sets:
  synthetic  the synthetic web's captions (pipeline.testbed.synth; ~10-25 tokens, few distinct lengths)
  web-like   token lengths drawn like LAION alt-text (log-normal: median 12, sigma 0.75, cut at 128, EOS
             included), each made of words that are one token each, so the lengths are exact
Two encoders:
  kiln       embed.t5.T5Embedder.embed: clean, tokenise, sort within a window, batches under a
             padded-token budget, float16 [n_tokens, d_model] per caption (what the shards store)
  naive      the usual recipe: tokenizer(padding="max_length", max_length=128, truncation=True),
             fixed batches of 64, padded float32 [128, d_model] per caption to the host
The naive encoder runs on the first --naive-n captions of each set (it is the slow one); rates are
per caption and per real (non-padding) token, so they compare directly.

Models, random init (nothing downloaded), loaded through T5Embedder's real loading path:
  CPU   a T5-small-shaped encoder (d_model 512, 6 layers, 8 heads x 64, gated-GELU d_ff 1024,
        vocab 32128) with the tiny test tokenizer (pipeline/testbed/models/t5.py)
  CUDA  a T5-XXL-shaped encoder (d_model 4096, 24 layers, 64 heads x 64, gated-GELU d_ff 10240,
        vocab 32128) in bfloat16; MFU = 2 x non-embedding parameters x real tokens / time / peak
        (the embedding lookup does no FLOPs; attention-score FLOPs are not counted, as in PaLM's MFU)
Prints captions/s and real tokens/s for both, the ratio kiln/naive, padding waste, and stored bytes
per caption (float16 unpadded vs float32 padded to 128).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.compat import ensure_torch_compat

ensure_torch_compat()

import torch

NAIVE_MAX_LENGTH, NAIVE_BATCH = 128, 64
SHAPES = {
    # T5-small's encoder with T5 v1.1's gated-GELU feed-forward
    "t5-small-shape": {"d_model": 512, "d_kv": 64, "num_heads": 8, "d_ff": 1024, "num_layers": 6},
    # T5 v1.1 XXL's encoder (google/t5-v1_1-xxl config.json)
    "t5-xxl-shape": {"d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240, "num_layers": 24},
}


def build_model_dir(work: Path, shape: str, device: torch.device, dtype: torch.dtype) -> Path:
    """A model folder: the tiny T5's tokenizer + a random-init encoder of `shape`, as safetensors."""
    from transformers import T5Config, T5EncoderModel

    from embed.t5 import quiet_hf_progress
    from pipeline.testbed.models.t5 import build_tiny_t5

    tiny = build_tiny_t5(work / "tiny-t5", seed=0)
    out = work / shape
    shutil.rmtree(out, ignore_errors=True)  # a reused --workdir
    out.mkdir(parents=True)
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, out / name)
    config = T5Config(
        vocab_size=32128, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False,
        use_cache=False, **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device(device):  # T5-XXL (4.8 B parameters) initialises in seconds on the GPU
        model = T5EncoderModel(config)
    model.to(device="cpu", dtype=dtype)  # saved from host memory: 9.6 GB of bf16 for T5-XXL
    with quiet_hf_progress():
        model.save_pretrained(str(out), safe_serialization=True)
    del model
    return out


def synthetic_captions(work: Path, n: int) -> list[str]:
    import pyarrow.parquet as pq

    from pipeline.testbed.synth import synthesize

    web = synthesize(work / "web", rows=n, seed=0, failure_rate=0.0, size_range=(16, 24), formats=("png",), min_size=8)
    texts = pq.read_table(web.ground_truth_path, columns=["TEXT"]).column("TEXT").to_pylist()
    return [t for t in texts if t][:n]


def web_like_captions(tokenizer, n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """`n` captions whose token counts (EOS included) follow a LAION-like log-normal, median 12."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(12), 0.75, n)), 2, NAIVE_MAX_LENGTH).astype(int)
    # Words that are a single piece on their own: SentencePiece splits on whitespace first, so a
    # caption of k such words is exactly k tokens, plus EOS.
    vocab = [p[1:] for p in tokenizer.get_vocab() if p.startswith("▁") and p[1:].isalpha()]
    words = sorted(w for w in vocab if len(tokenizer(w).input_ids) == 2)
    captions = [" ".join(rng.choice(words, size=k - 1)) for k in lengths]
    return captions, lengths.tolist()


def nonembedding_params(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "shared" not in name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_kiln(emb, captions: list[str]) -> tuple[float, list]:
    sync(emb.device)
    t0 = time.perf_counter()
    results = emb.embed(captions)
    sync(emb.device)
    return time.perf_counter() - t0, results


def run_naive(emb, captions: list[str]) -> tuple[float, list[np.ndarray]]:
    """padding='max_length' 128, fixed batch 64, float32 [64, 128, d] per batch to the host."""
    out = []
    sync(emb.device)
    t0 = time.perf_counter()
    for i in range(0, len(captions), NAIVE_BATCH):
        tok = emb.tokenizer(captions[i:i + NAIVE_BATCH], padding="max_length", max_length=NAIVE_MAX_LENGTH,
                            truncation=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = emb.model(input_ids=tok.input_ids.to(emb.device), attention_mask=tok.attention_mask.to(emb.device)).last_hidden_state
        out.append(hidden.float().cpu().numpy())
    sync(emb.device)
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="captions per set for kiln [2000]")
    ap.add_argument("--naive-n", type=int, default=None, help="captions per set for naive [512 on CPU, --n on CUDA]")
    ap.add_argument("--device", default=None, help="cpu or cuda [cuda if available]")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="encoder shape [t5-xxl-shape on CUDA, t5-small-shape on CPU]")
    ap.add_argument("--max-tokens", type=int, default=None, help="kiln's padded-token budget per batch [T5Embedder's default]")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads [torch's default: one per core]; on a machine other jobs share, 1 avoids "
                    "OpenMP threads waiting on a descheduled sibling")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s for MFU [989: H100 SXM]")
    ap.add_argument("--workdir", default=None, help="where the model folders go [a temp dir, removed]")
    a = ap.parse_args(argv)

    from embed.batching import padding_waste, plan_batches
    from embed.t5 import T5Embedder

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = a.shape or ("t5-xxl-shape" if device.type == "cuda" else "t5-small-shape")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    naive_n = a.naive_n or (a.n if device.type == "cuda" else 512)
    tmp = tempfile.mkdtemp(prefix="kiln-bench-embed-") if a.workdir is None else None
    work = Path(a.workdir or tmp)
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        model_dir = build_model_dir(work, shape, device, dtype)
        emb = T5Embedder(str(model_dir), device=device, dtype=dtype, max_length=NAIVE_MAX_LENGTH, max_tokens_per_batch=a.max_tokens)
        n_params = nonembedding_params(emb.model)
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, torch threads: {torch.get_num_threads()}"
        print(f"model: {shape} random init, {n_params / 1e6:.1f} M non-embedding parameters, {str(dtype)[6:]}, on {where}; "
              f"built + loaded in {time.perf_counter() - t0:.1f}s")
        print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores "
              "(other processes share the machine: compare the ratio, not the absolute rates)")
        print(f"kiln: max_tokens_per_batch={emb.max_tokens_per_batch}, window={emb.window or emb.max_tokens_per_batch} captions; "
              f"naive: padding to {NAIVE_MAX_LENGTH}, batch {NAIVE_BATCH}")
        sets = {"synthetic": synthetic_captions(work, a.n)}
        sets["web-like"], target = web_like_captions(emb.tokenizer, a.n)
        assert emb.tokenize_lengths(sets["web-like"]) == target, "web-like captions do not have their target lengths"

        emb.embed(sets["synthetic"][:NAIVE_BATCH])  # warm-up: allocator, kernels, thread pools
        run_naive(emb, sets["synthetic"][:NAIVE_BATCH])

        rows = []
        for name, captions in sets.items():
            lengths = emb.tokenize_lengths(captions)
            waste = padding_waste(lengths, plan_batches(lengths, emb.max_tokens_per_batch, window=emb.window, max_width=emb.max_length), emb.max_length)
            t_kiln, results = run_kiln(emb, captions)
            t_naive, naive = run_naive(emb, captions[:naive_n])
            # Same numbers: the naive padded output at real positions matches kiln's (same cleaning here,
            # except that naive does not clean; these captions are already clean).
            first = naive[0][0, : results[0].n_tokens]
            diff = float(np.abs(first - results[0].array.astype(np.float32)).max() / max(1e-6, np.abs(first).max()))
            real_kiln = sum(r.n_tokens for r in results)
            real_naive = sum(min(n, NAIVE_MAX_LENGTH) for n in lengths[:naive_n])
            row = {
                "set": name, "n": len(captions), "naive_n": min(naive_n, len(captions)),
                "median_tokens": float(np.median(lengths)), "max_tokens": max(lengths), "waste": waste,
                "kiln_cps": len(captions) / t_kiln, "naive_cps": min(naive_n, len(captions)) / t_naive,
                "kiln_tps": real_kiln / t_kiln, "naive_tps": real_naive / t_naive,
                "bytes_kiln": real_kiln / len(captions) * emb.d_model * 2, "bytes_naive": NAIVE_MAX_LENGTH * emb.d_model * 4,
                "rel_diff": diff,
            }
            rows.append(row)
            print(f"  {name}: kiln {len(captions)} captions in {t_kiln:.1f}s, naive {row['naive_n']} in {t_naive:.1f}s", flush=True)

        print(f"\n{'set':<10} {'median':>6} {'max':>4} {'kiln cap/s':>11} {'naive cap/s':>12} {'ratio':>6} "
              f"{'kiln tok/s':>11} {'naive tok/s':>12} {'waste':>6} {'bytes/cap kiln':>15} {'naive':>8} {'ratio':>6}")
        for r in rows:
            print(f"{r['set']:<10} {r['median_tokens']:>6.0f} {r['max_tokens']:>4} {r['kiln_cps']:>11.1f} {r['naive_cps']:>12.1f} "
                  f"{r['kiln_cps'] / r['naive_cps']:>5.1f}x {r['kiln_tps']:>11.0f} {r['naive_tps']:>12.0f} {r['waste']:>6.1%} "
                  f"{r['bytes_kiln']:>15.0f} {r['bytes_naive']:>8.0f} {r['bytes_naive'] / r['bytes_kiln']:>5.1f}x")
        print("(cap/s and real tok/s: wall clock incl. cleaning + tokenising; ratio = kiln / naive; waste = padded "
              "positions kiln computes for nothing; bytes/cap: float16 unpadded vs float32 padded to 128)")
        print("max |naive - kiln| / max|x| on the first caption: " + ", ".join(f"{r['set']} {r['rel_diff']:.1e}" for r in rows))
        print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        if device.type == "cuda":
            peak = a.peak_tflops * 1e12
            print(f"\nMFU (2 x {n_params / 1e9:.2f} B non-embedding params x real tokens / time / peak {a.peak_tflops:g} TFLOP/s bf16 "
                  f"[--peak-tflops]):")
            for r in rows:
                print(f"  {r['set']:<10} kiln {2 * n_params * r['kiln_tps'] / peak:6.1%}   naive {2 * n_params * r['naive_tps'] / peak:6.1%}")
        else:
            print("\nachieved model GFLOP/s on real tokens (2 x non-embedding params x tokens/s): "
                  + ", ".join(f"{r['set']} kiln {2 * n_params * r['kiln_tps'] / 1e9:.0f} naive {2 * n_params * r['naive_tps'] / 1e9:.0f}"
                              for r in rows))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
