"""``module.skip(value)`` in a block: the module does not run; ``value`` is its output.

The running trace's interleaver (``interleave._ACTIVE``) gets one more thing to undo:
the module's ``forward`` is replaced, for its next call only, by a function that
returns ``value`` without calling the real one.  A wrapper that takes the module's
output for the lanes (``Interleaver._attach``) is put back on top of it, so lanes
waiting for ``module.output`` get ``value``, and forward hooks (a cache's) see it
too.  In an invoke the module runs for the whole batch and that invoke's rows of
its output are ``value`` (the other invokes' rows are what the module computed).
A skip must be asked for before the module starts; where the order is known, a
later one is an ``OutOfOrderError`` at the user's line.
"""

from __future__ import annotations

import sys
from itertools import count

import torch

from . import interleave, order
from .errors import OutOfOrderError
from .paths import rooted

_SERIAL = count()


def skip(envoy, value) -> None:
    inter = getattr(interleave._ACTIVE, "inter", None)
    module = envoy._module
    line = sys._getframe(2).f_lineno
    if inter is None or inter.root._module is not _root_module(envoy):
        raise RuntimeError(
            f"`{envoy._path}.skip(value)` (line {line}) works only inside a trace block of "
            "its model, while it runs (the module's next call returns `value`)"
        )
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError(f"`{envoy._path}.skip(value)`: a scripted module cannot be skipped")
    started = _started(inter, module)
    if started:
        path = rooted(envoy._path, getattr(inter.block, "model", None))  # as the block spells it
        raise OutOfOrderError(
            f"`{path}.skip(value)` is asked for at line {line}, but {started}: ask for "
            "a skip before the module runs (before reading any value the model computes "
            "after it starts)",
            path,
            line,
        )
    rows = _rows_of_running_lane(inter)
    out_key = (id(module), interleave.OUT)
    attached = inter.attached
    taking = attached.pop(out_key, None)
    if taking is not None:
        interleave._undo(taking)  # put back on top below
    attrs = module.__dict__
    prev = attrs.get("forward", interleave._NONE)
    inner = module.forward
    used = False

    def forward(*args, **kwargs):
        nonlocal used
        if used:  # the module's later calls run as usual
            return inner(*args, **kwargs)
        used = True
        if rows is None:
            return value
        return interleave.widen(inner(*args, **kwargs), value, rows, inter.batch)

    forward.__wrapped__ = inner  # inspect.signature sees the real one
    attached[(id(module), "skip", next(_SERIAL))] = (interleave._FORWARD, module, prev)
    attrs["forward"] = forward
    if taking is not None:
        inter._attach(module, interleave.OUT, out_key)


def _root_module(envoy):
    root = envoy._root
    return None if root is None else root._module


def _started(inter, module) -> str | None:
    """Why ``module`` can no longer be skipped in this pass, or None."""
    if (id(module), interleave.OUT) in inter.fired or (id(module), interleave.PRE) in inter.fired:
        return "the module has already run"
    cur = inter.current
    if cur is None:
        return None  # nothing has run yet
    if cur.module is module:
        return ("the module is running (its input is being handed out)" if cur.phase == interleave.PRE
                else "the module has already run (its output is being handed out)")
    root = inter.root
    if order.precedes(root, module, interleave.PRE, cur.module, cur.phase) is True:
        now = rooted(root._path_of(cur.module), getattr(inter.block, "model", None))
        return (f"the model is already past its start (it is now at "
                f"`{now}.{'output' if cur.phase == interleave.OUT else 'input'}`)")
    return None


def _rows_of_running_lane(inter):
    for lane in inter.lanes:
        gen = lane.gen
        if getattr(gen, "gi_running", False):
            return lane.rows
    # A lane without checkpoints is no generator: it runs whole while being started.
    return inter.starting_rows
