"""Faults of the evaluation side, found from the outside and reproduced on tiny data: a torn
or unwritable reference-statistics cache, statistics files with bad fields, the sketch page's
uploads and temporary files, tracebacks instead of one line (sample.py --out / --device,
evaluate.py --fid-weights), stale outputs of an earlier run, and a killed evaluation that
resumes. docs/reliability.md lists them with what survives."""
from __future__ import annotations

import json
import pickle
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import PY, ROOT, env
from helpers import ellipse

from meanflow import metrics

D = metrics.FEATURE_DIM


def one_line_errors(procs: dict) -> dict:
    """{case: stderr's only line} of processes that must each exit 2 with one error line."""
    out = {}
    for k, p in procs.items():
        _, err = p.communicate(timeout=180)
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, (k, err[-2000:])
        assert lines[0].startswith("error: "), (k, lines[0])
        out[k] = lines[0]
    return out


def spawn(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([PY, script, *map(str, args)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------------------------
# 1. The reference-statistics cache: torn, or in a folder that cannot be made
# --------------------------------------------------------------------------------------------
class FakeSplit:
    """What real_statistics reads of a dataset: its folder and uint8 images."""

    def __init__(self, path: Path, n: int = 6):
        self.path = str(path)
        self.images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 1), np.uint8)

    def image(self, i: int) -> np.ndarray:
        return self.images[i]


def test_a_torn_cache_is_recomputed_and_an_unwritable_one_still_gives_the_result(
        tmp_path, monkeypatch, capsys):
    import torch

    from meanflow.evaluation import real_statistics
    calls = []

    def fake_forward(images, device=None, weights=None, logits=False, batch_size=32):
        calls.append(len(images))
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32).flatten(1)[:, :1]
        return torch.cat([x + k for k in range(D)], 1) / 255, None     # rank 1, finite

    monkeypatch.setattr(metrics.inception, "inception_forward", fake_forward)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    ds = FakeSplit(tmp_path / "split")
    sel = list(range(6))
    first = real_statistics(ds, sel, "test_n6_spread", weights, "cpu")
    (cached,) = (tmp_path / "split" / "fid_ref").glob("*.npz")
    assert calls == [6] and real_statistics(ds, sel, "test_n6_spread", weights, "cpu")["n"] == 6
    assert calls == [6]                                            # read back, not recomputed
    # torn (a kill during a copy): recomputed with a warning, and the file written anew
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    capsys.readouterr()
    again = real_statistics(ds, sel, "test_n6_spread", weights, "cpu")
    err = capsys.readouterr().err
    assert calls == [6, 6] and "warning: cached reference statistics" in err
    assert cached.name in err and "recomputing" in err
    np.testing.assert_array_equal(again["sigma"], first["sigma"])
    assert metrics.load_statistics(cached)[0]["n"] == 6             # rewritten whole
    # fid_ref/ cannot be made (a file in its place): the result, with a warning
    for f in (tmp_path / "split" / "fid_ref").iterdir():
        f.unlink()
    (tmp_path / "split" / "fid_ref").rmdir()
    (tmp_path / "split" / "fid_ref").write_text("not a folder")
    st = real_statistics(ds, sel, "test_n6_spread", weights, "cpu")
    err = capsys.readouterr().err
    np.testing.assert_array_equal(st["mu"], first["mu"])
    assert "warning: cannot cache the reference statistics" in err and "fid_ref" in err
    # the library's own cache (metrics.reference_statistics) behaves the same
    monkeypatch.setattr(metrics.inception, "inception_features",
                        lambda imgs, *a, **k: fake_forward(imgs)[0].double().numpy())
    imgs = ds.images.transpose(0, 3, 1, 2)
    st = metrics.reference_statistics("x::test", imgs, cache_dir=tmp_path / "split" / "fid_ref",
                                      weights=weights)
    assert st["n"] == 6 and "cannot cache" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 2. Statistics files: every field checked; strict JSON
# --------------------------------------------------------------------------------------------
def test_every_field_of_a_statistics_file_is_checked(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((8, D)).astype(np.float32)
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False).astype(np.float32)
    good = dict(mu=mu, sigma=sigma, n=np.int64(8), features=feats)
    np.savez(tmp_path / "good.npz", **good)
    st = metrics.load_reference_npz(tmp_path / "good.npz")           # rank 7 < D: still PSD
    assert st["n"] == 8 and st["features"].shape == (8, D)
    asym = sigma.copy()
    asym[0, 1] += 1.0
    not_psd = np.eye(D, dtype=np.float32)
    not_psd[0, 1] = not_psd[1, 0] = 2.0              # [[1, 2], [2, 1]]: an eigenvalue -1
    cases = {
        "nan_features": (dict(features=np.full((8, D), np.nan, np.float32)),
                         "features hold NaN"),
        "minus_eye": (dict(sigma=-np.eye(D, dtype=np.float32)), "sigma has negative variances"),
        "not_psd": (dict(sigma=not_psd), "sigma is not positive semi-definite"),
        "asymmetric": (dict(sigma=asym), "sigma is not symmetric"),
        "n_list": (dict(n=np.array([5, 6])), "n must be one integer"),
        "n_fraction": (dict(n=np.float64(7.5)), "n must be one integer"),
        "n_too_small": (dict(n=np.int64(1)), "n must be an integer >= 2"),
        "features_width": (dict(features=feats[:, :7]), "features (8, 7) are not [N, 2048]"),
        "more_features_than_n": (dict(n=np.int64(4)), "features have 8 rows, more than n = 4"),
        "text_mu": (dict(mu=np.array(["a"] * D)), "mu holds <U1, not real numbers"),
    }
    for name, (change, match) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **{**good, **change})
        with pytest.raises(ValueError) as e:
            metrics.load_reference_npz(path)
        msg = str(e.value)
        assert match in msg and path.name in msg and "\n" not in msg, (name, msg)
    # a score that comes out NaN is null in strict JSON, with a warning naming it
    gen = metrics.statistics_from_features(rng.standard_normal((6, 4)))
    ref = dict(metrics.statistics_from_features(rng.standard_normal((6, 4))))
    ref["features"] = np.full((6, 4), np.nan)
    out = metrics.scores(gen, ref)
    assert out["kid"] is None and "kid" in out["warning"] and "null" in out["warning"]
    json.dumps(out, allow_nan=False)                                  # strict JSON


def test_evaluate_refuses_a_statistics_file_with_a_bad_field(edge_run, tmp_path):
    np.savez(tmp_path / "neg.npz", mu=np.zeros(D, np.float32), sigma=-np.eye(D, dtype=np.float32))
    np.savez(tmp_path / "n.npz", mu=np.zeros(D, np.float32), sigma=np.eye(D, dtype=np.float32),
             n=np.array([5, 6]))
    procs = {k: spawn("evaluate.py", "--ckpt", edge_run, "--num-samples", "4", "--fid",
                      "--ref-stats", tmp_path / f"{k}.npz", "--out", tmp_path / f"out_{k}")
             for k in ("neg", "n")}
    lines = one_line_errors(procs)
    assert "neg.npz" in lines["neg"] and "sigma has negative variances" in lines["neg"]
    assert "n.npz" in lines["n"] and "n must be one integer" in lines["n"]
    assert not any((tmp_path / f"out_{k}").exists() for k in procs)


# --------------------------------------------------------------------------------------------
# 3. The sketch page: an upload limit, and a temporary folder that empties itself
# --------------------------------------------------------------------------------------------
class StubPipe:
    """What build() reads of a pipeline to lay the page out (no model is run here)."""
    uses_edges = True
    source = "stub"

    class mcfg:
        input_size, edge_size = 16, 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_refuses_large_uploads_and_cleans_its_cache(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    import httpx
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    import demo.app as app
    args = app.parse_args(["--ckpt", "x"])
    assert app.delete_cache(args) == (300, 600) and app.max_file_size(args) == 10 * 2 ** 20
    args = app.parse_args(["--ckpt", "x", "--port", str(free_port()), "--max-upload-mb", "0.001",
                           "--cache-max-age", "120", "--cache-sweep", "60"])
    page = app.build(StubPipe(), app.delete_cache(args))
    assert page.delete_cache == (60, 120)
    app.serve(page, args, block=False)
    try:
        url = f"http://127.0.0.1:{args.port}/gradio_api/upload"
        big = httpx.post(url, files={"files": ("big.png", b"x" * 2000)}, timeout=30)
        small = httpx.post(url, files={"files": ("small.png", b"x" * 100)}, timeout=30)
    finally:
        page.close()
    assert big.status_code == 413 and "maximum allowed size" in big.text
    assert small.status_code == 200
    kept = [p for p in (tmp_path / "gradio").rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 2000 for p in kept), kept      # the big one was not stored
    with pytest.raises(SystemExit):
        app.parse_args(["--ckpt", "x", "--cache-max-age", "0"])


# --------------------------------------------------------------------------------------------
# 4. One line instead of a traceback, and no folder made before the inputs pass
# --------------------------------------------------------------------------------------------
def test_bad_out_device_and_fid_weights_are_one_line(edge_run, tmp_path):
    ellipse().save(tmp_path / "sketch.png")
    (tmp_path / "a_file").write_text("mine")
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": print}))                  # a global: refused
    sk = ["--ckpt", edge_run, "--input", tmp_path / "sketch.png"]
    ev = ["--ckpt", edge_run, "--num-samples", "2", "--fid"]
    procs = {
        "sample_out_file": spawn("sample.py", *sk, "--out", tmp_path / "a_file"),
        "sample_out_under_file": spawn("sample.py", *sk, "--out", tmp_path / "a_file" / "x"),
        "sample_device": spawn("sample.py", *sk, "--out", tmp_path / "s1", "--device", "nosuch"),
        "sample_cuda99": spawn("sample.py", *sk, "--out", tmp_path / "s2", "--device", "cuda:99"),
        "eval_weights_missing": spawn("evaluate.py", *ev, "--fid-weights", tmp_path / "none.pth",
                                      "--out", tmp_path / "e1"),
        "eval_weights_pickle": spawn("evaluate.py", *ev, "--fid-weights", evil,
                                     "--out", tmp_path / "e2"),
        "eval_device": spawn("evaluate.py", *ev, "--device", "nosuch", "--out", tmp_path / "e3"),
    }
    lines = one_line_errors(procs)
    assert "is a file, not a folder" in lines["sample_out_file"]
    assert "a_file is a file, not a folder" in lines["sample_out_under_file"]
    assert "--device 'nosuch'" in lines["sample_device"]
    assert "--device 'cuda:99'" in lines["sample_cuda99"]
    assert "none.pth" in lines["eval_weights_missing"] and "no such file" in lines[
        "eval_weights_missing"]
    assert "evil.pth" in lines["eval_weights_pickle"] and "not a plain state dict" in lines[
        "eval_weights_pickle"]
    assert "--device 'nosuch'" in lines["eval_device"]
    assert not any((tmp_path / d).exists() for d in ("s1", "s2", "e1", "e2", "e3"))
    assert (tmp_path / "a_file").read_text() == "mine"


# --------------------------------------------------------------------------------------------
# 5. Stale outputs of an earlier run, and a killed evaluation that resumes
# --------------------------------------------------------------------------------------------
def run_ok(script: str, *args) -> subprocess.CompletedProcess:
    res = subprocess.run([PY, script, *map(str, args)], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_a_rerun_with_fewer_items_leaves_no_stale_outputs(edge_run, tmp_path):
    ins = tmp_path / "in"
    ins.mkdir()
    ellipse().save(ins / "a.png")
    ellipse(width=6).save(ins / "b.png")
    out = tmp_path / "samples"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    (out / "holiday.png").write_bytes(b"the user's")
    run_ok("sample.py", "--ckpt", edge_run, "--input", ins, "--num-per-input", "2", "--out", out)
    assert len(list(out.glob("0*.png"))) == 4
    (ins / "b.png").unlink()
    run_ok("sample.py", "--ckpt", edge_run, "--input", ins, "--out", out)
    assert sorted(p.name for p in out.iterdir()) == [
        ".meanflow-outputs.json", "000_a_00.png", "holiday.png", "notes.txt", "sheet.png"]
    # a folder an older version wrote (no manifest) is recognised by sample.py's own names
    (out / ".meanflow-outputs.json").unlink()
    Image.open(out / "000_a_00.png").save(out / "001_b_03.png")
    run_ok("sample.py", "--ckpt", edge_run, "--input", ins, "--out", out)
    assert not (out / "001_b_03.png").exists() and (out / "holiday.png").exists()

    ev = tmp_path / "eval"
    run_ok("evaluate.py", "--ckpt", edge_run, "--num-samples", "6", "--out", ev)
    (ev / "steps_1" / "mine.txt").write_text("the user's")
    assert len(list((ev / "steps_1").glob("*.png"))) == 6
    run_ok("evaluate.py", "--ckpt", edge_run, "--num-samples", "3", "--out", ev)
    res = json.loads((ev / "results.json").read_text())
    pngs = sorted(p.name for p in (ev / "steps_1").glob("*.png"))
    assert res["meta"]["n"] == 3 and len(pngs) == 3 and (ev / "steps_1" / "mine.txt").exists()


def test_a_killed_evaluation_resumes_from_its_finished_batches(edge_run, tmp_path, monkeypatch,
                                                                capsys):
    import evaluate
    calls = []
    real = evaluate.sample_batch

    def counted(*a, **k):
        calls.append(1)
        if stop_at and len(calls) == stop_at:
            raise KeyboardInterrupt          # a kill in the middle of the third batch
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "sample_batch", counted)
    args = ["--ckpt", str(edge_run), "--num-samples", "6", "--batch-size", "2", "--fid"]
    stop_at = 0
    assert evaluate.main(args + ["--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["results"]
    out = tmp_path / "killed"
    stop_at, calls[:] = 3, []
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(args + ["--out", str(out)])
    assert len(list((out / ".partial" / "steps_1").glob("*.npz"))) == 2
    # one of the two finished batches is torn: it is computed again, the other read back
    first = sorted((out / ".partial" / "steps_1").glob("*.npz"))[0]
    first.write_bytes(first.read_bytes()[:100])
    stop_at, calls[:] = 0, []
    capsys.readouterr()
    assert evaluate.main(args + ["--out", str(out)]) == 0
    assert len(calls) == 2, "only the torn and the unfinished batch are sampled again"
    assert "1 of 3 batches read back" in capsys.readouterr().err
    resumed = json.loads((out / "results.json").read_text())["results"]
    for key in ("fid", "kid", "precision", "recall", "edge_f1"):
        assert resumed[0][key] == whole[0][key], key               # the very same numbers
    for png in (tmp_path / "whole" / "steps_1").glob("*.png"):
        assert (out / "steps_1" / png.name).read_bytes() == png.read_bytes()
    assert not (out / ".partial").exists()
