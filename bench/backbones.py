"""Size, compute and speed of the backbones at 256x256 (SD-VAE latents 4x32x32, edges 256x256).

For each model: parameters, forward cost, and on this device forward throughput and MeanFlow
training-step throughput (forward-mode JVP with graph + backward, the "joint" step):

    with fwAD.dual_level():
        u, dudt = unpack_dual(model(make_dual(z, v), r, make_dual(t, 1), ...))
    loss = ((u - (v - (t - r) dudt).detach()) ** 2).mean();  loss.backward()

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on the meta device: there the
attention is decomposed into matmuls the counter sees (on CPU the fused attention kernel is not
counted). FlopCounterMode counts 2 FLOPs per multiply-accumulate; the DiT/SiT/MeanFlow papers'
"Gflops" (SiT-B/2 23.1, SiT-XL/2 118.6-119.0) are multiply-accumulates: compare them with the
GMAC column. The class-conditional rows without edges are the paper's ImageNet setting.

    python bench/backbones.py [--quick] [--device cuda] [--threads N] [--only LABEL,...]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.autograd.forward_ad as fwAD  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import models  # noqa: E402
from meanflow.config import ModelConfig  # noqa: E402
from meanflow.runtime import tune_cpu_allocator  # noqa: E402

LATENT = dict(input_size=32, in_channels=4)
EDGE = dict(edge_channels=1, edge_size=256)
IMAGENET = dict(num_classes=1000, edge_channels=0, edge_size=0)

# label -> (ModelConfig fields, forward batch, train batch; 0 = not timed)
ROWS = {
    "unet (edge)": (dict(name="unet", **LATENT, **EDGE), 4, 4),
    "SiT-B/2 (ImageNet)": (dict(name="SiT-B/2", **LATENT, **IMAGENET), 0, 0),
    "SiT-B/2 + edge add": (dict(name="SiT-B/2", **LATENT, **EDGE, edge_mode="add"), 4, 2),
    "SiT-B/2 + edge tokens": (dict(name="SiT-B/2", **LATENT, **EDGE, edge_mode="tokens"), 4, 2),
    "SiT-XL/2 (ImageNet)": (dict(name="SiT-XL/2", **LATENT, **IMAGENET), 0, 0),
    "SiT-XL/2 + edge add": (dict(name="SiT-XL/2", **LATENT, **EDGE, edge_mode="add"), 1, 0),
    "SiT-XL/2 + edge tokens": (dict(name="SiT-XL/2", **LATENT, **EDGE, edge_mode="tokens"),
                               1, 1),
}
QUICK_ROWS = {"unet (edge)": (ROWS["unet (edge)"][0], 2, 2),
              "SiT-B/2 (ImageNet)": ROWS["SiT-B/2 (ImageNet)"],
              "SiT-B/2 + edge add": (ROWS["SiT-B/2 + edge add"][0], 1, 1),
              "SiT-XL/2 (ImageNet)": ROWS["SiT-XL/2 (ImageNet)"]}


def make_inputs(cfg: ModelConfig, batch: int, device) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(batch, generator=g) * 0.5 + 0.5
    r = t * torch.rand(batch, generator=g)
    cond = {}
    if cfg.edge_channels:
        cond["edge"] = (torch.rand(batch, cfg.edge_channels, cfg.edge_size, cfg.edge_size,
                                   generator=g) > 0.9).float()
    if cfg.num_classes:
        cond["label"] = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    to = (lambda x: x.to(device))
    return to(z), to(r), to(t), {k: to(v) for k, v in cond.items()}


def count_macs(cfg: ModelConfig) -> float:
    """Multiply-accumulates of one forward at batch 1 (FlopCounterMode / 2), on meta."""
    with torch.device("meta"):
        net = models.build(cfg)
        z, r, t, cond = make_inputs(cfg, 1, "meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(z, r, t, **cond)
    return counter.get_total_flops() / 2


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(fn, iters: int, device: str) -> float:
    fn()                                         # warm-up (allocator, lazy initialisation)
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step(net, z, r, t, cond) -> None:
    v = torch.randn_like(z)
    with fwAD.dual_level():
        out = net(fwAD.make_dual(z, v), r, fwAD.make_dual(t, torch.ones_like(t)), **cond)
        u, dudt = fwAD.unpack_dual(out)
    target = v - (t - r)[:, None, None, None] * dudt.detach()
    loss = ((u - target) ** 2).mean()
    loss.backward()
    net.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer models, smaller batches, two timed iterations")
    ap.add_argument("--only", default="",
                    help="comma-separated row labels to run (e.g. 'SiT-B/2 + edge add,SiT-B/2 "
                         "+ edge tokens'); default: all")
    a = ap.parse_args()
    tune_cpu_allocator()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = QUICK_ROWS if a.quick else ROWS
    if a.only:
        want = [w.strip() for w in a.only.split(",") if w.strip()]
        unknown = [w for w in want if w not in ROWS]
        if unknown:
            ap.error(f"--only {unknown}: not a row (rows: {', '.join(ROWS)})")
        rows = {w: ROWS[w] for w in want}
    iters = 2 if a.quick else a.iters
    print(f"device {a.device}, torch threads {torch.get_num_threads()}, fp32, median of "
          f"{iters} timed iteration(s) after one warm-up; GMAC = FlopCounterMode FLOPs / 2 "
          f"(the papers' 'Gflops'); train step = forward-mode JVP with graph + backward")
    print("| model | params (M) | GMAC / fwd | GFLOP / fwd | fwd img/s (batch) | "
          "train-step img/s (batch) |")
    print("|---|---|---|---|---|---|")
    for label, (fields, fwd_b, train_b) in rows.items():
        cfg = ModelConfig(**fields)
        macs = count_macs(cfg)
        torch.manual_seed(0)
        net = models.build(cfg).to(a.device)
        n_params = sum(p.numel() for p in net.parameters()) / 1e6
        fwd = train = "-"
        if fwd_b:
            z, r, t, cond = make_inputs(cfg, fwd_b, a.device)
            net.eval()
            with torch.no_grad():
                sec = time_it(lambda: net(z, r, t, **cond), iters, a.device)
            fwd = f"{fwd_b / sec:.2f} ({fwd_b})"
        if train_b:
            z, r, t, cond = make_inputs(cfg, train_b, a.device)
            net.train()
            sec = time_it(lambda: train_step(net, z, r, t, cond), iters, a.device)
            train = f"{train_b / sec:.3f} ({train_b})"
        print(f"| {label} | {n_params:.1f} | {macs / 1e9:.1f} | {2 * macs / 1e9:.1f} | {fwd} | "
              f"{train} |", flush=True)
        del net


if __name__ == "__main__":
    main()
