"""A live sketch page: draw, and a trained model's 1-step image updates as you draw.

    python demo/app.py --ckpt runs/demo/edge_mf                 # http://127.0.0.1:7860
    python demo/app.py --ckpt runs/afhq_unet --host 0.0.0.0 --port 8080

A Gradio page (the usual form of a model demo) with a sketch canvas whose strokes become the
edge map the way sample.py's do, a photo upload turned into edges by the dataset's own
detector, a step count (1 to 4), a seed, and the measured milliseconds per image (network
+ decode, without the page's round trip). Needs the package installed (`pip install -e .`)
and gradio (the Makefile's set-up installs both).

The page keeps no file for long: an upload over --max-upload-mb (10 MB) is refused with HTTP
413 before it is stored, and what gradio stores (uploads, sketches, returned images) is
deleted --cache-max-age seconds (600) after it was made, by a sweep every --cache-sweep
seconds (300), and all of it when the server stops (Ctrl-C; not after a kill -9).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import numpy as np

DISPLAY_SIZE = 256          # small models (16-32 px) are shown enlarged, pixel for pixel
MAX_UPLOAD_MB = 10.0        # a photo to turn into edges; anything larger is refused (HTTP 413)
CACHE_MAX_AGE_S = 600       # uploads and images the page made are deleted this old ...
CACHE_SWEEP_S = 300         # ... by a sweep this often (and all of them when the server stops)
CANVAS_SIZE = (384, 384)
BRUSH_RADIUS = 6            # canvas pixels: a 384 px stroke of 12 px is ~1 pixel at 32 px


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True,
                    help="run folder (with export/), export or saved pipeline folder")
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on (default local)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--device", default=None, help="default: CUDA when present, else the CPU")
    ap.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                    help=f"largest file the page accepts, in MB (default {MAX_UPLOAD_MB:g}); a "
                         f"larger upload is refused before it is stored")
    ap.add_argument("--cache-max-age", type=int, default=CACHE_MAX_AGE_S,
                    help=f"seconds after which an upload or an image the page made is deleted "
                         f"from gradio's temporary folder (default {CACHE_MAX_AGE_S})")
    ap.add_argument("--cache-sweep", type=int, default=CACHE_SWEEP_S,
                    help=f"seconds between two sweeps of that folder (default {CACHE_SWEEP_S})")
    args = ap.parse_args(argv)
    if not args.max_upload_mb > 0:
        ap.error(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    for flag in ("cache_max_age", "cache_sweep"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1 second, got "
                     f"{getattr(args, flag)}")
    return args


def max_file_size(args) -> int:
    """--max-upload-mb in bytes, as gradio's ``launch(max_file_size=...)`` takes it."""
    return int(args.max_upload_mb * 1024 * 1024)


def delete_cache(args) -> tuple[int, int]:
    """(frequency, age) in seconds, as gradio's ``Blocks(delete_cache=...)`` takes it."""
    return (args.cache_sweep, args.cache_max_age)


def enlarge(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> at least DISPLAY_SIZE on a side by pixel repetition (no blur)."""
    k = max(1, DISPLAY_SIZE // img.shape[0])
    return img.repeat(k, 0).repeat(k, 1)


def build(pipe, cache: Optional[tuple[int, int]] = (CACHE_SWEEP_S, CACHE_MAX_AGE_S)):
    """The Gradio Blocks page of a loaded :class:`meanflow.pipeline.Pipeline`. ``cache``:
    every ``cache[0]`` seconds, the files the page stored (uploads, sketches, the images it
    returned) that are older than ``cache[1]`` seconds are deleted; None keeps them all."""
    import gradio as gr

    from meanflow.pipeline import InputError
    if not pipe.uses_edges:
        raise SystemExit(f"error: {pipe.source} is a class-only model: the page draws edge "
                         f"maps; use sample.py --labels")

    def generate(edge: np.ndarray, steps: float, seed: float):
        """float32 [1, S, S] edge map -> (enlarged image, timing line)."""
        steps, seed = int(steps), int(seed)
        batch = next(pipe.batches([dict(edge=edge, label=None)], 1, 1, seed))
        img = pipe.run_batch(batch, steps)[0]
        ms = pipe.last_ms_per_image
        return enlarge(img), (f"**{ms:.1f} ms** per image ({steps} step{'s' * (steps > 1)}, "
                              f"{pipe.device.type})")

    def from_sketch(sketch: Optional[dict], steps, seed):
        comp = None if sketch is None else sketch.get("composite")
        if comp is None:
            return None, None, "draw something (or upload a photo)"
        try:
            edge = pipe.edge_from_sketch(comp, "sketch")
        except InputError:
            return None, None, "draw something (or upload a photo)"
        out, info = generate(edge, steps, seed)
        return out, enlarge(np.repeat((edge[0] * 255).astype(np.uint8)[..., None], 3, -1)), info

    def from_photo(photo: Optional[np.ndarray], steps, seed):
        if photo is None:
            return None, None, "upload a photo"
        try:
            edge = pipe.edge_from_photo(photo, "photo")
        except InputError as e:
            return None, None, str(e)
        out, info = generate(edge, steps, seed)
        return out, enlarge(np.repeat((edge[0] * 255).astype(np.uint8)[..., None], 3, -1)), info

    size = pipe.mcfg.input_size
    with gr.Blocks(title="MeanFlow sketch to image", delete_cache=cache) as page:
        gr.Markdown(f"### MeanFlow: sketch to image in one step\nDraw (any colour on white). "
                    f"The model works at {pipe.mcfg.edge_size} px edges -> {size} px images.")
        with gr.Row():
            with gr.Column():
                sketch = gr.Sketchpad(label="sketch", type="numpy", canvas_size=CANVAS_SIZE,
                                      image_mode="RGBA", layers=False, elem_id="sketch",
                                      brush=gr.Brush(default_size=BRUSH_RADIUS,
                                                     colors=["#000000"], color_mode="fixed"))
                photo = gr.Image(label="or a photo (turned into edges)", type="numpy",
                                 sources=["upload"], elem_id="photo", height=160)
            with gr.Column():
                output = gr.Image(label="1-step image", type="numpy", format="png",
                                  interactive=False, elem_id="output")
                edges = gr.Image(label="edge map the model sees", type="numpy", format="png",
                                 interactive=False, elem_id="edges", height=160)
                steps = gr.Slider(1, 4, value=1, step=1, label="steps",
                                  elem_id="steps")
                seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                timing = gr.Markdown(elem_id="timing")
        outs = [output, edges, timing]
        # every stroke: the latest state wins, no queue of stale frames
        sketch.change(from_sketch, [sketch, steps, seed], outs, trigger_mode="always_last",
                      show_progress="hidden")
        for ctl in (steps, seed):
            ctl.change(from_sketch, [sketch, steps, seed], outs, trigger_mode="always_last",
                       show_progress="hidden")
        photo.upload(from_photo, [photo, steps, seed], outs, show_progress="hidden")
    return page


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")     # no calls home
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the page needs gradio: run `make setup` (or pip install --no-deps "
              "gradio==6.31.0 and requirements-app.txt)", file=sys.stderr)
        return 2
    from meanflow.pipeline import load_pipeline
    try:
        pipe = load_pipeline(args.ckpt, args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    serve(build(pipe, delete_cache(args)), args)
    return 0


def serve(page, args, block: bool = True):
    """Launch ``page`` on --host:--port with the upload limit; ``block=False`` returns at once
    (the server runs in a thread until ``page.close()``)."""
    page.queue(default_concurrency_limit=1)          # one model: one image at a time
    return page.launch(server_name=args.host, server_port=args.port, share=False,
                       show_error=True, quiet=False, max_file_size=max_file_size(args),
                       prevent_thread_lock=not block)


if __name__ == "__main__":
    sys.exit(main())
