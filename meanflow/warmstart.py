"""Warm starts (train.init_from): begin a MeanFlow run from weights trained elsewhere.

* An export, run folder or checkpoint of this project (for example a flow-matching run,
  ``meanflow.ratio_r_neq_t=0``): its weights (a checkpoint's first EMA) are loaded as they are.
* An official DiT / SiT state dict (``.pt`` / ``.pth`` read with ``weights_only=True``, or
  ``.safetensors``): the keys are mapped onto this project's SiT (``t_embedder`` ->
  ``cond.t_embedder``, ``y_embedder.embedding_table`` -> ``cond.y_embedder``; the fixed
  ``pos_embed`` is dropped; a ``learn_sigma`` output layer keeps its first half), and the
  embedder of the second time input (t - r), which those models do not have, gets a zero
  output layer: at r = t, and at any r before training moves it, the network is then exactly
  the flow-matching model it came from. Parameters the source lacks (edge embedder, null edge)
  keep their initialisation and are listed.

Decoupled MeanFlow (Lee et al. 2025) and zhuyu-cs/MeanFlow fine-tune flow models this way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .errors import first_line
from .checkpoint import EMA_FILE, config_diff, is_complete, shape_mismatch
from .export import EXPORT_CONFIG, EXPORT_DIR, load_model

DIT_RENAMES = (("t_embedder.", "cond.t_embedder."),
               ("y_embedder.embedding_table.", "cond.y_embedder."))
DIT_DROPPED = ("pos_embed",)             # fixed sin-cos: rebuilt by the model


class WarmStartError(ValueError):
    """The source of train.init_from cannot be read or does not fit the model."""


def _is_project_model(p: Path) -> bool:
    return ((p / EXPORT_CONFIG).is_file() or (p / EXPORT_DIR / EXPORT_CONFIG).is_file()
            or (is_complete(p) and (p / EMA_FILE).is_file()))


def read_state_dict(path: Path) -> dict:
    """A plain state dict from a .safetensors / .pt / .pth file (never unpickling code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickle with objects, or not a torch file
        raise WarmStartError(f"{path}: not a plain tensor state dict "
                             f"({first_line(e, with_type=True)}); save its weights alone, e.g. "
                             f"torch.save(ckpt['ema'], 'ema.pt')") from None
    for key in ("ema", "model", "state_dict"):         # training checkpoints nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    if not isinstance(obj, dict):
        raise WarmStartError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def map_dit_keys(state: dict, model: nn.Module) -> dict:
    """DiT/SiT names and shapes -> this project's SiT (see the module docstring)."""
    out = {}
    for k, v in state.items():
        if k in DIT_DROPPED:
            continue
        for old, new in DIT_RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    lin = "final_layer.linear"
    want = dict(model.named_parameters())
    if f"{lin}.weight" in out and f"{lin}.weight" in want:
        have, need = out[f"{lin}.weight"].shape[0], want[f"{lin}.weight"].shape[0]
        if have == 2 * need:                            # learn_sigma: [p*p*2C] -> [p*p*C]
            c = model.in_channels
            rows = [i * 2 * c + j for i in range(need // c) for j in range(c)]
            out[f"{lin}.weight"] = out[f"{lin}.weight"][rows]
            out[f"{lin}.bias"] = out[f"{lin}.bias"][rows]
    return out


def init_from(model: nn.Module, source: str | Path, weights: str = "ema",
              model_cfg: Optional[dict] = None) -> str:
    """Load ``source`` into ``model`` in place; returns a one-line description. ``weights``:
    a checkpoint's first EMA ("ema") or its raw training weights ("raw", train.init_weights);
    ``model_cfg`` (the run's model.* settings) lets a mismatch name the settings that differ."""
    p = Path(source)
    if not p.exists():
        raise WarmStartError(f"train.init_from={source}: no such file or folder")
    if p.is_dir():
        if not _is_project_model(p):
            raise WarmStartError(f"train.init_from={source}: a folder must be an export, a run "
                                 f"folder or a checkpoint of this project")
        try:
            net, info = load_model(p, "cpu", weights=weights)
        except (FileNotFoundError, ValueError) as e:
            raise WarmStartError(f"train.init_from={source}: {e}") from None
        state = net.state_dict()
        bad = shape_mismatch(state, model.state_dict())
        diff = config_diff(info.get("model") or {}, model_cfg or {})[:4]
        if bad:
            raise WarmStartError(f"train.init_from={source}: its model does not match this "
                                 f"config's: {bad}" + (f"; it was trained with {', '.join(diff)}"
                                                        if diff else ""))
        model.load_state_dict(state)
        return (f"initialised from {source} (step {info.get('step')}, "
                f"{info.get('weights', 'ema')} weights)")
    state = map_dit_keys(read_state_dict(p), model)
    ours = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in state.items()
             if k in ours and v.shape != ours[k].shape]
    unknown = sorted(k for k in state if k not in ours)
    if wrong or unknown:
        raise WarmStartError(f"train.init_from={source}: does not fit model "
                             f"({', '.join(wrong[:3] or unknown[:3])})")
    model.load_state_dict(state, strict=False)
    h = getattr(getattr(model, "cond", None), "h_embedder", None)
    if h is not None and not any(k.startswith("cond.h_embedder.") for k in state):
        with torch.no_grad():                           # u(z, r, t) = v(z, t) to start
            h.mlp[2].weight.zero_()
            h.mlp[2].bias.zero_()
    kept = sorted(k for k in ours if k not in state and not k.startswith("cond.h_embedder."))
    return (f"initialised from {source}: {len(state)} tensors mapped; the (t - r) embedder "
            f"starts at zero" + (f"; kept at initialisation: {', '.join(kept[:6])}"
                                 + (" ..." if len(kept) > 6 else "") if kept else ""))
