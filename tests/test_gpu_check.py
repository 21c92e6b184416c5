"""`make gpu-check`'s logic, run on the CPU in its tiny mode: data built from nothing (random
VAE, synthetic photos), both AFHQ configs trained through `accelerate launch` as MeanFlow and
as flow matching, a resume, a `torchrun evaluate.py` with FID, one table and a JSON."""
from __future__ import annotations

import json

import pytest
import math

import torch

from helpers import PY, run


def test_gpu_check_without_a_gpu_says_so_and_succeeds():
    if torch.cuda.is_available():          # pragma: no cover - the suite runs on CPUs
        return
    res = run([PY, "bench/gpu_check.py"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines() == [
        "gpu-check: no CUDA GPU on this machine; nothing to check (use --tiny-cpu to run its "
        "logic on the CPU)"]


@pytest.mark.slow
def test_gpu_check_tiny_cpu_mode_runs_every_stage(tmp_path):
    out = tmp_path / "gc"
    res = run([PY, "bench/gpu_check.py", "--tiny-cpu", "--out", str(out), "--steps", "2",
               "--fid-n", "8"], timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    r = json.loads((out / "gpu_check.json").read_text())
    assert [c["config"] for c in r["configs"]] == ["afhq_unet", "afhq_sit_b2"]
    for c in r["configs"]:
        assert c["mf_images_per_s"] > 0 and c["fm_images_per_s"] > 0
        assert c["mf_over_fm_step_time"] > 0 and math.isfinite(c["mf_last_loss"])
    assert [(c["config"], c["batch_per_gpu"]) for c in r["configs"]] == [
        ("afhq_unet", 4), ("afhq_sit_b2", 4)]
    # the keys the defaults leave off, and two ranks sharing the one device (gloo)
    assert [(v["config"], v["key"]) for v in r["variants"]] == [
        ("afhq_unet", "train.channels_last=true"), ("afhq_sit_b2", "model.grad_checkpointing=true"),
        ("afhq_unet", "two processes on one GPU")]
    for v in r["variants"]:
        assert v["images_per_s"] > 0 and math.isfinite(v["last_loss"]), v
    two = (out / "logs" / "afhq_unet_two_processes_on_one_gpu.log").read_text()
    assert "2 process(es)" in two
    assert "| afhq_unet | two processes on one GPU |" in res.stdout
    assert r["resume"] == {"from_step": 2, "final_checkpoint": "step_0000022"}
    assert r["evaluate"]["n"] == 8 and math.isfinite(r["evaluate"]["fid"])
    assert "| afhq_sit_b2 |" in res.stdout and (out / "gpu_check.md").is_file()
