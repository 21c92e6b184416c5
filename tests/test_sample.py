"""sample.py and meanflow.load_pipeline on tiny models the tests train: sketches of either
polarity, RGBA and 16-bit files, photos through the dataset's detector, class labels by index
or name, seeds independent of the batch size, a saved pipeline that reloads, an installed
copy without top-level `models`; every bad input refused in one line with nothing written."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import tomllib
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from helpers import PY, ROOT, ellipse, env, run, train_tiny

@pytest.fixture(scope="module")
def models(tmp_path_factory, dataset, edge_run) -> dict:
    return dict(edge=edge_run,
                cls=train_tiny(tmp_path_factory.mktemp("sample"), dataset, "cls", False, True))


def sketches(folder: Path) -> list[Path]:
    """One drawing as black-on-white, as strokes on a transparent RGBA layer, and as a 16-bit
    white-on-black PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    ellipse().save(folder / "a_black_on_white.png")
    ellipse(mode="RGBA", ink=(0, 0, 0, 255), paper=(0, 0, 0, 0)).save(folder / "b_rgba.png")
    g16 = (np.asarray(ellipse(ink=255, paper=0)).astype(np.uint16) * 257)
    Image.fromarray(g16).save(folder / "c_16bit.png")
    return sorted(folder.glob("*.png"))


def sample(*args, timeout=120):
    return run([PY, "sample.py", *map(str, args)], timeout=timeout)


def test_sketches_of_any_polarity_mode_and_depth_give_the_same_edge_map(models, tmp_path):
    import meanflow
    from meanflow.pipeline import InputError
    pipe = meanflow.load_pipeline(models["edge"])
    files = sketches(tmp_path)
    with Image.open(files[2]) as im:
        assert im.mode in ("I;16", "I")                        # really a 16-bit file
    maps = [pipe.edge_from_sketch(f) for f in files]
    maps.append(pipe.edge_from_sketch(np.asarray(ellipse(ink=255, paper=0)) > 0))  # bool array
    for m in maps[1:]:
        assert np.array_equal(m, maps[0])
    e = maps[0]
    assert e.shape == (1, 16, 16) and set(np.unique(e)) == {0.0, 1.0}
    # a 3-pixel stroke of a 200-pixel drawing is 0.24 target pixels wide: it must survive as
    # a closed contour 1-2 pixels wide (an area resize + 0.5 threshold would erase it)
    assert 30 <= e.sum() <= 80
    assert e[0, 8, 8] == 0 and e[0, :, 8].sum() >= 2 and e[0, 8, :].sum() >= 2
    # one dark pixel of a 2000-pixel image is a speck, not a stroke, at 16 px
    speck = Image.new("L", (2000, 2000), 255)
    speck.putpixel((1000, 1000), 0)
    with pytest.raises(InputError, match="speck: no stroke is left at the model's 16x16"):
        pipe.edge_from_sketch(speck, "speck")


def test_sample_py_writes_pngs_and_a_sheet_that_match_the_python_api(models, tmp_path):
    files = sketches(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not an input")      # folders: images only
    out = tmp_path / "out"
    res = sample("--ckpt", models["edge"], "--input", tmp_path / "in", "--out", out,
                 "--num-per-input", 2, "--batch-size", 4, "--seed", 5)
    assert res.returncode == 0, res.stderr[-3000:]
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == [f"{i:03d}_{f.stem}_{j:02d}.png" for i, f in enumerate(files) for j in (0, 1)]
    with Image.open(out / "sheet.png") as sheet:                  # 3 rows: input | 2 outputs
        assert sheet.size == (2 + 3 * 18, 2 + 3 * 18)
    import meanflow
    pipe = meanflow.load_pipeline(models["edge"])
    api = pipe(edges=files, seed=5, num_per_input=2, batch_size=1)   # other batching
    got = [np.asarray(Image.open(out / n)) for n in pngs]
    assert len(api) == 6 and all(np.array_equal(np.asarray(a), g) for a, g in zip(api, got))
    assert not np.array_equal(got[0], got[1])             # each sample has its own seed
    # the three files are one drawing: the same seed gives the same image
    first, last = pipe(edges=files[:1], seed=5), pipe(edges=files[2:], seed=5)
    assert np.array_equal(np.asarray(first[0]), np.asarray(last[0]))


def test_photos_are_turned_into_edges_by_the_datasets_detector(models, tmp_path):
    photo = Image.new("RGB", (96, 64), (30, 30, 30))
    ImageDraw.Draw(photo).rectangle((32, 12, 64, 52), fill=(220, 140, 60))
    photo.save(tmp_path / "photo.jpg", quality=95)
    import meanflow
    pipe = meanflow.load_pipeline(models["edge"])
    e = pipe.edge_from_photo(tmp_path / "photo.jpg")[0]
    # Canny (the tiny dataset's detector) outlines the rectangle: edges on its border only
    assert e[8, 8] == 0 and e[:, 8].sum() >= 2 and e[8, :].sum() >= 2 and e[0].sum() == 0
    out = tmp_path / "out"
    res = sample("--ckpt", models["edge"], "--input", tmp_path / "photo.jpg", "--from-photos",
                 "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "000_photo_00.png").is_file()
    with Image.open(out / "sheet.png") as sheet:                  # photo | edges | output
        assert sheet.size == (2 + 3 * 18, 2 + 18)


def test_class_only_model_takes_labels_by_index_or_name(models, tmp_path):
    from meanflow.pipeline import InputError
    out = tmp_path / "out"
    res = sample("--ckpt", models["cls"], "--labels", "3,sneaker", "--num-per-input", 2,
                 "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(p.name for p in out.glob("0*.png"))
    assert names == ["000_label_Dress_00.png", "000_label_Dress_01.png",
                     "001_label_Sneaker_00.png", "001_label_Sneaker_01.png"]
    import meanflow
    pipe = meanflow.load_pipeline(models["cls"])
    with pytest.raises(InputError, match="label 'Giraffe': unknown class"):
        pipe(labels=["Giraffe"])
    api = pipe(labels=[3, 7], num_per_input=2)
    got = [np.asarray(Image.open(out / n)) for n in names]
    assert all(np.array_equal(np.asarray(a), g) for a, g in zip(api, got))


def png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels, with no image data: decoding it would fail,
    so a refusal that names the size proves the check came first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0,
                                                                      0, 0))
                     + chunk(b"IEND", b""))


def bad_cases(models: dict, tmp_path: Path, kind: str) -> dict:
    """{case: (sample.py arguments, expected message)}."""
    Image.new("L", (64, 64), 255).save(tmp_path / "white.png")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(tmp_path / "black.jpg")
    (tmp_path / "notes.png").write_text("this is text, not a PNG")
    png_header_only(tmp_path / "huge.png", 20000, 20000)
    ellipse().save(tmp_path / "ok.png")
    edge, cls = models["edge"], models["cls"]
    files = {
        "white": (["--ckpt", edge, "--input", tmp_path / "white.png"], "white.png: blank image"),
        "black": (["--ckpt", edge, "--input", tmp_path / "black.jpg"], "black.jpg: blank image"),
        "text": (["--ckpt", edge, "--input", tmp_path / "notes.png"], "notes.png: not an image"),
        "huge": (["--ckpt", edge, "--input", tmp_path / "huge.png"],
                 "huge.png: 20000x20000 pixels is over the limit"),
    }
    model = {
        "range": (["--ckpt", cls, "--labels", "3,10"], "label 10: out of range; the model "
                                                       "has 10 classes (0..9)"),
        "edges to class model": (["--ckpt", cls, "--input", tmp_path / "ok.png"],
                                 "is a class-only model (no edge input)"),
        "labels to edge model": (["--ckpt", edge, "--input", tmp_path / "ok.png", "--labels", "1"],
                                 "is not class-conditional"),
    }
    return files if kind == "files" else model


@pytest.mark.parametrize("kind", ["files", "model"])
def test_bad_input_gets_one_line_and_nothing_written(models, tmp_path, kind):
    """Unreadable, oversized and blank files (refused before the model loads), then inputs
    that do not fit the model."""
    cases = bad_cases(models, tmp_path, kind)
    # the cases are independent processes: run them side by side
    procs = {k: subprocess.Popen([PY, "sample.py", *map(str, a), "--out", tmp_path / k],
                                 cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
             for k, (a, _) in cases.items()}
    for k, p in procs.items():
        _, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, (k, err[-2000:])
        assert lines[0].startswith("error: ") and cases[k][1] in lines[0], (k, lines[0])
        assert not (tmp_path / k).exists(), k


def test_save_pretrained_is_self_contained_and_reloads(models, tmp_path):
    import meanflow
    run_dir = models["edge"]
    ev = run_dir / "eval" / "test"                       # what `evaluate.py --fid` writes
    ev.mkdir(parents=True, exist_ok=True)
    (ev / "results.json").write_text(json.dumps(dict(
        meta=dict(split="test", n=32, category=None),
        results=[dict(steps=1, nfe=1, n=32, fid=123.4), dict(steps=2, nfe=2, n=32, fid=99.5)])))
    pipe = meanflow.load_pipeline(run_dir)
    saved = pipe.save_pretrained(tmp_path / "saved")
    shutil.rmtree(ev.parent)
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "model.safetensors",
                                                      "model_config.json"]
    card = (saved / "README.md").read_text()
    assert "| 1 | 123.40 | 32 | test |" in card and "| 2 | 99.50 | 32 | test |" in card
    assert "canny at 16 px" in card and "training steps | 4" in card and "codec | pixel" in card
    again = meanflow.load_pipeline(saved)
    sk = np.asarray(ellipse())
    a, b = pipe(edges=[sk], seed=3), again(edges=[sk], seed=3)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    # and evaluate.py / sample.py read it like any export
    res = sample("--ckpt", saved, "--input", tmp_path / "none.png", "--out", tmp_path / "o")
    assert res.returncode == 2 and "none.png: no such file or folder" in res.stderr


def test_an_installed_copy_has_no_top_level_models_and_works(models, tmp_path):
    """pyproject.toml installs models/ as meanflow.models (preprocess/, which the library
    never imports, is not installed); the library must work from that layout, away from the
    clone, and leave `models` free for the user's own module."""
    pp = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert pp["package-dir"] == {"meanflow": "meanflow", "meanflow.models": "models"}
    site = tmp_path / "site"
    for pkg, src in pp["package-dir"].items():
        shutil.copytree(ROOT / src, site / pkg.replace(".", "/"),
                        ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "models.py").write_text("WHO = 'the user'\n")
    code = ("import meanflow, numpy as np, models\n"
            f"pipe = meanflow.load_pipeline({str(models['edge'])!r})\n"
            "img = pipe(edges=[np.eye(40, dtype=bool)], seed=0)[0]\n"
            "import sys, models as m2\n"
            "print(img.size, m2.WHO, sys.modules['meanflow.models'].__file__)\n")
    e = env(PYTHONPATH=f"{site}:{tmp_path / 'user'}")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=e, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[:3] == ["(16,", "16)", "the"], res.stdout
    assert str(site) in res.stdout
