"""Train a MeanFlow model (U-Net or SiT backbone) on an LMDB written by preprocess/cache.py.

    accelerate launch train.py --config configs/afhq_unet.yaml --run-dir runs/afhq_unet [key=value ...]
    accelerate launch --multi_gpu --num_processes 8 train.py --config configs/afhq_sit_b2.yaml
    torchrun --nproc_per_node 2 train.py --config configs/fashion_demo.yaml
    python train.py --config configs/fashion_demo.yaml --dry-run

Runs the same on one CPU, one GPU or many (gloo on CPU, NCCL on GPU). ``train.batch_size`` is
the GLOBAL batch of one forward pass, split over the processes, so results do not depend on
the process count. A restart resumes from the latest complete checkpoint of the run
directory (``--resume auto``, the default) with the same data order and random draws as an
uninterrupted run. SIGTERM / SIGINT save a checkpoint and exit cleanly.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from meanflow.config import Config, ConfigError, config_help, load_config, to_dict  # noqa: E402
from meanflow.distributed import TrainProgress, shutdown  # noqa: E402
from meanflow.health import FaultHooks, Health, StopRequest  # noqa: E402
from meanflow.launch import (SetupError, make_accelerator, per_process_batch,  # noqa: E402
                             prepare_training, resolve_paths, set_backend_flags,
                             uses_channels_last)
from meanflow.objective import MeanFlowLoss  # noqa: E402
from meanflow.rundir import RunFolder  # noqa: E402
from meanflow.runtime import die_with_launcher, tune_cpu_allocator  # noqa: E402
from meanflow.step import train_step  # noqa: E402
from meanflow.tracking import Throughput, Tracker, step_scalars  # noqa: E402
from meanflow.training import EMA, Meter, training_loader  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=config_help(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML file in configs/")
    ap.add_argument("--run-dir", default=None,
                    help="output folder (default runs/<config name>)")
    ap.add_argument("--resume", default="auto",
                    help="'auto' (latest loadable checkpoint in the run dir, if any), 'none' "
                         "(start afresh: only into a run dir without checkpoints), or a "
                         "checkpoint folder")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the resolved config, parameter count and dataset size; exit "
                         "(works before the dataset is cached)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lr=3e-4")
    return ap.parse_args(argv)


def main(argv=None, hooks: Optional[FaultHooks] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_paths(load_config(args.config, args.overrides))
        hooks = FaultHooks.from_env() if hooks is None else hooks
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tune_cpu_allocator()
    die_with_launcher()
    try:
        return train(args, cfg, hooks)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()                 # every exit path: no process group is left up


@dataclass
class Trainer:
    """What the loop works with, built once by ``build``."""

    acc: Any
    cfg: Config
    run: RunFolder
    data: Any
    val_data: Any
    model: Any                      # the prepared (possibly DDP-wrapped) model
    forward_model: Any              # what the loss's gradient pass calls (compiled or not)
    opt: Any
    ema: EMA
    # main process: THE network holding EMA 0 for grids and exports (``ema_network``)
    ema_net: Optional[torch.nn.Module]
    loss_fn: MeanFlowLoss
    clock: Callable[[], float]      # train.budget_clock: time.time or time.process_time
    trained_s: float = 0.0          # training time of earlier sessions of this run
    t_start: float = 0.0            # this session's start on ``clock``

    def trained(self) -> float:
        return self.trained_s + self.clock() - self.t_start

    def ema_network(self) -> torch.nn.Module:
        return self.ema.fill(self.ema_net, self.acc.unwrap_model(self.model))

    def print(self, *a) -> None:
        if self.acc.is_main_process:
            print(*a, flush=True)


def build(args, cfg: Config) -> Optional[Trainer]:
    """Everything before the first step: the accelerator, the data checked against the
    config, the model, the run folder claimed, warm start and teacher, optimizer and EMA.
    Returns None after a dry run; raises SetupError on bad input."""
    import models
    from meanflow.data import open_training_data
    tc = cfg.train
    run_dir = Path(args.run_dir or ROOT / "runs" / Path(args.config).stem)
    acc = make_accelerator(cfg, run_dir)
    set_backend_flags(tc, acc.device)
    per_rank = per_process_batch(cfg, acc)
    missing = None
    try:
        data, val_data, filled = open_training_data(cfg)   # shape keys left out: the data's
        if filled:
            acc.print(f"from the dataset's metadata: {', '.join(filled)}")
    except FileNotFoundError as e:
        if not args.dry_run:
            raise SetupError(e) from None
        missing = str(e)                 # a dry run checks a config before the data exists
    except ValueError as e:
        raise SetupError(e) from None
    torch.manual_seed(tc.seed)                                  # identical init on every rank
    try:
        model = models.build(cfg.model)
    except ValueError as e:              # a shape the backbone cannot take
        raise SetupError(f"model.* ({cfg.model.name}): {e}") from None
    if args.dry_run:
        if acc.is_main_process:
            import yaml
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            print(f"model {cfg.model.name}: "
                  f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
            from meanflow.data import SHAPE_KEYS
            later = [k for k in SHAPE_KEYS if cfg.given is not None and k not in cfg.given]
            print(f"dataset: MISSING ({missing}); the config and model above are valid"
                  + (f" (left out, so the dataset's once it exists: {', '.join(later)})"
                     if later else "")
                  if missing else
                  f"dataset {cfg.data.path}: {len(data)} records; {acc.num_processes} "
                  f"process(es), {per_rank} per process x {tc.grad_accum} accumulation")
        return None

    run = RunFolder(run_dir, acc)
    run.claim(args.resume)      # RUN/config.yaml is written once the resume has succeeded
    if tc.init_from and run.latest() is None:
        from meanflow.warmstart import WarmStartError, init_from
        try:
            acc.print(init_from(model, tc.init_from, tc.init_weights, to_dict(cfg.model)))
        except WarmStartError as e:
            raise SetupError(e) from None
    teacher = None
    if cfg.meanflow.teacher:
        from meanflow.export import load_model
        try:
            teacher, _ = load_model(cfg.meanflow.teacher, acc.device)
        except (FileNotFoundError, ValueError) as e:
            raise SetupError(f"meanflow.teacher: {e}") from None
        teacher.requires_grad_(False)
    model, opt, ema, forward_model = prepare_training(acc, model, cfg)
    return Trainer(acc, cfg, run, data, val_data, model, forward_model, opt, ema,
                   ema_net=(models.build(cfg.model).to(acc.device).eval()
                            if acc.is_main_process else None),
                   # input values are checked on the first step (each check waits for the
                   # device), then only under train.debug_checks
                   loss_fn=MeanFlowLoss(cfg.meanflow, check_values=True, teacher=teacher),
                   clock=time.process_time if tc.budget_clock == "cpu" else time.time)


def train(args, cfg: Config, hooks: FaultHooks) -> int:
    from meanflow.validation import grid_decoder, validation_batch, validation_grid
    tr = build(args, cfg)
    if tr is None:                                     # --dry-run
        return 0
    tc, acc, run, device = cfg.train, tr.acc, tr.run, tr.acc.device
    step, tr.trained_s = run.resume(args.resume, tr.model, tr.ema, cfg)
    tracker = Tracker(acc, run.path)
    try:
        tracker.start(cfg)
    except ConfigError as e:
        raise SetupError(e) from None
    # train.max_minutes is a budget for the whole run, resumes included: a finished run
    # started again does nothing (so scripts can re-run it to reuse what is done).
    budget_s = 60 * tc.max_minutes if tc.max_minutes > 0 else math.inf
    if step >= tc.max_steps or tr.trained_s >= budget_s:
        tr.print(f"nothing to do: the run is complete at step {step} ({tr.trained_s / 60:.1f} "
                 f"min of train.max_minutes={tc.max_minutes}, train.max_steps={tc.max_steps})")
        acc.end_training()
        return 0
    rank, world = acc.process_index, acc.num_processes
    per_rank = tc.batch_size // world
    it = iter(training_loader(tr.data, cfg, per_rank, rank, world, step, device))
    val = validation_batch(cfg, tr.val_data, device)
    try:
        decoder = grid_decoder(acc, tr.data.meta)
    except ValueError as e:
        raise SetupError(e) from None
    stop, health, meter = StopRequest(), Health(device), Meter()
    fp16, channels_last = tc.mixed_precision == "fp16", uses_channels_last(cfg, device)
    progress = (TrainProgress(step, tc.max_steps, budget_s, tr.trained)
                if acc.is_main_process else None)
    n_params = sum(p.numel() for p in tr.model.parameters())
    tr.print(f"{n_params / 1e6:.2f}M parameters; {len(tr.data)} records; {world} process(es) "
             f"x {per_rank} x {tc.grad_accum} accumulation; device {device}, precision "
             f"{tc.mixed_precision}")

    def save(at: int) -> None:
        run.save(at, ema=tr.ema, export_net=tr.ema_network, cfg=cfg, meta=tr.data.meta,
                 trained_s=tr.trained(), before_error=progress and progress.close)

    # ---- the loop: nothing in a step reads a device tensor on the host; the run's state is
    # read at sync points (every train.sync_every steps, and at logging and checkpoint steps)
    tr.t_start, exit_code, speed = tr.clock(), 0, Throughput()
    tr.model.train()
    while step < tc.max_steps:
        batches = [next(it) for _ in range(tc.grad_accum)]
        ok, nonfinite, gnorm, stats = train_step(
            tr.model, tr.forward_model, tr.opt, tr.ema, tr.loss_fn, batches, step,
            accelerator=acc, cfg=cfg, world=world, rank=rank, fp16=fp16,
            channels_last=channels_last, nan=hooks.nan(step))
        tr.loss_fn.check_values = tc.debug_checks
        meter.add(stats, ok)
        health.add(step, nonfinite)
        speed.add(tc.batch_size * tc.grad_accum)
        step += 1            # a skipped step is consumed (data and seeds move on), not applied
        if progress is not None:
            progress.update(step)
        log_now = step % tc.log_every == 0 or step == tc.max_steps
        ckpt_now = step % tc.ckpt_every == 0 or step == tc.max_steps
        if log_now or ckpt_now or step % tc.sync_every == 0:
            state = health.sync(acc, stop, tr.trained() > budget_s)
            for at in state.bad_steps:
                tr.print(f"step {at}: non-finite loss or gradient, update skipped")
            if state.streak >= tc.max_nonfinite:
                tr.print(run.nonfinite_stop_message(state.streak, tc.max_nonfinite))
                exit_code = 3
                break
            if log_now:
                tracker.log(step, step_scalars(meter.read(), gnorm, tr.opt, state.skipped,
                                               speed.read(), device))
            if acc.is_main_process and (step % tc.image_every == 0 or step == tc.max_steps):
                tracker.image(step, "val/edge_gt_ema1_ema2",
                              validation_grid(tr.ema_network(), val, cfg, decoder,
                                              fail=hooks.grid_fails))
            if ckpt_now or state.stopping:
                save(step)
            if state.stopping:
                tr.print(f"stopping at step {step} ({stop.why or 'train.max_minutes reached'})"
                         f"; checkpoint saved in {run.ckpt_dir}")
                break
        hooks.after_step(step)

    if progress is not None:
        progress.close()
    run.release()
    acc.wait_for_everyone()
    acc.end_training()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
