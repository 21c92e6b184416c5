"""The paper's central ablation in miniature, on CPU.

A 2-D conditional mixture of Gaussians (the condition picks one of three 4-mode mixtures).
The same MLP is trained twice with the same budget: MeanFlow (75% of samples with r != t) and
plain flow matching (r = t always, the 0% column of the paper's Table 1a). MeanFlow with one
network evaluation must come within 1.5x (sliced Wasserstein) of flow matching integrated with
50 Euler steps, and flow matching with one step must be at least 3x worse than MeanFlow's step:
one flow-matching step lands on the conditional mean, between the modes.
"""
from __future__ import annotations

import math

import pytest
import torch

from meanflow import MeanFlowConfig, MeanFlowLoss, sample
from models.tiny import ToyMLP

NUM_CLASSES = 3
MODES = 4
MODE_STD = 0.08


def toy_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c: four modes on a circle of radius 1.5, rotated by c * 30 degrees."""
    label = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    mode = torch.randint(0, MODES, (n,), generator=gen)
    ang = 2 * math.pi * mode / MODES + label * math.pi / 6
    centre = 1.5 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return centre + MODE_STD * torch.randn(n, 2, generator=gen), label


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 128) -> float:
    """Mean 1-D W1 distance over random directions (equal sample sizes)."""
    g = torch.Generator().manual_seed(123)
    d = torch.randn(n_proj, a.shape[1], generator=g)
    d = d / d.norm(dim=1, keepdim=True)
    pa, pb = (a @ d.T).sort(0).values, (b @ d.T).sort(0).values
    return (pa - pb).abs().mean().item()


def train(ratio: float, steps: int, seed: int = 0) -> ToyMLP:
    torch.manual_seed(seed)
    net = ToyMLP(dim=2, hidden=128, depth=3, num_classes=NUM_CLASSES)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = MeanFlowLoss(MeanFlowConfig(time_dist="uniform", ratio_r_neq_t=ratio,
                                          adaptive_p=0.5, cond_drop_prob=0.0))
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x, y = toy_data(512, gen)
        out = loss_fn(net, x, label=y, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def evaluate(net: ToyMLP, steps: int, n: int = 3000) -> float:
    gen = torch.Generator().manual_seed(99)
    per_class = []
    for c in range(NUM_CLASSES):
        label = torch.full((n,), c)
        ang = 2 * math.pi * torch.randint(0, MODES, (n,), generator=gen) / MODES + c * math.pi / 6
        ref = 1.5 * torch.stack([torch.cos(ang), torch.sin(ang)], 1) \
            + MODE_STD * torch.randn(n, 2, generator=gen)
        noise = torch.randn(n, 2, generator=gen)
        per_class.append(sliced_wasserstein(sample(net, noise, steps, label=label), ref))
    return sum(per_class) / len(per_class)


@pytest.mark.slow
def test_meanflow_one_step_matches_many_step_flow_matching():
    steps = 3000
    mf = train(ratio=0.75, steps=steps)
    fm = train(ratio=0.0, steps=steps)
    mf1 = evaluate(mf, 1)
    fm1, fm50 = evaluate(fm, 1), evaluate(fm, 50)
    print(f"\nSW: MeanFlow 1-NFE {mf1:.4f} | flow matching 1-NFE {fm1:.4f}, 50-NFE {fm50:.4f}")
    assert mf1 <= 1.5 * fm50, (mf1, fm50)
    assert fm1 >= 3.0 * mf1, (fm1, mf1)
