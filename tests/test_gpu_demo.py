"""`make gpu-demo` (demo/gpu_demo.py): without a GPU it says so and exits 0; its logic runs on
the CPU in its tiny mode (--cpu-smoke) on the tiny Fashion-MNIST-format set, through the real
train.py and evaluate.py, and its tables hold exactly the numbers those wrote; the warm start
halves the GPU config's minutes; the curve picks checkpoints by training minutes; the bar
columns are the bars' arithmetic."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import PY, make_pixel_dataset, run, tables
from meanflow.config import load_config
from meanflow.checkpoint import ckpt_name, mark_complete

ROOT = Path(__file__).resolve().parents[1]
N = 6                        # test samples per FID (the tiny set has 32)
TILE = 32 + 2                # evaluate.py's grid: 32 x 32 tiles, 2 pixels of padding


def gpu_demo():
    sys.path.insert(0, str(ROOT / "demo"))
    import gpu_demo as mod
    return mod




def test_gpu_demo_without_a_gpu_says_so_and_succeeds():
    if torch.cuda.is_available():          # pragma: no cover - the suite runs on CPUs
        return
    res = run([PY, "demo/gpu_demo.py"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines() == [
        "gpu-demo: no CUDA GPU on this machine; nothing to run (use --cpu-smoke to run its "
        "logic on the CPU)"]


def test_the_gpu_configs_and_the_warm_start_halves(tmp_path, monkeypatch):
    """Both configs: a wider U-Net at batch >= 256 in bf16, a minutes budget that fits the
    8-minute plan with room for evaluation; edge_mf trains as flow matching for half its
    minutes, then as MeanFlow from that export; flow matching gets all of them."""
    mod = gpu_demo()
    edge, cls = (load_config(ROOT / mod.RUNS[k][0]) for k in ("edge_mf", "class_mf"))
    for cfg in (edge, cls):
        assert cfg.train.batch_size >= 256 and cfg.train.mixed_precision == "bf16"
        assert cfg.model.base_channels > load_config(
            ROOT / "configs/fashion_demo.yaml").model.base_channels
    assert 2 * edge.train.max_minutes + 2 * cls.train.max_minutes <= 5
    calls = []
    monkeypatch.setattr(mod, "sh", calls.append)
    args = mod.parse_args(["--runs", str(tmp_path), "train.seed=3"])
    assert args.num_samples == 10000 and not args.cpu_smoke
    for name in ("edge_mf", "edge_fm"):
        mod.train(name, args)
    half, warm, fm = calls
    assert half[half.index("--run-dir") + 1] == str(tmp_path / "edge_mf_fm_half")
    assert half[-2:] == ["meanflow.ratio_r_neq_t=0.0",
                         f"train.max_minutes={edge.train.max_minutes / 2:g}"]
    assert warm[-2:] == [f"train.max_minutes={edge.train.max_minutes / 2:g}",
                         f"train.init_from={tmp_path / 'edge_mf_fm_half' / 'export'}"]
    assert fm[-1] == "meanflow.ratio_r_neq_t=0.0"
    assert not any("max_minutes" in a or "init_from" in a for a in fm)
    assert all("train.seed=3" in c for c in calls)
    # --cpu-smoke puts its overrides first, so the user's still win
    smoke = mod.parse_args(["--cpu-smoke", "train.max_steps=3"])
    assert smoke.overrides == [*mod.SMOKE, "train.max_steps=3"]
    assert (smoke.num_samples, smoke.runs) == (12, str(ROOT / "runs/gpu_demo_smoke"))


def fake_run(run_dir: Path, marks: list[tuple[int, float]]) -> None:
    """Complete checkpoints (step, training seconds) and an export at the last step."""
    for step, secs in marks:
        (run_dir / "checkpoints" / ckpt_name(step)).mkdir(parents=True)
        mark_complete(run_dir / "checkpoints" / ckpt_name(step), step, secs)
    (run_dir / "export").mkdir()
    (run_dir / "export" / "model_config.json").write_text(json.dumps(dict(step=marks[-1][0])))


def test_the_curve_picks_checkpoints_by_minutes_and_counts_a_warm_starts_halves(tmp_path):
    mod = gpu_demo()
    args = mod.parse_args(["--runs", str(tmp_path)])
    fake_run(tmp_path / "edge_mf_fm_half", [(100, 15.0), (200, 30.0)])
    fake_run(tmp_path / "edge_mf", [(80, 12.0), (160, 24.0), (240, 36.0), (250, 37.5)])
    pts = mod.checkpoints("edge_mf", args)
    # the MeanFlow half's minutes come after the flow-matching half's 30 s
    assert [p["steps"] for p in pts] == ["100", "200", "200 + 80", "200 + 160", "200 + 240",
                                         "200 + 250"]
    assert [p["minutes"] for p in pts] == pytest.approx([0.25, 0.5, 0.7, 0.9, 1.1, 1.125])
    assert [p["phase"] for p in pts] == ["edge_mf_fm_half"] * 2 + ["edge_mf"] * 4
    # nearest to 1/4, 2/4, 3/4 of 1.125 min (0.28, 0.56, 0.84), never the final model
    assert [p["steps"] for p in mod.pick(pts, 3)] == ["100", "200", "200 + 160"]
    assert [p["steps"] for p in mod.pick(pts, 1)] == ["200"]
    assert mod.pick(pts, 0) == [] and mod.pick(pts[-1:], 3) == []
    # two targets nearest to the same checkpoint give it once
    assert [p["steps"] for p in mod.pick(pts[:2], 3)] == ["100"]
    assert mod.switch_minutes("edge_mf", args) == 0.5
    # an export that is not the last checkpoint stops the curve with a message naming the run
    (tmp_path / "edge_mf" / "export" / "model_config.json").write_text('{"step": 240}')
    with pytest.raises(SystemExit, match="edge_mf: the export"):
        mod.checkpoints("edge_mf", args)


def test_the_bar_columns_are_the_bars_arithmetic():
    mod = gpu_demo()

    def rows(*fids):
        return [dict(steps=s, fid=f) for s, f in zip((1, 2, 4, 16), fids)]
    res = {"edge_mf": rows(43.0, 41.0, 40.0), "edge_fm": rows(44.0, 40.0, 39.6, 48.0),
           "class_mf": rows(70.0, 60.0, 55.0), "class_fm": rows(220.0, 120.0, 80.0, 40.0)}
    lines, vals = mod.bars_table(res)
    got = tables("\n".join(lines) + "\n")[0]
    assert got[0] == ["edge", "43.0", "44.0", "flow matching's best: 39.6 at 4 steps",
                      "1.09", "<= 1.1, and MeanFlow 1 step < flow matching 1 step", "yes"]
    assert got[1] == ["class", "70.0", "220.0", "flow matching 1 step: 220.0", "0.32",
                      "<= 0.33", "yes"]
    assert vals["edge"]["ratio"] == pytest.approx(43.0 / 39.6)
    # within 1.1 of the best but not below flow matching's own 1 step; a class ratio of 0.36
    res.update(edge_fm=rows(42.0, 40.0, 39.6), class_mf=rows(80.0))
    got = tables("\n".join(mod.bars_table(res)[0]) + "\n")[0]
    assert [r[4:] for r in got] == [
        ["1.09", "<= 1.1, and MeanFlow 1 step < flow matching 1 step", "no"],
        ["0.36", "<= 0.33", "no"]]


@pytest.mark.slow
def test_cpu_smoke_writes_every_table_and_grid_from_what_the_programs_wrote(tmp_path):
    mod = gpu_demo()
    data = make_pixel_dataset(tmp_path, image_size=32)
    runs = tmp_path / "runs"
    cmd = [PY, "demo/gpu_demo.py", "--cpu-smoke", "--data", str(data), "--runs", str(runs),
           "--num-samples", str(N), "--curve-points", "2"]
    cache = dict(MEANFLOW_CACHE_DIR=tmp_path / "cache")
    res = run(cmd, timeout=1500, **cache)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    for f in mod.OUTPUTS:
        assert (runs / f).is_file() and (runs / f).stat().st_size > 0, f
    summary = json.loads((runs / "results.json").read_text())
    md = (runs / "results.md").read_text()
    runs_rows, edge_rows, class_rows, bar_rows, curve_rows, stage_rows = tables(md)

    # the runs: every model, its export's steps and its checkpoints' minutes
    assert [r[0] for r in runs_rows] == ["edge_mf (warm start)", "edge_fm", "class_mf",
                                         "class_fm"]
    for row, (name, info) in zip(runs_rows, summary["runs"].items()):
        assert row[1] == mod.RUNS[name][0] and row[3] == str(info["steps"])
        assert row[4] == f"{info['minutes']:.1f}"
    assert summary["runs"]["edge_mf"]["steps"] == "6 + 6"      # SMOKE: 6 steps per run

    # the scores: what evaluate.py wrote, at N, MeanFlow 1/2/4 and flow matching 1/2/4/16
    for task, table in (("edge", edge_rows), ("class", class_rows)):
        want = []
        for name in (f"{task}_mf", f"{task}_fm"):
            got = json.loads((runs / name / "eval" / f"test_n{N}_seed0" / "results.json")
                             .read_text())
            assert [r["steps"] for r in got["results"]] == mod.STEPS[name[-2:]]
            assert summary["results"][name] == got["results"]
            for r in got["results"]:
                assert ("edge_f1" in r) == (task == "edge") and r["n"] == N
                want.append([mod.LABELS[name], str(r["steps"]), f"{r['fid']:.1f}",
                             f"{1e3 * r['kid']:.2f}",
                             f"{r['edge_f1']:.3f}" if "edge_f1" in r else "", str(N)])
        assert table == want, task

    # the bars, recomputed from those rows
    for row, task in zip(bar_rows, ("edge", "class")):
        mf, fm = summary["results"][f"{task}_mf"], summary["results"][f"{task}_fm"]
        one, fm_one = mf[0]["fid"], fm[0]["fid"]
        ref = min(r["fid"] for r in fm) if task == "edge" else fm_one
        met = (one / ref <= 1.1 and one < fm_one) if task == "edge" else one / ref <= 1 / 3
        assert row[:3] == [task, f"{one:.1f}", f"{fm_one:.1f}"]
        assert row[4] == f"{one / ref:.2f}" and row[6] == ("yes" if met else "no")
        assert summary["bars"][task]["met"] == met

    # the curve: picked checkpoints scored by evaluate.py's curve mode, then the final model
    curve = {}
    for task in ("edge", "class"):
        got = json.loads((runs / "curve" / f"{task}_n{N}_seed0" / "curve.json").read_text())
        assert got["meta"]["n"] == N
        curve.update({m["ckpt"]: m["results"] for m in got["models"]})
    assert len(curve_rows) == len(summary["curve"])
    for row, c in zip(curve_rows, summary["curve"]):
        assert row[:5] == [c["task"], mod.LABELS[c["model"]], f"{c['minutes']:.2f}",
                           c["steps"], f"{c['fid']:.1f}"]
        if c["final"]:
            assert c["fid"] == summary["results"][c["model"]][0]["fid"]
            assert row[6] == "final model (the tables' row)"
        else:
            assert [r["steps"] for r in curve[c["ckpt"]]] == [1]
            assert c["fid"] == curve[c["ckpt"]][0]["fid"]
            assert Path(c["ckpt"]).parent == runs / c["phase"] / "checkpoints"
            assert row[6] == f"{c['phase']}/checkpoints/{Path(c['ckpt']).name}"
    for name in mod.RUNS:
        pts = [c for c in summary["curve"] if c["model"] == name]
        assert [c["final"] for c in pts] == [False] * (len(pts) - 1) + [True]
        assert 2 <= len(pts) <= 3                    # up to --curve-points 2, and the final
        assert [c["minutes"] for c in pts] == sorted(c["minutes"] for c in pts)
    assert [c["steps"] for c in summary["curve"] if c["model"] == "edge_mf"][-1] == "6 + 6"

    # the grids are evaluate.py's: [edge | real | steps...] on 8 test rows; one row per class
    grids = {"grid.png": ("edge_mf", f"test_n{N}_seed0", 2 + 3, 6),
             "class_grid.png": ("class_mf", "classes_seed0", 3, 10),
             "ablation_edge_grid.png": ("edge_fm", f"test_n{N}_seed0", 2 + 4, 6),
             "ablation_class_grid.png": ("class_fm", "classes_seed0", 4, 10)}
    for f, (name, ev, cols, nrows) in grids.items():
        assert (runs / f).read_bytes() == (runs / name / "eval" / ev / "grid.png").read_bytes()
        assert Image.open(runs / f).size == (cols * TILE + 2, nrows * TILE + 2), f
    assert Image.open(runs / "curve.png").size[0] > 0
    assert [r[0] for r in stage_rows][:6] == ["dataset cache", "train edge_mf", "train edge_fm",
                                              "train class_mf", "train class_fm",
                                              "evaluate edge_mf"]

    # a second invocation reuses every model, evaluation and curve point
    again = run(cmd, timeout=900, **cache)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "evaluate.py --ckpt" not in again.stdout and "train.py --config" in again.stdout
    assert again.stdout.count("nothing to do: the run is complete") == 5
    assert json.loads((runs / "results.json").read_text())["curve"] == summary["curve"]
