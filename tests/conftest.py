"""Test-wide settings: never touch the network, keep CPU runs small and deterministic."""
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# The CUDA tier: tests marked `cuda` run on a real GPU (`make gpu-test`). CPU, meta and fake
# CUDA devices prove where tensors live, not what CUDA kernels accept (layouts, dtypes, fused
# and compiled kernels). Without a GPU they are not run, and the count says so in one line.
# MEANFLOW_CUDA_TIER_DEVICE=cpu runs the tier's logic on the CPU (a check of the tests
# themselves, not of CUDA).
CUDA_TIER_DEVICE = os.environ.get("MEANFLOW_CUDA_TIER_DEVICE", "cuda")
NO_GPU = "CUDA test not run: no GPU"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs that take a minute or more; "
                                       "`make test-fast` leaves them out")
    config.addinivalue_line("markers", "cuda: needs a real CUDA GPU (`make gpu-test`); "
                                       "reported as not run without one")


def pytest_collection_modifyitems(config, items):
    import torch
    if CUDA_TIER_DEVICE != "cuda" or torch.cuda.is_available():
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=NO_GPU))


def pytest_terminal_summary(terminalreporter):
    not_run = [r for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and NO_GPU in str(r.longrepr[-1])]
    if not_run:
        terminalreporter.write_line(f"{len(not_run)} CUDA tests not run: no GPU "
                                    f"(`make gpu-test` runs them on one)", yellow=True)


# --------------------------------------------------------------------------------------------
# Shared fixtures. What takes a subprocess to make is made once per test process (session
# scope) and handed to each module as its own copy: a module may write next to it (FID
# caches beside the dataset, evaluations inside a run) without another module seeing that.
# --------------------------------------------------------------------------------------------


def _copy(src: Path, factory, name: str) -> Path:
    dst = factory.mktemp(name) / src.name
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def _tiny_dataset(tmp_path_factory) -> Path:
    from helpers import make_pixel_dataset
    return make_pixel_dataset(tmp_path_factory.mktemp("tiny_dataset"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, _tiny_dataset) -> Path:
    """The tiny cached pixel dataset (helpers.make_pixel_dataset: 16x16, Canny edges, 10
    labels; train/ and test/), this module's own copy."""
    return _copy(_tiny_dataset, tmp_path_factory, "dataset")


@pytest.fixture
def tiny_config_file(tmp_path, dataset):
    """A factory: ``tiny_config_file(train=dict(max_steps=2))`` writes the tiny config over
    ``dataset`` (helpers.tiny_config) to a new file of this test's tmp_path."""
    from helpers import tiny_config
    made = []

    def make(**overrides) -> Path:
        made.append(tmp_path / f"tiny_{len(made)}.yaml")
        return tiny_config(made[-1], dataset, **overrides)
    return make


@pytest.fixture(scope="session")
def _edge_run(tmp_path_factory, _tiny_dataset) -> Path:
    from helpers import train_tiny
    data = _copy(_tiny_dataset, tmp_path_factory, "edge_run_data")   # the master stays clean
    return train_tiny(tmp_path_factory.mktemp("edge_run"), data, "edge", True, False)


@pytest.fixture(scope="module")
def edge_run(tmp_path_factory, _edge_run) -> Path:
    """A trained tiny edge-conditioned run (helpers.train_tiny "edge": edges, no labels;
    checkpoints and export/), this module's own copy. Its config names the dataset it was
    trained on, shared by the copies: evaluations may cache reference statistics there, which
    give the same numbers as computing them afresh."""
    return _copy(_edge_run, tmp_path_factory, "edge_run")
