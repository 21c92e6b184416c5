"""Small fixtures shared by the end-to-end tests: a tiny Fashion-MNIST-format dataset and
the commands that run the real entry points."""
from __future__ import annotations

import contextlib
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:            # the repository's models/ and meanflow/
    sys.path.insert(0, str(ROOT))

from meanflow.config import from_dict  # noqa: E402
from models.sit import SiT  # noqa: E402
from models.unet import UNet  # noqa: E402

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


# --------------------------------------------------------------------------------------------
# Runs of train.py, models trained for sample.py / the page, sketches
# --------------------------------------------------------------------------------------------
def write_cfg(tmp: Path, data: Path, workers: int = 0) -> Path:
    return tiny_config(tmp / "tiny.yaml", data, data=dict(num_workers=workers))


def train_run(cfg: Path, run_dir: Path, *extra, nproc: int = 1, **env_extra):
    """train.py on ``cfg`` into ``run_dir``, one process or ``nproc`` under torchrun."""
    if nproc == 1:
        cmd = [PY, "train.py"]
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", "train.py"]
    return run(cmd + ["--config", str(cfg), "--run-dir", str(run_dir), *extra], **env_extra)


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "export" / "model.safetensors"))


MODEL = """
model: {{name: unet, input_size: 16, in_channels: 1, edge_channels: {ec}, edge_size: 16,
        num_classes: {nc}, base_channels: 8, channel_mults: [1, 2], num_res_blocks: 1,
        attn_resolutions: [], dropout: 0.0}}
data: {{path: {data}/train, val_path: {data}/test, image_size: 16, codec: pixel, channels: 1,
       use_edges: {edges}, use_labels: {labels}, num_workers: 0}}
train: {{batch_size: 8, max_steps: 4, lr: 5.0e-2, log_every: 1, image_every: 100,
        ckpt_every: 100, ema_decays: [0.1]}}
"""
# (large steps and an EMA that follows them: after four steps the zero-initialised condition
# paths are no longer zero, so the images depend on the edge map or label)


def train_tiny(tmp: Path, data: Path, name: str, edges: bool, labels: bool) -> Path:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(MODEL.format(data=data, ec=int(edges), nc=10 if labels else 0,
                                edges=str(edges).lower(), labels=str(labels).lower()))
    res = run([PY, "train.py", "--config", str(cfg), "--run-dir", str(tmp / name)])
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / name


def ellipse(size=(300, 200), width=3, ink=0, paper=255, mode="L") -> Image.Image:
    im = Image.new(mode, size, paper)
    w, h = size
    ImageDraw.Draw(im).ellipse((w // 5, h // 6, w - w // 5, h - h // 6), outline=ink,
                               width=width)
    return im


# --------------------------------------------------------------------------------------------
# In-process steps on a stand-in device, and tiny networks
# --------------------------------------------------------------------------------------------
TINY_CFG = dict(   # the tiny config as a dict, for in-process steps (no data on disk)
    model=dict(name="unet", input_size=16, in_channels=1, edge_channels=1, edge_size=16,
               num_classes=10, base_channels=16, channel_mults=[1, 2], num_res_blocks=1,
               attn_resolutions=[8], dropout=0.0),
    meanflow=dict(ratio_r_neq_t=0.5, cfg_omega=1.5, cond_drop_prob=0.2),
    data=dict(path="unused", image_size=16, codec="pixel", channels=1, use_edges=True,
              use_labels=True, num_workers=0),
    train=dict(batch_size=8, max_steps=6, lr=1.0e-3, ema_decays=[0.9]),
)


def tiny_cfg(**train_overrides):
    cfg = from_dict(TINY_CFG)
    for k, v in train_overrides.items():
        setattr(cfg.train, k, v)
    return cfg


def fake_batch(n: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(n, 1, 16, 16, generator=g),
                edge=(torch.rand(n, 1, 16, 16, generator=g) > 0.8).to(torch.uint8) * 255,
                label=torch.randint(0, 10, (n,), generator=g))


class MetaAccelerator:
    """What train.py uses of an Accelerator, with ``meta`` as the training device: prepare
    moves the model there, as accelerate moves it to the GPU."""

    device = torch.device("meta")

    def prepare(self, model, opt):
        return model.to(self.device), opt

    def unwrap_model(self, model):
        return model

    def accumulate(self, model):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


B = 3                    # the tiny networks' batch (inputs())
NUM_CLASSES = 3


def tiny_unet(**kw) -> UNet:
    args = dict(input_size=8, in_channels=2, base_channels=16, channel_mults=(1, 2),
                num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, edge_channels=1,
                edge_size=16, num_classes=NUM_CLASSES)
    args.update(kw)
    return UNet(**args)


def tiny_sit(edge_mode: str = "add", **kw) -> SiT:
    args = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2,
                num_heads=2, num_classes=NUM_CLASSES, edge_channels=1, edge_size=16,
                edge_mode=edge_mode)
    args.update(kw)
    return SiT(**args)


TINY_NETS = {"unet": tiny_unet, "sit-add": lambda **kw: tiny_sit("add", **kw),
        "sit-tokens": lambda **kw: tiny_sit("tokens", **kw)}


def perturb_zero_init_(model: torch.nn.Module, skip: set[int] = frozenset(), std: float = 0.05,
                       seed: int = 0) -> None:
    """Give every all-zero parameter (zero-initialised layers, biases) small random values, so
    that the tests below see a network whose every path matters. Parameters in ``skip`` stay."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in skip and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def inputs(model, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c, s = model.in_channels, model.input_size
    z = torch.randn(B, c, s, s, generator=g, dtype=dtype)
    t = torch.tensor([0.9, 0.6, 0.3], dtype=dtype)
    r = torch.tensor([0.2, 0.6, 0.1], dtype=dtype)
    edge = (torch.rand(B, model.edge_channels, model.edge_size, model.edge_size,
                       generator=g) > 0.7).to(dtype)
    label = torch.tensor([0, 2, 1])
    return z, r, t, edge, label
