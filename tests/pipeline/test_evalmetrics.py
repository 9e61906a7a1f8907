"""pipeline.evalmetrics: CLIPScore, FID / KID and their feature extractors, on tiny local models only.

The CLIP is the tiny one trained on the synthetic web (`pipeline.testbed.models.cached_test_models()`);
the other extractor is a small TorchScript module these tests build. FID and KID are checked against
values computed by hand and, where torchmetrics is installed, against torchmetrics' own metrics
fed the same images through the same module. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import socket
import types
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from filters.clip_similarity import ClipScores, preprocess_images
from pipeline.errors import UserError
from pipeline.evalmetrics import (
    FeatureExtractor,
    MetricModelError,
    clip_feature_extractor,
    clip_score,
    feature_stats,
    fid,
    frechet_distance,
    kid,
    load_clip,
    load_feature_extractor,
    mmd2_unbiased,
)
from pipeline.testbed.models import cached_test_models
from pipeline.testbed.synth import synthesize


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (weights never come from the network)."""
    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(scope="session")
def tiny_clip_dir() -> Path:
    return Path(cached_test_models()["clip"])


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return load_clip(f"local:{tiny_clip_dir}", device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """24 synthetic-web pictures (RGB, 48..96 px on the longer side, mixed shapes) and their captions."""
    import cv2

    w = synthesize(tmp_path_factory.mktemp("metrics-web"), 24, seed=777, failure_rate=0.0, size_range=(48, 96))
    rows = pq.read_table(w.ground_truth_path, columns=["TEXT", "background", "image_file"]).to_pylist()
    rgb = [np.ascontiguousarray(cv2.imread(str(w.images_dir / r["image_file"]), cv2.IMREAD_COLOR)[:, :, ::-1]) for r in rows]
    return {"rgb": rgb, "texts": [r["TEXT"] for r in rows], "backgrounds": [r["background"] for r in rows]}


class TinyFeatures(torch.nn.Module):
    """uint8 [N, 3, H, W] -> [N, dim]: a 2x2 average pool of the centred pixels, then a linear map
    (x10: features of order 1, like Inception's); any H, W >= 2."""

    def __init__(self, dim: int = 8, with_dim: bool = True):
        super().__init__()
        self.fc = torch.nn.Linear(12, dim)
        if with_dim:
            self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0 - 0.5, 2).flatten(1)
        return 10.0 * self.fc(h)


def _save_script(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_ts(tmp_path_factory) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = TinyFeatures(8)
    return _save_script(module, tmp_path_factory.mktemp("ts") / "tiny_features.pt")


def _random_images(n: int, size: int, seed: int, brightness: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=(n, 1, 1, 3))  # a colour per image, plus pixel noise
    noise = rng.integers(0, 56, size=(n, size, size, 3))
    return np.clip(base + noise + brightness, 0, 255).astype(np.uint8)


# -- CLIPScore ------------------------------------------------------------------------------------


def test_clip_score_is_100_times_the_clamped_cosine_of_open_clips_embeddings(clip, tiny_clip_dir, web):
    """Against a hand computation: open_clip's own model on images already at its input size (so no
    resize is involved), the embeddings' cosines computed here, x100, clamped at 0."""
    import open_clip

    imgs = preprocess_images(web["rgb"], clip.image_size)  # [n, 64, 64, 3]: kiln's crop + resize, done once
    ours = clip_score(list(imgs), web["texts"], clip)
    assert ours.shape == (len(imgs),) and ours.dtype == np.float64

    model = open_clip.create_model(f"local-dir:{tiny_clip_dir}", device="cpu").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_clip_dir}")
    pp = model.visual.preprocess_cfg
    mean = torch.tensor(pp["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        e_img = model.encode_image(x).double().numpy()
        e_txt = model.encode_text(tokenizer(web["texts"])).double().numpy()
    cos = (e_img * e_txt).sum(1) / (np.linalg.norm(e_img, axis=1) * np.linalg.norm(e_txt, axis=1))
    expected = 100.0 * np.maximum(cos, 0.0)
    np.testing.assert_allclose(ours, expected, atol=2e-3)  # 2e-5 in cosine
    assert (expected > 0).any()

    # Images at other sizes go through the CLIP stage's preprocessing: the same scores.
    np.testing.assert_allclose(clip_score(web["rgb"], web["texts"], clip), ours, atol=1e-4)


def test_clip_score_prefers_true_captions(clip, web):
    """The tiny CLIP separates a picture's own caption from one naming another background (on
    average over 24 pictures: no single borderline decision is asserted)."""
    bg = np.array(web["backgrounds"])
    other = [int(np.flatnonzero(bg != b)[0]) for b in bg]
    true = clip_score(web["rgb"], web["texts"], clip)
    wrong = clip_score(web["rgb"], [web["texts"][j] for j in other], clip)
    assert true.mean() > wrong.mean() + 5.0
    assert ((true >= 0) & (true <= 100)).all() and ((wrong >= 0) & (wrong <= 100)).all()


def test_clip_score_clamps_negative_cosines_and_checks_lengths():
    stub = types.SimpleNamespace(score=lambda images, texts, channel_order: ClipScores(
        similarity=np.array([-0.31, 0.0, 0.27], np.float32), image_embedding=np.zeros((3, 2), np.float32)))
    imgs = [np.zeros((4, 4, 3), np.uint8)] * 3
    np.testing.assert_allclose(clip_score(imgs, ["a", "b", "c"], stub), [0.0, 0.0, 27.0], rtol=1e-6)
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        clip_score(imgs, ["a", "b"], stub)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        clip_score([np.zeros((4, 4), np.uint8)], ["a"], stub)
    assert clip_score([], [], stub).shape == (0,)


def test_load_clip_takes_prepares_specs_and_fails_in_one_line(tiny_clip_dir, tmp_path):
    a = load_clip(f"local-dir:{tiny_clip_dir}", device="cpu")
    assert a.embed_dim == 64 and a.source["sha256"]
    with pytest.raises(UserError) as err:
        load_clip(f"local:{tmp_path / 'nope'}")
    assert "does not exist" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetricModelError) as err:  # the CLIP stage's loader's error, as a UserError
        load_clip(f"local:{tmp_path / 'empty'}")
    assert "open_clip_config.json" in str(err.value) and "\n" not in str(err.value)


# -- feature extractors ---------------------------------------------------------------------------


def test_clip_features_are_the_image_towers_unnormalised_output(clip, tiny_clip_dir, web):
    fx = load_feature_extractor(f"clip:local:{tiny_clip_dir}", device="cpu", batch_size=5)
    assert (fx.kind, fx.dim) == ("clip", 64) and fx.name.startswith("clip:local-dir:")
    feats = fx.features(web["rgb"])
    assert feats.shape == (24, 64) and feats.dtype == np.float64
    # L2-normalised, they are the CLIP stage's image embeddings (its preprocessing, its passes).
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, clip.encode_images(web["rgb"]), atol=1e-5)
    assert not np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-3)  # not normalised themselves
    # Sharing an already loaded CLIP gives the same features.
    np.testing.assert_allclose(clip_feature_extractor(clip).features(web["rgb"]), feats, rtol=1e-5, atol=1e-6)


def test_torchscript_features_in_batches(tiny_ts, web):
    fx = load_feature_extractor(f"torchscript:{tiny_ts}", device="cpu", batch_size=4)
    assert isinstance(fx, FeatureExtractor)
    assert (fx.kind, fx.name, fx.dim) == ("torchscript", "torchscript:tiny_features.pt", 8)
    assert fx.source["sha256"] and fx.source["path"] == str(tiny_ts.resolve())

    calls = []
    forward = fx._forward
    fx._forward = lambda x: (calls.append(tuple(x.shape)), forward(x))[1]
    # Three sizes, interleaved (10 x 32 px, 7 x 40 px, 7 x 48 px): batched by size, rows in input order.
    sized = {s: list(preprocess_images(web["rgb"], s)) for s in (32, 40, 48)}
    imgs = [sized[(32, 40, 48, 32)[i % 4]][i] for i in range(24)]
    feats = fx.features(imgs)
    assert feats.shape == (24, 8) and feats.dtype == np.float64
    assert len(calls) == 3 + 2 + 2
    assert all(c[0] <= 4 and c[1] == 3 and c[2] == c[3] in (32, 40, 48) for c in calls)

    module = torch.jit.load(str(tiny_ts)).eval()
    with torch.inference_mode():
        one_by_one = np.stack([module(torch.from_numpy(a).permute(2, 0, 1)[None])[0].double().numpy() for a in imgs])
    np.testing.assert_allclose(feats, one_by_one, rtol=1e-5, atol=1e-6)
    big = load_feature_extractor(f"torchscript:{tiny_ts}", device="cpu", batch_size=64).features(imgs)
    np.testing.assert_allclose(big, feats, rtol=1e-5, atol=1e-6)


def test_torchscript_without_dim_is_measured_and_bad_modules_fail_in_one_line(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        path = _save_script(TinyFeatures(5, with_dim=False), tmp_path / "nodim.pt")
    assert load_feature_extractor(f"torchscript:{path}", device="cpu").dim == 5

    class Flat(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().mean()

    bad = _save_script(Flat(), tmp_path / "flat.pt")
    with pytest.raises(MetricModelError, match=r"\[2, D\]") as err:
        load_feature_extractor(f"torchscript:{bad}", device="cpu")
    assert "\n" not in str(err.value)

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torchscript archive")
    for spec, what in ((f"torchscript:{junk}", "not a TorchScript module"),
                       (f"torchscript:{tmp_path / 'missing.pt'}", "does not exist"),
                       (f"torchscript:{tmp_path}", "is a folder"),
                       ("torchscript:", "names no file"),
                       ("resnet:/x.pt", "expected inception:FILE"),
                       ("clip:", "names no CLIP")):
        with pytest.raises(MetricModelError) as err:
            load_feature_extractor(spec, device="cpu")
        assert what in str(err.value) and "\n" not in str(err.value), spec
        assert isinstance(err.value, UserError)


def test_inception_without_its_weight_file_is_one_clear_line(tmp_path):
    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(MetricModelError) as err:
        load_feature_extractor(f"inception:{missing}")
    msg = str(err.value)
    assert "\n" not in msg and "does not exist" in msg and "inception:FILE" in msg
    assert "never downloads" in msg and "weights-inception-2015-12-05-6726825d.pth" in msg
    with pytest.raises(MetricModelError, match="names no file"):
        load_feature_extractor("inception:")


def test_inception_with_a_bad_file_is_one_line(tmp_path):
    """Without torch-fidelity (which torchmetrics' NoTrainInceptionV3 builds on) the line says so;
    with it, a file that is not the Inception's state dict is refused before torch-fidelity sees it."""
    junk = tmp_path / "inception.pth"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(MetricModelError) as err:
        load_feature_extractor(f"inception:{junk}", device="cpu")
    msg = str(err.value)
    assert "\n" not in msg
    if importlib.util.find_spec("torch_fidelity") is None:
        assert "torch-fidelity" in msg
    else:
        assert any(s in msg for s in ("truncated or not a PyTorch checkpoint", "not the FID Inception", "safe loader refuses"))


# -- FID ------------------------------------------------------------------------------------------


def test_fid_of_1d_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, size=(500, 1)), rng.normal(-0.5, 0.7, size=(300, 1))
    m1, m2, v1, v2 = a.mean(), b.mean(), a.var(ddof=1), b.var(ddof=1)
    expected = (m1 - m2) ** 2 + v1 + v2 - 2.0 * np.sqrt(v1 * v2)
    assert fid(a, b) == pytest.approx(expected, rel=1e-10)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-10)


def _exact(z_seed: int, n: int, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """n samples whose sample mean is exactly `mu` and sample covariance exactly diag(var)."""
    z = np.random.default_rng(z_seed).normal(size=(n, len(mu)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whitened: covariance I
    return mu + z * np.sqrt(var)


def test_fid_of_diagonal_gaussians_is_the_closed_form():
    """Commuting covariances: FID = |mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    d = 6
    mu_a, mu_b = np.arange(d, dtype=float), np.linspace(0.5, -1.0, d)
    var_a, var_b = np.linspace(0.5, 3.0, d), np.linspace(2.0, 0.1, d)
    a, b = _exact(1, 200, mu_a, var_a), _exact(2, 150, mu_b, var_b)
    mu, sigma = feature_stats(a)
    np.testing.assert_allclose(mu, mu_a, atol=1e-12)
    np.testing.assert_allclose(sigma, np.diag(var_a), atol=1e-12)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert fid(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(expected, rel=1e-12)


def test_fid_identical_sets_and_bad_inputs():
    x = np.random.default_rng(3).normal(size=(50, 8)) @ np.random.default_rng(4).normal(size=(8, 8))
    assert abs(fid(x, x)) < 1e-8 * np.trace(np.cov(x, rowvar=False))
    few = np.random.default_rng(5).normal(size=(5, 16))  # fewer samples than dimensions: singular covariances
    assert np.isfinite(fid(few, few + 1.0)) and fid(few, few + 1.0) == pytest.approx(16.0, rel=1e-3)
    with pytest.raises(ValueError, match="N >= 2"):
        fid(x[:1], x)
    with pytest.raises(ValueError, match="mismatched shapes"):
        fid(x, x[:, :4])
    with pytest.raises(ValueError, match="NaN"):
        fid(np.full((3, 2), np.nan), x[:, :2])


# -- KID ------------------------------------------------------------------------------------------


def test_mmd2_unbiased_by_hand():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(6, 3)), rng.normal(0.5, 1.0, size=(6, 3))

    def k(u, v):
        return (u @ v / 3 + 1.0) ** 3

    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_identical_and_same_distribution_near_zero():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(300, 16))
    # Identical sets, each subset the whole set: 2/(n-1) * (mean of K - mean of its diagonal), every subset.
    n = len(x)
    k = (x @ x.T / 16 + 1.0) ** 3
    mean, std = kid(x, x, subset_size=n, subsets=4)
    assert mean == pytest.approx(2.0 / (n - 1) * (k.mean() - np.diag(k).mean()), rel=1e-9)
    assert std < 1e-12
    # Two samples of one distribution: near 0 next to a shifted one.
    same, _ = kid(x, rng.normal(size=(300, 16)), subset_size=100, subsets=20)
    shifted, _ = kid(x, rng.normal(0.5, 1.0, size=(300, 16)), subset_size=100, subsets=20)
    assert shifted > 0.1 and abs(same) < 0.02 * shifted


def test_kid_is_seeded_and_caps_the_subset_size():
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(40, 4)), rng.normal(0.3, 1.0, size=(30, 4))
    assert kid(a, b, subset_size=20, subsets=10, seed=1) == kid(a, b, subset_size=20, subsets=10, seed=1)
    assert kid(a, b, subset_size=20, subsets=10, seed=1) != kid(a, b, subset_size=20, subsets=10, seed=2)
    assert kid(a, b) == kid(a, b, subset_size=30)  # 1000 > 30 rows: capped at the smaller set
    with pytest.raises(ValueError, match="feature sizes differ"):
        kid(a, b[:, :3])


# -- against torchmetrics ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_fid_and_kid_equal_torchmetrics(tiny_ts):
    """End to end: the same images through the same module, ours vs torchmetrics' FID and KID."""
    pytest.importorskip("torchmetrics")
    from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _random_images(64, 24, seed=10), _random_images(48, 24, seed=11, brightness=40)
    fx = load_feature_extractor(f"torchscript:{tiny_ts}", device="cpu", batch_size=16)
    fa, fb = fx.features(list(real)), fx.features(fake)

    module = torch.jit.load(str(tiny_ts)).eval()
    for p in module.parameters():
        p.requires_grad_(False)

    def nchw(x):
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    tm_fid = FrechetInceptionDistance(feature=module)
    tm_fid.update(nchw(real), real=True)
    tm_fid.update(nchw(fake), real=False)
    ours = fid(fa, fb)
    print(f"\nFID ours {ours:.6f} torchmetrics {float(tm_fid.compute()):.6f}")
    assert ours > 0.1 and ours == pytest.approx(float(tm_fid.compute()), rel=1e-4)
    # torchmetrics' own Frechet formula (eigenvalues of S_a S_b) on our statistics, in float64
    stats = [torch.from_numpy(v) for v in (*feature_stats(fa), *feature_stats(fb))]
    assert ours == pytest.approx(float(_compute_fid(*stats)), rel=1e-9)

    # KID: each library draws its subsets with its own RNG, so compare with every subset the whole of
    # two 48-row sets (the unbiased MMD^2 does not depend on the rows' order).
    tm_kid = KernelInceptionDistance(feature=module, subsets=3, subset_size=48)
    tm_kid.update(nchw(real[:48]), real=True)
    tm_kid.update(nchw(fake), real=False)
    theirs, _ = (float(v) for v in tm_kid.compute())
    mean, std = kid(fa[:48], fb, subset_size=48, subsets=3)
    print(f"KID ours {mean:.6f} (std {std:.1e}) torchmetrics {theirs:.6f}")
    assert mean > 1e-3 and std < 1e-9 * mean
    assert mean == pytest.approx(theirs, rel=1e-4)


@pytest.mark.filterwarnings("ignore:Metric `Frechet Inception Distance` will save all extracted features")
def test_inception_spec_loads_a_weight_file_of_the_fid_format_and_matches_torchmetrics(tmp_path):
    """`inception:PATH` through the real loading code, on a file in the FID Inception's on-disk format
    (torch-fidelity's state dict) with random weights -- the real file cannot be downloaded here."""
    pytest.importorskip("torch_fidelity")
    pytest.importorskip("torchmetrics")
    from unittest import mock

    from pipeline.compat import ensure_torch_compat

    ensure_torch_compat()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    with mock.patch("torch.load", return_value={}), mock.patch.object(torch.nn.Module, "load_state_dict", return_value=None):
        fresh = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    weights = tmp_path / "weights-inception-random.pth"
    torch.save(fresh.state_dict(), weights)
    fx = load_feature_extractor(f"inception:{weights}", device="cpu", batch_size=8)
    assert fx.kind == "inception" and fx.dim == 2048
    real, fake = _random_images(6, 48, seed=20), _random_images(6, 48, seed=21, brightness=40)
    fa, fb = fx.features(list(real)), fx.features(list(fake))
    assert fa.shape == (6, 2048) and np.isfinite(fa).all()
    tm = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    tm.update(torch.from_numpy(real).permute(0, 3, 1, 2).contiguous(), real=True)
    tm.update(torch.from_numpy(fake).permute(0, 3, 1, 2).contiguous(), real=False)
    assert fid(fa, fb) == pytest.approx(float(tm.compute()), rel=1e-3)
