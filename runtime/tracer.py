"""A trace block at run time: collect its lanes, check them, run the model once.

The compiled code opens ``with __iv.block(model, kind, index, *inputs) as
tracer:``, registers each lane (``__iv.lane``), and on leaving the ``with``
the tracer checks the plan against the model (static paths resolve, static
checkpoints come in an order the model can produce), starts the lanes, runs
the model's forward (or ``generate``) once and cleans up: every hook and
wrapped ``forward`` is removed and every lane closed, whether the run
succeeded or not (an interrupt included).

Traces of one ``torch.nn.Module`` run one at a time: each holds the module's
lock (``model_lock``) from its checks to its cleanup; another thread waits, and
a trace started from inside a running one in the same thread is refused.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Self

import torch

from . import order, source
from .cache import late_cache_hooks
from .edit import cleanup_steps, finish_edits, start_edits
from .errors import OutOfOrderError
from .interleave import (
    _ACTIVE,
    OUT,
    PRE,
    Barrier,
    Interleaver,
    StepSelection,
    StopTrace,
    UserStopIteration,
    _grad_enabled,
)
from .paths import rooted

_PHASE = {"output": OUT, "input": PRE, "inputs": PRE}
_new = object.__new__
_CHECKED_MAX = 256  # blocks whose checks each model remembers (oldest dropped first)


class _ModelState:
    """Per torch module: the lock that makes its traces run one at a time (an RLock
    for ``_is_owned``: a trace started from inside a running one in the same thread
    is refused, never re-entered), and the last trace that held it (for messages)."""

    __slots__ = ("lock", "running")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.running = None


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state_of(module) -> _ModelState:
    state = _STATES.get(module)
    if state is None:  # setdefault is atomic: two threads get the same state
        state = _STATES.setdefault(module, _ModelState())
    return state


def root_state(root) -> _ModelState:
    """``_state_of(root._module)``, found once per wrapper and kept on it (every trace
    and every plain call through the wrapper asks)."""
    state = root.__dict__.get("_iv_state")
    if state is None:
        state = root.__dict__["_iv_state"] = _state_of(root._module)
    return state


def model_lock(module) -> threading.RLock:
    """The lock a trace of ``module`` holds while it runs.  A plain call of the model
    made ``with model_lock(module):`` waits for a trace running in another thread
    (the same thread may take it again: a plain call from inside a block)."""
    return _state_of(module).lock


_Tensor = torch.Tensor
_PLAIN_BATCHING: dict[type, int] = {}


def _plain_batching(cls) -> int:
    """Does ``cls`` batch invokes as ``NNsight`` does (its own ``_prepare`` and
    ``_batch``)?  Then ``Tracer._inputs`` may take the common case itself.  0: no;
    1: yes; 2: yes, and it runs a trace as ``NNsight`` does too (its own ``_run``:
    ``_execute`` calls the module itself)."""
    plain = _PLAIN_BATCHING.get(cls)
    if plain is None:
        from .nnsight import NNsight

        plain = (cls._batch is NNsight._batch and cls._prepare is NNsight._prepare)
        plain = _PLAIN_BATCHING[cls] = 2 if plain and cls._run is NNsight._run else int(plain)
    return plain


def _describe(tracer) -> str:
    if tracer is None:
        return "a trace"
    block = tracer._block
    return (f"`with {block.model}.{tracer._kind}({block.args})` at "
            f"{tracer._filename}:{block.line}")


def _nested_error(running, new) -> RuntimeError:
    return RuntimeError(
        f"{_describe(new)} starts a trace of a model that is running a trace already, in "
        f"this thread ({_describe(running)}): a trace cannot run inside another trace of the "
        "same model, whose forward pass is in progress.  Run the inner experiment after the "
        "outer block has ended (save what it needs), make it an invoke of the outer trace, or "
        "trace a separate copy of the model"
    )


def _remove_handles(handles: list) -> None:
    while handles:  # each removed, then forgotten: an interrupted removal is repeated
        handles[-1].remove()
        handles.pop()


def _drop_learning_hooks(root) -> None:
    """Order-learning hooks whose registration was interrupted (their handles never
    came back): found by their function and removed.  Only after such an interrupt."""
    for module in root._module.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for hid, fn in list(hooks.items()):
                if getattr(fn, "__qualname__", "").startswith("NNsight._learn_order."):
                    hooks.pop(hid, None)
                    module._forward_hooks_with_kwargs.pop(hid, None)
                    module._forward_pre_hooks_with_kwargs.pop(hid, None)


def _settle_order(root, first_pass_done: bool) -> None:
    """After a trace that learned the module order: keep it only if the first forward
    pass ran to its end.  A pass cut short (tracer.stop(), an error) saw only some
    modules; taking that as the whole order would let later checks trust missing facts."""
    if first_pass_done:
        root._order_complete = True
    else:
        root._order.clear()
        root._repeated.clear()
        root._precedes_cache.clear()


class InvokeSpec:
    __slots__ = ("args", "kwargs", "root")

    def __init__(self, args: tuple, kwargs: dict, root=None) -> None:
        self.args = args
        self.kwargs = kwargs
        self.root = root

    @property
    def inputs(self) -> tuple[tuple, dict]:
        """``invoker.inputs``: this invoke's input as the model gets it, alone
        (``(args, kwargs)``; a LanguageModel's text encoded: input_ids, attention_mask...)."""
        if self.root is None or not (self.args or self.kwargs):
            return self.args, dict(self.kwargs)
        return self.root._prepare(self.args, self.kwargs)


class Tracer:
    """The object bound by ``with model.trace(...) as tracer``."""

    # Defaults on the class: a trace sets only what differs.
    _result = None
    _filename = "<unknown>"
    _has_steps = False
    _has_backward = False
    _late_cache = True  # may a lane call tracer.cache() late? (Handle.block knows: False)
    _invoked = False
    _inter = None
    _caches: list | None = None
    _plain_inputs = True  # `_inputs` is this class's own (a subclass may override it)
    # A `trace` block without step blocks, backward blocks or a late tracer.cache()
    # (Handle.block knows; True spares `_execute` the checks of those flags).
    _plain = False
    _tiled = None  # the batch's rows, when `_inputs` made the batch of one tensor per invoke
    _firsts = None  # what lazily started invokes wait for (Handle.block; see api._firsts)
    # The server's tracers (runtime/serve): a `trace` whose reply is only what its lanes
    # saved ends its forward once no lane waits for a value (``_ends_when_served``).
    _end_when_served = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._plain_inputs = cls._inputs is Tracer._inputs

    def __init__(self, root, kind: str, block, sites: dict, args: tuple, kwargs: dict) -> None:
        # Handle.block (runtime/api.py) makes its tracers with these same sets, inline.
        self._root = root
        self._kind = kind
        self._block = block
        self._sites = sites
        self._args = args
        self._kwargs = kwargs
        # (fn, spec, index); spec: an InvokeSpec, None (no invoke), or `__iv.invoke`'s
        # `(x, name)` in a Tracer's own lanes (runtime/api.py `_invoke`)
        self._lanes: list[tuple[Any, InvokeSpec | tuple | None, int]] = []
        self._invoked = False  # read by every trace: faster on the instance than on the class

    # -- user-facing -----------------------------------------------------------
    def invoke(self, *args, **kwargs) -> InvokeSpec:
        spec = _new(InvokeSpec)  # `InvokeSpec(args, kwargs, self._root)`, one Python call less
        spec.args, spec.kwargs, spec.root = args, kwargs, self._root
        return spec

    def stop(self) -> None:
        """The rest of the forward pass does not run; what was saved stays.  The code
        after ``stop()`` still runs; a module value asked for after it raises
        MissedCheckpointError at that line."""
        inter = self._inter
        if inter is None:
            raise RuntimeError("tracer.stop() works only inside its trace block, while it runs")
        inter.stop_requested = True

    def cache(self, modules=None, include_inputs: bool = False, device=None, dtype=None,
              detach: bool = True):
        """Record the outputs (and inputs) of every module, or of ``modules`` (envoys or
        paths), after interventions; in an invoke, its rows.  Under ``generate``: one
        entry per step.  See runtime/cache.py."""
        from .cache import open_cache

        cache = open_cache(self, modules, include_inputs, device, dtype, detach)
        inter = self._inter
        if inter is not None:  # the cache sees every module: the server's trace runs whole
            inter.end_when_served = False
        return cache

    def barrier(self, n: int) -> Barrier:
        return Barrier(n)

    def all(self) -> StepSelection:
        return StepSelection(None)

    @property
    def iter(self) -> _StepIndexer:
        return _StepIndexer(self._kind != "generate")

    @property
    def result(self):
        """After a generate block: the generated token ids (prompt included).  Inside a
        block the compiler makes ``tracer.result`` a checkpoint (``model.generator.output``
        / ``model.output``); a trace keeps nothing after its block."""
        if self._result is None and self._kind != "generate":
            raise AttributeError(
                f"`tracer.result` of a {self._kind} is what the model returned, kept only if "
                "saved inside the block: `out = tracer.result.save()` (or "
                "`model.output.save()`)")
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
        # One trace at a time per model (see README "Guarantees"): another thread waits
        # here; this thread coming back (a trace started from inside a running one) is
        # refused, since the model's forward is in progress and its modules are wrapped.
        state = self._root.__dict__.get("_iv_state") or root_state(self._root)
        lock = state.lock
        if lock._is_owned():  # this thread holds it: a trace of this model is running here
            raise _nested_error(state.running, self)
        with lock:
            root = self._root
            inter = learning = stop_iteration = None
            edits = ()
            first_pass_done = False
            try:
                # For that message only; set inside the `try` and forgotten first thing
                # in its `finally`, so that no interrupt leaves it behind.
                state.running = self
                got = root._checked.get(id(self._block))
                facts = got[1] if got is not None and got[0] is self._block else block_facts(root, self._block)
                model = _PLAIN_BATCHING.get(root.__class__) or _plain_batching(root.__class__)
                plain = self._plain  # a trace block without steps, backward or late cache
                if self._invoked or not model or not (plain or self._plain_inputs):
                    args, kwargs, rows = self._inputs()
                else:  # what `_inputs` gives without invokes when the model takes its inputs as is
                    args, kwargs, rows = self._args, self._kwargs, None
                if root._edits:  # `model.edit()`: its interventions go in first (runtime/edit.py)
                    edits = []  # filled as they start: cleanup undoes those that did
                    start_edits(root, torch.is_grad_enabled(), edits)
                inter = self._inter = Interleaver(root, self._block, self._sites, self._filename)
                # `inter.activate()`, inline: the interleaver of this thread until its cleanup.
                active = inter.active = _ACTIVE.__dict__
                inter.prev_active = active.get("inter")
                active["inter"] = inter
                self._rows = rows  # tracer.cache() in invoke i records rows[i]
                if not plain:
                    if self._late_cache:
                        late_cache_hooks(self)  # see runtime/cache.py
                    if self._has_backward:
                        inter.track = True
                if not root._order_complete:
                    learning = []  # if registering is cut short, cleanup looks for its hooks
                    learning = root._learn_order()
                if not plain:
                    if self._kind == "generate":
                        inter._ensure_step_hook()
                    elif self._has_steps:  # step blocks in a trace: tracer.iter[i] is call i of a module
                        inter.count_calls()
                if source.USED:  # `.source` named somewhere: its forwards go in first
                    source.install_static(inter, facts)
                if self._end_when_served:
                    inter.end_when_served = self._ends_when_served()
                inter.attach_static(facts, self._lanes, rows, _grad_enabled(), self._tiled,
                                    self._firsts)
                if inter.stop_requested:
                    inter.stopped = True  # stopped before the forward began: it does not run
                else:
                    first_pass_done = None  # known once the run returns or raises
                    try:  # the forward (or generate)
                        if plain and model == 2:  # `root._run(...)` of a trace, inline
                            out = root._module(*args, **kwargs)
                        else:
                            out = root._run(self._kind, args, kwargs, self)
                    except StopTrace:
                        inter.stopped = True  # values still awaited are reported, never left unset
                        first_pass_done = inter.step > 0  # a later step began: the first pass had ended
                    else:
                        if not plain and self._kind == "generate":
                            self._result = inter.result = out
                        out = None
                        first_pass_done = True
                if (inter.waiting or inter.step_waiting or inter.end_waiting
                        or inter.barriers or not plain):
                    inter.finish()
                else:  # `inter.finish()` when every lane was served, inline
                    inter.ended = True
                if edits:
                    finish_edits(edits)
            except UserStopIteration as carrier:
                # The user's own StopIteration, kept as it was (a generator would have made
                # it "RuntimeError: generator raised StopIteration"); raised after cleanup,
                # outside this handler, so that it does not refer to the carrier.
                stop_iteration = carrier.exc
            finally:
                state.running = None
                if first_pass_done is None:  # the run raised: did a later step begin?
                    first_pass_done = inter.step > 0
                pending = None
                done = False
                if learning is None and not edits and not self._caches and inter is not None:
                    try:  # the common case, inline: `_cleanup` with only the interleaver to undo
                        inter.cleanup()
                        self._inter = None
                        done = True
                    except BaseException as exc:  # noqa: BLE001 - raised below, after the loop
                        pending = exc  # the loop runs the (idempotent) cleanup again
                if not done:
                    for _attempt in range(3):  # an interrupt can arrive as a call begins: call again
                        try:
                            pending = self._cleanup(inter, learning, first_pass_done, edits) or pending
                            break
                        except BaseException as exc:  # noqa: BLE001 - raised below
                            pending = pending or exc
                if pending is not None:
                    try:
                        raise pending
                    finally:
                        pending = None
            if stop_iteration is not None:
                try:
                    raise stop_iteration
                finally:
                    stop_iteration = None

    def _ends_when_served(self) -> bool:
        """May the forward end once no lane waits for a value?  Only a ``trace`` whose
        every value is asked for by its lanes: no step blocks (calls counted to the
        end), backward blocks (the graph to the loss), caches (every module's output
        recorded: ``cache`` turns it off as a lane opens one) or ``model.edit()``
        interventions; and a model whose values stay as they were handed out
        (runtime/serve/stable.py, learned before the first batch)."""
        return not (self._kind != "trace" or self._has_steps or self._has_backward
                    or self._caches or self._root._edits
                    or not self._root.__dict__.get("_iv_outputs_stable")
                    or not self._root._order_complete)  # a pass that learns the order runs whole

    def _inputs(self) -> tuple[tuple, dict, list | None]:
        """The model's inputs, and each lane's rows of the batch (None: all rows).  The
        server's batched pass (runtime/serve/batch.py) overrides it."""
        root = self._root
        if not self._invoked:
            args, kwargs = root._prepare(self._args, self._kwargs)
            return args, kwargs, None
        if _plain_batching(root.__class__):
            # The common case, in one pass: each invoke gives one tensor (rows first)
            # and no keywords.  Anything else, or inputs torch.cat refuses, goes the
            # general way below, which says what is wrong.
            xs: list = []
            rows = []
            start = 0
            try:
                for _, spec, _ in self._lanes:
                    if spec.__class__ is tuple:  # `(x, name)` of `__iv.invoke` (runtime/api.py)
                        x = spec[0]
                    elif spec.kwargs:  # (None: AttributeError)
                        break
                    else:
                        (x,) = spec.args  # (not one input: ValueError)
                    if x.__class__ is not _Tensor:
                        break
                    xs.append(x)
                    end = start + x.shape[0]  # (no dimension: IndexError)
                    rows.append(slice(start, end))
                    start = end
                else:
                    batch = (torch.cat(xs),)
                    self._tiled = start
                    return batch, dict(self._kwargs), rows
            except (AttributeError, IndexError, RuntimeError, TypeError, ValueError):
                pass
        # `tracer.invoke()` with no input adds no rows: it sees the whole batch.
        args, kwargs, rows = root._batch(
            [((spec[0],), {}) if spec.__class__ is tuple  # `__iv.invoke`'s `(x, name)`
             else (spec.args, spec.kwargs) if spec is not None and (spec.args or spec.kwargs)
             else None for _, spec, _ in self._lanes],
            [self._block.lanes[index] for _, _, index in self._lanes],  # names in errors
        )
        return args, {**kwargs, **self._kwargs}, rows

    def _cleanup(self, inter, learning, first_pass_done: bool, edits=()) -> BaseException | None:
        """Undo everything the run put on the model.  Every step runs even if an
        earlier one (or a KeyboardInterrupt arriving meanwhile) raises; each is
        idempotent, so one cut short is run again.  Returns the first error (the
        caller raises it), so that calling this again is harmless."""
        pending = None
        root = self._root
        steps = [self._detach_caches]
        if edits:  # after the trace's own interleaver: see runtime/edit.py
            steps[:0] = cleanup_steps(edits)
        if inter is not None:
            steps.insert(0, inter.cleanup)
        if learning is not None:
            if not learning:
                steps.append(lambda: _drop_learning_hooks(root))
            steps.append(lambda: _remove_handles(learning))
            steps.append(lambda: _settle_order(root, first_pass_done))
        done = tries = 0
        while done < len(steps):
            try:  # the loop itself inside the try: an interrupt anywhere in it resumes it
                while done < len(steps):
                    steps[done]()
                    done += 1
                    tries = 0
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                if pending is None:
                    pending = exc
                tries += 1
                if tries == 3:  # it fails every time: not an interrupt; go on without it
                    done += 1
                    tries = 0
        self._inter = None
        return pending

    def _detach_caches(self) -> None:
        caches = self._caches
        while caches:
            caches[-1]._detach_hooks()
            caches.pop()


class _StepIndexer:
    __slots__ = ("calls",)

    def __init__(self, calls: bool = False) -> None:
        self.calls = calls  # a trace's step block: it selects calls of each module

    def __getitem__(self, key) -> StepSelection:
        return StepSelection(key, self.calls)


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
        checked = root._checked
        if len(checked) >= _CHECKED_MAX:  # one entry per decorated function: keep it bounded
            del checked[next(iter(checked))]
        checked[id(block)] = (block, facts)
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
        if any(getattr(i, "kind", None) == "helper" for i in lane.items):
            static_only = False  # a helper's checkpoints are asked for as it runs
        for cp in lane.checkpoints:
            if cp.value == "grad":
                continue
            if cp.parts is None:
                static_only = False
                continue
            try:
                env = root._resolve(cp.parts)
            except (AttributeError, IndexError, KeyError, TypeError) as exc:
                from .envoy import resolved_as  # again, its message rooted at the block's variable

                try:
                    resolved_as(root, cp.parts, block.model)
                except type(exc) as again:
                    exc = again  # the same error, spelled as the block spells it
                raise type(exc)(f"line {cp.line}: `{cp.path}`: {exc}") from None
            module, phase = env._module, _PHASE.get(cp.value, OUT)
            if id(module) in in_model or module is root._module:
                attach.setdefault((id(module), phase), (module, phase))
            static.append((cp, module, phase, env))
        for j, (b, mb, pb, eb) in enumerate(static):
            for a, ma, pa, ea in static[:j]:
                # Only pairs that surely both run, one after the other: same scope.
                # (A checkpoint in a branch or loop may not run at all; the run
                # itself catches those.)  Nor do checkpoints of two step blocks
                # of other selections (`tracer.iter[0:2]` then `tracer.iter[3]`) run in
                # the same forward pass.
                if b.scope != a.scope or b.steps != a.steps:
                    continue
                verdict = order.precedes(root, mb, pb, ma, pa)
                if verdict is None:
                    complete = False
                elif verdict:
                    pb_, pa_ = rooted(eb._path, block.model), rooted(ea._path, block.model)
                    raise OutOfOrderError(
                        f"`{pb_}.{b.value}` (line {b.line}) is asked for after "
                        f"`{pa_}.{a.value}` (line {a.line}), but the model computes "
                        f"`{pb_}.{b.value}` first: in one forward pass, ask for module "
                        "values in the order the model computes them (or use two traces)",
                        pb_,
                        b.line,
                    )
    return BlockFacts(list(attach.values()), static_only), complete
