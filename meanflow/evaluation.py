"""The evaluation's library parts: which samples are evaluated, their conditions and noise,
the sampler's time grids, and the FID reference statistics of the real images. evaluate.py
is the command line around them; other programs use them to see the same samples, noise and
reference files as an evaluation.

Sample i's noise comes from (seed, i) and conditions from the dataset's record i, so a sample
does not depend on the batch it is in or on the number of processes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .config import DataConfig, ModelConfig
from .distributed import progress, shard_starts
from .images import as_rgb
from .runtime import Stream, stream_seed
from .sampling import sample, sample_noise, time_grid


class EvalError(ValueError):
    """Bad input detected before sampling starts."""


def checked_device(requested: Optional[str] = None) -> torch.device:
    """``runtime.process_device(requested)`` (the --device flag, or the automatic choice),
    checked by putting a tensor there: a name torch does not know, or a device this machine
    does not have (cuda without a GPU, cuda:7 on a 2-GPU machine), is an EvalError naming
    --device, before anything is loaded or written."""
    from .runtime import process_device
    try:
        dev = process_device(requested)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError, TypeError) as e:
        text = str(e).strip().splitlines()
        raise EvalError(f"--device {requested!r}: not usable on this machine "
                        f"({text[0] if text else type(e).__name__})") from None
    return dev


def spread(idx: list[int], n: int) -> list[int]:
    """``n`` evenly spaced entries of ``idx`` (all of it when n = len(idx)).

    Keys are sorted by category, so the first N samples would be one or two classes; evenly
    spaced ones cover every class in proportion, and the choice does not depend on the seed.
    """
    return [idx[(k * len(idx)) // n] for k in range(n)]


def reference_tag(split: str, category: Optional[str], n: int) -> str:
    """The cache tag of the in-cache reference statistics (what ``real_statistics`` takes):
    shared by evaluate.py and any script that wants the same file."""
    return f"{split}{'_' + category if category else ''}_n{n}_spread"


def parse_steps(spec: str):
    """'4' -> 4; '16@0.25' -> '16@0.25' (the 16-step grid, steps below t = 0.25 merged)."""
    try:
        if "@" in spec:
            k, tau = spec.split("@")
            steps_grid(f"{int(k)}@{float(tau)}")
            return f"{int(k)}@{tau.strip()}"
        return int(spec)
    except ValueError as e:
        raise EvalError(f"--compare-steps: cannot read {spec!r} as K or K@T ({e})") from None


def steps_grid(steps, device=None) -> torch.Tensor:
    """The sampler's time grid for a step count or a 'K@T' spec (see parse_steps)."""
    if isinstance(steps, str):
        k, tau = steps.split("@")
        return time_grid(int(k), device, jump_below=float(tau))
    return time_grid(steps, device)


def conditions(ds, dcfg: DataConfig, mcfg: ModelConfig, balanced: bool
               ) -> Callable[[list[int], torch.device], tuple]:
    """(edge [B, Ce, S, S] or None, label [B] or None) of samples ``idx`` on ``device``: the
    dataset's records, or with ``balanced`` the label i mod C of sample i."""
    def cond(idx: list[int], device: torch.device):
        if balanced:
            return None, torch.tensor([i % mcfg.num_classes for i in idx], device=device)
        edge = (torch.stack([torch.as_tensor(ds.edge_map(i)) for i in idx]).to(device)
                if dcfg.use_edges else None)
        label = (torch.tensor([ds.label(i) for i in idx], device=device)
                 if dcfg.use_labels else None)
        return edge, label
    return cond


def sample_batch(model, idx: list[int], cond, shape: tuple, seed: int, device: torch.device,
                 times, cfg_scale: float, amp_dtype=None):
    """Model-space samples of the indices ``idx`` (noise from (seed, index)), and the edge
    maps they were conditioned on."""
    edge, label = cond(idx, device)
    noise = sample_noise(shape, [stream_seed(seed, Stream.SAMPLE, i) for i in idx], device)
    x = sample(model, noise, edge=edge, label=label, cfg_scale=cfg_scale, times=times,
               autocast_dtype=amp_dtype)
    return x, edge


def real_statistics(ds, sel: list[int], tag: str, weights, device, state=None,
                    batch_size: int = 64) -> Optional[dict]:
    """FID/KID statistics of the real images ``sel`` of ``ds``, cached next to the dataset
    under ``tag`` (e.g. "test_n1000_spread"), so that every run and script shares one file.
    A torn cache file is recomputed and rewritten; when ``fid_ref/`` cannot be written, the
    statistics are still returned (each with a warning).

    Sharded like the samples (process r takes batches r, r + world, ...) and streamed
    (``metrics.StreamedStatistics``): no process holds more than one batch of images. Rank 0
    gets the statistics; the other ranks None."""
    import torch.distributed as dist

    from . import metrics
    rank, world = (0, 1) if state is None else (state.process_index, state.num_processes)
    n = len(sel)
    weights = Path(weights) if weights is not None else metrics.fid_weights_path()
    key = metrics.statistics_key(f"{Path(ds.path).resolve()}::{tag}", n, weights)
    path = metrics.statistics_cache_path(Path(ds.path) / "fid_ref", key)
    # a torn or unreadable file (a kill during a copy, say) is recomputed with a warning
    cached = metrics.cached_statistics(path, key, n) if rank == 0 else None
    hit = [cached is not None]
    if world > 1:
        dist.broadcast_object_list(hit, src=0)             # all compute, or none
    if hit[0]:
        return cached
    acc = metrics.StreamedStatistics(n, device=device)
    starts = shard_starts(n, batch_size, rank, world)
    with progress(n, "reference statistics", main=rank == 0) as bar:
        for lo in starts:
            pos = range(lo, min(n, lo + batch_size))
            acc.add(pos, as_rgb(np.stack([ds.image(sel[p]) for p in pos])), weights=weights)
            bar.update(min(len(pos) * world, n - bar.n))
    st = acc.reduce()
    if rank == 0:
        metrics.cache_statistics(path, st, key)     # unwritable: a warning, still the result
    return st
