"""The JVP under DistributedDataParallel: gradients are synchronised.

Two gloo processes on CPU, each with half of the batch, must produce the gradients that one
process computes on the full batch, at the first AND the second optimizer step (torch.func.jvp
through DDP fails at the second step; on ``ddp.module`` it skips the all-reduce silently).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
B = 8


def _setup(jvp_mode: str, seed: int = 0):
    from meanflow import MeanFlowConfig, MeanFlowLoss
    from models.tiny import TinyConvNet

    torch.manual_seed(seed)
    net = TinyConvNet(in_channels=1, ch=16, edge_channels=1, num_classes=4)
    # Guidance on, so the no-grad u(z, t, t | null) forwards run through DDP as well.
    loss_fn = MeanFlowLoss(MeanFlowConfig(ratio_r_neq_t=0.5, cfg_omega=1.5, cfg_kappa=0.2,
                                          jvp_mode=jvp_mode))
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(B, 1, 8, 8, generator=g)
        edge = (torch.rand(B, 1, 8, 8, generator=g) > 0.7).float()
        label = torch.randint(0, 4, (B,), generator=g)
        noise = torch.randn(B, 1, 8, 8, generator=g)
        a = torch.rand(2, B, generator=g)
        r, t = a.min(0).values, a.max(0).values
        keep = torch.rand(B, generator=g) > 0.25
        batches.append(dict(x=x, edge=edge, label=label, noise=noise, r=r, t=t, keep=keep))
    return net, loss_fn, batches


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, loss_fn, batches, sl: slice, world: int) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = {}
    for step, bt in enumerate(batches):
        part = {k: v[sl] for k, v in bt.items()}
        res = loss_fn(model, part["x"], part["edge"], part["label"], noise=part["noise"],
                      r=part["r"], t=part["t"], keep=part["keep"])
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        for n, g in _grads(model).items():
            out[f"step{step}.{n.removeprefix('module.')}"] = g
        opt.step()
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str, jvp_mode: str) -> None:
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        net, loss_fn, batches = _setup(jvp_mode)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        n = B // world
        grads = _run(ddp, loss_fn, batches, slice(rank * n, (rank + 1) * n), world)
        save_file(grads, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("jvp_mode", ["split", "joint"])
def test_ddp_gradients_equal_single_process_full_batch(tmp_path, jvp_mode):
    torch.set_num_threads(1)
    net, loss_fn, batches = _setup(jvp_mode)
    ref = _run(net, loss_fn, batches, slice(0, B), 1)

    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), jvp_mode), nprocs=2,
                       join=True, start_method="spawn")
    g0 = load_file(str(tmp_path / "rank0.safetensors"))
    g1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert set(g0) == set(ref) and len(ref) > 0
    assert any(k.startswith(f"step{STEPS - 1}.") for k in ref)
    for k, want in ref.items():
        assert torch.equal(g0[k], g1[k]), f"ranks disagree on {k}: gradients not synchronised"
        assert torch.allclose(g0[k], want, rtol=1e-4, atol=1e-6), \
            f"{k}: DDP gradient differs from the full-batch one by {(g0[k] - want).abs().max()}"
