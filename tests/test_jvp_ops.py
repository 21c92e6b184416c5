"""The fast forward-mode rules of models/jvp_ops.py equal PyTorch's own, and gradients too."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from models import jvp_ops

torch.manual_seed(0)
X = torch.randn(3, 8, 6, 6, dtype=torch.float64)
T = torch.randn_like(X)
W_CONV = torch.randn(5, 8, 3, 3, dtype=torch.float64)
B5 = torch.randn(5, dtype=torch.float64)
W8, B8 = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
W_LIN = torch.randn(4, 6, dtype=torch.float64)

CASES = {
    "conv2d": (lambda x: jvp_ops.conv2d(x, W_CONV, B5, 2, 1),
               lambda x: F.conv2d(x, W_CONV, B5, 2, 1)),
    "linear": (lambda x: jvp_ops.linear(x, W_LIN, B5[:4]),
               lambda x: F.linear(x, W_LIN, B5[:4])),
    "silu": (jvp_ops.silu, F.silu),
    "group_norm": (lambda x: jvp_ops.group_norm(x, 4, W8, B8),
                   lambda x: F.group_norm(x, 4, W8, B8)),
    "layer_norm": (lambda x: jvp_ops.layer_norm(x, (6,), W8[:6], B8[:6]),
                   lambda x: F.layer_norm(x, (6,), W8[:6], B8[:6])),
}


def _dual(fn, x, t):
    with fwAD.dual_level():
        return fwAD.unpack_dual(fn(fwAD.make_dual(x, t)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_tangent_and_primal_equal_pytorch_rules(name):
    fast, ref = CASES[name]
    p1, t1 = _dual(fast, X, T)
    p2, t2 = _dual(ref, X, T)
    assert torch.allclose(p1, p2, atol=1e-12)
    assert torch.allclose(t1, t2, atol=1e-10), (t1 - t2).abs().max()
    assert torch.equal(fast(X), ref(X))                  # no tangent: the plain op


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_through_the_joint_pass(name):
    """With a graph recorded (joint mode), d(primal)/d(input) is the plain op's gradient."""
    fast, ref = CASES[name]
    x1 = X.clone().requires_grad_()
    x2 = X.clone().requires_grad_()
    with fwAD.dual_level():
        p, _ = fwAD.unpack_dual(fast(fwAD.make_dual(x1, T)))
    (p ** 2).sum().backward()
    (ref(x2) ** 2).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-10)


def test_norms_run_in_float32_under_bf16_autocast():
    x = torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = jvp_ops.conv2d(x, W_CONV.float(), None, 1, 1)
        assert h.dtype == torch.bfloat16
        p, t = _dual(lambda z: jvp_ops.group_norm(z, 5, None, None), h, torch.randn_like(h))
    assert p.dtype == torch.bfloat16 and t.dtype == torch.bfloat16
    # the statistics were computed in float32: the same as a float32 group norm (and its
    # tangent) of the bf16 input, rounded to bf16 once at the end
    tan = torch.randn_like(h)
    p, t = _dual(lambda z: jvp_ops.group_norm(z, 5, None, None), h, tan)
    p32, t32 = _dual(lambda z: F.group_norm(z, 5), h.float(), tan.float())
    assert torch.equal(p, p32.bfloat16())
    assert torch.allclose(t.float(), t32, rtol=1e-2, atol=1e-2)


def _cuda_rule_native_group_norm(monkeypatch):
    """torch.native_group_norm with its CUDA kernel's layout rule (contiguous NCHW input
    only) on every non-CPU device: the CPU kernel also takes channels_last, so a CPU run
    alone cannot see a channels_last input reach it."""
    real = torch.native_group_norm
    seen = []

    def strict(x, *a):
        seen.append(x.device.type)
        if x.device.type != "cpu" and not x.is_contiguous():
            raise RuntimeError("Expected X.is_contiguous(memory_format) to be true")
        return real(x, *a)
    monkeypatch.setattr(torch, "native_group_norm", strict)
    return seen


def test_group_norm_tangent_gives_a_non_cpu_kernel_contiguous_input(monkeypatch):
    """The first CUDA run failed here: a channels_last U-Net handed native_group_norm a
    channels_last input. On the meta device (CUDA's placement, not its kernels) the input
    that reaches the kernel must be contiguous, and the output keeps the input's layout."""
    seen = _cuda_rule_native_group_norm(monkeypatch)
    x = torch.randn(2, 8, 5, 5, device="meta").contiguous(memory_format=torch.channels_last)
    with fwAD.dual_level():
        y, ty = fwAD.unpack_dual(jvp_ops.group_norm(fwAD.make_dual(x, torch.randn_like(x)),
                                                    4, torch.ones(8, device="meta"),
                                                    torch.zeros(8, device="meta")))
    assert seen == ["meta"]
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert ty.is_contiguous(memory_format=torch.channels_last)


def test_group_norm_channels_last_values_equal_contiguous():
    """Same primal and tangent for a channels_last and a contiguous input (CPU, float64)."""
    fast, _ = CASES["group_norm"]
    cl = X.contiguous(memory_format=torch.channels_last)
    p1, t1 = _dual(fast, X, T)
    p2, t2 = _dual(fast, cl, T.contiguous(memory_format=torch.channels_last))
    assert p2.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(p1, p2, atol=1e-12) and torch.allclose(t1, t2, atol=1e-10)


@pytest.mark.parametrize("kind", ["unet", "sit-add"])
@pytest.mark.parametrize("jvp_mode", ["split", "joint"])
def test_a_meanflow_step_equals_pytorchs_own_forward_ad(kind, jvp_mode):
    """A whole MeanFlow step (fp32) through the fast layers gives the loss, target and every
    gradient of the same step with torch.nn's layers and PyTorch's forward-AD rules, to fp32
    round-off (rtol 1e-4 on gradients, the adaptive weight amplifies nothing here: p = 0)."""
    import copy

    from helpers import TINY_NETS, inputs, perturb_zero_init_

    from meanflow import MeanFlowConfig, MeanFlowLoss
    from models.layers import _FAST_JVP_CLASSES
    torch.manual_seed(0)
    fast = TINY_NETS[kind]()
    perturb_zero_init_(fast, std=0.2)
    stock = copy.deepcopy(fast)
    back = {v: k for k, v in _FAST_JVP_CLASSES.items()}
    for m in stock.modules():
        m.__class__ = back.get(type(m), type(m))
    assert not any(type(m) in back for m in stock.modules())
    stock.explicit_jvp = False              # the explicit pass (U-Net, SiT) off: forward-AD duals
    z, _, _, edge, label = inputs(fast)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(z.shape, generator=g)
    r, t = torch.tensor([0.2, 0.5, 0.1]), torch.tensor([0.9, 0.5, 0.3])
    loss_fn = MeanFlowLoss(MeanFlowConfig(jvp_mode=jvp_mode, adaptive_p=0.0, cfg_omega=1.0))
    outs = []
    for net in (fast, stock):
        out = loss_fn(net, z, edge, label, noise=noise, r=r, t=t,
                      keep=torch.tensor([True, False, True]))
        out.loss.backward()
        outs.append((out, {n: p.grad for n, p in net.named_parameters()}))
    (a, ga), (b, gb) = outs
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)
    assert a.stats["tgt_rms"].item() == pytest.approx(b.stats["tgt_rms"].item(), rel=1e-5)
    # atol against the largest gradient: a few are round-off only (a conv bias before a
    # GroupNorm has a gradient of exactly 0 in exact arithmetic)
    big = max(g.abs().max().item() for g in gb.values())
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-5 * big), n


@pytest.mark.parametrize("prediction,time_embed", [("u", "sum"), ("x", "concat")])
def test_the_unets_explicit_tangent_pass_equals_forward_ad(prediction, time_embed):
    """UNet.forward(..., jvp_tangent=v) (models/tangent.py, no duals) gives the u and du/dt of
    the forward-AD pass to fp32 round-off; meanflow's no-grad JVP takes it by default."""
    from helpers import inputs, perturb_zero_init_, tiny_unet

    from meanflow.objective import _jvp
    torch.manual_seed(0)
    net = tiny_unet(prediction=prediction, time_embed=time_embed).eval()
    perturb_zero_init_(net, std=0.2)
    z, r, t, edge, label = inputs(net)
    t = torch.tensor([0.9, 0.6, 0.02])                   # one below x_pred_t_min's clamp
    r = torch.tensor([0.2, 0.6, 0.0])
    v = torch.randn_like(z)
    cond = dict(edge=edge, label=label, keep=torch.tensor([True, False, True]))
    with torch.no_grad():
        u1, d1 = net(z, r, t, jvp_tangent=v, **cond)
        u2, d2 = _jvp(net, z, r, t, v, cond, explicit=False)
        plain = net(z, r, t, **cond)                       # fused attention: round-off
        assert (u1 - plain).abs().max() <= 1e-5 * plain.abs().max()
        u3, d3 = _jvp(net, z, r, t, v, cond)               # the default: explicit
    assert (u1 - u2).abs().max() <= 1e-6 * u2.abs().max()
    assert d1.abs().max() > 1e-2
    assert torch.allclose(d1, d2, rtol=1e-5, atol=1e-5 * d2.abs().max().item()), \
        (d1 - d2).abs().max()
    assert torch.equal(d3, d1)
