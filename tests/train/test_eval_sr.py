"""`kiln eval` scores SR stages against the true image (train/eval.py: sr_pairs, sr_scores, t_interval).

A micro SR stage (16 -> 32 px, 8-dim "T5") trained a few steps on `small_shards` with 30% held out,
and an untrained random-crop stage (the sr1024 form in miniature: 16 px centre crops of 32 px
images), scored on held-out shard images:

- the figures of one sample checked against a hand computation: its PNG decoded with PIL, box-
  resized, 2x2-averaged to the low-res input, bicubic-upsampled, PSNR written out; the SR output
  reproduced with `train.sample.upscale`; the t interval with the t quantile written down;
- the random-crop stage scores the centre window of each image;
- `kiln eval --base ... --sr256 ... --data` scores the SR stage beside the prompt samples;
- eval.json, report.html and sr/<slot>.png are written; mistakes are one line, exit 2, nothing written.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.train.conftest import micro_cfg, micro_sr_cfg, write_small_dataset
from tests.train.test_sample import prompt_arrays, write_prompts
from train.args import add_eval_args
from train.checkpoint import save_checkpoint
from train.data import in_split
from train.eval import sr_pairs, t_interval
from train.grid import GridLayout
from train.sample import Stage, upscale
from train.unet import EfficientUNet

pytestmark = pytest.mark.usefixtures("one_thread")
HOLDOUT = 0.3
SR = {"data.resolution": 32, "data.lowres_resolution": 16}
CROP = {**SR, "data.random_crop": True, "data.crop_size": 16}


def run_eval(*argv) -> int:
    from pipeline.evaluation import main_eval

    p = argparse.ArgumentParser()
    add_eval_args(p)
    return main_eval(p.parse_args([str(a) for a in argv]))


def _untrained(path, cfg, holdout=HOLDOUT):
    torch.manual_seed(0)
    state = EfficientUNet(cfg.unet).state_dict()
    return save_checkpoint(path, cfg, 0, state, {k: v.clone() for k, v in state.items()}, {"holdout_fraction": holdout})


@pytest.fixture(scope="module")
def stages(small_shards, tmp_path_factory):
    """{"sr": micro SR 16 -> 32 trained 3 steps, "base": micro base trained 3 steps, "crop": an
    untrained random-crop SR stage}, all with 30% of small_shards held out."""
    from train.checkpoint import latest_checkpoint
    from train.trainer import Trainer

    root, _ = small_shards
    work = tmp_path_factory.mktemp("eval_sr")
    out = {}
    for name, cfg in (("sr", micro_sr_cfg(**SR)), ("base", micro_cfg())):
        Trainer(cfg, root, work / name, log=None, holdout_fraction=HOLDOUT).train(max_steps=3)
        out[name] = latest_checkpoint(work / name)[0]
    out["crop"] = _untrained(work / "crop.safetensors", micro_sr_cfg(**CROP))
    return out


def _truth_by_hand(data, key: str, side: int) -> torch.Tensor:
    """The sample's stored PNG, box-resized to `side` (small_shards' images are square), in [-1, 1]."""
    for tar_path in sorted((data / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            if f"{key}.png" in names:
                im = Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read())).convert("RGB")
                im = im.resize((side, side), Image.Resampling.BOX)
                return torch.from_numpy(np.asarray(im, dtype=np.float64) / 127.5 - 1).permute(2, 0, 1)
    raise AssertionError(f"{key} is in no shard")


def _psnr(x: np.ndarray, y: np.ndarray) -> float:
    return 10 * math.log10(4.0 / float(np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)))


def test_t_interval_is_students():
    v = [30.0, 31.0, 33.0, 34.0]
    got = t_interval(v)
    half = 3.182446305284263 * np.std(v, ddof=1) / 2  # t(0.975, 3) / sqrt(4)
    assert got["mean"] == 32.0 and got["n"] == 4 and got["interval"] == "t"
    assert got["ci95"] == pytest.approx([32.0 - half, 32.0 + half], abs=1e-9)
    assert math.isnan(t_interval([5.0])["ci95"][0])


def test_random_crop_stage_scores_the_centre_window(stages, small_shards):
    root, _ = small_shards
    st = Stage.load(stages["crop"])
    pairs = sr_pairs(st.cfg, root, 3, HOLDOUT)
    assert pairs.truth.shape == (3, 3, 16, 16) and pairs.lowres.shape == (3, 3, 8, 8)
    assert pairs.info["crop"] == {"size": 16, "of": 32, "top": 8, "left": 8} and pairs.info["split"] == "holdout"
    for key, truth, low in zip(pairs.keys, pairs.truth, pairs.lowres):
        assert in_split(key, "holdout", HOLDOUT)
        full = _truth_by_hand(root, key, 32)
        torch.testing.assert_close(truth.double(), full[:, 8:24, 8:24], atol=1e-6, rtol=0)
        want = truth.double().reshape(3, 8, 2, 8, 2).mean((2, 4))  # 2x2 averages
        torch.testing.assert_close(low.double(), want, atol=1e-6, rtol=0)


def test_kiln_eval_scores_sr_stages_on_held_out_images(stages, small_shards, tmp_path, capsys):
    root, samples = small_shards
    held = [s["uid"] for s in samples if s["side"] >= 64 and in_split(s["uid"], "holdout", HOLDOUT)]
    assert len(held) >= 3
    out = tmp_path / "eval"
    assert run_eval("--sr256", stages["sr"], "--sr1024", stages["crop"], "--data", root, "--sr-n", "4",
                    "--steps", "3", "2", "--device", "cpu", "--out-dir", out) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert report["complete"] and report["runs"] == [] and set(report["sr"]) == {"sr256", "sr1024"}
    assert report["files"] == ["report.html", "sr/sr256.png", "sr/sr1024.png"]
    r = report["sr"]["sr256"]
    assert (r["n"], r["split"], r["holdout_fraction"], r["scored_size"], r["lowres_size"], r["crop"]) == \
        (min(4, len(held)), "holdout", HOLDOUT, 32, 16, None)
    assert [s["key"] for s in r["per_sample"]] == held[:4]  # the first held-out ones, in shard order
    assert r["settings"]["steps"] == 3 and r["settings"]["aug_level"] == 0.0 and r["settings"]["sampler"] == "ddim"
    assert report["sr"]["sr1024"]["crop"]["size"] == 16 and report["sr"]["sr1024"]["settings"]["steps"] == 2
    assert f"sr256 (tiny-sr, 16 -> 32 px, {r['n']} held-out images): SR " in printed and "95% t intervals" in printed

    # Every sample by hand: the true 32 px image, its 16 px input (2x2 averages), bicubic, the
    # stage run on those inputs, the PSNRs written out.
    truth = torch.stack([_truth_by_hand(root, s["key"], 32) for s in r["per_sample"]])
    low = truth.reshape(-1, 3, 16, 2, 16, 2).mean((3, 5))
    bicubic = F.interpolate(low.float(), size=32, mode="bicubic", align_corners=False).clamp(-1, 1)
    sr = upscale(Stage.load(stages["sr"], steps=3), low.float(), [st_text(root, s["key"]) for s in r["per_sample"]],
                 seed=0, aug_level=0.0)
    down = sr.double().reshape(-1, 3, 16, 2, 16, 2).mean((3, 5))
    for i, got in enumerate(r["per_sample"]):
        assert got["psnr_bicubic"] == pytest.approx(_psnr(bicubic[i], truth[i]), abs=1e-3)
        assert got["psnr_sr"] == pytest.approx(_psnr(sr[i], truth[i]), abs=1e-3)
        assert got["consistency"] == pytest.approx(_psnr(down[i], low[i]), abs=1e-3)
        assert got["consistency_bicubic"] > 20
        assert got["psnr_gain"] == pytest.approx(got["psnr_sr"] - got["psnr_bicubic"], abs=1e-9)
    for name in ("psnr_sr", "psnr_bicubic", "psnr_gain", "consistency"):
        values = [s[name] for s in r["per_sample"]]
        want = t_interval(values)
        assert r[name]["mean"] == pytest.approx(want["mean"]) and r[name]["ci95"] == pytest.approx(want["ci95"])
        assert r[name]["ci95"][0] <= r[name]["mean"] <= r[name]["ci95"][1]  # bicubic: equal on these gradients

    html = (out / "report.html").read_text()
    assert "Super-resolution stages against the true image" in html and "src='sr/sr256.png'" in html
    assert "<script" not in html
    with Image.open(out / "sr" / "sr256.png") as im:
        assert im.size == GridLayout(rows=4, cols=r["n"], cell=128, labelled=True, caption_lines=4).size


def test_lowres_noise_perturbs_what_the_stage_and_bicubic_see(stages, small_shards, tmp_path, capsys):
    """--lowres-noise SIGMA (issue 16's noise-augmentation ablation): each low-res input plus
    N(0, SIGMA^2) from --seed, clipped to [-1, 1], goes to the stage and to bicubic; the truth stays
    clean. Checked by hand against the clean run's inputs."""
    root, _ = small_shards
    clean, noisy = tmp_path / "clean", tmp_path / "noisy"
    common = ["--sr256", stages["sr"], "--data", root, "--sr-n", "3", "--steps", "2", "--device", "cpu", "--seed", "5"]
    assert run_eval(*common, "--out-dir", clean) == 0
    assert run_eval(*common, "--lowres-noise", "0.2", "--aug-level", "0.1", "--out-dir", noisy) == 0
    assert "low-res + noise std 0.2, aug level 0.1" in capsys.readouterr().out
    a, b = (json.loads((d / "eval.json").read_text())["sr"]["sr256"] for d in (clean, noisy))
    assert b["settings"]["lowres_noise"] == 0.2 and a["settings"]["lowres_noise"] == 0.0
    assert json.loads((noisy / "eval.json").read_text())["settings"]["lowres_noise"] == 0.2
    keys = [s["key"] for s in b["per_sample"]]
    assert keys == [s["key"] for s in a["per_sample"]]
    truth = torch.stack([_truth_by_hand(root, k, 32) for k in keys])
    low = truth.reshape(-1, 3, 16, 2, 16, 2).mean((3, 5)).float()
    g = torch.Generator().manual_seed(5)
    given = (low + 0.2 * torch.randn(low.shape, generator=g)).clamp(-1, 1)
    assert given.abs().max() <= 1 and (given - low).abs().max() > 0.2  # perturbed, still in range
    bicubic = F.interpolate(given, size=32, mode="bicubic", align_corners=False).clamp(-1, 1)
    sr = upscale(Stage.load(stages["sr"], steps=2), given, [st_text(root, k) for k in keys], seed=5, aug_level=0.1)
    down = sr.double().reshape(-1, 3, 16, 2, 16, 2).mean((3, 5))
    for i, got in enumerate(b["per_sample"]):
        assert got["psnr_bicubic"] == pytest.approx(_psnr(bicubic[i], truth[i]), abs=1e-3)
        assert got["psnr_sr"] == pytest.approx(_psnr(sr[i], truth[i]), abs=1e-3)
        assert got["consistency"] == pytest.approx(_psnr(down[i], given[i]), abs=1e-3)  # against what it was given
        assert got["psnr_bicubic"] < a["per_sample"][i]["psnr_bicubic"] - 3  # noise costs bicubic dB


def st_text(root, key: str) -> np.ndarray:
    for tar_path in sorted((root / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            if f"{key}.t5.npy" in tar.getnames():
                return np.load(io.BytesIO(tar.extractfile(f"{key}.t5.npy").read()))
    raise AssertionError(key)


def test_kiln_eval_with_base_also_scores_the_sr_stage(stages, small_shards, tmp_path, capsys):
    root, _ = small_shards
    prompts = write_prompts(tmp_path / "p.parquet", ["a red circle", "a blue star"], prompt_arrays((3, 4)))
    out = tmp_path / "eval"
    assert run_eval("--base", stages["base"], "--sr256", stages["sr"], "--prompts", prompts, "--data", root,
                    "--steps", "2", "--sr-n", "3", "--device", "cpu", "--out-dir", out) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["runs"][0]["stage"] == "sr256" and report["sr"]["sr256"]["n"] == 3
    assert "sr/sr256.png" in report["files"] and (out / "sr" / "sr256.png").is_file()
    assert "kiln eval: sr256 (tiny-sr" in capsys.readouterr().out
    # --sr-n 0 skips it; --overwrite removes the earlier grid (it was listed)
    assert run_eval("--base", stages["base"], "--sr256", stages["sr"], "--prompts", prompts, "--data", root,
                    "--steps", "2", "--sr-n", "0", "--device", "cpu", "--out-dir", out, "--overwrite") == 0
    assert json.loads((out / "eval.json").read_text())["sr"] is None and not (out / "sr").exists()


def test_sr_mistakes_are_one_line(stages, small_shards, tmp_path, capsys):
    from pipeline.cli import main as kiln

    root, _ = small_shards
    wide = tmp_path / "wide"
    write_small_dataset(wide, d_model=16)
    picky = _untrained(tmp_path / "picky.safetensors", micro_sr_cfg(**SR, **{"data.min_stored_size": 256}))
    o = tmp_path / "o"
    cases = [
        (["--sr256", stages["base"], "--data", root], "holds a base stage"),
        (["--sr256", tmp_path / "nope.safetensors", "--data", root], "no checkpoint at"),
        (["--sr256", stages["sr"]], "needs --data DATASET_DIR"),
        (["--sr256", stages["sr"], "--data", tmp_path / "missing"], "does not exist"),
        (["--sr256", stages["sr"], "--data", wide], "d_model 16"),
        (["--sr256", picky, "--data", root], "no holdout images of at least 256 px"),
        (["--sr256", stages["sr"], "--data", root, "--suite", "synthetic"], "score samples drawn from prompts"),
        (["--sr256", stages["sr"], "--data", root, "--aug-level", "2"], "levels in [0, 1]"),
        (["--sr256", stages["sr"], "--data", root, "--sr-n", "0"], "--sr-n must be >= 1"),
        (["--sr256", stages["sr"], "--data", root, "--lowres-noise", "-0.1"], "--lowres-noise is a noise std"),
        (["--sr256", stages["sr"], "--lowres-noise", "0.1"], "--lowres-noise perturbs the held-out low-res"),
    ]
    for argv, fragment in cases:
        code = kiln(["eval", *map(str, argv), "--device", "cpu", "--out-dir", str(o)])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kiln eval: error:") and fragment in lines[0], (argv, err)
    assert not o.exists()
