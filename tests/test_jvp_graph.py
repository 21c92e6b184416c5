"""train.cuda_graph_jvp: refused off CUDA with one line; on CUDA the replayed JVP targets equal
the eager ones (the CUDA tests do not run on a CPU-only machine)."""
from __future__ import annotations

import pytest
import torch

from meanflow import MeanFlowLoss
from meanflow.config import ConfigError, from_dict
from helpers import TINY_CFG, MetaAccelerator, fake_batch



def _cfg(**train):
    d = {k: dict(v) for k, v in TINY_CFG.items()}
    d["train"].update(train)
    return from_dict(d)


def test_config_refuses_cuda_graph_jvp_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.cuda_graph_jvp=true needs a CUDA device"):
        _cfg(cuda_graph_jvp=True)
    assert _cfg(cuda_graph_jvp=False).train.cuda_graph_jvp is False      # the default runs


def test_config_refuses_cuda_graph_jvp_with_the_joint_pass(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    d = {k: dict(v) for k, v in TINY_CFG.items()}
    d["train"]["cuda_graph_jvp"] = True
    d["meanflow"]["jvp_mode"] = "joint"
    with pytest.raises(ConfigError, match="needs meanflow.jvp_mode=split"):
        from_dict(d)


def test_train_step_refuses_cuda_graph_jvp_on_a_cpu_device():
    import models
    from meanflow import launch
    from meanflow import step as step_lib

    class CPUAccelerator(MetaAccelerator):
        device = torch.device("cpu")
    cfg = _cfg(fused_optimizer=False)
    cfg.train.cuda_graph_jvp = True              # as if validated on a machine with a GPU
    acc = CPUAccelerator()
    model, opt, ema, fwd = launch.prepare_training(acc, models.build(cfg.model), cfg)
    with pytest.raises(ValueError, match="cuda_graph_jvp=true needs a CUDA training device, "
                                         "got cpu"):
        step_lib.train_step(model, fwd, opt, ema, MeanFlowLoss(cfg.meanflow), [fake_batch()],
                            0, accelerator=acc, cfg=cfg, world=1, rank=0)


def _cuda_case(seed=0):
    import models
    cfg = _cfg()
    torch.manual_seed(seed)
    net = models.build(cfg.model).cuda().eval()          # eval: no dropout, equal masks
    with torch.no_grad():                                # every path active (no zero init)
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    b = fake_batch()
    x, edge, label = b["x"].cuda(), (b["edge"].cuda() / 255.0), b["label"].cuda()
    return cfg, net, x, edge, label


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_graphed_jvp_targets_equal_eager_ones_across_counts_and_weight_updates(dtype):
    from meanflow.jvp_graph import GraphedJVP
    from meanflow.objective import meanflow_target
    cfg, net, x, edge, label = _cuda_case()
    graphed = GraphedJVP(autocast_dtype=dtype)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    g = torch.Generator(device="cuda").manual_seed(0)
    for step, n_neq in enumerate((2, 5, 2, 8)):       # a ramp: one graph per r != t count
        z = torch.randn(x.shape, device="cuda", generator=g)
        v = torch.randn(x.shape, device="cuda", generator=g)
        t = torch.rand(8, device="cuda", generator=g) * 0.8 + 0.2
        r = t.clone()
        r[:n_neq] = t[:n_neq] * 0.3
        idx = torch.arange(n_neq, device="cuda")
        cond = dict(edge=edge, label=label, keep=None)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            _, eager = meanflow_target(net, z, r, t, v, neq_idx=idx, **cond)
            _, replay = meanflow_target(net, z, r, t, v, neq_idx=idx, jvp_graph=graphed,
                                        **cond)
        tol = 1e-5 if dtype is None else 2e-2
        assert torch.allclose(replay, eager, rtol=tol, atol=tol), (step, n_neq)
        assert not torch.equal(eager[:n_neq], v[:n_neq].float())      # the JVP term is there
        # an optimizer step updates the weights in place: the next replay must see them
        net.zero_grad()
        net(z, r, t, **cond).float().pow(2).mean().backward()
        opt.step()
    assert len(graphed) == 3                          # counts 2, 5, 8: captured once each


@pytest.mark.cuda
def test_train_step_with_cuda_graph_jvp_matches_the_eager_step():
    """Two steps of train_step (fp32, no dropout) give the same loss with and without graphs."""
    import models
    from meanflow import launch
    from meanflow import step as step_lib

    class CUDAAccelerator(MetaAccelerator):
        device = torch.device("cuda")
        mixed_precision = "no"
    losses = []
    for graphs in (False, True):
        cfg = _cfg(fused_optimizer=True, cuda_graph_jvp=graphs)
        torch.manual_seed(0)
        acc = CUDAAccelerator()
        model, opt, ema, fwd = launch.prepare_training(acc, models.build(cfg.model), cfg)
        loss_fn = MeanFlowLoss(cfg.meanflow)
        run = []
        for step in range(2):
            _, _, _, stats = step_lib.train_step(model, fwd, opt, ema, loss_fn, [fake_batch()],
                                                 step, accelerator=acc, cfg=cfg, world=1,
                                                 rank=0)
            run.append(stats["loss"].item())
        assert (loss_fn.jvp_graph is not None) == graphs
        losses.append(run)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
