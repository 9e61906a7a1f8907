"""Sample grids: images in [-1, 1] laid out as a PNG, a column per prompt, a row per cascade stage.

    ┌───────┬────────┬────────┬─ ─ ─┐
    │ label │ tile   │ tile   │     │   row r: images rows[r][0 .. N-1], each scaled to `cell` px
    ├───────┼────────┼────────┼─ ─ ─┤
    │       │caption │caption │     │   up to `caption_lines` wrapped lines under each column
    └───────┴────────┴────────┴─ ─ ─┘

Used by the trainer's periodic samples and by `kiln sample`; PIL + torch only.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from train.atomic import atomic_write

__all__ = ["GridLayout", "make_grid", "save_grid"]

PAD = 4  # px between tiles and around the grid
LABEL_W = 96  # px of row labels, when there are any
LINE_H = 13  # px per caption line (the default font at size 11)


@dataclass(frozen=True)
class GridLayout:
    """Where things go in a grid of `rows` x `cols` square tiles of `cell` px."""

    rows: int
    cols: int
    cell: int
    labelled: bool = False
    caption_lines: int = 0  # 0: no captions

    @property
    def label_w(self) -> int:
        return LABEL_W if self.labelled else 0

    @property
    def text_h(self) -> int:
        return LINE_H * self.caption_lines + 6 if self.caption_lines else 0

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in px."""
        return (self.label_w + self.cols * (self.cell + PAD) + PAD,
                self.rows * (self.cell + PAD) + PAD + self.text_h)

    def tile(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a tile, right and bottom exclusive (a PIL box)."""
        x = self.label_w + PAD + col * (self.cell + PAD)
        y = PAD + row * (self.cell + PAD)
        return x, y, x + self.cell, y + self.cell

    def caption_origin(self, col: int) -> tuple[int, int]:
        return self.label_w + PAD + col * (self.cell + PAD), self.rows * (self.cell + PAD) + PAD


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> an RGB image (values outside [-1, 1] clipped)."""
    a = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a)


def make_grid(rows: Sequence[torch.Tensor], captions: Sequence[str] | None = None,
              row_labels: Sequence[str] | None = None, *, min_cell: int = 128,
              caption_lines: int = 4) -> tuple[Image.Image, GridLayout]:
    """The grid of `rows` ([N, 3, H_r, W_r] each, the same N prompts) and its layout. Every image
    is scaled to the largest row's side (at least `min_cell`): nearest neighbour when it at least
    doubles, so small images keep visible pixels, bicubic otherwise."""
    rows = list(rows)
    n = rows[0].shape[0]
    if any(r.shape[0] != n for r in rows):
        raise ValueError(f"every row needs the same number of images, got {[r.shape[0] for r in rows]}")
    if captions and len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images per row")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    layout = GridLayout(rows=len(rows), cols=n, cell=max(min_cell, max(r.shape[-1] for r in rows)),
                        labelled=bool(row_labels), caption_lines=caption_lines if captions else 0)
    grid = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font()
    cell = layout.cell
    for ri, row in enumerate(rows):
        left, top, _, _ = layout.tile(ri, 0)
        if row_labels:
            draw.text((4, top + cell // 2 - 6), str(row_labels[ri]), fill=(0, 0, 0), font=font)
        for ci in range(n):
            im = _to_pil(row[ci])
            if im.size[0] != cell:
                im = im.resize((cell, cell), Image.Resampling.NEAREST if im.size[0] * 2 <= cell else Image.Resampling.BICUBIC)
            grid.paste(im, layout.tile(ri, ci)[:2])
    if captions:
        chars = max(8, cell // 6)
        for ci, cap in enumerate(captions):
            x, y0 = layout.caption_origin(ci)
            for li, line in enumerate(textwrap.wrap(cap, chars)[:caption_lines]):
                draw.text((x, y0 + li * LINE_H), line, fill=(0, 0, 0), font=font)
    return grid, layout


def save_grid(images, captions: Sequence[str] | None, path: str | Path, *, rows: Sequence[torch.Tensor] | None = None,
              row_labels: Sequence[str] | None = None, min_cell: int = 128, caption_lines: int = 4) -> Path:
    """`make_grid` written as a PNG, atomically. `images` is [N, 3, H, W] in [-1, 1] (one row);
    `rows` gives several rows of the same N prompts instead (e.g. one per cascade stage)."""
    grid, _ = make_grid(list(rows) if rows is not None else [images], captions, row_labels,
                        min_cell=min_cell, caption_lines=caption_lines)
    path = Path(path)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path

