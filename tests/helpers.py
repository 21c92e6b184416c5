"""Small fixtures shared by the end-to-end tests: a tiny Fashion-MNIST-format dataset and
the commands that run the real entry points."""
from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def write_idx(folder: Path, n_train: int = 96, n_test: int = 32, seed: int = 0) -> Path:
    """Fashion-MNIST IDX files (gzipped) of simple shapes whose class is the shape kind."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = np.zeros((n, 28, 28), np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        yy, xx = np.mgrid[:28, :28]
        for i in range(n):
            cy, cx = rng.integers(9, 19, 2)
            rad = 4 + labels[i] % 5
            shade = 120 + 12 * labels[i]
            if labels[i] < 5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad ** 2
            else:
                mask = (abs(yy - cy) <= rad) & (abs(xx - cx) <= rad)
            imgs[i][mask] = shade
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + imgs.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    return folder


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run(args: list[str], timeout: int = 300, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True,
                          timeout=timeout)


def make_pixel_dataset(tmp: Path, image_size: int = 16) -> Path:
    """Cache the tiny IDX set as a pixel-codec LMDB with Canny edges; returns the output dir."""
    idx = write_idx(tmp / "idx")
    out = tmp / "data"
    res = run([PY, "preprocess/cache.py", "--source", "fashion-mnist", "--fashion-root",
               str(idx), "--output", str(out), "--image-size", str(image_size), "--codec",
               "pixel", "--edges", "canny"])
    assert res.returncode == 0, res.stderr
    return out


# The tiny training config of the end-to-end tests: a 2-level U-Net on the 16x16 pixel set of
# make_pixel_dataset, edges and labels. Tests change what they test through ``overrides``.
TINY = dict(
    model=dict(name="unet", input_size=16, in_channels=1, edge_channels=1, edge_size=16,
               num_classes=10, base_channels=16, channel_mults=[1, 2], num_res_blocks=1,
               attn_resolutions=[8], dropout=0.0),
    meanflow=dict(ratio_r_neq_t=0.5, cfg_omega=1.5, cond_drop_prob=0.2),
    data=dict(image_size=16, codec="pixel", channels=1, use_edges=True, use_labels=True,
              num_workers=0),
    train=dict(batch_size=8, max_steps=6, lr=1.0e-3, warmup_steps=2, log_every=2,
               image_every=3, ckpt_every=3, keep_checkpoints=2, ema_decays=[0.9, 0.5]),
)


def tiny_config(path: Path, dataset: Path, /, **overrides: dict) -> Path:
    """Write the tiny config for the dataset ``dataset`` (make_pixel_dataset's folder) to
    ``path``; ``overrides`` maps a section to the keys that differ, e.g.
    ``train=dict(max_steps=2)``, or None for the config's defaults. Returns ``path``."""
    import copy

    import yaml
    cfg = copy.deepcopy(TINY)
    cfg["data"].update(path=f"{dataset}/train", val_path=f"{dataset}/test")
    for section, keys in overrides.items():
        if keys is None:                      # the section's defaults
            cfg.pop(section)
        else:
            cfg[section].update(keys)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tables(md: str) -> list[list[list[str]]]:
    """The markdown tables of ``md``: rows of cells, header and separator dropped."""
    out, cur = [], None
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cur = [] if cur is None else cur
            cur.append([c.strip() for c in line.strip("|").split("|")])
        elif cur is not None:
            out.append(cur[2:])
            cur = None
    return out
