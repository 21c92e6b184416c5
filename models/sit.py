"""SiT/DiT backbone (Peebles & Xie 2023; Ma et al. 2024) as used by MeanFlow, with edge input.

Differences from DiT, all from MeanFlow or the edge task:
* the conditioning vector embeds (t, t - r) with two timestep embedders (sum or concat);
* the output is the average velocity u, so there is no learned-sigma half (C_out = C_in);
* an optional edge map is patchified onto the latent token grid by a zero-initialised
  projection and either added to the latent tokens ("add") or appended as tokens ("tokens");
* attention switches to an explicit path under forward-mode AD (see models/layers.py), and
  the no-grad MeanFlow JVP carries its tangent explicitly (models/tangent.py).

Sizes follow DiT (depth / hidden / heads): S 12/384/6, B 12/768/12, L 24/1024/16,
XL 28/1152/16, each with patch 2, 4 or 8: ``SiT_models["SiT-B/2"]``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from timm.layers import Mlp, PatchEmbed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import Tensor

from .layers import (Attention, ConditionEmbedder, check_inputs, check_prediction, has_tangent,
                     edge_keep_mask, to_velocity, use_fast_jvp_ops, zero_init_)

LN_EPS = 1e-6                  # DiT's LayerNorm epsilon
EDGE_MODES = ("add", "tokens")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x [B, N, D] scaled and shifted per sample by [B, D] vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(grid: int, dim: int, device: Optional[torch.device] = None) -> Tensor:
    """Fixed 2-D sin-cos positional embedding [grid*grid, dim], row-major like PatchEmbed."""
    if dim % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 for the 2-D sin-cos positional "
                         f"embedding, got {dim}")
    return build_sincos2d_pos_embed([grid, grid], dim, device=device)


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")   # DiT's MLP activation


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------
class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=_gelu_tanh, drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # x: [B, N, D] tokens, c: [B, D] conditioning
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)                        # 6 x [B, D]
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map from tokens to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)            # 2 x [B, D]
        return self.linear(modulate(self.norm_final(x), shift, scale))     # [B, N, p*p*C]


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class SiT(nn.Module):
    """Diffusion/flow transformer predicting the MeanFlow average velocity u(z, r, t | cond).

    ``forward(z, r, t, edge=None, label=None, keep=None) -> [B, C, H, W]``; see
    models/__init__.py for the interface. ``edge=None`` on a model with an edge input means the
    null edge for every sample (likewise ``label=None`` the null class).
    """

    explicit_jvp = True      # forward(..., jvp_tangent=v) -> (u, du/dt): meanflow's no-grad JVP

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, num_classes: int = 0, edge_channels: int = 0,
                 edge_size: int = 0, edge_mode: str = "add", time_embed: str = "sum",
                 time_scale: float = 1.0, prediction: str = "u", x_pred_t_min: float = 0.05,
                 grad_checkpointing: bool = False):
        super().__init__()
        # Recompute each block in the backward pass instead of keeping its activations. Only
        # where a graph is recorded: the objective's JVP runs under no_grad, so it is unaffected.
        self.grad_checkpointing = grad_checkpointing
        self.prediction, self.x_pred_t_min = check_prediction(prediction, x_pred_t_min)
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of the patch size "
                             f"{patch_size}")
        if edge_mode not in EDGE_MODES:
            raise ValueError(f"edge_mode must be one of {EDGE_MODES}, got {edge_mode!r}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes, self.edge_channels, self.edge_size = num_classes, edge_channels, edge_size
        self.edge_mode = edge_mode
        grid = input_size // patch_size

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.cond = ConditionEmbedder(hidden_size, num_classes, edge_channels > 0, time_embed,
                                      time_scale)
        # Fixed, so kept out of the state dict: rebuilt identically at construction.
        self.register_buffer("pos_embed", sincos_pos_embed(grid, hidden_size), persistent=False)

        self.edge_embedder: Optional[PatchEmbed] = None
        self.edge_pos_embed: Optional[nn.Parameter] = None
        if edge_channels > 0:
            # One edge patch per latent token: a 256 edge map over a 32 latent with patch 2
            # gives 16x16 edge patches on the same 16x16 grid.
            if edge_size <= 0 or (edge_size * patch_size) % input_size:
                raise ValueError(f"edge_size {edge_size} does not map onto the {grid}x{grid} "
                                 f"token grid (edge_size * patch_size must be a multiple of "
                                 f"input_size {input_size})")
            edge_patch = edge_size * patch_size // input_size
            self.edge_embedder = PatchEmbed(edge_size, edge_patch, edge_channels, hidden_size,
                                            bias=True)
            if edge_mode == "tokens":
                # Their own positional embedding, starting on the latent grid's positions.
                self.edge_pos_embed = nn.Parameter(sincos_pos_embed(grid, hidden_size))

        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()
        use_fast_jvp_ops(self)

    def initialize_weights(self) -> None:
        # Transformer linears: Xavier-uniform, zero bias (DiT, from ViT/MAE).
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)

        # Patch embedding: like a linear layer on flattened patches.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        # Time MLPs ~ N(0, 0.02), class table ~ N(0, 0.02), null edge ~ N(0, 0.02).
        self.cond.reset_parameters()

        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            zero_init_(block.adaLN_modulation[-1])

        # Output layer zero: u = 0 at initialisation.
        zero_init_(self.final_layer.adaLN_modulation[-1])
        zero_init_(self.final_layer.linear)

        # Edge projection zero: the edge path is a no-op at initialisation.
        if self.edge_embedder is not None:
            zero_init_(self.edge_embedder)

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]."""
        b, p, c = x.shape[0], self.patch_size, self.in_channels
        g = self.input_size // p
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)           # [B, C, g, p, g, p]
        return x.reshape(b, c, g * p, g * p)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, edge: Optional[Tensor] = None,
                label: Optional[Tensor] = None, keep: Optional[Tensor] = None,
                jvp_tangent: Optional[Tensor] = None) -> Tensor:
        """u [B, C, H, W]; with ``jvp_tangent=v`` (no-grad use), the pair (u, du/dt) along
        (v, 0, 1) of (z, r, t) with the tangent carried explicitly (models/tangent.py)."""
        check_inputs(z, r, t, edge, label, keep, in_channels=self.in_channels,
                     input_size=self.input_size, edge_channels=self.edge_channels,
                     edge_size=self.edge_size, num_classes=self.num_classes)
        if jvp_tangent is not None:
            from .tangent import sit_jvp
            return sit_jvp(self, z, r, t, jvp_tangent, edge, label, keep)
        x = self.x_embedder(z) + self.pos_embed.to(z.dtype)                 # [B, N, D]
        n = x.shape[1]
        c = self.cond(r, t, label, keep, edge is not None).to(x.dtype)      # [B, D]
        if edge is not None:
            e = self.edge_embedder(edge.to(x.dtype))                        # [B, N, D]
            m = edge_keep_mask(keep, e)
            if m is not None:                   # dropped samples: no edge features at all
                e = e * m
            if self.edge_mode == "add":
                x = x + e
            else:
                x = torch.cat([x, e + self.edge_pos_embed.to(e.dtype)], dim=1)  # [B, 2N, D]
        elif self.edge_mode == "tokens" and self.edge_embedder is not None:
            # No edge map: null edge tokens (positions only) keep the sequence the same.
            e = self.edge_pos_embed.to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x, e], dim=1)
        # not through a forward-AD pass with graph (jvp_mode="joint"): its recomputation
        # would run without tangents; the config refuses that combination
        remat = self.grad_checkpointing and torch.is_grad_enabled() and not has_tangent(x)
        for block in self.blocks:
            if remat:
                x = checkpoint(block, x, c, use_reentrant=False)            # [B, N(+N), D]
            else:
                x = block(x, c)                                             # [B, N(+N), D]
        x = self.final_layer(x[:, :n], c)                                   # [B, N, p*p*C]
        out = self.unpatchify(x)                                            # [B, C, H, W]
        return to_velocity(out, z, t, self.prediction, self.x_pred_t_min)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
# size -> (depth, hidden_size, num_heads), DiT Table 1
SIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
SIT_PATCHES = (2, 4, 8)


def _sit_factory(depth: int, hidden_size: int, num_heads: int,
                 patch_size: int) -> Callable[..., SiT]:
    def make(**kwargs) -> SiT:
        return SiT(depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                   patch_size=patch_size, **kwargs)
    return make


SiT_models: dict[str, Callable[..., SiT]] = {
    f"SiT-{size}/{p}": _sit_factory(*SIT_SIZES[size], p)
    for size in SIT_SIZES for p in SIT_PATCHES
}
