"""What the demo's entry points share: demo/run.py (`make demo`, `make ablation`),
demo/gpu_demo.py (`make gpu-demo`) and demo/options.py (`make options`).

Training through train.py (a warm start in two halves of the config's minutes), evaluation
through evaluate.py (read back when its results.json is at the model's exported step), what a
run trained (steps, minutes, budget), the markdown tables and the bars against flow matching.
Every command runs in the checkout's root; ``sh`` and ``log`` are passed in by the entry
points so that their messages carry the entry point's name.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from meanflow.config import load_config  # noqa: E402
from meanflow.checkpoint import checkpoint_step, list_checkpoints  # noqa: E402

STEPS = {"mf": [1, 2, 4], "fm": [1, 2, 4, 16]}       # sampling steps: MeanFlow, flow matching


def log(msg: str, tag: str = "demo") -> None:
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: list[str], tag: str = "demo") -> None:
    """Run ``cmd`` in the checkout's root; a failure exits with its code and command."""
    log("$ " + " ".join(cmd), tag)
    res = subprocess.run(cmd, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"{tag}: exit code {res.returncode}: {' '.join(cmd)}")


def ensure_data(data: Path, sh: Callable = sh) -> None:
    """Fashion-MNIST cached as the demos read it (32x32 pixels, Canny edges, labels)."""
    if not all((data / s / "data.mdb").is_file() for s in ("train", "test")):
        sh([sys.executable, "preprocess/cache.py", "--source", "fashion-mnist", "--output",
            str(data), "--image-size", "32", "--codec", "pixel", "--edges", "canny"])


def train_model(config: str, own: Sequence[str], run_dir: Path, args,
                warm_half: Optional[Path] = None, sh: Callable = sh) -> None:
    """train.py for one model: ``config`` with the data at ``args.data``, ``args.overrides``
    and the model's ``own`` overrides. With ``warm_half`` it is a warm start: flow matching for
    half of the config's train.max_minutes in that folder, then MeanFlow from its export
    (train.init_from) for the other half."""
    data = Path(args.data)
    over = [f"data.path={data / 'train'}", f"data.val_path={data / 'test'}", *args.overrides,
            *own]

    def run(folder: Path, *extra: str) -> None:
        sh([sys.executable, "train.py", "--config", config, "--run-dir", str(folder), *over,
            *extra])
    if warm_half is not None:               # the budget in two halves: flow matching, MeanFlow
        half = f"train.max_minutes={load_config(ROOT / config, over).train.max_minutes / 2:g}"
        run(warm_half, "meanflow.ratio_r_neq_t=0.0", half)
        over += [half, f"train.init_from={warm_half / 'export'}"]
    run(run_dir)


def export_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "export" / "model_config.json").read_text())


def eval_dir(runs: Path, name: str, kind: str, n: int, seed: int) -> Path:
    tag = f"_n{n}" if kind == "test" else ""
    return Path(runs) / name / "eval" / f"{kind}{tag}_seed{seed}"


def evaluate(run_dir: Path, steps: list[int], out: Path, kind: str, args,
             extra: Sequence[str] = (), sh: Callable = sh, log: Callable = log) -> list[dict]:
    """evaluate.py on the model's export: ``kind`` "test" is FID/KID (and edge F1) on
    ``args.num_samples`` test samples spread over the split; "classes" is one sample per class
    (balanced labels), for the grid only. Read back when its results.json is at the export's
    step with these step counts. ``extra``: more evaluate.py arguments (e.g. --batch-size)."""
    res_file = out / "results.json"
    if res_file.is_file():
        res = json.loads(res_file.read_text())
        if (res["meta"]["step"] == export_info(run_dir)["step"]
                and [r["steps"] for r in res["results"]] == steps):
            log(f"reusing {res_file}")
            return res["results"]
    cmd = [sys.executable, "evaluate.py", "--ckpt", str(run_dir), "--compare-steps",
           ",".join(map(str, steps)), "--seed", str(args.seed), "--no-png", "--out", str(out),
           *extra]
    if kind == "test":
        cmd += ["--split", "test", "--num-samples", str(args.num_samples), "--fid"]
    else:
        classes = export_info(run_dir)["model"]["num_classes"]  # row i: class i
        cmd += ["--balanced-labels", "--num-samples", str(classes), "--grid-rows", str(classes)]
    sh(cmd)
    return json.loads(res_file.read_text())["results"]


def trained(parts: list[Path], config: str) -> dict:
    """Steps (the export's), training minutes (the last checkpoint's) and the budget of a model
    trained in ``parts`` (one run folder; a warm start's flow-matching half, then its MeanFlow
    run: the sums over both, steps as "FM + MF")."""
    steps, minutes, budget = [], 0.0, 0.0
    for run_dir in parts:
        minutes += checkpoint_step(list_checkpoints(run_dir / "checkpoints")[-1][1])[1] / 60
        cfg = load_config(run_dir / "config.yaml")
        steps.append(export_info(run_dir)["step"])
        budget += cfg.train.max_minutes
    return dict(config=config, ratio_r_neq_t=cfg.meanflow.ratio_r_neq_t,
                steps=" + ".join(map(str, steps)) if len(steps) > 1 else steps[0],
                minutes=round(minutes, 2), max_minutes=budget, warm_start=len(parts) > 1)


def classes(run_dir: Path) -> str:
    return ", ".join(export_info(run_dir)["dataset_meta"]["class_names"])


def hardware() -> str:
    import torch
    info = Path("/proc/cpuinfo")
    cpu = re.search(r"^model name\s*:\s*(.+)$", info.read_text() if info.is_file() else "", re.M)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"Hardware: {cpu[1] if cpu else platform.machine()}, {os.cpu_count()} cores, {gpu}; "
            f"torch {torch.__version__}.")


def runs_table(info: dict) -> list[str]:
    out = [hardware(), "", "| model | config | r != t share | training steps | minutes | "
           "train.max_minutes |", "|---|---|---|---|---|---|"]
    out += [f"| {k}{' (warm start)' * v['warm_start']} | {v['config']} | "
            f"{v['ratio_r_neq_t']:g} | {v['steps']} | {v['minutes']:.1f} | "
            f"{v['max_minutes']:g} |" for k, v in info.items()]
    if any(v["warm_start"] for v in info.values()):
        out += ["", "Warm start: flow matching for half of the budget, then MeanFlow from its "
                "export for the other half; steps are flow matching's + MeanFlow's."]
    return out


def scores_table(rows: list[tuple[str, dict]]) -> list[str]:
    out = ["| model | steps | FID | KID x 1e3 | edge F1 | N |", "|---|---|---|---|---|---|"]
    for label, r in rows:
        cells = [label, r.get("steps", ""), f"{r['fid']:.1f}",
                 f"{1e3 * r['kid']:.2f}" if "kid" in r else "",
                 f"{r['edge_f1']:.3f}" if "edge_f1" in r else "", r["n"]]
        out.append("| " + " | ".join(map(str, cells)) + " |")
    return out


# --------------------------------------------------------------------------------------------
# The bars: MeanFlow's 1 step against flow matching at equal minutes
# --------------------------------------------------------------------------------------------
EDGE_BAR, CLASS_BAR = 1.1, 1 / 3


def fid_at(run: dict, steps: int):
    return next((r["fid"] for r in run["results"] if r["steps"] == steps), None)


def bar(task: str, mf: dict, fm: dict) -> Optional[dict]:
    """MeanFlow's 1-step FID against the bar (``mf``/``fm``: dicts with "results", evaluate.py's
    rows): edge, over flow matching's best FID over its step counts, at most 1.1 and below flow
    matching's own 1 step; class, over flow matching's 1 step, at most 1/3. None when either
    has no 1-step FID. Returns the numbers the ratio is made of, the ratio and whether met."""
    one, fm_one = fid_at(mf, 1), fid_at(fm, 1)
    if one is None or fm_one is None:
        return None
    if task == "edge":
        best = min(fm["results"], key=lambda r: r["fid"])
        ref, ref_steps = best["fid"], best["steps"]
        ratio = one / ref
        met = ratio <= EDGE_BAR and one < fm_one
    else:
        ref, ref_steps = fm_one, 1
        ratio = one / fm_one
        met = ratio <= CLASS_BAR
    return dict(mf_1=one, fm_1=fm_one, ref=ref, ref_steps=ref_steps, ratio=ratio, met=met)


def versus(task: str, mf: dict, fm: dict) -> str:
    """One seed's MeanFlow 1-step FID against the bar, as a table cell: "1.09 met", "1.12",
    "n/a"."""
    b = bar(task, mf, fm)
    if b is None:
        return "n/a"
    return f"{b['ratio']:.2f}{' met' if b['met'] else ''}"
