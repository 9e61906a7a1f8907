"""train/diffusion.py: schedule, thresholds, guidance, noise augmentation, loss and samplers.

The oracle tests pin the schedule, the training target and the samplers to each other: a model
that outputs the exact target for a known x0 must get zero loss and must be sampled back to that
x0 by both samplers with both parameterisations (the imagen-pytorch "pure noise after training"
failure is an inconsistency between exactly these three)."""

from __future__ import annotations

import math

import pytest
import torch

from train.config import DiffusionConfig, UNetConfig
from train.diffusion import (
    alpha_sigma,
    cfg_combine,
    dynamic_threshold,
    logsnr_cosine,
    loss_weight,
    lowres_skip,
    lowres_skip_scale,
    model_output,
    noise_augment,
    predict_x0_eps,
    q_sample,
    sample,
    static_threshold,
    training_loss,
    training_target,
    upsample_lowres,
)
from train.unet import EfficientUNet


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(lowres_cond=False, seed=0, nonzero_out=False, lowres_skip_std=None):
    cfg = UNetConfig(dim=8, dim_mults=(1, 2), num_res_blocks=(1, 1), attn_levels=(False, True),
                     cross_attn_levels=(False, False), heads=2, head_dim=8, text_dim=16, cond_dim=32,
                     lowres_cond=lowres_cond, lowres_skip_std=lowres_skip_std)
    torch.manual_seed(seed)
    model = EfficientUNet(cfg).eval()
    if nonzero_out:
        torch.nn.init.normal_(model.out_conv.weight, std=0.1)
    return model


def text_batch(b=2, length=6, d=16, n_real=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(b, length, d, generator=g)
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[:, :n_real] = True
    text[~mask] = 0.0
    return text, mask


# --- schedule ---------------------------------------------------------------------------------

def test_schedule_endpoints_and_monotone():
    assert logsnr_cosine(torch.tensor(0.0)).item() == pytest.approx(15.0, abs=1e-4)
    assert logsnr_cosine(torch.tensor(1.0)).item() == pytest.approx(-15.0, abs=1e-4)
    assert logsnr_cosine(torch.tensor(0.0), -10, 7).item() == pytest.approx(7.0, abs=1e-4)
    assert logsnr_cosine(torch.tensor(1.0), -10, 7).item() == pytest.approx(-10.0, abs=1e-4)
    assert logsnr_cosine(torch.tensor(0.5)).item() == pytest.approx(0.0, abs=1e-3)  # cosine: t = 1/2 is SNR 1
    t = torch.linspace(0, 1, 1001)
    lam = logsnr_cosine(t)
    assert (lam[1:] < lam[:-1]).all()
    alpha, sigma = alpha_sigma(lam)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(lam))
    torch.testing.assert_close(alpha ** 2 / sigma ** 2, lam.exp(), rtol=1e-4, atol=0)
    # inside the clipping, it is the cosine schedule: alpha = cos(pi t / 2)
    mid = (t > 0.05) & (t < 0.95)
    torch.testing.assert_close(alpha[mid], torch.cos(math.pi * t[mid] / 2), atol=2e-3, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_prediction_conversions_are_exact(prediction):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    logsnr = torch.tensor([-12.0, -3.0, 0.0, 4.0, 12.0], dtype=torch.float64)
    z = q_sample(x0, logsnr, noise)
    target = training_target(x0, noise, logsnr, prediction)
    x0_hat, eps_hat = predict_x0_eps(z, target, logsnr, prediction)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-8 if prediction == "v" else 1e-5)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-10)
    if prediction == "v":
        alpha, sigma = alpha_sigma(logsnr)
        torch.testing.assert_close(target, alpha[:, None, None, None] * noise - sigma[:, None, None, None] * x0)


def test_min_snr_weights():
    lam = torch.tensor([0.0, math.log(100.0), math.log(0.01)])
    v = loss_weight(lam, DiffusionConfig(prediction="v"))
    eps = loss_weight(lam, DiffusionConfig(prediction="eps"))
    # x0-space weight min(SNR, 5), divided by SNR + 1 (v) or SNR (eps)
    torch.testing.assert_close(v, torch.tensor([0.5, 5 / 101, 0.01 / 1.01]))
    torch.testing.assert_close(eps, torch.tensor([1.0, 0.05, 1.0]))
    torch.testing.assert_close(loss_weight(lam, DiffusionConfig(loss_weighting="none")), torch.ones(3))


# --- thresholding, guidance, noise augmentation ---------------------------------------------------

def test_dynamic_threshold_leaves_in_range_samples_alone():
    x = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    assert torch.equal(dynamic_threshold(x), x)


def test_dynamic_threshold_clips_and_rescales_per_sample():
    inside = torch.linspace(-0.9, 0.9, 200)
    big = torch.linspace(-4.0, 4.0, 200)  # |x| 99.5th percentile well above 1
    x = torch.stack([inside, big]).reshape(2, 2, 10, 10)
    s = torch.quantile(big.abs(), 0.995).item()
    assert s > 3.9
    out = dynamic_threshold(x)
    assert torch.equal(out[0], x[0])  # independent of the other sample's scale
    torch.testing.assert_close(out[1], x[1].clamp(-s, s) / s)
    assert out[1].abs().max().item() == pytest.approx(1.0)
    # percentile is a parameter: p = 0.5 gives s = median |x| of the sample
    s50 = torch.quantile(big.abs(), 0.5).item()
    torch.testing.assert_close(dynamic_threshold(x, 0.5)[1], x[1].clamp(-s50, s50) / s50)


def test_dynamic_threshold_quantile_matches_torch():
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 3
    s = torch.quantile(x.abs().flatten(1), 0.995, dim=1).clamp(min=1)[:, None, None, None]
    torch.testing.assert_close(dynamic_threshold(x), x.clamp(-s, s) / s)


def test_static_threshold():
    x = torch.tensor([[-3.0, -1.0, -0.5, 0.0, 0.7, 1.0, 2.5]])
    assert torch.equal(static_threshold(x), torch.tensor([[-1.0, -1.0, -0.5, 0.0, 0.7, 1.0, 1.0]]))


def test_cfg_combine():
    c, u = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([0.5, -1.0, 4.0])
    assert torch.equal(cfg_combine(c, u, 1.0), c)
    assert torch.equal(cfg_combine(c, u, 0.0), u)
    torch.testing.assert_close(cfg_combine(c, u, 3.0), 3 * c - 2 * u)
    # linear in w
    torch.testing.assert_close(cfg_combine(c, u, 2.0) - cfg_combine(c, u, 1.0), cfg_combine(c, u, 3.0) - cfg_combine(c, u, 2.0))


def test_noise_augment_levels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)  # unit variance
    noise = torch.randn(4, 3, 32, 32, generator=g)
    z0, lam0 = noise_augment(x, 0.0, noise)
    assert torch.equal(z0, x) and torch.allclose(lam0, torch.full((4,), 15.0))
    z1, lam1 = noise_augment(x, 1.0, noise)
    assert torch.allclose(lam1, torch.full((4,), -15.0))
    assert (z1 - noise).abs().max() < 2e-3 * x.abs().max() + 1e-6  # nearly pure noise
    for level in (0.25, 0.5, 0.75):
        z, lam = noise_augment(x, level, noise)
        torch.testing.assert_close(lam, logsnr_cosine(torch.full((4,), level)))
        assert z.var().item() == pytest.approx(1.0, abs=0.05)  # variance preserving
    # per-sample levels
    z, lam = noise_augment(x, torch.tensor([0.0, 0.3, 0.6, 1.0]), noise)
    assert torch.equal(z[0], x[0]) and lam[1] > lam[2] > lam[3]
    with pytest.raises(ValueError):
        noise_augment(x, 1.5, noise)


def test_upsample_lowres():
    x = torch.randn(2, 3, 8, 8)
    assert upsample_lowres(x, 8) is x
    assert upsample_lowres(x, (16, 16)).shape == (2, 3, 16, 16)
    for mode in ("bilinear", "bicubic"):
        torch.testing.assert_close(upsample_lowres(x, 16, mode), torch.nn.functional.interpolate(x, size=16, mode=mode))
    assert not torch.allclose(upsample_lowres(x, 16, "bicubic"), upsample_lowres(x, 16))
    with pytest.raises(ValueError, match="bicubic"):
        upsample_lowres(x, 16, "nearest")


# --- training loss ----------------------------------------------------------------------------------

class Oracle(torch.nn.Module):
    """Knows x0 and outputs the exact eps / v target for any z: the ideal denoiser of a point mass."""

    def __init__(self, x0, prediction):
        super().__init__()
        self.x0, self.prediction, self.calls = x0, prediction, []

    def forward(self, z, logsnr, text, text_mask, lowres=None, aug_logsnr=None):
        self.calls.append(dict(z=z, logsnr=logsnr, text=text, text_mask=text_mask, lowres=lowres, aug_logsnr=aug_logsnr))
        x0 = self.x0[: z.shape[0]] if self.x0.shape[0] >= z.shape[0] else self.x0.repeat(2, 1, 1, 1)
        alpha, sigma = (a.reshape(-1, 1, 1, 1) for a in alpha_sigma(logsnr.double()))
        eps = (z.double() - alpha * x0.double()) / sigma
        out = eps if self.prediction == "eps" else alpha * eps - sigma * x0.double()
        return out.float()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_oracle_has_zero_loss(prediction):
    x0 = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    text, mask = text_batch(8)
    loss, logs = training_loss(Oracle(x0, prediction), x0, text, mask, DiffusionConfig(prediction=prediction),
                               generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-6 and set(logs) >= {"loss", "mse"}


def test_training_loss_cond_drop_and_timesteps():
    b = 64
    x0 = torch.zeros(b, 3, 4, 4)
    text, mask = text_batch(b)
    oracle = Oracle(x0, "v")
    training_loss(oracle, x0, text, mask, DiffusionConfig(cond_drop_prob=0.5), generator=torch.Generator().manual_seed(3))
    call = oracle.calls[0]
    dropped = ~call["text_mask"].any(1)
    assert 10 < dropped.sum() < 54
    assert (call["text"][dropped] == 0).all()
    torch.testing.assert_close(call["text"][~dropped], text[~dropped])
    assert torch.equal(call["text_mask"][~dropped], mask[~dropped])
    # t is low-discrepancy uniform: one sample per 1/B bin of [0, 1]
    lam = call["logsnr"]
    assert lam.max() <= 15 and lam.min() >= -15
    t_sorted = torch.sort(torch.tensor([0.0]).new_tensor(
        [_t_of_logsnr(v) for v in lam.tolist()])).values
    assert ((t_sorted * b).floor() == torch.arange(b)).all()
    assert call["lowres"] is None and call["aug_logsnr"] is None


def _t_of_logsnr(lam, lo=-15.0, hi=15.0):
    b = math.atan(math.exp(-0.5 * hi))
    a = math.atan(math.exp(-0.5 * lo)) - b
    return (math.atan(math.exp(-0.5 * lam)) - b) / a


def test_training_loss_sr_noise_augmentation():
    b = 32
    x0 = torch.rand(b, 3, 16, 16) * 2 - 1
    low = torch.nn.functional.avg_pool2d(x0, 2)  # 8x8: upsampled inside
    text, mask = text_batch(b)
    oracle = Oracle(x0, "v")
    cfg = DiffusionConfig(noise_aug_train_max=0.5)
    loss, _ = training_loss(oracle, x0, text, mask, cfg, lowres=low, generator=torch.Generator().manual_seed(0))
    call = oracle.calls[0]
    assert call["lowres"].shape == x0.shape and call["aug_logsnr"].shape == (b,)
    # aug_level ~ U(0, 0.5): logsnr >= logsnr_cosine(0.5) = 0
    assert call["aug_logsnr"].min() >= -1e-4 and call["aug_logsnr"].std() > 1
    assert loss.item() < 1e-6


class BicubicOracle(Oracle):
    """An Oracle whose config asks for bicubic low-res upsampling, as a U-Net's would."""

    cfg = UNetConfig(dim=8, dim_mults=(1,), num_res_blocks=(1,), attn_levels=(False,), cross_attn_levels=(False,),
                     heads=1, head_dim=8, text_dim=16, cond_dim=8, lowres_cond=True, lowres_upsample="bicubic")


def test_training_loss_and_sampler_upsample_as_the_model_asks():
    b = 4
    x0 = torch.rand(b, 3, 16, 16) * 2 - 1
    low = torch.nn.functional.avg_pool2d(x0, 2)
    text, mask = text_batch(b)
    bicubic = torch.nn.functional.interpolate(low, size=16, mode="bicubic")
    for oracle, want in ((BicubicOracle(x0, "v"), bicubic), (Oracle(x0, "v"), upsample_lowres(low, 16))):
        training_loss(oracle, x0, text, mask, DiffusionConfig(noise_aug_train_max=0.0), lowres=low,
                      generator=torch.Generator().manual_seed(0))
        sample(oracle, x0.shape, text, mask, steps=2, lowres=low, aug_level=0.0, generator=torch.Generator().manual_seed(0))
        for call in oracle.calls:
            torch.testing.assert_close(call["lowres"], want)


def test_training_loss_clean_prob_leaves_that_share_unaugmented():
    b = 64
    x0 = torch.rand(b, 3, 8, 8) * 2 - 1
    low = torch.nn.functional.avg_pool2d(x0, 2)
    up = upsample_lowres(low, 8)
    text, mask = text_batch(b)
    clean_logsnr = logsnr_cosine(torch.tensor(0.0))
    for p in (0.0, 0.5, 1.0):
        oracle = Oracle(x0, "v")
        training_loss(oracle, x0, text, mask, DiffusionConfig(noise_aug_train_max=1.0, noise_aug_clean_prob=p),
                      lowres=low, generator=torch.Generator().manual_seed(0))
        call = oracle.calls[0]
        clean = call["aug_logsnr"] == clean_logsnr
        assert torch.equal(call["lowres"][clean], up[clean])
        assert (call["lowres"][~clean] != up[~clean]).any(dim=(1, 2, 3)).all()
        assert {0.0: clean.sum() == 0, 0.5: 16 < clean.sum() < 48, 1.0: clean.all()}[p], (p, clean.sum())


def test_training_loss_deterministic_with_generator_and_backprops():
    model = tiny_unet(nonzero_out=True).train()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    text, mask = text_batch(4)
    cfg = DiffusionConfig()
    l1, _ = training_loss(model, x0, text, mask, cfg, generator=torch.Generator().manual_seed(7))
    l2, _ = training_loss(model, x0, text, mask, cfg, generator=torch.Generator().manual_seed(7))
    l3, _ = training_loss(model, x0, text, mask, cfg, generator=torch.Generator().manual_seed(8))
    assert l1.item() == l2.item() != l3.item()
    l1.backward()
    assert model.text_proj.weight.grad is not None and model.text_proj.weight.grad.abs().sum() > 0


# --- samplers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_samplers_recover_the_oracle_image(sampler, prediction):
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    text, mask = text_batch(2)
    out = sample(Oracle(x0, prediction), x0.shape, text, mask, steps=10, sampler=sampler,
                 generator=torch.Generator().manual_seed(0), diffusion=DiffusionConfig(prediction=prediction))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_ddpm_marginals_match_the_forward_process():
    """Ancestral steps with the oracle keep z at the forward marginal: z_t = alpha_t x0 + sigma_t eps."""
    x0 = torch.full((256, 1, 4, 4), 0.5)
    text, mask = text_batch(256)
    seen = []
    sample(Oracle(x0, "v"), x0.shape, text, mask, steps=8, sampler="ddpm", threshold="none",
           generator=torch.Generator().manual_seed(0), progress=seen.append)
    step = seen[3]  # z after step 3 sits at logsnr of t = 1 - 4/8
    lam = logsnr_cosine(torch.tensor(0.5))
    alpha, sigma = alpha_sigma(lam)
    eps = (step["z"] - alpha * 0.5) / sigma
    assert eps.mean().abs() < 0.05 and eps.std().item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("threshold", ["dynamic", "static", "none"])
def test_samplers_run_with_a_unet(sampler, threshold):
    model = tiny_unet(nonzero_out=True)
    text, mask = text_batch(2)
    out = sample(model, (2, 3, 8, 8), text, mask, steps=3, sampler=sampler, guidance_weight=3.0,
                 threshold=threshold, generator=torch.Generator().manual_seed(0), eta=0.5)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1


def test_sr_sampling_noise_augments_the_lowres_once():
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    text, mask = text_batch(2)
    oracle = Oracle(x0, "v")
    low = torch.nn.functional.avg_pool2d(x0, 2)
    sample(oracle, x0.shape, text, mask, steps=3, lowres=low, aug_level=0.2, guidance_weight=2.0,
           generator=torch.Generator().manual_seed(0))
    first = oracle.calls[0]
    assert first["lowres"].shape == (4, 3, 8, 8)  # upsampled, doubled for guidance
    torch.testing.assert_close(first["aug_logsnr"], logsnr_cosine(torch.full((4,), 0.2)))
    assert all(torch.equal(c["lowres"], first["lowres"]) for c in oracle.calls)
    # a real SR U-Net runs too
    out = sample(tiny_unet(lowres_cond=True, nonzero_out=True), (2, 3, 8, 8), text, mask, steps=2, lowres=low,
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_guidance_uses_one_doubled_batch_with_an_unconditional_half():
    x0 = torch.zeros(3, 3, 4, 4)
    text, mask = text_batch(3)
    oracle = Oracle(x0, "v")
    sample(oracle, x0.shape, text, mask, steps=2, guidance_weight=4.0)
    call = oracle.calls[0]
    assert len(oracle.calls) == 2 and call["z"].shape[0] == 6
    assert torch.equal(call["z"][:3], call["z"][3:])
    assert torch.equal(call["text"][:3], text) and (call["text"][3:] == 0).all()
    assert torch.equal(call["text_mask"][:3], mask) and not call["text_mask"][3:].any()
    oracle = Oracle(x0, "v")
    sample(oracle, x0.shape, text, mask, steps=2, guidance_weight=1.0)
    assert oracle.calls[0]["z"].shape[0] == 3  # w = 1: no unconditional pass at all


def test_guidance_pushes_away_from_unconditional():
    """eps~ = w eps_c + (1 - w) eps_u: with w = 2 the x0 estimate is 2 x0_c - x0_u."""

    class TwoWay(torch.nn.Module):
        def forward(self, z, logsnr, text, text_mask, lowres=None, aug_logsnr=None):
            target = torch.where(text_mask.any(1), 0.4, 0.1).reshape(-1, 1, 1, 1).expand_as(z)
            return Oracle(target, "v")(z, logsnr, text, text_mask)

    text, mask = text_batch(2)
    out = sample(TwoWay(), (2, 3, 4, 4), text, mask, steps=4, guidance_weight=2.0, threshold="none")
    torch.testing.assert_close(out, torch.full_like(out, 0.7), atol=1e-4, rtol=0)


def test_sampling_is_deterministic_with_a_generator():
    model = tiny_unet(nonzero_out=True)
    text, mask = text_batch(2)
    runs = [sample(model, (2, 3, 8, 8), text, mask, steps=3, sampler="ddpm", generator=torch.Generator().manual_seed(s))
            for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_fresh_model_predicts_zero_and_ddim_from_it_is_stable():
    model = tiny_unet()
    text, mask = text_batch(2)
    z = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(z, torch.zeros(2), text, mask), torch.zeros_like(z))
    # v = 0 is the ideal denoiser for x0 ~ N(0, I): x0_hat = alpha z, and DDIM keeps z at unit scale
    # (z_next = (alpha_next alpha + sigma_next sigma) z) -- no blow-up, no drift, no colour cast.
    for prediction, threshold in (("v", "none"), ("v", "dynamic"), ("eps", "dynamic"), ("eps", "static")):
        seen = []
        out = sample(model, (2, 3, 8, 8), text, mask, steps=10, threshold=threshold, guidance_weight=5.0,
                     generator=torch.Generator().manual_seed(0), progress=seen.append,
                     diffusion=DiffusionConfig(prediction=prediction))
        assert torch.isfinite(out).all() and out.abs().max() <= 1
        assert all(torch.isfinite(s["z"]).all() and s["z"].abs().max() < 5 for s in seen)
        assert out.mean().abs() < 0.2


def test_progress_and_argument_checks():
    text, mask = text_batch(1)
    seen = []
    sample(Oracle(torch.zeros(1, 3, 4, 4), "v"), (1, 3, 4, 4), text, mask, steps=4, progress=seen.append)
    assert [s["i"] for s in seen] == [0, 1, 2, 3] and seen[-1]["steps"] == 4
    with pytest.raises(ValueError, match="sampler"):
        sample(Oracle(torch.zeros(1, 3, 4, 4), "v"), (1, 3, 4, 4), text, mask, sampler="euler")
    with pytest.raises(ValueError, match="threshold"):
        sample(Oracle(torch.zeros(1, 3, 4, 4), "v"), (1, 3, 4, 4), text, mask, threshold="soft")


# --- SR low-res skip ----------------------------------------------------------------------------


@pytest.mark.parametrize("std", [0.05, 0.3, 1.0])
def test_lowres_skip_is_the_gaussian_denoiser(std):
    """The skip's x0 is the posterior mean of x0 ~ N(a, std^2) given z, at every noise level;
    finite at the schedule's ends; a at pure noise, z when clean."""
    prediction = "v"
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    z = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    clean = torch.full((4,), 15.0, dtype=torch.float64)  # aug_level 0: alpha_aug ~ 1
    for lam in (-15.0, -3.0, 0.0, 2.5, 15.0):
        logsnr = torch.full((4,), lam, dtype=torch.float64)
        out = lowres_skip(z, logsnr, a, clean, std)
        assert torch.isfinite(out).all() and out.abs().max() < 10 / std
        x0, _ = predict_x0_eps(z, out, logsnr, prediction)
        alpha, sigma = (v[0].item() for v in alpha_sigma(logsnr))
        a_hat = a * alpha_sigma(clean)[0][0]
        s2 = std**2 + alpha_sigma(clean)[1][0].item() ** 2
        d = alpha**2 * s2 + sigma**2
        torch.testing.assert_close(x0, (sigma**2 * a_hat + alpha * s2 * z) / d, rtol=1e-6, atol=1e-6 / alpha)
    lo, hi = torch.full((4,), -15.0, dtype=torch.float64), torch.full((4,), 15.0, dtype=torch.float64)
    torch.testing.assert_close(predict_x0_eps(z, lowres_skip(z, lo, a, clean, std), lo, prediction)[0],
                               a, atol=5e-3, rtol=0)
    torch.testing.assert_close(predict_x0_eps(z, lowres_skip(z, hi, a, clean, std), hi, prediction)[0],
                               z, atol=1e-3, rtol=0)
    # A fully augmented low-res image (aug_level 1) carries nothing: the skip guesses a = 0 with
    # the plain N(0, 1 + std^2) prior's uncertainty, not std's.
    noisy = torch.full((4,), -15.0, dtype=torch.float64)
    x0 = predict_x0_eps(z, lowres_skip(z, lo, a, noisy, std), lo, prediction)[0]
    assert x0.abs().max() < 0.01
    mid = torch.zeros(4, dtype=torch.float64)  # alpha = sigma: x0_hat = s^2 z / (alpha (1 + s^2))
    x0 = predict_x0_eps(z, lowres_skip(z, mid, a, noisy, std), mid, prediction)[0]
    s2 = 1 + std**2
    torch.testing.assert_close(x0, s2 * z / (0.5**0.5 * (1 + s2)), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_fresh_sr_unet_with_lowres_skip_samples_the_upsampled_lowres(sampler):
    """A fresh SR U-Net (zero output conv) with the skip samples N(upsampled low-res, std^2):
    at a small std that is the upsampled input; without the skip it is noise-coloured."""
    g = torch.Generator().manual_seed(1)
    lowres = torch.rand(2, 3, 4, 4, generator=g) * 1.6 - 0.8
    text, mask = text_batch(2)
    up = upsample_lowres(lowres, 8)
    kw = dict(steps=20, sampler=sampler, lowres=lowres, aug_level=0.0, threshold="none")
    with_skip = sample(tiny_unet(lowres_cond=True, lowres_skip_std=0.01), (2, 3, 8, 8), text, mask,
                       generator=torch.Generator().manual_seed(0), **kw)
    plain = sample(tiny_unet(lowres_cond=True), (2, 3, 8, 8), text, mask, generator=torch.Generator().manual_seed(0), **kw)
    assert (with_skip - up).abs().max() < 0.06
    assert (plain - up).abs().mean() > 0.3


def test_lowres_skip_is_an_sr_option():
    with pytest.raises(ValueError, match="lowres_skip_std"):
        tiny_unet(lowres_cond=False, lowres_skip_std=0.1)
    with pytest.raises(ValueError, match="lowres_skip_std"):
        tiny_unet(lowres_cond=True, lowres_skip_std=0.0)


def test_lowres_skip_scale_is_the_priors_posterior_std():
    """sigma * c (the x0 correction per unit of network output) is the posterior std of x0 under
    N(a, s^2), s^2 = std^2 + sigma_aug^2: ~std where the clean skip is confident, -> 0 at t = 0."""
    lam = logsnr_cosine(torch.tensor([0.02, 0.1, 0.5, 0.9, 1.0]))
    clean = torch.full((5,), 15.0)
    for std in (0.01, 0.1):
        alpha, sigma = alpha_sigma(lam)
        s2 = std**2 + torch.sigmoid(torch.tensor(-15.0))  # "clean" is aug logsnr 15: sigma_aug^2 = 3e-7
        post_std = sigma * s2.sqrt() / (alpha**2 * s2 + sigma**2).sqrt()
        torch.testing.assert_close(sigma * lowres_skip_scale(lam, clean, std), post_std, rtol=1e-4, atol=1e-7)
        assert (sigma * lowres_skip_scale(lam, clean, std) <= s2.sqrt() * 1.0001).all()
    # an augmented low-res image widens the prior: aug_level 1 gives c ~ 1 (plain v-prediction)
    torch.testing.assert_close(lowres_skip_scale(lam, logsnr_cosine(torch.ones(5)), 0.01), torch.ones(5), atol=1e-3, rtol=0)


class SkipResidualOracle(torch.nn.Module):
    """An SR "network" with the skip that outputs the exact residual target F* plus a known delta."""

    def __init__(self, x0, std, delta):
        super().__init__()
        self.x0, self.delta = x0, delta
        self.cfg = UNetConfig(dim=8, dim_mults=(1,), num_res_blocks=(1,), attn_levels=(False,), cross_attn_levels=(False,),
                              heads=1, head_dim=8, text_dim=16, cond_dim=8, lowres_cond=True, lowres_skip_std=std)

    def forward(self, z, logsnr, text, text_mask, lowres=None, aug_logsnr=None):
        z, x0 = z.double(), self.x0.double()
        alpha, sigma = (a.reshape(-1, 1, 1, 1) for a in alpha_sigma(logsnr.double()))
        v = alpha * (z - alpha * x0) / sigma - sigma * x0
        skip = lowres_skip(z, logsnr.double(), lowres.double(), aug_logsnr.double(), self.cfg.lowres_skip_std)
        c = lowres_skip_scale(logsnr.double(), aug_logsnr.double(), self.cfg.lowres_skip_std).reshape(-1, 1, 1, 1)
        return ((v - skip) / c).float() + self.delta


def test_edm_loss_is_the_mse_of_the_networks_own_output():
    """loss_weighting "edm": the loss is ||F - F*||^2 whatever the noise and augmentation level."""
    b = 16
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(b, 3, 8, 8, generator=g) * 2 - 1
    low = torch.nn.functional.avg_pool2d(x0, 2)
    text, mask = text_batch(b)
    cfg = DiffusionConfig(loss_weighting="edm", noise_aug_clean_prob=0.5)
    zero = SkipResidualOracle(x0, 0.01, torch.zeros(b, 3, 8, 8))
    loss, _ = training_loss(zero, x0, text, mask, cfg, lowres=low, generator=torch.Generator().manual_seed(1))
    assert loss.item() < 1e-6
    delta = torch.randn(b, 3, 8, 8, generator=g) * 0.3
    loss, _ = training_loss(SkipResidualOracle(x0, 0.01, delta), x0, text, mask, cfg, lowres=low,
                            generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss, delta.pow(2).mean(), rtol=2e-3, atol=0)
    with pytest.raises(ValueError, match="edm"):  # a base model has no skip to weight by
        training_loss(Oracle(x0, "v"), x0, text, mask, cfg, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="prediction 'v'"):
        model_output(zero, x0, logsnr_cosine(torch.full((b,), 0.5)), text, mask, "eps", lowres=upsample_lowres(low, 8),
                     aug_logsnr=torch.full((b,), 15.0))
