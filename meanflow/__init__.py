"""MeanFlow: one-step generation by learning average velocities (Geng et al. 2025).

The objective and samplers here work with any backbone called as
``model(z, r, t, edge=None, label=None, keep=None)``.

The names below are imported on first use, so that ``meanflow.records`` (the dataset format),
``meanflow.images`` and ``meanflow.edges`` can be used without loading torch.
"""
from __future__ import annotations

import importlib

_HOMES = {
    "config": ("Config", "ConfigError", "DataConfig", "MeanFlowConfig", "ModelConfig",
               "TrainConfig", "load_config", "save_config"),
    "objective": ("LossOutput", "MeanFlowLoss", "guided_velocity", "meanflow_target",
                  "sample_times"),
    "sampling": ("sample", "sample_noise", "time_grid"),
    "export": ("Export", "load_model"),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}


def load_pipeline(path, device=None, **kwargs):
    """A trained model as a function of edge maps, sketches, photos or labels
    (meanflow/pipeline.py; ``weights``, ``vae``, ``allow_download`` are explained there).
    Imported on first use: it loads OpenCV and the edge detectors."""
    from .pipeline import load_pipeline as load
    return load(path, device, **kwargs)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__all__ = [*_WHERE, "load_pipeline"]
