"""U-Net with a multi-scale edge encoder: the MeanFlow-Edge2Image backbone.

An ADM/DDPM-style U-Net (residual blocks with scale-shift conditioning, self-attention at
chosen resolutions and in the bottleneck, skip connections) predicting the MeanFlow average
velocity u(z, r, t | edge, class). It runs on VAE latents (4x32x32 with a 256x256 edge map) or
on pixels (1 or 3 channels at 32x32 with a 32x32 edge map).

The edge encoder (ControlNet-like) brings the edge map down to the model's resolution with a
stem of stride-2 convolutions (log2(edge_size / input_size) of them), then produces one feature
map per U-Net level; each branch ends in a zero-initialised 1x1 convolution whose output is
added to the encoder features at the start of that level. At initialisation the edge path
therefore changes nothing, and the U-Net learns to use it gradually.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import jvp_ops
from .layers import (ConditionEmbedder, SpatialSelfAttention, check_inputs, check_prediction,
                     edge_keep_mask, norm_groups, to_velocity, use_fast_jvp_ops, zero_init_)

EMB_MULT = 4               # conditioning width = 4 x base channels (DDPM/ADM)
ATTN_HEAD_CHANNELS = 64    # channels per attention head (ADM's num_head_channels)
EDGE_STEM_WIDTH = 16       # edge-stem channels at full edge resolution; doubled per stride


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _log2_ratio(edge_size: int, input_size: int) -> int:
    """log2(edge_size / input_size), which must be a whole number >= 0."""
    ratio = edge_size / input_size
    n = int(round(math.log2(ratio))) if ratio >= 1 else -1
    if n < 0 or input_size * 2 ** n != edge_size:
        raise ValueError(f"edge_size / input_size must be a power of 2 (>= 1), got "
                         f"edge_size {edge_size} / input_size {input_size}")
    return n


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, conditioned by a per-sample scale and shift (ADM).

    The second convolution starts at zero, so the block starts as its skip connection.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(norm_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # x: [B, Cin, H, W], emb: [B, E] (already through SiLU)
        h = self.conv1(jvp_ops.silu(self.norm1(x)))                         # [B, Cout, H, W]
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x [B, Cout, 1, 1]
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(jvp_ops.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)                                                 # [B, C, H/2, W/2]


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


class UNetLayer(nn.Module):
    """A residual block, optionally followed by self-attention."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, attn: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        self.attn = SpatialSelfAttention(out_ch, ATTN_HEAD_CHANNELS) if attn else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class EdgeEncoder(nn.Module):
    """Edge map [B, Ce, S_e, S_e] -> one feature map per U-Net level (zero at initialisation).

    stem: conv at full edge resolution, then log2(S_e / S) stride-2 convs down to the model's
    resolution S (none when S_e == S); level l > 0: one more stride-2 conv from level l - 1;
    each level: conv + SiLU, then a zero-initialised 1x1 conv to the U-Net's width there.
    No normalisation: edge maps are sparse binary images whose density is itself a signal.
    """

    def __init__(self, edge_channels: int, edge_size: int, input_size: int,
                 level_channels: Sequence[int]):
        super().__init__()
        n_stem = _log2_ratio(edge_size, input_size)
        trunk_ch = level_channels[0]
        widths = [min(EDGE_STEM_WIDTH * 2 ** i, trunk_ch) for i in range(n_stem)] + [trunk_ch]
        stem: list[nn.Module] = [nn.Conv2d(edge_channels, widths[0], 3, padding=1), nn.SiLU()]
        for cin, cout in zip(widths[:-1], widths[1:]):
            stem += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.SiLU()]
        self.stem = nn.Sequential(*stem)
        self.down = nn.ModuleList()
        self.convs = nn.ModuleList()
        self.outs = nn.ModuleList()
        prev = trunk_ch
        for level, ch in enumerate(level_channels):
            self.down.append(nn.Conv2d(prev, ch, 3, stride=2, padding=1) if level > 0
                             else nn.Identity())
            self.convs.append(nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU()))
            self.outs.append(zero_init_(nn.Conv2d(ch, ch, 1)))
            prev = ch

    def forward(self, edge: Tensor) -> list[Tensor]:
        e = self.stem(edge)                                                 # [B, C0, S, S]
        feats = []
        for level, (down, conv, out) in enumerate(zip(self.down, self.convs, self.outs)):
            if level > 0:
                e = jvp_ops.silu(down(e))                                   # [B, Cl, S/2^l, .]
            e = conv(e)
            feats.append(out(e))
        return feats


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class UNet(nn.Module):
    """U-Net predicting the MeanFlow average velocity u(z, r, t | edge, class).

    ``forward(z, r, t, edge=None, label=None, keep=None) -> [B, C, H, W]``; see
    models/__init__.py for the interface. ``edge=None`` on a model with an edge input means the
    null edge for every sample (likewise ``label=None`` the null class).
    """

    explicit_jvp = True      # forward(..., jvp_tangent=v) -> (u, du/dt): meanflow's no-grad JVP

    def __init__(self, input_size: int = 32, in_channels: int = 4, base_channels: int = 128,
                 channel_mults: Sequence[int] = (1, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (8,), dropout: float = 0.1,
                 edge_channels: int = 1, edge_size: int = 256, num_classes: int = 0,
                 time_embed: str = "sum", time_scale: float = 1.0, prediction: str = "u",
                 x_pred_t_min: float = 0.05):
        super().__init__()
        levels = len(channel_mults)
        self.prediction, self.x_pred_t_min = check_prediction(prediction, x_pred_t_min)
        if levels == 0 or any(int(m) < 1 for m in channel_mults):
            raise ValueError(f"channel_mults must be a non-empty list of positive integers, "
                             f"got {list(channel_mults)}")
        if input_size % 2 ** (levels - 1):
            raise ValueError(f"input_size {input_size} cannot be halved {levels - 1} times "
                             f"(len(channel_mults) = {levels})")
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.edge_channels, self.edge_size = edge_channels, edge_size
        emb_dim = EMB_MULT * base_channels
        chans = [base_channels * int(m) for m in channel_mults]
        attn_res = {int(a) for a in attn_resolutions}

        self.cond = ConditionEmbedder(emb_dim, num_classes, edge_channels > 0, time_embed,
                                      time_scale)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Encoder: num_res_blocks layers per level, then a downsample (not after the last).
        # level_in[l] = width of the features entering level l, where the edge is added.
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, level_in = [base_channels], []
        ch, res = base_channels, input_size
        for level, out_ch in enumerate(chans):
            level_in.append(ch)
            layers = nn.ModuleList()
            for _ in range(num_res_blocks):
                layers.append(UNetLayer(ch, out_ch, emb_dim, dropout, res in attn_res))
                ch = out_ch
                skips.append(ch)
            self.down.append(layers)
            if level < levels - 1:
                self.downsample.append(Downsample(ch))
                skips.append(ch)
                res //= 2

        # Bottleneck: always with self-attention.
        self.mid = nn.ModuleList([UNetLayer(ch, ch, emb_dim, dropout, attn=True),
                                  UNetLayer(ch, ch, emb_dim, dropout, attn=False)])

        # Decoder: num_res_blocks + 1 layers per level, each consuming one skip.
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(levels)):
            layers = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                layers.append(UNetLayer(ch + skips.pop(), chans[level], emb_dim, dropout,
                                        res in attn_res))
                ch = chans[level]
            self.up.append(layers)
            if level > 0:
                self.upsample.append(Upsample(ch))
                res *= 2

        self.norm_out = nn.GroupNorm(norm_groups(ch), ch)
        self.conv_out = zero_init_(nn.Conv2d(ch, in_channels, 3, padding=1))   # u = 0 at init

        self.edge_encoder = (EdgeEncoder(edge_channels, edge_size, input_size, level_in)
                             if edge_channels > 0 else None)
        use_fast_jvp_ops(self)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, edge: Optional[Tensor] = None,
                label: Optional[Tensor] = None, keep: Optional[Tensor] = None,
                jvp_tangent: Optional[Tensor] = None) -> Tensor:
        """u [B, C, H, W]; with ``jvp_tangent=v`` (no-grad use), the pair (u, du/dt) along
        (v, 0, 1) of (z, r, t) with the tangent carried explicitly (models/tangent.py)."""
        check_inputs(z, r, t, edge, label, keep, in_channels=self.in_channels,
                     input_size=self.input_size, edge_channels=self.edge_channels,
                     edge_size=self.edge_size, num_classes=self.num_classes)
        if jvp_tangent is not None:
            from .tangent import unet_jvp
            return unet_jvp(self, z, r, t, jvp_tangent, edge, label, keep)
        emb = jvp_ops.silu(self.cond(r, t, label, keep, edge is not None).to(z.dtype))  # [B, E]
        edge_feats: list[Optional[Tensor]] = [None] * len(self.down)
        if edge is not None:
            edge_feats = self.edge_encoder(edge.to(z.dtype))   # per level [B, C_l, S_l, S_l]
            m = edge_keep_mask(keep, z)
            if m is not None:                    # dropped samples: no edge features at all
                edge_feats = [f * m for f in edge_feats]

        h = self.conv_in(z)                                                 # [B, C, S, S]
        hs = []
        for level, layers in enumerate(self.down):
            if level > 0:
                h = self.downsample[level - 1](h)                           # [B, C, S/2^l, .]
            if edge_feats[level] is not None:
                h = h + edge_feats[level]          # the skip below carries the edge too
            hs.append(h)
            for layer in layers:
                h = layer(h, emb)
                hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)                                               # [B, C, S_min, .]
        for i, layers in enumerate(self.up):
            for layer in layers:
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](h)                                     # [B, C, 2x, 2x]
        out = self.conv_out(jvp_ops.silu(self.norm_out(h)))                 # [B, Cin, S, S]
        return to_velocity(out, z, t, self.prediction, self.x_pred_t_min)
