"""What a checkpoint is on disk, in one place: its files, its COMPLETE marker, how its EMAs
are stored, and the checks made before one is used.

    RUN/checkpoints/step_0001000/   accelerate's state (model.safetensors, optimizer.bin,
                                    random_states_*.pkl), ema.safetensors, model_config.json,
                                    COMPLETE (written last: "<step> <training seconds>")

A checkpoint without its COMPLETE marker is an interrupted save and is never used;
``pick_checkpoint`` takes the newest one whose files all open. ``meanflow.rundir.RunFolder``
writes and resumes them; ``meanflow.export`` reads one's EMA as a model.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .errors import first_line

if TYPE_CHECKING:
    from .training import EMA

EXPORT_CONFIG = "model_config.json"   # what a checkpoint and an export carry: their config
CKPT_RE = re.compile(r"^step_(\d{7,})$")
COMPLETE = "COMPLETE"          # marker written last: a checkpoint without it is ignored
EMA_FILE = "ema.safetensors"   # every EMA of a checkpoint, for resume
LEGACY_EMA_FILE = "custom_checkpoint_0.pkl"   # what accelerate's register_for_checkpointing wrote
MODEL_FILE = "model.safetensors"   # accelerate's model weights in a checkpoint; the export's
CORRUPT_SUFFIX = ".corrupt"        # a skipped checkpoint is renamed to step_XXXXXXX.corrupt
CHECKPOINT_FILES = ("optimizer.bin", COMPLETE, EMA_FILE, LEGACY_EMA_FILE, "random_states_0.pkl")
CKPT_DIR_RE = re.compile(r"^step_\d+(\.tmp|\.corrupt)?$")


# --------------------------------------------------------------------------------------------
# Names, the COMPLETE marker, listing and pruning
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
# The EMAs (safetensors, never accelerate's pickle) and the model weights' keys
# --------------------------------------------------------------------------------------------
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
        raise ValueError(f"{src}: cannot load the EMA weights "
                         f"({first_line(e, with_type=True)})") from None
    try:
        ema.load_state_dict(state)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None


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


def checkpoint_weights(p: Path, weights: str) -> Path:
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
        return p / MODEL_FILE
    if (p / EMA_FILE).is_file():
        return p / EMA_FILE
    if (p / LEGACY_EMA_FILE).is_file():
        return p / LEGACY_EMA_FILE
    raise CheckpointError(f"{p}: no {EMA_FILE} (the checkpoint's EMA weights): not loaded; "
                          f"to use its raw training weights instead, ask for them "
                          f"(weights='raw', sample.py --weights raw)")


# --------------------------------------------------------------------------------------------
# Checked before use: the newest good one wins
# --------------------------------------------------------------------------------------------
def check_file(f: Path) -> None:
    """Open ``f`` the way resume will, without reading the tensor data (safetensors: the
    header against the file size; torch files: unpickled with ``weights_only=True``, tensors
    memory-mapped). Raises :class:`CheckpointError` naming the file."""
    try:
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as s:
                s.keys()
        elif f.suffix in (".bin", ".pkl", ".pt"):
            from accelerate.utils.other import load      # accelerate's own loader and globals
            load(str(f), map_location="cpu", mmap=True)
        elif f.suffix == ".json":
            json.loads(f.read_text())
    except Exception as e:  # noqa: BLE001 - whatever is wrong, name the file and stop there
        kind = ("refused by torch.load(weights_only=True): not plain tensors"
                if type(e).__name__ == "UnpicklingError" else type(e).__name__)
        raise CheckpointError(f"{f}: cannot be loaded ({kind}: {first_line(e)})") from None


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` unless every file of checkpoint ``path`` opens."""
    path = Path(path)
    checkpoint_step(path)
    for name in (MODEL_FILE, "optimizer.bin"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing")
    if not (path / EMA_FILE).is_file() and not (path / LEGACY_EMA_FILE).is_file():
        raise CheckpointError(f"{path / EMA_FILE}: missing (the checkpoint's EMA weights)")
    for f in sorted(path.iterdir()):
        if f.is_file():
            check_file(f)


def check_model_fits(ckpt: Path, model, model_cfg: dict, run_config: Path) -> None:
    """Raise :class:`CheckpointError` (one line) unless the model weights of checkpoint
    ``ckpt`` fit ``model`` (the bare network): the shapes are read from the safetensors
    header, before anything is loaded. The line names the first keys that differ and the
    ``model.*`` settings of the checkpoint's own config that differ from ``model_cfg``."""
    f = Path(ckpt) / MODEL_FILE
    try:
        with safe_open(str(f), "pt") as s:
            have = strip_wrappers({k: s.get_slice(k).get_shape() for k in s.keys()})
    except Exception as e:  # noqa: BLE001 - verify_checkpoint has opened it already
        raise CheckpointError(f"{f}: cannot be loaded ({first_line(e)})") from None
    bad = shape_mismatch(have, model.state_dict())
    if bad is None:
        return
    try:
        theirs = json.loads((Path(ckpt) / EXPORT_CONFIG).read_text())["model"]
        diff = config_diff(theirs, model_cfg)
    except Exception:  # noqa: BLE001 - an older checkpoint without its config
        diff = []
    hint = (f"it was trained with {', '.join(diff[:4])}" if diff else
            f"check model.* against {run_config}")
    raise CheckpointError(f"checkpoint {ckpt} does not fit the model: {bad}; {hint}")


def pick_checkpoint(ckpt_dir: Path, warn: Callable[[str], None]
                    ) -> tuple[Optional[Path], list[Path]]:
    """The newest complete checkpoint of ``ckpt_dir`` whose files all load, and the newer
    ones skipped on the way (each reported through ``warn`` in one line). Every process of a
    run checks the same files, so all of them pick the same checkpoint. Raises
    :class:`CheckpointError` when there are checkpoints and none of them loads: starting
    from scratch then would silently throw the run away."""
    ckpts = list_checkpoints(Path(ckpt_dir))
    skipped = []
    for _, p in reversed(ckpts):
        try:
            verify_checkpoint(p)
            return p, skipped
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint {p.name}, it cannot be resumed: {e}")
            skipped.append(p)
    if ckpts:
        raise CheckpointError(f"none of the {len(ckpts)} checkpoints in {ckpt_dir} can be "
                              f"loaded (see the warnings above); to start over, pass another "
                              f"--run-dir")
    return None, skipped


def set_aside(skipped: list[Path], warn: Callable[[str], None]) -> None:
    """Rename skipped checkpoints to ``step_XXXXXXX.corrupt``: kept for inspection, but no
    longer counted by pruning (a corrupt newest one would otherwise outrank, and so prune,
    the checkpoints the resumed run writes)."""
    for p in skipped:
        dst = p.with_name(p.name + CORRUPT_SUFFIX)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(p, dst)
        warn(f"warning: moved {p.name} aside to {dst}")
