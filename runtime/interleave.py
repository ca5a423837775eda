"""Driving compiled lanes from the model's modules: the heart of the runtime.

Each lane is a generator that yields checkpoint requests (``read`` / ``write``
of a module's output or input).  The interleaver starts every lane before the
forward pass and parks it on the module it asks for.  Only modules something
may wait for are attached: their ``forward`` is wrapped for the trace (outputs)
or given a pre-hook (inputs); see ``Interleaver._attach``.  When the module
runs, the parked lanes resume in source order with the live value, run on to
their next request, and whatever they wrote is what the module returns.  A
request for a value the model has already produced is an ``OutOfOrderError``
thrown into the lane at the user's line; a lane still parked when the forward
ends gets an error too, never a hang.  Grad mode is kept per lane, so a
``torch.no_grad()`` block in the experiment does not leak into the model's own
computation.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from types import GeneratorType
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from . import order
from .backward import BackwardSession
from .envoy import Envoy
from .errors import MissedCheckpointError, OutOfOrderError
from .paths import rooted

PRE, OUT, GRAD = "pre", "out", "grad"
_PARKED = object()
_NONE = object()
_FORWARD, _PRE_HOOK = 0, 1
_NOTHING = (None, None, None)  # attached to nothing (a list of modules is never called)
_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)
# Bound once: they run on every resume of a lane.
_grad_enabled = torch.is_grad_enabled
_set_grad_enabled = torch._C._set_grad_enabled
_PHASE = {"output": OUT, "input": PRE, "inputs": PRE}
_Tensor = torch.Tensor
_new = object.__new__  # `_new(Lane)`: an instance without a Python `__init__` call
_NO_ROWS = itertools.repeat(None)  # the rows of each lane of a block without invokes
_ACTIVE = threading.local()  # .inter: the interleaver running in this thread (see `activate`)


def read(envoy, value: str, site: int) -> tuple:
    return (envoy, value, site)


def write(envoy, value: str, site: int, new) -> tuple:
    return (envoy, value, site, new)


class StopTrace(BaseException):
    """Raised through the model's forward once a lane has called ``tracer.stop()``; a
    BaseException so that no ``except Exception`` in the model swallows it."""


class StepsOver(BaseException):
    """Thrown into a lane waiting in an open step block of a trace (``tracer.iter[2:]``,
    ``tracer.all()``) for a call that never came: the compiled block catches it and
    leaves its loop (see ``Interleaver._end_open_calls``)."""


class UserStopIteration(BaseException):
    """Carries a StopIteration raised by the experiment's own code out of the lane (a
    generator turns it into "RuntimeError: generator raised StopIteration") and through
    the model; the tracer raises the original."""

    def __init__(self, exc: StopIteration) -> None:
        super().__init__()
        self.exc = exc


class _Control:
    """First item of a request that is not a module value."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


STEP, END, BARRIER = _Control("next step"), _Control("end of generation"), _Control("barrier")
BACKWARD, END_BACKWARD = _Control("backward"), _Control("end of backward")


def next_step(selection, site: int) -> tuple:
    return (STEP, selection, site)


def end_steps(tracer, site: int) -> tuple:
    return (END, tracer, site)


def barrier(b, site: int) -> tuple:
    return (BARRIER, b, site)


def backward(loss, site: int, /, **kwargs) -> tuple:
    return (BACKWARD, (loss, kwargs), site)


def end_backward(site: int) -> tuple:
    return (END_BACKWARD, None, site)


def mark(site: int, value):
    """``tracer.stop()`` / ``tracer.cache()``: shown in the plan, run as written."""
    return value


class StepSelection:
    """``tracer.all()`` / ``tracer.iter[...]``: which generation steps a block runs at (in
    a trace: which calls of each module it reads)."""

    __slots__ = ("current", "key", "served", "skipped")
    Over = StepsOver  # `except __iv_steps0.Over: break` in a trace's compiled step block

    def __init__(self, key, calls: bool = False) -> None:
        if key is not None and not isinstance(key, (int, slice, list, tuple, range)):
            raise TypeError(
                f"tracer.iter[...] takes an int, a slice or a list of ints, got {type(key).__name__}"
            )
        if isinstance(key, slice) and (key.step or 1) <= 0:
            raise ValueError("tracer.iter[a:b:c] needs a positive step")
        _check_steps(key, calls)
        self.key = key
        self.current = None
        self.served: list[int] = []
        self.skipped: list[int] = []

    def wanted_after(self, last: int | None) -> int | None:
        """The first selected step after ``last`` (None: no more)."""
        lo = -1 if last is None else last
        key = self.key
        if key is None:
            return lo + 1
        if isinstance(key, int):
            return key if key > lo else None
        if isinstance(key, slice):
            start, step = key.start or 0, key.step or 1
            k = start if lo < start else start + ((lo - start) // step + 1) * step
            return k if key.stop is None or k < key.stop else None
        later = sorted(k for k in key if k > lo)
        return later[0] if later else None

    def missing(self) -> list[int] | str:
        """Selected steps that were never served (for the warning)."""
        if self.key is None:
            return []
        last = self.served[-1] if self.served else None
        out = list(self.skipped)
        k = self.wanted_after(last)
        if isinstance(self.key, slice) and self.key.stop is None:
            return out + ([f"{k}..."] if k is not None else [])
        while k is not None:
            out.append(k)
            k = self.wanted_after(k)
        return out


def _check_steps(key, calls: bool = False) -> None:
    """Refuse selections that can never run (at the user's line: this runs where
    ``tracer.iter[...]`` is written); ``calls``: a trace's step block (it selects calls
    of each module, not generation steps)."""
    if key is None:
        return
    if calls:
        negative = ("in a trace a step block selects calls of each module, and negative "
                    "numbers would count from a module's last call, which is known only once "
                    "the forward pass has ended: select calls by their number from 0 (call 0 "
                    "is each module's first call), or use tracer.all() and keep what you need")
    else:
        negative = ("negative steps count from the end of generation, which is known only "
                    "once it has ended: select steps by their number from 0 (step 0 is the "
                    "prompt), or use tracer.all() and keep what you need")
    if isinstance(key, slice):
        for name, v in (("start", key.start), ("stop", key.stop)):
            if v is not None and not isinstance(v, int):
                raise TypeError(f"tracer.iter[a:b]: {name} must be an int, got {type(v).__name__}")
            if v is not None and v < 0:
                raise ValueError(f"tracer.iter[{_show(key)}]: {negative}")
        if key.stop is not None and key.stop <= (key.start or 0):
            raise ValueError(f"tracer.iter[{_show(key)}] selects no step at all")
        return
    keys = [key] if isinstance(key, int) else list(key)
    if not keys:
        raise ValueError("tracer.iter[[]] selects no step at all")
    for k in keys:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"tracer.iter[...] takes ints as steps, got {type(k).__name__}")
        if k < 0:
            raise ValueError(f"tracer.iter[{key!r}]: {negative}")


def _leave_call_block(lane: Lane) -> None:
    """A lane leaves a step block of a trace: back to the block around it, if any."""
    outer = lane.call_outer
    if outer:
        lane.call_index, lane.call_sel, lane.call_site, lane.call_requests = outer.pop()
    else:
        lane.call_index = lane.call_sel = lane.call_site = None


def _show(key: slice) -> str:
    text = ("" if key.start is None else str(key.start)) + ":" + ("" if key.stop is None else str(key.stop))
    return text + ("" if key.step is None else f":{key.step}")


class Barrier:
    """``b = tracer.barrier(n)``: n invokes wait at ``b()`` until all have arrived."""

    __slots__ = ("arrived", "line", "n", "waiting")

    def __init__(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"tracer.barrier(n) needs a positive int, got {n!r}")
        self.n = n
        self.waiting: list = []
        self.arrived = 0
        self.line = None


class _CallCounts(set):
    """``Interleaver.fired`` of a trace with step blocks: also how many times each
    (module, phase) has handed its value out (``n``)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        super().__init__()
        self.n: dict[tuple[int, str], int] = {}

    def add(self, key) -> None:
        n = self.n
        n[key] = n.get(key, 0) + 1
        set.add(self, key)


class Lane:
    """One lane's generator and where it stands (defaults on the class: a trace
    makes one per invoke, and most never change most of these)."""

    done = False
    parked = None  # (module, phase, request) while waiting
    backward = None  # the open BackwardSession
    grad_site = None  # the last gradient this lane waited for
    later = 0  # calls of the module it waits for still to let pass (`module.next()`)
    # In a step block of a trace (tracer.iter[...]): the call it reads of each module, its
    # selection and the selection's site, the requests made in this iteration, and the
    # step blocks around it ((index, selection, site, requests) each).
    call_index = None
    call_sel = None
    call_site = None
    call_requests = 0
    call_outer = None
    open_ended_at = None  # the line of an open step block that ended with the forward pass
    # A lane started lazily (`attach_static`): its generator (`gen`) is made only if it
    # must run as one after all (`Interleaver._wake`); until then `lazy` is the cell of
    # the variable it sets, set to its one value when that comes (all the lane does);
    # `wake` is its generator function.  A run of such lanes waiting for one value is
    # one `Lane` whose `lazy` lists them: (cell, rows, generator function, index).
    lazy = None
    wake = None
    gen = None  # (a lazily started lane's until it is woken; every other lane sets its own)

    def __init__(self, gen, index: int, rows, grad: bool) -> None:
        self.gen = gen
        self.index = index
        self.rows = rows  # rows of the batch this lane sees; None: all
        self.grad = grad


class Event:
    """The module value a hook is handing out right now."""

    __slots__ = ("changed", "module", "phase", "value")

    def __init__(self, module, phase: str, value) -> None:
        self.module = module
        self.phase = phase
        self.value = value  # output, or (args, kwargs) for PRE
        self.changed = False

    def get(self, what: str):
        if self.phase != PRE:
            return self.value
        args, kwargs = self.value
        if what == "inputs":
            return self.value
        if args:
            return args[0]
        if kwargs:
            return next(iter(kwargs.values()))
        return None

    def set(self, what: str, new) -> None:
        self.changed = True
        if self.phase != PRE:
            self.value = new
            return
        args, kwargs = self.value
        if what == "inputs":
            if not (isinstance(new, tuple) and len(new) == 2 and isinstance(new[1], dict)):
                raise TypeError("`.inputs = ...` takes a tuple (args_tuple, kwargs_dict)")
            self.value = (tuple(new[0]), dict(new[1]))
        elif args:
            self.value = ((new, *args[1:]), kwargs)
        elif kwargs:
            first = next(iter(kwargs))
            self.value = (args, {**kwargs, first: new})
        else:
            raise TypeError("`.input = ...`: the module was called without arguments")


class Interleaver:
    """The state of one trace's run.  Defaults live on the class and the containers
    only some traces need (steps, barriers, backward blocks) are made on first use:
    a trace of one saved value sets five attributes."""

    step = -1  # forward passes begun (generation steps)
    batch = None  # rows of the batch when lanes see rows of it (invokes); else None
    starting_rows = None  # the rows of the lane being started (while `fn()` runs)
    ended = False
    result = None
    track = False  # remember served tensors (for backward blocks)
    stopped = False  # tracer.stop() ended the forward pass
    stop_requested = False  # a lane called tracer.stop(): the forward ends after its serve
    # The server (runtime/serve): once no lane waits for anything, the rest of the forward
    # is seen by no one (a job's reply is its saved values), so it does not run.
    end_when_served = False
    repeats = False  # modules run more than once (generation steps)
    counting = False  # a trace with step blocks: `fired` counts each module's calls
    static = False  # every module the lanes can ask for was attached before the run
    current_site = None  # the request being served (for messages)
    lazy_grad = None  # the grad mode lazily started lanes began in (see attach_static)
    current: Event | None = None
    active: dict | None = None  # `_ACTIVE.__dict__` of the thread that activated it
    # Made on first use:
    step_waiting: dict[int, list[tuple[Lane, tuple]]] | None = None
    end_waiting: list[Lane] | None = None
    barriers: list[Barrier] | None = None
    served: dict[int, tuple] | None = None  # id(tensor) -> (tensor, base, rows)
    sessions: list[BackwardSession] | None = None

    def __init__(self, root, block, sites, filename: str = "<unknown>") -> None:
        self.root = root
        self.block = block
        self.sites = sites  # site number -> Checkpoint or Marker of the plan
        self.filename = filename
        self.waiting: dict[tuple[int, str], list[tuple[Lane, tuple, Any]]] = {}
        self.attached: dict[tuple[int, str], Any] = {}  # key -> what cleanup undoes
        self.fired: set[tuple[int, str]] = set()
        self.lanes: list[Lane] = []
        # Read by every trace: on the instance (Python 3.11 reads a class default
        # through the slow generic path, about 15 ns more than an instance value).
        self.current = self.batch = None
        self.stop_requested = self.track = False
        self.step_waiting = self.end_waiting = self.barriers = self.sessions = self.served = None

    def count_calls(self) -> None:
        """A trace (not ``generate``) with step blocks: ``tracer.iter[i]`` reads call i of
        each module, so calls are counted (before anything is attached: the wrappers
        count through ``fired``).  Traces without step blocks keep the plain set."""
        self.counting = True
        self.fired = _CallCounts()
        # When the model's forward returns, no module is called any more: open step
        # blocks end there, so that the code after them can still read `model.output`.
        root = self.root._module

        def forward_done(mod, args, out):
            if not self._end_open_calls():
                return None
            waiters = self.waiting.pop((id(mod), OUT), None)
            return None if waiters is None else self._serve(Event(mod, OUT, out), waiters).value

        self.attached[(id(root), "calls-end")] = root.register_forward_hook(forward_done)

    def activate(self) -> None:
        """Make this the interleaver of this thread (for ``rows_require_grad``) until
        ``cleanup``; a trace of another model inside a block gives it back after."""
        active = self.active = _ACTIVE.__dict__  # this thread's (one lookup of the local)
        self.prev_active = active.get("inter")
        active["inter"] = self

    # -- lanes -----------------------------------------------------------------
    def advance(self, lane: Lane, value, error: BaseException | None = None, first=None,
                outer=None) -> None:
        """Run ``lane`` until it parks or ends, sending it ``value`` first (``first``: a
        request the lane has just made, handled before anything is sent: see ``_serve``).
        ``outer``: the grad mode now, when the caller has just read it."""
        if outer is None:
            outer = _grad_enabled()
        if lane.grad is not outer:
            _set_grad_enabled(lane.grad)
        gen = lane.gen
        try:
            while True:
                if first is None:
                    try:
                        req = gen.send(value) if error is None else gen.throw(error)
                    except StopIteration:
                        lane.done = True
                        return
                    except RuntimeError as exc:
                        _carry_user_stop(lane, exc)
                        raise
                else:
                    req, first = first, None
                error = None
                envoy = req[0]
                if envoy.__class__ is Envoy or isinstance(envoy, Envoy):
                    # The common case: a module's value.
                    module = envoy._module
                    what = req[1]
                    phase = _PHASE[what]
                    cur = self.current
                    # `module.next(n)`: served n calls after the one a plain request gets.
                    later = 0 if envoy.__class__ is Envoy else envoy.__dict__.get("_calls_later", 0)
                    if lane.call_index is not None:
                        # In a step block of a trace: call `call_index` (+ later) of the module.
                        later = self._nth_call(lane, envoy, phase, later, req)
                        if later.__class__ is not int:
                            error, value = later, None
                            continue
                        if later < 0:
                            later = 0  # the call being handed out
                        else:
                            cur = None  # a later call: wait for it, `later` calls on
                    if cur is not None:
                        here = cur.module is module
                        if later and here:
                            if len(req) == 4 and cur.phase == phase and self.current_site == req[2]:
                                # `m.next().output = v` is compiled as a read, then a
                                # write at the same site: the write goes to the call read.
                                later = 0
                            else:
                                here = False  # a later call: wait for it
                                if cur.phase == phase or phase == PRE:
                                    # The call being handed out is the one a plain request
                                    # gets (its input: the next call's is the first later).
                                    later -= 1
                        if here and cur.phase == phase:
                            rows = lane.rows
                            if len(req) == 4:
                                if rows is None:
                                    new = req[3]
                                else:
                                    # Rebuilt under the model's grad mode, as a write
                                    # in a plain trace keeps the graph.
                                    mode = _grad_enabled()
                                    _set_grad_enabled(outer)
                                    try:
                                        new = widen(cur.get(what), req[3], rows, self.batch)
                                    finally:
                                        _set_grad_enabled(mode)
                                cur.set(what, new)
                                value = None
                            else:
                                value = self._narrow(cur.get(what), rows, phase)
                            continue
                        # Only while modules can run again (generation steps) must a
                        # late request be stopped at once: waiting would hand it a later
                        # step's value.  In one forward pass it just waits and `finish`
                        # reports it at the same line; a module called twice serves its
                        # next call.
                        if self.repeats and self._passed(module, phase):
                            error = self._order_error(envoy, what, req[2], lane)
                            value = None
                            continue
                    if self.stop_requested:
                        # tracer.stop() was called: the rest of the forward does not run.
                        error = self._stopped_error(envoy, what, req[2])
                        value = None
                        continue
                    # Park until the module hands its value out (`later` calls on).
                    key = (id(module), phase)
                    lane.parked = (module, phase, req)
                    if later:
                        lane.later = later
                    waiters = self.waiting.get(key)
                    if waiters is None:
                        self.waiting[key] = [(lane, req, lane.rows)]
                    elif waiters[-1][0].index < lane.index:  # in source order already
                        waiters.append((lane, req, lane.rows))
                    else:
                        _add_waiter(waiters, (lane, req, lane.rows))
                    if key not in self.attached:
                        self._attach_waited(module, phase, key)
                    return
                if envoy.__class__ is _Control:
                    value = self._control(lane, req)
                    if value is _PARKED:
                        return
                    continue
                if req[1] == GRAD:
                    value = self._grad(lane, req)
                    if value is _PARKED:
                        return
                    if isinstance(value, Exception):  # thrown at the user's line
                        error, value = value, None
                    continue
                # Not a module: `.output` of an ordinary object.
                if len(req) == 4:
                    setattr(envoy, req[1], req[3])
                    value = None
                else:
                    value = getattr(envoy, req[1])
        finally:
            error = value = None  # an exception raised here must not keep this frame (or the values) alive
            lane.grad = now = _grad_enabled()
            if now is not outer:
                _set_grad_enabled(outer)

    # -- steps, the end of generation, barriers -------------------------------------------
    def _control(self, lane: Lane, req: tuple):
        kind, arg = req[0], req[1]
        if kind is STEP and self.counting:
            return self._next_call(lane, arg, req[2])
        if kind is END and self.counting:
            # After a trace's step block (`end_steps(selection)`): nothing to wait for; a
            # block left by `break` is left here.
            if lane.call_sel is arg:
                _leave_call_block(lane)
            return None
        if kind is STEP:
            sel = arg
            last = sel.served[-1] if sel.served else None
            k = sel.wanted_after(last)
            while k is not None and not self.ended and k < self.step:
                sel.skipped.append(k)  # passed before this line was reached
                k = sel.wanted_after(k)
            if k is None or self.ended:
                self._warn_missing(sel, req[2])
                return False
            if k == self.step:
                sel.served.append(k)
                sel.current = k
                return True
            lane.parked = (None, "step", req)
            self._ensure_step_hook()
            self.step_waiting.setdefault(k, []).append((lane, req))
            return _PARKED
        if kind is BACKWARD:
            loss, kwargs = arg
            session = BackwardSession(loss, kwargs, req[2])
            if self.sessions is None:
                self.sessions = []
            self.sessions.append(session)
            lane.backward = session
            return None
        if kind is END_BACKWARD:
            session = lane.backward
            if session is None:
                return None
            if session.state == "new":
                self._run_backward(session)
            if session.state == "running":
                lane.parked = (None, "end-backward", req)
                session.end_waiting.append(lane)
                return _PARKED
            lane.backward = None
            return None
        if kind is END:
            if self.ended:
                return None
            lane.parked = (None, "end", req)
            if self.end_waiting is None:
                self.end_waiting = []
            self.end_waiting.append(lane)
            return _PARKED
        # a barrier
        b = arg
        if not isinstance(b, Barrier):
            raise TypeError(f"`{b!r}()` is not a barrier made by tracer.barrier(n)")
        b.arrived += 1
        if self.barriers is None:
            self.barriers = []
        if b not in self.barriers:
            self.barriers.append(b)
        if b.arrived < b.n:
            cp = self.sites.get(req[2])
            b.line = cp.line if cp is not None else None
            lane.parked = (None, "barrier", req)
            b.waiting.append(lane)
            return _PARKED
        released, b.waiting, b.arrived = b.waiting, [], 0
        for other in sorted(released, key=lambda ln: ln.index):
            other.parked = None
            self.advance(other, None)
        return None

    # -- step blocks of a trace: calls of each module ------------------------------------
    def _next_call(self, lane: Lane, sel: StepSelection, site: int) -> bool:
        """``while (yield next_step(sel))`` in a trace: the next selected call, at once
        (the body's requests wait for that call of each module they name)."""
        if lane.call_sel is not sel:  # the block begins (a new selection each time)
            if lane.call_index is not None:  # inside another step block
                if lane.call_outer is None:
                    lane.call_outer = []
                lane.call_outer.append(
                    (lane.call_index, lane.call_sel, lane.call_site, lane.call_requests))
            lane.call_sel, lane.call_site = sel, site
        k = sel.wanted_after(sel.served[-1] if sel.served else None)
        if k is None:  # the block is done
            _leave_call_block(lane)
            return False
        sel.served.append(k)
        sel.current = lane.call_index = k
        lane.call_requests = 0
        return True

    def _nth_call(self, lane: Lane, envoy, phase: str, later: int, req: tuple):
        """A request in a trace's step block: how many calls of the module to let pass
        before the one it reads (-1: the call being handed out), or the error for a call
        that has passed or cannot be counted."""
        module = envoy._module
        key = (id(module), phase)
        lane.call_requests += 1
        path = rooted(envoy._path, getattr(self.block, "model", None))
        want = lane.call_index + later
        cur = self.current
        if key not in self.attached and (cur is not None or self.ended):
            cp = self.sites.get(req[2])
            return OutOfOrderError(
                f"`{path}.{req[1]}` (call {want}) is asked for at line "
                f"{getattr(cp, 'line', None)} in the step block at line {self._call_line(lane)}, "
                f"but `{path}` was not watched from the start of the forward pass, so its "
                "calls so far are not known: a step block of a trace counts the calls of the "
                "traced model's own modules (is this one of another model?)",
                path,
                getattr(cp, "line", None),
            )
        done = self.fired.n.get(key, 0)  # calls that have handed this value out
        if want == done - 1 and cur is not None and cur.module is module and cur.phase == phase:
            return -1  # the call being handed out now
        if want >= done:  # the next call is call `done`
            return want - done
        cp = self.sites.get(req[2])
        line = getattr(cp, "line", None)
        return OutOfOrderError(
            f"`{path}.{req[1]}` of call {want} is asked for at line {line} (step block "
            f"at line {self._call_line(lane)}), but `{path}` had already run {done} "
            f"time(s) when the code got there: a step block of a trace reads call i of each "
            "module at its iteration i, in the order the model makes them",
            path,
            line,
        )

    def _call_line(self, lane: Lane):
        cp = self.sites.get(lane.call_site)
        return getattr(cp, "line", None)

    def _call_missed(self, lane: Lane, envoy, what: str, line, path: str,
                     later: int) -> MissedCheckpointError:
        """``path``: ``envoy``'s, as the block spells it; ``later``: its ``next(n)``."""
        want = lane.call_index + later
        phase = _PHASE[what]
        calls = self.fired.n.get((id(envoy._module), phase), 0)
        sel = lane.call_sel
        shown = "all()" if sel.key is None else f"iter[{_show(sel.key) if isinstance(sel.key, slice) else sel.key}]"
        return MissedCheckpointError(
            f"`{path}.{what}` of call {want} is asked for at line {line} (the step "
            f"block `tracer.{shown}` at line {self._call_line(lane)} is at call {lane.call_index}), "
            f"but `{path}` ran only {calls} time(s) in this forward pass: a selected call "
            "that never comes is an error (an open selection, `tracer.iter[n:]` or "
            "`tracer.all()`, ends quietly at the first call that does not come)",
            path,
            line,
        )

    def _end_open_calls(self) -> bool:
        """After the forward pass: a lane in an open step block of a trace (``[:]``,
        ``[n:]``, ``all()``) that waits for the first value of an iteration is done with
        that block, since no call comes any more: ``StepsOver`` thrown at its request
        leaves the block's loop, and the code after the block runs.  True if any did."""
        ended = False
        for lane in self.lanes:
            parked = lane.parked
            if (lane.done or parked is None or parked[0] is None or lane.call_index is None
                    or lane.call_requests != 1 or lane.gen.gi_frame is None):
                continue
            key = lane.call_sel.key
            if not (key is None or (isinstance(key, slice) and key.stop is None)):
                continue
            waiters = self.waiting.get((id(parked[0]), parked[1]))
            if waiters:
                waiters[:] = [w for w in waiters if w[0] is not lane]
                if not waiters:
                    del self.waiting[(id(parked[0]), parked[1])]
            lane.parked = None
            lane.later = 0
            lane.open_ended_at = self._call_line(lane)
            _leave_call_block(lane)  # the loop is left from inside its body
            self.advance(lane, None, error=StepsOver())
            ended = True
        return ended

    def _warn_missing(self, sel: StepSelection, site: int) -> None:
        missing = sel.missing()
        if not missing:
            return
        import warnings

        cp = self.sites.get(site)
        line = cp.line if cp is not None else 0
        shown = ", ".join(str(k) for k in missing)
        reason = (
            f"generation ran {self.step + 1} step(s)" if self.ended else
            f"the code reached it at step {self.step}"
        )
        warnings.warn_explicit(
            f"the step block at line {line} selected step(s) {shown}, which never came to it "
            f"({reason}); the code after the block still runs",
            RuntimeWarning, self.filename, line,
        )

    def _ensure_step_hook(self) -> None:
        key = (id(self.root._module), "step")
        if key in self.attached:
            return
        self.repeats = True
        if self.step_waiting is None:
            self.step_waiting = {}

        def step_hook(mod, args, kwargs):
            self.step += 1
            self.fired.clear()
            waiters = self.step_waiting.pop(self.step, None)
            if waiters:
                for lane, req in sorted(waiters, key=lambda w: w[0].index):
                    lane.parked = None
                    sel = req[1]
                    sel.served.append(self.step)
                    sel.current = self.step
                    self.advance(lane, True)
                if self.stop_requested:
                    raise StopTrace()

        # Placed straight in the hook dicts and recorded first, so that cleanup finds
        # it even if an interrupt arrives right after.
        module = self.root._module
        hid = RemovableHandle.next_id
        RemovableHandle.next_id = hid + 1
        self.attached[key] = (_PRE_HOOK, module, hid)
        module._forward_pre_hooks[hid] = step_hook
        module._forward_pre_hooks_with_kwargs[hid] = True

    def _narrow(self, value, rows, phase: str):
        """An invoke's rows of ``value``; module values are remembered when the trace
        has backward blocks (their gradients are asked for by the rows' tensor)."""
        out = value if rows is None else narrow(value, rows, self.batch)
        if self.track and phase != GRAD and isinstance(out, torch.Tensor):
            if self.served is None:
                self.served = {}
            self.served[id(out)] = (out, value, rows)
        return out

    # -- gradients -----------------------------------------------------------------------
    def _grad(self, lane: Lane, req: tuple):
        tensor = req[0]
        session = lane.backward
        if session is None or not isinstance(tensor, torch.Tensor):
            # `.grad` outside a backward block: the plain attribute.
            if len(req) == 4:
                tensor.grad = req[3]
                return None
            return tensor.grad
        _, base, rows = (self.served or {}).get(id(tensor), (tensor, tensor, None))
        if not isinstance(base, torch.Tensor):
            base, rows = tensor, None
        cur = self.current
        if cur is not None and cur.phase == GRAD and cur.module is base:
            if len(req) == 4:
                cur.set(GRAD, req[3] if rows is None else widen(cur.value, req[3], rows, self.batch))
                return None
            return cur.value if rows is None else narrow(cur.value, rows, self.batch)
        key = id(base)
        if session.state == "done" or key in session.fired:
            cp = self.sites.get(req[2])
            line = cp.line if cp is not None else None
            lane.parked = None
            before = self.sites.get(lane.grad_site) if lane.grad_site is not None else None
            waited = f" (while it waited at line {before.line})" if before is not None else ""
            return OutOfOrderError(
                f"the gradient asked for at line {line} was already computed before the code "
                f"got there{waited}: gradients arrive in reverse order of the forward pass (the "
                "last module's first), so ask for them in that order",
                getattr(cp, "path", ""),
                line,
            )
        if not base.requires_grad:
            return RuntimeError(
                f"line {self.sites[req[2]].line}: this value does not require grad, so no "
                "gradient reaches it; set `x.requires_grad = True` in the forward, before "
                "the value is used"
            )
        waiters = session.waiting.get(key)
        if waiters is None:
            session.waiting[key] = [(lane, req, rows)]
            session.hooks.append(base.register_hook(self._grad_hook(session, base, key)))
        else:
            _add_waiter(waiters, (lane, req, rows))
        lane.parked = (base, GRAD, req)
        lane.grad_site = req[2]
        if session.state == "new":
            self._run_backward(session)
        return _PARKED

    def _grad_hook(self, session: BackwardSession, base, key: int):
        def hook(grad):
            session.fired.add(key)
            waiters = session.waiting.pop(key, None)
            if not waiters:
                return None
            ev = self._serve(Event(base, GRAD, grad), waiters)
            return ev.value if ev.changed else None

        return hook

    def _run_backward(self, session: BackwardSession) -> None:
        session.state = "running"
        # Record which served values' gradients have been computed, to tell a
        # request that comes too late from one that no gradient reaches.
        for out, base, _rows in list((self.served or {}).values()):
            t = base if isinstance(base, torch.Tensor) else out
            if t.requires_grad and id(t) not in session.waiting:
                session.hooks.append(t.register_hook(_record_fired(session, id(t))))
        try:
            session.run(self.root._module.parameters())  # the model's own .grad stay as they were
        finally:
            session.state = "done"
            session.remove_hooks()
        left = [w for ws in session.waiting.values() for w in ws]
        session.waiting.clear()
        for lane, req, _rows in sorted(left, key=lambda w: w[0].index):
            cp = self.sites.get(req[2])
            line = cp.line if cp is not None else None
            lane.parked = None
            err = MissedCheckpointError(
                f"no gradient reached the value asked for at line {line}: {session.missed(req[0])}",
                getattr(cp, "path", ""),
                line,
            )
            try:
                self.advance(lane, None, error=err)
            finally:
                err = None  # no frame of a raised error may keep it (a reference cycle)
        for lane in sorted(session.end_waiting, key=lambda ln: ln.index):
            lane.parked = None
            lane.backward = None
            self.advance(lane, None)
        session.end_waiting.clear()

    def _attach_waited(self, module, phase: str, key) -> None:
        """Attach a module asked for while running (a dynamic path)."""
        self.attached[key] = self._attach(module, phase, key)
        if not self.static:
            self._attach_ancestors(module, phase)

    def attach_static(self, facts, lanes=(), rows=None, grad: bool = True, batch=None,
                      firsts=None) -> None:
        """Before the run: attach the modules the plan names.  When that is every
        module the lanes can ask for, nothing needs attaching while running (so
        no ancestors either: see ``_attach_ancestors``).  Then run each of ``lanes``
        (``(fn, spec, index)``, in source order; one call for both: a tracer's, an
        edit's) to its first request: ``rows`` per lane (None: every lane sees all
        rows), ``grad`` the grad mode now, ``batch`` the batch's rows when the caller
        knows them (else they are worked out from ``rows``).

        ``firsts`` (a Tracer's, see ``api._firsts``): per lane index, the one module value
        a lane asks for when that is all it does.  Such a lane whose spec names the
        variable it sets (``(x, name)`` from ``__iv.invoke``) is not run: nothing of the
        user's runs before or after its request, so it is parked here with the request it
        would make (same envoy, same tuple, same list, same order) and ``_serve`` puts
        the value in that variable's cell, as the lane's ``name = ...`` would (consecutive
        such lanes of one value share one ``Lane`` and one waiting entry).  Anything
        else (an unknown grad mode, ``tracer.stop()``, a path that does not resolve, a
        module not attached) starts its generator as usual, which then does what it
        always did."""
        attached = self.attached
        for module, phase in facts.attach:
            key = (id(module), phase)
            attached[key] = self._attach(module, phase, key)
        self.static = facts.static
        if not facts.static:
            # A dynamic path may name an ancestor of these (`layer.output` after
            # `model.layers[0].mlp.output`): take theirs too, before the run.
            for module, phase in facts.attach:
                self._attach_ancestors(module, phase)
            if self.counting:
                self._attach_all()
        if not lanes:
            return
        if batch is not None:
            self.batch = batch
        elif rows is not None:
            batch = self.batch
            for r in rows:  # invokes' rows tile the batch from row 0
                if r is not None and (batch is None or r.stop > batch):
                    batch = r.stop
            self.batch = batch
        mine, advance, waiting, fired = self.lanes, self.advance, self.waiting, self.fired
        now = grad  # the grad mode, as long as it is known (`advance` restores it)
        # The module value the lane before asked for, and the lanes waiting for it.
        last = last_what = waiters = None
        # The same for lazily started lanes: the path and value the lane before asked for.
        l_parts = l_what = lazy_waiters = group = None
        top = -1  # the highest lane index seen so far (lanes come in source order)
        if firsts is not None:
            self.lazy_grad = grad  # lazily started lanes begin in it (all in this one)
        try:
            for (fn, spec, index), r in zip(lanes, _NO_ROWS if rows is None else rows):
                if firsts is not None and spec.__class__ is tuple and now is not None:
                    # `(x, name)` of `__iv.invoke` (runtime/api.py): the variable it sets
                    first = firsts[index] if spec[1] is not None else None
                    if first is not None and not self.stop_requested:
                        parts, what, at = first
                        if parts is not l_parts or what is not l_what or fired:
                            l_parts = lazy_waiters = group = None
                            try:  # `model.layers[5]` as the lane would write it
                                l_env = self.root._resolve(parts)
                            except Exception:  # noqa: BLE001 - the lane raises it at its line
                                l_env = None
                            if l_env.__class__ is Envoy:
                                l_key = (id(l_env._module), _PHASE[what])
                                if l_key in attached:
                                    lazy_waiters = waiting.setdefault(l_key, [])
                                    l_parts, l_what = parts, what
                                    # The request of every such lane of this value, less
                                    # its site: `_wake` gets a lane's own from its code.
                                    l_req = (l_env, what, None)
                        if lazy_waiters is not None and r is not None:
                            if at is None:  # the same for every run of this lane's code
                                at = first[2] = fn.__code__.co_freevars.index(spec[1])
                            member = (fn.__closure__[at], r, fn, index)
                            if group is not None and index > top:
                                # The next lane of a run of them: the same waiting entry
                                # (no other lane comes between them, in any list: the
                                # compiler starts no lane of a loop lazily).
                                group.lazy.append(member)
                                mine.append(group)  # once per lane (cache.py counts them)
                                top = index
                                continue
                            # A run of lazily started lanes of this value: one `Lane` and
                            # one waiting entry for all (`_serve`: a slice and a cell
                            # each); `lazy` lists them, `parked` is the shared request.
                            group = _new(Lane)
                            group.index, group.rows, group.parked = index, None, l_req
                            group.lazy = [member]
                            mine.append(group)
                            if index > top:  # every lane parked so far comes before it
                                lazy_waiters.append((group, l_req, None))
                                top = index
                            else:
                                _add_waiter(lazy_waiters, (group, l_req, None))
                            continue
                group = None
                if index > top:  # noqa: PLR1730 - (no call to max on this path)
                    top = index
                # A lane without checkpoints runs whole in fn() (skip.py asks for its rows;
                # a lane that is a generator is found running first).
                self.starting_rows = r
                gen = fn()
                lane = _new(Lane)  # `Lane(gen, index, r, grad)`, without a Python call
                lane.gen, lane.index, lane.rows, lane.grad = gen, index, r, grad
                lane.call_index, lane.later = None, 0  # read on every request (see __init__)
                mine.append(lane)
                if gen.__class__ is not GeneratorType:
                    lane.done = True  # it has already run
                    now = None  # in whatever grad mode it left
                    continue
                if now is None:
                    advance(lane, None, None, None, None)
                    continue
                # `advance(lane, None)`, inline for the common case: the first request
                # names a module attached above, made in the grad mode the lane began in,
                # before anything called tracer.stop().  Nothing runs before the forward
                # pass, so it simply waits (anything else goes to `advance` as `first`).
                try:
                    req = gen.send(None)
                except BaseException as exc:  # it ended (rare before a first request) or raised
                    if _lane_raised(lane, exc, now):
                        continue
                    raise
                envoy, what = req[0], req[1]
                if _grad_enabled() is not now:  # the lane's grad mode now (advance sets it again)
                    lane.grad = not now
                    _set_grad_enabled(now)
                elif not self.stop_requested:
                    # As the lane before (unless the model ran meanwhile: a plain call of
                    # it in a lane serves and drops the lists of waiting lanes)?
                    if envoy is not last or what is not last_what or fired:
                        waiters = None
                        if envoy.__class__ is Envoy:
                            module = envoy._module
                            phase = _PHASE[what]
                            key = (id(module), phase)
                            if key in attached:
                                waiters = waiting.setdefault(key, [])
                                last, last_what = envoy, what
                    if waiters is not None:
                        lane.parked = (module, phase, req)
                        if waiters and waiters[-1][0].index > index:
                            _add_waiter(waiters, (lane, req, r))  # (lanes of a loop)
                        else:
                            waiters.append((lane, req, r))
                        continue
                last = l_parts = None  # `advance` may do anything: nothing known is kept
                advance(lane, None, None, req, now)
        finally:
            self.starting_rows = None

    def _attach_all(self) -> None:
        """A trace whose step blocks may name a module only as they run (a variable path,
        a helper): call i of a module is counted from the start of the pass, so every
        module's calls are counted (each attached, both phases) before the run."""
        attached = self.attached
        for module in self.root._module.modules():
            if module.__class__ in _CONTAINERS:
                continue
            for phase in (OUT, PRE):
                key = (id(module), phase)
                if key not in attached:
                    attached[key] = self._attach(module, phase, key)

    # -- where values are taken ---------------------------------------------------
    def _attach(self, module, phase: str, key):
        """Start taking ``module``'s output (or input); returns what ``cleanup`` undoes.

        An output is taken by wrapping the module's ``forward`` for this trace (an
        instance attribute, deleted again by ``cleanup``): the module's own
        ``__call__`` runs as usual and the lanes see exactly what ``forward``
        returned, before any forward hook (a cache's, the user's) sees it.  That
        costs one Python call per module call, where a registered hook costs
        torch's hook path on every call plus a handle per trace.  An input is a
        forward pre-hook placed straight in the module's hook dicts (what
        ``register_forward_pre_hook`` does, without the handle's weak references).
        """
        waiting, fired, serve = self.waiting, self.fired, self._serve
        if phase == OUT:
            new = _new
            attrs = module.__dict__
            prev = attrs.get("forward", _NONE)
            inner = module.forward

            def forward(*args, **kwargs):
                out = inner(*args, **kwargs)
                fired.add(key)
                waiters = waiting.pop(key, None)
                if waiters is None:
                    return out
                ev = new(Event)  # `Event(module, OUT, out)`, without a Python call
                ev.module, ev.phase, ev.value, ev.changed = module, OUT, out, False
                return serve(ev, waiters).value

        elif isinstance(module, torch.jit.ScriptModule):
            # Scripted modules take no Python pre-hooks: their input is taken in a
            # wrapped forward too (their output, if asked for, wraps this one).
            attrs = module.__dict__
            prev = attrs.get("forward", _NONE)
            inner = module.forward

            def forward(*args, **kwargs):
                fired.add(key)
                waiters = waiting.pop(key, None)
                if waiters is not None:
                    ev = serve(Event(module, PRE, (args, kwargs)), waiters)
                    if ev.changed:
                        args, kwargs = ev.value
                return inner(*args, **kwargs)

        else:
            def hook(mod, args, kwargs):
                fired.add(key)
                waiters = waiting.pop(key, None)
                if waiters is None:
                    return None
                ev = serve(Event(mod, PRE, (args, kwargs)), waiters)
                return ev.value if ev.changed else None

            hid = RemovableHandle.next_id
            RemovableHandle.next_id = hid + 1
            # Recorded before it is placed: cleanup undoes it even if an interrupt
            # arrives in between (undoing what is not there is harmless).
            undo = self.attached[key] = (_PRE_HOOK, module, hid)
            module._forward_pre_hooks[hid] = hook
            module._forward_pre_hooks_with_kwargs[hid] = True
            return undo
        forward.__wrapped__ = inner  # inspect.signature (transformers asks) sees the real one
        undo = self.attached[key] = (_FORWARD, module, prev)
        attrs["forward"] = forward
        return undo

    def _attach_ancestors(self, module, phase: str) -> None:
        """Take the outputs of ``module``'s ancestors too, while they have not started
        (and ``module``'s own when its input was attached: that is taken in a pre-hook,
        after torch has looked up ``forward``).

        A wrapped ``forward`` (or a hook) only works for calls that begin after it is
        in place, and an ancestor's output is often asked for later, while the
        ancestor is running (``model.layers[3].output`` then ``model.output``).  So
        whenever a module is attached, so are its ancestors; the walk stops at one
        attached already (its ancestors were attached with it).  Lists of modules
        are never called and get nothing."""
        parents = self.root._parents()  # built once per model
        attached = self.attached
        node = module if phase == PRE else parents.get(id(module))
        while node is not None:
            key = (id(node), OUT)
            if key in attached:
                return
            attached[key] = (_NOTHING if node.__class__ in _CONTAINERS
                             else self._attach(node, OUT, key))
            node = parents.get(id(node))

    def _serve(self, ev: Event, waiters) -> Event:
        """Hand ``ev``'s value (a module's output or input, or a gradient) to the
        lanes waiting for it, in source order; what they write becomes the value.
        ``waiters``: (lane, request, rows of the batch the lane sees)."""
        prev = self.current
        self.current = ev
        batch = self.batch
        track, out = self.track, ev.phase is OUT
        outer = _grad_enabled()  # each lane is resumed in its own grad mode, then this again
        # Whether the value is a plain tensor with the batch's rows first, worked out
        # once per value (every waiter sees the same one until a lane writes a new one);
        # `rows_first` and `links` (invokes' rows of the value, linked for retain_grad by
        # one hook) are set where a value is first seen.
        seen = _NONE
        grad = None  # the value's requires_grad, while no lane's own code has run since
        lazy_grad = self.lazy_grad  # the grad mode lazily started lanes began in
        try:
            for entry in waiters:
                lane, req, rows = entry
                # A lane started lazily (`attach_static`) reads, at the call a plain
                # request gets: none of the checks of the next few lines concern it.
                lazy = lane.lazy
                if lazy is None:
                    if lane.later:  # `module.next()`: a later call
                        lane.later -= 1
                        key = (id(ev.module), ev.phase)
                        again = self.waiting.get(key)
                        if again is None:
                            self.waiting[key] = [entry]
                        else:
                            _add_waiter(again, entry)
                        continue
                    lane.parked = None
                    self.current_site = req[2]
                    if len(req) == 4:
                        new = req[3] if rows is None else widen(ev.get(req[1]), req[3], rows, batch)
                        ev.set(req[1], new)
                        grad = None  # the lane's code runs: it may change the value in place
                        self.advance(lane, None, None, None, outer)
                        continue
                elif lazy.__class__ is list:  # a run of lazily started lanes (attach_static)
                    value = ev.value if out else ev.get(req[1])
                    if (lazy_grad is outer and not track and value.__class__ is _Tensor
                            and value.dim() and value.shape[0] == batch):
                        # The common case: each its rows, in source order.
                        if value is not seen:
                            seen, links, grad, rows_first = value, None, None, True
                        if grad is None:
                            grad = value.requires_grad
                        lane.done = True
                        for cell, r, _fn, _index in lazy:
                            view = value[r]
                            if grad:
                                links = _link_rows(view, value, r, links)
                            cell.cell_contents = view
                        continue
                    # Anything else: one lane started lazily at a time, in its place.
                    at = waiters.index(entry)
                    waiters[at:at + 1] = [(one, req, one.rows) for one in self._ungroup(lane)]
                    lane, req, rows = entry = waiters[at]
                    lazy = lane.lazy
                value = ev.value if out else ev.get(req[1])
                if track:
                    value = self._narrow(value, rows, ev.phase)
                elif rows is not None:  # an invoke's rows; a plain tensor first
                    if value is not seen:
                        seen, links, grad = value, None, None
                        # Only a tensor with the batch's rows first is sliced.
                        rows_first = (None if value.__class__ is not _Tensor else
                                      bool(value.dim()) and value.shape[0] == batch)
                    if rows_first:
                        view = value[rows]
                        if grad is None:  # read again once a lane's own code has run
                            grad = value.requires_grad
                        if grad:
                            links = _link_rows(view, value, rows, links)
                        value = view
                    elif rows_first is None:
                        value = narrow(value, rows, batch)
                if lazy is not None:
                    if lazy_grad is outer:
                        # `name = value` is all the lane does (no code of the user's runs:
                        # nothing known of the value changes).
                        lane.done = True
                        lazy.cell_contents = value
                        continue
                    # Handed out in another grad mode: run as a generator after all.
                    self.current_site = self._wake(lane)[2]
                    lane.parked = None
                grad = None  # the lane's code runs: it may change the value in place
                if lane.grad is not outer:
                    self.advance(lane, value, None, None, outer)
                    continue
                # `advance(lane, value)`, inline for the common case: a lane in this
                # grad mode that ends (a new request goes to `advance` as `first`).
                try:
                    req = lane.gen.send(value)
                except StopIteration:
                    lane.done = True
                    if _grad_enabled() is not outer:  # it ended in another grad mode
                        _set_grad_enabled(outer)
                    continue
                except BaseException as exc:
                    _lane_raised(lane, exc, outer)
                    raise
                value = None
                now = _grad_enabled()
                if now is not outer:  # the lane's grad mode now (advance sets it again)
                    lane.grad = now
                    _set_grad_enabled(outer)
                self.advance(lane, None, None, req, outer)
        finally:
            self.current = prev
        if self.stop_requested and ev.phase is not GRAD and not self.ended:
            raise StopTrace()  # a lane called tracer.stop(): the rest of the forward does not run
        if self.end_when_served:
            if ev.changed:  # a lane replaced the value: the rest runs on it (its errors too)
                self.end_when_served = False
            elif (not self.waiting and not self.step_waiting and not self.end_waiting
                  and not (self.barriers and any(b.waiting for b in self.barriers))
                  and not self.ended):  # (a released barrier keeps no lane)
                raise StopTrace()  # the server's trace: nothing after this is seen by a lane
        return ev

    # -- order -------------------------------------------------------------------
    def _passed(self, module, phase: str) -> bool:
        cur = self.current
        if (id(module), phase) in self.fired:
            return True
        return order.precedes(self.root, module, phase, cur.module, cur.phase) is True

    def _stopped_error(self, envoy: Envoy, what: str, site: int) -> MissedCheckpointError:
        cp = self.sites.get(site)
        line = cp.line if cp is not None else None
        path = rooted(envoy._path, getattr(self.block, "model", None))  # as the block spells it
        return MissedCheckpointError(
            f"`{path}.{what}` is asked for at line {line}, after tracer.stop(): the "
            "rest of the forward pass does not run, so no module value comes after it",
            path,
            line,
        )

    def _order_error(self, envoy: Envoy, what: str, site: int, lane: Lane) -> OutOfOrderError:
        cp = self.sites.get(site)
        line = cp.line if cp is not None else None
        cur = self.current
        root = getattr(self.block, "model", None)  # paths as the block spells them
        now = rooted(self.root._path_of(cur.module), root)
        now += ".output" if cur.phase == OUT else ".input"
        path = rooted(envoy._path, root)
        return OutOfOrderError(
            f"`{path}.{what}` is asked for at line {line}, but the model has already "
            f"run past it (it is now at `{now}`): in one forward pass, ask for module values "
            "in the order the model computes them",
            path,
            line,
        )

    # -- the end ---------------------------------------------------------------------
    def finish(self) -> None:
        """After the run: step loops end, code after step blocks runs, the
        generator's output is handed out; every lane still parked then gets
        an error at its line, never a hang."""
        self.ended = True
        if not (self.waiting or self.step_waiting or self.end_waiting or self.barriers):
            return  # the common case: every lane was served
        gen = self.root._generator
        progress = True
        while progress:
            progress = False
            waiting = sorted(
                (w for ws in (self.step_waiting or {}).values() for w in ws),
                key=lambda w: w[0].index,
            )
            if self.step_waiting:
                self.step_waiting.clear()
            for lane, req in waiting:
                lane.parked = None
                self._warn_missing(req[1], req[2])
                self.advance(lane, False)
                progress = True
            ended, self.end_waiting = self.end_waiting or [], None
            for lane in sorted(ended, key=lambda ln: ln.index):
                lane.parked = None
                self.advance(lane, None)
                progress = True
            if self.counting and self._end_open_calls():
                progress = True
            if gen is not None and self.result is not None:
                key = (id(gen._module), OUT)
                waiters = self.waiting.pop(key, None)
                if waiters:
                    self._serve(Event(gen._module, OUT, self.result), waiters)
                    progress = True
        for lane in list(self.lanes):  # each lane of a run started lazily, alone
            if not lane.done and lane.lazy.__class__ is list:
                self._ungroup(lane)
        for lane in self.lanes:
            if lane.done or lane.parked is None:
                continue
            if lane.lazy is not None:  # its error is thrown in at the user's line
                self._wake(lane)
            if lane.gen.gi_frame is None:
                continue
            module, phase, req = lane.parked
            if module is None:
                b = req[1]
                lane.parked = None
                err = RuntimeError(
                    f"barrier at line {b.line if isinstance(b, Barrier) else '?'} waits for "
                    f"{getattr(b, 'n', '?')} invokes but only {getattr(b, 'arrived', '?')} "
                    "reached it: every invoke that calls it must reach it in the same forward pass"
                )
                try:
                    self._throw(lane, err)
                finally:
                    err = None  # no frame of a raised error may keep it (a reference cycle)
                continue
            self.waiting.pop((id(module), phase), None)
            lane.parked = None
            envoy, what, site = req[0], req[1], req[2]
            cp = self.sites.get(site)
            line = cp.line if cp is not None else None
            path = rooted(envoy._path, getattr(self.block, "model", None))  # as the block spells it
            ran = self.root._ran(module) or (id(module), phase) in self.fired
            later = envoy.__dict__.get("_calls_later", 0) if envoy.__class__ is not Envoy else 0
            lane.later = 0
            if lane.call_index is not None and not self.stopped:
                err = self._call_missed(lane, envoy, what, line, path, later)
            elif later and not self.stopped:
                err = MissedCheckpointError(
                    f"`{path}.next({later}).{what}` is asked for at line {line}, but "
                    f"`{path}` was not called {later} more time(s) in this forward pass "
                    "after the call a plain request would get",
                    path,
                    line,
                )
            elif self.stopped:
                err = MissedCheckpointError(
                    f"`{path}.{what}` is asked for at line {line}, but tracer.stop() "
                    "ended the forward pass before it ran",
                    path,
                    line,
                )
            elif ran:
                open_block = "" if lane.open_ended_at is None else (
                    f" (the open step block at line {lane.open_ended_at} took every call of "
                    "the forward pass, so the code after it runs once the pass is over: give "
                    "the selection an end, `tracer.iter[0:4]`, to read later modules after it)")
                err: Exception = OutOfOrderError(
                    f"`{path}.{what}` is asked for at line {line}, after the model had "
                    "already run that module in this forward pass: ask for module values in "
                    f"the order the model computes them{open_block}",
                    path,
                    line,
                )
            else:
                err = MissedCheckpointError(
                    f"`{path}.{what}` is asked for at line {line}, but `{path}` "
                    "did not run in this forward pass (is it used by the model's forward?)",
                    path,
                    line,
                )
            try:
                self._throw(lane, err)
            finally:
                err = None  # no frame of a raised error may keep it (a reference cycle)

    def _ungroup(self, group: Lane) -> list[Lane]:
        """A run of lazily started lanes (``attach_static``) as one ``Lane`` each, in its
        place in ``lanes``: for anything but its common case (another grad mode, backward
        blocks, a value that is not a plain tensor, an error to tell each at its line)."""
        req = group.parked
        out = []
        for cell, r, fn, index in group.lazy:
            lane = _new(Lane)
            lane.index, lane.rows, lane.lazy, lane.wake, lane.parked = index, r, cell, fn, req
            out.append(lane)
        group.done = True  # (it is no longer one of the lanes)
        at = self.lanes.index(group)
        self.lanes[at:at + len(out)] = out
        return out

    def _wake(self, lane: Lane) -> tuple:
        """A lane started lazily (``attach_static``) that must run as a generator after
        all (an error to throw in at its line, another grad mode): its generator is made
        and run to its request, the one it is parked for (nothing of the user's runs
        before it), where it now waits as if started before the pass.  Returns that
        request (its site: the shared one the lane was parked with has none)."""
        lane.lazy = None
        lane.grad, lane.later = self.lazy_grad, 0
        gen = lane.gen = lane.wake()
        req = gen.send(None)  # its own request (with its site): the one it is parked for
        lane.parked = (req[0]._module, _PHASE[req[1]], req)
        return req

    def _throw(self, lane: Lane, err: BaseException) -> None:
        """Throw ``err`` into ``lane`` at its line; if the lane catches it and goes on
        waiting, close it and raise ``err`` here."""
        try:
            self.advance(lane, None, error=err)
            if not lane.done:
                lane.gen.close()
                raise err
        finally:
            err = None

    def cleanup(self) -> None:
        """Remove everything the trace put on the model and close the lanes.  Each
        thing is undone, then forgotten, so that a cleanup cut short (an interrupt,
        an error in a lane's ``finally``) can simply be run again."""
        sessions = self.sessions
        while sessions:
            sessions[-1].remove_hooks()
            sessions.pop()
        if self.served:
            self.served.clear()
        attached = self.attached
        while attached:  # the last attached first: wrappers of one module unwind in order
            key = next(reversed(attached))
            _undo(attached[key])
            del attached[key]
        self.waiting.clear()
        self.current = None
        lanes = self.lanes
        for lane in lanes:
            if not lane.done:
                break
        else:
            lanes.clear()  # every lane ran to its end: nothing to close
        while lanes:
            lane = lanes[0]
            if not lane.done and hasattr(lane.gen, "close"):
                lane.gen.close()
            lanes.pop(0)
        active = self.active
        if active is not None and active.get("inter") is self:
            active["inter"] = self.prev_active


# -- batches: an invoke's rows ------------------------------------------------------


def narrow(value, rows: slice, batch: int | None = None):
    """The rows of ``value`` (tensors, nested in tuples/lists/dicts) an invoke sees.
    Slices are views, so in-place edits reach the batch.  Only tensors whose first
    dimension is ``batch`` (the batch's rows; None: every tensor) are sliced: one
    without the batch dimension first (a ``[1, seq, ...]`` broadcast of position
    embeddings, a ``[seq]`` cache position) is not the invoke's rows, and is seen whole."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or (batch is not None and value.shape[0] != batch):
            return value
        view = value[rows]
        if value.requires_grad:
            _link_rows(view, value, rows)
        return view
    if isinstance(value, tuple):
        items = [narrow(v, rows, batch) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [narrow(v, rows, batch) for v in value]
    if type(value) is dict:
        return {k: narrow(v, rows, batch) for k, v in value.items()}
    if isinstance(value, dict):
        return _narrow_mapping(value, rows, batch)
    return value


def _narrow_mapping(value, rows, batch):
    # Keep the mapping's type where it can be rebuilt from keywords (transformers'
    # ModelOutput dataclasses), so `.last_hidden_state` still works on an invoke's rows.
    items = {k: narrow(v, rows, batch) for k, v in value.items()}
    try:
        return type(value)(**items)
    except TypeError:
        return items


def _add_waiter(waiters: list, entry: tuple) -> None:
    """Add ``(lane, ...)`` to lanes waiting for one value, kept in source order (the
    order they are served in).  Lanes usually arrive in that order already."""
    index = entry[0].index
    if waiters[-1][0].index < index:
        waiters.append(entry)
        return
    at = len(waiters)
    while at > 0 and waiters[at - 1][0].index > index:
        at -= 1
    waiters.insert(at, entry)


def _undo(undo) -> None:
    """Undo one ``Interleaver._attach`` (or remove a torch hook handle)."""
    if undo.__class__ is not tuple:
        undo.remove()
        return
    how, module, what = undo
    if how is None:
        return
    if how == _FORWARD:
        if what is _NONE:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = what
    else:
        module._forward_pre_hooks.pop(what, None)
        module._forward_pre_hooks_with_kwargs.pop(what, None)


def _record_fired(session: BackwardSession, key: int):
    def hook(grad):
        session.fired.add(key)

    return hook


def _link_rows(view, base, rows: slice, links: list | None = None) -> list:
    """Make ``view.retain_grad()`` work on an invoke's rows as on a whole value.

    The model goes on with ``base``, not with the view, so no gradient flows through
    the view's own node: a hook on ``base`` hands the view its rows of ``base``'s
    gradient when the view retains grad (it holds the view weakly).  Gradients add
    up over backward passes as torch's own ``retain_grad`` does; one that torch put
    there itself (the view also used directly) is part of ``base``'s and replaced.

    ``links``: the list read by a hook already on ``base`` (the other invokes' rows of
    the same value: one hook for all of them, registering one costs microseconds);
    None registers one.  Returns the list this view joined."""
    if links is None:
        links = []
        base.register_hook(_rows_hook(links))
    links.append((weakref.ref(view), rows, [None]))
    return links


def _rows_hook(links: list):
    def hook(grad):
        for ref, rows, last in links:
            v = ref()
            if v is None or not v.retains_grad:
                continue
            part = grad[rows].clone()
            now, mine = v.grad, last[0]
            if now is not None and mine is not None:
                part = (now if now is mine else mine) + part
            v.grad = last[0] = part

    return hook


def rows_require_grad(view) -> bool:
    """``x.requires_grad = True`` on an invoke's rows of the value being handed out,
    when that value does not require grad (frozen parameters): the model goes on with
    the batch, not with the view, so the batch value is replaced by a copy that takes
    these rows from ``view`` (now a leaf that requires grad): gradients then reach
    ``view.grad`` as they reach a whole value without invokes.  False if ``view`` is
    not such rows (the caller then sets the flag as usual)."""
    inter = getattr(_ACTIVE, "inter", None)
    cur = inter.current if inter is not None else None
    base = view._base
    if cur is None or cur.phase == GRAD or base is None or base.requires_grad or base.dim() == 0:
        return False
    what = "output" if cur.phase == OUT else "input"
    if cur.get(what) is not base or base.stride(0) == 0:
        return False
    start = (view.storage_offset() - base.storage_offset()) // base.stride(0)
    rows = slice(start, start + view.shape[0]) if view.dim() else None
    if rows is None or not _rows_view(base, view, rows):
        return False
    view.requires_grad_(True)
    out = base.clone()
    out[rows] = view
    cur.set(what, out)
    if inter.served is not None:  # a backward block asks for the view's own gradient
        inter.served[id(view)] = (view, view, None)
    return True


def _rows_view(current, new, rows: slice) -> bool:
    """Is ``new`` the very view of ``current`` an invoke was given (edited in place)?
    Then the edit has reached the batch already and there is nothing to write."""
    base = current._base if current._base is not None else current
    if new._base is not base or new.dtype != current.dtype:
        return False
    start = rows.start or 0
    return (
        new.storage_offset() == current.storage_offset() + start * current.stride(0)
        and new.shape[1:] == current.shape[1:]
        and new.shape[0] == len(range(*rows.indices(current.shape[0])))
        and new.stride() == current.stride()
        and new.requires_grad == current.requires_grad
    )


def _lane_raised(lane: Lane, exc: BaseException, outer: bool) -> bool:
    """What ``advance`` does when a lane it resumed raises, for the inline resumes
    (``_serve``, ``attach_static``): the grad mode goes back to ``outer``; True if the
    lane has ended (``exc`` is its StopIteration); the experiment's own StopIteration
    is carried out as a UserStopIteration (raised here); the caller re-raises the rest."""
    lane.grad = now = _grad_enabled()
    if now is not outer:
        _set_grad_enabled(outer)
    if exc.__class__ is StopIteration:
        lane.done = True
        return True
    if isinstance(exc, RuntimeError):
        _carry_user_stop(lane, exc)
    return False


def _carry_user_stop(lane: Lane, exc: RuntimeError) -> None:
    """``exc`` raised by resuming ``lane``: if it is the RuntimeError the lane's generator
    made of the experiment's own StopIteration, the lane is done and the StopIteration
    is carried out as a UserStopIteration (raised here); else nothing happens (the
    caller re-raises ``exc``)."""
    cause = exc.__cause__
    if cause.__class__ is StopIteration and _from_lane(exc, lane.gen):
        lane.done = True
        carrier, cause = UserStopIteration(cause), None
        try:
            raise carrier from None
        finally:
            carrier = None


def _from_lane(exc: BaseException, gen) -> bool:
    """Is ``exc`` the RuntimeError the lane generator ``gen`` made of a StopIteration
    raised in it (not one made by some other generator the lane called)?  That one
    is raised by ``send`` itself: its traceback holds the caller's frame only."""
    tb = exc.__traceback__
    return (tb is not None and tb.tb_next is None and gen.gi_frame is None
            and str(exc) == "generator raised StopIteration")


def widen(current, new, rows: slice, batch: int | None = None):
    """Write ``new`` (one invoke's rows) into a copy of the batch value.  A tensor
    ``narrow`` handed out whole (its first dimension is not ``batch``) is replaced
    whole: what an invoke writes there, every invoke sees."""
    if isinstance(current, torch.Tensor) and isinstance(new, torch.Tensor):
        if batch is not None and (current.dim() == 0 or current.shape[0] != batch):
            return new
        if current.dim() and _rows_view(current, new, rows):
            return current
        out = current.clone()
        out[rows] = new
        return out
    if isinstance(current, (tuple, list)) and isinstance(new, (tuple, list)):
        items = [widen(c, n, rows, batch) for c, n in zip(current, new)]
        return type(current)(*items) if hasattr(current, "_fields") else type(current)(items)
    if isinstance(current, dict) and isinstance(new, dict):
        return {k: widen(current[k], new[k], rows, batch) if k in current else new[k] for k in new}
    return new
