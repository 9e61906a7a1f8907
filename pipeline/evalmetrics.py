"""Sample-quality metrics for `kiln eval`: CLIPScore, and FID / KID over a choice of feature extractor.

    clip = load_clip("ViT-B-32:openai")                 # any --clip-model spec kiln prepare takes
    clip_score(images, captions, clip)                  # [n] per image, 0..100
    fx = load_feature_extractor("inception:/models/weights-inception-2015-12-05-6726825d.pth")
    a, b = fx.features(real_images), fx.features(generated_images)    # [n, 2048] float64
    fid(a, b); kid(a, b)                                # FID; (KID mean, KID std over subsets)

Images are uint8 HxWx3 RGB arrays (a list, or one [n, H, W, 3] array). Every model sees batches:
CLIP's of its own input size (the CLIP stage's crop + resize first); Inception and TorchScript
modules take images at their own size, so images of one size share batches (a kiln dataset stores
most images at --image-size, and samples all have one size).

CLIPScore (Hessel et al. 2021, §3; torchmetrics' `CLIPScore`): 100 * max(cos(E_image, E_caption), 0)
per image, with the image and caption embedded exactly as `kiln prepare`'s CLIP stage embeds them
(filters.clip_similarity.ClipScorer: its preprocessing, its text passes), so a sample's score is
100x the `clip_similarity` its image-caption pair would get in a dataset (clamped at 0). Hessel et
al. scale by w = 2.5 instead of 100; the papers that report CLIPScore for text-to-image models (and
torchmetrics) use 100.

Feature extractors (`load_feature_extractor(spec)`; `.name`, `.dim`, `.features(images)`):

    inception:PATH      the FID Inception-v3 (TF 2015-12-05 graph, pool3: 2048-d) from a local weight
                        file -- torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`, as
                        torchmetrics' FrechetInceptionDistance loads it (NoTrainInceptionV3,
                        "inception-v3-compat"; images go in at their own size and are resized to 299
                        inside with antialiased bilinear, torchmetrics' default), so the numbers are
                        torchmetrics' FID / KID. Needs torchmetrics and torch-fidelity. Never downloads.
    clip:SPEC           CLIP image embeddings (FD_CLIP; Kynkäänniemi et al. 2023), SPEC any
                        --clip-model spec: the image tower's projected output before normalisation,
                        as clean-fid's CLIP features, preprocessed as the CLIP stage does
    torchscript:PATH    any TorchScript module mapping a uint8 [N, 3, H, W] batch to [N, D] features
                        (H, W: the images' own size). D: the module's int attribute `dim` if it has
                        one, else measured on a [2, 3, 299, 299] batch of zeros.

FID (Heusel et al. 2017): ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), sample covariances
(N - 1), the square root by scipy.linalg.sqrtm with pytorch-fid's / clean-fid's handling: eps * I
added to both covariances when the root is not finite, the imaginary part dropped when it is
negligible. KID (Binkowski et al. 2018): the unbiased MMD^2 under the kernel (x.y / D + 1)^3,
averaged over random subsets, as torchmetrics' KernelInceptionDistance and clean-fid compute it.

A model spec that cannot be used (a missing or unreadable file, a registry name not fetched, a
module that does not map images to features) raises a UserError: one line, what to pass instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import UserError

if TYPE_CHECKING:
    import torch

    from filters.clip_similarity import ClipScorer

__all__ = [
    "INCEPTION_WEIGHTS",
    "FeatureExtractor",
    "MetricModelError",
    "clip_feature_extractor",
    "clip_score",
    "feature_stats",
    "fid",
    "frechet_distance",
    "kid",
    "load_clip",
    "load_feature_extractor",
    "mmd2_unbiased",
]

# The FID Inception weights torch-fidelity (and so torchmetrics) loads: the TF 2015-12-05 graph,
# converted; fetched once by the user, never at run time.
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS}"
SPEC_KINDS = ("inception", "clip", "torchscript")
# torchscript modules without a `dim` attribute are measured on a batch of this size (Inception's input).
PROBE_SIZE = 299
_SPECS_HELP = "inception:FILE (the FID Inception weights), clip:SPEC (a --clip-model spec) or torchscript:FILE"


class MetricModelError(UserError, ValueError):
    """A metric's model spec names nothing usable: one line, what is wrong and what to pass (exit 2)."""


# -- images ------------------------------------------------------------------------------------


def _rgb_u8(img, i: int) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or 0 in a.shape:
        raise ValueError(f"image {i}: expected a uint8 HxWx3 RGB array, got {a.dtype} {a.shape}")
    return a


def _images(images) -> list[np.ndarray]:
    return [_rgb_u8(img, i) for i, img in enumerate(images)]


def _device(device) -> torch.device:
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# -- CLIP --------------------------------------------------------------------------------------


def load_clip(spec: str, *, models_dir: str | None = None, device=None, batch_size: int = 64) -> ClipScorer:
    """The CLIP `kiln prepare --clip-model SPEC [--models DIR]` would load: resolved by the one
    resolver (pipeline.models.resolve: local:DIR, a registry name, NAME:TAG, hf-hub:ORG/REPO[@REV])
    and opened by the CLIP stage's own loader (filters.clip_similarity.ClipScorer). Its provenance
    (name, sha256 of the weights) is `.source`. A spec that names nothing usable -> a UserError."""
    from pipeline.compat import ensure_torch_compat
    from pipeline.models.resolve import resolve

    ensure_torch_compat()  # open_clip imports torchvision
    from filters.clip_similarity import ClipScorer
    from filters.errors import ModelLoadError

    resolved = resolve("clip", spec, models_dir)  # ModelNotHere (a UserError) when it is not here
    try:
        return ClipScorer.from_spec(resolved.loader_spec, device=device, batch_size=batch_size)
    except ModelLoadError as err:
        raise MetricModelError(str(err)) from err


def clip_score(images: Sequence, captions: Sequence[str], clip: ClipScorer) -> np.ndarray:
    """float64 [n]: 100 * max(cos(image embedding, caption embedding), 0) for each (image, caption).

    `images`: uint8 HxWx3 RGB arrays; `clip`: a loaded CLIP (`load_clip`). The mean over a set is
    the CLIPScore papers report."""
    imgs = _images(images)
    if len(imgs) != len(captions):
        raise ValueError(f"{len(imgs)} images but {len(captions)} captions")
    if not imgs:
        return np.zeros(0, dtype=np.float64)
    cos = clip.score(imgs, list(captions), channel_order="rgb").similarity.astype(np.float64)
    return 100.0 * np.maximum(cos, 0.0)


# -- feature extractors -------------------------------------------------------------------------


class FeatureExtractor:
    """Images -> [N, dim] float64 features, in batches of `batch_size` images.

    `name`: what the features are ("inception-v3-compat", "clip:SPEC", "torchscript:FILE");
    `kind`: "inception" | "clip" | "torchscript"; `source`: provenance for a report (spec, path,
    sha256 of the weight file). Built by `load_feature_extractor` / `clip_feature_extractor`."""

    def __init__(self, *, name: str, kind: str, dim: int, spec: str, forward, device, batch_size: int = 64,
                 prepare=None, path: str | None = None, source: dict | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.name, self.kind, self.dim, self.spec = name, kind, int(dim), spec
        self.device, self.batch_size, self.path = device, int(batch_size), path
        self._forward = forward  # uint8 [b, 3, H, W] tensor on self.device -> [b, dim] tensor
        # list of HxWx3 arrays -> one uint8 [b, S, S, 3] array (a model's own resize), or None: the
        # images go in at their own size, batched with others of the same size.
        self._prepare = prepare
        self._source = source
        self._sha256: str | None = None

    @property
    def source(self) -> dict:
        if self._source is not None:
            return self._source
        if self._sha256 is None and self.path:
            from filters.weights import sha256_file

            self._sha256 = sha256_file(self.path)
        return {"spec": self.spec, "name": self.name, "path": self.path, "sha256": self._sha256}

    def _groups(self, imgs: list[np.ndarray]) -> list[list[int]]:
        if self._prepare is not None:
            return [list(range(len(imgs)))]
        by_shape: dict[tuple, list[int]] = {}
        for i, a in enumerate(imgs):
            by_shape.setdefault(a.shape, []).append(i)
        return list(by_shape.values())

    def features(self, images: Sequence) -> np.ndarray:
        """float64 [n, dim] features of uint8 HxWx3 RGB arrays (rows in input order)."""
        import torch

        imgs = _images(images)
        out = np.empty((len(imgs), self.dim), dtype=np.float64)
        with torch.inference_mode():
            for group in self._groups(imgs):
                for s in range(0, len(group), self.batch_size):
                    idx = group[s : s + self.batch_size]
                    part = [imgs[i] for i in idx]
                    batch = self._prepare(part) if self._prepare is not None else np.stack(part)
                    x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2)
                    y = self._forward(x)
                    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (len(idx), self.dim):
                        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                        raise MetricModelError(f"{self.spec}: the model mapped {len(idx)} images to {got}, not "
                                               f"[{len(idx)}, {self.dim}]; {_SPECS_HELP} must map a uint8 "
                                               "[N, 3, H, W] batch to [N, D] features")
                    out[idx] = y.double().cpu().numpy()
        return out

    def __repr__(self) -> str:
        return f"FeatureExtractor(name={self.name!r}, dim={self.dim}, device={self.device}, batch_size={self.batch_size})"


def clip_feature_extractor(clip: ClipScorer, batch_size: int | None = None) -> FeatureExtractor:
    """FD_CLIP features from a loaded CLIP (so `kiln eval` loads it once for CLIPScore and FD_CLIP):
    the image tower's output before L2 normalisation, as clean-fid's CLIP features; images
    preprocessed as the CLIP stage does (crop + resize to the model's input size), in float32."""
    import torch

    mean = torch.tensor(clip.mean, dtype=torch.float32, device=clip.device).view(1, 3, 1, 1)
    std = torch.tensor(clip.std, dtype=torch.float32, device=clip.device).view(1, 3, 1, 1)

    def forward(x):
        return clip.model.encode_image((x.float() / 255.0 - mean) / std).float()

    return FeatureExtractor(name=f"clip:{clip.spec}", kind="clip", dim=clip.embed_dim, spec=f"clip:{clip.spec}",
                            forward=forward, device=clip.device, batch_size=batch_size or clip.batch_size,
                            prepare=clip.preprocess, source={**clip.source, "spec": f"clip:{clip.spec}"})


def _existing_file(spec: str, raw: str, what: str) -> Path:
    if not raw:
        raise MetricModelError(f"{spec}: names no file; pass {what}")
    path = Path(os.path.expanduser(raw)).resolve()
    if not path.exists():
        raise MetricModelError(f"{spec}: {path} does not exist; pass {what}")
    if not path.is_file():
        raise MetricModelError(f"{spec}: {path} is a folder, not a file; pass {what}")
    return path


def _load_inception(spec: str, raw: str, device, batch_size: int) -> FeatureExtractor:
    what = (f"inception:FILE, the FID Inception weights ({INCEPTION_WEIGHTS}, from {INCEPTION_URL}, fetched on a "
            "machine with network: kiln never downloads at run time), or clip:SPEC / torchscript:FILE features")
    path = _existing_file(spec, raw, what)
    from pipeline.compat import ensure_torch_compat

    ensure_torch_compat()  # torchmetrics imports torchvision
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError:
        _TORCH_FIDELITY_AVAILABLE = False
    if not _TORCH_FIDELITY_AVAILABLE:
        raise MetricModelError(f"{spec}: the FID Inception needs torchmetrics and torch-fidelity (`pip install "
                               "torchmetrics torch-fidelity`); or use clip:SPEC / torchscript:FILE features")
    from filters.errors import ModelLoadError
    from filters.weights import load_torch

    try:  # weights_only=True: a pickle that carries code is refused (torch-fidelity loads the same way)
        state = load_torch(path, "feature extractor", spec, f"the weight file {path}", f"pass {what}")
    except ModelLoadError as err:
        raise MetricModelError(str(err)) from err
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise MetricModelError(f"{spec}: {path} is not the FID Inception-v3 state dict (no Mixed_7c layers); pass {what}")
    del state
    dev = _device(device)
    model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                               feature_extractor_weights_path=str(path)).to(dev).eval()
    return FeatureExtractor(name="inception-v3-compat", kind="inception", dim=2048, spec=spec,
                            forward=lambda x: model(x), device=dev, batch_size=batch_size, path=str(path))


def _load_torchscript(spec: str, raw: str, device, batch_size: int) -> FeatureExtractor:
    import torch

    what = "torchscript:FILE, a TorchScript module (torch.jit.save) mapping a uint8 [N, 3, H, W] batch to [N, D]"
    path = _existing_file(spec, raw, what)
    dev = _device(device)
    try:
        module = torch.jit.load(str(path), map_location=dev)
    except (RuntimeError, ValueError, OSError) as err:
        from filters.weights import short

        raise MetricModelError(f"{spec}: {path} is not a TorchScript module ({short(err, 100)}); pass {what}") from err
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    dim = getattr(module, "dim", None)
    if not isinstance(dim, int) or isinstance(dim, bool):
        probe = torch.zeros(2, 3, PROBE_SIZE, PROBE_SIZE, dtype=torch.uint8, device=dev)
        try:
            with torch.inference_mode():
                y = module(probe)
        except Exception as err:  # noqa: BLE001 - the user's module: any failure is theirs, told in one line
            from filters.weights import short

            raise MetricModelError(f"{spec}: the module failed on a uint8 [2, 3, {PROBE_SIZE}, {PROBE_SIZE}] batch "
                                   f"({type(err).__name__}: {short(err, 100)}); give it an int attribute `dim` (its "
                                   "feature size), or pass " + what) from err
        if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != 2:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise MetricModelError(f"{spec}: the module maps a [2, 3, {PROBE_SIZE}, {PROBE_SIZE}] batch to {got}, not "
                                   f"[2, D]; pass {what}")
        dim = int(y.shape[1])
    return FeatureExtractor(name=f"torchscript:{path.name}", kind="torchscript", dim=dim, spec=spec,
                            forward=lambda x: module(x), device=dev, batch_size=batch_size, path=str(path))


def load_feature_extractor(spec: str, *, models_dir: str | None = None, device=None,
                           batch_size: int = 64) -> FeatureExtractor:
    """The feature extractor `spec` names: "inception:FILE", "clip:SPEC" or "torchscript:FILE" (see
    the module docstring). `models_dir`: kiln's --models DIR, for clip:REGISTRY-NAME. A spec naming
    nothing usable -> a UserError (one line)."""
    spec = (spec or "").strip()
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in SPEC_KINDS:
        raise MetricModelError(f"feature extractor {spec!r}: expected {_SPECS_HELP}")
    rest = rest.strip()
    if kind == "inception":
        return _load_inception(spec, rest, device, batch_size)
    if kind == "torchscript":
        return _load_torchscript(spec, rest, device, batch_size)
    if not rest:
        raise MetricModelError(f"{spec}: names no CLIP; pass clip:SPEC with a --clip-model spec (e.g. clip:ViT-B-32:openai, "
                               "clip:local:DIR)")
    clip = load_clip(rest, models_dir=models_dir, device=device, batch_size=batch_size)
    return clip_feature_extractor(clip, batch_size=batch_size)


# -- FID / KID ---------------------------------------------------------------------------------


def _feats(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"{name}: expected [N, D] features with N >= 2, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: features hold NaN or infinity")
    return a


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], sample covariance [D, D] with N - 1) of [N, D] features, float64: what FID compares
    (a reference set's stats can be computed once and kept)."""
    a = _feats(feats, "features")
    return a.mean(axis=0), np.atleast_2d(np.cov(a, rowvar=False))


def frechet_distance(mu_a, sigma_a, mu_b, sigma_b, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b), as pytorch-fid / clean-fid
    compute it (`eps` is added to both diagonals only when sqrtm's result is not finite)."""
    from scipy import linalg

    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != (mu_a.shape[0],) * 2:
        raise ValueError(f"mismatched shapes: mu {mu_a.shape} / {mu_b.shape}, sigma {sigma_a.shape} / {sigma_b.shape}")
    diff = mu_a - mu_b
    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():  # singular product (fewer samples than dimensions): pytorch-fid's fallback
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:  # pytorch-fid's tolerance
            raise ValueError(f"the covariances' product has a square root with imaginary part {imag:.3g} on its "
                             "diagonal: too few samples for the feature size")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))


def fid(feats_a, feats_b) -> float:
    """Fréchet distance between the Gaussians fitted to two [N, D] feature sets (FID with Inception
    features, FD_CLIP with CLIP's)."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3  # degree 3, gamma 1/D, coef 1 (Binkowski et al. 2018, §2.2)


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 estimate between two [m, D] sets under KID's polynomial kernel."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(feats_a, feats_b, subset_size: int = 1000, subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """(mean, standard deviation) of the unbiased MMD^2 over `subsets` random subsets of
    `subset_size` rows drawn without replacement from each set (torchmetrics' defaults and its
    population std). `subset_size` is capped at the smaller set's size, as clean-fid does. Seeded:
    the same inputs and seed give the same numbers."""
    a, b = _feats(feats_a, "feats_a"), _feats(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    if subset_size < 2 or subsets < 1:
        raise ValueError(f"need subset_size >= 2 and subsets >= 1, got {subset_size} and {subsets}")
    m = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    scores = np.array([mmd2_unbiased(a[rng.permutation(a.shape[0])[:m]], b[rng.permutation(b.shape[0])[:m]])
                       for _ in range(subsets)])
    return float(scores.mean()), float(scores.std())
