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
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from train.atomic import atomic_write
from train.config import Config, config_from_dict, config_to_dict
from train.errors import CheckpointError, MissingFile, one_line
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
FRESH = "start a fresh --workdir or drop --resume"  # what to do about a workdir that cannot be resumed


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


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", *, advice: str | None = None) -> dict:
    """{"config": Config, "step": int, "model": state_dict, "ema": state_dict or None, "metadata": dict}.

    A file that is missing, truncated, not safetensors, or not a kiln stage checkpoint raises
    MissingFile / CheckpointError: one line naming the file, then `advice` (what to do)."""
    todo = advice or "give a step_NNNNNNNN.safetensors written by `kiln train`"
    path = Path(path)
    if not path.is_file():
        what = "a directory, not a checkpoint file" if path.is_dir() else "missing"
        raise MissingFile(f"no checkpoint at {path} ({what}): {todo}")
    model, ema = {}, {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(f"{path} is not a kiln stage checkpoint (format {metadata.get('format')!r}): {todo}")
            for key in f.keys():
                group, name = key.split("/", 1)
                (model if group == "model" else ema)[name] = f.get_tensor(key)
        cfg = config_from_dict(json.loads(metadata["config"]))
        step = int(metadata["step"])
    except CheckpointError:
        raise
    except Exception as err:  # safetensors' SafetensorError, a bad header, bad config JSON, a cut-off file
        raise CheckpointError(f"{path} is not a readable kiln checkpoint (truncated or corrupt: {_reason(err)}); "
                              f"{advice or 'use another checkpoint, e.g. an earlier step_*.safetensors'}") from err
    return {
        "config": cfg,
        "step": step,
        "model": model,
        "ema": ema or None,
        "metadata": metadata,
    }


def _reason(err: BaseException) -> str:
    text = one_line(err)
    return (text[:160] + "...") if len(text) > 160 else (text or type(err).__name__)


def load_stage(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu"):
    """(EfficientUNet in eval mode, its Config, step) from a checkpoint; EMA weights by default."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    ckpt = load_checkpoint(path)
    state = ckpt["ema"] if weights == "ema" and ckpt["ema"] is not None else ckpt["model"]
    model = EfficientUNet(ckpt["config"].unet)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # tensors missing or of other shapes than its own config says
        raise CheckpointError(f"{path}: its weights do not match the config stored in it ({_reason(err)}); "
                              "use another checkpoint") from err
    return model.to(device).eval(), ckpt["config"], ckpt["step"]


def save_step(workdir: str | Path, cfg: Config, step: int, model_state: dict, ema_state: dict | None,
              train_state: dict, extra_metadata: dict | None = None, keep: int = KEEP_CHECKPOINTS) -> Path:
    """Write step_N.safetensors + step_N.state.pt, then latest.json; delete all but the newest
    `keep` complete pairs. `train_state` carries "format": STATE_FORMAT. Returns the weights path.

    Interrupted (Ctrl-C, SIGTERM, a full disk) before latest.json names the new pair, the pair's
    files are removed again: latest.json keeps naming the previous complete pair."""
    ckdir = Path(workdir) / "checkpoints"
    name = f"step_{int(step):08d}"
    weights, state = ckdir / f"{name}.safetensors", ckdir / f"{name}.state.pt"
    previous = _read_latest(ckdir)
    try:
        save_checkpoint(weights, cfg, step, model_state, ema_state, extra_metadata)
        atomic_write(state, lambda tmp: torch.save(train_state, tmp))
        atomic_write(ckdir / "latest.json", lambda tmp: tmp.write_text(
            json.dumps({"step": int(step), "weights": weights.name, "state": state.name})))
    except BaseException:
        # The signal may land after latest.json was replaced but before the try block ends (inside
        # atomic_write's return): then latest.json names the new pair and it must stay.
        now = _read_latest(ckdir)
        if (now or {}).get("weights") != weights.name and (previous or {}).get("weights") != weights.name:
            weights.unlink(missing_ok=True)
            state.unlink(missing_ok=True)
        raise
    steps = sorted({p.name.split(".")[0] for p in ckdir.glob("step_*.safetensors")})
    with _signals_deferred():  # a pair is removed whole: never a weights file without its state, or back
        for old in steps[:-keep]:
            for suffix in (".safetensors", ".state.pt"):
                (ckdir / f"{old}{suffix}").unlink(missing_ok=True)
    return weights


@contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM held back (delivered on exit) around a few unlinks, in the main thread
    where the platform allows it; elsewhere a no-op."""
    import signal
    import threading

    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _read_latest(ckdir: Path) -> dict | None:
    try:
        d = json.loads((ckdir / "latest.json").read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def load_train_state(path: str | Path, step: int, weights: str | Path = "the weights") -> dict:
    """The state.pt saved with the weights of `step` (weights_only: never unpickles code);
    CheckpointError (one line) if it is missing, unreadable or of another checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"train state {path} (named by latest.json) is missing: {FRESH}")
    try:
        s = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a cut-off zip, garbage, a pickle with code in it (weights_only refuses)
        raise CheckpointError(f"train state {path} is unreadable (truncated or corrupt: {_reason(err)}); {FRESH}") from err
    if not isinstance(s, dict) or s.get("format") != STATE_FORMAT or s.get("step") != step:
        raise CheckpointError(f"train state {path} does not belong to {weights}; {FRESH}")
    return s


def latest_checkpoint(workdir: str | Path) -> tuple[Path, Path] | None:
    """(weights, state) of the newest complete checkpoint in workdir/checkpoints, or None if there
    is none; CheckpointError (one line) if latest.json is garbage or names files that are gone."""
    ckdir = Path(workdir) / "checkpoints"
    latest = ckdir / "latest.json"
    if not latest.exists():
        return None
    try:
        d = json.loads(latest.read_text())
        weights, state = ckdir / d["weights"], ckdir / d["state"]
        if Path(d["weights"]).name != d["weights"] or Path(d["state"]).name != d["state"]:
            raise ValueError("names outside the checkpoints directory")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{latest} is not a checkpoint pointer ({_reason(err)}); {FRESH}") from err
    if not weights.is_file():
        raise CheckpointError(f"{latest} names {weights.name}, which is missing; {FRESH}")
    return weights, state
