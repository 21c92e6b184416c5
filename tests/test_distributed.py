"""meanflow/distributed.py in one process: the collectives answer for this process alone,
the launcher's variables are read and checked, and only the main process shows a bar."""
from __future__ import annotations

import pytest
import torch

from meanflow.distributed import (LaunchError, all_ok, finish, gather, init_state,
                                  launcher_rank_world, progress)


@pytest.fixture
def single(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    return init_state(torch.device("cpu"))


def test_all_ok_is_ok_itself_on_one_process(single):
    assert single.num_processes == 1
    assert all_ok(single, True) is True
    assert all_ok(single, False) is False


def test_all_ok_takes_an_accelerator(single):
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    assert all_ok(acc, True) is True and all_ok(acc, False) is False


def test_gather_and_finish_alone(single):
    items = [(0, "a"), (1, "b")]
    out = gather(items, single)
    assert out == items and out is not items
    assert gather([3], None) == [3]
    finish(single)                                   # nothing to take down


def test_launcher_rank_world(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launcher_rank_world() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launcher_rank_world() == (2, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(LaunchError, match=r"RANK=4 is not in \[0, WORLD_SIZE=4\)"):
        launcher_rank_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(LaunchError, match="must be integers"):
        launcher_rank_world()


def test_progress_shows_on_the_main_process_only():
    with progress(10, "main", main=True) as bar:
        assert not bar.disable and bar.total == 10 and bar.unit == "img"
    with progress(10, "other", main=False) as bar:
        assert bar.disable
