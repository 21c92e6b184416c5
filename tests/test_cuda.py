"""The CUDA tier: what only a real GPU can show (`make gpu-test`; `make gpu-check` runs it
first). On a machine without CUDA these tests are not run and the summary says how many.

The CPU suite proves where tensors live (meta and fake CUDA devices); these prove what CUDA
kernels accept: memory layouts, bf16 / fp16, TF32, fused AdamW, compiled graphs, NCCL and gloo
on a GPU. The first GPU run failed at step 1 on exactly such a rule (native_group_norm's CUDA
kernel takes NCHW only), which every CPU test had passed.

MEANFLOW_CUDA_TIER_DEVICE=cpu runs the same tests on the CPU: a check of the tests' own logic,
not of CUDA (fp16 needs CUDA and is then reported as skipped).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import PY, ROOT, run, tiny_config

pytestmark = pytest.mark.cuda
DEV = torch.device(os.environ.get("MEANFLOW_CUDA_TIER_DEVICE", "cuda"))

# Each AFHQ config at a width that builds in a second; everything else as shipped. Dropout off:
# a channels_last tensor draws its mask in another element order, which is not what is tested.
TINY = {
    "afhq_unet": ["model.base_channels=32", "model.channel_mults=[1,2]",
                  "model.num_res_blocks=1", "model.input_size=16", "model.edge_size=64",
                  "model.attn_resolutions=[8]", "model.dropout=0.0"],
    "afhq_sit_b2": ["model.name=SiT-S/4", "model.input_size=16", "model.edge_size=64"],
}
# The plain reference: fp32 without TF32, no layout change, no compile, foreach AdamW.
PLAIN = ["train.mixed_precision=no", "train.tf32=false", "train.channels_last=false",
         "train.compile=false", "train.fused_optimizer=false", "model.grad_checkpointing=false",
         "train.batch_size=8", "train.grad_accum=1", "train.warmup_steps=0",
         "train.log_with=none"]
# key -> (overrides, the configs it applies to, relative tolerance on the first step's mse).
# The first step's loss is computed before any update, so the optimizer keys must match it
# exactly; TF32 and the half precisions round the network's matmuls.
KEYS = {
    "channels_last": (["train.channels_last=true"], ("afhq_unet",), 1e-3),
    "compile": (["train.compile=true"], ("afhq_unet", "afhq_sit_b2"), 1e-3),
    "fused_optimizer": (["train.fused_optimizer=true"], ("afhq_unet", "afhq_sit_b2"), 1e-6),
    "tf32": (["train.tf32=true"], ("afhq_unet", "afhq_sit_b2"), 2e-2),
    "grad_checkpointing": (["model.grad_checkpointing=true"], ("afhq_sit_b2",), 1e-5),
    "bf16": (["train.mixed_precision=bf16"], ("afhq_unet", "afhq_sit_b2"), 5e-2),
    "fp16": (["train.mixed_precision=fp16"], ("afhq_unet", "afhq_sit_b2"), 3e-2),
}
CASES = [(c, k) for k, (_, cfgs, _) in KEYS.items() for c in cfgs]


def _batch(cfg, step: int) -> dict:
    """A data-loader batch for the config's shapes (edges as uint8, as the LMDB reader gives)."""
    g = torch.Generator().manual_seed(100 + step)
    m, b = cfg.model, cfg.train.batch_size
    return dict(x=torch.randn(b, m.in_channels, m.input_size, m.input_size, generator=g),
                edge=(torch.rand(b, 1, m.edge_size, m.edge_size, generator=g) > 0.8
                      ).to(torch.uint8) * 255,
                label=torch.zeros(b, dtype=torch.long))


def _train_steps(config: str, overrides: list[str], n: int = 3) -> list[dict]:
    """n training steps through train.py's own set-up and step; the loss statistics of each."""
    import models
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from meanflow import launch
    from meanflow.config import load_config
    from meanflow.objective import MeanFlowLoss
    from meanflow.step import train_step
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", TINY[config] + PLAIN + overrides)
    if cfg.train.mixed_precision == "fp16" and DEV.type != "cuda":
        pytest.skip("fp16 needs CUDA")
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=DEV.type == "cpu", mixed_precision=cfg.train.mixed_precision)
    assert acc.device.type == DEV.type
    launch.set_backend_flags(cfg.train, acc.device)
    torch.manual_seed(0)
    model, opt, ema, fwd = launch.prepare_training(acc, models.build(cfg.model), cfg)
    loss_fn = MeanFlowLoss(cfg.meanflow)
    out = []
    for step in range(n):
        ok, _, gnorm, stats = train_step(
            model, fwd, opt, ema, loss_fn, [_batch(cfg, step)], step, accelerator=acc, cfg=cfg,
            world=1, rank=0, fp16=cfg.train.mixed_precision == "fp16",
            channels_last=launch.uses_channels_last(cfg, acc.device))
        out.append({k: float(v) for k, v in stats.items()} | dict(ok=bool(ok)))
    launch.set_backend_flags(load_config(None, ["train.tf32=false"]).train, acc.device)
    return out


_PLAIN_RUNS: dict = {}


def _plain(config: str) -> list[dict]:
    if config not in _PLAIN_RUNS:
        _PLAIN_RUNS[config] = _train_steps(config, [])
    return _PLAIN_RUNS[config]


@pytest.mark.parametrize("config,key", CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_every_throughput_key_trains_like_the_plain_config(config, key):
    """Three steps with the key on: finite, updates applied (fp16's scaler may skip its first),
    and the first step's loss statistics equal the plain fp32 config's within the key's
    stated tolerance (same weights, data, noise and times)."""
    overrides, _, tol = KEYS[key]
    got, ref = _train_steps(config, overrides), _plain(config)
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in got), got
    assert all(s["ok"] for s in got[1:]) and (key == "fp16" or got[0]["ok"]), got
    assert got[0]["mse"] == pytest.approx(ref[0]["mse"], rel=tol), (got[0], ref[0])
    assert got[0]["frac_r_neq_t"] == ref[0]["frac_r_neq_t"] > 0     # the JVP ran


@pytest.mark.parametrize("config", sorted(TINY))
def test_bf16_jvp_matches_the_fp32_jvp(config):
    """The MeanFlow target (its JVP term included) under bf16 autocast against fp32, on the
    same network and draws; the channels_last U-Net too (the layout of the first crash)."""
    import models
    from meanflow.config import load_config
    from meanflow.objective import meanflow_target
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", TINY[config] + PLAIN)
    torch.manual_seed(0)
    net = models.build(cfg.model)
    with torch.no_grad():          # off the zero-initialised output layers: a JVP to compare
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    net = net.to(DEV)
    b = _batch(cfg, 0)
    x, edge = b["x"].to(DEV), b["edge"].to(DEV).float() / 255
    g = torch.Generator().manual_seed(1)
    t = torch.rand(8, generator=g).to(DEV)
    r = t * torch.rand(8, generator=g).to(DEV)
    e = torch.randn(x.shape, generator=g).to(DEV)
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    v = e - x
    layouts = [False, True] if cfg.model.name == "unet" else [False]
    for cl in layouts:
        if cl:
            net = net.to(memory_format=torch.channels_last)
            z = z.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            _, ref = meanflow_target(net, z, r, t, v, edge=edge)
            with torch.autocast(DEV.type, torch.bfloat16):
                _, got = meanflow_target(net, z, r, t, v, edge=edge)
        jvp_ref, jvp_got = v - ref, v - got                       # (t - r) du/dt
        rel = (jvp_got - jvp_ref).norm() / jvp_ref.norm()
        assert torch.isfinite(got).all() and rel < 5e-2, (cl, float(rel))


# --------------------------------------------------------------------------------------------
# End to end on the GPU: train.py, resume, export, evaluate.py, load_pipeline, two ranks
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_cfg(tmp_path_factory, dataset) -> Path:
    tmp = tmp_path_factory.mktemp("cuda_tier")
    return tiny_config(tmp / "tiny.yaml", dataset,
                       train=dict(log_every=1, keep_checkpoints=2, ema_decays=[0.9],
                                  log_with="none"))


def _train(cfg: Path, run_dir: Path, *extra, nproc: int = 1, **env):
    cmd = ([PY, "train.py"] if nproc == 1 else
           [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
            "train.py"])
    res = run(cmd + ["--config", str(cfg), "--run-dir", str(run_dir), *extra], timeout=600,
              **env)
    return res


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("train/loss")
    return [float(ln.split(",")[col]) for ln in lines[1:]]


def _vector(weights: dict) -> torch.Tensor:
    return torch.cat([weights[k].float().flatten() for k in sorted(weights)])


@pytest.fixture(scope="module")
def gpu_run(gpu_cfg) -> Path:
    rd = gpu_cfg.parent / "run"
    res = _train(gpu_cfg, rd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"device {DEV.type}" in res.stdout, res.stdout[-2000:]
    return rd


def test_checkpoint_resume_and_export_round_trip_on_the_gpu(gpu_cfg, gpu_run):
    """Killed after step 4 and resumed from step 3: the same model as the uninterrupted run
    (up to CUDA's non-deterministic reductions), and the export reloads onto the GPU as
    written."""
    from meanflow import load_model
    rd = gpu_cfg.parent / "killed"
    assert _train(gpu_cfg, rd, MEANFLOW_KILL_AFTER_STEP=4).returncode == 137
    again = _train(gpu_cfg, rd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "step_0000003" in again.stdout
    a = _vector(load_file(str(gpu_run / "export" / "model.safetensors")))
    b = _vector(load_file(str(rd / "export" / "model.safetensors")))
    assert (a - b).abs().max() <= 1e-3 * a.abs().max()
    net, info = load_model(gpu_run / "export", DEV)
    assert {p.device.type for p in net.parameters()} == {DEV.type} and info["step"] == 6
    saved = load_file(str(gpu_run / "export" / "model.safetensors"))
    for k, v in net.state_dict().items():
        assert torch.equal(v.cpu(), saved[k]), k


def test_evaluate_and_load_pipeline_on_the_gpu(gpu_run, tmp_path):
    import numpy as np

    import meanflow
    out = tmp_path / "eval"
    res = run([PY, "evaluate.py", "--ckpt", str(gpu_run), "--split", "test", "--steps", "1",
               "--num-samples", "8", "--out", str(out)], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["n"] == 8 and len(list(out.rglob("*.png"))) >= 8
    assert "edge_f1" in results["results"][0]
    edge = np.zeros((16, 16), np.uint8)
    edge[4:12, 4] = edge[4:12, 11] = edge[4, 4:12] = edge[11, 4:12] = 255
    pipe = meanflow.load_pipeline(gpu_run, device=DEV)
    assert next(pipe.model.parameters()).device.type == DEV.type
    imgs = pipe(edges=[edge], steps=1, seed=0, labels=[3])
    cpu = meanflow.load_pipeline(gpu_run, device="cpu")(edges=[edge], steps=1, seed=0,
                                                        labels=[3])
    a, b = np.asarray(imgs[0], np.float32), np.asarray(cpu[0], np.float32)
    assert a.shape == b.shape and np.abs(a - b).mean() < 8.0      # of 255: bf16 against fp32


def test_two_processes_on_one_gpu_train_like_one(gpu_cfg, gpu_run):
    """Two ranks on the GPU(s) at hand (gloo where they share one) follow one process's loss
    trajectory: the global batch's draws do not depend on the process count."""
    rd = gpu_cfg.parent / "two"
    res = _train(gpu_cfg, rd, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout
    one, two = _losses(gpu_run), _losses(rd)
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, rel=2e-2, abs=1e-3)
