"""Blocks shared by the backbones: input checks, timestep and condition embedders, attention.

Every op here supports forward-mode AD (``torch.autograd.forward_ad``), which the MeanFlow
objective uses for du/dt. Two things need care for that:

* PyTorch's fused ``F.scaled_dot_product_attention`` has no forward-mode derivative, so
  :class:`Attention` switches to an explicit softmax(QK^T / sqrt(d)) V when its input carries a
  tangent, and keeps the fused kernel for plain forwards (sampling, evaluation).
* Normalisations must run in float32 under bf16 autocast (the JVP of a bf16 GroupNorm breaks).
  :func:`use_fast_jvp_ops` swaps every ``nn.GroupNorm``/``nn.LayerNorm`` (and ``nn.Linear``,
  ``nn.Conv2d``, ``nn.SiLU``) of a model for the drop-in classes of :mod:`models.jvp_ops`, whose
  norms compute in float32 and whose forward-mode rules cost about one extra op.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention as _TimmAttention
from torch import Tensor

from . import jvp_ops

FREQ_EMBED_DIM = 256       # sinusoidal features per time input (DiT's frequency_embedding_size)
MAX_PERIOD = 10_000.0      # longest period of the sinusoidal features (DiT, Transformer)
EMBED_INIT_STD = 0.02      # std of learned embeddings (class table, null edge), as in DiT
NORM_GROUPS = 32           # GroupNorm groups (fewer when a width is not a multiple of 32)

# A model's nn layers -> drop-in subclasses with the same state dict (see use_fast_jvp_ops)
_FAST_JVP_CLASSES = {nn.Linear: jvp_ops.Linear, nn.Conv2d: jvp_ops.Conv2d,
                     nn.GroupNorm: jvp_ops.GroupNorm, nn.LayerNorm: jvp_ops.LayerNorm,
                     nn.SiLU: jvp_ops.SiLU}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def has_tangent(x: Tensor) -> bool:
    """True when ``x`` is a forward-AD dual tensor at the current level (a JVP is running)."""
    return fwAD.unpack_dual(x).tangent is not None


def use_fast_jvp_ops(module: nn.Module) -> nn.Module:
    """Swap, in place, the exact ``nn`` layers of ``module`` for the :mod:`models.jvp_ops` ones.

    Changes only the class (the subclasses override ``forward`` alone), so parameters, state
    dict and initialisation stay those of ``torch.nn``. This also reaches into library blocks
    (timm's Attention, Mlp, PatchEmbed), which build plain ``nn.Linear``/``nn.Conv2d``.
    Returns ``module``.
    """
    for m in module.modules():
        fast = _FAST_JVP_CLASSES.get(type(m))
        if fast is not None:
            m.__class__ = fast
    return module


def norm_groups(channels: int) -> int:
    """Groups for a GroupNorm over ``channels``: 32 when it divides them, else their gcd."""
    return math.gcd(NORM_GROUPS, channels)


def zero_init_(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (a branch that starts as a no-op); returns it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def check_inputs(z: Tensor, r: Tensor, t: Tensor, edge: Optional[Tensor], label: Optional[Tensor],
                 keep: Optional[Tensor], *, in_channels: int, input_size: int, edge_channels: int,
                 edge_size: int, num_classes: int) -> None:
    """Raise a ValueError naming the argument whose shape or type does not fit the backbone."""
    want = (in_channels, input_size, input_size)
    if z.dim() != 4 or tuple(z.shape[1:]) != want:
        raise ValueError(f"z must have shape [B, {', '.join(map(str, want))}], "
                         f"got {tuple(z.shape)}")
    b = z.shape[0]
    for name, s in (("r", r), ("t", t)):
        if s.shape != (b,):
            raise ValueError(f"{name} must have shape [{b}] (one time per sample), "
                             f"got {tuple(s.shape)}")
    if edge is not None:
        if edge_channels == 0:
            raise ValueError("edge was given but this model has no edge input "
                             "(model.edge_channels = 0)")
        want_e = (b, edge_channels, edge_size, edge_size)
        if tuple(edge.shape) != want_e:
            raise ValueError(f"edge must have shape {list(want_e)}, got {list(edge.shape)}")
    if label is not None:
        if num_classes == 0:
            raise ValueError("label was given but this model has no class input "
                             "(model.num_classes = 0)")
        if label.shape != (b,) or label.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"label must be an integer tensor of shape [{b}], got "
                             f"{label.dtype} {tuple(label.shape)}")
        # Values are read on the CPU only: on a GPU the read would wait for the device at
        # every forward. Labels are checked where they enter (the cache, the sampling CLI).
        if label.device.type == "cpu" and bool(((label < 0) | (label >= num_classes)).any()):
            raise ValueError(f"label values must lie in [0, {num_classes}), got min "
                             f"{int(label.min())} max {int(label.max())}")
    if keep is not None and (keep.shape != (b,) or keep.dtype != torch.bool):
        raise ValueError(f"keep must be a bool tensor of shape [{b}], got {keep.dtype} "
                         f"{tuple(keep.shape)}")


PREDICTIONS = ("u", "x")


def check_prediction(prediction: str, t_min: float) -> tuple[str, float]:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if not 0.0 < t_min <= 1.0:
        raise ValueError(f"x_pred_t_min must be in (0, 1], got {t_min}")
    return prediction, float(t_min)


def to_velocity(out: Tensor, z: Tensor, t: Tensor, prediction: str, t_min: float) -> Tensor:
    """The backbone's raw output -> the average velocity u the objective works with.

    "u": the output is u. "x": the output is a clean image x_hat and u = (z - x_hat) / t, so
    that z_r = z_t - (t - r) u = (r/t) z_t + (1 - r/t) x_hat and the 1-step sample
    e - u(e, 0, 1) is x_hat itself: the network never has to reproduce the noise in order to
    cancel it (pixel-space MeanFlow and JiT predict x for this reason). t is clamped below at
    ``t_min`` in the division, where (z - x_hat) / t would amplify errors without bound.
    """
    if prediction == "u":
        return out
    tt = t.clamp(min=t_min).to(torch.promote_types(out.dtype, t.dtype))
    return (z - out) / tt.view(-1, *([1] * (out.dim() - 1)))


# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------
def timestep_embedding(s: Tensor, dim: int = FREQ_EMBED_DIM,
                       max_period: float = MAX_PERIOD) -> Tensor:
    """Sinusoidal features [B, dim] of a [B] time (DiT/GLIDE layout: cos then sin).

    Computed in float32 at least (float64 stays float64) so that bf16 autocast does not round
    the time; frequencies run from 1 down to 1/max_period.
    """
    half = dim // 2
    dt = torch.promote_types(s.dtype, torch.float32)
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=dt, device=s.device) / half)   # [half]
    args = s.to(dt)[:, None] * freqs[None]                                       # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """A scalar time -> vector: sinusoidal features then a 2-layer MLP (DiT's embedder)."""

    def __init__(self, hidden_size: int, freq_dim: int = FREQ_EMBED_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, s: Tensor) -> Tensor:
        emb = timestep_embedding(s, self.freq_dim)                                 # [B, freq]
        return self.mlp(emb.to(self.mlp[0].weight.dtype))                          # [B, hidden]


class ConditionEmbedder(nn.Module):
    """The conditioning vector c [B, dim] of a MeanFlow backbone.

    c = time(t, t - r) + class embedding + null-edge embedding (for samples without an edge).

    * Times: two sinusoidal embedders, one for t and one for h = t - r (MeanFlow conditions on
      (t, t - r)); both inputs are multiplied by ``time_scale`` first. ``time_embed`` = "sum"
      adds the two embeddings, "concat" concatenates them and projects back to ``dim``.
    * Classes: a table of ``num_classes + 1`` rows; row ``num_classes`` is the null class that
      classifier-free guidance drops to (DiT). ``label=None`` means every sample is null.
    * Edges: the backbone zeroes the edge features of dropped samples, and here a learned
      null-edge vector is added to c for them, so the null condition is a flag that no edge
      map (not even an all-zero one) can produce.
    """

    def __init__(self, dim: int, num_classes: int = 0, has_edge: bool = False,
                 time_embed: str = "sum", time_scale: float = 1.0):
        super().__init__()
        if time_embed not in ("sum", "concat"):
            raise ValueError(f"time_embed must be 'sum' or 'concat', got {time_embed!r}")
        self.time_embed, self.time_scale, self.num_classes = time_embed, time_scale, num_classes
        self.t_embedder = TimestepEmbedder(dim)
        self.h_embedder = TimestepEmbedder(dim)
        self.time_proj = nn.Linear(2 * dim, dim) if time_embed == "concat" else None
        self.y_embedder = nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None
        self.null_edge = nn.Parameter(torch.zeros(dim)) if has_edge else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for emb in (self.t_embedder, self.h_embedder):  # DiT: timestep MLP ~ N(0, 0.02)
            nn.init.normal_(emb.mlp[0].weight, std=EMBED_INIT_STD)
            nn.init.normal_(emb.mlp[2].weight, std=EMBED_INIT_STD)
        if self.y_embedder is not None:                 # DiT: class table ~ N(0, 0.02)
            nn.init.normal_(self.y_embedder.weight, std=EMBED_INIT_STD)
        if self.null_edge is not None:                  # a flag distinct from any real edge
            nn.init.normal_(self.null_edge, std=EMBED_INIT_STD)

    def forward(self, r: Tensor, t: Tensor, label: Optional[Tensor], keep: Optional[Tensor],
                edge_given: bool) -> Tensor:
        """c [B, dim]. ``keep[i] = False`` gives sample i the null class and the null edge."""
        h = t - r
        te = self.t_embedder(t * self.time_scale)                                  # [B, dim]
        he = self.h_embedder(h * self.time_scale)                                  # [B, dim]
        c = self.time_proj(torch.cat([te, he], -1)) if self.time_proj is not None else te + he
        if self.y_embedder is not None:
            null = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
            y = null if label is None else label.long()
            if keep is not None:
                y = torch.where(keep, y, null)
            c = c + self.y_embedder(y)
        if self.null_edge is not None:
            # No edge map at all = every sample null; else the samples with keep = False.
            # Added even when nobody is dropped, so that the parameter is always in the graph
            # (DistributedDataParallel requires every parameter to get a gradient).
            if not edge_given:
                dropped = torch.ones(t.shape, dtype=c.dtype, device=c.device)
            elif keep is None:
                dropped = torch.zeros(t.shape, dtype=c.dtype, device=c.device)
            else:
                dropped = (~keep).to(c.dtype)
            c = c + dropped[:, None] * self.null_edge.to(c.dtype)
        return c


def edge_keep_mask(keep: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """keep [B] bool -> [B, 1, 1, ...] in ``like``'s dtype (multiplies edge features), or None."""
    if keep is None:
        return None
    return keep.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
class Attention(_TimmAttention):
    """timm's multi-head self-attention on tokens [B, N, C], safe under forward-mode AD.

    Plain forwards use the fused ``F.scaled_dot_product_attention`` (when timm's ``fused_attn``
    is on); when the input carries a forward-AD tangent the explicit softmax(QK^T/sqrt(d)) V
    runs instead, since the fused kernels have no forward-mode derivative. Same weights, same
    result (to float rounding) on both paths.
    """

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal or self.gate is not None:
            raise NotImplementedError("masks and gates are not used by these backbones")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                         # [B, heads, N, d]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn and not has_tangent(x):
            o = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)               # [B, heads, N, N]
            attn = self.attn_drop(attn.softmax(dim=-1))
            o = attn @ v                                                # [B, heads, N, d]
        o = o.transpose(1, 2).reshape(b, n, self.attn_dim)              # [B, N, heads*d]
        return self.proj_drop(self.proj(self.norm(o)))


class SpatialSelfAttention(nn.Module):
    """Pre-norm self-attention over the pixels of a feature map, with a residual connection.

    The output projection is zero-initialised so the block starts as the identity.
    """

    def __init__(self, channels: int, head_channels: int = 64):
        super().__init__()
        heads = max(1, channels // head_channels)
        while channels % heads:           # the head width must divide the channels
            heads -= 1
        self.norm = nn.GroupNorm(norm_groups(channels), channels)
        self.attn = Attention(channels, num_heads=heads, qkv_bias=True)
        zero_init_(self.attn.proj)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)                # [B, HW, C]
        out = self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)     # [B, C, H, W]
        return x + out


__all__ = ["FREQ_EMBED_DIM", "MAX_PERIOD", "Attention", "ConditionEmbedder",
           "SpatialSelfAttention", "TimestepEmbedder", "check_inputs", "edge_keep_mask",
           "has_tangent", "norm_groups", "timestep_embedding", "use_fast_jvp_ops", "zero_init_"]
