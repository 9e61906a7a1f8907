"""What each arm of the encoder-vs-U-Net scaling ablation costs (issue 16, item 6; docs/eval.md).

    .venv/bin/python bench/scaling_cost.py [--captions build/learning-pt/suite.txt]

Imagen (Saharia et al. 2022, fig. 4) found that scaling the frozen text encoder improves
image-text alignment more than scaling the diffusion U-Net. The miniature's three arms, each
`bench/learning.py` on the same synthetic web:

  base        tiny-base reading the pretrained tiny T5 (d_model 64)
  wide T5     tiny-base with unet.text_dim 128 reading the pretrained wide tiny T5 (d_model 128)
  U-Net 48    tiny-base with unet.dim 48 reading the pretrained tiny T5

For each arm this prints what it costs, counted, not timed: parameters of the U-Net and of the
encoder, FLOPs of one training step of the U-Net (batch 16 at 32², the preset's text length;
torch.utils.flop_counter on the trainer's own loss, forward + backward), and FLOPs of encoding one
caption (paid once, at `kiln prepare`; the real captions' token lengths when --captions is given).
The encoder is built with random weights in the pretrained one's config: FLOPs and parameters do
not depend on the weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.compat import ensure_torch_compat  # noqa: E402

ensure_torch_compat()

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.train import kiln_step_fn  # noqa: E402
from train.config import load_config  # noqa: E402

ARMS = (
    ("base", "tiny", {}),
    ("wide T5", "wide", {"unet.text_dim": 128}),
    ("U-Net 48", "tiny", {"unet.dim": 48}),
)
BATCH = 16


def unet_cost(overrides: dict) -> tuple[int, float]:
    cfg = load_config("tiny-base", overrides)
    step, n_params = kiln_step_fn(cfg, BATCH, torch.device("cpu"), torch.float32)
    with FlopCounterMode(display=False) as counter:
        step()
    return n_params, counter.get_total_flops()


def encoder_cost(size: str, lengths: list[int]) -> tuple[int, float]:
    from transformers import T5Config, T5EncoderModel

    from pipeline.testbed.models.t5 import TINY_T5_CONFIG, VOCAB_SIZE
    from pipeline.testbed.models.t5_pretrain import SIZES

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=VOCAB_SIZE, **{**TINY_T5_CONFIG, **SIZES[size]})).eval()
    n_params = sum(p.numel() for p in model.parameters()) - model.shared.weight.numel()  # without the embedding table
    total = 0.0
    with torch.no_grad():
        for n in sorted(set(lengths)):
            ids = torch.full((1, n), 5, dtype=torch.long)
            with FlopCounterMode(display=False) as counter:
                model(input_ids=ids)
            total += counter.get_total_flops() * lengths.count(n)
    return n_params, total / len(lengths)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", default=None, help="one caption per line; their tiny-T5 token lengths [20 tokens each]")
    args = ap.parse_args()
    lengths = [20]
    if args.captions:
        from transformers import AutoTokenizer

        from pipeline.testbed.models import cached_test_models

        tok = AutoTokenizer.from_pretrained(cached_test_models()["t5"])
        lines = [x for x in Path(args.captions).read_text().splitlines() if x.strip()]
        lengths = [len(tok(x)["input_ids"]) for x in lines]
    torch.set_num_threads(1)
    print(f"captions: {len(lengths)}, mean {sum(lengths) / len(lengths):.1f} tokens")
    base = None
    print(f"{'arm':10s} {'U-Net params':>13s} {'GFLOP/train step':>17s} {'x base':>7s} {'encoder params*':>15s} "
          f"{'MFLOP/caption':>14s}")
    for name, size, over in ARMS:
        up, uf = unet_cost(over)
        ep, ef = encoder_cost(size, lengths)
        base = base or uf
        print(f"{name:10s} {up / 1e6:12.2f}M {uf / 1e9:17.2f} {uf / base:6.2f}x {ep / 1e6:14.3f}M {ef / 1e6:14.2f}")
    print("* non-embedding parameters (the 1,024-piece embedding table adds 65.5k at d_model 64, 131k at 128)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
