"""Continuous-time Gaussian diffusion for the cascade: schedule, training loss, samplers.

Notation (Kingma et al. 2021, "VDM"): z = alpha * x0 + sigma * eps with alpha^2 = sigmoid(logsnr),
sigma^2 = sigmoid(-logsnr), so alpha^2 + sigma^2 = 1 (variance preserving) and logsnr =
log(alpha^2 / sigma^2). Time t in [0, 1] maps to logsnr through the cosine schedule (Imagen §2.2,
Nichol & Dhariwal 2021) in log-SNR form, clipped to [logsnr_min, logsnr_max]: t = 0 is (almost)
clean, t = 1 is (almost) pure noise.

The model predicts eps or v = alpha * eps - sigma * x0 (Salimans & Ho 2022, §4); both convert to
(x0, eps) by the exact identities in `predict_x0_eps`, and the samplers only ever use (x0, eps), so
training target, schedule and sampler cannot drift apart -- the "samples of pure noise after
training" failure -- without the round-trip tests noticing.

    loss, logs = training_loss(model, x0, text, mask, cfg.diffusion, generator=g)
    images = sample(model, (4, 3, 64, 64), text, mask, steps=50, guidance_weight=5.0,
                    diffusion=cfg.diffusion)  # in [-1, 1]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from train.config import DiffusionConfig
from train.unet import CLEAN_AUG_LOGSNR

__all__ = [
    "alpha_sigma",
    "cfg_combine",
    "dynamic_threshold",
    "logsnr_cosine",
    "loss_weight",
    "lowres_skip",
    "lowres_skip_scale",
    "model_output",
    "noise_augment",
    "predict_x0_eps",
    "q_sample",
    "sample",
    "static_threshold",
    "training_loss",
    "training_target",
    "upsample_lowres",
]


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] (or scalar) -> [B, 1, 1, 1] to broadcast over an image batch."""
    v = torch.as_tensor(v, device=x.device)
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) if v.dim() else v.to(x.dtype)


def _randn(shape, generator, device, dtype=torch.float32):
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def _rand(shape, generator, device):
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def logsnr_cosine(t, logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> torch.Tensor:
    """Cosine schedule as log-SNR: alpha = cos(pi t / 2) gives logsnr = -2 log tan(pi t / 2);
    t is rescaled so logsnr(0) = logsnr_max and logsnr(1) = logsnr_min exactly (clipping the
    infinite ends, as in "simple diffusion", Hoogeboom et al. 2023, §2)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return -2.0 * torch.log(torch.tan(a * t + b))


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def q_sample(x0: torch.Tensor, logsnr: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z = alpha * x0 + sigma * noise (the forward process at noise level logsnr [B])."""
    alpha, sigma = alpha_sigma(logsnr)
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise


def training_target(x0: torch.Tensor, noise: torch.Tensor, logsnr: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the model regresses: eps, or v = alpha * eps - sigma * x0."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        alpha, sigma = alpha_sigma(logsnr)
        return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0
    raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")


def predict_x0_eps(z: torch.Tensor, model_out: torch.Tensor, logsnr: torch.Tensor, prediction: str):
    """(x0, eps) from the model's output at z. eps: x0 = (z - sigma eps) / alpha;
    v: x0 = alpha z - sigma v, eps = sigma z + alpha v (exact since alpha^2 + sigma^2 = 1)."""
    alpha, sigma = (_bcast(a, z) for a in alpha_sigma(logsnr))
    if prediction == "eps":
        return (z - sigma * model_out) / alpha, model_out
    if prediction == "v":
        return alpha * z - sigma * model_out, sigma * z + alpha * model_out
    raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")


def _skip_prior(logsnr: torch.Tensor, aug_logsnr: torch.Tensor, std: float):
    """(alpha, sigma, alpha_aug, s^2, D) of the low-res skip's Gaussian prior, broadcastable over
    an image batch: s^2 = std^2 + sigma_aug^2 (the guess a = alpha_aug * lowres is itself uncertain
    by the augmentation noise, so a destroyed low-res image, aug_level 1, gives the plain N(0, 1)
    prior instead of a confident wrong one) and D = alpha^2 s^2 + sigma^2."""
    alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in alpha_sigma(logsnr))
    alpha_aug, sigma_aug = (v.reshape(-1, 1, 1, 1) for v in alpha_sigma(aug_logsnr))
    s2 = float(std) ** 2 + sigma_aug * sigma_aug
    return alpha, sigma, alpha_aug, s2, alpha * alpha * s2 + sigma * sigma


def lowres_skip(z: torch.Tensor, logsnr: torch.Tensor, lowres: torch.Tensor, aug_logsnr: torch.Tensor,
                std: float) -> torch.Tensor:
    """The v an SR network with `unet.lowres_skip_std` adds to its own (scaled) output: the exact
    denoiser for x0 ~ N(a, s^2 I), where a = alpha_aug * lowres is the best linear guess of the
    clean upsampled low-res image from its noise-augmented version (= it at aug_level 0, 0 at 1)
    and s^2 = std^2 + sigma_aug^2 (`_skip_prior`):

        x0_hat = (sigma^2 a + alpha s^2 z) / D,   v = sigma (alpha (1 - s^2) z - a) / D,
        D = alpha^2 s^2 + sigma^2

    bounded at every noise level (D >= min(s^2, 1)). x0_hat moves from a (pure noise) to z
    (clean), so an untrained network already samples "the upsampled low-res image plus std-sized
    detail", and training learns the detail. The diffusion process, guidance and the samplers
    are unchanged: only what the network's raw output means is -- EDM's c_skip (Karras et al.
    2022, section 5), with `lowres_skip_scale` as its c_out. Why: without it a freshly initialised
    SR U-Net predicts noise-coloured x0 at high noise levels and, on a CPU budget, its samples
    drift far from the low-res image (held-out PSNR ~20 dB after 170 steps where bicubic gets 36).
    v-prediction only: the eps form divides by alpha -> 0 at pure noise."""
    alpha, sigma, alpha_aug, s2, d = _skip_prior(logsnr, aug_logsnr, std)
    return sigma * (alpha * (1.0 - s2) * z - alpha_aug * lowres) / d


def lowres_skip_scale(logsnr: torch.Tensor, aug_logsnr: torch.Tensor, std: float) -> torch.Tensor:
    """[B] scale c on the SR network's own v output when it has the low-res skip: v = skip + c * F.

    c = s / sqrt(D), so the x0 correction sigma * c * F is in units of the Gaussian prior's
    posterior std -- EDM's c_out (Karras et al. 2022, Table 1 with sigma_data = s). Where the skip
    is confident (a clean low-res image, small std) a half-trained network's output moves x0 by
    ~std, not by ~sigma: without this, the output of a network still learning the heavily
    augmented inputs adds sigma-sized errors to the clean ones. `loss_weighting: "edm"` regresses
    F itself (weight 1 / c^2): a unit-variance target where the prior's std is right, the same
    footing for every noise and augmentation level."""
    _, _, _, s2, d = _skip_prior(logsnr, aug_logsnr, std)
    return (s2 / d).sqrt().flatten()


def _unet_cfg(model):
    return getattr(getattr(model, "module", model), "cfg", None)


def _skip_std(model) -> float | None:
    return getattr(_unet_cfg(model), "lowres_skip_std", None)


def model_output(model, z: torch.Tensor, logsnr: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                 prediction: str, lowres: torch.Tensor | None = None, aug_logsnr: torch.Tensor | None = None):
    """The network's eps / v at z: its own output, or -- where its config has `lowres_skip_std` --
    `lowres_skip` plus `lowres_skip_scale` times its own output (v-prediction only)."""
    kwargs = {} if lowres is None else {"lowres": lowres, "aug_logsnr": aug_logsnr}
    out = model(z, logsnr, text, text_mask, **kwargs)
    std = _skip_std(model)
    if lowres is not None and std:
        if prediction != "v":
            raise ValueError("unet.lowres_skip_std needs diffusion.prediction 'v'")
        b = z.shape[0]
        lam = logsnr.expand(b) if logsnr.dim() == 0 else logsnr
        aug = aug_logsnr if aug_logsnr is not None else torch.full((b,), CLEAN_AUG_LOGSNR, device=z.device)
        aug = aug.expand(b) if aug.dim() == 0 else aug
        scale = _bcast(lowres_skip_scale(lam, aug, std), z)
        out = lowres_skip(z, lam, lowres, aug, std).to(out.dtype) + scale.to(out.dtype) * out
    return out


def loss_weight(logsnr: torch.Tensor, cfg: DiffusionConfig, skip_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weight on the MSE of the model's own target.

    Min-SNR-gamma (Hang et al. 2023, eq. 8-10) weights the x0-space error by min(SNR, gamma).
    Since ||eps - eps_hat||^2 = SNR * ||x0 - x0_hat||^2 and ||v - v_hat||^2 = (SNR + 1) *
    ||x0 - x0_hat||^2, that is min(SNR, gamma) / SNR on the eps loss and min(SNR, gamma) / (SNR + 1)
    on the v loss. "edm" (SR stages with the low-res skip) is 1 / skip_scale^2, skip_scale the
    batch's `lowres_skip_scale`: the MSE of the network's own output."""
    if cfg.loss_weighting == "none":
        return torch.ones_like(logsnr)
    if cfg.loss_weighting == "edm":
        if skip_scale is None:
            raise ValueError("diffusion.loss_weighting 'edm' needs an SR model with unet.lowres_skip_std")
        return skip_scale.pow(-2)
    snr = torch.exp(logsnr)
    clipped = snr.clamp(max=cfg.min_snr_gamma)
    return clipped / snr if cfg.prediction == "eps" else clipped / (snr + 1)


def noise_augment(lowres: torch.Tensor, aug_level, noise: torch.Tensor,
                  logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Imagen §2.5 noise conditioning augmentation: corrupt the low-res conditioning image with the
    same variance-preserving cosine schedule, z = alpha(aug) x + sigma(aug) eps, aug_level in [0, 1]
    (scalar or [B]). Returns (z, aug_logsnr [B]); aug_level 0 returns the image unchanged."""
    b = lowres.shape[0]
    aug = torch.as_tensor(aug_level, dtype=torch.float32, device=lowres.device)
    aug = aug.expand(b) if aug.dim() == 0 else aug
    if ((aug < 0) | (aug > 1)).any():
        raise ValueError("aug_level must be in [0, 1]")
    aug_logsnr = logsnr_cosine(aug, logsnr_min, logsnr_max).to(lowres.device)
    z = q_sample(lowres, aug_logsnr, noise)
    z = torch.where(_bcast(aug == 0, lowres).bool(), lowres, z)  # 0 means "not augmented", exactly
    return z, aug_logsnr


def upsample_lowres(lowres: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """The SR stage's conditioning at the output size (`mode` "bilinear" or "bicubic", the U-Net's
    `lowres_upsample`); a no-op when it is already that size."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(lowres.shape[-2:]) == size:
        return lowres
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"upsample mode must be 'bilinear' or 'bicubic', got {mode!r}")
    return F.interpolate(lowres, size=size, mode=mode, align_corners=False, antialias=False)


def _upsample_mode(model) -> str:
    return getattr(_unet_cfg(model), "lowres_upsample", "bilinear")


def training_loss(model, x0: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, cfg: DiffusionConfig,
                  lowres: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """(scalar loss, logs) for one batch of clean images x0 in [-1, 1].

    - t ~ U(0, 1), drawn low-discrepancy (VDM App. I.1: one uniform offset, B evenly spaced points):
      each batch covers the noise levels evenly, which matters at the small batches of CPU runs;
    - classifier-free guidance training (Imagen §2.3): with prob cond_drop_prob a sample's text is
      zeroed and its mask set all-False -- exactly what the sampler feeds as "unconditional";
    - SR: the low-res image is upsampled to x0's size and noise-augmented at aug_level ~
      U(0, noise_aug_train_max) -- or 0 with probability noise_aug_clean_prob -- the level passed
      to the model as aug_logsnr (Imagen §2.5);
    - loss: per-sample MSE of the eps / v target, weighted by `loss_weight` (min-SNR-gamma, or
      "edm": 1 / lowres_skip_scale^2, the MSE of the network's own output)."""
    b, device = x0.shape[0], x0.device
    t = (_rand((1,), generator, device) + torch.arange(b, device=device) / b) % 1.0
    logsnr = logsnr_cosine(t, cfg.logsnr_min, cfg.logsnr_max).to(device)
    noise = _randn(x0.shape, generator, device, x0.dtype)
    z = q_sample(x0, logsnr, noise)

    text_mask = text_mask.bool()
    drop = _rand((b,), generator, device) < cfg.cond_drop_prob
    text = text.masked_fill(drop[:, None, None], 0.0)
    text_mask = text_mask & ~drop[:, None]

    kwargs = {}
    if lowres is not None:
        lowres = upsample_lowres(lowres, x0.shape[-2:], _upsample_mode(model))
        aug = _rand((b,), generator, device) * cfg.noise_aug_train_max
        if cfg.noise_aug_clean_prob > 0:
            aug = aug.masked_fill(_rand((b,), generator, device) < cfg.noise_aug_clean_prob, 0.0)
        lowres, aug_logsnr = noise_augment(lowres, aug, _randn(lowres.shape, generator, device, lowres.dtype),
                                           cfg.logsnr_min, cfg.logsnr_max)
        kwargs = {"lowres": lowres, "aug_logsnr": aug_logsnr}

    out = model_output(model, z, logsnr, text, text_mask, cfg.prediction, **kwargs)
    target = training_target(x0, noise, logsnr, cfg.prediction)
    mse = (out.float() - target.float()).pow(2).flatten(1).mean(1)
    skip_scale = None
    if cfg.loss_weighting == "edm" and lowres is not None and _skip_std(model):
        skip_scale = lowres_skip_scale(logsnr, kwargs["aug_logsnr"], _skip_std(model))
    weight = loss_weight(logsnr, cfg, skip_scale)
    loss = (weight * mse).mean()
    logs = {"loss": loss.item(), "mse": mse.mean().item(), "cond_dropped": drop.float().mean().item()}
    return loss, logs


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance (Imagen §2.3): w * eps(z, c) + (1 - w) * eps(z); w = 1 is plain
    conditional sampling. Also right for v outputs: eps and x0 are affine in v with the same z."""
    return w * eps_cond + (1 - w) * eps_uncond


def _quantile_rows(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row linear-interpolated quantile of [B, N] (torch.quantile's definition) via kthvalue,
    which has no input-size limit (torch.quantile refuses > 16M elements: a 1024² batch)."""
    n = x.shape[1]
    pos = q * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    v_lo = x.kthvalue(lo + 1, dim=1).values
    if hi == lo:
        return v_lo
    v_hi = x.kthvalue(hi + 1, dim=1).values
    return v_lo + (v_hi - v_lo) * (pos - lo)


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Imagen §2.3: s = the `percentile` quantile of |x0| per sample (p = 99.5%), s = max(s, 1);
    x0 -> clip(x0, -s, s) / s. Samples already inside [-1, 1] are untouched."""
    s = _quantile_rows(x0.detach().abs().flatten(1).float(), percentile).clamp(min=1.0)
    s = _bcast(s, x0)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def static_threshold(x0: torch.Tensor) -> torch.Tensor:
    """Imagen §2.3: clip x0 to [-1, 1]."""
    return x0.clamp(-1.0, 1.0)


@torch.no_grad()
def sample(model, shape, text: torch.Tensor, text_mask: torch.Tensor, *, steps: int = 50, sampler: str = "ddim",
           guidance_weight: float = 1.0, threshold: str = "dynamic", lowres: torch.Tensor | None = None,
           aug_level: float = 0.25, generator: torch.Generator | None = None, eta: float = 0.0,
           progress: Callable[[dict], None] | None = None, diffusion: DiffusionConfig | None = None,
           dynamic_threshold_percentile: float = 0.995) -> torch.Tensor:
    """Images in [-1, 1] of `shape` [B, C, H, W] from pure noise, `steps` steps from t = 1 to 0.

    sampler "ddim" (Song et al. 2021; eta = 0 deterministic) or "ddpm" (ancestral: the exact
    posterior q(z_s | z_t, x0), which is DDIM at eta = 1; `eta` is ignored). Every step predicts x0,
    thresholds it (`threshold`: "dynamic" | "static" | "none") and re-derives eps from the
    thresholded x0, as Imagen does. guidance_weight w != 1 runs the conditional and unconditional
    (zero text, all-False mask) passes as one doubled batch. SR: `lowres` (any size; upsampled to
    shape) is noise-augmented once at `aug_level` and passed with its aug_logsnr.
    `diffusion` must be the config the model was trained with (prediction, logsnr range);
    None means DiffusionConfig() defaults (v-prediction, [-15, 15]).
    `progress`, if given, is called after each step with {"i", "steps", "z", "x0", "logsnr"}."""
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    if threshold not in ("dynamic", "static", "none"):
        raise ValueError(f"threshold must be 'dynamic', 'static' or 'none', got {threshold!r}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    cfg = diffusion or DiffusionConfig()
    eta = 1.0 if sampler == "ddpm" else float(eta)
    device = text.device
    b = shape[0]
    text_mask = text_mask.bool()
    guided = guidance_weight != 1.0
    if guided:
        text_in = torch.cat([text, torch.zeros_like(text)])
        mask_in = torch.cat([text_mask, torch.zeros_like(text_mask)])
    else:
        text_in, mask_in = text, text_mask
    kwargs = {}
    if lowres is not None:
        lowres = upsample_lowres(lowres.to(device), shape[-2:], _upsample_mode(model))
        lowres, aug_logsnr = noise_augment(lowres, aug_level, _randn(lowres.shape, generator, device, lowres.dtype),
                                           cfg.logsnr_min, cfg.logsnr_max)
        kwargs = {"lowres": lowres, "aug_logsnr": aug_logsnr}
        if guided:
            kwargs = {k: torch.cat([v, v]) for k, v in kwargs.items()}

    ts = torch.linspace(1.0, 0.0, steps + 1)
    logsnrs = logsnr_cosine(ts, cfg.logsnr_min, cfg.logsnr_max).to(device)
    z = _randn(shape, generator, device)
    for i in range(steps):
        lam, lam_next = logsnrs[i], logsnrs[i + 1]
        lam_b = lam.expand(b)
        if guided:
            out = model_output(model, torch.cat([z, z]), lam.expand(2 * b), text_in, mask_in, cfg.prediction,
                               **kwargs).float()
            out = cfg_combine(out[:b], out[b:], guidance_weight)
        else:
            out = model_output(model, z, lam_b, text_in, mask_in, cfg.prediction, **kwargs).float()
        x0, _ = predict_x0_eps(z, out, lam_b, cfg.prediction)
        if threshold == "dynamic":
            x0 = dynamic_threshold(x0, dynamic_threshold_percentile)
        elif threshold == "static":
            x0 = static_threshold(x0)
        alpha, sigma = alpha_sigma(lam)
        eps = (z - alpha * x0) / sigma  # consistent with the thresholded x0
        if i == steps - 1:
            z = x0  # the last step lands on t = 0: return the prediction itself
        else:
            alpha_n, sigma_n = alpha_sigma(lam_next)
            # Posterior variance of z_next given (z, x0): sigma_n^2 (1 - SNR / SNR_next).
            var = sigma_n ** 2 * -torch.expm1(lam - lam_next)
            c2 = (eta ** 2) * var
            z = alpha_n * x0 + (sigma_n ** 2 - c2).clamp(min=0).sqrt() * eps
            if eta > 0:
                z = z + c2.sqrt() * _randn(shape, generator, device)
        if progress is not None:
            progress({"i": i, "steps": steps, "z": z, "x0": x0, "logsnr": lam})
    return z.clamp(-1.0, 1.0)
