"""The validation grids a training run logs: a fixed batch (the same on every run of a seed,
resumes included) sampled by the EMA network in 1 and 2 steps.

    val = validation_batch(cfg, val_data, device)
    grid = validation_grid(ema_net, val, cfg, decoder)      # uint8 [H, W, 3], or None
"""
from __future__ import annotations

import sys
from typing import Optional

import numpy as np
import torch

from .config import Config
from .errors import first_line
from .runtime import Stream, seed_rng, stream_seed
from .step import batch_to


def validation_batch(cfg: Config, val_data, device) -> dict:
    """The fixed batch of the validation grids (the same on every run of this seed)."""
    val_data.flip = False
    # an SD-VAE cache samples each item's posterior from torch's global RNG: seeded from the
    # validation stream, and the training RNG left as it was (a resume restores it first)
    with torch.random.fork_rng(devices=[]):
        seed_rng(stream_seed(cfg.train.seed, Stream.VALIDATION, 1))
        items = [val_data[i] for i in range(min(cfg.train.num_val, len(val_data)))]
    x, edge, label = batch_to(torch.utils.data.default_collate(items), device, cfg)
    g = torch.Generator().manual_seed(stream_seed(cfg.train.seed, Stream.VALIDATION))
    return dict(x=x, edge=edge, label=label, noise=torch.randn(x.shape, generator=g).to(device))


@torch.no_grad()
def validation_grid(ema_net, val: dict, cfg: Config, decoder, fail: bool = False
                    ) -> Optional[np.ndarray]:
    """uint8 [H, W, 3] grid, one row per validation sample: edge | ground truth | EMA 1-step |
    2-step, sampled with ``ema_net``.

    A failure here (a decode error, say) costs the picture, not the run: it is reported in one
    line and None is returned; the training weights are never touched. ``fail`` raises on
    purpose (the test suite's hook)."""
    from .images import tile_grid, to_uint8
    from .sampling import sample
    try:
        if fail:
            raise RuntimeError("injected decode failure (the test suite's fault hook)")
        x, edge, label = val["x"], val["edge"], val["label"]
        cols = []
        if edge is not None:
            e = torch.nn.functional.interpolate(edge[:, :1], size=cfg.data.image_size,
                                                mode="nearest")
            cols.append(e.expand(-1, 3, -1, -1) * 2 - 1)
        cols.append(decoder(x))
        for steps in (1, 2):
            cols.append(decoder(sample(ema_net, val["noise"], steps, edge=edge, label=label)))
        images = [to_uint8(c.float()) for c in cols]          # [N, H, W, C] each
        return tile_grid([[col[i] for col in images] for i in range(len(x))], pad=1)
    except Exception as e:  # noqa: BLE001 - any failure of a picture: report and go on
        print(f"warning: the validation grid failed ({first_line(e, with_type=True)}); no image "
              f"this time, training goes on", file=sys.stderr, flush=True)
        return None


def grid_decoder(accelerator, meta: dict):
    """The validation grid's decoder on the main process (None elsewhere); the dataset's
    default SD-VAE may be fetched, as the cache was made with it. A failure stops every
    process with one line (``ValueError``), not the main one alone."""
    from .codec import CodecError, make_decoder
    from .distributed import all_ok
    decoder, why = None, None
    if accelerator.is_main_process:
        try:
            decoder = make_decoder(meta, accelerator.device, allow_download=True)
        except CodecError as e:
            why = str(e)
    if not all_ok(accelerator, why is None):
        raise ValueError(why or "the main process could not load the dataset's VAE decoder")
    return decoder
