"""demo/run.py end to end on a tiny Fashion-MNIST-format set: the ablation trains the four
models through `accelerate launch`, evaluates every step count at one N, computes the floor
and writes its tables, grids and bars; the demo run after it reuses every model and the
MeanFlow evaluation instead of redoing them."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import PY, run, write_idx

ROOT = Path(__file__).resolve().parents[1]
N = 12                       # test samples per FID (the tiny set has 32)
ROWS, ZOOM = 8, 3            # demo/run.py's grid rows and tile zoom


def demo_module():
    sys.path.insert(0, str(ROOT / "demo"))
    import run as demo_run
    return demo_run


def tiny_fashion(tmp_path: Path) -> Path:
    """The tiny Fashion-MNIST-format set (96 train, 32 test images), cached as the demo does."""
    data = tmp_path / "data"
    res = run([PY, "preprocess/cache.py", "--source", "fashion-mnist", "--fashion-root",
               str(write_idx(tmp_path / "idx")), "--output", str(data), "--image-size", "32",
               "--codec", "pixel", "--edges", "canny"])
    assert res.returncode == 0, res.stderr[-3000:]
    return data


@pytest.mark.slow
def test_ablation_then_demo_reuses_models_and_evaluations(tmp_path):
    data = tiny_fashion(tmp_path)
    common = ["--data", str(data), "--runs", str(tmp_path / "runs"), "--out",
              str(tmp_path / "out"), "--edge-minutes", "0.03", "--class-minutes", "0.03",
              "--num-samples", str(N)]
    cache = dict(MEANFLOW_CACHE_DIR=tmp_path / "cache")

    abl = run([PY, "demo/run.py", "ablation", *common], timeout=900, **cache)
    assert abl.returncode == 0, (abl.stdout + abl.stderr)[-4000:]
    summary = json.loads((tmp_path / "out" / "ablation.json").read_text())
    got = {k: [r["steps"] for r in v] for k, v in summary["results"].items() if k != "floor"}
    assert got == {"edge_mf": [1, 2, 4], "edge_fm": [1, 2, 4, 16], "class_mf": [1, 2, 4],
                   "class_fm": [1, 2, 4, 16]}
    for k, rows in summary["results"].items():
        for r in (rows if k != "floor" else [rows]):
            assert r["n"] == N and np.isfinite(r["fid"]) and r["fid"] > 0, (k, r)
    # where FID rises with steps (from a > 1 steps), the merged-grid probe was measured at N
    demo_run = demo_module()
    for k, rows in summary["results"].items():
        rise = demo_run.first_rise(rows) if k.startswith("edge") else None
        if rise is not None and rise[0] > 1:
            p = summary["probes"][k]
            assert p["steps"] == demo_run.probe_spec(rise) and p["n"] == N, (k, p)
        else:
            assert k not in summary["probes"], k
    assert all("edge_f1" in r for r in summary["results"]["edge_fm"])
    assert not any("edge_f1" in r for r in summary["results"]["class_fm"])
    assert len(summary["bars"]) == 4 and all(isinstance(b["met"], bool)
                                             for b in summary["bars"])
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert "real train images (floor)" in md and "| bar | measured | met |" in md
    assert md.count("| flow matching |") == 8               # 4 step counts x 2 tasks
    # edge | real | MeanFlow 1, 2, 4 | flow matching 1, 2, 4, 16: 9 columns of 32 x 32 tiles
    w, h = Image.open(tmp_path / "out" / "ablation_edge_grid.png").size
    tile = 32 * ZOOM + 2
    assert (w, h) == (9 * tile + 2, ROWS * tile + 2)
    # 10 class rows; 3 groups of 8 samples with 2 blank separators
    w, h = Image.open(tmp_path / "out" / "ablation_class_grid.png").size
    assert (w, h) == ((3 * 8 + 2) * tile + 2, 10 * tile + 2)

    demo = run([PY, "demo/run.py", "demo", *common], timeout=600, **cache)
    assert demo.returncode == 0, (demo.stdout + demo.stderr)[-4000:]
    assert demo.stdout.count("nothing to do: the run is complete") == 2   # both MF models
    assert "reusing" in demo.stdout and "evaluate.py" not in demo.stdout
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| MeanFlow | 1 |" in text and "(grid.png)" in text and "(class_grid.png)" in text
    w, h = Image.open(tmp_path / "out" / "grid.png").size
    assert (w, h) == (5 * tile + 2, ROWS * tile + 2)


def test_monotone_note_reports_where_quality_is_lost():
    demo_run = demo_module()
    rows = [dict(steps=s, fid=f) for s, f in ((1, 60.0), (2, 46.0), (4, 44.0), (16, 65.0))]
    assert demo_run.first_rise(rows) == (4, 16)
    assert demo_run.probe_spec((4, 16)) == "16@0.25" and demo_run.probe_spec((2, 4)) == "4@0.5"
    assert demo_run.first_rise(rows[:3]) is None and demo_run.monotone_note("x", rows[:3], None) == []
    near = demo_run.monotone_note("edge FM", rows, dict(fid=47.0, nfe=13))
    assert "44.0 -> 65.0" in near[0] and "13 NFE" in near[0] and "near the data (t < 0.25)" in near[0]
    far = demo_run.monotone_note("edge FM", rows, dict(fid=63.0, nfe=13))
    assert "above t = 0.25" in far[0]
    # a rise within the sampling noise is reported as such, gets no probe and no cause,
    # and does not hide a real rise further on
    noisy = [dict(steps=s, fid=f) for s, f in ((1, 46.8), (2, 43.3), (4, 43.6))]
    assert demo_run.first_rise(noisy) is None
    note = demo_run.monotone_note("edge MF", noisy, None)
    assert len(note) == 1 and "43.3 -> 43.6" in note[0] and "too small to locate" in note[0]
    both = noisy + [dict(steps=16, fid=50.0)]
    assert demo_run.first_rise(both) == (4, 16)
    assert "43.6 -> 50.0" in demo_run.monotone_note("edge MF", both, None)[0]


SPEED = dict(inception_s=0.1, edge_nfe_s=0.003, cls_nfe_s=0.002)


def test_budget_plan_gives_training_what_the_evaluation_leaves(tmp_path, monkeypatch, capsys):
    R = demo_module()
    n = 1000
    # the estimate counts every sample's Inception pass and network evaluations, the fixed
    # cost of each evaluate.py call and step count, and a safety margin
    est = R.eval_seconds([("edge", [1, 2, 4])], n, SPEED)
    assert est == pytest.approx(R.SAFETY * (3 * n * 0.1 + n * 0.003 * 7) + R.EVAL_CALL_S
                                + 3 * R.EVAL_SPEC_S)
    assert R.nfe("16@0.25") == 13 and R.nfe("4@0.5") == 3 and R.nfe(16) == 16
    assert R.eval_seconds([("cls", [1])], n, SPEED, ref_images=n) > R.eval_seconds(
        [("cls", [1])], n, SPEED)

    runs = tmp_path / "runs"
    monkeypatch.setattr(R, "measure_speed", lambda args: SPEED)
    args = R.parse_args(["demo", "--runs", str(runs), "--budget-minutes", "25"])
    p = R.plan(args, time.time() - 120)              # two minutes of set-up already spent
    left = 25 * 60 - 120 - est - R.GRIDS_S - 2 * R.TRAIN_OVERHEAD_S
    assert p["edge_minutes"] + p["class_minutes"] == pytest.approx(left / 60, abs=0.05)
    assert p["edge_minutes"] / p["class_minutes"] == pytest.approx(9 / 4, rel=0.01)
    assert p["fits"] and p["ablation_after_demo_estimate_min"] > p["edge_minutes"]
    assert json.loads((runs / "plan.json").read_text()) == p

    # decided once: a resumed demo or the ablation reuses it, whatever else changed
    monkeypatch.setattr(R, "measure_speed", lambda args: pytest.fail("measured again"))
    again = R.plan(R.parse_args(["ablation", "--runs", str(runs), "--budget-minutes", "5"]),
                   time.time())
    assert again == p
    # given minutes win (both or neither)
    given = R.plan(R.parse_args(["demo", "--runs", str(runs), "--edge-minutes", "3",
                                 "--class-minutes", "1"]), time.time())
    assert (given["edge_minutes"], given["class_minutes"]) == (3, 1)
    with pytest.raises(SystemExit, match="both"):
        R.plan(R.parse_args(["demo", "--runs", str(runs), "--edge-minutes", "3"]), time.time())

    # a machine too slow for the budget: the minimum training, and a warning that says so
    monkeypatch.setattr(R, "measure_speed", lambda args: dict(SPEED, inception_s=1.0))
    slow = R.plan(R.parse_args(["demo", "--runs", str(tmp_path / "slow")]), time.time())
    assert not slow["fits"]
    assert (slow["edge_minutes"], slow["class_minutes"]) == (R.MIN_MINUTES["edge"],
                                                             R.MIN_MINUTES["cls"])
    assert "WARNING" in capsys.readouterr().out


def test_measure_speed_and_the_reference_statistics(tmp_path, monkeypatch):
    R = demo_module()
    data = tiny_fashion(tmp_path)
    monkeypatch.setenv("MEANFLOW_CACHE_DIR", str(tmp_path / "cache"))
    speed = R.measure_speed(R.parse_args(["demo", "--data", str(data), "--num-samples", str(N)]))
    assert set(speed) == {"inception_s", "edge_nfe_s", "cls_nfe_s"}
    assert all(np.isfinite(v) and 0 < v < 10 for v in speed.values()), speed
    # the N test reference images are done (and cached for the evaluation) before training
    assert len(list((data / "test" / "fid_ref").glob(f"*-n{N}-*.npz"))) == 1
