"""train/config.py: presets, merging over defaults, overrides, strictness."""

from __future__ import annotations

import json
import re

import pytest

from train.config import (
    CONFIGS_DIR,
    Config,
    DiffusionConfig,
    UNetConfig,
    config_from_dict,
    config_to_dict,
    list_presets,
    load_config,
)

PRESETS = ["base64", "sr1024", "sr256", "tiny-base", "tiny-sr", "tiny-sr2"]


def test_list_presets():
    assert list_presets() == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config) and cfg.name == name
    raw = json.loads((CONFIGS_DIR / f"{name}.json").read_text())
    assert raw["type"] == "imagen_stage"
    # big_vision habit: the doc says the exact command that runs it and what it should produce.
    assert re.search(r"`(kiln train|torchrun .*-m train.trainer) --config " + re.escape(name) + r" --data \S+ --workdir ", cfg.doc)
    assert "parameters" in cfg.doc
    n = len(cfg.unet.dim_mults)
    assert len(cfg.unet.num_res_blocks) == len(cfg.unet.attn_levels) == len(cfg.unet.cross_attn_levels) == n
    assert isinstance(cfg.unet.dim_mults, tuple) and isinstance(cfg.train.betas, tuple)
    assert cfg.unet.lowres_cond == (cfg.stage == "sr")
    assert cfg.data.min_stored_size >= cfg.data.resolution
    assert set(cfg.sample) == {"guidance_weight", "steps", "sampler", "aug_level", "threshold"}


def test_preset_shapes_follow_the_paper():
    base, sr256, sr1024 = load_config("base64"), load_config("sr256"), load_config("sr1024")
    assert (base.data.resolution, base.unet.dim, base.unet.dim_mults) == (64, 512, (1, 2, 3, 4))
    assert base.unet.text_dim == 4096 and base.train.optimizer == "adafactor"
    # Efficient U-Net 64 -> 256: 2/4/8/8 blocks at 128/256/512/1024 channels, text attention at the lowest level.
    assert [sr256.unet.dim * m for m in sr256.unet.dim_mults] == [128, 256, 512, 1024]
    assert sr256.unet.num_res_blocks == (2, 4, 8, 8)
    assert sr256.unet.attn_levels == (False, False, False, True) and not any(sr256.unet.cross_attn_levels)
    assert (sr256.data.resolution, sr256.data.lowres_resolution) == (256, 64) and sr256.train.optimizer == "adamw"
    # 256 -> 1024: no self-attention, cross-attention at low res, trained on 256 crops of >= 1024 px images.
    assert not any(sr1024.unet.attn_levels) and sr1024.unet.cross_attn_levels[-1]
    assert sr1024.data.random_crop and sr1024.data.crop_size == 256 and sr1024.data.min_stored_size == 1024
    assert sr1024.unet.grad_checkpoint
    for cfg in (base, sr256, sr1024):
        assert cfg.diffusion.cond_drop_prob == 0.1 and cfg.sample["threshold"] == "dynamic"
    assert sr256.sample["aug_level"] == 0.25


def test_tiny_presets_match_the_tiny_t5():
    for name in ("tiny-base", "tiny-sr"):
        cfg = load_config(name)
        assert cfg.unet.text_dim == 64  # tiny T5 d_model
        assert cfg.data.resolution <= 64
    tiny = load_config("tiny-base")
    # strong conditioning: text-concat attention at the lowest two levels
    assert tiny.unet.attn_levels[-2:] == (True, True)


def test_tiny_base_reads_every_word_of_the_webs_captions():
    """The synthetic web's longest captions (three shapes, a template, "on a ... background") fit
    tiny-base's text window whole with the tiny T5's tokenizer: cutting them drops the background
    word (issue 16: a 16-token window cut it from most multi-shape captions)."""
    from transformers import AutoTokenizer

    from embed.text import clean_caption
    from pipeline.testbed.models import cached_test_models
    from pipeline.testbed.models.t5_pretrain import grammar_pairs

    tok = AutoTokenizer.from_pretrained(str(cached_test_models()["t5"]))
    captions = [clean_caption(c) for c, _ in grammar_pairs(7, 3000)]
    longest = max(len(ids) for ids in tok(captions).input_ids)  # EOS included, as embed.t5 counts
    assert 20 < longest <= load_config("tiny-base").data.text_max_len


def test_defaults_fill_unspecified_keys():
    d = {"name": "x", "stage": "base", "data": {"resolution": 32},
         "unet": {"dim": 8, "dim_mults": [1, 2], "num_res_blocks": [1, 1], "attn_levels": [False, True],
                  "cross_attn_levels": [False, False], "heads": 2, "head_dim": 8, "text_dim": 16, "cond_dim": 32}}
    cfg = config_from_dict(d)
    assert cfg.diffusion == DiffusionConfig()
    assert cfg.diffusion.prediction == "v" and cfg.diffusion.loss_weighting == "min_snr"
    assert cfg.diffusion.min_snr_gamma == 5.0
    assert (cfg.diffusion.logsnr_min, cfg.diffusion.logsnr_max) == (-15.0, 15.0)
    assert cfg.data.min_stored_size == 32 and cfg.data.text_max_len == 128
    assert cfg.unet.channels == 3 and cfg.unet.lowres_cond is False and cfg.unet.grad_checkpoint is False
    assert cfg.sample["guidance_weight"] == 5.0 and cfg.sample["sampler"] == "ddim"


def test_overrides():
    cfg = load_config("tiny-base", {"train.max_steps": 10, "unet.dim_mults": [1, 2, 2], "sample.steps": 7,
                                    "diffusion.prediction": "eps", "train.lr": 1, "name": "mine"})
    assert cfg.train.max_steps == 10 and cfg.sample["steps"] == 7 and cfg.name == "mine"
    assert cfg.unet.dim_mults == (1, 2, 2) and cfg.diffusion.prediction == "eps"
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert load_config("tiny-base").train.max_steps != 10  # the preset on disk is untouched


def test_unknown_keys_fail_clearly(tmp_path):
    with pytest.raises(KeyError, match="train.max_stepz"):
        load_config("tiny-base", {"train.max_stepz": 10})
    with pytest.raises(KeyError, match="unknown override section 'trian'"):
        load_config("tiny-base", {"trian.max_steps": 10})
    with pytest.raises(KeyError, match="sample.guidance"):
        load_config("tiny-base", {"sample.guidance": 2.0})
    d = config_to_dict(load_config("tiny-base"))
    d["unet"]["depth"] = 3
    with pytest.raises(KeyError, match=r"unknown key\(s\) in 'unet': \['depth'\]"):
        config_from_dict(d)
    d = config_to_dict(load_config("tiny-base"))
    d["optimiser"] = {}
    with pytest.raises(KeyError, match="optimiser"):
        config_from_dict(d)
    with pytest.raises(FileNotFoundError, match="tiny-bass"):
        load_config("tiny-bass")


BAD_OVERRIDES = [  # (preset, override, exception, message)
    ("tiny-base", {"unet.num_res_blocks": [1, 2]}, ValueError, "num_res_blocks has 2 entries but dim_mults has 3"),
    ("tiny-base", {"unet.dim": "32"}, TypeError, "unet.dim must be an integer"),
    ("tiny-base", {"diffusion.prediction": "x0"}, ValueError, "prediction"),
    ("tiny-base", {"train.optimizer": "sgd"}, ValueError, "optimizer"),
    ("tiny-base", {"unet.lowres_cond": True}, ValueError, "lowres_cond"),
    ("tiny-base", {"sample.sampler": "euler"}, ValueError, "sampler"),
    ("tiny-base", {"train.lr_schedule": "linear"}, ValueError, "train.lr_schedule must be 'constant' or 'cosine'"),
    ("tiny-sr", {"unet.lowres_upsample": "nearest"}, ValueError, "lowres_upsample"),
    ("tiny-base", {"diffusion.loss_weighting": "edm"}, ValueError, "'edm' needs an sr stage"),
    ("tiny-sr", {"unet.lowres_skip_std": 0.05, "diffusion.prediction": "eps"}, ValueError,
     "lowres_skip_std needs diffusion.prediction 'v'"),
    ("tiny-sr", {"diffusion.noise_aug_clean_prob": 1.5}, ValueError, "noise_aug_clean_prob"),
]


@pytest.mark.parametrize(("preset", "override", "exc", "message"), BAD_OVERRIDES)
def test_bad_values_fail_clearly(preset, override, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        load_config(preset, override)


def test_bad_documents_fail_clearly():
    with pytest.raises(KeyError, match="missing required"):
        config_from_dict({"name": "x", "stage": "base", "data": {"resolution": 8}, "unet": {"dim": 8}})
    with pytest.raises(ValueError, match="type"):
        config_from_dict({**config_to_dict(load_config("tiny-base")), "type": "image_v1"})


@pytest.mark.parametrize("name", PRESETS)
def test_round_trip(name, tmp_path):
    cfg = load_config(name)
    d = config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    assert config_from_dict(d) == cfg
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(d))
    assert load_config(str(path)) == cfg


def test_unet_config_is_a_plain_dataclass():
    u = UNetConfig(dim=8, dim_mults=(1,), num_res_blocks=(1,), attn_levels=(True,), cross_attn_levels=(False,),
                   heads=1, head_dim=8, text_dim=4, cond_dim=8)
    assert u.dropout == 0.0 and u.channels == 3
