"""The CPU demo, and the MeanFlow vs flow-matching comparison, on real Fashion-MNIST photos.

    python demo/run.py demo        # edge -> image and class -> image MeanFlow models, 1-step
                                   # samples, FID/KID/edge F1 at 1, 2, 4 steps, grids, results.md
    python demo/run.py ablation    # + the same models trained as plain flow matching with the
                                   # same wall-clock budget, every FID at the same N, the floor

Both are what `make demo` and `make ablation` run (after caching the dataset). Each stage
reuses what is done: train.py resumes a killed run and does nothing for a finished one (its
budget, train.max_minutes, counts across resumes), and an evaluation whose results.json
matches the model's step is read back instead of recomputed. Everything lands in --runs
(models, evaluations) and --out (the grids and tables meant for people).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# name -> (config, overrides); MeanFlow vs flow matching differ in one key only
RUNS = {
    "edge_mf": ("configs/fashion_demo.yaml", []),
    "edge_fm": ("configs/fashion_demo.yaml", ["meanflow.ratio_r_neq_t=0.0"]),
    "class_mf": ("configs/fashion_class.yaml", []),
    "class_fm": ("configs/fashion_class.yaml", ["meanflow.ratio_r_neq_t=0.0"]),
}
MF_STEPS, FM_STEPS = [1, 2, 4], [1, 2, 4, 16]
# The bar is FID <= 40 at N = 2,000, where real train vs real test gives 11.9; at
# another N the bar is the same distance above that N's floor.
EDGE_FID_BAR_ABOVE_FLOOR = 40.0 - 11.9
GRID_ROWS, CLASS_COLS, TILE_ZOOM = 8, 8, 3
# Sizing the training budget (demo/run.py plans it once, in runs/.../plan.json):
EDGE_SHARE = 9 / 13          # of the training minutes: the edge model (the product) gets 9/13
MIN_MINUTES = dict(edge=2.0, cls=1.0)   # below this nothing is learnt: warn, use these
TRAIN_OVERHEAD_S = 20        # per run: launch, build, final checkpoint + export (measured ~12)
# Calibrated on a 2-core CPU (evaluate.py, N = 1,000 at 1, 2, 4 steps: 7.1-7.5 min): in the
# pipeline a sample costs 1.0-1.2x the steady-state Inception + network timing (PNG, edge
# F1, data, allocator); SAFETY adds a margin for noisy shared machines. Then ~30 s per
# evaluate.py call (start-up, imports, loading) and ~16 s per step count (FID and KID math).
SAFETY = 1.3
EVAL_CALL_S, EVAL_SPEC_S = 30, 16
PROBE_BATCHES = 4
GRIDS_S = 30


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["demo", "ablation"])
    ap.add_argument("--data", default="data/fashion", help="cached Fashion-MNIST (train/, test/)")
    ap.add_argument("--runs", default="runs/demo", help="folder for the models and evaluations")
    ap.add_argument("--out", default="demo", help="folder for grids and results tables")
    ap.add_argument("--edge-minutes", type=float, default=None,
                    help="training budget of each edge -> image model (wall clock; default: "
                         "planned from --budget-minutes)")
    ap.add_argument("--class-minutes", type=float, default=None,
                    help="training budget of each class-conditional model (wall clock; "
                         "default: planned from --budget-minutes)")
    ap.add_argument("--budget-minutes", type=float, default=25.0,
                    help="the demo's wall-clock target, counted from --started-at: training "
                         "gets what the measured evaluation leaves (9/13 edge, 4/13 class)")
    ap.add_argument("--started-at", type=float, default=None,
                    help="Unix time the budget counts from (make passes its own start, so "
                         "set-up and caching count); default: now")
    ap.add_argument("--num-samples", type=int, default=1000,
                    help="N test samples per FID (the same N everywhere)")
    ap.add_argument("--nproc", type=int, default=1,
                    help="processes for training and evaluation (torchrun/accelerate)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--device", default=None)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------
def sh(cmd: list[str]) -> None:
    log("$ " + " ".join(cmd))
    res = subprocess.run(cmd, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"demo: command failed with exit code {res.returncode}: {' '.join(cmd)}")


def ensure_data(data: Path) -> None:
    if (data / "train" / "data.mdb").is_file() and (data / "test" / "data.mdb").is_file():
        return
    # cache.py resumes a partial cache and reports images it could not read
    sh([sys.executable, "preprocess/cache.py", "--source", "fashion-mnist", "--output",
        str(data), "--image-size", "32", "--codec", "pixel", "--edges", "canny"])


def train(name: str, minutes: float, args) -> Path:
    cfg, overrides = RUNS[name]
    run_dir = Path(args.runs) / name
    data = Path(args.data)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
              "--num_processes", str(args.nproc), "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    if args.nproc > 1:
        launch.append("--multi_gpu")    # Accelerate's name for "several processes", CPU too
    if not torch.cuda.is_available():
        # Without --cpu, `accelerate launch` sets OMP_NUM_THREADS=1 when it is unset: on a
        # CPU that halves a 2-core machine's training speed (measured: 1.4 vs 2.6 steps/s).
        threads = max(1, (os.cpu_count() or 1) // args.nproc)
        launch += ["--num_cpu_threads_per_process", str(threads)]
    sh(launch + ["train.py", "--config", cfg, "--run-dir", str(run_dir),
                 f"data.path={data / 'train'}", f"data.val_path={data / 'test'}",
                 f"train.max_minutes={minutes}", "train.max_steps=1000000", *overrides])
    return run_dir


def export_step(run_dir: Path) -> int:
    return json.loads((run_dir / "export" / "model_config.json").read_text())["step"]


def evaluate(run_dir: Path, steps: list, args, edges: bool, pngs: bool,
             tag: str = "") -> list[dict]:
    """evaluate.py on N test samples spread over the split; reused when already done for
    this model. ``steps`` holds step counts or evaluate.py's 'K@T' specs."""
    n = args.num_samples
    out = run_dir / "eval" / f"test_n{n}_seed{args.seed}{tag}"
    res_file = out / "results.json"
    if res_file.is_file():
        res = json.loads(res_file.read_text())
        done = {r["steps"]: r for r in res["results"]}
        if res["meta"]["step"] == export_step(run_dir) and all(s in done for s in steps):
            log(f"reusing {res_file}")
            return [done[s] for s in steps]
    cmd = ([sys.executable, "evaluate.py"] if args.nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(args.nproc), "evaluate.py"])
    cmd += ["--ckpt", str(run_dir), "--split", "test", "--compare-steps",
            ",".join(map(str, steps)), "--num-samples", str(n), "--fid", "--out", str(out),
            "--seed", str(args.seed)]
    if not edges:
        cmd.append("--no-edge-f1")
    if not pngs:
        cmd.append("--no-png")
    if args.device:
        cmd += ["--device", args.device]
    sh(cmd)
    res = json.loads(res_file.read_text())
    return [r for r in res["results"] if r["steps"] in steps]


def floor(args) -> dict:
    """FID/KID of N real train images against the N real test images (the reference)."""
    import evaluate as E
    from meanflow import metrics as M
    from meanflow.data import LMDBDataset
    n, data = args.num_samples, Path(args.data)
    weights = M.fid_weights_path()
    dev = torch.device(args.device or "cpu")
    test = LMDBDataset(str(data / "test"), use_edges=False, use_labels=False)
    train = LMDBDataset(str(data / "train"), use_edges=False, use_labels=False)
    # evaluate.py's selection and cache tag: the reference file is shared with it
    ref = E.real_statistics(test, E.spread(list(range(len(test))), n),
                            E.reference_tag("test", None, n), weights, dev)
    real = E.real_statistics(train, E.spread(list(range(len(train))), n),
                             E.reference_tag("train", None, n), weights, dev)
    return M.fid_kid(real, ref)


# --------------------------------------------------------------------------------------------
# Budget: the training minutes are what the demo's measured evaluation leaves of its budget
# --------------------------------------------------------------------------------------------
def nfe(spec) -> int:
    """Network evaluations of a step count or a 'K@T' spec."""
    import evaluate as E
    return len(E.steps_grid(spec)) - 1


def demo_evaluations() -> list[tuple[str, list]]:
    return [("edge", MF_STEPS)]


def ablation_evaluations() -> list[tuple[str, list]]:
    """What the ablation evaluates after the demo, the two probes it may run included."""
    return [("edge", FM_STEPS), ("cls", MF_STEPS), ("cls", FM_STEPS), ("edge", ["16@0.25"]),
            ("edge", ["4@0.5"])]


def eval_seconds(evals: list[tuple[str, list]], n: int, speed: dict,
                 ref_images: int = 0) -> float:
    """Estimated wall time of ``evals`` ((task, step specs) per evaluate.py call) at N = n:
    Inception on every sample and reference image and the network's evaluations (times
    SAFETY), plus the fixed cost of each call and step count."""
    images = ref_images + n * sum(len(specs) for _, specs in evals)
    net = n * sum(speed[f"{task}_nfe_s"] * sum(nfe(s) for s in specs) for task, specs in evals)
    fixed = EVAL_CALL_S * len(evals) + EVAL_SPEC_S * sum(len(specs) for _, specs in evals)
    return SAFETY * (images * speed["inception_s"] + net) + fixed


def split_training(seconds: float) -> tuple[float, float, bool]:
    """Training seconds for one edge and one class run -> (edge, class) minutes, and whether
    they fit (False: the minimums were used instead)."""
    minutes = (seconds - 2 * TRAIN_OVERHEAD_S) / 60
    edge, cls = EDGE_SHARE * minutes, (1 - EDGE_SHARE) * minutes
    fits = edge >= MIN_MINUTES["edge"] and cls >= MIN_MINUTES["cls"]
    if not fits:
        edge, cls = MIN_MINUTES["edge"], MIN_MINUTES["cls"]
    return round(edge, 2), round(cls, 2), fits


def measure_speed(args) -> dict:
    """Measured here and now: seconds per image of the FID Inception (steady state, the
    timing SAFETY is calibrated against) and per image and network evaluation of the two
    models (untrained, built from their configs, batch 64). Also computes the reference
    statistics of the N test images, which the evaluation needs anyway."""
    import evaluate as E
    import models
    from meanflow import metrics as M
    from meanflow.config import load_config
    from meanflow.data import LMDBDataset
    dev = torch.device(args.device or "cpu")
    n, weights = args.num_samples, M.fid_weights_path()
    test = LMDBDataset(str(Path(args.data) / "test"), use_edges=False, use_labels=False)
    # One batch of evaluate.py's Inception batch size to load, convert and warm up (a first
    # batch of a new shape also builds oneDNN's kernels), then the median of PROBE_BATCHES:
    # a single 64-image timing read 0.086 to 0.130 s/image across runs on one machine.
    bs = M.DEFAULT_BATCH
    imgs = E.as_rgb(np.stack([test.image(i % len(test)) for i in range(bs)]))
    M.inception_features(imgs, bs, dev, weights)
    times = []
    for _ in range(PROBE_BATCHES):
        t = time.perf_counter()
        M.inception_features(imgs, bs, dev, weights)
        times.append(time.perf_counter() - t)
    speed = dict(inception_s=float(np.median(times)) / bs)
    # the N test reference images: evaluation work, done now so that the plan counts it as
    # time spent (a no-op when cached)
    E.real_statistics(test, E.spread(list(range(len(test))), n),
                      E.reference_tag("test", None, n), weights, dev)
    for task, name in (("edge", "edge_mf"), ("cls", "class_mf")):
        cfg = load_config(ROOT / RUNS[name][0])
        net = models.build(cfg.model).to(dev).eval()
        b, m = 64, cfg.model
        z = torch.randn(b, m.in_channels, m.input_size, m.input_size, device=dev)
        t_ = torch.ones(b, device=dev)
        kw = (dict(edge=torch.zeros(b, m.edge_channels, m.edge_size, m.edge_size, device=dev))
              if m.edge_channels else dict(label=torch.zeros(b, dtype=torch.long, device=dev)))
        with torch.no_grad():
            net(z, 0 * t_, t_, **kw)                                  # warm-up
            t = time.perf_counter()
            for _ in range(3):
                net(z, 0 * t_, t_, **kw)
        speed[f"{task}_nfe_s"] = (time.perf_counter() - t) / (3 * b)
    return speed


def plan(args, t_start: float) -> dict:
    """The training minutes of the edge and class models, decided once per --runs folder.

    Given minutes (--edge-minutes, --class-minutes) are used as they are. Otherwise the demo's
    evaluation is estimated from speeds measured here, and training gets what is left of
    --budget-minutes after the time already spent (set-up, caching) and that estimate. The
    plan is written to <runs>/plan.json and reused by later runs (a resumed demo, the
    ablation), so every model of a comparison trains for the same minutes."""
    path = Path(args.runs) / "plan.json"
    if args.edge_minutes is not None or args.class_minutes is not None:
        if args.edge_minutes is None or args.class_minutes is None:
            sys.exit("demo: give both --edge-minutes and --class-minutes, or neither")
        return dict(edge_minutes=args.edge_minutes, class_minutes=args.class_minutes,
                    source="given on the command line")
    if path.is_file():
        p = json.loads(path.read_text())
        log(f"training budget from {path}: edge {p['edge_minutes']} min, class "
            f"{p['class_minutes']} min")
        return p
    log("measuring this machine's evaluation speed to size the training budget")
    speed = measure_speed(args)
    spent = time.time() - t_start
    evals = eval_seconds(demo_evaluations(), args.num_samples, speed) + GRIDS_S
    left = 60 * args.budget_minutes - spent - evals
    edge, cls, fits = split_training(left)
    p = dict(edge_minutes=edge, class_minutes=cls, fits=fits, budget_minutes=args.budget_minutes,
             spent_before_training_min=round(spent / 60, 2),
             demo_eval_estimate_min=round(evals / 60, 2), speed=speed,
             source=f"planned for a {args.budget_minutes:g}-min demo on this machine")
    # after the demo: the floor's N train images, the evaluations, flow matching's training
    ablation = (eval_seconds(ablation_evaluations(), args.num_samples, speed,
                             ref_images=args.num_samples)
                + 60 * (edge + cls) + 2 * TRAIN_OVERHEAD_S + GRIDS_S)
    p["ablation_after_demo_estimate_min"] = round(ablation / 60, 1)
    log(f"Inception {speed['inception_s']:.3f} s/image, network {1e3 * speed['edge_nfe_s']:.1f} "
        f"(edge) / {1e3 * speed['cls_nfe_s']:.1f} (class) ms/image/evaluation; evaluation "
        f"~{evals / 60:.1f} min, {spent / 60:.1f} min spent: training edge {edge} min, class "
        f"{cls} min")
    if not fits:
        log(f"WARNING: this machine's evaluation alone takes ~{evals / 60:.1f} min: with the "
            f"minimum training the demo will exceed its {args.budget_minutes:g}-min budget")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(p, indent=2))
    os.replace(tmp, path)
    return p


def run_minutes(run_dir: Path) -> float:
    """train.max_minutes of a trained (or started) run, from its config.yaml."""
    from meanflow.config import load_config
    return load_config(run_dir / "config.yaml").train.max_minutes


# --------------------------------------------------------------------------------------------
# Grids (sampled here with the evaluation's noise: same seeds, same images)
# --------------------------------------------------------------------------------------------
def _tiles_to_png(path: Path, rows: list[list[np.ndarray]]) -> None:
    """rows of uint8 [H, W, C] tiles (None = a blank separator) -> one PNG, zoomed."""
    import evaluate as E
    from torchvision.utils import make_grid
    h, w = next(t for r in rows for t in r if t is not None).shape[:2]
    blank = np.full((h, w, 3), 255, np.uint8)
    tiles = [E.as_rgb(t[None])[0] if t is not None else blank for r in rows for t in r]
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x.float(), scale_factor=TILE_ZOOM, mode="nearest")
    grid = make_grid(x.to(torch.uint8), nrow=len(rows[0]), padding=2, pad_value=255)
    path.parent.mkdir(parents=True, exist_ok=True)
    E.save_png(path, grid.permute(1, 2, 0).numpy())


def _sampler(run_dir: Path, dev, meta: dict):
    import evaluate as E
    from meanflow.codec import make_decoder
    from meanflow.sampling import sample, sample_noise
    from meanflow.training import load_export
    model, info = load_export(run_dir, dev)
    mc = info["model"]
    shape = (mc["in_channels"], mc["input_size"], mc["input_size"])

    decode = make_decoder(meta, dev)

    def run(seeds: list[int], steps: int, edge=None, label=None) -> np.ndarray:
        noise = sample_noise(shape, seeds, dev)
        with torch.no_grad():
            x = sample(model, noise, steps, edge=edge, label=label)
        return E.to_uint8(decode(x))
    return run


def edge_grid(path: Path, columns: list[tuple[Path, int]], args) -> None:
    """[edge | real | one column per (model, steps)] for GRID_ROWS test samples spread over
    the split (so over the classes), with the evaluation's noise: the same images."""
    import evaluate as E
    from meanflow.data import LMDBDataset
    from meanflow.training import mix_seed
    dev = torch.device(args.device or "cpu")
    ds = LMDBDataset(str(Path(args.data) / "test"), use_edges=True, use_labels=False)
    idx = E.spread(list(range(len(ds))), GRID_ROWS)
    edge = torch.stack([torch.as_tensor(ds.edge_map(i)) for i in idx]).float().to(dev)
    seeds = [mix_seed(args.seed, i) for i in idx]                # evaluate.py's noise
    samplers = {rd: _sampler(rd, dev, ds.meta) for rd in {rd for rd, _ in columns}}
    cols = [samplers[rd](seeds, s, edge=edge) for rd, s in columns]
    rows = []
    for k, i in enumerate(idx):
        e = (edge[k, 0].cpu().numpy() * 255).astype(np.uint8)[..., None]
        rows.append([e, ds.image(i)] + [c[k] for c in cols])
    _tiles_to_png(path, rows)


def class_grid(path: Path, columns: list[tuple[Path, int]], args) -> list[str]:
    """One row per class; CLASS_COLS samples per (model, steps), a blank column between."""
    from meanflow.data import LMDBDataset
    from meanflow.training import mix_seed
    dev = torch.device(args.device or "cpu")
    ds = LMDBDataset(str(Path(args.data) / "test"), use_edges=False, use_labels=True)
    names = list(ds.class_names)
    samplers = {rd: _sampler(rd, dev, ds.meta) for rd in {rd for rd, _ in columns}}
    rows = []
    for c in range(len(names)):
        label = torch.full((CLASS_COLS,), c, dtype=torch.long, device=dev)
        seeds = [mix_seed(args.seed, 1_000_003, c, j) for j in range(CLASS_COLS)]
        row = []
        for k, (rd, s) in enumerate(columns):
            row += ([None] if k else []) + list(samplers[rd](seeds, s, label=label))
        rows.append(row)
    _tiles_to_png(path, rows)
    return names


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU")
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, fp32"


def fmt(v, nd: int = 1) -> str:
    return "" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def run_summary(run_dir: Path) -> str:
    """'<steps> steps in <minutes> min' from the run's last complete checkpoint."""
    from meanflow.training import COMPLETE, list_checkpoints
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if not ckpts:
        return "not trained"
    marker = (ckpts[-1][1] / COMPLETE).read_text().split()
    mins = float(marker[1]) / 60 if len(marker) > 1 else float("nan")
    return f"{int(marker[0])} steps in {mins:.1f} min"


def table(rows: list[tuple[str, dict]], edges: bool) -> list[str]:
    head = "| model | steps | FID | KID x 1e3 | " + ("edge F1 | " if edges else "") + "N |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, r in rows:
        cells = [label, str(r.get("steps", "")), fmt(r.get("fid")),
                 fmt(r["kid"] * 1e3, 2) if "kid" in r else ""]
        if edges:
            cells.append(fmt(r.get("edge_f1"), 3))
        cells.append(str(r.get("n", "")))
        out.append("| " + " | ".join(cells) + " |")
    return out


# FID at N = 1,000 moves by up to ~0.8 when only the sampling noise changes (the demo's edge
# model, sampling seeds 0 / 1 / 2: 2 steps 43.3 / 42.6 / 43.1, 4 steps 43.6 / 43.6 / 43.9). A
# rise from one step count to the next smaller than this is reported, but not probed and not
# given a cause.
FID_NOISE = 1.0


def first_rise(rows: list[dict], tol: float = FID_NOISE):
    """(a, b): the first pair of consecutive step counts where FID rises by more than
    ``tol``, or None."""
    return next(((a["steps"], b["steps"]) for a, b in zip(rows, rows[1:])
                 if b["fid"] > a["fid"] + tol), None)


def probe_spec(rise) -> str:
    """The b-step grid with its steps below t = 1/a merged into one jump (evaluate.py K@T):
    fine steps where b's sampler has them, a's single last step near the data."""
    a, b = rise
    return f"{b}@{1 / a:g}"


def monotone_note(name: str, rows: list[dict], probe: dict | None) -> list[str]:
    fid = {r["steps"]: r["fid"] for r in rows}
    rise = first_rise(rows)
    if rise is None:
        small = first_rise(rows, tol=0.0)
        if small is None:
            return []
        a, b = small
        return [f"- {name}: FID rises from {a} to {b} steps ({fid[a]:.1f} -> {fid[b]:.1f}), "
                f"by less than the ~{FID_NOISE:g} FID that the sampling seed alone can move it "
                f"at this N: too small to locate with a probe."]
    a, b = rise
    out = [f"- {name}: FID rises from {a} to {b} steps ({fid[a]:.1f} -> {fid[b]:.1f}): more "
           f"steps are not better here."]
    if probe is not None:
        tau = 1 / a
        where = ("the loss comes from the small steps near the data (t < "
                 f"{tau:g}), where the learned field is least accurate"
                 if abs(probe["fid"] - fid[a]) < abs(probe["fid"] - fid[b]) else
                 f"the loss is not (only) near the data: it is already there above t = {tau:g}")
        out[0] += (f" Measured: the same {b}-step grid with its steps below t = {tau:g} merged "
                   f"into one ({probe['nfe']} NFE) gives {probe['fid']:.1f}: {where}.")
    return out


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0, times = time.time(), {}
    t_start = args.started_at if args.started_at is not None else t0
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    ensure_data(Path(args.data))
    t = time.time()
    budget = plan(args, t_start)
    times["plan (measure the evaluation speed)"] = time.time() - t
    t = time.time()
    train("edge_mf", budget["edge_minutes"], args)
    times["train edge_mf"] = time.time() - t
    t = time.time()
    train("class_mf", budget["class_minutes"], args)
    times["train class_mf"] = time.time() - t
    if args.what == "ablation":
        for name in ("edge_fm", "class_fm"):        # the same minutes as the MeanFlow model
            t = time.time()
            train(name, run_minutes(runs / name.replace("_fm", "_mf")), args)
            times[f"train {name}"] = time.time() - t

    t = time.time()
    res = {"edge_mf": evaluate(runs / "edge_mf", MF_STEPS, args, edges=True,
                               pngs=args.what == "demo")}
    times["evaluate edge_mf"] = time.time() - t
    if args.what == "demo":
        t = time.time()
        edge_grid(out / "grid.png", [(runs / "edge_mf", s) for s in MF_STEPS], args)
        classes = class_grid(out / "class_grid.png", [(runs / "class_mf", 1)], args)
        times["grids"] = time.time() - t
        write_demo_report(out, runs, res, classes, times, time.time() - t0, args, budget)
        log(f"done in {(time.time() - t0) / 60:.1f} min: {out / 'results.md'}")
        return 0

    for name, steps, edges in (("edge_fm", FM_STEPS, True), ("class_mf", MF_STEPS, False),
                               ("class_fm", FM_STEPS, False)):
        t = time.time()
        res[name] = evaluate(runs / name, steps, args, edges=edges, pngs=False)
        times[f"evaluate {name}"] = time.time() - t
    # Where quality falls as steps grow, measure where along the path it is lost (on the edge
    # task, the product; each probe is one more N-sample FID).
    probes = {}
    for name in ("edge_mf", "edge_fm"):
        rise = first_rise(res[name])
        if rise is not None and rise[0] > 1:        # from 1 step there is nothing to merge
            t = time.time()
            probes[name] = evaluate(runs / name, [probe_spec(rise)], args,
                                    edges=True, pngs=False, tag="_probe")[0]
            times[f"probe {name} ({probe_spec(rise)})"] = time.time() - t
    t = time.time()
    res["floor"] = floor(args)
    times["floor (real train vs real test)"] = time.time() - t
    t = time.time()
    edge_grid(out / "ablation_edge_grid.png",
              [(runs / "edge_mf", s) for s in MF_STEPS] + [(runs / "edge_fm", s) for s in FM_STEPS],
              args)
    classes = class_grid(out / "ablation_class_grid.png",
                         [(runs / "class_mf", 1), (runs / "class_fm", 1), (runs / "class_fm", 16)],
                         args)
    times["grids"] = time.time() - t
    ok = write_ablation_report(out, runs, res, probes, classes, times, time.time() - t0, args,
                               budget)
    log(f"done in {(time.time() - t0) / 60:.1f} min: {out / 'ablation.md'} "
        f"({'every bar met' if ok else 'some bars NOT met, see the table'})")
    return 0


def _timing(times: dict, total: float, args, budget: dict) -> list[str]:
    lines = [f"Wall time of this command: {total / 60:.1f} min "
             f"(stages reused from an earlier run take ~0)."]
    if args.started_at is not None:
        lines[0] += (f" Since `make` started (set-up and caching included): "
                     f"{(time.time() - args.started_at) / 60:.1f} min.")
    p = budget
    if p:
        lines.append(f"Training budget: edge {p['edge_minutes']:g} min, class "
                     f"{p['class_minutes']:g} min per model, {p['source']}"
                     + (f" (Inception {p['speed']['inception_s']:.3f} s/image measured, "
                        f"demo evaluation estimated at {p['demo_eval_estimate_min']:.1f} min)"
                        if "speed" in p else "") + ".")
    return lines + [f"- {k}: {v / 60:.1f} min" for k, v in times.items()]


def write_demo_report(out: Path, runs: Path, res: dict, classes: list[str], times: dict,
                      total: float, args, budget: dict) -> None:
    rows = [("MeanFlow", r) for r in res["edge_mf"]]
    lines = ["# Demo: Fashion-MNIST edges -> photos in one step, on a CPU", "",
             f"Hardware: {hardware()}.", *_timing(times, total, args, budget), "",
             f"## Edge -> image (configs/fashion_demo.yaml; {run_summary(runs / 'edge_mf')})",
             "", f"FID/KID against the same N real test images, conditioned on their Canny "
             f"edges; edge F1: Canny of the sample vs the input edges (1-pixel tolerance).", "",
             *table(rows, edges=True), "",
             "![edge | real | 1 step | 2 steps | 4 steps](grid.png)", "",
             "Columns: edge map, real photo, MeanFlow at 1, 2 and 4 steps.", "",
             f"## Class -> image (configs/fashion_class.yaml; "
             f"{run_summary(runs / 'class_mf')})", "",
             "![one row per class, 1 step](class_grid.png)", "",
             "Rows, top to bottom: " + ", ".join(classes) + ". All samples in 1 step.", ""]
    (out / "results.md").write_text("\n".join(lines))


def write_ablation_report(out: Path, runs: Path, res: dict, probes: dict, classes: list[str],
                          times: dict, total: float, args, budget: dict) -> bool:
    n, fl = args.num_samples, res["floor"]
    by = {k: {r["steps"]: r for r in v} for k, v in res.items() if k != "floor"}
    fm_best = min(by["edge_fm"].values(), key=lambda r: r["fid"])
    mf1, cmf1, cfm1 = by["edge_mf"][1], by["class_mf"][1], by["class_fm"][1]
    edge_bar = fl["fid"] + EDGE_FID_BAR_ABOVE_FLOOR
    bars = [
        ("class: MeanFlow 1-step FID <= 1/3 of flow matching's 1-step",
         f"{cmf1['fid']:.1f} vs {cfm1['fid'] / 3:.1f}", cmf1["fid"] <= cfm1["fid"] / 3),
        (f"edge: MeanFlow 1-step FID <= floor + {EDGE_FID_BAR_ABOVE_FLOOR:.1f} "
         f"(40 at N = 2,000)", f"{mf1['fid']:.1f} vs {edge_bar:.1f}", mf1["fid"] <= edge_bar),
        (f"edge: MeanFlow 1-step FID <= 1.1 x best flow matching ({fm_best['steps']} steps)",
         f"{mf1['fid']:.1f} vs {1.1 * fm_best['fid']:.1f}", mf1["fid"] <= 1.1 * fm_best["fid"]),
        ("edge: 1-step edge F1 >= 0.95", f"{mf1['edge_f1']:.3f}", mf1["edge_f1"] >= 0.95),
    ]
    floor_row = dict(steps="", fid=fl["fid"], kid=fl["kid"], n=fl["n"], edge_f1=1.0)

    def section(task: str, title: str, image: str, caption: str) -> list[str]:
        mf, fm = runs / f"{task}_mf", runs / f"{task}_fm"
        rows = ([("MeanFlow", r) for r in res[f"{task}_mf"]]
                + [("flow matching", r) for r in res[f"{task}_fm"]]
                + [("real train images (floor)", floor_row)])
        return [f"## {title}", "", f"MeanFlow: {run_summary(mf)}; flow matching: "
                f"{run_summary(fm)}.", "", *table(rows, edges=task == "edge"), "", image, "",
                caption, ""]
    lines = ["# MeanFlow vs flow matching at the same wall-clock budget", "",
             f"Hardware: {hardware()}.", *_timing(times, total, args, budget), "",
             "Each pair differs in one config key (meanflow.ratio_r_neq_t: the MeanFlow value "
             "vs 0, which is flow matching) and trains for the same wall-clock minutes. Every "
             f"FID/KID uses the same N = {n} test samples against their real images.", "",
             *section("edge", "Edge -> image (configs/fashion_demo.yaml)",
                      "![edge | real | MF 1, 2, 4 | FM 1, 2, 4, 16](ablation_edge_grid.png)",
                      "Columns: edge, real, MeanFlow 1 / 2 / 4 steps, flow matching "
                      "1 / 2 / 4 / 16 steps."),
             *section("class", "Class -> image, no edges (configs/fashion_class.yaml)",
                      "![class rows: MF 1 step | FM 1 step | FM 16 steps]"
                      "(ablation_class_grid.png)",
                      "Rows: " + ", ".join(classes) + f". Column groups ({CLASS_COLS} each): "
                      "MeanFlow 1 step, flow matching 1 step, flow matching 16 steps."),
             "## Bars", "", "| bar | measured | met |", "|---|---|---|"]
    lines += [f"| {b} | {m} | {'yes' if ok else '**no**'} |" for b, m, ok in bars]
    notes = sum((monotone_note(f"{task} {meth}", res[k], probes.get(k))
                 for k, task, meth in (("edge_mf", "edge", "MeanFlow"),
                                       ("edge_fm", "edge", "flow matching"),
                                       ("class_mf", "class", "MeanFlow"),
                                       ("class_fm", "class", "flow matching"))), [])
    if notes:
        lines += ["", "## Where more steps do worse", "", *notes]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    summary = dict(n=n, floor=fl, results=res, probes=probes, budget=budget,
                   bars=[dict(bar=b, measured=m, met=ok) for b, m, ok in bars], times=times)
    (out / "ablation.json").write_text(json.dumps(summary, indent=2, default=float))
    return all(ok for _, _, ok in bars)


if __name__ == "__main__":
    sys.exit(main())
