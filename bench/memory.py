"""Memory plan: what each shipped config needs per GPU, and the largest batch that fits.

    python bench/memory.py [--quick] [--configs configs/afhq_unet.yaml ...] [--json out.json]

For every config: parameters; the fixed state of training (fp32 weights, gradients, AdamW's
two moments and one fp32 copy per EMA decay, autocast's bf16 weight copies); and the
activation memory per sample, measured
on the CPU for a flow-matching step (r = t only) and for the MeanFlow step at the config's
r != t share, in fp32 and under bf16 autocast. Activations are measured by tracking every
tensor allocated during forward + JVP + backward (a dispatch mode with a finaliser per
storage: the peak of live bytes up to the loss, where everything kept for the backward
pass is alive), at two batch sizes; the slope is the per-sample cost and cancels what does
not grow with the batch. From those, the per-GPU memory at the config's
batch on its stated hardware, and the largest per-GPU batch at 12, 24 and 80 GB in bf16.

Estimates, not CUDA measurements: CUDA adds its context and workspaces (OVERHEAD_GIB below),
cuDNN/SDPA may pick kernels that keep other buffers, and CPU autocast casts a similar but not
identical set of ops. `make gpu-check` measures the real peak on a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import models  # noqa: E402
from meanflow.config import load_config  # noqa: E402
from meanflow.objective import MeanFlowLoss  # noqa: E402

GIB = 2 ** 30
MIB = 2 ** 20
OVERHEAD_GIB = 1.0        # CUDA context, cuBLAS/cuDNN workspaces, allocator slack (assumed)
USABLE = 0.92             # of a card's memory the caching allocator can hand out in practice
CARDS_GB = (12, 24, 80)
# the hardware each shipped config is written for: (GPUs, GB per GPU)
STATED = {"afhq_unet": (1, 12), "afhq_sit_b2": (8, 24), "imagenet_sit_b4": (8, 24),
          "fashion_demo": (1, 12), "fashion_class": (1, 12)}


class LiveBytes(TorchDispatchMode):
    """Peak of the bytes held by tensors allocated inside the mode (views share a storage)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = id(st)
                if key not in self.live:
                    self.live[key] = st.nbytes()
                    self.now += st.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, key)
        return out


def step_peak(net, cfg, batch: int, ratio: float, bf16: bool) -> int:
    """Peak bytes allocated by one training step's forward passes (guidance, JVP, forward
    with graph) up to the loss."""
    mc, mf = cfg.model, cfg.meanflow
    mf.ratio_r_neq_t = ratio
    loss_fn = MeanFlowLoss(mf, check_values=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, mc.in_channels, mc.input_size, mc.input_size, generator=g)
    edge = (torch.rand(batch, mc.edge_channels, mc.edge_size, mc.edge_size, generator=g)
            if mc.edge_channels else None)
    label = torch.randint(0, mc.num_classes, (batch,), generator=g) if mc.num_classes else None
    d = loss_fn.draw(tuple(x.shape[1:]), batch, seed=0, step=0,
                     has_cond=edge is not None or label is not None)
    net.zero_grad(set_to_none=True)
    with LiveBytes() as mem, torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = loss_fn(net, x, edge, label, noise=d.noise, r=d.r, t=d.t, keep=d.keep,
                      neq_idx=d.neq_idx)
        # the activations kept for backward are all alive here, with the JVP pass's
        # transients already freed: the peak so far is what grows with the batch (at a
        # large batch it sets the step's peak; the gradients come on top and are fixed)
        peak = mem.peak
        out.loss.backward()
        del out
    net.zero_grad(set_to_none=True)
    return peak


def plan(path: Path, batches: tuple[int, int]) -> dict:
    cfg = load_config(path)
    torch.manual_seed(0)
    net = models.build(cfg.model).train()
    n = sum(p.numel() for p in net.parameters())
    n_ema = len(cfg.train.ema_decays)
    # fp32 weights, grads, AdamW (2), EMAs; + autocast's bf16 weight copies
    fixed = 4 * n * (1 + 1 + 2 + n_ema) + 2 * n
    ratio = cfg.meanflow.ratio_r_neq_t
    act = {}
    for name, r, bf16 in (("fm_fp32", 0.0, False), ("mf_fp32", ratio, False),
                          ("fm_bf16", 0.0, True), ("mf_bf16", ratio, True)):
        lo, hi = (step_peak(net, cfg, b, r, bf16) for b in batches)
        act[name] = (hi - lo) / (batches[1] - batches[0])
    gpus, card = STATED.get(path.stem, (1, 12))
    per_gpu = max(1, cfg.train.batch_size // gpus)
    need = fixed + act["mf_bf16"] * per_gpu + OVERHEAD_GIB * GIB
    fits = {gb: max(0, math.floor((gb * 1e9 * USABLE - fixed - OVERHEAD_GIB * GIB)
                                  / act["mf_bf16"])) for gb in CARDS_GB}
    return dict(config=path.stem, params_m=n / 1e6, fixed_gib=fixed / GIB,
                act_mib={k: v / MIB for k, v in act.items()}, ratio=ratio,
                stated_gpus=gpus, stated_gb=card, per_gpu_batch=per_gpu,
                need_gb=need / 1e9, fits_stated=need <= card * 1e9 * USABLE,
                max_batch_bf16_mf=fits)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="*", type=Path, default=None,
                    help="default: every configs/*.yaml")
    ap.add_argument("--quick", action="store_true", help="batches 1 and 2 (default 2 and 4)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    a = ap.parse_args(argv)
    paths = a.configs or sorted((ROOT / "configs").glob("*.yaml"))
    batches = (1, 2) if a.quick else (2, 4)
    rows = []
    print(f"activation bytes per sample: slope between batches {batches[0]} and {batches[1]} "
          f"on the CPU; + {OVERHEAD_GIB:.0f} GiB CUDA overhead, {USABLE:.0%} of a card usable")
    print("| config | params | weights+grads+AdamW+EMA | act/sample FM fp32 | MF fp32 | FM bf16 "
          "| MF bf16 | stated GPUs | batch/GPU | need (bf16 MF) | fits | max batch/GPU at "
          + " / ".join(f"{g} GB" for g in CARDS_GB) + " |")
    print("|" + "---|" * 12)
    for p in paths:
        r = plan(p, batches)
        rows.append(r)
        a_ = r["act_mib"]
        print(f"| {r['config']} | {r['params_m']:.1f}M | {r['fixed_gib']:.2f} GiB | "
              f"{a_['fm_fp32']:.1f} MiB | {a_['mf_fp32']:.1f} MiB | {a_['fm_bf16']:.1f} MiB | "
              f"{a_['mf_bf16']:.1f} MiB | {r['stated_gpus']} x {r['stated_gb']} GB | "
              f"{r['per_gpu_batch']} | {r['need_gb']:.1f} GB | "
              f"{'yes' if r['fits_stated'] else 'NO'} | "
              + " / ".join(str(r["max_batch_bf16_mf"][g]) for g in CARDS_GB) + " |",
              flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
