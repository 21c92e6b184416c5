"""evaluate.py end to end: byte-identical samples for 1, 2 and 3 processes; FID, KID and
edge alignment reported with N; bad input rejected before sampling."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import PY, run
from helpers import train_run as train
from helpers import write_cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset) -> Path:
    tmp = tmp_path_factory.mktemp("eval")
    res = train(write_cfg(tmp, dataset), tmp / "run", "train.max_steps=3", "train.ckpt_every=1",
                "train.keep_checkpoints=3")
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "run"


def trained_data(run_dir: Path) -> Path:
    """The test split next to the training data of ``run_dir``'s model."""
    cfg = json.loads((run_dir / "export" / "model_config.json").read_text())
    return Path(cfg["data"]["path"]).parent / "test"


def check_grid(out: Path, data: Path, n: int, rows: int, steps: list[str]) -> None:
    """grid.png of an evaluation of ``n`` samples: ``rows`` rows spread over them, each
    [edge | real image | the sample PNG of each step count], 16 px tiles, 2 px white gutters."""
    import numpy as np
    from PIL import Image

    from meanflow.data import LMDBDataset
    from meanflow.evaluation import spread
    ds = LMDBDataset(str(data), flip=False)
    picked = spread(spread(list(range(len(ds))), n), rows)
    with Image.open(out / "grid.png") as im:
        assert im.mode == "RGB"
        grid = np.asarray(im)
    cols, s = 2 + len(steps), 16
    assert grid.shape == (rows * (s + 2) + 2, cols * (s + 2) + 2, 3)
    frame = np.ones(grid.shape[:2], bool)
    for r, i in enumerate(picked):
        def tile(c: int) -> np.ndarray:
            y, x = 2 + r * (s + 2), 2 + c * (s + 2)
            frame[y:y + s, x:x + s] = False
            return grid[y:y + s, x:x + s]
        edge = (ds.edge_map(i)[0] * 255).astype(np.uint8)               # edge size = 16
        assert np.array_equal(tile(0), np.repeat(edge[..., None], 3, -1))
        assert np.array_equal(tile(1), np.repeat(ds.image(i), 3, -1))  # grey -> RGB
        for c, spec in enumerate(steps, start=2):
            (png,) = (out / f"steps_{spec}").glob(f"{i:06d}_*.png")
            with Image.open(png) as sample:
                assert np.array_equal(tile(c), np.asarray(sample.convert("RGB"))), (spec, i)
    assert (grid[frame] == 255).all()                                   # gutters and frame


def evaluate(ckpt: Path, *args, nproc: int = 1):
    cmd = [PY, "evaluate.py"] if nproc == 1 else [
        PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "evaluate.py"]
    return run(cmd + ["--ckpt", str(ckpt), *args])


@pytest.mark.slow
def test_samples_do_not_depend_on_the_process_count(trained, tmp_path):
    outs, rows = [], []
    for world in (1, 2, 3):
        out = tmp_path / f"w{world}"
        # --compare-steps with several processes: the grid needs every rank's rows
        res = evaluate(trained, "--num-samples", "10", "--batch-size", "4", "--out", str(out),
                       "--no-edge-f1", "--compare-steps", "1", "--grid-rows", "4", "--fid",
                       nproc=world)
        assert res.returncode == 0, res.stderr[-3000:]
        outs.append({p.relative_to(out).as_posix(): p.read_bytes()
                     for p in out.glob("**/*.png")})
        rows.append(json.loads((out / "results.json").read_text())["results"])
    assert len(outs[0]) == 10 + 1                       # none missing or doubled (10 = 4+4+2)
    assert outs[0] == outs[1] == outs[2]                # the samples and grid.png
    # statistics are sums all-reduced in another order: equal to float64 rounding
    for other in rows[1:]:
        for a, b in zip(rows[0], other):
            assert b["fid"] == pytest.approx(a["fid"], rel=1e-8)
            assert (b["kid"], b["precision"], b["recall"]) == (a["kid"], a["precision"],
                                                               a["recall"])
    outs = [{k.split("/")[-1]: v for k, v in o.items() if k.startswith("steps_1/")}
            for o in outs]
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


@pytest.mark.slow
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
    from evaluate import EvalSpec, reusable
    res_file = out / "step_0000003" / "results.json"
    meta = json.loads(res_file.read_text())["meta"]
    ck = trained / "checkpoints" / "step_0000003"
    same = dict(seed=0, cfg_scale=1.0, split="test", category=None, fid=True)

    def reuse(n=6, steps=(1, 2), data=meta["data"], fid_weights=meta["fid_weights"],
              edge_f1=True, step=3, **kw):
        spec = EvalSpec(steps=steps, **{**same, **kw}).resolved(n, data, fid_weights, False,
                                                                edge_f1)
        return reusable(res_file, spec, ck, step)
    assert [r["fid"] for r in reuse()] == fids[2]
    assert [r["fid"] for r in reuse(steps=(2,))] == fids[2][1:]     # fewer steps: covered
    for other in (dict(n=7), dict(steps=(1, 4)), dict(seed=1), dict(step=4),
                  dict(cfg_scale=2.0), dict(data="/elsewhere"), dict(fid_weights="other.pth"),
                  dict(precision="bf16"), dict(weights="raw"), dict(category="cat")):
        assert reuse(**other) is None, other
    # a metric the earlier rows lack is computed, not taken as missing
    res = json.loads(res_file.read_text())
    for r in res["results"]:
        del r["edge_f1"]
    res_file.write_text(json.dumps(res))
    assert reuse() is None and reuse(edge_f1=False) is not None


def test_a_curve_plots_what_it_measured_and_nothing_without_metrics(tmp_path):
    from PIL import Image

    from evaluate import EvalSpec, write_curve
    args = EvalSpec(split="test", category=None, seed=0, cfg_scale=1.0).resolved(
        8, "none", None, False, False)
    rows = [dict(ckpt=f"c{s}", step=s, results=[dict(steps=1, fid=f, edge_f1=0.9),
                                                 dict(steps=2, fid=f - 1.0, edge_f1=0.95)])
            for s, f in ((10, 80.0), (20, 60.0))]
    write_curve(tmp_path, rows, args)
    with Image.open(tmp_path / "curve.png") as im:
        assert im.size == (840, 340)                    # FID and edge F1 panels
    bare = tmp_path / "bare"
    bare.mkdir()
    write_curve(bare, [dict(ckpt="c", step=1, results=[dict(steps=1)])], args)
    assert (bare / "curve.md").is_file() and not (bare / "curve.png").exists()


def test_a_curve_of_models_from_different_runs_needs_out(trained):
    res = evaluate(trained, str(trained / "checkpoints" / "step_0000001"))
    assert res.returncode == 2 and "pass --out" in res.stderr, res.stderr[-2000:]


def test_a_curve_stops_at_a_model_of_another_task(trained, tmp_path):
    """The curve's second model conditions on labels only: an error naming it, exit 2."""
    data = trained_data(trained).parent
    other = make_export(tmp_path, data, "data.use_edges=false", "model.edge_channels=0")
    res = evaluate(trained / "export", str(other), "--num-samples", "2", "--no-png",
                   "--no-edge-f1", "--out", str(tmp_path / "curve"))
    assert res.returncode == 2, res.stderr[-2000:]
    assert (f"error: {other}: conditions on edges=False, labels=True; the first model on "
            f"edges=True, labels=True") in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "curve" / "curve.json").exists()


def test_spread_picks_evenly_spaced_samples():
    from meanflow.evaluation import spread
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
    check_grid(out, data=trained_data(trained), n=6, rows=3, steps=["1", "2", "4@0.5"])
    # every FID below N = 1,000 carries a warning: printed, and in both reports
    assert "warning: N = 6 < 1,000: FID is biased upward" in res.stderr
    assert all("N = 6 < 1,000" in r["warning"] for r in rows)
    assert "**Warning:** N = 6 < 1,000" in md
    assert "Inception Score unavailable" in md                # offline weights: no classifier


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


# --------------------------------------------------------------------------------------------
# Devices, output place, statistics files, class-balanced sampling
# --------------------------------------------------------------------------------------------
def make_export(tmp: Path, data: Path, *overrides: str) -> Path:
    """An untrained model of the tiny config (with ``overrides``) exported as train.py does:
    what evaluate.py's plumbing needs, without a training run."""
    import models
    import torch
    from meanflow.config import load_config
    from meanflow.data import LMDBDataset
    from meanflow.export import export_model
    cfg = load_config(write_cfg(tmp, data), list(overrides))
    torch.manual_seed(0)
    run_dir = tmp / "run_untrained"
    meta = LMDBDataset(data / "test", flip=False, use_edges=False).meta
    export_model(run_dir / "export", models.build(cfg.model), cfg, meta, 0, None)
    return run_dir / "export"


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_each_rank_loads_and_samples_on_its_own_gpu(trained, tmp_path, monkeypatch):
    """LOCAL_RANK = 1 on a (fake) two-GPU machine: weights, noise, conditions and samples all
    on cuda:1. The order evaluate.py had (load onto "cuda", i.e. cuda:0, then set the rank's
    device) mixes cuda:0 weights with cuda:1 inputs, which this check catches."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from evaluate import EvalSpec, parse_args, resolve
    from meanflow.export import Export
    from meanflow.evaluation import conditions, sample_batch, steps_grid
    from meanflow.runtime import process_device
    from meanflow.export import load_model
    data = Path(json.loads((trained / "export" / "model_config.json").read_text())
                ["data"]["path"]).parent
    # edges only: the U-Net checks label values, which a fake tensor does not have
    ckpt = make_export(tmp_path, data, "data.use_labels=false", "model.num_classes=0")
    args = parse_args(["--ckpt", str(ckpt), "--num-samples", "4"])
    net, info = load_model(ckpt, "cpu")              # files are read on the host, as in main
    exp = Export.read(ckpt)
    ds, sel = resolve(EvalSpec.from_args(args, torch.device("cpu")), exp)
    dcfg, mcfg = exp.data, exp.model
    cond = conditions(ds, dcfg, mcfg, balanced=False)
    times = steps_grid(2).tolist()
    shape = (mcfg.in_channels, mcfg.input_size, mcfg.input_size)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with monkeypatch.context() as m:                 # (fake tensors need the real answer)
        m.setattr(torch.cuda, "is_available", lambda: True)
        device = process_device(None)                # what main() takes, before loading
    assert device == torch.device("cuda", 1)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = exp.place(net, device)
        placed = {t.device for t in [*model.parameters(), *model.buffers()]}
        assert placed == {torch.device("cuda", 1)}
        for amp in (None, torch.bfloat16):
            x, edge = sample_batch(model, sel[:2], cond, shape, 0, device, times, 1.0, amp)
            assert x.device == edge.device == torch.device("cuda", 1)
            assert x.dtype == torch.float32               # bf16 network, fp32 update
        old = exp.place(net, torch.device("cuda"))   # the old default device
        assert {p.device for p in old.parameters()} == {torch.device("cuda", 0)}
        with pytest.raises(RuntimeError, match="same device"):
            sample_batch(old, sel[:2], cond, shape, 0, device, times, 1.0)


def test_a_checkpoints_evaluation_is_not_inside_the_checkpoint(trained):
    """Training prunes old checkpoints with everything in them: the default output of a
    checkpoint's evaluation is RUN/eval/step_N/<split>."""
    from meanflow.checkpoint import prune_checkpoints
    ckpt = trained / "checkpoints" / "step_0000001"
    res = evaluate(ckpt, "--num-samples", "3", "--no-edge-f1", "--no-png")
    assert res.returncode == 0, res.stderr[-3000:]
    out = trained / "eval" / "step_0000001" / "test"
    assert json.loads((out / "results.json").read_text())["meta"]["step"] == 1
    assert not (ckpt / "eval").exists()
    import shutil
    copy = trained.parent / "pruned_copy"
    shutil.copytree(trained, copy)
    prune_checkpoints(copy / "checkpoints", keep=1)          # what continued training does
    assert not (copy / "checkpoints" / "step_0000001").exists()
    assert (copy / "eval" / "step_0000001" / "test" / "results.json").is_file()


@pytest.mark.slow
def test_a_statistics_file_gives_the_in_cache_fid(trained, tmp_path):
    """The same 6 real images as a --ref-stats file (preprocess/fid_stats.py) and as the
    in-cache reference: the same FID, KID and precision/recall."""
    data = Path(json.loads((trained / "export" / "model_config.json").read_text())
                ["data"]["path"]).parent
    npz = tmp_path / "test6.npz"
    res = run([PY, "preprocess/fid_stats.py", "--input", str(data / "test"), "--num-samples",
               "6", "--output", str(npz), "--workers", "0"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = []
    for extra in ([], ["--ref-stats", str(npz)]):
        out = tmp_path / f"out{len(extra)}"
        res = evaluate(trained, "--num-samples", "6", "--fid", "--no-png", "--no-edge-f1",
                       "--out", str(out), *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        rows.append(json.loads((out / "results.json").read_text()))
    (a,), (b,) = rows[0]["results"], rows[1]["results"]
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-9) and a["fid"] > 0
    assert (b["kid"], b["precision"], b["recall"]) == pytest.approx(
        (a["kid"], a["precision"], a["recall"]), rel=1e-9)
    assert rows[1]["meta"]["ref_stats"] == str(npz.resolve())
    assert str(npz.resolve()) in (tmp_path / "out2" / "results.md").read_text()
    # a statistics file of another feature size is refused before any sampling
    import numpy as np
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(64), sigma=np.eye(64))
    res = evaluate(trained, "--fid", "--ref-stats", str(bad), "--out", str(tmp_path / "bad"))
    assert res.returncode == 2 and "bad.npz" in res.stderr and "2048" in res.stderr
    assert not (tmp_path / "bad").exists()


def test_balanced_labels_need_no_dataset_and_give_the_inception_score(trained, tmp_path):
    """A class-conditional model sampled with labels i mod 10, sharded over 2 processes, scored
    against a statistics file; the Inception Score with weights that have a classifier."""
    import numpy as np
    import torch

    from meanflow import metrics
    data = Path(json.loads((trained / "export" / "model_config.json").read_text())
                ["data"]["path"]).parent
    ckpt = make_export(tmp_path, data, "data.use_edges=false", "model.edge_channels=0")
    rng = np.random.default_rng(0)
    f = rng.standard_normal((50, metrics.FEATURE_DIM))
    npz = tmp_path / "ref.npz"
    np.savez(npz, mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    sd = metrics.load_weights(metrics.fid_weights_path())
    sd["fc.weight"] = torch.randn(sd["fc.weight"].shape, generator=torch.Generator()
                                  .manual_seed(0)) * 0.01
    sd["fc.bias"] = torch.zeros_like(sd["fc.bias"])
    weights = tmp_path / "with_fc.pth"
    torch.save(sd, weights)
    out = tmp_path / "bal"
    res = evaluate(ckpt, "--balanced-labels", "--num-samples", "20", "--batch-size", "3",
                   "--fid", "--ref-stats", str(npz), "--fid-weights", str(weights),
                   "--out", str(out), nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(p.name for p in (out / "steps_1").glob("*.png"))
    assert len(names) == 20
    classes = [n.split("_", 1)[1] for n in names]
    assert all(classes.count(c) == 2 for c in classes)            # 2 per class of 10
    res_json = json.loads((out / "results.json").read_text())
    (row,) = res_json["results"]
    assert row["fid"] > 0 and row["inception_score"] >= 1.0 and row["n_ref"] is None
    assert "kid" not in row                                # the file keeps no features
    assert res_json["meta"]["balanced_labels"] and res_json["meta"]["data"] == "none"
    md = (out / "results.md").read_text()
    assert "| IS |" in md and "balanced labels" in md and "N = 20 < 1,000" in md
    # without a statistics file there is nothing to compare with
    res = evaluate(ckpt, "--balanced-labels", "--num-samples", "20", "--fid",
                   "--out", str(tmp_path / "none"))
    assert res.returncode == 2 and "needs --ref-stats" in res.stderr


def test_a_latent_only_train_split_needs_a_statistics_file(tmp_path):
    """The ImageNet recipe: an SD-VAE cache of the train split under --store-images auto keeps
    no real images. --fid on it is one clear error before sampling (it was a KeyError
    traceback after sampling); with --ref-stats it samples, decodes and scores."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from meanflow import metrics
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cat in ("cat", "dog"):
            (tmp_path / "raw" / split / cat).mkdir(parents=True)
            for k in range(3):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(
                    tmp_path / "raw" / split / cat / f"{k}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    data = tmp_path / "lat"
    res = run([PY, "preprocess/cache.py", "--input", str(tmp_path / "raw"), "--output",
               str(data), "--image-size", "16", "--codec", "sd-vae", "--vae",
               str(tmp_path / "vae"), "--edges", "canny", "--batch-size", "6"])
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = make_export(tmp_path, data, "data.codec=sd-vae", "data.channels=4",
                       "model.in_channels=4", "model.input_size=8", "model.num_classes=2",
                       "model.attn_resolutions=[4]")
    out = tmp_path / "eval"
    res = evaluate(ckpt, "--split", "train", "--fid", "--out", str(out))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "stores no real images" in res.stderr and "--ref-stats" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()
    f = rng.standard_normal((20, metrics.FEATURE_DIM))
    npz = tmp_path / "ref.npz"
    np.savez(npz, mu=f.mean(0), sigma=np.cov(f, rowvar=False), n=np.int64(20))
    res = evaluate(ckpt, "--split", "train", "--fid", "--ref-stats", str(npz), "--out", str(out),
                   "--compare-steps", "1", "--grid-rows", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = json.loads((out / "results.json").read_text())["results"]
    assert row["n"] == 6 and row["n_ref"] == 20 and row["fid"] > 0
    assert len(list((out / "steps_1").glob("*.png"))) == 6 and (out / "grid.png").is_file()


def test_the_spec_key_changes_with_what_changes_the_numbers_and_not_with_the_output(tmp_path):
    """One key decides reuse, of results.json and of OUT/.partial alike: a setting that
    changes the numbers changes it; where the output goes does not."""
    from dataclasses import replace
    from types import SimpleNamespace

    import torch

    from evaluate import EvalSpec, parse_args, partial_spec
    cpu = torch.device("cpu")

    def key(*argv, step=5, ckpt="runs/a"):
        args = parse_args(["--ckpt", ckpt, "--fid", *argv])
        spec = EvalSpec.from_args(args, cpu).resolved(8, "/data/test", Path("inc.pth"), True,
                                                       True)
        return spec, spec.key(Path(ckpt), step)
    spec, base = key()
    assert key("--out", "/elsewhere")[1] == base
    assert key("--out", "/elsewhere", "--no-png", "--grid-rows", "3")[1] == base
    assert key("--precision", "no")[1] == key("--precision", "fp32")[1] == base
    for argv in (["--seed", "1"], ["--cfg-scale", "2"], ["--split", "val"],
                 ["--category", "cat"], ["--precision", "bf16"], ["--weights", "raw"],
                 ["--ref-stats", "ref.npz"]):
        assert key(*argv)[1] != base, argv
    assert key(step=6)[1] != base and key(ckpt="runs/b")[1] != base
    for field, value in (("num_samples", 9), ("data", "/data/val"), ("fid_weights", "x.pth")):
        assert replace(spec, **{field: value}).key(Path("runs/a"), 5) != base, field
    with pytest.raises(ValueError, match="resolve the spec first"):
        EvalSpec().key(Path("runs/a"), 5)
    # OUT/.partial's spec is that key plus the batch layout
    model = tmp_path / "export"
    model.mkdir()
    (model / "model_config.json").write_text("{}")
    export = SimpleNamespace(step=5)
    ctx = SimpleNamespace(inception=None, sel=[0, 1], grids={1: [1.0, 0.0]}, detector=None)
    no_fid = replace(spec, fid=False)
    part = partial_spec(model, export, no_fid, ctx)
    assert {k: part[k] for k in no_fid.key(model, 5)} == no_fid.key(model, 5)
    assert partial_spec(model, export, replace(no_fid, seed=1), ctx) != part
    assert partial_spec(model, export, replace(no_fid, batch_size=3), ctx) != part
