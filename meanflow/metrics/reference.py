"""Reference statistics files (.npz, no pickle): every field checked on load, and the cache
of in-dataset reference statistics."""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from meanflow.atomic import atomic_path

from meanflow.metrics import inception
from meanflow.metrics._common import DEFAULT_BATCH, FEATURE_DIM, STATS_FORMAT, ImageBatch
from meanflow.metrics.fid import statistics_from_features
from meanflow.metrics.weights import fid_weights_path, weights_hash


# --------------------------------------------------------------------------------------------
# Statistics files: every field checked
# --------------------------------------------------------------------------------------------
PSD_TOL = 1e-5                   # sigma: asymmetry and negative eigenvalues, relative to max|diag|


def _real(z, name: str, where: str) -> np.ndarray:
    """Array ``name`` of the npz ``z`` as float64; a non-numeric one is an error."""
    try:
        a = np.asarray(z[name])
    except ValueError as e:                        # object arrays: would need unpickling
        raise ValueError(f"{where}: {name}: {e}") from None
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer)
                               or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{where}: {name} holds {a.dtype}, not real numbers")
    return a.astype(np.float64)


def check_statistics(st: dict, where: str, dim: Optional[int] = FEATURE_DIM) -> dict:
    """``st`` ({"mu", "sigma", ["n"], ["features"]}, float64) if every field is what FID, KID
    and precision/recall need, else a one-line ValueError naming ``where`` and the field: mu
    [dim] finite; sigma [dim, dim] finite, symmetric and positive semi-definite (to
    ``PSD_TOL`` relative to its largest variance); n an integer >= 2; features [M, dim] finite,
    M <= n."""
    mu, sigma = st["mu"], st["sigma"]
    if dim is None:                                   # a cache file: any one feature width
        dim = mu.shape[0] if mu.ndim == 1 else -1
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"{where}: mu {mu.shape} and sigma {sigma.shape} do not fit the "
                         f"Inception pool3 features ({dim},) and ({dim}, {dim}): statistics "
                         f"of another network or layer")
    for name, a in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(a).all():
            raise ValueError(f"{where}: {name} holds NaN or inf")
    scale = float(np.abs(np.diag(sigma)).max()) if dim else 0.0
    tol = PSD_TOL * max(scale, np.finfo(np.float64).tiny)
    asym = float(np.abs(sigma - sigma.T).max()) if dim else 0.0
    if asym > tol:
        raise ValueError(f"{where}: sigma is not symmetric (max |sigma - sigma^T| = "
                         f"{asym:.3g}): not a covariance")
    if (np.diag(sigma) < -tol).any():
        raise ValueError(f"{where}: sigma has negative variances (min "
                         f"{np.diag(sigma).min():.3g}): not a covariance")
    try:                     # Cholesky of sigma + tol I exists iff every eigenvalue > -tol
        np.linalg.cholesky(sigma + tol * np.eye(dim))
    except np.linalg.LinAlgError:
        raise ValueError(f"{where}: sigma is not positive semi-definite (an "
                         f"eigenvalue below -{tol:.3g}): not a covariance") from None
    n = st.get("n")
    if n is not None:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 2:
            raise ValueError(f"{where}: n must be an integer >= 2 (the number of "
                             f"images), got {n!r}")
    f = st.get("features")
    if f is not None:
        if f.ndim != 2 or f.shape[1] != dim:
            raise ValueError(f"{where}: features {f.shape} are not [N, {dim}]")
        if not np.isfinite(f).all():
            raise ValueError(f"{where}: features hold NaN or inf")
        if n is not None and len(f) > n:
            raise ValueError(f"{where}: features have {len(f)} rows, more than n = {n}")
    return st


def _read_n(z, where: str):
    """Field ``n`` as an int: a scalar of integer value, else a one-line error."""
    a = np.asarray(z["n"]) if "n" in z.files else None
    if a is None:
        return None
    bad = ValueError(f"{where}: n must be one integer (the number of images), got "
                     f"{a.dtype} {a.shape}{'' if a.size > 4 else f' {a.tolist()!r}'}")
    if a.ndim != 0 or a.dtype == bool or not (np.issubdtype(a.dtype, np.integer)
                                              or np.issubdtype(a.dtype, np.floating)):
        raise bad
    v = a.item()
    if isinstance(v, float) and not (np.isfinite(v) and v == int(v)):
        raise bad
    return int(v)


def _read_statistics(p: Path, where: str, dim: Optional[int], need_key: bool = False) -> dict:
    """mu, sigma, n, features (and ``key``, when ``need_key``) of an npz, every field checked
    (``check_statistics``); never unpickles. Any fault is one ValueError naming ``where``."""
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - name the file, whatever is wrong inside
        raise ValueError(f"{where}: not a readable .npz ({type(e).__name__}: {e})") from None
    try:
        with z:
            want = {"mu", "sigma"} | ({"n", "features", "key"} if need_key else set())
            if not want <= set(z.files):
                raise ValueError(f"{where}: expected arrays "
                                 f"{', '.join(repr(k) for k in sorted(want))} (the pytorch-fid "
                                 f"/ ADM layout), found {sorted(z.files)}")
            st = {"mu": _real(z, "mu", where), "sigma": _real(z, "sigma", where),
                  "n": _read_n(z, where)}
            if "features" in z.files:
                st["features"] = _real(z, "features", where)
            if need_key:
                st["key"] = json.loads(str(z["key"]))
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - a torn member: zlib / zip / json errors
        raise ValueError(f"{where}: cannot be read ({type(e).__name__}: {e})") from None
    return check_statistics(st, where, dim)


def load_reference_npz(path: Union[str, Path], dim: int = FEATURE_DIM) -> dict:
    """FID reference statistics in the common npz layout: ``mu`` [D] and ``sigma`` [D, D]
    (pytorch-fid, ADM's VIRTUAL_imagenet256_labeled.npz, clean-fid, preprocess/fid_stats.py;
    other arrays are ignored). ``n`` and ``features`` (for KID, precision/recall) are read when
    present. Never unpickles; every field is checked (``check_statistics``), and a bad file is
    one clear error naming it and the field."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--ref-stats {str(p)!r}: no such file")
    return _read_statistics(p, f"--ref-stats {str(p)!r}", dim)


# --------------------------------------------------------------------------------------------
# Reference statistics cache (.npz, no pickle)
# --------------------------------------------------------------------------------------------
def save_statistics(path: Union[str, Path], stats: dict, key: dict) -> None:
    """Write statistics and the key they were computed for, atomically (no partial file is
    left behind when the write fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        # features are float32 out of the network: storing them as float32 is lossless
        np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"], n=np.int64(stats["n"]),
                 features=np.asarray(stats["features"], np.float32),
                 key=np.array(json.dumps(key, sort_keys=True)))


def load_statistics(path: Union[str, Path]) -> tuple[dict, dict]:
    """(statistics, key) from ``save_statistics``; never unpickles. A torn or otherwise bad
    file is a ValueError naming it."""
    st = _read_statistics(Path(path), f"{path}", None, need_key=True)
    return st, st.pop("key")


def cached_statistics(path: Path, key: dict, n: int) -> Optional[dict]:
    """The statistics cached at ``path`` if they were stored under ``key`` for ``n`` images;
    None when there are none, and None with a warning when the file is unreadable (torn by a
    kill, say), so the caller recomputes them and writes it anew."""
    if not path.is_file():
        return None
    try:
        st, stored = load_statistics(path)
    except (OSError, ValueError) as e:
        _warn(f"cached reference statistics {e}; recomputing them")
        return None
    return st if stored == key and st["n"] == n else None


def cache_statistics(path: Path, st: dict, key: dict) -> bool:
    """Write the statistics to the cache; when the cache cannot be written (a file in the
    folder's place, a read-only disk, a full one) warn and go on: they are only not cached."""
    try:
        save_statistics(path, st, key)
        return True
    except OSError as e:
        _warn(f"cannot cache the reference statistics at {path} ({type(e).__name__}: "
              f"{e.strerror or e}); using them uncached, they will be computed again next time")
        return False


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def statistics_key(name: str, n: int, weights: Union[str, Path]) -> dict:
    """What reference statistics depend on: the data (``name``: dataset path, split,
    selection), N, and the exact Inception weights."""
    return {"name": name, "n": int(n), "weights_sha256": weights_hash(weights),
            "format": STATS_FORMAT}


def statistics_cache_path(cache_dir: Union[str, Path], key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key["name"])[-60:].strip("_.")
    return Path(cache_dir) / f"{slug}-n{key['n']}-{digest}.npz"


def reference_statistics(name: str, images: Union[ImageBatch, Callable[[], ImageBatch]], *,
                         cache_dir: Union[str, Path], n: Optional[int] = None,
                         weights: Optional[Union[str, Path]] = None, device=None,
                         batch_size: int = DEFAULT_BATCH) -> dict:
    """Statistics (with features, for KID) of real images, cached in ``cache_dir``.

    ``name`` identifies the data (e.g. "<dataset path>::<split>_<category>"); the cache file is
    keyed by name, N and the weights' SHA-256, and the stored key is checked on load, so a
    different N, split or weights never reuses a stale file. ``images`` is a uint8 batch or a
    callable returning one (called only on a cache miss, so then ``n`` is required). A torn
    cache file is recomputed, and a cache that cannot be written still gives the statistics
    (each with a warning).
    """
    if callable(images):
        if n is None:
            raise ValueError("reference_statistics: pass n= with a callable `images`, so the "
                             "cache can be checked without loading the images")
    else:
        n_img = int(images.shape[0])
        if n is not None and n != n_img:
            raise ValueError(f"reference_statistics: n={n} but images has {n_img}")
        n = n_img
    weights = Path(weights) if weights is not None else fid_weights_path()
    key = statistics_key(name, n, weights)
    path = statistics_cache_path(cache_dir, key)
    st = cached_statistics(path, key, n)
    if st is not None:
        return st
    imgs = images() if callable(images) else images
    if int(imgs.shape[0]) != n:
        raise ValueError(f"reference_statistics: n={n} but `images` returned {imgs.shape[0]}")
    st = statistics_from_features(inception.inception_features(imgs, batch_size, device, weights))
    cache_statistics(path, st, key)
    return st
