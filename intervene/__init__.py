"""The public package: ``from intervene import intervene, LanguageModel, save, ...``.

It re-exports the whole API of ``compiler`` and ``runtime`` under one name that a
user's own ``runtime.py`` or ``compiler.py`` next to their script cannot shadow
(``import runtime`` would find theirs first; ``import intervene`` finds this
package, which imports ``compiler`` and ``runtime`` by their place in it).
Names load on first use, so ``import intervene`` stays cheap (no torch).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

__all__ = [
    "CONFIG",
    "CompileError",
    "LanguageModel",
    "MissedCheckpointError",
    "NNsight",
    "NotInTraceError",
    "OutOfOrderError",
    "intervene",
    "save",
]

_WHERE = {
    "intervene": "compiler",
    "CompileError": "compiler",
    "CONFIG": "runtime",
    "NNsight": "runtime",
    "LanguageModel": "runtime",
    "OutOfOrderError": "runtime",
    "MissedCheckpointError": "runtime",
    "NotInTraceError": "runtime",
    "save": "runtime",
}

_HOME = Path(__file__).resolve().parent.parent  # where our `compiler` and `runtime` live


def _ours(name: str):
    """``compiler`` / ``runtime``: ours, even when another module of that name (a
    user's ``runtime.py`` in the script's folder) comes first on ``sys.path``."""
    module = sys.modules.get(name)
    if module is not None and _is_ours(module):
        return module
    if module is None:
        found = importlib.util.find_spec(name)  # finds, never runs, a user's runtime.py
        if found is not None and found.origin and _is_ours_file(found.origin):
            return importlib.import_module(name)
    # Another `runtime` was found first: load ours from its folder, under its own name
    # (its submodules import each other relatively, as `runtime.x`).
    spec = importlib.util.spec_from_file_location(
        name, _HOME / name / "__init__.py", submodule_search_locations=[str(_HOME / name)]
    )
    if spec is None or spec.loader is None:  # pragma: no cover - our own files are there
        raise ImportError(f"intervene: cannot find its `{name}` package in {_HOME}")
    theirs = sys.modules.get(name)
    mine = importlib.util.module_from_spec(spec)
    sys.modules[name] = mine
    try:
        spec.loader.exec_module(mine)
    except BaseException:
        if theirs is not None:
            sys.modules[name] = theirs
        else:
            sys.modules.pop(name, None)
        raise
    return mine


def _is_ours(module) -> bool:
    where = getattr(module, "__file__", None)
    return where is not None and _is_ours_file(where)


def _is_ours_file(where: str) -> bool:
    return Path(where).resolve().parent.parent == _HOME


def __getattr__(name: str):
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'intervene' has no attribute {name!r}")
    value = getattr(_ours(where), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
