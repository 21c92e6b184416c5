"""The MeanFlow JVP of the backbones with the tangent passed explicitly: no forward-AD duals.

Forward-mode AD through dual tensors pays bookkeeping on every op (``make_dual`` checks,
aliases, views, zero tangents): a U-Net ResBlock's dual forward dispatches 253 aten ops, its
(primal, tangent) form below 40, and runs 3.2x faster on a CPU (fp32, batch 4, 64 channels,
16x16). Each function here takes and returns a (primal, tangent) pair; the rules are those of
:mod:`models.jvp_ops` (weights carry no tangent, norms compute in float32 at least), so the
result equals the dual path to float round-off (tests/test_jvp_ops.py,
tests/test_sit_tangent.py). Only the no-grad JVP pass uses it (``forward(..., jvp_tangent=v)``
of ``UNet`` and ``SiT``: :func:`unet_jvp`, :func:`sit_jvp`); plain forwards and the joint pass
keep the ordinary modules.

Where a primal changes dtype (bf16 autocast output added to a float32 tensor), its tangent
takes the primal's dtype, as a dual tensor's does.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

Pair = tuple[Tensor, Tensor]


def linear(m: nn.Linear, x: Pair) -> Pair:
    return F.linear(x[0], m.weight, m.bias), F.linear(x[1], m.weight)


def conv(m: nn.Conv2d, x: Pair) -> Pair:
    if m.padding_mode != "zeros":
        raise NotImplementedError("padding_mode other than zeros")
    args = (m.stride, m.padding, m.dilation, m.groups)
    return F.conv2d(x[0], m.weight, m.bias, *args), F.conv2d(x[1], m.weight, None, *args)


def silu(x: Pair) -> Pair:
    return F.silu(x[0]), torch.ops.aten.silu_backward(x[1], x[0])


def group_norm(m: nn.GroupNorm, x: Pair) -> Pair:
    xp, xt = x
    dt = torch.promote_types(xp.dtype, torch.float32)
    w = m.weight.to(dt) if m.weight is not None else None
    b = m.bias.to(dt) if m.bias is not None else None
    n, c = xp.shape[:2]
    hw = xp[0, 0].numel()
    xp32, xt32 = xp.to(dt).contiguous(), xt.to(dt).contiguous()
    y, mean, rstd = torch.native_group_norm(xp32, w, b, n, c, hw, m.num_groups, m.eps)
    ty = torch.ops.aten.native_group_norm_backward(xt32, xp32, mean, rstd, None, n, c, hw,
                                                   m.num_groups, [True, False, False])[0]
    if w is not None:
        ty = ty * w.reshape(1, c, *([1] * (xp.dim() - 2)))
    return y.to(xp.dtype), ty.to(xp.dtype)


def layer_norm(m: nn.LayerNorm, x: Pair) -> Pair:
    """LayerNorm in float32 at least. The standardisation's Jacobian is symmetric, so its
    tangent is its backward kernel applied to the tangent (then times the weight)."""
    xp, xt = x
    dt = torch.promote_types(xp.dtype, torch.float32)
    w = m.weight.to(dt) if m.weight is not None else None
    b = m.bias.to(dt) if m.bias is not None else None
    shape = list(m.normalized_shape)
    xp32, xt32 = xp.to(dt).contiguous(), xt.to(dt).contiguous()
    y, mean, rstd = torch.native_layer_norm(xp32, shape, w, b, m.eps)
    ty = torch.ops.aten.native_layer_norm_backward(xt32, xp32, shape, mean, rstd, None, None,
                                                   [True, False, False])[0]
    if w is not None:
        ty = ty * w
    return y.to(xp.dtype), ty.to(xp.dtype)


def gelu(m: nn.GELU, x: Pair) -> Pair:
    """GELU; gelu_backward(t, x) = t * gelu'(x), the tangent in one kernel."""
    return (F.gelu(x[0], approximate=m.approximate),
            torch.ops.aten.gelu_backward(x[1], x[0], approximate=m.approximate))


def dropout(m: nn.Dropout, x: Pair) -> Pair:
    """The same mask on primal and tangent (what a dual tensor through nn.Dropout gets)."""
    if not m.training or m.p == 0.0:
        return x
    keep = torch.empty_like(x[0]).bernoulli_(1.0 - m.p).div_(1.0 - m.p)
    return x[0] * keep, x[1] * keep


def add(a: Pair, b: Pair) -> Pair:
    return a[0] + b[0], a[1] + b[1]


def timestep(emb: nn.Module, s: Pair) -> Pair:
    """models.layers.TimestepEmbedder on (s, ds)."""
    from .layers import MAX_PERIOD
    half = emb.freq_dim // 2
    dt = torch.promote_types(s[0].dtype, torch.float32)
    freqs = torch.exp(-math.log(MAX_PERIOD)
                      * torch.arange(half, dtype=dt, device=s[0].device) / half)
    args = s[0].to(dt)[:, None] * freqs[None]
    targs = s[1].to(dt)[:, None] * freqs[None]
    cos, sin = torch.cos(args), torch.sin(args)
    e, te = torch.cat([cos, sin], -1), torch.cat([-sin * targs, cos * targs], -1)
    if emb.freq_dim % 2:
        e = torch.cat([e, torch.zeros_like(e[:, :1])], -1)
        te = torch.cat([te, torch.zeros_like(te[:, :1])], -1)
    wdt = emb.mlp[0].weight.dtype
    h = linear(emb.mlp[0], (e.to(wdt), te.to(wdt)))
    return linear(emb.mlp[2], silu(h))


def condition(cond: nn.Module, r: Tensor, t: Tensor, label, keep, edge_given: bool) -> Pair:
    """models.layers.ConditionEmbedder along (dr, dt) = (0, 1): only the time part moves."""
    c = cond(r, t, label, keep, edge_given)             # the primal, every term included
    one = torch.full_like(t, cond.time_scale)
    h = t - r
    te = timestep(cond.t_embedder, (t * cond.time_scale, one))
    he = timestep(cond.h_embedder, (h * cond.time_scale, one))
    if cond.time_proj is not None:
        tc = F.linear(torch.cat([te[1], he[1]], -1), cond.time_proj.weight)
    else:
        tc = te[1] + he[1]
    return c, tc.to(c.dtype)


def softmax_attention(q: Pair, k: Pair, v: Pair, scale: float) -> Pair:
    """O = softmax(S) V with S = Q K^T * scale, per head ([B, heads, N, d] each), and its
    tangent, in float32 at least (autocast off: it would run the products in bf16):

        dS = (dQ K^T + Q dK^T) * scale
        dP = P * (dS - sum_j P dS)       (each row's softmax Jacobian diag(P) - P P^T)
        dO = dP V + P dV
    """
    dt = torch.promote_types(v[0].dtype, torch.float32)
    device_type = v[0].device.type            # autocast has no meta (or fake) device kind
    with (torch.autocast(device_type, enabled=False)
          if torch.amp.is_autocast_available(device_type) else contextlib.nullcontext()):
        (qp, qt), (kp, kt), (vp, vt) = ((a.to(dt), ta.to(dt)) for a, ta in (q, k, v))
        qs, kT = qp * scale, kp.transpose(-2, -1)
        s = qs @ kT                                                   # [B, heads, N, N]
        ts = (qt * scale) @ kT + qs @ kt.transpose(-2, -1)
        p = s.softmax(dim=-1)
        tp = p * (ts - (p * ts).sum(-1, keepdim=True))
        o, to = p @ vp, tp @ vp + p @ vt
    return o.to(v[0].dtype), to.to(v[0].dtype)


def attention(m: nn.Module, x: Pair) -> Pair:
    """models.layers.Attention (timm's multi-head self-attention) on tokens [B, N, C]."""
    if (not isinstance(m.q_norm, nn.Identity) or not isinstance(m.k_norm, nn.Identity)
            or not isinstance(m.norm, nn.Identity) or m.gate is not None
            or (m.training and (m.attn_drop.p > 0 or m.proj_drop.p > 0))):
        raise NotImplementedError("qk/scale norms, gates and attention dropout")
    b, n, _ = x[0].shape
    qkv = linear(m.qkv, x)
    (qp, kp, vp), (qt, kt, vt) = (
        a.reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        for a in qkv)                                                  # [B, heads, N, d] each
    o = softmax_attention((qp, qt), (kp, kt), (vp, vt), m.scale)
    return linear(m.proj, tuple(a.transpose(1, 2).reshape(b, n, m.attn_dim) for a in o))


def spatial_attention(m: nn.Module, x: Pair) -> Pair:
    """models.layers.SpatialSelfAttention: attention over the pixels, with the residual."""
    b, c, hh, ww = x[0].shape
    tok = tuple(a.flatten(2).transpose(1, 2) for a in group_norm(m.norm, x))  # [B, HW, C]
    out = attention(m.attn, tok)
    return add(x, tuple(a.transpose(1, 2).reshape(b, c, hh, ww) for a in out))


def res_block(m: nn.Module, x: Pair, emb: Pair) -> Pair:
    h = conv(m.conv1, silu(group_norm(m.norm1, x)))
    se, tse = linear(m.emb_proj, emb)
    scale, shift = se[:, :, None, None].chunk(2, dim=1)
    tscale, tshift = tse[:, :, None, None].chunk(2, dim=1)
    g, tg = group_norm(m.norm2, h)
    h = (g * (1 + scale) + shift, tg * (1 + scale) + g * tscale + tshift)
    h = conv(m.conv2, dropout(m.dropout, silu(h)))
    skip = x if isinstance(m.skip, nn.Identity) else conv(m.skip, x)
    return add(skip, h)


def unet_layer(m: nn.Module, x: Pair, emb: Pair) -> Pair:
    x = res_block(m.res, x, emb)
    return spatial_attention(m.attn, x) if m.attn is not None else x


def unet_jvp(net: nn.Module, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
             edge: Optional[Tensor] = None, label: Optional[Tensor] = None,
             keep: Optional[Tensor] = None) -> Pair:
    """(u, du/dt) of models.unet.UNet along (v, 0, 1) of (z, r, t): UNet.forward's graph with
    the tangent carried beside every activation. The edge path carries none (edges are
    constants of the JVP)."""
    from .layers import edge_keep_mask
    c, tc = condition(net.cond, r, t, label, keep, edge is not None)
    emb = silu((c.to(z.dtype), tc.to(z.dtype)))
    edge_feats: list = [None] * len(net.down)
    if edge is not None:
        edge_feats = net.edge_encoder(edge.to(z.dtype))
        mk = edge_keep_mask(keep, z)
        if mk is not None:
            edge_feats = [f * mk for f in edge_feats]
    h = conv(net.conv_in, (z, v.to(z.dtype)))
    hs = []
    for level, layers in enumerate(net.down):
        if level > 0:
            h = conv(net.downsample[level - 1].conv, h)
        if edge_feats[level] is not None:
            h = (h[0] + edge_feats[level], h[1])
        hs.append(h)
        for layer in layers:
            h = unet_layer(layer, h, emb)
            hs.append(h)
    for layer in net.mid:
        h = unet_layer(layer, h, emb)
    for i, layers in enumerate(net.up):
        for layer in layers:
            s = hs.pop()
            h = unet_layer(layer, (torch.cat([h[0], s[0]], 1), torch.cat([h[1], s[1]], 1)), emb)
        if i < len(net.upsample):
            up = tuple(F.interpolate(a, scale_factor=2.0, mode="nearest") for a in h)
            h = conv(net.upsample[i].conv, up)
    out = conv(net.conv_out, silu(group_norm(net.norm_out, h)))
    return velocity(out, z, t, v, net.prediction, net.x_pred_t_min)


def patch_embed(m: nn.Module, x: Pair) -> Pair:
    """timm's PatchEmbed as SiT builds it: a stride-p convolution, [B, D, g, g] -> [B, g*g, D]."""
    if not m.flatten or not isinstance(m.norm, nn.Identity) or m.dynamic_img_pad:
        raise NotImplementedError("PatchEmbed with a norm, padding or another output format")
    return tuple(a.flatten(2).transpose(1, 2) for a in conv(m.proj, x))


def modulate(x: Pair, shift: Pair, scale: Pair) -> Pair:
    """models.sit.modulate, x (1 + scale) + shift with per-sample [B, 1, D] shift and scale,
    and its tangent dx (1 + scale) + x dscale + dshift."""
    return (x[0] * (1 + scale[0]) + shift[0],
            x[1] * (1 + scale[0]) + x[0] * scale[1] + shift[1])


def gated_add(x: Pair, gate: Pair, y: Pair) -> Pair:
    """x + gate y with a per-sample [B, 1, D] gate (adaLN-Zero's residual): tangent
    dx + dgate y + gate dy."""
    return x[0] + gate[0] * y[0], x[1] + gate[1] * y[0] + gate[0] * y[1]


def adaln_chunks(m: nn.Linear, sc: Pair, n: int) -> list[Pair]:
    """An adaLN modulation's linear on ``sc`` = silu(c) [B, D], as n per-sample [B, 1, D]
    pairs (SiT's ``.chunk(n, dim=1)`` and ``.unsqueeze(1)``, one unsqueeze for all n)."""
    h = tuple(a.unsqueeze(1) for a in linear(m, sc))                    # [B, 1, n*D]
    return list(zip(h[0].chunk(n, dim=-1), h[1].chunk(n, dim=-1)))


def mlp(m: nn.Module, x: Pair) -> Pair:
    """timm's Mlp as SiT builds it: fc1, GELU, fc2 (no norm, no dropout)."""
    if (not isinstance(m.act, nn.GELU) or not isinstance(m.norm, nn.Identity)
            or (m.training and (m.drop1.p > 0 or m.drop2.p > 0))):
        raise NotImplementedError("Mlp with another activation, a norm or dropout")
    return linear(m.fc2, gelu(m.act, linear(m.fc1, x)))


def sit_block(m: nn.Module, x: Pair, sc: Pair) -> Pair:
    """models.sit.SiTBlock; ``sc`` = silu(c), the input of its adaLN modulation's linear."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaln_chunks(
        m.adaLN_modulation[1], sc, 6)                                   # 6 x [B, 1, D]
    x = gated_add(x, gate_msa,
                  attention(m.attn, modulate(layer_norm(m.norm1, x), shift_msa, scale_msa)))
    return gated_add(x, gate_mlp,
                     mlp(m.mlp, modulate(layer_norm(m.norm2, x), shift_mlp, scale_mlp)))


def append_tokens(x: Pair, e: Tensor) -> Pair:
    """Edge tokens ``e`` (constants of the JVP: zero tangent) appended to the sequence."""
    p = torch.cat([x[0], e], dim=1)
    return p, torch.cat([x[1], torch.zeros_like(e)], dim=1).to(p.dtype)


def sit_jvp(net: nn.Module, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
            edge: Optional[Tensor] = None, label: Optional[Tensor] = None,
            keep: Optional[Tensor] = None) -> Pair:
    """(u, du/dt) of models.sit.SiT along (v, 0, 1) of (z, r, t): SiT.forward's graph with the
    tangent carried beside every activation. Edge features and tokens carry none (edges are
    constants of the JVP); gradient checkpointing does not apply (no graph)."""
    from .layers import edge_keep_mask
    x = patch_embed(net.x_embedder, (z, v.to(z.dtype)))                 # [B, N, D]
    p = x[0] + net.pos_embed.to(z.dtype)
    x = (p, x[1].to(p.dtype))
    n = p.shape[1]
    c = tuple(a.to(p.dtype) for a in condition(net.cond, r, t, label, keep, edge is not None))
    if edge is not None:
        e = net.edge_embedder(edge.to(p.dtype))                         # [B, N, D]
        mk = edge_keep_mask(keep, e)
        if mk is not None:                  # dropped samples: no edge features at all
            e = e * mk
        if net.edge_mode == "add":
            x = (x[0] + e, x[1])
        else:
            x = append_tokens(x, e + net.edge_pos_embed.to(e.dtype))    # [B, 2N, D]
    elif net.edge_mode == "tokens" and net.edge_embedder is not None:
        x = append_tokens(x, net.edge_pos_embed.to(p.dtype).expand(p.shape[0], -1, -1))
    # every adaLN modulation (Sequential(SiLU, Linear)) starts with silu(c): computed once
    sc = silu(c)
    for block in net.blocks:
        x = sit_block(block, x, sc)                                     # [B, N(+N), D]
    fl = net.final_layer
    shift, scale = adaln_chunks(fl.adaLN_modulation[1], sc, 2)          # 2 x [B, 1, D]
    x = linear(fl.linear, modulate(layer_norm(fl.norm_final, tuple(a[:, :n] for a in x)),
                                   shift, scale))                       # [B, N, p*p*C]
    out = tuple(net.unpatchify(a) for a in x)                           # [B, C, H, W]
    return velocity(out, z, t, v, net.prediction, net.x_pred_t_min)


def velocity(out: Pair, z: Tensor, t: Tensor, v: Tensor, prediction: str, t_min: float
             ) -> Pair:
    """models.layers.to_velocity on the (output, tangent) pair along (v, 1) of (z, t)."""
    if prediction == "u":
        return out
    # u = (z - x_hat) / max(t, t_min): d/dt along (v, 1) is (v - dx_hat) / tt - u * dtt / tt
    out, tout = out
    tt = t.clamp(min=t_min).to(torch.promote_types(out.dtype, t.dtype))
    dtt = (t > t_min).to(tt.dtype)                          # clamp's derivative
    shape = (-1,) + (1,) * (out.dim() - 1)
    u = (z - out) / tt.view(shape)
    du = (v.to(out.dtype) - tout) / tt.view(shape) - u * (dtt / tt).view(shape)
    return u, du


__all__ = ["sit_jvp", "unet_jvp"]
