"""`kiln eval` (train/eval.py, pipeline/evaluation.py) and the synthetic suite's pixel scorer (train/evaluate.py).

- the grammar copied into train/evaluate.py is the synthetic web's: every caption the web writes
  parses back to the scene it drew, and re-describes to the same words;
- the scorer, on the web's own drawings (pipeline.testbed.synth renders them: tests may import
  anything), scores 100% in every category, and about its chance level when the captions are
  shuffled among scenes of the same size;
- prompt files (DrawBench CSV, PartiPrompts TSV, one per line) and their mistakes, by line;
- `kiln eval` end to end on a micro tiny-base trained a few steps on `small_shards` (16 px, 8-dim
  "T5" arrays): a 2-weight guidance sweep of the synthetic suite with CLIP score and FID/KID from
  the tiny local CLIP (pipeline.evalmetrics), a DrawBench-style prompt file, scoring existing sample
  directories, the --write-prompts / `kiln embed-prompts` round trip with the tiny T5, the held-out
  rule, and bad inputs as one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.testbed import synth
from tests.train.conftest import micro_cfg, replace_member
from tests.train.test_sample import _checkpoint, prompt_arrays, write_prompts
from train.args import add_eval_args
from train.eval import (
    check_eval_dir,
    read_prompt_file,
    score_synthetic,
    synthetic_suite,
    training_combinations,
    wilson_interval,
)
from train.evaluate import (
    CATEGORIES,
    COLOURS,
    PLAIN,
    SHAPES,
    TEMPLATES,
    Scene,
    ShapeSpec,
    categories_of,
    describe,
    parse_caption,
    scene_key,
)
from train.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]


# -- the web's grammar and drawings -----------------------------------------------------------------


def planner(seed: int) -> synth._Planner:
    return synth._Planner(random.Random(seed), "http://127.0.0.1:1", (1, 2, 3), 64, None, ("png",))


def truth_scene(bg: str, shapes: list[dict], desc: str) -> Scene:
    """What the web drew, as a Scene in its caption's order (the caption names the shapes in an
    order of its own choosing; match them by colour, which is unique in a scene)."""
    parsed = parse_caption(desc)
    by_colour = {s["colour"]: s for s in shapes}
    return Scene(bg, tuple(ShapeSpec(by_colour[s.colour]["shape"], s.colour, by_colour[s.colour]["position"])
                           for s in parsed.shapes), parsed.size)


def drawn(seed: int, n: int, side: int = 64, render: int = 256):
    """n (uint8 image, caption) pairs: the web's own scenes on a square canvas, drawn at `render`
    px and box-downsampled to `side` (as the pipeline and the trainer shrink training images)."""
    p = planner(seed)
    out = []
    for _ in range(n):
        bg, shapes, desc = p.scene(render, render)
        img = synth._Picture(render, render, bg, tuple(shapes), "png", 90).render()
        out.append((np.asarray(img.resize((side, side), Image.Resampling.BOX)), desc, bg, shapes))
    return out


def test_grammar_copies_equal_the_web():
    assert TEMPLATES == synth._TEMPLATES and PLAIN == synth._PLAIN
    assert COLOURS == synth.COLOURS and SHAPES == synth.SHAPES


def test_every_web_caption_parses_back_to_its_scene():
    p = planner(1)
    sizes = [(200, 200), (300, 180), (160, 260)]  # square, landscape (rows left to right), portrait (top to bottom)
    forms_seen = set()
    for i in range(1500):
        w, h = sizes[i % 3]
        bg, shapes, desc = p.scene(w, h, (0, 1, 2, 3)[i % 4])
        scene = parse_caption(desc)
        assert scene is not None, desc
        assert describe(scene) == desc
        assert scene.background == bg
        assert sorted((s.shape, s.colour, s.position) for s in scene.shapes) == sorted(
            (s["shape"], s["colour"], s["position"]) for s in shapes), desc
        for caption in synth.caption_forms(desc):  # every template, capitalised or not
            assert parse_caption(caption) == scene, caption
        forms_seen.add(desc.split(" on a")[0].split()[-1] if len(shapes) == 3 else len(shapes))
    assert {"right", "bottom"} <= forms_seen  # rows of three both ways were drawn and read


@pytest.mark.parametrize("text", [
    "a cat", "", "a red circle", "a red circle on the left on a red background",  # colours must differ
    "a orange star at the top on a blue background",  # the web writes "an orange"
    "a red circle on the left of a blue square",  # no background
    "a red circle on the left on a blue background, 4k",  # no such template
])
def test_parse_caption_refuses_what_is_not_the_grammar(text):
    assert parse_caption(text) is None


def test_categories_of_each_scene_size():
    one = parse_caption("a red circle on the left on a white background")
    two = parse_caption("a red circle above a blue star on a white background")
    three = parse_caption("a red circle, a blue star and a green square from left to right on a white background")
    assert categories_of(one) == ("colour", "background", "position", "count", "shape")
    assert categories_of(two) == ("background", "relation", "count")
    assert categories_of(three) == ("background", "count")
    assert two.shapes[0].position == "top" and two.shapes[1].position == "bottom"
    assert [s.position for s in three.shapes] == ["left", "center", "right"]


def test_suite_draws_distinct_held_out_combinations():
    full = synthetic_suite(40, seed=3)
    assert [s.n_shapes for s in full] == [1] * 40 + [2] * 40 + [3] * 40
    assert len({scene_key(s) for s in full}) == 120
    assert all(parse_caption(describe(s)) == s for s in full)
    assert synthetic_suite(40, seed=3) == full and synthetic_suite(40, seed=4) != full
    exclude = {scene_key(s) for s in full[::2]}
    held = synthetic_suite(40, seed=3, exclude=exclude)
    assert len(held) == 120 and not {scene_key(s) for s in held} & exclude


# -- the pixel scorer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web_drawings():
    return drawn(seed=0, n=300, side=64)


def test_every_category_scores_100_percent_on_the_webs_drawings(web_drawings):
    images = [d[0] for d in web_drawings]
    scenes = [parse_caption(d[1]) for d in web_drawings]
    result = score_synthetic(images, scenes)
    cats = result["categories"]
    assert set(cats) == set(CATEGORIES)
    for name, c in cats.items():
        assert c["accuracy"] == 1.0, (name, c)
        assert c["n"] >= 80 if name not in ("background", "count") else c["n"] == 300
    assert result["mean_accuracy"] == 1.0
    assert cats["colour"]["ci95"][0] > 0.95


def test_at_32_px_only_the_shape_kind_loses_a_little():
    """The tiny base stage draws 32 px: the smallest stars there are ~10 px wide."""
    pairs = drawn(seed=5, n=240, side=32)
    result = score_synthetic([d[0] for d in pairs], [parse_caption(d[1]) for d in pairs])["categories"]
    assert all(result[c]["accuracy"] == 1.0 for c in CATEGORIES if c != "shape"), result
    assert result["shape"]["accuracy"] >= 0.93, result["shape"]


def derange(idx: list[int], rng: random.Random) -> list[int]:
    """A random permutation of idx that moves every element (~1 in e tries)."""
    perm = list(idx)
    while any(a == b for a, b in zip(idx, perm)):
        rng.shuffle(perm)
    return perm


def test_shuffled_captions_score_about_chance(web_drawings):
    """Every image scored against another scene's caption -- of any size for background and count,
    of its own size for the rest (so the caption still falls in that category) -- drops to about
    the category's chance level, and that sits where the grammar puts it."""
    images = [d[0] for d in web_drawings]
    scenes = [parse_caption(d[1]) for d in web_drawings]
    chance = {c: v["chance"] for c, v in score_synthetic(images, scenes)["categories"].items()}
    rng = random.Random(0)
    any_size = [scenes[j] for j in derange(list(range(len(scenes))), rng)]
    same_size = list(scenes)
    for n in (1, 2, 3):
        idx = [i for i, s in enumerate(scenes) if s.n_shapes == n]
        for i, j in zip(idx, derange(idx, rng)):
            same_size[i] = scenes[j]
    result = {**score_synthetic(images, same_size)["categories"],
              **{c: v for c, v in score_synthetic(images, any_size)["categories"].items() if c in ("background", "count")}}
    assert set(result) == set(CATEGORIES)
    for c, v in result.items():
        bound = 4 * np.sqrt(max(chance[c], 0.02) * (1 - chance[c]) / v["n"]) + 0.02
        assert abs(v["accuracy"] - chance[c]) <= bound, (c, v["accuracy"], chance[c])
        assert v["accuracy"] < 0.5, (c, v)
    # the chance levels a text-blind drawer of the web's scenes would get
    assert 0.06 < chance["colour"] < 0.2 and 0.06 < chance["background"] < 0.18  # ~1/8, ~1/9
    assert 0.15 < chance["shape"] < 0.35 and 0.25 < chance["count"] < 0.42  # ~1/4, ~1/3
    assert 0.15 < chance["position"] < 0.45  # 1/5, plus corners that read as two positions
    assert chance["relation"] < 0.05  # both named colours, in the named order


def test_saturation_counts_clipped_channel_values():
    from train.eval import saturation

    a = np.full((4, 4, 3), 128, np.uint8)
    b = a.copy()
    b[:2] = 255  # half the values at the top
    b[2, :, 0] = 0  # and 4 more of 48 at the bottom
    s = saturation([a, Image.fromarray(b)])
    assert s["images"] == 2 and s["fraction"] == pytest.approx((0 + 28 / 48) / 2)
    assert s["ci95"][0] <= s["fraction"] <= s["ci95"][1]


def test_wilson_interval():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert all(np.isnan(wilson_interval(0, 0)))


# -- prompt files ------------------------------------------------------------------------------------------


def test_drawbench_csv_parti_tsv_and_plain_lines(tmp_path):
    csv_file = tmp_path / "drawbench.csv"
    csv_file.write_text('Prompts,Category\nA red colored car.,Colors\n"A horse riding an astronaut, on Mars.",Conflicting\n'
                        '\n"A sign that says ""Deep Learning"".",Text\n', encoding="utf-8")
    prompts, kind = read_prompt_file(csv_file)
    assert kind == "drawbench"
    assert [(p.text, p.category) for p in prompts] == [
        ("A red colored car.", "Colors"), ("A horse riding an astronaut, on Mars.", "Conflicting"),
        ('A sign that says "Deep Learning".', "Text")]
    tsv = tmp_path / "PartiPrompts.tsv"
    tsv.write_text('Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\n'
                   'a "quoted" word, with comma\tWorld Knowledge\tBasic\tnote\n', encoding="utf-8")
    prompts, kind = read_prompt_file(tsv)
    assert kind == "parti"
    assert [(p.text, p.category) for p in prompts] == [("bond", "Abstract"),
                                                       ('a "quoted" word, with comma', "World Knowledge")]
    lines = tmp_path / "mine.txt"
    lines.write_bytes("\ufeffa red circle\r\n\r\n  a blue star  \n".encode("utf-8"))
    prompts, kind = read_prompt_file(lines)
    assert kind == "lines" and [(p.text, p.category) for p in prompts] == [("a red circle", "all"), ("a blue star", "all")]


@pytest.mark.parametrize("name, content, match", [
    ("d.csv", "Prompts,Category\nok,A\nonly one field\n", "line 3 has 1 field"),
    ("d.csv", 'Prompts,Category\nok,A\n"two\nlines",B\n', "line 3: the prompt spans several lines"),
    ("d.csv", "Prompts,Category\n,A\n", "line 2 has an empty prompt"),
    ("d.csv", "a red circle,A\n", r"line 1 is not a header; a \.csv prompt file starts with Prompts,Category"),
    ("p.tsv", "Prompt\tCategory\nfine\tA\nno tab here\n", "line 3 has 1 tab-separated fields"),
    ("p.txt", b"fine\nbad \xff byte\n", "line 2 is not UTF-8"),
    ("p.txt", "\n  \n", "holds no prompts"),
    ("d.csv", "Prompts,Category\n", "holds a header but no prompts"),
])
def test_prompt_file_mistakes_name_the_line(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(UserError, match=match) as info:
        read_prompt_file(path)
    assert info.value.exit_code == 2


# -- kiln eval end to end ---------------------------------------------------------------------------------


def eval_args(*argv) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_eval_args(p)
    return p.parse_args([str(a) for a in argv])


def run_eval(*argv) -> int:
    from pipeline.evaluation import main_eval

    return main_eval(eval_args(*argv))


@pytest.fixture(scope="module")
def trained_base(small_shards, tmp_path_factory):
    """The micro tiny-base (16 px, 8-dim text) trained 3 steps on small_shards, 30% held out."""
    from train.checkpoint import latest_checkpoint
    from train.trainer import Trainer

    root, _ = small_shards
    work = tmp_path_factory.mktemp("eval_base")
    Trainer(micro_cfg(), root, work, log=None, holdout_fraction=0.3).train(max_steps=3)
    return latest_checkpoint(work)[0]


@pytest.fixture(scope="module")
def tiny_clip():
    from pipeline.testbed.models import cached_test_models

    return cached_test_models()["clip"]


@pytest.fixture(scope="module")
def suite_prompts(tmp_path_factory):
    """The synthetic suite (3 per scene size) as an embed-prompts file of random 8-dim "T5" arrays
    (the micro stage's text width; the real round trip with the tiny T5 is tested below)."""
    texts = [describe(s) for s in synthetic_suite(3, seed=0)]
    path = tmp_path_factory.mktemp("suite") / "suite.parquet"
    return write_prompts(path, texts, prompt_arrays([3 + i % 4 for i in range(len(texts))], seed=1)), texts


def test_kiln_eval_sweeps_guidance_on_the_synthetic_suite(trained_base, suite_prompts, small_shards, tiny_clip,
                                                          tmp_path, capsys):
    root, _ = small_shards
    prompts, texts = suite_prompts
    out = tmp_path / "eval"
    assert run_eval("--base", trained_base, "--prompts", prompts, "--suite", "synthetic", "--guidance", "1,4",
                    "--steps", "3", "--device", "cpu", "--out-dir", out, "--data", root,
                    "--clip", f"local:{tiny_clip}", "--features", f"clip:local:{tiny_clip}", "--kid-subsets", "10") == 0
    printed = capsys.readouterr().out
    assert "w=1: 9 images; colour" in printed and "w=4: 9 images" in printed and "CLIP score" in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["format"] == "kiln-eval/1" and report["complete"] and report["suite"] == "synthetic"
    assert [r["guidance"] for r in report["runs"]] == [1.0, 4.0]
    assert report["held_out"]["checked"] and report["held_out"]["excluded_prompts"] == 0  # small_shards: no grammar
    assert report["reference"]["split"] == "holdout" and report["reference"]["holdout_fraction"] == 0.3
    for run, w in zip(report["runs"], ("1", "4")):
        assert run["samples"] == f"samples/w{w}" and run["images"] == 9 and run["stage"] == "base"
        assert run["threshold"] == "dynamic" and 0 <= run["saturation"]["fraction"] <= 1  # the config's
        assert run["saturation"]["images"] == 9
        cats = run["synthetic"]["categories"]
        assert set(cats) == set(CATEGORIES)
        assert cats["count"]["n"] == 9 and cats["colour"]["n"] == 3 and cats["relation"]["n"] == 3
        for c in cats.values():
            assert 0 <= c["ci95"][0] <= c["accuracy"] <= c["ci95"][1] <= 1 and 0 <= c["chance"] <= 1
        assert run["clip_score"]["n"] == 9 and 0 <= run["clip_score"]["mean"] <= 100
        assert np.isfinite(run["fid"]) and run["fid"] >= 0 and run["kid"]["subsets"] == 10
        samples = json.loads(json.dumps(run))  # eval.json is strict JSON
        assert samples["prompts"] == 9
        # the samples are a `kiln sample --out-dir` directory at that weight
        from train.sample import read_sample_dir

        d = read_sample_dir(out / run["samples"])
        assert d.info["stages"][0]["guidance_weight"] == float(w) and {r["prompt"] for r in d.rows} == set(texts)
    assert report["plots"] == {"fid_vs_clip": "plots/fid_vs_clip.png",
                               "accuracy_vs_guidance": "plots/accuracy_vs_guidance.png"}
    for rel in report["plots"].values():
        with Image.open(out / rel) as im:
            assert im.format == "PNG" and im.size[0] > 300
    html = (out / "report.html").read_text()
    srcs = [s.split("'")[0] for s in html.split("src='")[1:]]
    assert srcs and all(not s.startswith("/") and (out / s).is_file() for s in srcs)  # relative, and there
    assert all(f"<h3>{c}</h3>" in html for c in CATEGORIES) and "<script" not in html and "http" not in html

    # A second run into the same directory: refused without --overwrite, replaced with it.
    with pytest.raises(UserError, match="holds an earlier `kiln eval` output: pass --overwrite"):
        run_eval("--base", trained_base, "--prompts", prompts, "--suite", "synthetic", "--out-dir", out)
    (out / "notes.txt").write_text("mine")
    assert run_eval("--base", trained_base, "--prompts", prompts, "--suite", "synthetic", "--steps", "2", "--device",
                    "cpu", "--out-dir", out, "--overwrite", "--threshold", "static") == 0
    again = json.loads((out / "eval.json").read_text())
    assert [r["guidance"] for r in again["runs"]] == [3.0]  # the config's weight: one run
    assert again["runs"][0]["threshold"] == "static" and again["settings"]["threshold"] == "static"
    from train.sample import read_sample_dir

    assert read_sample_dir(out / again["runs"][0]["samples"]).info["stages"][0]["threshold"] == "static"
    assert (out / "notes.txt").read_text() == "mine" and not (out / "samples" / "w1").exists()
    assert not (out / "plots" / "fid_vs_clip.png").exists()  # no CLIP / FID this time
    assert "held-out NOT checked (no --data)" in capsys.readouterr().out


def test_kiln_eval_scores_sample_dirs_with_a_prompt_file(trained_base, tiny_clip, tmp_path):
    """DrawBench-style categories; `kiln sample --out-dir` directories scored as they are."""
    from train.sample import main_sample
    from tests.train.test_sample import sample_args

    csv_file = tmp_path / "bench.csv"
    csv_file.write_text("Prompts,Category\nA red car.,Colors\nA blue car.,Colors\nTwo cats.,Counting\n")
    prompts = write_prompts(tmp_path / "bench.parquet", ["A red car.", "A blue car.", "Two cats."], prompt_arrays((3, 4, 5)))
    dirs = []
    for w in ("1", "2"):
        d = tmp_path / f"w{w}"
        assert main_sample(sample_args("--base", trained_base, "--prompts", prompts, "--out-dir", d, "--per-prompt", "2",
                                       "--guidance", w, "--steps", "2", "--device", "cpu")) == 0
        dirs.append(d)
    out = tmp_path / "eval"
    assert run_eval(*dirs, "--prompt-file", csv_file, "--clip", f"local:{tiny_clip}", "--out-dir", out) == 0
    report = json.loads((out / "eval.json").read_text())
    assert [r["guidance"] for r in report["runs"]] == [1.0, 2.0] and report["suite"] is None
    clip = report["runs"][0]["clip_score"]
    assert clip["n"] == 6 and {c: v["n"] for c, v in clip["categories"].items()} == {"Colors": 4, "Counting": 2}
    assert "plots" in report and report["plots"] == {}  # no FID, no suite: nothing to plot
    html = (out / "report.html").read_text()
    assert "<h3>Colors</h3>" in html and "<h3>Counting</h3>" in html
    assert "src='../w1/base/000000-000.png'" in html  # relative links to the sample directories


def test_write_prompts_then_embed_with_the_runs_t5_then_eval(small_shards, tmp_path, capsys):
    """The two-step flow with the real (tiny) T5: `--write-prompts` names the T5 of --data's
    stats.json; `kiln embed-prompts` with that command; `kiln eval` samples them. Captions in the
    data that are suite combinations are left out of the suite."""
    from pipeline.cli import main as kiln
    from pipeline.testbed.models import cached_test_models
    from tests.train.conftest import keys

    root, _ = small_shards
    data = tmp_path / "data"
    shutil.copytree(root, data)
    t5 = cached_test_models()["t5"]
    (data / "stats.json").write_text(json.dumps({"models": {"t5": {"spec": f"local:{t5}", "max_length": 16}}}))
    taken = [describe(s) for s in synthetic_suite(2, seed=7)[:2]]  # two suite scenes, as training captions
    tar = data / "shards" / "000000.tar"
    for key, caption in zip(keys(tar), taken):
        replace_member(tar, key, "txt", caption.encode())
    assert training_combinations(data)[0] == {scene_key(parse_caption(c)) for c in taken}

    suite_txt = tmp_path / "suite.txt"
    assert kiln(["eval", "--suite", "synthetic", "--suite-n", "2", "--seed", "7", "--data", str(data),
                 "--write-prompts", str(suite_txt)]) == 0
    printed = capsys.readouterr().out
    command = next(line.strip() for line in printed.splitlines() if line.strip().startswith("kiln embed-prompts"))
    assert command == f"kiln embed-prompts {suite_txt} -o {tmp_path / 'suite.parquet'} --t5-model local:{t5} --t5-max-length 16"
    written = suite_txt.read_text().splitlines()
    assert len(written) == 6 and not set(written) & set(taken)  # held out: the data's two are not drawn
    assert kiln(command.split()[1:]) == 0

    d_model = json.loads((Path(t5) / "config.json").read_text())["d_model"]
    base = _checkpoint(tmp_path / "base64.safetensors", micro_cfg(**{"unet.text_dim": d_model}), 0)
    out = tmp_path / "eval"
    assert kiln(["eval", "--base", str(base), "--prompts", str(tmp_path / "suite.parquet"), "--suite", "synthetic",
                 "--data", str(data), "--steps", "2", "--device", "cpu", "--out-dir", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["runs"][0]["prompts"] == 6 and report["held_out"]["excluded_prompts"] == 0

    # The same suite scored against data that HAS two of its combinations: those two are left out.
    tar2 = data / "shards" / "000001.tar"
    for key, caption in zip(keys(tar2), written[:1] + written[3:4]):
        replace_member(tar2, key, "txt", caption.encode())
    again = tmp_path / "eval2"
    assert kiln(["eval", str(out / "samples" / "w3"), "--suite", "synthetic", "--data", str(data),
                 "--out-dir", str(again)]) == 0
    report = json.loads((again / "eval.json").read_text())
    assert report["held_out"]["excluded_prompts"] == 2 and report["runs"][0]["prompts"] == 4


def test_bad_inputs_are_one_line(trained_base, suite_prompts, tmp_path, capsys):
    from pipeline.cli import main as kiln

    prompts, _ = suite_prompts
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("Prompts,Category\nfine,A\nno category\n")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.png").write_bytes(b"not mine")
    cases = [
        (["eval", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "o")], "does not exist"),
        (["eval", str(foreign), "--out-dir", str(tmp_path / "o")], "samples.parquet is missing"),
        (["eval", "--suite", "drawbench", "--write-prompts", str(tmp_path / "s.txt")], "unknown suite 'drawbench'"),
        (["eval", "--prompt-file", str(bad_csv), "--write-prompts", str(tmp_path / "s.txt")], "bad.csv: line 3 has 1 field"),
        (["eval", "--base", str(trained_base), "--prompts", str(prompts), "--fid", "--out-dir", str(tmp_path / "o")],
         "--fid needs --features"),
        (["eval", "--base", str(trained_base), "--prompts", str(prompts), "--features", "inception:x.pth",
          "--out-dir", str(tmp_path / "o")], "need --data"),
        (["eval", "--base", str(trained_base), "--suite", "synthetic", "--out-dir", str(tmp_path / "o")],
         "kiln embed-prompts"),
        (["eval", "--base", str(trained_base), "--prompts", str(prompts), "--out-dir", str(foreign)],
         "is not empty and was not written by `kiln eval`"),
        (["eval", "--base", str(trained_base), "--prompts", str(prompts), "--guidance", "1,x", "--out-dir", "o"],
         "comma-separated numbers"),
    ]
    for argv, fragment in cases:
        try:
            code = kiln(argv)
        except SystemExit as exit:  # argparse's own usage errors (one line too: pipeline.cli.OneLineParser)
            code = exit.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kiln eval: error:") and fragment in lines[0], (argv, err)
    assert not (tmp_path / "o").exists() and [p.name for p in foreign.iterdir()] == ["x.png"]
    # ... and through the installed command line, as a user sees it
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", str(foreign), "--out-dir", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_check_eval_dir_keeps_other_files(tmp_path):
    assert check_eval_dir(tmp_path / "new") == [] and check_eval_dir(tmp_path) == []
    (tmp_path / "eval.json").write_text(json.dumps({"format": "kiln-eval/1", "complete": False,
                                                    "files": ["report.html", "../../etc/passwd", "plots/a.png"]}))
    (tmp_path / "report.html").write_text("x")
    # an interrupted eval is redone without --overwrite; only its own, well-formed names are listed
    assert sorted(p.name for p in check_eval_dir(tmp_path)) == ["eval.json", "report.html"]
