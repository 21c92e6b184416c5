"""Images as arrays: [-1, 1] tensors to uint8, and one grid builder."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8 (C = 1 or 3)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def tile_grid(rows: list[list[Optional[np.ndarray]]], pad: int = 2, zoom: int = 1,
              pad_value: int = 255) -> np.ndarray:
    """Rows of uint8 tiles ([H, W], [H, W, 1] or [H, W, 3]; None: blank) -> [H', W', 3]."""
    first = next(t for r in rows for t in r if t is not None)
    h, w = first.shape[0] * zoom, first.shape[1] * zoom
    ncols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncols * (w + pad) + pad, 3), pad_value, np.uint8)
    for i, r in enumerate(rows):
        for j, t in enumerate(r):
            if t is None:
                continue
            t = t.reshape(t.shape[0], t.shape[1], -1)
            t = np.repeat(np.repeat(t, zoom, 0), zoom, 1)
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = t if t.shape[-1] == 3 else np.repeat(t, 3, -1)
    return out
