"""Samplers for a MeanFlow network u(z, r, t): one step or a few, optionally with CFG.

    z_r = z_t - (t - r) u(z_t, r, t)          (paper Eq. 12; exact if u is the true average)

With one step from t = 1 to r = 0: x = e - u(e, 0, 1). A flow-matching model (trained with
r = t only) is sampled by the same loop; then each step is an Euler step of its velocity.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

Model = Callable[..., Tensor]


def time_grid(steps: int, device=None, dtype=torch.float32) -> Tensor:
    """[steps + 1] times from 1 down to 0 on a uniform grid."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=dtype)


@torch.no_grad()
def sample(model: Model, noise: Tensor, steps: int = 1, *, edge: Optional[Tensor] = None,
           label: Optional[Tensor] = None, cfg_scale: float = 1.0) -> Tensor:
    """Integrate from noise (t = 1) to data (t = 0) in ``steps`` network evaluations.

    ``cfg_scale`` is inference-time classifier-free guidance, for models trained WITHOUT
    guidance folded in: u = u(null) + s (u(c) - u(null)); it costs a second evaluation per
    step. Models trained with CFG in the objective are sampled at scale 1.
    Deterministic: all randomness is in ``noise`` (draw it from a seeded generator).
    """
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    b = noise.shape[0]
    for name, c in (("edge", edge), ("label", label)):
        if c is not None and c.shape[0] != b:
            raise ValueError(f"{name} has batch size {c.shape[0]}, noise has {b}")
    grid = time_grid(steps, noise.device)
    z = noise
    keep_all = torch.ones(b, dtype=torch.bool, device=noise.device)
    drop_all = ~keep_all
    guided = cfg_scale != 1.0 and (edge is not None or label is not None)
    for i in range(steps):
        t = grid[i].expand(b).to(noise.dtype)
        r = grid[i + 1].expand(b).to(noise.dtype)
        u = model(z, r, t, edge=edge, label=label, keep=keep_all)
        if guided:
            u_null = model(z, r, t, edge=edge, label=label, keep=drop_all)
            u = u_null + cfg_scale * (u - u_null)
        z = z - (t - r).view(b, *([1] * (z.dim() - 1))) * u.to(z.dtype)
    return z


def sample_noise(shape: tuple[int, ...], seeds: Tensor | list[int], device=None,
                 dtype=torch.float32) -> Tensor:
    """Noise for a batch in which sample i comes from its own seed ``seeds[i]``.

    Evaluation seeds each sample by (base seed, sample index), so that the images do not
    depend on how samples are split into batches or across processes.
    """
    out = torch.empty((len(seeds), *shape), dtype=dtype)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s))
        out[i] = torch.randn(shape, generator=g, dtype=dtype)
    return out.to(device)
