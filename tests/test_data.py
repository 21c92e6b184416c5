"""The data pipeline: preprocess/cache.py (CLI, run as a subprocess on tiny inputs the tests
write), the record format, and meanflow/data.py's reader.

Covered: every PIL mode the image pipeline converts; broken inputs skipped and reported;
Fashion-MNIST IDX (gzipped and raw); record round trips; reader shapes, ranges, flip
consistency between x and edge, posterior sampling, determinism, DataLoader workers and
DistributedSampler; resume after a process dies inside a write transaction; 2-process
sharded runs (torchrun and bare RANK/WORLD_SIZE); a tiny saved AutoencoderKL loaded through
the CLI's from_pretrained path; PiDiNet / HED wiring with random weights; metadata mismatch
errors; bad invocations failing before any work; --inspect.
"""
from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from meanflow.config import Config, DataConfig, ModelConfig
from meanflow.data import (DatasetMismatchError, LMDBDataset, check_compatible, edge_array,
                           read_meta)
from meanflow import records
from meanflow.edges import CannyEdges, close_gaps, quantize
from meanflow.images import center_crop_arr, to_rgb
from preprocess.sources import read_idx

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CACHE = "preprocess/cache.py"
SIZE = 16                                       # image size of the tiny caches


def run(args: list[str], **extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def cache(*args: str, **extra) -> subprocess.CompletedProcess:
    return run([PY, CACHE, *args], **extra)


def sample_keys(path: Path) -> list[str]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return [k.decode() for k in txn.cursor().iternext(values=False)
                    if not k.startswith(b"__")]
    finally:
        env.close()


def all_records(path: Path) -> dict[str, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {k.decode(): bytes(v) for k, v in txn.cursor() if not k.startswith(b"__")}
    finally:
        env.close()


# --------------------------------------------------------------------------------------------
# Inputs written by the tests
# --------------------------------------------------------------------------------------------
def write_idx_files(folder: Path, n_train: int = 40, n_test: int = 12) -> dict[str, np.ndarray]:
    """Fashion-MNIST-format files: train gzipped, test raw. Each image is a diagonal bar, so
    that a horizontal flip always changes it."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    labels_out = {}
    for prefix, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        imgs = np.zeros((n, 28, 28), np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for i in range(n):
            off = int(rng.integers(0, 6))
            for r in range(4, 24):
                imgs[i, r, r + off - 2: r + off + 3] = 100 + 15 * labels[i]
        blobs = {"images-idx3-ubyte": struct.pack(">IIII", 0x803, n, 28, 28) + imgs.tobytes(),
                 "labels-idx1-ubyte": struct.pack(">II", 0x801, n) + labels.tobytes()}
        for name, blob in blobs.items():
            path = folder / f"{prefix}-{name}"
            if gz:
                with gzip.open(str(path) + ".gz", "wb") as f:
                    f.write(blob)
            else:
                path.write_bytes(blob)
        labels_out[prefix] = labels
    return labels_out


GOOD = {  # file -> expected uint8 RGB colour of the (uniform) image after the pipeline
    "train/cat/rgb.jpg": None,                 # lossy: colour not checked exactly
    "train/cat/rgba.png": (255, 255, 255),     # fully transparent -> composited on white
    "train/cat/palette.png": (10, 200, 30),
    "train/cat/gray16.png": (156, 156, 156),   # 40000 / 257 = 155.6
    "train/cat/cmyk.tif": (255, 0, 255),       # C=0 M=255 Y=0 K=0
    "train/cat/dup.png": (50, 60, 70),         # same stem as dup.jpg: keys keep the extension
    "train/cat/dup.jpg": None,
    "train/dog/gray.png": (77, 77, 77),
    "train/dog/la.png": (255, 255, 255),       # greyscale + alpha 0
    "train/dog/bilevel.png": (255, 255, 255),
    "train/dog/wide.png": None,                # 48x24 gradient: centre-cropped
    "test/cat/t0.png": (1, 2, 3),
    "test/cat/t1.png": (200, 100, 0),
}
BROKEN = {  # file -> text expected in the reason
    "train/cat/zero.png": "cannot identify",
    "train/cat/truncated.png": "truncated",
    "train/dog/notes.jpg": "cannot identify",
    "train/dog/tiny.png": "smaller than half",
    "train/dog/bomb.png": "DecompressionBomb",       # above --max-pixels: PIL's warning
    "train/dog/bomb2.png": "DecompressionBomb",      # above 2x --max-pixels: PIL's error
}
MAX_PIXELS = 5000


def write_folder(root: Path) -> Path:
    for rel in list(GOOD) + list(BROKEN):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
    w, h = 32, 24
    Image.new("RGB", (w, h), (120, 30, 200)).save(root / "train/cat/rgb.jpg")
    Image.new("RGBA", (w, h), (0, 0, 0, 0)).save(root / "train/cat/rgba.png")
    pal = Image.new("P", (w, h), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 200, 30] + [0, 0, 0] * 252)
    pal.save(root / "train/cat/palette.png")
    Image.new("I;16", (w, h), 40000).save(root / "train/cat/gray16.png")
    Image.new("CMYK", (w, h), (0, 255, 0, 0)).save(root / "train/cat/cmyk.tif")
    Image.new("RGB", (w, h), (50, 60, 70)).save(root / "train/cat/dup.png")
    Image.new("RGB", (w, h), (50, 60, 70)).save(root / "train/cat/dup.jpg")
    Image.new("L", (w, h), 77).save(root / "train/dog/gray.png")
    Image.new("LA", (w, h), (0, 0)).save(root / "train/dog/la.png")
    Image.new("1", (w, h), 1).save(root / "train/dog/bilevel.png")
    grad = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (24, 1))
    Image.fromarray(np.stack([grad] * 3, -1)).save(root / "train/dog/wide.png")
    Image.new("RGB", (w, h), (1, 2, 3)).save(root / "test/cat/t0.png")
    Image.new("RGB", (w, h), (200, 100, 0)).save(root / "test/cat/t1.png")
    # broken inputs
    (root / "train/cat/zero.png").write_bytes(b"")
    full = root / "train/cat/full.tmp.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(full)
    (root / "train/cat/truncated.png").write_bytes(full.read_bytes()[:3000])
    full.unlink()
    (root / "train/dog/notes.jpg").write_text("not an image")
    Image.new("RGB", (5, 5)).save(root / "train/dog/tiny.png")
    Image.new("L", (80, 80)).save(root / "train/dog/bomb.png")       # 6400 > 5000
    Image.new("L", (120, 120)).save(root / "train/dog/bomb2.png")    # 14400 > 2 * 5000
    (root / "train/dog/.DS_Store").write_bytes(b"\0\1")               # hidden: ignored
    return root


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("idx")
    return d, write_idx_files(d)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory, idx_dir) -> Path:
    out = tmp_path_factory.mktemp("fashion") / "data"
    res = cache("--source", "fashion-mnist", "--fashion-root", str(idx_dir[0]), "--output",
                str(out), "--image-size", str(SIZE), "--codec", "pixel", "--edges", "canny")
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, folder) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("folder") / "data"
    res = cache("--input", str(folder), "--output", str(out), "--image-size", str(SIZE),
                "--codec", "pixel", "--edges", "canny", "--max-pixels", str(MAX_PIXELS),
                "--map-size", "65536", "--batch-size", "4", "--workers", "2")
    assert res.returncode == 0, res.stderr
    return out, res


# --------------------------------------------------------------------------------------------
# Record format and image pipeline (in process)
# --------------------------------------------------------------------------------------------
def test_record_round_trip_binary_and_multilevel_edges():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 8, 3), np.uint8)
    mean = rng.standard_normal((2, 4, 2, 2)).astype(np.float16)
    std = np.abs(rng.standard_normal((2, 4, 2, 2))).astype(np.float16)
    binary = (rng.random((1, 8, 13)) > 0.5).astype(np.uint8) * 255       # width not a multiple of 8
    rec = records.decode_record(records.encode_record(3, image=img, mean=mean, std=std,
                                                      edge=binary))
    assert set(rec) == {"label", "image", "mean", "std", "edge_bits", "edge_shape"}
    assert rec["label"].tolist() == [3] and np.array_equal(rec["image"], img)
    assert np.array_equal(rec["mean"], mean) and np.array_equal(rec["std"], std)
    assert rec["edge_bits"].nbytes == 8 * 2                                # 13 bits -> 2 bytes
    assert np.array_equal(records.unpack_edge(rec), binary.astype(np.float32) / 255)
    for width in (13, 16):                       # flipped while unpacking; padding bits
        e = (rng.random((2, 3, width)) > 0.5).astype(np.uint8) * 255
        r = records.decode_record(records.encode_record(0, edge=e))
        for flip in (False, True):
            want = e[..., ::-1] if flip else e
            assert np.array_equal(edge_array(r, flip, torch.float32), want / 255.0)
            assert np.array_equal(edge_array(r, flip, torch.uint8), want)
    multi = quantize(rng.integers(0, 256, (1, 5, 7), np.uint8), 8)
    rec = records.decode_record(records.encode_record(0, edge=multi, edge_levels=8))
    assert rec["edge"].dtype == np.uint8 and np.array_equal(rec["edge"], multi)
    assert np.allclose(records.unpack_edge(rec), multi / 255.0)
    assert np.allclose(edge_array(rec, True, torch.float32), multi[..., ::-1] / 255.0)
    assert np.array_equal(edge_array(rec, True, torch.uint8), multi[..., ::-1])
    assert set(np.unique(multi)) <= {round(k * 255 / 7) for k in range(8)}
    good = records.encode_record(1, image=img)
    for bad, why in [(b"\x05\x00\x00\x00\x00\x00\x00\x00garbage", "header is not JSON"),
                     (b"\x01", "not a valid safetensors"),
                     (b"\xff" * 8 + b"{}", "exceeds"),
                     (good[:-5], "truncated")]:
        with pytest.raises(records.RecordError, match=f"record 'train/x/y'.*{why}"):
            records.decode_record(bad, "train/x/y")
    with pytest.raises(records.RecordError, match="image must be uint8"):
        records.encode_record(0, image=img.astype(np.float32))
    with pytest.raises(records.RecordError, match="mean/std must both be"):
        records.encode_record(0, mean=mean[0], std=std[0])
    assert records.key_part("T-shirt/top") == "T-shirt_top"
    assert records.key_part("Ankle boot") == "Ankle_boot"
    assert records.key_part("__meta__") == "_meta__"                            # never reserved


def test_meta_errors_name_the_problem():
    with pytest.raises(records.RecordError, match="no __meta__ record"):
        records.decode_meta(None, "dataset x")
    with pytest.raises(records.RecordError, match="not valid JSON"):
        records.decode_meta(b"{", "dataset x")
    with pytest.raises(records.RecordError, match="format_version 99"):
        records.decode_meta(json.dumps({"format": records.FORMAT, "format_version": 99}).encode())


def test_image_pipeline_modes_and_adm_crop():
    assert to_rgb(Image.new("I;16", (4, 4), 65535)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("I", (4, 4), 257 * 10)).getpixel((0, 0)) == (10, 10, 10)
    assert to_rgb(Image.new("F", (4, 4), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    half = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (255, 127, 127)               # over white
    # ADM crop: box-halve 100x60 -> 50x30 (>= 2 * 12), then bicubic to 20x12, centre square
    arr = np.zeros((60, 100, 3), np.uint8)
    arr[:, 40:60] = 255                                                    # a centred band
    out = center_crop_arr(Image.fromarray(arr), 12)
    assert out.shape == (12, 12, 3) and out.dtype == np.uint8
    assert out[:, 6].min() > 200 and out[:, 0].max() < 30                 # band stays centred


def test_edge_postprocessing():
    blob = np.zeros((9, 9), np.uint8)
    blob[2:7, 2:7] = 255
    blob[4, 4] = 0                                                         # a one-pixel hole
    assert close_gaps(blob, 3)[4, 4] == 255 and close_gaps(blob, 0)[4, 4] == 0
    assert np.array_equal(close_gaps(blob, 3)[blob == 255], blob[blob == 255])
    assert set(np.unique(quantize(np.arange(256, dtype=np.uint8), 2))) == {0, 255}
    det = CannyEdges(16)
    img = np.zeros((16, 16, 3), np.uint8)
    img[:, 8:] = 255
    e = det(img)
    assert e.shape == (1, 16, 16) and set(np.unique(e)) == {0, 255}
    assert e[0, :, 7:9].any() and not e[0, :, :5].any()                  # edge at the step only
    assert det.settings()["blur"] is False                                 # 16 px: no pre-blur
    assert CannyEdges(256).settings()["blur"] is True
    with pytest.raises(ValueError, match="expects \\[16, 16, C\\]"):
        det(np.zeros((8, 8, 3), np.uint8))


# --------------------------------------------------------------------------------------------
# Image folder: modes, broken files, report, rerun
# --------------------------------------------------------------------------------------------
def test_folder_cache_converts_modes_and_reports_broken_files(folder_run):
    out, res = folder_run
    assert "train: 11 records" in res.stdout and "failed 6" in res.stdout
    assert "test: 2 records" in res.stdout
    report = json.loads((out / "train" / "report.json").read_text())
    reasons = {f["source"].split("/raw")[-1].split("/", 1)[1]: f["reason"]
               for f in report["failed"]}
    assert sorted(reasons) == sorted(BROKEN)
    for rel, text in BROKEN.items():
        assert text in reasons[rel], (rel, reasons[rel])
    assert report["complete"] and report["num_records"] == 11
    ds = LMDBDataset(out / "train", flip=False)
    assert ds.class_names == ["cat", "dog"]
    assert ds.keys == sorted(ds.keys) and len(set(ds.keys)) == len(ds.keys) == 11
    assert "train/cat/dup.png" in ds.keys and "train/cat/dup.jpg" in ds.keys
    for rel, colour in GOOD.items():
        if not rel.startswith("train/"):
            continue
        split, cat, name = rel.split("/")
        key = f"{split}/{cat}/{name if name.startswith('dup') else Path(name).stem}"
        i = ds.keys.index(key)
        assert ds.label(i) == ds.class_names.index(cat)
        img = ds.image(i)
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
        if colour is not None:
            assert np.abs(img.astype(int) - colour).max() <= 1, (rel, img[0, 0])
    wide = ds.image(ds.keys.index("train/dog/wide"))
    assert 100 < wide[0, SIZE // 2, 0] < 160 and wide[0, 0, 0] < wide[0, -1, 0]   # centre crop
    test = LMDBDataset(out / "test", flip=False)
    assert test.class_names == ["cat", "dog"] and [test.label(i) for i in range(2)] == [0, 0]
    assert (out / "train" / "data.mdb").stat().st_size > 65536             # the map grew
    ds.close()
    test.close()


def test_rerun_skips_present_and_retries_failed(folder_run, folder):
    out, _ = folder_run
    before = all_records(out / "train")
    res = cache("--input", str(folder), "--output", str(out), "--image-size", str(SIZE),
                "--codec", "pixel", "--edges", "canny", "--max-pixels", str(MAX_PIXELS))
    assert res.returncode == 0, res.stderr
    assert "written 0, already present 11, failed 6" in res.stdout
    assert all_records(out / "train") == before


def test_reader_items_shapes_ranges_and_flip_consistency(fashion):
    ds = LMDBDataset(fashion / "train", flip=True)
    plain = LMDBDataset(fashion / "train", flip=False)
    assert len(ds) == 40 and ds.meta["num_records"] == 40 and ds.meta["complete"]
    seen = set()
    for i in range(4):
        ref = plain[i]
        assert not torch.equal(ref["x"], ref["x"].flip(-1))                  # asymmetric image
        for seed in range(6):
            torch.manual_seed(seed)
            a = ds[i]
            torch.manual_seed(seed)
            b = ds[i]
            assert torch.equal(a["x"], b["x"]) and torch.equal(a["edge"], b["edge"])
            assert a["x"].shape == (1, SIZE, SIZE) and a["x"].dtype == torch.float32
            assert a["edge"].shape == (1, SIZE, SIZE) and a["edge"].dtype == torch.float32
            assert -1 <= a["x"].min() and a["x"].max() <= 1
            assert set(a["edge"].unique().tolist()) <= {0.0, 1.0}
            assert a["label"].dtype == torch.long and a["label"].ndim == 0
            assert a["index"] == i and a["key"] == ds.keys[i]
            flipped = torch.equal(a["x"], ref["x"].flip(-1))
            assert flipped or torch.equal(a["x"], ref["x"])
            assert torch.equal(a["edge"], ref["edge"].flip(-1) if flipped else ref["edge"])
            seen.add(flipped)
    assert seen == {True, False}
    as_u8 = LMDBDataset(fashion / "train", flip=True, edge_dtype=torch.uint8)
    for seed in range(4):                        # same draws, a quarter of the bytes
        torch.manual_seed(seed)
        a = ds[1]
        torch.manual_seed(seed)
        b = as_u8[1]
        assert b["edge"].dtype == torch.uint8 and torch.equal(b["edge"].float() / 255, a["edge"])
        assert torch.equal(a["x"], b["x"])
    np.testing.assert_array_equal(plain.edge_map(0), plain[0]["edge"].numpy())
    assert np.allclose((plain[0]["x"].numpy()[0] + 1) * 127.5, plain.image(0)[..., 0], atol=1e-4)
    no_lab = LMDBDataset(fashion / "train", use_edges=False, use_labels=False)
    assert set(no_lab[0]) == {"x", "index", "key"}
    ds.close()


def test_fashion_idx_keys_labels_and_channels(fashion, idx_dir, tmp_path):
    _, labels = idx_dir
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = LMDBDataset(fashion / split, flip=False)
        assert ds.class_names[0] == "T-shirt/top" and len(ds.class_names) == 10
        assert ds.meta["x_shape"] == [1, SIZE, SIZE] and ds.meta["channels"] == 1
        for i, key in enumerate(ds.keys):
            s, cat, idx = key.split("/")
            assert s == split and len(idx) == 5
            assert ds.label(i) == labels[prefix][int(idx)]
            assert records.key_part(ds.class_names[ds.label(i)]) == cat
        ds.close()
    assert np.array_equal(read_idx(idx_dir[0] / "t10k-labels-idx1-ubyte"), labels["t10k"])
    res = cache("--source", "fashion-mnist", "--fashion-root", str(idx_dir[0]), "--output",
                str(tmp_path / "rgb"), "--image-size", str(SIZE), "--channels", "3",
                "--limit", "5", "--splits", "test", "--edges", "none")
    assert res.returncode == 0, res.stderr
    ds = LMDBDataset(tmp_path / "rgb" / "test", flip=False, use_edges=False)
    img = ds.image(0)
    assert len(ds) == 5 and img.shape == (SIZE, SIZE, 3)
    assert np.array_equal(img[..., 0], img[..., 2])                        # replicated grey
    assert ds.meta["edges"] == "none" and ds.meta["source"]["limit"] == 5
    with pytest.raises(ValueError, match="no edge maps"):
        LMDBDataset(tmp_path / "rgb" / "test")
    ds.close()


def test_reader_survives_a_writer_growing_the_map(fashion, tmp_path):
    """A process that opens a cached split for writing with a larger map (a second cache.py
    run, say) must not crash readers already open on it (a training run's DataLoader workers
    died of MDB_MAP_RESIZED): the reader adopts the new size and reads on."""
    import shutil
    split = tmp_path / "train"
    shutil.copytree(fashion / "train", split)
    ds = LMDBDataset(str(split))
    first = ds.record(0)
    from meanflow.data import get_env
    mapped = get_env(str(split)).info()["map_size"]
    # the writer's pages land beyond what this reader has mapped
    grow = ("import lmdb, sys; env = lmdb.open(sys.argv[1], map_size=1 << 30, subdir=True); "
            "txn = env.begin(write=True); txn.put(b'__probe__', bytes(int(sys.argv[2]))); "
            "txn.commit()")
    res = subprocess.run([sys.executable, "-c", grow, str(split), str(mapped + (1 << 20))],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    again = ds.record(0)
    assert set(again) == set(first) and all(np.array_equal(first[k], again[k]) for k in first)
    assert get_env(str(split)).info()["map_size"] > mapped
    assert ds.record(len(ds) - 1)


def test_dataloader_workers_and_distributed_sampler(fashion):
    ds = LMDBDataset(fashion / "train")
    _ = ds[0]                    # the parent has the environment open before workers fork
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank,
                                                      shuffle=False)
        loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler, num_workers=2)
        for batch in loader:
            assert batch["x"].shape[1:] == (1, SIZE, SIZE)
            assert batch["edge"].shape[1:] == (1, SIZE, SIZE)
            seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(ds)))
    ds.close()


# --------------------------------------------------------------------------------------------
# Resume, multi-process
# --------------------------------------------------------------------------------------------
DIE_IN_SECOND_TXN = """
import os, sys
sys.path.insert(0, {root!r})
from preprocess import cache as cache_script
real, calls = cache_script.encode_record, [0]
def dying(*a, **k):
    calls[0] += 1
    if calls[0] == 11:          # third record of the second batch: inside its transaction
        os._exit(9)
    return real(*a, **k)
cache_script.encode_record = dying
sys.exit(cache_script.main(sys.argv[1:]))
"""


def test_killed_run_resumes_without_duplicates(tmp_path, idx_dir):
    out = tmp_path / "data"
    args = ["--source", "fashion-mnist", "--fashion-root", str(idx_dir[0]), "--output",
            str(out), "--image-size", str(SIZE), "--splits", "train", "--batch-size", "8"]
    died = run([PY, "-c", DIE_IN_SECOND_TXN.format(root=str(ROOT)), *args])
    assert died.returncode == 9, died.stderr
    assert len(sample_keys(out / "train")) == 8                            # first batch only
    with pytest.raises(ValueError, match="no __meta__"):
        read_meta(out / "train")
    res = cache(*args)
    assert res.returncode == 0, res.stderr
    assert "written 32, already present 8, failed 0" in res.stdout
    # simulate a kill between transactions of a later run: records and metadata gone
    env = lmdb.open(str(out / "train"))
    with env.begin(write=True) as txn:
        gone = [k for k in txn.cursor().iternext(values=False) if not k.startswith(b"__")][5:9]
        for k in gone + [records.META_KEY.encode()]:
            assert txn.delete(k)
    env.close()
    res = cache(*args)
    assert "written 4, already present 36, failed 0" in res.stdout
    # once complete, a rerun only looks (read-only): nothing is written, the map stays
    db = out / "train" / "data.mdb"
    before = (db.stat().st_mtime_ns, db.stat().st_size)
    res = cache(*args)
    assert res.returncode == 0, res.stderr
    assert "train: 40 records in" in res.stdout and "complete, nothing to do" in res.stdout
    assert (db.stat().st_mtime_ns, db.stat().st_size) == before
    # ... but other settings are still refused, naming the setting
    res = cache(*args[:-2], "--batch-size", "8", "--edges", "none")
    assert res.returncode == 2 and "other settings" in res.stderr, res.stderr
    ds = LMDBDataset(out / "train", flip=False)
    assert len(ds) == 40 and len(set(ds.keys)) == 40
    assert ds.keys == sorted(sample_keys(out / "train"))
    for i in range(len(ds)):
        assert ds.record(i)["image"].shape == (SIZE, SIZE, 1)                # no torn record
    ds.close()


def test_two_processes_shard_and_match_one(tmp_path, idx_dir, fashion):
    args = ["--source", "fashion-mnist", "--fashion-root", str(idx_dir[0]),
            "--image-size", str(SIZE), "--codec", "pixel", "--edges", "canny"]
    # --standalone: a free rendezvous port (--master_port 0 hands the workers port 0)
    res = run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               CACHE, *args, "--output", str(tmp_path / "tr")])
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("train: 40 records") == 1                      # one summary
    assert "written 40, already present 0, failed 0" in res.stdout
    # bare RANK / WORLD_SIZE processes (no rendezvous): both run at once on one environment
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    procs = [subprocess.Popen([PY, CACHE, *args, "--output", str(tmp_path / "bare")], cwd=ROOT,
                              env=dict(base, RANK=str(r), WORLD_SIZE="2",
                                       OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for rank, (stdout, _) in enumerate(outs):                              # half of each split
        assert f"[rank {rank}/2] train:" in stdout and "written 20," in stdout
        assert f"[rank {rank}/2] test:" in stdout and "written 6," in stdout
    for name in ("tr", "bare"):
        for split in ("train", "test"):
            meta = read_meta(tmp_path / name / split)
            assert meta["complete"]
            assert all_records(tmp_path / name / split) == all_records(fashion / split)


# --------------------------------------------------------------------------------------------
# VAE codec through a tiny saved AutoencoderKL
# --------------------------------------------------------------------------------------------
TINY_SCALE = 0.37                 # not SD's 0.18215: the reader must take it from the config


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, norm_num_groups=4, sample_size=SIZE,
                        scaling_factor=TINY_SCALE).eval()
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(folder)
    return folder, vae


def test_sd_vae_codec_stores_both_flips_and_reader_scales(tmp_path, folder, tiny_vae):
    vae_dir, vae = tiny_vae
    out = tmp_path / "lat"
    res = cache("--input", str(folder), "--output", str(out), "--image-size", str(SIZE),
                "--codec", "sd-vae", "--vae", str(vae_dir), "--edges", "canny",
                "--max-pixels", str(MAX_PIXELS), "--batch-size", "3", "--splits", "train")
    assert res.returncode == 0, res.stderr
    assert "train: 11 records" in res.stdout and "failed 6" in res.stdout
    ds = LMDBDataset(out / "train", flip=False, sample_posterior=False)
    m = ds.meta
    assert m["codec"] == "sd-vae" and m["scaling_factor"] == TINY_SCALE
    assert m["latent_shape"] == m["x_shape"] == [4, SIZE // 2, SIZE // 2]
    assert m["vae"] == str(vae_dir) and m["images_stored"] is False      # train under auto
    with pytest.raises(KeyError, match="--store-images"):
        ds.image(0)
    rec = ds.record(0)
    assert rec["mean"].shape == rec["std"].shape == (2, 4, SIZE // 2, SIZE // 2)
    assert rec["mean"].dtype == np.float16 and (rec["std"] > 0).all()
    assert torch.equal(ds[0]["x"], torch.from_numpy(rec["mean"][0]).float() * TINY_SCALE)
    # record 1 is the posterior of the mirrored image, not a mirrored latent
    wide = ds.keys.index("train/dog/wide")
    res = cache("--input", str(folder), "--output", str(tmp_path / "px"), "--image-size",
                str(SIZE), "--codec", "pixel", "--edges", "none", "--splits", "train",
                "--max-pixels", str(MAX_PIXELS))
    img = LMDBDataset(tmp_path / "px" / "train", use_edges=False).image(wide)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        post = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    got = ds.record(wide)
    np.testing.assert_allclose(got["mean"].astype(np.float32), post.mean.numpy(), atol=2e-3,
                               rtol=2e-3)
    np.testing.assert_allclose(got["std"].astype(np.float32), post.std.numpy(), rtol=2e-3)
    assert not np.allclose(got["mean"][1], got["mean"][0][..., ::-1], atol=1e-2)
    # posterior sampling: x = (mean + std * noise) * scale with noise from torch's RNG
    sampling = LMDBDataset(out / "train", flip=False)
    torch.manual_seed(3)
    x = sampling[wide]["x"]
    torch.manual_seed(3)
    noise = torch.randn(4, SIZE // 2, SIZE // 2)
    mean, std = (torch.from_numpy(got[k][0]).float() for k in ("mean", "std"))
    assert torch.allclose(x, (mean + std * noise) * TINY_SCALE, atol=1e-6)
    flipping = LMDBDataset(out / "train", flip=True, sample_posterior=False)
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        item = flipping[wide]
        f = int(torch.equal(item["x"], torch.from_numpy(got["mean"][1]).float() * TINY_SCALE))
        assert f or torch.equal(item["x"], mean * TINY_SCALE)
        ref = torch.from_numpy(flipping.edge_map(wide))
        assert torch.equal(item["edge"], ref.flip(-1) if f else ref)
        flips.add(f)
    assert flips == {0, 1}
    ds.close()


# --------------------------------------------------------------------------------------------
# PiDiNet / HED wiring (random weights, no hub)
# --------------------------------------------------------------------------------------------
def test_pidinet_from_local_annotators_folder(tmp_path, folder):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # controlnet_aux imports all its annotators
        from controlnet_aux.pidi.model import pidinet

    torch.manual_seed(0)
    ann = tmp_path / "annotators"
    ann.mkdir()
    # the layout of lllyasviel/Annotators' table5_pidinet.pth: DataParallel names
    state = {"module." + k: v for k, v in pidinet().state_dict().items()}
    torch.save({"state_dict": state}, ann / "table5_pidinet.pth")
    out = tmp_path / "pidi"
    res = cache("--input", str(folder), "--output", str(out), "--image-size", "32",
                "--edge-size", "48", "--edges", "pidinet", "--annotators", str(ann),
                "--max-pixels", str(MAX_PIXELS), "--splits", "test", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    ds = LMDBDataset(out / "test", flip=False)
    m = ds.meta
    assert m["edges"] == "pidinet" and m["edge_size"] == 48 and m["edge_levels"] == 8
    assert m["edge_settings"]["safe"] is True and m["edge_settings"]["close"] == 3
    rec = ds.record(0)
    assert "edge" in rec and rec["edge"].shape == (1, 48, 48)               # 8 levels: uint8
    levels = {round(k * 255 / 7) for k in range(8)}
    assert set(np.unique(rec["edge"]).tolist()) <= levels
    assert ds[0]["edge"].shape == (1, 48, 48) and ds[0]["x"].shape == (3, 32, 32)
    ds.close()


def test_hed_detector_class_around_random_network():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector
    from meanflow.edges import AnnotatorEdges

    torch.manual_seed(0)
    det = AnnotatorEdges("hed", HEDdetector(ControlNetHED_Apache2().eval()), size=32, levels=4,
                         close=0)
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    e = det(img)
    assert e.shape == (1, 32, 32) and e.dtype == np.uint8
    assert set(np.unique(e).tolist()) <= {0, 85, 170, 255}
    assert det.settings()["weights"] == "ControlNetHED.pth"


# --------------------------------------------------------------------------------------------
# Errors: mismatched configs, bad invocations; --inspect
# --------------------------------------------------------------------------------------------
def test_check_compatible_names_both_values(fashion):
    meta = read_meta(fashion / "train")
    data = DataConfig(path="x", image_size=SIZE, codec="pixel", channels=1, use_labels=True)
    model = ModelConfig(input_size=SIZE, in_channels=1, edge_channels=1, edge_size=SIZE,
                        num_classes=10)
    check_compatible(meta, data, model)                                    # fits: no error
    cases = [
        ("data", "image_size", 32, "image_size=16 .* data.image_size=32"),
        ("data", "codec", "sd-vae", "codec='pixel' .* data.codec='sd-vae'"),
        ("data", "channels", 3, "x channels=1 .* data.channels=3"),
        ("model", "in_channels", 4, "x channels=1 .* model.in_channels=4"),
        ("model", "input_size", 32, "x size='16x16' .* model.input_size=32"),
        ("model", "edge_size", 256, "edge_size=16 .* model.edge_size=256"),
        ("model", "edge_channels", 3, "edge_channels=1 .* model.edge_channels=3"),
        ("model", "num_classes", 3, "num classes=10 .* model.num_classes=3"),
    ]
    for which, field, value, pattern in cases:
        d, mo = DataConfig(**vars(data)), ModelConfig(**vars(model))
        setattr(d if which == "data" else mo, field, value)
        with pytest.raises(DatasetMismatchError, match=pattern):
            check_compatible(meta, d, mo)
    none = dict(meta, edges="none")
    with pytest.raises(DatasetMismatchError, match="edges='none' .* data.use_edges=True"):
        check_compatible(none, data, model)


def test_shape_keys_left_out_come_from_the_dataset_and_given_ones_are_checked(fashion):
    """The keys a cached dataset decides: those the config leaves out are taken from its
    metadata, those it gives are kept (for check_compatible to police), and a config that
    was not built from a file or dict (given None) is left alone."""
    from meanflow.config import from_dict
    from meanflow.data import fill_from_dataset
    meta = read_meta(fashion / "train")
    cfg = from_dict(dict(data=dict(use_labels=True), model=dict(edge_size=64)))
    changed = fill_from_dataset(cfg, meta)
    assert sorted(changed) == sorted([
        "data.codec=pixel", f"data.image_size={SIZE}", "data.channels=1",
        "model.in_channels=1", f"model.input_size={SIZE}", "model.num_classes=10"])
    assert cfg.model.edge_size == 64                          # given: kept, and then refused
    with pytest.raises(DatasetMismatchError, match="model.edge_size=64"):
        check_compatible(meta, cfg.data, cfg.model)
    assert fill_from_dataset(cfg, meta) == []                 # a second pass changes nothing
    bare = Config()
    assert bare.given is None and fill_from_dataset(bare, meta) == []
    assert bare.model.in_channels == 4


def test_bad_invocations_fail_before_any_work(tmp_path, folder, idx_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o1")],
         "--input", "no such directory"),
        (["--input", str(folder), "--output", str(blocker / "sub")], "--output", "not writable"),
        (["--input", str(folder), "--output", str(tmp_path / "o3"), "--codec", "jpeg"],
         "--codec", "invalid choice"),
        (["--input", str(folder), "--output", str(tmp_path / "o4"), "--edges", "sobel"],
         "--edges", "invalid choice"),
        (["--input", str(folder), "--output", str(tmp_path / "o5"), "--edges", "pidinet",
          "--annotators", str(tmp_path / "missing")], "--annotators", "no such folder"),
        (["--input", str(folder), "--output", str(tmp_path / "o6"), "--codec", "sd-vae",
          "--vae", str(tmp_path / "novae")], "--vae", "no such folder"),
        (["--source", "fashion-mnist", "--fashion-root", str(tmp_path), "--output",
          str(tmp_path / "o7")], "--fashion-root", "no Fashion-MNIST train IDX files"),
        (["--input", str(folder), "--output", str(tmp_path / "o8"), "--codec", "sd-vae",
          "--channels", "1"], "--channels 3", "needs"),
    ]
    for args, culprit, text in cases:
        res = cache(*args)
        assert res.returncode != 0, args
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and culprit in lines[0] and text in lines[0], res.stderr
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 3, 4, 7, 8))
    assert not list((tmp_path / "o5").glob("*/data.mdb"))
    # a rerun with other settings into an existing output is refused, naming the setting
    out = tmp_path / "o9"
    base = ["--source", "fashion-mnist", "--fashion-root", str(idx_dir[0]), "--output",
            str(out), "--splits", "test"]
    assert cache(*base, "--image-size", str(SIZE)).returncode == 0
    before = all_records(out / "test")
    res = cache(*base, "--image-size", "24")
    assert res.returncode == 2 and "image_size=16" in res.stderr and "image_size=24" in res.stderr
    assert all_records(out / "test") == before


def test_inspect_prints_metadata_and_writes_png(fashion, tmp_path):
    png = tmp_path / "grid.png"
    res = cache("--inspect", str(fashion / "train"), "--inspect-n", "5", "--inspect-out",
                str(png))
    assert res.returncode == 0, res.stderr
    assert '"codec": "pixel"' in res.stdout and '"num_records": 40' in res.stdout
    grid = np.asarray(Image.open(png))
    assert grid.shape == (5 * SIZE, 2 * SIZE, 3)                           # image | edge rows
    ds = LMDBDataset(fashion / "train", flip=False)
    assert np.array_equal(grid[:SIZE, :SIZE, 0], ds.image(0)[..., 0])
    assert np.array_equal(grid[:SIZE, SIZE:, 0] > 0, ds.edge_map(0)[0] > 0)
    ds.close()
    res = cache("--inspect", str(tmp_path / "nothing"))
    assert res.returncode == 2 and "no such folder" in res.stderr
