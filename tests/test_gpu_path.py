"""The GPU path, proven on a CPU.

Two devices stand in for a GPU (see the project's notes): ``meta`` runs a whole training step
(forward, forward-mode JVP, backward, optimizer, EMA) and raises as soon as a CPU tensor
meets it, as a CPU tensor meeting a CUDA one does; FakeTensorMode makes fake ``cuda:0`` /
``cuda:1`` tensors for forward passes. Each test below reproduces a bug that the code had
when read against a CUDA machine.
"""
from __future__ import annotations

import math
import signal
import subprocess

import pytest
import torch

from meanflow import launch
from meanflow import step as step_lib
from helpers import PY, ROOT, TINY_CFG, MetaAccelerator, env, fake_batch, run, tiny_cfg
from meanflow.objective import MeanFlowLoss, neq_layout, uncompiled, unwrap
from meanflow.training import EMA

def _step_on_meta(monkeypatch, cfg, ema_before_prepare: bool = False):
    import models
    # the fused optimizer's device check has no meta kernel; the update itself is not what
    # moves tensors between devices, so a plain step stands in for it here
    monkeypatch.setattr(step_lib, "apply_update", lambda opt, ok, fp16: opt.step())
    acc = MetaAccelerator()
    net = models.build(cfg.model)
    early = EMA(net, cfg.train.ema_decays) if ema_before_prepare else None
    model, opt, ema, fwd = launch.prepare_training(acc, net, cfg)
    ema = early or ema
    loss_fn = MeanFlowLoss(cfg.meanflow, check_values=False)   # values cannot be read on meta
    return step_lib.train_step(model, fwd, opt, ema, loss_fn, [fake_batch()], 0,
                               accelerator=acc, cfg=cfg, world=1, rank=0), ema


def test_training_step_runs_on_the_accelerator_device(monkeypatch):
    cfg = tiny_cfg(fused_optimizer=False, grad_accum=1)
    (ok, nonfinite, gnorm, stats), ema = _step_on_meta(monkeypatch, cfg)
    # every output of the step, the EMA shadows and the loss statistics live on the device
    assert ok.device.type == nonfinite.device.type == gnorm.device.type == "meta"
    assert {v.device.type for v in stats.values()} == {"meta"}
    assert {t.device.type for s in ema.shadows for t in s.values()} == {"meta"}


def test_an_ema_built_before_prepare_is_caught(monkeypatch):
    # the original order: EMA(model) before accelerate.prepare leaves its shadows on the CPU
    cfg = tiny_cfg(fused_optimizer=False)
    with pytest.raises(RuntimeError, match="meta"):
        _step_on_meta(monkeypatch, cfg, ema_before_prepare=True)


def test_the_ema_network_for_grids_and_exports_lives_on_the_device(monkeypatch):
    """train.py's one EMA network (Trainer.ema_net) lives on the training device and is
    refreshed there by EMA.fill from the live model and EMA 0; one left on the CPU is caught
    (a copy out of a device tensor into a host parameter)."""
    import models
    cfg = tiny_cfg(fused_optimizer=False, grad_accum=1)
    monkeypatch.setattr(step_lib, "apply_update", lambda opt, ok, fp16: opt.step())
    acc = MetaAccelerator()
    model, opt, ema, fwd = launch.prepare_training(acc, models.build(cfg.model), cfg)

    live = acc.unwrap_model(model)
    net = ema.fill(models.build(cfg.model).to(acc.device).eval(), live)
    assert {p.device.type for p in net.parameters()} == {"meta"}
    with pytest.raises((RuntimeError, NotImplementedError)):
        ema.fill(models.build(cfg.model).eval(), live)


def test_fp16_scaler_sees_the_step_after_a_nonfinite_one():
    # GradScaler keeps per-optimizer state: unscale_ twice without a step/update in between
    # raises. A skipped step must still go through the scaler's step and update.
    net = torch.nn.Linear(4, 1)
    inner = torch.optim.AdamW(net.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)

    class Fp16Optimizer:                 # what accelerate's optimizer wrapper does under fp16
        optimizer = inner

        def step(self):
            scaler.step(inner)
            scaler.update()

        def zero_grad(self):
            inner.zero_grad()
    opt = Fp16Optimizer()
    before = net.weight.detach().clone()
    for loss_scale in (float("nan"), 1.0):
        loss = net(torch.ones(2, 4)).sum() * loss_scale
        scaler.scale(loss).backward()
        scaler.unscale_(inner)                       # what accelerator.clip_grad_norm_ does
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        step_lib.apply_update(opt, torch.isfinite(gnorm), fp16=True)
        opt.zero_grad()
        if loss_scale != loss_scale:                 # the NaN step: skipped, scale halved
            assert torch.equal(net.weight, before) and scaler.get_scale() == 4.0
    assert not torch.equal(net.weight, before)        # the finite step was applied


def test_fused_adamw_skips_a_nonfinite_update_on_the_device():
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
    before = net.weight.detach().clone()
    net(torch.ones(2, 4)).sum().backward()
    step_lib.apply_update(opt, torch.tensor(False), fp16=False)
    assert torch.equal(net.weight, before)
    assert opt.state[net.weight]["step"].item() == 0          # not counted as a step
    assert not hasattr(opt, "found_inf")
    step_lib.apply_update(opt, torch.tensor(True), fp16=False)
    assert not torch.equal(net.weight, before)
    assert opt.state[net.weight]["step"].item() == 1


@pytest.mark.parametrize("launched,config,device,want", [
    ("no", "auto", "cpu", "no"),
    ("bf16", "auto", "cpu", "bf16"),          # the launcher's flag is followed
    ("no", "bf16", "cpu", "bf16"),
    (None, "auto", "cpu", "no"),
])
def test_precision_follows_the_launcher(launched, config, device, want):
    tc = tiny_cfg(mixed_precision=config).train
    envd = {} if launched is None else {launch.LAUNCH_PRECISION_ENV: launched}
    assert launch.resolve_precision(tc, torch.device(device), envd) == want


def test_precision_conflicts_and_fp16_on_cpu_are_errors():
    from meanflow.config import ConfigError
    tc = tiny_cfg(mixed_precision="fp16").train
    with pytest.raises(ConfigError, match="launcher asks for --mixed_precision bf16"):
        launch.resolve_precision(tc, torch.device("cpu"), {launch.LAUNCH_PRECISION_ENV: "bf16"})
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        launch.resolve_precision(tc, torch.device("cpu"), {})
    with pytest.raises(ConfigError, match="grad_accum=3 but the launcher asks for"):
        launch.resolve_grad_accum(tiny_cfg(grad_accum=3).train,
                                 {launch.LAUNCH_ACCUM_ENV: "2"})
    assert launch.resolve_grad_accum(tiny_cfg().train, {launch.LAUNCH_ACCUM_ENV: "2"}) == 2


def test_mixed_precision_no_is_accepted_from_yaml_and_the_command_line():
    from meanflow.config import load_config
    cfg = load_config(None, ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"


def _cfg_file(tmp_path, data) -> str:
    import yaml
    d = {k: dict(v) for k, v in TINY_CFG.items()}
    d["data"] = dict(d["data"], path=f"{data}/train", val_path=f"{data}/test")
    d["train"] = dict(d["train"], log_every=2, image_every=100, ckpt_every=100)
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def test_launcher_flags_reach_the_loop(tmp_path, dataset):
    """accelerate launch's --gradient_accumulation_steps and --mixed_precision arrive as
    environment variables: the loop follows them (they crashed or were ignored before)."""
    cfg = _cfg_file(tmp_path, dataset)
    res = run([PY, "train.py", "--config", cfg, "--run-dir", str(tmp_path / "r"),
               "train.max_steps=2"], ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2,
              ACCELERATE_MIXED_PRECISION="bf16")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x 2 accumulation" in res.stdout and "precision bf16" in res.stdout
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert "grad_accum: 2" in saved and "mixed_precision: bf16" in saved
    res = run([PY, "train.py", "--config", cfg, "--run-dir", str(tmp_path / "x"),
               "train.mixed_precision=fp16"])
    assert res.returncode == 2 and "fp16 needs a CUDA GPU" in res.stderr


def test_sigterm_to_the_launcher_reaches_the_trainer(tmp_path, dataset):
    cfg = _cfg_file(tmp_path, dataset)
    rd = tmp_path / "term"
    proc = subprocess.Popen(
        [PY, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "train.py", "--config", cfg, "--run-dir", str(rd), "train.max_steps=100000"],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                 # blocks until the loop is about to start
        if "parameters;" in line:
            break
    proc.send_signal(signal.SIGTERM)         # to the launcher, not to train.py
    # the trainer shares the launcher's stdout: EOF comes when the trainer has exited too
    out, err = proc.communicate(timeout=240)
    assert "(SIGTERM); checkpoint saved" in out, err[-3000:]
    ckpts = list((rd / "checkpoints").glob("step_*"))
    from meanflow.checkpoint import is_complete
    assert len(ckpts) == 1 and is_complete(ckpts[0])


# --------------------------------------------------------------------------------------------
# r != t samples: the same number on every rank, and the same draws for any process count
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,ratio", [(32, 0.25), (256, 0.25), (64, 0.1), (48, 0.5)])
def test_every_rank_gets_the_same_number_of_jvp_samples(batch, ratio):
    cfg = tiny_cfg().meanflow
    cfg.ratio_r_neq_t = ratio
    loss = MeanFlowLoss(cfg)
    n_neq = round(ratio * batch)
    one = loss.draw((1, 4, 4), batch, seed=0, step=5, has_cond=True)
    assert len(one.neq_idx) == n_neq
    for world in (2, 4, 8):
        if batch % world:
            continue
        parts = [loss.draw((1, 4, 4), batch, seed=0, step=5, rank=k, world=world,
                           has_cond=True) for k in range(world)]
        # the same draws as one process, sliced
        assert torch.equal(torch.cat([p.noise for p in parts]), one.noise)
        assert torch.equal(torch.cat([p.r for p in parts]), one.r)
        assert torch.equal(torch.cat([p.keep for p in parts]), one.keep)
        counts = [len(p.neq_idx) for p in parts]
        if math.gcd(batch, n_neq) % world == 0:
            assert counts == [n_neq // world] * world
        else:
            assert max(counts) - min(counts) <= n_neq // math.gcd(batch, n_neq)


def test_neq_layout_positions_vary_and_count_is_exact():
    g = torch.Generator().manual_seed(0)
    masks = torch.stack([neq_layout(32, 8, generator=g) for _ in range(200)])
    assert (masks.sum(1) == 8).all()
    assert (masks.view(200, 8, 4).sum(2) == 1).all()          # one per block of 4
    freq = masks.float().mean(0)
    assert (freq - 0.25).abs().max() < 0.12                   # every position gets its turn


# --------------------------------------------------------------------------------------------
# Throughput options: the same numbers as the plain path
# --------------------------------------------------------------------------------------------
def _loss_and_grads(model, fwd, batch, cfg, neq_idx=None):
    loss_fn = MeanFlowLoss(cfg.meanflow)
    d = loss_fn.draw((1, 16, 16), 8, seed=0, step=0, has_cond=True)
    model.zero_grad()
    x = batch["x"]
    if x.dim() == 4 and fwd is not None and getattr(fwd, "_cl", False):
        x = x.contiguous(memory_format=torch.channels_last)
    out = loss_fn(fwd, x, batch["edge"].float() / 255, batch["label"], noise=d.noise, r=d.r,
                  t=d.t, keep=d.keep, neq_idx=d.neq_idx)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}


def _close(a, b, tol):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, rtol=tol, atol=tol)
    assert ga.keys() == gb.keys()
    for k in ga:
        assert torch.allclose(ga[k], gb[k], rtol=tol, atol=tol), k


def test_channels_last_unet_gives_the_same_loss_and_gradients():
    import models
    cfg = tiny_cfg()
    torch.manual_seed(0)
    net = models.build(cfg.model)
    ref = _loss_and_grads(net, net, fake_batch(), cfg)
    net = net.to(memory_format=torch.channels_last)
    net._cl = True
    _close(ref, _loss_and_grads(net, net, fake_batch(), cfg), 1e-4)


def test_sit_gradient_checkpointing_composes_with_the_jvp():
    import models
    cfg = tiny_cfg()
    cfg.model.name, cfg.model.input_size, cfg.model.edge_size = "SiT-S/4", 16, 16
    torch.manual_seed(0)
    net = models.build(cfg.model)
    for p in net.parameters():          # leave adaLN-Zero's identity so every block counts
        torch.nn.init.normal_(p, std=0.02)
    ref = _loss_and_grads(net, net, fake_batch(), cfg)
    net.grad_checkpointing = True
    _close(ref, _loss_and_grads(net, net, fake_batch(), cfg), 1e-5)


def test_gradient_checkpointing_with_the_joint_jvp_is_refused():
    from meanflow.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="grad_checkpointing needs meanflow.jvp_mode=split"):
        load_config(None, ["model.grad_checkpointing=true", "meanflow.jvp_mode=joint"])


def test_compiled_model_keeps_the_jvp_and_no_grad_passes_eager():
    import models
    cfg = tiny_cfg()
    torch.manual_seed(0)
    net = models.build(cfg.model)
    compiled = torch.compile(net, backend="eager")
    assert unwrap(compiled) is net and uncompiled(compiled) is net
    ddp_like = torch.compile(torch.nn.Sequential(net), backend="eager")
    assert uncompiled(ddp_like) is ddp_like._orig_mod
    _close(_loss_and_grads(net, net, fake_batch(), cfg),
           _loss_and_grads(net, compiled, fake_batch(), cfg), 1e-6)


# --------------------------------------------------------------------------------------------
# One device per process: cuda:LOCAL_RANK
# --------------------------------------------------------------------------------------------
def test_process_device_is_the_local_rank_gpu(monkeypatch):
    from meanflow.runtime import process_device
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert process_device() == torch.device("cuda", 1)
    assert process_device("cuda") == torch.device("cuda", 1)      # bare "cuda" means ours
    assert process_device("cuda:0") == torch.device("cuda", 0)    # an explicit index wins
    assert process_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_device() == torch.device("cpu")


def test_cache_builds_its_vae_and_detector_on_the_local_rank_gpu(monkeypatch, tmp_path):
    from preprocess import cache
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = {}

    class Stop(Exception):
        pass

    def fake_codec(args, device):
        seen["codec"] = device
        raise Stop

    monkeypatch.setattr(cache, "build_codec", fake_codec)
    img = tmp_path / "imgs" / "train" / "a"
    img.mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (32, 32)).save(img / "x.png")
    with pytest.raises(Stop):
        cache.main(["--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "out"),
                    "--image-size", "32", "--codec", "sd-vae", "--vae", str(tmp_path),
                    "--edges", "canny"])
    assert seen["codec"] == "cuda:1"


def test_sampling_on_the_local_rank_gpu_stays_there():
    """What evaluate.py and the sampling API do per rank, under fake CUDA devices: a model
    built on cuda:1 sampled with noise made for cuda:1 never touches cuda:0 or the CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import models
    from meanflow.sampling import sample, sample_noise
    cfg = tiny_cfg()
    with FakeTensorMode(allow_non_fake_inputs=True):
        with torch.device("cuda:1"):
            net = models.build(cfg.model).eval()
        noise = sample_noise((1, 16, 16), [0, 1], torch.device("cuda:1"))
        edge = torch.zeros(2, 1, 16, 16, device="cuda:1")
        out = sample(net, noise, 1, edge=edge, label=torch.zeros(2, dtype=torch.long,
                                                                  device="cuda:1"))
        assert out.device == torch.device("cuda:1")
        with pytest.raises(RuntimeError, match="same device"):
            sample(net, noise.to("cuda:0"), 1, edge=edge.to("cuda:0"))


# --------------------------------------------------------------------------------------------
# Many nodes: the run folder must be shared
# --------------------------------------------------------------------------------------------
class TwoNodes:
    """Two processes whose main process writes to a folder the other one cannot see."""

    num_processes = 2
    process_index = 0
    is_main_process = True

    def __init__(self, shared: bool):
        self.shared = shared

    def wait_for_everyone(self):
        pass


def test_a_run_folder_not_shared_between_nodes_is_refused(tmp_path, monkeypatch):
    import accelerate.utils as au
    for shared in (True, False):
        acc = TwoNodes(shared)
        monkeypatch.setattr(au, "broadcast_object_list", lambda objs: objs)
        # rank 1's view: the probe exists only if the folder is shared
        monkeypatch.setattr(au, "gather_object", lambda mine, a=acc: mine + (
            [None] if a.shared else ["rank 1 on node-b"]))
        if shared:
            launch.check_shared_run_dir(acc, tmp_path)
        else:
            with pytest.raises(RuntimeError, match="not shared by every process: rank 1 on "
                                                   "node-b cannot see"):
                launch.check_shared_run_dir(acc, tmp_path)
        assert not list(tmp_path.glob(".shared_check_*"))          # the probe is cleaned up


def test_channels_last_model_checkpoints_and_exports(monkeypatch, tmp_path):
    """The CUDA U-Net runs channels_last: its EMA and export must still save and reload."""
    import models
    from meanflow.checkpoint import save_ema
    from meanflow.export import export_model, load_model
    cfg = tiny_cfg(fused_optimizer=True)
    monkeypatch.setattr(launch, "uses_channels_last", lambda cfg, device: True)

    class CPUAccelerator(MetaAccelerator):
        device = torch.device("cpu")

    acc = CPUAccelerator()
    model, opt, ema, fwd = launch.prepare_training(acc, models.build(cfg.model), cfg)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())
    step_lib.train_step(model, fwd, opt, ema, MeanFlowLoss(cfg.meanflow), [fake_batch()], 0,
                        accelerator=acc, cfg=cfg, world=1, rank=0, channels_last=True)
    (tmp_path / "ck").mkdir()
    save_ema(tmp_path / "ck", ema)
    export_model(tmp_path / "ex", model, cfg, {"codec": "pixel"}, 1, 0.9)
    net, _ = load_model(tmp_path / "ex", "cpu")
    for k, v in net.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
