"""SiT's explicit-tangent JVP (models/tangent.py, ``SiT.forward(..., jvp_tangent=v)``) equals
the forward-AD dual path and torch.func.jvp, and a MeanFlow step through it equals the step
through the dual path."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import inputs, perturb_zero_init_, tiny_sit

from meanflow import MeanFlowConfig, MeanFlowLoss
from meanflow.objective import _jvp
from models.layers import _FAST_JVP_CLASSES

KEEP = torch.tensor([True, False, True])

# (model overrides, which conditions the call gets)
CASES = {
    "add, edge+label+keep": (dict(edge_mode="add"), ("edge", "label", "keep")),
    "add, edge+label": (dict(edge_mode="add"), ("edge", "label")),
    "add, null edge and class": (dict(edge_mode="add"), ()),
    "tokens, edge+label+keep": (dict(edge_mode="tokens"), ("edge", "label", "keep")),
    "tokens, edge": (dict(edge_mode="tokens"), ("edge",)),
    "tokens, null edge tokens": (dict(edge_mode="tokens"), ("label",)),
    "unconditional, concat": (dict(edge_channels=0, num_classes=0, time_embed="concat"), ()),
    "x-prediction, keep": (dict(edge_mode="tokens", prediction="x"), ("edge", "label", "keep")),
}


def _net(**kw):
    torch.manual_seed(0)
    net = tiny_sit(**kw).eval()
    perturb_zero_init_(net, std=0.2)          # adaLN-Zero and the output layer start at 0
    return net


def _call(net, names):
    z, r, t, edge, label = inputs(net)
    if net.prediction == "x":
        t = torch.tensor([0.9, 0.6, 0.02])    # one below x_pred_t_min's clamp
        r = torch.tensor([0.2, 0.6, 0.0])
    given = dict(edge=edge, label=label, keep=KEEP)
    cond = {k: given[k] for k in names}
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    return z, r, t, v, cond


def _stock(net):
    """A copy with torch.nn's own classes (PyTorch's forward-AD rules) for torch.func.jvp."""
    stock = copy.deepcopy(net)
    back = {v: k for k, v in _FAST_JVP_CLASSES.items()}
    for m in stock.modules():
        m.__class__ = back.get(type(m), type(m))
    return stock


def _close(a, b, rel):
    """max |a - b| within ``rel`` of max |b|, sample by sample."""
    for i in range(b.shape[0]):
        err = (a[i] - b[i]).abs().max().item()
        assert err <= rel * b[i].abs().max().item(), (i, err, b[i].abs().max().item())


@pytest.mark.parametrize("case", sorted(CASES))
def test_explicit_pair_equals_the_dual_path_and_func_jvp(case):
    """fp32: u and du/dt of the explicit pass equal forward-AD duals (models/jvp_ops.py
    rules) and torch.func.jvp (torch.nn's rules) to 1e-5 of each sample's max."""
    kw, names = CASES[case]
    net = _net(**kw)
    z, r, t, v, cond = _call(net, names)
    with torch.no_grad():
        u1, d1 = net(z, r, t, jvp_tangent=v, **cond)
        u2, d2 = _jvp(net, z, r, t, v, cond, explicit=False)
        plain = net(z, r, t, **cond)                        # fused attention: round-off
        u4, d4 = _jvp(net, z, r, t, v, cond)                # the objective's default
    stock = _stock(net)
    u3, d3 = torch.func.jvp(lambda zz, tt: stock(zz, r, tt, **cond), (z, t),
                            (v, torch.ones_like(t)))
    assert d2.flatten(1).abs().amax(1).min() > 1e-2     # every sample's du/dt matters
    for ref_u, ref_d in ((u2, d2), (u3, d3)):
        _close(u1, ref_u, 1e-5)
        _close(d1, ref_d, 1e-5)
    _close(u1, plain, 1e-5)
    assert torch.equal(u4, u1) and torch.equal(d4, d1)      # explicit_jvp = True: taken


def test_guidance_keep_mask_changes_only_the_dropped_samples():
    """keep = False gives a sample the null edge and class: its pair equals the call without
    any condition, the kept samples' the call with every condition."""
    net = _net(edge_mode="tokens")
    z, r, t, v, cond = _call(net, ("edge", "label", "keep"))
    with torch.no_grad():
        u, d = net(z, r, t, jvp_tangent=v, **cond)
        un, dn = net(z, r, t, jvp_tangent=v)
        uc, dc = net(z, r, t, jvp_tangent=v, edge=cond["edge"], label=cond["label"])
    for i, k in enumerate(KEEP.tolist()):
        ref_u, ref_d = (uc, dc) if k else (un, dn)
        assert torch.allclose(u[i], ref_u[i], atol=1e-6) and torch.allclose(d[i], ref_d[i],
                                                                            atol=1e-6)
    assert not torch.allclose(dn[0], dc[0], atol=1e-3)


@pytest.mark.parametrize("edge_mode", ["add", "tokens"])
def test_bf16_autocast_pair_equals_the_dual_path(edge_mode):
    """Under bf16 autocast (CPU) both passes round their linears to bf16 and their norms
    compute in float32; the explicit attention also computes in float32. Stated tolerance:
    du/dt within 2e-2 of its max of the dual path's and of the fp32 pass's (measured: below
    7e-3), u within 2e-2 of the dual path's."""
    net = _net(edge_mode=edge_mode)
    z, r, t, v, cond = _call(net, ("edge", "label", "keep"))
    with torch.no_grad():
        _, d32 = net(z, r, t, jvp_tangent=v, **cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            u1, d1 = net(z, r, t, jvp_tangent=v, **cond)
            u2, d2 = _jvp(net, z, r, t, v, cond, explicit=False)
    assert u1.dtype == d1.dtype == u2.dtype == d2.dtype == torch.bfloat16
    _close(u1.float(), u2.float(), 2e-2)
    _close(d1.float(), d2.float(), 2e-2)
    _close(d1.float(), d32, 2e-2)


@pytest.mark.parametrize("edge_mode,cfg_omega", [("add", 1.0), ("tokens", 2.0)])
def test_a_meanflow_step_equals_the_dual_paths(edge_mode, cfg_omega):
    """MeanFlowLoss (split mode, guidance keep mask, cfg_omega 2 = the guided target): loss,
    target and every gradient through the explicit JVP equal those through forward-AD duals."""
    net = _net(edge_mode=edge_mode).train()
    dual = copy.deepcopy(net)
    dual.explicit_jvp = False
    z, _, _, edge, label = inputs(net)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    r, t = torch.tensor([0.2, 0.5, 0.1]), torch.tensor([0.9, 0.5, 0.3])
    loss_fn = MeanFlowLoss(MeanFlowConfig(jvp_mode="split", adaptive_p=0.0, cfg_omega=cfg_omega,
                                          cfg_kappa=0.0))
    outs = []
    for m in (net, dual):
        out = loss_fn(m, z, edge, label, noise=noise, r=r, t=t, keep=KEEP)
        out.loss.backward()
        outs.append((out, {n: p.grad for n, p in m.named_parameters()}))
    (a, ga), (b, gb) = outs
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)
    assert a.stats["tgt_rms"].item() == pytest.approx(b.stats["tgt_rms"].item(), rel=1e-5)
    big = max(g.abs().max().item() for g in gb.values())
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-5, atol=1e-6 * big), n


def test_attention_dropout_is_refused():
    """The explicit pass draws no dropout masks: a training attention dropout is refused
    (SiT builds none; the dual path would draw one mask for primal and tangent)."""
    net = _net(edge_mode="add").train()
    net.blocks[0].attn.attn_drop.p = 0.1
    z, r, t, v, cond = _call(net, ("edge",))
    with torch.no_grad(), pytest.raises(NotImplementedError, match="attention dropout"):
        net(z, r, t, jvp_tangent=v, **cond)
