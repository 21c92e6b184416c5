"""The CPU demo, MeanFlow against flow matching, and the README's pictures, on Fashion-MNIST.

    python demo/run.py demo        # edge -> image and class -> image MeanFlow models; FID, KID
                                   # and edge F1 at 1, 2, 4 steps; grids; runs/demo/results.md
    python demo/run.py ablation    # the demo, plus both models trained as flow matching, every
                                   # FID at one N, the floor (real train vs real test images)
    python demo/run.py pictures    # copy runs/demo's grids and tables into docs/demo/

Training budget: each model trains for its config's train.max_minutes of wall-clock time
(configs/fashion_demo.yaml 9.0, configs/fashion_class.yaml 4.0); flow matching is the same
config with meanflow.ratio_r_neq_t=0, so it gets the same minutes. The edge MeanFlow model is a
warm start (WARM_START): flow matching for half of its minutes, then MeanFlow from that export
for the other half, which beat MeanFlow from scratch at equal minutes on both seeds
(demo/options.py, docs/results.md). The steps this buys depend on the machine; the reports give
them. key=value arguments are train.py overrides for every model.

train.py trains (it resumes a killed run; a finished one does nothing), evaluate.py samples,
scores and draws the grids, preprocess/fid_stats.py writes the floor's statistics; an
evaluation whose results.json is at the model's exported step is read back. demo and ablation
write under --runs only; pictures is the one command that writes into the source tree.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import common  # noqa: E402
from demo.common import export_info, hardware, runs_table, scores_table  # noqa: E402,F401
from meanflow import metrics  # noqa: E402

# name -> (config, overrides): MeanFlow and flow matching differ in one key
RUNS = {
    "edge_mf": ("configs/fashion_demo.yaml", []),
    "class_mf": ("configs/fashion_class.yaml", []),
    "edge_fm": ("configs/fashion_demo.yaml", ["meanflow.ratio_r_neq_t=0.0"]),
    "class_fm": ("configs/fashion_class.yaml", ["meanflow.ratio_r_neq_t=0.0"]),
}
STEPS = common.STEPS
# Warm starts, the winner at equal minutes on both seeds (docs/results.md, "MeanFlow's
# options"): the model first trains as flow matching for half its budget (this run folder),
# then as MeanFlow from that export (train.init_from) for the other half.
WARM_START = {"edge_mf": "edge_mf_fm_half"}
# runs/demo file -> the evaluation grid it is copied from (model, evaluation kind)
GRIDS = {"grid.png": ("edge_mf", "test"), "class_grid.png": ("class_mf", "classes"),
         "ablation_edge_grid.png": ("edge_fm", "test"),
         "ablation_class_grid.png": ("class_fm", "classes")}
PICTURES = [*GRIDS, "results.md", "ablation.md", "ablation.json"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["demo", "ablation", "pictures"])
    ap.add_argument("overrides", nargs="*", help="train.py config overrides for every model")
    ap.add_argument("--data", default=str(ROOT / "data/fashion"),
                    help="cached Fashion-MNIST (train/, test/)")
    ap.add_argument("--runs", default=str(ROOT / "runs/demo"),
                    help="models, evaluations, grids and tables")
    ap.add_argument("--num-samples", type=int, default=1000,
                    help="N test samples per FID, and N images per side of the floor")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--to", default=str(ROOT / "docs/demo"), help="where `pictures` copies to")
    return ap.parse_intermixed_args(argv)


def log(msg: str) -> None:
    common.log(msg, "demo")


def sh(cmd: list[str]) -> None:
    common.sh(cmd, "demo")


def train(name: str, args) -> None:
    config, own = RUNS[name]
    warm = Path(args.runs) / WARM_START[name] if name in WARM_START else None
    common.train_model(config, own, Path(args.runs) / name, args, warm, sh=sh)


def eval_dir(name: str, kind: str, args) -> Path:
    return common.eval_dir(Path(args.runs), name, kind, args.num_samples, args.seed)


def evaluate(name: str, kind: str, args) -> list[dict]:
    """evaluate.py on the model's export (common.evaluate): "test" is FID/KID (and edge F1)
    on N test samples, "classes" one sample per class for the grid."""
    return common.evaluate(Path(args.runs) / name, STEPS[name[-2:]], eval_dir(name, kind, args),
                           kind, args, sh=sh, log=log)


def floor(args) -> dict:
    """FID of N real train images against N real test images (both spread over the split)."""
    files = {}
    for split in ("train", "test"):
        files[split] = Path(args.runs) / "floor" / f"{split}_n{args.num_samples}.npz"
        if not files[split].is_file():
            sh([sys.executable, "preprocess/fid_stats.py", "--input", str(Path(args.data) / split),
                "--num-samples", str(args.num_samples), "--output", str(files[split]),
                "--workers", "0"])
    stats = {k: metrics.load_reference_npz(f) for k, f in files.items()}
    return dict(fid=metrics.fid_from_statistics(stats["train"], stats["test"]),
                n=args.num_samples, **{f"{k}_stats": str(f) for k, f in files.items()})


def trained(name: str, args) -> dict:
    """Steps, training minutes and budget (common.trained); a warm start's are the sums over
    its flow-matching half and its MeanFlow half ("FM + MF" steps)."""
    parts = [WARM_START[name], name] if name in WARM_START else [name]
    return common.trained([Path(args.runs) / p for p in parts], RUNS[name][0])


def classes(args) -> str:
    return common.classes(Path(args.runs) / "class_mf")


def write_demo(res: dict, args) -> None:
    info = {k: trained(k, args) for k in ("edge_mf", "class_mf")}
    text = ["# Demo: Fashion-MNIST edges -> photos in one step", "", *runs_table(info), "",
            "## Edge -> image", "", f"N = {args.num_samples} test edges spread over the "
            "split; FID/KID against their real photos; edge F1: Canny of the sample against "
            "the input edges.", "", *scores_table([("MeanFlow", r) for r in res["edge_mf"]]),
            "", "![edge | real | 1 step | 2 steps | 4 steps](grid.png)", "",
            "Columns: edge map, real photo, MeanFlow at 1, 2 and 4 steps.", "",
            "## Class -> image", "", "![one row per class: 1, 2, 4 steps](class_grid.png)", "",
            f"Rows: {classes(args)}. Columns: MeanFlow at 1, 2 and 4 steps.", ""]
    (Path(args.runs) / "results.md").write_text("\n".join(text))


def write_ablation(res: dict, fl: dict, args) -> None:
    info = {k: trained(k, args) for k in RUNS}
    floor_row = ("real train images (floor)", dict(fid=fl["fid"], n=fl["n"]))
    text = ["# MeanFlow against flow matching at equal minutes", "", *runs_table(info), "",
            f"N = {args.num_samples} test samples for every FID; the floor is N real train "
            "images against the same N real test images.", ""]
    for task, title in (("edge", "Edge -> image"), ("class", "Class -> image")):
        rows = ([("MeanFlow", r) for r in res[f"{task}_mf"]]
                + [("flow matching", r) for r in res[f"{task}_fm"]] + [floor_row])
        text += [f"## {title}", "", *scores_table(rows), ""]
    text += ["![edge | real | flow matching 1, 2, 4, 16 steps](ablation_edge_grid.png)", "",
             "Flow matching on grid.png's edges: edge, real, 1, 2, 4 and 16 steps.", "",
             "![one row per class: flow matching 1, 2, 4, 16 steps](ablation_class_grid.png)",
             "", f"Rows: {classes(args)}. Columns: flow matching at 1, 2, 4 and 16 steps.", ""]
    runs = Path(args.runs)
    (runs / "ablation.md").write_text("\n".join(text))
    (runs / "ablation.json").write_text(json.dumps(
        dict(n=args.num_samples, seed=args.seed, floor=fl, runs=info, results=res), indent=2))


def pictures(args) -> int:
    runs, to = Path(args.runs), Path(args.to)
    if not (runs / "results.md").is_file():
        sys.exit(f"demo: {runs / 'results.md'} not found: run `python demo/run.py demo` first")
    to.mkdir(parents=True, exist_ok=True)
    for f in PICTURES:
        if (runs / f).is_file():
            shutil.copyfile(runs / f, to / f)
            log(f"{runs / f} -> {to / f}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.what == "pictures":
        return pictures(args)
    common.ensure_data(Path(args.data), sh=sh)
    names = list(RUNS)[:2] if args.what == "demo" else list(RUNS)
    for name in names:
        train(name, args)
    res = {name: evaluate(name, "test", args)
           for name in names if name.startswith("edge") or args.what == "ablation"}
    for name in names:
        if name.startswith("class"):
            evaluate(name, "classes", args)
    for dst, (name, kind) in GRIDS.items():
        if name in names:
            shutil.copyfile(eval_dir(name, kind, args) / "grid.png", Path(args.runs) / dst)
    write_demo(res, args)
    if args.what == "ablation":
        write_ablation(res, floor(args), args)
    log(f"done: {Path(args.runs)}/{'results' if args.what == 'demo' else 'ablation'}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
