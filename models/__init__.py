"""Backbones for MeanFlow: a U-Net with a multi-scale edge encoder and the SiT/DiT family.

Every backbone implements the interface the MeanFlow objective calls::

    u = model(z, r, t, edge=None, label=None, keep=None)    # [B, C, H, W]

* z [B, C, H, W]: noisy latent or image (C = in_channels, H = W = input_size);
* r, t [B]: times in [0, 1] with r <= t; the network is conditioned on (t, t - r), each
  multiplied by ``time_scale`` before its sinusoidal embedding;
* edge [B, edge_channels, edge_size, edge_size] in [0, 1], or None (= the null edge);
* label [B] long in [0, num_classes), or None (= the null class);
* keep [B] bool: False gives that sample the null condition (classifier-free guidance): the
  null class id ``num_classes``, and for edges zeroed edge features plus a learned null-edge
  embedding, a state no real edge map can produce. None = every condition kept.

Every op supports forward-mode AD (``torch.autograd.forward_ad``), with which the objective
computes du/dt; see models/layers.py.

    >>> import models
    >>> net = models.build(cfg.model)          # "unet" or a name from models.list_models()
"""
from __future__ import annotations

import torch.nn as nn

from .sit import SiT, SiT_models
from .unet import UNet

UNET_NAME = "unet"


def list_models() -> list[str]:
    """Every name :func:`build` accepts."""
    return [UNET_NAME, *SiT_models]


def build(cfg) -> nn.Module:
    """The backbone named by ``cfg.name`` (a :class:`meanflow.config.ModelConfig`)."""
    common = dict(input_size=cfg.input_size, in_channels=cfg.in_channels,
                  num_classes=cfg.num_classes, edge_channels=cfg.edge_channels,
                  edge_size=cfg.edge_size, time_embed=cfg.time_embed, time_scale=cfg.time_scale,
                  prediction=cfg.prediction, x_pred_t_min=cfg.x_pred_t_min)
    if cfg.name == UNET_NAME:
        return UNet(base_channels=cfg.base_channels, channel_mults=tuple(cfg.channel_mults),
                    num_res_blocks=cfg.num_res_blocks,
                    attn_resolutions=tuple(cfg.attn_resolutions), dropout=cfg.dropout, **common)
    if cfg.name in SiT_models:
        return SiT_models[cfg.name](edge_mode=cfg.edge_mode,
                                    grad_checkpointing=cfg.grad_checkpointing, **common)
    raise ValueError(f"unknown model.name {cfg.name!r}; known: {', '.join(list_models())}")


__all__ = ["SiT", "SiT_models", "UNet", "build", "list_models"]
