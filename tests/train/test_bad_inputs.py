"""Issue 12 on the training side: every user mistake a tester found ends in ONE line, never a
traceback, never silent acceptance -- through the real `kiln` CLI, as a subprocess.

    bad dataset / flag / checkpoint   exit 2 (usage) or 1 (failed run), stderr exactly one non-empty
                                      line `kiln <cmd>: error: ...`, no "Traceback", no user file touched
    a corrupt sample in a shard       skipped and counted by reason (truncated tar member, bad image,
                                      pickled / int64 / other-d_model T5 array): the run completes and
                                      its summary and log say how many, why
    Ctrl-C / SIGTERM mid-run          one line ("interrupted" / "terminated"), no temporary file left,
                                      and `--resume` continues from the last complete checkpoint

Datasets are copies of the session's `small_shards` with one thing broken; the stage is tiny-base
shrunk to conftest.MICRO, a few steps. Each case is one or two `python -m pipeline.cli` processes
(~5 s each, mostly importing torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.train.conftest import (
    MICRO,
    SMALL_D_MODEL,
    big_keys,
    corrupt_jpeg,
    keys,
    members,
    npy,
    replace_member,
    truncate_in_member,
    write_members,
)

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = [a for k, v in MICRO.items() for a in ("--override", f"{k}={json.dumps(v)}")]


def kiln(*argv, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KILN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def train_argv(data, workdir, *extra, steps: int = 2, config: str = "tiny-base", overrides=OVERRIDES):
    return ["train", "--config", config, "--data", data, "--workdir", workdir, "--max-steps", steps, *overrides, *extra]


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, code: int, *words: str) -> str:
    """exit `code`, stderr one non-empty line `kiln <command>: error: ...` holding `words`, no traceback."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"kiln {command}: error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    return lines[0]


def snapshot(*roots: Path) -> dict:
    """{path: sha256} of every file under `roots`: a user's files must come out unchanged."""
    out = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in paths:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def temp_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if ".tmp" in p.name)


# -- breaking a copy of the small dataset -------------------------------------------------------------


def copy_dataset(small_shards, dest: Path) -> Path:
    root, _ = small_shards
    shutil.copytree(root, dest)
    return dest


SHARD0 = "shards/000000.tar"


def per_sample_case(name: str, root: Path) -> dict:
    """Break one kind of sample in a copy of the dataset; returns {reason: samples broken}."""
    tar = root / SHARD0
    two = big_keys(tar, 2)
    if name == "truncated tar member":
        # Cut inside the 3rd-from-last sample's T5 member: it and the two samples after it are lost
        # (the manifest says how many the shard held).
        key = keys(tar)[-3]
        truncate_in_member(tar, key, "t5.npy")
        return {"truncated": 3}
    if name == "corrupt jpeg":
        for k in two:
            replace_member(tar, k, "png", corrupt_jpeg(), new_ext="jpg")
        return {"bad_image": 2}
    if name == "pickled t5":
        for k in two:
            replace_member(tar, k, "t5.npy", npy(np.array([{"x": 1}, None], dtype=object), allow_pickle=True))
        return {"t5_pickle": 2}
    if name == "int64 t5":
        for k in two:
            replace_member(tar, k, "t5.npy", npy(np.ones((3, SMALL_D_MODEL), dtype=np.int64)))
        return {"t5_dtype": 2}
    if name == "other d_model":
        for k in two:
            replace_member(tar, k, "t5.npy", npy(np.ones((3, SMALL_D_MODEL * 2), dtype=np.float16)))
        return {"wrong_d_model": 2}
    raise KeyError(name)


# -- per-sample corruption: skipped, counted, the run completes -----------------------------------------


@pytest.mark.parametrize("case", ["truncated tar member", "corrupt jpeg", "pickled t5", "int64 t5", "other d_model"])
def test_a_corrupt_sample_is_skipped_and_counted(small_shards, tmp_path, case):
    data = copy_dataset(small_shards, tmp_path / "data")
    broken = per_sample_case(case, data)
    proc = kiln(*train_argv(data, tmp_path / "run"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 2
    skipped = summary["data"]["skipped"]
    for reason, n in broken.items():
        assert skipped.get(reason) == n, skipped
    assert "skipped" in proc.stdout and all(reason in proc.stdout for reason in broken)  # the log says so too
    assert not temp_files(tmp_path)


# -- a dataset that cannot be trained on: refused before training -------------------------------------


def _no_t5(root: Path):
    for tar in (root / "shards").glob("*.tar"):
        write_members(tar, [(n, d) for n, d in members(tar) if not n.endswith(".t5.npy")])


def _wide_t5(root: Path):
    for tar in (root / "shards").glob("*.tar"):
        write_members(tar, [(n, npy(np.ones((3, 2 * SMALL_D_MODEL), np.float16)) if n.endswith(".t5.npy") else d)
                            for n, d in members(tar)])


def _all_int64(root: Path):
    for tar in (root / "shards").glob("*.tar"):
        write_members(tar, [(n, npy(np.ones((3, SMALL_D_MODEL), np.int64)) if n.endswith(".t5.npy") else d)
                            for n, d in members(tar)])


DATASET_CASES = {
    # name: (how to break a copy of the dataset (None: --data is that path as given), exit code, words)
    "does not exist": (None, 2, ["does not exist"]),
    "not a dataset": (lambda root: [shutil.rmtree(root / "shards"), (root / "manifest.json").unlink()], 2,
                      ["not a kiln dataset"]),
    "a file": (None, 2, ["is a file, not a dataset"]),
    "shard missing": (lambda root: (root / SHARD0).unlink(), 2, ["missing", "re-run"]),
    "made with --t5 off": (_no_t5, 2, ["no T5 arrays", "--t5 off"]),
    "another d_model": (_wide_t5, 2, [f"d_model {2 * SMALL_D_MODEL}", f"unet.text_dim {SMALL_D_MODEL}"]),
    "garbage manifest": (lambda root: (root / "manifest.json").write_text("{not json"), 2, ["manifest.json"]),
    "every sample corrupt": (_all_int64, 1, ["no samples to train on", "t5_dtype"]),
}


@pytest.mark.parametrize("case", list(DATASET_CASES))
def test_a_dataset_that_cannot_be_trained_on_is_one_line(small_shards, tmp_path, case):
    make, code, words = DATASET_CASES[case]
    if case == "does not exist":
        data = tmp_path / "nowhere"
    elif case == "a file":
        data = tmp_path / "data.txt"
        data.write_text("not a dataset\n")
    else:
        data = copy_dataset(small_shards, tmp_path / "data")
        make(data)
    before = snapshot(data) if data.exists() else {}
    proc = kiln(*train_argv(data, tmp_path / "run"))
    assert_one_line_error(proc, "train", code, *words)
    assert (snapshot(data) if data.exists() else {}) == before
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_workdir_that_is_a_file(small_shards, tmp_path):
    root, _ = small_shards
    work = tmp_path / "workdir"
    work.write_text("my notes\n")
    for w in (work, work / "sub"):
        proc = kiln(*train_argv(root, w))
        assert_one_line_error(proc, "train", 2, "--workdir", str(w))
    assert work.read_text() == "my notes\n"


def test_python_m_train_trainer_follows_the_same_rule(tmp_path):
    env = {**os.environ}
    env.pop("KILN_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "train.trainer", "--config", "tiny-base", "--data", tmp_path / "nowhere",
                           "--workdir", tmp_path / "run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert_one_line_error(proc, "train", 2, "does not exist")


def test_bad_flags_are_one_line(small_shards, tmp_path):
    root, _ = small_shards
    proc = kiln(*train_argv(root, tmp_path / "run", "--override", "train.nope=1"))
    assert_one_line_error(proc, "train", 2, "train.nope")
    proc = kiln(*train_argv(root, tmp_path / "run", "--holdout-fraction", "1.5"))
    assert_one_line_error(proc, "train", 2, "--holdout-fraction")


# -- a bad resume source ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(small_shards, tmp_path_factory):
    """A workdir with two complete checkpoints (steps 1 and 2) of the micro tiny-base stage."""
    root, _ = small_shards
    work = tmp_path_factory.mktemp("trained") / "run"
    proc = kiln(*train_argv(root, work, "--override", "train.ckpt_every=1"))
    assert proc.returncode == 0, proc.stderr
    return work


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


RESUME_CASES = {
    "truncated checkpoint": (lambda ck: _truncate(ck / "step_00000002.safetensors"),
                             ["step_00000002.safetensors", "truncated or corrupt", "--resume"]),
    "corrupt train state": (lambda ck: (ck / "step_00000002.state.pt").write_bytes(b"\x00garbage" * 50),
                            ["step_00000002.state.pt", "--resume"]),
    "truncated train state": (lambda ck: _truncate(ck / "step_00000002.state.pt"),
                              ["step_00000002.state.pt", "--resume"]),
    "garbage latest pointer": (lambda ck: (ck / "latest.json").write_text("\x00\x01 garbage"),
                               ["latest.json", "--resume"]),
    "latest names a missing file": (lambda ck: (ck / "latest.json").write_text(
        json.dumps({"step": 9, "weights": "step_00000009.safetensors", "state": "step_00000009.state.pt"})),
        ["step_00000009.safetensors", "missing", "--resume"]),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_a_bad_resume_source_is_one_line(small_shards, trained, tmp_path, case):
    root, _ = small_shards
    work = tmp_path / "run"
    shutil.copytree(trained, work)
    breaks, words = RESUME_CASES[case]
    breaks(work / "checkpoints")
    before = snapshot(work / "checkpoints")
    proc = kiln(*train_argv(root, work, "--resume", steps=4))
    assert_one_line_error(proc, "train", 2, *words)
    assert snapshot(work / "checkpoints") == before and not temp_files(work)


def test_resume_with_another_preset_is_one_line(small_shards, trained, tmp_path):
    root, _ = small_shards
    work = tmp_path / "run"
    shutil.copytree(trained, work)
    before = snapshot(work / "checkpoints")
    sr = OVERRIDES + ["--override", "unet.lowres_cond=true", "--override", "data.lowres_resolution=8"]
    proc = kiln(*train_argv(root, work, "--resume", steps=4, config="tiny-sr", overrides=sr))
    assert_one_line_error(proc, "train", 2, "step_00000002.safetensors", "another unet config", "tiny-base",
                          "--resume")
    assert snapshot(work / "checkpoints") == before


# -- kiln sample / kiln embed-prompts -----------------------------------------------------------------


def test_a_run_in_the_workdir_is_never_started_over(small_shards, trained, tmp_path):
    """Without --resume, a --workdir that holds a run is refused (its checkpoints and config stay)."""
    root, _ = small_shards
    before = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    proc = kiln(*train_argv(root, trained))
    assert_one_line_error(proc, "train", 2, "already holds a training run", "--resume")
    assert {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("extra, fragment", [(["--device", "potato"], "--device"), (["--device", "cuda:7"], "CUDA"),
                                             (["--time-budget-s", "-5"], "--time-budget-s"),
                                             (["--fit-schedule"], "--time-budget-s"),
                                             (["--fit-schedule", "--time-budget-s", "9", "--max-steps", "5"], "--max-steps")])
def test_train_bad_values_are_one_line(small_shards, tmp_path, extra, fragment):
    root, _ = small_shards
    if fragment == "CUDA":
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    proc = kiln(*train_argv(root, tmp_path / "run", *extra))
    assert_one_line_error(proc, "train", 2, fragment)
    assert not (tmp_path / "run").exists()


def test_sample_bad_values_are_one_line(small_shards, trained, tmp_path):
    root, _ = small_shards
    good = trained / "checkpoints" / "step_00000002.safetensors"
    out = tmp_path / "grid.png"
    for extra, fragment in ((["--steps", "0"], "--steps"), (["--steps", "-3"], "--steps"),
                            (["--guidance", "nan", "--steps", "1"], "--guidance"), (["--device", "potato", "--steps", "1"], "--device")):
        proc = kiln("sample", "--base", good, "--from-shards", root, "--out", out, *extra)
        assert_one_line_error(proc, "sample", 2, fragment)
    assert not out.exists()


def test_sample_bad_inputs_are_one_line(small_shards, trained, tmp_path):
    root, _ = small_shards
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07" * 100)
    good = trained / "checkpoints" / "step_00000002.safetensors"
    out = tmp_path / "grid.png"
    proc = kiln("sample", "--base", garbage, "--from-shards", root, "--out", out, "--steps", "1")
    assert_one_line_error(proc, "sample", 2, str(garbage))
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    proc = kiln("sample", "--base", good, "--from-shards", root, "--out", outdir, "--steps", "1")
    assert_one_line_error(proc, "sample", 2, "--out", "is a directory")
    proc = kiln("sample", "--base", good, "--prompts", tmp_path / "none.parquet", "--out", out, "--steps", "1")
    assert_one_line_error(proc, "sample", 2, "none.parquet")
    assert not out.exists() and list(outdir.iterdir()) == [] and not temp_files(tmp_path)


def test_embed_prompts_bad_inputs_are_one_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    # The T5 spec is never loaded: every refusal comes first.
    spec = f"local:{tmp_path / 'no-model'}"
    proc = kiln("embed-prompts", prompts, "-o", outdir, "--t5-model", spec)
    assert_one_line_error(proc, "embed-prompts", 2, "-o", "is a directory")
    proc = kiln("embed-prompts", tmp_path / "missing.txt", "-o", tmp_path / "p.parquet", "--t5-model", spec)
    assert_one_line_error(proc, "embed-prompts", 2, "missing.txt", "does not exist")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un cercle rouge \xe9\n".encode("latin-1"))
    proc = kiln("embed-prompts", latin1, "-o", tmp_path / "p.parquet", "--t5-model", spec)
    assert_one_line_error(proc, "embed-prompts", 2, "latin1.txt", "not UTF-8")
    assert list(outdir.iterdir()) == [] and not (tmp_path / "p.parquet").exists()


# -- Ctrl-C / SIGTERM mid-run ------------------------------------------------------------------------


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupted_training_leaves_no_partial_file_and_resumes(small_shards, tmp_path, sig, code, word):
    root, _ = small_shards
    work = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KILN_DEBUG", None)
    # A checkpoint every step: the signal most likely lands while one is being written.
    every = ["--override", "train.ckpt_every=1", "--override", "train.max_steps=100000"]
    argv = train_argv(root, work, *every, steps=100_000)
    # (SIGINT back to its default first: a shell's background job starts with it ignored, and Python
    # then never installs its KeyboardInterrupt handler.)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    latest = work / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err + out, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kiln train: ") and word in lines[0], err
    assert not temp_files(work)
    pointer = json.loads(latest.read_text())
    ckdir = work / "checkpoints"
    assert (ckdir / pointer["weights"]).is_file() and (ckdir / pointer["state"]).is_file()
    # Every weights file has its state file: no half pair.
    assert {p.name.split(".")[0] for p in ckdir.glob("step_*.safetensors")} == {
        p.name.split(".")[0] for p in ckdir.glob("step_*.state.pt")}

    step = pointer["step"]
    resumed = kiln(*train_argv(root, work, *every, "--resume", steps=step + 2))
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    assert f"at step {step}" in resumed.stdout
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == step + 2
    logged = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged)) and logged[-1] == step + 2  # no step logged twice
    if sig == signal.SIGINT:
        # ... and lands where an uninterrupted run does: the same weights, bit for bit (CPU, fp32).
        from safetensors.numpy import load_file

        straight = kiln(*train_argv(root, tmp_path / "straight", *every, steps=step + 2))
        assert straight.returncode == 0, straight.stderr
        name = f"step_{step + 2:08d}.safetensors"
        a, b = load_file(ckdir / name), load_file(tmp_path / "straight" / "checkpoints" / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
