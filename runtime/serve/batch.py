"""Several users' jobs in one forward pass (in the worker process).

``run_batch(model, guard, jobs, send, ...)`` runs a list of jobs for one model and
reports each job's result on its own; it is the whole interface an engine needs (the
local worker process calls it; another engine can too).

How a batch runs.  Each job's block is a compiled function; it runs in a thread of
its own up to the end of its ``with`` block, where its tracer (``JobTracer``) hands
itself to the batch instead of running the model.  Once every job has arrived (or
ended early, e.g. a bad input), the jobs that can share a pass are grouped and each
group runs as ONE forward pass (``MergedTracer``): every lane of every job becomes an
invoke of that pass, so the invoke machinery gives each lane its own rows (reads
narrowed, writes widened into those rows only).  Then each job's thread goes on, with
its saved variables set, and its reply is encoded.

What shares a pass (exact by construction, else the job runs alone):

- ``trace`` and ``generate`` blocks (``scan`` and backward blocks run alone), without
  ``.inputs`` (its keywords need not have the batch dimension first), without
  ``tracer.stop()`` (a stop ends the forward pass: a job that has one runs alone, so
  that it stops only its own pass), without helpers, with only token inputs;
- ``generate`` blocks share a ``generate`` call only with ``generate`` blocks of the
  same generation keywords (``GEN_KEYS`` only, the same values), greedy (``do_sample``
  false, one beam, one sequence per row, no time limit or stop strings: each row's
  tokens depend on its own logits only; sampling draws every row from one random
  stream, so a sampling job runs alone).  A lane reads and writes its rows of step 0
  (the prompt's pass) or, in step blocks (``tracer.all()``, ``tracer.iter[...]``,
  ``for step in ...``, ``m.next()``), of the steps it selects, as an invoke does alone;
  ``model.generator.output`` (its rows) and ``tracer.result`` (the job's rows:
  ``JobTracer.result``).  Steps are forward calls of the whole model, the same for
  every row, so step k of the shared call is step k of each job alone.  What differs
  from alone is when generation stops: alone it stops once every row of the job
  produced an end token (or at ``max_new_tokens``), shared once every row of the pass
  did, HF generate padding the finished rows meanwhile (an open ``tracer.all()`` /
  ``tracer.iter[i:]`` would see those extra steps, a bounded ``tracer.iter[0:6]`` steps
  that never come alone).  So after the call, a job whose rows had all ended before
  its last step (``_ended_early``) has its result dropped and runs again alone; every
  other job ran exactly the steps it runs alone, its lanes served at the same steps
  (each lane waits for its own steps; a ``tracer.barrier`` counts its job's lanes only);
- ``trace`` blocks with step blocks (``tracer.iter[i]`` is call i of each module) share
  a pass only with such traces (the pass counts calls, as alone).  A module called a
  fixed number of times per forward (the layers of the served language models) is
  called as often shared as alone.  One called only for some rows (a mixture-of-experts
  expert) is not covered: its value mostly lacks the lane's rows (the job then runs
  alone, below), but how often it runs can differ from alone (as for plain reads of it);
- jobs whose inputs pad to the same length, with the same kinds of input (each job
  then sees exactly the tensors it would see alone: no extra padding);
- up to ``max_jobs`` jobs and ``max_tokens`` rows x positions per pass.

A value handed to a lane of a shared pass that does not have the lane's rows first
(a tensor without the batch dimension) fails the pass, and that job runs alone.

Isolation.  Within a pass each job's lanes see only its rows: a lane of a trace
without invokes, and ``tracer.invoke()`` without an input (alone: the whole batch),
see the job's own rows; ``tracer.cache()`` records them.  Site numbers are offset per
job, so no request of one job can name another's checkpoint.  If a shared pass fails
for any reason (one job's error, a barrier that never releases, ...), it is dropped
and its jobs start again with fresh values (their output of the dropped pass
discarded): the jobs whose lanes raised run alone, so each gets exactly the error it
gets alone, and the others share a pass once more (alone if that fails too).  Print output of a job in a shared pass is sent once the
pass has succeeded.  A changed model (``ModelGuard``) after a shared pass sends its
jobs back to be run alone by a fresh worker (``A``), since the change cannot be
attributed to one of them.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from compiler.plan import Checkpoint, Marker

from ..remote import phases, protocol
from ..tracer import InvokeSpec, Tracer, block_facts
from .execute import JobError, build_function, encode_reply, job_error, prepare_job

# Model inputs a shared pass can batch (left-padded like invokes' inputs).
INPUT_KEYS = frozenset({"input_ids", "attention_mask", "position_ids", "token_type_ids"})
# Generation keywords a shared generate pass may have (the same in every job of it).
GEN_KEYS = frozenset({"max_new_tokens", "do_sample", "num_beams", "eos_token_id",
                      "pad_token_id"})
# Plan items that make a job run alone.
# A helper's reads go through its own handle, not the job's offset one: alone.
_ALONE_MARKERS = frozenset({"stop", "backward", "helper"})


class _Retry(BaseException):
    """Ends a job's thread whose shared pass failed: the job runs again, alone."""


def _delegated(name: str) -> property:
    """A tracer attribute that, while a shared pass runs, is the pass's own."""
    own = "_own" + name

    def get(self):
        p = self._pass
        return getattr(p, name) if p is not None else self.__dict__.get(own)

    def set_(self, value) -> None:
        p = self._pass
        if p is not None:
            setattr(p, name, value)
        else:
            self.__dict__[own] = value

    return property(get, set_)


class JobTracer(Tracer):
    """A job's tracer: at the end of its block it waits for the batch to run it."""

    _pass = None  # the MergedTracer while a shared pass runs this job's lanes
    _end_when_served = True  # its reply is what it saved: see Tracer._ends_when_served
    _inter = _delegated("_inter")  # tracer.stop() / tracer.cache() reach the pass
    _rows = _delegated("_rows")
    _caches = _delegated("_caches")  # the pass removes every cache's hooks

    def __init__(self, item: _Item, *args) -> None:
        super().__init__(*args)
        self._item = item

    @property
    def result(self):
        """``tracer.result``: in a shared generate pass, the job's rows of it."""
        p = self._pass
        if p is None:
            return self._result
        return None if p._result is None else p._result[self._item.span]

    def stop(self) -> None:
        if self._pass is not None:  # not planned: a stop is seen by the plan (runs alone)
            raise RuntimeError("tracer.stop() in a shared pass")
        super().stop()

    def _execute(self) -> None:
        item = self._item
        item.arrive(self)
        item.go.wait()
        mode = item.mode
        if mode == "alone":
            return super()._execute()
        if mode == "retry":
            raise _Retry
        # "done": the shared pass ran this job's lanes.


class _Item:
    """One job of the batch in this worker."""

    def __init__(self, batch: _Batch, job_id: str, data: bytes, alone: bool) -> None:
        self.batch = batch
        self.id = job_id
        self.data = data
        self.alone = alone  # run alone from the start (sent so, or its shared pass failed)
        self.reset()

    def reset(self) -> None:
        self.tracer: JobTracer | None = None
        self.span: slice | None = None  # the job's rows of its shared pass
        self.go = threading.Event()
        self.mode = ""
        self.scope: dict | None = None
        self.exc: BaseException | None = None
        self.ended = False
        self.thread: threading.Thread | None = None
        self.prints: list[bytes] = []
        self.printer = None
        self.job = None

    # called from the job's thread
    def arrive(self, tracer: JobTracer) -> None:
        with self.batch.cond:
            self.tracer = tracer
            self.batch.cond.notify_all()

    def _run(self, fn, root) -> None:
        try:
            self.scope = fn(root, **self.job.values)
        except _Retry:
            pass
        except BaseException as exc:  # noqa: BLE001 - the job's error
            self.exc = exc
        finally:
            with self.batch.cond:
                self.ended = True
                self.batch.cond.notify_all()


class _Printer:
    """``print`` in a job: sent at once when it runs alone, kept until its shared pass
    has succeeded otherwise; at most ``limit`` bytes."""

    def __init__(self, item: _Item, send, limit: int) -> None:
        self.item = item
        self.send = send
        self.limit = limit
        self.used = 0
        self.cut = False

    def __call__(self, *args, sep=" ", end="\n", file=None, flush=False) -> None:
        if self.cut:
            return
        text = (" " if sep is None else str(sep)).join(str(a) for a in args)
        text += "\n" if end is None else str(end)
        data = text.encode("utf-8", "replace")
        if self.used + len(data) > self.limit:
            data = data[: max(self.limit - self.used, 0)]
            data += (f"\n[intervene: print output over {self.limit} bytes; the rest is "
                     "dropped]\n").encode()
            self.cut = True
        self.used += len(data)
        if self.item.alone or self.item.mode == "alone":
            self.send(b"P", self.item.id, data)
        else:
            self.item.prints.append(data)


def _handle(item: _Item, plan, source):
    """The job's runtime handle: its blocks give ``JobTracer``s, and the site numbers
    its code asks for are offset by the job's place in a shared pass."""
    from ..api import Handle
    from ..interleave import barrier, end_steps, next_step, read, write
    from .execute import _ServerHandle

    handle = _ServerHandle(plan, source)
    off = item.batch_offset = [0]

    def block(model, kind, index, /, *args, **kwargs):
        kwargs.pop("remote", None)
        t = Handle.block(handle, model, kind, index, *args, **kwargs)
        jt = JobTracer(item, t._root, t._kind, t._block, t._sites, t._args, t._kwargs)
        jt._filename = t._filename
        jt._has_steps = t._has_steps
        jt._has_backward = t._has_backward
        return jt

    handle.read = lambda envoy, value, site: read(envoy, value, site + off[0])
    handle.write = lambda envoy, value, site, new: write(envoy, value, site + off[0], new)
    handle.barrier = lambda b, site: barrier(b, site + off[0])
    # Step blocks: their site numbers name the job's own lines in warnings and errors.
    handle.next_step = lambda sel, site: next_step(sel, site + off[0])
    handle.end_steps = lambda sel, site: end_steps(sel, site + off[0])
    handle.block = block
    return handle


class MergedTracer(Tracer):
    """One forward pass for the lanes of several jobs (see the module docstring)."""

    _end_when_served = True
    # The token ids as generate returned them, before any lane could write
    # `model.generator.output` (in place): `_ended_early` reads these.
    _ids = None

    def __init__(self, root, block, sites, inputs, filename: str, gen: dict) -> None:
        super().__init__(root, block.kind, block, sites, (), gen)
        self._invoked = True
        self._merged_inputs = inputs
        self._filename = filename

    @property
    def _result(self):
        return self.__dict__.get("_out")

    @_result.setter
    def _result(self, value) -> None:  # set by Tracer._execute as generate returns
        self.__dict__["_out"] = value
        if self._ids is None and isinstance(value, torch.Tensor):
            self._ids = value.clone()

    def _inputs(self):
        args, kwargs, rows = self._merged_inputs
        return args, {**kwargs, **self._kwargs}, rows


def _gen_keywords(root, t: JobTracer) -> dict | None:
    """A generate block's generation keywords when a shared pass can give it exactly
    what it gets alone: greedy, one sequence per row, only keywords of ``GEN_KEYS``
    with plain values, no time limit or stop strings, token ids as the result; else
    None."""
    gen = {k: v for k, v in t._kwargs.items() if k in GEN_KEYS}
    for v in gen.values():
        ok = isinstance(v, (bool, int)) or (
            isinstance(v, (list, tuple)) and all(isinstance(i, int) for i in v))
        if not ok:
            return None
    cfg = getattr(root._module, "generation_config", None)

    def setting(name, default):
        return gen[name] if name in gen else getattr(cfg, name, default)

    if setting("do_sample", False) or setting("num_beams", 1) not in (None, 1):
        return None
    if getattr(cfg, "num_return_sequences", 1) not in (None, 1):
        return None
    if (getattr(cfg, "max_time", None) is not None or getattr(cfg, "stop_strings", None)
            or getattr(cfg, "return_dict_in_generate", False)):
        return None
    return gen


def _eos_ids(root, gen: dict) -> set[int]:
    eos = gen.get("eos_token_id")
    if eos is None:
        eos = getattr(getattr(root._module, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _ended_early(root, tracer: MergedTracer, group: list[_Item]) -> list[_Item]:
    """The jobs of a shared generate pass that would have stopped generating sooner
    alone: every row of theirs had produced an end token before the pass's last step
    (HF generate then pads those rows while the others go on).  Their results are
    dropped; they run again alone.  (Alone, generate stops once all its rows ended or
    after max_new_tokens: the same step for every job that is not one of these.)  The
    tokens are those generate returned, not what a lane wrote over
    ``model.generator.output`` afterwards."""
    out = tracer._ids
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        return list(group)
    prompt = tracer._merged_inputs[1]["input_ids"].shape[1]
    new = out[:, prompt:]
    steps = new.shape[1]
    eos = _eos_ids(root, tracer._kwargs)
    if not eos or steps == 0:
        return []
    is_end = torch.zeros_like(new, dtype=torch.bool)
    for e in eos:
        is_end |= new == e
    # generated tokens up to and including each row's first end token (all: never ended)
    first = torch.where(is_end.any(1), is_end.int().argmax(1) + 1,
                        torch.full((new.shape[0],), steps))
    return [m for m in group if int(first[m.span].max()) < steps]


def _mergeable(root, t: JobTracer):
    """``(key, tokens, facts)`` when the job can share a pass, else None."""
    block = t._block
    if t._kind not in ("trace", "generate") or t._has_backward:
        return None
    gen: dict = {}
    if t._kind == "generate":
        gen = _gen_keywords(root, t)
        if gen is None:
            return None
    for lane in block.lanes:
        for it in lane.items:
            if isinstance(it, Marker) and it.kind in _ALONE_MARKERS:
                return None
            if isinstance(it, Checkpoint) and it.value in ("grad", "inputs"):
                # `.inputs` holds keywords without the batch dimension first
                # (`cache_position`): rows of them would not be what it sees alone.
                return None
    items = _job_inputs(t)
    if items is None or all(i is None for i in items):
        return None
    try:
        _, kw, _rows = root._batch(items, None)
        facts = block_facts(root, block)
    except Exception:  # noqa: BLE001 - alone, it raises the same error at its line
        return None
    if set(kw) - INPUT_KEYS or not all(hasattr(v, "shape") for v in kw.values()):
        return None
    ids = kw["input_ids"]
    # A trace with step blocks counts each module's calls (`Interleaver.count_calls`):
    # it shares a pass only with such traces.  A generate pass counts steps anyway.
    steps = t._kind == "trace" and t._has_steps
    key = (t._kind, steps, repr(sorted(gen.items())), ids.shape[1],
           tuple(sorted((k, str(v.dtype), str(v.device)) for k, v in kw.items())))
    return key, ids.shape[0] * ids.shape[1], facts


def _job_inputs(t: JobTracer) -> list | None:
    """The job's entries for ``root._batch``: one per invoke (None: no input), or its
    trace's own input."""
    kwargs = t._kwargs
    if t._kind == "generate":  # its generation keywords are the pass's (`_gen_keywords`)
        kwargs = {k: v for k, v in kwargs.items() if k not in GEN_KEYS}
    if t._invoked:
        if t._args or kwargs:
            return None
        return [(spec.args, spec.kwargs) if spec is not None and (spec.args or spec.kwargs)
                else None for _, spec, _ in t._lanes]
    if len(t._lanes) > 1:
        return None
    return [(t._args, kwargs)]


def _merge(root, members: list[_Item], facts: list, faulty: list):
    """The MergedTracer of ``members`` (each with its tracer arrived)."""
    from compiler.plan import Block

    from ..tracer import BlockFacts

    entries: list = []  # root._batch inputs
    owner: list[int] = []  # member index of each entry
    for k, m in enumerate(members):
        got = _job_inputs(m.tracer)
        entries += got
        owner += [k] * len(got)
    args, kwargs, rows_in = root._batch(entries, None)
    span: list = []  # each member's rows of the batch
    for k in range(len(members)):
        mine = [r for r, o in zip(rows_in, owner) if o == k and r is not None]
        span.append(slice(mine[0].start, mine[-1].stop))
    lanes, sites, tracer_lanes, rows = [], {}, [], []
    off = 0
    g = 0
    entry = 0
    for k, m in enumerate(members):
        t = m.tracer
        m.span = span[k]
        m.batch_offset[0] = off
        top = 0
        for fn, spec, index in t._lanes:
            lane = t._block.lanes[index]
            items = tuple(replace(it, order=it.order + off) for it in lane.items)
            for it in items:
                sites[it.order] = it
            lanes.append(replace(lane, index=g, items=items))
            if t._invoked:
                r = rows_in[entry]
                entry += 1
                rows.append(r if r is not None else span[k])
            else:
                rows.append(span[k])
            tracer_lanes.append((_noting(fn, m, faulty, rows[-1].stop - rows[-1].start),
                                 spec if spec is not None else InvokeSpec((), {}), g))
            g += 1
        if not t._invoked:
            entry += 1
        for lane in t._block.lanes:
            for it in lane.items:
                top = max(top, it.order + 1)
        off += top
    first = members[0].tracer
    block = Block(0, first._kind, first._block.model, "", first._block.line, tuple(lanes))
    attach: dict = {}
    for f in facts:
        for module, phase in f.attach:
            attach.setdefault((id(module), phase), (module, phase))
    merged_facts = BlockFacts(list(attach.values()), all(f.static for f in facts))
    gen = _gen_keywords(root, first) if first._kind == "generate" else {}
    tracer = MergedTracer(root, block, sites, (args, kwargs, rows), first._filename, gen)
    tracer._lanes = tracer_lanes
    tracer._has_steps = any(m.tracer._has_steps for m in members)
    return tracer, merged_facts


class _Batch:
    def __init__(self, root, send, max_print: int) -> None:
        self.root = root
        self.send = send
        self.max_print = max_print
        self.cond = threading.Condition()

    def start(self, item: _Item, inline: bool = False) -> None:
        """Prepare the job (decode, validate, compile) and start its thread; a job
        refused here ends with its error set (``item.exc``).  ``inline``: the batch's only
        job, run alone in this thread now (no thread to start and hand over to)."""
        item.reset()
        try:
            header, tensors = protocol.unpack(item.data)
            item.job = prepare_job(self.root, header, tensors)
            if item.job.block.kind == "session":  # several traces, Python between: alone
                item.alone = True
        except JobError as exc:
            item.exc = exc
            item.ended = True
            return
        except protocol.ProtocolError as exc:
            item.exc = JobError("ProtocolError", str(exc))
            item.ended = True
            return
        item.printer = _Printer(item, self.send, self.max_print)
        fn = build_function(item.job, item.printer,
                            _handle(item, item.job.compiled.plan, item.job.compiled.source))
        phases.stamp(item.id, "w1 prepared")
        if inline:
            item.mode = "alone"
            item.go.set()
            item._run(fn, self.root)
            return
        item.thread = threading.Thread(target=item._run, args=(fn, self.root), daemon=True,
                                       name=f"intervene-job-{item.id[:8]}")
        item.thread.start()

    def wait_arrived(self, items: list[_Item]) -> None:
        with self.cond:
            while not all(i.ended or i.tracer is not None for i in items):
                self.cond.wait(1.0)

    def release(self, item: _Item, mode: str) -> None:
        item.mode = mode
        item.go.set()
        if item.thread is not None:
            item.thread.join()


def run_batch(root, guard, jobs: list[tuple[str, bytes, bool]],
              send: Callable[[bytes, str, bytes], None], max_result: int, max_print: int,
              max_jobs: int = 16, max_tokens: int = 4096) -> bool:
    """Run ``jobs`` ((id, message, alone) each) on ``root``; each job's outcome goes
    through ``send(tag, id, body)``: ``P`` print output, ``R`` result, ``E`` error
    (JSON), ``A`` to be run again, alone, on a fresh model.  Returns True when the
    served model was changed (the caller must reload it: end the worker)."""
    import json

    from .stable import outputs_stable

    outputs_stable(root)  # may its traces end early? (learned once per model)
    batch = _Batch(root, send, max_print)
    items = [_Item(batch, i, d, a or max_jobs <= 1) for i, d, a in jobs]
    for item in items:
        phases.stamp(item.id, "w0 worker got it")
        batch.start(item, inline=len(items) == 1)
    batch.wait_arrived(items)

    def finish(item: _Item) -> None:
        phases.stamp(item.id, "w3 ran")
        for data in item.prints:
            send(b"P", item.id, data)
        item.prints.clear()
        try:
            if item.exc is not None:
                raise job_error(item.exc, item.job.filename if item.job else "")
            if item.scope is None:
                raise JobError("RuntimeError", "server error: the job ended without a result")
            body = b"R", encode_reply(item.job, item.scope, max_result)
        except JobError as exc:
            body = b"E", json.dumps(exc.info, default=str).encode()
        except BaseException as exc:  # noqa: BLE001 - a bug of ours, not the user's
            body = b"E", json.dumps({"type": type(exc).__name__,
                                     "message": f"server error: {exc}"}).encode()
        item.scope = item.exc = None
        phases.stamp(item.id, "w4 reply encoded")
        send(body[0], item.id, body[1])

    def changed() -> list[str]:
        return guard.changes() if guard is not None else []

    def guard_error(item: _Item, changes: list[str]) -> None:
        message = ("the job changed the served model (" + "; ".join(changes) + "); writes "
                   "through .output/.input are the only writes a job may make. The model is "
                   "being reloaded for the next job.")
        send(b"E", item.id, json.dumps({"type": "RuntimeError", "message": message}).encode())

    # Group the jobs that arrived at their block.
    groups: list[list[_Item]] = []
    facts_of: dict[int, Any] = {}
    open_groups: dict = {}  # key -> (group, tokens)
    for item in items:
        if item.ended or item.alone:
            groups.append([item])
            continue
        got = _mergeable(root, item.tracer)
        if got is None:
            groups.append([item])
            continue
        key, tokens, facts = got
        facts_of[id(item)] = facts
        group = open_groups.get(key)
        if group is not None and len(group[0]) < max_jobs and group[1] + tokens <= max_tokens:
            group[0].append(item)
            open_groups[key] = (group[0], group[1] + tokens)
        else:
            groups.append([item])
            open_groups[key] = (groups[-1], tokens)

    def alone(item: _Item, again: bool) -> bool:
        """Run ``item`` in a pass of its own (``again``: from the start); True when
        it changed the model."""
        if again:
            item.alone = True
            batch.start(item)
            batch.wait_arrived([item])
        if not item.ended:
            batch.release(item, "alone")
        changes = changed()
        if changes:
            guard_error(item, changes)
            return True
        finish(item)
        return False

    def shared(group: list[_Item], again: bool) -> bool:
        """Run ``group`` in one pass (``again``: from the start); True when the model
        changed.  If the pass fails, the jobs whose lanes raised run again alone
        (each gets its error exactly as alone), the rest once more together (and
        alone if that fails too)."""
        if again:
            for item in group:
                batch.start(item)
            batch.wait_arrived(group)
            early = [i for i in group if i.ended]
            for item in early:  # ended before their block this time: their own outcome
                finish(item)
            group = [i for i in group if not i.ended]
            if len(group) < 2:
                return any(alone(i, False) for i in group)
        ok, faulty, early = _run_shared(root, group, [facts_of[id(i)] for i in group])
        if ok:
            changes = changed()
            if changes:
                for item in group:
                    item.mode = "retry"
                    send(b"A", item.id, b"")
                return True
            for item in group:
                if item in early:  # generation would have stopped sooner alone
                    batch.release(item, "retry")
                else:
                    batch.release(item, "done")
                    finish(item)
            return any(alone(i, True) for i in early)
        for item in group:  # the failed pass is dropped: each job starts again
            batch.release(item, "retry")
        if changed():
            for item in group:
                send(b"A", item.id, b"")
            return True
        rest = [i for i in group if i not in faulty] if not again and faulty else []
        for item in group:
            if item not in rest and alone(item, True):
                return True
        if len(rest) > 1:
            return shared(rest, True)
        return any(alone(i, True) for i in rest)

    for group in groups:
        if len(group) == 1:
            if alone(group[0], False):
                return True
        elif shared(group, False):
            return True
    return False


def _run_shared(root, group: list[_Item], facts: list) -> tuple[bool, list, list]:
    """One forward pass for the lanes of ``group``: (True, [], the jobs whose
    generation ended sooner alone: ``_ended_early``) when it ran, else (False, the
    jobs whose lanes raised, [])."""
    faulty: list[_Item] = []
    try:
        tracer, merged_facts = _merge(root, group, facts, faulty)
    except Exception:  # noqa: BLE001 - the jobs run alone
        return False, [], []
    checked = root._checked
    checked[id(tracer._block)] = (tracer._block, merged_facts)
    for item in group:
        item.tracer._pass = tracer
    early: list[_Item] = []
    try:
        tracer._execute()
        if tracer._kind == "generate":
            early = _ended_early(root, tracer, group)
            out = tracer._result
            for item in group:  # `tracer.result` after the block: the job's rows
                item.tracer._result = None if out is None else out[item.span]
    except BaseException:  # noqa: BLE001 - the jobs run again, each gets its own outcome
        return False, faulty, []
    finally:
        checked.pop(id(tracer._block), None)
        for item in group:
            item.tracer._pass = None
        tracer._lanes.clear()
        tracer._result = None
    return True, [], early


class _NotBatchMajor(Exception):
    """A lane of a shared pass was handed a value whose rows are not the job's rows (a
    tensor without the batch dimension first, e.g. a broadcast [1, ...] position
    embedding): what it sees would differ from running alone, so the job runs alone."""


def _check_rows(value, n: int) -> None:
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] != n:
            raise _NotBatchMajor
    elif isinstance(value, (tuple, list)):
        for v in value:
            _check_rows(v, n)
    elif isinstance(value, dict):
        for v in value.values():
            _check_rows(v, n)


def _noting(fn, item: _Item, faulty: list, n: int):
    """Lane ``fn`` of ``item`` (``n`` rows of the pass): notes ``item`` in ``faulty``
    when it raises, and checks that every value it is handed has its ``n`` rows."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return fn
    if code.co_flags & inspect.CO_GENERATOR:
        def lane():
            gen = fn()
            try:
                req = gen.send(None)
                while True:
                    try:
                        value = yield req
                    except GeneratorExit:  # closed by the cleanup: not its fault
                        gen.close()
                        raise
                    except BaseException as exc:  # noqa: BLE001 - thrown in at its line
                        req = gen.throw(exc)
                        continue
                    if value is not None:
                        _check_rows(value, n)
                    req = gen.send(value)
            except StopIteration as stop:
                return stop.value
            except GeneratorExit:
                raise
            except BaseException:
                faulty.append(item)
                raise
    else:  # a lane without checkpoints runs whole when it is called
        def lane():
            try:
                return fn()
            except BaseException:
                faulty.append(item)
                raise
    return lane
