"""Helpers for programs that run as one process or as several (torchrun, accelerate launch):
the process group through Accelerate's PartialState, collectives on Python objects, and
progress bars shown by rank 0 only.

Every function here works unchanged in a single process, where the collectives are no-ops.
torch is imported by the functions that need it, so a CPU-only program (preprocess/cache.py
with the pixel codec) does not load it for a progress bar.
"""
from __future__ import annotations

import os
from typing import Optional


class LaunchError(ValueError):
    """The launcher's environment (RANK, WORLD_SIZE) is malformed."""


def launcher_rank_world() -> tuple[int, int]:
    """(rank, world size) from the RANK / WORLD_SIZE variables torchrun and accelerate set;
    (0, 1) when there are none."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise LaunchError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE="
                          f"{os.environ.get('WORLD_SIZE')!r} must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


def group_rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group that is up; (0, 1) without one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_starts(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The first sample of each batch that process ``rank`` of ``world`` handles: batches of
    ``batch_size`` over ``n`` samples dealt round-robin, so every process's share is the same
    whatever the batch it starts from, and the union is every batch once."""
    return list(range(0, n, batch_size))[rank::world]


def shared_gpu_backend(env=os.environ) -> Optional[str]:
    """"gloo" when this node runs more processes than it has GPUs (several ranks then share a
    GPU, which NCCL refuses), else None: the launcher's default (NCCL on GPUs)."""
    import torch
    if not torch.cuda.is_available():
        return None
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    return "gloo" if local_world > torch.cuda.device_count() else None


def init_state(device):
    """The process group (NCCL on CUDA, gloo on the CPU or where ranks share a GPU) and this
    process's rank, as an ``accelerate.PartialState``. ``device`` comes from
    ``runtime.process_device`` before anything is loaded; on CUDA it becomes the current
    device first, so nothing lands on cuda:0 by default."""
    import torch
    from accelerate import PartialState
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = shared_gpu_backend()
        if backend is not None:
            return PartialState(backend=backend)
    return PartialState(cpu=device.type != "cuda")


def shutdown() -> None:
    """Take the default process group down if one is up (every exit path of an entry point:
    NCCL warns at exit about a group left up, and it holds the GPU's communicators)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish(state) -> None:
    """Wait for every process, then take the process group down (a one-process launch under
    torchrun has a group too)."""
    if state is not None and state.num_processes > 1:
        state.wait_for_everyone()
    shutdown()


def gather(obj: list, state) -> list:
    """A list from every process, concatenated in rank order (every rank gets it)."""
    if state is None or state.num_processes == 1:
        return list(obj)
    from accelerate.utils import gather_object
    return gather_object(obj)


def all_ok(state_or_accelerator, ok: bool) -> bool:
    """True when ``ok`` holds on every process (a collective: call it on every rank).
    Takes an ``accelerate.Accelerator`` or a ``PartialState``: the flag lives on its device
    (a CUDA tensor for NCCL) and is summed over the processes as ``Accelerator.reduce`` does."""
    import torch
    from accelerate.utils import reduce
    flag = torch.tensor(float(not ok), device=state_or_accelerator.device)
    return reduce(flag, reduction="sum").item() == 0


def progress(total: int, desc: str, main: bool = True, unit: str = "img",
             mininterval: Optional[float] = 2.0):
    """A tqdm progress bar, shown by the main process only (``main`` False: disabled, so the
    other ranks print nothing)."""
    from tqdm import tqdm
    kw = {} if mininterval is None else dict(mininterval=mininterval)
    return tqdm(total=total, desc=desc, unit=unit, disable=not main, dynamic_ncols=True, **kw)


class TrainProgress:
    """The training bar: steps against train.max_steps, or, when a time budget
    (train.max_minutes) ends the run, minutes trained against the budget with the steps done
    beside them (a step total that is never reached would show a meaningless ETA).

    ``trained()`` gives the run's training seconds so far, resumes included."""

    def __init__(self, step: int, max_steps: int, budget_s: float, trained, bar=None):
        from tqdm import tqdm
        self.budget = budget_s != float("inf")
        self.trained = trained
        if bar is not None:
            self.bar = bar
        elif self.budget:
            self.bar = tqdm(total=round(budget_s / 60, 2), initial=0, desc="train",
                            unit="min", dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.2f}/{total:.2f} "
                                       "min [{elapsed}<{remaining}{postfix}]")
        else:
            self.bar = tqdm(total=max_steps, initial=step, desc="train", dynamic_ncols=True)
        self.update(step)

    def update(self, step: int) -> None:
        if not self.budget:
            self.bar.update(step - self.bar.n)
            return
        minutes = min(self.trained() / 60, self.bar.total)
        self.bar.update(round(minutes - self.bar.n, 4))
        self.bar.set_postfix_str(f"step {step}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def init_gloo(rank: int, world: int):
    """A gloo process group for CPU collectives when launched by torchrun / accelerate, as
    ``torch.distributed``; None for one process, or for plain RANK / WORLD_SIZE processes
    (no MASTER_ADDR), which then work without one."""
    if world == 1 or not os.environ.get("MASTER_ADDR"):
        return None
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    return dist
