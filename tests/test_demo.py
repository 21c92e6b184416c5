"""demo/run.py end to end on a tiny Fashion-MNIST-format set: the ablation trains the four
models through `accelerate launch`, evaluates every step count at one N, computes the floor
and writes its tables, grids and bars; the demo run after it reuses every model and the
MeanFlow evaluation instead of redoing them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from helpers import PY, run, write_idx

ROOT = Path(__file__).resolve().parents[1]
N = 12                       # test samples per FID (the tiny set has 32)
ROWS, ZOOM = 8, 3            # demo/run.py's grid rows and tile zoom


def test_ablation_then_demo_reuses_models_and_evaluations(tmp_path):
    idx = write_idx(tmp_path / "idx")
    data = tmp_path / "data"
    res = run([PY, "preprocess/cache.py", "--source", "fashion-mnist", "--fashion-root",
               str(idx), "--output", str(data), "--image-size", "32", "--codec", "pixel",
               "--edges", "canny"])
    assert res.returncode == 0, res.stderr[-3000:]
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
    sys.path.insert(0, str(ROOT / "demo"))
    import run as demo_run
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
    sys.path.insert(0, str(ROOT / "demo"))
    import run as demo_run
    rows = [dict(steps=s, fid=f) for s, f in ((1, 60.0), (2, 46.0), (4, 44.0), (16, 65.0))]
    assert demo_run.first_rise(rows) == (4, 16)
    assert demo_run.probe_spec((4, 16)) == "16@0.25" and demo_run.probe_spec((2, 4)) == "4@0.5"
    assert demo_run.first_rise(rows[:3]) is None and demo_run.monotone_note("x", rows[:3], None) == []
    near = demo_run.monotone_note("edge FM", rows, dict(fid=47.0, nfe=13))
    assert "44.0 -> 65.0" in near[0] and "13 NFE" in near[0] and "near the data (t < 0.25)" in near[0]
    far = demo_run.monotone_note("edge FM", rows, dict(fid=63.0, nfe=13))
    assert "above t = 0.25" in far[0]
