"""Generate images with a trained model from your own edge maps, sketches, photos or labels.

    python sample.py --ckpt runs/afhq_unet --input my_edges/ --out out/
    python sample.py --ckpt runs/afhq_unet --input photos/ --from-photos --num-per-input 4
    python sample.py --ckpt runs/demo/class_mf --labels 3,Sneaker --num-per-input 8 --out out/

Edge maps and sketches may be white-on-black or black-on-white, of any size and aspect: they
are centre-cropped, resized and binarised the way the training data's edges were (from the
metadata the model records). With --from-photos, the dataset's own edge detector makes the
edges. One PNG per sample, and sheet.png: one row per input, [input | outputs].

Sample k (inputs in order, --num-per-input each) draws its noise from (--seed, k), as in
evaluate.py, so the images do not depend on --batch-size. The device is chosen automatically
(CUDA with bf16 where present) unless --device says otherwise. Every input (and --out,
--device) is checked before anything is generated or written. A rerun into the same --out
replaces the earlier run's images: those it would not write again are deleted (sample.py's
own files only; the folder's .meanflow-outputs.json lists them). A restart starts over.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class UsageError(ValueError):
    """Bad arguments: reported in one line before any work."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line naming the culprit, exit code 2
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True,
                    help="run folder (with export/), export or saved pipeline folder, or a "
                         "checkpoint (RUN/checkpoints/step_N)")
    ap.add_argument("--input", nargs="+", default=[],
                    help="image files or folders (a folder's images, sorted by name)")
    ap.add_argument("--from-photos", action="store_true",
                    help="inputs are photos: the dataset's edge detector makes their edges")
    ap.add_argument("--labels", default=None,
                    help="comma-separated class indices or names, e.g. 3,7 or Sneaker,Bag "
                         "(class-conditional models)")
    ap.add_argument("--out", default="samples", help="output folder (default samples/)")
    ap.add_argument("--steps", type=int, default=1, help="sampling steps (default 1)")
    ap.add_argument("--num-per-input", type=int, default=1, help="samples per input or label")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16, help="samples per forward pass")
    ap.add_argument("--device", default=None, help="default: CUDA when present, else the CPU")
    ap.add_argument("--weights", default="ema", choices=("ema", "raw"), help="EMA or raw")
    ap.add_argument("--vae", default=None, help="VAE folder/hub id (default: the model's, cached)")
    args = ap.parse_args(argv)
    for flag in ("steps", "num_per_input", "batch_size"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.input and args.labels is None:
        ap.error("nothing to condition on: give --input (edge maps, sketches, photos) and/or "
                 "--labels")
    return args


def list_inputs(specs: list[str]) -> list[Path]:
    """Files as given; folders expand to their image files (by suffix), sorted by name."""
    out: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.iterdir()
                           if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                           and not f.name.startswith("."))
            if not found:
                raise UsageError(f"--input {p}: no image files "
                                 f"({', '.join(sorted(IMAGE_SUFFIXES))})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UsageError(f"--input {p}: no such file or folder")
    return out


def write_sheet(path: Path, rows: list[tuple[list[np.ndarray], list[np.ndarray]]]) -> None:
    """One row per input: [input columns | outputs], 2-pixel white gutters. Inputs of another
    size than the outputs (an edge map at the model's edge size) are resized to theirs."""
    from PIL import Image

    from meanflow.images import tile_grid
    h, w = rows[0][1][0].shape[:2]

    def fit(tile: np.ndarray) -> np.ndarray:
        if tile.shape[:2] == (h, w):
            return tile
        return np.asarray(Image.fromarray(tile).resize((w, h), Image.NEAREST))
    sheet = tile_grid([[fit(t) for t in inputs + outputs] for inputs, outputs in rows], pad=2)
    Image.fromarray(sheet).save(path)


OWN_NAMES = ["[0-9][0-9][0-9]_*_[0-9][0-9].png", "sheet.png"]   # what sample.py writes


def check_out(out: Path) -> None:
    """--out must be a folder, or a path where one can be made: checked before the model
    loads (nothing is created until every input has passed)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {out}: {parent} is a file, not a folder")
            break


def main(argv=None) -> int:
    args = parse_args(argv)
    from meanflow.evaluation import EvalError, checked_device
    from meanflow.pipeline import InputError, as_pil, load_pipeline, sketch_ink
    from meanflow.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    out = Path(args.out)
    try:
        check_out(out)
        device = checked_device(args.device)          # a bad --device: one line, no traceback
        files = list_inputs(args.input)
        for f in files:         # unreadable, oversized and blank files: before loading the model
            img = as_pil(f, str(f))
            if not args.from_photos:
                sketch_ink(img, str(f))
        pipe = load_pipeline(args.ckpt, device, weights=args.weights, vae=args.vae)
        labels = None if args.labels is None else [s.strip() for s in args.labels.split(",")]
        if labels is not None and any(not s for s in labels):
            raise UsageError(f"--labels {args.labels!r}: an empty entry")
        if files and not pipe.uses_edges:
            raise UsageError(f"--input: {args.ckpt} is a class-only model (no edge input); "
                             f"give --labels instead")
        if labels is not None and not pipe.uses_labels:
            raise UsageError(f"--labels: {args.ckpt} is not class-conditional (it takes "
                             f"edge maps through --input)")
        kind = "photos" if args.from_photos else "edges"
        conds = pipe.conditions(**{kind: files}, labels=labels)
        batches = list(pipe.batches(conds, args.num_per_input, args.batch_size, args.seed))
    except (UsageError, InputError, EvalError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from meanflow.images import safe_name
    classes = pipe.class_names or [str(i) for i in range(pipe.mcfg.num_classes)]
    names = ([safe_name(f.stem) for f in files] if files
             else [f"label_{safe_name(classes[c['label']])}" for c in conds])
    try:
        write_samples(out, args, pipe, files, conds, batches, names)
    except OSError as e:          # an unwritable or full --out: one line naming it
        print(f"error: --out {out}: cannot write there ({e.strerror or e}"
              f"{f': {e.filename}' if e.filename else ''})", file=sys.stderr)
        return 2
    return 0


def write_samples(out: Path, args, pipe, files: list[Path], conds: list[dict], batches: list,
                  names: list[str]) -> None:
    """The PNGs and sheet.png. The files of an earlier run into ``out`` that this one does not
    write again (more inputs, more samples per input) are deleted first: only sample.py's own
    (listed in the folder's manifest, or named as it names them), never other files."""
    from PIL import Image

    from meanflow.images import center_crop_arr, to_rgb
    from meanflow.outputs import plan
    from meanflow.pipeline import as_pil
    mine = [f"{i:03d}_{names[i]}_{j:02d}.png" for i in range(len(conds))
            for j in range(args.num_per_input)] + ["sheet.png"]
    stale = plan(out, "sample.py", mine, legacy=OWN_NAMES, marker="sheet.png")
    if stale:
        print(f"removed {len(stale)} files of an earlier sample.py run from {out}",
              file=sys.stderr)
    per_input: dict[int, list[np.ndarray]] = {}
    written, ms = 0, []
    for batch in batches:
        imgs = pipe.run_batch(batch, args.steps)
        ms.append(pipe.last_ms_per_image)
        for (_, _, k), img in zip(batch, imgs):
            i, j = divmod(k, args.num_per_input)
            Image.fromarray(img).save(out / f"{i:03d}_{names[i]}_{j:02d}.png")
            per_input.setdefault(i, []).append(img)
            written += 1
    rows = []
    for i, c in enumerate(conds):
        inputs = []
        if args.from_photos and files:
            inputs.append(center_crop_arr(to_rgb(as_pil(files[i], str(files[i]))),
                                          per_input[i][0].shape[0]))
        if c["edge"] is not None:
            inputs.append((c["edge"][0] * 255).astype(np.uint8))
        rows.append((inputs, per_input[i]))
    write_sheet(out / "sheet.png", rows)
    print(f"wrote {written} images and sheet.png to {out} ({args.steps} step"
          f"{'s' if args.steps != 1 else ''}, {np.mean(ms):.1f} ms per image on "
          f"{pipe.device})")


if __name__ == "__main__":
    sys.exit(main())
