"""train/unet.py: shapes for every preset (shrunk), the Efficient U-Net layout, text conditioning."""

from __future__ import annotations

import math
import re

import pytest
import torch

from train.config import UNetConfig, load_config
from train.unet import SKIP_SCALE, EfficientUNet, ResBlock

pytestmark = pytest.mark.usefixtures("one_thread")


SHRINK = {"unet.dim": 8, "unet.text_dim": 16, "unet.cond_dim": 32, "unet.heads": 2, "unet.head_dim": 8}


def build(cfg: UNetConfig, seed=0, nonzero_out=True) -> EfficientUNet:
    torch.manual_seed(seed)
    model = EfficientUNet(cfg).eval()
    if nonzero_out:  # the output conv is zero-initialised; most checks need a live output
        torch.nn.init.normal_(model.out_conv.weight, std=0.1)
    return model


def tiny_cfg(**kw) -> UNetConfig:
    base = dict(dim=8, dim_mults=(1, 2, 2), num_res_blocks=(1, 1, 2), attn_levels=(False, True, True),
                cross_attn_levels=(False, False, False), heads=2, head_dim=8, text_dim=16, cond_dim=32)
    return UNetConfig(**{**base, **kw})


def inputs(b=2, res=16, length=6, d=16, n_real=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, res, res, generator=g)
    logsnr = torch.linspace(-5, 5, b)
    text = torch.randn(b, length, d, generator=g)
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[:, :n_real] = True
    return x, logsnr, text, mask


@pytest.mark.parametrize("name", ["tiny-base", "tiny-sr", "base64", "sr256", "sr1024"])
def test_preset_shapes_at_tiny_size(name):
    cfg = load_config(name, SHRINK if not name.startswith("tiny") else {})
    model = build(cfg.unet)
    res = 16 if len(cfg.unet.dim_mults) <= 3 else 32
    x, logsnr, text, mask = inputs(res=res, d=cfg.unet.text_dim)
    kw = {}
    if cfg.stage == "sr":
        kw = {"lowres": torch.randn_like(x), "aug_logsnr": torch.tensor([2.0, 8.0])}
    out = model(x, logsnr, text, mask, **kw)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_big_preset_param_counts_on_meta_device(capsys):
    counts = {}
    for name in ("base64", "sr256", "sr1024", "tiny-base", "tiny-sr"):
        cfg = load_config(name)
        with torch.device("meta"):
            model = EfficientUNet(cfg.unet)
        counts[name] = model.num_params()
        # the preset's doc states its parameter count; keep it true
        stated = re.search(r"([\d,]+) parameters", cfg.doc).group(1)
        assert int(stated.replace(",", "")) == counts[name], name
    with capsys.disabled():
        print("\n" + "  ".join(f"{k}: {v / 1e6:,.1f}M" for k, v in counts.items()))
    assert 1.5e9 < counts["base64"] < 2.2e9  # Imagen base: 2B
    assert 5e8 < counts["sr256"] < 7e8  # Imagen 64->256: 600M
    assert 4e8 < counts["sr1024"] < 7e8  # Imagen 256->1024: 400M
    assert counts["tiny-base"] < 6e6


def test_fresh_model_outputs_exact_zeros():
    model = build(tiny_cfg(), nonzero_out=False)
    x, logsnr, text, mask = inputs()
    assert torch.equal(model(x, logsnr, text, mask), torch.zeros_like(x))


def test_resblock_skip_is_scaled_by_inverse_sqrt2():
    block = ResBlock(8, 8, cond_dim=4)
    x, cond = torch.randn(2, 8, 5, 5), torch.randn(2, 4)
    # residual branch forced to zero: the block passes x through its identity shortcut, times 1/sqrt(2)
    torch.nn.init.zeros_(block.conv2.weight), torch.nn.init.zeros_(block.conv2.bias)
    torch.testing.assert_close(block(x, cond), x / math.sqrt(2))
    # residual branch forced to equal the shortcut: (x + x) / sqrt(2) = sqrt(2) x
    block.conv2 = torch.nn.Identity()
    block.conv1 = torch.nn.Identity()
    block.film = torch.nn.Linear(4, 16)
    torch.nn.init.zeros_(block.film.weight), torch.nn.init.zeros_(block.film.bias)
    block.norm2 = torch.nn.Identity()
    block.norm1 = torch.nn.Identity()
    x = torch.rand(2, 8, 5, 5) + 0.1  # positive: silu(x) != x, so use the combine rule directly too
    h = torch.nn.functional.silu(torch.nn.functional.silu(x))
    torch.testing.assert_close(block(x, cond), (h + x) * SKIP_SCALE)
    a, b = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(ResBlock.combine(a, b), (a + b) / math.sqrt(2))
    assert SKIP_SCALE == pytest.approx(1 / math.sqrt(2))


def test_unet_skip_connections_are_scaled_and_concatenated():
    model = build(tiny_cfg())
    seen = {}
    model.down[0].blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("down", o))
    model.up[-1].blocks[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("up_in", i[0]))
    model(*inputs())
    ch = model.down[0].blocks[-1].conv2.out_channels
    torch.testing.assert_close(seen["up_in"][:, ch:], seen["down"] * SKIP_SCALE)


def test_efficient_unet_resampling_order():
    """Down levels downsample before their blocks; up levels upsample after theirs: every residual
    block of level i, down or up, runs at res / 2**i."""
    cfg = tiny_cfg()
    model = build(cfg)
    sizes = []
    for path in ("down", "up"):
        for li, level in enumerate(getattr(model, path)):
            i = li if path == "down" else len(cfg.dim_mults) - 1 - li
            for block in level.blocks:
                block.register_forward_pre_hook(lambda m, inp, i=i: sizes.append((i, inp[0].shape[-1])))
    model(*inputs(res=16))
    assert sizes and all(size == 16 // 2 ** i for i, size in sizes)
    assert len(model.down[-1].blocks) == 2 and len(model.down[0].blocks) == 1  # per-level block counts


def test_attention_placement():
    m = build(tiny_cfg(attn_levels=(False, False, True), cross_attn_levels=(False, True, False)))
    assert m.down[0].self_attn is None and m.down[0].cross_attn is None
    assert m.down[1].self_attn is None and m.down[1].cross_attn is not None
    assert m.down[2].self_attn is not None and m.mid.self_attn is not None
    assert not m.down[1].cross_attn[0].self_attn and m.down[2].self_attn[0].self_attn
    # sr1024 layout: no self-attention anywhere
    sr1024 = build(load_config("sr1024", SHRINK).unet)
    assert not any(isinstance(mod, torch.nn.Module) and getattr(mod, "to_kv", None) is not None
                   for mod in sr1024.modules())


def test_text_mask_is_honoured():
    model = build(tiny_cfg())
    x, logsnr, text, mask = inputs()
    out = model(x, logsnr, text, mask)
    garbage = text.clone()
    garbage[~mask] = torch.randn_like(garbage[~mask]) * 100
    torch.testing.assert_close(model(x, logsnr, garbage, mask), out, rtol=0, atol=1e-6)
    # real tokens do matter
    changed = text.clone()
    changed[:, 0] += torch.randn(16)  # (a constant shift would vanish in the LayerNorm)
    assert (model(x, logsnr, changed, mask) - out).abs().max() > 1e-4


def test_unconditional_path():
    model = build(tiny_cfg(cross_attn_levels=(False, False, True)))  # cross-attn sees only text + null token
    x, logsnr, text, _ = inputs()
    none = torch.zeros(2, 6, dtype=torch.bool)
    out = model(x, logsnr, text, none)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(model(x, logsnr, torch.randn_like(text), none), out, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x, logsnr, torch.zeros_like(text), none), out, rtol=0, atol=1e-6)
    # a mixed batch: row 0 unconditional, row 1 conditional, each as if alone
    mixed = torch.zeros(2, 6, dtype=torch.bool)
    mixed[1, :3] = True
    both = model(x, logsnr, text, mixed)
    torch.testing.assert_close(both[0], out[0], rtol=0, atol=1e-5)


def test_noise_level_and_aug_level_condition_the_output():
    model = build(tiny_cfg(lowres_cond=True))
    x, logsnr, text, mask = inputs()
    low = torch.randn_like(x)
    a = model(x, logsnr, text, mask, lowres=low, aug_logsnr=torch.tensor([0.0, 0.0]))
    b = model(x, logsnr, text, mask, lowres=low, aug_logsnr=torch.tensor([5.0, 5.0]))
    c = model(x, logsnr + 3, text, mask, lowres=low, aug_logsnr=torch.tensor([0.0, 0.0]))
    assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4
    assert model(x, logsnr, text, mask, lowres=low).shape == x.shape  # aug_logsnr defaults to clean
    with pytest.raises(ValueError, match="lowres"):
        model(x, logsnr, text, mask)
    with pytest.raises(ValueError, match="upsampled"):
        model(x, logsnr, text, mask, lowres=low[..., :8, :8])


def test_gradient_reaches_every_text_path():
    model = build(tiny_cfg(cross_attn_levels=(False, False, True))).train()
    x, logsnr, text, mask = inputs()
    model(x, logsnr, text, mask).square().mean().backward()
    for name in ("text_norm.weight", "text_proj.weight", "pooled_proj.0.weight", "time_mlp.0.weight",
                 "down.1.self_attn.0.text_to_kv.weight", "down.2.cross_attn.0.text_to_kv.weight",
                 "down.1.self_attn.0.null_kv"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in model.parameters())


def test_gradient_checkpointing_matches():
    x, logsnr, text, mask = inputs()
    grads = []
    for flag in (False, True):
        model = build(tiny_cfg(grad_checkpoint=flag)).train()
        out = model(x, logsnr, text, mask)
        out.square().mean().backward()
        grads.append((out.detach(), model.text_proj.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_deterministic_init_and_bf16_autocast():
    x, logsnr, text, mask = inputs()
    a, b = build(tiny_cfg(), seed=3), build(tiny_cfg(), seed=3)
    assert torch.equal(a(x, logsnr, text, mask), b(x, logsnr, text, mask))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = a(x, logsnr, text, mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert a.num_params() == sum(p.numel() for p in a.parameters())


def test_text_position_embeddings_make_the_unet_see_word_order():
    """Attention over the text tokens is blind to their order (a set of keys, a mean-pooled vector):
    permuting the tokens leaves the output unchanged. With unet.text_pos_emb it does not."""
    from dataclasses import replace

    base = load_config("tiny-base").unet
    x, logsnr, text, mask = inputs(res=16, d=base.text_dim)
    mask[:] = True  # no padding, so a permutation keeps the same set of real tokens
    perm = torch.randperm(text.shape[1], generator=torch.Generator().manual_seed(0))
    outs = {}
    for n in (0, text.shape[1]):
        torch.manual_seed(0)
        model = EfficientUNet(replace(base, text_pos_emb=n))
        torch.nn.init.normal_(model.out_conv.weight, std=0.02)  # a fresh model outputs exactly 0
        with torch.no_grad():
            outs[n] = (model(x, logsnr, text, mask), model(x, logsnr, text[:, perm], mask))
    a, b = outs[0]
    assert torch.allclose(a, b, atol=1e-5)
    a, b = outs[text.shape[1]]
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="text_pos_emb"):
        replace(base, text_pos_emb=-1)


def test_coord_channels_tell_the_unet_where_each_pixel_is():
    """Without coordinates a fully convolutional U-Net maps a shifted input to a shifted output away from
    the border (translation equivariance); unet.coord_channels breaks that, and its grid is x, y in [-1, 1]."""
    from dataclasses import replace

    from train.unet import coord_grid

    g = coord_grid(torch.zeros(2, 3, 4, 8))
    assert g.shape == (2, 2, 4, 8)
    assert torch.allclose(g[0, 0, 0], torch.tensor([-0.875, -0.625, -0.375, -0.125, 0.125, 0.375, 0.625, 0.875]))
    assert torch.allclose(g[0, 1, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75])) and (g[1] == g[0]).all()
    # One level, convs only: a receptive field of a few pixels, so away from the border a shifted input
    # gives exactly the shifted output -- unless the U-Net is told the coordinates.
    base = replace(load_config("tiny-base").unet, dim_mults=(1,), num_res_blocks=(1,), attn_levels=(False,),
                   cross_attn_levels=(False,))
    x, logsnr, text, mask = inputs(res=48, d=base.text_dim)
    shifted = torch.roll(x, 4, dims=3)
    gaps = {}
    for coords in (False, True):
        torch.manual_seed(0)
        model = EfficientUNet(replace(base, coord_channels=coords))
        torch.nn.init.normal_(model.out_conv.weight, std=0.02)
        with torch.no_grad():
            a, b = model(x, logsnr, text, mask), model(shifted, logsnr, text, mask)
        gaps[coords] = (torch.roll(a, 4, dims=3) - b)[..., 12:36, 12:36].abs().max().item()  # away from the border
    assert EfficientUNet(replace(base, coord_channels=True)).init_conv.in_channels == 5


def test_attn_pos_tells_each_attention_query_where_it_is():
    """A spatially uniform input gives the same features at every interior pixel (convs see only their
    neighbourhood), so attention queries there are equal and so are their outputs; unet.attn_pos adds the
    pixel's position to queries and keys, and the interior output then varies with position."""
    from dataclasses import replace

    from train.unet import ATTN_POS_FREQS, position_features

    pe = position_features(2, 4)
    assert pe.shape == (8, 4 * ATTN_POS_FREQS)
    # row-major like an attention layer's flatten: index 1 is row 0, column 1: x = -0.25, sin(pi x) first
    assert torch.isclose(pe[1, 0], torch.sin(torch.tensor(-0.25 * torch.pi)))
    assert torch.isclose(pe[4, ATTN_POS_FREQS], torch.sin(torch.tensor(0.5 * torch.pi)))  # (1, 0): y = +0.5
    base = replace(load_config("tiny-base").unet, dim_mults=(1,), num_res_blocks=(1,), attn_levels=(True,),
                   cross_attn_levels=(False,))
    _, logsnr, text, mask = inputs(res=48, d=base.text_dim)
    x = torch.full((2, 3, 48, 48), 0.3)
    spread = {}
    for pos in (False, True):
        torch.manual_seed(0)
        model = EfficientUNet(replace(base, attn_pos=pos))
        torch.nn.init.normal_(model.out_conv.weight, std=0.02)
        with torch.no_grad():
            out = model(x, logsnr, text, mask)[..., 12:36, 12:36]
        spread[pos] = (out - out[..., :1, :1]).abs().max().item()
    assert spread[False] < 1e-5 and spread[True] > 1e-3, spread
    n_pos = sum(p.numel() for n, p in EfficientUNet(replace(base, attn_pos=True)).named_parameters() if ".pos_" in n)
    assert n_pos > 0
