"""Small pieces of the training machinery: EMA warm-up and checkpoint file, LR schedule,
data order."""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from meanflow.checkpoint import EMA_FILE, LEGACY_EMA_FILE, load_ema, save_ema
from meanflow.training import EMA, ShardedEpochSampler, lr_at


def test_ema_decay_warms_up_then_holds():
    net = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, [0.999])
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net, 0)                      # decay (1 + 0) / (10 + 0) = 0.1
    assert torch.allclose(ema.shadows[0]["weight"], torch.full((2, 2), 0.9))
    ema.update(net, 10_000)                 # warm-up over: 0.999
    assert torch.allclose(ema.shadows[0]["weight"], torch.full((2, 2), 0.9 + 0.1 * 0.001))


class _Payload:
    """A pickle that runs code when loaded: what a hostile checkpoint could hold."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_ema_checkpoint_file_round_trips_and_never_unpickles_code(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = EMA(net, [0.9, 0.5])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    ema.update(net, 100)
    save_ema(tmp_path, ema)
    assert (tmp_path / EMA_FILE).is_file() and not list(tmp_path.glob("*.tmp"))
    back = EMA(net, [0.9, 0.5])
    load_ema(tmp_path, back)
    for a, b in zip(ema.shadows, back.shadows):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a checkpoint written by accelerate's register_for_checkpointing (pickled tensors)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(ema.state_dict(), legacy / LEGACY_EMA_FILE)
    old = EMA(net, [0.9, 0.5])
    load_ema(legacy, old)
    assert torch.equal(old.shadows[1]["1.weight"], ema.shadows[1]["1.weight"])

    # ... but one whose pickle carries code is refused, and the code does not run
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    torch.save({"0.0.weight": _Payload(tmp_path / "pwned")}, hostile / LEGACY_EMA_FILE)
    with pytest.raises(ValueError, match=f"{LEGACY_EMA_FILE}: cannot load the EMA weights"):
        load_ema(hostile, EMA(net, [0.9, 0.5]))
    assert not (tmp_path / "pwned").exists()

    # a config with other EMA decays than the checkpoint: the file and the keys are named
    with pytest.raises(ValueError, match=rf"{EMA_FILE}: EMA state does not match 1 decay"):
        load_ema(tmp_path, EMA(net, [0.9]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty}: no {EMA_FILE}"):
        load_ema(empty, EMA(net, [0.9]))


def test_lr_schedule():
    assert lr_at(0, 1.0, 10, 100, "constant") == 0.1
    assert lr_at(50, 1.0, 10, 100, "constant") == 1.0
    assert abs(lr_at(10, 1.0, 10, 110, "cosine") - 1.0) < 1e-12
    assert abs(lr_at(110, 1.0, 10, 110, "cosine")) < 1e-12


def test_sharded_sampler_splits_global_batches_and_resumes():
    n, bs, world = 20, 3, 2
    per_rank = [list(itertools.islice(iter(ShardedEpochSampler(n, bs, r, world, 0)), 9))
                for r in range(world)]
    one_epoch = [k for r in range(world) for k in per_rank[r]]
    assert len(set(one_epoch)) == len(one_epoch) == 18          # 3 global batches, no repeat
    single = list(itertools.islice(iter(ShardedEpochSampler(n, bs * world, 0, 1, 0)), 18))
    assert single[:3] == per_rank[0][:3] and single[3:6] == per_rank[1][:3]
    resumed = list(itertools.islice(iter(ShardedEpochSampler(n, bs, 0, world, 0,
                                                             start_batch=2)), 3))
    assert resumed == per_rank[0][6:9]


def test_seed_rng_draws_like_torch_manual_seed_without_seeding_cuda_on_cpu(monkeypatch):
    from meanflow.runtime import seed_rng
    torch.manual_seed(5)
    want = (torch.rand(4), torch.randn(3), torch.randint(0, 100, (5,)))
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed", calls.append)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", calls.append)
    seed_rng(5)
    got = (torch.rand(4), torch.randn(3), torch.randint(0, 100, (5,)))
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert calls == []                    # no (lazily queued, stack-recording) CUDA seeding
    seed_rng(6, "cuda")                   # a CUDA run seeds its device too (dropout)
    assert calls == [6]


def test_an_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    """meanflow.atomic, the one home of tmp + rename: a block that fails leaves the old file
    and no temporary; the temporary keeps the target's suffix (numpy adds .npz otherwise)."""
    import numpy as np

    from meanflow.atomic import atomic_path, write_text_atomic
    target = tmp_path / "stats.npz"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path
        np.savez(tmp, a=np.arange(3))
    assert np.load(target)["a"].tolist() == [0, 1, 2]
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            np.savez(tmp, a=np.arange(5))
            raise RuntimeError("killed mid-write")
    assert np.load(target)["a"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]
    write_text_atomic(tmp_path / "c.yaml", "x: 1\n")
    assert (tmp_path / "c.yaml").read_text() == "x: 1\n"


def test_no_two_seed_streams_share_a_seed():
    """Every stream of meanflow.runtime.Stream over its coordinates (ranks 0-63, steps,
    micro-steps, epochs, item and sample indices), for two user seeds: all seeds distinct.
    The dropout seed was mix_seed(seed, rank, step, micro), equal on rank 3 to the draws'
    mix_seed(seed, 3, step, micro)."""
    from itertools import product

    from meanflow.runtime import Stream, stream_seed
    coords = {
        Stream.EPOCH_ORDER: [(e,) for e in range(200)],
        Stream.DRAWS: list(product(range(200), range(4))),
        Stream.AUGMENT: list(product(range(8), range(400))),
        Stream.VALIDATION: [(), (1,)],
        Stream.DROPOUT: list(product(range(64), range(50), range(4))),
        Stream.SAMPLE: [(i,) for i in range(4000)],
    }
    assert set(coords) == set(Stream)                  # a new stream must be added here too
    seen: dict[int, tuple] = {}
    for seed in (0, 1):
        for stream, cs in coords.items():
            for c in cs:
                s = stream_seed(seed, stream, *c)
                assert s not in seen, (seed, stream.name, c, seen.get(s))
                seen[s] = (seed, stream.name, c)


def test_the_validation_batch_does_not_depend_on_the_global_rng(tmp_path):
    """A resume restores torch's RNG before the validation batch is read: on a cache that
    samples the latent posterior (SD-VAE), the batch must not depend on that state, and
    reading it must leave the training RNG where it was."""
    from meanflow.config import from_dict
    from meanflow.validation import validation_batch

    class PosteriorItems:                       # an SD-VAE reader: x = mean + std * noise
        flip = True

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return dict(x=torch.full((1, 4, 4), float(i)) + torch.randn(1, 4, 4),
                        edge=torch.zeros(1, 4, 4, dtype=torch.uint8), label=torch.tensor(0))
    cfg = from_dict(dict(data=dict(use_edges=True, use_labels=False), train=dict(num_val=4)))
    torch.manual_seed(1)
    a = validation_batch(cfg, PosteriorItems(), "cpu")
    after = torch.random.get_rng_state()
    torch.manual_seed(2)                        # the state a resumed run restores instead
    b = validation_batch(cfg, PosteriorItems(), "cpu")
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["noise"], b["noise"])
    torch.manual_seed(1)
    assert torch.equal(torch.random.get_rng_state(), after)   # the training RNG untouched


def test_first_line_is_the_one_line_an_error_is_told_in():
    """meanflow.errors.first_line, what every one-line refusal quotes: the first line that
    says something (torch's weights_only boilerplate skipped), cut to a limit, and the type
    name for an exception without a message."""
    from meanflow.errors import first_line
    e = RuntimeError("Weights only load failed. Re-running with weights_only=False ...\n\n"
                     "  Unsupported global: GLOBAL os.system  \nCheck the documentation")
    assert first_line(e) == "Unsupported global: GLOBAL os.system"
    assert first_line(ValueError("x" * 500), limit=10) == "x" * 10
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("disk full\nmore"), with_type=True) == "OSError: disk full"
    assert first_line(OSError(), with_type=True) == "OSError"


def test_every_export_writer_is_the_one_writer_and_reads_back_through_export(tmp_path,
                                                                             monkeypatch):
    """train.py's export (export_model), the run folder's repair from a checkpoint
    (sync_export) and Pipeline.save_pretrained all write through meanflow.export.write_export,
    and what each writes reads back through Export with the same configs and weights (a
    saved pipeline's paths made neutral)."""
    import copy
    import json

    from helpers import tiny_cfg

    import meanflow
    import models
    from meanflow import export as export_mod
    from meanflow import pipeline as pipeline_mod
    from meanflow import rundir as rundir_mod
    from meanflow.export import Export
    from meanflow.pipeline import neutral_paths
    from meanflow.rundir import export_step, sync_export
    from meanflow.checkpoint import mark_complete
    from meanflow.export import export_config, export_model
    from safetensors.torch import save_file

    cfg = tiny_cfg()
    cfg.data.path = str(tmp_path / "data" / "train")
    meta = dict(codec="pixel", channels=1, class_names=[f"c{i}" for i in range(10)],
                source=str(tmp_path / "images"))
    torch.manual_seed(0)
    net = models.build(cfg.model)
    ema = EMA(net, [0.9])
    for s in ema.shadows[0].values():                  # an EMA that is not the raw weights
        s.add_(0.01)
    averaged = copy.deepcopy(net)
    ema.copy_to(averaged)

    calls = []
    real = export_mod.write_export
    for module in (export_mod, rundir_mod, pipeline_mod):   # where each caller finds it
        monkeypatch.setattr(module, "write_export",
                            lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    run = tmp_path / "run"
    export_model(run / "export", averaged, cfg, meta, 7, 0.9)            # train.py's export
    ckpt = run / "checkpoints" / "step_0000007"                        # a checkpoint of step 7
    ckpt.mkdir(parents=True)
    save_file({f"module.{k}": v.contiguous() for k, v in net.state_dict().items()},
              str(ckpt / "model.safetensors"))
    save_ema(ckpt, ema)
    export_config(ckpt, cfg, meta, 7, 0.9)
    mark_complete(ckpt, 7, 1.0)
    other = tmp_path / "other"
    (other / "export").mkdir(parents=True)
    assert sync_export(other, ckpt).startswith("note: ")                 # rebuilt from it
    saved = meanflow.load_pipeline(run, "cpu").save_pretrained(tmp_path / "saved")
    assert calls == [run / "export", other / "export", saved]
    assert export_step(run / "export") == export_step(other / "export") == 7

    a, b, c = (Export.read(p) for p in (run, other / "export", saved))
    assert a.path == run / "export" and a.step == b.step == c.step == 7
    assert a.model == b.model == c.model and a.meanflow == b.meanflow == c.meanflow
    assert a.data == b.data == cfg.data and a.meanflow == cfg.meanflow and a.model == cfg.model
    assert c.data.path == "data/train" and c.dataset_meta == neutral_paths(a.dataset_meta)
    assert a.dataset_meta == b.dataset_meta == meta and a.weights == b.weights == c.weights
    assert json.loads((other / "export" / "model_config.json").read_text())["step"] == 7
    want = averaged.state_dict()
    for e in (a, b, c):
        got = e.build("cpu").state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
