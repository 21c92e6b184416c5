"""demo/app.py in a real browser: Debian's chromium driven by Playwright draws on the canvas;
the 1-step image appears, is not blank, and changes when the sketch changes.

Needs gradio, playwright and chromium, which the README's test command installs (`make test`:
requirements-app.txt, gradio --no-deps, and `apt-get install chromium` when run as root).
The page and the browser talk over 127.0.0.1 only; any other request is blocked.
Set MEANFLOW_APP_SCREENSHOT=docs/app.png to refresh the README's screenshot.
"""
from __future__ import annotations

import io
import os
import selectors
import shutil
import socket
import subprocess
import time
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from helpers import PY, ROOT, env

TIMEOUT_MS = 30_000           # any one browser wait; the first image takes ~1 s on a CPU
SERVER_START_S = 90           # imports (torch, gradio) on a busy 2-core machine


def requirements() -> str:
    """The chromium binary; fails (never skips) naming what to install."""
    missing = []
    for mod, how in (("gradio", "gradio==6.31.0 (make setup)"),
                     ("playwright", "playwright (requirements-app.txt; make setup)")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(how)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        missing.append("Debian's chromium (apt-get install -y chromium; make test does it "
                       "as root)")
    if missing:
        pytest.fail("the browser test needs: " + "; ".join(missing))
    return chromium


@pytest.fixture(scope="module")
def server(edge_run):
    chromium = requirements()
    run_dir = edge_run
    with socket.socket() as s:                         # a free loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([PY, "demo/app.py", "--ckpt", str(run_dir), "--port", str(port)],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url, seen = None, []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + SERVER_START_S
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        if sel.select(timeout=deadline - time.monotonic()):
            line = proc.stdout.readline()
            seen.append(line)
            if "Running on local URL:" in line:
                url = line.split("URL:")[1].strip()
    if url is None:
        proc.kill()
        pytest.fail("demo/app.py did not start:\n" + "".join(seen)[-3000:])
    assert urlparse(url).hostname == "127.0.0.1", url
    yield url, chromium
    proc.kill()
    proc.wait(timeout=30)


def output_image(page, timeout_ms: int = TIMEOUT_MS, not_src: str = "") -> tuple[str, np.ndarray]:
    """Wait until the output <img> has a source other than ``not_src``; return it and its
    pixels (fetched through the page, so over the same loopback connection)."""
    page.wait_for_function(
        "old => { const i = document.querySelector('#output img');"
        " return i && i.src && i.src !== old && i.complete && i.naturalWidth > 0; }",
        arg=not_src, timeout=timeout_ms)
    src = page.eval_on_selector("#output img", "i => i.src")
    body = page.request.get(src, timeout=timeout_ms).body()
    return src, np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def stroke(page, box: dict, points: list[tuple[float, float]]) -> None:
    """Drag the mouse through ``points`` (fractions of the canvas box)."""
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for a, b in zip(xy, xy[1:]):
        page.mouse.move(*b, steps=8)
    page.mouse.up()


@pytest.mark.slow
def test_drawing_updates_the_one_step_image(server, tmp_path):
    from playwright.sync_api import sync_playwright
    url, chromium = server
    with sync_playwright() as p:
        # (chromium will not start its process sandbox as root, which is how CI runs)
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"],
                                    timeout=TIMEOUT_MS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page.set_default_timeout(TIMEOUT_MS)
            local = ("127.0.0.1",)
            page.route("**/*", lambda route: route.continue_()
                       if urlparse(route.request.url).hostname in local
                       or route.request.url.startswith(("data:", "blob:")) else route.abort())
            page.goto(url, timeout=TIMEOUT_MS)
            canvas = page.locator("#sketch canvas").first
            canvas.wait_for(state="visible")
            page.locator("#sketch button[aria-label='Brush']").first.click()   # the draw tool
            box = canvas.bounding_box()
            # a box outline
            stroke(page, box, [(0.3, 0.3), (0.7, 0.3), (0.7, 0.7), (0.3, 0.7), (0.3, 0.3)])
            src1, img1 = output_image(page)
            assert img1.std() > 5, "the output image is blank"
            timing = page.inner_text("#timing")
            assert "ms per image" in timing and "1 step" in timing, timing
            # another stroke: a diagonal across the box
            stroke(page, box, [(0.2, 0.8), (0.8, 0.2)])
            src2, img2 = output_image(page, not_src=src1)
            assert img2.std() > 5
            changed = (img2 != img1).any(axis=-1).mean()
            assert changed > 0.05, f"the output hardly changed ({changed:.1%} of pixels)"
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot))
            dest = os.environ.get("MEANFLOW_APP_SCREENSHOT")
            if dest:
                small = Image.open(shot).convert("RGB").quantize(64)  # a small PNG for docs/
                small.save(ROOT / dest, optimize=True)
        finally:
            browser.close()
