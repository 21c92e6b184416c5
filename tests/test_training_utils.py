"""Small pieces of the training machinery: EMA warm-up, LR schedule, data order."""
from __future__ import annotations

import itertools

import torch

from meanflow.training import EMA, ShardedEpochSampler, lr_at


def test_ema_decay_warms_up_then_holds():
    net = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, [0.999])
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net, 0)                      # decay (1 + 0) / (10 + 0) = 0.1
    assert torch.allclose(ema.shadows[0]["weight"], torch.full((2, 2), 0.9))
    ema.update(net, 10_000)                 # warm-up over: 0.999
    assert torch.allclose(ema.shadows[0]["weight"], torch.full((2, 2), 0.9 + 0.1 * 0.001))


def test_lr_schedule():
    assert lr_at(0, 1.0, 10, 100, "constant") == 0.1
    assert lr_at(50, 1.0, 10, 100, "constant") == 1.0
    assert abs(lr_at(10, 1.0, 10, 110, "cosine") - 1.0) < 1e-12
    assert abs(lr_at(110, 1.0, 10, 110, "cosine")) < 1e-12


def test_sharded_sampler_splits_global_batches_and_resumes():
    n, bs, world = 20, 3, 2
    per_rank = [list(itertools.islice(iter(ShardedEpochSampler(n, bs, r, world, 0)), 9))
                for r in range(world)]
    one_epoch = [k for r in range(world) for k in per_rank[r]]
    assert len(set(one_epoch)) == len(one_epoch) == 18          # 3 global batches, no repeat
    single = list(itertools.islice(iter(ShardedEpochSampler(n, bs * world, 0, 1, 0)), 18))
    assert single[:3] == per_rank[0][:3] and single[3:6] == per_rank[1][:3]
    resumed = list(itertools.islice(iter(ShardedEpochSampler(n, bs, 0, world, 0,
                                                             start_batch=2)), 3))
    assert resumed == per_rank[0][6:9]
