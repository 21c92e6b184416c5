"""The demo's two tasks sized for one GPU: MeanFlow against flow matching at equal minutes.

    python demo/gpu_demo.py              # make gpu-demo: runs/gpu_demo/results.md, grids, curve
    python demo/gpu_demo.py --cpu-smoke --data DIR --runs DIR   # its logic on the CPU, tiny

Fashion-MNIST edge -> image (configs/gpu_demo_edge.yaml) and class -> image
(configs/gpu_demo_class.yaml): a 4.2M-parameter U-Net at batch 256 in bf16. Each model trains
for its config's train.max_minutes of wall-clock time (1.25 edge, 0.75 class): the edge
MeanFlow model as a warm start, as `make demo` does (flow matching for half the minutes, then
MeanFlow from that export), flow matching alone for all of them (meanflow.ratio_r_neq_t=0,
nothing else changed), one after the other on the same GPU. The steps this buys depend on the
GPU; the tables give them. Then, on the whole Fashion-MNIST test split (N = 10,000), FID and
KID against the real test photos of the same samples (edge F1 on the edge task): MeanFlow at
1, 2, 4 steps, flow matching at 1, 2, 4, 16; the bars (edge: MeanFlow's 1 step at most 1.1x
flow matching's best and below flow matching's own 1 step; class: at most a third of flow
matching's 1 step); and a learning curve, the 1-step FID of checkpoints the runs wrote
(evaluate.py's curve mode, --curve-points of them per model, nearest to evenly spaced minutes;
the last point is the final model of the tables) against training minutes.

Writes under --runs: results.md and results.json (the runs, both tasks' scores, the bars, the
curve, the time of each stage), grid.png / class_grid.png (MeanFlow, as `make demo`),
ablation_edge_grid.png / ablation_class_grid.png (flow matching, as `make ablation`) and
curve.png. Every stage done before is reused (train.py resumes a killed run and does nothing
for a finished one; an evaluation at the model's exported step is read back), so the time it
reports is this invocation's. Planned: about 4 training minutes plus process start-ups and
evaluation, within 8 minutes on one H200 from a cached dataset; on a smaller GPU the same
minutes buy fewer steps. key=value arguments are train.py overrides for every model.

On a machine without CUDA it says so in one line and exits 0; --cpu-smoke runs the same
logic on the CPU with a tiny model, a few steps per model and N = 12 (tests/test_gpu_demo.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import common  # noqa: E402
from meanflow.config import load_config  # noqa: E402
from meanflow.checkpoint import checkpoint_step, list_checkpoints  # noqa: E402

TAG = "gpu-demo"
EDGE, CLASS = "configs/gpu_demo_edge.yaml", "configs/gpu_demo_class.yaml"
# name -> (config, overrides): MeanFlow and flow matching differ in one key
RUNS = {
    "edge_mf": (EDGE, []),
    "edge_fm": (EDGE, ["meanflow.ratio_r_neq_t=0.0"]),
    "class_mf": (CLASS, []),
    "class_fm": (CLASS, ["meanflow.ratio_r_neq_t=0.0"]),
}
STEPS = common.STEPS
WARM_START = {"edge_mf": "edge_mf_fm_half"}      # as demo/run.py: the edge MeanFlow model
TASKS = {"edge": "Edge -> image", "class": "Class -> image"}
LABELS = {"edge_mf": "MeanFlow (warm start)", "edge_fm": "flow matching",
          "class_mf": "MeanFlow", "class_fm": "flow matching"}
# runs/gpu_demo file -> the evaluation grid it is copied from (model, evaluation kind)
GRIDS = {"grid.png": ("edge_mf", "test"), "class_grid.png": ("class_mf", "classes"),
         "ablation_edge_grid.png": ("edge_fm", "test"),
         "ablation_class_grid.png": ("class_fm", "classes")}
OUTPUTS = [*GRIDS, "curve.png", "results.md", "results.json"]
# --cpu-smoke: every model tiny, fp32, a few steps (no time limit), a checkpoint every 2 steps
SMOKE = ["model.base_channels=8", "model.channel_mults=[1,2]", "model.num_res_blocks=1",
         "model.attn_resolutions=[16]", "train.batch_size=8", "train.mixed_precision=no",
         "data.num_workers=0", "train.warmup_steps=0", "train.max_minutes=0",
         "train.max_steps=6", "train.ckpt_every=2", "train.log_every=2"]
BUDGET_MINUTES = 8.0          # the plan for one H200 from a cached dataset (reported against)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="train.py config overrides for every model")
    ap.add_argument("--data", default=str(ROOT / "data/fashion"),
                    help="cached Fashion-MNIST (train/, test/)")
    ap.add_argument("--runs", default=None, help="models, evaluations, grids and tables "
                    "(default runs/gpu_demo; runs/gpu_demo_smoke with --cpu-smoke)")
    ap.add_argument("--num-samples", type=int, default=None,
                    help="N test samples per FID (default 10000, the whole test split; 12 "
                         "with --cpu-smoke)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--curve-points", type=int, default=3,
                    help="checkpoints per model on the learning curve besides the final model")
    ap.add_argument("--eval-batch", type=int, default=None,
                    help="evaluate.py --batch-size (default 500; 8 with --cpu-smoke)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="the same logic on the CPU: tiny models, a few steps, small N")
    a = ap.parse_intermixed_args(argv)
    if a.curve_points < 0:
        ap.error(f"--curve-points must be >= 0, got {a.curve_points}")
    for key, gpu, smoke in (("runs", str(ROOT / "runs/gpu_demo"),
                             str(ROOT / "runs/gpu_demo_smoke")),
                            ("num_samples", 10000, 12), ("eval_batch", 500, 8)):
        if getattr(a, key) is None:
            setattr(a, key, smoke if a.cpu_smoke else gpu)
    if a.cpu_smoke:                  # the user's overrides after the smoke ones, so they win
        a.overrides = [*SMOKE, *a.overrides]
    return a


def log(msg: str) -> None:
    common.log(msg, TAG)


def sh(cmd: list[str]) -> None:
    common.sh(cmd, TAG)


def parts_of(name: str, args) -> list[Path]:
    """The run folders a model trained in: a warm start's flow-matching half, then itself."""
    return [Path(args.runs) / p for p in ([WARM_START[name]] if name in WARM_START else [])
            + [name]]


def train(name: str, args) -> None:
    config, own = RUNS[name]
    warm = Path(args.runs) / WARM_START[name] if name in WARM_START else None
    common.train_model(config, own, Path(args.runs) / name, args, warm, sh=sh)


def eval_dir(name: str, kind: str, args) -> Path:
    return common.eval_dir(Path(args.runs), name, kind, args.num_samples, args.seed)


def evaluate(name: str, kind: str, args) -> list[dict]:
    return common.evaluate(Path(args.runs) / name, STEPS[name[-2:]], eval_dir(name, kind, args),
                           kind, args, extra=["--batch-size", str(args.eval_batch)], sh=sh,
                           log=log)


# --------------------------------------------------------------------------------------------
# The learning curve
# --------------------------------------------------------------------------------------------
def checkpoints(name: str, args) -> list[dict]:
    """Every complete checkpoint of a model, oldest first, with its training minutes counted
    from the model's start (a warm start's MeanFlow checkpoints after its flow-matching
    half's minutes) and its steps (a warm start's MeanFlow ones as "FM + MF"). The last one is
    the model's export."""
    out, offset, before = [], 0.0, ""
    for run_dir in parts_of(name, args):
        found = list_checkpoints(run_dir / "checkpoints")
        if not found:
            sys.exit(f"{TAG}: {run_dir / 'checkpoints'}: no complete checkpoint")
        for step, path in found:
            out.append(dict(ckpt=str(path), minutes=(offset + checkpoint_step(path)[1]) / 60,
                            steps=f"{before}{step}", phase=run_dir.name))
        last_step, last_s = checkpoint_step(found[-1][1])
        offset += last_s
        before += f"{last_step} + "
    export_step = common.export_info(Path(args.runs) / name)["step"]
    if found[-1][0] != export_step:
        sys.exit(f"{TAG}: {Path(args.runs) / name}: the export (step {export_step}) is not its "
                 f"last checkpoint ({found[-1][1].name})")
    return out


def pick(points: list[dict], k: int) -> list[dict]:
    """Up to ``k`` of the checkpoints before the last (the final model, scored in the tables),
    each the nearest to i / (k + 1) of the last one's minutes, i = 1..k; oldest first."""
    total, chosen = points[-1]["minutes"], []
    for i in range(1, k + 1):
        if len(points) < 2:
            break
        target = total * i / (k + 1)
        best = min(points[:-1], key=lambda p: abs(p["minutes"] - target))
        if best not in chosen:
            chosen.append(best)
    return sorted(chosen, key=lambda p: p["minutes"])


def curve_scores(ckpts: list[str], out: Path, args) -> dict:
    """ckpt -> evaluate.py's 1-step row: one evaluate.py for all of them (its curve mode for
    several, each in its own subfolder of ``out``), read back when done with these N/seed."""
    if not ckpts:
        return {}
    many = len(ckpts) > 1
    file = out / ("curve.json" if many else "results.json")

    def read() -> dict:
        got = json.loads(file.read_text())
        if many:
            if (got["meta"]["n"], got["meta"]["seed"]) != (args.num_samples, args.seed):
                return {}
            return {m["ckpt"]: m["results"][0] for m in got["models"]}
        if (got["meta"]["n"], got["meta"]["seed"]) != (args.num_samples, args.seed):
            return {}
        return {got["meta"]["ckpt"]: got["results"][0]}
    if file.is_file() and set(read()) == set(ckpts):
        log(f"reusing {file}")
        return read()
    sh([sys.executable, "evaluate.py", "--ckpt", *ckpts, "--steps", "1", "--split", "test",
        "--num-samples", str(args.num_samples), "--fid", "--no-png", "--seed", str(args.seed),
        "--batch-size", str(args.eval_batch), "--out", str(out)])
    return read()


def curve(task: str, res: dict, args) -> list[dict]:
    """The task's learning curve: per model, the picked checkpoints' 1-step FID (evaluate.py
    on the same N test samples) and the final model's, from its row in ``res``."""
    names = [f"{task}_mf", f"{task}_fm"]
    points = {n: checkpoints(n, args) for n in names}
    chosen = {n: pick(points[n], args.curve_points) for n in names}
    out = Path(args.runs) / "curve" / f"{task}_n{args.num_samples}_seed{args.seed}"
    scores = curve_scores([p["ckpt"] for n in names for p in chosen[n]], out, args)
    rows = []
    for n in names:
        final = next(r for r in res[n] if r["steps"] == 1)
        for p, r in [(p, scores[p["ckpt"]]) for p in chosen[n]] + [(points[n][-1], final)]:
            rows.append(dict(task=task, model=n, minutes=p["minutes"], steps=p["steps"],
                             phase=p["phase"], ckpt=p["ckpt"], fid=r["fid"],
                             edge_f1=r.get("edge_f1"), final=p is points[n][-1]))
    return rows


def switch_minutes(name: str, args) -> float:
    """Where a warm start turns from flow matching to MeanFlow: its half's training minutes."""
    last = list_checkpoints(parts_of(name, args)[0] / "checkpoints")[-1][1]
    return checkpoint_step(last)[1] / 60


def plot_curve(path: Path, rows: list[dict], args) -> None:
    """curve.png: one panel per task, 1-step FID against training minutes, MeanFlow and flow
    matching; a dotted line where a warm start turns to MeanFlow."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.6 * len(TASKS), 3.6), squeeze=False)
    for ax, (task, title) in zip(axes[0], TASKS.items()):
        for name in (f"{task}_mf", f"{task}_fm"):
            pts = [(r["minutes"], r["fid"]) for r in rows if r["model"] == name]
            ax.plot(*zip(*pts), marker="o", label=LABELS[name])
            if name in WARM_START:
                ax.axvline(switch_minutes(name, args), color="gray", ls=":",
                           label="warm start: MeanFlow from here")
        ax.set_xlabel("training minutes")
        ax.set_ylabel(f"1-step FID (N = {args.num_samples})")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def bars_table(res: dict) -> tuple[list[str], dict]:
    """The bars (common.bar, as demo/options.py's last column), one row per task."""
    lines = ["| task | MeanFlow 1 step | flow matching 1 step | reference | ratio | target | "
             "met |", "|---|---|---|---|---|---|---|"]
    out = {}
    for task in TASKS:
        b = common.bar(task, dict(results=res[f"{task}_mf"]), dict(results=res[f"{task}_fm"]))
        out[task] = b
        if b is None:
            lines.append(f"| {task} | n/a | n/a | | | | no |")
            continue
        if task == "edge":
            k = b["ref_steps"]
            ref = f"flow matching's best: {b['ref']:.1f} at {k} step{'s' * (k != 1)}"
            target = (f"<= {common.EDGE_BAR:g}, and MeanFlow 1 step < flow matching 1 step")
        else:
            ref = f"flow matching 1 step: {b['ref']:.1f}"
            target = f"<= {common.CLASS_BAR:.2f}"
        lines.append(f"| {task} | {b['mf_1']:.1f} | {b['fm_1']:.1f} | {ref} | {b['ratio']:.2f} "
                     f"| {target} | {'yes' if b['met'] else 'no'} |")
    return lines, out


def curve_table(rows: list[dict]) -> list[str]:
    lines = ["| task | model | training minutes | training steps | 1-step FID | edge F1 | "
             "checkpoint |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        f1 = "" if r["edge_f1"] is None else f"{r['edge_f1']:.3f}"
        where = "final model (the tables' row)" if r["final"] else Path(r["ckpt"]).relative_to(
            Path(r["ckpt"]).parents[2]).as_posix()
        lines.append(f"| {r['task']} | {LABELS[r['model']]} | {r['minutes']:.2f} | {r['steps']} "
                     f"| {r['fid']:.1f} | {f1} | {where} |")
    return lines


def model_line(args) -> str:
    """Each task's network size, batch and precision, read from the runs' config.yaml."""
    import models
    parts = []
    for task, name in (("edge", "edge_mf"), ("class", "class_mf")):
        cfg = load_config(Path(args.runs) / name / "config.yaml")
        n = sum(p.numel() for p in models.build(cfg.model).parameters())
        parts.append(f"{task} U-Net {n / 1e6:.2f}M parameters ({cfg.model.base_channels} "
                     f"channels, mults {cfg.model.channel_mults}), batch "
                     f"{cfg.train.batch_size}, train.mixed_precision={cfg.train.mixed_precision}")
    prec = json.loads((eval_dir("edge_mf", "test", args) / "results.json").read_text())[
        "meta"]["precision"]
    return "; ".join(parts) + f"; sampling precision {prec} (evaluate.py --precision auto)."


def gpu_line(args) -> str:
    import torch
    if args.cpu_smoke or not torch.cuda.is_available():
        return "GPU: none (--cpu-smoke: the CPU, tiny models, fp32)."
    p = torch.cuda.get_device_properties(0)
    return f"GPU: {p.name}, {p.total_memory / 2 ** 30:.0f} GiB."


def write_results(res: dict, curves: dict, stages: dict, total_s: float, args) -> str:
    runs = Path(args.runs)
    info = {k: common.trained(parts_of(k, args), RUNS[k][0]) for k in RUNS}
    bars, bar_vals = bars_table(res)
    rows = [r for task in TASKS for r in curves[task]]
    n = args.num_samples
    text = ["# GPU demo: MeanFlow against flow matching at equal minutes", "",
            *common.runs_table(info), "", gpu_line(args), "", model_line(args), ""]
    for task, title in TASKS.items():
        cond = ("test edges; FID/KID against their real photos; edge F1: Canny of the sample "
                "against the input edges" if task == "edge" else
                "test labels; FID/KID against the real photos of the same samples")
        text += [f"## {title}", "", f"N = {n} {cond}.", "",
                 *common.scores_table([(LABELS[m], r) for m in (f"{task}_mf", f"{task}_fm")
                                       for r in res[m]]), ""]
    text += ["![edge | real | MeanFlow 1, 2, 4 steps](grid.png)", "",
             "Columns: edge map, real photo, MeanFlow (warm start) at 1, 2 and 4 steps.", "",
             "![edge | real | flow matching 1, 2, 4, 16 steps](ablation_edge_grid.png)", "",
             "Flow matching on the same edges: edge, real, 1, 2, 4 and 16 steps.", "",
             "![one row per class: MeanFlow 1, 2, 4 steps](class_grid.png)", "",
             "![one row per class: flow matching 1, 2, 4, 16 steps](ablation_class_grid.png)",
             "", f"Rows: {common.classes(runs / 'class_mf')}. Columns: MeanFlow at 1, 2 and 4 "
             "steps (class_grid.png), flow matching at 1, 2, 4 and 16 (ablation_class_grid.png).",
             "", "## The bars", "",
             "Ratio: MeanFlow's 1-step FID over the reference (edge: flow matching's best over "
             "its step counts; class: flow matching's 1 step).", "", *bars, "",
             "## Learning curve", "",
             f"1-step FID (N = {n}, the same samples) of checkpoints the runs wrote, against "
             "training minutes (a warm start's MeanFlow checkpoints after its flow-matching "
             "half's minutes; its steps as flow matching's + MeanFlow's).", "",
             "![1-step FID against training minutes](curve.png)", "", *curve_table(rows), "",
             "## Time", "",
             f"This invocation: {total_s / 60:.1f} min wall clock (the plan: at most "
             f"{BUDGET_MINUTES:g} min on one H200 from a cached dataset; stages reused from an "
             "earlier invocation take seconds here).", "", "| stage | seconds |", "|---|---|",
             *[f"| {k} | {v:.0f} |" for k, v in stages.items()], ""]
    md = "\n".join(text)
    (runs / "results.md").write_text(md)
    (runs / "results.json").write_text(json.dumps(dict(
        n=n, seed=args.seed, cpu_smoke=args.cpu_smoke, runs=info, results=res, bars=bar_vals,
        curve=rows, stages=stages, total_s=total_s), indent=2))
    return md


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"{TAG}: no CUDA GPU on this machine; nothing to run (use --cpu-smoke to run its "
              "logic on the CPU)")
        return 0
    if args.cpu_smoke:                                  # the CPU even where a GPU is visible
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    t_all, stages = time.time(), {}

    def timed(stage: str, fn, *a):
        t0 = time.time()
        out = fn(*a)
        stages[stage] = time.time() - t0
        return out
    timed("dataset cache", common.ensure_data, Path(args.data), sh)
    for name in RUNS:
        timed(f"train {name}", train, name, args)
    res = {name: timed(f"evaluate {name}", evaluate, name, "test", args) for name in RUNS}
    for name in RUNS:
        if name.startswith("class"):
            timed(f"class grid {name}", evaluate, name, "classes", args)
    for dst, (name, kind) in GRIDS.items():
        shutil.copyfile(eval_dir(name, kind, args) / "grid.png", Path(args.runs) / dst)
    curves = {task: timed(f"curve {task}", curve, task, res, args) for task in TASKS}
    plot_curve(Path(args.runs) / "curve.png", [r for t in TASKS for r in curves[t]], args)
    md = write_results(res, curves, stages, time.time() - t_all, args)
    print(md, flush=True)
    log(f"done: {Path(args.runs) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
