"""Cost of FID/KID evaluation: Inception feature extraction, then the FID and KID math.

Feature extraction (torch-fidelity's InceptionV3, standard resize to 299) dominates; its cost
per image does not depend on the input size. The FID math (2048 x 2048 covariances and the
eigenvalues of their product) and KID (polynomial-kernel MMD on random subsets) are measured
on random 2048-d features of N samples per side, and so is the streamed statistics' cost
(float64 feature and outer-product sums, batch by batch, as evaluate.py accumulates them).

    python bench/fid.py [--quick] [--device cuda] [--batch-sizes 8,32] [--n 1000,5000]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from meanflow import metrics  # noqa: E402

IMAGE_SIZE = 64          # input size; the extractor resizes to 299 whatever it is


def time_features(batch: int, device: str, iters: int) -> float:
    """Seconds per image, median over ``iters`` batches after one warm-up batch."""
    x = torch.randint(0, 256, (batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    metrics.inception_features(x, batch, device)                     # warm-up (and weight loading)
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        metrics.inception_features(x, batch, device)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / batch


def time_math(n: int, kid_subsets: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    f1 = np.abs(rng.standard_normal((n, metrics.FEATURE_DIM)))
    f2 = np.abs(rng.standard_normal((n, metrics.FEATURE_DIM))) + 0.01
    t = time.perf_counter()
    metrics.fid_from_features(f1, f2)
    t_fid = time.perf_counter() - t
    t = time.perf_counter()
    metrics.kid_from_features(f1, f2, subsets=kid_subsets)
    return t_fid, time.perf_counter() - t


def time_streamed(n: int, device: str, batch: int = 64) -> float:
    """Seconds to fold N 2048-d features into float64 sums (evaluate.py's constant-memory
    statistics), batch by batch."""
    f = torch.rand(batch, metrics.FEATURE_DIM, device=device)
    acc = metrics.StreamedStatistics(n, device=device, kept=0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for lo in range(0, n, batch):
        k = min(batch, n - lo)
        acc.update(range(lo, lo + k), f[:k])
    acc.reduce()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--n", default="1000,5000", help="samples per side for the FID/KID math")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="batch 4, N 500, 1 iteration")
    a = ap.parse_args()
    batches = [4] if a.quick else [int(b) for b in a.batch_sizes.split(",")]
    ns = [500] if a.quick else [int(n) for n in a.n.split(",")]
    iters = 1 if a.quick else a.iters
    print(f"device {a.device}, torch threads {torch.get_num_threads()}, "
          f"weights {metrics.fid_weights_path().name}")
    print("| Inception batch | s / image | images / s |")
    print("|---|---|---|")
    for b in batches:
        s = time_features(b, a.device, iters)
        print(f"| {b} | {s:.3f} | {1 / s:.1f} |")
    print()
    print(f"| N per side | FID math (s) | KID math, {metrics.KID_SUBSETS} subsets (s) |")
    print("|---|---|---|")
    for n in ns:
        t_fid, t_kid = time_math(n, metrics.KID_SUBSETS)
        print(f"| {n} | {t_fid:.2f} | {t_kid:.2f} |")
    print()
    print("| N | streamed float64 sums (s) | per 1,000 samples (s) |")
    print("|---|---|---|")
    for n in ns:
        t = time_streamed(n, a.device)
        print(f"| {n} | {t:.2f} | {1000 * t / n:.3f} |")


if __name__ == "__main__":
    main()
