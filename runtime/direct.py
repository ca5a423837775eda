"""Trace blocks without a decorator: ``with model.trace(prompt):`` anywhere.

``model.trace(...)`` (``generate``, ``scan``) called outside compiled code returns a
``DirectTracer``.  Its ``__enter__`` finds the ``with`` statement's source (the
caller's file and line, through ``linecache``: a script, a module, an IPython
cell), compiles that one block with the compiler (``compiler/block.py``, cached by
its text), runs it with the names it reads from the caller, binds the names the
block assigns in the caller's namespace (module globals; a function's locals), and
then skips the body: a trace function set on the caller's frame raises on the
body's first line, and ``__exit__`` swallows that.  The ``as`` target is the
block's tracer (``tracer.plan``, ``tracer.result``).

Where there is no source (``python -c``, ``exec`` of a string, the plain REPL) the
block cannot be compiled and ``__enter__`` says so.
"""

from __future__ import annotations

import ctypes
import dataclasses
import dis
import inspect
import linecache
import sys

from compiler.errors import CompileError

from .body import BodySkipper

_CO_OPTIMIZED = inspect.CO_OPTIMIZED
_opens: dict[tuple, bool] = {}


def opens_with(frame) -> bool:
    """The call being made in ``frame`` is the context expression of a ``with``
    (its next instruction enters it)."""
    key = (frame.f_code, frame.f_lasti)
    got = _opens.get(key)
    if got is None:
        got = False
        for ins in dis.get_instructions(frame.f_code):
            if ins.offset > frame.f_lasti:
                got = ins.opname in ("BEFORE_WITH", "SETUP_WITH")
                break
        if len(_opens) > 4096:
            _opens.clear()
        _opens[key] = got
    return got


class DirectTracer(BodySkipper):
    """``with model.trace(...):`` outside compiled code (see the module docstring)."""

    def __init__(self, model, kind: str, args: tuple, kwargs: dict) -> None:
        self._model = model
        self._kind = kind
        self._args = args
        self._kwargs = kwargs
        self._frame = None
        self._old = None
        self.plan = None

    def __repr__(self) -> str:
        return f"<{self._kind} block of {self._model._path}, not entered>"

    def __enter__(self):
        from compiler.block import compile_block, find_block
        from compiler.plan import Plan

        frame = sys._getframe(1)
        filename, line = frame.f_code.co_filename, frame.f_lineno
        lines = caller_lines(frame)
        if not lines:
            raise CompileError(
                f"`with {self._model._path}.{self._kind}(...)` outside an @intervene function "
                f"is compiled from its source, and there is none for {filename} (`python -c`, "
                "exec() of a string or the plain REPL keep no source): write the block in a "
                ".py file or a notebook cell, or put it in a function decorated with "
                "@intervene",
                filename, line,
            )
        block = find_block(filename, "".join(lines), line)
        local = frame.f_locals
        params = [p for p in caller_params(frame, local, block.loads, block.stores)
                  if p != block.target]
        from compiler import imported_helpers

        extra = imported_helpers(frame.f_globals) - block.helpers
        if extra:  # helpers imported from other files
            block = dataclasses.replace(block, helpers=block.helpers | extra)
        compiled = compile_block(block, tuple(params))
        values = {p: (local[p] if p in local else frame.f_globals[p]) for p in params}
        handle = _handle(compiled.plan, compiled.source, self)
        fn = compiled.build(handle, _template(frame.f_globals))
        del local
        out = fn(**values)
        self.plan = Plan((compiled.plan,))
        tracer = out.pop(block.target, None) if block.target else None
        from .tracer import Tracer

        if isinstance(tracer, Tracer):
            tracer.plan = self.plan
        # As in a decorated function, what the block saved outlives it (nothing else).
        bound = {k: out[k] for k in compiled.plan.blocks[0].saved if k in out and k != block.target}
        _bind(frame, bound)
        self._skip_body(frame, block.body_line)  # raises on its first line (see body.py)
        del frame
        return tracer if tracer is not None else self


def caller_lines(frame) -> list[str]:
    """The source lines of the file ``frame`` runs (a ``%%time`` cell's body recovered,
    ``compiler.parse.recover_cell``); empty when there are none."""
    from compiler.parse import has_with_at, recover_cell

    filename, line = frame.f_code.co_filename, frame.f_lineno
    lines = linecache.getlines(filename, frame.f_globals)
    if not lines and recover_cell(filename, lambda text: has_with_at(text, line)):
        lines = linecache.getlines(filename)  # a `%%time` cell's body
    return lines


def caller_params(frame, local: dict, loads: frozenset, stores: frozenset) -> list[str]:
    """The names of ``frame`` (``local``: its ``f_locals``) that a statement compiled
    from its source takes as parameters, sorted: in a function, the names it binds
    that the statement reads; at module or class level, what the statement reads and
    assigns (``n += 1``; the others are the module's globals) and a class body's own
    names it reads."""
    if frame.f_code.co_flags & _CO_OPTIMIZED:
        return sorted(loads & local.keys())
    names = dict(frame.f_globals)
    names.update(local)
    params = sorted(loads & stores & names.keys())
    if local is not frame.f_globals:  # a class body's own names
        params = sorted(set(params) | (loads & local.keys()))
    return params


_handle_class = None


def _handle(plan, source, direct):
    """The compiled block's runtime handle, whose ``block`` uses the inputs the user's
    own call gave (evaluated once, by that call)."""
    global _handle_class
    if _handle_class is None:
        from .api import Handle

        class DirectHandle(Handle):
            __slots__ = ("direct",)

            def block(self, model, kind, index, /, *args, **kwargs):
                d = self.direct
                if index == 0 and model is d._model and kind == d._kind:
                    args, kwargs = d._args, dict(d._kwargs)
                return Handle.block(self, model, kind, index, *args, **kwargs)

        _handle_class = DirectHandle
    h = _handle_class(plan, source)
    h.direct = direct
    return h


def _template(globals_: dict):
    """A function object whose globals are the caller's (what ``Compiled.build``
    takes its namespace from)."""
    def block():
        pass

    import types

    return types.FunctionType(block.__code__, globals_, "<block>")


def _bind(frame, values: dict) -> None:
    """Assign ``values`` in ``frame``'s namespace: module or class level, its dict;
    a function, its local variables (Python < 3.13: through ``PyFrame_LocalsToFast``)
    and, for names that are not local there, the module's globals."""
    if not values:
        return
    code = frame.f_code
    if not code.co_flags & _CO_OPTIMIZED:
        frame.f_locals.update(values)
        return
    local_names = set(code.co_varnames) | set(code.co_cellvars) | set(code.co_freevars)
    glob = {k: v for k, v in values.items() if k not in local_names}
    loc = {k: v for k, v in values.items() if k in local_names}
    frame.f_globals.update(glob)
    if loc:
        if sys.version_info >= (3, 13):
            for k, v in loc.items():
                frame.f_locals[k] = v
        else:
            frame.f_locals.update(loc)
            ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
