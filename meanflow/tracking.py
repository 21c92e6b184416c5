"""What a training run writes for people to watch: scalars to RUN/metrics.csv and to
Accelerate's trackers (TensorBoard in RUN/tb, W&B, MLflow, Aim, Comet), and image grids.

    tracker = Tracker(accelerator, run_dir)
    tracker.start(cfg)                      # after a successful resume: the trackers' files
    tracker.log(step, {"train/loss": 0.1})
    tracker.image(step, "val/grid", uint8_hwc)
"""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import Config, ConfigError, to_dict

METRICS_CSV = "metrics.csv"


def flat_hparams(cfg: Config) -> dict:
    """The config as ``section.key -> scalar or string`` (what trackers take as hparams)."""
    flat = {}

    def walk(prefix: str, d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    walk("", to_dict(cfg))
    return flat


class Tracker:
    """The run's scalars and images; every method may be called on every process (only the
    main one writes files)."""

    def __init__(self, accelerator, run_dir: Path):
        self.acc = accelerator
        self.run_dir = Path(run_dir)
        self.csv_header: Optional[list] = None

    def start(self, cfg: Config) -> None:
        """Start ``train.log_with``'s tracker. A tracker whose package is missing is an
        error here (ConfigError), not a silent no-op."""
        if cfg.train.log_with == "none":
            return
        from accelerate.tracking import get_available_trackers
        if cfg.train.log_with not in map(str, get_available_trackers()):
            raise ConfigError(f"train.log_with={cfg.train.log_with}: its package is not "
                              f"installed (pip install {cfg.train.log_with.replace('_', '-')})")
        # TensorBoard: RUN/tb (the name is its subfolder); the others: a project named after
        # the run folder
        self.acc.init_trackers("tb" if cfg.train.log_with == "tensorboard" else
                               self.run_dir.name, config=flat_hparams(cfg))

    def log(self, step: int, values: dict) -> None:
        """Scalars to the trackers and to RUN/metrics.csv (one row per logging step; a resumed
        run keeps the file's columns)."""
        self.acc.log(values, step=step)
        if not self.acc.is_main_process:
            return
        path = self.run_dir / METRICS_CSV
        if self.csv_header is None and path.exists():
            with open(path, newline="") as f:
                self.csv_header = next(csv.reader(f), None)
        new = self.csv_header is None
        if new:
            self.csv_header = ["step", *values]
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, self.csv_header, restval="", extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({"step": step, **{k: f"{v:.6g}" for k, v in values.items()}})

    def image(self, step: int, tag: str, grid: Optional[np.ndarray]) -> None:
        """One uint8 [H, W, 3] image to every tracker that takes images (None: nothing)."""
        if grid is None or not self.acc.is_main_process:
            return
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(tag, grid, step, dataformats="HWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({tag: [grid]}, step=step)


class Throughput:
    """Samples per second between two logging steps."""

    def __init__(self):
        self.seen, self.t_last = 0, time.time()

    def add(self, n: int) -> None:
        self.seen += n

    def read(self) -> float:
        now = time.time()
        rate = self.seen / max(now - self.t_last, 1e-9)
        self.seen, self.t_last = 0, now
        return rate


def step_scalars(losses: dict, gnorm, opt, skipped: int, samples_per_s: float, device) -> dict:
    """The logged scalars: ``losses`` (statistics averaged since the last log, see
    ``training.Meter``), the gradient norm, learning rate, throughput and skipped steps."""
    vals = {f"train/{k}": v for k, v in losses.items()}
    vals.update({"train/grad_norm": float(gnorm), "train/lr": opt.param_groups[0]["lr"],
                 "train/samples_per_s": samples_per_s, "train/skipped_steps": skipped})
    if torch.device(device).type == "cuda":
        vals["train/peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return vals
