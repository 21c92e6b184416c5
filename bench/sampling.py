"""End-to-end 1-NFE sampling speed against the network forward alone, and 1 vs 2 vs 4 NFE.

    python bench/sampling.py --ckpt runs/demo/edge_mf [--n 256] [--batch-size 64] [--quick]
    python bench/sampling.py --ckpt runs/afhq_unet --device cuda --precision bf16

End to end = noise from per-sample seeds, network, decode, uint8 conversion and one PNG
write per image (what evaluate.py does per sample, without metrics). Target: pipeline
overhead at most 10% of the time at 1 NFE.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from meanflow import precision  # noqa: E402
from meanflow.codec import make_decoder  # noqa: E402
from meanflow.export import Export  # noqa: E402
from meanflow.images import save_png, to_uint8  # noqa: E402
from meanflow.runtime import Stream, process_device, stream_seed, tune_cpu_allocator  # noqa: E402
from meanflow.sampling import sample, sample_noise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="runs/demo/edge_mf")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="n = 64")
    ap.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK, else the CPU")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                    help="network autocast dtype while sampling (decode stays fp32)")
    a = ap.parse_args()
    tune_cpu_allocator()
    n = 64 if a.quick else a.n
    dev = process_device(a.device)
    amp = precision.autocast_dtype(a.precision)
    export = Export.read(a.ckpt)
    model, m = export.build(dev), export.model
    shape = (m.in_channels, m.input_size, m.input_size)
    decode = make_decoder(export.dataset_meta, dev)
    es = m.edge_size
    edge_all = (torch.rand(n, m.edge_channels, es, es) > 0.85).float().to(dev) \
        if m.edge_channels else None
    print(f"checkpoint {a.ckpt}, N = {n}, batch {a.batch_size}, {dev}, {a.precision}, "
          f"threads {torch.get_num_threads()}")
    print("| NFE | network only (img/s) | end to end (img/s) | overhead |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for steps in (1, 2, 4):
            net_t = e2e_t = 0.0
            for lo in range(0, n, a.batch_size):
                idx = list(range(lo, min(n, lo + a.batch_size)))
                edge = None if edge_all is None else edge_all[idx]
                t0 = time.perf_counter()
                noise = sample_noise(shape, [stream_seed(0, Stream.SAMPLE, i) for i in idx], dev)
                t1 = time.perf_counter()
                with torch.no_grad():
                    x = sample(model, noise, steps, edge=edge, autocast_dtype=amp)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                imgs = to_uint8(decode(x))
                for i, img in zip(idx, imgs):
                    save_png(Path(tmp) / f"{i:06d}.png", img)
                t3 = time.perf_counter()
                net_t += t2 - t1
                e2e_t += t3 - t0
            print(f"| {steps} | {n / net_t:.1f} | {n / e2e_t:.1f} | "
                  f"{100 * (e2e_t / net_t - 1):.1f}% |", flush=True)


if __name__ == "__main__":
    main()
