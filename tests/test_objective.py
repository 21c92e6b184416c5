"""The MeanFlow objective against known answers.

1. JVP == central finite differences (float64).
2. Gaussian data: closed-form marginal and average velocities. The MeanFlow identity holds for
   the true u, fails for a perturbed one; the per-sample target averages to u; the 1-step
   sampler maps noise to the data distribution.
3. CFG folded into training: omega = 1, kappa = 0 is the unguided target; dropped -> v_g = v.
4. Bad input raises errors naming the argument.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import PY, run
from meanflow import MeanFlowConfig, MeanFlowLoss, meanflow_target, sample, sample_times
from meanflow.objective import guided_velocity
from models.tiny import TinyConvNet

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Closed forms for Gaussian data x ~ N(m, diag(s^2)) on the path z_t = (1 - t) x + t e
# --------------------------------------------------------------------------------------------
class GaussianFlow:
    """Marginal velocity v(z, t) and average velocity u(z, r, t), exactly.

    z_t ~ N((1 - t) m, sigma(t)^2), sigma(t)^2 = (1 - t)^2 s^2 + t^2. The probability-flow ODE
    keeps each standardised coordinate fixed, so
        z_r = (1 - r) m + sigma(r) / sigma(t) * (z_t - (1 - t) m),
        u(z_t, r, t) = (z_t - z_r) / (t - r),
        v(z_t, t) = -m + sigma'(t) / sigma(t) * (z_t - (1 - t) m).
    """

    def __init__(self, m: torch.Tensor, s: torch.Tensor):
        self.m, self.s = m, s

    def sigma(self, t):
        return torch.sqrt((1 - t) ** 2 * self.s ** 2 + t ** 2)

    def v(self, z, t):
        t = t[:, None]
        dlog = (t - (1 - t) * self.s ** 2) / ((1 - t) ** 2 * self.s ** 2 + t ** 2)
        return -self.m + dlog * (z - (1 - t) * self.m)

    def u(self, z, r, t, edge=None, label=None, keep=None):
        r_, t_ = r[:, None], t[:, None]
        h = t_ - r_
        zr = (1 - r_) * self.m + self.sigma(r_) / self.sigma(t_) * (z - (1 - t_) * self.m)
        safe_h = torch.where(h > 0, h, torch.ones_like(h))
        return torch.where(h > 0, (z - zr) / safe_h, self.v(z, t))

    def posterior(self, z, t, n, gen):
        """n draws of x ~ p(x | z_t = z) (Gaussian: prior N(m, s^2), z | x ~ N((1-t) x, t^2))."""
        prec = 1 / self.s ** 2 + (1 - t) ** 2 / t ** 2
        mean = (self.m / self.s ** 2 + (1 - t) * z / t ** 2) / prec
        return mean + prec.rsqrt() * torch.randn(n, z.shape[-1], generator=gen, dtype=z.dtype)


def _gauss(d=3):
    m = torch.tensor([1.5, -0.5, 0.25], dtype=torch.float64)[:d]
    s = torch.tensor([0.5, 1.3, 0.2], dtype=torch.float64)[:d]
    return GaussianFlow(m, s)


def _times(b, gen, dtype=torch.float64):
    a = torch.rand(2, b, generator=gen, dtype=dtype) * 0.9 + 0.05
    return a.min(0).values, a.max(0).values


# --------------------------------------------------------------------------------------------
# 1. JVP against finite differences
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tangent", ["sample", "model"])
@pytest.mark.parametrize("jvp_mode", ["split", "joint"])
def test_jvp_matches_central_finite_differences(jvp_mode, tangent):
    torch.manual_seed(0)
    net = TinyConvNet(in_channels=2, ch=16, edge_channels=1, num_classes=3).double().eval()
    b = 3
    z = torch.randn(b, 2, 8, 8, dtype=torch.float64)
    v = torch.randn_like(z)
    r, t = _times(b, torch.Generator().manual_seed(1))
    cond = dict(edge=torch.rand(b, 1, 8, 8, dtype=torch.float64), label=torch.tensor([0, 2, 1]),
                keep=torch.tensor([True, False, True]))
    r[1] = t[1]                     # one boundary sample: its JVP term must vanish
    u, u_tgt = meanflow_target(net, z, r, t, v, jvp_mode, tangent, **cond)
    assert torch.equal(u_tgt[1], v[1])
    keep_idx = [0, 2]
    dudt = ((v - u_tgt) / (t - r)[:, None, None, None])[keep_idx]
    eps = 1e-6
    with torch.no_grad():   # the z-direction: v itself, or the network's u(z, t, t)
        w = v if tangent == "sample" else net(z, t, t, **cond)
        fd = (net(z + eps * w, r, t + eps, **cond) - net(z - eps * w, r, t - eps, **cond)) / (2 * eps)
    fd = fd[keep_idx]
    rel = (dudt - fd).norm() / fd.norm()
    assert rel < 1e-6, rel
    assert torch.allclose(u, net(z, r, t, **cond))


# --------------------------------------------------------------------------------------------
# 2. Gaussian data with a known answer
# --------------------------------------------------------------------------------------------
def test_meanflow_identity_holds_for_true_u_and_fails_for_perturbed_u():
    g = _gauss()
    gen = torch.Generator().manual_seed(0)
    b = 64
    r, t = _times(b, gen)
    z = (1 - t[:, None]) * (g.m + g.s * torch.randn(b, 3, generator=gen, dtype=torch.float64)) \
        + t[:, None] * torch.randn(b, 3, generator=gen, dtype=torch.float64)
    u, u_tgt = meanflow_target(g.u, z, r, t, g.v(z, t))
    assert u.dtype == torch.float64
    assert (u_tgt - u).abs().max() < 1e-10
    # r = t: the target is the instantaneous velocity
    u0, tgt0 = meanflow_target(g.u, z, t, t, g.v(z, t))
    assert torch.allclose(u0, g.v(z, t)) and torch.allclose(tgt0, u0)

    def perturbed(z, r, t, **kw):
        return g.u(z, r, t) + 0.1 * t[:, None] * z
    up, up_tgt = meanflow_target(perturbed, z, r, t, g.v(z, t))
    assert (up_tgt - up).abs().max() > 1e-2


def test_per_sample_velocity_target_averages_to_u():
    g = _gauss()
    gen = torch.Generator().manual_seed(3)
    n = 40_000
    for (r0, t0) in [(0.2, 0.7), (0.0, 1.0 - 1e-3), (0.5, 0.55)]:
        z0 = torch.tensor([[0.3, -1.0, 0.8]], dtype=torch.float64)
        x = g.posterior(z0, t0, n, gen)                          # pairs (x, e) sharing z_t = z0
        e = (z0 - (1 - t0) * x) / t0
        z = z0.expand(n, 3)
        r = torch.full((n,), r0, dtype=torch.float64)
        t = torch.full((n,), t0, dtype=torch.float64)
        u, u_tgt = meanflow_target(g.u, z, r, t, e - x)
        se = u_tgt.std(0) / math.sqrt(n)
        err = (u_tgt.mean(0) - u[0]).abs()
        assert (err < 5 * se + 1e-9).all(), (r0, t0, err, se)
        assert u_tgt.std(0).max() > 1e-3      # the individual targets are noisy, the mean is not


def test_model_tangent_target_averages_to_u_and_its_jvp_term_ignores_the_sample():
    """tangent="model" (improved MeanFlow): with the exact u, u(z, t, t) is the marginal
    velocity, so the target is still unbiased, and u_tgt - (e - x) is the same for every
    pair (x, e) sharing z_t: the JVP term carries none of the sample's noise (with
    tangent="sample" it does)."""
    g = _gauss()
    gen = torch.Generator().manual_seed(4)
    n = 40_000
    for (r0, t0) in [(0.2, 0.7), (0.0, 1.0 - 1e-3)]:
        z0 = torch.tensor([[0.3, -1.0, 0.8]], dtype=torch.float64)
        x = g.posterior(z0, t0, n, gen)
        e = (z0 - (1 - t0) * x) / t0
        z = z0.expand(n, 3)
        r = torch.full((n,), r0, dtype=torch.float64)
        t = torch.full((n,), t0, dtype=torch.float64)
        u, u_tgt = meanflow_target(g.u, z, r, t, e - x, tangent="model")
        se = u_tgt.std(0) / math.sqrt(n)
        assert ((u_tgt.mean(0) - u[0]).abs() < 5 * se + 1e-9).all(), (r0, t0)
        assert (u_tgt - (e - x)).std(0).max() < 1e-12
        _, u_tgt_s = meanflow_target(g.u, z, r, t, e - x, tangent="sample")
        assert (u_tgt_s - (e - x)).std(0).max() > 1e-2
    with pytest.raises(ValueError, match="tangent"):
        meanflow_target(g.u, z, r, t, e - x, tangent="data")


def test_point_mass_data_per_sample_target_is_exact():
    g = GaussianFlow(torch.tensor([0.7, -1.2], dtype=torch.float64),
                     torch.zeros(2, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    b = 32
    r, t = _times(b, gen)
    e = torch.randn(b, 2, generator=gen, dtype=torch.float64)
    x = g.m.expand(b, 2)
    z = (1 - t[:, None]) * x + t[:, None] * e
    for tangent in ("sample", "model"):
        u, u_tgt = meanflow_target(g.u, z, r, t, e - x, tangent=tangent)
        assert (u_tgt - u).abs().max() < 1e-10, tangent


def test_one_step_sampler_on_true_u_reproduces_the_data_distribution():
    g = _gauss()
    n = 50_000
    noise = torch.randn(n, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x1 = sample(g.u, noise, steps=1)
    x4 = sample(g.u, noise, steps=4)
    assert torch.allclose(x1, x4, atol=1e-10)     # u is the exact average: steps do not matter
    mean, std = x1.mean(0), x1.std(0)
    assert ((mean - g.m).abs() < 4 * g.s / math.sqrt(n)).all(), (mean, g.m)
    assert ((std / g.s - 1).abs() < 4 * math.sqrt(0.5 / n)).all(), (std, g.s)
    cov = torch.cov(x1.T)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 4 * (g.s.max() ** 2) / math.sqrt(n)


# --------------------------------------------------------------------------------------------
# 3. CFG folded into training
# --------------------------------------------------------------------------------------------
def _conv_batch(b=6, seed=0):
    torch.manual_seed(seed)
    net = TinyConvNet(in_channels=1, ch=16, edge_channels=1, num_classes=0).double()
    x = torch.randn(b, 1, 8, 8, dtype=torch.float64)
    edge = (torch.rand(b, 1, 8, 8) > 0.7).double()
    return net, x, edge


def test_cfg_identity_settings_equal_unguided_target():
    net, x, edge = _conv_batch()
    b = x.shape[0]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    r, t = _times(b, gen)
    keep = torch.tensor([True, True, False, True, False, True])
    base = MeanFlowConfig(cfg_omega=1.0, cfg_kappa=0.0)
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    v = noise - x
    assert guided_velocity(net, z, t, v, base, keep, edge=edge) is v
    out1 = MeanFlowLoss(base)(net, x, edge, noise=noise, r=r, t=t, keep=keep)
    # omega = 2: guided samples change, dropped samples keep v_g = v
    guided = MeanFlowConfig(cfg_omega=2.0, cfg_kappa=0.3)
    vg = guided_velocity(net, z, t, v, guided, keep, edge=edge)
    assert torch.equal(vg[~keep], v[~keep])
    assert not torch.allclose(vg[keep], v[keep])
    # the same v_g (by hand) reproduces the loss's target: one code path for tangent and target
    with torch.no_grad():
        u_null = net(z, t, t, edge=edge, keep=torch.zeros(b, dtype=torch.bool))
        u_c = net(z, t, t, edge=edge, keep=keep)
    by_hand = 2.0 * v + 0.3 * u_c + (1 - 2.0 - 0.3) * u_null
    assert torch.allclose(vg[keep], by_hand[keep])
    # t outside [t_min, t_max]: unguided
    window = MeanFlowConfig(cfg_omega=2.0, cfg_t_min=0.0, cfg_t_max=0.0)
    assert torch.equal(guided_velocity(net, z, t, v, window, keep, edge=edge), v)
    out2 = MeanFlowLoss(guided)(net, x, edge, noise=noise, r=r, t=t, keep=keep)
    # (the weighted loss sits near 1 by construction: compare the targets through their RMS)
    _, tgt_plain = meanflow_target(net, z, r, t, v, edge=edge, keep=keep)
    assert torch.isclose(out1.stats["tgt_rms"], tgt_plain.pow(2).mean().sqrt())
    assert not torch.isclose(out1.stats["tgt_rms"], out2.stats["tgt_rms"])


def test_loss_stats_and_adaptive_weight():
    net, x, edge = _conv_batch()
    cfg = MeanFlowConfig(ratio_r_neq_t=0.5, adaptive_p=1.0, adaptive_c=1e-3)
    out = MeanFlowLoss(cfg)(net, x, edge, generator=torch.Generator().manual_seed(0))
    s = out.stats
    assert 0.0 < s["loss"].item() <= 1.0 + 1e-9      # sum_i d_i / (d_i + c) / B < 1
    assert s["mse"] > 0 and s["u_rms"] > 0 and s["tgt_rms"] > 0
    assert torch.isclose(s["rms_ratio"], s["u_rms"] / s["tgt_rms"])
    assert s["frac_r_neq_t"].item() == 0.5
    out.loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad and p is not net.null_edge)
    # p = 0: plain sum of squares per sample, averaged
    out0 = MeanFlowLoss(MeanFlowConfig(adaptive_p=0.0))(net, x, edge,
                                                       generator=torch.Generator().manual_seed(0))
    numel = x[0].numel()
    assert torch.isclose(out0.loss, out0.stats["mse"] * numel, rtol=1e-10)


# --------------------------------------------------------------------------------------------
# Time sampler
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dist", ["logit_normal", "uniform"])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.75, 1.0])
def test_time_sampler(dist, ratio):
    cfg = MeanFlowConfig(time_dist=dist, ratio_r_neq_t=ratio)
    r, t = sample_times(cfg, 4000, generator=torch.Generator().manual_seed(0))
    assert (r <= t).all() and (r >= 0).all() and (t <= 1).all()
    assert (r != t).float().mean().item() == pytest.approx(ratio, abs=1e-3)
    if dist == "logit_normal" and ratio == 0.0:
        # t = sigmoid(max of two N(-0.4, 1)) has median sigmoid(-0.4 + 0.545)
        assert t.median().item() == pytest.approx(1 / (1 + math.exp(-(-0.4 + 0.545))), abs=0.03)


def test_ratio_warmup_ramps_from_flow_matching():
    cfg = MeanFlowConfig(ratio_r_neq_t=0.5, ratio_warmup_steps=100)
    assert [cfg.ratio_at(s) for s in (0, 50, 100, 10_000)] == [0.0, 0.25, 0.5, 0.5]
    assert MeanFlowConfig(ratio_r_neq_t=0.5).ratio_at(0) == 0.5          # no warm-up
    g = torch.Generator().manual_seed(0)
    for step, want in ((0, 0.0), (50, 0.25), (100, 0.5)):
        r, t = sample_times(cfg, 1000, generator=g, ratio=cfg.ratio_at(step))
        assert (r != t).float().mean().item() == pytest.approx(want, abs=1e-3)
    with pytest.raises(ValueError, match="ratio must lie in"):
        sample_times(cfg, 10, ratio=1.5)


# --------------------------------------------------------------------------------------------
# 4. Bad input
# --------------------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    net, x, edge = _conv_batch()
    loss = MeanFlowLoss()
    b = x.shape[0]
    half = torch.full((b,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\bt must lie in \[0, 1\]"):
        loss(net, x, edge, r=half * 0, t=half * 3)
    with pytest.raises(ValueError, match=r"\br must lie"):
        loss(net, x, edge, r=half - 1, t=half)
    with pytest.raises(ValueError, match="r must be <= t"):
        loss(net, x, edge, r=half + 0.1, t=half)
    with pytest.raises(ValueError, match="edge has batch size"):
        loss(net, x, edge[:2])
    with pytest.raises(ValueError, match="label must have shape"):
        loss(net, x, edge, torch.zeros(b + 1, dtype=torch.long))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        loss(net, bad, edge)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        loss(net, bad, edge)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        sample(net, torch.randn(2, 1, 8, 8, dtype=torch.float64), steps=0, edge=edge[:2])


def test_sampler_is_deterministic_and_inference_cfg_changes_output():
    net, x, edge = _conv_batch()
    net.eval()
    with torch.no_grad():
        for p in net.parameters():                 # make the null path differ from the cond one
            p.add_(0.05 * torch.randn_like(p))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = sample(net, noise, steps=2, edge=edge)
    b = sample(net, noise.clone(), steps=2, edge=edge)
    assert torch.equal(a, b)
    c = sample(net, noise, steps=2, edge=edge, cfg_scale=3.0)
    assert not torch.allclose(a, c)
    assert torch.allclose(sample(net, noise, steps=2, edge=edge, cfg_scale=1.0), a)


def test_time_grid_with_a_final_jump_and_explicit_times():
    from meanflow.sampling import time_grid
    assert time_grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    g = time_grid(16, jump_below=0.25)
    assert len(g) == 14 and g[-2].item() == pytest.approx(0.25) and g[-1].item() == 0.0
    assert time_grid(4, jump_below=0.5).tolist() == [1.0, 0.75, 0.5, 0.0]
    net, x, edge = _conv_batch()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        a = sample(net, noise, steps=4, edge=edge)
        b = sample(net, noise, times=time_grid(4), edge=edge)
        c = sample(net, noise, times=time_grid(4, jump_below=0.5), edge=edge)
    assert torch.allclose(a, b)
    assert not torch.allclose(a, c)
    for bad in ([1.0, 0.5], [0.9, 0.0], [1.0, 0.6, 0.7, 0.0]):
        with pytest.raises(ValueError, match="times must decrease strictly from 1 to 0"):
            sample(net, noise, times=torch.tensor(bad), edge=edge)
    with pytest.raises(ValueError, match="jump_below must lie in"):
        time_grid(4, jump_below=1.0)


def test_first_jvp_of_a_process_raises_no_deprecation_warning():
    # torch scripts its forward-AD decompositions on the first make_dual of a process and warns
    # that torch.jit.script is deprecated; a fresh process with FutureWarnings as errors shows
    # that the objective keeps that out of users' logs.
    code = ("import torch\n"
            "from meanflow import meanflow_target\n"
            "from models.tiny import TinyConvNet\n"
            "net = TinyConvNet(in_channels=1, ch=16, edge_channels=0, num_classes=0)\n"
            "z, v = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)\n"
            "u, tgt = meanflow_target(net, z, torch.zeros(2), torch.ones(2), v)\n"
            "print(tuple(tgt.shape))\n")
    res = run([PY, "-W", "error::FutureWarning", "-c", code], timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(2, 1, 8, 8)"


def test_step_loss_is_the_draws_of_its_step_coordinates():
    """MeanFlowLoss.step_loss draws noise, times, r != t positions, the dropout mask and the
    network's dropout from (seed, step, micro, rank, world): the same call gives the same loss
    bits, another micro-step another loss, and it equals draw() passed to the loss by hand."""
    from meanflow.runtime import Stream, seed_rng, stream_seed
    torch.manual_seed(0)
    net = TinyConvNet(in_channels=1, ch=8, edge_channels=1)
    x = torch.randn(4, 1, 8, 8)
    edge = (torch.rand(4, 1, 8, 8) > 0.8).float()
    loss_fn = MeanFlowLoss(MeanFlowConfig(ratio_r_neq_t=0.5, cond_drop_prob=0.3))
    at = dict(step=3, micro=1, rank=1, world=2, global_batch=8, seed=5)
    a = loss_fn.step_loss(net, x, edge, None, **at).loss
    torch.manual_seed(123)                              # the global RNG does not matter
    assert torch.equal(loss_fn.step_loss(net, x, edge, None, **at).loss, a)
    assert not torch.equal(loss_fn.step_loss(net, x, edge, None, **{**at, "micro": 0}).loss, a)
    d = loss_fn.draw((1, 8, 8), 8, seed=5, step=3, micro=1, rank=1, world=2, has_cond=True,
                     ratio=0.5)
    seed_rng(stream_seed(5, Stream.DROPOUT, 1, 3, 1))
    b = loss_fn(net, x, edge, None, noise=d.noise, r=d.r, t=d.t, keep=d.keep,
                neq_idx=d.neq_idx).loss
    assert torch.equal(a, b)
