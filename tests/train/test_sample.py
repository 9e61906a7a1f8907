"""train/sample.py: prompts files, held-out shard prompts, loading a cascade, sampling it, `kiln sample`.

The stages are tiny seeded U-Nets written straight to checkpoints (no training): a 16 px base and
a 16 -> 32 px SR stage reading the 8-dim test "T5". Their zero-initialised output convs are
given random weights, so the text and the noise change what comes out.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tests.train.conftest import SMALL_D_MODEL, micro_cfg, micro_sr_cfg
from train.args import add_sample_args
from train.checkpoint import save_checkpoint
from train.data import holdout_value
from train.errors import UserError
from train.grid import GridLayout
from train.sample import STAGE_NAMES, Stage, load_cascade, load_prompts, main_sample, run_cascade, sample_to_grid, shard_prompts
from train.unet import EfficientUNet

pytestmark = pytest.mark.usefixtures("one_thread")

SR_OVERRIDES = {"data.resolution": 32, "data.lowres_resolution": 16}


def _checkpoint(path, cfg, seed: int):
    torch.manual_seed(seed)
    model = EfficientUNet(cfg.unet)
    with torch.no_grad():
        model.out_conv.weight.normal_(0, 0.05)
    state = model.state_dict()
    return save_checkpoint(path, cfg, 7, state, {k: v.clone() for k, v in state.items()}, {"holdout_fraction": 0.0})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"base": 16 px base stage, "sr": 16 -> 32 px SR stage} checkpoint paths."""
    root = tmp_path_factory.mktemp("stages")
    return {"base": _checkpoint(root / "base.safetensors", micro_cfg(), 0),
            "sr": _checkpoint(root / "sr.safetensors", micro_sr_cfg(**SR_OVERRIDES), 1)}


def prompt_arrays(lengths=(3, 9, 5), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, SMALL_D_MODEL)).astype(np.float16) for n in lengths]


def write_prompts(path, prompts, arrays, *, footer=True, drop=()):
    """A prompts file in `kiln embed-prompts`' format (written with pyarrow, as its docs say)."""
    columns = {"prompt": prompts, "prompt_clean": prompts, "t5_len": pa.array([len(a) for a in arrays], pa.int32()),
               "t5_truncated": [False] * len(prompts), "t5": [a.astype("<f2").tobytes() for a in arrays]}
    table = pa.table({k: v for k, v in columns.items() if k not in drop})
    if footer:
        table = table.replace_schema_metadata({b"kiln.t5": json.dumps({"d_model": SMALL_D_MODEL}).encode()})
    pq.write_table(table, path)
    return path


def sample_args(*argv) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_sample_args(p)
    return p.parse_args([str(a) for a in argv])


# -- prompts --------------------------------------------------------------------------------------


def test_load_prompts_reads_an_embed_prompts_file(tmp_path):
    arrays = prompt_arrays((3, 9))
    path = write_prompts(tmp_path / "p.parquet", ["a red circle", "a blue star"], arrays)
    prompts, got, info = load_prompts(path)
    assert prompts == ["a red circle", "a blue star"] and info == {"d_model": SMALL_D_MODEL}
    assert [a.shape for a in got] == [(3, SMALL_D_MODEL), (9, SMALL_D_MODEL)]
    assert all(a.dtype == np.float16 and np.array_equal(a, b) for a, b in zip(got, arrays))


@pytest.mark.parametrize("case, match", [
    ("no footer", "has no kiln.t5 footer: make it with `kiln embed-prompts`"),
    ("no t5_len", "has no column t5_len: make it with `kiln embed-prompts`"),
    ("no t5", "has no column t5: make it with `kiln embed-prompts`"),
    ("short t5", "prompt 'b' has t5_len 4 but 3 rows"),
])
def test_load_prompts_refuses_a_bad_file(tmp_path, case, match):
    arrays = prompt_arrays((2, 3))
    kwargs = {"no footer": {"footer": False}, "no t5_len": {"drop": ("t5_len",)}, "no t5": {"drop": ("t5",)}}.get(case, {})
    path = write_prompts(tmp_path / "p.parquet", ["a", "b"], arrays, **kwargs)
    if case == "short t5":
        t = pq.read_table(path)
        t = t.set_column(t.schema.get_field_index("t5_len"), "t5_len", pa.array([2, 4], pa.int32()))
        pq.write_table(t, path)
    with pytest.raises(ValueError, match=match):
        load_prompts(path)


def test_shard_prompts_takes_the_first_samples_of_the_split(small_shards):
    root, samples = small_shards
    captions, arrays, records = shard_prompts(root, 3, holdout_fraction=0.0)  # nothing held out: any 3
    assert captions == [s["caption"] for s in samples[:3]]
    assert all(np.array_equal(a, s["t5"]) for a, s in zip(arrays, samples[:3]))
    captions, arrays, records = shard_prompts(root, 4, split="holdout", holdout_fraction=0.3)
    held = [s for s in samples if holdout_value(s["uid"]) < 0.3][:4]
    assert len(held) == 4 and [r.key for r in records] == [s["uid"] for s in held]
    assert captions == [s["caption"] for s in held]
    with pytest.raises(ValueError, match="no holdout samples in .* \\(holdout_fraction 1e-09; skipped: {.other_split.: 24}\\)"):
        shard_prompts(root, 2, split="holdout", holdout_fraction=1e-9)


# -- the cascade ----------------------------------------------------------------------------------


def test_stage_settings_default_to_its_config(checkpoints):
    stage = Stage.load(checkpoints["base"])
    assert stage.step == 7 and not stage.model.training
    assert {k: stage.setting(k) for k in ("guidance_weight", "steps", "sampler", "threshold")} == {
        "guidance_weight": 3.0, "steps": 25, "sampler": "ddim", "threshold": "dynamic"}
    stage = Stage.load(checkpoints["base"], steps=2, guidance_weight=None)  # None: the config's
    assert stage.setting("steps") == 2 and stage.setting("guidance_weight") == 3.0


def test_cascade_shapes_dtype_range_and_determinism(checkpoints):
    arrays = prompt_arrays()
    stages = load_cascade([checkpoints["base"], checkpoints["sr"]], steps=[2, 2], aug_level=[0.25])
    base, sr = run_cascade(stages, arrays, seed=0, batch_size=2)  # two chunks: prompts 0-1, prompt 2
    assert base.shape == (3, 3, 16, 16) and sr.shape == (3, 3, 32, 32)
    assert base.dtype == sr.dtype == torch.float32 and base.device.type == "cpu"
    for images in (base, sr):
        assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
        assert images.std() > 0.05  # not a constant picture
    assert not torch.equal(base[0], base[1])  # other text, other noise: other images

    again = run_cascade(stages, arrays, seed=0, batch_size=2)
    assert torch.equal(again[0], base) and torch.equal(again[1], sr)
    other = run_cascade(stages, arrays, seed=1, batch_size=2)
    assert (other[0] - base).abs().max() > 0.05 and (other[1] - sr).abs().max() > 0.05
    # A prompt's images depend on its own text and its place in its chunk, not on its chunk-mates'.
    swapped = run_cascade(stages, [arrays[0], prompt_arrays((9,), seed=5)[0], arrays[2]], seed=0, batch_size=2)
    assert torch.equal(swapped[0][0], base[0]) and torch.equal(swapped[1][0], sr[0])
    assert torch.equal(swapped[0][2], base[2]) and not torch.equal(swapped[0][1], base[1])


def test_absent_stages_are_skipped(checkpoints):
    """A base-only cascade gives the same base images as the base row of a longer one."""
    arrays = prompt_arrays((4, 6))
    (alone,) = run_cascade(load_cascade([checkpoints["base"]], steps=[2]), arrays, seed=3)
    both = run_cascade(load_cascade([checkpoints["base"], checkpoints["sr"]], steps=[2, 2]), arrays, seed=3)
    assert len(both) == 2 and torch.equal(alone, both[0])


def test_sample_to_grid_writes_a_row_per_stage(checkpoints, tmp_path):
    arrays = prompt_arrays()
    out = sample_to_grid([checkpoints["base"], checkpoints["sr"]], ["a", "b", "c"], arrays, tmp_path / "g.png",
                         device="cpu", steps=[2, 2])
    base, sr = run_cascade(load_cascade([checkpoints["base"], checkpoints["sr"]], steps=[2, 2]), arrays, seed=0)
    layout = GridLayout(rows=2, cols=3, cell=128, labelled=True, caption_lines=4)
    with Image.open(out) as im:
        assert im.size == layout.size
        a = np.asarray(im.convert("RGB"))
    # column 2 of row 1 is prompt 2's SR image, each pixel a 4x4 block (32 -> 128 px, nearest)
    x0, y0, x1, y1 = layout.tile(1, 2)
    want = ((sr[2] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(a[y0:y1:4, x0:x1:4], want)
    x0, y0, x1, y1 = layout.tile(0, 1)
    want = ((base[1] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(a[y0:y1:8, x0:x1:8], want)


@pytest.mark.parametrize("order, match", [
    (("base", "base"), r"the sr256 checkpoint .*base.safetensors holds a base stage \(tiny-base\); "
                       r"sr256 needs a super-resolution stage"),
    (("sr",), r"the base checkpoint .*sr.safetensors holds a sr stage \(tiny-sr\); base needs a base stage"),
    (("base", "sr", "sr", "sr"), "a cascade has 1 to 3 stages"),
])
def test_load_cascade_refuses_a_stage_in_the_wrong_place(checkpoints, order, match):
    with pytest.raises(ValueError, match=match):
        load_cascade([checkpoints[k] for k in order])


def test_run_cascade_refuses_prompts_of_another_encoder(checkpoints):
    stages = load_cascade([checkpoints["base"]], steps=[1])
    wide = [np.zeros((3, SMALL_D_MODEL * 2), np.float16)]
    with pytest.raises(ValueError, match="wants text_dim 8, prompts have d_model 16"):
        run_cascade(stages, wide)
    with pytest.raises(ValueError, match="no prompts"):
        run_cascade(stages, [])


# -- kiln sample ----------------------------------------------------------------------------------


def test_kiln_sample_base_only_from_a_prompts_file(checkpoints, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.parquet", ["a", "b"], prompt_arrays((3, 4)))
    out = tmp_path / "grid.png"
    assert main_sample(sample_args("--base", checkpoints["base"], "--prompts", prompts, "--out", out,
                                   "--steps", "2", "--device", "cpu")) == 0
    assert capsys.readouterr().out.strip() == f"kiln sample: 2 prompts through base; wrote {out}"
    with Image.open(out) as im:
        assert im.size == GridLayout(rows=1, cols=2, cell=128, labelled=True, caption_lines=4).size


@pytest.mark.parametrize("case, match", [
    ("sr256 is a base", "the sr256 checkpoint .* holds a base stage"),
    ("prompts lack t5_len", "has no column t5_len"),
    ("sr1024 without sr256", "--sr1024 needs --sr256"),
    ("missing checkpoint", "no checkpoint at .*nope.safetensors"),
    ("two steps, one stage", r"--steps takes one value or one per stage \(1\), got 2"),
])
def test_kiln_sample_bad_input_is_a_clear_error(checkpoints, tmp_path, case, match):
    good = write_prompts(tmp_path / "p.parquet", ["a"], prompt_arrays((3,)))
    out = tmp_path / "grid.png"
    one_step = ["--steps", "1"]
    argv = {
        "sr256 is a base": ["--base", checkpoints["base"], "--sr256", checkpoints["base"], "--prompts", good, *one_step],
        "prompts lack t5_len": ["--base", checkpoints["base"], *one_step, "--prompts",
                                write_prompts(tmp_path / "bad.parquet", ["a"], prompt_arrays((3,)), drop=("t5_len",))],
        "sr1024 without sr256": ["--base", checkpoints["base"], "--sr1024", checkpoints["sr"], "--prompts", good],
        "missing checkpoint": ["--base", tmp_path / "nope.safetensors", "--prompts", good, *one_step],
        "two steps, one stage": ["--base", checkpoints["base"], "--prompts", good, "--steps", "2", "2"],
    }[case]
    with pytest.raises(UserError, match=match) as info:  # the kiln CLI prints it as one line, exit 2
        main_sample(sample_args(*argv, "--out", out, "--device", "cpu"))
    assert info.value.exit_code == 2
    assert not out.exists()


def test_stage_names_are_the_cli_flags():
    args = sample_args("--base", "b", "--sr256", "s", "--sr1024", "t", "--prompts", "p", "--out", "o")
    assert [getattr(args, n) for n in STAGE_NAMES] == ["b", "s", "t"]


# -- kiln sample --out-dir ------------------------------------------------------------------------------


def _u8(image: torch.Tensor) -> np.ndarray:
    return ((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def test_out_dir_holds_every_image_of_every_stage_and_an_index(checkpoints, tmp_path, capsys):
    from train.sample import SAMPLES_SCHEMA, read_sample_dir

    arrays = prompt_arrays()
    prompts = write_prompts(tmp_path / "p.parquet", ["a", "b", "c"], arrays)
    out, grid = tmp_path / "samples", tmp_path / "grid.png"
    assert main_sample(sample_args("--base", checkpoints["base"], "--sr256", checkpoints["sr"], "--prompts", prompts,
                                   "--out-dir", out, "--per-prompt", "2", "--out", grid, "--steps", "2", "2",
                                   "--guidance", "4", "1", "--batch-size", "2", "--seed", "5", "--device", "cpu")) == 0
    assert capsys.readouterr().out.strip() == (f"kiln sample: 3 prompts x 2 through base -> sr256; wrote 12 images and "
                                               f"{out / 'samples.parquet'}, and {grid}")
    table = pq.read_table(out / "samples.parquet")
    assert table.schema.remove_metadata() == SAMPLES_SCHEMA
    d = read_sample_dir(out)
    assert d.info["complete"] and d.info["per_prompt"] == 2 and d.info["seed"] == 5
    assert [(s["stage"], s["guidance_weight"], s["resolution"], s["step"]) for s in d.info["stages"]] == [
        ("base", 4.0, 16, 7), ("sr256", 1.0, 32, 7)]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == sorted(r["path"] for r in d.rows)
    assert len(d.rows) == 12 and {r["category"] for r in d.rows} == {None}
    row = next(r for r in d.rows if (r["prompt_index"], r["sample_index"], r["stage"]) == (2, 1, "sr256"))
    assert row == {"prompt_index": 2, "sample_index": 1, "prompt": "c", "category": None, "seed": 6, "stage": "sr256",
                   "width": 32, "height": 32, "guidance": 1.0, "steps": 2, "sampler": "ddim",
                   "checkpoint": str(checkpoints["sr"]), "checkpoint_step": 7, "path": "sr256/000002-001.png"}
    # Sample k is what `--seed SEED+k` gives, sampled piecewise exactly as in one go.
    stages = load_cascade([checkpoints["base"], checkpoints["sr"]], steps=[2, 2], guidance=[4, 1])
    for k in (0, 1):
        base, sr = run_cascade(stages, arrays, seed=5 + k, batch_size=2)
        for p in range(3):
            for stage, images in (("base", base), ("sr256", sr)):
                with Image.open(out / f"{stage}/{p:06d}-{k:03d}.png") as im:
                    np.testing.assert_array_equal(np.asarray(im), _u8(images[p]))
    # ... and the grid beside them is the one `--out` alone writes.
    alone = sample_to_grid([checkpoints["base"], checkpoints["sr"]], ["a", "b", "c"], arrays, tmp_path / "alone.png",
                           device="cpu", steps=[2, 2], guidance=[4, 1], seed=5, batch_size=2)
    with Image.open(grid) as a, Image.open(alone) as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_out_dir_never_writes_over_the_users_files(checkpoints, tmp_path):
    from train.sample import SAMPLES_FILE, read_sample_dir

    prompts = write_prompts(tmp_path / "p.parquet", ["a", "b"], prompt_arrays((3, 4)))

    def run(out, *extra):
        return main_sample(sample_args("--base", checkpoints["base"], "--prompts", prompts, "--out-dir", out, "--steps",
                                       "1", "--device", "cpu", *extra))

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.png").write_bytes(b"mine")
    with pytest.raises(UserError, match="is not empty and was not written by `kiln sample`") as info:
        run(foreign)
    assert info.value.exit_code == 2 and [p.name for p in foreign.iterdir()] == ["holiday.png"]

    out = tmp_path / "samples"
    assert main_sample(sample_args("--base", checkpoints["base"], "--sr256", checkpoints["sr"], "--prompts", prompts,
                                   "--out-dir", out, "--steps", "1", "--device", "cpu")) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="holds an earlier `kiln sample` output: pass --overwrite"):
        run(out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (out / "notes.txt").write_text("mine")
    assert run(out, "--overwrite", "--seed", "1") == 0  # base only now: the sr256 images go, the notes stay
    assert (out / "notes.txt").read_text() == "mine" and not (out / "sr256").exists()
    assert sorted(p.name for p in (out / "base").iterdir()) == ["000000-000.png", "000001-000.png"]
    assert read_sample_dir(out).info["seed"] == 1

    # An interrupted run (its index still marked incomplete) is redone by the same command.
    table = pq.read_table(out / SAMPLES_FILE)
    info = json.loads(table.schema.metadata[b"kiln.samples"])
    pq.write_table(table.replace_schema_metadata({b"kiln.samples": json.dumps({**info, "complete": False}).encode()}),
                   out / SAMPLES_FILE)
    (out / "base" / "000001-000.png").unlink()
    with pytest.raises(UserError, match="holds an interrupted `kiln sample` run"):
        read_sample_dir(out)
    assert run(out) == 0 and read_sample_dir(out).info["complete"]

    # A file of the user's where the new run would write, and not in kiln's list: refused, nothing deleted.
    (out / "base" / "000002-000.png").write_bytes(b"mine")
    three = write_prompts(tmp_path / "p3.parquet", ["a", "b", "c"], prompt_arrays((3, 4, 5)))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds base/000002-000.png, which kiln did not write"):
        main_sample(sample_args("--base", checkpoints["base"], "--prompts", three, "--out-dir", out, "--steps", "1",
                                "--device", "cpu", "--overwrite"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("argv, match", [
    (["--per-prompt", "2", "--out", "g.png"], "--per-prompt needs --out-dir"),
    (["--out-dir", "d", "--per-prompt", "0"], "--per-prompt must be >= 1"),
    ([], "nothing to write: give --out GRID.png, --out-dir DIR, or both"),
])
def test_out_dir_flags(checkpoints, tmp_path, argv, match):
    with pytest.raises(UserError, match=match):
        main_sample(sample_args("--base", checkpoints["base"], "--prompts", tmp_path / "p.parquet", *argv))


def test_a_sample_dir_is_read_only_by_the_names_kiln_writes(checkpoints, tmp_path):
    """kiln eval reads the PNGs samples.parquet lists: a listed path that leads elsewhere is refused."""
    from train.sample import SAMPLES_FILE, read_sample_dir

    prompts = write_prompts(tmp_path / "p.parquet", ["a"], prompt_arrays((3,)))
    out = tmp_path / "samples"
    assert main_sample(sample_args("--base", checkpoints["base"], "--prompts", prompts, "--out-dir", out, "--steps", "1",
                                   "--device", "cpu")) == 0
    table = pq.read_table(out / SAMPLES_FILE)
    bad = table.set_column(table.schema.get_field_index("path"), "path", pa.array(["../p.parquet"]))
    pq.write_table(bad.replace_schema_metadata(table.schema.metadata), out / SAMPLES_FILE)
    with pytest.raises(UserError, match="lists '../p.parquet', not a STAGE/PPPPPP-SSS.png that kiln writes"):
        read_sample_dir(out)


def test_threshold_flag_reaches_every_stage(checkpoints, tmp_path):
    """`kiln sample --threshold static|none|dynamic`: every stage samples with it and the index says so."""
    from train.sample import read_sample_dir

    arrays = prompt_arrays((3, 4))
    prompts = write_prompts(tmp_path / "p.parquet", ["a", "b"], arrays)
    outs = {}
    for mode in ("static", "none"):
        out = tmp_path / mode
        assert main_sample(sample_args("--base", checkpoints["base"], "--sr256", checkpoints["sr"], "--prompts", prompts,
                                       "--out-dir", out, "--steps", "2", "--guidance", "8", "--threshold", mode,
                                       "--device", "cpu")) == 0
        assert [s["threshold"] for s in read_sample_dir(out).info["stages"]] == [mode, mode]
        stages = load_cascade([checkpoints["base"], checkpoints["sr"]], steps=[2, 2], guidance=[8, 8], threshold=mode)
        base, _ = run_cascade(stages, arrays, seed=0)
        with Image.open(out / "base/000000-000.png") as im:
            np.testing.assert_array_equal(np.asarray(im), _u8(base[0]))
        outs[mode] = base
    # Untrained weights at w=8 overshoot [-1, 1]: clipping x0 each step changes the trajectory.
    assert not torch.equal(outs["static"], outs["none"])
