"""MeanFlow's options against plain MeanFlow and flow matching, at equal wall clock.

    python demo/options.py --task edge --minutes 3 --seeds 0 1      # make options
    python demo/options.py --task class --minutes 3 --seeds 0 1

Every row gets the same training minutes on one thread (two runs side by side on a 2-core
machine), counted as the training process's CPU time (train.budget_clock=cpu), so that other
work on the machine does not move the budget; a teacher's or warm start's own flow-matching
minutes count in that budget (half of it, then half for the MeanFlow run that uses it). Each
model is evaluated on the same N test samples (FID at N = 1,000 by default; MeanFlow at 1, 2,
4 steps, flow matching at 1, 2, 4, 16: --mf-steps / --fm-steps change the lists).
Rows:

  flow matching         meanflow.ratio_r_neq_t=0
  MeanFlow              the demo config as it is
  warm start            flow matching for half the minutes, then MeanFlow from its export
                        (train.init_from)
  AlphaFlow             meanflow.alpha_steps: alpha from 1 to 0 over the first 60% of the
                        steps that the plain MeanFlow run made in the same minutes
  teacher               flow matching for half the minutes, then MeanFlow with its velocity
                        as the target's (meanflow.teacher)
  DMF times             meanflow.time_dist=dmf

Writes OUT/options_<task>.json and .md (one table, options as rows, each seed and the mean).
Runs already done (same config, minutes and seed) are reused, so a killed run resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo.common import fid_at, versus  # noqa: E402  (the bars, shared with make gpu-demo)

CONFIGS = {"edge": "configs/fashion_demo.yaml", "class": "configs/fashion_class.yaml"}
MF_STEPS, FM_STEPS = [1, 2, 4], [1, 2, 4, 16]


def sh(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}; log {log}")


def train(a, run: Path, minutes: float, seed: int, *over: str) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    sh([sys.executable, "train.py", "--config", CONFIGS[a.task], "--run-dir", str(run),
        f"data.path={a.data}/train", f"data.val_path={a.data}/test", "data.num_workers=0",
        f"train.max_minutes={minutes}", "train.budget_clock=cpu", "train.max_steps=1000000",
        f"train.seed={seed}",
        "train.image_every=1000000", *over], run / "train.log")
    return run


def steps_of(run: Path) -> int:
    return json.loads((run / "export" / "model_config.json").read_text())["step"]


def evaluate(a, run: Path, steps: list[int]) -> list[dict]:
    out = run / "eval_options"
    res = out / "results.json"
    if res.is_file():
        got = json.loads(res.read_text())
        if got["meta"]["step"] == steps_of(run) and [r["steps"] for r in got["results"]] == steps:
            return got["results"]
    sh([sys.executable, "evaluate.py", "--ckpt", str(run), "--data", f"{a.data}/test",
        "--compare-steps", ",".join(map(str, steps)), "--num-samples", str(a.n), "--fid",
        "--no-png", "--out", str(out), *([] if a.task == "edge" else ["--no-edge-f1"])],
       run / "eval.log")
    return json.loads(res.read_text())["results"]


def row(a, name: str, seed: int) -> dict:
    base = Path(a.out) / a.task / f"seed{seed}"
    m = a.minutes
    if name == "flow matching":
        run = train(a, base / "fm", m, seed, "meanflow.ratio_r_neq_t=0")
        return dict(steps=steps_of(run), results=evaluate(a, run, a.fm_steps))
    if name == "MeanFlow":
        run = train(a, base / "mf", m, seed)
    elif name in ("warm start", "teacher"):
        fm = train(a, base / "fm_half", m / 2, seed, "meanflow.ratio_r_neq_t=0")
        key = "train.init_from" if name == "warm start" else "meanflow.teacher"
        run = train(a, base / name.replace(" ", "_"), m / 2, seed, f"{key}={fm / 'export'}")
    elif name == "AlphaFlow":
        ref = train(a, base / "mf", m, seed)            # the plain run's step count in m minutes
        run = train(a, base / "alphaflow", m, seed,
                    f"meanflow.alpha_steps={int(0.6 * steps_of(ref))}")
    elif name == "DMF times":
        run = train(a, base / "dmf", m, seed, "meanflow.time_dist=dmf")
    else:
        raise ValueError(name)
    steps = steps_of(run)
    if name in ("warm start", "teacher"):           # flow-matching steps + MeanFlow steps
        steps = f"{steps_of(fm)} + {steps}"
    return dict(steps=steps, results=evaluate(a, run, a.mf_steps))


ROWS = ("flow matching", "MeanFlow", "warm start", "AlphaFlow", "teacher", "DMF times")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=tuple(CONFIGS), default="edge")
    ap.add_argument("--minutes", type=float, default=3.0, help="training minutes per row")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--n", type=int, default=1000, help="samples for FID")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--data", default=str(ROOT / "data" / "fashion"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "options"))
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    ap.add_argument("--mf-steps", type=int, nargs="+", default=MF_STEPS,
                    help="sampling steps at which the MeanFlow rows are evaluated")
    ap.add_argument("--fm-steps", type=int, nargs="+", default=FM_STEPS,
                    help="sampling steps at which flow matching is evaluated")
    a = ap.parse_args(argv)
    jobs = [(name, s) for s in a.seeds for name in a.rows]
    # First the runs that others build on (the plain MeanFlow run sizes AlphaFlow's schedule;
    # the half-budget flow-matching run serves the warm start and the teacher), so that no two
    # jobs ever train the same run folder at once.
    first = [j for j in jobs if j[0] == "MeanFlow"]
    halves = [s for s in a.seeds if {"warm start", "teacher"} & set(a.rows)]
    got = {}
    with ThreadPoolExecutor(a.jobs) as pool:
        done = list(pool.map(lambda j: row(a, *j), first))
        list(pool.map(lambda s: train(a, Path(a.out) / a.task / f"seed{s}" / "fm_half",
                                      a.minutes / 2, s, "meanflow.ratio_r_neq_t=0"), halves))
        got.update(zip(first, done))
        rest = [j for j in jobs if j not in first]
        got.update(zip(rest, pool.map(lambda j: row(a, *j), rest)))
    table = {name: {s: got[(name, s)] for s in a.seeds} for name in a.rows}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"options_{a.task}.json").write_text(json.dumps(dict(
        task=a.task, minutes=a.minutes, seeds=a.seeds, n=a.n, rows=table), indent=2))
    cols = sorted(set(a.mf_steps) | set(a.fm_steps))
    bar = ("MeanFlow 1 step / flow matching's best (target <= 1.1, and below flow matching's "
           "1 step)" if a.task == "edge" else
           "MeanFlow 1 step / flow matching's 1 step (target <= 0.33)")
    lines = [f"{a.task} task, {a.minutes:g} training minutes per row (CPU time of one thread), "
             f"FID at N = {a.n}; seeds {', '.join(map(str, a.seeds))}: per seed and mean. "
             f"Last column: {bar}, per seed", "",
             "| option | steps | " + " | ".join(f"{k} step{'s' * (k > 1)}" for k in cols)
             + " | best | vs flow matching |",
             "|---|---|" + "---|" * len(cols) + "---|---|"]
    for name in a.rows:
        per = table[name]
        cells = []
        for k in cols:
            vals = [fid_at(per[s], k) for s in a.seeds]
            vals = [v for v in vals if v is not None]
            cells.append(" / ".join(f"{v:.1f}" for v in vals) +
                         (f" (mean {sum(vals) / len(vals):.1f})" if len(vals) > 1 else "")
                         if vals else "")
        best = min(r["fid"] for s in a.seeds for r in per[s]["results"])
        vs = ("" if name == "flow matching" or "flow matching" not in table else
              " / ".join(versus(a.task, per[s], table["flow matching"][s]) for s in a.seeds))
        lines.append(f"| {name} | {' / '.join(str(per[s]['steps']) for s in a.seeds)} | "
                     + " | ".join(cells) + f" | {best:.1f} | {vs} |")
    (Path(a.out) / f"options_{a.task}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
