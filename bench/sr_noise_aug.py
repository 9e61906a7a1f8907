"""Imagen's noise conditioning augmentation in miniature (issue 16, item 6).

    .venv/bin/python bench/sr_noise_aug.py [--data DATASET] [--workdir build/sr-noise-aug] [--steps 600]
                                           [--noise 0,0.1] [--aug-levels 0,0.1,0.25] [--sr-n 64]

Trains the `tiny-sr` preset (16 -> 64 px; 32 -> 64 in docs/eval.md's table) twice on the same
dataset, seed, steps and 10% held-out split: once as shipped (noise conditioning augmentation: half
of each batch sees its low-res image at aug_level ~ U(0, 1), the level given to the U-Net) and once
without (`--override diffusion.noise_aug_train_max=0`: every low-res image clean). Then scores both
with `kiln eval --sr256 CKPT --data DATASET` on the held-out images: with the true low-res inputs,
and with inputs perturbed by Gaussian noise (`--lowres-noise SIGMA`, a stand-in for the errors of a
base stage's samples, which an SR stage meets in a cascade and never in the shards), sampled at each
aug level. Prints PSNR against the truth, the bicubic baseline and the paired gain with 95% t
intervals, and writes WORKDIR/sr-noise-aug.json.

Without --data it builds the synthetic web dataset bench/learning.py uses (4,000 rows, the
pretrained tiny T5) into WORKDIR/dataset, or reuses one that is complete. Both trainings run to a
fixed step count (not a time budget), so a busy machine changes only how long it takes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from learning import build_dataset, kiln  # noqa: E402  (bench/learning.py: the same web, the same CLI calls)

VARIANTS = {"aug": [], "no-aug": ["--override", "diffusion.noise_aug_train_max=0"]}


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="a prepared dataset with a T5 of d_model 64 [build the web's]")
    ap.add_argument("--workdir", default="build/sr-noise-aug")
    ap.add_argument("--steps", type=int, default=600, help="training steps of each variant [600: the preset's]")
    ap.add_argument("--noise", type=floats, default=[0.0, 0.1], help="--lowres-noise stds to score at [0,0.1]")
    ap.add_argument("--aug-levels", type=floats, default=[0.0, 0.1, 0.25], help="sampling aug levels [0,0.1,0.25]")
    ap.add_argument("--sr-n", type=int, default=64, help="held-out images scored [64]")
    ap.add_argument("--holdout-fraction", type=float, default=0.1)
    ap.add_argument("--only", choices=tuple(VARIANTS), default=None, help="train and score one variant only")
    args = ap.parse_args()

    work = (ROOT / args.workdir).resolve() if not Path(args.workdir).is_absolute() else Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.data:
        data = Path(args.data)
    elif (work / "dataset" / "_SUCCESS").exists():
        data = work / "dataset"
    else:
        data = build_dataset(work, 4000, 0, "pretrained")

    from train.checkpoint import latest_checkpoint

    variants = [args.only] if args.only else list(VARIANTS)
    result: dict = {"data": str(data), "steps": args.steps, "holdout_fraction": args.holdout_fraction,
                    "sr_n": args.sr_n, "variants": {}}
    for name in variants:
        run = work / "runs" / name
        if run.exists():
            shutil.rmtree(run)  # the bench's own folder: each measurement trains from scratch
        t0 = time.monotonic()
        kiln("train", "--config", "tiny-sr", "--data", str(data), "--workdir", str(run), "--max-steps",
             str(args.steps), "--holdout-fraction", str(args.holdout_fraction), *VARIANTS[name])
        train_s = time.monotonic() - t0
        ckpt = latest_checkpoint(run)[0]
        scores = []
        for sigma in args.noise:
            for a in args.aug_levels:
                out = work / "eval" / f"{name}-noise{sigma:g}-aug{a:g}"
                kiln("eval", "--sr256", str(ckpt), "--data", str(data), "--sr-n", str(args.sr_n), "--lowres-noise",
                     str(sigma), "--aug-level", str(a), "--out-dir", str(out), "--overwrite")
                r = json.loads((out / "eval.json").read_text())["sr"]["sr256"]
                scores.append({"lowres_noise": sigma, "aug_level": a, "n": r["n"],
                               **{k: {"mean": r[k]["mean"], "ci95": r[k]["ci95"]}
                                  for k in ("psnr_sr", "psnr_bicubic", "psnr_gain", "consistency")}})
        result["variants"][name] = {"checkpoint": str(ckpt), "train_s": train_s, "scores": scores}

    print(f"\ntiny-sr, {args.steps} steps each, {args.sr_n} held-out images of {data}; PSNR in dB, 95% t intervals")
    print(f"{'training':>9} {'noise':>6} {'aug':>5} {'SR':>22} {'bicubic':>8} {'SR - bicubic':>22}")
    for name, v in result["variants"].items():
        for s in v["scores"]:
            sr, bic, gain = s["psnr_sr"], s["psnr_bicubic"], s["psnr_gain"]
            print(f"{name:>9} {s['lowres_noise']:>6g} {s['aug_level']:>5g} "
                  f"{sr['mean']:6.2f} [{sr['ci95'][0]:6.2f},{sr['ci95'][1]:6.2f}] {bic['mean']:8.2f} "
                  f"{gain['mean']:+6.2f} [{gain['ci95'][0]:+6.2f},{gain['ci95'][1]:+6.2f}]")
    (work / "sr-noise-aug.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"  -> {work / 'sr-noise-aug.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
