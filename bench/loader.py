"""Data loading and preprocessing throughput.

1. Reader: samples/s of meanflow.data.LMDBDataset through a DataLoader (0, 1, 2 workers)
   against MeanFlow-Edge2Image's layout, one ``.pt`` file per sample holding
   ``{latent: [4, 32, 32], edge: [1, 256, 256]}`` (float32, as their preprocessing saves
   them) read with ``torch.load(weights_only=True)`` and flipped at random. The records are
   synthetic 256x256-image records: SD-VAE posterior mean + std (fp16, image and its flip)
   and a binary 256x256 edge map. "warm": both stores in the page cache (decoding cost
   only); "cold": the stores' own files are dropped from the page cache (posix_fadvise)
   before every pass, as for a dataset larger than RAM. float32 edges are the default
   item; uint8 edges (LMDBDataset(edge_dtype=torch.uint8)) move a quarter of the bytes.
   With workers, every batch crosses process boundaries through fresh shared memory, which
   on a 2-core machine costs about as much as reading it (measured ceiling with a dataset
   that returns zeros: ~3,300 samples/s with float32 edges, ~10,000 with uint8).
2. Preprocessing: images/s of preprocess/cache.py (pixel codec + Canny) with 1 and 2
   processes (RANK / WORLD_SIZE, sharing one LMDB) on 512x512 JPEG crops of scikit-image's
   sample photos cached at 256x256, and on Fashion-MNIST at 32x32 when the Debian package
   is installed. Wall time of the whole command, start-up included.

    python bench/loader.py [--quick] [--n 3000] [--workers 0,1,2] [--batch-size 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from meanflow.data import LMDBDataset  # noqa: E402
from meanflow import records  # noqa: E402
from preprocess.sources import DEBIAN_FASHION_DIR  # noqa: E402

LATENT = (4, 32, 32)
EDGE = (1, 256, 256)
SD_SCALE = 0.18215
WRITE_BATCH = 256


# --------------------------------------------------------------------------------------------
# Synthetic stores
# --------------------------------------------------------------------------------------------
def synthetic_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = rng.standard_normal((2, *LATENT)).astype(np.float16)
    std = (0.01 + 0.02 * rng.random((2, *LATENT))).astype(np.float16)
    edge = np.zeros(EDGE, np.uint8)                    # a few random strokes, ~5% edge pixels
    for _ in range(12):
        r, c = rng.integers(0, 256, 2)
        edge[0, r, max(0, c - 40): c + 40] = 255
        edge[0, max(0, r - 40): r + 40, c] = 255
    return mean, std, edge


def write_lmdb(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    keys = [f"train/cat/{i:06d}" for i in range(n)]
    env = records.open_writer(path, 1 << 30)
    for lo in range(0, n, WRITE_BATCH):
        good = []
        for k in keys[lo: lo + WRITE_BATCH]:
            mean, std, edge = synthetic_sample(rng)
            good.append((k, lambda m=mean, s=std, e=edge:
                         records.encode_record(0, mean=m, std=s, edge=e)))
        records.commit_batch(env, good, [])
    meta = {"format": records.FORMAT, "format_version": records.FORMAT_VERSION, "split": "train",
            "codec": "sd-vae", "image_size": 256, "channels": 3, "x_shape": list(LATENT),
            "latent_shape": list(LATENT), "scaling_factor": SD_SCALE, "shift_factor": 0.0,
            "images_stored": False, "edges": "canny", "edge_size": 256, "edge_channels": 1,
            "edge_levels": 2, "class_names": ["cat"], "keys": keys, "labels": [0] * n,
            "num_records": n, "complete": True}
    records.write_txn(env, lambda txn: txn.put(records.META_KEY.encode(), records.encode_meta(meta)))
    env.close()


def write_pt_folder(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i in range(n):
        mean, std, edge = synthetic_sample(rng)
        latent = torch.from_numpy(mean[0].astype(np.float32) * SD_SCALE)
        e = torch.from_numpy(edge.astype(np.float32) / 127.5 - 1.0)       # their [-1, 1] edges
        torch.save({"latent": latent, "edge": e}, path / f"{i:06d}_latent.pt")


class PtFolder(torch.utils.data.Dataset):
    """MeanFlow-Edge2Image's LatentEdgeDataset: one torch.load per sample, random flip."""

    def __init__(self, path: Path):
        self.files = sorted(path.glob("*_latent.pt"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        d = torch.load(self.files[i], map_location="cpu", weights_only=True)
        latent, edge = d["latent"], d["edge"]
        if torch.rand(()) < 0.5:
            latent, edge = latent.flip(-1), edge.flip(-1)
        return {"x": latent, "edge": edge}


def evict(files: list[Path]) -> None:
    """Drop these files (only these) from the page cache, so the next pass reads the disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)                                  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def loader_rate(ds, workers: int, batch: int, epochs: int) -> float:
    """Samples/s over ``epochs`` shuffled passes, after the first batch (worker start-up)."""
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                     persistent_workers=workers > 0, drop_last=True)
    it = iter(dl)
    next(it)
    n, t = 0, time.perf_counter()
    for b in it:
        n += b["x"].shape[0]
    for _ in range(epochs - 1):
        for b in dl:
            n += b["x"].shape[0]
    rate = n / (time.perf_counter() - t)
    del it, dl                                            # workers exit: mappings released
    if hasattr(ds, "close"):
        ds.close()
    return rate


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------
def write_photo_folder(root: Path, n: int) -> None:
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(),
              data.immunohistochemistry(), data.retina()]
    rng = np.random.default_rng(0)
    for split_cat in ("train/a", "train/b"):
        (root / split_cat).mkdir(parents=True)
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        s = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        img = Image.fromarray(p[y: y + s, x: x + s]).resize((512, 512), Image.BICUBIC)
        img.save(root / ("train/a" if i % 2 else "train/b") / f"{i:05d}.jpg", quality=90)


def cache_rate(args: list[str], out: Path, procs: int, n: int) -> float:
    """Images/s of preprocess/cache.py with ``procs`` processes sharing one output."""
    shutil.rmtree(out, ignore_errors=True)
    base = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    base.pop("MASTER_ADDR", None)
    t = time.perf_counter()
    ps = [subprocess.Popen([sys.executable, str(ROOT / "preprocess/cache.py"), *args,
                            "--output", str(out)], cwd=ROOT,
                           env=dict(base, RANK=str(r), WORLD_SIZE=str(procs)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for r in range(procs)]
    errs = [p.communicate()[1] for p in ps]
    dt = time.perf_counter() - t
    if any(p.returncode for p in ps):
        raise RuntimeError(f"cache.py failed: {errs}")
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--n", type=int, default=3000, help="records per store")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1, help="passes per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per reader (median)")
    ap.add_argument("--photos", type=int, default=400, help="JPEGs for the preprocessing rows")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats, args.photos = 640, 1, 80
    workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        t = time.perf_counter()
        write_lmdb(tmp / "lmdb", args.n)
        t_lmdb = time.perf_counter() - t
        t = time.perf_counter()
        write_pt_folder(tmp / "pt", args.n)
        t_pt = time.perf_counter() - t
        lmdb_mb = (tmp / "lmdb" / "data.mdb").stat().st_size / 2**20
        pt_mb = sum(f.stat().st_size for f in (tmp / "pt").iterdir()) / 2**20
        print(f"{args.n} synthetic 256x256 records, batch {args.batch_size}, median of "
              f"{args.repeats} x {args.epochs} epoch(s); LMDB {lmdb_mb:.0f} MB (written in "
              f"{t_lmdb:.1f} s), .pt folder {pt_mb:.0f} MB ({t_pt:.1f} s)\n")
        print(f"| {'reader':<34} | {'cache':<5} | {'workers':>7} | {'samples/s':>10} | "
              f"{'vs .pt':>6} |")
        print(f"|{'-' * 36}|{'-' * 7}|{'-' * 9}|{'-' * 12}|{'-' * 8}|")
        pt_files = sorted((tmp / "pt").iterdir())
        lmdb_files = [tmp / "lmdb" / "data.mdb"]
        readers = [(".pt per sample (torch.load)", pt_files, lambda: PtFolder(tmp / "pt")),
                   ("LMDBDataset, float32 edges", lmdb_files,
                    lambda: LMDBDataset(tmp / "lmdb", edge_dtype=torch.float32)),
                   ("LMDBDataset, uint8 edges", lmdb_files,
                    lambda: LMDBDataset(tmp / "lmdb", edge_dtype=torch.uint8))]
        for cache in ("warm", "cold"):
            for w in workers:
                # readers interleaved, median of repeats: the CPU may be shared
                rates: dict[str, list[float]] = {name: [] for name, _, _ in readers}
                for _ in range(args.repeats):
                    for name, files, make in readers:
                        if cache == "cold":
                            evict(files)
                        rates[name].append(loader_rate(make(), w, args.batch_size, args.epochs))
                base = statistics.median(rates[readers[0][0]])
                for name, _, _ in readers:
                    rate = statistics.median(rates[name])
                    print(f"| {name:<34} | {cache:<5} | {w:>7} | {rate:>10.0f} | "
                          f"{rate / base:>5.1f}x |")
        print()
        write_photo_folder(tmp / "photos", args.photos)
        rows = [("photos 512 px JPEG -> 256, canny", args.photos,
                 ["--input", str(tmp / "photos"), "--image-size", "256", "--codec", "pixel",
                  "--edges", "canny"])]
        if (DEBIAN_FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
            n_fm = 2000 if args.quick else 20000
            rows.append(("Fashion-MNIST -> 32, canny", n_fm,
                         ["--source", "fashion-mnist", "--splits", "train", "--limit",
                          str(n_fm), "--image-size", "32", "--codec", "pixel", "--edges",
                          "canny"]))
        print(f"| {'preprocessing (cache.py, pixel)':<34} | {'procs':>7} | {'images/s':>10} |")
        print(f"|{'-' * 36}|{'-' * 9}|{'-' * 12}|")
        for name, n, cmd in rows:
            for procs in (1, 2):
                rate = statistics.median(cache_rate(cmd, tmp / "out", procs, n)
                                         for _ in range(args.repeats))
                print(f"| {name:<34} | {procs:>7} | {rate:>10.0f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
