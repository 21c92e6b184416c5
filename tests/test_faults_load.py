"""Faults found by probing how models are loaded and runs are started, each reproduced on a
tiny run the tests train (docs/reliability.md lists them):

  loading    a checkpoint without COMPLETE, a step_N.tmp save, one without ema.safetensors
             (never the raw weights unless asked); weights of another width; a received
             model naming a hub repository (nothing fetched that the caller did not name);
             labels True / 2.7; absolute paths in a saved pipeline; PIL's global limit; a
             stroke cut off by the centre crop
  train.py   a failed resume leaves the run folder as it was, in one line; --run-dir that is
             a file; list entries of the wrong type, a seed out of range, a size the
             backbone cannot take
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import PY, run, tiny_config

from meanflow.config import ConfigError, load_config

STEP = "step_0000002"


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def train(cfg: Path, run_dir: Path, *extra):
    return run([PY, "train.py", "--config", str(cfg), "--run-dir", str(run_dir), *extra])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, dataset) -> dict:
    """A finished 2-step run (edges and labels; checkpoint and export at step 2)."""
    tmp = tmp_path_factory.mktemp("faults_load")
    data = dataset
    cfg = tiny_config(tmp / "tiny.yaml", data, model=dict(attn_resolutions=[]),
                      meanflow=None,
                      train=dict(max_steps=2, lr=5.0e-2, warmup_steps=0, log_every=1,
                                 image_every=100, ckpt_every=2, ema_decays=[0.5],
                                 keep_checkpoints=3))
    res = train(cfg, tmp / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(cfg=cfg, data=data, run=tmp / "run", ckpt=tmp / "run" / "checkpoints" / STEP)


def raw_weights(ckpt: Path) -> dict:
    from meanflow.checkpoint import strip_wrappers
    return strip_wrappers(load_file(str(ckpt / "model.safetensors")))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# 1. never the raw weights unless asked
# --------------------------------------------------------------------------------------------
def incomplete(tiny: dict, tmp: Path, kind: str) -> Path:
    if kind == "no_complete":                    # cp -r step_N ck; rm ck/COMPLETE
        ck = shutil.copytree(tiny["ckpt"], tmp / "ck")
        (ck / "COMPLETE").unlink()
    elif kind == "tmp":                          # a save killed before its rename
        ck = shutil.copytree(tiny["ckpt"], tmp / "run" / "checkpoints" / f"{STEP}.tmp")
    else:                                        # complete, but its EMA file is gone
        ck = shutil.copytree(tiny["ckpt"], tmp / "ck")
        (ck / "ema.safetensors").unlink()
    return ck


@pytest.mark.parametrize("kind, says", [("no_complete", "no COMPLETE marker"),
                                        ("tmp", "unfinished checkpoint save"),
                                        ("no_ema", "no ema.safetensors")])
def test_an_incomplete_checkpoint_is_refused_naming_what_is_missing(tiny, tmp_path, kind, says):
    from meanflow.export import load_model
    ck = incomplete(tiny, tmp_path, kind)
    with pytest.raises(ValueError) as e:
        load_model(ck, "cpu")
    msg = str(e.value)
    assert says in msg and str(ck) in msg and "\n" not in msg, msg


def test_raw_weights_only_when_asked_and_said(tiny, tmp_path, capsys):
    from meanflow.export import load_model
    ck = incomplete(tiny, tmp_path, "no_ema")
    with pytest.raises(ValueError, match="weights='raw'"):
        load_model(ck, "cpu")
    net, info = load_model(ck, "cpu", weights="raw")
    assert info["weights"] == "raw" and same(net.state_dict(), raw_weights(tiny["ckpt"]))
    assert "RAW training weights" in capsys.readouterr().err
    ema, info = load_model(tiny["ckpt"], "cpu")           # the default: the EMA
    assert info["weights"] == "ema" and not same(ema.state_dict(), raw_weights(tiny["ckpt"]))
    with pytest.raises(ValueError, match="EMA weights only"):
        load_model(tiny["run"], "cpu", weights="raw")      # an export has no raw weights


def test_sample_py_refuses_the_incomplete_checkpoint_and_states_raw(tiny, tmp_path):
    ck = incomplete(tiny, tmp_path, "no_complete")
    Image.fromarray(np.eye(40, dtype=np.uint8) * 255).save(tmp_path / "sk.png")
    res = run([PY, "sample.py", "--ckpt", str(ck), "--input", str(tmp_path / "sk.png"),
               "--out", str(tmp_path / "out")])
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "no COMPLETE marker" in res.stderr and not (tmp_path / "out").exists()
    res = run([PY, "sample.py", "--ckpt", str(tiny["ckpt"]), "--weights", "raw", "--input",
               str(tmp_path / "sk.png"), "--out", str(tmp_path / "raw")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RAW training weights" in res.stderr


def test_evaluate_never_files_results_under_a_tmp_checkpoint(tiny, tmp_path):
    run_dir = shutil.copytree(tiny["run"], tmp_path / "run")
    incomplete(tiny, tmp_path, "tmp")
    res = run([PY, "evaluate.py", "--ckpt", str(run_dir / "checkpoints" / f"{STEP}.tmp"),
               "--num-samples", "4", "--no-png", "--no-edge-f1"])
    assert res.returncode == 2, res.stderr[-3000:]
    assert "unfinished checkpoint save" in res.stderr
    assert not (run_dir / "eval").exists()


def test_init_from_an_incomplete_checkpoint_is_refused_and_raw_on_request(tiny, tmp_path):
    import models
    from meanflow.warmstart import WarmStartError, init_from
    cfg = load_config(tiny["cfg"])
    ck = incomplete(tiny, tmp_path, "no_ema")
    model = models.build(cfg.model)
    with pytest.raises(WarmStartError, match="no ema.safetensors"):
        init_from(model, ck)
    assert "raw weights" in init_from(model, ck, "raw")
    assert same(model.state_dict(), raw_weights(tiny["ckpt"]))
    assert load_config(tiny["cfg"], ["train.init_weights=raw"]).train.init_weights == "raw"


# --------------------------------------------------------------------------------------------
# 2. a failed resume changes nothing, in one line; weights of another width
# --------------------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


def test_a_resume_that_does_not_fit_changes_nothing_and_is_one_line(tiny, tmp_path):
    rd = shutil.copytree(tiny["run"], tmp_path / "r1")
    before, config = snapshot(rd), (rd / "config.yaml").read_text()
    res = train(tiny["cfg"], rd, "model.base_channels=8", "train.max_steps=4")
    assert res.returncode == 2
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(res.stderr.strip().splitlines()) <= 2, res.stderr[-3000:]
    assert f"{rd / 'checkpoints' / STEP} does not fit the model" in errors[0]
    assert "differ in shape" in errors[0] and "model.base_channels=16 (here 8)" in errors[0]
    assert (rd / "config.yaml").read_text() == config
    assert snapshot(rd) == before


def test_weights_of_another_width_are_one_line_in_load_model_and_init_from(tiny, tmp_path):
    import models
    from meanflow.export import load_model
    from meanflow.warmstart import WarmStartError, init_from
    export = shutil.copytree(tiny["run"] / "export", tmp_path / "export")
    info = json.loads((export / "model_config.json").read_text())
    info["model"]["base_channels"] = 8
    (export / "model_config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError) as e:
        load_model(export, "cpu")
    assert "does not fit the model" in str(e.value) and "differ in shape" in str(e.value)
    assert "\n" not in str(e.value)
    narrow = load_config(tiny["cfg"], ["model.base_channels=8"])
    with pytest.raises(WarmStartError) as e:
        init_from(models.build(narrow.model), tiny["run"], "ema",
                  {"base_channels": 8, "num_classes": 10})
    assert "differ in shape" in str(e.value) and "model.base_channels=16 (here 8)" in str(e.value)


# --------------------------------------------------------------------------------------------
# 3. nothing fetched from the hub that the caller did not name
# --------------------------------------------------------------------------------------------
class Recorder:
    """Stands in for AutoencoderKL.from_pretrained / an annotator's: records, then fails as
    a repository missing from the local cache does."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, name, *args, **kwargs):
        self.calls.append((str(name), kwargs))
        raise OSError(f"{name} is not in the cache")


@pytest.fixture
def fake_vae(monkeypatch):
    from diffusers import AutoencoderKL
    rec = Recorder()
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", rec)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)       # as the probe ran it
    return rec


EVIL = "attacker-org/evil-vae"


def test_a_received_models_vae_is_never_fetched(tiny, tmp_path, fake_vae):
    import meanflow
    from meanflow.codec import CodecError
    export = shutil.copytree(tiny["run"] / "export", tmp_path / "received")
    info = json.loads((export / "model_config.json").read_text())
    info["dataset_meta"].update(codec="sd-vae", vae=EVIL, scaling_factor=0.18)
    (export / "model_config.json").write_text(json.dumps(info))
    pipe = meanflow.load_pipeline(export, "cpu")
    with pytest.raises(CodecError) as e:
        pipe.decode
    assert fake_vae.calls == [(EVIL, dict(use_safetensors=True, local_files_only=True))]
    assert EVIL in str(e.value) and "vae=" in str(e.value) and "\n" not in str(e.value)
    # allow_download covers the default SD-VAE only, never the id a model records
    with pytest.raises(CodecError):
        meanflow.load_pipeline(export, "cpu", allow_download=True).decode
    assert fake_vae.calls[-1][1]["local_files_only"] is True


def test_the_vae_may_be_fetched_when_the_caller_names_it_or_allows_the_default(fake_vae):
    from meanflow.codec import DEFAULT_VAE, CodecError, VAECodec, make_decoder
    meta = dict(codec="sd-vae", vae=DEFAULT_VAE, scaling_factor=0.18)
    for kwargs, local_only in ((dict(), True), (dict(allow_download=True), False),
                               (dict(vae=EVIL), False)):
        with pytest.raises(CodecError):
            make_decoder(meta, "cpu", **kwargs)
        assert fake_vae.calls[-1][1] == dict(use_safetensors=True, local_files_only=local_only)
    assert fake_vae.calls[-1][0] == EVIL
    with pytest.raises(CodecError, match="allow_download=True"):
        make_decoder(meta, "cpu")
    with pytest.raises(CodecError):                 # preprocess/cache.py --vae: named
        VAECodec(EVIL, 32, "cpu", "fp32")
    assert fake_vae.calls[-1][1]["use_safetensors"] is True


def test_a_received_models_annotator_repository_is_never_fetched(monkeypatch):
    from meanflow.edges import EdgeConfigError, detector_from_meta
    rec = Recorder()
    fake = types.ModuleType("controlnet_aux.pidi")
    fake.PidiNetDetector = types.SimpleNamespace(from_pretrained=rec)
    monkeypatch.setitem(sys.modules, "controlnet_aux", types.ModuleType("controlnet_aux"))
    monkeypatch.setitem(sys.modules, "controlnet_aux.pidi", fake)
    meta = dict(edges="pidinet", edge_size=64, edge_settings=dict(annotators="evil/annot"))
    with pytest.raises(EdgeConfigError) as e:
        detector_from_meta(meta)
    assert rec.calls == [("evil/annot", dict(local_files_only=True))]
    assert "evil/annot" in str(e.value) and "not in the local cache" in str(e.value)


# --------------------------------------------------------------------------------------------
# 4. one line instead of a traceback
# --------------------------------------------------------------------------------------------
def test_run_dir_that_is_a_file_is_one_line(tiny, tmp_path):
    f = tmp_path / "not_a_folder"
    f.write_text("x")
    res = train(tiny["cfg"], f)
    assert res.returncode == 2
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"--run-dir {f}" in errors[0] and "not a folder" in errors[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_run_dir_that_cannot_be_written_is_one_line(tiny, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        res = train(tiny["cfg"], ro / "run")
    finally:
        ro.chmod(0o700)
    assert res.returncode == 2
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "--run-dir" in errors[0] and "Permission denied" in errors[0]


@pytest.mark.parametrize("override, says", [
    ("model.channel_mults=[1,a]", "model.channel_mults[1]: expected int, got str 'a'"),
    ("model.channel_mults=[1,1.5]", "model.channel_mults[1]: expected int, got float 1.5"),
    ("model.attn_resolutions=[true]", "model.attn_resolutions[0]: expected int, got bool"),
    ("train.ema_decays=[0.9,x]", "train.ema_decays[1]: expected float, got str 'x'"),
    ("train.seed=100000000000000000000000", "train.seed: must be <= 9223372036854775807"),
    ("model.input_size=7", "model.input_size=7: the U-Net halves it 1 time "),
    ("model.edge_size=24", "model.edge_size=24: must be model.input_size=16 times a power"),
])
def test_bad_config_values_are_one_line_naming_the_key(tiny, override, says):
    with pytest.raises(ConfigError) as e:
        load_config(tiny["cfg"], [override])
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_size_the_backbone_cannot_take_is_one_line_in_train_py(tiny, tmp_path):
    res = train(tiny["cfg"], tmp_path / "dry", "--dry-run", "model.name=SiT-S/4",
                "model.input_size=18", f"data.path={tmp_path}/nowhere",
                f"data.val_path={tmp_path}/nowhere")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and "model.input_size=18" in errors[0]


@pytest.mark.parametrize("label", [True, 2.7, 1.0, np.bool_(True)])
def test_labels_that_are_not_integers_or_names_are_refused(tiny, label):
    import meanflow
    from meanflow.pipeline import InputError
    pipe = meanflow.load_pipeline(tiny["run"], "cpu")
    assert pipe.label_index(2) == 2 and pipe.label_index(np.int64(3)) == 3
    with pytest.raises(InputError, match=f"label {label!r}: not a class index or name"):
        pipe.label_index(label)


# --------------------------------------------------------------------------------------------
# 5. small ones
# --------------------------------------------------------------------------------------------
def test_a_saved_pipeline_names_no_local_path(tiny, tmp_path):
    import meanflow
    saved = meanflow.load_pipeline(tiny["run"], "cpu").save_pretrained(tmp_path / "saved")
    for name in ("model_config.json", "README.md"):
        text = (saved / name).read_text()
        assert str(tiny["data"]) not in text and str(tmp_path) not in text, name
        assert '"/' not in text and "`/" not in text, name
    info = json.loads((saved / "model_config.json").read_text())
    assert info["data"]["path"] == "data/train"
    assert meanflow.load_pipeline(saved, "cpu").mcfg.base_channels == 16     # still loads


def test_loading_and_sketches_leave_pils_global_limit_alone(tiny, tmp_path):
    import meanflow
    before = Image.MAX_IMAGE_PIXELS
    Image.fromarray(np.eye(40, dtype=np.uint8) * 255).save(tmp_path / "sk.png")
    pipe = meanflow.load_pipeline(tiny["run"], "cpu")
    assert pipe.edge_from_sketch(tmp_path / "sk.png").any()
    assert Image.MAX_IMAGE_PIXELS == before


def test_a_stroke_cut_off_by_the_centre_crop_says_so(tiny):
    import meanflow
    from meanflow.pipeline import InputError
    pipe = meanflow.load_pipeline(tiny["run"], "cpu")
    wide = np.zeros((40, 120), np.uint8)
    wide[10:30, 5:8] = 255                          # left of the centre square [40, 80)
    with pytest.raises(InputError, match="the crop cuts them off"):
        pipe.edge_from_sketch(wide)
