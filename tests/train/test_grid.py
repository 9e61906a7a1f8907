"""train/grid.py: the sample grid's size, where each image lands, scaling, captions, the PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from train.grid import GridLayout, make_grid, save_grid

# Solid colours in [-1, 1] whose uint8 values ((v + 1) * 127.5, rounded) are exact.
COLOURS = [(-1.0, -1.0, 1.0), (1.0, -1.0, -1.0), (-1.0, 1.0, -1.0), (1.0, 1.0, -1.0)]
COLOURS_U8 = [tuple(0 if c < 0 else 255 for c in col) for col in COLOURS]


def solid(colours, side: int) -> torch.Tensor:
    """[N, 3, side, side]: image i filled with colours[i]."""
    return torch.tensor(colours, dtype=torch.float32)[:, :, None, None].expand(-1, -1, side, side).clone()


def test_layout_sizes_and_tiles():
    # 3 columns of 16 px images shown at the 128 px minimum, 4 px apart, captions below.
    layout = GridLayout(rows=1, cols=3, cell=128, caption_lines=4)
    assert layout.size == (3 * 132 + 4, 132 + 4 + 13 * 4 + 6) == (400, 194)
    assert layout.tile(0, 0) == (4, 4, 132, 132)
    assert layout.tile(0, 2) == (268, 4, 396, 132)
    # Row labels take 96 px on the left; no captions, no caption band.
    layout = GridLayout(rows=2, cols=2, cell=200, labelled=True)
    assert layout.size == (96 + 2 * 204 + 4, 2 * 204 + 4) == (508, 412)
    assert layout.tile(1, 1) == (96 + 4 + 204, 4 + 204, 96 + 4 + 204 + 200, 4 + 204 + 200)


def test_image_i_lands_in_column_i_of_its_row():
    base = solid(COLOURS[:3], 16)                # row 0: 16 px, scaled x8 (nearest)
    sr = solid(COLOURS[1:4], 32)                 # row 1: 32 px, scaled x4 (nearest)
    grid, layout = make_grid([base, sr], ["a", "b", "c"], ["base (16px)", "sr (32px)"])
    assert layout == GridLayout(rows=2, cols=3, cell=128, labelled=True, caption_lines=4)
    assert grid.size == layout.size == (96 + 3 * 132 + 4, 2 * 132 + 4 + 58)
    a = np.asarray(grid)
    for row, colours in ((0, COLOURS_U8[:3]), (1, COLOURS_U8[1:4])):
        for col, colour in enumerate(colours):
            x0, y0, x1, y1 = layout.tile(row, col)
            tile = a[y0:y1, x0:x1]
            assert (tile == colour).all(), (row, col)
            # the 4 px gutters around it stay white
            assert (a[y0:y1, x0 - 4:x0] == 255).all() and (a[y1:y1 + 4, x0:x1] == 255).all()


def test_small_images_keep_their_pixels_and_values_are_clipped():
    img = torch.full((1, 3, 16, 16), -1.0)
    img[:, :, :, 8:] = 1.0  # right half white
    img[:, :, 0, 0] = 3.0  # out of range: clipped to white, one pixel -> an 8x8 block (nearest)
    grid, layout = make_grid([img], min_cell=128)
    x0, y0, x1, y1 = layout.tile(0, 0)
    tile = np.asarray(grid)[y0:y1, x0:x1]
    assert (tile[:, 64:] == 255).all()
    assert (tile[:8, :8] == 255).all() and (tile[8:, :64] == 0).all() and (tile[:8, 8:64] == 0).all()
    # An image larger than min_cell sets the cell: shown at its own size, pixel for pixel.
    big = torch.linspace(-1, 1, 150)[None, None, None, :].expand(1, 3, 150, 150)
    grid, layout = make_grid([big], min_cell=128)
    assert layout.cell == 150
    x0, y0, x1, y1 = layout.tile(0, 0)
    want = ((big[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(np.asarray(grid)[y0:y1, x0:x1], want)


def test_captions_go_under_their_column():
    grid, layout = make_grid([solid(COLOURS[:2], 16)], ["", "a red circle"])
    a = np.asarray(grid)
    x, y = layout.caption_origin(0)
    band0 = a[y:, x:x + layout.cell]
    x, y = layout.caption_origin(1)
    band1 = a[y:, x:x + layout.cell]
    assert (band0 == 255).all()  # an empty caption draws nothing
    assert (band1 < 128).any()  # text pixels


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"same number of images, got \[2, 3\]"):
        make_grid([solid(COLOURS[:2], 8), solid(COLOURS[:3], 8)])
    with pytest.raises(ValueError, match="1 captions for 2 images per row"):
        make_grid([solid(COLOURS[:2], 8)], ["only one"])
    with pytest.raises(ValueError, match="2 row labels for 1 rows"):
        make_grid([solid(COLOURS[:2], 8)], row_labels=["a", "b"])


def test_save_grid_writes_a_png_atomically(tmp_path):
    images = solid(COLOURS, 16)
    path = save_grid(images, ["a", "b", "c", "d"], tmp_path / "sub" / "grid.png")
    assert path == tmp_path / "sub" / "grid.png"
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left
    grid, layout = make_grid([images], ["a", "b", "c", "d"])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == layout.size == (4 * 132 + 4, 194)
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(grid))
