"""Jobs and the workers that run them; no web framework here.

``Engine`` holds every job and one ``ModelRunner`` per served model.  A
runner is a thread that owns a worker process (``worker.main``, started with
``spawn``) and feeds it one batch at a time from its queue: the first waiting
job and those that arrive within ``Limits.batch_window``, up to
``batch_max_jobs`` (the worker runs the ones that can share a forward pass as
one, see ``batch.py``), relaying each job's print output and outcome.  A job
that runs past the time limit, is cancelled while running, or whose worker
dies takes the worker with it: the process is killed, the job ends (ERROR or
CANCELLED, with a clear message) and a fresh worker is started.  The other
jobs of that batch that had no answer yet go back to the head of the queue,
each to run alone when the fault cannot be pinned on one job (a time limit, a
crash), so that only the job at fault fails.  Every accepted job ends
COMPLETED, ERROR or CANCELLED.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..remote import phases

FINAL = ("COMPLETED", "ERROR", "CANCELLED")


def load_error(spec: str, failure: str) -> dict:
    """The error of a job whose model could not be loaded (both engines)."""
    return {"type": "RuntimeError",
            "message": f"the server could not load model {spec!r}: {failure}"}
# A job waits for company (Limits.batch_window) only while its model is busy: when another
# job was queued or running at a submit in the last BUSY_MEMORY seconds.  A lone client's
# job starts at once.
BUSY_MEMORY = 1.0
SWITCH_INTERVAL = 0.0002  # seconds; see Engine.start


@dataclass
class Limits:
    job_timeout: float = 300.0  # seconds of run time per job
    load_timeout: float = 900.0  # seconds for a worker to load its model
    max_request: int = 256 * 2**20  # bytes of a job message
    max_result: int = 256 * 2**20  # bytes of tensors in a result
    max_print: int = 2**20  # bytes of print output per job
    max_memory: int | None = None  # bytes a worker may map beyond its loaded model (Linux)
    max_queued: int = 8  # jobs queued or running per API key
    keep_finished: float = 600.0  # seconds a finished job (and its result) is kept
    # Batching (runtime/serve/batch.py): jobs waiting for one model share a forward pass.
    batch_window: float = 0.005  # seconds the first job of a batch waits for company
    batch_max_jobs: int = 16  # jobs per batch (1: one job at a time)
    batch_max_tokens: int = 4096  # rows x positions of one shared forward pass

    def public(self) -> dict:
        return {k: getattr(self, k) for k in ("job_timeout", "max_request", "max_result",
                                              "max_print", "max_queued", "max_memory",
                                              "batch_window", "batch_max_jobs",
                                              "batch_max_tokens")}


@dataclass
class Job:
    id: str
    key: str
    model: str
    data: bytes
    status: str = "QUEUED"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: dict | None = None
    result: bytes | None = None
    detail: str = ""
    events: list = field(default_factory=list)  # (event name, payload)
    cancel_requested: bool = False
    alone: bool = False  # run in a batch of its own (its shared batch failed or hung)
    waiters: list = field(default_factory=list)  # (event loop, asyncio.Event) of streams

    def push(self, name: str, payload: dict) -> None:
        """Add an event and wake the streams waiting for one (from any thread)."""
        self.events.append((name, payload))
        for loop, ready in list(self.waiters):
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # that stream's loop is closed
                self.waiters.remove((loop, ready))

    def view(self, position: int | None = None) -> dict:
        out: dict[str, Any] = {"id": self.id, "status": self.status, "model": self.model}
        if position:
            out["position"] = position
        if self.started is not None:
            out["elapsed"] = round((self.finished or time.time()) - self.started, 3)
        if self.error is not None:
            out["error"] = self.error
        if self.detail:
            out["detail"] = self.detail
        return out


class Feeder(threading.Thread):
    """A thread that takes batches from one model's queue and runs them: the local
    engine's ``ModelRunner`` (a worker process) and the Ray engine's ``Replica`` (an
    actor).  ``run`` starts the worker, then loops: take the next batch
    (``Engine._next_batch``), ``_prepare`` it, ``_run_batch`` it with ``current`` set;
    a bug of ours ends the thread with every job it holds failed (``_fail_all``)."""

    what = "runner"  # in the message of a bug of ours
    state: str
    failure: str
    current: list[Job] | None

    @property
    def _queue_owner(self) -> Any:
        """What holds the queue (``runner`` for ``Engine._next_batch``, ``_requeue``)."""
        return self

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug of ours: no job may hang because of it
            self.state = "failed"
            self.failure = f"the {self.what} stopped: {type(exc).__name__}: {exc}"
            self._kill()
            self._fail_all()
            raise

    def _loop(self) -> None:
        self._spawn()
        owner = self._queue_owner
        while not owner.stopping:
            if not self._may_take():
                return
            jobs = self.engine._next_batch(owner)
            if not jobs or not self._prepare(jobs):
                continue
            self.current = jobs
            try:
                self._run_batch(jobs)
            finally:
                self.current = None

    def _may_take(self) -> bool:
        """False ends the loop before it takes another batch."""
        return True

    def _fail_or_requeue(self, jobs: list[Job], waiting: dict[str, Job], message: str,
                         type_name: str = "RuntimeError") -> None:
        """The worker had to go with ``waiting`` unanswered: a job that ran alone gets the
        error; the jobs of a shared batch run again, each alone (so that the one at fault
        fails alone)."""
        if len(jobs) == 1 or len(waiting) == 1:
            for job in waiting.values():
                self.engine._finish(job, "ERROR", error={"type": type_name, "message": message})
        else:
            self.engine._requeue(self._queue_owner, list(waiting.values()), alone=True)

    def _prepare(self, jobs: list[Job]) -> bool:
        """Before ``jobs`` run; False when they were ended instead."""
        return True

    def _spawn(self) -> None:
        raise NotImplementedError

    def _kill(self) -> None:
        raise NotImplementedError

    def _fail_all(self) -> None:
        raise NotImplementedError

    def _run_batch(self, jobs: list[Job]) -> None:
        raise NotImplementedError


class ModelRunner(Feeder):
    """One served model: its queue, its worker process, the thread that feeds it."""

    def __init__(self, engine: Engine, spec: str) -> None:
        super().__init__(daemon=True, name=f"intervene-runner-{spec}")
        self.engine = engine
        self.spec = spec
        self.names: list[str] = [spec]
        self.state = "starting"  # starting | ready | failed
        self.failure = ""
        self.queue: collections.deque[Job] = collections.deque()
        self.proc = None
        self.conn = None
        self.current: list[Job] | None = None
        self.stopping = False
        self.restarts = 0
        self.busy_at = -1e9  # time.monotonic() of the last submit that found company

    # -- the worker process ----------------------------------------------------------
    def _spawn(self) -> None:
        from . import worker

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        lim = self.engine.limits
        proc = ctx.Process(target=worker.main, args=(child, self.spec, lim.max_result,
                                                     lim.max_print, lim.max_memory),
                           daemon=True, name=f"intervene-worker-{self.spec}")
        proc.start()
        child.close()
        self.proc, self.conn = proc, parent
        deadline = time.monotonic() + lim.load_timeout
        while time.monotonic() < deadline and not self.stopping:
            if parent.poll(0.2):
                try:
                    msg = parent.recv_bytes()
                except (EOFError, OSError):
                    break
                if msg[:1] == b"Y":
                    self.names = json.loads(msg[1:])["names"]
                    self.state = "ready"
                    return
                if msg[:1] == b"F":
                    self.failure = json.loads(msg[1:])["message"]
                    break
            elif not proc.is_alive():
                break
        self._kill()
        self.state = "failed"
        self.failure = self.failure or f"the worker for {self.spec!r} did not start"

    def _kill(self) -> None:
        proc, conn = self.proc, self.conn
        self.proc = self.conn = None
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(10)

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    # -- the loop (Feeder.run) ----------------------------------------------------------------
    def _fail_all(self) -> None:
        with self.engine.cond:
            while self.queue:
                self.engine._finish_locked(self.queue.popleft(), "ERROR", error={
                    "type": "RuntimeError", "message": self.failure})
            for job in self.current or ():
                self.engine._finish_locked(job, "ERROR", error={
                    "type": "RuntimeError", "message": self.failure})

    def _prepare(self, jobs: list[Job]) -> bool:
        for job in jobs:
            phases.stamp(job.id, "e0 batch taken")
        if not self._alive():
            self.restarts += 1
            self._spawn()
        if self.state != "ready":
            for job in jobs:
                self.engine._finish(job, "ERROR", error=load_error(self.spec, self.failure))
            return False
        return True

    def _run_batch(self, jobs: list[Job]) -> None:
        """Send ``jobs`` to the worker as one batch and relay each job's outcome.  When
        the worker has to be stopped (a cancel, the time limit, a crash), the jobs it
        had not answered go back to the queue, to run alone when the batch had several
        (so that the one at fault fails alone); a job that was alone gets the error."""
        from .worker import pack_batch

        lim = self.engine.limits
        jobs = [j for j in jobs if self.engine._start(j)]  # not those cancelled meanwhile
        if not jobs:
            return
        waiting = {j.id: j for j in jobs}
        conn = self.conn  # self.conn goes None when stop() kills the worker meanwhile
        try:
            conn.send_bytes(pack_batch([(j.id, j.data, j.alone) for j in jobs],
                                            lim.batch_max_jobs, lim.batch_max_tokens))
        except (OSError, ValueError, AttributeError):
            self._kill()
            for job in jobs:
                self.engine._finish(job, "ERROR", error={
                    "type": "RuntimeError",
                    "message": "the worker process was gone; it is restarted"})
            return
        for job in jobs:
            phases.stamp(job.id, "e1 sent to worker")
        deadline = time.monotonic() + lim.job_timeout
        while True:
            cancelled = [j for j in waiting.values() if j.cancel_requested]
            if cancelled:
                self._kill()
                for job in cancelled:
                    del waiting[job.id]
                    self.engine._finish(job, "CANCELLED", detail="cancelled while running; "
                                        "the worker was stopped and is restarted")
                self.engine._requeue(self, list(waiting.values()), alone=False)
                return
            if time.monotonic() > deadline:
                self._kill()
                self._fail_or_requeue(jobs, waiting, f"the job ran longer than this server's "
                                      f"limit of {lim.job_timeout:g} s and was stopped (its "
                                      "worker process was killed and is restarted)",
                                      "TimeoutError")
                return
            try:
                ready = conn.poll(0.05)
                msg = conn.recv_bytes() if ready else None
            except (EOFError, OSError):
                proc = self.proc
                if proc is not None:
                    proc.join(5)  # ending on its own (exit code 3: it changed the model)
                code = proc.exitcode if proc is not None else None
                self._kill()
                if code == 3 and len(jobs) > 1:
                    # A job changed the model and was failed; the rest did not run.
                    self.engine._requeue(self, list(waiting.values()), alone=False)
                else:
                    self._fail_or_requeue(jobs, waiting, f"the worker process running the job "
                                          f"died (exit code {code}; out of memory?); it is "
                                          "restarted")
                return
            if msg is None:
                continue  # a dead worker shows as end-of-file on the next poll
            tag = msg[:1]
            if tag == b"D":
                return
            self.engine._relay(self, waiting, msg)

    def stop(self) -> None:
        self.stopping = True
        with self.engine.cond:
            self.engine.cond.notify_all()
        self._kill()


class Engine:
    """Every job, and one runner per model; the HTTP app calls only these methods."""

    def __init__(self, specs: list[str], limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.jobs: dict[str, Job] = {}
        # This run of the server: the first 8 characters of every job id it gives, so that
        # after a restart it can tell a job an earlier run lost from one that never was.
        self.boot = uuid.uuid4().hex[:8]
        self.cond = threading.Condition()
        self.runners = [ModelRunner(self, spec) for spec in specs]

    def start(self) -> None:
        # The app's event loop and the runner threads share this process's GIL, and a
        # thread that wants it waits out the holder's switch interval (5 ms by default):
        # added to a job at each hand-over between them.  This process does no heavy
        # compute (the workers do), so switching often costs nothing.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        for r in self.runners:
            r.start()

    def close(self) -> None:
        for r in self.runners:
            r.stop()
        with self.cond:
            for job in list(self.jobs.values()):
                if job.status not in FINAL:
                    self._finish_locked(job, "CANCELLED", detail="the server shut down")

    # -- lookups -----------------------------------------------------------------------------
    def runner_for(self, name: str) -> ModelRunner | None:
        for r in self.runners:
            if name in r.names or name == r.spec:
                return r
        return None

    def models(self) -> dict[str, dict]:
        return {r.spec: {"names": r.names, "state": r.state, "failure": r.failure,
                         "queued": len(r.queue), "restarts": r.restarts} for r in self.runners}

    def ready(self) -> bool:
        return all(r.state != "starting" for r in self.runners)

    def position(self, job: Job) -> int | None:
        runner = self.runner_for(job.model)
        if runner is None or job.status != "QUEUED":
            return None
        for i, j in enumerate(runner.queue):
            if j is job:
                return i + 1
        return None

    def recall(self, job_id: str, key: str) -> Job | None:
        """A job this server no longer holds in memory (``results.Persistent``: from its
        results folder); None here."""
        return None

    def lost(self, job_id: str) -> bool:
        """Whether ``job_id`` is a job id an earlier run of this server gave (one this run
        cannot know: it was lost when that run stopped)."""
        return (len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)
                and not job_id.startswith(self.boot))

    def view(self, job: Job) -> dict:
        with self.cond:
            return job.view(self.position(job))

    # -- jobs ------------------------------------------------------------------------------------
    def submit(self, key: str, model: str, data: bytes) -> Job:
        """Queue a job; ``LookupError`` for an unknown model, ``OverflowError`` when the
        key has too many jobs waiting."""
        runner = self.runner_for(model)
        if runner is None:
            raise LookupError(model)
        with self.cond:
            self._forget_old()
            waiting = busy = 0
            for j in self.jobs.values():
                if j.status not in FINAL:
                    waiting += j.key == key
                    busy += j.model == model or j.model in runner.names
            if waiting >= self.limits.max_queued:
                raise OverflowError(waiting)
            if busy or runner.queue:
                runner.busy_at = time.monotonic()
            job = Job(self.boot + uuid.uuid4().hex[8:], key, model, data)
            self.jobs[job.id] = job
            runner.queue.append(job)
            job.push("status", job.view(len(runner.queue)))
            self.cond.notify_all()
            return job

    def cancel(self, job: Job) -> None:
        with self.cond:
            if job.status == "QUEUED":
                runner = self.runner_for(job.model)
                if runner is not None and job in runner.queue:
                    runner.queue.remove(job)
                self._finish_locked(job, "CANCELLED", detail="cancelled before it ran")
                self._positions(runner)
            elif job.status == "RUNNING":
                job.cancel_requested = True

    def _next_batch(self, runner: ModelRunner) -> list[Job]:
        """The next jobs to run together: the first waiting job, and those that come
        within ``batch_window`` seconds of it, up to ``batch_max_jobs`` (a job to run
        alone goes on its own).  The window is waited only while the model is busy (see
        ``BUSY_MEMORY``)."""
        lim = self.limits
        with self.cond:
            if not runner.queue:
                self.cond.wait(0.5)
            if not runner.queue or runner.stopping:
                return []
            batch = [runner.queue.popleft()]
            busy = (runner.queue
                    or time.monotonic() - runner.busy_at < BUSY_MEMORY)
            if not batch[0].alone and lim.batch_max_jobs > 1 and busy:
                deadline = time.monotonic() + lim.batch_window
                while len(batch) < lim.batch_max_jobs:
                    while (runner.queue and not runner.queue[0].alone
                           and len(batch) < lim.batch_max_jobs):
                        batch.append(runner.queue.popleft())
                    left = deadline - time.monotonic()
                    if len(batch) >= lim.batch_max_jobs or left <= 0 or runner.stopping:
                        break
                    self.cond.wait(left)
            self._positions(runner)
            return batch

    def _requeue(self, runner: ModelRunner, jobs: list[Job], alone: bool) -> None:
        """Jobs of a batch the worker did not finish: first in the queue again."""
        with self.cond:
            for job in reversed(jobs):
                if job.status in FINAL:
                    continue
                job.status = "QUEUED"
                job.started = None
                job.alone = job.alone or alone
                runner.queue.appendleft(job)
            self._positions(runner)

    def _positions(self, runner) -> None:
        if runner is None:
            return
        for i, j in enumerate(runner.queue):
            j.push("status", j.view(i + 1))
        self.cond.notify_all()

    def _start(self, job: Job) -> bool:
        """Mark ``job`` running; False when it ended meanwhile (cancelled)."""
        with self.cond:
            if job.status in FINAL:
                return False
            job.status = "RUNNING"
            job.started = time.time()
            job.push("status", job.view())
            self.cond.notify_all()
            return True

    def _relay(self, runner, waiting: dict[str, Job], msg: bytes) -> None:
        """One message about one job of a running batch (tag, 32-character job id, body;
        from a local worker or a Ray replica): a print, its result, its error, or "run me
        again alone" (requeued on ``runner``).  A job that ended leaves ``waiting``."""
        tag = msg[:1]
        job = waiting.get(msg[1:33].decode("ascii", "replace"))
        if job is None:
            return
        body = msg[33:]
        if tag == b"P":
            self._event(job, "print", {"text": body.decode("utf-8", "replace")})
        elif tag == b"R":
            phases.stamp(job.id, "e2 result received")
            del waiting[job.id]
            self._finish(job, "COMPLETED", result=bytes(body))
            phases.stamp(job.id, "e3 finished, recorded")
        elif tag == b"E":
            del waiting[job.id]
            self._finish(job, "ERROR", error=json.loads(body))
        elif tag == b"A":
            del waiting[job.id]
            self._requeue(runner, [job], alone=True)

    def _event(self, job: Job, name: str, payload: dict) -> None:
        with self.cond:
            job.push(name, payload)
            self.cond.notify_all()

    def _finish(self, job: Job, status: str, **kw: Any) -> None:
        with self.cond:
            self._finish_locked(job, status, **kw)

    def _finish_locked(self, job: Job, status: str, error: dict | None = None,
                       result: bytes | None = None, detail: str = "") -> None:
        if job.status in FINAL:
            return
        job.status = status
        job.finished = time.time()
        job.error = error
        job.result = result
        job.detail = detail
        job.data = b""
        job.push("status", job.view())
        self.cond.notify_all()

    def _forget_old(self) -> None:
        now = time.time()
        old = [k for k, j in self.jobs.items()
               if j.finished is not None and now - j.finished > self.limits.keep_finished]
        for k in old:
            del self.jobs[k]
