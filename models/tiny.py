"""Small reference networks for tests, toy problems and the JVP benchmark.

Both follow the backbone interface ``forward(z, r, t, edge=None, label=None, keep=None)`` and
are conditioned on (t, t - r), so they exercise the same objective code as the real backbones.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import jvp_ops


def time_features(s: Tensor, dim: int, max_period: float = 100.0) -> Tensor:
    """Sinusoidal features of a [B] time (scale 1: keeps d/dt small, see ModelConfig.time_scale)."""
    half = dim // 2
    dt = torch.promote_types(s.dtype, torch.float32)      # fp32 at least, fp64 kept
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=s.device,
                                                           dtype=dt) / half)
    ang = s[:, None].to(dt) * freqs[None] * 2 * math.pi
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).to(s.dtype)


class ToyMLP(nn.Module):
    """An MLP for 2-D (or any flat) data with an optional class condition and null class."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, num_classes: int = 0,
                 temb: int = 32):
        super().__init__()
        self.num_classes = num_classes
        self.temb = temb
        self.label_emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(dim + 2 * temb, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, edge: Optional[Tensor] = None,
                label: Optional[Tensor] = None, keep: Optional[Tensor] = None) -> Tensor:
        h = self.inp(torch.cat([z, time_features(t, self.temb),
                                time_features(t - r, self.temb)], dim=1))
        if self.label_emb is not None and label is not None:
            if keep is not None:                        # null class id = num_classes
                label = torch.where(keep, label, torch.full_like(label, self.num_classes))
            h = h + self.label_emb(label)
        for blk in self.blocks:
            h = h + blk(F.silu(h))
        return self.out(F.silu(h))


class _Attention(nn.Module):
    """Explicit softmax attention (forward-mode AD friendly)."""

    def __init__(self, ch: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm = jvp_ops.GroupNorm(8, ch)
        self.qkv = jvp_ops.Conv2d(ch, 3 * ch, 1)
        self.proj = jvp_ops.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = self.qkv(h).reshape(b, 3, self.heads, c // self.heads, hh * ww).unbind(1)
        a = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(c // self.heads), dim=-1)
        o = (v @ a.transpose(-1, -2)).reshape(b, c, hh, ww)
        return x + self.proj(o)


class TinyConvNet(nn.Module):
    """A small conv net with attention: a stand-in backbone for tests and benchmarks."""

    def __init__(self, in_channels: int = 1, ch: int = 32, edge_channels: int = 0,
                 num_classes: int = 0, temb: int = 64):
        super().__init__()
        self.temb, self.num_classes = temb, num_classes
        self.t_mlp = nn.Sequential(jvp_ops.Linear(2 * temb, ch), jvp_ops.SiLU(),
                                   jvp_ops.Linear(ch, ch))
        self.inp = jvp_ops.Conv2d(in_channels + edge_channels, ch, 3, padding=1)
        self.null_edge = nn.Parameter(torch.randn(ch) * 0.02) if edge_channels else None
        self.label_emb = nn.Embedding(num_classes + 1, ch) if num_classes else None
        self.c1 = jvp_ops.Conv2d(ch, ch, 3, padding=1)
        self.down = jvp_ops.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.attn = _Attention(ch)
        self.up = jvp_ops.Conv2d(ch, ch, 3, padding=1)
        self.out = jvp_ops.Conv2d(2 * ch, in_channels, 3, padding=1)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, edge: Optional[Tensor] = None,
                label: Optional[Tensor] = None, keep: Optional[Tensor] = None) -> Tensor:
        emb = self.t_mlp(torch.cat([time_features(t, self.temb),
                                    time_features(t - r, self.temb)], 1))   # [B, ch]
        x = z
        if self.null_edge is not None:
            if edge is None:
                raise ValueError("this network expects an edge map")
            e = edge.to(z.dtype)
            if keep is not None:
                e = e * keep.view(-1, 1, 1, 1).to(z.dtype)
                emb = emb + (~keep).to(z.dtype)[:, None] * self.null_edge
            x = torch.cat([x, e], 1)
        if self.label_emb is not None and label is not None:
            if keep is not None:
                label = torch.where(keep, label, torch.full_like(label, self.num_classes))
            emb = emb + self.label_emb(label)
        h0 = jvp_ops.silu(self.inp(x) + emb[:, :, None, None])              # [B, ch, H, W]
        h = jvp_ops.silu(self.c1(h0))
        h = self.attn(jvp_ops.silu(self.down(h)))                          # [B, ch, H/2, W/2]
        up = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = jvp_ops.silu(self.up(up))                                      # [B, ch, H, W]
        return self.out(torch.cat([h, h0], 1))
