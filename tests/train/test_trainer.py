"""train/trainer.py: schedule, EMA, gradient accumulation, the loop, its checkpoints, resume, DDP, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.conftest import MICRO, micro_cfg, micro_sr_cfg
from train.checkpoint import latest_checkpoint, load_stage
from train.config import config_to_dict
from train.errors import UserError
from train.trainer import FIT_AT, Trainer, ema_update, fitted_steps, lr_factor

REPO = Path(__file__).resolve().parents[2]


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_warmup_then_constant_or_cosine():
    assert [lr_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, 0) == 1.0
    assert lr_factor(4, 4, 14, "cosine") == 1.0
    assert lr_factor(9, 4, 14, "cosine") == pytest.approx(0.5)
    assert lr_factor(14, 4, 14, "cosine") == pytest.approx(0.0)


def test_trainer_applies_the_warmup(small_shards, tmp_path):
    root, _ = small_shards
    cfg = micro_cfg(**{"train.lr": 1e-2, "train.lr_schedule": "constant"})
    t = Trainer(cfg, root, tmp_path, log=None)
    lrs = [t.train_step()["lr"] for _ in range(5)]
    assert lrs == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2, 1e-2])
    # train.lr_schedule "cosine": after the warm-up, down to 0 at train.max_steps
    cfg = micro_cfg(**{"train.lr": 1e-2, "train.lr_schedule": "cosine", "train.max_steps": 7})
    t = Trainer(cfg, root, tmp_path / "cosine", log=None)
    lrs = [t.train_step()["lr"] for _ in range(8)]
    assert lrs == pytest.approx([1e-2 * lr_factor(s, 3, 7, "cosine") for s in range(8)])
    assert lrs[2] == pytest.approx(1e-2) and lrs[5] == pytest.approx(0.5e-2) and lrs[7] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="reaches lr 0 at train.max_steps=7; .* set train.max_steps=9 instead"):
        t.train(max_steps=9)


def test_ema_update_math():
    model = torch.nn.Linear(3, 2)
    ema = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    ema_update(ema, model, decay=0.9, step=1, ema_start=1)  # up to ema_start: a copy
    assert all(torch.equal(ema[k], v) for k, v in model.state_dict().items())
    before = {k: v.clone() for k, v in ema.items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema_update(ema, model, decay=0.9, step=2, ema_start=1)
    torch.testing.assert_close(ema["weight"], 0.9 * before["weight"] + 0.1 * model.weight.detach())
    torch.testing.assert_close(ema["bias"], before["bias"])  # unchanged weights stay put


def test_train_writes_checkpoints_metrics_samples_and_resumes(small_shards, tmp_path):
    root, _ = small_shards
    cfg = micro_cfg(**{"train.ckpt_every": 2, "train.sample_every": 4, "sample.steps": 2})
    t = Trainer(cfg, root, tmp_path, log=None)
    summary = t.train(max_steps=4)
    assert summary["step"] == 4
    ckdir = tmp_path / "checkpoints"
    assert json.loads((ckdir / "latest.json").read_text())["step"] == 4
    assert sorted(p.name for p in ckdir.glob("step_*")) == [
        "step_00000002.safetensors", "step_00000002.state.pt", "step_00000004.safetensors", "step_00000004.state.pt"]
    state = torch.load(ckdir / "step_00000004.state.pt", weights_only=True)  # plain containers + tensors
    assert state["step"] == 4 and state["data"]["position"] == 4 and "generator" in state["rng"]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    assert {"loss", "lr", "grad_norm", "img_s"} <= set(metrics[0])
    assert (tmp_path / "samples" / "step_00000004.png").exists()
    assert json.loads((tmp_path / "config.json").read_text()) == config_to_dict(cfg)

    # EMA weights are what load_stage returns by default.
    model, cfg2, step = load_stage(latest_checkpoint(tmp_path)[0])
    assert step == 4 and all(torch.equal(v, t.ema[k]) for k, v in model.state_dict().items())
    raw, _, _ = load_stage(latest_checkpoint(tmp_path)[0], weights="model")
    assert all(torch.equal(v, t.model.state_dict()[k]) for k, v in raw.state_dict().items())

    resumed = Trainer(cfg, root, tmp_path, resume=True, log=None)
    assert resumed.step == 4 and resumed.source.position == 4
    assert resumed.train(max_steps=6)["step"] == 6


def test_resume_refuses_another_holdout(small_shards, tmp_path):
    root, _ = small_shards
    cfg = micro_cfg()
    Trainer(cfg, root, tmp_path, log=None, holdout_fraction=0.2).train(max_steps=1)
    with pytest.raises(ValueError, match="holdout_fraction"):
        Trainer(cfg, root, tmp_path, resume=True, log=None, holdout_fraction=0.0)


def _deterministic_loss(model, batch, cfg, generator):
    """A loss with no randomness: fixed noise level and noise per sample (from its pixels)."""
    x = batch["image"]
    logsnr = torch.tensor([float(int(k[:4], 16) % 7 - 3) for k in batch["key"]])
    z = 0.8 * x + 0.6 * torch.sin(7 * x)
    out = model(z, logsnr, batch["text"], batch["text_mask"])
    loss = (out - x).pow(2).flatten(1).mean(1).mean()
    return loss, {}


def test_grad_accumulation_matches_a_bigger_batch(small_shards, tmp_path):
    root, _ = small_shards
    grads = {}
    for name, overrides in {"accum": {"train.batch_size": 4, "train.grad_accum": 2},
                            "big": {"train.batch_size": 8, "train.grad_accum": 1}}.items():
        cfg = micro_cfg(**{**overrides, "train.grad_clip": 0.0, "diffusion.cond_drop_prob": 0.0})
        t = Trainer(cfg, root, tmp_path / name, log=None, loss_fn=_deterministic_loss)
        with torch.no_grad():  # a non-zero output layer, so every parameter gets a gradient
            t.model.out_conv.weight.normal_(0, 0.1)

        def capture(optimizer, args, kwargs, _name=name, _t=t):
            grads[_name] = {n: p.grad.clone() for n, p in _t.model.named_parameters()}

        t.optimizer.register_step_pre_hook(capture)
        logs = t.train_step()
        assert logs["images"] == 8
    for n, g in grads["big"].items():
        torch.testing.assert_close(grads["accum"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_sr_stage_trains_and_adafactor_and_bf16_on_cpu(small_shards, tmp_path):
    root, _ = small_shards
    cfg = micro_sr_cfg(**{"train.optimizer": "adafactor", "train.precision": "bf16"})
    t = Trainer(cfg, root, tmp_path, log=None)
    before = params(t.model)
    logs = t.train_step()
    assert torch.isfinite(torch.tensor(logs["loss"]))
    assert isinstance(t.optimizer, torch.optim.Adafactor)
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # bf16 autocast is CUDA-only


def test_ddp_two_ranks_on_cpu(small_shards, tmp_path):
    """torchrun-style env, gloo on 127.0.0.1: both ranks end with the same weights, rank 0 writes."""
    root, _ = small_shards
    script = tmp_path / "ddp.py"
    script.write_text(
        "import json, os, sys, torch\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.train.conftest import micro_cfg\n"
        "from train.trainer import Trainer\n"
        "torch.set_num_threads(1)\n"
        f"t = Trainer(micro_cfg(), {str(root)!r}, {str(tmp_path / 'run')!r}, log=None)\n"
        "t.train(max_steps=2)\n"
        "flat = torch.cat([p.detach().flatten() for p in t.model.parameters()])\n"
        f"torch.save(flat, {str(tmp_path)!r} + f'/rank{{t.rank}}.pt')\n"
    )
    port = 29500 + os.getpid() % 1000
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(w0, w1)
    assert (tmp_path / "run" / "checkpoints" / "latest.json").exists()


def test_cli_train_then_sample(small_shards, tmp_path):
    """kiln train / kiln sample through train.cli's entry points (the kiln CLI wires these in)."""
    import argparse

    from train.cli import add_sample_args, add_train_args, main_sample, main_train, parse_overrides

    assert parse_overrides(["train.lr=3e-4", "unet.dim_mults=[1,2]", "name=x y"]) == {
        "train.lr": 3e-4, "unet.dim_mults": [1, 2], "name": "x y"}
    root, _ = small_shards
    p = argparse.ArgumentParser()
    add_train_args(p)
    over = [f"{k}={json.dumps(v)}" for k, v in MICRO.items()]
    base = tmp_path / "base"
    args = p.parse_args(["--config", "tiny-base", "--data", str(root), "--workdir", str(base), "--max-steps", "2",
                         "--holdout-fraction", "0.3", *sum((["--override", o] for o in over), [])])
    assert main_train(args) == 0
    sr = tmp_path / "sr"
    sr_over = over + ["unet.lowres_cond=true", "data.lowres_resolution=8", "data.resolution=32", "data.min_stored_size=64"]
    args = p.parse_args(["--config", "tiny-sr", "--data", str(root), "--workdir", str(sr), "--max-steps", "1",
                         *sum((["--override", o] for o in sr_over), [])])
    assert main_train(args) == 0

    q = argparse.ArgumentParser()
    add_sample_args(q)
    out = tmp_path / "grid.png"
    args = q.parse_args(["--base", str(latest_checkpoint(base)[0]), "--sr256", str(latest_checkpoint(sr)[0]),
                         "--from-shards", str(root), "--n", "3", "--out", str(out), "--steps", "2", "2",
                         "--guidance", "3", "1"])
    assert main_sample(args) == 0
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] > 3 * 128  # three columns of at least 128 px
    bad = q.parse_args(["--base", str(latest_checkpoint(base)[0]), "--from-shards", str(root), "--out", str(out),
                        "--steps", "2", "2"])
    with pytest.raises(UserError, match="--steps takes one value or one per stage"):  # kiln: one line, exit 2
        main_sample(bad)  # two step counts for a one-stage cascade


def test_train_imports_no_text_encoder():
    """DESIGN.md: the trainer never loads a text encoder (nor transformers, nor pipeline/filters/embed)."""
    code = (
        "import sys, train.trainer, train.sample, train.data, train.evaluate, train.cli, train.checkpoint, train.grid\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'pipeline', 'filters', 'embed', 'open_clip', 'detoxify'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_palette_matches_the_synthetic_web():
    from pipeline.testbed.synth import COLOURS, SHAPES
    from train import evaluate

    assert evaluate.COLOURS == COLOURS and evaluate.SHAPES == SHAPES


def test_resume_continues_exactly(small_shards, tmp_path):
    """N steps, stop, resume to 2N == 2N in one go: weights, EMA and Adam moments bit for bit."""
    root, _ = small_shards
    cfg = micro_cfg(**{"train.ckpt_every": 0})
    straight = Trainer(cfg, root, tmp_path / "straight", log=None)
    straight.train(max_steps=6)
    first = Trainer(cfg, root, tmp_path / "resumed", log=None)
    first.train(max_steps=3)
    del first
    second = Trainer(cfg, root, tmp_path / "resumed", resume=True, log=None)
    assert second.step == 3
    second.train(max_steps=6)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k]), k
    for k, v in straight.ema.items():
        assert torch.equal(v, second.ema[k]), k
    a, b = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert a and all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    fresh = Trainer(cfg, root, tmp_path / "fresh", log=None)
    assert not all(torch.equal(v, fresh.model.state_dict()[k]) for k, v in straight.model.state_dict().items())


def test_fitted_steps_fill_the_rest_of_the_budget():
    # 40 steps done after 12 s of a 900 s budget at 0.5 s a step: 95% of the 888 s left is 1687 more
    assert fitted_steps(40, 12.0, 0.5, 900.0) == 40 + 1687
    assert fitted_steps(40, 12.0, 0.5, 900.0, margin=1.0) == 40 + 1776
    assert fitted_steps(40, 950.0, 0.5, 900.0) == 41  # past the budget: one more step, never fewer
    with pytest.raises(ValueError):
        fitted_steps(40, 1.0, 0.0, 900.0)


def test_fit_schedule_ends_the_cosine_in_the_budget_and_equals_the_plain_run(small_shards, tmp_path):
    """--fit-schedule sets train.max_steps from the timed first steps (inside the warm-up), records it
    in config.json and the train state, and the run is the one train.max_steps=N gives, bit for bit;
    a resumed run keeps N. Nothing here is timed: N is whatever this machine's speed gave."""
    root, _ = small_shards
    cfg = micro_cfg(**{"train.warmup_steps": FIT_AT, "train.lr_schedule": "cosine", "train.max_steps": 100_000,
                       "train.log_every": 0})
    fitted = Trainer(cfg, root, tmp_path / "fitted", log=None)
    summary = fitted.train(time_budget_s=2.0, fit_schedule=True)
    n = fitted.cfg.train.max_steps
    assert FIT_AT < n < 100_000 and fitted.fitted
    assert json.loads((tmp_path / "fitted" / "config.json").read_text())["train"]["max_steps"] == n
    stopped = summary["step"]  # n, or fewer if this machine slowed down after the fit
    assert FIT_AT < stopped <= n
    plain = Trainer(micro_cfg(**{"train.warmup_steps": FIT_AT, "train.lr_schedule": "cosine", "train.max_steps": n,
                                 "train.log_every": 0}), root, tmp_path / "plain", log=None)
    plain.train(max_steps=stopped)
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, fitted.model.state_dict()[k]), k
    assert plain.optimizer.param_groups[0]["lr"] == fitted.optimizer.param_groups[0]["lr"]
    if stopped == n:
        assert fitted.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ended
    resumed = Trainer(micro_cfg(**{"train.warmup_steps": FIT_AT, "train.lr_schedule": "cosine",
                                   "train.max_steps": 100_000}), root, tmp_path / "fitted", resume=True, log=None)
    assert resumed.cfg.train.max_steps == n and resumed.step == stopped
    with pytest.raises(UserError, match="fresh run"):
        resumed.train(time_budget_s=1.0, fit_schedule=True)
