"""Cost of the MeanFlow JVP: a MeanFlow training step against a flow-matching step.

Same backbone, same batch, one forward + backward per step. Rows (``--modes``):

    fm            flow matching: ||u(z, t, t) - v||^2, the baseline of every ratio
    mf split      this project's MeanFlowLoss: the no-grad JVP on the r != t samples only, the
                  tangent passed explicitly (models/tangent.py, U-Net and SiT), then the
                  forward with a graph
    mf fd         the same with meanflow.fd_delta: du/dt by a central finite difference, one
                  batched no-grad forward of the 2k samples at +-delta
    mf graphed    the same as mf split with train.cuda_graph_jvp (CUDA only)
    func.jvp      the usual PyTorch way (py-meanflow): torch.func.jvp over the WHOLE batch
                  with torch.nn's layers and PyTorch's forward-AD rules, u taken from its
                  primal output (the graph records the tangent computation too)
    func.jvp compiled   the same under torch.compile (--compile: minutes on a CPU), its norms
                  written as mean/var ops (torch's norm rules do not trace under compile)

at ``--ratio`` of samples with r != t (default 25%, the AFHQ and ImageNet configs), each model
at a small and a large batch. Columns: the step time (median of ``--iters`` steps after a
warm-up, the modes interleaved; on a CPU the process's CPU time, one thread by default, so
that other jobs on a shared machine move it little; on CUDA wall time) and its ratio to flow
matching; the aten ops dispatched in one step (a
TorchDispatchMode counter: each is a kernel launch on a GPU, so on a GPU the count, not the
FLOPs, sets the cost of the small tangent ops) and their ratio; the peak memory of one step
(CUDA: max_memory_allocated; CPU: the resident-set high-water mark of a fresh subprocess above
its level just before its first step, with glibc's default allocator, so that the resident
set follows live memory) and its ratio. Networks are built with dropout 0 (the finite
difference refuses active dropout) and every zero-initialised parameter made non-zero.

Then, per model, the error of the finite difference against the exact JVP (fp32, relative
||fd - jvp|| / ||jvp|| on the r != t samples), at several deltas, with the exact fp32 JVP
against an fp64 one as the round-off floor.

    python bench/jvp_overhead.py [--quick] [--device cuda] [--models unet-demo,unet-afhq32]
        [--compile] [--ratio 0.25]
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
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from meanflow import MeanFlowConfig, MeanFlowLoss  # noqa: E402
from meanflow.objective import sample_times  # noqa: E402
from meanflow.runtime import tune_cpu_allocator  # noqa: E402

FD_DELTA = 1e-3
MODES = ("fm", "mf split", "mf fd", "mf graphed", "func.jvp", "func.jvp compiled")

# name -> (config, model overrides, small batch, large batch)
MODELS = {
    "unet-demo": ("configs/fashion_demo.yaml", {}, 8, 32),
    "unet-afhq32": ("configs/afhq_unet.yaml", dict(base_channels=32), 4, 16),
    "unet-afhq": ("configs/afhq_unet.yaml", {}, 4, 16),
    "SiT-B/2": ("configs/afhq_sit_b2.yaml", {}, 4, 16),
    # the AFHQ SiT (edge tokens) at the S/4 size: 64 latent + 64 edge tokens, seconds a step
    "sit-s4": ("configs/afhq_sit_b2.yaml", dict(name="SiT-S/4"), 4, 8),
}
QUICK = "unet-demo,unet-afhq32"


def build(name: str, device: str, stock: bool = False, dtype=torch.float32):
    import models
    from meanflow.config import load_config
    from models.layers import _FAST_JVP_CLASSES
    path, over, small, large = MODELS[name]
    mc = load_config(ROOT / path).model
    for k, v in over.items():
        setattr(mc, k, v)
    if hasattr(mc, "dropout"):
        mc.dropout = 0.0
    torch.manual_seed(0)
    net = models.build(mc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                     # zero-initialised layers would hide paths
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    if stock:                                 # torch.nn's own classes and forward-AD rules
        back = {v: k for k, v in _FAST_JVP_CLASSES.items()}
        for m in net.modules():
            m.__class__ = back.get(type(m), type(m))
    net = net.to(device, dtype)
    shape = (mc.in_channels, mc.input_size, mc.input_size)
    edge = (mc.edge_channels, mc.edge_size, mc.edge_size) if mc.edge_channels else None
    return net, shape, edge, (small, large)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class _MeanVarGroupNorm(torch.nn.GroupNorm):
    """GroupNorm from mean/var ops: torch.compile traces torch.func.jvp through these (its
    own group/layer norm rules hit an internal assert in make_dual under compile)."""

    def forward(self, x):
        n = x.shape[0]
        h = x.reshape(n, self.num_groups, -1)
        var, mean = torch.var_mean(h, dim=-1, keepdim=True, correction=0)
        h = ((h - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return h * self.weight.reshape(shape) + self.bias.reshape(shape)


class _MeanVarLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        dims = tuple(range(-len(self.normalized_shape), 0))
        var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
        h = (x - mean) * torch.rsqrt(var + self.eps)
        return h if self.weight is None else h * self.weight + self.bias


def mean_var_norms(net):
    """``net`` with its GroupNorm/LayerNorm layers computing from mean/var ops (in place)."""
    for m in net.modules():
        if type(m) is torch.nn.GroupNorm:
            m.__class__ = _MeanVarGroupNorm
        elif type(m) is torch.nn.LayerNorm:
            m.__class__ = _MeanVarLayerNorm
    return net


def _func_jvp_loss(net, z, r, t, v, edge):
    """py-meanflow's step: u and du/dt from torch.func.jvp over the whole batch."""
    u, dudt = torch.func.jvp(lambda zz, tt: net(zz, r, tt, edge=edge), (z, t),
                             (v, torch.ones_like(t)))
    tgt = (v - (t - r).view(-1, 1, 1, 1) * dudt).detach()
    d = ((u - tgt) ** 2).flatten(1).sum(1)
    return (d / (d.detach() + 1e-3)).mean()


def make_step(mode: str, net, x, edge, ratio: float):
    """A closure running one training step (forward + backward) of ``mode``."""
    cfg = MeanFlowConfig(ratio_r_neq_t=ratio, cond_drop_prob=0.0, cfg_omega=1.0,
                         fd_delta=FD_DELTA if mode == "mf fd" else 0.0)
    loss_fn = MeanFlowLoss(cfg, check_values=False)
    if mode == "mf graphed":
        from meanflow.jvp_graph import GraphedJVP
        loss_fn.jvp_graph = GraphedJVP()
    compiled = None
    if mode == "func.jvp compiled":
        mean_var_norms(net)
        compiled = torch.compile(_func_jvp_loss)
    b, dev = x.shape[0], x.device

    def step():
        if mode == "fm":
            t = torch.rand(b, device=dev)
            e = torch.randn_like(x)
            z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
            d = ((net(z, t, t, edge=edge) - (e - x)) ** 2).flatten(1).sum(1)
            loss = (d / (d.detach() + 1e-3)).mean()
        elif mode.startswith("func.jvp"):
            r, t = sample_times(cfg, b, dev)
            e = torch.randn_like(x)
            z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
            loss = (compiled or _func_jvp_loss)(net, z, r, t, e - x, edge)
        else:
            loss = loss_fn(net, x, edge).loss
        loss.backward()
        net.zero_grad(set_to_none=True)
    return step


def _inputs(name: str, batch: int, device: str, stock: bool):
    net, shape, eshape, _ = build(name, device, stock=stock)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g).to(device)
    edge = ((torch.rand(batch, *eshape, generator=g) > 0.8).float().to(device) if eshape
            else None)
    return net, x, edge


def _clock(device: str) -> float:
    """CPU: this process's CPU time (what other jobs on a shared machine barely move);
    CUDA: wall time after a synchronisation."""
    if device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def measure(name: str, modes: list[str], batch: int, device: str, iters: int,
            ratio: float) -> dict:
    """Step time and aten ops of every mode, the modes' steps interleaved round by round so
    that a change in the machine's load moves them all alike."""
    fast = _inputs(name, batch, device, stock=False)
    stock = _inputs(name, batch, device, stock=True) if any(
        m.startswith("func.jvp") for m in modes) else None
    steps = {}
    for m in modes:
        # the compiled row gets its own copy: it rewrites the norms
        net_in = (_inputs(name, batch, device, stock=True) if "compiled" in m
                  else stock if m.startswith("func.jvp") else fast)
        steps[m] = make_step(m, *net_in, ratio)
    out = {}
    for m, step in list(steps.items()):
        try:
            for _ in range(2):            # lazy initialisation, compilation, graph capture
                step()
        except Exception as e:            # a row that fails (e.g. compile) leaves the others
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            out[m] = dict(error=f"{type(e).__name__}: {msg}"[:160])
            del steps[m]
            continue
        ops = None
        if "compiled" not in m and "graphed" not in m:
            with OpCounter() as c:
                step()
            ops = c.n
        out[m] = dict(ops=ops, times=[])
    for _ in range(iters):
        for m, step in steps.items():
            t0 = _clock(device)
            step()
            out[m]["times"].append(_clock(device) - t0)
    for m in steps:
        out[m]["time"] = statistics.median(out[m].pop("times"))
    return out


def peak_memory(name: str, mode: str, batch: int, device: str, ratio: float) -> int:
    """Bytes above the level before the step, of one step after one warm-up step."""
    net, x, edge = _inputs(name, batch, device, stock=mode.startswith("func.jvp"))
    step = make_step(mode, net, x, edge, ratio)
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        return max(torch.cuda.max_memory_allocated() - base, 0)
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)


def fd_bias(name: str, device: str, batch: int = 4) -> dict:
    """Relative error of the batched finite difference against the exact JVP (fp32), at
    several deltas; 'fp32 jvp' is the exact fp32 JVP against an fp64 one."""
    from meanflow.objective import _jvp, fd_dudt
    out = {}
    nets = {dt: build(name, device, dtype=dt) for dt in (torch.float32, torch.float64)}
    net, shape, eshape, _ = nets[torch.float32]
    g = torch.Generator().manual_seed(2)
    z = torch.randn(batch, *shape, generator=g, dtype=torch.float64).to(device)
    v = torch.randn(batch, *shape, generator=g, dtype=torch.float64).to(device)
    t = (torch.rand(batch, generator=g, dtype=torch.float64) * 0.8 + 0.1).to(device)
    r = t * 0.5
    edge = ((torch.rand(batch, *eshape, generator=g) > 0.8).double().to(device) if eshape
            else None)
    with torch.no_grad():
        ref = _jvp(nets[torch.float64][0], z, r, t, v, dict(edge=edge))[1]
        c32 = dict(edge=None if edge is None else edge.float())
        args = (z.float(), r.float(), t.float(), v.float())
        exact = _jvp(net, *args, c32)[1].double()
        out["fp32 jvp"] = ((exact - ref).norm() / ref.norm()).item()
        for delta in (1e-2, 3e-3, 1e-3, 3e-4, 1e-4):
            fd = fd_dudt(net, *args, delta, c32).double()
            out[f"fd {delta:g}"] = ((fd - exact).norm() / exact.norm()).item()
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)


def _last_json(res: subprocess.CompletedProcess):
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="unet-demo,unet-afhq32,SiT-B/2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--ratio", type=float, default=0.25, help="fraction of r != t samples")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch's default); 1 keeps the CPU-time clock "
                         "honest on a shared machine")
    ap.add_argument("--quick", action="store_true",
                    help=f"models {QUICK}, 3 iters, memory at the large batch only")
    ap.add_argument("--compile", action="store_true",
                    help="add the torch.compile'd torch.func.jvp row (minutes on a CPU)")
    ap.add_argument("--no-mallopt", action="store_true",
                    help="keep glibc's default allocator thresholds (see meanflow/runtime.py)")
    ap.add_argument("--_child", nargs=2, metavar=("MODEL", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--_peak", nargs=3, metavar=("MODEL", "MODE", "BATCH"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--_modes", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_bias", metavar="MODEL", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not a.no_mallopt:
        tune_cpu_allocator()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a._bias:
        print(json.dumps(fd_bias(a._bias, a.device)))
        return
    if a._peak:                       # one step in a fresh process (a clean RSS peak)
        name, mode, batch = a._peak
        print(json.dumps(peak_memory(name, mode, int(batch), a.device, a.ratio)))
        return
    if a._child:
        name, batch = a._child
        print(json.dumps(measure(name, a._modes.split(","), int(batch), a.device, a.iters,
                                 a.ratio)))
        return
    names = QUICK.split(",") if a.quick else a.models.split(",")
    iters = 3 if a.quick else a.iters
    modes = [m for m in MODES if (m != "mf graphed" or a.device == "cuda")
             and (m != "func.jvp compiled" or a.compile)]
    clock = "wall time" if a.device == "cuda" else "process CPU time"
    print(f"device {a.device}, torch {torch.__version__}, threads "
          f"{a.threads or torch.get_num_threads()}, fp32, r != t {a.ratio:.0%}, {clock}: "
          f"median of {iters} interleaved steps, allocator tuned: {not a.no_mallopt}")
    print("| model | batch | mode | step (s) | time / FM | aten ops | ops / FM | peak (MB) "
          "| memory / FM |")
    print("|---|---|---|---|---|---|---|---|---|")
    common = ["--device", a.device, "--threads", str(a.threads), "--ratio", str(a.ratio)]
    for name in names:
        for i, batch in enumerate(MODELS[name][2:]):
            res = _child(["--_child", name, str(batch), "--_modes", ",".join(modes),
                          "--iters", str(iters), *common]
                         + (["--no-mallopt"] if a.no_mallopt else []))
            if res.returncode:
                why = (res.stderr.strip().splitlines() or ["?"])[-1][:150]
                print(f"| {name} | {batch} | all | failed: {why} | | | | | |", flush=True)
                continue
            rows = _last_json(res)
            peaks = {}
            if not a.quick or i == 1:
                for mode in (m for m in modes if "error" not in rows[m]):
                    mem = _child(["--_peak", name, mode, str(batch), *common, "--no-mallopt"])
                    peaks[mode] = _last_json(mem) if mem.returncode == 0 else None
            fm = rows["fm"]
            for mode in modes:
                r = rows[mode]
                if "error" in r:
                    print(f"| {name} | {batch} | {mode} | failed: {r['error']} | | | | | |",
                          flush=True)
                    continue
                ops = "-" if r["ops"] is None else f"{r['ops']:,}"
                ops_r = "-" if r["ops"] is None else f"{r['ops'] / fm['ops']:.2f}x"
                pk, pk0 = peaks.get(mode), peaks.get("fm")
                peak = "-" if pk is None else f"{pk / 2**20:.0f}"
                peak_r = "-" if pk is None or not pk0 else f"{pk / pk0:.2f}x"
                print(f"| {name} | {batch} | {mode} | {r['time']:.3f} | "
                      f"{r['time'] / fm['time']:.2f}x | {ops} | {ops_r} | {peak} | {peak_r} |",
                      flush=True)
    print()
    print("finite difference against the exact JVP, fp32, relative L2 error on r != t "
          f"samples (the runs above use delta {FD_DELTA:g}):")
    for name in names:
        res = _child(["--_bias", name, "--device", a.device, "--threads", str(a.threads)])
        if res.returncode:
            print(f"  {name}: failed: {res.stderr.strip().splitlines()[-1][:150]}")
            continue
        b = _last_json(res)
        print(f"  {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in b.items()), flush=True)


if __name__ == "__main__":
    main()
