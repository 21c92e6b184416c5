"""Faults a new user runs into, each reproduced through the real entry points (train.py,
preprocess/cache.py) on tiny data the tests write: nothing is lost, and every error is one
clear line naming the culprit. docs/reliability.md lists them with what survives.

  cache.py   a file name that is not UTF-8, a symlink loop; an offline hub id
  train.py   a validation set that does not fit the model; a failing validation grid;
             --resume none into a finished run; an export older than the last checkpoint;
             a truncated checkpoint, a torn config.yaml, a pickle refused by weights_only;
             two trainers on one run folder, and a restart after kill -9; a full disk;
             --dry-run before the dataset exists; --help listing the config keys
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import PY, ROOT, env, make_pixel_dataset, run
from helpers import final_weights, write_cfg
from helpers import train_run as train

from meanflow.config import load_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory, dataset) -> tuple[Path, Path]:
    """A finished 6-step run (checkpoints 3 and 6, export at 6); tests copy it."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = write_cfg(tmp, dataset)
    res = train(cfg, tmp / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    return cfg, tmp / "run"


def copy_run(finished_run: Path, to: Path) -> Path:
    shutil.copytree(finished_run, to, symlinks=True)
    return to


def ckpt_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


# --------------------------------------------------------------------------------------------
# preprocess/cache.py
# --------------------------------------------------------------------------------------------
def test_cache_keeps_a_non_utf8_file_name_and_reports_a_symlink_loop(tmp_path):
    cat = tmp_path / "raw" / "train" / "cat"
    cat.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in (b"a.png", b"caf\xe9.png", b"z.png"):        # b'\xe9': Latin-1, not UTF-8
        arr = rng.integers(0, 255, (24, 24, 3), np.uint8)
        Image.fromarray(arr).save(os.fsencode(cat) + b"/" + name, format="PNG")
    os.symlink("loop", cat / "loop")                          # points at itself
    out = tmp_path / "out"
    args = [PY, "preprocess/cache.py", "--input", str(tmp_path / "raw"), "--output", str(out),
            "--image-size", "16", "--batch-size", "8"]
    res = run(args)
    assert res.returncode == 0, res.stderr[-3000:]
    from meanflow.data import LMDBDataset
    report = json.loads((out / "train" / "report.json").read_text())
    # the loop is listed with its reason, not dropped; the three images are all kept
    assert [f["key"] for f in report["failed"]] == ["train/cat/loop"]
    assert "symbolic links" in report["failed"][0]["reason"]
    ds = LMDBDataset(out / "train", allow_incomplete=True, use_edges=False)
    assert list(ds.keys) == ["train/cat/a", "train/cat/caf%E9", "train/cat/z"]
    # the key is stable: a rerun finds the record present and writes nothing new
    again = run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "written 0, already present 3, failed 1" in again.stdout


@pytest.mark.parametrize("flags, culprit", [
    (["--codec", "sd-vae", "--vae", "stabilityai/sd-vae-ft-mse", "--edges", "canny"], "--vae"),
    (["--edges", "pidinet"], "--annotators"),
])
def test_offline_hub_id_says_offline_and_how_to_pass_a_folder(tmp_path, flags, culprit):
    cat = tmp_path / "raw" / "train" / "cat"
    cat.mkdir(parents=True)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(cat / "a.png")
    empty_cache = tmp_path / "hf"                      # nothing cached: offline means missing
    res = run([PY, "preprocess/cache.py", "--input", str(tmp_path / "raw"), "--output",
               str(tmp_path / "out"), "--image-size", "32", *flags],
              HF_HOME=empty_cache, HF_HUB_OFFLINE=1)
    assert res.returncode == 2
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "offline" in errors[0] and f"{culprit} /path/to/folder" in errors[0]


# --------------------------------------------------------------------------------------------
# train.py: start-up checks
# --------------------------------------------------------------------------------------------
def test_validation_set_that_does_not_fit_fails_before_training(tmp_path, tiny_config_file):
    other = make_pixel_dataset(tmp_path / "other", image_size=8)      # another size
    cfg = tiny_config_file()
    rd = tmp_path / "run"
    res = train(cfg, rd, f"data.val_path={other}/test")
    assert res.returncode == 2
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and "data.val_path" in errors[0] and "image_size" in errors[0]
    assert "parameters;" not in res.stdout                            # no step was trained
    assert not (rd / "checkpoints").exists()


def test_a_failing_validation_grid_costs_the_picture_not_the_run(tmp_path, tiny_config_file,
                                                                 finished):
    cfg = tiny_config_file()
    rd = tmp_path / "run"
    res = train(cfg, rd, MEANFLOW_FAIL_VALIDATION_GRID=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("warning: the validation grid failed") == 2       # steps 3 and 6
    assert ckpt_names(rd) == ["step_0000003", "step_0000006"]
    # the grid swaps the EMA weights in; they are swapped back even when it fails
    assert equal(final_weights(rd), final_weights(finished[1]))


def test_dry_run_before_the_dataset_exists_and_help_lists_config_keys(tmp_path, tiny_config_file):
    cfg = tiny_config_file()
    res = train(cfg, tmp_path / "dry", "--dry-run", f"data.path={tmp_path}/nowhere",
                f"data.val_path={tmp_path}/nowhere")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "parameters" in res.stdout and "train:" in res.stdout      # config + model count
    assert f"dataset: MISSING (dataset {tmp_path}/nowhere: no such folder" in res.stdout
    assert not (tmp_path / "dry").exists()
    res = run([PY, "train.py", "--help"])
    assert res.returncode == 0
    for line in ("train.lr=0.0001", "model.edge_mode='add'", "meanflow.ratio_r_neq_t=0.25",
                 "data.val_path=''", "fraction of samples with r != t"):
        assert line in res.stdout, line


def test_afhq_sit_b2_config_ships_edge_tokens():
    cfg = load_config(ROOT / "configs" / "afhq_sit_b2.yaml")
    assert cfg.model.name == "SiT-B/2" and cfg.model.edge_mode == "tokens"


# --------------------------------------------------------------------------------------------
# train.py: the run folder
# --------------------------------------------------------------------------------------------
def test_resume_none_into_a_finished_run_is_refused(tmp_path, finished):
    cfg, src = finished
    rd = copy_run(src, tmp_path / "run")
    before = final_weights(rd)
    res = train(cfg, rd, "--resume", "none")
    assert res.returncode == 2
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and "--run-dir" in errors[0] and "step_0000006" in errors[0]
    assert ckpt_names(rd) == ["step_0000003", "step_0000006"]
    assert equal(final_weights(rd), before)
    fresh = train(cfg, tmp_path / "fresh", "--resume", "none", "train.max_steps=1")
    assert fresh.returncode == 0, fresh.stderr[-3000:]          # a new folder is fine


def test_restart_recreates_an_export_older_than_the_last_checkpoint(tmp_path, finished):
    """A kill between the last checkpoint and its export left export/ a step behind; the
    restart of the complete run must not keep it."""
    cfg, src = finished
    rd = copy_run(src, tmp_path / "run")
    want = final_weights(rd)
    # the export of step 3, rebuilt the way train.py writes it (EMA 0 of checkpoint 3)
    from meanflow.export import load_model
    net, info = load_model(rd / "checkpoints" / "step_0000003", "cpu")
    old = {k: v.contiguous() for k, v in net.state_dict().items()}
    assert not equal(old, want)
    from safetensors.torch import save_file
    save_file(old, str(rd / "export" / "model.safetensors"), metadata={"step": "3"})
    shutil.copy(rd / "checkpoints" / "step_0000003" / "model_config.json", rd / "export")
    res = train(cfg, rd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "nothing to do: the run is complete at step 6" in res.stdout
    assert "re-created it from step_0000006" in res.stdout
    assert equal(final_weights(rd), want)
    assert '"step": 6' in (rd / "export" / "model_config.json").read_text()
    # half-written: new weights, old config -> also re-created
    shutil.copy(rd / "checkpoints" / "step_0000003" / "model_config.json", rd / "export")
    res = train(cfg, rd)
    assert res.returncode == 0 and "re-created" in res.stdout, res.stderr[-3000:]
    assert '"step": 6' in (rd / "export" / "model_config.json").read_text()


def test_corrupt_latest_checkpoint_falls_back_and_torn_config_does_not_block(tmp_path,
                                                                               finished):
    cfg, src = finished
    rd = copy_run(src, tmp_path / "run")
    want = final_weights(rd)
    for victim in ("model.safetensors", "optimizer.bin"):
        f = rd / "checkpoints" / "step_0000006" / victim
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])         # truncated
        text = (rd / "config.yaml").read_text()
        cut = text.index("input_size") + 5                            # torn mid-key
        (rd / "config.yaml").write_text(text[:cut])
        res = train(cfg, rd)
        assert res.returncode == 0, res.stderr[-3000:]
        out = res.stdout
        assert "warning: skipping checkpoint step_0000006, it cannot be resumed: " in out
        assert victim in out and "Traceback" not in res.stderr
        assert "resumed from" in out and "step_0000003 at step 3" in out
        assert "config.yaml cannot be read" in out
        resolved = load_config(cfg)
        resolved.train.mixed_precision = "no"          # auto, as resolved on a CPU
        assert load_config(rd / "config.yaml") == resolved            # rewritten whole
        # the corrupt one is set aside (not pruned in place of good ones) and the run
        # retrains steps 4-6 to the same weights: resume is bitwise exact
        assert (rd / "checkpoints" / "step_0000006.corrupt").is_dir()
        assert equal(final_weights(rd), want)
        shutil.rmtree(rd / "checkpoints" / "step_0000006.corrupt")


class _Payload:
    """Unpickling this would run a command (it must never be unpickled)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickle_refused_by_weights_only_is_one_line_naming_the_file(tmp_path, finished):
    cfg, src = finished
    rd = copy_run(src, tmp_path / "run")
    pwned = tmp_path / "pwned"
    bad = rd / "checkpoints" / "step_0000006" / "random_states_0.pkl"
    torch.save({"x": _Payload(pwned)}, bad)
    res = train(cfg, rd, "--resume", str(rd / "checkpoints" / "step_0000006"))
    assert res.returncode == 2
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert str(bad) in errors[0] and "weights_only=True" in errors[0]
    assert "weights_only` set to `False`" not in res.stderr     # no advice to unlock it
    assert not pwned.exists()
    # --resume auto skips it with a warning and continues from the previous checkpoint
    res = train(cfg, rd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping checkpoint step_0000006" in res.stdout and not pwned.exists()


def test_two_trainers_on_one_run_folder_and_restart_after_kill_9(tmp_path, tiny_config_file):
    cfg = tiny_config_file()
    rd = tmp_path / "run"

    def start():
        proc = subprocess.Popen([PY, "train.py", "--config", str(cfg), "--run-dir", str(rd),
                                 "train.max_steps=100000", "train.ckpt_every=100000",
                                 "train.image_every=100000"], cwd=ROOT, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:                    # blocks until the loop is about to start
            if "parameters;" in line:
                break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        return proc

    first = start()
    first.send_signal(signal.SIGSTOP)       # alive and holding the folder, using no CPU
    try:
        second = train(cfg, rd, "train.max_steps=2")
        assert second.returncode == 2
        errors = error_lines(second.stderr)
        assert len(errors) == 1, second.stderr[-3000:]
        assert f"pid {first.pid} on host " in errors[0] and "--run-dir" in errors[0]
        assert not list(rd.glob("checkpoints/*.tmp"))
    finally:
        first.send_signal(signal.SIGKILL)           # kill -9: no chance to clean up
        first.communicate(timeout=60)
    # the dead process's lock is gone with it: a restart trains (from scratch, no checkpoint)
    again = train(cfg, rd, "train.max_steps=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert ckpt_names(rd) == ["step_0000002"]


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path,
                                                                                 finished):
    """The write limit of the process (RLIMIT_FSIZE, what `ulimit -f` sets) makes the
    kernel refuse writes past it, as a full disk does: checkpoint 6's optimizer state
    (2 MB) cannot be written, the model weights (1 MB) and logs can."""
    cfg, src = finished
    rd = copy_run(src, tmp_path / "run")
    shutil.rmtree(rd / "checkpoints" / "step_0000006")          # the run stopped at step 3
    prev = {f.name: f.read_bytes() for f in (rd / "checkpoints" / "step_0000003").iterdir()}
    limit = 1_400_000

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run([PY, "train.py", "--config", str(cfg), "--run-dir", str(rd)],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
                         preexec_fn=small_disk)
    assert res.returncode == 4, res.stderr[-3000:]
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "cannot write checkpoint" in errors[0] and "step_0000006" in errors[0]
    assert "step_0000003 is intact" in errors[0]
    assert ckpt_names(rd) == ["step_0000003"]                       # no .tmp left behind
    assert {f.name: f.read_bytes()
            for f in (rd / "checkpoints" / "step_0000003").iterdir()} == prev
    # with room again, the same command resumes from it and finishes
    res = train(cfg, rd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ckpt_names(rd) == ["step_0000003", "step_0000006"]
