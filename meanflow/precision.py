"""The precision names, one table for training and evaluation.

``train.mixed_precision`` (and ``accelerate launch --mixed_precision``) and ``evaluate.py
--precision`` name the autocast mode with the same words: ``no`` (accelerate's word) and its
alias ``fp32`` for no autocast, ``bf16`` and ``fp16``. Each entry point accepts the subset it
supports (training all three; evaluation no/fp32 and bf16) plus ``auto``, and records the
canonical name of the mode (training: accelerate's ``no``; evaluation: ``fp32``, as its
results have always said).

Imported by config.py, so nothing here imports torch at module level."""
from __future__ import annotations

from typing import Optional

# canonical name -> the torch dtype autocast runs in (None: no autocast, fp32)
AUTOCAST = {"no": None, "bf16": "bfloat16", "fp16": "float16"}
ALIASES = {"fp32": "no"}                      # other spellings of a canonical name
NAMES = (*AUTOCAST, *ALIASES)                  # every precision name accepted somewhere
AUTO = "auto"                                  # resolved per device: see auto_precision


def canonical(name: str) -> str:
    """``name`` (any case, an alias included) as the table's canonical name; ValueError for
    a name that is not a precision."""
    low = str(name).lower()
    low = ALIASES.get(low, low)
    if low not in AUTOCAST:
        raise ValueError(f"unknown precision {name!r}: choose one of {list(NAMES)}")
    return low


def autocast_dtype(name: str):
    """The autocast dtype of a precision name (None for no / fp32)."""
    dtype: Optional[str] = AUTOCAST[canonical(name)]
    if dtype is None:
        return None
    import torch
    return getattr(torch, dtype)


def auto_precision(device) -> str:
    """What ``auto`` means on ``device`` with no launcher flag: ``bf16`` on a CUDA device that
    supports it, else ``no`` (CPU autocast is opt-in)."""
    import torch
    ok = getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_bf16_supported()
    return "bf16" if ok else "no"
