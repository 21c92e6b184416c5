"""meanflow.sampling.sample's autocast option and host-side time checks; the codec decodes in
fp32 whatever autocast the caller has on."""
from __future__ import annotations

import pytest
import torch

from meanflow.codec import make_decoder
from meanflow.sampling import sample, time_grid


class Recorder(torch.nn.Module):
    """u = a linear map of z; records whether autocast was on and the dtype it computed in."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 8)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, z, r, t, edge=None, label=None, keep=None):
        u = self.lin(z.flatten(1))
        self.seen.append((torch.is_autocast_enabled("cpu"), u.dtype))
        return u.view_as(z)


def test_autocast_runs_the_network_in_bf16_and_keeps_the_sample_fp32():
    net, noise = Recorder(), torch.randn(4, 2, 2, 2)
    ref = sample(net, noise, 2)                              # the old call, unchanged
    assert net.seen == [(False, torch.float32)] * 2
    net.seen.clear()
    low = sample(net, noise, 2, autocast_dtype=torch.bfloat16)
    assert net.seen == [(True, torch.bfloat16)] * 2
    assert low.dtype == torch.float32
    assert torch.allclose(low, ref, rtol=0.05, atol=0.05) and not torch.equal(low, ref)


def test_times_are_checked_on_the_host_as_floats():
    net, noise = Recorder(), torch.randn(2, 2, 2, 2)
    as_list = sample(net, noise, times=[1.0, 0.5, 0.0])
    assert torch.equal(as_list, sample(net, noise, times=time_grid(2)))
    for bad in ([1.0, 0.5, 0.5, 0.0], [0.9, 0.0], [1.0], torch.ones(2, 2)):
        with pytest.raises(ValueError, match="times must decrease strictly from 1 to 0"):
            sample(net, noise, times=bad)


def test_pixel_decode_is_fp32_under_autocast():
    dec = make_decoder({"codec": "pixel"}, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(torch.zeros(2, 1, 4, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
