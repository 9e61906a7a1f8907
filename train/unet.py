"""Efficient U-Net (Imagen App. B.1) with frozen-T5 text conditioning, for every cascade stage.

How the text reaches the network (Imagen §2.4, App. B):
- the T5 tokens go through a LayerNorm, then a linear projection to `cond_dim`;
- their masked mean (pooled embedding) is projected and ADDED to the noise-level embedding, which
  every residual block reads as a FiLM scale/shift after its first conv -- the cheap, global path
  that makes a prompt's colour/style reach every pixel from the first steps of training;
- at the levels in `attn_levels`, self-attention concatenates the projected tokens to its keys and
  values (base and 256 stages); at `cross_attn_levels`, attention reads the tokens only (the 1024
  stage, which has no self-attention). A learned null token is always among the keys, so a fully
  masked (unconditional) row attends to something well-defined.
- SR stages concatenate the (already upsampled, noise-augmented) low-res image to the input and
  add an embedding of its augmentation level to the conditioning vector (Imagen §2.5). With
  `lowres_skip_std` their output is read relative to that image (train.diffusion.lowres_skip,
  applied by diffusion.model_output), so a fresh SR model already samples the upsampled input.

Efficient U-Net habits: more residual blocks at low resolution (cheap there), skip connections
scaled by 1/sqrt(2), downsampling before a down level's convolutions and upsampling after an up
level's. The output conv is zero-initialised: a fresh model predicts 0 (a neutral v / eps) instead
of a random colour cast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.config import UNetConfig

__all__ = ["EfficientUNet", "ResBlock", "TextAttention", "SKIP_SCALE", "logsnr_embedding"]

SKIP_SCALE = 2 ** -0.5  # Imagen App. B.1: skip connections scaled by 1/sqrt(2)
CLEAN_AUG_LOGSNR = 15.0  # aug_logsnr used when an SR model is called without one (aug_level 0)


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 as in DDPM/ADM where the width allows, fewer for tiny models."""
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 2 or g == 1:
            return g
    return 1


def logsnr_embedding(logsnr: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of a continuous log-SNR (VDM-style conditioning on the noise level).

    logsnr lives in about [-15, 15]; periods from 2 to 64 log-SNR units resolve it finely at
    every scale (the transformer's 1..10,000 range would waste most features on near-constants)."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(math.log(1.0), math.log(1.0 / 32.0), half, device=logsnr.device))
    args = logsnr.float()[:, None] * freqs[None] * math.pi
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def coord_grid(x: torch.Tensor) -> torch.Tensor:
    """[B, 2, H, W]: each pixel's x (channel 0, -1 at the left edge) and y (channel 1, -1 at the top)
    in [-1, 1], pixel centres, in x's dtype (UNetConfig.coord_channels)."""
    b, _, h, w = x.shape
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w * 2 - 1
    grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])
    return grid[None].expand(b, -1, -1, -1)


ATTN_POS_FREQS = 4  # unet.attn_pos: sin/cos of pi * 2^k * x and y, k < 4 -> 16 features a pixel


def position_features(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """[h*w, 4 * ATTN_POS_FREQS]: sin and cos of pi * 2^k * (x, y) for each pixel (row-major, as an
    attention layer flattens its image), x and y its centre in [-1, 1] (coord_grid)."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    freqs = math.pi * 2.0 ** torch.arange(ATTN_POS_FREQS, device=device, dtype=torch.float32)
    ang = torch.cat([xx.reshape(-1, 1) * freqs, yy.reshape(-1, 1) * freqs], dim=1)
    return torch.cat([ang.sin(), ang.cos()], dim=1).to(dtype or torch.float32)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, FiLM by the conditioning vector, GroupNorm-SiLU-dropout-conv, plus a
    (1x1 if the width changes) shortcut; the sum is scaled by 1/sqrt(2) (`combine`) so the variance
    does not grow with depth -- Efficient U-Nets stack up to 8 of these per level."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * out_ch)  # -> (scale, shift), ADM's scale-shift norm
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    @staticmethod
    def combine(residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return (residual + shortcut) * SKIP_SCALE

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.combine(h, self.shortcut(x))


class TextAttention(nn.Module):
    """Multi-head attention of image positions over [image positions (if self_attn), projected
    text tokens, a learned null token]. `self_attn=True` is Imagen's text-concat self-attention
    (base/256); `self_attn=False` is cross-attention only (1024). Padded tokens are masked out."""

    def __init__(self, channels: int, cond_dim: int, heads: int, head_dim: int, self_attn: bool, pos: bool = False):
        super().__init__()
        inner = heads * head_dim
        # unet.attn_pos: the pixels' positions into the image queries (and keys, with self-attention)
        self.pos_q = nn.Linear(4 * ATTN_POS_FREQS, inner, bias=False) if pos else None
        self.pos_k = nn.Linear(4 * ATTN_POS_FREQS, inner, bias=False) if pos and self_attn else None
        self.heads, self.head_dim, self.self_attn = heads, head_dim, self_attn
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_kv = nn.Linear(channels, 2 * inner, bias=False) if self_attn else None
        self.text_to_kv = nn.Linear(cond_dim, 2 * inner, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, inner) * 0.02)
        self.out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q = self.to_q(h)
        pe = position_features(hgt, wid, x.device, q.dtype) if self.pos_q is not None else None
        if pe is not None:
            q = q + self.pos_q(pe)
        text_k, text_v = self.text_to_kv(tokens).chunk(2, dim=-1)  # [B, L, inner]
        null_k, null_v = (t.expand(b, 1, -1).to(q.dtype) for t in self.null_kv[:, None, :])
        ks, vs = [null_k, text_k], [null_v, text_v]
        mask = [token_mask.new_ones(b, 1), token_mask]
        if self.self_attn:
            img_k, img_v = self.to_kv(h).chunk(2, dim=-1)
            if self.pos_k is not None:
                img_k = img_k + self.pos_k(pe)
            ks.append(img_k), vs.append(img_v), mask.append(token_mask.new_ones(b, h.shape[1]))
        k, v, mask = torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(mask, 1)

        def split(t):
            return t.view(b, -1, self.heads, self.head_dim).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask[:, None, None, :])
        o = self.out(o.transpose(1, 2).reshape(b, hgt * wid, -1))
        return x + o.transpose(1, 2).reshape(b, c, hgt, wid)


class Level(nn.Module):
    """One resolution of the U-Net: residual blocks, each followed by the level's attention."""

    def __init__(self, channels_in: list[int], channels: int, cfg: UNetConfig, self_attn: bool, cross_attn: bool):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(ci, channels, cfg.cond_dim, cfg.dropout) for ci in channels_in)
        n = len(channels_in)

        def attn(kind):
            return nn.ModuleList(TextAttention(channels, cfg.cond_dim, cfg.heads, cfg.head_dim, kind, cfg.attn_pos)
                                 for _ in range(n))

        self.self_attn = attn(True) if self_attn else None
        self.cross_attn = attn(False) if cross_attn else None

    def block(self, i, h, cond, tokens, token_mask):
        h = self.blocks[i](h, cond)
        if self.self_attn is not None:
            h = self.self_attn[i](h, tokens, token_mask)
        if self.cross_attn is not None:
            h = self.cross_attn[i](h, tokens, token_mask)
        return h


class EfficientUNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        d, cd = cfg.dim, cfg.cond_dim
        chans = [d * m for m in cfg.dim_mults]
        in_ch = cfg.channels * (2 if cfg.lowres_cond else 1) + (2 if cfg.coord_channels else 0)

        # Conditioning vector: noise level + pooled text (+ SR aug level), all added (Imagen §2.4).
        self.time_mlp = nn.Sequential(nn.Linear(d, cd), nn.SiLU(), nn.Linear(cd, cd))
        self.aug_mlp = nn.Sequential(nn.Linear(d, cd), nn.SiLU(), nn.Linear(cd, cd)) if cfg.lowres_cond else None
        self.text_norm = nn.LayerNorm(cfg.text_dim)  # Imagen App. B: LayerNorm on the text embeddings
        self.text_proj = nn.Linear(cfg.text_dim, cd)  # tokens for the attention layers
        self.pooled_proj = nn.Sequential(nn.Linear(cfg.text_dim, cd), nn.SiLU(), nn.Linear(cd, cd))
        # Optional learned token positions (config.UNetConfig.text_pos_emb); tokens past the table reuse its last row.
        self.text_pos = nn.Parameter(torch.randn(cfg.text_pos_emb, cd) * 0.02) if cfg.text_pos_emb else None

        self.init_conv = nn.Conv2d(in_ch, d, 3, padding=1)
        self.downsamples = nn.ModuleList()
        self.down = nn.ModuleList()
        prev = d
        for i, ch in enumerate(chans):
            # Efficient U-Net: downsample BEFORE the level's convolutions (strided conv, prev -> ch).
            self.downsamples.append(nn.Conv2d(prev, ch, 3, stride=2, padding=1) if i > 0 else
                                    (nn.Conv2d(prev, ch, 1) if prev != ch else nn.Identity()))
            n = cfg.num_res_blocks[i]
            self.down.append(Level([ch] * n, ch, cfg, cfg.attn_levels[i], cfg.cross_attn_levels[i]))
            prev = ch
        # Middle: two residual blocks at the lowest resolution, with that level's attention.
        self.mid = Level([prev, prev], prev, cfg, cfg.attn_levels[-1], cfg.cross_attn_levels[-1])

        self.up = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(len(chans))):
            ch, n = chans[i], cfg.num_res_blocks[i]
            # Each up block reads the matching down block's output (a U-Net skip, scaled by 1/sqrt(2)).
            self.up.append(Level([ch * 2] * n, ch, cfg, cfg.attn_levels[i], cfg.cross_attn_levels[i]))
            # Efficient U-Net: upsample AFTER the level's convolutions (nearest x2 + conv, ch -> next).
            nxt = chans[i - 1] if i > 0 else d
            self.upsamples.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, nxt, 3, padding=1))
                                  if i > 0 else (nn.Conv2d(ch, nxt, 1) if ch != nxt else nn.Identity()))
        self.out_norm = nn.GroupNorm(_groups(d), d)
        self.out_conv = nn.Conv2d(d, cfg.channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)  # a fresh model predicts exactly 0: no colour cast
        nn.init.zeros_(self.out_conv.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _run(self, level: Level, i: int, h, cond, tokens, token_mask):
        if self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(level.block, i, h, cond, tokens, token_mask, use_reentrant=False)
        return level.block(i, h, cond, tokens, token_mask)

    def forward(self, x, logsnr, text, text_mask, lowres=None, aug_logsnr=None) -> torch.Tensor:
        """x [B,C,H,W] (model space, [-1,1] when clean); logsnr [B]; text [B,L,text_dim];
        text_mask [B,L] bool, True on real tokens (all-False = unconditional); SR: lowres
        [B,C,H,W] at x's size, aug_logsnr [B] (defaults to a clean low-res image)."""
        b = x.shape[0]
        if logsnr.dim() == 0:
            logsnr = logsnr.expand(b)
        text_mask = text_mask.bool()
        text = self.text_norm(text.to(self.text_proj.weight.dtype))
        text = text.masked_fill(~text_mask[..., None], 0.0)  # padded values never reach the output
        pooled = text.sum(1) / text_mask.sum(1, keepdim=True).clamp(min=1).to(text.dtype)
        tokens = self.text_proj(text)
        if self.text_pos is not None:
            idx = torch.arange(tokens.shape[1], device=tokens.device).clamp(max=self.text_pos.shape[0] - 1)
            tokens = tokens + self.text_pos[idx].to(tokens.dtype)

        cond = self.time_mlp(logsnr_embedding(logsnr, self.cfg.dim).to(text.dtype)) + self.pooled_proj(pooled)
        if self.cfg.lowres_cond:
            if lowres is None:
                raise ValueError("this U-Net is a super-resolution stage: pass lowres (upsampled to x's size)")
            if lowres.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"lowres must already be upsampled to {tuple(x.shape[-2:])}, got {tuple(lowres.shape[-2:])}")
            if aug_logsnr is None:
                aug_logsnr = torch.full((b,), CLEAN_AUG_LOGSNR, device=x.device)
            elif aug_logsnr.dim() == 0:
                aug_logsnr = aug_logsnr.expand(b)
            cond = cond + self.aug_mlp(logsnr_embedding(aug_logsnr, self.cfg.dim).to(text.dtype))
            x = torch.cat([x, lowres.to(x.dtype)], dim=1)

        if self.cfg.coord_channels:
            x = torch.cat([x, coord_grid(x)], dim=1)
        h = self.init_conv(x)
        hiddens = []
        for i, level in enumerate(self.down):
            h = self.downsamples[i](h)
            for j in range(len(level.blocks)):
                h = self._run(level, j, h, cond, tokens, text_mask)
                hiddens.append(h)
        for j in range(len(self.mid.blocks)):
            h = self._run(self.mid, j, h, cond, tokens, text_mask)
        for k, level in enumerate(self.up):
            for j in range(len(level.blocks)):
                h = torch.cat([h, hiddens.pop() * SKIP_SCALE], dim=1)
                h = self._run(level, j, h, cond, tokens, text_mask)
            h = self.upsamples[k](h)
        return self.out_conv(F.silu(self.out_norm(h)))
