"""`pip install .` in an existing CUDA environment: it brings what the package needs and keeps
the torch that is there (pyproject.toml declares ranges; the pinned set is for `make test`)."""
from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# import name -> distribution name, where they differ
DIST_OF = {"PIL": "pillow", "cv2": "opencv-python-headless", "yaml": "pyyaml",
           "torch_fidelity": "torch-fidelity", "controlnet_aux": "controlnet-aux"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, 1)[0].lower().replace("_", "-")


def _third_party_imports() -> set[str]:
    found = set()
    for f in [*(ROOT / "meanflow").glob("*.py"), *(ROOT / "models").glob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    local = {"meanflow", "models", "__future__"}
    return {m for m in found - local if m not in sys.stdlib_module_names}


def test_every_library_import_is_a_declared_dependency():
    declared = {_name(r) for r in PROJECT["dependencies"]}
    declared |= {_name(r) for rs in PROJECT["optional-dependencies"].values() for r in rs}
    missing = {m for m in _third_party_imports() if DIST_OF.get(m, m).lower() not in declared}
    assert not missing, f"imported by meanflow/ or models/ but not in pyproject.toml: {missing}"
    torch_req = next(r for r in PROJECT["dependencies"] if _name(r) == "torch")
    assert ">=" in torch_req and "==" not in torch_req     # a range: never re-resolved
    assert not any("==" in r for r in PROJECT["dependencies"])


def _closure(names: list[str]) -> set[str]:
    """The installed distributions ``names`` need, themselves included."""
    seen, todo = set(), list(names)
    while todo:
        n = todo.pop()
        try:
            dist = md.distribution(n)
        except md.PackageNotFoundError:
            continue
        key = _name(dist.metadata["Name"])
        if key in seen:
            continue
        seen.add(key)
        for r in dist.requires or []:
            if "extra ==" not in r:
                todo.append(_name(r))
    return seen


@pytest.mark.slow
def test_pip_install_in_a_venv_with_torch_preinstalled_keeps_that_torch(tmp_path):
    """A fresh venv that already has the pinned torch and torchvision (with their own
    dependencies, linked from this environment in place of a multi-GB copy): `pip install .`
    would install the package's dependencies and neither torch nor torchvision."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pre = tmp_path / "preinstalled"
    pre.mkdir()
    for key in _closure(["torch", "torchvision"]):
        dist = md.distribution(key)
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (pre / top).exists() and top != "..":
                (pre / top).symlink_to(src)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "preinstalled.pth").write_text(str(pre) + "\n")
    py = venv / "bin" / "python"
    have = subprocess.run([py, "-c", "import importlib.metadata as m; "
                                     "print(m.version('torch'), m.version('torchvision'))"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert have == [md.version("torch"), md.version("torchvision")]
    report = tmp_path / "report.json"
    res = subprocess.run([py, "-m", "pip", "install", "--dry-run", "--quiet", "--report",
                          str(report), str(ROOT)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    plan = {_name(i["metadata"]["name"]): i["metadata"]["version"]
            for i in json.loads(report.read_text())["install"]}
    assert "torch" not in plan and "torchvision" not in plan, plan
    for need in ("accelerate", "diffusers", "lmdb", "timm", "torch-fidelity", "safetensors",
                 "meanflow-edge2image"):
        assert need in plan, (need, sorted(plan))
