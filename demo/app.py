"""A live sketch page: draw, and a trained model's 1-step image updates as you draw.

    python demo/app.py --ckpt runs/demo/edge_mf                 # http://127.0.0.1:7860
    python demo/app.py --ckpt runs/afhq_unet --host 0.0.0.0 --port 8080

A Gradio page (the usual form of a model demo) with a sketch canvas whose strokes become the
edge map the way sample.py's do, a photo upload turned into edges by the dataset's own
detector, a step count (1 to 4), a seed, and the measured milliseconds per image (network
+ decode, without the page's round trip). Needs the package installed (`pip install -e .`)
and gradio (the Makefile's set-up installs both).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import numpy as np

DISPLAY_SIZE = 256          # small models (16-32 px) are shown enlarged, pixel for pixel
CANVAS_SIZE = (384, 384)
BRUSH_RADIUS = 6            # canvas pixels: a 384 px stroke of 12 px is ~1 pixel at 32 px


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True,
                    help="run folder (with export/), export or saved pipeline folder")
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on (default local)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--device", default=None, help="default: CUDA when present, else the CPU")
    return ap.parse_args(argv)


def enlarge(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> at least DISPLAY_SIZE on a side by pixel repetition (no blur)."""
    k = max(1, DISPLAY_SIZE // img.shape[0])
    return img.repeat(k, 0).repeat(k, 1)


def build(pipe):
    """The Gradio Blocks page of a loaded :class:`meanflow.pipeline.Pipeline`."""
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
    with gr.Blocks(title="MeanFlow sketch to image") as page:
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
    page = build(pipe)
    page.queue(default_concurrency_limit=1)          # one model: one image at a time
    page.launch(server_name=args.host, server_port=args.port, share=False,
                show_error=True, quiet=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
