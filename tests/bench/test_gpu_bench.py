"""bench/gpu.py: its --tiny run produces every figure it promises (no timed assertions), and its
helpers (GPU peak table, Beam token batching) do what the figures rest on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.gpu import beam_token_batches, peak_for  # noqa: E402


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0), ("Tesla T4", None),
])
def test_peak_table(name, tflops):
    assert peak_for(name) == tflops


def test_beam_token_batches_fill_greedily_under_the_budget():
    sizes = [5, 60, 3, 128, 1, 1, 40, 90, 7, 128, 128, 2]
    records = [{"n": s} for s in sizes]
    batches = beam_token_batches(records, lambda r: r["n"], 130)
    assert [r for b in batches for r in b] == records  # every record once, in order
    for b, nxt in zip(batches, batches[1:]):
        total = sum(r["n"] for r in b)
        assert total <= 130 and total + nxt[0]["n"] > 130  # closed only when the next would not fit
    assert sum(r["n"] for r in batches[-1]) <= 130


def test_tiny_run_reports_every_field(tmp_path):
    out = tmp_path / "tiny.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["tiny"] is True and res["parts"] == ["t5", "clip", "train", "loader"]
    t5 = res["t5"]
    assert t5["captions"] == 256 and t5["flops_per_real_token"] > 0
    assert 14 < t5["length_distribution"]["mean"] < 18 and t5["length_distribution"]["median"] == 12
    for mode in ("records", "tokens"):
        row = t5["modes"][mode]
        for key in ("captions_per_s", "real_tokens_per_s", "achieved_tflops", "passes_per_beam_batch",
                    "padded_tokens_per_pass_mean", "share_of_padded_tokens_in_passes_ge_4096", "padding_share"):
            assert row[key] >= 0, (mode, key)
        assert row["captions_per_s"] > 0 and 0 < row["padding_share"] < 0.2
    # 256 captions: one Beam batch of them either way here, but token batches pass the tokens budget
    assert t5["modes"]["records"]["captions_per_beam_batch"] == 256
    assert t5["beam_batch_budget_tokens"] == 4 * t5["pass_budget_padded_tokens"]
    assert t5["ratio_tokens_over_records"] > 0
    (clip,) = res["clip"]
    assert clip["model"] == "tiny CLIP" and clip["images"] == 32 and clip["stored_px"] == 256
    assert min(clip["stage_img_s"], clip["decode_preprocess_img_s"], clip["image_tower_img_s"]) > 0
    assert clip["image_tower_gflop_per_image"] > 0
    train = res["train"]
    assert train["preset"] == "tiny-base" and train["batch"] == 4 and train["img_s"] > 0 and train["gflop_per_step"] > 0
    loader = res["loader"]
    assert loader["img_s_per_core_draft"] > 0 and loader["img_s_per_core_full_decode"] > 0
    assert loader["stored_px"] == 256 and loader["resolution"] == 16  # tiny-base draws 16 px
    assert res["loader_cores_per_gpu"] > 0
    for line in ("T5 (tiny T5", "Beam batches", "CLIP stage", "Training step (tiny-base", "Loader, one core",
                 "loader cores per GPU"):
        assert line in proc.stdout, line
