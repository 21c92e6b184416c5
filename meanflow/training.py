"""Machinery for train.py's loop: the learning-rate schedule, the deterministic data order
and augmentation seeds, the EMAs and the loss meter. Nothing here knows about the MeanFlow
math; what a checkpoint is lives in meanflow/checkpoint.py, the export in meanflow/export.py."""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.nn as nn

from .config import Config
from .runtime import Stream, seed_rng, stream_seed


# --------------------------------------------------------------------------------------------
# Learning rate
# --------------------------------------------------------------------------------------------
def lr_at(step: int, base: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine":
        frac = (step - warmup) / max(1, total - warmup)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return base


# --------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------
class ShardedEpochSampler(torch.utils.data.Sampler):
    """Every epoch a permutation of the dataset from (seed, epoch); rank r takes every
    world-th batch-sized slice. Yields ``epoch * n + index`` so that a dataset wrapper can seed
    each sample's augmentation from (seed, epoch, index): the data seen at micro-step k is
    then a function of k alone, which makes resume exact and lets a run start mid-epoch.
    """

    def __init__(self, n: int, per_rank_batch: int, rank: int, world: int, seed: int,
                 start_batch: int = 0):
        self.n, self.bs, self.rank, self.world, self.seed = n, per_rank_batch, rank, world, seed
        self.per_epoch = n // (per_rank_batch * world)       # full global batches per epoch
        if self.per_epoch == 0:
            raise ValueError(f"dataset has {n} samples, fewer than one global batch of "
                             f"{per_rank_batch * world}")
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[int]:
        b = self.start_batch
        while True:
            epoch, j = divmod(b, self.per_epoch)
            g = torch.Generator().manual_seed(stream_seed(self.seed, Stream.EPOCH_ORDER, epoch))
            perm = torch.randperm(self.n, generator=g)
            gb = self.bs * self.world
            for jj in range(j, self.per_epoch):
                lo = jj * gb + self.rank * self.bs
                for i in perm[lo: lo + self.bs].tolist():
                    yield epoch * self.n + i
            b = (epoch + 1) * self.per_epoch


class SeededItems(torch.utils.data.Dataset):
    """Seeds torch's RNG from (seed, epoch, index) before each item: augmentation (flip,
    latent posterior noise) no longer depends on worker count or on where a run resumed."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int):
        epoch, i = divmod(k, len(self.dataset))
        seed_rng(stream_seed(self.seed, Stream.AUGMENT, epoch, i))   # flip, posterior: CPU
        return self.dataset[i]


def training_loader(data, cfg: Config, per_rank: int, rank: int, world: int, step: int,
                    device) -> torch.utils.data.DataLoader:
    """The loader of one rank's micro-batches from optimizer step ``step`` on: the same data
    order and augmentation whatever the process and worker counts, and where a run resumed."""
    tc = cfg.train
    sampler = ShardedEpochSampler(len(data), per_rank, rank, world, tc.seed,
                                  start_batch=step * tc.grad_accum)
    return torch.utils.data.DataLoader(
        SeededItems(data, tc.seed), batch_size=per_rank, sampler=sampler,
        num_workers=cfg.data.num_workers, pin_memory=torch.device(device).type == "cuda",
        drop_last=True, persistent_workers=cfg.data.num_workers > 0)


# --------------------------------------------------------------------------------------------
# EMA and the loss meter
# --------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving averages of a model's floating-point parameters, one per decay.

    Saved in a checkpoint as safetensors (``save_ema``/``load_ema``), not through
    ``accelerator.register_for_checkpointing``: accelerate pickles registered objects and
    unpickles them with ``weights_only=False``, i.e. resuming from a checkpoint someone sent
    would run any code it holds.

    Updated on every rank (the parameters are identical after the all-reduce), so no rank
    drifts and no collective is needed.
    """

    def __init__(self, model: nn.Module, decays: list[float]):
        self.decays = [float(d) for d in decays]
        self.names = [n for n, p in model.named_parameters()]
        self.shadows = [{n: p.detach().clone().float() for n, p in model.named_parameters()}
                        for _ in self.decays]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, apply: Optional[torch.Tensor] = None) -> None:
        """Average in the weights after optimizer step ``step`` (0-based). The decay warms up
        as min(decay, (1 + step) / (10 + step)): with a fixed 0.999 a short run's EMA would
        still be 90% the random initialisation after 100 steps.

        ``apply``: a 0-dim bool tensor on the model's device; False leaves the averages as
        they are (a skipped update), decided on the device without a host read."""
        params = dict(model.named_parameters())
        for decay, shadow in zip(self.decays, self.shadows):
            d = min(decay, (1.0 + step) / (10.0 + step))
            keys = list(shadow)
            avg, cur = [shadow[k] for k in keys], [params[k].detach().float() for k in keys]
            if apply is None:
                torch._foreach_lerp_(avg, cur, 1.0 - d)
            else:
                # avg += w (cur - avg) with w a device tensor: lerp would read it on the host
                delta = torch._foreach_sub(cur, avg)
                torch._foreach_mul_(delta, apply.float() * (1.0 - d))
                torch._foreach_add_(avg, delta)

    def fill(self, net: nn.Module, live: nn.Module, index: int = 0) -> nn.Module:
        """``net`` made the EMA network: ``live``'s buffers (and parameters), then EMA
        ``index`` over the parameters. ``net`` must live on the training device (a copy of a
        device tensor into a host parameter fails)."""
        net.load_state_dict(live.state_dict())
        self.copy_to(net, index)
        return net

    def copy_to(self, model: nn.Module, index: int = 0) -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.shadows[index][n].to(p.dtype))

    def state_dict(self) -> dict:
        return {f"{i}.{n}": t for i, s in enumerate(self.shadows) for n, t in s.items()}

    def load_state_dict(self, state: dict) -> None:
        want = set(self.state_dict())
        if set(state) != want:
            missing, extra = sorted(want - set(state)), sorted(set(state) - want)
            raise ValueError(f"EMA state does not match {len(self.decays)} decay(s) of this "
                             f"model: missing {missing[:3]}, unexpected {extra[:3]}")
        for i, s in enumerate(self.shadows):
            for n in s:
                if state[f"{i}.{n}"].shape != s[n].shape:
                    raise ValueError(f"EMA state {i}.{n}: shape {tuple(state[f'{i}.{n}'].shape)}"
                                     f", the model has {tuple(s[n].shape)}")
                s[n].copy_(state[f"{i}.{n}"])


class Meter:
    """Means of per-step device scalars (loss statistics), read on the host only when asked:
    one transfer per read instead of one per statistic and step."""

    def __init__(self):
        self.sums: dict = {}
        self.count: Optional[torch.Tensor] = None

    def add(self, stats: dict, weight: torch.Tensor) -> None:
        """Add ``stats`` (0-dim tensors) if ``weight`` (0-dim bool tensor) is True."""
        for k, v in stats.items():
            v = torch.where(weight, v.float(), torch.zeros_like(v, dtype=torch.float32))
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        w = weight.float()
        self.count = w if self.count is None else self.count + w

    def read(self) -> dict:
        """{name: mean over the counted steps} (NaN when none counted); then reset."""
        if self.count is None:
            return {}
        keys = list(self.sums)
        vals = torch.stack([self.sums[k] for k in keys] + [self.count]).tolist()
        n = vals.pop()
        self.sums, self.count = {}, None
        return {k: (v / n if n else float("nan")) for k, v in zip(keys, vals)}
