"""A trace block at run time: collect its lanes, check them, run the model once.

The compiled code opens ``with __iv.block(model, kind, index, *inputs) as
tracer:``, registers each lane (``__iv.lane``), and on leaving the ``with``
the tracer checks the plan against the model (static paths resolve, static
checkpoints come in an order the model can produce), starts the lanes, runs
the model's forward (or ``generate``) once and cleans up: every hook and
wrapped ``forward`` is removed and every lane closed, whether the run
succeeded or not.
"""

from __future__ import annotations

from typing import Any, Self

import torch

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

    # Defaults on the class: a trace sets only what differs.
    _result = None
    _filename = "<unknown>"
    _has_steps = False
    _has_backward = False
    _invoked = False
    _inter = None
    _caches: list | None = None

    def __init__(self, root, kind: str, block, sites: dict, args: tuple, kwargs: dict) -> None:
        self._root = root
        self._kind = kind
        self._block = block
        self._sites = sites
        self._args = args
        self._kwargs = kwargs
        self._lanes: list[tuple[Any, InvokeSpec | None, int]] = []

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
        if self._caches is None:
            self._caches = []
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
        got = root._checked.get(id(self._block))
        facts = got[1] if got is not None and got[0] is self._block else block_facts(root, self._block)
        if self._invoked:
            # `tracer.invoke()` with no input adds no rows: it sees the whole batch.
            args, kwargs, rows = root._batch(
                [(spec.args, spec.kwargs) if spec is not None and (spec.args or spec.kwargs)
                 else None for _, spec, _ in self._lanes],
                [self._block.lanes[index] for _, _, index in self._lanes],  # names in errors
            )
            kwargs = {**kwargs, **self._kwargs}
        else:
            args, kwargs = root._prepare(self._args, self._kwargs)
            rows = None
        inter = self._inter = Interleaver(root, self._block, self._sites, self._filename)
        if self._has_backward:
            inter.track = True
        learning = None if root._order_complete else root._learn_order()
        try:
            if self._kind == "generate" or self._has_steps:
                inter._ensure_step_hook()
            inter.attach_static(facts)
            grad = torch.is_grad_enabled()
            for i, (fn, _spec, index) in enumerate(self._lanes):
                inter.start(fn, index, None if rows is None else rows[i], grad)
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
            if self._caches:
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


class BlockFacts:
    """What a block needs of one model, worked out once: the modules its static
    checkpoints name (attached before the run), and whether that is all of them."""

    __slots__ = ("attach", "static")

    def __init__(self, attach: list, static: bool) -> None:
        self.attach = attach  # [(module, phase)], each once, in plan order
        self.static = static  # no dynamic checkpoint: nothing else can be asked for


def block_facts(root, block) -> BlockFacts:
    """Check ``block`` against ``root`` (``check_block``) and cache its facts; the
    cache holds only once the order check was conclusive."""
    facts, complete = check_block(root, block)
    if complete:
        root._checked[id(block)] = (block, facts)
    return facts


def check_block(root, block) -> tuple[BlockFacts, bool]:
    """Before running: static paths exist, and static checkpoints of each lane
    come in an order the model can produce."""
    complete = True
    attach: dict[tuple[int, str], tuple] = {}
    static_only = True
    in_model = root._parents()
    for lane in block.lanes:
        static = []
        for cp in lane.checkpoints:
            if cp.value == "grad":
                continue
            if cp.parts is None:
                static_only = False
                continue
            try:
                env = root._resolve(cp.parts)
            except (AttributeError, IndexError, KeyError, TypeError) as exc:
                raise type(exc)(f"line {cp.line}: `{cp.path}`: {exc}") from None
            module, phase = env._module, _PHASE.get(cp.value, OUT)
            if id(module) in in_model or module is root._module:
                attach.setdefault((id(module), phase), (module, phase))
            static.append((cp, module, phase, env))
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
    return BlockFacts(list(attach.values()), static_only), complete
