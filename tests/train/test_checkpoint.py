"""train/checkpoint.py: the stage checkpoint's format, round trip, load_stage, the step pair and latest.json."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.train.conftest import micro_cfg, micro_sr_cfg
from train.checkpoint import (
    CHECKPOINT_FORMAT,
    STATE_FORMAT,
    latest_checkpoint,
    load_checkpoint,
    load_stage,
    load_train_state,
    save_checkpoint,
    save_step,
)
from train.config import config_to_dict
from train.unet import EfficientUNet

pytestmark = pytest.mark.usefixtures("one_thread")


def test_round_trip_gives_identical_tensors_and_config(tmp_path):
    cfg = micro_cfg()
    g = torch.Generator().manual_seed(0)
    model_state = {"a.weight": torch.randn(3, 4, generator=g), "b": torch.arange(5), "c": torch.randn(2, generator=g).half()}
    ema_state = {"a.weight": torch.randn(3, 4, generator=g), "b": torch.arange(5), "c": torch.randn(2, generator=g).half()}
    path = save_checkpoint(tmp_path / "c.safetensors", cfg, 17, model_state, ema_state, {"holdout_fraction": 0.25})
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary file left behind
    ck = load_checkpoint(path)
    assert ck["step"] == 17 and config_to_dict(ck["config"]) == config_to_dict(cfg)
    assert ck["metadata"]["holdout_fraction"] == "0.25"
    for k in model_state:
        assert ck["model"][k].dtype == model_state[k].dtype and torch.equal(ck["model"][k], model_state[k]), k
        assert ck["ema"][k].dtype == ema_state[k].dtype and torch.equal(ck["ema"][k], ema_state[k]), k
    # Without EMA weights, "ema" is None.
    ck = load_checkpoint(save_checkpoint(tmp_path / "raw.safetensors", cfg, 3, model_state, None))
    assert ck["ema"] is None and ck["step"] == 3 and set(ck["model"]) == set(model_state)


def test_file_format_is_plain_safetensors(tmp_path):
    """The format any reader relies on: "model/NAME" and "ema/NAME" tensors; metadata strings."""
    cfg = micro_sr_cfg()
    path = save_checkpoint(tmp_path / "c.safetensors", cfg, 5, {"w": torch.ones(2)}, {"w": torch.zeros(2)},
                           {"holdout_fraction": 0.0})
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["ema/w", "model/w"]
        meta = f.metadata()
    assert meta == {"format": CHECKPOINT_FORMAT, "config": json.dumps(config_to_dict(cfg), sort_keys=True),
                    "step": "5", "stage": "sr", "name": "tiny-sr", "holdout_fraction": "0.0"}
    assert CHECKPOINT_FORMAT == "kiln-stage/1"


def test_load_refuses_what_is_not_a_stage_checkpoint(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"other.safetensors is not a kiln stage checkpoint \(format 'pt'\)"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="weights must be 'ema' or 'model'"):
        load_stage(other, weights="best")


def test_load_stage_builds_the_unet_with_ema_or_raw_weights(tmp_path):
    cfg = micro_cfg()
    torch.manual_seed(0)
    model = EfficientUNet(cfg.unet)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: (v + 1.0 if v.is_floating_point() else v.clone()) for k, v in raw.items()}
    path = save_checkpoint(tmp_path / "c.safetensors", cfg, 9, raw, ema)

    loaded, cfg2, step = load_stage(path)
    assert step == 9 and config_to_dict(cfg2) == config_to_dict(cfg) and not loaded.training
    assert all(torch.equal(v, ema[k]) for k, v in loaded.state_dict().items())
    loaded, _, _ = load_stage(path, weights="model")
    assert all(torch.equal(v, raw[k]) for k, v in loaded.state_dict().items())
    # Without EMA weights in the file, "ema" falls back to the raw ones.
    loaded, _, _ = load_stage(save_checkpoint(tmp_path / "raw.safetensors", cfg, 9, raw, None))
    assert all(torch.equal(v, raw[k]) for k, v in loaded.state_dict().items())


def test_save_step_writes_the_pair_then_latest_and_keeps_the_newest(tmp_path):
    cfg = micro_cfg()
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 4, 6):
        state = {"format": STATE_FORMAT, "step": step, "x": torch.full((2,), float(step))}
        weights = save_step(tmp_path, cfg, step, {"w": torch.full((3,), float(step))}, None, state,
                            {"holdout_fraction": 0.1}, keep=2)
        assert weights == tmp_path / "checkpoints" / f"step_{step:08d}.safetensors"
    ckdir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == [
        "latest.json", "step_00000004.safetensors", "step_00000004.state.pt",
        "step_00000006.safetensors", "step_00000006.state.pt"]
    assert json.loads((ckdir / "latest.json").read_text()) == {
        "step": 6, "weights": "step_00000006.safetensors", "state": "step_00000006.state.pt"}
    weights, state = latest_checkpoint(tmp_path)
    assert (weights, state) == (ckdir / "step_00000006.safetensors", ckdir / "step_00000006.state.pt")
    ck = load_checkpoint(weights)
    assert ck["step"] == 6 and torch.equal(ck["model"]["w"], torch.full((3,), 6.0))
    assert ck["metadata"]["holdout_fraction"] == "0.1"
    s = load_train_state(state, 6, weights)
    assert s["step"] == 6 and torch.equal(s["x"], torch.full((2,), 6.0))
    with pytest.raises(ValueError, match=r"step_00000004.state.pt does not belong to .*step_00000006.safetensors"):
        load_train_state(ckdir / "step_00000004.state.pt", 6, weights)


@pytest.mark.parametrize("fail_at", ["weights", "state", "latest"])
def test_an_interrupted_save_leaves_the_previous_pair_and_no_partial_file(tmp_path, monkeypatch, fail_at):
    """Ctrl-C (or SIGTERM, or a full disk) in the middle of save_step: no temporary file, no half
    pair, latest.json still names the previous complete checkpoint, which still loads."""
    import train.checkpoint as ck

    cfg = micro_cfg()

    def save(step):
        state = {"format": STATE_FORMAT, "step": step}
        return save_step(tmp_path, cfg, step, {"w": torch.full((3,), float(step))}, None, state)

    save(2)
    ckdir = tmp_path / "checkpoints"
    before = sorted(p.name for p in ckdir.iterdir())
    real = {"weights": ck.save_file, "state": torch.save}

    def interrupted(*args, **kwargs):
        if fail_at == "latest":
            raise KeyboardInterrupt
        real[fail_at](*args, **kwargs)  # a partial temporary file exists when the signal lands
        raise KeyboardInterrupt

    if fail_at == "weights":
        monkeypatch.setattr(ck, "save_file", interrupted)
    elif fail_at == "state":
        monkeypatch.setattr(ck.torch, "save", interrupted)
    else:
        monkeypatch.setattr(ck.Path, "write_text", lambda self, text: interrupted())
    with pytest.raises(KeyboardInterrupt):
        save(4)
    monkeypatch.undo()
    assert sorted(p.name for p in ckdir.iterdir()) == before
    weights, state = latest_checkpoint(tmp_path)
    assert load_checkpoint(weights)["step"] == 2 and load_train_state(state, 2, weights)["step"] == 2


@pytest.mark.parametrize("case, match", [
    ("truncated weights", r"step_00000002.safetensors is not a readable kiln checkpoint \(truncated or corrupt"),
    ("garbage state", r"train state .*step_00000002.state.pt is unreadable .*start a fresh --workdir or drop --resume"),
    ("garbage latest", r"latest.json is not a checkpoint pointer .*start a fresh --workdir or drop --resume"),
    ("latest names a missing file", r"latest.json names step_00000009.safetensors, which is missing"),
])
def test_unreadable_checkpoints_are_one_line_user_errors(tmp_path, case, match):
    from train.errors import CheckpointError

    cfg = micro_cfg()
    save_step(tmp_path, cfg, 2, {"w": torch.ones(3)}, None, {"format": STATE_FORMAT, "step": 2})
    ckdir = tmp_path / "checkpoints"
    w, s = ckdir / "step_00000002.safetensors", ckdir / "step_00000002.state.pt"
    if case == "truncated weights":
        w.write_bytes(w.read_bytes()[:100])
    elif case == "garbage state":
        s.write_bytes(b"PK\x03\x04 not a zip at all")
    elif case == "garbage latest":
        (ckdir / "latest.json").write_text("[1, 2")
    else:
        (ckdir / "latest.json").write_text('{"step": 9, "weights": "step_00000009.safetensors", "state": "x"}')
    with pytest.raises(CheckpointError, match=match) as info:
        weights, state = latest_checkpoint(tmp_path)
        load_train_state(state, load_checkpoint(weights)["step"], weights)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
