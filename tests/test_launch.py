"""Launch and exit: process groups taken down on every exit path, ranks sharing one GPU
under gloo, and a training bar that shows the budget that actually ends the run."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from meanflow import distributed
from meanflow.distributed import TrainProgress, finish, shared_gpu_backend, shutdown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_launch(monkeypatch):
    """The environment torchrun --nproc_per_node 1 gives its one process."""
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(k, v)
    yield
    from accelerate.state import PartialState
    shutdown()
    PartialState._reset_state()


def test_finish_takes_down_a_one_process_group(one_rank_launch):
    """torchrun with one process still has a process group; finish() left it up (NCCL then
    warns at exit that destroy_process_group() was not called)."""
    state = distributed.init_state(torch.device("cpu"))
    assert dist.is_initialized() and state.num_processes == 1
    finish(state)
    assert not dist.is_initialized()


def test_evaluate_takes_down_its_group_on_an_error_exit(one_rank_launch, tmp_path):
    import evaluate
    (tmp_path / "not_a_model").mkdir()
    assert evaluate.main(["--ckpt", str(tmp_path / "not_a_model")]) == 2
    assert not dist.is_initialized()


def test_train_takes_down_its_group_on_a_setup_error(one_rank_launch, tmp_path):
    """A SetupError after the Accelerator exists (the data path is missing) still ends with no
    process group up."""
    import train
    rc = train.main(["--config", str(train.ROOT / "configs/fashion_demo.yaml"), "--run-dir",
                     str(tmp_path / "run"), f"data.path={tmp_path / 'none'}",
                     "train.log_with=none"])
    assert rc == 2
    assert not dist.is_initialized()


@pytest.mark.parametrize("gpus,local_world,want", [(1, "2", "gloo"), (1, "1", None),
                                                   (8, "8", None), (2, "4", "gloo"),
                                                   (0, "2", None)])
def test_ranks_that_share_a_gpu_use_gloo(monkeypatch, gpus, local_world, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert shared_gpu_backend({"LOCAL_WORLD_SIZE": local_world}) == want


def test_ranks_that_share_a_gpu_take_it_in_turn(monkeypatch):
    from meanflow.runtime import process_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert process_device() == torch.device("cuda", 0)
        assert process_device("cuda") == torch.device("cuda", 0)


class _Bar:
    def __init__(self, total, n=0):
        self.total, self.n, self.postfix = total, n, ""

    def update(self, k):
        self.n += k

    def set_postfix_str(self, s, refresh=True):
        self.postfix = s

    def close(self):
        pass


def test_a_time_budget_bar_counts_minutes_against_the_budget():
    """train.max_minutes=3 with train.max_steps=1,000,000: the bar's total is the 3 minutes,
    its position the minutes trained (resumes included), and the steps stand beside it."""
    now = [90.0]                                       # 1.5 min trained by an earlier session
    p = TrainProgress(500, 1_000_000, 180.0, lambda: now[0], bar=_Bar(3.0))
    assert p.bar.total == 3.0 and p.bar.n == pytest.approx(1.5) and p.bar.postfix == "step 500"
    now[0] = 150.0
    p.update(620)
    assert p.bar.n == pytest.approx(2.5) and p.bar.postfix == "step 620"
    now[0] = 400.0                                     # past the budget: the bar stops at it
    p.update(700)
    assert p.bar.n == pytest.approx(3.0)


def test_without_a_budget_the_bar_counts_steps(capsys):
    p = TrainProgress(10, 40, float("inf"), lambda: 0.0)
    assert p.bar.total == 40 and p.bar.n == 10
    p.update(13)
    assert p.bar.n == 13
    p.close()


def test_the_real_budget_bar_shows_minutes(capsys):
    p = TrainProgress(0, 1_000_000, 540.0, lambda: 30.0)
    p.update(7)
    p.close()
    err = capsys.readouterr().err
    assert "0.50/9.00 min" in err and "step 7" in err and "1000000" not in err


def test_relative_paths_are_relative_to_the_working_directory_and_recorded_absolute(tmp_path):
    """The one rule: relative to where the command runs; a run records them absolute (so
    evaluate.py finds a run's data from any directory)."""
    from meanflow.config import load_config
    from meanflow.launch import resolve_paths
    cfg = load_config(None, ["data.path=data/x/train", "data.val_path=", "train.init_from=../w",
                             f"meanflow.teacher={tmp_path / 't'}"])
    resolve_paths(cfg, cwd=tmp_path / "work")
    assert cfg.data.path == str(tmp_path / "work" / "data" / "x" / "train")
    assert cfg.data.val_path == ""                               # empty stays empty
    assert cfg.train.init_from == str(tmp_path / "w")
    assert cfg.meanflow.teacher == str(tmp_path / "t")


def test_one_precision_table_with_fp32_and_no_as_one_name_in_train_and_evaluate():
    """Training and evaluation read their precision names from one table: fp32 and no are
    the same mode in both, and each maps to the same autocast dtype."""
    from types import SimpleNamespace

    import evaluate
    from meanflow import precision
    from meanflow.config import load_config
    from meanflow.jvp_graph import autocast_dtype_of
    from meanflow.launch import resolve_precision
    cpu = torch.device("cpu")
    assert precision.canonical("fp32") == precision.canonical("no") == "no"
    assert precision.canonical("BF16") == "bf16"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        precision.canonical("fp8")
    assert [precision.autocast_dtype(n) for n in ("no", "fp32", "bf16", "fp16")] == [
        None, None, torch.bfloat16, torch.float16]
    assert [autocast_dtype_of(n) for n in ("no", "bf16", "fp16", "fp8")] == [
        None, torch.bfloat16, torch.float16, None]
    # training: train.mixed_precision=fp32 is accepted and resolved to accelerate's "no"
    tc = load_config(None, ["train.mixed_precision=fp32"]).train
    assert resolve_precision(tc, cpu, {}) == "no"
    assert resolve_precision(SimpleNamespace(mixed_precision="no"), cpu,
                             {"ACCELERATE_MIXED_PRECISION": "fp32"}) == "no"
    # evaluation: --precision no is accepted and recorded as fp32, as results always said
    for name in ("no", "fp32", "auto"):
        args = evaluate.parse_args(["--ckpt", "x", "--precision", name])
        assert evaluate.resolve_precision(args.precision, cpu) == "fp32"
    assert evaluate.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--ckpt", "x", "--precision", "fp8"])
