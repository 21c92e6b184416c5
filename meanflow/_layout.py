"""Where the library finds the repository's backbones, the package ``models``.

A clone runs its scripts from the repository root, where the folder ``models/`` is importable
under that plain name, and the library imports it so. An installed copy (``pip install .`` or
``-e .``) ships it inside this package instead, as ``meanflow.models`` (pyproject.toml): a
generic top-level name in site-packages would collide with other projects' modules.

:func:`repo_packages` is the one place that reconciles the two: while it is active, the plain
name resolves to the installed copy, and afterwards ``sys.modules`` is as it was, so a user's
own ``models`` module is neither shadowed nor replaced. In a clone it does nothing.

``preprocess/`` (the dataset-building command lines) is not part of the library: it imports
the library, never the other way round, and is not installed.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Iterator

PACKAGES = ("models",)


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
    """Make ``import models`` find this project's package."""
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
