"""A trained model's folder as one typed object: read once, used by every loader.

    exp = Export.read("runs/afhq_unet")             # run, export, saved pipeline or checkpoint
    exp.model, exp.data, exp.meanflow, exp.step     # typed configs, rebuilt here only
    net = exp.build("cuda:0")                       # the network, weights loaded, eval mode

and the one writer of such a folder (``write_export``: ``model.safetensors`` with its step
in the metadata, then ``model_config.json``, each atomically), which train.py's export, the
run folder's repair (rundir.sync_export) and Pipeline.save_pretrained all call.

Nothing is pickled: weights are safetensors (a legacy checkpoint EMA is read with
``weights_only=True``), configs JSON.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, write_text_atomic
from .checkpoint import (CHECKPOINT_FILES, CKPT_DIR_RE, EMA_FILE, EXPORT_CONFIG,
                         LEGACY_EMA_FILE, MODEL_FILE, checkpoint_weights, shape_mismatch,
                         strip_wrappers)
from .config import Config, DataConfig, MeanFlowConfig, ModelConfig, from_dict, to_dict

EXPORT_DIR = "export"                     # RUN/export: the newest checkpoint's EMA 0
WEIGHTS_FILE = MODEL_FILE                 # an export's weights; a checkpoint's raw weights
WEIGHTS = ("ema", "raw")                  # what a checkpoint can give as the model


def write_export(out_dir: Union[str, Path], state: dict, info: Union[dict, str],
                 step) -> Path:
    """Write an export folder: ``model.safetensors`` (``state``, metadata ``step``) and then
    ``model_config.json`` (``info``: a dict, dumped as train.py always has, or a config's
    text kept byte for byte), each atomically (tmp + rename). The weights go first: a kill
    between the two leaves weights and config at different steps, which
    ``rundir.export_step`` reads as no export. The one writer of export folders."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(step)})
    text = info if isinstance(info, str) else json.dumps(info, indent=2, default=str)
    write_text_atomic(out_dir / EXPORT_CONFIG, text)
    return out_dir


def _models():
    from ._layout import repo_packages
    with repo_packages():
        import models
    return models


@dataclass(frozen=True)
class Export:
    """A trained model's folder (export, saved pipeline or checkpoint) with its config.

    ``info`` is model_config.json as read (plus ``weights``); the typed configs are rebuilt
    from it here and nowhere else: ``model`` when read (a config that does not parse is
    refused then), ``data`` and ``meanflow`` on first use."""
    path: Optional[Path]                  # the folder read; None for an info dict alone
    info: dict
    model: ModelConfig
    weights: str = "ema"                  # "ema" (exports hold it) or a checkpoint's "raw"
    weights_file: Optional[Path] = None
    checkpoint: bool = False              # a training checkpoint (RUN/checkpoints/step_N)
    config_file: Optional[Path] = field(default=None, repr=False)

    # ---- the configs ----------------------------------------------------------------------
    @classmethod
    def from_info(cls, info: dict, path: Optional[Path] = None, **kw) -> "Export":
        """An Export of an info dict (model_config.json's contents) without reading files."""
        return cls(path=path, info=info, model=from_dict(info["model"], cls=ModelConfig), **kw)

    @cached_property
    def data(self) -> DataConfig:
        return from_dict(self.info["data"], cls=DataConfig)

    @cached_property
    def meanflow(self) -> MeanFlowConfig:
        return from_dict(self.info.get("meanflow"), cls=MeanFlowConfig)

    @property
    def dataset_meta(self) -> dict:
        return self.info.get("dataset_meta") or {}

    @property
    def step(self) -> Optional[int]:
        return self.info.get("step")

    # ---- reading --------------------------------------------------------------------------
    @classmethod
    def read(cls, path: Union[str, Path], weights: str = "ema") -> "Export":
        """The export, saved pipeline, run folder (its ``export/``) or complete checkpoint at
        ``path``, its files checked and its config parsed; the weights are read by
        :meth:`build`. A checkpoint gives its first EMA, or with ``weights="raw"`` its
        training weights; each refusal is one line naming the file."""
        if weights not in WEIGHTS:
            raise ValueError(f"weights={weights!r}: choose one of {list(WEIGHTS)}")
        p = Path(path)
        if (p / EXPORT_DIR / EXPORT_CONFIG).is_file():
            p = p / EXPORT_DIR
        checkpoint = (p.is_dir() and (CKPT_DIR_RE.match(p.name) is not None
                                      or any((p / f).exists() for f in CHECKPOINT_FILES)))
        if checkpoint:
            w_file = checkpoint_weights(p, weights)
        elif weights == "raw":
            raise ValueError(f"{p}: an export holds the EMA weights only; the raw training "
                             f"weights are in a checkpoint (RUN/checkpoints/step_N)")
        else:
            w_file = p / WEIGHTS_FILE
        cfg_file = p / EXPORT_CONFIG
        for f in (cfg_file, w_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found: expected an export folder written by "
                                        f"train.py (model.safetensors + {EXPORT_CONFIG}) or a "
                                        f"checkpoint ({EMA_FILE} + {EXPORT_CONFIG})")
        try:
            info = json.loads(cfg_file.read_text())
            exp = cls.from_info(info, p, weights=weights, weights_file=w_file,
                                checkpoint=checkpoint, config_file=cfg_file)
        except Exception as e:  # noqa: BLE001 - name the file, whatever is wrong inside
            raise ValueError(f"{cfg_file}: not a valid model config: {e}") from None
        info["weights"] = "raw" if weights == "raw" else info.get("weights", "ema")
        return exp

    def state_dict(self, net: nn.Module) -> dict:
        """The weights to load into ``net`` (built from :attr:`model`), checked against it:
        a checkpoint's EMA 0 over the parameters with its buffers from the model weights,
        wrapper prefixes stripped."""
        w_file, p = self.weights_file, self.path
        try:
            state = (torch.load(w_file, map_location="cpu", weights_only=True)
                     if w_file.name == LEGACY_EMA_FILE else load_file(str(w_file)))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{w_file}: cannot read safetensors weights: {e}") from None
        if self.checkpoint and self.weights == "ema":   # EMA keys are "<index>.<parameter>"
            ema0 = {k[2:]: v for k, v in state.items() if k.startswith("0.")}
            # the EMA covers the parameters; buffers come from the checkpoint's model weights
            own = net.state_dict()
            buffers = {k for k in own if k not in dict(net.named_parameters())}
            if buffers and (p / WEIGHTS_FILE).is_file():
                raw = strip_wrappers(load_file(str(p / WEIGHTS_FILE)))
                ema0.update({k: raw[k] for k in buffers if k in raw})
            state = ema0
        elif self.checkpoint:
            state = strip_wrappers(state)
        bad = shape_mismatch(state, net.state_dict())
        if bad:
            raise ValueError(f"{w_file} does not fit the model in {self.config_file}: {bad}")
        return state

    # ---- the network ----------------------------------------------------------------------
    def network(self, device=None) -> nn.Module:
        """The untrained network of :attr:`model`, built on ``device`` (None: the current
        default) itself: building there, rather than moving, also works under a fake-tensor
        device."""
        models = _models()
        if device is None:
            return models.build(self.model)
        with torch.device(device):
            return models.build(self.model)

    def build(self, device="cpu") -> nn.Module:
        """The network in eval mode on ``device``, its weights loaded. The files are read and
        checked on the CPU and the network is then built on ``device`` itself and the weights
        copied in, so no process's weights pass through cuda:0."""
        try:
            net = self.network()
        except ValueError as e:
            raise ValueError(f"{self.config_file}: its model config does not build: "
                             f"{e}") from None
        net.load_state_dict(self.state_dict(net))
        if self.weights == "raw":
            print(f"note: {self.path}: using its RAW training weights (weights='raw'), not "
                  f"the EMA", file=sys.stderr, flush=True)
        return self.place(net, device)

    def place(self, net: nn.Module, device) -> nn.Module:
        """``net`` (a CPU network of this model) on ``device``: itself on the CPU, else a copy
        built there with its weights copied in."""
        if torch.device(device).type == "cpu":
            return net.to(device).eval()
        out = self.network(device)
        out.load_state_dict(net.state_dict())
        return out.eval()


# --------------------------------------------------------------------------------------------
# What train.py writes, and the loaders every entry point uses
# --------------------------------------------------------------------------------------------
def export_info(cfg: Config, dataset_meta: dict, step: int, ema_decay: Optional[float]) -> dict:
    """model_config.json's contents: model, objective and data settings, the dataset's
    metadata, step, EMA decay."""
    return dict(model=to_dict(cfg.model), meanflow=to_dict(cfg.meanflow),
                data=to_dict(cfg.data), dataset_meta=dataset_meta, step=step,
                ema_decay=ema_decay, format_version=1)


def export_config(out_dir: Path, cfg: Config, dataset_meta: dict, step: int,
                  ema_decay: Optional[float]) -> None:
    """Write ``model_config.json`` (:func:`export_info`) atomically: what every checkpoint
    carries, so that its export can be rebuilt from it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / EXPORT_CONFIG,
                      json.dumps(export_info(cfg, dataset_meta, step, ema_decay), indent=2,
                                 default=str))


def export_model(out_dir: Path, model: nn.Module, cfg: Config, dataset_meta: dict, step: int,
                 ema_decay: Optional[float]) -> None:
    """Write ``model.safetensors`` and ``model_config.json`` atomically (tmp + rename), with
    the one export writer (:func:`meanflow.export.write_export`)."""
    write_export(out_dir, model.state_dict(), export_info(cfg, dataset_meta, step, ema_decay),
                 step)


def load_model(path: str | Path, device=None, weights: str = "ema") -> tuple[nn.Module, dict]:
    """(network in eval mode on ``device``, its export info) from an export or saved pipeline
    folder, a run folder containing ``export/``, or a complete checkpoint
    (``RUN/checkpoints/step_N``: its first EMA). The one way to load a trained model; ``device``
    defaults to the process's (``runtime.process_device``: cuda:LOCAL_RANK when CUDA is
    available, else the CPU).

    ``weights="raw"`` loads a checkpoint's training weights instead of its EMA (said on
    stderr, and recorded as ``info["weights"]``); it is never chosen silently: a checkpoint
    without its COMPLETE marker, an unfinished ``step_N.tmp`` save, or one without
    ``ema.safetensors`` is refused, one line naming what is missing.

    The files are read and checked on the CPU; the network is then built on ``device`` itself
    and the weights copied in (:meth:`Export.place`), so no process's weights pass through
    cuda:0."""
    from .runtime import process_device
    dev = process_device(device)
    exp = Export.read(path, weights=weights)
    return exp.build(dev), exp.info
