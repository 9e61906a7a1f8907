"""A stage's checkpoints on disk: what sampling needs, what resuming needs, and which pair is newest.

    WORKDIR/checkpoints/step_NNNNNNNN.safetensors   model + EMA weights ("model/NAME", "ema/NAME");
                                                     metadata: format, config (JSON), step, stage,
                                                     name, and extras (holdout_fraction) as strings
    WORKDIR/checkpoints/step_NNNNNNNN.state.pt      optimizer, scheduler, RNG states, data position
                                                     (torch.save of plain containers + tensors, read
                                                     back with weights_only=True)
    WORKDIR/checkpoints/latest.json                 {"step", "weights", "state"}: the newest complete
                                                     pair; written last, atomically

The weights file alone is enough to sample (`load_stage`): the config travels in its metadata,
as k-diffusion stores its EMA weights. Every file is written under a temporary name beside its
target and renamed into place, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from train.config import Config, config_from_dict, config_to_dict
from train.unet import EfficientUNet

__all__ = [
    "CHECKPOINT_FORMAT",
    "KEEP_CHECKPOINTS",
    "STATE_FORMAT",
    "atomic_write",
    "latest_checkpoint",
    "load_checkpoint",
    "load_stage",
    "load_train_state",
    "save_checkpoint",
    "save_step",
]

CHECKPOINT_FORMAT = "kiln-stage/1"
STATE_FORMAT = "kiln-train-state/1"
KEEP_CHECKPOINTS = 2  # older pairs are deleted once a newer one is complete


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp)` to a temporary name beside `path`, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: str | Path, cfg: Config, step: int, model_state: dict, ema_state: dict | None,
                    extra_metadata: dict | None = None) -> Path:
    """model (+ EMA) weights as one safetensors file; config JSON and step in its metadata."""
    tensors = {f"model/{k}": v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    if ema_state is not None:
        tensors.update({f"ema/{k}": v.detach().to("cpu").contiguous() for k, v in ema_state.items()})
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(config_to_dict(cfg), sort_keys=True),
        "step": str(int(step)),
        "stage": cfg.stage,
        "name": cfg.name,
        **{k: str(v) for k, v in (extra_metadata or {}).items()},
    }
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """{"config": Config, "step": int, "model": state_dict, "ema": state_dict or None, "metadata": dict}."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    model, ema = {}, {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a kiln stage checkpoint (format {metadata.get('format')!r})")
        for key in f.keys():
            group, name = key.split("/", 1)
            (model if group == "model" else ema)[name] = f.get_tensor(key)
    return {
        "config": config_from_dict(json.loads(metadata["config"])),
        "step": int(metadata["step"]),
        "model": model,
        "ema": ema or None,
        "metadata": metadata,
    }


def load_stage(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu"):
    """(EfficientUNet in eval mode, its Config, step) from a checkpoint; EMA weights by default."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    ckpt = load_checkpoint(path)
    state = ckpt["ema"] if weights == "ema" and ckpt["ema"] is not None else ckpt["model"]
    model = EfficientUNet(ckpt["config"].unet)
    model.load_state_dict(state)
    return model.to(device).eval(), ckpt["config"], ckpt["step"]


def save_step(workdir: str | Path, cfg: Config, step: int, model_state: dict, ema_state: dict | None,
              train_state: dict, extra_metadata: dict | None = None, keep: int = KEEP_CHECKPOINTS) -> Path:
    """Write step_N.safetensors + step_N.state.pt, then latest.json; delete all but the newest
    `keep` complete pairs. `train_state` carries "format": STATE_FORMAT. Returns the weights path."""
    ckdir = Path(workdir) / "checkpoints"
    name = f"step_{int(step):08d}"
    weights = save_checkpoint(ckdir / f"{name}.safetensors", cfg, step, model_state, ema_state, extra_metadata)
    state = ckdir / f"{name}.state.pt"
    atomic_write(state, lambda tmp: torch.save(train_state, tmp))
    atomic_write(ckdir / "latest.json", lambda tmp: tmp.write_text(
        json.dumps({"step": int(step), "weights": weights.name, "state": state.name})))
    steps = sorted({p.name.split(".")[0] for p in ckdir.glob("step_*.safetensors")})
    for old in steps[:-keep]:
        for suffix in (".safetensors", ".state.pt"):
            (ckdir / f"{old}{suffix}").unlink(missing_ok=True)
    return weights


def load_train_state(path: str | Path, step: int, weights: str | Path = "the weights") -> dict:
    """The state.pt saved with the weights of `step` (weights_only); ValueError if it is not."""
    s = torch.load(path, map_location="cpu", weights_only=True)
    if s.get("format") != STATE_FORMAT or s["step"] != step:
        raise ValueError(f"{path} does not belong to {weights}")
    return s


def latest_checkpoint(workdir: str | Path) -> tuple[Path, Path] | None:
    """(weights, state) of the newest complete checkpoint in workdir/checkpoints, or None."""
    ckdir = Path(workdir) / "checkpoints"
    latest = ckdir / "latest.json"
    if not latest.exists():
        return None
    d = json.loads(latest.read_text())
    return ckdir / d["weights"], ckdir / d["state"]
