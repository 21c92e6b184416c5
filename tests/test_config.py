"""Typed YAML config with dotted overrides: errors name the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from meanflow.config import Config, ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_config_loads():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files, "no configs shipped"
    for f in files:
        assert isinstance(load_config(f), Config), f


def test_overrides_are_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("meanflow:\n  cfg_omega: 1.5\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(p, ["meanflow.cfg_omega=2.0", "train.betas=[0.9,0.99]",
                          "model.name=SiT-B/2", "data.flip=false", "train.max_steps=10"])
    assert cfg.meanflow.cfg_omega == 2.0
    assert cfg.train.betas == [0.9, 0.99]
    assert cfg.model.name == "SiT-B/2"
    assert cfg.data.flip is False
    assert cfg.train.max_steps == 10 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr == 1e-4          # from the file; ints are accepted for floats
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    # PyYAML reads 1e-3 (no dot) as a string; a float key still takes it, in a file too
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3
    p.write_text("train:\n  lr: 3E-4\n")
    assert load_config(p).train.lr == 3e-4


@pytest.mark.parametrize("override, match", [
    ("meanflow.cfg_omgea=2", r"unknown config key 'meanflow.cfg_omgea'"),
    ("trian.lr=1", r"unknown config key 'trian'"),
    ("train.max_steps=1.5", r"train.max_steps: expected int, got float"),
    ("train.max_steps=ten", r"train.max_steps: expected int, got str"),
    ("data.flip=3", r"data.flip: expected bool"),
    ("meanflow.ratio_r_neq_t=1.5", r"meanflow.ratio_r_neq_t: must be <= 1.0"),
    ("meanflow.time_sigma=0", r"meanflow.time_sigma: must be > 0.0"),
    ("meanflow.time_dist=gauss", r"meanflow.time_dist: 'gauss' is not one of"),
    ("train.lr=.nan", r"train.lr: must be finite"),
    ("train.lr=1e-3x", r"train.lr: expected float, got str '1e-3x'"),
    ("train.betas=[0.9]", r"train.betas must be two numbers"),
    ("meanflow.cfg_t_min=0.9", r"cfg_t_min .* > meanflow.cfg_t_max"),
    ("model=3", r"model: expected a mapping"),
    ("nokey", r"must look like key.sub=value"),
])
def test_bad_values_name_the_key(override, match):
    if override == "meanflow.cfg_t_min=0.9":
        overrides = [override, "meanflow.cfg_t_max=0.5"]
    else:
        overrides = [override]
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "typo.yaml"
    p.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'train.lrr'"):
        load_config(p)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["meanflow.cfg_omega=3.0", "model.channel_mults=[1,2]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
