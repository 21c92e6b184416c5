"""Process-level helpers shared by the entry points (train, evaluate, bench)."""
from __future__ import annotations

import ctypes
import enum
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024      # glibc's upper bound on 64-bit systems


def tune_cpu_allocator() -> bool:
    """Keep freed activation buffers in the heap instead of returning them to the OS.

    glibc serves allocations above its mmap threshold with fresh pages and unmaps them on
    free, so every multi-megabyte activation is page-faulted in again at each step. Raising the
    mmap and trim thresholds (what MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ do, but from
    inside the process) made a CPU training step 1.2-1.6x faster here, the forward-mode JVP
    most. No effect on CUDA memory. Returns whether the setting was applied.
    """
    if not sys.platform.startswith("linux") or os.environ.get("MEANFLOW_NO_MALLOPT"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return bool(ok)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, step, ...), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2)) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return h & (2**63 - 1)


class Stream(enum.IntEnum):
    """Every random stream of the project, in one place. A stream's seed is
    ``mix_seed(seed, STREAM, *coordinates)`` (:func:`stream_seed`): the tag keeps streams apart
    whatever their coordinates (tests/test_training_utils.py checks that no two share a seed
    for ranks 0-63). Add a stream here, with a tag of its own; never reuse a tag."""
    EPOCH_ORDER = 1     # (epoch): the order of the training data in an epoch
    DRAWS = 3           # (step, micro): noise, times, r != t positions, condition dropout
    AUGMENT = 7         # (epoch, index): a training item's flip and latent posterior noise
    VALIDATION = 11     # (), (1,): the validation grid's noise, its items' posterior noise
    DROPOUT = 13        # (rank, step, micro): the network's dropout masks on one rank
    SAMPLE = 17         # (index): the starting noise of sample ``index`` (evaluate, pipeline)


def stream_seed(seed: int, stream: Stream, *coords: int) -> int:
    """The seed of ``stream`` at ``coords`` for the user's ``seed``."""
    return mix_seed(seed, int(stream), *coords)


def seed_rng(seed: int, device=None) -> None:
    """Seed torch's CPU generator, and the current CUDA device's when ``device`` is CUDA.

    What ``torch.manual_seed`` does for the generators that are used, without its cost in a
    process that never initialises CUDA: there it queues a lazy CUDA seeding and records a
    formatted stack trace with it, every call (0.35 ms at a shallow stack, more inside a
    DataLoader; per training sample, that was 5-15% of a CPU demo step). The CPU draws are
    the same as after ``torch.manual_seed(seed)``.
    """
    import torch
    torch.default_generator.manual_seed(seed)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.manual_seed(seed)


def process_device(requested=None):
    """The device this process computes on: the one place train, evaluate, cache and the
    sampling API take it from.

    ``requested`` (a ``--device`` flag, e.g. "cpu" or "cuda:1") wins when given. Otherwise
    ``cuda:LOCAL_RANK`` when CUDA is available, so that under torchrun / accelerate launch each
    rank computes on its own GPU (a bare "cuda" means cuda:0 for every rank), else the CPU.
    With more ranks on a node than GPUs, rank k takes GPU k mod the GPU count.
    A bare "cuda" request is pinned to LOCAL_RANK the same way.
    """
    import torch
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        local %= torch.cuda.device_count()     # more ranks than GPUs: they share (under gloo)
    if requested is not None:
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local)
    return torch.device("cpu")


_PR_SET_PDEATHSIG = 1
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION", "LOCAL_RANK")


def die_with_launcher(sig: int | None = None) -> bool:
    """Ask the kernel to send this process ``sig`` (SIGTERM) when its launcher dies.

    ``accelerate launch`` (single process) exits on SIGTERM without passing it on, which left
    train.py running, orphaned, without its checkpoint-and-exit. With this, a SIGTERM to the
    launcher reaches the trainer as a SIGTERM. Only under a launcher (torchrun / accelerate
    set the variables in LAUNCHER_ENV): a plain `nohup python train.py` must outlive its
    shell. Linux only; returns whether it was set.
    """
    import signal
    if not sys.platform.startswith("linux") or not any(k in os.environ for k in LAUNCHER_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return False
    sig = signal.SIGTERM if sig is None else sig
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() == 1:                   # the launcher died before the request was made
        os.kill(os.getpid(), sig)
    return True
