"""evaluate.py end to end: byte-identical samples for 1, 2 and 3 processes; FID, KID and
edge alignment reported with N; bad input rejected before sampling."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from helpers import PY, make_pixel_dataset, run
from test_train import train, write_cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("eval")
    data = make_pixel_dataset(tmp)
    res = train(write_cfg(tmp, data), tmp / "run", "train.max_steps=3", "train.ckpt_every=1",
                "train.keep_checkpoints=3")
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "run"


def evaluate(ckpt: Path, *args, nproc: int = 1):
    cmd = [PY, "evaluate.py"] if nproc == 1 else [
        PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "evaluate.py"]
    return run(cmd + ["--ckpt", str(ckpt), *args])


def test_samples_do_not_depend_on_the_process_count(trained, tmp_path):
    outs = []
    for world in (1, 2, 3):
        out = tmp_path / f"w{world}"
        res = evaluate(trained, "--num-samples", "10", "--batch-size", "4", "--out", str(out),
                       "--no-edge-f1", nproc=world)
        assert res.returncode == 0, res.stderr[-3000:]
        outs.append({p.name: p.read_bytes() for p in (out / "steps_1").glob("*.png")})
    assert len(outs[0]) == 10                           # none missing or doubled (10 = 4+4+2)
    assert outs[0] == outs[1] == outs[2]
    # keys are sorted by category: the N samples are spread over the split, not its first N
    # (which would be one or two classes)
    cats = {name.split("_")[2] for name in outs[0]}     # 000012_test_<category>_<stem>.png
    assert len(cats) >= 5, sorted(outs[0])


def test_a_checkpoint_evaluates_like_the_export_of_its_step(trained, tmp_path):
    ckpt = trained / "checkpoints" / "step_0000003"          # the last step: same EMA weights
    pngs = []
    for src, out in ((trained, tmp_path / "run"), (ckpt, tmp_path / "ckpt")):
        res = evaluate(src, "--num-samples", "4", "--out", str(out), "--no-edge-f1")
        assert res.returncode == 0, res.stderr[-3000:]
        pngs.append({p.name: p.read_bytes() for p in (out / "steps_1").glob("*.png")})
    assert len(pngs[0]) == 4 and pngs[0] == pngs[1]


def test_a_checkpoints_folder_gives_a_learning_curve_that_resumes(trained, tmp_path):
    out = tmp_path / "curve"
    common = ["--num-samples", "6", "--compare-steps", "1,2", "--fid", "--no-png"]
    res = evaluate(trained / "checkpoints", *common, "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    curve = json.loads((out / "curve.json").read_text())
    assert [m["step"] for m in curve["models"]] == [1, 2, 3]
    fids = [[r["fid"] for r in m["results"]] for m in curve["models"]]
    assert len({f[0] for f in fids}) == 3                   # three different models
    # each point is what a one-model evaluation of that checkpoint gives
    single = tmp_path / "single"
    res = evaluate(trained / "checkpoints" / "step_0000002", *common, "--out", str(single))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((single / "results.json").read_text())["results"]
    assert [r["fid"] for r in rows] == fids[1]
    assert [r["edge_f1"] for r in rows] == [r["edge_f1"] for r in curve["models"][1]["results"]]
    md = (out / "curve.md").read_text()
    assert "N = 6" in md and "| FID 1 step | FID 2 steps |" in md and "\n| 3 | " in md
    from PIL import Image
    with Image.open(out / "curve.png") as im:       # one 420 x 340 panel per metric
        n_metrics = sum(k in curve["models"][0]["results"][0] for k in ("fid", "kid", "edge_f1"))
        assert im.format == "PNG" and im.size == (420 * n_metrics, 340) and n_metrics >= 2
    # a killed curve resumes: finished models are read back, the missing one is sampled
    (out / "step_0000002" / "results.json").unlink()
    res = evaluate(trained / "checkpoints", *common, "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("reusing") == 2 and "step_0000002 (step 2): 2 of 3" in res.stdout
    again = json.loads((out / "curve.json").read_text())
    assert [[r["fid"] for r in m["results"]] for m in again["models"]] == fids
    # read back only with the same settings and metrics
    from evaluate import reusable
    res_file = out / "step_0000003" / "results.json"
    meta = json.loads(res_file.read_text())["meta"]
    ck, info = trained / "checkpoints" / "step_0000003", {"step": 3}
    same = dict(seed=0, cfg_scale=1.0, split="test", category=None)

    def reuse(n=6, steps=(1, 2), need=("fid", "edge_f1"), data=meta["data"],
              weights=meta["fid_weights"], **kw):
        a = argparse.Namespace(**{**same, **kw})
        return reusable(res_file, ck, info, a, data, n, list(steps), list(need), weights)
    assert [r["fid"] for r in reuse()] == fids[2]
    for other in (dict(n=7), dict(steps=(1, 4)), dict(need=("fid", "kid_x")), dict(seed=1),
                  dict(cfg_scale=2.0), dict(data="/elsewhere"), dict(weights="other.pth")):
        assert reuse(**other) is None, other


def test_a_curve_plots_what_it_measured_and_nothing_without_metrics(tmp_path):
    from PIL import Image

    from evaluate import write_curve
    args = argparse.Namespace(split="test", category=None, seed=0, cfg_scale=1.0)
    rows = [dict(ckpt=f"c{s}", step=s, results=[dict(steps=1, fid=f, edge_f1=0.9),
                                                 dict(steps=2, fid=f - 1.0, edge_f1=0.95)])
            for s, f in ((10, 80.0), (20, 60.0))]
    write_curve(tmp_path, rows, args, 8)
    with Image.open(tmp_path / "curve.png") as im:
        assert im.size == (840, 340)                    # FID and edge F1 panels
    bare = tmp_path / "bare"
    bare.mkdir()
    write_curve(bare, [dict(ckpt="c", step=1, results=[dict(steps=1)])], args, 8)
    assert (bare / "curve.md").is_file() and not (bare / "curve.png").exists()


def test_a_curve_of_models_from_different_runs_needs_out(trained):
    res = evaluate(trained, str(trained / "checkpoints" / "step_0000001"))
    assert res.returncode == 2 and "pass --out" in res.stderr, res.stderr[-2000:]


def test_spread_picks_evenly_spaced_samples():
    from evaluate import spread
    assert spread(list(range(10)), 3) == [0, 3, 6]
    assert spread([5, 7, 9], 3) == [5, 7, 9]
    assert len(set(spread(list(range(10_000)), 1000))) == 1000


def test_compare_steps_reports_fid_kid_edge_f1_with_n(trained, tmp_path):
    out = tmp_path / "cmp"
    res = evaluate(trained, "--compare-steps", "1,2,4@0.5", "--num-samples", "6", "--fid",
                   "--out", str(out), "--grid-rows", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["steps"] for r in rows] == [1, 2, "4@0.5"]
    assert [r["nfe"] for r in rows] == [1, 2, 3]        # 1, 0.75, 0.5, then one jump to 0
    for r in rows:
        assert r["n"] == 6 and r["fid"] > 0 and "kid" in r
        assert 0.0 <= r["edge_f1"] <= 1.0
    md = (out / "results.md").read_text()
    assert "N = 6" in md and "| FID |" in md.replace("FID | KID", "FID |")
    assert (out / "grid.png").stat().st_size > 0


@pytest.mark.parametrize("args, match", [
    (["--steps", "0"], "steps must be >= 1"),
    (["--compare-steps", "1,4@1.5"], "cannot read '4@1.5' as K or K@T"),
    (["--category", "nope"], "unknown category 'nope'"),
    (["--num-samples", "100000"], "--num-samples 100000: the selection has"),
    (["--split", "val"], "dataset split not found"),
])
def test_bad_input_fails_before_sampling(trained, tmp_path, args, match):
    res = evaluate(trained, *args, "--out", str(tmp_path / "bad"))
    assert res.returncode == 2 and match in res.stderr, res.stderr[-2000:]


def test_missing_checkpoint(tmp_path):
    res = run([PY, "evaluate.py", "--ckpt", str(tmp_path / "none")])
    assert res.returncode == 2 and "not found" in res.stderr
