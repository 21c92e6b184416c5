"""The options that lower the cost or the variance of MeanFlow's r != t targets, each against a
known answer: AlphaFlow's trajectory target, a teacher's velocity, the finite-difference du/dt,
Decoupled MeanFlow's time sampling, and warm starts from this project's or DiT/SiT weights.

The closed form used throughout: for data that is a single point x0, every path
z_t = (1 - t) x0 + t e is a straight line with velocity v = e - x0 = (z_t - x0) / t, so the
average velocity over any [r, t] is u*(z, r, t) = (z - x0) / t, and the marginal velocity is
the same function. An exact network must then get its own output back as the target.
"""
from __future__ import annotations

import math

import pytest
import torch

from meanflow import MeanFlowConfig, MeanFlowLoss
from meanflow.objective import sample_times

X0 = torch.linspace(-1, 1, 16, dtype=torch.float64).view(1, 1, 4, 4)


def exact(wrong: float = 0.0):
    """u*(z, r, t) = (z - x0) / t, plus ``wrong`` x (t - r): a network that is off by an
    amount that grows with the interval (its own MeanFlow identity fails)."""
    def u(z, r, t, edge=None, label=None, keep=None):
        return (z - X0) / t.view(-1, 1, 1, 1) + wrong * (t - r).view(-1, 1, 1, 1)
    return u


def batch(n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = X0.expand(n, -1, -1, -1).clone()
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    a = torch.rand(2, n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return x, noise, a.min(0).values, a.max(0).values           # r < t everywhere


def target(model, alpha=0.0, fd=0.0, teacher=None, n=32, seed=0):
    x, noise, r, t = batch(n, seed)
    loss = MeanFlowLoss(MeanFlowConfig(fd_delta=fd, adaptive_p=0.0), teacher=teacher)
    out = loss(model, x, noise=noise, r=r, t=t, alpha=alpha)
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.5, 1.0])
def test_an_exact_network_is_its_own_target_for_every_alpha(alpha):
    assert target(exact(), alpha=alpha).stats["mse"].item() < 1e-20
    # a wrong network is not: the check can fail
    assert target(exact(1.0), alpha=alpha).stats["mse"].item() > 1e-4


def test_alphaflow_at_alpha_one_is_flow_matching_at_every_r():
    x, noise, r, t = batch()
    loss = MeanFlowLoss(MeanFlowConfig(adaptive_p=0.0))
    zero = lambda z, r, t, **k: torch.zeros_like(z)          # noqa: E731
    out = loss(zero, x, noise=noise, r=r, t=t, alpha=1.0)
    # u = 0, so the mean squared error is that of the target: v = e - x everywhere
    assert out.stats["mse"].item() == pytest.approx((noise - x).pow(2).mean().item(), rel=1e-12)


def test_alphaflow_target_formula_on_a_linear_network():
    # u(z, r, t) = A z + b t + c r: the target is alpha v + (1 - alpha) u(z - d v, r, t - d)
    a_, b_, c_ = 0.7, 0.3, -0.2
    net = lambda z, r, t, **k: a_ * z + (b_ * t + c_ * r).view(-1, 1, 1, 1)   # noqa: E731
    from meanflow.objective import meanflow_target
    x, noise, r, t = batch(8)
    tb = t.view(-1, 1, 1, 1)
    z, v = (1 - tb) * x + tb * noise, noise - x
    alpha = 0.3
    _, tgt = meanflow_target(net, z, r, t, v, alpha=alpha)
    d = (alpha * (t - r)).view(-1, 1, 1, 1)
    want = alpha * v + (1 - alpha) * (a_ * (z - d * v) + b_ * (tb - d) + c_ * r.view(-1, 1, 1, 1))
    assert torch.allclose(tgt, want, rtol=1e-12, atol=1e-12)


def test_alpha_schedule():
    cfg = MeanFlowConfig(alpha_steps=1000, alpha_start=100)
    a = [cfg.alpha_at(s) for s in range(0, 1200, 10)]
    assert a[0] == 1.0 and cfg.alpha_at(100) == 1.0 and cfg.alpha_at(1100) == 0.0
    assert all(x >= y for x, y in zip(a, a[1:]))                   # never rises
    assert cfg.alpha_at(600) == pytest.approx(0.5, abs=1e-9)        # the sigmoid's middle
    assert MeanFlowConfig().alpha_at(5) == 0.0                      # off: the JVP target
    assert cfg.alpha_at(1099) == 0.0                                # below alpha_min: JVP


def test_teacher_velocity_replaces_e_minus_x():
    const = 0.25
    teacher = lambda z, r, t, **k: torch.full_like(z, const)       # noqa: E731
    zero = lambda z, r, t, **k: torch.zeros_like(z)                 # noqa: E731
    out = target(zero, teacher=teacher)
    assert out.stats["mse"].item() == pytest.approx(const ** 2, rel=1e-12)
    # the exact marginal velocity as teacher, the exact average velocity as student: zero
    assert target(exact(), teacher=exact()).stats["mse"].item() < 1e-20


def test_finite_difference_matches_the_jvp():
    from models.tiny import TinyConvNet
    torch.manual_seed(0)
    net = TinyConvNet(in_channels=1, ch=8).double()
    x, noise, r, t = batch(8)
    jvp = MeanFlowLoss(MeanFlowConfig(adaptive_p=0.0))
    fd = MeanFlowLoss(MeanFlowConfig(adaptive_p=0.0, fd_delta=1e-4))
    a = jvp(net, x, noise=noise, r=r, t=t).stats["tgt_rms"].item()
    b = fd(net, x, noise=noise, r=r, t=t).stats["tgt_rms"].item()
    assert b == pytest.approx(a, rel=1e-6)
    # and its exact answer on the closed form
    assert target(exact(), fd=1e-3).stats["mse"].item() < 1e-12


def test_dmf_times_spend_r_neq_t_on_long_intervals():
    g = torch.Generator().manual_seed(0)
    base = MeanFlowConfig(ratio_r_neq_t=1.0)
    dmf = MeanFlowConfig(ratio_r_neq_t=1.0, time_dist="dmf", time_mu=0.4, time_mu_r=-1.2)
    r0, t0 = sample_times(base, 20000, generator=g)
    r1, t1 = sample_times(dmf, 20000, generator=g)
    assert (r1 <= t1).all() and (r1 >= 0).all() and (t1 <= 1).all()
    assert (t1 - r1).mean() > (t0 - r0).mean() + 0.1
    # the max/min of N(0.4, 1) and N(-1.2, 1) in logit space: E[t - r] by numerical integral
    n = torch.distributions.Normal(0.0, 1.0)
    grid = torch.linspace(-8, 8, 1601, dtype=torch.float64)
    w = n.log_prob(grid).exp() * (grid[1] - grid[0])
    s1, s2 = torch.sigmoid(grid + 0.4), torch.sigmoid(grid - 1.2)
    want = ((s1[:, None] - s2[None, :]).abs() * w[:, None] * w[None, :]).sum().item()
    assert (t1 - r1).mean().item() == pytest.approx(want, abs=0.01)


# --------------------------------------------------------------------------------------------
# Warm starts
# --------------------------------------------------------------------------------------------
def _sit():
    import models
    from meanflow.config import ModelConfig
    cfg = ModelConfig(name="SiT-S/4", input_size=8, in_channels=4, edge_channels=0,
                      edge_size=0, num_classes=10)
    torch.manual_seed(0)
    net = models.build(cfg)
    for p in net.parameters():                 # leave adaLN-Zero: every path contributes
        torch.nn.init.normal_(p, std=0.05)
    return cfg, net


def test_warm_start_from_an_export_of_this_project(tmp_path):
    import models
    from meanflow.config import Config
    from meanflow.export import export_model
    from meanflow.warmstart import WarmStartError, init_from
    mcfg, src = _sit()
    cfg = Config()
    cfg.model = mcfg
    export_model(tmp_path / "export", src, cfg, {"codec": "pixel"}, 7, 0.999)
    dst = models.build(mcfg)
    assert "step 7" in init_from(dst, tmp_path / "export")
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    other = models.build(type(mcfg)(name="SiT-S/4", input_size=8, in_channels=4,
                                    num_classes=0, edge_channels=0, edge_size=0))
    with pytest.raises(WarmStartError, match="does not match"):
        init_from(other, tmp_path / "export")


def test_warm_start_from_a_dit_state_dict_equals_the_flow_model_at_every_r(tmp_path):
    import models
    from meanflow.warmstart import init_from
    mcfg, src = _sit()
    # the same weights in DiT's layout: its names, a fixed pos_embed, a learn_sigma output
    dit = {}
    for k, v in src.state_dict().items():
        if k.startswith("cond.h_embedder."):
            continue                                   # DiT has no second time input
        k = k.replace("cond.t_embedder.", "t_embedder.").replace(
            "cond.y_embedder.weight", "y_embedder.embedding_table.weight")
        dit[k] = v.clone()
    dit["pos_embed"] = src.pos_embed[None].clone()
    w, b = dit["final_layer.linear.weight"], dit["final_layer.linear.bias"]
    pp, c = w.shape[0] // 4, 4
    w2 = torch.cat([w.view(pp, c, -1), torch.randn(pp, c, w.shape[1])], 1).reshape(2 * pp * c, -1)
    b2 = torch.cat([b.view(pp, c), torch.randn(pp, c)], 1).reshape(-1)
    dit["final_layer.linear.weight"], dit["final_layer.linear.bias"] = w2, b2
    torch.save(dit, tmp_path / "SiT-S-4.pt")

    dst = models.build(mcfg)
    msg = init_from(dst, tmp_path / "SiT-S-4.pt")
    assert "the (t - r) embedder starts at zero" in msg
    z = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.9, 0.5, 0.3])
    label = torch.tensor([1, 2, 3])
    with torch.no_grad():
        at_t = dst(z, t, t, label=label)
        for r in (torch.zeros(3), t * 0.5):
            assert torch.allclose(dst(z, r, t, label=label), at_t, atol=1e-6)
        # and it is the source network at r = t, up to the source's own (t - r = 0) term
        src.cond.h_embedder.mlp[2].weight.zero_()
        src.cond.h_embedder.mlp[2].bias.zero_()
        assert torch.allclose(src(z, t, t, label=label), at_t, atol=1e-6)


def test_warm_start_refuses_a_pickle_with_objects(tmp_path):
    import argparse

    from meanflow.warmstart import WarmStartError, init_from
    _, net = _sit()
    torch.save({"model": net.state_dict(), "args": argparse.Namespace(x=1)}, tmp_path / "c.pt")
    with pytest.raises(WarmStartError, match="not a plain tensor state dict"):
        init_from(net, tmp_path / "c.pt")
    with pytest.raises(WarmStartError, match="no such file"):
        init_from(net, tmp_path / "missing.pt")


def test_alpha_schedule_is_a_sigmoid_between_its_ends():
    cfg = MeanFlowConfig(alpha_steps=100, alpha_min=0.0)
    k = 12.0
    sig = lambda x: 1 / (1 + math.exp(-x))                     # noqa: E731
    want = (sig(-k * (0.25 - 0.5)) - sig(-k / 2)) / (sig(k / 2) - sig(-k / 2))
    assert cfg.alpha_at(25) == pytest.approx(want, rel=1e-12)


def test_the_options_table_judges_each_seed_against_the_issues_bars():
    """demo/options.py's last column: edge, MeanFlow's 1 step over flow matching's best
    step count (<= 1.1, and below flow matching's own 1 step); class, over flow matching's
    1 step (<= 1/3)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "demo" / "options.py"
    spec = importlib.util.spec_from_file_location("options_script", path)
    options = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(options)

    def run(**fids):
        return dict(results=[dict(steps=int(k[1:]), fid=v) for k, v in fids.items()])
    fm = run(s1=44.0, s2=40.0, s4=39.6, s16=48.0)
    assert options.versus("edge", run(s1=43.0), fm) == "1.09 met"       # 43 / 39.6
    assert options.versus("edge", run(s1=44.5), fm) == "1.12"           # above 1.1
    # within 1.1 of the best but not below flow matching's own 1 step: not met
    assert options.versus("edge", run(s1=43.0), run(s1=42.0, s4=39.6)) == "1.09"
    assert options.versus("class", run(s1=70.0), run(s1=220.0)) == "0.32 met"
    assert options.versus("class", run(s1=80.0), run(s1=220.0)) == "0.36"
    assert options.versus("class", run(s2=80.0), run(s1=220.0)) == "n/a"


def test_finite_difference_is_one_batched_forward_of_both_sides():
    """hi and lo run as ONE no-grad forward of the 2k r != t samples (one launch sequence
    instead of two), then the forward with a graph over the whole batch."""
    from models.tiny import TinyConvNet
    torch.manual_seed(0)
    net = TinyConvNet(in_channels=1, ch=8).double()
    sizes = []
    net.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    x, noise, r, t = batch(8)
    r = torch.where(torch.arange(8) < 3, r, t)                 # 5 samples with r = t
    MeanFlowLoss(MeanFlowConfig(adaptive_p=0.0, fd_delta=1e-4))(net, x, noise=noise, r=r, t=t)
    assert sizes == [6, 8]


def test_finite_difference_refuses_active_dropout():
    import models
    from meanflow.config import ModelConfig
    net = models.build(ModelConfig(name="unet", input_size=4, in_channels=1, edge_channels=0,
                                   base_channels=8, channel_mults=[1], num_res_blocks=1,
                                   attn_resolutions=[], dropout=0.1)).double()
    x, noise, r, t = batch(4)
    loss = MeanFlowLoss(MeanFlowConfig(adaptive_p=0.0, fd_delta=1e-4))
    with pytest.raises(ValueError, match="fd_delta needs a network without active dropout"):
        loss(net, x, noise=noise, r=r, t=t)
    net.eval()                                                  # no active dropout: runs
    assert torch.isfinite(loss(net, x, noise=noise, r=r, t=t).loss)
