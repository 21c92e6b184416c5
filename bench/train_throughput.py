"""Training throughput of a config on this machine: samples/s and peak memory with 1 and 2
processes, and the share of step time spent outside the model (data, EMA, logging).

    python bench/train_throughput.py [--config configs/fashion_demo.yaml] [--steps 30] [--quick]

Runs the real train.py (torchrun for 2 processes) on the config's dataset for a few steps,
reads train/samples_per_s from metrics.csv, and times the model step alone (loss + backward +
optimizer) in-process on the same batch size for the outside-the-model share.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_train(cfg: str, steps: int, nproc: int, run_dir: Path) -> tuple[float, float]:
    cmd = ([sys.executable, "train.py"] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), "train.py"])
    log_every = max(2, steps // 3)
    cmd += ["--config", cfg, "--run-dir", str(run_dir), f"train.max_steps={steps}",
            f"train.log_every={log_every}", f"train.ckpt_every={10 * steps}",
            f"train.image_every={10 * steps}", "train.max_minutes=0"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    sps = float(rows[-1]["train/samples_per_s"])             # after warm-up
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return sps, peak


def model_only(cfg_path: str, iters: int) -> float:
    """Samples/s of loss + backward + AdamW step alone, on synthetic tensors."""
    import torch
    import models
    from meanflow import MeanFlowLoss, load_config
    from meanflow.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    cfg = load_config(cfg_path)
    m = cfg.model
    net = models.build(m)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    b = cfg.train.batch_size
    x = torch.randn(b, m.in_channels, m.input_size, m.input_size)
    edge = torch.rand(b, m.edge_channels, m.edge_size, m.edge_size) if m.edge_channels else None
    label = torch.randint(0, m.num_classes, (b,)) if m.num_classes else None
    loss_fn = MeanFlowLoss(cfg.meanflow)
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        loss_fn(net, x, edge, label).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return b / (sum(times) / len(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/fashion_demo.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="12 steps")
    a = ap.parse_args()
    steps = 12 if a.quick else a.steps
    torch_threads = os.cpu_count() or 2
    import torch
    torch.set_num_threads(torch_threads)
    alone = model_only(a.config, max(3, steps // 4))
    print(f"config {a.config}, {steps} steps, CPU threads {torch_threads}")
    print("| processes | samples/s (train.py) | model step alone (samples/s) | "
          "outside the model | peak RSS of a run (MB) |")
    print("|---|---|---|---|---|")
    for nproc in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            sps, peak = run_train(a.config, steps, nproc, Path(tmp) / "run")
        share = max(0.0, 1 - sps / alone) if nproc == 1 else float("nan")
        print(f"| {nproc} | {sps:.1f} | {alone:.1f} | "
              f"{'%.0f%%' % (100 * share) if nproc == 1 else '-'} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
