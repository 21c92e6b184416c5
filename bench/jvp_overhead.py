"""Cost of the MeanFlow JVP: a MeanFlow training step against a flow-matching step.

Same backbone, same batch. Flow matching (FM) = forward + backward of ||u(z, t, t) - v||^2.
MeanFlow = meanflow.MeanFlowLoss (forward-mode JVP for the target, then forward + backward),
at several fractions of samples with r != t (the paper uses 25% on ImageNet, 75% on CIFAR,
the edge demo 10%; 100% is the worst case), in the default "split" JVP mode and, for
reference, the "joint" mode. Time is the median of several steps; peak memory is the
high-water mark during one step (CUDA: max_memory_allocated; CPU: the resident-set
high-water mark of a fresh subprocess above its level just before its first step, measured
with glibc's default allocator, which unmaps large freed blocks, so that the resident set
follows live memory; the timings use the tuned allocator of meanflow/runtime.py unless
--no-mallopt).

    python bench/jvp_overhead.py [--quick] [--device cuda] [--models tiny,unet-demo,unet,SiT-B/2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from meanflow import MeanFlowConfig, MeanFlowLoss  # noqa: E402
from meanflow.runtime import tune_cpu_allocator  # noqa: E402

# (label, ratio of r != t, jvp mode, tangent); "fm" is the flow-matching baseline
MODES = [("fm", 0.0, "", "sample"), ("mf 10%", 0.1, "split", "sample"),
         ("mf 25%", 0.25, "split", "sample"),
         ("mf 25% model tangent", 0.25, "split", "model"), ("mf 50%", 0.5, "split", "sample"),
         ("mf 100%", 1.0, "split", "sample"), ("mf 100% joint", 1.0, "joint", "sample")]

# name -> (builder kwargs, input shape [C, H, W], edge shape or None, batch)
MODELS = {
    "tiny": dict(kind="tiny", shape=(1, 32, 32), edge=(1, 32, 32), batch=32),
    "unet-demo": dict(kind="cfg", cfg="configs/fashion_demo.yaml", batch=32),
    "unet": dict(kind="cfg", cfg="configs/afhq_unet.yaml", batch=4),
    "SiT-B/2": dict(kind="cfg", cfg="configs/afhq_sit_b2.yaml", batch=4),
}


def build(name: str, device: str):
    spec = MODELS[name]
    if spec["kind"] == "tiny":
        from models.tiny import TinyConvNet
        net = TinyConvNet(in_channels=spec["shape"][0], ch=64, edge_channels=spec["edge"][0])
        return net.to(device), spec["shape"], spec["edge"], spec["batch"]
    import models
    from meanflow.config import load_config
    mc = load_config(ROOT / spec["cfg"]).model
    net = models.build(mc).to(device)
    edge = (mc.edge_channels, mc.edge_size, mc.edge_size) if mc.edge_channels else None
    return net, (mc.in_channels, mc.input_size, mc.input_size), edge, spec["batch"]


def one_step(mode: str, net, x, edge, loss_fn):
    if mode.startswith("fm"):
        b = x.shape[0]
        t = torch.rand(b, device=x.device)
        e = torch.randn_like(x)
        z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
        u = net(z, t, t, edge=edge)
        loss = ((u - (e - x)) ** 2).flatten(1).sum(1).mean()
    else:
        loss = loss_fn(net, x, edge).loss
    loss.backward()
    net.zero_grad(set_to_none=True)


def measure(name: str, mode: str, device: str, iters: int) -> dict:
    torch.manual_seed(0)
    net, shape, eshape, batch = build(name, device)
    x = torch.randn(batch, *shape, device=device)
    edge = (torch.rand(batch, *eshape, device=device) > 0.8).float() if eshape else None
    _, ratio, jvp_mode, tangent = next(m for m in MODES if m[0] == mode)
    loss_fn = MeanFlowLoss(MeanFlowConfig(ratio_r_neq_t=ratio, cond_drop_prob=0.0,
                                          jvp_mode=jvp_mode or "split", tangent=tangent))
    # Warm up every code path on one sample (lazy library initialisation would otherwise
    # count as step memory for some modes and not others).
    for m in ("fm", "mf 100%", "mf 100% joint"):
        warm = MeanFlowLoss(MeanFlowConfig(ratio_r_neq_t=1.0, cond_drop_prob=0.0,
                                           jvp_mode="joint" if "joint" in m else "split"))
        one_step(m, net, x[:1], None if edge is None else edge[:1], warm)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    one_step(mode, net, x, edge, loss_fn)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        one_step(mode, net, x, edge, loss_fn)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return dict(time=statistics.median(times) if times else 0.0, peak=max(peak, 0), batch=batch)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,unet-demo,unet,SiT-B/2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--quick", action="store_true", help="tiny and demo U-Net only, 3 iters")
    ap.add_argument("--no-mallopt", action="store_true",
                    help="keep glibc's default allocator thresholds (see meanflow/runtime.py)")
    ap.add_argument("--_child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not a.no_mallopt:
        tune_cpu_allocator()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a._child:                      # one measurement in a fresh process (clean RSS peak)
        print(json.dumps(measure(a._child[0], a._child[1], a.device, a.iters)))
        return
    names = ["tiny", "unet-demo"] if a.quick else a.models.split(",")
    iters = 3 if a.quick else a.iters
    print(f"device {a.device}, torch threads {a.threads or torch.get_num_threads()}, "
          f"median of {iters} steps, fp32, allocator tuned: {not a.no_mallopt}")
    print("| model | batch | mode | step (s) | time / FM | peak (MB) | memory / FM |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        fm = None
        for mode, *_ in MODES:
            cmd = [sys.executable, __file__, "--_child", name, mode, "--device", a.device,
                   "--iters", str(iters), "--threads", str(a.threads)]
            timed = subprocess.run(cmd + (["--no-mallopt"] if a.no_mallopt else []),
                                   capture_output=True, text=True)
            mem = subprocess.run(cmd[:-4] + ["--iters", "0", "--no-mallopt"],
                                 capture_output=True, text=True)
            bad = next((o for o in (timed, mem) if o.returncode != 0), None)
            if bad is not None:
                print(f"| {name} | | {mode} | failed: {bad.stderr.strip().splitlines()[-1]} |")
                continue
            res = json.loads(timed.stdout.strip().splitlines()[-1])
            res["peak"] = json.loads(mem.stdout.strip().splitlines()[-1])["peak"]
            fm = fm or res
            print(f"| {name} | {res['batch']} | {mode} | {res['time']:.3f} | "
                  f"{res['time'] / fm['time']:.2f}x | {res['peak'] / 2**20:.0f} | "
                  f"{res['peak'] / max(fm['peak'], 1):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
