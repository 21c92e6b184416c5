"""The on-disk format of a cached dataset: one LMDB environment per split.

Every value is a safetensors blob (a JSON header + raw little-endian arrays): reading a
dataset someone else wrote never unpickles anything, so it cannot run code. Only numpy,
safetensors and the standard library are imported here, so the format can be read without
torch, diffusers or OpenCV.

Keys (UTF-8, sorted bytewise = sorted as Python strings)
    ``<split>/<category>/<stem>``        one sample (Fashion-MNIST: ``<split>/<class>/<index:05d>``)
    ``__meta__``                         the metadata record (JSON, see below)
    ``__failed__/<sample key>``          a source that could not be cached (JSON: source, reason)

Sample record tensors
    ``label``       int32 [1]             class index into ``meta["class_names"]``
    ``image``       uint8 [H, W, C]       the real image (always for ``pixel``; optional for VAEs)
    ``mean``, ``std`` float16 [2, c, h, w]  VAE posterior of the image (0) and its flip (1),
                                          *unscaled*: the reader applies ``scaling_factor``
    ``edge``        uint8 [Ce, He, We]    multi-level edge map, 0..255
    ``edge_bits``   uint8 [Ce, He, ceil(We / 8)] binary edge map, ``np.packbits`` along width
    ``edge_shape``  int32 [3]             (Ce, He, We) of ``edge_bits``

Metadata record (JSON object under ``__meta__``)
    format, format_version, split, source (dict), codec ('pixel' | 'sd-vae'),
    image_size, channels (channels of the real image), x_shape ([C, H, W] of the reader's x),
    images_stored, vae, scaling_factor, shift_factor, latent_shape (VAE codecs only),
    edges ('none' | 'canny' | 'pidinet' | 'hed'), edge_settings (dict), edge_size,
    edge_channels, edge_levels, class_names, num_records, keys (sorted), labels (aligned with
    keys), num_failed, num_expected, complete, created_with (the cache command's settings).
"""
from __future__ import annotations

import json
from pathlib import Path
import re
from typing import Any, Callable, Optional

import lmdb

import numpy as np
from safetensors.numpy import save as st_save

FORMAT = "meanflow-lmdb"
FORMAT_VERSION = 1
META_KEY = "__meta__"
FAILED_PREFIX = "__failed__/"
RESERVED_PREFIX = "__"          # sample keys start with a split name, never with "__"
CODECS = ("pixel", "sd-vae")
DETECTORS = ("none", "canny", "pidinet", "hed")
BINARY_LEVELS = 2               # edge maps with 2 levels are stored as packed bits


class RecordError(ValueError):
    """A record or metadata blob is not in the expected format."""


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------
def _printable_utf8(name: str) -> str:
    """``name`` with every byte that is not valid UTF-8 written as ``%XX``.

    A file name that is not valid UTF-8 reaches Python with each bad byte as a lone surrogate
    (U+DC80..U+DCFF, os.fsdecode's surrogateescape), which no UTF-8 key can hold: the key's
    encode would raise outside the per-file error handling and lose the whole batch. The
    escape keeps the key the same on every run and different for different bytes."""
    if not any("\udc80" <= c <= "\udcff" for c in name):
        return name
    return "".join(f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else c for c in name)


def key_part(name: str) -> str:
    """A category or file name made safe for one key component: no '/', no whitespace runs,
    no leading '__' (reserved), bytes that are not UTF-8 as ``%XX``. 'T-shirt/top' ->
    'T-shirt_top', 'Ankle boot' -> 'Ankle_boot', b'caf\\xe9' -> 'caf%E9'."""
    part = re.sub(r"[/\\\s]+", "_", _printable_utf8(name).strip())
    if not part:
        raise RecordError(f"empty key component from {name!r}")
    if part.startswith(RESERVED_PREFIX):
        part = "_" + part.lstrip("_")
    return part


def sample_key(split: str, category: str, stem: str) -> str:
    return f"{key_part(split)}/{key_part(category)}/{key_part(stem)}"


def key_category(key: str) -> str:
    """The category component of a sample key."""
    parts = key.split("/", 2)
    if len(parts) != 3:
        raise RecordError(f"malformed sample key {key!r}: expected <split>/<category>/<stem>")
    return parts[1]


# --------------------------------------------------------------------------------------------
# Edge maps
# --------------------------------------------------------------------------------------------
def pack_edge(edge: np.ndarray, levels: int) -> dict[str, np.ndarray]:
    """uint8 [Ce, He, We] edge map (0..255) -> record tensors; binary maps as packed bits."""
    if edge.dtype != np.uint8 or edge.ndim != 3:
        raise RecordError(f"edge map must be uint8 [Ce, He, We], got {edge.dtype} "
                          f"{list(edge.shape)}")
    if levels == BINARY_LEVELS:
        bits = np.packbits(edge >= 128, axis=-1)
        return {"edge_bits": bits, "edge_shape": np.asarray(edge.shape, np.int32)}
    return {"edge": np.ascontiguousarray(edge)}


def unpack_edge(rec: dict[str, np.ndarray]) -> Optional[np.ndarray]:
    """Record tensors -> float32 [Ce, He, We] edge map in [0, 1] (None if the record has none)."""
    if "edge_bits" in rec:
        ce, he, we = (int(v) for v in rec["edge_shape"])
        bits = np.unpackbits(rec["edge_bits"], axis=-1, count=we)
        if bits.shape != (ce, he, we):
            raise RecordError(f"edge_bits unpack to {list(bits.shape)}, edge_shape says "
                              f"{[ce, he, we]}")
        return bits.astype(np.float32)
    if "edge" in rec:
        return rec["edge"].astype(np.float32) * (1.0 / 255.0)
    return None


# --------------------------------------------------------------------------------------------
# Sample records
# --------------------------------------------------------------------------------------------
def encode_record(label: int, *, image: Optional[np.ndarray] = None,
                  mean: Optional[np.ndarray] = None, std: Optional[np.ndarray] = None,
                  edge: Optional[np.ndarray] = None, edge_levels: int = BINARY_LEVELS) -> bytes:
    """One sample -> safetensors bytes. ``image`` uint8 HWC; ``mean``/``std`` [2, c, h, w]
    (unflipped, flipped); ``edge`` uint8 [Ce, He, We] already quantised to ``edge_levels``."""
    t: dict[str, np.ndarray] = {"label": np.asarray([label], np.int32)}
    if image is not None:
        if image.dtype != np.uint8 or image.ndim != 3:
            raise RecordError(f"image must be uint8 [H, W, C], got {image.dtype} "
                              f"{list(image.shape)}")
        t["image"] = np.ascontiguousarray(image)
    if (mean is None) != (std is None):
        raise RecordError("mean and std go together")
    if mean is not None:
        if mean.shape != std.shape or mean.ndim != 4 or mean.shape[0] != 2:
            raise RecordError(f"mean/std must both be [2, c, h, w], got {list(mean.shape)} and "
                              f"{list(std.shape)}")
        t["mean"] = np.ascontiguousarray(mean, dtype=np.float16)
        t["std"] = np.ascontiguousarray(std, dtype=np.float16)
    if edge is not None:
        t.update(pack_edge(edge, edge_levels))
    return st_save(t)


# Records of one dataset share a handful of header layouts, so the JSON header is parsed once
# per layout and the arrays are then numpy views of the value: ~3 us per record instead of
# safetensors.numpy.load's ~11 us, a fifth of a training item's cost (measured). Blobs are
# still written by safetensors and any header not seen before is parsed and validated.
_ST_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.dtype("<u2"),
              "I16": np.dtype("<i2"), "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
              "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F16": np.dtype("<f2"),
              "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_HEADER_LEN_BYTES = 8
_MAX_LAYOUTS = 64
_layouts: dict[bytes, tuple[list[tuple[str, np.dtype, tuple, int, int]], int]] = {}


def _parse_layout(header: bytes, key: str) -> tuple[list, int]:
    try:
        spec = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"record {key!r}: safetensors header is not JSON: {e}") from None
    if not isinstance(spec, dict):
        raise RecordError(f"record {key!r}: safetensors header is not an object")
    out, end_max = [], 0
    for name, t in spec.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_ST_DTYPES[t["dtype"]])
            shape = tuple(int(d) for d in t["shape"])
            start, end = (int(v) for v in t["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise RecordError(f"record {key!r}: bad tensor entry {name!r}: {t!r}") from None
        if start < 0 or end < start or (end - start) != int(np.prod(shape)) * dtype.itemsize:
            raise RecordError(f"record {key!r}: tensor {name!r} offsets {start}..{end} do not "
                              f"match shape {list(shape)} x {dtype}")
        out.append((name, dtype, shape, start, end))
        end_max = max(end_max, end)
    return out, end_max


def decode_record(buf: bytes, key: str = "?") -> dict[str, np.ndarray]:
    """safetensors bytes -> dict of (writable) numpy arrays; nothing in the bytes can run code."""
    if len(buf) < _HEADER_LEN_BYTES:
        raise RecordError(f"record {key!r} is not a valid safetensors blob: {len(buf)} bytes")
    n = int.from_bytes(buf[:_HEADER_LEN_BYTES], "little")
    base = _HEADER_LEN_BYTES + n
    if base > len(buf):
        raise RecordError(f"record {key!r} is not a valid safetensors blob: header length {n} "
                          f"exceeds the {len(buf)}-byte value")
    header = bytes(buf[_HEADER_LEN_BYTES:base])
    layout = _layouts.get(header)
    if layout is None:
        layout = _parse_layout(header, key)
        if len(_layouts) < _MAX_LAYOUTS:
            _layouts[header] = layout
    tensors, data_len = layout
    if len(buf) - base < data_len:
        raise RecordError(f"record {key!r} is truncated: {len(buf) - base} data bytes, header "
                          f"needs {data_len}")
    data = bytearray(buf[base:base + data_len])      # one copy: arrays are writable views
    return {name: np.frombuffer(data, dtype, count=(end - start) // dtype.itemsize,
                                offset=start).reshape(shape)
            for name, dtype, shape, start, end in tensors}


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------
def encode_meta(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=False, separators=(",", ":")).encode()


def decode_meta(buf: Optional[bytes], where: str = "dataset") -> dict[str, Any]:
    """Parse and sanity-check the metadata record; errors name ``where`` and the bad key."""
    if buf is None:
        raise RecordError(f"{where}: no {META_KEY} record. The cache run did not finish (or this "
                          f"is not a preprocess/cache.py dataset): run preprocess/cache.py again "
                          f"with the same arguments to complete it")
    try:
        meta = json.loads(bytes(buf).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{where}: {META_KEY} is not valid JSON: {e}") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        raise RecordError(f"{where}: {META_KEY} has format {fmt!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise RecordError(f"{where}: format_version {version!r} is not supported (this code reads "
                          f"version {FORMAT_VERSION}); re-run preprocess/cache.py")
    for k in ("codec", "image_size", "x_shape", "edges", "keys", "labels", "class_names"):
        if k not in meta:
            raise RecordError(f"{where}: {META_KEY} lacks the key {k!r}")
    if len(meta["keys"]) != len(meta["labels"]):
        raise RecordError(f"{where}: {META_KEY} has {len(meta['keys'])} keys but "
                          f"{len(meta['labels'])} labels")
    return meta


# --------------------------------------------------------------------------------------------
# Writing: what preprocess/cache.py and the benchmarks use to fill a cache
# --------------------------------------------------------------------------------------------
def open_writer(path: Path, map_size: int) -> lmdb.Environment:
    # metasync=False: a system crash may undo the last transaction but never corrupts the
    # database; a killed process loses nothing that was committed.
    return lmdb.open(str(path), map_size=map_size, subdir=True, readahead=False,
                     metasync=False, meminit=False, max_readers=256)


def _grow(env: lmdb.Environment) -> None:
    env.set_mapsize(env.info()["map_size"] * 2)


def write_txn(env: lmdb.Environment, fn: Callable[[lmdb.Transaction], Any]) -> Any:
    """Run ``fn`` in one write transaction; on a full map, double it and run again (the
    aborted transaction left nothing behind)."""
    while True:
        try:
            with env.begin(write=True) as txn:
                return fn(txn)
        except lmdb.MapFullError:
            _grow(env)
        except lmdb.MapResizedError:        # another process grew the map: adopt its size
            env.set_mapsize(0)


def commit_batch(env: lmdb.Environment, good: list[tuple[str, Callable[[], bytes]]],
                 bad: list[tuple[str, dict]]) -> tuple[int, int]:
    """Write one batch in one transaction: samples (skipping keys another process wrote in the
    meantime) and failure notes. Returns (written, already present)."""
    def fn(txn):
        written = present = 0
        for key, build in good:
            kb = key.encode()
            if txn.get(kb) is not None:
                present += 1
                continue
            value = build()
            # Appending fills leaf pages (a plain put into sorted keys leaves each page with
            # one ~1.5 kB record, measured: 2x the file size); a key that sorts before the
            # last one (another rank's shard, a rerun) cannot append and goes in normally.
            if not txn.put(kb, value, append=True):
                txn.put(kb, value)
            txn.delete((FAILED_PREFIX + key).encode())     # it failed in an earlier run
            written += 1
        for key, info in bad:
            txn.put((FAILED_PREFIX + key).encode(), json.dumps(info).encode())
        return written, present
    return write_txn(env, fn)
