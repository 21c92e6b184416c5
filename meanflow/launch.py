"""How a training process is launched: the precision and accumulation agreed with the
launcher (`accelerate launch` / torchrun flags against the config), the backend flags, the
Accelerator itself (NCCL on GPUs, gloo on CPUs or where ranks share a GPU) and the check that
every node sees the run folder.

train.py calls these before its first step; each failure is a ``SetupError``, one line."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from meanflow import precision
from meanflow.config import Config, ConfigError

LAUNCH_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"          # accelerate launch --mixed_precision
LAUNCH_ACCUM_ENV = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"   # ... --gradient_accumulation_steps


def resolve_precision(tc, device: torch.device, env=os.environ) -> str:
    """The autocast mode: ``train.mixed_precision`` against the launcher's flag and the device.

    ``accelerate launch`` always exports its flag ("no" when not given), so only a launcher
    value other than "no" counts as asked for. An explicit config value that contradicts it is
    an error rather than a silent override in either direction. Names are those of
    :mod:`meanflow.precision` (``fp32`` is ``no``); the result is the canonical one, what
    accelerate takes.
    """
    launched = (env.get(LAUNCH_PRECISION_ENV) or "no").lower()
    launched = precision.ALIASES.get(launched, launched)
    asked = tc.mixed_precision
    want = precision.ALIASES.get(asked, asked)
    if want == precision.AUTO:
        want = launched if launched != "no" else precision.auto_precision(device)
    elif launched != "no" and launched != want:
        raise ConfigError(f"train.mixed_precision={asked} but the launcher asks for "
                          f"--mixed_precision {launched}: drop one of them (train."
                          f"mixed_precision=auto follows the launcher)")
    if want not in precision.AUTOCAST:
        raise ConfigError(f"--mixed_precision {want}: this trainer supports no, bf16 and fp16")
    if want == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.mixed_precision=fp16 needs a CUDA GPU (this process runs on "
                          f"{device}); use bf16 or no")
    return want


def resolve_grad_accum(tc, env=os.environ) -> int:
    """``train.grad_accum``, or the launcher's --gradient_accumulation_steps when the config
    keeps the default of 1. Accelerate takes the launcher's value over the one passed in code,
    so the two must agree, or the loop and Accelerate disagree on when gradients sync."""
    raw = env.get(LAUNCH_ACCUM_ENV)
    if raw is None:
        return tc.grad_accum
    try:
        launched = int(raw)
    except ValueError:
        raise ConfigError(f"{LAUNCH_ACCUM_ENV}={raw!r} is not an integer") from None
    if launched < 1:
        raise ConfigError(f"--gradient_accumulation_steps {launched} must be >= 1")
    if tc.grad_accum not in (1, launched):
        raise ConfigError(f"train.grad_accum={tc.grad_accum} but the launcher asks for "
                          f"--gradient_accumulation_steps {launched}: drop one of them")
    return launched


def set_backend_flags(tc, device: torch.device) -> None:
    """TF32 tensor cores for fp32 matmuls/convolutions on CUDA (train.tf32)."""
    if device.type == "cuda":
        prec = "tf32" if tc.tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = prec
        torch.backends.cudnn.conv.fp32_precision = prec


def check_shared_run_dir(accelerator, run_dir: Path) -> None:
    """Refuse a run folder that the processes do not all see.

    The main process writes checkpoints (and renames them complete) and every process reads
    them back on resume, so the run folder must be on a filesystem shared by all nodes (NFS,
    Lustre, a cloud volume mounted on each). On separate local disks the other nodes would
    never see a complete checkpoint. The main process writes a probe file; every process
    looks for it; the hosts that cannot see it are named.
    """
    if accelerator.num_processes == 1:
        return
    import socket
    import uuid
    from accelerate.utils import broadcast_object_list, gather_object
    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    broadcast_object_list(token)
    probe = run_dir / f".shared_check_{token[0]}"
    if accelerator.is_main_process:
        probe.write_text(socket.gethostname())
    accelerator.wait_for_everyone()
    blind = gather_object([None if probe.is_file() else
                           f"rank {accelerator.process_index} on {socket.gethostname()}"])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [b for b in blind if b]
    if blind:
        raise RuntimeError(f"--run-dir {run_dir} is not shared by every process: "
                           f"{', '.join(blind)} cannot see the file the main process wrote "
                           f"there. Put the run folder on a filesystem every node mounts")


# The one rule for relative paths, in every entry point: a relative path on the command line or
# in a config file is relative to the working directory of the command that reads it. What a
# run records (RUN/config.yaml, the export's model_config.json) is absolute, so evaluate.py and
# sample.py find a run's data from any directory.
PATH_KEYS = (("data", "path"), ("data", "val_path"), ("train", "init_from"),
             ("meanflow", "teacher"))


def resolve_paths(cfg: Config, cwd: Path | None = None) -> Config:
    """``cfg`` with its path keys (PATH_KEYS) made absolute against ``cwd`` (default: the
    working directory); empty keys stay empty."""
    base = Path.cwd() if cwd is None else Path(cwd)
    for section, key in PATH_KEYS:
        sec = getattr(cfg, section)
        value = getattr(sec, key)
        if value:
            setattr(sec, key, str((base / Path(value).expanduser()).resolve()))
    return cfg


class SetupError(Exception):
    """Bad input found before the first step: one line, exit code 2."""


def make_accelerator(cfg: Config, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import (DistributedDataParallelKwargs, InitProcessGroupKwargs,
                                  ProjectConfiguration)

    from meanflow.distributed import shared_gpu_backend
    from meanflow.runtime import process_device
    tc = cfg.train
    try:
        # the precision and accumulation that Accelerate will use, agreed with the launcher,
        # and recorded in the run's config.yaml as resolved
        tc.mixed_precision = resolve_precision(tc, process_device())
        tc.grad_accum = resolve_grad_accum(tc)
    except ConfigError as e:
        raise SetupError(e) from None
    # cpu=True when there is no GPU: Accelerate only sets up a multi-process (gloo) run on
    # CPU when told so; on GPUs it picks NCCL by itself, except where ranks share a GPU
    # (more processes on a node than GPUs), which NCCL refuses: gloo then.
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)]
    backend = shared_gpu_backend()
    if backend is not None:
        handlers.append(InitProcessGroupKwargs(backend=backend))
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=tc.mixed_precision,
                       gradient_accumulation_steps=tc.grad_accum,
                       log_with=None if tc.log_with == "none" else tc.log_with,
                       project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                           logging_dir=str(run_dir)),
                       kwargs_handlers=handlers)


def uses_channels_last(cfg: Config, device: torch.device) -> bool:
    return cfg.train.channels_last and device.type == "cuda" and cfg.model.name == "unet"


def prepare_training(accelerator, model: torch.nn.Module, cfg: Config):
    """(model, optimizer, EMA, forward model) placed on ``accelerator.device``.

    The order matters: the EMA copies the parameters AFTER ``accelerator.prepare`` has moved
    them, so its shadows live on the training device (built before, they stay on the CPU and
    the first update mixes devices). ``forward model`` is what the loss calls for the pass
    with gradients: the prepared model, or its torch.compile wrapper (train.compile).
    """
    from meanflow.training import EMA
    tc, device = cfg.train, accelerator.device
    if uses_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    fused = tc.fused_optimizer and device.type in ("cuda", "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                            weight_decay=tc.weight_decay, fused=fused or None)
    model, opt = accelerator.prepare(model, opt)
    ema = EMA(accelerator.unwrap_model(model), tc.ema_decays)
    forward_model = torch.compile(model) if tc.compile else model
    return model, opt, ema, forward_model


def per_process_batch(cfg: Config, accelerator) -> int:
    """``train.batch_size`` (the global batch) split over the processes, with the notes a
    launch deserves: one CPU thread per process where there are more cores, and r != t
    samples that do not split evenly over the processes (the slowest rank sets the pace)."""
    import math
    tc, world = cfg.train, accelerator.num_processes
    if tc.batch_size % world:
        raise SetupError(f"train.batch_size={tc.batch_size} is not divisible by the number "
                         f"of processes ({world})")
    spare = (os.cpu_count() or 1) // world
    if (accelerator.device.type == "cpu" and torch.get_num_threads() == 1 and spare > 1
            and accelerator.is_main_process):
        # `accelerate launch` without --cpu sets OMP_NUM_THREADS=1 when it is unset
        print(f"note: 1 thread per process on a CPU with {spare} cores per process "
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); pass "
              f"`accelerate launch --num_cpu_threads_per_process {spare}` (or set "
              f"OMP_NUM_THREADS) to use them", flush=True)
    n_neq = round(cfg.meanflow.ratio_r_neq_t * tc.batch_size)
    if world > 1 and n_neq and math.gcd(tc.batch_size, n_neq) % world:
        accelerator.print(
            f"note: {n_neq} r != t samples per batch of {tc.batch_size} cannot be split evenly "
            f"over {world} processes: their JVP batches differ by up to "
            f"{n_neq // math.gcd(tc.batch_size, n_neq)} samples and the slowest sets the pace "
            f"(choose train.batch_size and meanflow.ratio_r_neq_t so that gcd(batch, ratio x "
            f"batch) is a multiple of the process count)")
    return tc.batch_size // world
