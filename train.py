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
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from meanflow.config import Config, ConfigError, config_help, load_config, to_dict  # noqa: E402
from meanflow.objective import MeanFlowLoss  # noqa: E402
from meanflow.step import batch_to, train_step  # noqa: E402
from meanflow.runtime import (Stream, die_with_launcher, seed_rng, stream_seed,  # noqa: E402
                              tune_cpu_allocator)
from meanflow.distributed import TrainProgress, all_ok, shutdown  # noqa: E402
from meanflow.launch import (SetupError, check_shared_run_dir, make_accelerator,  # noqa: E402
                             resolve_paths, set_backend_flags)
from meanflow.training import (EMA, EXPORT_DIR, CheckpointError, Meter,  # noqa: E402
                               SeededItems, ShardedEpochSampler, checkpoint_step, ckpt_name,
                               export_config, export_model, is_complete, list_checkpoints,
                               load_ema, mark_complete, prune_checkpoints,
                               save_ema)
from meanflow.rundir import (RunLock, RunLockedError, check_model_fits, occupied,  # noqa: E402
                             pick_checkpoint, save_failure_message, set_aside, sync_export,
                             verify_checkpoint, write_run_config)

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


def build_data(cfg: Config, path: str):
    from meanflow.data import LMDBDataset
    # uint8 edges: a quarter of the bytes through worker shared memory and host-to-device
    # copies (the loader benchmark: 2x the samples/s of float32 edges); scaled on the device.
    return LMDBDataset(path, flip=cfg.data.flip, use_edges=cfg.data.use_edges,
                       use_labels=cfg.data.use_labels, edge_dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# Model, optimizer, EMA
# --------------------------------------------------------------------------------------------
def uses_channels_last(cfg: Config, device: torch.device) -> bool:
    return cfg.train.channels_last and device.type == "cuda" and cfg.model.name == "unet"


def prepare_training(accelerator, model: torch.nn.Module, cfg: Config):
    """(model, optimizer, EMA, forward model) placed on ``accelerator.device``.

    The order matters: the EMA copies the parameters AFTER ``accelerator.prepare`` has moved
    them, so its shadows live on the training device (built before, they stay on the CPU and
    the first update mixes devices). ``forward model`` is what the loss calls for the pass
    with gradients: the prepared model, or its torch.compile wrapper (train.compile).
    """
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


# --------------------------------------------------------------------------------------------
# Test aids, read once: the suite injects faults at known points through the environment
# --------------------------------------------------------------------------------------------
NAN_ENV = "MEANFLOW_INJECT_NAN_STEPS"    # comma-separated optimizer steps whose loss is NaN
KILL_ENV = "MEANFLOW_KILL_AFTER_STEP"    # hard exit (as if killed) once this step is done
GRID_FAIL_ENV = "MEANFLOW_FAIL_VALIDATION_GRID"   # "1": the validation grid raises


class FaultHooks:
    """The test suite's fault injection, in one place: nothing else reads these variables."""

    def __init__(self, env=os.environ):
        self.nan_steps = {int(s) for s in env.get(NAN_ENV, "").split(",") if s.strip()}
        kill = env.get(KILL_ENV, "").strip()
        self.kill_after = int(kill) if kill else None
        self.grid_fails = env.get(GRID_FAIL_ENV) == "1"

    def nan(self, step: int) -> bool:
        return step in self.nan_steps

    def after_step(self, step: int) -> None:
        if step == self.kill_after:
            os._exit(137)


# --------------------------------------------------------------------------------------------
# Images, logging, checkpoints
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def validation_grid(ema_model, val: dict, cfg: Config, decoder, fail: bool = False
                    ) -> Optional[np.ndarray]:
    """uint8 [H, W, 3] grid, one row per validation sample: edge | ground truth | EMA 1-step |
    2-step, sampled with ``ema_model`` (the run's one EMA network, see ``Session``).

    A failure here (a decode error, say) costs the picture, not the run: it is reported in one
    line and None is returned; the training weights are never touched."""
    from meanflow.images import tile_grid, to_uint8
    from meanflow.sampling import sample
    try:
        if fail:
            raise RuntimeError(f"{GRID_FAIL_ENV}=1 (injected decode failure)")
        x, edge, label = val["x"], val["edge"], val["label"]
        cols = []
        if edge is not None:
            e = torch.nn.functional.interpolate(edge[:, :1], size=cfg.data.image_size,
                                                mode="nearest")
            cols.append(e.expand(-1, 3, -1, -1) * 2 - 1)
        cols.append(decoder(x))
        for steps in (1, 2):
            cols.append(decoder(sample(ema_model, val["noise"], steps, edge=edge, label=label)))
        images = [to_uint8(c.float()) for c in cols]          # [N, H, W, C] each
        return tile_grid([[col[i] for col in images] for i in range(len(x))], pad=1)
    except Exception as e:  # noqa: BLE001 - any failure of a picture: report and go on
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"warning: the validation grid failed ({type(e).__name__}: {first}); no image "
              f"this time, training goes on", file=sys.stderr, flush=True)
        return None


def start_trackers(accelerator, cfg: Config, run_dir: Path) -> None:
    """Accelerate's trackers (``train.log_with``), started on the main process: TensorBoard
    in RUN/tb, or W&B / MLflow / Aim / Comet under their own settings (their environment
    variables). A tracker whose package is missing is an error here, not a silent no-op."""
    if cfg.train.log_with == "none":
        return
    from accelerate.tracking import get_available_trackers
    if cfg.train.log_with not in map(str, get_available_trackers()):
        raise ConfigError(f"train.log_with={cfg.train.log_with}: its package is not installed "
                          f"(pip install {cfg.train.log_with.replace('_', '-')})")
    flat = {}

    def walk(prefix: str, d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:          # hparams take scalars and strings only
                flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    walk("", to_dict(cfg))
    # TensorBoard: RUN/tb (the name is its subfolder); the others: a project named after the
    # run folder
    accelerator.init_trackers("tb" if cfg.train.log_with == "tensorboard" else run_dir.name,
                              config=flat)


@dataclass
class Session:
    """What the loop's helpers share, built once by ``main``."""

    accelerator: Any
    cfg: Config
    run_dir: Path
    meta: dict
    model: Any                      # the prepared (possibly DDP-wrapped) model
    ema: EMA
    ema_model: Optional[torch.nn.Module]   # main process: THE network holding EMA 0 for grids
    #                                        and exports, refreshed by ``ema_weights``
    clock: Callable[[], float]      # train.budget_clock: time.time or time.process_time
    opt: Any = None
    forward_model: Any = None       # the model the loss's gradient pass calls (compiled or not)
    loss_fn: Optional[MeanFlowLoss] = None
    data: Any = None
    val_data: Any = None
    n_params: int = 0
    lock: Optional[RunLock] = None
    trained_s: float = 0.0          # training time of earlier sessions of this run
    t_start: float = 0.0            # this session's start on ``clock``
    progress: Any = None            # tqdm on the main process
    csv_header: Optional[list] = None

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def trained(self) -> float:
        return self.trained_s + self.clock() - self.t_start

    def print(self, *a) -> None:
        if self.accelerator.is_main_process:
            print(*a, flush=True)


def ema_weights(sess: Session) -> torch.nn.Module:
    """The main process's EMA network, brought up to date: the live model's buffers, EMA 0
    over the parameters."""
    net = sess.ema_model
    net.load_state_dict(sess.accelerator.unwrap_model(sess.model).state_dict())
    sess.ema.copy_to(net, 0)
    return net


def log(sess: Session, step: int, values: dict) -> None:
    """Scalars to the trackers and to RUN/metrics.csv (one row per logging step; a resumed
    run keeps the file's columns)."""
    acc = sess.accelerator
    acc.log(values, step=step)
    if not acc.is_main_process:
        return
    path = sess.run_dir / "metrics.csv"
    if sess.csv_header is None and path.exists():
        with open(path, newline="") as f:
            sess.csv_header = next(csv.reader(f), None)
    new = sess.csv_header is None
    if new:
        sess.csv_header = ["step", *values]
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, sess.csv_header, restval="", extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({"step": step, **{k: f"{v:.6g}" for k, v in values.items()}})


def log_image(sess: Session, step: int, tag: str, grid: Optional[np.ndarray]) -> None:
    """One uint8 [H, W, 3] image to every tracker that takes images (None: nothing)."""
    if grid is None or not sess.accelerator.is_main_process:
        return
    for tracker in sess.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, grid, step, dataformats="HWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [grid]}, step=step)


def save_checkpoint(sess: Session, step: int) -> None:
    """RUN/checkpoints/step_N, written as step_N.tmp and renamed complete: accelerate's state
    (model, optimizer, RNG), the EMAs in safetensors, the export config and the COMPLETE
    marker (step, training seconds); RUN/export is refreshed before the rename. On a failure
    on any process (disk full, quota) every process exits with SAVE_FAILED, and the previous
    checkpoint is left as it was."""
    acc, cfg = sess.accelerator, sess.cfg
    acc.wait_for_everyone()
    final = sess.ckpt_dir / ckpt_name(step)
    tmp = sess.ckpt_dir / (ckpt_name(step) + ".tmp")
    failure = None
    # no collective inside the try: a rank that fails must not leave the others waiting
    # (save_state makes the folder on every rank and has no barrier of its own here)
    try:
        acc.save_state(str(tmp), safe_serialization=True)
        if acc.is_main_process:
            # the EMAs in safetensors, and the export's config: evaluate.py takes a checkpoint
            # as it takes an export (its weights: the first EMA)
            save_ema(tmp, sess.ema)
            export_config(tmp, cfg, sess.meta, step, cfg.train.ema_decays[0])
            mark_complete(tmp, step, sess.trained())
            # the export before the rename: a kill in between leaves the export ahead of the
            # checkpoints, and a restart re-creates it from the one it resumes
            export_model(sess.run_dir / EXPORT_DIR, ema_weights(sess), cfg, sess.meta, step,
                         cfg.train.ema_decays[0])
    except Exception as e:  # noqa: BLE001 - disk full, quota, read-only: all one line
        failure = e
    if not all_ok(acc, failure is None):             # every rank stops together
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)   # give the space back
            if sess.progress is not None:
                sess.progress.close()                # the error on a line of its own
            print(save_failure_message(sess.ckpt_dir, step, failure), file=sys.stderr,
                  flush=True)
        raise SystemExit(SAVE_FAILED)
    if acc.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)                       # atomic: never half-written
        prune_checkpoints(sess.ckpt_dir, cfg.train.keep_checkpoints)
    acc.wait_for_everyone()


class StopRequest:
    """SIGTERM / SIGINT: finish the current step, checkpoint, exit 0."""

    def __init__(self):
        self.why = ""
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.why = signal.Signals(signum).name


class Health:
    """Non-finite steps, counted on the device and read at sync points only."""

    def __init__(self, device):
        self.streak = torch.zeros((), device=device)     # consecutive non-finite steps
        self.skipped = torch.zeros((), device=device)
        self.pending: list = []                          # (step, nonfinite) since last read

    def add(self, step: int, nonfinite: torch.Tensor) -> None:
        self.streak = (self.streak + 1) * nonfinite
        self.skipped = self.skipped + nonfinite
        self.pending.append((step, nonfinite))


def sync_point(sess: Session, health: Health, stop: StopRequest, budget_s: float) -> dict:
    """The run's state, the same on every process: one host read (and one all-reduce)."""
    acc = sess.accelerator
    device = acc.device
    state = torch.stack([torch.tensor(float(bool(stop.why)), device=device),
                         torch.tensor(float(sess.trained() > budget_s), device=device),
                         health.streak, health.skipped,
                         *[nf.float() for _, nf in health.pending]])
    if acc.num_processes > 1:
        torch.distributed.all_reduce(state, op=torch.distributed.ReduceOp.MAX)
    signalled, over_budget, streak, skipped, *bad = state.tolist()
    bad_steps = [at for (at, _), b in zip(health.pending, bad) if b]
    health.pending = []
    return dict(stopping=signalled > 0 or over_budget > 0, streak=int(streak),
                skipped=int(skipped), bad_steps=bad_steps)


# --------------------------------------------------------------------------------------------
# The entry point: set-up, resume, the loop
# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_paths(load_config(args.config, args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tune_cpu_allocator()
    die_with_launcher()
    try:
        return run_training(args, cfg)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()                 # every exit path: no process group is left up


def load_data(cfg: Config, dry_run: bool):
    """(train set, validation set, why missing): both checked against the config before any
    step (a mismatch found at the first image step would cost every step until then)."""
    from meanflow.data import check_compatible
    try:
        data = build_data(cfg, cfg.data.path)
        check_compatible(data.meta, cfg.data, cfg.model)
        val_data = build_data(cfg, cfg.data.val_path or cfg.data.path)
        if cfg.data.val_path:
            try:
                check_compatible(val_data.meta, cfg.data, cfg.model)
            except ValueError as e:
                raise ValueError(f"data.val_path={cfg.data.val_path}: {e}") from None
        return data, val_data, None
    except FileNotFoundError as e:
        if not dry_run:
            raise SetupError(e) from None
        return None, None, str(e)        # a dry run checks a config before the data exists
    except ValueError as e:
        raise SetupError(e) from None


def claim_run_dir(accelerator, run_dir: Path, resume: str):
    """The run folder for this trainer alone: shared by every node, locked, and never a
    finished run overwritten by ``--resume none``. Returns the lock (main process)."""
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise SetupError(f"--run-dir {run_dir}: is a file, not a folder; pass a folder")
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(run_dir))
    except OSError as e:
        raise SetupError(f"--run-dir {run_dir}: cannot be used as the run folder "
                         f"({e.strerror or type(e).__name__}: {e.filename or run_dir})") from None
    try:
        check_shared_run_dir(accelerator, run_dir)
    except RuntimeError as e:
        raise SetupError(e) from None
    problem, lock = None, None
    if accelerator.is_main_process:
        lock = RunLock(run_dir)
        try:
            note = lock.acquire()
            if note:
                print(note, file=sys.stderr, flush=True)
            atexit.register(lock.release)
        except RunLockedError as e:
            problem = str(e)
        except OSError as e:                  # a read-only folder or file system
            problem = (f"--run-dir {run_dir}: cannot be used as the run folder "
                       f"({e.strerror or type(e).__name__}: {e.filename or lock.path})")
        if problem is None and resume == "none" and occupied(run_dir):
            problem = (f"--resume none into {run_dir}, which holds "
                       f"{', '.join(occupied(run_dir))}: training afresh there would overwrite "
                       f"its export and prune its checkpoints. Pass a new --run-dir to start "
                       f"over (or --resume auto to continue this run)")
    if not all_ok(accelerator, problem is None):
        raise SetupError(problem or "another process could not claim the run folder")
    return lock


def resume(sess: Session, how: str) -> int:
    """Load the checkpoint ``how`` names (auto: the newest one whose files all load; others
    are set aside with a warning) and return its step (0 when there is none). Only then is
    anything of the run folder changed: RUN/config.yaml and the trackers' files (a resume
    that fails leaves the folder as it was)."""
    step = load_checkpoint(sess, how)
    if sess.accelerator.is_main_process:
        write_run_config(sess.run_dir, sess.cfg, print)
    try:
        start_trackers(sess.accelerator, sess.cfg, sess.run_dir)
    except ConfigError as e:
        raise SetupError(e) from None
    return step


def load_checkpoint(sess: Session, how: str) -> int:
    """The model, optimizer, RNG and EMA state of the checkpoint ``how`` names; its step."""
    acc = sess.accelerator
    if how == "none":
        return 0
    # every file of the checkpoint is opened before anything is loaded: a truncated or refused
    # file makes --resume auto fall back to the previous checkpoint (one warning each), and an
    # explicit --resume PATH stop with one line naming the file
    try:
        if how == "auto":
            path, skipped = pick_checkpoint(sess.ckpt_dir, sess.print)
        else:
            path, skipped = Path(how), []
            if not is_complete(path):
                raise CheckpointError(f"{path} is not a complete checkpoint")
            verify_checkpoint(path)
        if path is not None:
            # the shapes first: a config of another width is one line, not torch's list
            check_model_fits(path, acc.unwrap_model(sess.model), to_dict(sess.cfg.model),
                             sess.run_dir / "config.yaml")
            acc.load_state(str(path))
            load_ema(path, sess.ema)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        raise SetupError(e) from None
    acc.wait_for_everyone()                  # every rank has read them: now move them
    if acc.is_main_process:
        set_aside(skipped, sess.print)
    if path is None:
        return 0
    step, sess.trained_s = checkpoint_step(path)
    sess.print(f"resumed from {path} at step {step} ({sess.trained_s / 60:.1f} min trained)")
    if acc.is_main_process:
        note = sync_export(sess.run_dir, path)        # export/ = this checkpoint's EMA 0
        if note:
            sess.print(note)
    return step


def validation_batch(cfg: Config, val_data, device) -> dict:
    """The fixed batch of the validation grids (the same on every run of this seed)."""
    val_data.flip = False
    # an SD-VAE cache samples each item's posterior from torch's global RNG: seeded from the
    # validation stream, and the training RNG left as it was (a resume restores it first)
    with torch.random.fork_rng(devices=[]):
        seed_rng(stream_seed(cfg.train.seed, Stream.VALIDATION, 1))
        items = [val_data[i] for i in range(min(cfg.train.num_val, len(val_data)))]
    x, edge, label = batch_to(torch.utils.data.default_collate(items), device, cfg)
    g = torch.Generator().manual_seed(stream_seed(cfg.train.seed, Stream.VALIDATION))
    return dict(x=x, edge=edge, label=label, noise=torch.randn(x.shape, generator=g).to(device))


def build_session(args, cfg: Config) -> Optional[Session]:
    """Everything before the first step: the accelerator, the data checked against the config,
    the model, the run folder claimed, trackers, warm start and teacher, optimizer and EMA.
    Returns None after a dry run; raises SetupError on bad input."""
    tc = cfg.train
    run_dir = Path(args.run_dir or ROOT / "runs" / Path(args.config).stem)
    accelerator = make_accelerator(cfg, run_dir)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    set_backend_flags(tc, device)
    if tc.batch_size % world:
        raise SetupError(f"train.batch_size={tc.batch_size} is not divisible by the number "
                         f"of processes ({world})")
    per_rank = tc.batch_size // world
    spare = (os.cpu_count() or 1) // world
    if device.type == "cpu" and torch.get_num_threads() == 1 and spare > 1 and rank == 0:
        # `accelerate launch` without --cpu sets OMP_NUM_THREADS=1 when it is unset
        print(f"note: 1 thread per process on a CPU with {spare} cores per process "
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); pass "
              f"`accelerate launch --num_cpu_threads_per_process {spare}` (or set "
              f"OMP_NUM_THREADS) to use them", flush=True)
    data, val_data, missing = load_data(cfg, args.dry_run)

    import models
    torch.manual_seed(tc.seed)                                  # identical init on every rank
    try:
        model = models.build(cfg.model)
    except ValueError as e:                  # a shape the backbone cannot take
        raise SetupError(f"model.* ({cfg.model.name}): {e}") from None
    n_params = sum(p.numel() for p in model.parameters())
    if args.dry_run:
        if accelerator.is_main_process:
            import yaml
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            print(f"model {cfg.model.name}: {n_params / 1e6:.2f}M parameters")
            print(f"dataset: MISSING ({missing}); the config and model above are valid"
                  if missing is not None else
                  f"dataset {cfg.data.path}: {len(data)} records; {world} process(es), "
                  f"{per_rank} per process x {tc.grad_accum} accumulation")
        return None

    lock = claim_run_dir(accelerator, run_dir, args.resume)
    # RUN/config.yaml and the trackers are written by resume(), once it has succeeded
    if tc.init_from and not list_checkpoints(run_dir / "checkpoints"):
        from meanflow.warmstart import WarmStartError, init_from
        try:
            accelerator.print(init_from(model, tc.init_from, tc.init_weights,
                                        to_dict(cfg.model)))
        except WarmStartError as e:
            raise SetupError(e) from None
    teacher = None
    if cfg.meanflow.teacher:
        from meanflow.training import load_model
        try:
            teacher, _ = load_model(cfg.meanflow.teacher, device)
        except (FileNotFoundError, ValueError) as e:
            raise SetupError(f"meanflow.teacher: {e}") from None
        teacher.requires_grad_(False)
    model, opt, ema, forward_model = prepare_training(accelerator, model, cfg)
    # input values are checked on the first step (each check waits for the device)
    loss_fn = MeanFlowLoss(cfg.meanflow, check_values=True, teacher=teacher)
    n_neq = round(cfg.meanflow.ratio_r_neq_t * tc.batch_size)
    if world > 1 and n_neq and math.gcd(tc.batch_size, n_neq) % world:
        accelerator.print(
            f"note: {n_neq} r != t samples per batch of {tc.batch_size} cannot be split evenly "
            f"over {world} processes: their JVP batches differ by up to "
            f"{n_neq // math.gcd(tc.batch_size, n_neq)} samples and the slowest sets the pace "
            f"(choose train.batch_size and meanflow.ratio_r_neq_t so that gcd(batch, ratio x "
            f"batch) is a multiple of the process count)")
    return Session(accelerator, cfg, run_dir, data.meta, model, ema,
                   ema_model=(models.build(cfg.model).to(device).eval()
                              if accelerator.is_main_process else None),
                   clock=time.process_time if tc.budget_clock == "cpu" else time.time,
                   opt=opt, forward_model=forward_model, loss_fn=loss_fn, data=data,
                   val_data=val_data, n_params=n_params, lock=lock)


def run_training(args, cfg: Config) -> int:
    sess = build_session(args, cfg)
    if sess is None:                                   # --dry-run
        return 0
    tc, accelerator, data = cfg.train, sess.accelerator, sess.data
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    model, opt, ema, loss_fn = sess.model, sess.opt, sess.ema, sess.loss_fn
    per_rank = tc.batch_size // world
    step = resume(sess, args.resume)
    # train.max_minutes is a budget for the whole run, resumes included: a finished run
    # started again does nothing (so scripts can re-run it to reuse what is done).
    budget_s = 60 * tc.max_minutes if tc.max_minutes > 0 else math.inf
    if step >= tc.max_steps or sess.trained_s >= budget_s:
        sess.print(f"nothing to do: the run is complete at step {step} ({sess.trained_s / 60:.1f}"
                   f" min of train.max_minutes={tc.max_minutes}, train.max_steps="
                   f"{tc.max_steps})")
        accelerator.end_training()
        return 0

    sampler = ShardedEpochSampler(len(data), per_rank, rank, world, tc.seed,
                                  start_batch=step * tc.grad_accum)
    loader = torch.utils.data.DataLoader(
        SeededItems(data, tc.seed), batch_size=per_rank, sampler=sampler,
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=cfg.data.num_workers > 0)
    val = validation_batch(cfg, sess.val_data, device)
    from meanflow.codec import CodecError, make_decoder
    decoder, why = None, None
    if accelerator.is_main_process:        # the validation grid's decoder
        try:
            decoder = make_decoder(data.meta, device, allow_download=True)  # default SD-VAE only
        except CodecError as e:
            why = str(e)
    if not all_ok(accelerator, why is None):     # every rank stops, not only the main one
        raise SetupError(why or "the main process could not load the dataset's VAE decoder")
    stop, hooks, health, meter = StopRequest(), FaultHooks(), Health(device), Meter()
    fp16, use_cl = tc.mixed_precision == "fp16", uses_channels_last(cfg, device)
    if accelerator.is_main_process:
        sess.progress = TrainProgress(step, tc.max_steps, budget_s, sess.trained)
    sess.t_start, t_last, seen, exit_code = sess.clock(), time.time(), 0, 0
    sess.print(f"{sess.n_params / 1e6:.2f}M parameters; {len(data)} records; {world} process(es) "
               f"x {per_rank} x {tc.grad_accum} accumulation; device {device}, precision "
               f"{tc.mixed_precision}")

    # ---- the loop: nothing in a step reads a device tensor on the host; the run's state is
    # read at sync points (every train.sync_every steps, and at logging and checkpoint steps)
    model.train()
    it = iter(loader)
    while step < tc.max_steps:
        batches = [next(it) for _ in range(tc.grad_accum)]
        ok, nonfinite, gnorm, stats = train_step(
            model, sess.forward_model, opt, ema, loss_fn, batches, step, accelerator=accelerator,
            cfg=cfg, world=world, rank=rank, fp16=fp16, channels_last=use_cl,
            nan=hooks.nan(step))
        loss_fn.check_values = tc.debug_checks
        meter.add(stats, ok)
        health.add(step, nonfinite)
        seen += tc.batch_size * tc.grad_accum
        step += 1            # a skipped step is consumed (data and seeds move on), not applied
        if sess.progress is not None:
            sess.progress.update(step)
        log_now = step % tc.log_every == 0 or step == tc.max_steps
        ckpt_now = step % tc.ckpt_every == 0 or step == tc.max_steps
        if log_now or ckpt_now or step % tc.sync_every == 0:
            state = sync_point(sess, health, stop, budget_s)
            for at in state["bad_steps"]:
                sess.print(f"step {at}: non-finite loss or gradient, update skipped")
            if state["streak"] >= tc.max_nonfinite:
                sess.print(nonfinite_stop_message(sess, state["streak"]))
                exit_code = 3
                break
            if log_now:
                log(sess, step, step_scalars(meter, gnorm, opt, state, seen, t_last, device))
                seen, t_last = 0, time.time()
            if accelerator.is_main_process and (step % tc.image_every == 0 or
                                                step == tc.max_steps):
                log_image(sess, step, "val/edge_gt_ema1_ema2",
                          validation_grid(ema_weights(sess), val, cfg, decoder,
                                          fail=hooks.grid_fails))
            if ckpt_now or state["stopping"]:
                save_checkpoint(sess, step)
            if state["stopping"]:
                sess.print(f"stopping at step {step} ({stop.why or 'train.max_minutes reached'})"
                           f"; checkpoint saved in {sess.ckpt_dir}")
                break
        hooks.after_step(step)

    if sess.progress is not None:
        sess.progress.close()
    if sess.lock is not None:
        sess.lock.release()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exit_code


def step_scalars(meter: Meter, gnorm, opt, state: dict, seen: int, t_last: float, device
                 ) -> dict:
    """The logged scalars: loss statistics averaged over the steps since the last log."""
    now = time.time()
    vals = {f"train/{k}": v for k, v in meter.read().items()}
    vals.update({"train/grad_norm": float(gnorm), "train/lr": opt.param_groups[0]["lr"],
                 "train/samples_per_s": seen / max(now - t_last, 1e-9),
                 "train/skipped_steps": state["skipped"]})
    if device.type == "cuda":
        vals["train/peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return vals


def nonfinite_stop_message(sess: Session, streak: int) -> str:
    last = list_checkpoints(sess.ckpt_dir)
    return (f"error: {streak} consecutive non-finite steps (train.max_nonfinite="
            f"{sess.cfg.train.max_nonfinite}); stopping. " +
            (f"The last good checkpoint, {last[-1][1]}, is intact." if last else
             "No checkpoint was written yet: nothing of this run is saved."))


if __name__ == "__main__":
    sys.exit(main())
