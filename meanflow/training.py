"""Machinery for train.py: EMA, learning-rate schedule, deterministic data order, checkpoint
discovery and the inference export. Nothing here knows about the MeanFlow math."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, write_text_atomic

from .config import Config, to_dict
from .runtime import Stream, seed_rng, stream_seed

CKPT_RE = re.compile(r"^step_(\d{7,})$")
COMPLETE = "COMPLETE"          # marker written last: a checkpoint without it is ignored
EXPORT_DIR = "export"
EXPORT_CONFIG = "model_config.json"
EMA_FILE = "ema.safetensors"   # every EMA of a checkpoint, for resume
LEGACY_EMA_FILE = "custom_checkpoint_0.pkl"   # what accelerate's register_for_checkpointing wrote


# --------------------------------------------------------------------------------------------
# Learning rate
# --------------------------------------------------------------------------------------------
def lr_at(step: int, base: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine":
        frac = (step - warmup) / max(1, total - warmup)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return base


# --------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------
class ShardedEpochSampler(torch.utils.data.Sampler):
    """Every epoch a permutation of the dataset from (seed, epoch); rank r takes every
    world-th batch-sized slice. Yields ``epoch * n + index`` so that a dataset wrapper can seed
    each sample's augmentation from (seed, epoch, index): the data seen at micro-step k is
    then a function of k alone, which makes resume exact and lets a run start mid-epoch.
    """

    def __init__(self, n: int, per_rank_batch: int, rank: int, world: int, seed: int,
                 start_batch: int = 0):
        self.n, self.bs, self.rank, self.world, self.seed = n, per_rank_batch, rank, world, seed
        self.per_epoch = n // (per_rank_batch * world)       # full global batches per epoch
        if self.per_epoch == 0:
            raise ValueError(f"dataset has {n} samples, fewer than one global batch of "
                             f"{per_rank_batch * world}")
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[int]:
        b = self.start_batch
        while True:
            epoch, j = divmod(b, self.per_epoch)
            g = torch.Generator().manual_seed(stream_seed(self.seed, Stream.EPOCH_ORDER, epoch))
            perm = torch.randperm(self.n, generator=g)
            gb = self.bs * self.world
            for jj in range(j, self.per_epoch):
                lo = jj * gb + self.rank * self.bs
                for i in perm[lo: lo + self.bs].tolist():
                    yield epoch * self.n + i
            b = (epoch + 1) * self.per_epoch


class SeededItems(torch.utils.data.Dataset):
    """Seeds torch's RNG from (seed, epoch, index) before each item: augmentation (flip,
    latent posterior noise) no longer depends on worker count or on where a run resumed."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int):
        epoch, i = divmod(k, len(self.dataset))
        seed_rng(stream_seed(self.seed, Stream.AUGMENT, epoch, i))   # flip, posterior: CPU
        return self.dataset[i]


def training_loader(data, cfg: Config, per_rank: int, rank: int, world: int, step: int,
                    device) -> torch.utils.data.DataLoader:
    """The loader of one rank's micro-batches from optimizer step ``step`` on: the same data
    order and augmentation whatever the process and worker counts, and where a run resumed."""
    tc = cfg.train
    sampler = ShardedEpochSampler(len(data), per_rank, rank, world, tc.seed,
                                  start_batch=step * tc.grad_accum)
    return torch.utils.data.DataLoader(
        SeededItems(data, tc.seed), batch_size=per_rank, sampler=sampler,
        num_workers=cfg.data.num_workers, pin_memory=torch.device(device).type == "cuda",
        drop_last=True, persistent_workers=cfg.data.num_workers > 0)


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving averages of a model's floating-point parameters, one per decay.

    Saved in a checkpoint as safetensors (``save_ema``/``load_ema``), not through
    ``accelerator.register_for_checkpointing``: accelerate pickles registered objects and
    unpickles them with ``weights_only=False``, i.e. resuming from a checkpoint someone sent
    would run any code it holds.

    Updated on every rank (the parameters are identical after the all-reduce), so no rank
    drifts and no collective is needed.
    """

    def __init__(self, model: nn.Module, decays: list[float]):
        self.decays = [float(d) for d in decays]
        self.names = [n for n, p in model.named_parameters()]
        self.shadows = [{n: p.detach().clone().float() for n, p in model.named_parameters()}
                        for _ in self.decays]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, apply: Optional[torch.Tensor] = None) -> None:
        """Average in the weights after optimizer step ``step`` (0-based). The decay warms up
        as min(decay, (1 + step) / (10 + step)): with a fixed 0.999 a short run's EMA would
        still be 90% the random initialisation after 100 steps.

        ``apply``: a 0-dim bool tensor on the model's device; False leaves the averages as
        they are (a skipped update), decided on the device without a host read."""
        params = dict(model.named_parameters())
        for decay, shadow in zip(self.decays, self.shadows):
            d = min(decay, (1.0 + step) / (10.0 + step))
            keys = list(shadow)
            avg, cur = [shadow[k] for k in keys], [params[k].detach().float() for k in keys]
            if apply is None:
                torch._foreach_lerp_(avg, cur, 1.0 - d)
            else:
                # avg += w (cur - avg) with w a device tensor: lerp would read it on the host
                delta = torch._foreach_sub(cur, avg)
                torch._foreach_mul_(delta, apply.float() * (1.0 - d))
                torch._foreach_add_(avg, delta)

    def fill(self, net: nn.Module, live: nn.Module, index: int = 0) -> nn.Module:
        """``net`` made the EMA network: ``live``'s buffers (and parameters), then EMA
        ``index`` over the parameters. ``net`` must live on the training device (a copy of a
        device tensor into a host parameter fails)."""
        net.load_state_dict(live.state_dict())
        self.copy_to(net, index)
        return net

    def copy_to(self, model: nn.Module, index: int = 0) -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.shadows[index][n].to(p.dtype))

    def state_dict(self) -> dict:
        return {f"{i}.{n}": t for i, s in enumerate(self.shadows) for n, t in s.items()}

    def load_state_dict(self, state: dict) -> None:
        want = set(self.state_dict())
        if set(state) != want:
            missing, extra = sorted(want - set(state)), sorted(set(state) - want)
            raise ValueError(f"EMA state does not match {len(self.decays)} decay(s) of this "
                             f"model: missing {missing[:3]}, unexpected {extra[:3]}")
        for i, s in enumerate(self.shadows):
            for n in s:
                if state[f"{i}.{n}"].shape != s[n].shape:
                    raise ValueError(f"EMA state {i}.{n}: shape {tuple(state[f'{i}.{n}'].shape)}"
                                     f", the model has {tuple(s[n].shape)}")
                s[n].copy_(state[f"{i}.{n}"])


class Meter:
    """Means of per-step device scalars (loss statistics), read on the host only when asked:
    one transfer per read instead of one per statistic and step."""

    def __init__(self):
        self.sums: dict = {}
        self.count: Optional[torch.Tensor] = None

    def add(self, stats: dict, weight: torch.Tensor) -> None:
        """Add ``stats`` (0-dim tensors) if ``weight`` (0-dim bool tensor) is True."""
        for k, v in stats.items():
            v = torch.where(weight, v.float(), torch.zeros_like(v, dtype=torch.float32))
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        w = weight.float()
        self.count = w if self.count is None else self.count + w

    def read(self) -> dict:
        """{name: mean over the counted steps} (NaN when none counted); then reset."""
        if self.count is None:
            return {}
        keys = list(self.sums)
        vals = torch.stack([self.sums[k] for k in keys] + [self.count]).tolist()
        n = vals.pop()
        self.sums, self.count = {}, None
        return {k: (v / n if n else float("nan")) for k, v in zip(keys, vals)}


def save_ema(ckpt: Path, ema: EMA) -> None:
    """Write every EMA of ``ema`` to ``ckpt/ema.safetensors`` (tmp + rename)."""
    with atomic_path(ckpt / EMA_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                  str(tmp), metadata={"decays": json.dumps(ema.decays)})


def load_ema(ckpt: Path, ema: EMA) -> None:
    """Load the EMAs of checkpoint ``ckpt`` into ``ema``. Checkpoints written before the
    safetensors file hold them in accelerate's pickle, read here with ``weights_only=True``
    (plain tensors only; anything else is refused)."""
    f, legacy = ckpt / EMA_FILE, ckpt / LEGACY_EMA_FILE
    src = f if f.is_file() else legacy if legacy.is_file() else None
    if src is None:
        raise FileNotFoundError(f"{ckpt}: no {EMA_FILE} (the checkpoint's EMA weights)")
    try:
        state = (load_file(str(src)) if src == f else
                 torch.load(src, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - unreadable, or a pickle that is not plain tensors
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"{src}: cannot load the EMA weights ({type(e).__name__}: "
                         f"{first})") from None
    try:
        ema.load_state_dict(state)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint whose files cannot be used; the message names the file."""


def ckpt_name(step: int) -> str:
    return f"step_{step:07d}"


def is_complete(path: Path) -> bool:
    """Whether ``path`` carries the COMPLETE marker (written last, after every file of the
    checkpoint): without it a checkpoint is an interrupted save and is never used."""
    return (Path(path) / COMPLETE).is_file()


def mark_complete(path: Path, step: int, seconds: float) -> None:
    """Write the COMPLETE marker, the last file of a checkpoint: "<step> <seconds>"."""
    (Path(path) / COMPLETE).write_text(f"{step} {seconds:.3f}\n")


def checkpoint_step(path: Path) -> tuple[int, float]:
    """(step, training seconds so far) from a checkpoint's COMPLETE marker, the one reader of
    the marker's contents ("<step> <seconds>"; older markers hold the step alone)."""
    marker = Path(path) / COMPLETE
    try:
        parts = marker.read_text().split()
        return int(parts[0]), float(parts[1]) if len(parts) > 1 else 0.0
    except (OSError, ValueError, IndexError):
        raise CheckpointError(f"{marker}: missing or unreadable (not a complete "
                              f"checkpoint)") from None


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Interrupted ones (no COMPLETE marker) are ignored."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    for _, p in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_dir.glob("*.tmp"):                    # leftovers of interrupted saves
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Inference export: safetensors weights + JSON config (nothing pickled)
# --------------------------------------------------------------------------------------------
def export_info(cfg: Config, dataset_meta: dict, step: int, ema_decay: Optional[float]) -> dict:
    """model_config.json's contents: model, objective and data settings, the dataset's
    metadata, step, EMA decay."""
    return dict(model=to_dict(cfg.model), meanflow=to_dict(cfg.meanflow),
                data=to_dict(cfg.data), dataset_meta=dataset_meta, step=step,
                ema_decay=ema_decay, format_version=1)


def export_config(out_dir: Path, cfg: Config, dataset_meta: dict, step: int,
                  ema_decay: Optional[float]) -> None:
    """Write ``model_config.json`` (:func:`export_info`) atomically: what every checkpoint
    carries, so that its export can be rebuilt from it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / EXPORT_CONFIG,
                      json.dumps(export_info(cfg, dataset_meta, step, ema_decay), indent=2,
                                 default=str))


def export_model(out_dir: Path, model: nn.Module, cfg: Config, dataset_meta: dict, step: int,
                 ema_decay: Optional[float]) -> None:
    """Write ``model.safetensors`` and ``model_config.json`` atomically (tmp + rename), with
    the one export writer (:func:`meanflow.export.write_export`)."""
    from .export import write_export
    write_export(out_dir, model.state_dict(), export_info(cfg, dataset_meta, step, ema_decay),
                 step)


WEIGHTS = ("ema", "raw")       # what load_model reads from a checkpoint
CHECKPOINT_FILES = ("optimizer.bin", COMPLETE, EMA_FILE, LEGACY_EMA_FILE, "random_states_0.pkl")
CKPT_DIR_RE = re.compile(r"^step_\d+(\.tmp|\.corrupt)?$")


def load_model(path: str | Path, device=None, weights: str = "ema") -> tuple[nn.Module, dict]:
    """(network in eval mode on ``device``, its export info) from an export or saved pipeline
    folder, a run folder containing ``export/``, or a complete checkpoint
    (``RUN/checkpoints/step_N``: its first EMA). The one way to load a trained model; ``device``
    defaults to the process's (``runtime.process_device``: cuda:LOCAL_RANK when CUDA is
    available, else the CPU).

    ``weights="raw"`` loads a checkpoint's training weights instead of its EMA (said on
    stderr, and recorded as ``info["weights"]``); it is never chosen silently: a checkpoint
    without its COMPLETE marker, an unfinished ``step_N.tmp`` save, or one without
    ``ema.safetensors`` is refused, one line naming what is missing.

    The files are read and checked on the CPU; the network is then built on ``device`` itself
    and the weights copied in (:func:`place_model`), so no process's weights pass through
    cuda:0."""
    from .export import Export
    from .runtime import process_device
    dev = process_device(device)
    exp = Export.read(path, weights=weights)
    return exp.build(dev), exp.info


def place_model(net: nn.Module, info: dict, device) -> nn.Module:
    """A copy of the CPU network ``net`` built on ``device`` itself, its weights copied in
    (building there, rather than moving, also works under a fake-tensor device)."""
    from .export import Export
    out = Export.from_info(info).network(device)
    out.load_state_dict(net.state_dict())
    return out.eval()


def strip_wrappers(state: dict) -> dict:
    """Keys of a prepared model's state (DDP's ``module.``, torch.compile's ``_orig_mod.``)
    as the bare model names them."""
    out = {}
    for k, v in state.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def shape_mismatch(have: dict, want: dict) -> Optional[str]:
    """None when ``have`` (name -> tensor or shape) fits ``want``; else one line: how many
    keys differ in shape (with the first), are missing or unexpected."""
    shape = lambda v: list(getattr(v, "shape", v))           # noqa: E731
    wrong = [k for k in want if k in have and shape(have[k]) != shape(want[k])]
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    if not (wrong or missing or extra):
        return None
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} key{'s' * (len(wrong) != 1)} differ in shape, e.g. {k} "
                     f"{shape(have[k])} vs {shape(want[k])}")
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
    return "; ".join(parts)


def config_diff(a: dict, b: dict, prefix: str = "model.") -> list[str]:
    """``prefix+key=<a> (here <b>)`` for each key whose value differs between two dicts."""
    return [f"{prefix}{k}={a[k]!r} (here {b[k]!r})" for k in b if k in a and a[k] != b[k]]


def _checkpoint_weights(p: Path, weights: str) -> Path:
    """The weights file of checkpoint folder ``p`` for ``weights``, or a one-line refusal."""
    if p.name.endswith(".tmp"):
        raise CheckpointError(f"{p}: an unfinished checkpoint save (step_N.tmp, interrupted "
                              f"before its rename): not loaded; use a complete checkpoint "
                              f"of {p.parent} or the run's export")
    if not is_complete(p):
        raise CheckpointError(f"{p}: no {COMPLETE} marker, so not a complete checkpoint (an "
                              f"interrupted save): not loaded; use a complete checkpoint or "
                              f"the run's export")
    if weights == "raw":
        return p / "model.safetensors"
    if (p / EMA_FILE).is_file():
        return p / EMA_FILE
    if (p / LEGACY_EMA_FILE).is_file():
        return p / LEGACY_EMA_FILE
    raise CheckpointError(f"{p}: no {EMA_FILE} (the checkpoint's EMA weights): not loaded; "
                          f"to use its raw training weights instead, ask for them "
                          f"(weights='raw', sample.py --weights raw)")


def load_export(path: str | Path, device="cpu", weights: str = "ema") -> tuple[nn.Module, dict]:
    """Read an export, run folder or checkpoint (see :func:`load_model`, the entry for
    inference) into a network built on the CPU, then moved to ``device``."""
    from .export import Export
    exp = Export.read(path, weights=weights)
    return exp.build("cpu").to(device).eval(), exp.info
