"""Measures for the cascade's samples: the dominant foreground colour of a picture, and PSNR.

The synthetic web (pipeline/testbed/synth.py) draws flat shapes in nine named colours on a background of
another named colour, with a gentle vertical shading (at most 12% darker), and its captions name
both colours truthfully. That makes prompt-following measurable without a learned judge:

    background  the named colour most pixels on the image's border belong to
    foreground  the pixels that belong to another named colour and sit far from the background
    dominant    the named colour most foreground pixels belong to (None if too few pixels)

A pixel "belongs" to the palette colour whose shading segment {f * rgb : 0.88 <= f <= 1} is nearest
to it (Euclidean, 0..255 RGB), so a darkened background never reads as another colour.

`colour_accuracy(images, captions)` compares that with the colour word a single-shape caption gives
its shape (`parse_scene`). Chance is 1 / len(COLOURS) for a model that ignores the text.

numpy + torch only; the palette is copied from pipeline/testbed/synth.py (train/ imports nothing from
pipeline/ -- DESIGN.md), and a test keeps the copies equal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "COLOURS",
    "SHAPES",
    "classify_pixels",
    "colour_accuracy",
    "dominant_colours",
    "foreground_colour",
    "parse_scene",
    "psnr",
    "to_uint8",
]

# = pipeline.testbed.synth.COLOURS (RGB, 0..255): the only colour words synthetic captions use.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (245, 215, 40),
    "orange": (245, 135, 25),
    "purple": (125, 45, 165),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star")  # = pipeline.testbed.synth.SHAPES
_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)  # [K, 3]
_SHADE_MIN = 0.88  # synth's background shading: up to 12% darker at the bottom

# Foreground pixels must be at least this far (RGB units) from the background's shading segment:
# the closest palette pair (yellow/orange) is 81 apart, JPEG/antialiasing noise is ~10-20.
FOREGROUND_MIN_DISTANCE = 40.0
# ... and at least this fraction of the image: the smallest synthetic shape (a small star) covers
# ~2.5% of a square image; a few stray pixels of a blurry sample are not a shape.
FOREGROUND_MIN_FRACTION = 0.01


def to_uint8(image) -> np.ndarray:
    """HWC uint8 RGB from a [-1, 1] tensor/array (CHW or HWC) or a uint8 array/PIL image."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.clip((a.astype(np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got shape {a.shape}")
    return a


def _segment_distances(pixels: np.ndarray) -> np.ndarray:
    """[N, K] distance of each pixel (N x 3, float) to each palette colour's shading segment."""
    c = _PALETTE[None]  # [1, K, 3]
    p = pixels[:, None, :]  # [N, 1, 3]
    f = np.clip((p * c).sum(-1) / (c * c).sum(-1), _SHADE_MIN, 1.0)  # [N, K]
    return np.linalg.norm(p - f[..., None] * c, axis=-1)


def classify_pixels(image) -> tuple[np.ndarray, np.ndarray]:
    """(labels [H, W] int: index into COLOURS' order, distances [H, W, K] to every colour's segment)."""
    a = to_uint8(image).astype(np.float32)
    h, w, _ = a.shape
    d = _segment_distances(a.reshape(-1, 3))
    return d.argmin(-1).reshape(h, w), d.reshape(h, w, -1)


def dominant_colours(image, min_fraction: float = FOREGROUND_MIN_FRACTION) -> tuple[str, str | None]:
    """(background colour, dominant foreground colour or None) of one image."""
    labels, dist = classify_pixels(image)
    h, w = labels.shape
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    fg_mask = (labels != bg) & (dist[..., bg] > FOREGROUND_MIN_DISTANCE)
    if fg_mask.sum() < max(1, min_fraction * h * w):
        return _NAMES[bg], None
    counts = np.bincount(labels[fg_mask], minlength=len(_NAMES))
    return _NAMES[bg], _NAMES[int(counts.argmax())]


def foreground_colour(image, min_fraction: float = FOREGROUND_MIN_FRACTION) -> str | None:
    """The dominant foreground colour's name, or None where no shape stands out."""
    return dominant_colours(image, min_fraction)[1]


_COLOUR_RE = re.compile(r"\b(" + "|".join(_NAMES) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b")
_BACKGROUND_RE = re.compile(r"\b(" + "|".join(_NAMES) + r") background\b")


def parse_scene(caption: str) -> dict | None:
    """{"colour", "shape", "background"} of a single-shape synthetic caption, else None.

    "A photo of a small red circle on the left on a blue background" ->
    {"colour": "red", "shape": "circle", "background": "blue"}. Captions with several shapes (or
    none, or no background) return None: their "foreground colour" is not one word.
    """
    text = caption.lower()
    shapes = _SHAPE_RE.findall(text)
    bg = _BACKGROUND_RE.search(text)
    colours = _COLOUR_RE.findall(text)
    if len(shapes) != 1 or bg is None or len(colours) != 2:
        return None
    return {"colour": colours[0], "shape": shapes[0], "background": bg.group(1)}


def colour_accuracy(images: Sequence, captions: Sequence[str]) -> dict:
    """Fraction of images whose dominant foreground colour is the caption's shape colour.

    Returns {"accuracy", "correct", "total", "predicted": [...], "expected": [...]}; captions that
    are not single-shape scenes are left out of the total."""
    predicted, expected = [], []
    for image, caption in zip(images, captions, strict=True):
        scene = parse_scene(caption)
        if scene is None:
            continue
        predicted.append(foreground_colour(image))
        expected.append(scene["colour"])
    correct = sum(p == e for p, e in zip(predicted, expected))
    total = len(expected)
    return {
        "accuracy": correct / total if total else float("nan"),
        "correct": correct,
        "total": total,
        "predicted": predicted,
        "expected": expected,
    }


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB of `x` against reference `y` ([B, C, H, W] or [C, H, W]).

    `data_range` is max - min of the pixel scale: 2.0 for [-1, 1] images, 255 for uint8."""
    x, y = torch.as_tensor(x).float(), torch.as_tensor(y).float()
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim == 3:
        x, y = x[None], y[None]
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-12))
