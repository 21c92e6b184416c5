"""Images in and out: the pipeline every input shares (any PIL mode -> RGB -> ADM centre
crop), used when a dataset is cached (preprocess/cache.py) and when a trained model is given a
photo or sketch (meanflow/pipeline.py), and the helpers that turn samples into image files.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

UINT16_TO_UINT8 = 257.0            # 65535 / 255: maps the 16-bit range onto 8 bits exactly
WHITE = (255, 255, 255, 255)       # background that transparent pixels are composited onto


# --------------------------------------------------------------------------------------------
# Image preparation
# --------------------------------------------------------------------------------------------
def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer / float greyscale -> 8-bit 'L' without clipping.

    PIL's own convert('L') clips 'I;16' at 255 instead of rescaling, which turns almost every
    16-bit photo white.
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = arr.astype(np.float64) / UINT16_TO_UINT8
    elif img.mode == "I":
        # 16-bit PNGs open as 'I' in some Pillow versions: rescale whatever exceeds 8 bits
        out = arr.astype(np.float64)
        if out.max(initial=0) > 255:
            out = out / UINT16_TO_UINT8
    else:  # 'F'
        out = arr.astype(np.float64)
        if np.nanmax(out, initial=0) <= 1.0:
            out = out * 255.0
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(out)), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 'RGB': transparency composited on white, 16-bit rescaled, CMYK and
    palette converted."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _to_8bit(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion): halve with a box filter while the short side is at
    least twice the target (cheap and alias-free), then one bicubic resize so the short side
    equals ``size``, then crop the centre square. Returns uint8 [size, size, C]."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    arr = arr[top: top + size, left: left + size]
    return arr[..., None] if arr.ndim == 2 else arr


def open_image(path: str | Path, max_pixels: Optional[int] = None) -> Image.Image:
    """Open and fully decode an image file. Raises on truncated, corrupt, non-image and
    zero-byte files, and on decompression bombs (PIL's warning is turned into an error).

    ``max_pixels`` is PIL's own limit for this call only: the process-wide
    ``Image.MAX_IMAGE_PIXELS`` is put back afterwards, whatever happens."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        if max_pixels is not None:
            Image.MAX_IMAGE_PIXELS = max_pixels
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()                   # decode now: truncation surfaces here, not later
                img = im.copy()
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    try:
        img = ImageOps.exif_transpose(img)  # camera photos are stored rotated
    except Exception:  # noqa: BLE001 - a broken EXIF block should not cost the image
        pass
    return img


def prepare_image(img: Image.Image, size: int, channels: int,
                  min_side: Optional[int] = None) -> np.ndarray:
    """PIL image -> uint8 [size, size, channels] (channels 3 = RGB, 1 = luma)."""
    if min_side is not None and min(img.size) < min_side:
        raise ValueError(f"image {img.size[0]}x{img.size[1]} is smaller than half the target "
                         f"size ({min_side} px)")
    rgb = to_rgb(img)
    if channels == 1:
        rgb = rgb.convert("L")
    elif channels != 3:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return center_crop_arr(rgb, size)


# --------------------------------------------------------------------------------------------
# Samples as image files
# --------------------------------------------------------------------------------------------
def to_uint8(x) -> np.ndarray:
    """torch [B, C, H, W] in [-1, 1] -> numpy [B, H, W, C] uint8 (C = 1 or 3)."""
    import torch
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def as_rgb(imgs: np.ndarray) -> np.ndarray:
    """[..., C] uint8 with C = 1 or 3 -> [..., 3] (grey repeated over the channels)."""
    return np.repeat(imgs, 3, axis=-1) if imgs.shape[-1] == 1 else imgs


def safe_name(key: str) -> str:
    """A dataset key or user string as a file name: runs of other characters become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)


def save_png(path: Path, img: np.ndarray) -> None:
    """uint8 [H, W, C] (C = 1: a greyscale PNG) -> ``path``."""
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path, optimize=False)


def tile_grid(rows: list[list[Optional[np.ndarray]]], pad: int = 2, zoom: int = 1,
              pad_value: int = 255) -> np.ndarray:
    """Tiles laid out in rows -> one uint8 RGB image [H', W', 3].

    ``rows`` is a list of rows, each a list of tiles: uint8 [H, W], [H, W, 1] or [H, W, 3],
    all of one size; None is a blank tile (``pad_value``) of that size, as is the missing end
    of a row shorter than the longest. Each tile is upscaled ``zoom`` times (nearest
    neighbour), and ``pad`` pixels of ``pad_value`` separate the tiles and frame the grid:
    H' = R (zoom H + pad) + pad, W' = C (zoom W + pad) + pad for R rows of at most C tiles,
    the layout of torchvision's make_grid.
    """
    first = next((t for r in rows for t in r if t is not None), None)
    if first is None:
        raise ValueError("tile_grid: no tile (every entry is None, or there are no rows)")
    if int(zoom) != zoom or zoom < 1 or pad < 0:
        raise ValueError(f"tile_grid: zoom must be an integer >= 1 and pad >= 0, got zoom "
                         f"{zoom}, pad {pad}")
    h, w = np.asarray(first).shape[:2]
    th, tw = h * zoom, w * zoom
    ncols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (th + pad) + pad, ncols * (tw + pad) + pad, 3), pad_value,
                   np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if tile is None:
                continue
            t = np.asarray(tile)
            t = t[..., None] if t.ndim == 2 else t
            if t.dtype != np.uint8 or t.ndim != 3 or t.shape[-1] not in (1, 3):
                raise ValueError(f"tile_grid: tile ({i}, {j}) must be uint8 [H, W], [H, W, 1] "
                                 f"or [H, W, 3], got {t.dtype} {list(t.shape)}")
            if t.shape[:2] != (h, w):
                raise ValueError(f"tile_grid: tile ({i}, {j}) is {t.shape[0]}x{t.shape[1]}, the "
                                 f"first tile {h}x{w}")
            if zoom > 1:
                t = t.repeat(zoom, axis=0).repeat(zoom, axis=1)
            y, x = pad + i * (th + pad), pad + j * (tw + pad)
            grid[y:y + th, x:x + tw] = t          # a [.., 1] tile broadcasts over RGB
    return grid
