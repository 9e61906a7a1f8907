"""Measures for the cascade's samples: what a picture of the synthetic web shows, read from its pixels, and PSNR.

The synthetic web (pipeline/testbed/synth.py) draws one to three flat shapes in nine named colours on a
background of another named colour, with a gentle vertical shading (at most 12% darker), and its captions
state the colours, shapes, positions and relations truthfully in a small grammar. That makes
prompt-following measurable without a learned judge:

    background  the named colour most pixels on the image's border belong to
    foreground  the pixels that belong to another named colour and sit far from the background
    dominant    the named colour most foreground pixels belong to (None if too few pixels)

A pixel "belongs" to the palette colour whose shading segment {f * rgb : 0.88 <= f <= 1} is nearest
to it (Euclidean, 0..255 RGB), so a darkened background never reads as another colour.

`colour_accuracy(images, captions)` compares that with the colour word a single-shape caption gives
its shape (`parse_scene`). Chance is 1 / len(COLOURS) for a model that ignores the text.

The whole grammar (`Scene`, `describe`, `parse_caption`) and a reading of every picture
(`read_image`: background, dominant colour, where the foreground sits, how many shapes, which kind,
where each colour sits) give the synthetic suite's six categories (`CATEGORIES`, `judge`):

    colour      one shape: the dominant foreground colour is the shape's colour
    background  the border's colour is the named background
    position    one shape: the foreground's centre lies in the named region (POSITION_REGIONS)
    relation    two shapes: both colours are there and the first one's centre is on the named side
                of the second's (by RELATION_MARGIN)
    count       as many shapes (connected foreground blobs of at least COMPONENT_MIN_FRACTION of the
                image) as the caption names (1 to 3)
    shape       one shape: the largest blob's outline is the named kind (`classify_shape`)

numpy + torch (and Pillow to shrink large pictures); the palette and the caption grammar are copied
from pipeline/testbed/synth.py (train/ imports nothing from pipeline/ -- DESIGN.md), and tests keep the
copies equal (tests/train/test_eval.py, test_trainer.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "ORDERS",
    "PLAIN",
    "POSITIONS",
    "POSITION_REGIONS",
    "RELATIONS",
    "SHAPES",
    "SHAPE_PROTOTYPES",
    "TEMPLATES",
    "WHERE",
    "Reading",
    "Scene",
    "ShapeSpec",
    "categories_of",
    "classify_pixels",
    "classify_shape",
    "colour_accuracy",
    "describe",
    "dominant_colours",
    "foreground_colour",
    "judge",
    "parse_caption",
    "parse_scene",
    "psnr",
    "read_image",
    "scene_key",
    "shape_features",
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


# --------------------------------------------------------------------------------------------
# The synthetic web's caption grammar (= pipeline/testbed/synth.py's _Planner.scene and .caption)

# = pipeline.testbed.synth._TEMPLATES: what a caption wraps a scene description in (and, 40% of the
# time, its first letter capitalised).
TEMPLATES = (
    "{}",
    "{}",
    "a photo of {}",
    "an illustration of {}",
    "{}, digital art",
    "a simple drawing of {}",
    "{}, flat vector art",
    "clip art of {}",
    "a minimalist poster showing {}",
    "{} - stock image",
)
PLAIN = "a plain {} background"  # = synth._PLAIN: a scene without shapes
POSITIONS = ("center", "left", "right", "top", "bottom")
# One shape: its position's words.
WHERE = {"center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top",
         "bottom": "at the bottom"}
# Two shapes, side by side or one above the other: the relation word, keyed by the FIRST named
# shape's position ("a red circle above a blue star": red at the top, blue at the bottom).
RELATIONS = {"left": "on the left of", "right": "on the right of", "top": "above", "bottom": "below"}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
# Three shapes in a row along the longer side (a square image: left to right), named in order.
ORDERS = {"left": "from left to right", "top": "from top to bottom"}
ROWS = {"left": ("left", "center", "right"), "top": ("top", "center", "bottom")}
SIZE_WORDS = ("small", "large")  # one shape only: < 0.33 / > 0.55 of the image's shorter side


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape: its kind (SHAPES), colour (COLOURS) and position (POSITIONS)."""

    shape: str
    colour: str
    position: str


@dataclass(frozen=True)
class Scene:
    """What a synthetic caption states: a background and 0-3 shapes, in the caption's order.

    `size` is the optional "small"/"large" of a one-shape caption (not scored: the suite never
    uses it). Every colour in a scene differs from the others (the web draws them so)."""

    background: str
    shapes: tuple[ShapeSpec, ...]
    size: str | None = None

    @property
    def n_shapes(self) -> int:
        return len(self.shapes)


def describe(scene: Scene) -> str:
    """The web's description of `scene` (a caption under the "{}" template)."""

    def phrase(s: ShapeSpec, size: str | None = None) -> str:
        first = size or s.colour
        return f"{_article(first)} {size + ' ' if size else ''}{s.colour} {s.shape}"

    shapes = scene.shapes
    if not shapes:
        return PLAIN.format(scene.background)
    if len(shapes) == 1:
        desc = f"{phrase(shapes[0], scene.size)} {WHERE[shapes[0].position]}"
    elif len(shapes) == 2:
        desc = f"{phrase(shapes[0])} {RELATIONS[shapes[0].position]} {phrase(shapes[1])}"
    else:
        desc = f"{phrase(shapes[0])}, {phrase(shapes[1])} and {phrase(shapes[2])} {ORDERS[shapes[0].position]}"
    return f"{desc} on {_article(scene.background)} {scene.background} background"


_C = "(" + "|".join(COLOURS) + ")"
_S = "(" + "|".join(SHAPES) + ")"
_PHRASE = rf"an? {_C} {_S}"
_ONE = re.compile(rf"an? (?:(small|large) )?{_C} {_S} ({'|'.join(WHERE.values())})")
_TWO = re.compile(rf"{_PHRASE} ({'|'.join(RELATIONS.values())}) {_PHRASE}")
_THREE = re.compile(rf"{_PHRASE}, {_PHRASE} and {_PHRASE} ({'|'.join(ORDERS.values())})")
_ON_BACKGROUND = re.compile(rf"(.*) on an? {_C} background")
_PLAIN_RE = re.compile(rf"a plain {_C} background")


def _parse_description(desc: str) -> Scene | None:
    m = _PLAIN_RE.fullmatch(desc)
    if m:
        return Scene(m.group(1), ())
    m = _ON_BACKGROUND.fullmatch(desc)
    if m is None:
        return None
    body, bg = m.groups()
    if m1 := _ONE.fullmatch(body):
        size, colour, shape, where = m1.groups()
        position = next(p for p, w in WHERE.items() if w == where)
        return Scene(bg, (ShapeSpec(shape, colour, position),), size)
    if m2 := _TWO.fullmatch(body):
        c1, s1, rel, c2, s2 = m2.groups()
        first = next(p for p, r in RELATIONS.items() if r == rel)
        return Scene(bg, (ShapeSpec(s1, c1, first), ShapeSpec(s2, c2, OPPOSITE[first])))
    if m3 := _THREE.fullmatch(body):
        c1, s1, c2, s2, c3, s3, order = m3.groups()
        row = ROWS[next(p for p, o in ORDERS.items() if o == order)]
        return Scene(bg, tuple(ShapeSpec(s, c, p) for s, c, p in zip((s1, s2, s3), (c1, c2, c3), row)))
    return None


def parse_caption(caption: str) -> Scene | None:
    """The Scene a caption of the synthetic web's grammar states (any template, capitalised or
    not), else None: `describe(parse_caption(c))` is c's description, exactly. A caption whose
    colours repeat (a red shape on a red background) is not in the grammar."""
    text = caption.strip()
    if not text:
        return None
    text = text[0].lower() + text[1:]
    for template in dict.fromkeys(TEMPLATES):
        pre, post = template.split("{}")
        if len(text) > len(pre) + len(post) and text.startswith(pre) and text.endswith(post):
            desc = text[len(pre): len(text) - len(post)]
            scene = _parse_description(desc)
            if scene is not None and describe(scene) == desc:
                colours = [scene.background, *(s.colour for s in scene.shapes)]
                if len(set(colours)) == len(colours):
                    return scene
    return None


def scene_key(scene: Scene) -> tuple:
    """What makes two scenes the same combination (held-out rule): the background and the set of
    (colour, shape, position) -- not the caption's template, word order or size word."""
    return scene.background, tuple(sorted((s.colour, s.shape, s.position) for s in scene.shapes))


# --------------------------------------------------------------------------------------------
# Reading a picture

# A foreground blob counts as a shape from this fraction of the image: the smallest shape the web
# draws (a star in a row of three, 0.68 x 0.31 of the side) covers ~1.4%; a few stray pixels of a
# noisy sample are not a shape.
COMPONENT_MIN_FRACTION = 0.006
ANALYSIS_MAX_SIDE = 128  # larger images are box-downsampled first: the shapes are flat, 128 px is plenty
# Where the centre of a one-shape scene's foreground must lie, as (x0, y0, x1, y1) fractions of the
# width and height. The web draws a "left" shape inside x < 0.45 (centre x <= 0.32 on a square
# image), a "center" one inside 0.25..0.75 (centre within 0.1 of the middle): these bounds leave
# margin. A corner shape can satisfy two (left and top): the web's own drawings can be read both ways.
POSITION_REGIONS = {
    "left": (0.0, 0.0, 0.4, 1.0),
    "right": (0.6, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.4),
    "bottom": (0.0, 0.6, 1.0, 1.0),
    "center": (0.35, 0.35, 0.65, 0.65),
}
# Two shapes: the first named one's centre must be this far (fraction of the side) on the named side
# of the second's. The web leaves >= 0.34 between them.
RELATION_MARGIN = 0.05
# Shape prototypes (`classify_shape`): (fill of the bounding box, solidity = area / convex hull,
# mean occupancy of the two top corner patches, of the two bottom ones), as measured on the web's own
# drawings box-downsampled to 32-64 px (tests/train/test_eval.py). A square fills its box; a circle
# ~pi/4 of it; the web's triangle points up (bottom corners full, top ones empty); its five-pointed
# star (inner radius 0.45) is the one shape far from convex.
SHAPE_PROTOTYPES = {
    "square": (1.0, 1.0, 1.0, 1.0),
    "circle": (0.78, 0.94, 0.12, 0.12),
    "triangle": (0.55, 0.91, 0.0, 0.85),
    "star": (0.46, 0.63, 0.0, 0.08),
}
_CORNER = 0.2  # corner patches: this fraction of the box's side


@dataclass(frozen=True)
class Reading:
    """What one picture shows, read from its pixels (`read_image`)."""

    background: str
    foreground: str | None  # the dominant foreground colour; None: no shape stands out
    centre: tuple[float, float] | None  # (x, y) of the foreground pixels, fractions of width, height
    count: int  # foreground blobs of at least COMPONENT_MIN_FRACTION of the image
    shape: str | None  # the largest blob's kind (classify_shape)
    colours: dict  # colour -> (fraction of the image, centre x, centre y) of its foreground pixels


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels [H, W] int, -1 off the mask; areas [n]) of the 4-connected blobs of a bool mask.
    Runs of each row joined with a union-find: a few hundred runs for these pictures."""
    h, _ = mask.shape
    runs: list[tuple[int, int, int]] = []  # (row, start, end)
    row_runs: list[list[int]] = []
    for y in range(h):
        d = np.diff(np.concatenate(([0], mask[y].astype(np.int8), [0])))
        starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        row_runs.append(list(range(len(runs), len(runs) + len(starts))))
        runs.extend((y, int(s), int(e)) for s, e in zip(starts, ends))
    parent = list(range(len(runs)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y in range(1, h):
        above = row_runs[y - 1]
        for i in row_runs[y]:
            _, s, e = runs[i]
            for j in above:
                _, s2, e2 = runs[j]
                if s2 < e and s < e2:  # overlapping columns: 4-connected
                    ri, rj = find(i), find(j)
                    if ri != rj:
                        parent[ri] = rj
    labels = np.full(mask.shape, -1, dtype=np.int64)
    roots: dict[int, int] = {}
    for i, (y, s, e) in enumerate(runs):
        labels[y, s:e] = roots.setdefault(find(i), len(roots))
    areas = np.bincount(labels[labels >= 0], minlength=len(roots)) if roots else np.zeros(0, np.int64)
    return labels, areas


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    hull = half(pts)[:-1] + half(reversed(pts))[:-1]
    x, y = np.array(hull, dtype=np.float64).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def shape_features(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(fill, solidity, top-corner occupancy, bottom-corner occupancy) of one blob's bool mask."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    h, w = box.shape
    area = float(box.sum())
    fill = area / (h * w)
    # The hull of the pixels' outer corners: each row's leftmost and rightmost pixel suffices.
    pts = []
    for r in range(h):
        cols = np.flatnonzero(box[r])
        if len(cols):
            a, b = cols[0], cols[-1] + 1
            pts += [(a, r), (a, r + 1), (b, r), (b, r + 1)]
    solidity = min(1.0, area / max(_hull_area(np.array(pts)), 1.0))
    ch, cw = max(1, round(_CORNER * h)), max(1, round(_CORNER * w))
    top = (box[:ch, :cw].mean() + box[:ch, -cw:].mean()) / 2
    bottom = (box[-ch:, :cw].mean() + box[-ch:, -cw:].mean()) / 2
    return fill, solidity, float(top), float(bottom)


def classify_shape(mask: np.ndarray) -> str:
    """The SHAPES kind whose prototype (SHAPE_PROTOTYPES) is nearest to a blob's shape_features."""
    f = np.array(shape_features(mask))
    return min(SHAPE_PROTOTYPES, key=lambda k: float(np.sum((f - np.array(SHAPE_PROTOTYPES[k])) ** 2)))


def _analysis_pixels(image) -> np.ndarray:
    a = to_uint8(image)
    h, w, _ = a.shape
    if max(h, w) > ANALYSIS_MAX_SIDE:
        from PIL import Image

        scale = ANALYSIS_MAX_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        a = np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BOX))
    return a


def read_image(image) -> Reading:
    """Read one picture ([-1, 1] tensor, uint8 array or PIL image): see `Reading`."""
    labels, dist = classify_pixels(_analysis_pixels(image))
    h, w = labels.shape
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    fg = (labels != bg) & (dist[..., bg] > FOREGROUND_MIN_DISTANCE)
    n_fg = int(fg.sum())
    yy, xx = np.mgrid[0:h, 0:w]
    fx, fy = (xx + 0.5) / w, (yy + 0.5) / h
    foreground = centre = None
    colours = {}
    if n_fg >= max(1, FOREGROUND_MIN_FRACTION * h * w):
        counts = np.bincount(labels[fg], minlength=len(_NAMES))
        foreground = _NAMES[int(counts.argmax())]
        centre = (float(fx[fg].mean()), float(fy[fg].mean()))
    for k in np.flatnonzero(np.bincount(labels[fg], minlength=len(_NAMES))):
        m = fg & (labels == k)
        colours[_NAMES[int(k)]] = (float(m.sum()) / (h * w), float(fx[m].mean()), float(fy[m].mean()))
    blobs, areas = _components(fg)
    big = np.flatnonzero(areas >= COMPONENT_MIN_FRACTION * h * w)
    shape = classify_shape(blobs == int(big[np.argmax(areas[big])])) if len(big) else None
    return Reading(_NAMES[bg], foreground, centre, len(big), shape, colours)


# --------------------------------------------------------------------------------------------
# The suite's categories

CATEGORIES = ("colour", "background", "position", "relation", "count", "shape")


def categories_of(scene: Scene) -> tuple[str, ...]:
    """The categories a caption is scored in: every scene in background and count; a one-shape
    scene in colour, position and shape too; a two-shape scene in relation."""
    n = scene.n_shapes
    extra = ("colour", "position", "shape") if n == 1 else ("relation",) if n == 2 else ()
    return tuple(c for c in CATEGORIES if c in ("background", "count") + extra) if n else ("background",)


def judge(category: str, scene: Scene, reading: Reading) -> bool:
    """Whether a picture (its Reading) shows what `scene` states, in one category (CATEGORIES)."""
    if category == "background":
        return reading.background == scene.background
    if category == "count":
        return reading.count == scene.n_shapes
    if category == "colour":
        return reading.foreground == scene.shapes[0].colour
    if category == "shape":
        return reading.shape == scene.shapes[0].shape
    if category == "position":
        if reading.centre is None:
            return False
        x0, y0, x1, y1 = POSITION_REGIONS[scene.shapes[0].position]
        return x0 <= reading.centre[0] <= x1 and y0 <= reading.centre[1] <= y1
    if category == "relation":
        a, b = scene.shapes
        ca, cb = reading.colours.get(a.colour), reading.colours.get(b.colour)
        if ca is None or cb is None or min(ca[0], cb[0]) < COMPONENT_MIN_FRACTION:
            return False
        axis, sign = {"left": (1, 1), "right": (1, -1), "top": (2, 1), "bottom": (2, -1)}[a.position]
        return sign * (cb[axis] - ca[axis]) > RELATION_MARGIN
    raise ValueError(f"unknown category {category!r}: one of {', '.join(CATEGORIES)}")
