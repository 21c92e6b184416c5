"""Where the library finds the repository's other two packages, ``models`` and ``preprocess``.

A clone runs its scripts from the repository root, where the folders ``models/`` and
``preprocess/`` are importable under those plain names, and the library imports them so.
An installed copy (``pip install .`` or ``-e .``) ships them inside this package instead, as
``meanflow.models`` and ``meanflow.preprocess`` (pyproject.toml): generic top-level names in
site-packages would collide with other projects' modules of the same name.

:func:`repo_packages` is the one place that reconciles the two: while it is active, the plain
names resolve to the installed copies, and afterwards ``sys.modules`` is as it was, so a
user's own ``models`` module is neither shadowed nor replaced. In a clone it does nothing.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Iterator

PACKAGES = ("models", "preprocess")


def _installed() -> dict:
    """{plain name: installed module}, empty in a clone (no ``meanflow.models`` there)."""
    try:
        return {n: importlib.import_module(f"{__package__}.{n}") for n in PACKAGES}
    except ModuleNotFoundError:
        return {}


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


@contextlib.contextmanager
def repo_packages() -> Iterator[None]:
    """Make ``import models`` / ``import preprocess`` find this project's packages."""
    installed = _installed()
    if not installed:
        yield
        return
    saved = {k: m for k, m in sys.modules.items() if _ours(k)}
    for k in saved:
        del sys.modules[k]
    sys.modules.update(installed)
    try:
        yield
    finally:
        for k in [k for k in sys.modules if _ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
