"""GPU check: the whole pipeline on this machine's GPUs in a few minutes, nothing downloaded.

    make gpu-check                       # = python bench/gpu_check.py
    python bench/gpu_check.py --out runs/gpu_check --steps 100 --fid-n 500
    python bench/gpu_check.py --tiny-cpu # the same logic on the CPU with tiny models (tests)

It writes its own data: synthetic photos (shapes on gradients) cached through a random-weight
AutoencoderKL with the Stable Diffusion VAE's architecture, with Canny edges. Then, on every
visible GPU through the real entry points:

1. ``accelerate launch train.py`` for ``configs/afhq_unet.yaml`` and ``configs/afhq_sit_b2.yaml``
   in bf16, ``--steps`` optimizer steps each, and the same again as flow matching
   (``meanflow.ratio_r_neq_t=0``) for the MeanFlow / flow-matching step-time ratio at the
   configs' 25% r != t; the same pair at 4x the per-GPU batch (2/5 of the steps);
   then the keys the defaults leave off, as MeanFlow runs of 2/5 of the steps:
   ``train.compile``, ``train.channels_last`` (U-Net), ``model.grad_checkpointing`` (SiT), and,
   on a single GPU, two processes sharing it (gloo);
2. a resume of the U-Net run to ``--steps`` + 20 (it must say where it resumed);
3. ``torchrun evaluate.py``: 1-NFE samples sharded over the GPUs, FID at N = ``--fid-n``
   (against the cached real test images; the number checks the path, not the model);

then prints one table (images/s, step time, peak GPU memory per config, the ratio, the resume,
the FID) and writes it as JSON. On a machine without CUDA it says so in one line and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

CONFIGS = ("afhq_unet", "afhq_sit_b2")
# per-GPU batch: each config's on the hardware it is written for (1 GPU for the U-Net, 8 for
# SiT; bench/memory.py: 5.9 and 11.9 GB in bf16), so that the check fits where they do
PER_GPU = {"afhq_unet": 64, "afhq_sit_b2": 32}
# --tiny-cpu: the same runs with models and data small enough for a test on two CPU cores
TINY_MODEL = {
    "afhq_unet": ["model.base_channels=8", "model.channel_mults=[1,2]", "model.num_res_blocks=1",
                  "model.attn_resolutions=[4]"],
    "afhq_sit_b2": ["model.name=SiT-S/4"],
}


class CheckError(RuntimeError):
    """A stage of the check failed; the message names it and holds the end of its log."""


def synthetic_images(root: Path, split: str, n: int, size: int, seed: int) -> None:
    """``n`` RGB images of coloured shapes on gradients under ``root/split/<class>/``."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        cls = "ring" if i % 2 else "box"
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        bg = (a * yy[..., None] + b * (1 - xx[..., None])) / 2 + 40
        img = Image.fromarray(bg.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = rng.integers(0, size * 3 // 4, 2)
            w = int(rng.integers(size // 8, size // 3))
            box = [int(x0), int(y0), int(x0) + w, int(y0) + w]
            fill = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if cls == "ring" else draw.rectangle)(box, outline=fill, width=3,
                                                                fill=None if i % 3 else fill)
        img.save(d / f"{i:05d}.png")


def random_vae(folder: Path, tiny: bool) -> Path:
    """A random-weight AutoencoderKL saved with ``save_pretrained``: the SD VAE's architecture
    (4 latent channels, downsampling 8, scaling 0.18215), or a narrow one for --tiny-cpu."""
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    ch = (8, 8, 8, 8) if tiny else (128, 256, 512, 512)
    blocks = len(ch)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=ch, layers_per_block=1 if tiny else 2,
                        down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks,
                        norm_num_groups=4 if tiny else 32, sample_size=256,
                        scaling_factor=0.18215)
    vae.save_pretrained(folder)
    return folder


def sh(cmd: list[str], what: str, log: Path, timeout: int) -> str:
    """Run a stage; its output goes to ``log`` and is returned. A failure raises CheckError."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise CheckError(f"{what}: no result after {timeout} s") from e
    text = res.stdout + res.stderr
    log.write_text(" ".join(cmd) + "\n\n" + text)
    if res.returncode != 0:
        raise CheckError(f"{what} failed (exit {res.returncode}, {time.time() - t0:.0f} s); "
                         f"log {log}:\n{text[-2500:]}")
    return text


def launcher(nproc: int, tiny: bool, shared_gpu: bool = False) -> list[str]:
    """accelerate launch for ``nproc`` processes (one per GPU), or torchrun where processes
    share a GPU or run on the CPU (``accelerate launch --cpu`` starts one process only);
    train.py then picks gloo by itself."""
    if nproc > 1 and (tiny or shared_gpu):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(nproc)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
           "--dynamo_backend", "no", "--mixed_precision", "no" if tiny else "bf16"]
    if tiny:
        return cmd + ["--cpu", "--num_processes", "1"]
    if nproc > 1:
        cmd += ["--multi_gpu"]
    return cmd + ["--num_processes", str(nproc)]


def read_metrics(run_dir: Path) -> dict:
    """Throughput (after the first logged interval: start-up and autotuning) and peak memory."""
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    rate = [float(r["train/samples_per_s"]) for r in rows if r.get("train/samples_per_s")]
    steady = rate[1:] or rate
    peak = [float(r["train/peak_mem_gb"]) for r in rows if r.get("train/peak_mem_gb")]
    return dict(images_per_s=float(np.median(steady)) if steady else float("nan"),
                peak_mem_gb=max(peak) if peak else float("nan"),
                last_loss=float(rows[-1]["train/loss"]) if rows else float("nan"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per training run")
    ap.add_argument("--fid-n", type=int, default=500, help="samples for the FID")
    ap.add_argument("--tiny-cpu", action="store_true",
                    help="run the check's logic on the CPU with tiny models and data")
    a = ap.parse_args(argv)

    import torch
    if not a.tiny_cpu and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine; nothing to check (use --tiny-cpu to "
              "run its logic on the CPU)")
        return 0
    tiny = a.tiny_cpu
    n_gpus = 1 if tiny else torch.cuda.device_count()
    size = 64 if tiny else 256
    steps = a.steps
    short = max(2, steps * 2 // 5)    # the 4x-batch and the key rows: throughput, not training
    fid_n = a.fid_n
    out = a.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    device = "cpu" if tiny else torch.cuda.get_device_name(0)
    print(f"gpu-check: {n_gpus} x {device}; {steps} steps per run; FID at N = {fid_n}",
          flush=True)

    # ---- data: synthetic photos -> random SD-VAE latents + Canny edges ----------------------
    data = out / "data"
    if not (data / "test" / "data.mdb").is_file():
        imgs = out / "images"
        synthetic_images(imgs, "train", max(64, fid_n), size, seed=0)
        synthetic_images(imgs, "test", fid_n, size, seed=1)
        vae = random_vae(out / "vae", tiny)
        sh([sys.executable, "preprocess/cache.py", "--input", str(imgs), "--output", str(data),
            "--image-size", str(size), "--codec", "sd-vae", "--vae", str(vae),
            "--edges", "canny", "--workers", "2"], "cache", logs / "cache.log", 1200)

    def train(cfg: str, tag: str, *extra: str, resume: bool = False, per_gpu: int = 0,
              nproc: int = 0) -> tuple[str, float]:
        run_dir = out / "runs" / tag
        over = [f"data.path={data}/train", f"data.val_path={data}/test",
                f"data.image_size={size}", "data.num_workers=2",
                f"train.log_every={max(1, steps // 5)}", f"train.ckpt_every={steps}",
                f"train.image_every={steps}", "train.keep_checkpoints=2"]
        procs = nproc or n_gpus
        if tiny:
            over += [f"model.edge_size={size}", f"model.input_size={size // 8}",
                     f"train.batch_size={4 * procs}", "train.grad_accum=1",
                     "train.mixed_precision=no", *TINY_MODEL[cfg]]
        else:
            over += ["train.mixed_precision=bf16", "train.grad_accum=1",
                     f"train.batch_size={(per_gpu or PER_GPU[cfg]) * n_gpus}"]
        if not resume and run_dir.exists():
            import shutil
            shutil.rmtree(run_dir)
        t0 = time.time()
        text = sh([*launcher(procs, tiny, shared_gpu=nproc > n_gpus), "train.py",
                   "--config", f"configs/{cfg}.yaml", "--run-dir", str(run_dir), *over, *extra,
                   *([] if resume else ["--resume", "none"])],
                  f"train {tag}", logs / f"{tag}{'_resume' if resume else ''}.log", 1200)
        return text, time.time() - t0

    def measured(cfg: str, tag: str, *extra: str, **kw) -> dict:
        _, secs = train(cfg, tag, *extra, **kw)
        return read_metrics(out / "runs" / tag) | dict(wall_s=secs)

    rows, result = [], dict(gpus=n_gpus, device=device, steps=steps, tiny_cpu=tiny)
    # MeanFlow against flow matching, at the shipped per-GPU batch and at 4x that batch
    for cfg in CONFIGS:
        for scale in ((1,) if tiny else (1, 4)):    # tiny: the logic, once
            per_gpu = PER_GPU[cfg] * scale
            n = steps if scale == 1 else short
            row = dict(config=cfg, batch_per_gpu=4 if tiny else per_gpu)
            sfx = "" if scale == 1 else f"_x{scale}"
            for key, ratio in (("mf", None), ("fm", "0")):
                extra = [f"train.max_steps={n}"]
                if ratio is not None:
                    extra.append(f"meanflow.ratio_r_neq_t={ratio}")
                m = measured(cfg, f"{cfg}{sfx}" + ("_fm" if ratio else ""), *extra,
                             per_gpu=per_gpu)
                for k in ("images_per_s", "peak_mem_gb", "wall_s"):
                    row[f"{key}_{k}"] = m[k]
                row[f"{key}_last_loss"] = m["last_loss"]
            row["mf_over_fm_step_time"] = row["fm_images_per_s"] / row["mf_images_per_s"]
            rows.append(row)
    result["configs"] = rows

    # ---- the throughput keys that the shipped defaults leave off, as MeanFlow runs -----------
    variants = []
    keys = [("afhq_unet", "train.channels_last=true", {}),
            ("afhq_sit_b2", "model.grad_checkpointing=true", {})]
    if not tiny:             # compiling takes minutes on a CPU: the logic is the same row
        keys.insert(0, ("afhq_unet", "train.compile=true", {}))
    if n_gpus == 1:          # two ranks sharing the one GPU (gloo)
        keys.append(("afhq_unet", "two processes on one GPU", dict(nproc=2)))
    for cfg, key, kw in keys:
        tag = f"{cfg}_" + re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")
        extra = [f"train.max_steps={short}"] + ([key] if "=" in key else [])
        m = measured(cfg, tag, *extra, **kw)
        variants.append(dict(config=cfg, key=key, images_per_s=m["images_per_s"],
                             peak_mem_gb=m["peak_mem_gb"], wall_s=m["wall_s"],
                             last_loss=m["last_loss"]))
    result["variants"] = variants

    # ---- resume: the U-Net run continued by 20 steps ----------------------------------------
    text, _ = train(CONFIGS[0], CONFIGS[0], f"train.max_steps={steps + 20}", resume=True)
    m = re.search(r"resumed from \S+ at step (\d+)", text)
    done = sorted((out / "runs" / CONFIGS[0] / "checkpoints").glob("step_*"))
    result["resume"] = dict(from_step=int(m.group(1)) if m else None,
                            final_checkpoint=done[-1].name if done else None)
    if not m or int(m.group(1)) != steps or not done or not done[-1].name.endswith(
            f"{steps + 20:07d}"):
        raise CheckError(f"resume: expected to resume at step {steps} and end at "
                         f"{steps + 20}; got {result['resume']} (log {logs})")

    # ---- sharded 1-NFE evaluation with FID ----------------------------------------------------
    ev = out / "eval"
    t0 = time.time()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(n_gpus), "evaluate.py", "--ckpt", str(out / "runs" / CONFIGS[0]),
           "--data", f"{data}/test", "--steps", "1", "--fid", "--num-samples", str(fid_n),
           "--no-png", "--no-edge-f1", "--out", str(ev)]
    sh(cmd, "evaluate", logs / "evaluate.log", 1200)
    res = json.loads((ev / "results.json").read_text())["results"][0]
    result["evaluate"] = dict(n=fid_n, fid=res.get("fid"), wall_s=time.time() - t0,
                              seconds_per_image=res.get("seconds_per_image"))
    result["total_wall_s"] = time.time() - t_all

    # ---- report ------------------------------------------------------------------------------
    lines = [f"gpu-check: {n_gpus} x {device}, " + ("tiny CPU mode, fp32" if tiny else "bf16"),
             "| config | batch/GPU | MeanFlow img/s | flow matching img/s | MF / FM step time | "
             "peak GB (MF) | peak GB (FM) | final loss |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['config']} | {r['batch_per_gpu']} | {r['mf_images_per_s']:.1f} | "
                     f"{r['fm_images_per_s']:.1f} | {r['mf_over_fm_step_time']:.2f} | "
                     f"{r['mf_peak_mem_gb']:.2f} | {r['fm_peak_mem_gb']:.2f} | "
                     f"{r['mf_last_loss']:.3f} |")
    lines += ["", "| config | key (MeanFlow, shipped batch) | img/s | peak GB | final loss | "
                  "wall s |", "|" + "---|" * 6]
    for v in result["variants"]:
        lines.append(f"| {v['config']} | {v['key']} | {v['images_per_s']:.1f} | "
                     f"{v['peak_mem_gb']:.2f} | {v['last_loss']:.3f} | {v['wall_s']:.0f} |")
    e = result["evaluate"]
    lines.append(f"resume: from step {result['resume']['from_step']} to "
                 f"{result['resume']['final_checkpoint']}; evaluate on {n_gpus} process(es): "
                 f"FID {e['fid']:.2f} at N = {e['n']} (random-weight model: checks the path), "
                 f"{e['wall_s']:.0f} s; total {result['total_wall_s']:.0f} s")
    print("\n".join(lines))
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print(f"written {out / 'gpu_check.json'} and gpu_check.md", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckError as err:
        print(f"gpu-check: {err}", file=sys.stderr)
        sys.exit(1)
