"""Test-wide settings: never touch the network, keep CPU runs small and deterministic."""
import os
import sys
from pathlib import Path

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
    import pytest
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
