"""The training / evaluation dataset: one split written by preprocess/cache.py (an LMDB
environment of safetensors records, see meanflow/records.py for the format).

    ds = LMDBDataset("data/afhq_v2/train")            # flip + posterior sampling on
    item = ds[0]        # {'x': [4, 32, 32], 'edge': [1, 256, 256], 'label', 'index', 'key'}

Randomness (flip, posterior noise) comes from torch's global RNG, so seeding torch before an
item (as train.py does per sample) makes it reproducible whatever the worker count.

lmdb 3.x refuses to open one environment twice in a process, and an environment must not be
used across fork(). So the constructor reads the metadata with a short-lived open/close, and
each process (main or DataLoader worker) opens the environment lazily on first access through
a per-process registry that every dataset on the same path shares.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

from .codec import latent_scale
from .records import META_KEY, RecordError, decode_meta, decode_record, unpack_edge

_LEVEL_F32 = np.arange(256, dtype=np.float32) / 255.0        # grey level -> [0, 1]
EDGE_DTYPES = (torch.float32, torch.uint8)


def edge_array(rec: dict[str, np.ndarray], flip: bool, dtype: torch.dtype) -> np.ndarray:
    """A record's edge map as a contiguous [Ce, He, We] array: float32 in [0, 1], or uint8
    0..255 (value / 255 is the float map); mirrored along the width if ``flip``.

    Packed maps are mirrored while unpacking: the bytes of a row read backwards with the bits
    taken little-end first are the mirrored row. One pass instead of unpack + flip copy;
    measured 2.5x faster on 256x256 maps.
    """
    if "edge_bits" in rec:
        ce, he, we = (int(v) for v in rec["edge_shape"])
        bits = rec["edge_bits"]                                       # [Ce, He, ceil(We / 8)]
        if flip and we % 8 == 0:
            u = np.unpackbits(bits[..., ::-1], axis=-1, bitorder="little")
        else:                                       # padding bits: unpack, then mirror
            u = np.unpackbits(bits, axis=-1, count=we)
            u = np.ascontiguousarray(u[..., ::-1]) if flip else u
        if dtype == torch.uint8:
            u *= np.uint8(255)
            return u
        return u.astype(np.float32)
    e = rec["edge"]                                                   # uint8 grey levels
    e = e[..., ::-1] if flip else e
    return np.take(_LEVEL_F32, e) if dtype == torch.float32 else np.ascontiguousarray(e)


# path -> (pid that opened it, environment). A forked child sees its parent's entry: the
# read-only, lock-free mapping it inherited stays valid, and lmdb would refuse a second open.
_ENVS: dict[str, tuple[int, lmdb.Environment]] = {}


def _open_env(path: str) -> lmdb.Environment:
    # lock=False: a finished dataset is only read; no lock file is needed (read-only media
    # work), and readers take no slot in a shared table. readahead stays on although samples
    # are read in random order: without it a 40 kB record (SD-VAE latents + a 256x256 edge
    # map) faults in as ~11 separate 4 kB reads; measured 6x slower from a cold page cache.
    return lmdb.open(path, readonly=True, lock=False, readahead=True, subdir=True)


def get_env(path: str) -> lmdb.Environment:
    """The process-wide read-only environment of ``path`` (opened on first use)."""
    key = os.path.realpath(path)
    entry = _ENVS.get(key)
    if entry is not None:
        if entry[0] != os.getpid():
            _ENVS[key] = (os.getpid(), entry[1])     # inherited through fork: adopt
        return entry[1]
    env = _open_env(path)
    _ENVS[key] = (os.getpid(), env)
    return env


def close_env(path: str) -> None:
    """Close this process's environment of ``path`` (datasets reopen it on next access)."""
    entry = _ENVS.pop(os.path.realpath(path), None)
    if entry is not None and entry[0] == os.getpid():
        entry[1].close()


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata record of a cached split, without keeping the environment open."""
    path = str(path)
    p = Path(path)
    if not (p / "data.mdb").is_file():
        what = "no such folder" if not p.exists() else "no data.mdb in it"
        raise FileNotFoundError(f"dataset {path}: {what}; write one with preprocess/cache.py")
    key = os.path.realpath(path)
    if key in _ENVS:
        with get_env(path).begin() as txn:
            buf = txn.get(META_KEY.encode())
    else:
        env = _open_env(path)
        try:
            with env.begin() as txn:
                buf = txn.get(META_KEY.encode())
        finally:
            env.close()
    return decode_meta(buf, where=f"dataset {path}")


class KeyList(Sequence):
    """Read-only list of a dataset's keys over a numpy bytes array (see LMDBDataset)."""

    def __init__(self, arr: np.ndarray):
        self._arr = arr

    def __len__(self) -> int:
        return len(self._arr)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [k.decode() for k in self._arr[i]]
        return self._arr[i].decode()

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"KeyList({len(self)} keys)"


class DatasetMismatchError(ValueError):
    """The cached dataset does not fit the training / model configuration."""


class LMDBDataset(torch.utils.data.Dataset):
    """Map-style dataset over one cached split.

    Args:
        path: the split's LMDB folder (``OUT/<split>`` of preprocess/cache.py).
        flip: horizontal flip with probability 1/2 (x and edge together; for VAE latents the
            record of the flipped image is used, since a flipped latent is not the latent of
            the flipped image).
        use_edges / use_labels: include ``edge`` / ``label`` in items.
        sample_posterior: VAE codecs: x = mean + std * noise (False: the posterior mean).
        allow_incomplete: accept a split whose cache run did not process every source.
        edge_dtype: torch.float32 (values in [0, 1]) or torch.uint8 (0..255; divide by 255
            on the device). uint8 moves a quarter of the bytes through DataLoader workers
            and host-to-device copies, which is most of the loading cost of 256x256 maps.
    """

    def __init__(self, path: str | Path, flip: bool = True, use_edges: bool = True,
                 use_labels: bool = True, sample_posterior: bool = True,
                 allow_incomplete: bool = False, edge_dtype: torch.dtype = torch.float32):
        if edge_dtype not in EDGE_DTYPES:
            raise ValueError(f"edge_dtype must be torch.float32 or torch.uint8, got {edge_dtype}")
        self.path = str(path)
        m = read_meta(self.path)
        # The key and label lists live in numpy arrays, not in .meta: Python lists of a million
        # strings get copied into every forked worker as their refcounts are touched, and
        # .meta is embedded in exported model configs.
        keys, labels = m.pop("keys"), m.pop("labels")
        self.meta = m
        if not m.get("complete", True) and not allow_incomplete:
            raise ValueError(f"dataset {self.path} is incomplete ({m.get('num_expected')} sources "
                             f"expected, {m['num_records']} cached, {m.get('num_failed', 0)} "
                             f"failed): run preprocess/cache.py again to finish it, or pass "
                             f"allow_incomplete=True")
        if use_edges and m["edges"] == "none":
            raise ValueError(f"dataset {self.path} has no edge maps (cached with --edges none) "
                             f"but use_edges=True")
        if not keys:
            raise ValueError(f"dataset {self.path} has no records")
        self.flip, self.use_edges, self.use_labels = flip, use_edges, use_labels
        self.sample_posterior, self.edge_dtype = sample_posterior, edge_dtype
        self._bkeys = np.array([k.encode() for k in keys], dtype=np.bytes_)
        self._labels = np.asarray(labels, dtype=np.int64)
        self.keys = KeyList(self._bkeys)
        self.class_names: list[str] = list(m["class_names"])
        self.codec: str = m["codec"]
        self.x_shape = tuple(m["x_shape"])
        self.scale, self.shift = latent_scale(m)
        self._env_key = os.path.realpath(self.path)

    def __len__(self) -> int:
        return len(self.keys)

    # ---- raw access -----------------------------------------------------------------------
    def record(self, i: int) -> dict[str, np.ndarray]:
        """The stored arrays of sample ``i`` (see meanflow/records.py)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} records in {self.path}")
        key = self._bkeys[i]
        entry = _ENVS.get(self._env_key)          # fast path: open in this very process
        env = entry[1] if entry is not None and entry[0] == os.getpid() else get_env(self.path)
        try:
            with env.begin() as txn:
                buf = txn.get(key)
        except lmdb.MapResizedError:
            # Another process wrote past this reader's map (e.g. a second cache.py run on a
            # finished split while a training run reads it): adopt the new size, read again.
            env.set_mapsize(0)
            with env.begin() as txn:
                buf = txn.get(key)
        if buf is None:
            raise RecordError(f"dataset {self.path}: key {self.keys[i]!r} is listed in "
                              f"{META_KEY} but missing")
        return decode_record(buf, self.keys[i])

    def label(self, i: int) -> int:
        return int(self._labels[i])

    def image(self, i: int) -> np.ndarray:
        """The real image, uint8 [H, W, C] (stored for pixel datasets, and for VAE datasets
        written with --store-images)."""
        rec = self.record(i)
        if "image" not in rec:
            raise KeyError(f"dataset {self.path} stores no real images (codec {self.codec}, "
                           f"cached with --store-images never or a train split under auto); "
                           f"re-cache with --store-images always")
        return rec["image"]

    def edge_map(self, i: int) -> np.ndarray:
        """The unflipped edge map, float32 [Ce, He, We] in [0, 1]."""
        edge = unpack_edge(self.record(i))
        if edge is None:
            raise KeyError(f"dataset {self.path}: record {self.keys[i]!r} has no edge map")
        return edge

    # ---- training items -------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.record(i)
        flip = self.flip and bool(torch.rand(()) < 0.5)
        if self.codec == "pixel":
            img = rec["image"]                                           # [H, W, C] uint8
            if flip:
                img = img[:, ::-1]
            x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
            x = x.mul_(1 / 127.5).sub_(1.0)                              # [C, H, W] in [-1, 1]
        else:
            f = int(flip)                                                # 1: flipped image's record
            x = torch.from_numpy(rec["mean"][f]).float()                # [c, h, w]
            if self.sample_posterior:
                noise = torch.randn(x.shape)
                x = x.add_(noise.mul_(torch.from_numpy(rec["std"][f])))  # mean + std * noise
            if self.shift:
                x = x.sub_(self.shift)
            x = x.mul_(self.scale)
        item: dict[str, Any] = {"x": x, "index": i, "key": self.keys[i]}
        if self.use_edges:
            item["edge"] = torch.from_numpy(edge_array(rec, flip, self.edge_dtype))
        if self.use_labels:
            item["label"] = torch.tensor(int(self._labels[i]), dtype=torch.long)
        return item

    def close(self) -> None:
        close_env(self.path)


def check_compatible(meta: dict[str, Any], data_cfg: Any, model_cfg: Any) -> None:
    """Raise :class:`DatasetMismatchError` naming both values and the keys when a cached
    dataset does not fit ``data_cfg`` (config.DataConfig) and ``model_cfg``
    (config.ModelConfig)."""
    where = f"dataset {meta.get('split', '?')!r} ({META_KEY})"
    xc, xh, xw = (int(v) for v in meta["x_shape"])

    def need(ok: bool, meta_key: str, meta_val: Any, cfg_key: str, cfg_val: Any,
             hint: str = "") -> None:
        if not ok:
            raise DatasetMismatchError(f"{where} has {meta_key}={meta_val!r} but the config has "
                                       f"{cfg_key}={cfg_val!r}{hint}")

    need(meta["codec"] == data_cfg.codec, "codec", meta["codec"], "data.codec", data_cfg.codec)
    need(int(meta["image_size"]) == data_cfg.image_size, "image_size", meta["image_size"],
         "data.image_size", data_cfg.image_size)
    need(xc == data_cfg.channels, "x channels", xc, "data.channels", data_cfg.channels)
    need(xc == model_cfg.in_channels, "x channels", xc, "model.in_channels",
         model_cfg.in_channels)
    need(xh == model_cfg.input_size and xw == model_cfg.input_size, "x size", f"{xh}x{xw}",
         "model.input_size", model_cfg.input_size)
    if data_cfg.use_edges:
        need(meta["edges"] != "none", "edges", meta["edges"], "data.use_edges", True)
        need(int(meta["edge_channels"]) == model_cfg.edge_channels, "edge_channels",
             meta["edge_channels"], "model.edge_channels", model_cfg.edge_channels)
        need(int(meta["edge_size"]) == model_cfg.edge_size, "edge_size", meta["edge_size"],
             "model.edge_size", model_cfg.edge_size)
    if data_cfg.use_labels:
        n = len(meta["class_names"])
        need(n == model_cfg.num_classes, "num classes", n, "model.num_classes",
             model_cfg.num_classes, f" (classes {meta['class_names']})")


SHAPE_KEYS = ("data.codec", "data.image_size", "data.channels", "model.in_channels",
              "model.input_size", "model.edge_channels", "model.edge_size", "model.num_classes")


def dataset_shape_keys(meta: dict[str, Any], data_cfg: Any) -> dict[str, Any]:
    """The config keys a cached dataset decides, with its values (``check_compatible`` is
    the check of the same keys)."""
    xc, xh, _ = (int(v) for v in meta["x_shape"])
    keys = {"data.codec": meta["codec"], "data.image_size": int(meta["image_size"]),
            "data.channels": xc, "model.in_channels": xc, "model.input_size": xh}
    if data_cfg.use_edges and meta.get("edges", "none") != "none":
        keys.update({"model.edge_channels": int(meta["edge_channels"]),
                     "model.edge_size": int(meta["edge_size"])})
    if data_cfg.use_labels and meta.get("class_names"):
        keys["model.num_classes"] = len(meta["class_names"])
    return keys


def fill_from_dataset(cfg: Any, meta: dict[str, Any]) -> list[str]:
    """Take each shape key the config file and overrides left out (``cfg.given``) from the
    dataset's metadata; the keys they give are left for ``check_compatible`` to check.
    Returns ``key=value`` for each key changed. A config with ``given`` None (not built from a
    file or dict) is left as it is."""
    if cfg.given is None:
        return []
    changed = []
    for key, value in dataset_shape_keys(meta, cfg.data).items():
        section, name = key.split(".")
        obj = getattr(cfg, section)
        if key not in cfg.given and getattr(obj, name) != value:
            setattr(obj, name, value)
            changed.append(f"{key}={value}")
    if changed:
        cfg.model.validate()
    return changed


def open_training_data(cfg: Any) -> tuple[LMDBDataset, LMDBDataset, list[str]]:
    """(train set, validation set, shape keys taken from the dataset) of a training config.
    The shape keys the config leaves out come from the training set's metadata
    (:func:`fill_from_dataset`), then both sets are checked against it before any step (a
    mismatch found at the first image step would cost every step until then). Raises
    FileNotFoundError (no dataset) or ValueError (one that does not fit), one line.

    Edges come as uint8: a quarter of the bytes through worker shared memory and
    host-to-device copies (the loader benchmark: 2x the samples/s of float32 edges); the
    step scales them on the device."""
    data_cfg, model_cfg = cfg.data, cfg.model

    def open_set(path: str) -> LMDBDataset:
        return LMDBDataset(path, flip=data_cfg.flip, use_edges=data_cfg.use_edges,
                           use_labels=data_cfg.use_labels, edge_dtype=torch.uint8)
    data = open_set(data_cfg.path)
    filled = fill_from_dataset(cfg, data.meta)
    check_compatible(data.meta, data_cfg, model_cfg)
    val_data = open_set(data_cfg.val_path or data_cfg.path)
    if data_cfg.val_path:
        try:
            check_compatible(val_data.meta, data_cfg, model_cfg)
        except ValueError as e:
            raise ValueError(f"data.val_path={data_cfg.val_path}: {e}") from None
    return data, val_data, filled
