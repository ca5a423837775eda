"""A trace block at run time: collect its lanes, check them, run the model once.

The compiled code opens ``with __iv.block(model, kind, index, *inputs) as
tracer:``, registers each lane (``__iv.lane``), and on leaving the ``with``
the tracer checks the plan against the model (static paths resolve, static
checkpoints come in an order the model can produce), starts the lanes, runs
the model's forward (or ``generate``) once and cleans up: every hook is
removed and every lane closed, whether the run succeeded or not.
"""

from __future__ import annotations

from typing import Any, Self

from . import order
from .errors import OutOfOrderError
from .interleave import OUT, PRE, Barrier, Interleaver, StepSelection

_PHASE = {"output": OUT, "input": PRE, "inputs": PRE}


class StopTrace(BaseException):
    """Raised by ``tracer.stop()`` through the model's forward; a BaseException so
    that no ``except Exception`` in the model or the experiment swallows it."""


class InvokeSpec:
    __slots__ = ("args", "kwargs")

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.args = args
        self.kwargs = kwargs


class Tracer:
    """The object bound by ``with model.trace(...) as tracer``."""

    def __init__(self, root, kind: str, block, sites: dict, args: tuple, kwargs: dict) -> None:
        self._root = root
        self._kind = kind
        self._block = block
        self._sites = sites
        self._args = args
        self._kwargs = kwargs
        self._lanes: list[tuple[Any, InvokeSpec | None, int]] = []
        self._result = None
        self._filename = "<unknown>"
        self._has_steps = False
        self._has_backward = False
        self._invoked = False
        self._inter = None
        self._caches: list = []

    # -- user-facing -----------------------------------------------------------
    def invoke(self, *args, **kwargs) -> InvokeSpec:
        return InvokeSpec(args, kwargs)

    def stop(self) -> None:
        """The rest of the forward pass does not run; what was saved stays."""
        raise StopTrace()

    def cache(self, modules=None, include_inputs: bool = False, device=None, dtype=None,
              detach: bool = True):
        """Record the outputs (and inputs) of every module, or of ``modules`` (envoys or
        paths), after interventions.  Under ``generate``: one entry per step."""
        from .cache import Cache

        inter = self._inter
        if inter is not None and inter.current is not None:
            import warnings

            cp = self._sites.get(inter.current_site)
            line = cp.line if cp is not None else 0
            warnings.warn_explicit(
                "tracer.cache() is called after the forward pass has started (the code got "
                f"there from line {line}): modules that ran before it are not in the cache; "
                "call tracer.cache() before reading any module value",
                RuntimeWarning, self._filename, line,
            )
        cache = Cache(self._root, modules, include_inputs, device, dtype, detach,
                      per_step=self._kind == "generate")
        cache._attach_hooks()
        self._caches.append(cache)
        return cache

    def barrier(self, n: int) -> Barrier:
        return Barrier(n)

    def all(self) -> StepSelection:
        return StepSelection(None)

    @property
    def iter(self) -> _StepIndexer:
        return _StepIndexer()

    @property
    def result(self):
        """The generated token ids (prompt included), once generation has ended."""
        return self._result

    def __repr__(self) -> str:
        return f"<Tracer {self._kind} of {self._root._path} (block {self._block.index})>"

    # -- compiled-code protocol ----------------------------------------------
    def _add_lane(self, fn, spec: InvokeSpec | None, index: int) -> None:
        self._lanes.append((fn, spec, index))
        if spec is not None:
            self._invoked = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._execute()
        finally:
            self._lanes.clear()
        return False

    def _execute(self) -> None:
        root = self._root
        if root._checked.get(id(self._block)) is not self._block:
            check_block(root, self._block)
        if self._invoked:
            # `tracer.invoke()` with no input adds no rows: it sees the whole batch.
            args, kwargs, rows = root._batch(
                [(spec.args, spec.kwargs) if spec is not None and (spec.args or spec.kwargs)
                 else None for _, spec, _ in self._lanes]
            )
            kwargs = {**kwargs, **self._kwargs}
        else:
            args, kwargs = root._prepare(self._args, self._kwargs)
            rows = [None] * len(self._lanes)
        inter = Interleaver(root, self._block, self._sites, self._filename)
        inter.track = self._has_backward
        self._inter = inter
        learning = root._learn_order() if not root._order_complete else None
        try:
            if self._kind == "generate" or self._has_steps:
                inter._ensure_step_hook()
            for (fn, _spec, index), r in zip(self._lanes, rows):
                inter.start(fn, index, r)
            try:
                out = root._run(self._kind, args, kwargs, self)
            except StopTrace:
                inter.stopped = True  # values still awaited are reported, never left unset
            else:
                if self._kind == "generate":
                    self._result = out
                    inter.result = out
            inter.finish()
        finally:
            inter.cleanup()
            self._inter = None
            for cache in self._caches:
                cache._detach_hooks()
            self._caches.clear()
            if learning is not None:
                for handle in learning:
                    handle.remove()
                root._order_complete = True


class _StepIndexer:
    def __getitem__(self, key) -> StepSelection:
        return StepSelection(key)


def check_block(root, block) -> None:
    """Before running: static paths exist, and static checkpoints of each lane
    come in an order the model can produce.  Checked once per model and block."""
    done = root._checked
    if id(block) in done and done[id(block)] is block:
        return
    complete = True
    for lane in block.lanes:
        static = []
        for cp in lane.checkpoints:
            if cp.parts is None:
                continue
            try:
                env = root._resolve(cp.parts)
            except (AttributeError, IndexError, KeyError, TypeError) as exc:
                raise type(exc)(f"line {cp.line}: `{cp.path}`: {exc}") from None
            static.append((cp, env._module, _PHASE.get(cp.value, OUT), env))
        for j, (b, mb, pb, eb) in enumerate(static):
            for a, ma, pa, ea in static[:j]:
                # Only pairs that surely both run, one after the other: same scope.
                # (A checkpoint in a branch or loop may not run at all; the run
                # itself catches those.)
                if b.scope != a.scope:
                    continue
                verdict = order.precedes(root, mb, pb, ma, pa)
                if verdict is None:
                    complete = False
                elif verdict:
                    raise OutOfOrderError(
                        f"`{eb._path}.{b.value}` (line {b.line}) is asked for after "
                        f"`{ea._path}.{a.value}` (line {a.line}), but the model computes "
                        f"`{eb._path}.{b.value}` first: in one forward pass, ask for module "
                        "values in the order the model computes them (or use two traces)",
                        eb._path,
                        b.line,
                    )
    if complete:
        done[id(block)] = block
