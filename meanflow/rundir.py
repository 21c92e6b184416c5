"""A training run's folder, safe across kills, corrupt files, full disks and a second trainer.

    run = RunFolder(run_dir, accelerator)
    run.claim(resume)                                  # shared, locked, not overwritten
    step, seconds = run.resume("auto", model, ema, cfg)   # newest checkpoint whose files load
    run.save(step, ema=ema, export_net=..., cfg=cfg, meta=meta, trained_s=seconds)

What a checkpoint is (its files, marker and checks) is meanflow/checkpoint.py; the export
meanflow/export.py. Used by train.py; nothing here knows about the training loop.

The lock is a POSIX record lock (``fcntl.lockf``) on ``RUN/.lock``: the kernel drops it when
the process ends, however it ends (``kill -9`` included), so a stale lock never blocks a
restart; and unlike ``flock`` it is not inherited by forked DataLoader workers, which may
outlive a killed trainer by seconds. The file holds the owner's pid and host so that the
error can name it.
"""
from __future__ import annotations

import atexit
import datetime as _dt
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .checkpoint import (EMA_FILE, LEGACY_EMA_FILE, MODEL_FILE, CheckpointError,
                         check_model_fits, checkpoint_step, ckpt_name, is_complete,
                         list_checkpoints, load_ema, mark_complete, pick_checkpoint,
                         prune_checkpoints, save_ema, set_aside, strip_wrappers,
                         verify_checkpoint)
from .config import load_config, save_config, to_dict
from .distributed import all_ok
from .errors import first_line
from .export import EXPORT_CONFIG, EXPORT_DIR, export_config, export_model, write_export
from .launch import SetupError, check_shared_run_dir

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock."""


# --------------------------------------------------------------------------------------------
# One trainer per run folder
# --------------------------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on ``run_dir`` for the life of this process (see the module doc)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock or raise :class:`RunLockedError` naming the process that holds it.
        Returns a warning when the file system cannot lock (some network mounts): the run
        then goes on unguarded rather than not at all."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                return (f"warning: {self.path.parent} cannot be locked ({e.strerror}): nothing "
                        f"stops a second trainer on this run folder")
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 512, 0).decode(errors="replace").split()
            os.close(fd)
            who = (f"pid {holder[0]} on host {holder[1]}, since {holder[2]}" if len(holder) >= 3
                   else "a process that has not written its pid yet")
            raise RunLockedError(
                f"{self.path.parent} is in use by another trainer ({who}): wait for it to "
                f"end or stop it, or pass another --run-dir") from None
        os.ftruncate(fd, 0)
        now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {now}\n".encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        """Drop the lock (it also goes when the process ends)."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)          # no stale pid left for a reader to show
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


# --------------------------------------------------------------------------------------------
# The export follows the last checkpoint
# --------------------------------------------------------------------------------------------
def export_step(export_dir: Path) -> Optional[int]:
    """The step of a complete, consistent export, else None (missing or unreadable files, or
    weights and config written at different steps: a save killed between the two)."""
    w, c = Path(export_dir) / MODEL_FILE, Path(export_dir) / EXPORT_CONFIG
    try:
        with safe_open(str(w), "pt") as s:
            w_step = int((s.metadata() or {}).get("step", -1))
        c_step = int(json.loads(c.read_text())["step"])
    except Exception:  # noqa: BLE001 - any defect means: not an export to keep
        return None
    return c_step if c_step == w_step else None


def sync_export(run_dir: Path, ckpt: Path) -> Optional[str]:
    """Make ``RUN/export`` the first EMA of checkpoint ``ckpt`` unless it already is.

    A kill between a checkpoint and its export, or a resume that fell back past a corrupt
    checkpoint, leaves the export at another step than the checkpoint the run continues from.
    It is rebuilt from the checkpoint's own files: the model weights (for buffers), EMA 0 over
    the parameters, and the export config every checkpoint carries. Returns a note saying
    what was done, or None when the export was already right."""
    export_dir = Path(run_dir) / EXPORT_DIR
    step, _ = checkpoint_step(ckpt)
    have = export_step(export_dir)
    if have == step:
        return None
    # accelerate saves the prepared model as it is wrapped: DDP's "module." (and a compiled
    # model's "_orig_mod.") prefix the keys; the export holds the bare model's
    state = strip_wrappers(load_file(str(Path(ckpt) / MODEL_FILE)))
    ema_file = Path(ckpt) / EMA_FILE
    if ema_file.is_file():
        ema0 = {k[2:]: v for k, v in load_file(str(ema_file)).items() if k.startswith("0.")}
    else:                                    # legacy pickle: plain tensors only
        legacy = torch.load(Path(ckpt) / LEGACY_EMA_FILE, map_location="cpu", weights_only=True)
        ema0 = {k[2:]: v for k, v in legacy.items() if k.startswith("0.")}
    missing = sorted(set(ema0) - set(state))
    if missing:
        raise CheckpointError(f"{ema_file}: EMA keys not in {MODEL_FILE}: {missing[:3]}")
    state.update({k: v.to(state[k].dtype) for k, v in ema0.items()})
    write_export(export_dir, state, (Path(ckpt) / EXPORT_CONFIG).read_text(), step)
    was = "missing or incomplete" if have is None else f"at step {have}"
    return (f"note: {export_dir} was {was}, not at the checkpoint's step {step}: re-created "
            f"it from {Path(ckpt).name}")


def occupied(run_dir: Path) -> list[str]:
    """What ``--resume none`` would overwrite or prune in ``run_dir`` (empty: nothing)."""
    run_dir = Path(run_dir)
    found = [p.name for _, p in list_checkpoints(run_dir / "checkpoints")]
    if (run_dir / EXPORT_DIR).is_dir() and any((run_dir / EXPORT_DIR).iterdir()):
        found.append(EXPORT_DIR)
    return found


# --------------------------------------------------------------------------------------------
# The resolved config, and what a failed save leaves
# --------------------------------------------------------------------------------------------
def write_run_config(run_dir: Path, cfg, note: Callable[[str], None]) -> None:
    """Write the resolved config to ``RUN/config.yaml`` (atomically), first saying how it
    differs from the run's previous one. A previous file that no longer parses (torn by a
    kill before it was written atomically, or edited by hand) is reported and replaced: it
    must not block the restart of a run whose checkpoints are fine."""
    prev = Path(run_dir) / "config.yaml"
    if prev.exists():
        try:
            old_cfg = load_config(prev)
        except Exception as e:  # noqa: BLE001 - a torn file can fail in any way
            note(f"warning: {prev} cannot be read ({first_line(e)}); writing the resolved config "
                 f"over it")
        else:
            if old_cfg != cfg:
                old, new = to_dict(old_cfg), to_dict(cfg)
                diff = [f"{s}.{k}: {old[s][k]!r} -> {new[s][k]!r}" for s in new
                        for k in new[s] if old[s][k] != new[s][k]]
                note("note: the config differs from the run's previous one: " + "; ".join(diff))
    save_config(cfg, prev)


def save_failure_message(ckpt_dir: Path, step: int, e: Optional[BaseException]) -> str:
    """One line for a checkpoint that could not be written (disk full, quota, permissions):
    what failed, and which earlier checkpoint a restart will resume from."""
    what = "another process failed" if e is None else first_line(e, with_type=True)
    ckpts = list_checkpoints(Path(ckpt_dir))
    if ckpts:
        after = (f"the previous checkpoint {ckpts[-1][1].name} is intact: free space (or fix "
                 f"the folder), then run the same command to resume from it")
    else:
        after = ("this run has no earlier checkpoint: free space (or fix the folder), then "
                 "run the same command to start it again")
    return (f"error: cannot write checkpoint {Path(ckpt_dir) / f'step_{step:07d}'} ({what}); "
            f"is the disk full? Nothing of it was kept; {after}")


# --------------------------------------------------------------------------------------------
# The run folder as one object: what train.py claims, resumes from and saves into
# --------------------------------------------------------------------------------------------
SAVE_FAILED = 4                    # exit code: a checkpoint could not be written


class RunFolder:
    """One training run's folder, seen by every process of the run::

        RUN/config.yaml          the resolved config (written once a resume succeeded)
        RUN/checkpoints/step_N   accelerate's state, ema.safetensors, model_config.json,
                                 COMPLETE (written last; step_N.tmp until renamed)
        RUN/export               the newest checkpoint's EMA 0 for inference
        RUN/metrics.csv, RUN/tb  what meanflow.tracking writes
        RUN/.lock                one trainer at a time (:class:`RunLock`)

    ``claim`` takes it (or raises SetupError), ``resume`` loads the checkpoint a run
    continues from, ``save`` writes one; they are collective: every process calls them.
    """

    def __init__(self, path: Path, accelerator):
        self.path = Path(path)
        self.acc = accelerator
        self.lock: Optional[RunLock] = None

    @property
    def ckpt_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def export_dir(self) -> Path:
        return self.path / EXPORT_DIR

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint (not checked further), or None."""
        found = list_checkpoints(self.ckpt_dir)
        return found[-1][1] if found else None

    def _say(self, msg: str) -> None:
        if self.acc.is_main_process:
            print(msg, flush=True)

    # ---- claim ----------------------------------------------------------------------------
    def claim(self, resume: str) -> None:
        """The folder for this trainer alone: shared by every node, locked, and never a
        finished run overwritten by ``--resume none``."""
        run_dir = self.path
        try:
            if run_dir.exists() and not run_dir.is_dir():
                raise SetupError(f"--run-dir {run_dir}: is a file, not a folder; pass a folder")
            run_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(run_dir, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", str(run_dir))
        except OSError as e:
            raise SetupError(f"--run-dir {run_dir}: cannot be used as the run folder "
                             f"({e.strerror or type(e).__name__}: {e.filename or run_dir})"
                             ) from None
        try:
            check_shared_run_dir(self.acc, run_dir)
        except RuntimeError as e:
            raise SetupError(e) from None
        problem = None
        if self.acc.is_main_process:
            lock = RunLock(run_dir)
            try:
                note = lock.acquire()
                if note:
                    print(note, file=sys.stderr, flush=True)
                atexit.register(lock.release)
                self.lock = lock
            except RunLockedError as e:
                problem = str(e)
            except OSError as e:                  # a read-only folder or file system
                problem = (f"--run-dir {run_dir}: cannot be used as the run folder "
                           f"({e.strerror or type(e).__name__}: {e.filename or lock.path})")
            if problem is None and resume == "none" and occupied(run_dir):
                problem = (f"--resume none into {run_dir}, which holds "
                           f"{', '.join(occupied(run_dir))}: training afresh there would "
                           f"overwrite its export and prune its checkpoints. Pass a new "
                           f"--run-dir to start over (or --resume auto to continue this run)")
        if not all_ok(self.acc, problem is None):
            raise SetupError(problem or "another process could not claim the run folder")

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    # ---- resume ---------------------------------------------------------------------------
    def resume(self, how: str, model, ema, cfg) -> tuple[int, float]:
        """Load the checkpoint ``how`` names into the prepared ``model`` (with its optimizer
        and RNG state, through accelerate) and ``ema``: ``auto`` takes the newest one whose
        files all load (newer ones are set aside with a warning), ``none`` nothing, else a
        checkpoint folder. Returns (step, training seconds so far), (0, 0.0) without one.

        Nothing of the folder changes before the checkpoint has loaded; then the resolved
        config is written to RUN/config.yaml and RUN/export is made the checkpoint's."""
        acc, path, skipped = self.acc, None, []
        if how != "none":
            # every file is opened before anything is loaded: a truncated or refused file
            # makes --resume auto fall back to the previous checkpoint (one warning each),
            # and an explicit --resume PATH stop with one line naming the file
            try:
                if how == "auto":
                    path, skipped = pick_checkpoint(self.ckpt_dir, self._say)
                else:
                    path = Path(how)
                    if not is_complete(path):
                        raise CheckpointError(f"{path} is not a complete checkpoint")
                    verify_checkpoint(path)
                if path is not None:
                    # the shapes first: a config of another width is one line, not torch's
                    check_model_fits(path, acc.unwrap_model(model), to_dict(cfg.model),
                                     self.path / "config.yaml")
                    acc.load_state(str(path))
                    load_ema(path, ema)
            except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
                raise SetupError(e) from None
        acc.wait_for_everyone()                  # every rank has read them: now move them
        step, trained_s = 0, 0.0
        if acc.is_main_process:
            set_aside(skipped, self._say)
        if path is not None:
            step, trained_s = checkpoint_step(path)
            self._say(f"resumed from {path} at step {step} ({trained_s / 60:.1f} min trained)")
            if acc.is_main_process:
                note = sync_export(self.path, path)     # export/ = this checkpoint's EMA 0
                if note:
                    self._say(note)
        if acc.is_main_process:
            write_run_config(self.path, cfg, print)
        return step, trained_s

    # ---- save -----------------------------------------------------------------------------
    def save(self, step: int, *, ema, export_net: Callable[[], object], cfg, meta: dict,
             trained_s: float, before_error: Optional[Callable[[], None]] = None) -> None:
        """RUN/checkpoints/step_N, written as step_N.tmp and renamed complete: accelerate's
        state (model, optimizer, RNG), the EMAs in safetensors, the export config and the
        COMPLETE marker (step, training seconds); RUN/export (``export_net()``: the EMA
        network) is refreshed before the rename. On a failure on any process (disk full,
        quota) every process exits with SAVE_FAILED, and the previous checkpoint is left as
        it was; ``before_error`` runs first on the main process (a progress bar to close)."""
        acc = self.acc
        acc.wait_for_everyone()
        final = self.ckpt_dir / ckpt_name(step)
        tmp = self.ckpt_dir / (ckpt_name(step) + ".tmp")
        failure = None
        # no collective inside the try: a rank that fails must not leave the others waiting
        # (save_state makes the folder on every rank and has no barrier of its own here)
        try:
            acc.save_state(str(tmp), safe_serialization=True)
            if acc.is_main_process:
                # the EMAs in safetensors, and the export's config: evaluate.py takes a
                # checkpoint as it takes an export (its weights: the first EMA)
                save_ema(tmp, ema)
                export_config(tmp, cfg, meta, step, cfg.train.ema_decays[0])
                mark_complete(tmp, step, trained_s)
                # the export before the rename: a kill in between leaves the export ahead of
                # the checkpoints, and a restart re-creates it from the one it resumes
                export_model(self.export_dir, export_net(), cfg, meta, step,
                             cfg.train.ema_decays[0])
        except Exception as e:  # noqa: BLE001 - disk full, quota, read-only: all one line
            failure = e
        if not all_ok(acc, failure is None):             # every rank stops together
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)   # give the space back
                if before_error is not None:
                    before_error()
                print(save_failure_message(self.ckpt_dir, step, failure), file=sys.stderr,
                      flush=True)
            raise SystemExit(SAVE_FAILED)
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)                       # atomic: never half-written
            prune_checkpoints(self.ckpt_dir, cfg.train.keep_checkpoints)
        acc.wait_for_everyone()

    def nonfinite_stop_message(self, streak: int, limit: int) -> str:
        last = self.latest()
        return (f"error: {streak} consecutive non-finite steps (train.max_nonfinite={limit}); "
                f"stopping. " +
                (f"The last good checkpoint, {last}, is intact." if last else
                 "No checkpoint was written yet: nothing of this run is saved."))
