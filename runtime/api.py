"""The one small interface the rewritten code calls (``__iv`` in its text).

Every compiled function gets a ``Handle`` bound to its plan; the rewritten
code reaches the runtime only through it: ``block``, ``lane`` (``invoke``: an
invoke of one input and its lane in one call), ``read``, ``write``, ``save``,
``requires_grad``.  Keeping it this small is what lets a
server validate and run shipped experiments later.
"""

from __future__ import annotations

import sys

import torch

from .envoy import Envoy
from .interleave import (
    backward,
    barrier,
    end_backward,
    end_steps,
    mark,
    next_step,
    read,
    rows_require_grad,
    write,
)
from .nnsight import NNsight
from .tracer import Tracer


def save(value):
    """``x.save()``: the value itself outlives the block (nothing to copy)."""
    return value


def requires_grad(value, flag: bool) -> None:
    """``x.requires_grad = flag`` on a module value, whether or not the model's
    parameters require grad: a value already in the graph keeps its gradient
    (``retain_grad``) instead of failing as a non-leaf."""
    if isinstance(value, torch.Tensor) and not value.is_leaf:
        if flag:
            value.retain_grad()
            return
        raise RuntimeError(
            "`requires_grad = False` on a value computed from parameters that require grad: "
            "use `.detach()` instead"
        )
    if flag and isinstance(value, torch.Tensor) and value._base is not None and rows_require_grad(value):
        return  # an invoke's rows of a value that did not require grad: see rows_require_grad
    value.requires_grad = flag


class Handle:
    __slots__ = (
        "backward",
        "barrier",
        "end_backward",
        "end_steps",
        "firsts",
        "has_backward",
        "has_steps",
        "helper",
        "invoke",
        "lane",
        "late_cache",
        "mark",
        "next_step",
        "plain",
        "plan",
        "read",
        "requires_grad",
        "save",
        "sites",
        "source",
        "write",
    )

    def __init__(self, plan, source=None) -> None:
        self.plan = plan
        self.source = source  # the compiled function's Source: what a remote block sends
        self.sites = [
            {item.order: item for lane in b.lanes for item in lane.items} for b in plan.blocks
        ]
        self.read = read
        self.write = write
        self.save = save
        self.requires_grad = requires_grad
        self.next_step = next_step
        self.end_steps = end_steps
        self.barrier = barrier
        self.backward = backward
        self.end_backward = end_backward
        self.mark = mark
        self.lane = _add_lane  # `__iv.lane(tracer, fn, spec, index)`
        self.invoke = _invoke  # `__iv.invoke(tracer, fn, index, lazy, *inputs)`
        # Per block: what a lazily started invoke waits for (see `_firsts`), or None.
        self.firsts = [_firsts(b) for b in plan.blocks]
        self.helper = self._helper  # `yield from __iv.helper(site, block, fn, ...)`
        self.has_backward = [
            any(getattr(i, "kind", None) == "backward" for lane in b.lanes for i in lane.items)
            for b in plan.blocks
        ]
        self.has_steps = [
            any(getattr(i, "kind", None) == "steps" for lane in b.lanes for i in lane.items)
            for b in plan.blocks
        ]
        # `tracer.cache()` after anything else in a lane: see runtime/cache.late_cache_hooks.
        self.late_cache = [
            any(i and getattr(item, "kind", None) == "cache"
                for lane in b.lanes for i, item in enumerate(lane.items))
            for b in plan.blocks
        ]
        # Blocks none of the three concerns: Tracer._plain for their `trace` blocks.
        self.plain = [not (s or b or c) for s, b, c in
                      zip(self.has_steps, self.has_backward, self.late_cache)]

    def _helper(self, site: int, index: int, fn, /, *args, **kwargs):
        """``h(...)`` in a lane, ``h`` an @intervene helper: its body as a generator
        run by the lane (its checkpoints join this block's, for messages); anything else
        that name holds now is called plainly."""
        gen_fn = getattr(fn, "helper_generator", None)
        if gen_fn is None and hasattr(fn, "built_helper"):
            fn = fn.built_helper()
            gen_fn = getattr(fn, "helper_generator", None)
        if gen_fn is None:
            return _returns(fn(*args, **kwargs))
        sites = self.sites[index]
        for key, item in fn.helper_sites.items():
            sites.setdefault(key, item)
        return gen_fn(*args, **kwargs)

    def session(self, model, index: int, lines, wanted, free, /, *args, **kwargs):
        """``with model.session(remote=...):`` as compiler/session.py lowers it: the
        Session, run on the server already when remote (runtime/session.py)."""
        from .session import open_session

        if not isinstance(model, NNsight):
            return model.session(*args, **kwargs)  # not a wrapped model: its own session
        return open_session(self, model, index, lines, wanted, free, sys._getframe(1),
                            args, kwargs)

    def block(self, model, kind: str, index: int, /, *args, **kwargs) -> Tracer:
        if model.__class__ is not NNsight and not isinstance(model, NNsight):
            what = "an Envoy (a part of a model)" if isinstance(model, Envoy) else type(model).__name__
            raise TypeError(
                f"`with ....{kind}(...)` needs the wrapped model (NNsight(module) or "
                f"LanguageModel(...)), got {what}"
            )
        if kwargs and "remote" in kwargs and kwargs.pop("remote"):
            if model._edits:  # never a remote run that silently leaves the edits out
                raise NotImplementedError(
                    "remote=True on an edited model (model.edit()) is not supported: the "
                    "server runs its own copy of the model, without your edits; put the "
                    "edit's interventions in the block"
                )
            # Never silently local: the block runs on the server (runtime.remote).
            from .remote.client import remote_tracer

            return remote_tracer(self, model, kind, index, args, kwargs, sys._getframe(1))
        if kind == "edit":  # `with model.edit() as edited:` (runtime/edit.py)
            from .edit import EditBlock

            return EditBlock(model, self.plan.blocks[index], self.sites[index],
                             self.plan.filename, args, kwargs)
        # `Tracer(model, kind, block, sites, args, kwargs)` without the Python call of its
        # `__init__` (same attributes, same order).  Plain attribute sets
        # (`tracer.__dict__.update(...)` would turn the instance's inline attribute values
        # into a dict, slowing every later `self._x` of the trace).
        tracer = _new(Tracer)
        tracer._root = model
        tracer._kind = kind
        tracer._block = self.plan.blocks[index]
        tracer._sites = self.sites[index]
        tracer._args = args
        tracer._kwargs = kwargs
        tracer._lanes = []
        tracer._invoked = False
        tracer._filename = self.plan.filename
        firsts = self.firsts[index]
        if firsts is not None:
            tracer._firsts = firsts
        if kind == "trace" and self.plain[index]:
            tracer._plain = True
            return tracer
        if self.has_steps[index]:
            tracer._has_steps = True
        if self.has_backward[index]:
            tracer._has_backward = True
        if not self.late_cache[index]:
            tracer._late_cache = False
        return tracer


_new = object.__new__


def _returns(value):
    """A generator that yields nothing and returns ``value`` (a plain function called
    where a helper was expected)."""
    return value
    yield  # makes this a generator


def _add_lane(tracer, fn, spec, index: int) -> None:
    """``__iv.lane(tracer, fn, spec, index)``: a Tracer's, or an edited model's in an
    edit block."""
    if tracer.__class__ is Tracer:  # Tracer._add_lane, inline (once per invoke)
        tracer._lanes.append((fn, spec, index))
        if spec is not None:
            tracer._invoked = True
        return
    tracer._add_lane(fn, spec, index)


def _invoke(tracer, fn, index: int, sets, x, /) -> None:
    """``with tracer.invoke(x):`` (one input, the common case) around lane ``fn``:
    ``tracer.invoke(x)`` and ``__iv.lane(...)`` in one call.  A ``Tracer``'s lane keeps
    ``(x, sets)`` as its spec, a tuple where an ``InvokeSpec`` would say ``((x,), {})``
    (``Tracer._inputs`` and ``Interleaver.attach_static`` read both; a tracer's lanes
    are read by nothing else).  ``sets``: the variable (of ``fn``'s closure) that the
    lane's one module value goes to when that is all the lane does
    (compiler/rewrite.py ``_lazy_target``), or None; every other tracer gets
    ``tracer.invoke(x)`` and ``fn`` as before."""
    if tracer.__class__ is Tracer:
        tracer._lanes.append((fn, (x, sets), index))
        tracer._invoked = True
        return
    _add_lane(tracer, fn, tracer.invoke(x), index)


def _firsts(block) -> list | None:
    """Per lane of ``block`` (by index): ``[parts, value, None]`` of its one module value
    when that read, of a static path, is all the lane asks for (an invoke the compiler
    may have given a lazy start), else None; None when no lane is such.  Equal paths
    share one tuple and values are interned (``attach_static`` compares them by
    identity); the last item is where the lane's variable is in its function's closure,
    once known (the same for every run of the block)."""
    if block.kind != "trace" or not block.lanes:
        return None
    out: list = [None] * (max(lane.index for lane in block.lanes) + 1)
    paths: dict = {}
    for lane in block.lanes:
        items = lane.items
        cp = items[0] if len(items) == 1 else None
        # (a Checkpoint of compiler/plan.py; a Marker has no `parts`)
        if (getattr(cp, "parts", None) is not None and cp.access == "read"
                and cp.value in ("output", "input", "inputs") and cp.steps is None):
            out[lane.index] = [paths.setdefault(cp.parts, cp.parts), sys.intern(cp.value), None]
    return out if any(f is not None for f in out) else None


def handle_for(plan, source=None) -> Handle:
    return Handle(plan, source)
