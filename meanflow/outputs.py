"""The files a program writes into an output folder, so that a rerun into the same folder
leaves no stale ones beside its new results, and never touches a file it did not write.

A program lists the files it is about to write (paths relative to the folder) with
:func:`plan` before writing any of them: the files of the previous run that the new one
will not write again are deleted, and the new list is stored in the folder's manifest
(``.meanflow-outputs.json``). Only paths that a manifest lists are ever deleted, so a user's
own files in the folder stay. A folder written before manifests existed is recognised by the
program's own file names (``legacy``: glob patterns, used only when the folder has no manifest
but holds ``marker``, a file the program always writes).

    removed = plan(out, "sample.py", ["000_cat_00.png", "sheet.png"],
                   legacy=["[0-9][0-9][0-9]_*_[0-9][0-9].png", "sheet.png"], marker="sheet.png")
"""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from .atomic import write_text_atomic
from typing import Iterable, Optional

MANIFEST = ".meanflow-outputs.json"


def _safe(rel: str) -> bool:
    """A relative path inside the folder (a doctored manifest must not reach outside it)."""
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and p.parts[0] != MANIFEST


def previous(folder: Path, legacy: Iterable[str] = (), marker: Optional[str] = None
             ) -> Optional[list[str]]:
    """The files the previous run listed in ``folder``'s manifest; without a manifest, when
    the folder holds the program's ``marker`` file (one it always writes), those matching its
    own ``legacy`` name patterns; None when neither (nothing of ours)."""
    folder = Path(folder)
    try:
        data = json.loads((folder / MANIFEST).read_text())
        files = data["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError("files is not a list of names")
        return [f for f in files if _safe(f)]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        return None                      # unreadable: trust nothing in it, delete nothing
    if marker is None or not (folder / marker).is_file():
        return None
    found = sorted({p.relative_to(folder).as_posix() for pat in legacy for p in folder.glob(pat)
                    if p.is_file() or p.is_symlink()})
    return found or None


def plan(folder: Path, program: str, files: Iterable[str],
         legacy: Iterable[str] = (), marker: Optional[str] = None) -> list[str]:
    """Record that ``program`` is about to write ``files`` into ``folder`` (created here);
    delete what the previous run wrote there that is not among them, and the folders that
    leaves empty. Returns the deleted paths (relative, sorted)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    new = sorted(set(files))
    old = previous(folder, legacy, marker) or []
    keep = set(new)
    removed = []
    for rel in sorted(set(old) - keep):
        p = folder / rel
        if p.is_symlink() or p.is_file():
            p.unlink()
            removed.append(rel)
            _prune_empty(p.parent, folder)
    write_text_atomic(folder / MANIFEST, json.dumps({"program": program, "files": new},
                                                   indent=0))
    return removed


def _prune_empty(d: Path, top: Path) -> None:
    """Remove ``d`` and its parents up to (not including) ``top`` while they are empty."""
    while d != top and top in d.parents:
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent
