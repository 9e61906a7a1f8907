"""Diffusion training throughput: kiln's Efficient U-Net + loss vs imagen-pytorch 2.1.0, in one run.

    .venv/bin/pip install imagen-pytorch==2.1.0 torch==2.13.0 torchvision==0.28.0   # bench only
    .venv/bin/python bench/train.py [--resolution 64] [--batch 8] [--steps 10] [--rounds 3]
                                    [--threads N] [--text-len 16] [--peak-tflops 989]

Same U-Net shape, resolution, batch, dtype, optimiser and random data for both, in one process;
the two are measured in alternating rounds (kiln, imagen, kiln, imagen, ...) so load from other
jobs on the machine hits both alike, and each side's median round is reported. Default shape (the
ANCHORS.md row "64² U-Net 4.6M params (dim 32, mults 1-2-4), batch 8, AdamW -> 7.0 img/s"):

  imagen-pytorch  Unet(dim=32, dim_mults=(1,2,4), num_resnet_blocks=2, layer_attns=(F,F,T),
                  layer_cross_attns=(F,T,T), text_embed_dim=64), inside Imagen(image_sizes=64,
                  pred_objectives="v", cond_drop_prob=0.1, min-SNR loss weight) -- 4.57M params
  kiln            tiny-base with data.resolution=64, unet.num_res_blocks=(2,2,2) and imagen's
                  attention placement: text-concat self-attention at 16² (imagen: self-attention +
                  cross-attention there), cross-attention at 32²; 4 heads x 32; v-prediction +
                  min-SNR -- 3.95M params. (tiny-base's own text-concat self-attention at the two
                  lowest levels would put a 1024-token self-attention at 32² here: ~40% of a step.)

One training step = loss on a batch of random images in [-1, 1] with random "T5" embeddings
(text_dim 64, --text-len tokens, a random number of them real), backward, AdamW(lr 1e-4) step.
Prints images/s for both, the ratio kiln/imagen and both parameter counts.

With CUDA (`torch.cuda.is_available()`), it also trains the base64 preset (1.74B params) in bf16
autocast at --gpu-batch and prints images/s and model FLOPs utilisation: FLOPs of one training
step counted by torch.utils.flop_counter.FlopCounterMode x steps/s / --peak-tflops (989: H100 SXM
dense bf16). imagen-pytorch is not run at that size. `--mfu --gpu-preset tiny-base --device cpu`
exercises the same code path on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.compat import ensure_torch_compat  # noqa: E402  (torchvision op stubs on CPU torch)

ensure_torch_compat()

import torch  # noqa: E402

from train.config import load_config  # noqa: E402
from train.diffusion import training_loss  # noqa: E402
from train.unet import EfficientUNet  # noqa: E402

TEXT_DIM = 64  # the tiny T5's d_model


def import_imagen():
    """imagen_pytorch, or None with the reason. Its import asks the Hugging Face hub for
    google/t5-v1_1-base's config (only to fill a default argument, text_embed_dim); offline that
    raises, so the lookup answers with d_model=768 (that model's value) during the import only."""
    try:
        import transformers
    except Exception as e:  # pragma: no cover
        return None, f"transformers does not import: {e!r}"
    original = transformers.T5Config.from_pretrained
    transformers.T5Config.from_pretrained = classmethod(lambda cls, name, **kw: cls(d_model=768))
    try:
        import imagen_pytorch
        from imagen_pytorch import Imagen, Unet  # noqa: F401
        return imagen_pytorch, None
    except ImportError as e:
        return None, (f"imagen-pytorch is not installed ({e}); install it for the bench with "
                      "`.venv/bin/pip install imagen-pytorch==2.1.0 torch==2.13.0 torchvision==0.28.0`")
    finally:
        transformers.T5Config.from_pretrained = original


def random_batch(batch: int, res: int, text_len: int, text_dim: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, res, res, generator=g) * 2 - 1
    text = torch.randn(batch, text_len, text_dim, generator=g)
    n_real = torch.randint(1, text_len + 1, (batch,), generator=g)
    mask = torch.arange(text_len)[None] < n_real[:, None]
    text[~mask] = 0
    return images.to(device), text.to(device), mask.to(device)


def kiln_step_fn(cfg, batch, device, dtype):
    torch.manual_seed(0)
    model = EfficientUNet(cfg.unet).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, text, mask = random_batch(batch, cfg.data.resolution, cfg.data.text_max_len, cfg.unet.text_dim, device)
    gen = torch.Generator(device).manual_seed(0)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step():
        with autocast():
            loss, _ = training_loss(model, images, text, mask, cfg.diffusion, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model.num_params()


def imagen_step_fn(imagen_pytorch, res, batch, text_len, device):
    torch.manual_seed(0)
    unet = imagen_pytorch.Unet(dim=32, dim_mults=(1, 2, 4), num_resnet_blocks=2, layer_attns=(False, False, True),
                               layer_cross_attns=(False, True, True), text_embed_dim=TEXT_DIM, max_text_len=text_len)
    imagen = imagen_pytorch.Imagen(unets=(unet,), image_sizes=(res,), text_embed_dim=TEXT_DIM, timesteps=1000,
                                   cond_drop_prob=0.1, pred_objectives="v", auto_normalize_img=False).to(device)
    imagen.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    images, text, mask = random_batch(batch, res, text_len, TEXT_DIM, device)

    def step():
        loss = imagen(images, text_embeds=text, text_masks=mask, unet_number=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in unet.parameters())


def timed(step, n: int, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def compare(args, device) -> None:
    imagen_pytorch, why = import_imagen()
    cfg = load_config("tiny-base", {"data.resolution": args.resolution, "data.text_max_len": args.text_len,
                                    "unet.num_res_blocks": [2, 2, 2], "unet.attn_levels": [False, False, True],
                                    "unet.cross_attn_levels": [False, True, False]})
    steps = {"kiln": kiln_step_fn(cfg, args.batch, device, torch.float32)}
    if imagen_pytorch is not None:
        with contextlib.redirect_stdout(sys.stderr):  # its "dim should be >= 128" advice
            steps["imagen-pytorch"] = imagen_step_fn(imagen_pytorch, args.resolution, args.batch, args.text_len, device)
    print(f"shape: {args.resolution}² images, batch {args.batch}, fp32, AdamW, text {args.text_len} x {TEXT_DIM}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}")
    for name, (step, n_params) in steps.items():
        timed(step, args.warmup, device)  # allocator, autotuning, first-call overheads
        print(f"  {name:15s} {n_params / 1e6:6.2f}M params")
    rates = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, (step, _) in steps.items():
            rates[name].append(args.steps * args.batch / timed(step, args.steps, device))
        print(f"  round {r + 1}: " + ", ".join(f"{n} {v[-1]:.2f} img/s" for n, v in rates.items()), flush=True)
    med = {name: statistics.median(v) for name, v in rates.items()}
    for name, v in med.items():
        print(f"{name:15s} {v:7.2f} img/s (median of {args.rounds} rounds of {args.steps} steps)")
    if imagen_pytorch is None:
        print(f"imagen-pytorch: not measured: {why}")
    else:
        print(f"ratio kiln / imagen-pytorch: {med['kiln'] / med['imagen-pytorch']:.2f}x")


def gpu_mfu(args, device) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_config(args.gpu_preset)
    step, n_params = kiln_step_fn(cfg, args.gpu_batch, device, torch.bfloat16)
    timed(step, args.warmup, device)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    dt = timed(step, args.steps, device)
    steps_per_s = args.steps / dt
    mfu = flops * steps_per_s / (args.peak_tflops * 1e12)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.gpu_preset} on {where}: {n_params / 1e6:,.1f}M params, bf16, "
          f"batch {args.gpu_batch}, {cfg.data.resolution}²: {steps_per_s * args.gpu_batch:.1f} img/s, "
          f"{flops / 1e9:,.1f} GFLOP/step, MFU {100 * mfu:.1f}% of {args.peak_tflops:g} TFLOP/s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gpu-preset", default="base64")
    p.add_argument("--gpu-batch", type=int, default=64)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--mfu", action=argparse.BooleanOptionalAction, default=None,
                   help="run the --gpu-preset bf16 / MFU measurement (default: only with CUDA)")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="run the kiln vs imagen-pytorch comparison (default: yes)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.compare:
        compare(args, device)
    if args.mfu or (args.mfu is None and device.type == "cuda"):
        gpu_mfu(args, device)


if __name__ == "__main__":
    main()
