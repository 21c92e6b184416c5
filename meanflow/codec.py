"""Images <-> model space: the codecs a dataset is cached with and that a trained model's
samples are decoded with, as recorded in the dataset metadata.

pixel: x is the image in [-1, 1]. sd-vae: x = (z - shift) * scale with z a diffusers
AutoencoderKL latent; scale and shift come from the metadata, never hard-coded.

Encoding (preprocess/cache.py) stores what a record holds: the image itself, or the VAE
posterior (unscaled); :func:`latent_scale` is the scaling the reader applies, and
:func:`make_decoder` maps model space back to images. torch and diffusers are imported when
a codec is built, so a pixel cache does not load them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .errors import first_line

VAE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"   # the one hub id allow_download=True may fetch


class CodecError(ValueError):
    """A VAE that cannot be loaded or does not fit the image size: reported before any work."""


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------
class PixelCodec:
    """The image itself, uint8; the reader maps it to [-1, 1]."""

    name = "pixel"

    def __init__(self, image_size: int, channels: int):
        self.image_size, self.channels = image_size, channels

    def describe(self) -> dict[str, Any]:
        return {"codec": "pixel", "x_shape": [self.channels, self.image_size, self.image_size]}

    def record_bytes(self) -> int:
        return self.image_size ** 2 * self.channels

    def encode(self, images: list[np.ndarray]) -> list[Optional[dict[str, np.ndarray]]]:
        return [{} for _ in images]                     # the image itself is the record


class VAECodec:
    """diffusers AutoencoderKL: posterior mean and std of the image and of its mirror image,
    stored unscaled in fp16; ``scaling_factor`` (and ``shift_factor``) go in the metadata."""

    name = "sd-vae"

    def __init__(self, name_or_path: str, image_size: int, device: str, dtype: str):
        import torch
        from diffusers import AutoencoderKL

        from .edges import hub_failure, looks_like_path

        p = Path(name_or_path)
        if not p.is_dir() and looks_like_path(name_or_path):
            raise CodecError(f"--vae {name_or_path}: no such folder")
        kwargs = {}
        if (p.is_dir() and not (p / "config.json").is_file()
                and (p / "vae" / "config.json").is_file()):
            kwargs["subfolder"] = "vae"                    # a whole diffusers pipeline folder
        tdtype = getattr(torch, VAE_DTYPES[dtype])
        try:
            vae = AutoencoderKL.from_pretrained(name_or_path, torch_dtype=tdtype,
                                                use_safetensors=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - hub, file and config errors alike
            offline = hub_failure("--vae", name_or_path, e, "the AutoencoderKL")
            if offline:
                raise CodecError(offline) from None
            raise CodecError(f"--vae {name_or_path}: cannot load an AutoencoderKL: "
                             f"{first_line(e)}") from None
        self.torch = torch
        self.device, self.dtype = torch.device(device), tdtype
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        cfg = vae.config
        self.vae_id, self.dtype_name = name_or_path, dtype
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        if image_size % self.factor:
            raise CodecError(f"--image-size {image_size} is not divisible by the VAE's "
                             f"downsampling factor {self.factor} ({name_or_path})")
        self.latent_shape = [int(cfg.latent_channels), image_size // self.factor,
                             image_size // self.factor]

    def describe(self) -> dict[str, Any]:
        return {"codec": "sd-vae", "x_shape": list(self.latent_shape), "vae": self.vae_id,
                "vae_class": "AutoencoderKL", "vae_dtype": self.dtype_name,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "latent_shape": list(self.latent_shape)}

    def record_bytes(self) -> int:
        return 2 * 2 * 2 * math.prod(self.latent_shape)        # mean + std, 2 flips, fp16

    def encode(self, images: list[np.ndarray]) -> list[Optional[dict[str, np.ndarray]]]:
        """B x uint8 [H, W, 3] -> per image {'mean', 'std'} [2, c, h, w] fp16 (None: failed)."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float()
            x = x / 127.5 - 1.0                                              # [B, 3, H, W]
            x = torch.cat([x, x.flip(-1)]).to(self.dtype)                    # [2B, 3, H, W]
            post = self.vae.encode(x).latent_dist
            b = len(images)
            mean = torch.stack([post.mean[:b], post.mean[b:]], 1).float().cpu()  # [B, 2, c, h, w]
            std = torch.stack([post.std[:b], post.std[b:]], 1).float().cpu()
        mean16, std16 = mean.half(), std.half()
        out: list[Optional[dict[str, np.ndarray]]] = []
        for i in range(b):
            ok = bool(torch.isfinite(mean16[i]).all() and torch.isfinite(std16[i]).all())
            out.append({"mean": mean16[i].numpy(), "std": std16[i].numpy()} if ok else None)
        return out


def latent_scale(meta: dict[str, Any]) -> tuple[float, float]:
    """(scaling_factor, shift_factor): model input = (z - shift) * scale, z ~ posterior.
    Pixel datasets: (1, 0)."""
    if meta.get("codec") == "pixel":
        return 1.0, 0.0
    return float(meta["scaling_factor"]), float(meta.get("shift_factor") or 0.0)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------
def load_decoder_vae(meta: dict, vae: Optional[str] = None, allow_download: bool = False):
    """The AutoencoderKL that decodes a model's latents, without fetching what nobody asked
    for. ``vae`` (a folder or hub id the caller names) wins over the one the model's metadata
    records; a recorded hub id is read from the local cache only (a received model folder
    must not make this process download a repository of its choosing), except the default
    SD-VAE (DEFAULT_VAE) when ``allow_download``. Safetensors weights only."""
    from diffusers import AutoencoderKL

    from .edges import hub_failure, looks_like_path
    name = str(vae) if vae is not None else str(meta.get("vae") or "")
    if not name:
        raise CodecError("the model's metadata names no VAE (dataset_meta.vae): pass vae= "
                         "(sample.py --vae) with the VAE it was trained with")
    where = "vae=" if vae is not None else "the model's VAE (dataset_meta.vae)"
    p = Path(name).expanduser()
    if not p.is_dir() and looks_like_path(name):
        raise CodecError(f"{where} {name}: no such folder; pass vae= (sample.py --vae) with "
                         f"a local folder or hub id of the VAE")
    kwargs: dict = dict(use_safetensors=True)
    if p.is_dir():
        name = str(p)
        if not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
            kwargs["subfolder"] = "vae"                    # a whole diffusers pipeline folder
    else:
        named = vae is not None or (allow_download and name == DEFAULT_VAE)
        kwargs["local_files_only"] = not named
    try:
        return AutoencoderKL.from_pretrained(name, **kwargs)
    except Exception as e:  # noqa: BLE001 - hub, file and config errors alike
        if kwargs.get("local_files_only"):
            how = (f"vae={name!r} or allow_download=True (sample.py --vae {name})"
                   if name == DEFAULT_VAE else f"vae={name!r} (sample.py --vae {name}) if you "
                   f"trust that repository, or a local folder")
            raise CodecError(f"{where} {name} is not in the local cache, and loading a model "
                             f"downloads nothing it was not told to: pass {how}") from None
        offline = hub_failure("--vae", name, e, "the AutoencoderKL")
        if offline:
            raise CodecError(offline) from None
        raise CodecError(f"{where} {name}: cannot load an AutoencoderKL: "
                         f"{first_line(e)}") from None


def make_decoder(meta: dict, device, vae: Optional[str] = None,
                 allow_download: bool = False) -> Callable[[Any], Any]:
    """A function torch [B, C, h, w] (model space) -> [B, 3, H, W] RGB in [-1, 1], in fp32.
    ``vae`` / ``allow_download``: see :func:`load_decoder_vae` (nothing is downloaded unless
    asked for)."""
    import torch
    codec = meta.get("codec", "pixel")
    if codec == "pixel":
        def dec(x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
        return dec
    if codec != "sd-vae":
        raise ValueError(f"unknown codec {codec!r} in the dataset metadata")
    vae = load_decoder_vae(meta, vae, allow_download).to(device).eval()
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
