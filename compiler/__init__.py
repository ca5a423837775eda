"""Compiles @intervene experiment functions into checkpointed code and a plan.

Public surface: ``intervene`` (the decorator) and ``CompileError``.  The
compiler never imports torch or a model: the runtime is loaded at decoration
only when torch already is, otherwise on the first call of a compiled function.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from .codegen import Compiled, compile_source
from .errors import CompileError
from .parse import source_of
from .plan import Plan

__all__ = ["CompileError", "compile_function", "intervene"]

F = TypeVar("F", bound=Callable)


def compile_function(fn) -> Compiled:
    """Compile a live function (its source, file and line) without building it."""
    return compile_source(source_of(fn), fn.__code__.co_freevars)


def intervene(fn: F) -> F:
    """Compile an experiment function once; calling it runs the compiled code.

    The returned function has ``.plan`` (a ``Plan`` with this function's
    blocks; ``str()`` is what ``show-plan`` prints) and ``.code`` (the
    rewritten source).
    """
    compiled = compile_function(fn)

    def build():
        from runtime.api import handle_for

        return compiled.build(handle_for(compiled.plan, compiled.source), fn)

    if "torch" in sys.modules:
        # torch is loaded already, so the runtime is cheap to load: build now and hand
        # out the built function itself (a call costs nothing on top of the code).
        return _with_plan(functools.update_wrapper(build(), fn), compiled)
    built = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        # First call: load the runtime (and torch), which decorating then did not.
        nonlocal built
        if built is None:
            built = build()
        return built(*args, **kwargs)

    return _with_plan(run, compiled)


def _with_plan(fn, compiled: Compiled):
    fn.plan = Plan((compiled.plan,))
    fn.code = compiled.code
    fn.compiled = compiled
    return fn
