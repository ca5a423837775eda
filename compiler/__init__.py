"""Compiles @intervene experiment functions into checkpointed code and a plan.

Public surface: ``intervene`` (the decorator) and ``CompileError``.  The
compiler never imports torch or a model: the runtime is loaded at decoration
only when torch already is, otherwise on the first call of a compiled function.
"""

from __future__ import annotations

import functools
import linecache
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
    fn = _unwrap(fn)
    src = source_of(fn)
    return compile_source(src, fn.__code__.co_freevars, _helpers_of(src.filename, fn))


def _helpers_of(filename: str, fn) -> frozenset[str]:
    """The helpers a function's blocks may call (those of its file: see block.py)."""
    from .block import helper_names

    lines = linecache.getlines(filename, getattr(fn, "__globals__", None))
    names = helper_names(filename, "".join(lines)) if lines else frozenset()
    return names | imported_helpers(getattr(fn, "__globals__", {}))


def imported_helpers(namespace: dict) -> frozenset[str]:
    """Names in ``namespace`` (a module's globals) bound to @intervene helpers now:
    helpers imported from other files."""
    return frozenset(
        k for k, v in list(namespace.items())
        if isinstance(getattr(v, "compiled", None), Compiled) and v.compiled.helper
    )


def _unwrap(fn):
    """The user's own function under decorators that keep it as ``__wrapped__``
    (as ``inspect`` does when it reads the source)."""
    for _ in range(100):
        inner = getattr(fn, "__wrapped__", None)
        if inner is None or isinstance(getattr(fn, "compiled", None), Compiled):
            break
        fn = inner
    return fn


def intervene(fn: F) -> F:
    """Compile an experiment function once; calling it runs the compiled code.

    The returned function has ``.plan`` (a ``Plan`` with this function's
    blocks; ``str()`` is what ``show-plan`` prints) and ``.code`` (the
    rewritten source).
    """
    if isinstance(getattr(fn, "compiled", None), Compiled):
        return fn  # `@intervene` twice: compiled once already
    inner = _unwrap(fn)
    compiled = compile_function(inner)
    frame = sys._getframe(1)
    _check_not_hidden(compiled, inner, frame)
    # Decorators written below `@intervene` (`@torch.no_grad()`, ...) wrapped the
    # user's function; they are applied again, in the same order, to the compiled one.
    below = () if inner is fn else _decorators_below(compiled, fn, inner, frame)
    del frame

    def build():
        from runtime.api import handle_for

        built = functools.update_wrapper(
            compiled.build(handle_for(compiled.plan, compiled.source), inner), inner
        )
        if compiled.helper:
            built = _helper(built, compiled)
        for decorator in reversed(below):
            built = decorator(built)
        return built

    if "torch" in sys.modules:
        # torch is loaded already, so the runtime is cheap to load: build now and hand
        # out the built function itself (a call costs nothing on top of the code).
        return _with_plan(build(), compiled)
    built = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        # First call: load the runtime (and torch), which decorating then did not.
        nonlocal built
        if built is None:
            built = build()
        return built(*args, **kwargs)

    if compiled.helper:
        def built_helper():  # what a block calling this helper runs (runtime/api.py)
            nonlocal built
            if built is None:
                built = build()
            return built

        run.built_helper = built_helper
    return _with_plan(run, compiled)


def _check_not_hidden(compiled: Compiled, inner, frame) -> None:
    """Written as ``@intervene``, the function compiled must be the one under it: a
    decorator below that returns a wrapper without ``functools.wraps`` hides it (the
    wrapper's source would be compiled instead)."""
    filename, line = frame.f_code.co_filename, frame.f_lineno
    if not linecache.getline(filename, line).lstrip().startswith("@"):
        return  # `intervene(fn)` called as a function: fn is what it is
    code = inner.__code__
    first = compiled.decorators[0][1] if compiled.decorators else compiled.plan.line
    if code.co_filename == filename and first <= line <= compiled.plan.line:
        return
    raise CompileError(
        f"@intervene was given `{inner.__qualname__}` ({code.co_filename}:"
        f"{compiled.plan.line}), not the function written under it: a decorator below "
        "@intervene returned a wrapper without `functools.wraps`; use `functools.wraps` "
        "in that decorator, or put it above @intervene",
        filename, line,
    )


def _decorators_below(compiled: Compiled, fn, inner, frame) -> tuple:
    """The decorators between ``@intervene`` and ``def``, evaluated again: where
    ``@intervene`` was applied (the frame that ran the ``def``) when that is
    known, else in the function's globals and closure."""
    decorators = compiled.decorators
    ours = [i for i, (_text, _line, name) in enumerate(decorators) if name == "intervene"]
    if ours:
        below = decorators[ours[-1] + 1 :]
    else:  # `@iv` under another name: one decorator per wrapper around the function
        depth, f = 0, fn
        while f is not inner:
            f, depth = f.__wrapped__, depth + 1
        below = decorators[-depth:]
    code = inner.__code__
    filename = code.co_filename
    if (
        frame is not None
        and frame.f_code.co_filename == filename
        and decorators
        and decorators[0][1] <= frame.f_lineno <= code.co_firstlineno
    ):
        namespace, local = frame.f_globals, frame.f_locals
    else:
        cells = zip(code.co_freevars, inner.__closure__ or ())
        namespace = inner.__globals__
        local = {}
        for name, cell in cells:
            try:
                local[name] = cell.cell_contents
            except ValueError:  # an empty cell
                pass
    out = []
    for text, line, _name in below:
        try:
            expr = compile("\n" * (line - 1) + f"({text})", filename, "eval", dont_inherit=True)
            out.append(eval(expr, namespace, local))  # the user's own decorator
        except Exception as exc:  # noqa: BLE001 - whatever it raises is reported
            raise CompileError(
                f"the decorator `@{text}` below `@intervene` could not be evaluated again to "
                f"wrap the compiled function ({type(exc).__name__}: {exc}): put `@intervene` "
                f"directly above `def`, with `@{text}` above it",
                filename, line,
            ) from None
    return tuple(out)


def _helper(generator_fn, compiled: Compiled):
    """A helper as a callable: called from a block's lane it runs as part of the lane
    (``yield from``, through ``helper_generator``); called anywhere else, it runs
    when it needs no module value, and says where to call it from when it does."""
    lane = compiled.plan.blocks[0].lanes[0]
    sites = {compiled.site_offset + item.order: item for item in lane.items}

    @functools.wraps(generator_fn)
    def call(*args, **kwargs):
        gen = generator_fn(*args, **kwargs)
        try:
            request = gen.send(None)
        except StopIteration as done:
            return done.value
        gen.close()
        item = sites.get(request[2]) if isinstance(request, tuple) and len(request) > 2 else None
        where = f" (line {item.line})" if item is not None else ""
        raise RuntimeError(
            f"`{compiled.name}` is an @intervene helper that reads module values{where}: it "
            "runs as part of a trace block, so call it from inside `with model.trace(...):` "
            "(in an @intervene function or a block of this file), where the model is running"
        )

    call.helper_generator = generator_fn
    call.helper_sites = sites
    return call


def _with_plan(fn, compiled: Compiled):
    fn.plan = Plan((compiled.plan,))
    fn.code = compiled.code
    fn.compiled = compiled
    return fn
