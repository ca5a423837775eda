"""Jobs and the workers that run them; no web framework here.

``Engine`` holds every job and one ``ModelRunner`` per served model.  A
runner is a thread that owns a worker process (``worker.main``, started with
``spawn``) and feeds it one job at a time from its queue, relaying the
worker's print output as job events.  A job that runs past the time limit,
is cancelled while running, or whose worker dies takes the worker with it:
the process is killed, the job ends (ERROR or CANCELLED, with a clear
message) and a fresh worker is started for the next one.  Every accepted job
ends COMPLETED, ERROR or CANCELLED.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

FINAL = ("COMPLETED", "ERROR", "CANCELLED")


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

    def public(self) -> dict:
        return {k: getattr(self, k) for k in ("job_timeout", "max_request", "max_result",
                                              "max_print", "max_queued", "max_memory")}


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


class ModelRunner(threading.Thread):
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
        self.current: Job | None = None
        self.stopping = False
        self.restarts = 0

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

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug of ours: no job may hang because of it
            self.state = "failed"
            self.failure = f"the runner stopped: {type(exc).__name__}: {exc}"
            self._kill()
            with self.engine.cond:
                while self.queue:
                    self.engine._finish_locked(self.queue.popleft(), "ERROR", error={
                        "type": "RuntimeError", "message": self.failure})
                if self.current is not None:
                    self.engine._finish_locked(self.current, "ERROR", error={
                        "type": "RuntimeError", "message": self.failure})
            raise

    def _loop(self) -> None:
        self._spawn()
        while not self.stopping:
            job = self.engine._next(self)
            if job is None:
                continue
            if not self._alive():
                self.restarts += 1
                self._spawn()
            if self.state != "ready":
                self.engine._finish(job, "ERROR", error={
                    "type": "RuntimeError",
                    "message": f"the server could not load model {self.spec!r}: {self.failure}"})
                continue
            self.current = job
            try:
                self._run_job(job)
            finally:
                self.current = None

    def _run_job(self, job: Job) -> None:
        lim = self.engine.limits
        self.engine._start(job)
        try:
            self.conn.send_bytes(job.data)
        except (OSError, ValueError):
            self._kill()
            self.engine._finish(job, "ERROR", error={
                "type": "RuntimeError", "message": "the worker process was gone; it is restarted"})
            return
        deadline = time.monotonic() + lim.job_timeout
        while True:
            if job.cancel_requested:
                self._kill()
                self.engine._finish(job, "CANCELLED", detail="cancelled while running; the "
                                    "worker was stopped and is restarted")
                return
            if time.monotonic() > deadline:
                self._kill()
                self.engine._finish(job, "ERROR", error={
                    "type": "TimeoutError",
                    "message": f"the job ran longer than this server's limit of "
                               f"{lim.job_timeout:g} s and was stopped (its worker process was "
                               "killed and is restarted)"})
                return
            try:
                ready = self.conn.poll(0.05)
                msg = self.conn.recv_bytes() if ready else None
            except (EOFError, OSError):
                code = self.proc.exitcode if self.proc is not None else None
                self._kill()
                self.engine._finish(job, "ERROR", error={
                    "type": "RuntimeError",
                    "message": f"the worker process running the job died (exit code {code}; "
                               "out of memory?); it is restarted"})
                return
            if msg is None:
                continue  # a dead worker shows as end-of-file on the next poll
            tag, body = msg[:1], msg[1:]
            if tag == b"P":
                self.engine._event(job, "print", {"text": body.decode("utf-8", "replace")})
            elif tag == b"R":
                self.engine._finish(job, "COMPLETED", result=bytes(body))
                return
            elif tag == b"E":
                self.engine._finish(job, "ERROR", error=json.loads(body))
                return

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
        self.cond = threading.Condition()
        self.runners = [ModelRunner(self, spec) for spec in specs]

    def start(self) -> None:
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
            waiting = sum(1 for j in self.jobs.values() if j.key == key and j.status not in FINAL)
            if waiting >= self.limits.max_queued:
                raise OverflowError(waiting)
            job = Job(uuid.uuid4().hex, key, model, data)
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

    def _next(self, runner: ModelRunner) -> Job | None:
        with self.cond:
            if not runner.queue:
                self.cond.wait(0.5)
            if not runner.queue or runner.stopping:
                return None
            job = runner.queue.popleft()
            self._positions(runner)
            return job

    def _positions(self, runner) -> None:
        if runner is None:
            return
        for i, j in enumerate(runner.queue):
            j.push("status", j.view(i + 1))
        self.cond.notify_all()

    def _start(self, job: Job) -> None:
        with self.cond:
            job.status = "RUNNING"
            job.started = time.time()
            job.push("status", job.view())
            self.cond.notify_all()

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
