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
import atexit
import csv
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from meanflow.config import Config, ConfigError, config_help, load_config, to_dict  # noqa: E402
from meanflow.objective import MeanFlowLoss, sample_times  # noqa: E402
from meanflow.runtime import seed_rng, tune_cpu_allocator  # noqa: E402
from meanflow.training import (COMPLETE, EMA, EXPORT_DIR, SeededItems,  # noqa: E402
                               ShardedEpochSampler, ckpt_name, export_config, export_model,
                               load_ema, lr_at, mix_seed, prune_checkpoints, save_ema)
from meanflow.rundir import (CheckpointError, RunLock, RunLockedError,  # noqa: E402
                             checkpoint_step, occupied, pick_checkpoint, save_failure_message,
                             set_aside, sync_export, verify_checkpoint, write_run_config)

# Test aids (the test suite uses them to inject faults at known points):
NAN_ENV = "MEANFLOW_INJECT_NAN_STEPS"    # comma-separated optimizer steps whose loss is NaN
KILL_ENV = "MEANFLOW_KILL_AFTER_STEP"    # hard exit (as if killed) once this step is done
GRID_FAIL_ENV = "MEANFLOW_FAIL_VALIDATION_GRID"   # "1": the validation grid raises (a decode error)
SAVE_FAILED = 4                          # exit code: a checkpoint could not be written


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


class Run:
    """Rank-0-only side effects (console, TensorBoard, CSV) behind one object."""

    def __init__(self, accelerator, run_dir: Path, enabled_tb: bool = True):
        self.acc = accelerator
        self.is_main = accelerator.is_main_process
        self.run_dir = run_dir
        self.tb = None
        self.csv_file = None
        if self.is_main and enabled_tb:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"))

    def print(self, *a) -> None:
        if self.is_main:
            print(*a, flush=True)

    def scalars(self, step: int, values: dict) -> None:
        if not self.is_main:
            return
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        path = self.run_dir / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", *values.keys()])
            w.writerow([step, *[f"{v:.6g}" for v in values.values()]])

    def image(self, step: int, tag: str, grid: Optional[torch.Tensor]) -> None:
        if self.is_main and grid is not None:           # None: the grid failed (reported)
            self.tb.add_image(tag, grid, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def build_data(cfg: Config, path: str):
    from meanflow.data import LMDBDataset
    # uint8 edges: a quarter of the bytes through worker shared memory and host-to-device
    # copies (the loader benchmark: 2x the samples/s of float32 edges); scaled on the device.
    return LMDBDataset(path, flip=cfg.data.flip, use_edges=cfg.data.use_edges,
                       use_labels=cfg.data.use_labels, edge_dtype=torch.uint8)


def batch_to(batch: dict, device, cfg: Config):
    x = batch["x"].to(device, non_blocking=True)
    edge = (batch["edge"].to(device, non_blocking=True).float().div_(255)
            if cfg.data.use_edges else None)
    label = batch["label"].to(device, non_blocking=True) if cfg.data.use_labels else None
    return x, edge, label


def global_draws(cfg: Config, loss_fn: MeanFlowLoss, at: tuple[int, int], x: torch.Tensor,
                 rank: int, has_cond: bool):
    """Noise, (r, t) and the condition-dropout mask of this rank's slice of the GLOBAL batch.

    Drawn for the whole global batch from a generator seeded by (seed, step, micro-step) and
    sliced by rank, so every sample's randomness is the same whatever the number of
    processes: 1 and N processes train the same model (up to float summation order).
    """
    tc = cfg.train
    g = torch.Generator().manual_seed(mix_seed(tc.seed, 3, *at))
    n, lo = x.shape[0], rank * x.shape[0]
    r, t = sample_times(cfg.meanflow, tc.batch_size, "cpu", g, cfg.meanflow.ratio_at(at[0]))
    noise = torch.randn((tc.batch_size, *x.shape[1:]), generator=g)
    keep = loss_fn.drop_mask(tc.batch_size, "cpu", has_cond, g)
    sl = slice(lo, lo + n)
    dev = x.device
    return (noise[sl].to(dev, x.dtype), r[sl].to(dev), t[sl].to(dev),
            None if keep is None else keep[sl].to(dev))


@torch.no_grad()
def validation_grid(model, ema: EMA, val: dict, cfg: Config, decoder) -> Optional[torch.Tensor]:
    """[3, H, W] grid, one row per validation sample: edge | ground truth | EMA 1-step | 2-step.

    A failure here (a decode error, say) costs the picture, not the run: it is reported in one
    line, None is returned, and the model gets its training weights back in every case (the
    grid samples with the EMA weights copied in)."""
    was_training = model.training
    backup = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        return _grid(model, ema, val, cfg, decoder)
    except Exception as e:  # noqa: BLE001 - any failure of a picture: report and go on
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"warning: the validation grid failed ({type(e).__name__}: {first}); no image "
              f"this time, training goes on", file=sys.stderr, flush=True)
        return None
    finally:
        for n, p in model.named_parameters():
            p.copy_(backup[n])
        model.train(was_training)


def _grid(model, ema: EMA, val: dict, cfg: Config, decoder) -> torch.Tensor:
    from meanflow.sampling import sample
    from torchvision.utils import make_grid

    ema.copy_to(model, 0)
    model.eval()
    if os.environ.get(GRID_FAIL_ENV) == "1":          # after the EMA swap: the worst moment
        raise RuntimeError(f"{GRID_FAIL_ENV}=1 (injected decode failure)")
    x, edge, label = val["x"], val["edge"], val["label"]
    cols = []
    if edge is not None:
        e = torch.nn.functional.interpolate(edge[:, :1], size=cfg.data.image_size, mode="nearest")
        cols.append(e.expand(-1, 3, -1, -1) * 2 - 1)
    cols.append(decoder(x))
    for steps in (1, 2):
        cols.append(decoder(sample(model, val["noise"], steps, edge=edge, label=label)))
    tiles = torch.stack(cols, 1).flatten(0, 1)          # [N * cols, 3, H, W] row-major
    return make_grid(tiles.float().clamp(-1, 1) * 0.5 + 0.5, nrow=len(cols), padding=1)


def all_ok(accelerator, ok: bool) -> bool:
    """True when ``ok`` holds on every process (a collective: call it on every rank)."""
    flag = torch.tensor(float(not ok), device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tune_cpu_allocator()

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    tc = cfg.train
    run_dir = Path(args.run_dir or ROOT / "runs" / Path(args.config).stem)
    # cpu=True when there is no GPU: Accelerate only sets up a multi-process (gloo) run on
    # CPU when told so; on GPUs it picks NCCL by itself.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision=tc.mixed_precision,
                              gradient_accumulation_steps=tc.grad_accum,
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  broadcast_buffers=False)])
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if tc.batch_size % world:
        print(f"error: train.batch_size={tc.batch_size} is not divisible by the number of "
              f"processes ({world})", file=sys.stderr)
        return 2
    per_rank = tc.batch_size // world
    spare = (os.cpu_count() or 1) // world
    if device.type == "cpu" and torch.get_num_threads() == 1 and spare > 1 and rank == 0:
        # `accelerate launch` without --cpu sets OMP_NUM_THREADS=1 when it is unset
        print(f"note: 1 thread per process on a CPU with {spare} cores per process "
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); pass "
              f"`accelerate launch --num_cpu_threads_per_process {spare}` (or set "
              f"OMP_NUM_THREADS) to use them", flush=True)

    # ---- data (metadata read before any worker forks; environments open lazily) ----------
    # The validation set is checked here too: a mismatch found at the first image step would
    # cost every step since the last checkpoint.
    from meanflow.data import check_compatible
    data = val_data = missing = None
    try:
        data = build_data(cfg, cfg.data.path)
        check_compatible(data.meta, cfg.data, cfg.model)
        val_data = build_data(cfg, cfg.data.val_path or cfg.data.path)
        if cfg.data.val_path:
            try:
                check_compatible(val_data.meta, cfg.data, cfg.model)
            except ValueError as e:
                raise ValueError(f"data.val_path={cfg.data.val_path}: {e}") from None
    except FileNotFoundError as e:
        if not args.dry_run:
            print(f"error: {e}", file=sys.stderr)
            return 2
        missing = str(e)                 # a dry run checks a config before the data exists
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import models
    torch.manual_seed(tc.seed)                                  # identical init on every rank
    model = models.build(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    if args.dry_run:
        if accelerator.is_main_process:
            import yaml
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            print(f"model {cfg.model.name}: {n_params / 1e6:.2f}M parameters")
            if missing is not None:
                print(f"dataset: MISSING ({missing}); the config and model above are valid")
            else:
                print(f"dataset {cfg.data.path}: {len(data)} records; {world} process(es), "
                      f"{per_rank} per process x {tc.grad_accum} accumulation")
        return 0

    # ---- the run folder: one trainer at a time; never overwrite a run by accident ----------
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    problem = None
    if accelerator.is_main_process:
        lock = RunLock(run_dir)
        try:
            note = lock.acquire()
            if note:
                print(note, file=sys.stderr, flush=True)
            atexit.register(lock.release)
        except RunLockedError as e:
            problem = str(e)
        if problem is None and args.resume == "none" and occupied(run_dir):
            problem = (f"--resume none into {run_dir}, which holds "
                       f"{', '.join(occupied(run_dir))}: training afresh there would overwrite "
                       f"its export and prune its checkpoints. Pass a new --run-dir to start "
                       f"over (or --resume auto to continue this run)")
    if not all_ok(accelerator, problem is None):
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    run = Run(accelerator, run_dir)
    if accelerator.is_main_process:
        write_run_config(run_dir, cfg, run.print)

    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                            weight_decay=tc.weight_decay)
    ema = EMA(model, tc.ema_decays)
    model, opt = accelerator.prepare(model, opt)
    loss_fn = MeanFlowLoss(cfg.meanflow)

    # ---- resume ---------------------------------------------------------------------------
    step, trained_s = 0, 0.0       # trained_s: training wall time of earlier sessions of this run
    if args.resume != "none":
        # every file of the checkpoint is opened before anything is loaded: a truncated or
        # refused file makes --resume auto fall back to the previous checkpoint (one warning
        # each), and an explicit --resume PATH stop with one line naming the file
        try:
            if args.resume == "auto":
                path, skipped = pick_checkpoint(ckpt_dir, run.print)
            else:
                path, skipped = Path(args.resume), []
                if not (path / COMPLETE).is_file():
                    raise CheckpointError(f"{path} is not a complete checkpoint")
                verify_checkpoint(path)
            if path is not None:
                accelerator.load_state(str(path))
                load_ema(path, ema)
        except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        accelerator.wait_for_everyone()          # every rank has read them: now move them
        if accelerator.is_main_process:
            set_aside(skipped, run.print)
        if path is not None:
            step, trained_s = checkpoint_step(path)
            run.print(f"resumed from {path} at step {step} ({trained_s / 60:.1f} min trained)")
            if accelerator.is_main_process:
                note = sync_export(run_dir, path)        # export/ = this checkpoint's EMA 0
                if note:
                    run.print(note)
    # train.max_minutes is a budget for the whole run, resumes included: a finished run
    # started again does nothing (so scripts can re-run it to reuse what is done).
    budget_s = 60 * tc.max_minutes if tc.max_minutes > 0 else math.inf
    if step >= tc.max_steps or trained_s >= budget_s:
        run.print(f"nothing to do: the run is complete at step {step} ({trained_s / 60:.1f} "
                  f"min of train.max_minutes={tc.max_minutes}, train.max_steps={tc.max_steps})")
        run.close()
        accelerator.end_training()
        return 0

    sampler = ShardedEpochSampler(len(data), per_rank, rank, world, tc.seed,
                                  start_batch=step * tc.grad_accum)
    loader = torch.utils.data.DataLoader(
        SeededItems(data, tc.seed), batch_size=per_rank, sampler=sampler,
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=cfg.data.num_workers > 0)

    # ---- fixed validation batch (same on every rank; used by rank 0 only) ------------------
    val_data.flip = False
    n_val = min(tc.num_val, len(val_data))
    val_items = [val_data[i] for i in range(n_val)]
    vb = torch.utils.data.default_collate(val_items)
    vx, vedge, vlabel = batch_to(vb, device, cfg)
    g = torch.Generator().manual_seed(mix_seed(tc.seed, 11))
    val = dict(x=vx, edge=vedge, label=vlabel,
               noise=torch.randn(vx.shape, generator=g).to(device))
    from meanflow.codec import make_decoder
    decoder = make_decoder(data.meta, device) if accelerator.is_main_process else None

    # ---- signals: finish the current step, checkpoint, exit ---------------------------------
    stop = {"flag": False, "why": ""}

    def on_signal(signum, _frame):
        stop["flag"], stop["why"] = True, signal.Signals(signum).name
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)

    def save_checkpoint(at: int) -> None:
        accelerator.wait_for_everyone()
        final = ckpt_dir / ckpt_name(at)
        tmp = ckpt_dir / (ckpt_name(at) + ".tmp")
        failure = None
        # no collective inside the try: a rank that fails must not leave the others waiting
        # (save_state makes the folder on every rank and has no barrier of its own here)
        try:
            accelerator.save_state(str(tmp), safe_serialization=True)
            if accelerator.is_main_process:
                # the EMAs in safetensors, and the export's config: evaluate.py takes a
                # checkpoint as it takes an export (its weights: the first EMA)
                save_ema(tmp, ema)
                export_config(tmp, cfg, data.meta, at, tc.ema_decays[0])
                (tmp / COMPLETE).write_text(f"{at} {trained_s + time.time() - t_start:.3f}\n")
                # the export before the rename: a kill in between leaves the export ahead of
                # the checkpoints, and a restart re-creates it from the one it resumes
                export_model(run_dir / EXPORT_DIR, _ema_model(), cfg, data.meta, at,
                             tc.ema_decays[0])
        except Exception as e:  # noqa: BLE001 - disk full, quota, read-only: all one line
            failure = e
        if not all_ok(accelerator, failure is None):     # every rank stops together
            if accelerator.is_main_process:
                import shutil
                shutil.rmtree(tmp, ignore_errors=True)   # give the space back
                if progress is not None:
                    progress.close()                     # the error on a line of its own
                print(save_failure_message(ckpt_dir, at, failure), file=sys.stderr, flush=True)
            raise SystemExit(SAVE_FAILED)
        if accelerator.is_main_process:
            if final.exists():
                import shutil
                shutil.rmtree(final)
            os.replace(tmp, final)                       # atomic: never half-written
            prune_checkpoints(ckpt_dir, tc.keep_checkpoints)
        accelerator.wait_for_everyone()

    def _ema_model():
        net = models.build(cfg.model)
        net.load_state_dict(accelerator.unwrap_model(model).state_dict())
        ema.copy_to(net, 0)
        return net

    nan_steps = {int(s) for s in os.environ.get(NAN_ENV, "").split(",") if s.strip()}
    bad_streak, skipped, t_start, t_last, seen = 0, 0, time.time(), time.time(), 0
    progress = None
    if accelerator.is_main_process:
        from tqdm import tqdm
        progress = tqdm(total=tc.max_steps, initial=step, desc="train", dynamic_ncols=True)
    run.print(f"{n_params / 1e6:.2f}M parameters; {len(data)} records; {world} process(es) "
              f"x {per_rank} x {tc.grad_accum} accumulation; device {device}")

    # ---- the loop ---------------------------------------------------------------------------
    model.train()
    it = iter(loader)
    stats_sum: dict = {}
    exit_code = 0
    while step < tc.max_steps:
        bad = torch.zeros((), device=device)
        for micro in range(tc.grad_accum):
            batch = next(it)
            x, edge, label = batch_to(batch, device, cfg)
            noise, r, t, keep = global_draws(cfg, loss_fn, (step, micro), x, rank, edge is not None
                                             or label is not None)
            seed_rng(mix_seed(tc.seed, rank, step, micro), device)   # dropout
            with accelerator.accumulate(model):
                out = loss_fn(model, x, edge, label, noise=noise, r=r, t=t, keep=keep)
                loss = out.loss
                if step in nan_steps:
                    loss = loss * float("nan")
                bad += (~torch.isfinite(loss)).float()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    bad = accelerator.reduce(bad, reduction="sum")       # every rank agrees
                    gnorm = (accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                             if tc.grad_clip > 0 else torch.zeros((), device=device))
                    if bad.item() == 0 and torch.isfinite(torch.as_tensor(gnorm)):
                        for grp in opt.param_groups:
                            grp["lr"] = lr_at(step, tc.lr, tc.warmup_steps, tc.max_steps,
                                              tc.schedule)
                        opt.step()
                    opt.zero_grad(set_to_none=True)
            for k, v in out.stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v) / tc.grad_accum
        seen += tc.batch_size * tc.grad_accum

        if bad.item() > 0 or not math.isfinite(float(gnorm)):
            bad_streak += 1
            skipped += 1
            run.print(f"step {step}: non-finite loss or gradient, update skipped "
                      f"({bad_streak} in a row)")
            run.scalars(step, {"train/skipped_steps": skipped})
            stats_sum = {}
            if bad_streak >= tc.max_nonfinite:
                run.print(f"error: {bad_streak} consecutive non-finite steps (train."
                          f"max_nonfinite); stopping. The last good checkpoint is intact.")
                exit_code = 3
                break
            step += 1          # the step is consumed (data and seeds move on), not applied
            continue
        bad_streak = 0
        ema.update(accelerator.unwrap_model(model), step)
        step += 1
        if progress is not None:
            progress.update(1)

        if step % tc.log_every == 0 or step == tc.max_steps:
            now = time.time()
            vals = {f"train/{k}": v / tc.log_every for k, v in stats_sum.items()}
            vals.update({"train/grad_norm": float(gnorm), "train/lr": opt.param_groups[0]["lr"],
                         "train/samples_per_s": seen / max(now - t_last, 1e-9),
                         "train/skipped_steps": skipped})
            run.scalars(step, vals)
            if progress is not None:
                progress.set_postfix(loss=f"{vals.get('train/loss', 0):.3f}",
                                     mse=f"{vals.get('train/mse', 0):.4f}")
            stats_sum, seen, t_last = {}, 0, now
        if accelerator.is_main_process and (step % tc.image_every == 0 or step == tc.max_steps):
            grid = validation_grid(accelerator.unwrap_model(model), ema, val, cfg, decoder)
            run.image(step, "val/edge_gt_ema1_ema2", grid)
        # stop conditions every rank agrees on (signals, wall-clock budget)
        flag = torch.tensor(float(stop["flag"] or
                                  trained_s + time.time() - t_start > budget_s), device=device)
        flag = accelerator.reduce(flag, reduction="sum")
        if step % tc.ckpt_every == 0 or step == tc.max_steps or flag.item() > 0:
            save_checkpoint(step)
        if flag.item() > 0:
            why = stop["why"] or "train.max_minutes reached"
            run.print(f"stopping at step {step} ({why}); checkpoint saved in {ckpt_dir}")
            break
        if os.environ.get(KILL_ENV) == str(step):
            os._exit(137)

    if progress is not None:
        progress.close()
    run.close()
    if accelerator.is_main_process:
        lock.release()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
