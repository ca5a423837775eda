"""Driving compiled lanes from hooks: the heart of the runtime.

Each lane is a generator that yields checkpoint requests (``read`` / ``write``
of a module's output or input).  The interleaver starts every lane before the
forward pass and parks it on the module it asks for, registering a hook on
that module only.  When the hook fires, the parked lanes resume in source
order with the live value, run on to their next request, and whatever they
wrote becomes what the hook returns.  A request for a value the model has
already produced is an ``OutOfOrderError`` thrown into the lane at the
user's line; a lane still parked when the forward ends gets an error too,
never a hang.  Grad mode is kept per lane, so a ``torch.no_grad()`` block in
the experiment does not leak into the model's own computation.
"""

from __future__ import annotations

from typing import Any

import torch

from . import order
from .envoy import Envoy
from .errors import MissedCheckpointError, OutOfOrderError

PRE, OUT = "pre", "out"
_PHASE = {"output": OUT, "input": PRE, "inputs": PRE}


def read(envoy, value: str, site: int) -> tuple:
    return (envoy, value, site)


def write(envoy, value: str, site: int, new) -> tuple:
    return (envoy, value, site, new)


class Lane:
    __slots__ = ("gen", "index", "rows", "grad", "line", "done", "parked")

    def __init__(self, gen, index: int, rows, grad: bool) -> None:
        self.gen = gen
        self.index = index
        self.rows = rows  # rows of the batch this lane sees; None: all
        self.grad = grad
        self.line = None  # the line of the last request served
        self.done = False
        self.parked = None  # (module, phase, request) while waiting


class Event:
    """The module value a hook is handing out right now."""

    __slots__ = ("module", "phase", "value", "changed")

    def __init__(self, module, phase: str, value) -> None:
        self.module = module
        self.phase = phase
        self.value = value  # output, or (args, kwargs) for PRE
        self.changed = False

    def get(self, what: str):
        if self.phase == OUT:
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
        if self.phase == OUT:
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
    def __init__(self, root, block, sites) -> None:
        self.root = root
        self.block = block
        self.sites = sites  # site number -> Checkpoint of the plan
        self.waiting: dict[tuple[int, str], list[tuple[Lane, tuple]]] = {}
        self.hooks: dict[tuple[int, str], Any] = {}
        self.fired: set[tuple[int, str]] = set()
        self.current: Event | None = None
        self.lanes: list[Lane] = []

    # -- lanes -----------------------------------------------------------------
    def start(self, fn, index: int, rows=None) -> None:
        gen = fn()
        lane = Lane(gen, index, rows, torch.is_grad_enabled())
        self.lanes.append(lane)
        if not hasattr(gen, "send"):  # a lane without checkpoints has already run
            lane.done = True
            return
        self.advance(lane, None)

    def advance(self, lane: Lane, value, error: BaseException | None = None) -> None:
        """Run ``lane`` until it parks or ends, sending it ``value`` first."""
        outer = torch.is_grad_enabled()
        if lane.grad != outer:
            torch.set_grad_enabled(lane.grad)
        gen = lane.gen
        try:
            while True:
                try:
                    req = gen.throw(error) if error is not None else gen.send(value)
                except StopIteration:
                    lane.done = True
                    return
                error = None
                envoy, what = req[0], req[1]
                if not isinstance(envoy, Envoy):
                    # Not a module: `.output` of an ordinary object.
                    if len(req) == 4:
                        setattr(envoy, what, req[3])
                        value = None
                    else:
                        value = getattr(envoy, what)
                    continue
                module = envoy._module
                phase = _PHASE[what]
                cur = self.current
                lane.line = req[2]
                if cur is not None and cur.module is module and cur.phase == phase:
                    if len(req) == 4:
                        cur.set(what, self._widen(lane, cur.get(what), req[3]))
                        value = None
                    else:
                        value = self._narrow(lane, cur.get(what))
                    continue
                if cur is not None:
                    passed = self._passed(module, phase)
                    if passed:
                        error = self._order_error(envoy, what, req[2], lane)
                        value = None
                        continue
                self._park(lane, module, phase, req)
                return
        finally:
            lane.grad = torch.is_grad_enabled()
            if lane.grad != outer:
                torch.set_grad_enabled(outer)

    def _narrow(self, lane: Lane, value):
        return value if lane.rows is None else narrow(value, lane.rows)

    def _widen(self, lane: Lane, current, new):
        return new if lane.rows is None else widen(current, new, lane.rows)

    def _park(self, lane: Lane, module, phase: str, req: tuple) -> None:
        key = (id(module), phase)
        lane.parked = (module, phase, req)
        waiters = self.waiting.get(key)
        if waiters is None:
            self.waiting[key] = [(lane, req)]
        else:
            waiters.append((lane, req))
        if key not in self.hooks:
            self.hooks[key] = self._hook(module, phase, key)

    # -- hooks -------------------------------------------------------------------
    def _hook(self, module, phase: str, key):
        if phase == OUT:
            def out_hook(mod, args, output):
                self.fired.add(key)
                waiters = self.waiting.pop(key, None)
                if waiters is None:
                    return None
                ev = self._serve(Event(mod, OUT, output), waiters)
                return ev.value if ev.changed else None

            return module.register_forward_hook(out_hook)

        def pre_hook(mod, args, kwargs):
            self.fired.add(key)
            waiters = self.waiting.pop(key, None)
            if waiters is None:
                return None
            ev = self._serve(Event(mod, PRE, (args, kwargs)), waiters)
            return ev.value if ev.changed else None

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def _serve(self, ev: Event, waiters) -> Event:
        prev = self.current
        self.current = ev
        try:
            if len(waiters) > 1:
                waiters.sort(key=lambda w: w[0].index)
            for lane, req in waiters:
                lane.parked = None
                if len(req) == 4:
                    ev.set(req[1], self._widen(lane, ev.get(req[1]), req[3]))
                    self.advance(lane, None)
                else:
                    self.advance(lane, self._narrow(lane, ev.get(req[1])))
        finally:
            self.current = prev
        return ev

    # -- order -------------------------------------------------------------------
    def _passed(self, module, phase: str) -> bool:
        cur = self.current
        if (id(module), phase) in self.fired:
            return True
        return order.precedes(self.root, module, phase, cur.module, cur.phase) is True

    def _order_error(self, envoy: Envoy, what: str, site: int, lane: Lane) -> OutOfOrderError:
        cp = self.sites.get(site)
        line = cp.line if cp is not None else None
        cur = self.current
        now = self.root._path_of(cur.module) + (".output" if cur.phase == OUT else ".input")
        return OutOfOrderError(
            f"`{envoy._path}.{what}` is asked for at line {line}, but the model has already "
            f"run past it (it is now at `{now}`): in one forward pass, ask for module values "
            "in the order the model computes them",
            envoy._path,
            line,
        )

    # -- the end ---------------------------------------------------------------------
    def finish(self) -> None:
        """After the forward: every lane still parked gets an error at its line."""
        for lane in self.lanes:
            if lane.done or lane.parked is None:
                continue
            module, phase, req = lane.parked
            self.waiting.pop((id(module), phase), None)
            lane.parked = None
            envoy, what, site = req[0], req[1], req[2]
            cp = self.sites.get(site)
            line = cp.line if cp is not None else None
            ran = self.root._ran(module) or (id(module), phase) in self.fired
            if ran:
                err: Exception = OutOfOrderError(
                    f"`{envoy._path}.{what}` is asked for at line {line}, after the model had "
                    "already run that module in this forward pass: ask for module values in "
                    "the order the model computes them",
                    envoy._path,
                    line,
                )
            else:
                err = MissedCheckpointError(
                    f"`{envoy._path}.{what}` is asked for at line {line}, but `{envoy._path}` "
                    "did not run in this forward pass (is it used by the model's forward?)",
                    envoy._path,
                    line,
                )
            self.advance(lane, None, error=err)
            if not lane.done:
                lane.gen.close()
                raise err

    def cleanup(self) -> None:
        for handle in self.hooks.values():
            handle.remove()
        self.hooks.clear()
        self.waiting.clear()
        self.current = None
        for lane in self.lanes:
            if not lane.done and hasattr(lane.gen, "close"):
                lane.gen.close()
        self.lanes.clear()


# -- batches: an invoke's rows ------------------------------------------------------


def narrow(value, rows: slice):
    """The rows of ``value`` (tensors, nested in tuples/lists/dicts) an invoke sees.
    Slices are views, so in-place edits reach the batch."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 else value
    if isinstance(value, tuple):
        items = [narrow(v, rows) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [narrow(v, rows) for v in value]
    if isinstance(value, dict):
        return type(value)({k: narrow(v, rows) for k, v in value.items()}) if type(value) is dict else _narrow_mapping(value, rows)
    return value


def _narrow_mapping(value, rows):
    out = value.__class__.__new__(value.__class__)
    try:
        out.update({k: narrow(v, rows) for k, v in value.items()})
        return out
    except Exception:
        return {k: narrow(v, rows) for k, v in value.items()}


def widen(current, new, rows: slice):
    """Write ``new`` (one invoke's rows) into a copy of the batch value."""
    if isinstance(current, torch.Tensor) and isinstance(new, torch.Tensor):
        out = current.clone()
        out[rows] = new
        return out
    if isinstance(current, (tuple, list)) and isinstance(new, (tuple, list)):
        items = [widen(c, n, rows) for c, n in zip(current, new)]
        return type(current)(*items) if hasattr(current, "_fields") else type(current)(items)
    if isinstance(current, dict) and isinstance(new, dict):
        return {k: widen(current[k], new[k], rows) if k in current else new[k] for k in new}
    return new
