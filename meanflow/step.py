"""One optimizer step of MeanFlow training: the library half of train.py's loop.

``train_step`` runs the accumulation micro-steps (the loss draws its own randomness, see
``MeanFlowLoss.step_loss``), the clipped, non-finite-guarded update and the EMA step, without
a single host read of a device tensor. train.py owns the loop around it (data, sync points,
logging, checkpoints).
"""
from __future__ import annotations

import math

import torch

from .config import Config
from .objective import MeanFlowLoss
from .training import EMA, lr_at


def batch_to(batch: dict, device, cfg: Config, channels_last: bool = False):
    """(x, edge, label) of a collated loader batch on ``device``; uint8 edges scaled to [0, 1]
    there (a quarter of the bytes through the copy)."""
    x = batch["x"].to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    edge = (batch["edge"].to(device, non_blocking=True).float().div_(255)
            if cfg.data.use_edges else None)
    label = batch["label"].to(device, non_blocking=True) if cfg.data.use_labels else None
    return x, edge, label


def _inner_optimizer(opt):
    return getattr(opt, "optimizer", opt)           # accelerate's wrapper -> torch's AdamW


def apply_update(opt, ok: torch.Tensor, fp16: bool) -> None:
    """``opt.step()`` unless the gradients are not finite, decided without a host read.

    fused AdamW takes a ``found_inf`` tensor and skips the update (its step count included) on
    the device; fp16's GradScaler does the same from its own overflow check, and must see
    every step (its scale update, and the unscale state that the next clip reads). Other
    optimizers fall back to one host read of ``ok``.
    """
    inner = _inner_optimizer(opt)
    if fp16:
        opt.step()
    elif inner.defaults.get("fused"):
        inner.found_inf = (~ok).float()
        try:
            opt.step()
        finally:
            del inner.found_inf
    elif bool(ok):
        opt.step()


def train_step(model, forward_model, opt, ema: EMA, loss_fn: MeanFlowLoss, micro_batches,
               step: int, *, accelerator, cfg: Config, world: int, rank: int,
               fp16: bool = False, channels_last: bool = False, nan: bool = False):
    """One optimizer step over ``len(micro_batches)`` accumulation micro-steps.

    Everything stays on the device: nothing here reads a tensor on the host (the optimizer's
    non-finite guard included, see ``apply_update``), so the CPU queues the next step while
    the GPU runs this one. Returns (ok, nonfinite, gnorm, stats), 0-dim device tensors and a
    dict of them: ``ok``: finite gradients (the update and the EMA step were applied);
    ``stats``: the loss statistics averaged over the micro-steps, ``nonfinite`` whether the
    step counts towards train.max_nonfinite. ``nan`` poisons the loss (a test hook).
    """
    tc, device = cfg.train, accelerator.device
    if tc.cuda_graph_jvp and loss_fn.jvp_graph is None:
        if device.type != "cuda":
            raise ValueError(f"train.cuda_graph_jvp=true needs a CUDA training device, got "
                             f"{device}")
        from .jvp_graph import GraphedJVP, autocast_dtype_of
        loss_fn.jvp_graph = GraphedJVP(
            autocast_dtype_of(getattr(accelerator, "mixed_precision", "no")))
    stats: dict = {}
    n_micro = len(micro_batches)
    for micro, batch in enumerate(micro_batches):
        x, edge, label = batch_to(batch, device, cfg, channels_last)
        with accelerator.accumulate(model):
            out = loss_fn.step_loss(forward_model, x, edge, label, step=step, micro=micro,
                                    rank=rank, world=world, global_batch=tc.batch_size,
                                    seed=tc.seed)
            loss = out.loss * float("nan") if nan else out.loss
            accelerator.backward(loss)
            if micro == n_micro - 1:
                # the norm of the synchronised gradients: identical on every rank, and
                # non-finite on every rank as soon as one rank's loss was
                max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
                gnorm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                gnorm = torch.as_tensor(gnorm, device=device).float()
                ok = torch.isfinite(gnorm)
                for grp in opt.param_groups:
                    grp["lr"] = lr_at(step, tc.lr, tc.warmup_steps, tc.max_steps, tc.schedule)
                apply_update(opt, ok, fp16)
                opt.zero_grad(set_to_none=True)
        for k, v in out.stats.items():
            stats[k] = stats.get(k, 0.0) + v.detach().float() / n_micro
    ema.update(accelerator.unwrap_model(model), step, ok)
    # What counts towards train.max_nonfinite: under fp16 only a non-finite loss, since
    # GradScaler overflows (skipped too) are routine while it searches for its scale.
    nonfinite = ~torch.isfinite(stats["loss"]) if fp16 else ~ok
    return ok, nonfinite, gnorm, stats


__all__ = ["train_step", "apply_update", "batch_to"]
