"""Cascade-stage configuration: dataclasses in code, JSON presets in `train/configs/`.

k-diffusion style: a preset is a JSON object with a `"type"`, sections named like the dataclasses
(`unet`, `diffusion`, `data`, `train`, `sample`) and a `doc` string (the command that runs it and
what it should produce). `load_config` merges the JSON over the dataclass defaults, then applies
dotted overrides (`{"train.max_steps": 10}`), and refuses any key it does not know -- a typo in a
preset must fail loudly, not train a different model for a day.

    cfg = load_config("tiny-base", {"train.max_steps": 10})
    cfg.unet.dim, cfg.data.resolution, cfg.sample["guidance_weight"]

`config_to_dict(cfg)` is JSON-safe and round-trips through `config_from_dict`; the trainer stores it
in the checkpoint's safetensors metadata so a checkpoint always says what built it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_TYPE",
    "Config",
    "DataConfig",
    "DiffusionConfig",
    "TrainConfig",
    "UNetConfig",
    "config_from_dict",
    "config_to_dict",
    "list_presets",
    "load_config",
]

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_TYPE = "imagen_stage"  # the only preset type kiln knows (k-diffusion's config "type")


@dataclass
class UNetConfig:
    """Efficient U-Net shape (Imagen App. B.1). Per-level tuples have one entry per `dim_mults`
    entry; level 0 is full resolution and each further level halves it."""

    dim: int  # channels at level 0
    dim_mults: tuple[int, ...]  # level i has dim * dim_mults[i] channels
    num_res_blocks: tuple[int, ...]  # residual blocks per level (Efficient U-Net: more at low res)
    attn_levels: tuple[bool, ...]  # self-attention with projected text tokens concatenated to K/V
    cross_attn_levels: tuple[bool, ...]  # cross-attention to text only (the 1024 stage: no self-attn)
    heads: int
    head_dim: int
    text_dim: int  # T5 d_model of the stored embeddings (4096 for T5-XXL, 64 for the tiny T5)
    cond_dim: int  # width of the timestep + pooled-text (+ aug level) conditioning vector
    channels: int = 3
    lowres_cond: bool = False  # super-resolution stage: the upsampled low-res image is concatenated
    # SR: the output is read relative to the (noise-augmented, upsampled) low-res image, so an
    # untrained network already predicts x0 ~ that image instead of noise: the assumed std of
    # x0 minus that image (diffusion.lowres_skip); None = plain output.
    lowres_skip_std: float | None = None
    # SR: how the low-res image is brought to the output size before it is concatenated (and read
    # by the skip): "bilinear" or "bicubic" (sharper; its overshoot is kept, not clipped).
    lowres_upsample: str = "bilinear"
    dropout: float = 0.0
    grad_checkpoint: bool = False  # recompute block activations in backward (sr1024 memory)
    # Learned position embeddings added to the projected text tokens (0 = none, Imagen's choice:
    # T5's relative attention puts word order into its outputs). A random-init encoder carries little
    # order (docs/eval.md): this hands the attention layers the token positions themselves. Measured
    # on the composition suite in docs/eval.md; no preset turns it on.
    text_pos_emb: int = 0
    # CoordConv (Liu et al. 2018): the pixel's x and y in [-1, 1] as two more input channels, so every
    # layer knows where it is (a conv stack with zero padding knows it only near the border). For
    # prompts that name a position ("on the left", "above"): docs/eval.md measures it.
    coord_channels: bool = False
    # Each attention layer's image queries and keys get their pixel's 2D position (sin/cos of x and y
    # at ATTN_POS_FREQS frequencies, through a learned projection per layer), as a ViT's tokens do:
    # a query can then match a text token ("left", "top") by where it is, not only by what is there.
    # Imagen has none (convs with zero padding learn position at scale). docs/eval.md measures it.
    attn_pos: bool = False

    def __post_init__(self):
        n = len(self.dim_mults)
        if self.lowres_skip_std is not None and not (self.lowres_cond and 0 < self.lowres_skip_std <= 1):
            raise ValueError("unet.lowres_skip_std needs unet.lowres_cond and must be in (0, 1]")
        if self.lowres_upsample not in ("bilinear", "bicubic"):
            raise ValueError(f"unet.lowres_upsample must be 'bilinear' or 'bicubic', got {self.lowres_upsample!r}")
        for name in ("num_res_blocks", "attn_levels", "cross_attn_levels"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"unet.{name} has {len(getattr(self, name))} entries but dim_mults has {n}")
        if n < 1 or self.dim < 1 or min(self.dim_mults) < 1 or min(self.num_res_blocks) < 1:
            raise ValueError("unet.dim, dim_mults and num_res_blocks must be positive and non-empty")
        if self.heads < 1 or self.head_dim < 1 or self.text_dim < 1 or self.cond_dim < 1:
            raise ValueError("unet.heads, head_dim, text_dim and cond_dim must be >= 1")
        if self.text_pos_emb < 0:
            raise ValueError("unet.text_pos_emb must be >= 0 (0: no token position embeddings)")


@dataclass
class DiffusionConfig:
    """Continuous-time Gaussian diffusion (Imagen §2.2, cosine schedule in log-SNR form)."""

    prediction: str = "v"  # "eps" | "v": v (Salimans & Ho 2022) stays well-posed at both ends of
    # the schedule, where eps-prediction divides by alpha -> 0 (Imagen App. used v for the SR stages)
    loss_weighting: str = "min_snr"  # "none" | "min_snr" | "edm" (SR with unet.lowres_skip_std only:
    # the network's own output is regressed as a unit-variance target, diffusion.lowres_skip_scale)
    # Min-SNR-gamma (Hang et al. 2023, §3.3): per-noise-level loss weight min(SNR, gamma) in x0
    # space. Low-noise steps (high SNR: fine detail, no say in the prompt) otherwise dominate the
    # gradient; clamping them gave ~3.4x faster convergence in that paper, and moves the budget
    # toward the high-noise steps where colour and layout -- what the prompt decides -- are set.
    min_snr_gamma: float = 5.0  # Hang et al. 2023, §4: gamma = 5 is their recommended value
    logsnr_min: float = -15.0  # cosine schedule clipped to [logsnr_min, logsnr_max] (VDM / simple diffusion)
    logsnr_max: float = 15.0
    cond_drop_prob: float = 0.1  # Imagen §2.3: classifier-free guidance, text dropped 10% of the time
    noise_aug_train_max: float = 1.0  # SR: aug_level ~ U(0, this) during training (Imagen §2.5)
    # SR: the probability that a training sample's low-res image is NOT augmented (aug_level 0),
    # the rest drawn U(0, noise_aug_train_max). On a small budget a U(0, 1) draw alone spends
    # the model on heavily corrupted inputs and its clean-input samples fall below bicubic.
    noise_aug_clean_prob: float = 0.0

    def __post_init__(self):
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"diffusion.prediction must be 'eps' or 'v', got {self.prediction!r}")
        if self.loss_weighting not in ("none", "min_snr", "edm"):
            raise ValueError(f"diffusion.loss_weighting must be 'none', 'min_snr' or 'edm', got {self.loss_weighting!r}")
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError("diffusion.logsnr_min must be < logsnr_max")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError("diffusion.cond_drop_prob must be in [0, 1)")
        if not 0.0 <= self.noise_aug_train_max <= 1.0:
            raise ValueError("diffusion.noise_aug_train_max must be in [0, 1]")
        if not 0.0 <= self.noise_aug_clean_prob <= 1.0:
            raise ValueError("diffusion.noise_aug_clean_prob must be in [0, 1]")


@dataclass
class DataConfig:
    resolution: int  # output side of this stage, px
    lowres_resolution: int | None = None  # SR: side of the conditioning image, px
    random_crop: bool = False  # the 1024 stage trains on random crops (Imagen App. F: 256² crops)
    crop_size: int | None = None  # side of those crops, px (model input size when random_crop)
    text_max_len: int = 128  # tokens; T5 embeddings are padded/cut to this (Imagen: 128)
    min_stored_size: int | None = None  # train only on samples whose stored side >= this; None -> resolution

    def __post_init__(self):
        if self.min_stored_size is None:
            self.min_stored_size = self.resolution
        if self.random_crop and not self.crop_size:
            raise ValueError("data.random_crop needs data.crop_size")
        if self.crop_size is not None and self.crop_size > self.resolution:
            raise ValueError("data.crop_size must be <= data.resolution")


@dataclass
class TrainConfig:
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 1000  # linear warm-up from 0, then lr_schedule
    lr_schedule: str = "constant"  # "constant" | "cosine" (to 0 at max_steps: a run of known length)
    max_steps: int = 100_000
    optimizer: str = "adamw"  # "adamw" | "adafactor" (Imagen §4.1: Adafactor for the base, Adam for SR)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # global L2 norm
    grad_accum: int = 1
    ema_decay: float = 0.9999  # Imagen §4.1
    ema_start: int = 0  # step from which the EMA tracks the weights (before it: copies them)
    precision: str = "fp32"  # "fp32" | "bf16" (autocast)
    log_every: int = 100
    sample_every: int = 5000
    ckpt_every: int = 5000
    seed: int = 0
    # DataLoader worker processes per training process for a streaming source (a cached one decodes
    # once, up front). None: min(8, this process's share of the cores) on CUDA, 0 on CPU
    # (train.trainer.loader_workers); `kiln train --num-workers N` sets it.
    num_workers: int | None = None

    def __post_init__(self):
        if self.optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"train.optimizer must be 'adamw' or 'adafactor', got {self.optimizer!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"train.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_steps < 0:
            raise ValueError("train.batch_size and grad_accum must be >= 1, max_steps >= 0")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0 (or null: by device), got {self.num_workers}")


# Sampling settings: a plain dict (the sampler's keyword arguments), with these keys and defaults.
SAMPLE_DEFAULTS: dict[str, Any] = {
    "guidance_weight": 5.0,  # Imagen §4.3 / Fig. A.11: w in [1, 10]; 1 = no guidance
    "steps": 50,
    "sampler": "ddim",  # "ddim" | "ddpm"
    "aug_level": 0.25,  # SR only: Imagen §2.5 samples with aug_level in [0, 0.3]
    "threshold": "dynamic",  # "dynamic" | "static" | "none" (Imagen §2.3)
}


@dataclass
class Config:
    name: str
    stage: str  # "base" | "sr"
    unet: UNetConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: dict[str, Any] = field(default_factory=lambda: dict(SAMPLE_DEFAULTS))
    doc: str = ""

    def __post_init__(self):
        if self.stage not in ("base", "sr"):
            raise ValueError(f"stage must be 'base' or 'sr', got {self.stage!r}")
        if self.data is None:
            raise ValueError("a config needs a data section (data.resolution at least)")
        if (self.stage == "sr") != self.unet.lowres_cond:
            raise ValueError(f"stage {self.stage!r} needs unet.lowres_cond={self.stage == 'sr'}")
        if self.unet.lowres_skip_std and self.diffusion.prediction != "v":
            raise ValueError("unet.lowres_skip_std needs diffusion.prediction 'v'")
        if self.diffusion.loss_weighting == "edm" and not self.unet.lowres_skip_std:
            raise ValueError("diffusion.loss_weighting 'edm' needs an sr stage with unet.lowres_skip_std")
        if self.stage == "sr" and not self.data.lowres_resolution:
            raise ValueError("an sr stage needs data.lowres_resolution")
        unknown = set(self.sample) - set(SAMPLE_DEFAULTS)
        if unknown:
            raise KeyError(f"unknown sample key(s) {sorted(unknown)}; known: {sorted(SAMPLE_DEFAULTS)}")
        if self.sample["sampler"] not in ("ddim", "ddpm"):
            raise ValueError(f"sample.sampler must be 'ddim' or 'ddpm', got {self.sample['sampler']!r}")
        if self.sample["threshold"] not in ("dynamic", "static", "none"):
            raise ValueError(f"sample.threshold must be dynamic/static/none, got {self.sample['threshold']!r}")


_SECTIONS = {"unet": UNetConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig}
_TOP_KEYS = {"type", "name", "stage", "doc", "sample", *_SECTIONS}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """JSON values to the dataclass field's type: lists -> tuples, ints -> floats; else checked."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a list, got {value!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, where) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be true/false, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise TypeError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if annotation is str and not isinstance(value, str):
        raise TypeError(f"{where} must be a string, got {value!r}")
    return value


def _build_section(cls, values: dict, section: str):
    if not isinstance(values, dict):
        raise TypeError(f"section {section!r} must be a JSON object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields) - {"type"}
    if unknown:
        raise KeyError(f"unknown key(s) in {section!r}: {sorted(unknown)}; known: {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise KeyError(f"section {section!r} is missing required key(s): {missing}")
    hints = typing.get_type_hints(cls)  # real types (this module uses `from __future__` annotations)
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items() if k != "type"}
    return cls(**kwargs)


def config_from_dict(d: dict) -> Config:
    """A `Config` from a preset-shaped dict (sections over dataclass defaults); strict on keys."""
    d = copy.deepcopy(d)
    unknown = set(d) - _TOP_KEYS
    if unknown:
        raise KeyError(f"unknown top-level key(s) {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
    if d.get("type", CONFIG_TYPE) != CONFIG_TYPE:
        raise ValueError(f"config type must be {CONFIG_TYPE!r}, got {d.get('type')!r}")
    for key in ("name", "stage", "unet", "data"):
        if key not in d:
            raise KeyError(f"config is missing {key!r}")
    sections = {name: _build_section(cls, d.get(name, {}), name) for name, cls in _SECTIONS.items()}
    sample = dict(SAMPLE_DEFAULTS)
    sample.update(d.get("sample", {}))
    return Config(name=d["name"], stage=d["stage"], sample=sample, doc=d.get("doc", ""), **sections)


def config_to_dict(cfg: Config) -> dict:
    """JSON-safe dict (tuples as lists) that `config_from_dict` turns back into an equal Config."""
    out = {"type": CONFIG_TYPE, "name": cfg.name, "stage": cfg.stage}
    for name in _SECTIONS:
        out[name] = {k: list(v) if isinstance(v, tuple) else v
                     for k, v in dataclasses.asdict(getattr(cfg, name)).items()}
    out["sample"] = dict(cfg.sample)
    out["doc"] = cfg.doc
    return json.loads(json.dumps(out))


def list_presets() -> list[str]:
    """Preset names in `train/configs/` (the file stems), sorted."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def _apply_override(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) == 1:
        if parts[0] not in _TOP_KEYS or parts[0] in _SECTIONS or parts[0] == "sample":
            raise KeyError(f"unknown override {dotted!r}: use 'section.key' (sections: "
                           f"{sorted([*_SECTIONS, 'sample'])}) or one of name/stage/doc")
        d[parts[0]] = value
        return
    if len(parts) != 2:
        raise KeyError(f"unknown override {dotted!r}: expected 'section.key'")
    section, key = parts
    if section in _SECTIONS:
        known = {f.name for f in dataclasses.fields(_SECTIONS[section])}
    elif section == "sample":
        known = set(SAMPLE_DEFAULTS)
    else:
        raise KeyError(f"unknown override section {section!r} in {dotted!r}; known: {sorted([*_SECTIONS, 'sample'])}")
    if key not in known:
        raise KeyError(f"unknown override {dotted!r}; keys of {section!r}: {sorted(known)}")
    d.setdefault(section, {})[key] = value


def load_config(name_or_path: str | Path, overrides: dict | None = None) -> Config:
    """A preset by name (`train/configs/NAME.json`) or a JSON file path, merged over the dataclass
    defaults, with dotted `overrides` ({"train.max_steps": 10, "unet.dim": 16}) applied last."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.exists()):
        preset = CONFIGS_DIR / f"{name_or_path}.json"
        if not preset.exists():
            raise FileNotFoundError(f"no preset {str(name_or_path)!r} (presets: {list_presets()}) and no such JSON file")
        path = preset
    d = json.loads(path.read_text())
    for dotted, value in (overrides or {}).items():
        _apply_override(d, dotted, value)
    return config_from_dict(d)
