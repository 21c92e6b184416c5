"""Streamed FID statistics, precision/recall, the Inception Score, statistics files and
preprocess/fid_stats.py: known answers, brute force, and the file path against the in-cache
path on the same images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import PY, run
from meanflow import metrics


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# --------------------------------------------------------------------------------------------
# Streamed statistics
# --------------------------------------------------------------------------------------------
def test_streamed_statistics_equal_the_stacked_ones():
    rng = np.random.default_rng(0)
    d, n = 64, 1000
    # Inception-like: non-negative, mean well away from 0 (the case where S2 - N mu mu^T
    # cancels most)
    f = np.abs(rng.standard_normal((n, d)) + 0.5) * rng.uniform(0.2, 3.0, d)
    stacked = metrics.statistics_from_features(f)
    acc = metrics.StreamedStatistics(n, dim=d, kept=100)
    order = rng.permutation(n)                             # any shard, any batch order
    for lo in range(0, n, 37):
        pos = order[lo:lo + 37]
        acc.update(pos, torch.from_numpy(f[pos]))
    st = acc.reduce()
    assert st["n"] == n
    assert rel_err(st["mu"], stacked["mu"]) < 1e-10
    assert rel_err(st["sigma"], stacked["sigma"]) < 1e-10
    # the kept features are those of the evenly spaced positions, in sample order
    keep = metrics.kept_positions(n, 100)
    assert len(keep) == 100 and keep[1] == 10
    np.testing.assert_array_equal(st["features"], f[keep].astype(np.float32))
    # FID from either agrees
    g = f[::-1] * 1.1 + 0.05
    ref = metrics.statistics_from_features(g)
    assert metrics.fid_from_statistics(st, ref) == pytest.approx(
        metrics.fid_from_statistics(stacked, ref), rel=1e-10)


def test_streamed_statistics_check_shapes_and_count():
    acc = metrics.StreamedStatistics(4, dim=8)
    with pytest.raises(ValueError, match=r"expected \[2, 8\]"):
        acc.update([0, 1], torch.zeros(2, 7))
    acc.update([0, 1], torch.zeros(2, 8))
    with pytest.raises(RuntimeError, match="2 samples, expected 4"):
        acc.reduce()


# --------------------------------------------------------------------------------------------
# Precision / recall (k = 3) against brute force
# --------------------------------------------------------------------------------------------
def brute_precision_recall(fake: np.ndarray, real: np.ndarray, k: int = 3):
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def radii(x):
        d = dist(x, x)
        return np.array([np.sort(np.delete(d[i], i))[k - 1] for i in range(len(x))])

    def inside(q, s):
        rs, d = radii(s), dist(q, s)
        return np.mean([any(d[i, j] <= rs[j] for j in range(len(s))) for i in range(len(q))])

    return inside(fake, real), inside(real, fake)


def test_precision_recall_against_brute_force():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((40, 6))
    for fake in (rng.standard_normal((30, 6)) * 0.7 + 0.5,       # partial overlap
                 rng.standard_normal((30, 6)) * 2.5,             # wider than the real set
                 real[:30] + 1e-3):                              # nearly the real set
        want = brute_precision_recall(fake, real)
        got = metrics.precision_recall(fake, real, block=7)            # blocks smaller than N
        assert (got["precision"], got["recall"]) == pytest.approx(want, abs=1e-12)
        assert got["pr_k"] == 3
    # disjoint sets: both zero
    far = metrics.precision_recall(real + 100.0, real)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    with pytest.raises(ValueError, match="more than k = 3"):
        metrics.precision_recall(real[:3], real)


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------
def test_inception_score_formula_against_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric
    rng = np.random.default_rng(2)
    logits = torch.from_numpy(rng.standard_normal((53, 1008)) * 3)
    want = isc_features_to_metric(logits, splits=10, shuffle=False)
    mean, std = metrics.inception_score_from_logits(logits, splits=10)
    assert mean == pytest.approx(want["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(want["inception_score_std"], rel=1e-8)
    # streamed in any order and shard, the sums give the same score
    a, b = metrics.InceptionScoreSums(53, 10), metrics.InceptionScoreSums(53, 10)
    perm = rng.permutation(53)
    a.update(perm[:20], logits[perm[:20]])
    b.update(perm[20:], logits[perm[20:]])
    for x, y in zip(a.tensors(), b.tensors()):
        x += y
    assert a.score()[0] == pytest.approx(mean, rel=1e-12)
    # known answer: confident, evenly spread predictions over C classes score C
    c = 25
    onehot = torch.full((10 * c, 1008), -1e4, dtype=torch.float64)
    onehot[torch.arange(10 * c), torch.arange(10 * c) % c] = 0.0
    assert metrics.inception_score_from_logits(onehot)[0] == pytest.approx(c, rel=1e-9)


def test_only_weights_with_a_classifier_give_the_inception_score(tmp_path):
    weights = metrics.fid_weights_path(cache_dir=tmp_path / "cache")
    assert not metrics.has_logits(weights)                  # offline FID Inception: fc is NaN
    sd = metrics.load_weights(weights)
    g = torch.Generator().manual_seed(0)
    sd["fc.weight"] = torch.randn(sd["fc.weight"].shape, generator=g) * 0.01
    sd["fc.bias"] = torch.zeros_like(sd["fc.bias"])
    with_fc = tmp_path / "with_fc.pth"
    torch.save(sd, with_fc)
    assert metrics.has_logits(with_fc)
    imgs = np.random.default_rng(0).integers(0, 256, (12, 3, 32, 32), dtype=np.uint8)
    acc = metrics.StreamedStatistics(12, logits=True)
    acc.add(range(12), imgs, weights=with_fc)
    st = acc.reduce()
    _, logits = metrics.inception_forward(imgs, weights=with_fc, logits=True)
    assert st["inception_score"] == pytest.approx(
        metrics.inception_score_from_logits(logits)[0], rel=1e-9)
    assert st["inception_score"] >= 1.0


# --------------------------------------------------------------------------------------------
# Statistics files
# --------------------------------------------------------------------------------------------
def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_reference_npz_layout_is_checked(tmp_path):
    d = metrics.FEATURE_DIM
    good = write_npz(tmp_path / "good.npz", mu=np.zeros(d), sigma=np.eye(d), extra=np.ones(3))
    st = metrics.load_reference_npz(good)
    assert st["mu"].shape == (d,) and st["n"] is None and "features" not in st
    cases = [
        (write_npz(tmp_path / "keys.npz", m=np.zeros(d), s=np.eye(d)), "expected arrays 'mu'"),
        (write_npz(tmp_path / "dim.npz", mu=np.zeros(64), sigma=np.eye(64)),
         r"mu \(64,\) and sigma \(64, 64\) do not fit"),
        (write_npz(tmp_path / "nan.npz", mu=np.full(d, np.nan), sigma=np.eye(d)), "NaN"),
        (write_npz(tmp_path / "feat.npz", mu=np.zeros(d), sigma=np.eye(d),
                   features=np.zeros((3, 5))), r"features \(3, 5\)"),
        (tmp_path / "missing.npz", "no such file"),
    ]
    (tmp_path / "text.npz").write_text("not a zip")
    cases.append((tmp_path / "text.npz", "not a readable .npz"))
    for path, match in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
            metrics.load_reference_npz(path)
        assert path.name in str(e.value)
    # object arrays would need unpickling: refused, never loaded
    np.savez(tmp_path / "pickled.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(2))
    with pytest.raises(ValueError, match="pickled.npz"):
        metrics.load_reference_npz(tmp_path / "pickled.npz")


def test_scores_warn_below_one_thousand_samples():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((14, 8)), rng.standard_normal((20, 8)) + 1
    out = metrics.scores(metrics.statistics_from_features(a), metrics.statistics_from_features(b))
    assert "N = 14 < 1,000" in out["warning"] and out["n"] == 14 and out["n_ref"] == 20
    assert {"fid", "kid", "precision", "recall"} <= set(out)
    big = metrics.scores({"mu": np.zeros(8), "sigma": np.eye(8), "n": 5000},
                         {"mu": np.ones(8), "sigma": np.eye(8), "n": None})
    assert "warning" not in big and big["fid"] == pytest.approx(8.0) and "kid" not in big


# --------------------------------------------------------------------------------------------
# preprocess/fid_stats.py against evaluate.py's in-cache reference
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(dataset) -> Path:
    return dataset


def fid_stats(*args, nproc: int = 1, **env):
    cmd = [PY, "preprocess/fid_stats.py"] if nproc == 1 else [
        PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "preprocess/fid_stats.py"]
    return run(cmd + ["--workers", "0", *args], **env)


def test_statistics_file_of_a_cache_a_folder_and_two_processes_agree(data, tmp_path):
    from meanflow.data import LMDBDataset
    from PIL import Image
    n = 10
    one, two, folder_npz = tmp_path / "one.npz", tmp_path / "two.npz", tmp_path / "folder.npz"
    res = fid_stats("--input", str(data / "test"), "--num-samples", str(n), "--output", str(one),
                    "--batch-size", "4")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"N = {n}" in res.stdout and "reference statistics" in res.stderr   # progress bar
    res = fid_stats("--input", str(data / "test"), "--num-samples", str(n), "--output", str(two),
                    "--batch-size", "4", nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    # the same images written as PNG files: the folder path reads them back the same
    ds = LMDBDataset(data / "test", flip=False, use_edges=False)
    sel = [(k * len(ds)) // n for k in range(n)]
    pngs = tmp_path / "pngs" / "sub"
    pngs.mkdir(parents=True)
    for j, i in enumerate(sel):
        Image.fromarray(ds.image(i)[..., 0]).save(pngs / f"{j:03d}.png")
    res = fid_stats("--input", str(pngs.parent), "--output", str(folder_npz))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b, c = (metrics.load_reference_npz(p) for p in (one, two, folder_npz))
    assert a["n"] == b["n"] == c["n"] == n and a["features"].shape == (n, metrics.FEATURE_DIM)
    for other in (b, c):
        assert rel_err(other["mu"], a["mu"]) < 1e-6
        assert rel_err(other["sigma"], a["sigma"]) < 1e-6
    key = json.loads(str(np.load(one)["key"]))
    assert key["n"] == n and key["input"] == str((data / "test").resolve())


def test_fid_stats_rejects_bad_input(data, tmp_path):
    for args, match in (
            (["--input", str(tmp_path / "none"), "--output", str(tmp_path / "x.npz")],
             "no such folder"),
            (["--input", str(data / "test"), "--output", str(tmp_path / "x.npy")],
             "must end in .npz"),
            (["--input", str(data / "test"), "--num-samples", "100000", "--output",
              str(tmp_path / "x.npz")], "--num-samples 100000"),
    ):
        res = fid_stats(*args)
        assert res.returncode == 2 and match in res.stderr, res.stderr[-2000:]
        assert not (tmp_path / "x.npz").exists()
