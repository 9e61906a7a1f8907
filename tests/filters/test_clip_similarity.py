"""filters.clip_similarity on the tiny CLIP trained on the synthetic web (pipeline.testbed.models.clip).

The tiny model comes from `pipeline.testbed.models.cached_test_models()` (built once into the user's
cache, ~/.cache/kiln/test-models/ by default; KILN_TEST_MODELS overrides; rebuilt only when a builder changes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from filters.clip_similarity import ClipScorer, ClipScores, preprocess_images
from filters.errors import ModelLoadError
from pipeline.testbed.synth import synthesize
from pipeline.testbed.models import cached_test_models



@pytest.fixture(scope="session")
def tiny_clip_dir() -> Path:
    return Path(cached_test_models()["clip"])


@pytest.fixture(scope="session")
def calibration(tiny_clip_dir) -> dict:
    return json.loads((tiny_clip_dir / "calibration.json").read_text())


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir) -> ClipScorer:
    return ClipScorer.from_spec(f"local-dir:{tiny_clip_dir}", device="cpu")


@pytest.fixture(scope="session")
def web(tmp_path_factory):
    """A synthetic web the tiny CLIP never saw (another seed): texts, backgrounds, BGR and RGB arrays."""
    root = tmp_path_factory.mktemp("clip-web")
    w = synthesize(root, 160, seed=4242, failure_rate=0.0, size_range=(80, 320))
    rows = pq.read_table(w.ground_truth_path, columns=["TEXT", "background", "image_file"]).to_pylist()
    bgr = [cv2.imread(str(w.images_dir / r["image_file"]), cv2.IMREAD_COLOR) for r in rows]
    return {
        "texts": [r["TEXT"] for r in rows],
        "backgrounds": [r["background"] for r in rows],
        "bgr": bgr,
        "rgb": [np.ascontiguousarray(b[:, :, ::-1]) for b in bgr],
    }


def _mismatched(backgrounds, seed=0):
    rng = np.random.default_rng(seed)
    bg = np.array(backgrounds)
    return np.array([rng.choice(np.flatnonzero(bg != b)) for b in bg])


def test_model_facts(scorer, tiny_clip_dir, calibration):
    assert scorer.embed_dim == 64
    assert scorer.image_size == 64
    assert scorer.spec == f"local-dir:{tiny_clip_dir.resolve()}"
    assert calibration["held_out"]["true_above_threshold"] >= 0.95
    assert calibration["held_out"]["mismatched_below_threshold"] >= 0.95
    print(
        f"\ntiny CLIP calibration: threshold {calibration['min_clip_similarity']:.4f}, held-out true above "
        f"{calibration['held_out']['true_above_threshold']}, mismatched below {calibration['held_out']['mismatched_below_threshold']}, "
        f"{calibration['training']['steps']} training steps"
    )


def test_shapes_dtypes_and_normalisation(scorer, web):
    n = 20
    out = scorer.score(web["rgb"][:n], web["texts"][:n])
    assert isinstance(out, ClipScores)
    assert out.similarity.shape == (n,) and out.similarity.dtype == np.float32
    assert out.image_embedding.shape == (n, 64) and out.image_embedding.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out.image_embedding, axis=1), 1.0, atol=1e-5)
    assert np.all(np.abs(out.similarity) <= 1.0 + 1e-5)
    txt = scorer.encode_texts(web["texts"][:n])
    assert txt.shape == (n, 64) and txt.dtype == np.float32
    np.testing.assert_allclose(out.similarity, np.sum(out.image_embedding * txt, axis=1), atol=1e-6)
    empty = scorer.score([], [])
    assert empty.similarity.shape == (0,) and empty.image_embedding.shape == (0, 64)
    with pytest.raises(ValueError):
        scorer.score(web["rgb"][:2], web["texts"][:3])


def test_text_encoding_matches_open_clip(scorer, web):
    """Length-sorted, EOT-trimmed text batches give open_clip's own encode_text results."""
    import torch
    import torch.nn.functional as F

    assert scorer._trim_text  # the standard CLIP text tower: the fast path is taken
    texts = web["texts"][:50] + ["", "a red circle " * 40, None]  # empty, over-long (truncated), missing
    ours = scorer.encode_texts(texts)
    with torch.inference_mode():
        ref = F.normalize(scorer.model.encode_text(scorer.tokenizer([t or "" for t in texts])), dim=-1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_deterministic(scorer, web):
    a = scorer.score(web["bgr"][:40], web["texts"][:40], channel_order="bgr")
    b = scorer.score(web["bgr"][:40], web["texts"][:40], channel_order="bgr")
    np.testing.assert_array_equal(a.similarity, b.similarity)
    np.testing.assert_array_equal(a.image_embedding, b.image_embedding)


def test_batch_size_invariance(tiny_clip_dir, web):
    n = 70
    results = {}
    for bs in (1, 7, 64):
        s = ClipScorer.from_spec(f"local-dir:{tiny_clip_dir}", device="cpu", batch_size=bs)
        results[bs] = s.score(web["bgr"][:n], web["texts"][:n], channel_order="bgr")
    for bs in (7, 64):
        d_sim = np.max(np.abs(results[bs].similarity - results[1].similarity))
        d_emb = np.max(np.abs(results[bs].image_embedding - results[1].image_embedding))
        print(f"\nbatch {bs} vs 1: max |d similarity| {d_sim:.2e}, max |d embedding| {d_emb:.2e}")
        assert d_sim < 1e-4 and d_emb < 1e-4


def test_local_dir_round_trip_and_source(scorer, tiny_clip_dir, web, tmp_path):
    from safetensors.torch import save_file

    weights = tiny_clip_dir / "open_clip_model.safetensors"
    src = scorer.source
    assert set(src) >= {"spec", "name", "pretrained", "weights_path", "sha256"}
    assert src["weights_path"] == os.path.realpath(weights)
    assert src["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert src["pretrained"] is None

    # save the loaded model again in open_clip's folder schema and load it back through local-dir:
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(tiny_clip_dir / "open_clip_config.json", copy / "open_clip_config.json")
    save_file({k: v.contiguous() for k, v in scorer.model.state_dict().items()}, str(copy / "open_clip_model.safetensors"))
    again = ClipScorer.from_spec(f"local-dir:{copy}", device="cpu")
    a = scorer.score(web["rgb"][:30], web["texts"][:30])
    b = again.score(web["rgb"][:30], web["texts"][:30])
    np.testing.assert_array_equal(a.similarity, b.similarity)
    np.testing.assert_array_equal(a.image_embedding, b.image_embedding)
    assert again.source["sha256"] == hashlib.sha256((copy / "open_clip_model.safetensors").read_bytes()).hexdigest()


def test_true_pairs_separate_from_mismatched(scorer, web, calibration):
    thr = calibration["min_clip_similarity"]
    n = len(web["texts"])
    img = scorer.encode_images(web["bgr"], channel_order="bgr")
    txt = scorer.encode_texts(web["texts"])
    true_sim = np.sum(img * txt, axis=1)
    mis_sim = np.sum(img * txt[_mismatched(web["backgrounds"])], axis=1)
    true_above = float(np.mean(true_sim > thr))
    mis_below = float(np.mean(mis_sim < thr))
    print(
        f"\n{n} unseen pairs, threshold {thr:.4f}: true above {true_above:.3f} (median {np.median(true_sim):.3f}), "
        f"mismatched-background below {mis_below:.3f} (median {np.median(mis_sim):.3f})"
    )
    assert true_above >= 0.9
    assert mis_below >= 0.9
    assert np.median(true_sim) - np.median(mis_sim) > 0.3


def test_matches_open_clip_preprocess(tiny_clip_dir, scorer, web):
    """kiln's cv2 crop+resize vs open_clip's own PIL preprocess (bicubic, antialiased): same scores within 0.02."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from PIL import Image

    rgb = web["rgb"][:48]
    # include upscaled inputs (smaller than the model's 64 px) and odd aspect ratios
    rgb += [cv2.resize(a, (41 + 3 * i, 33 + 5 * i), interpolation=cv2.INTER_AREA) for i, a in enumerate(web["rgb"][48:56])]
    rgb += [np.ascontiguousarray(a[:, : max(8, a.shape[1] // 3)]) for a in web["rgb"][56:64]]
    texts = web["texts"][: len(rgb)]

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_clip_dir}")
    with torch.inference_mode():
        x = torch.stack([preprocess(Image.fromarray(a)) for a in rgb])
        ref_img = F.normalize(model.encode_image(x), dim=-1)
        ref_txt = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        ref = (ref_img * ref_txt).sum(-1).numpy()
    ours = scorer.score(rgb, texts)
    diff = np.abs(ours.similarity - ref)
    emb_cos = np.sum(ours.image_embedding * ref_img.numpy(), axis=1)
    print(f"\nkiln vs open_clip PIL preprocess over {len(rgb)} images: max |d similarity| {diff.max():.4f}, mean {diff.mean():.4f}, min embedding cosine {emb_cos.min():.4f}")
    assert diff.max() < 0.02
    assert emb_cos.min() > 0.98


def test_rgb_bgr_channel_order(scorer, web):
    n = 40
    a = scorer.score(web["rgb"][:n], web["texts"][:n], channel_order="rgb")
    b = scorer.score(web["bgr"][:n], web["texts"][:n], channel_order="bgr")
    np.testing.assert_array_equal(a.similarity, b.similarity)
    np.testing.assert_array_equal(a.image_embedding, b.image_embedding)
    # and the order is not ignored: BGR pixels read as RGB swap red and blue and hurt true pairs
    wrong = scorer.score(web["bgr"][:n], web["texts"][:n], channel_order="rgb")
    assert wrong.similarity.mean() < a.similarity.mean() - 0.05
    with pytest.raises(ValueError):
        scorer.score(web["rgb"][:2], web["texts"][:2], channel_order="rgba")


def test_preprocess_images_inputs():
    rng = np.random.default_rng(0)
    imgs = [
        rng.integers(0, 256, (100, 150, 3), dtype=np.uint8),
        rng.integers(0, 256, (30, 20, 3), dtype=np.uint8),  # upscaled
        rng.integers(0, 256, (64, 64), dtype=np.uint8),  # grayscale
        rng.integers(0, 256, (70, 90, 4), dtype=np.uint8),  # RGBA: alpha dropped
    ]
    out = preprocess_images(imgs, 64)
    assert out.shape == (4, 64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[2, :, :, 0], imgs[2])  # 64x64 needs no resize
    np.testing.assert_array_equal(preprocess_images(imgs, 64, channel_order="bgr"), out[..., ::-1])
    # center crop of the longer side, as open_clip does
    sq = np.zeros((64, 128, 3), np.uint8)
    sq[:, 32:96] = 255
    assert preprocess_images([sq], 64).min() == 255
    with pytest.raises(TypeError):
        preprocess_images([np.zeros((8, 8, 3), np.float32)], 64)
    with pytest.raises(ValueError):
        preprocess_images([np.zeros((8, 8, 2), np.uint8)], 64)


def test_spec_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="names no weights"):
        ClipScorer.from_spec("ViT-B-32")
    with pytest.raises(ModelLoadError, match="unknown pretrained tag"):
        ClipScorer.from_spec("ViT-B-32:no-such-tag")
    with pytest.raises(ModelLoadError, match="not an open_clip architecture.*did you mean ViT-B-32"):
        ClipScorer.from_spec("ViT-B-23:openai")
    # a real tag whose weights are not cached: a clear error pointing at local-dir:, no download attempt
    with pytest.raises(ModelLoadError, match="huggingface-cli download timm/.*local-dir:"):
        ClipScorer.from_spec("ViT-B-32:openai", cache_dir=str(tmp_path / "empty-cache"))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="open_clip_config.json"):
        ClipScorer.from_spec(f"local-dir:{empty}")
    (empty / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    with pytest.raises(ModelLoadError, match="no weight file"):
        ClipScorer.from_spec(f"local-dir:{empty}")


def _fake_hf_cache(root: Path, repo_id: str, files: dict[str, Path]) -> None:
    """The layout huggingface_hub's cache uses, so local_files_only lookups find `files`."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / "0123456789abcdef"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    for name, src in files.items():
        shutil.copy(src, snap / name)


def test_offline_hub_and_tag_loading(tiny_clip_dir, scorer, web, tmp_path, monkeypatch):
    """hf-hub: and Name:tag specs resolve from local caches only and load the same weights."""
    import open_clip
    from open_clip import pretrained as oc_pretrained

    cache = tmp_path / "hf"
    files = {n: tiny_clip_dir / n for n in ("open_clip_config.json", "open_clip_model.safetensors")}
    _fake_hf_cache(cache, "kiln/tiny-clip", files)
    ref = scorer.score(web["rgb"][:20], web["texts"][:20])

    hub = ClipScorer.from_spec("hf-hub:kiln/tiny-clip", device="cpu", cache_dir=str(cache))
    np.testing.assert_array_equal(hub.score(web["rgb"][:20], web["texts"][:20]).similarity, ref.similarity)
    assert hub.source["spec"] == "hf-hub:kiln/tiny-clip" and hub.source["sha256"] == scorer.source["sha256"]

    # a built-in architecture name + pretrained tag whose hf_hub entry is cached
    cfg_file = tmp_path / "cfgs" / "kiln-tiny-test.json"
    cfg_file.parent.mkdir()
    cfg_file.write_text(json.dumps(json.loads(files["open_clip_config.json"].read_text())["model_cfg"]))
    open_clip.add_model_config(cfg_file)
    monkeypatch.setitem(oc_pretrained._PRETRAINED, "kiln-tiny-test", {"synthetic": oc_pretrained._pcfg(hf_hub="kiln/tiny-clip/")})
    tagged = ClipScorer.from_spec("kiln-tiny-test:synthetic", device="cpu", cache_dir=str(cache))
    assert tagged.source["name"] == "kiln-tiny-test" and tagged.source["pretrained"] == "synthetic"
    assert tagged.source["sha256"] == scorer.source["sha256"]
    np.testing.assert_allclose(tagged.score(web["rgb"][:20], web["texts"][:20]).similarity, ref.similarity, atol=1e-6)

    with pytest.raises(ModelLoadError, match="huggingface-cli download kiln/not-cached.*local-dir:"):
        ClipScorer.from_spec("hf-hub:kiln/not-cached", cache_dir=str(cache))
