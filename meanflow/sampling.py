"""Samplers for a MeanFlow network u(z, r, t): one step or a few, optionally with CFG.

    z_r = z_t - (t - r) u(z_t, r, t)          (paper Eq. 12; exact if u is the true average)

With one step from t = 1 to r = 0: x = e - u(e, 0, 1). A flow-matching model (trained with
r = t only) is sampled by the same loop; then each step is an Euler step of its velocity.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

Model = Callable[..., Tensor]


def time_grid(steps: int, device=None, dtype=torch.float32, jump_below: float = 0.0) -> Tensor:
    """[steps + 1] times from 1 down to 0 on a uniform grid.

    ``jump_below`` > 0 merges the grid's steps below that time into one step to 0: e.g.
    steps = 16, jump_below = 0.25 gives 1, 15/16, ..., 4/16, 0 (13 steps). A diagnostic for
    where along the path a many-step sampler loses quality.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0.0 <= jump_below < 1.0:
        raise ValueError(f"jump_below must lie in [0, 1), got {jump_below!r}")
    grid = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=dtype)
    if jump_below > 0.0:
        grid = torch.cat([grid[grid >= jump_below - 1e-6], grid.new_zeros(1)]).unique_consecutive()
    return grid


@torch.no_grad()
def sample(model: Model, noise: Tensor, steps: int = 1, *, edge: Optional[Tensor] = None,
           label: Optional[Tensor] = None, cfg_scale: float = 1.0,
           times: Optional[Union[Tensor, Sequence[float]]] = None,
           autocast_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Integrate from noise (t = 1) to data (t = 0) in ``steps`` network evaluations.

    ``times`` replaces the uniform grid: a decreasing sequence from 1 to 0 (``steps`` is then
    ignored; see :func:`time_grid` for one with a final jump). It is checked on the host
    before it is moved to the noise's device.

    ``autocast_dtype`` (e.g. torch.bfloat16 on CUDA) runs the network under autocast in that
    dtype; the update of z, and so the returned sample, stays in the noise's dtype (fp32).
    Decode it outside (the codec's decoder runs in fp32 whatever autocast is active).

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
    if times is None:
        grid = time_grid(steps, noise.device)
    else:
        # checked as Python floats: a read of a device tensor's values would be a host sync
        # per check (and impossible on fake or meta tensors)
        vals = (times.detach().cpu().reshape(-1).tolist() if isinstance(times, Tensor)
                else [float(v) for v in times])
        decreasing = all(lo < hi for hi, lo in zip(vals, vals[1:]))
        if ((isinstance(times, Tensor) and times.dim() != 1) or len(vals) < 2
                or vals[0] != 1.0 or vals[-1] != 0.0 or not decreasing):
            raise ValueError(f"times must decrease strictly from 1 to 0, got {vals}")
        grid = torch.tensor(vals, dtype=torch.float32, device=noise.device)
        steps = len(vals) - 1
    amp = (torch.autocast(noise.device.type, dtype=autocast_dtype)
           if autocast_dtype is not None else contextlib.nullcontext())
    z = noise
    keep_all = torch.ones(b, dtype=torch.bool, device=noise.device)
    drop_all = ~keep_all
    guided = cfg_scale != 1.0 and (edge is not None or label is not None)
    for i in range(steps):
        t = grid[i].expand(b).to(noise.dtype)
        r = grid[i + 1].expand(b).to(noise.dtype)
        with amp:
            u = model(z, r, t, edge=edge, label=label, keep=keep_all).to(noise.dtype)
            if guided:
                u_null = model(z, r, t, edge=edge, label=label, keep=drop_all).to(noise.dtype)
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
