"""demo/run.py end to end on a tiny Fashion-MNIST-format set: the ablation trains the four
models with train.py, evaluates them with evaluate.py and computes the floor from two
preprocess/fid_stats.py files; the tables hold exactly the numbers those programs wrote; the
demo run after it reuses every model and evaluation; nothing lands in the source tree except
through `pictures`, which copies the files as they are."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import PY, run, tables, write_idx

ROOT = Path(__file__).resolve().parents[1]
N = 12                       # test samples per FID (the tiny set has 32)
TRAIN_STEPS = 4              # every model's budget here: train.max_steps, no time limit
TILE = 32 + 2                # evaluate.py's grid: 32 x 32 tiles, 2 pixels of padding


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


def source_tree() -> dict:
    """The checkout's own files (tracked, and untracked but not ignored) and everything under
    the demo's default output folders (runs/demo, docs/demo), with size and mtime. Other
    ignored folders (data/, other runs/, .venv) belong to whatever else runs on the machine."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    paths = {ROOT / f for f in listed.splitlines()}
    for d in ("runs/demo", "docs/demo"):
        paths |= {p for p in (ROOT / d).rglob("*") if p.is_file()}
    out = {}
    for p in paths:
        if p.exists():
            st = os.lstat(p)
            out[str(p.relative_to(ROOT))] = (st.st_size, st.st_mtime_ns)
    return out




def score_cells(r: dict) -> list[str]:
    """FID, KID x 1e3, edge F1 and N of an evaluate.py row as the tables print them."""
    return [f"{r['fid']:.1f}", f"{1e3 * r['kid']:.2f}",
            f"{r['edge_f1']:.3f}" if "edge_f1" in r else "", str(r["n"])]


@pytest.mark.slow
def test_ablation_then_demo_then_pictures(tmp_path):
    data = tiny_fashion(tmp_path)
    runs = tmp_path / "runs"
    common = ["--data", str(data), "--runs", str(runs), "--num-samples", str(N),
              "train.max_minutes=0", f"train.max_steps={TRAIN_STEPS}", "train.warmup_steps=0"]
    cache = dict(MEANFLOW_CACHE_DIR=tmp_path / "cache")
    before = source_tree()

    abl = run([PY, "demo/run.py", "ablation", *common], timeout=900, **cache)
    assert abl.returncode == 0, (abl.stdout + abl.stderr)[-4000:]
    summary = json.loads((runs / "ablation.json").read_text())
    assert list(summary["results"]) == ["edge_mf", "class_mf", "edge_fm", "class_fm"]
    md_tables = tables((runs / "ablation.md").read_text())
    assert len(md_tables) == 3                       # the runs, edge -> image, class -> image

    # each model: trained for the budget; its row holds its export's step and its config
    demo_run = demo_module()
    by_model = {row[0]: row for row in md_tables[0]}
    assert demo_run.WARM_START == {"edge_mf": "edge_mf_fm_half"}
    for name in demo_run.RUNS:
        step = json.loads((runs / name / "export" / "model_config.json").read_text())["step"]
        info = summary["runs"][name]
        assert step == TRAIN_STEPS, name
        label = name + (" (warm start)" if name in demo_run.WARM_START else "")
        assert by_model[label][3] == str(info["steps"]), name
        assert by_model[label][4] == f"{info['minutes']:.1f}", name
        cfg = (runs / name / "config.yaml").read_text()
        assert f"ratio_r_neq_t: {info['ratio_r_neq_t']}" in cfg, name
    assert [summary["runs"][k]["ratio_r_neq_t"] for k in demo_run.RUNS] == [0.1, 0.25, 0.0, 0.0]
    # the warm start: flow matching in its own folder, then MeanFlow from that export, each
    # for half the budget; the table counts both halves' steps
    half = runs / "edge_mf_fm_half"
    assert "ratio_r_neq_t: 0.0" in (half / "config.yaml").read_text()
    assert f"init_from: {half / 'export'}" in (runs / "edge_mf" / "config.yaml").read_text()
    assert summary["runs"]["edge_mf"]["steps"] == f"{TRAIN_STEPS} + {TRAIN_STEPS}"
    assert [summary["runs"][k]["steps"] for k in list(demo_run.RUNS)[1:]] == [TRAIN_STEPS] * 3

    # the floor: FID of the two fid_stats.py files, recomputed here
    from meanflow import metrics
    fl = summary["floor"]
    stats = [metrics.load_reference_npz(fl[k]) for k in ("train_stats", "test_stats")]
    assert [s["n"] for s in stats] == [N, N]
    assert Path(fl["train_stats"]).parent == runs / "floor"
    assert fl["fid"] == pytest.approx(metrics.fid_from_statistics(*stats), rel=1e-6)
    assert fl["n"] == N

    # every score: what evaluate.py wrote, and the tables print exactly those numbers
    for task, table in zip(("edge", "class"), md_tables[1:]):
        want = []
        for name, label in ((f"{task}_mf", "MeanFlow"), (f"{task}_fm", "flow matching")):
            res = json.loads((runs / name / "eval" / f"test_n{N}_seed0" / "results.json")
                             .read_text())
            assert res["meta"]["step"] == TRAIN_STEPS and res["meta"]["n"] == N
            assert summary["results"][name] == res["results"], name
            assert [r["steps"] for r in res["results"]] == demo_run.STEPS[name[-2:]]
            assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in res["results"])
            assert all(("edge_f1" in r) == (task == "edge") for r in res["results"])
            want += [[label, str(r["steps"]), *score_cells(r)] for r in res["results"]]
        want.append(["real train images (floor)", "", f"{fl['fid']:.1f}", "", "", str(N)])
        assert table == want, task

    # the grids are evaluate.py's: [edge | real | one column per step count] on 8 test rows,
    # one row per class (balanced labels) without edge or real
    grids = {"grid.png": ("edge_mf", f"test_n{N}_seed0", 2 + 3, 8),
             "class_grid.png": ("class_mf", "classes_seed0", 3, 10),
             "ablation_edge_grid.png": ("edge_fm", f"test_n{N}_seed0", 2 + 4, 8),
             "ablation_class_grid.png": ("class_fm", "classes_seed0", 4, 10)}
    for f, (name, ev, cols, rows) in grids.items():
        src = runs / name / "eval" / ev / "grid.png"
        assert (runs / f).read_bytes() == src.read_bytes(), f
        assert Image.open(runs / f).size == (cols * TILE + 2, rows * TILE + 2), f

    demo = run([PY, "demo/run.py", "demo", *common], timeout=600, **cache)
    assert demo.returncode == 0, (demo.stdout + demo.stderr)[-4000:]
    # both MeanFlow models and the warm start's flow-matching half
    assert demo.stdout.count("nothing to do: the run is complete") == 3
    assert demo.stdout.count("reusing") == 2 and "evaluate.py" not in demo.stdout
    runs_rows, edge_rows = tables((runs / "results.md").read_text())
    assert [r[0] for r in runs_rows] == ["edge_mf (warm start)", "class_mf"]
    assert edge_rows == [["MeanFlow", str(r["steps"]), *score_cells(r)]
                         for r in summary["results"]["edge_mf"]]
    assert source_tree() == before, "demo/run.py wrote into the source tree"

    docs = tmp_path / "docs_demo"
    pics = run([PY, "demo/run.py", "pictures", "--runs", str(runs), "--to", str(docs)])
    assert pics.returncode == 0, pics.stderr[-3000:]
    assert sorted(p.name for p in docs.iterdir()) == sorted(demo_run.PICTURES)
    for f in demo_run.PICTURES:
        assert (docs / f).read_bytes() == (runs / f).read_bytes(), f


def test_pictures_copies_what_the_runs_hold_and_nothing_else(tmp_path):
    demo_run = demo_module()
    args = demo_run.parse_args(["demo"])
    assert (args.runs, args.to) == (str(ROOT / "runs/demo"), str(ROOT / "docs/demo"))
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    with pytest.raises(SystemExit, match="results.md"):
        demo_run.main(["pictures", "--runs", str(runs), "--to", str(docs)])
    assert not docs.exists()
    # a demo without the ablation: its two grids and results.md, byte for byte
    (runs / "edge_mf").mkdir(parents=True)
    written = {"results.md": b"# x\n", "grid.png": bytes(range(256)), "class_grid.png": b"\x89"}
    for f, b in written.items():
        (runs / f).write_bytes(b)
    (runs / "edge_mf" / "grid.png").write_bytes(b"not copied")
    assert demo_run.main(["pictures", "--runs", str(runs), "--to", str(docs)]) == 0
    assert {p.name: p.read_bytes() for p in docs.iterdir()} == written


def test_the_warm_start_splits_the_configs_minutes_in_two_halves(tmp_path, monkeypatch):
    """edge_mf: flow matching for half of fashion_demo.yaml's 9 minutes in its own folder, then
    MeanFlow from that export for the other half; other models train once, unchanged."""
    demo_run = demo_module()
    calls = []
    monkeypatch.setattr(demo_run, "sh", calls.append)
    args = demo_run.parse_args(["demo", "--runs", str(tmp_path), "train.seed=3"])
    demo_run.train("edge_mf", args)
    demo_run.train("class_mf", args)
    assert len(calls) == 3
    half, warm, cls = calls
    assert half[half.index("--run-dir") + 1] == str(tmp_path / "edge_mf_fm_half")
    assert half[-2:] == ["meanflow.ratio_r_neq_t=0.0", "train.max_minutes=4.5"]
    assert warm[warm.index("--run-dir") + 1] == str(tmp_path / "edge_mf")
    assert warm[-2:] == ["train.max_minutes=4.5",
                         f"train.init_from={tmp_path / 'edge_mf_fm_half' / 'export'}"]
    assert all("train.seed=3" in c for c in (half, warm, cls))
    assert not any("max_minutes" in a or "init_from" in a for a in cls)
