"""`kiln demo --t5-encoder pretrained`: the demo's `kiln prepare` embeds captions with the pretrained tiny T5
from kiln's model cache (pipeline.testbed.models.cached_pretrained_t5), everything else unchanged.
The models and the Beam job are replaced here (the real ones are what `make demo` runs); the flag's
wiring is what is checked."""

from __future__ import annotations

import argparse

import pytest

import pipeline.prepare
import pipeline.testbed.models as models
from pipeline.testbed import demo

FAKE = {"clip": "/m/clip", "nsfw": "/m/nsfw/nsfw_head.safetensors", "toxicity": "/m/toxicity", "t5": "/m/t5",
        "min_clip_similarity": 0.5}


@pytest.mark.parametrize("t5, expect", [("random", "local:/m/t5"), ("pretrained", "local:/cache/t5-pretrained")])
def test_demo_embeds_with_the_chosen_tiny_t5(tmp_path, monkeypatch, t5, expect):
    seen, built = {}, []
    monkeypatch.setattr(models, "cached_test_models", lambda: dict(FAKE))
    monkeypatch.setattr(models, "cached_pretrained_t5", lambda size="tiny": built.append(size) or "/cache/t5-pretrained")
    monkeypatch.setattr(pipeline.prepare, "run", lambda cfg, beam_argv: seen.setdefault("cfg", cfg))
    args = argparse.Namespace(workdir=str(tmp_path / "demo"), rows=120, seed=0, train_s=0, t5_encoder=t5)
    assert demo.main(args, []) == 0
    assert seen["cfg"].t5.model == expect
    assert seen["cfg"].clip.clip_model == "local-dir:/m/clip"  # the other models are the test models still
    assert built == (["tiny"] if t5 == "pretrained" else [])


def test_demo_t5_flag_is_parsed():
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["demo", "--t5-encoder", "pretrained", "--train-s", "0"])
    assert args.t5_encoder == "pretrained"
    assert build_parser().parse_args(["demo"]).t5_encoder == "random"
