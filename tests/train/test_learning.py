"""Evidence that the trainer learns, on shards made by the project's own pipeline (conftest.py).

- the tiny base stage, trained for a fixed CPU budget, draws the colour the prompt names for
  HELD-OUT prompts: (colour, shape, background) combinations that no training caption has;
- the tiny SR stage's samples of held-out images beat bicubic upsampling in PSNR against the true
  high-res image, and stay faithful to their low-res input;
- N steps, stop, resume to 2N equals 2N steps in one go, bit for bit (CPU, fixed seeds).

Bounded: the base stage's 2,500 steps at 16 px took 629 s at 1 thread (beside another 1-thread
job) on 2026-12-03; its 1,000 steps at 32 px took ~5 of the module's ~9 minutes before.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.config import load_config
from train.data import ImageSpec, collate_examples, load_records, make_example
from train.diffusion import sample
from train.evaluate import COLOURS, colour_accuracy, parse_scene, psnr
from train.text import collate_text
from train.trainer import Trainer

pytestmark = pytest.mark.slow

HELDOUT_COMBOS = 0.2  # share of (colour, shape, background) combinations no training caption has
# The fixed CPU budget: the tiny-base preset's own optimizer steps (2,500 at 16 px since 2026-12-03,
# about the CPU time its 1,000 steps at 32 px took: batch 16, lr cosine to 0). A step count, not a wall-clock budget, so that a busy CI
# machine gets the same model, only later.
BASE_STEPS = load_config("tiny-base").train.max_steps
BASE_OVERRIDES: dict = {"train.max_steps": BASE_STEPS, "train.log_every": 100, "train.sample_every": 0,
                        "train.ckpt_every": 0}
# 192 held-out prompts: the rate's binomial standard error at ~90% is ~2 points (96 gave ~3).
EVAL_PROMPTS = 192
# The colours a shape can have in conftest.unambiguous_scene (backgrounds are white/black/grey).
CHROMATIC = tuple(c for c in COLOURS if c not in ("white", "black", "grey"))


def combo_held_out(scene: dict) -> bool:
    key = f"{scene['colour']}|{scene['shape']}|{scene['background']}".encode()
    return hashlib.sha256(key).digest()[0] < 256 * HELDOUT_COMBOS


def keep_train(meta: dict, caption: str) -> bool:
    """Single-shape captions (their foreground colour is one word) of combinations not held out."""
    scene = parse_scene(caption)
    return scene is not None and not combo_held_out(scene)


def keep_heldout(meta: dict, caption: str) -> bool:
    scene = parse_scene(caption)
    return scene is not None and combo_held_out(scene)


@pytest.mark.timeout(1500)  # ~4 min alone on 2 cores; the global 600 s is too tight on a loaded machine
def test_base_stage_follows_colour_words_of_heldout_prompts(synth_dataset, tmp_path):
    data, _ = synth_dataset
    torch.manual_seed(0)
    cfg = load_config("tiny-base", BASE_OVERRIDES)
    trainer = Trainer(cfg, data, tmp_path, keep=keep_train, cache="always")
    t0 = time.monotonic()
    summary = trainer.train(max_steps=BASE_STEPS)
    train_s = time.monotonic() - t0

    spec = ImageSpec.from_config(cfg)
    records = load_records(data, spec, keep=keep_heldout, limit=EVAL_PROMPTS)
    assert len(records) == EVAL_PROMPTS
    train_combos = {tuple(parse_scene(r.caption).values()) for r in trainer.source.records}
    assert not train_combos & {tuple(parse_scene(r.caption).values()) for r in records}  # truly unseen
    text, mask = collate_text([r.text for r in records], cfg.data.text_max_len)
    model = trainer.ema_model()
    rates = {}
    for w in (1.0, 3.0):
        g = torch.Generator().manual_seed(0)
        r = cfg.data.resolution
        images = sample(model, (len(records), 3, r, r), text, mask, steps=cfg.sample["steps"], guidance_weight=w,
                        generator=g, diffusion=cfg.diffusion)
        rates[w] = colour_accuracy(list(images), [r.caption for r in records])["accuracy"]
    chance = 1 / len(CHROMATIC)
    print(f"\nbase: {summary['step']} steps in {train_s:.0f}s; held-out colour accuracy w=1: {rates[1.0]:.0%}, "
          f"w=3: {rates[3.0]:.0%} (chance {chance:.0%}: {len(CHROMATIC)} shape colours)")
    assert rates[3.0] >= 0.8, rates  # the bar, with guidance
    assert rates[1.0] >= 2 * chance, rates  # and the conditional model alone follows the text too
    _kiln_eval_scores_the_trained_checkpoint(synth_dataset, tmp_path)


def _kiln_eval_scores_the_trained_checkpoint(synth_dataset, tmp_path):
    """The user's path on the checkpoint just trained: `kiln eval --suite synthetic --write-prompts`,
    `kiln embed-prompts` with the dataset's T5, `kiln eval --base CKPT --suite synthetic`. The suite's
    prompts are cut to what this model can be asked (one chromatic shape on a white/black/grey
    background, a (colour, shape, background) combination the training kept out), and the command's
    own per-category accuracy must clear floors the preset's model reaches with margin."""
    import json

    import pyarrow.parquet as pq

    from pipeline.cli import main as kiln
    from train.checkpoint import latest_checkpoint

    data, models = synth_dataset
    ckpt = latest_checkpoint(tmp_path)[0]
    everything, prompts = tmp_path / "suite-all.txt", tmp_path / "suite.txt"
    # No --data: the dataset holds every combination of this small grammar; held out here = the
    # training's own rule (combo_held_out), checked line by line below.
    assert kiln(["eval", "--suite", "synthetic", "--write-prompts", str(everything), "--suite-n", "1200"]) == 0
    lines = [l for l in everything.read_text().splitlines() if l.strip()]
    chosen = []
    for line in lines:
        scene = parse_scene(line)
        if scene and scene["background"] in ("white", "black", "grey") and scene["colour"] in CHROMATIC \
                and combo_held_out(scene):
            chosen.append(line)
    assert len(chosen) >= 40, len(chosen)
    prompts.write_text("\n".join(chosen) + "\n")
    embedded = tmp_path / "suite.parquet"
    assert kiln(["embed-prompts", str(prompts), "-o", str(embedded), "--t5-model", f"local:{models['t5']}"]) == 0
    out = tmp_path / "eval"
    assert kiln(["eval", "--base", str(ckpt), "--prompts", str(embedded), "--suite", "synthetic", "--guidance", "3",
                 "--out-dir", str(out)]) == 0
    info = json.loads((out / "eval.json").read_text())
    cats = info["runs"][0]["synthetic"]["categories"]
    assert (out / "report.html").exists() and pq.read_table(out / "samples" / "w3" / "samples.parquet").num_rows == len(chosen)
    print("kiln eval on the trained checkpoint, w=3: " + "; ".join(
        f"{c} {v['accuracy']:.0%} (chance {v['chance']:.0%}, n={v['n']})" for c, v in cats.items()))
    assert cats["colour"]["n"] == len(chosen)
    # Measured (OMP_NUM_THREADS=1, 2 cores): colour 96% (chance 20%, n=71), background 89% (chance 32%)
    # at 16 px, 2,500 steps; at 32 px, 1,000 steps: colour 96%, background 51% (chance 30%).
    assert cats["colour"]["accuracy"] >= 0.7, cats["colour"]
    assert cats["background"]["accuracy"] > cats["background"]["chance"] + 0.05, cats["background"]


SR_STEPS = 150  # about 2 minutes of tiny-sr on 2 cores
# Sample downsampled vs its low-res input: ~42 dB with the tiny-sr skip at 16 -> 64 (~48 at
# 32 -> 64); an SR U-Net without the skip drifts off the input (~19-21 dB against the true image
# after as many steps).
CONSISTENCY_MIN_DB = 30.0
SR_MARGIN_DB = 0.3  # dB over bicubic: measured +1.0 at 150 steps (16 -> 64), +1.2 at 120 (32 -> 64)


def test_sr_stage_beats_bicubic_on_heldout_images(synth_dataset, tmp_path):
    """The tiny SR stage (16 -> 64 px), trained SR_STEPS steps, sampled at aug_level 0 for held-out
    low-res images: higher PSNR against the true 64 px image than bicubic upsampling, and its
    samples, downsampled back, reproduce the low-res input.

    Bicubic is a high bar here: on these flat synthetic images it is already ~30.5 dB at 16 -> 64 px
    (~36.6 dB when the stage was 32 -> 64); what is left is the edges. Measured (1 thread, the test
    alone with one other 1-thread job): 31.5 dB after 150 steps at 16 -> 64; at 32 -> 64, 37.2 dB
    after 60 steps and 37.9 after 120. Without the preset's EDM-style skip (loss_weighting "min_snr")
    or with every training sample augmented (noise_aug_clean_prob 0) the samples stayed at or fell
    below bicubic on this budget (32-36.6 dB, measured at 32 -> 64)."""
    data, _ = synth_dataset
    cfg = load_config("tiny-sr", {"train.log_every": 50, "train.sample_every": 0, "train.ckpt_every": 0})
    trainer = Trainer(cfg, data, tmp_path, holdout_fraction=0.1, cache="always")
    summary = trainer.train(max_steps=SR_STEPS)

    spec = ImageSpec.from_config(cfg)
    records = load_records(data, spec, split="holdout", holdout_fraction=0.1, limit=32)
    batch = collate_examples([make_example(r, spec) for r in records], spec.text_max_len)
    g = torch.Generator().manual_seed(0)
    sr = sample(trainer.ema_model(), tuple(batch["image"].shape), batch["text"], batch["text_mask"],
                steps=cfg.sample["steps"], guidance_weight=1.0, lowres=batch["lowres"], aug_level=0.0,
                generator=g, diffusion=cfg.diffusion)
    low = batch["lowres"]
    bicubic = F.interpolate(low, size=batch["image"].shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
    nearest = F.interpolate(low, size=batch["image"].shape[-2:], mode="nearest")
    p_sr, p_bic, p_near = (psnr(x, batch["image"]).mean().item() for x in (sr, bicubic, nearest))
    consistency = psnr(F.interpolate(sr, size=low.shape[-2:], mode="area"), low).mean().item()
    print(f"\nsr: {summary['step']} steps; held-out PSNR vs the true 64 px image: sample {p_sr:.2f} dB, "
          f"bicubic {p_bic:.2f} dB, nearest {p_near:.2f} dB; sample downsampled vs its 16 px input {consistency:.2f} dB")
    assert consistency >= CONSISTENCY_MIN_DB, consistency
    assert p_sr >= p_bic + SR_MARGIN_DB, (p_sr, p_bic)


RESUME_OVERRIDES = {
    "unet.dim": 8, "unet.dim_mults": [1, 2], "unet.num_res_blocks": [1, 1], "unet.attn_levels": [False, True], "unet.cross_attn_levels": [False, False],
    "unet.heads": 2, "unet.head_dim": 8, "unet.cond_dim": 32, "data.resolution": 16, "train.batch_size": 4,
    "train.grad_accum": 2, "train.warmup_steps": 3, "train.ema_start": 2, "train.ema_decay": 0.9,
    "train.log_every": 0, "train.sample_every": 0, "train.ckpt_every": 0, "diffusion.cond_drop_prob": 0.3,
    "unet.dropout": 0.1,
}


def test_resume_is_exact(synth_dataset, tmp_path):
    """N steps, stop, resume to 2N == 2N uninterrupted: every weight, EMA weight and Adam moment."""
    data, _ = synth_dataset
    cfg = load_config("tiny-base", RESUME_OVERRIDES)
    n = 4
    straight = Trainer(cfg, data, tmp_path / "straight", log=None, holdout_fraction=0.1)
    straight.train(max_steps=2 * n)
    first = Trainer(cfg, data, tmp_path / "resumed", log=None, holdout_fraction=0.1)
    first.train(max_steps=n)
    del first
    second = Trainer(cfg, data, tmp_path / "resumed", resume=True, log=None, holdout_fraction=0.1)
    assert second.step == n
    second.train(max_steps=2 * n)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k]), k
    for k, v in straight.ema.items():
        assert torch.equal(v, second.ema[k]), k
    a, b = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    # ... and the runs did move: this is not two untouched initialisations.
    fresh = Trainer(cfg, data, tmp_path / "fresh", log=None, holdout_fraction=0.1)
    assert not all(torch.equal(v, fresh.model.state_dict()[k]) for k, v in straight.model.state_dict().items())
    assert np.isfinite(straight.last_logs["loss"])


def test_the_data_itself_reads_as_its_captions_at_the_base_resolution(synth_dataset):
    """bench/learning.py's ceiling: every training image, decoded at tiny-base's 16 px as the trainer
    decodes it, read by the suite's scorer against its own caption. Near 100% in each category, so
    a model's shortfall on the suite is the model's, not the data's or the scorer's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.learning import data_ceiling

    data, _ = synth_dataset
    ceiling = data_ceiling(data, "tiny-base", [])
    assert set(ceiling) >= {"colour", "background", "position", "count", "shape"}, ceiling
    assert all(v["n"] >= 100 for v in ceiling.values()), ceiling
    for category, v in ceiling.items():
        # The shape kind has no floor in the issue and is the one category 16 px blurs: the smallest
        # stars there are ~5 px wide (measured 78% on bench/learning.py's web, the rest 97-100%).
        assert v["accuracy"] >= (0.65 if category == "shape" else 0.9), (category, ceiling)
