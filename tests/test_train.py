"""train.py end to end on CPU, with a tiny LMDB the test writes.

One process and two (torchrun, gloo) give the same model; a run killed and resumed ends
bitwise identical to an uninterrupted one; non-finite losses are skipped then stop the run;
SIGTERM checkpoints and exits; config typos and dataset mismatches fail before training.
"""
from __future__ import annotations

import signal
import subprocess

import pytest
import torch

from helpers import PY, ROOT, env, final_weights
from helpers import train_run as train



def test_one_process_writes_checkpoints_export_and_logs(tmp_path, tiny_config_file):
    cfg = tiny_config_file(data=dict(num_workers=1))
    res = train(cfg, tmp_path / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    rd = tmp_path / "run"
    ckpts = sorted(p.name for p in (rd / "checkpoints").iterdir())
    assert ckpts == ["step_0000003", "step_0000006"]          # keep_checkpoints = 2
    last = rd / "checkpoints" / "step_0000006"
    from meanflow.checkpoint import is_complete
    from meanflow.export import load_model
    assert is_complete(last)
    # the EMAs in safetensors, not accelerate's pickle; the first one is the run's export at
    # the same step (what evaluate.py reads from a checkpoint)
    assert (last / "ema.safetensors").is_file() and not list(last.glob("custom_checkpoint_*"))
    net, info = load_model(last, "cpu")
    assert info["step"] == 6
    export = final_weights(rd)
    assert net.state_dict().keys() == export.keys()
    assert all(torch.equal(v, export[k]) for k, v in net.state_dict().items())
    assert (rd / "config.yaml").is_file()
    info = (rd / "export" / "model_config.json").read_text()
    assert '"step": 6' in info and '"codec": "pixel"' in info
    lines = (rd / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    for key in ("train/loss", "train/mse", "train/u_rms", "train/tgt_rms", "train/rms_ratio",
                "train/grad_norm", "train/lr", "train/samples_per_s"):
        assert key in header, key
    assert len(lines) == 1 + 3                                 # steps 2, 4, 6
    # TensorBoard through Accelerate's tracker: the scalars at the logging steps, the grid at
    # the image steps ([edge | real | EMA 1 step | 2 steps] per validation sample, 16 px
    # tiles, 1 px padding)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(rd / "tb"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    csv_loss = [float(ln.split(",")[header.index("train/loss")]) for ln in lines[1:]]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(csv_loss, rel=1e-5)
    grids = events.Images("val/edge_gt_ema1_ema2")
    assert [g.step for g in grids] == [3, 6]
    assert grids[0].width == 4 * 17 + 1 and (grids[0].height - 1) % 17 == 0
    w = final_weights(rd)
    assert all(torch.isfinite(v).all() for v in w.values())


def test_two_processes_train_the_same_model_as_one(tmp_path, tiny_config_file):
    cfg = tiny_config_file()
    one = train(cfg, tmp_path / "one")
    two = train(cfg, tmp_path / "two", nproc=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    w1, w2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    # Same data, noise, times and dropout masks; only the float summation order differs, and
    # Adam turns float noise in near-zero gradients into steps of up to lr. Bound that.
    v1 = torch.cat([w1[k].flatten() for k in sorted(w1)])
    v2 = torch.cat([w2[k].flatten() for k in sorted(w1)])
    assert (v1 - v2).abs().max() < 3e-3                     # lr 1e-3, 6 steps
    assert (v1 - v2).norm() / v1.norm() < 1e-3


def test_killed_run_resumes_bitwise_identical(tmp_path, tiny_config_file):
    cfg = tiny_config_file(data=dict(num_workers=1))
    ref = train(cfg, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    rd = tmp_path / "killed"
    died = train(cfg, rd, MEANFLOW_KILL_AFTER_STEP=4)
    assert died.returncode == 137
    # a half-written checkpoint (no COMPLETE marker) must never be taken as the latest
    (rd / "checkpoints" / "step_0000005").mkdir()
    (rd / "checkpoints" / "step_0000005.tmp").mkdir()
    again = train(cfg, rd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "step_0000003" in again.stdout
    a, b = final_weights(tmp_path / "ref"), final_weights(rd)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # a finished run started again does nothing (scripts re-run it to reuse what is done)
    before = sorted(p.name for p in (rd / "checkpoints").iterdir())
    done = train(cfg, rd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nothing to do: the run is complete at step 6" in done.stdout
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == before


def test_nonfinite_loss_is_skipped_then_stops_the_run(tmp_path, tiny_config_file):
    cfg = tiny_config_file()
    res = train(cfg, tmp_path / "skip", MEANFLOW_INJECT_NAN_STEPS="1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 1: non-finite loss or gradient, update skipped" in res.stdout
    csv = (tmp_path / "skip" / "metrics.csv").read_text()
    assert "train/skipped_steps" in csv
    w = final_weights(tmp_path / "skip")
    assert all(torch.isfinite(v).all() for v in w.values())

    res = train(cfg, tmp_path / "stop", "train.max_nonfinite=2",
                MEANFLOW_INJECT_NAN_STEPS="3,4,5")
    assert res.returncode == 3
    # the streak is read at sync points (here the end of the run): 3 in a row by then
    assert "3 consecutive non-finite steps (train.max_nonfinite=2)" in res.stdout
    ckpts = sorted(p.name for p in (tmp_path / "stop" / "checkpoints").iterdir())
    assert ckpts == ["step_0000003"]                        # the last good one, intact
    assert f"The last good checkpoint, {tmp_path / 'stop' / 'checkpoints' / ckpts[0]}" in res.stdout

    # before any checkpoint there is none to speak of
    res = train(cfg, tmp_path / "early", "train.max_nonfinite=2", "train.sync_every=2",
                MEANFLOW_INJECT_NAN_STEPS="0,1")
    assert res.returncode == 3
    assert "2 consecutive non-finite steps" in res.stdout
    assert "No checkpoint was written yet" in res.stdout and "intact" not in res.stdout
    assert not (tmp_path / "early" / "checkpoints").exists()


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_config_file):
    cfg = tiny_config_file()
    rd = tmp_path / "term"
    proc = subprocess.Popen([PY, "train.py", "--config", str(cfg), "--run-dir", str(rd),
                             "train.max_steps=100000", "train.ckpt_every=100000",
                             "train.image_every=100000"],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                 # blocks until the loop is about to start
        if "parameters;" in line:
            break
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "(SIGTERM); checkpoint saved" in out
    ckpts = list((rd / "checkpoints").glob("step_*"))
    from meanflow.checkpoint import checkpoint_step, is_complete
    assert len(ckpts) == 1 and is_complete(ckpts[0])
    # the marker records the training time so far; train.max_minutes budgets the whole run,
    # resumes included, so a budget already spent trains no further
    step, secs = checkpoint_step(ckpts[0])
    assert secs > 0
    spent = train(cfg, rd, "train.max_steps=100000", f"train.max_minutes={float(secs) / 120}")
    assert spent.returncode == 0, spent.stderr[-3000:]
    assert f"nothing to do: the run is complete at step {step}" in spent.stdout
    assert list((rd / "checkpoints").glob("step_*")) == ckpts


def test_bad_config_and_mismatched_dataset_fail_before_training(tmp_path, tiny_config_file):
    cfg = tiny_config_file()
    res = train(cfg, tmp_path / "typo", "train.lrr=1")
    assert res.returncode == 2 and "unknown config key 'train.lrr'" in res.stderr
    res = train(cfg, tmp_path / "size", "data.image_size=32", "model.input_size=32",
                "model.edge_size=32")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: dataset 'train' (__meta__) has image_size=16 but the config has "
        "data.image_size=32"]
    assert not (tmp_path / "size" / "checkpoints").exists()
    res = train(cfg, tmp_path / "dry", "--dry-run")
    assert res.returncode == 0
    assert "parameters" in res.stdout and "96 records" in res.stdout


def test_a_config_without_the_shape_keys_takes_them_from_the_dataset(tmp_path,
                                                                    tiny_config_file):
    """model.input_size / in_channels / edge_size and data.image_size / channels / codec left
    out: the run takes them from the LMDB's metadata, says so, and RUN/config.yaml holds
    them resolved (so the run's config alone rebuilds its model)."""
    import yaml
    from meanflow.config import load_config
    cfg = yaml.safe_load(tiny_config_file().read_text())
    for section, key in [("model", "input_size"), ("model", "in_channels"),
                         ("model", "edge_size"), ("data", "image_size"), ("data", "channels"),
                         ("data", "codec")]:
        del cfg[section][key]
    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump(cfg))
    res = train(short, tmp_path / "run", "train.max_steps=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("from the dataset's metadata: data.codec=pixel, data.image_size=16, "
            "data.channels=1, model.in_channels=1, model.input_size=16, model.edge_size=16"
            ) in res.stdout
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert (saved.model.input_size, saved.model.in_channels, saved.model.edge_size,
            saved.data.image_size, saved.data.channels, saved.data.codec) == (
        16, 1, 16, 16, 1, "pixel")


def test_cpu_budget_clock_does_not_count_time_the_process_is_stopped(tmp_path, tiny_config_file):
    """train.budget_clock=cpu: train.max_minutes counts the process's CPU time, so a trainer
    that other jobs hold up still gets its whole budget (comparisons at equal compute on a
    shared machine). The stimulus is a SIGSTOP of 3 s, longer than the 1.2 s budget: a wall
    clock would stop at the first step after it. Also: train.log_with=none writes no
    TensorBoard folder, and metrics.csv still."""
    cfg = tiny_config_file()
    rd = tmp_path / "cpu"
    proc = subprocess.Popen([PY, "train.py", "--config", str(cfg), "--run-dir", str(rd),
                             "train.max_steps=100000", "train.ckpt_every=100000",
                             "train.image_every=100000", "train.sync_every=1",
                             "train.budget_clock=cpu", "train.max_minutes=0.02",
                             "train.log_with=none"],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                 # printed once the budget's clock has started
        if "parameters;" in line:
            break
    proc.send_signal(signal.SIGSTOP)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=3)                 # the process is stopped: this always times out
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "(train.max_minutes reached)" in out
    (ckpt,) = (rd / "checkpoints").glob("step_*")
    step, secs = (ckpt / "COMPLETE").read_text().split()
    assert 1.2 <= float(secs) < 2.5          # CPU seconds: the stop is not in it
    assert int(step) > 1
    assert not (rd / "tb").exists() and (rd / "metrics.csv").is_file()


def test_a_tracker_whose_package_is_missing_is_an_error(monkeypatch, tmp_path):
    """Accelerate drops a tracker whose package is missing without a word; train.py stops."""
    import accelerate.tracking
    from meanflow.config import ConfigError, load_config
    from meanflow.tracking import Tracker
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["tensorboard"])
    cfg = load_config(ROOT / "configs" / "fashion_demo.yaml", ["train.log_with=wandb"])
    with pytest.raises(ConfigError) as e:
        Tracker(None, tmp_path).start(cfg)
    assert str(e.value) == ("train.log_with=wandb: its package is not installed (pip install "
                            "wandb)")
