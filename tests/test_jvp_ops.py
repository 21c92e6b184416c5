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
