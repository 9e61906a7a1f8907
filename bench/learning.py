"""Does the tiny cascade follow composition? The default path, measured end to end (issue 16, item 4).

    python bench/learning.py [--t5 pretrained|random|pretrained-wide] [--rows 4000] [--train-s 900] [--workdir build/learning] [--config tiny-base]

What a new user does, as the user's own commands (subprocesses of the `kiln` CLI):

  1. `kiln synth` a whole synthetic web (one to three shapes per caption, planted failures, mismatched
     and toxic captions, as the demo's web), served on 127.0.0.1, and `kiln prepare` it with the tiny
     local models (the demo's flags), the captions embedded by the pretrained tiny T5
     (pipeline/testbed/models/t5_pretrain.py, built once into kiln's model cache like the other tiny
     models: pipeline.testbed.models.cached_pretrained_t5; `--t5 random`: the test
     models' random-init encoder -- the comparison in docs/eval.md; `--t5 pretrained-wide`: the same
     pretraining at d_model 128, for the encoder-vs-U-Net scaling ablation);
  2. `kiln train --config CONFIG --time-budget-s TRAIN_S --fit-schedule` on every shard (2 CPU cores:
     the budget is wall time and the cosine schedule is fitted to it from the first steps' speed, so a
     faster machine trains more steps, a busy one fewer; the step count is printed);
  3. `kiln eval --suite synthetic --data DATASET --write-prompts`, `kiln embed-prompts` with the
     dataset's T5, and `kiln eval --base CKPT --suite synthetic --guidance ...` on the held-out prompts.

Prints per-category accuracy (95% Wilson interval, chance) at each guidance weight against the issue's
floors (colour 90%, background 80%, position 70%, relation 60%, count 60%) and writes
WORKDIR/learning-RUN_NAME.json. `--reuse` keeps an existing dataset (steps 2-3 only).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLOORS = {"colour": 0.90, "background": 0.80, "position": 0.70, "relation": 0.60, "count": 0.60}


def spec_res(config: str, overrides: list[str]) -> int:
    from train.args import parse_overrides
    from train.config import load_config

    return load_config(config, parse_overrides(overrides)).data.resolution


def data_ceiling(data: Path, config: str, overrides: list[str]) -> dict:
    """The training data's own score: every kept sample's image, decoded and cropped at the stage's
    resolution exactly as the trainer reads it (train.data.load_records), read by the suite's scorer
    against its own caption. What a model that reproduced its training images would reach -- the
    ceiling the data sets, per category ({category: {"n", "accuracy"}})."""
    from train.args import parse_overrides
    from train.config import load_config
    from train.data import ImageSpec, load_records
    from train.evaluate import categories_of, judge, parse_caption, read_image

    spec = ImageSpec.from_config(load_config(config, parse_overrides(overrides)))
    hits: dict[str, list[int]] = {}
    for rec in load_records(data, spec):
        scene = parse_caption(rec.caption)
        if scene is None:
            continue
        reading = read_image(rec.image.permute(1, 2, 0).numpy())
        for c in categories_of(scene):
            h = hits.setdefault(c, [0, 0])
            h[0] += judge(c, scene, reading)
            h[1] += 1
    return {c: {"n": n, "accuracy": k / n} for c, (k, n) in hits.items()}


def kiln(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    print("+ kiln " + " ".join(shlex.quote(a) for a in args), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return out.stdout if capture else ""


def build_dataset(work: Path, rows: int, seed: int, t5: str = "random", resize_mode: str | None = None) -> Path:
    from pipeline.testbed.models import cached_pretrained_t5, cached_test_models, prepare_flags
    from pipeline.testbed.server import SynthServer
    from pipeline.testbed.synth import synthesize

    models = dict(cached_test_models())
    if t5 in ("pretrained", "pretrained-wide"):
        models["t5"] = cached_pretrained_t5("wide" if t5 == "pretrained-wide" else "tiny", seed=seed)
    extra = ["--resize-mode", resize_mode] if resize_mode else []
    web_dir, out = work / "web", work / "dataset"
    web = synthesize(web_dir, rows=rows, seed=seed, failure_rate=0.2, mismatch_rate=0.1, toxic_rate=0.04)
    with SynthServer(web) as server:
        kiln("prepare", "--input", str(web_dir / "metadata.parquet"), "--output", str(out), "--allow-hosts",
             server.allow_hosts, "--overwrite", "--download-timeout", "4", "--samples-per-shard", "500",
             *prepare_flags(models), *extra)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4000, help="rows of the synthetic web [4000]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-s", type=float, default=900.0, help="training wall time, seconds [900]")
    ap.add_argument("--config", default="tiny-base", help="the base preset [tiny-base]")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra `kiln train --override KEY=VALUE` (ablations)")
    ap.add_argument("--guidance", default="1,3,5", help="guidance weights of the sweep [1,3,5]")
    ap.add_argument("--no-fit", action="store_true",
                    help="train the preset's train.max_steps (cut by --train-s) instead of `kiln train --fit-schedule`, "
                         "which fits the schedule's length to --train-s")
    ap.add_argument("--suite-n", type=int, default=64, help="suite scenes per size [64]")
    ap.add_argument("--workdir", default="build/learning")
    ap.add_argument("--run-name", default=None, help="the training run's folder under WORKDIR/runs [the config]")
    ap.add_argument("--reuse", action="store_true", help="keep WORKDIR/dataset if it is complete")
    ap.add_argument("--t5", choices=("random", "pretrained", "pretrained-wide"), default="pretrained",
                    help="the tiny T5 `kiln prepare` embeds captions with: the test models' random-init one, the "
                         "one pretrained on text only by pipeline/testbed/models/t5_pretrain.py, or its wide form "
                         "(d_model 128: give --override unet.text_dim=128) [pretrained]")
    ap.add_argument("--resize-mode", default=None, help="`kiln prepare --resize-mode` [prepare's default]")
    args = ap.parse_args()

    work = (ROOT / args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "dataset"
    t0 = time.monotonic()
    if not (args.reuse and (data / "_SUCCESS").exists()):
        data = build_dataset(work, args.rows, args.seed, args.t5, args.resize_mode)
        for stale in (work / "suite.txt", work / "suite.parquet"):  # embedded with the old dataset's T5
            stale.unlink(missing_ok=True)
    prep_s = time.monotonic() - t0
    stats = json.loads((data / "stats.json").read_text())
    kept = stats.get("kept", stats.get("accounting", {}).get("kept"))

    name = args.run_name or args.config
    run = work / "runs" / name
    sets = [x for s in args.override for x in ("--override", s)]
    if run.exists():
        shutil.rmtree(run)  # the bench's own folder: each measurement trains from scratch
    t1 = time.monotonic()
    kiln("train", "--config", args.config, "--data", str(data), "--workdir", str(run), "--time-budget-s",
         str(args.train_s), *([] if args.no_fit else ["--fit-schedule"]), *sets)
    train_s = time.monotonic() - t1
    from train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run)[0]
    step = int(ckpt.stem.split("_")[-1].split(".")[0])  # checkpoints/step_00001000.safetensors

    t5 = stats["models"]["t5"]
    suite_txt, suite_pq = work / "suite.txt", work / "suite.parquet"
    if not suite_pq.exists():
        kiln("eval", "--suite", "synthetic", "--data", str(data), "--write-prompts", str(suite_txt),
             "--suite-n", str(args.suite_n))
        spec = t5.get("spec") or t5.get("source")
        kiln("embed-prompts", str(suite_txt), "-o", str(suite_pq), "--t5-model", spec,
             "--t5-max-length", str(t5.get("max_length", 128)))
    out = work / "eval" / name
    kiln("eval", "--base", str(ckpt), "--prompts", str(suite_pq), "--suite", "synthetic", "--data", str(data),
         "--guidance", args.guidance, "--out-dir", str(out), "--overwrite")
    info = json.loads((out / "eval.json").read_text())

    print(f"\n{args.config} {' '.join(args.override)}: {step} steps in {train_s:.0f} s of `kiln train` "
          f"(budget {args.train_s:.0f} s; dataset {prep_s:.0f} s{'' if kept is None else f', {kept} samples'})")
    ceiling = data_ceiling(data, args.config, args.override)
    print(f"  the data itself (each training image at the stage's {spec_res(args.config, args.override)} px, read by the same scorer "
          "against its own caption): " + "; ".join(f"{c} {v['accuracy']:.0%}" for c, v in ceiling.items()))
    rows = []
    for r in info["runs"]:
        w = r.get("guidance")
        cats = r["synthetic"]["categories"]
        cells = []
        for c in ("colour", "background", "position", "relation", "count", "shape"):
            v = cats.get(c)
            if v is None:
                continue
            floor = FLOORS.get(c)
            mark = "" if floor is None else (" ok" if v["accuracy"] >= floor else f" <{floor:.0%}")
            cells.append(f"{c} {v['accuracy']:.0%} [{v['ci95'][0]:.0%},{v['ci95'][1]:.0%}] (chance {v['chance']:.0%}){mark}")
        print(f"  w={w}: " + "; ".join(cells))
        rows.append({"guidance": w, "categories": {c: {k: v[k] for k in ("n", "accuracy", "ci95", "chance")} for c, v in cats.items()}})
    result = {"config": args.config, "set": args.override, "steps": step, "train_s": train_s, "train_budget_s": args.train_s,
              "rows": args.rows, "seed": args.seed, "cpu_count": os.cpu_count(), "floors": FLOORS, "runs": rows,
              "data_ceiling": ceiling,
              "eval_dir": str(out), "checkpoint": str(ckpt)}
    (work / f"learning-{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"  -> {work / f'learning-{name}.json'}, report {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
