"""Atomic file writes, the one home of the idiom: write to a temporary file in the same folder,
then rename it over the target, so that a kill leaves the old file or the new one, never a torn
one. Every writer of a file that a later run reads (configs, checkpoints' EMA, exports,
statistics, manifests, reports) goes through here."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; renamed over ``path`` when the
    block ends without an error, removed otherwise. The temporary name ends in ``path``'s own
    suffix, so writers that pick a format from it (numpy's .npz, PIL's .png) keep working."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: PathLike, text: str) -> None:
    """``path`` holds ``text``, flushed to disk, or what it held before."""
    with atomic_path(path, fsync=True) as tmp:
        tmp.write_text(text)


__all__ = ["atomic_path", "write_text_atomic"]
