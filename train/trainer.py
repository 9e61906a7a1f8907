"""Train one cascade stage (base or super-resolution) on kiln shards.

    python -m train.trainer --config tiny-base --data DATASET --workdir runs/tiny-base
    torchrun --nproc_per_node 8 -m train.trainer --config base64 --data DATASET --workdir runs/base64
    # or: kiln train --config tiny-base --data DATASET --workdir runs/tiny-base [--resume]

One step = `train.grad_accum` micro-batches of `train.batch_size` per process through
`diffusion.training_loss`, gradients clipped to `train.grad_clip` (global L2), one AdamW or
Adafactor update at the warmed-up learning rate, one EMA update. bf16 autocast on CUDA only
(`train.precision`); CPU always runs fp32, which is what makes resume bit-exact there.

The workdir:

    config.json                        the config this run was started with
    checkpoints/step_NNNNNNNN.safetensors
                                       model + EMA weights, config and step: everything sampling
                                       needs (train.checkpoint.load_stage)
    checkpoints/step_NNNNNNNN.state.pt optimizer, scheduler, RNG states and data position: what
                                       resuming needs (train.checkpoint describes both files)
    checkpoints/latest.json            names the newest complete pair; written last, atomically
    metrics.jsonl                      one JSON object per logged step (loss, lr, grad_norm, img_s)
    tb/                                the same scalars as TensorBoard events, if tensorboard is installed
    samples/step_NNNNNNNN.png          periodic sample grids from the EMA weights

A wall-clock budget (`--time-budget-s S`) stops the run after S seconds, wherever its learning-rate
schedule is. `--fit-schedule` instead fits the schedule to the budget: a fresh run times its steps
FIT_FROM..FIT_AT (inside the warm-up, whose learning rate does not depend on train.max_steps), sets
train.max_steps to the steps that fit in the rest of the budget (FIT_MARGIN of it, for checkpoints and
sample grids), writes that into config.json and the train state, and decays the cosine schedule to 0
there. With train.warmup_steps >= FIT_AT the run is the one `--override train.max_steps=N` gives, bit
for bit on CPU; a resumed run keeps the fitted schedule.

Resume is exact: randomness per step is drawn from generators re-seeded from (seed, rank, step)
and the data source's position is a step count (train.data), so N steps, stop, resume to 2N gives
the same parameters, bit for bit on CPU, as 2N steps in one go (tests/train/test_learning.py).

DDP: under torchrun (WORLD_SIZE > 1) the process group is initialised here, each rank reads its
own slice of every global batch, gradients are averaged by DistributedDataParallel, and only
rank 0 writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from train.args import add_train_args, parse_overrides
from train.checkpoint import (
    FRESH,
    STATE_FORMAT,
    atomic_write,
    latest_checkpoint,
    load_checkpoint,
    load_train_state,
    save_step,
)
from train.config import Config, config_to_dict, load_config
from train.device import check_device
from train.data import CORRUPT_REASONS, ImageSpec, check_dataset, collate_examples, load_records, make_example, make_source
from train.errors import CheckpointError, ConfigError, UserError, one_line, run_command
from train.diffusion import sample, training_loss
from train.grid import save_grid
from train.unet import EfficientUNet

__all__ = ["Trainer", "ema_update", "lr_factor", "main_train", "train"]


# --------------------------------------------------------------------------------------------
# Pieces with their own tests


FIT_FROM, FIT_AT = 5, 40  # --fit-schedule times steps FIT_FROM..FIT_AT (the first ones pay one-off costs)
FIT_MARGIN = 0.95  # the share of the remaining budget the fitted steps may take (checkpoints, sample grids)


def fitted_steps(step: int, elapsed_s: float, per_step_s: float, budget_s: float, margin: float = FIT_MARGIN) -> int:
    """train.max_steps for --fit-schedule: `step` steps done after `elapsed_s` of the budget, at
    `per_step_s` seconds a step -- the steps that fit in `margin` of what is left, at least one more."""
    if per_step_s <= 0 or not math.isfinite(per_step_s):
        raise ValueError(f"per_step_s must be a positive number of seconds, got {per_step_s}")
    return step + max(1, int(max(0.0, budget_s - elapsed_s) * margin / per_step_s))


def lr_factor(step: int, warmup_steps: int, max_steps: int | None = None, schedule: str = "constant",
              min_factor: float = 0.0) -> float:
    """Multiplier on train.lr for the update made at 0-based `step`: linear warm-up from 0 over
    `warmup_steps` (the first update already moves: (step + 1) / warmup), then constant or a
    cosine decay to `min_factor` at `max_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or not max_steps:
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float, step: int, ema_start: int) -> None:
    """After the update that made `step` (1-based: the number of updates so far): copy the weights
    while step <= ema_start, else ema = decay * ema + (1 - decay) * weights. Floating-point
    entries only; integer buffers are copied."""
    for name, value in model.state_dict().items():
        e = ema[name]
        if step <= ema_start or not value.is_floating_point():
            e.copy_(value)
        else:
            e.lerp_(value.to(e.dtype), 1.0 - decay)


def _step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------------------------
# RNG states for resuming (plain containers + tensors: weights_only-safe)


def _numpy_rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_rng_state(s: dict) -> None:
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"]))


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_rng_state(s: list) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))


# --------------------------------------------------------------------------------------------
# Metrics


class _Scalars:
    """metrics.jsonl always; TensorBoard events too when the tensorboard package is installed."""

    def __init__(self, workdir: Path):
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tb"))
        except ImportError:  # tensorboard is optional: the JSONL file has the same numbers
            pass

    def write(self, step: int, scalars: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------
# The trainer


def _default_loss(model, batch: dict, cfg: Config, generator: torch.Generator):
    return training_loss(model, batch["image"], batch["text"], batch["text_mask"], cfg.diffusion,
                         lowres=batch.get("lowres"), generator=generator)


class Trainer:
    """One stage's training run in `workdir`. `train()` runs it; `resume=True` continues the newest
    checkpoint there.

    holdout_fraction: the share of uids (by hash, train.data) never trained on, kept for evaluation.
    keep(meta, caption) -> bool: an extra sample filter (tests train on single-shape captions).
    cache: "auto" | "always" | "never" -- whether the training split is decoded into memory.
    loss_fn(model, batch, cfg, generator) -> (loss, logs): the diffusion loss unless replaced."""

    def __init__(self, cfg: Config, data_dir: str | Path, workdir: str | Path, device: str | torch.device | None = None,
                 *, resume: bool = False, holdout_fraction: float = 0.0, keep: Callable[[dict, str], bool] | None = None,
                 cache: str = "auto", loss_fn: Callable | None = None, log: Callable[[str], None] | None = print,
                 sample_captions: int = 8):
        self.cfg, self.data_dir, self.workdir = cfg, str(data_dir), Path(workdir)
        self.holdout_fraction = float(holdout_fraction)
        # What the user named is checked before any work (one line each, train.errors): a workdir
        # that is a file, a --data that is no dataset, has no T5 arrays or another d_model.
        _check_workdir(self.workdir)
        check_dataset(data_dir, ImageSpec.from_config(cfg))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        self._log = log if self.is_main else None
        self.loss_fn = loss_fn or _default_loss
        self.keep = keep
        t = cfg.train

        torch.manual_seed(t.seed)  # same initial weights on every rank (DDP also broadcasts them)
        self.model = EfficientUNet(cfg.unet).to(self.device)
        self.ema = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                    for k, v in self.model.state_dict().items()}
        self.ddp = None
        if self.world_size > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.lr_schedule))
        self.generator = torch.Generator(device=self.device)
        self.num_workers = loader_workers(t.num_workers, self.device)
        self.source = make_source(cfg, data_dir, seed=t.seed, rank=self.rank, world_size=self.world_size,
                                  split="train", holdout_fraction=self.holdout_fraction, keep=keep, cache=cache,
                                  num_workers=self.num_workers)
        self.step = 0
        self.fitted = False  # train.max_steps set by --fit-schedule (Trainer.train)
        self.last_logs: dict = {}
        self.history: list[dict] = []  # every logged scalars dict, also in metrics.jsonl
        self.sample_captions = sample_captions
        self._sample_batch = None
        if resume:
            found = latest_checkpoint(self.workdir)
            if found is not None:
                self.load(*found)
            elif self._log:
                self._log(f"kiln train: nothing to resume in {self.workdir}; starting from scratch")
        if self.is_main:
            _check_workdir(self.workdir, create=True)
            text = json.dumps(config_to_dict(cfg), indent=2, sort_keys=True)
            atomic_write(self.workdir / "config.json", lambda tmp: tmp.write_text(text))
            self.scalars = _Scalars(self.workdir)
        counts = self.source.counts
        self.info(f"kiln train: {cfg.name} ({cfg.stage}), {self.model.num_params() / 1e6:.2f}M params, "
                  f"{self.source.kind} data: {counts.as_dict()}, device {self.device}, world size {self.world_size}, step {self.step}"
                  + (f", {self.num_workers} loader workers" if self.source.kind == "stream" else ""))
        if counts.corrupt:
            self.info(f"kiln train: skipped {counts.corrupt} corrupt samples: "
                      f"{ {k: v for k, v in counts.skipped().items() if k in CORRUPT_REASONS} }")

    # -- setup ----------------------------------------------------------------------------------

    def _make_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        params = list(self.model.parameters())
        if t.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        # Imagen §4.1 trains the base model with Adafactor: factored second moments, no first
        # moment -- optimizer memory ~ O(rows + cols) per matrix instead of 2x the weights.
        return torch.optim.Adafactor(params, lr=t.lr, weight_decay=t.weight_decay)

    def info(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)

    @property
    def train_model(self) -> torch.nn.Module:
        return self.ddp if self.ddp is not None else self.model

    # -- one step -------------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer update over grad_accum micro-batches; returns its logs."""
        t = self.cfg.train
        model = self.train_model
        model.train()
        # Every random draw of this step comes from generators seeded by (seed, rank, step): the
        # step is reproducible on its own, which is what makes resume exact.
        self.generator.manual_seed(_step_seed(t.seed, self.rank, self.step, 1))
        torch.manual_seed(_step_seed(t.seed, self.rank, self.step, 2))  # dropout
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (
            self.device.type == "cuda" and t.precision == "bf16") else contextlib.nullcontext()
        self.optimizer.zero_grad(set_to_none=True)
        total, logs_sum, images = 0.0, {}, 0
        for micro in range(t.grad_accum):
            batch = self.source.next()
            batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            sync = self.ddp is None or micro == t.grad_accum - 1
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()), autocast:
                loss, logs = self.loss_fn(model, batch, self.cfg, self.generator)
                (loss / t.grad_accum).backward()
            total += loss.item() / t.grad_accum
            for k, v in logs.items():
                logs_sum[k] = logs_sum.get(k, 0.0) + float(v) / t.grad_accum
            images += batch["image"].shape[0]
        clip = t.grad_clip if t.grad_clip and t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        ema_update(self.ema, self.model, t.ema_decay, self.step, t.ema_start)
        return {**logs_sum, "loss": total, "grad_norm": float(grad_norm), "lr": lr, "images": images * self.world_size}

    # -- the loop -------------------------------------------------------------------------------

    def train(self, max_steps: int | None = None, time_budget_s: float | None = None, fit_schedule: bool = False) -> dict:
        """Train until `max_steps` (total, default train.max_steps) or `time_budget_s` of wall time
        in this call; save a checkpoint at the end. Returns a summary. `fit_schedule`: fit
        train.max_steps to the time budget (the module's docstring)."""
        t = self.cfg.train
        if fit_schedule:
            if time_budget_s is None:
                raise ConfigError("--fit-schedule fits the learning-rate schedule to --time-budget-s: give both")
            if max_steps is not None:
                raise ConfigError("--fit-schedule chooses the step count itself: drop --max-steps (or --fit-schedule)")
            if self.step != 0:
                raise ConfigError(f"--fit-schedule fits a fresh run's schedule; this run resumed at step {self.step} "
                                  f"keeps the schedule it was started with (train.max_steps={t.max_steps}): "
                                  "drop --fit-schedule")
        max_steps = t.max_steps if max_steps is None else max_steps
        if t.lr_schedule == "cosine" and max_steps > t.max_steps:
            # The schedule is fixed by the config (so a resumed run follows the same curve), and
            # every step past its end would run at lr 0.
            raise ConfigError(f"train.lr_schedule 'cosine' reaches lr 0 at train.max_steps={t.max_steps}; "
                             f"to train to step {max_steps}, set train.max_steps={max_steps} instead")
        start_step, t0 = self.step, time.monotonic()
        window_t, window_images, window_steps = time.monotonic(), 0, 0
        fit_t0 = None
        while self.step < max_steps:
            if time_budget_s is not None and self._agree(time.monotonic() - t0 >= time_budget_s):
                break
            if fit_schedule and self.step == FIT_FROM:
                fit_t0 = time.monotonic()
            logs = self.train_step()
            if fit_schedule and self.step == FIT_AT and fit_t0 is not None:
                now = time.monotonic()
                max_steps = self._fit(fitted_steps(self.step, now - t0, (now - fit_t0) / (FIT_AT - FIT_FROM),
                                                   time_budget_s))
            self.last_logs = logs
            window_images += logs["images"]
            window_steps += 1
            if t.log_every and (self.step % t.log_every == 0 or self.step == max_steps):
                now = time.monotonic()
                scalars = {k: logs[k] for k in ("loss", "mse", "grad_norm", "lr") if k in logs}
                scalars["img_s"] = window_images / max(now - window_t, 1e-9)
                scalars["elapsed_s"] = now - t0
                self.history.append({"step": self.step, **scalars})
                if self.is_main:
                    self.scalars.write(self.step, scalars)
                self.info(f"step {self.step}: loss {scalars['loss']:.4f} grad_norm {scalars['grad_norm']:.3f} "
                          f"lr {scalars['lr']:.2e} {scalars['img_s']:.1f} img/s")
                window_t, window_images, window_steps = now, 0, 0
            if t.sample_every and self.step % t.sample_every == 0 and self.is_main:
                self.sample_grid()
            if t.ckpt_every and self.step % t.ckpt_every == 0:
                self.save()
        elapsed = time.monotonic() - t0
        path = None
        if self.step != start_step or latest_checkpoint(self.workdir) is None:
            path = self.save()
        counts = self.source.counts
        summary = {"step": self.step, "steps_this_run": self.step - start_step, "elapsed_s": elapsed,
                   "loss": self.last_logs.get("loss"), "checkpoint": str(path) if path else None,
                   "data": {"seen": counts.seen, "kept": counts.kept, "skipped": counts.skipped()}}
        skipped = {k: v for k, v in counts.skipped().items() if k in CORRUPT_REASONS}
        self.info(f"kiln train: stopped at step {self.step} ({summary['steps_this_run']} steps in {elapsed:.0f}s)"
                  + (f"; skipped {sum(skipped.values())} corrupt samples: {skipped}" if skipped else ""))
        return summary

    def _fit(self, steps: int) -> int:
        """Set train.max_steps to rank 0's fitted `steps` (every rank), record it in config.json."""
        if self.world_size > 1:
            v = torch.tensor([float(steps)], device=self.device)
            dist.broadcast(v, 0)
            steps = int(v.item())
        t = self.cfg.train
        self.info(f"kiln train: --fit-schedule: {steps} steps fit the time budget at this speed "
                  f"(train.max_steps {t.max_steps} -> {steps}; the {t.lr_schedule} schedule ends there)")
        t.max_steps = steps  # the scheduler's lambda reads it at every step
        self.fitted = True
        if self.is_main:
            text = json.dumps(config_to_dict(self.cfg), indent=2, sort_keys=True)
            atomic_write(self.workdir / "config.json", lambda tmp: tmp.write_text(text))
        return steps

    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision, on every rank (a time budget must stop all ranks at the same step)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What resuming needs besides the weights (plain containers + tensors: weights_only-safe)."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": _numpy_rng_state(),
                "python": _python_rng_state(),
                "generator": self.generator.get_state(),
            },
            "data": self.source.state_dict(),
            "holdout_fraction": self.holdout_fraction,
            "world_size": self.world_size,
            # --fit-schedule's train.max_steps, which the preset does not know: a resumed run keeps it
            "fitted_max_steps": self.cfg.train.max_steps if self.fitted else None,
        }

    def save(self) -> Path | None:
        """Write step_N.safetensors + step_N.state.pt, then latest.json; rank 0 only."""
        if self.world_size > 1:
            dist.barrier()
        if not self.is_main:
            return None
        return save_step(self.workdir, self.cfg, self.step, self.model.state_dict(), self.ema, self.state_dict(),
                         {"holdout_fraction": self.holdout_fraction})

    def load(self, weights: str | Path, state: str | Path) -> None:
        """Restore weights, EMA, optimizer, scheduler, RNG states and data position. A checkpoint
        that is unreadable or of another run raises CheckpointError, one line naming the file."""
        ckpt = load_checkpoint(weights, device=self.device, advice=FRESH)
        if config_to_dict(ckpt["config"])["unet"] != config_to_dict(self.cfg)["unet"]:
            raise CheckpointError(f"{weights} was trained with another unet config (preset {ckpt['config'].name!r}, "
                                  f"this run: {self.cfg.name!r}): resume with the same --config and --override, "
                                  f"or {FRESH}")
        s = load_train_state(state, ckpt["step"], weights)
        if s.get("holdout_fraction", 0.0) != self.holdout_fraction:
            raise CheckpointError(f"{weights} was trained with holdout_fraction {s.get('holdout_fraction')}, "
                                  f"not {self.holdout_fraction}: the held-out samples would leak into training; "
                                  f"resume with --holdout-fraction {s.get('holdout_fraction')}, or {FRESH}")
        try:
            self.model.load_state_dict(ckpt["model"])
            if ckpt["ema"] is not None:
                for k, v in ckpt["ema"].items():
                    self.ema[k].copy_(v)
            self.optimizer.load_state_dict(s["optimizer"])
            self.scheduler.load_state_dict(s["scheduler"])
            rng = s["rng"]
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            _set_numpy_rng_state(rng["numpy"])
            _set_python_rng_state(rng["python"])
            self.generator.set_state(rng["generator"])
            self.source.load_state_dict(s["data"])
            self.step = int(s["step"])
            if s.get("fitted_max_steps"):
                self.cfg.train.max_steps, self.fitted = int(s["fitted_max_steps"]), True
                self.info(f"kiln train: the run's schedule was fitted to its time budget: train.max_steps "
                          f"{self.cfg.train.max_steps}")
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            raise CheckpointError(f"cannot resume from {weights} + {Path(state).name}: "
                                  f"{one_line(err) or type(err).__name__}; {FRESH}") from err
        if self.is_main:
            _trim_metrics(self.workdir / "metrics.jsonl", self.step)
        self.info(f"kiln train: resumed from {weights} at step {self.step}")

    # -- samples --------------------------------------------------------------------------------

    def ema_model(self) -> torch.nn.Module:
        """A copy of the U-Net carrying the EMA weights, in eval mode."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.ema)
        return model.eval()

    def sample_grid(self, path: str | Path | None = None) -> Path:
        """A grid of EMA samples for the first training captions (SR: from their true low-res)."""
        if self._sample_batch is None:
            # The first training-split samples, decoded apart from the training source (whose
            # position must not move); SR stages get their true low-res twins.
            spec = ImageSpec.from_config(self.cfg)
            records = load_records(self.data_dir, spec, split="train", holdout_fraction=self.holdout_fraction,
                                   keep=self.keep, limit=self.sample_captions)
            rng = np.random.default_rng(self.cfg.train.seed)
            self._sample_batch = collate_examples([make_example(r, spec, rng) for r in records], spec.text_max_len)
        b = self._sample_batch
        s = self.cfg.sample
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        with _preserve_rng():
            images = sample(self.ema_model(), tuple(b["image"].shape), b["text"].to(self.device),
                            b["text_mask"].to(self.device), steps=s["steps"], sampler=s["sampler"],
                            guidance_weight=s["guidance_weight"], threshold=s["threshold"],
                            lowres=b["lowres"].to(self.device) if "lowres" in b else None,
                            aug_level=s["aug_level"], generator=gen, diffusion=self.cfg.diffusion)
        path = Path(path) if path else self.workdir / "samples" / f"step_{self.step:08d}.png"
        return save_grid(images.cpu(), b["caption"], path)


@contextlib.contextmanager
def _preserve_rng():
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def train(cfg: Config, data_dir: str | Path, workdir: str | Path, max_steps: int | None = None,
          time_budget_s: float | None = None, **kwargs) -> Trainer:
    """Build a Trainer (kwargs: device, resume, holdout_fraction, keep, cache, ...), train it, return it
    (its `.summary` holds what `Trainer.train` returned)."""
    device = kwargs.pop("device", None)
    fit = kwargs.pop("fit_schedule", False)
    trainer = Trainer(cfg, data_dir, workdir, device, **kwargs)
    trainer.summary = trainer.train(max_steps=max_steps, time_budget_s=time_budget_s, fit_schedule=fit)
    return trainer


def loader_workers(setting: int | None, device: torch.device) -> int:
    """DataLoader workers for a streaming source: `setting` when given (train.num_workers,
    --num-workers); else 0 on CPU, where the workers would take cores from the training step, and on
    CUDA min(8, this process's share of the cores: cores / LOCAL_WORLD_SIZE under torchrun). Decoding
    is what feeds a GPU: bench/gpu.py prints the loader's images/s per core next to the training
    images/s, i.e. how many cores a GPU needs."""
    if setting is not None:
        return int(setting)
    if torch.device(device).type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines past `step` (logged after the checkpoint a run resumes from, by a
    run that was then interrupted), so the resumed run's lines do not repeat their steps."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if keep != lines:
        atomic_write(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in keep)))


def _check_workdir(workdir: Path, create: bool = False) -> None:
    """--workdir must be a directory (or a path one can be made at); `create` makes it."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file, not a directory: give a new or existing directory")
    if create:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as err:
            raise UserError(f"--workdir {workdir} cannot be made: {err.strerror or err} ({err.filename}); "
                            "give a directory path that is not under a file") from err


def main_train(args: argparse.Namespace) -> int:
    """`kiln train` (train.args.add_train_args): load the preset with its overrides, train, print
    the summary as JSON. A bad flag, dataset or checkpoint raises a UserError (train.errors): the
    kiln CLI prints it as one line."""
    try:
        overrides = parse_overrides(args.override)
        if getattr(args, "num_workers", None) is not None:
            overrides["train.num_workers"] = args.num_workers
        cfg = load_config(args.config, overrides)
    except (FileNotFoundError, KeyError, TypeError, ValueError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ConfigError(f"--config {args.config}: {one_line(msg)}") from err
    if not 0.0 <= args.holdout_fraction < 1.0:
        raise ConfigError(f"--holdout-fraction must be in [0, 1), got {args.holdout_fraction}")
    if args.max_steps is not None and args.max_steps < 0:
        raise ConfigError(f"--max-steps must be >= 0, got {args.max_steps}")
    if args.time_budget_s is not None and not (math.isfinite(args.time_budget_s) and args.time_budget_s > 0):
        raise ConfigError(f"--time-budget-s must be a number of seconds > 0, got {args.time_budget_s}")
    check_device(args.device)
    work = Path(args.workdir)
    if not args.resume and work.is_dir() and ((work / "config.json").exists() or any((work / "checkpoints").glob("*"))):
        raise ConfigError(f"--workdir {work} already holds a training run: pass --resume to continue it, or choose "
                          f"another --workdir (kiln never starts over a run's checkpoints)")
    if args.fit_schedule and args.time_budget_s is None:
        raise ConfigError("--fit-schedule fits the learning-rate schedule to --time-budget-s: give both")
    if args.fit_schedule and args.max_steps is not None:
        raise ConfigError("--fit-schedule chooses the step count itself: drop --max-steps (or --fit-schedule)")
    if args.fit_schedule and args.resume:
        raise ConfigError("--fit-schedule fits a fresh run's schedule; a resumed run keeps the one it started with: "
                          "drop --fit-schedule")
    trainer = train(cfg, args.data, args.workdir, max_steps=args.max_steps, time_budget_s=args.time_budget_s,
                    fit_schedule=args.fit_schedule, device=args.device, resume=args.resume, holdout_fraction=args.holdout_fraction, cache=args.cache)
    print(json.dumps(trainer.summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.trainer", description="train one cascade stage")
    add_train_args(p)
    return run_command("kiln train", main_train, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
