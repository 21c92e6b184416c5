"""meanflow/images.py: the grid builder every image sheet uses (tile_grid) and the helpers that
turn samples into image files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from meanflow.images import as_rgb, safe_name, save_png, tile_grid, to_uint8


def tiles(n: int, h: int = 3, w: int = 5, c: int = 3) -> list[np.ndarray]:
    """``n`` distinct uint8 tiles [h, w, c] (values never 255, so a tile is not a gutter)."""
    rng = np.random.default_rng(n * 100 + h * 10 + w)
    return [rng.integers(0, 255, (h, w, c), dtype=np.uint8) for _ in range(n)]


def cell(grid: np.ndarray, r: int, c: int, h: int, w: int, pad: int = 2) -> np.ndarray:
    y, x = pad + r * (h + pad), pad + c * (w + pad)
    return grid[y:y + h, x:x + w]


def test_shape_placement_and_pad_colour():
    t = tiles(6)
    grid = tile_grid([t[:3], t[3:]], pad=2, pad_value=255)
    assert grid.dtype == np.uint8 and grid.shape == (2 * (3 + 2) + 2, 3 * (5 + 2) + 2, 3)
    gutter = np.ones(grid.shape[:2], bool)
    for k, tile in enumerate(t):
        r, c = divmod(k, 3)
        assert np.array_equal(cell(grid, r, c, 3, 5), tile), (r, c)
        y, x = 2 + r * 5, 2 + c * 7
        gutter[y:y + 3, x:x + 5] = False
    assert (grid[gutter] == 255).all()
    # another pad width and colour
    grid = tile_grid([t[:2]], pad=1, pad_value=7)
    assert grid.shape == (1 + 3 + 1, 1 + 2 * (5 + 1), 3)
    assert (grid[0] == 7).all() and (grid[:, 0] == 7).all() and (grid[:, 6] == 7).all()
    assert np.array_equal(grid[1:4, 7:12], t[1])


def test_none_and_short_rows_are_blank_tiles_of_the_first_size():
    t = tiles(3)
    grid = tile_grid([[None, t[0], t[1]], [t[2]]], pad=2, pad_value=255)
    assert grid.shape == (2 * 5 + 2, 3 * 7 + 2, 3)
    assert (cell(grid, 0, 0, 3, 5) == 255).all()                # None
    assert np.array_equal(cell(grid, 0, 1, 3, 5), t[0])
    assert np.array_equal(cell(grid, 1, 0, 3, 5), t[2])
    assert (cell(grid, 1, 1, 3, 5) == 255).all() and (cell(grid, 1, 2, 3, 5) == 255).all()
    with pytest.raises(ValueError, match="no tile"):
        tile_grid([[None, None]])


def test_grey_tiles_become_rgb():
    g2 = tiles(1, c=1)[0][..., 0]                  # [H, W]
    g3 = tiles(2, c=1)[1]                          # [H, W, 1]
    rgb = tiles(1)[0]
    grid = tile_grid([[g2, g3, rgb]])
    assert grid.shape[-1] == 3
    assert np.array_equal(cell(grid, 0, 0, 3, 5), np.repeat(g2[..., None], 3, -1))
    assert np.array_equal(cell(grid, 0, 1, 3, 5), np.repeat(g3, 3, -1))
    assert np.array_equal(cell(grid, 0, 2, 3, 5), rgb)


def test_zoom_is_a_nearest_neighbour_upscale_of_each_tile():
    t = tiles(2)
    grid = tile_grid([t], pad=2, zoom=3)
    assert grid.shape == (3 * 3 + 4, 2 * (3 * 5 + 2) + 2, 3)
    for c, tile in enumerate(t):
        big = cell(grid, 0, c, 9, 15)
        assert np.array_equal(big[::3, ::3], tile)
        assert np.array_equal(big, tile.repeat(3, 0).repeat(3, 1))
    with pytest.raises(ValueError, match="zoom"):
        tile_grid([t], zoom=0)


def test_tiles_of_another_size_or_dtype_are_refused():
    t = tiles(1)[0]
    with pytest.raises(ValueError, match="is 4x5, the first tile 3x5"):
        tile_grid([[t, np.zeros((4, 5, 3), np.uint8)]])
    with pytest.raises(ValueError, match="must be uint8"):
        tile_grid([[t, t.astype(np.float32)]])


def test_the_layout_is_torchvisions_make_grid():
    """The grids evaluate.py wrote with make_grid(nrow, padding=2, pad_value=255)."""
    from torchvision.utils import make_grid
    t = tiles(6)
    want = make_grid(torch.from_numpy(np.stack(t)).permute(0, 3, 1, 2), nrow=3, padding=2,
                     pad_value=255).permute(1, 2, 0).numpy()
    assert np.array_equal(tile_grid([t[:3], t[3:]], pad=2, pad_value=255), want)


def test_sample_helpers(tmp_path):
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0]).reshape(1, 1, 1, 5)
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 1, 5, 1)
    assert u[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    assert as_rgb(u).shape == (1, 1, 5, 3) and as_rgb(as_rgb(u)).shape == (1, 1, 5, 3)
    assert safe_name("test/T-shirt top/00012") == "test_T-shirt_top_00012"
    save_png(tmp_path / "g.png", u[0])
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L" and np.asarray(im).tolist() == [u[0, :, :, 0].tolist()[0]]
