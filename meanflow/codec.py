"""Model space -> images, using the codec recorded in the dataset metadata.

pixel: x is the image in [-1, 1]. sd-vae: x = (z - shift) * scale with z a diffusers
AutoencoderKL latent; scale and shift come from the metadata, never hard-coded.
"""
from __future__ import annotations

from typing import Callable

import torch


def make_decoder(meta: dict, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function [B, C, h, w] (model space) -> [B, 3, H, W] RGB in [-1, 1], in fp32."""
    codec = meta.get("codec", "pixel")
    if codec == "pixel":
        def dec(x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
        return dec
    if codec != "sd-vae":
        raise ValueError(f"unknown codec {codec!r} in the dataset metadata")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(meta["vae"]).to(device).eval()
    scale = float(meta["scaling_factor"])
    shift = float(meta.get("shift_factor") or 0.0)

    @torch.no_grad()
    def dec(x: torch.Tensor) -> torch.Tensor:
        # fp32 even inside a caller's bf16 autocast: a bf16 decode shifts the uint8 pixels
        # that FID is computed from
        with torch.autocast(torch.device(device).type, enabled=False):
            z = x.to(device, vae.dtype) / scale + shift
            return vae.decode(z).sample.float().clamp(-1, 1)
    return dec
