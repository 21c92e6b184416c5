"""Latency of one 1-step image from a sketch: through the Python API and in the live page.

Models with random weights (the cost does not depend on the weights), built locally:

* tiny: the test suite's 16 px U-Net (tests/test_sample.py), pixel space;
* demo: configs/fashion_demo.yaml's U-Net, 32 px pixel space;
* afhq: configs/afhq_unet.yaml's U-Net on 4x32x32 SD-VAE latents with 256 px edges, decoded
  by an AutoencoderKL of the SD-VAE architecture (random weights, nothing downloaded) to a
  256 x 256 image.

API: ``pipe(edges=[sketch], steps=1)`` end to end (sketch -> edge map -> network -> decode ->
PIL), median of repeated calls after a warm-up; "network + decode" is the part the page
reports. Page: demo/app.py served on 127.0.0.1, Debian's chromium (Playwright) draws a stroke
and waits for the new image; the time from releasing the mouse to the image on screen
(includes the page's upload of the canvas and the round trip), median of repeated strokes.

    python bench/sample_latency.py [--quick] [--models tiny,demo,afhq] [--no-page] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from meanflow.config import load_config  # noqa: E402
from meanflow.export import export_model  # noqa: E402

SD_VAE_SCALE = 0.18215      # SD-VAE latent scale factor (stabilityai/sd-vae-ft-mse)
TINY_MODEL = dict(name="unet", input_size=16, in_channels=1, edge_channels=1, edge_size=16,
                  num_classes=0, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
                  attn_resolutions=[], dropout=0.0)


def sd_vae(folder: Path) -> Path:
    """A random-weight AutoencoderKL with the SD-VAE architecture, saved locally."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512), sample_size=256,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    vae.save_pretrained(folder)
    return folder


def export(name: str, tmp: Path) -> Path:
    """A random-weight export folder of the model ``name``, as train.py writes it."""
    import models
    if name == "tiny":
        cfg = load_config(None, [f"model.{k}={json.dumps(v)}" for k, v in TINY_MODEL.items()])
        cfg.data.image_size, cfg.data.codec, cfg.data.channels = 16, "pixel", 1
        meta = dict(codec="pixel", image_size=16, channels=1, edges="canny", edge_size=16,
                    edge_settings=dict(levels=2, close=0), class_names=[])
    elif name == "demo":
        cfg = load_config(ROOT / "configs" / "fashion_demo.yaml")
        meta = dict(codec="pixel", image_size=32, channels=1, edges="canny", edge_size=32,
                    edge_settings=dict(levels=2, close=0), class_names=[])
    else:
        cfg = load_config(ROOT / "configs" / "afhq_unet.yaml")
        meta = dict(codec="sd-vae", vae=str(sd_vae(tmp / "vae")), scaling_factor=SD_VAE_SCALE,
                    image_size=256, channels=3, edges="pidinet", edge_size=256,
                    edge_settings=dict(levels=8, close=3), class_names=["cat", "dog", "wild"])
    torch.manual_seed(0)
    net = models.build(cfg.model)
    with torch.no_grad():           # zero-initialised layers would make the image ignore the
        for p in net.parameters():  # sketch, and the page would show no new image to time
            if not p.any():
                p.normal_(0.0, 0.02)
    out = tmp / name
    export_model(out, net, cfg, meta, step=0, ema_decay=None)
    return out


def sketch(size: int = 512) -> Image.Image:
    im = Image.new("L", (size, size), 255)
    d = ImageDraw.Draw(im)
    d.ellipse((size // 5, size // 5, 4 * size // 5, 4 * size // 5), outline=0, width=size // 64)
    d.line((size // 4, 3 * size // 4, 3 * size // 4, size // 4), fill=0, width=size // 64)
    return im


def api_latency(folder: Path, device, repeats: int) -> dict:
    import meanflow
    pipe = meanflow.load_pipeline(folder, device)
    sk = sketch()
    pipe(edges=[sk], steps=1)                                   # warm-up (allocations, VAE)
    calls, gen = [], []
    for i in range(repeats):
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(edges=[sk], steps=1, seed=i)
        calls.append((time.perf_counter() - t0) * 1000)
        gen.append(pipe.last_ms_per_image)
    return dict(call=statistics.median(calls), gen=statistics.median(gen),
                size=pipe.mcfg.input_size, device=str(pipe.device))


def page_latency(folder: Path, repeats: int) -> float | str:
    """Median ms from mouse-up to the new image in the page; or why it was not measured."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
        import gradio  # noqa: F401
    except ImportError as e:
        return f"not measured ({e.name} missing: make setup)"
    if chromium is None:
        return "not measured (no chromium: apt-get install chromium)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, str(ROOT / "demo" / "app.py"), "--ckpt",
                             str(folder), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:                   # the server prints its URL when ready
            if "Running on local URL:" in line:
                url = line.split("URL:")[1].strip()
                break
        else:
            return "not measured (the page did not start)"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page.set_default_timeout(120_000)
            page.goto(url)
            canvas = page.locator("#sketch canvas").first
            canvas.wait_for(state="visible")
            page.locator("#sketch button[aria-label='Brush']").first.click()
            box = canvas.bounding_box()
            times, old = [], ""
            for i in range(repeats + 1):            # the first stroke is the warm-up
                y = box["y"] + box["height"] * (0.25 + 0.5 * i / max(repeats, 1))
                page.mouse.move(box["x"] + box["width"] * 0.3, y)
                page.mouse.down()
                page.mouse.move(box["x"] + box["width"] * 0.7, y, steps=6)
                t0 = time.perf_counter()
                page.mouse.up()
                page.wait_for_function(
                    "old => { const i = document.querySelector('#output img');"
                    " return i && i.src !== old && i.complete && i.naturalWidth > 0; }", arg=old)
                times.append((time.perf_counter() - t0) * 1000)
                old = page.eval_on_selector("#output img", "i => i.src")
            browser.close()
        return statistics.median(times[1:])
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few repeats, no page")
    ap.add_argument("--models", default="tiny,demo,afhq")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-page", action="store_true")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = ["tiny"] if args.quick else args.models.split(",")
    repeats = 3 if args.quick else args.repeats
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folder = export(name, Path(tmp))
            api = api_latency(folder, args.device, repeats)
            page = ("not measured" if args.quick or args.no_page
                    else page_latency(folder, max(3, repeats // 2)))
            rows.append((name, api, page))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians, 1 step, "
          f"batch 1")
    print("| model | image | device | API call (ms) | network + decode (ms) | page (ms) |")
    print("|---|---|---|---|---|---|")
    for name, api, page in rows:
        px = 256 if name == "afhq" else api["size"]
        pg = f"{page:.0f}" if isinstance(page, float) else page
        print(f"| {name} | {px} px | {api['device']} | {api['call']:.1f} | {api['gen']:.1f} "
              f"| {pg} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
