"""Runs compiled intervention plans on live PyTorch models.

Public surface: ``NNsight`` (wrap any module), ``LanguageModel`` (a
transformers causal LM, or the embedded default ``"smollm2-135m"``), the
errors a run can raise, and ``save(x)`` (the same as ``x.save()``).  Names load
on first use, so ``import runtime`` stays cheap (no torch) until a model is wrapped.
"""

from __future__ import annotations

import importlib

__all__ = [
    "CONFIG",
    "LanguageModel",
    "MissedCheckpointError",
    "NNsight",
    "NotInTraceError",
    "OutOfOrderError",
    "save",
]

_WHERE = {
    "CONFIG": ".config",
    "NNsight": ".nnsight",
    "LanguageModel": ".language",
    "OutOfOrderError": ".errors",
    "MissedCheckpointError": ".errors",
    "NotInTraceError": ".errors",
    "save": ".api",
}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
