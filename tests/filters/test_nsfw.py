"""filters.nsfw: LAION's H14 NSFW head layout on CLIP image embeddings, with seeded random heads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from filters.errors import ModelLoadError
from filters.nsfw import NsfwHead, NsfwScorer
from pipeline.testbed.models import cached_test_models
from pipeline.testbed.models.clip import build_nsfw_head


H14_KEYS = {f"layers.{i}.{p}" for i in (0, 3, 6, 9, 12, 15, 16) for p in ("weight", "bias")}


def _unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def head64(tmp_path_factory) -> Path:
    return build_nsfw_head(tmp_path_factory.mktemp("nsfw64"), 64, seed=0)


def test_layout_matches_laion_h14_state_dict():
    head = NsfwHead(1024)
    assert set(head.state_dict()) == H14_KEYS
    assert head.layers[0].in_features == 1024 and head.layers[16].out_features == 1
    dropouts = [m.p for m in head.layers if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.2] * 5


def test_punsafe_shape_range_determinism(head64):
    s = NsfwScorer(head64, device="cpu")
    emb = _unit(500, 64, seed=1)
    p = s.punsafe(emb)
    assert p.shape == (500,) and p.dtype == np.float32
    assert np.all((p >= 0) & (p <= 1))
    np.testing.assert_array_equal(p, s.punsafe(emb))
    print(f"\nrandom head on random unit embeddings: punsafe min {p.min():.3f} median {np.median(p):.3f} max {p.max():.3f}")
    assert 0.05 <= np.median(p) <= 0.2
    assert p.std() > 0.01  # not constant: thresholds select some rows and not others
    assert np.mean(p > 0.2) > 0.0 and np.mean(p > 0.2) < 0.5
    # batch invariance, float16 storage, and scale (re-normalised inside)
    s1 = NsfwScorer(head64, device="cpu", batch_size=1)
    np.testing.assert_allclose(s1.punsafe(emb[:50]), p[:50], atol=1e-5)
    np.testing.assert_allclose(s.punsafe(emb.astype(np.float16)), p, atol=2e-3)
    np.testing.assert_allclose(s.punsafe(emb * 3.0), p, atol=1e-5)
    assert s.punsafe(np.zeros((0, 64), np.float32)).shape == (0,)


def test_seeded_build_is_reproducible(head64, tmp_path):
    again = build_nsfw_head(tmp_path, 64, seed=0)
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(head64.read_bytes()).digest()
    other = build_nsfw_head(tmp_path / "s1", 64, seed=1)
    emb = _unit(50, 64)
    assert not np.allclose(NsfwScorer(other).punsafe(emb), NsfwScorer(head64).punsafe(emb))


def test_safetensors_and_pt_round_trip(head64, tmp_path):
    s = NsfwScorer(head64, device="cpu")
    assert s.activation == "sigmoid"  # recorded in the safetensors metadata by the builder
    assert s.source["sha256"] == hashlib.sha256(head64.read_bytes()).hexdigest()
    assert s.source["input_dim"] == 64 and s.source["weights_path"] == os.path.realpath(head64)
    emb = _unit(64, 64, seed=2)
    ref = s.punsafe(emb)

    pt = tmp_path / "head.pt"
    torch.save(s.model.state_dict(), pt)  # a plain state_dict, like LAION's h14_nsfw.pth
    s_pt = NsfwScorer(pt, activation="sigmoid")
    np.testing.assert_array_equal(s_pt.punsafe(emb), ref)
    assert s_pt.source["sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()

    # without metadata the published head's semantics apply: raw MSE-trained score clipped to [0, 1]
    s_raw = NsfwScorer(pt)
    assert s_raw.activation == "clamp"
    with torch.inference_mode():
        raw = s.model(torch.nn.functional.normalize(torch.from_numpy(emb), dim=-1))[:, 0].numpy()
    np.testing.assert_allclose(s_raw.punsafe(emb), np.clip(raw, 0, 1), atol=1e-6)

    # DataParallel-style "module." prefixes and {"state_dict": ...} wrappers load too
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in s.model.state_dict().items()}}, wrapped)
    np.testing.assert_array_equal(NsfwScorer(wrapped, activation="sigmoid").punsafe(emb), ref)


def test_input_dim_inferred_and_width_mismatch(head64, tmp_path):
    h768 = build_nsfw_head(tmp_path / "h768", 768, seed=0)
    s768 = NsfwScorer(h768)
    assert s768.input_dim == 768
    assert NsfwScorer(head64).input_dim == 64
    assert NsfwScorer(h768, input_dim=768).input_dim == 768

    with pytest.raises(ModelLoadError, match=r"768.*512|512.*768"):
        NsfwScorer(h768, input_dim=512)
    with pytest.raises(ModelLoadError) as e:
        s768.check_compatible(512, "ViT-B-32:openai")
    msg = str(e.value)
    assert "768-d" in msg and "512-d" in msg and "--clip-model ViT-B-32:openai" in msg and msg.startswith("--nsfw-head ")
    s768.check_compatible(768)
    with pytest.raises(ValueError, match=r"768-d.*512-d"):
        s768.punsafe(_unit(3, 512))


def test_rejects_other_layouts(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"linear_1.weight": torch.zeros(64, 768), "linear_1.bias": torch.zeros(64)}, bad)
    with pytest.raises(ModelLoadError, match="H14"):
        NsfwScorer(bad)
    short = tmp_path / "short.pt"
    torch.save({k: v for k, v in NsfwHead(64).state_dict().items() if not k.startswith("layers.16")}, short)
    with pytest.raises(ModelLoadError, match="layout"):
        NsfwScorer(short)
    with pytest.raises(ModelLoadError, match="does not exist"):
        NsfwScorer(tmp_path / "missing.safetensors")


def test_on_tiny_clip_embeddings(tmp_path):
    """One image pass feeds both: the NSFW head consumes ClipScorer's image embedding as is."""
    import cv2
    import pyarrow.parquet as pq

    from filters.clip_similarity import ClipScorer
    from pipeline.testbed.synth import synthesize

    clip = ClipScorer.from_spec("local-dir:" + cached_test_models()["clip"], device="cpu")
    web = synthesize(tmp_path / "web", 40, seed=99, failure_rate=0.0, size_range=(80, 200))
    rows = pq.read_table(web.ground_truth_path, columns=["TEXT", "image_file"]).to_pylist()
    imgs = [cv2.imread(str(web.images_dir / r["image_file"])) for r in rows]
    scores = clip.score(imgs, [r["TEXT"] for r in rows], channel_order="bgr")

    head = build_nsfw_head(tmp_path / "head", clip.embed_dim, seed=0, calibration_embeddings=scores.image_embedding)
    nsfw = NsfwScorer(head)
    nsfw.check_compatible(clip.embed_dim, clip.spec)
    p = nsfw.punsafe(scores.image_embedding.astype(np.float16))  # as the pipeline stores it
    print(f"\nrandom head on tiny-CLIP embeddings: punsafe min {p.min():.3f} median {np.median(p):.3f} max {p.max():.3f}")
    assert p.shape == (40,) and np.all((p >= 0) & (p <= 1))
    assert 0.05 <= np.median(p) <= 0.2 and p.std() > 0.01
