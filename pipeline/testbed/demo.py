"""`kiln demo`: the main job on an embedded default, end to end on this machine.

Builds (once, cached) the tiny local models, synthesises a small web (pipeline.testbed.synth) with planted
failures, mismatched and toxic captions, and one row per opt-out protocol and blocklist kind (robots.txt
on seven origins, TDMRep, X-Robots-Tag, an opt-out list, hash blocklists), serves it on 127.0.0.1, runs `kiln prepare` on its
metadata with only that server allowed and every model filter on, and prints the funnel and where
everything went.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pipeline.testbed import prepare_config

def main(args: argparse.Namespace, beam_argv: list[str]) -> int:
    from pipeline.prepare import run
    from pipeline.testbed.server import SynthServer
    from pipeline.testbed.synth import synthesize
    from pipeline.testbed.models import cached_pretrained_t5, cached_test_models, prepare_flags, tiny_models_dir

    print(f"kiln demo: tiny local models (built once into {tiny_models_dir()}, a few minutes the first time)")
    models = dict(cached_test_models())
    if getattr(args, "t5_encoder", "random") == "pretrained":
        print("kiln demo: captions embedded by the pretrained tiny T5 (built once, about 5 CPU minutes the first time)")
        models["t5"] = str(cached_pretrained_t5())

    work = Path(args.workdir)
    web_dir, out_dir = work / "web", work / "dataset"
    if web_dir.exists():
        shutil.rmtree(web_dir)
    print(f"kiln demo: synthesising {args.rows} rows (seed {args.seed}) into {web_dir}")
    web = synthesize(web_dir, rows=args.rows, seed=args.seed, failure_rate=0.2, mismatch_rate=0.1, toxic_rate=0.04,
                     consent_per_kind=1)
    with SynthServer(web) as server:
        print(f"kiln demo: serving the synthetic web at {server.base_url}; allowing only {server.allow_hosts}")
        # A short deadline keeps the planted slow-drip and stalled URLs from dominating the demo.
        cfg = prepare_config(str(web_dir / "metadata.parquet"), str(out_dir), server.allow_hosts,
                             "--overwrite", "--download-timeout", "4", "--samples-per-shard", "200",
                             *prepare_flags(models), *web.consent_flags)
        run(cfg, beam_argv)
    if args.train_s > 0:
        _train_and_sample(work, out_dir, models, args.train_s)
    print(f"\nkiln demo: done. Read a shard with: tar tvf {out_dir}/shards/000000.tar | head")
    return 0


DEMO_PROMPTS = (
    "a red circle in the center on a grey background",
    "a blue square on the left on a white background",
    "a yellow triangle at the top on a black background",
    "a green circle on the right on a purple background",
)


def _train_and_sample(work: Path, data: Path, models: dict, budget_s: float) -> None:
    """The tiny three-stage cascade (tiny-base 16 px -> tiny-sr 64 px -> tiny-sr2 128 px) on the
    demo shards for a bounded time, then a sample grid for a few prompts: what `kiln train`,
    `kiln embed-prompts` and `kiln sample` run, called directly. tiny-sr2 trains on random 64 px
    crops of samples stored at >= 128 px (the demo prepares at the default --image-size, 1024, and
    its synthetic web's images are >= 256 px on the shorter side)."""
    # torch and the trainer are imported only when the demo trains (tests import this module for
    # prepare_config, and `kiln demo --train-s 0` never needs them).
    from pipeline.embed_prompts import embed_prompts
    from train.checkpoint import latest_checkpoint
    from train.config import load_config
    from train.sample import load_prompts, sample_to_grid
    from train.trainer import train

    runs = work / "runs"
    stages = (("tiny-base", budget_s / 2), ("tiny-sr", budget_s / 4), ("tiny-sr2", budget_s / 4))
    print("\nkiln demo: training " + ", ".join(f"{p} for {s:.0f}s" for p, s in stages) + f" on {data} (CPU)")
    for preset, seconds in stages:
        # The demo's own run folders, trained from scratch each time: a fresh run beside an earlier
        # demo's checkpoints with higher step numbers would have its new checkpoints pruned as "old".
        if (runs / preset).exists():
            shutil.rmtree(runs / preset)
        # --fit-schedule: each stage's cosine schedule ends when its share of the budget does, so the
        # grid shows finished (lr 0) models, not ones stopped at full learning rate.
        train(load_config(preset, {"train.sample_every": 0}), data, runs / preset, time_budget_s=seconds,
              fit_schedule=True)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(DEMO_PROMPTS) + "\n")
    embed_prompts(prompts, work / "prompts.parquet", f"local:{models['t5']}")
    captions, arrays, _ = load_prompts(work / "prompts.parquet")
    checkpoints = [latest_checkpoint(runs / preset)[0] for preset, _ in stages]
    grid = sample_to_grid(checkpoints, captions, arrays, work / "samples.png")
    print(f"kiln demo: sample grid for {len(DEMO_PROMPTS)} prompts at {grid}, base -> tiny-sr -> tiny-sr2 "
          f"(16, 64, 128 px; a few CPU minutes of training: expect colours and blobs, not pictures)")
