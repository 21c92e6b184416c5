"""MeanFlow: one-step generation by learning average velocities (Geng et al. 2025).

The objective and samplers here work with any backbone called as
``model(z, r, t, edge=None, label=None, keep=None)``.
"""
from .config import (Config, ConfigError, DataConfig, MeanFlowConfig, ModelConfig, TrainConfig,
                     load_config, save_config)
from .objective import LossOutput, MeanFlowLoss, guided_velocity, meanflow_target, sample_times
from .sampling import sample, sample_noise, time_grid


def load_pipeline(path, device=None):
    """A trained model as a function of edge maps, sketches, photos or labels
    (meanflow/pipeline.py). Imported on first use: it loads OpenCV and the edge detectors."""
    from .pipeline import load_pipeline as load
    return load(path, device)


__all__ = [
    "Config", "ConfigError", "DataConfig", "MeanFlowConfig", "ModelConfig", "TrainConfig",
    "load_config", "save_config", "LossOutput", "MeanFlowLoss", "guided_velocity",
    "meanflow_target", "sample_times", "sample", "sample_noise", "time_grid", "load_pipeline",
]
