"""The MeanFlow objective (Geng et al. 2025, "Mean Flows for One-step Generative Modeling").

Notation (paper, Sec. 3):
    z_t = (1 - t) x + t e,   e ~ N(0, I),   v = dz_t/dt = e - x                       (Eq. 1-2)
    u(z_t, r, t) = 1/(t - r) * int_r^t v(z_s, s) ds        (average velocity)       (Eq. 3)
    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t)   (the MeanFlow identity)  (Eq. 6)
    d/dt u = v . du/dz + du/dt                           (total derivative, a JVP)  (Eq. 8)
    L = || u_theta(z_t, r, t) - sg(u_tgt) ||^2,  u_tgt = v - (t - r) (v . d_z u + d_t u) (Eq. 9-10)

The network is any callable ``model(z, r, t, edge=None, label=None, keep=None)``; it is
conditioned on (t, t - r). The JVP uses ``torch.autograd.forward_ad`` so that it runs through a
DistributedDataParallel wrapper with gradients synchronised (``torch.func.jvp`` fails there on
the second step, and on ``ddp.module`` it silently skips the gradient all-reduce).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .config import MeanFlowConfig
from .runtime import Stream, stream_seed

Model = Callable[..., Tensor]


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _bcast(s: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, ...] to broadcast against ``like``."""
    return s.reshape(s.shape[0], *([1] * (like.dim() - 1)))


def check_times(r: Tensor, t: Tensor, batch: int | None = None, values: bool = True) -> None:
    """Raise a ValueError naming the argument if r or t is out of [0, 1], r > t, or mis-shaped.
    ``values=False`` checks shapes only (no read of device values, so no host sync)."""
    for name, s in (("r", r), ("t", t)):
        if s.dim() != 1:
            raise ValueError(f"{name} must have shape [B], got {tuple(s.shape)}")
        if batch is not None and s.shape[0] != batch:
            raise ValueError(f"{name} has batch size {s.shape[0]}, x has {batch}")
        if not values:
            continue
        if not torch.isfinite(s).all():
            raise ValueError(f"{name} contains NaN or Inf")
        if (s < 0).any() or (s > 1).any():
            raise ValueError(f"{name} must lie in [0, 1], got min {s.min().item():.4g} "
                             f"max {s.max().item():.4g}")
    if values and (r > t).any():
        i = int(torch.nonzero(r > t)[0])
        raise ValueError(f"r must be <= t, got r={r[i].item():.4g} > t={t[i].item():.4g} "
                         f"at index {i}")


def _check_inputs(x: Tensor, edge: Optional[Tensor], label: Optional[Tensor],
                  values: bool = True) -> None:
    if x.dim() < 2:
        raise ValueError(f"x must be batched [B, ...], got shape {tuple(x.shape)}")
    if values and not torch.isfinite(x).all():
        raise ValueError("x contains NaN or Inf")
    b = x.shape[0]
    if edge is not None and edge.shape[0] != b:
        raise ValueError(f"edge has batch size {edge.shape[0]}, x has {b}")
    if label is not None and (label.dim() != 1 or label.shape[0] != b):
        raise ValueError(f"label must have shape [{b}], got {tuple(label.shape)}")


# --------------------------------------------------------------------------------------------
# Time sampling
# --------------------------------------------------------------------------------------------
def sample_times(cfg: MeanFlowConfig, batch: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None,
                 ratio: float | None = None) -> tuple[Tensor, Tensor]:
    """Draw (r, t), each [B] in [0, 1] with r <= t (paper Sec. 4.3, Tab. 1c-d).

    Two times are drawn from the configured distribution and sorted; then a fraction
    ``1 - ratio`` of the batch is set to r = t (the flow-matching boundary case).
    ``ratio`` defaults to ``cfg.ratio_r_neq_t`` (train.py passes ``cfg.ratio_at(step)``).
    """
    ratio = cfg.ratio_r_neq_t if ratio is None else ratio
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio}")
    shape = (2, batch)
    if cfg.time_dist == "logit_normal":
        n = torch.randn(shape, device=device, generator=generator)
        s = torch.sigmoid(n * cfg.time_sigma + cfg.time_mu)
    elif cfg.time_dist == "dmf":
        # Decoupled MeanFlow: the two draws come from logit-normals with different means, so
        # the r != t pairs span long intervals (r near 0 with t near 1) more often
        n = torch.randn(shape, device=device, generator=generator)
        mu = torch.tensor([cfg.time_mu, cfg.time_mu_r], device=device).view(2, 1)
        s = torch.sigmoid(n * cfg.time_sigma + mu)
    else:
        s = torch.rand(shape, device=device, generator=generator)
    t = torch.maximum(s[0], s[1])
    r = torch.minimum(s[0], s[1])
    neq = neq_layout(batch, int(round(ratio * batch)), device, generator)
    r = torch.where(neq, r, t)
    return r, t


def neq_layout(batch: int, n_neq: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> Tensor:
    """[batch] bool: which samples get r != t. Exactly ``n_neq`` of them, spread in blocks.

    The batch is cut into ``gcd(batch, n_neq)`` equal contiguous blocks, each holding the same
    number of r != t samples at random positions. A global batch split contiguously over P
    processes then gives every process the same number of JVP samples whenever P divides
    that gcd (a batch of 256 at 25%: any P dividing 64), so no rank waits on a luckier one and
    the JVP's batch shape is the same at every step, while the draw itself does not depend on
    P. A fixed count rather than a coin per sample: the ratio holds for every batch.
    """
    if not 0 <= n_neq <= batch:
        raise ValueError(f"n_neq must lie in [0, {batch}], got {n_neq}")
    blocks = math.gcd(batch, n_neq) if n_neq else 1
    size, per = batch // blocks, n_neq // blocks
    # a random permutation per block (argsort of uniform keys); its first `per` slots are r != t
    keys = torch.rand(blocks, size, device=device, generator=generator)
    rank_in_block = keys.argsort(dim=1).argsort(dim=1)
    return (rank_in_block < per).reshape(batch)


SEED_STREAM_DRAWS = Stream.DRAWS   # (seed, stream, step, micro-step): meanflow.runtime.Stream


@dataclass
class Draws:
    """The random inputs of one training micro-step, for this process's slice of the batch."""
    noise: Tensor                 # [b, C, H, W]
    r: Tensor                     # [b]
    t: Tensor                     # [b]
    keep: Optional[Tensor]        # [b] bool, or None (no condition / no dropout)
    neq_idx: Tensor               # [k] long: the samples with r != t (k is known on the host)


# --------------------------------------------------------------------------------------------
# The target
# --------------------------------------------------------------------------------------------
def unwrap(model: Model) -> Model:
    """The eager module inside torch.compile and DistributedDataParallel wrappers (for the
    no-grad and JVP passes: they need no gradient all-reduce, and a compiled graph is not
    trusted with forward-AD tangents)."""
    model = uncompiled(model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def uncompiled(model: Model) -> Model:
    """``model`` without a torch.compile wrapper (a DDP wrapper, if any, is kept)."""
    return getattr(model, "_orig_mod", model)


_FWAD_READY = False


def _load_forward_ad() -> None:
    """Make torch load its forward-AD decompositions once, quietly.

    The first ``make_dual`` of a process scripts torch's own JVP decompositions with
    ``torch.jit.script``, which warns that it is deprecated: torch's call, not ours, and
    nothing a user can act on, so it is silenced here (and only here)."""
    global _FWAD_READY
    if _FWAD_READY:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", FutureWarning)
        with fwAD.dual_level():
            fwAD.make_dual(torch.zeros(1), torch.zeros(1))
    _FWAD_READY = True


def _jvp(model: Model, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond: dict,
         explicit: Optional[bool] = None):
    """(u, du/dt) along the tangent (v, 0, 1) of (z, r, t) with forward-mode AD.

    Without a graph, a backbone with ``explicit_jvp`` (U-Net, SiT) computes the pair itself,
    ``model(z, r, t, ..., jvp_tangent=v)``, with no forward-AD duals (models/tangent.py: the
    same rules, a fraction of the ops). ``explicit`` overrides the attribute (callers that
    pass a bound forward)."""
    if explicit is None:
        explicit = getattr(model, "explicit_jvp", False)
    if explicit and not torch.is_grad_enabled():
        u, dudt = model(z, r, t, jvp_tangent=v, **cond)
        return u, dudt
    _load_forward_ad()
    with fwAD.dual_level():
        # make_dual rejects overlapping memory (e.g. an expanded tensor): copy if needed,
        # keeping a channels_last layout (the tangent takes the primal's layout).
        cl = z.dim() == 4 and z.is_contiguous(memory_format=torch.channels_last)
        z = z if cl else z.contiguous()
        z_d = fwAD.make_dual(z, torch.empty_like(z).copy_(v))
        t_d = fwAD.make_dual(t, torch.ones_like(t))
        u, dudt = fwAD.unpack_dual(model(z_d, r, t_d, **cond))
    return u, (torch.zeros_like(u) if dudt is None else dudt)   # None: u ignores z and t


def _active_dropout(model: Model) -> Optional[torch.nn.Module]:
    """The first dropout layer of ``model`` that is training with p > 0, or None."""
    if not isinstance(model, torch.nn.Module):
        return None
    drop = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d)
    return next((m for m in model.modules()
                 if isinstance(m, drop) and m.training and m.p > 0), None)


def fd_dudt(model: Model, z: Tensor, r: Tensor, t: Tensor, w: Tensor, delta: float,
            cond: dict) -> Tensor:
    """du/dt along (w, 0, 1) by a central finite difference, as ONE batched forward of the 2k
    samples [z + delta w, z - delta w] at times [t + delta, t - delta] (call under no_grad).

    Its error against the exact JVP is O(delta^2) from the curvature plus O(eps / delta) from
    rounding (bench/jvp_overhead.py prints it). A network with active dropout is refused: the
    two halves would draw different masks, and their difference over 2 delta is noise.
    """
    drop = _active_dropout(model)
    if drop is not None:
        raise ValueError(f"meanflow.fd_delta needs a network without active dropout (found "
                         f"{drop} in training mode): the +delta and -delta forwards would "
                         f"draw different masks; set model.dropout=0 or use the JVP")
    k = z.shape[0]
    dz = delta * w.to(z.dtype)
    # t + delta may pass 1: the network is smooth in t, 1 is not a wall for it
    out = model(torch.cat([z + dz, z - dz]), torch.cat([r, r]),
                torch.cat([t + delta, t - delta]), **_repeat2(cond))
    out = out.to(torch.promote_types(out.dtype, torch.float32))
    return (out[:k] - out[k:]) / (2.0 * delta)


def _repeat2(cond: dict) -> dict:
    return {name: (torch.cat([c, c]) if isinstance(c, Tensor) else c)
            for name, c in cond.items()}


def _select(cond: dict, idx: Tensor) -> dict:
    return {k: (c[idx] if isinstance(c, Tensor) else c) for k, c in cond.items()}


def meanflow_target(model: Model, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                    jvp_mode: str = "split", tangent: str = "sample",
                    neq_idx: Optional[Tensor] = None, alpha: float = 0.0,
                    fd_delta: float = 0.0, jvp_graph: Optional[Callable] = None,
                    **cond) -> tuple[Tensor, Tensor]:
    """u_theta(z, r, t) with its graph, and u_tgt = v - (t - r) du/dt, detached (Eq. 10).

    du/dt is the JVP of ``model`` along the tangent (w, 0, 1) of (z, r, t). ``v`` is the
    velocity the target is built from (e - x, or its guided version). Returns (u, u_tgt) in
    float32 (float64 if the inputs are).

    tangent (the z-direction w of the JVP):
      "sample" (default, the MeanFlow paper): w = v, the conditional velocity of this sample.
      "model" (improved MeanFlow, Geng et al. 2025b): w = u_theta(z, t, t), the network's own
          no-grad estimate of the marginal velocity E[v | z_t]. du/dt is linear in w, so both
          give the same target in expectation once u(z, t, t) has learned E[v | z_t] (which
          the r = t samples train); "model" drops the noise of e - x from the JVP term.
          Costs one no-grad forward on the r != t samples.

    alpha > 0 (AlphaFlow, Zhang et al. 2025): no JVP; the r != t samples get the
      trajectory target  alpha v + (1 - alpha) u_theta(z - d v, r, t - d),  d = alpha (t - r),
      from one no-grad forward. alpha = 1 is flow matching at every (r, t); alpha -> 0 is the
      MeanFlow identity (Eq. 6) as a finite difference, where the JVP takes over.
    fd_delta > 0: du/dt by a central finite difference along (w, 0, 1) under no_grad, one
      plain forward of the 2k samples at +-delta instead of a JVP (MeanFlow Transformers with
      RAE; see ``fd_dudt``); split mode only, no active dropout.

    jvp_mode:
      "split" (default): the JVP runs without a graph (``no_grad``), on the samples with
          r != t only, then one ordinary forward with a graph gives u for the loss. The
          tangent pass saves nothing for backward, so peak memory stays that of flow
          matching, and its cost scales with the fraction of r != t samples. Under DDP the
          gradient pass goes through the wrapper (gradients are synchronised); the no-grad
          pass uses the inner module. Stochastic layers (dropout) draw separate masks for the
          two passes.
      ``jvp_graph``: a callable (model, z, r, t, w, cond) -> du/dt that replaces the eager
          no-grad JVP, e.g. ``meanflow.jvp_graph.GraphedJVP`` (CUDA graphs).
      "joint": one forward-mode pass gives u (with graph) and du/dt together: same dropout
          mask for u and its derivative, but autograd also records the tangent computation,
          which costs time and memory (about 2x the activations).
    """
    if jvp_mode not in ("split", "joint"):
        raise ValueError(f"jvp_mode must be 'split' or 'joint', got {jvp_mode!r}")
    if tangent not in ("sample", "model"):
        raise ValueError(f"tangent must be 'sample' or 'model', got {tangent!r}")
    out_dtype = torch.promote_types(z.dtype, torch.float32)
    h = _bcast(t - r, z).to(out_dtype)
    idx = torch.nonzero(t != r).squeeze(1) if neq_idx is None else neq_idx.to(z.device)
    # On the boundary r = t the JVP term is multiplied by zero: only the r != t samples
    # need a tangent (and, in split mode, a JVP).
    z_s, r_s, t_s, c_s = z[idx], r[idx], t[idx], _select(cond, idx)
    w_s = v[idx]
    if alpha > 0.0:                                     # AlphaFlow: a no-grad forward, no JVP
        tgt = v.to(out_dtype).clone()
        if idx.numel() > 0:
            d = alpha * (t_s - r_s)
            with torch.no_grad():
                u2 = unwrap(model)(z_s - _bcast(d, z_s) * w_s.to(z.dtype), r_s, t_s - d, **c_s)
            tgt[idx] = alpha * w_s.to(out_dtype) + (1.0 - alpha) * u2.to(out_dtype)
        return model(z, r, t, **cond).to(out_dtype), tgt.detach()
    if tangent == "model" and idx.numel() > 0:
        with torch.no_grad():
            w_s = unwrap(model)(z_s, t_s, t_s, **c_s).to(v.dtype)
    if jvp_mode == "joint" and idx.numel() > 0:
        w = v.index_copy(0, idx, w_s) if tangent == "model" else v
        u, dudt = _jvp(uncompiled(model), z, r, t, w, cond)
        u = u.to(out_dtype)
        return u, (v.to(out_dtype) - h * dudt.to(out_dtype)).detach()

    dudt = torch.zeros(z.shape, dtype=out_dtype, device=z.device)
    if idx.numel() > 0:
        with torch.no_grad():
            if fd_delta > 0.0:
                d = fd_dudt(unwrap(model), z_s, r_s, t_s, w_s, fd_delta, c_s).to(out_dtype)
            elif jvp_graph is not None:          # train.cuda_graph_jvp (meanflow.jvp_graph)
                d = jvp_graph(unwrap(model), z_s, r_s, t_s, w_s, c_s)
            else:
                _, d = _jvp(unwrap(model), z_s, r_s, t_s, w_s, c_s)
        dudt[idx] = d.to(out_dtype)
    u = model(z, r, t, **cond).to(out_dtype)
    return u, (v.to(out_dtype) - h * dudt).detach()


def guided_velocity(model: Model, z: Tensor, t: Tensor, v: Tensor, cfg: MeanFlowConfig,
                    keep: Optional[Tensor], **cond) -> Tensor:
    """Classifier-free guidance folded into the target (paper Eq. 13, 19 of Appendix B.1).

        v_g = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null)

    applied only to samples whose condition was kept and whose t lies in [t_min, t_max];
    v_g = v elsewhere. The model evaluations are stop-gradient.
    """
    omega, kappa = cfg.cfg_omega, cfg.cfg_kappa
    if omega == 1.0 and kappa == 0.0:
        return v
    b = z.shape[0]
    kept = torch.ones(b, dtype=torch.bool, device=z.device) if keep is None else keep
    active = kept & (t >= cfg.cfg_t_min) & (t <= cfg.cfg_t_max)
    inner = unwrap(model)     # no gradients flow here: no need for the DDP wrapper
    with torch.no_grad():
        null = torch.zeros(b, dtype=torch.bool, device=z.device)
        u_null = inner(z, t, t, keep=null, **cond).to(v.dtype)
        v_g = omega * v + (1.0 - omega - kappa) * u_null
        if kappa != 0.0:
            u_cond = inner(z, t, t, keep=kept, **cond).to(v.dtype)
            v_g = v_g + kappa * u_cond
    return torch.where(_bcast(active, v), v_g, v)


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------
@dataclass
class LossOutput:
    loss: Tensor          # scalar, differentiable: mean over the batch of w * ||u - u_tgt||^2
    stats: dict           # detached scalars for logging (see MeanFlowLoss.__call__)


class MeanFlowLoss:
    """The MeanFlow training objective, independent of the backbone.

    >>> loss_fn = MeanFlowLoss(MeanFlowConfig(ratio_r_neq_t=0.25, cfg_omega=2.0))
    >>> out = loss_fn(model, x, edge=edge, label=label)
    >>> out.loss.backward(); print(out.stats["mse"])

    With ``ratio_r_neq_t = 0`` every sample has r = t, the JVP term vanishes and this is plain
    flow matching with the same network, weighting and guidance (the paper's ablation).
    """

    def __init__(self, cfg: MeanFlowConfig | None = None, check_values: bool = True,
                 teacher: Optional[Model] = None):
        self.cfg = cfg or MeanFlowConfig()
        # a frozen flow-matching network v_hat(z, t, t | c): replaces e - x (meanflow.teacher)
        self.teacher = teacher
        # Value checks (finite inputs, times in [0, 1], r <= t) read device tensors on the
        # host, i.e. wait for the GPU: train.py runs them on its first step only.
        self.check_values = check_values
        # the split-mode JVP pass replayed from CUDA graphs (train.cuda_graph_jvp), or None
        self.jvp_graph: Optional[Callable] = None

    def draw(self, x_shape: tuple[int, ...], global_batch: int, *, seed: int, step: int,
             micro: int = 0, rank: int = 0, world: int = 1, has_cond: bool = False,
             ratio: Optional[float] = None, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Draws:
        """Noise, (r, t), r != t positions and the dropout mask for process ``rank``'s slice
        of a GLOBAL batch, drawn on the CPU from (seed, step, micro-step) alone.

        Every sample's randomness is the same whatever the number of processes, so 1 and N
        processes train the same model (up to float summation order). ``x_shape`` is one
        sample's shape; the slice is ``global_batch // world`` samples. ``ratio`` is the r != t
        fraction (default ``cfg.ratio_r_neq_t``; train.py passes ``cfg.ratio_at(step)``).
        """
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        g = torch.Generator().manual_seed(stream_seed(seed, Stream.DRAWS, step, micro))
        r, t = sample_times(self.cfg, global_batch, "cpu", g, ratio)
        noise = torch.randn((global_batch, *x_shape), generator=g)
        keep = self.drop_mask(global_batch, "cpu", has_cond, g)
        n = global_batch // world
        sl = slice(rank * n, (rank + 1) * n)
        neq_idx = torch.nonzero(r[sl] != t[sl]).squeeze(1)         # on the host: no sync

        def put(a: Tensor, dt=None) -> Tensor:
            dev = torch.device(device)
            if dev.type == "cuda":
                a = a.pin_memory()                   # an asynchronous host-to-device copy
            return a.to(dev, dt, non_blocking=True)
        return Draws(noise=put(noise[sl], dtype), r=put(r[sl]), t=put(t[sl]),
                     keep=None if keep is None else put(keep[sl]), neq_idx=put(neq_idx))

    def step_loss(self, model: Model, x: Tensor, edge: Optional[Tensor] = None,
                  label: Optional[Tensor] = None, *, step: int, micro: int = 0, rank: int = 0,
                  world: int = 1, global_batch: int, seed: int) -> LossOutput:
        """The loss of one training micro-step, every random input drawn here.

        ``x`` is this process's slice of a global batch of ``global_batch`` samples. The
        noise, (r, t), the r != t positions and the condition-dropout mask come from
        :meth:`draw` at (seed, step, micro), the r != t ratio and AlphaFlow's alpha from the
        config's schedules at ``step``, and the network's own randomness (dropout) from
        torch's generators seeded at (seed, rank, step, micro). The noise takes x's memory
        layout (channels_last on the CUDA U-Net), so the elementwise ops around the network
        do not mix layouts.
        """
        from .runtime import seed_rng
        cfg = self.cfg
        d = self.draw(tuple(x.shape[1:]), global_batch, seed=seed, step=step, micro=micro,
                      rank=rank, world=world, has_cond=edge is not None or label is not None,
                      ratio=cfg.ratio_at(step), device=x.device, dtype=x.dtype)
        noise = d.noise
        if (x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            noise = noise.contiguous(memory_format=torch.channels_last)
        seed_rng(stream_seed(seed, Stream.DROPOUT, rank, step, micro), x.device)
        return self(model, x, edge, label, noise=noise, r=d.r, t=d.t, keep=d.keep,
                    neq_idx=d.neq_idx, alpha=cfg.alpha_at(step))

    def drop_mask(self, batch: int, device, has_cond: bool,
                  generator: torch.Generator | None = None) -> Optional[Tensor]:
        """keep[i] = False for the samples whose condition is replaced by the null condition."""
        if not has_cond or self.cfg.cond_drop_prob == 0.0:
            return None
        u = torch.rand(batch, device=device, generator=generator)
        return u >= self.cfg.cond_drop_prob

    def __call__(self, model: Model, x: Tensor, edge: Optional[Tensor] = None,
                 label: Optional[Tensor] = None, *, noise: Optional[Tensor] = None,
                 r: Optional[Tensor] = None, t: Optional[Tensor] = None,
                 keep: Optional[Tensor] = None, neq_idx: Optional[Tensor] = None,
                 alpha: float = 0.0,
                 generator: torch.Generator | None = None) -> LossOutput:
        """One MeanFlow loss evaluation on a batch of clean data ``x`` [B, ...].

        ``noise``, ``r``/``t`` and ``keep`` are drawn here unless given (tests and
        reproducibility checks pass them). Stats: ``loss`` (adaptively weighted, near 1 by
        construction), ``mse`` (unweighted per-element), ``u_rms``, ``tgt_rms``,
        ``rms_ratio`` = u_rms / tgt_rms, ``frac_r_neq_t``.
        """
        cfg = self.cfg
        _check_inputs(x, edge, label, self.check_values)
        b, device = x.shape[0], x.device
        if (r is None) != (t is None):
            raise ValueError("pass both r and t, or neither")
        if r is None:
            r, t = sample_times(cfg, b, device, generator)
        check_times(r, t, b, self.check_values)
        if noise is None:
            noise = torch.randn(x.shape, device=device, dtype=x.dtype, generator=generator)
        elif noise.shape != x.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, x has {tuple(x.shape)}")
        has_cond = edge is not None or label is not None
        if keep is None:
            keep = self.drop_mask(b, device, has_cond, generator)
        elif keep.shape != (b,) or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool tensor of shape [{b}], got "
                             f"{keep.dtype} {tuple(keep.shape)}")

        r, t = r.to(x.dtype), t.to(x.dtype)
        tb = _bcast(t, x)
        z = (1.0 - tb) * x + tb * noise                                    # Eq. 1
        v = noise - x                                                      # Eq. 2
        cond = dict(edge=edge, label=label, keep=keep)
        if self.teacher is not None:
            # MeanFlow Transformers with RAE: the teacher's velocity, an estimate of the
            # conditional mean E[v | z_t, c], has far less variance than e - x
            with torch.no_grad():
                v = self.teacher(z, t, t, **cond).to(v.dtype)
        v_g = guided_velocity(model, z, t, v, cfg, **cond) if has_cond else v
        u, u_tgt = meanflow_target(model, z, r, t, v_g, cfg.jvp_mode, cfg.tangent,  # Eq. 10
                                   neq_idx, alpha, cfg.fd_delta, self.jvp_graph, **cond)

        sq = (u - u_tgt) ** 2
        d = sq.flatten(1).sum(1)                                           # per-sample ||.||^2
        w = 1.0 / (d.detach() + cfg.adaptive_c) ** cfg.adaptive_p          # adaptive weight
        loss = (w * d).mean()
        with torch.no_grad():
            u_rms = u.detach().pow(2).mean().sqrt()
            tgt_rms = u_tgt.pow(2).mean().sqrt()
            stats = dict(loss=loss.detach(), mse=sq.detach().mean(), u_rms=u_rms,
                         tgt_rms=tgt_rms, rms_ratio=u_rms / tgt_rms.clamp_min(1e-12),
                         frac_r_neq_t=(r != t).float().mean())
        return LossOutput(loss=loss, stats=stats)


__all__ = ["MeanFlowLoss", "Draws", "unwrap", "uncompiled", "LossOutput", "sample_times",
           "neq_layout", "meanflow_target", "fd_dudt", "guided_velocity", "check_times",
           "SEED_STREAM_DRAWS"]
