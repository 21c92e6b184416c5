"""The backbones: shapes, registry, zero-initialised edge path, null condition, forward-mode
JVP against finite differences, bf16 autocast, fused vs explicit attention, errors."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import models
from meanflow import MeanFlowConfig, MeanFlowLoss
from meanflow.config import ModelConfig
from models import layers
from models.sit import SIT_PATCHES, SIT_SIZES

from helpers import B, NUM_CLASSES, TINY_NETS, inputs, perturb_zero_init_, tiny_sit, tiny_unet

# Published parameter counts for class-conditional ImageNet 256 (DiT Table 4; SiT uses the
# same sizes), in millions.
PUBLISHED_M = {"SiT-S/2": 33.0, "SiT-B/2": 130.5, "SiT-L/2": 458.1, "SiT-XL/2": 675.1}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def edge_params(model: torch.nn.Module) -> set[int]:
    enc = getattr(model, "edge_encoder", None) or getattr(model, "edge_embedder", None)
    return {id(p) for p in enc.parameters()}


def jvp(model, z, r, t, v, **cond):
    """(u, du/dt) along (v, 0, 1), as the MeanFlow objective computes it."""
    with fwAD.dual_level():
        out = model(fwAD.make_dual(z, v), r, fwAD.make_dual(t, torch.ones_like(t)), **cond)
        u, dudt = fwAD.unpack_dual(out)
    return u, dudt


# --------------------------------------------------------------------------------------------
# Shapes and registry
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_ch,size,edge_size,mults", [
    (4, 32, 256, [1, 2, 4]),        # SD-VAE latents of 256x256 images, full-size edge map
    (1, 32, 32, [1, 2, 2]),         # grayscale pixels, edge at the same size (no stem)
    (3, 32, 32, [1, 2, 2]),
])
def test_unet_output_shape(in_ch, size, edge_size, mults):
    cfg = ModelConfig(name="unet", input_size=size, in_channels=in_ch, edge_size=edge_size,
                      base_channels=32, channel_mults=mults, num_res_blocks=1)
    net = models.build(cfg).eval()
    z = torch.randn(2, in_ch, size, size)
    edge = torch.rand(2, 1, edge_size, edge_size)
    u = net(z, torch.zeros(2), torch.ones(2), edge=edge)
    assert u.shape == z.shape and u.dtype == z.dtype
    # stride-2 convolutions of the edge stem: log2(edge_size / input_size)
    strided = [m for m in net.edge_encoder.stem if isinstance(m, torch.nn.Conv2d)
               and m.stride == (2, 2)]
    assert len(strided) == {256: 3, 32: 0}[edge_size]
    assert len(net.edge_encoder.outs) == len(mults)


def test_default_unet_matches_the_recipe():
    with torch.device("meta"):
        net = models.build(ModelConfig())
    assert [len(level) for level in net.down] == [2, 2, 2]
    assert net.conv_in.out_channels == 128
    attn_down = [layer.attn is not None for level in net.down for layer in level]
    assert attn_down == [False, False, False, False, True, True]      # only at 8x8
    assert net.mid[0].attn is not None                                # and the bottleneck
    assert net.down[0][0].res.dropout.p == 0.1
    assert [o.out_channels for o in net.edge_encoder.outs] == [128, 128, 256]


@pytest.mark.parametrize("edge_mode", ["add", "tokens"])
def test_sit_tiny_forward_shape(edge_mode):
    net = tiny_sit(edge_mode, input_size=32, edge_size=256).eval()
    z = torch.randn(2, 2, 32, 32)
    u = net(z, torch.zeros(2), torch.ones(2), edge=torch.rand(2, 1, 256, 256),
            label=torch.tensor([0, 1]))
    assert u.shape == z.shape
    assert net.edge_embedder.proj.kernel_size == (16, 16)             # 256 / 32 * 2
    assert net.edge_embedder.grid_size == net.x_embedder.grid_size == (16, 16)


@pytest.mark.parametrize("name", sorted(models.SiT_models))
def test_every_sit_size_on_meta(name):
    size, patch = name[len("SiT-"):].split("/")
    depth, hidden, heads = SIT_SIZES[size]
    cfg = ModelConfig(name=name, input_size=32, in_channels=4, num_classes=1000,
                      edge_channels=0, edge_size=0)
    with torch.device("meta"):
        net = models.build(cfg)
        u = net(torch.empty(2, 4, 32, 32), torch.empty(2), torch.empty(2),
                label=torch.zeros(2, dtype=torch.long))
    assert u.shape == (2, 4, 32, 32)
    assert len(net.blocks) == depth and net.blocks[0].attn.num_heads == heads
    assert net.x_embedder.proj.out_channels == hidden
    assert net.patch_size == int(patch) and int(patch) in SIT_PATCHES
    assert net.final_layer.linear.out_features == int(patch) ** 2 * 4   # no learned sigma
    n = sum(p.numel() for p in net.parameters()) / 1e6
    if name in PUBLISHED_M:
        # MeanFlow adds a second time embedder (t - r) and drops DiT's learned-sigma half.
        assert abs(n - PUBLISHED_M[name]) / PUBLISHED_M[name] < 0.03, (name, n)


def test_list_models_and_unknown_name():
    names = models.list_models()
    assert "unet" in names and "SiT-XL/2" in names and len(names) == 1 + 12
    with pytest.raises(ValueError, match=r"unknown model.name 'SiT-M/2'.*unet.*SiT-XL/8"):
        models.build(ModelConfig(name="SiT-M/2"))


# --------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(TINY_NETS))
def test_edge_path_is_a_noop_at_init(kind):
    net = TINY_NETS[kind]().eval()
    perturb_zero_init_(net, skip=edge_params(net))      # everything but the edge path lives
    z, r, t, edge, label = inputs(net)
    with torch.no_grad():
        u = net(z, r, t, edge=edge, label=label)
        assert u.abs().max() > 1e-3                                      # not vacuous
        for other in (1 - edge, torch.zeros_like(edge), torch.rand_like(edge)):
            assert torch.equal(net(z, r, t, edge=other, label=label), u)
        perturb_zero_init_(net, seed=1)                  # now the edge path is live too
        assert not torch.allclose(net(z, r, t, edge=1 - edge, label=label),
                                  net(z, r, t, edge=edge, label=label))


@pytest.mark.parametrize("kind", sorted(TINY_NETS))
def test_null_condition_differs_from_every_real_one(kind):
    net = TINY_NETS[kind]().eval()
    perturb_zero_init_(net)
    z, r, t, edge, label = inputs(net)
    drop = torch.zeros(B, dtype=torch.bool)
    keep = ~drop
    with torch.no_grad():
        u_null = net(z, r, t, edge=edge, label=label, keep=drop)
        # the null condition ignores the edge map and the label it was given ...
        assert torch.equal(net(z, r, t, edge=1 - edge, label=(label + 1) % NUM_CLASSES,
                               keep=drop), u_null)
        # ... and equals "no condition given"
        assert torch.allclose(net(z, r, t), u_null, atol=1e-6)
        real_edges = [edge, torch.zeros_like(edge), torch.ones_like(edge)]
        for e in real_edges:
            for y in range(NUM_CLASSES):
                u = net(z, r, t, edge=e, label=torch.full((B,), y), keep=keep)
                per_sample = (u - u_null).flatten(1).abs().amax(1)
                assert (per_sample > 1e-5).all(), (y, per_sample)
        # keep acts per sample
        mixed = torch.tensor([True, False, True])
        u_mix = net(z, r, t, edge=edge, label=label, keep=mixed)
        u_keep = net(z, r, t, edge=edge, label=label, keep=keep)
        assert torch.allclose(u_mix[1], u_null[1], atol=1e-6)
        assert torch.allclose(u_mix[[0, 2]], u_keep[[0, 2]], atol=1e-6)


# --------------------------------------------------------------------------------------------
# Forward-mode AD
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["u", "x"])
@pytest.mark.parametrize("kind", sorted(TINY_NETS))
def test_jvp_matches_central_finite_differences(kind, prediction):
    torch.manual_seed(0)
    net = TINY_NETS[kind](prediction=prediction).double().eval()
    perturb_zero_init_(net, std=0.2)
    z, r, t, edge, label = inputs(net, torch.float64)
    t = t.clamp(max=0.8)                   # room for t + eps, r <= t - eps
    cond = dict(edge=edge, label=label, keep=torch.tensor([True, False, True]))
    # v = 0 isolates d/dt (through both time embedders), which is small next to the z part
    for v in (torch.randn_like(z), torch.zeros_like(z)):
        u, dudt = jvp(net, z, r, t, v, **cond)
        eps = 1e-5
        with torch.no_grad():
            up = net(z + eps * v, r, t + eps, **cond)
            um = net(z - eps * v, r, t - eps, **cond)
            assert torch.allclose(u, net(z, r, t, **cond), atol=1e-12)
        fd = (up - um) / (2 * eps)
        rel = (dudt - fd).norm() / fd.norm()
        assert fd.norm() > 1e-3 and rel < 1e-6, rel


@pytest.mark.parametrize("kind", sorted(TINY_NETS))
def test_bf16_autocast_jvp_runs(kind):
    net = TINY_NETS[kind]()
    perturb_zero_init_(net)
    z, r, t, edge, label = inputs(net)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        u, dudt = jvp(net, z, r, t, torch.randn_like(z), edge=edge, label=label)
    assert u.dtype == torch.bfloat16 and dudt.dtype == torch.bfloat16
    assert torch.isfinite(u.float()).all() and torch.isfinite(dudt.float()).all()
    assert dudt.abs().max() > 0


def test_norms_compute_in_float32_under_autocast():
    net = tiny_unet()
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(type(m).forward is not torch.nn.GroupNorm.forward for m in norms)
    lns = [m for m in tiny_sit().modules() if isinstance(m, torch.nn.LayerNorm)]
    assert lns and all(type(m).forward is not torch.nn.LayerNorm.forward for m in lns)
    x = torch.randn(2, 16, 4, 4).bfloat16() * 300 + 1000       # bf16 statistics would be off
    ref = torch.nn.functional.group_norm(x.double(), norms[0].num_groups)
    out = norms[0](x)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() < 0.05


@pytest.mark.parametrize("kind", sorted(TINY_NETS))
def test_meanflow_loss_trains_every_parameter(kind):
    """Both JVP modes run through the backbone, and every parameter gets a gradient (DDP
    without find_unused_parameters needs that), also when no condition is dropped."""
    for jvp_mode in ("split", "joint"):
        net = TINY_NETS[kind]()
        z, _, _, edge, label = inputs(net)
        loss_fn = MeanFlowLoss(MeanFlowConfig(ratio_r_neq_t=0.5, jvp_mode=jvp_mode))
        out = loss_fn(net, z, edge, label, keep=torch.ones(B, dtype=torch.bool))
        out.loss.backward()
        assert torch.isfinite(out.loss)
        missing = [n for n, p in net.named_parameters() if p.grad is None]
        assert not missing, missing


# --------------------------------------------------------------------------------------------
# Attention paths
# --------------------------------------------------------------------------------------------
def test_fused_and_explicit_attention_agree(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    torch.manual_seed(0)
    attn = layers.use_fast_jvp_ops(layers.Attention(64, num_heads=4, qkv_bias=True)).eval()
    attn.fused_attn = True
    x = torch.randn(2, 50, 64)
    fused = attn(x)
    assert len(calls) == 1                                    # plain forward: fused kernel
    with fwAD.dual_level():
        explicit, tangent = fwAD.unpack_dual(attn(fwAD.make_dual(x, torch.randn_like(x))))
    assert len(calls) == 1 and tangent is not None            # dual forward: explicit path
    assert (fused - explicit).abs().max() < 1e-5
    attn.fused_attn = False
    assert (attn(x) - fused).abs().max() < 1e-5


def test_whole_model_fused_and_explicit_agree():
    net = tiny_sit("tokens").eval()
    assert all(blk.attn.fused_attn for blk in net.blocks)         # timm's default: fused
    perturb_zero_init_(net)
    z, r, t, edge, label = inputs(net)
    with torch.no_grad():
        u_plain = net(z, r, t, edge=edge, label=label)
        u_dual, _ = jvp(net, z, r, t, torch.randn_like(z), edge=edge, label=label)
    assert (u_plain - u_dual).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_culprit():
    net = tiny_unet()
    z, r, t, edge, label = inputs(net)
    with pytest.raises(ValueError, match=r"z must have shape \[B, 2, 8, 8\]"):
        net(z[:, :1], r, t)
    with pytest.raises(ValueError, match="edge must have shape"):
        net(z, r, t, edge=edge[..., :8, :8])
    with pytest.raises(ValueError, match=r"label values must lie in \[0, 3\)"):
        net(z, r, t, label=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        net(z, r, t, keep=torch.ones(B))
    with pytest.raises(ValueError, match="t must have shape"):
        net(z, r, t[:2])
    with pytest.raises(ValueError, match="no edge input"):
        tiny_unet(edge_channels=0)(z, r, t, edge=edge)
    with pytest.raises(ValueError, match="power of 2"):
        tiny_unet(edge_size=24)
    with pytest.raises(ValueError, match="token grid"):
        tiny_sit(edge_size=10)
    with pytest.raises(ValueError, match="edge_mode"):
        tiny_sit(edge_mode="concat")


@pytest.mark.parametrize("kind", sorted(TINY_NETS))
def test_x_prediction_gives_u_from_a_clean_image(kind):
    """prediction="x": u = (z - x_hat) / max(t, t_min), with x_hat the "u" network's output,
    so the 1-step sample e - u(e, 0, 1) is x_hat itself; bad settings are rejected."""
    torch.manual_seed(0)
    net_u = TINY_NETS[kind]().double().eval()
    perturb_zero_init_(net_u, std=0.2)
    net_x = TINY_NETS[kind](prediction="x", x_pred_t_min=0.25).double().eval()
    net_x.load_state_dict(net_u.state_dict())                 # same parameters, same keys
    z, r, t, edge, label = inputs(net_u, torch.float64)
    t = torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)    # the last one is clamped
    with torch.no_grad():
        x_hat = net_u(z, r.clamp(max=0.1), t, edge=edge, label=label)
        u = net_x(z, r.clamp(max=0.1), t, edge=edge, label=label)
        want = (z - x_hat) / torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64).view(-1, 1, 1, 1)
        assert torch.allclose(u, want, atol=1e-12)
        one = torch.ones(B, dtype=torch.float64)
        sample = z - net_x(z, 0 * one, one, edge=edge, label=label)
        assert torch.allclose(sample, net_u(z, 0 * one, one, edge=edge, label=label), atol=1e-12)
    for bad, match in ((dict(prediction="eps"), "prediction must be one of"),
                       (dict(prediction="x", x_pred_t_min=0.0), "x_pred_t_min must be in")):
        with pytest.raises(ValueError, match=match):
            TINY_NETS[kind](**bad)
