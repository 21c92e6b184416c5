"""The U-Net's memory layout: a training step in contiguous (NCHW) against channels_last.

`train.channels_last` runs the U-Net's convolutions in channels_last on CUDA; its GroupNorms
(the forward-AD ones of models/jvp_ops.py included) take NCHW on CUDA and convert back, so the
layout pays only where the convolutions gain more than the conversions cost. This prints, per
layout, the median time of a flow-matching step and of a MeanFlow step (25% r != t, the
configs' ratio) of the same network and batch, with autocast bf16 on CUDA and fp32 elsewhere.

    python bench/layout.py [--quick] [--device cuda] [--config configs/afhq_unet.yaml]
        [--batch 64] [model.base_channels=64 ...]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import models  # noqa: E402
from meanflow import MeanFlowConfig, MeanFlowLoss  # noqa: E402
from meanflow.config import load_config  # noqa: E402


def step_time(net, x, edge, ratio: float, iters: int, device: str) -> float:
    fmt = next(net.parameters()).is_contiguous(memory_format=torch.channels_last)
    loss_fn = MeanFlowLoss(MeanFlowConfig(ratio_r_neq_t=ratio, cond_drop_prob=0.0))
    amp = (torch.autocast("cuda", torch.bfloat16) if device == "cuda"
           else contextlib.nullcontext())
    times = []
    for i in range(iters + 2):                          # two warm-up steps
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp:
            xi = x.contiguous(memory_format=torch.channels_last) if fmt else x
            loss = loss_fn(net, xi, edge).loss
        loss.backward()
        net.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/afhq_unet.yaml")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=0, help="0: 64 on CUDA, 4 elsewhere")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--quick", action="store_true",
                    help="the CPU's share: model.base_channels=32, batch 4, 3 steps")
    ap.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    a = ap.parse_args()
    overrides = list(a.overrides) + (["model.base_channels=32"] if a.quick else [])
    mc = load_config(ROOT / a.config, overrides).model
    if mc.name != "unet":
        sys.exit(f"error: {a.config}: bench/layout.py measures the U-Net, not {mc.name!r}")
    batch = a.batch or (64 if a.device == "cuda" else 4)
    iters = 3 if a.quick else a.iters
    torch.manual_seed(0)
    net = models.build(mc).to(a.device)
    x = torch.randn(batch, mc.in_channels, mc.input_size, mc.input_size, device=a.device)
    edge = ((torch.rand(batch, mc.edge_channels, mc.edge_size, mc.edge_size, device=a.device)
             > 0.8).float() if mc.edge_channels else None)
    prec = "bf16 autocast" if a.device == "cuda" else "fp32"
    print(f"{a.config} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters), "
          f"batch {batch}, device {a.device}, {prec}, median of {iters} steps")
    print("| layout | flow matching step (s) | MeanFlow 25% step (s) | MF / FM |")
    print("|---|---|---|---|")
    base = None
    for layout in ("contiguous", "channels_last"):
        if layout == "channels_last":
            net = net.to(memory_format=torch.channels_last)
        fm = step_time(net, x, edge, 0.0, iters, a.device)
        mf = step_time(net, x, edge, 0.25, iters, a.device)
        base = base or (fm, mf)
        rel = "" if layout == "contiguous" else (f" ({fm / base[0]:.2f}x / {mf / base[1]:.2f}x "
                                                 f"of contiguous)")
        print(f"| {layout}{rel} | {fm:.3f} | {mf:.3f} | {mf / fm:.2f} |", flush=True)


if __name__ == "__main__":
    main()
