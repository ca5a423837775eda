"""The Ray engine: ``python -m runtime.serve --engine ray --replicas N``.

Each served model runs in N Ray actors (replicas), behind the same HTTP API and
the same job bookkeeping as the local engine (``Engine``: jobs, queues per API
key, statuses, events).  Ray actors rather than Ray Serve: the server already
has its HTTP layer, queue, cancel and time limit; an actor is one process we
can kill and start again, which is exactly what a timeout, a cancel or a job
that changed the model needs; Serve would add a second HTTP/routing layer and
its own request queue in front of ours, with no way to kill one request.

Only bytes travel, through Ray's object store: a job is the client's request
message as received; a replica's method is a streaming generator that yields
tagged messages (the worker's protocol, ``worker.py``): ``P`` print output,
``R`` the reply message (safetensors + JSON), ``E`` an error (JSON), ``D`` an
error after which the replica must be replaced (the job changed the model).
Nothing the client receives is a pickle.

One thread per replica takes jobs from the model's queue (one job at a time per
replica).  A job that runs past the time limit, is cancelled while running,
or whose replica dies, takes the replica with it: the actor is killed, the job
ends (ERROR or CANCELLED, with a clear message) and a fresh actor is started
at once.  Ray is imported only here, and only when this engine is used.
"""

from __future__ import annotations

import collections
import json
import os
import queue as queue_mod
import signal
import threading
import time

from .engine import FINAL, Engine, Job, Limits
from .results import Persistent


class Printer:
    """``print`` inside a job: the text goes to the client (``P`` messages), up to
    ``limit`` bytes."""

    def __init__(self, send, limit: int) -> None:
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
        self.send(b"P" + data)


class ReplicaActor:
    """One replica of one model, in a Ray worker process (wrapped with ``ray.remote``)."""

    def __init__(self, spec: str, max_result: int, max_print: int,
                 threads: int | None = None) -> None:
        self.spec = spec
        self.max_result = max_result
        self.max_print = max_print
        self.failure = None
        try:
            if threads:  # Ray caps an actor at its CPUs (OMP_NUM_THREADS); a run's sums
                import torch  # depend on the thread count, so it is an option

                torch.set_num_threads(threads)
            from .execute import ModelGuard
            from .worker import load_model, names_for

            self.model = load_model(spec)
            self.guard = ModelGuard(self.model._module)
            self.names = names_for(spec, self.model)
        except BaseException as exc:  # noqa: BLE001 - reported by ready()
            self.failure = f"{type(exc).__name__}: {exc}"

    def ready(self) -> bytes:
        if self.failure is not None:
            return b"F" + json.dumps({"message": self.failure}).encode()
        return b"Y" + json.dumps({"names": self.names, "pid": os.getpid()}).encode()

    def run(self, data: bytes):
        """Run one job; yields the tagged messages, the last one R, E or D."""
        import torch

        from runtime.remote import protocol

        from .execute import JobError, run_job

        out: queue_mod.Queue = queue_mod.Queue()

        def work() -> None:
            grad = torch.is_grad_enabled()
            try:
                header, tensors = protocol.unpack(data)
                reply = run_job(self.model, header, tensors, Printer(out.put, self.max_print),
                                self.max_result)
            except JobError as exc:
                result = b"E" + json.dumps(exc.info, default=str).encode()
            except protocol.ProtocolError as exc:
                result = b"E" + json.dumps({"type": "ProtocolError",
                                            "message": str(exc)}).encode()
            except BaseException as exc:  # noqa: BLE001 - a bug of ours, not the user's
                result = b"E" + json.dumps({"type": type(exc).__name__,
                                            "message": f"server error: {exc}"}).encode()
            else:
                result = b"R" + reply
            finally:
                torch.set_grad_enabled(grad)
            changes = self.guard.changes()
            if changes:
                message = ("the job changed the served model (" + "; ".join(changes) + "); "
                           "writes through .output/.input are the only writes a job may make. "
                           "The replica is being replaced for the next job.")
                result = b"D" + json.dumps({"type": "RuntimeError", "message": message}).encode()
            out.put(result)

        thread = threading.Thread(target=work, name="intervene-job", daemon=True)
        thread.start()
        while True:
            msg = out.get()
            yield msg
            if msg[:1] != b"P":
                break
        thread.join()


class Replica(threading.Thread):
    """The thread that owns one actor and feeds it jobs from its model's queue."""

    def __init__(self, model: RayModel, index: int) -> None:
        super().__init__(daemon=True, name=f"intervene-ray-{model.spec}-{index}")
        self.model = model
        self.engine = model.engine
        self.index = index
        self.state = "starting"  # starting | ready | restarting | failed
        self.failure = ""
        self.actor = None
        self.pid: int | None = None
        self.restarts = 0
        self.current: Job | None = None

    # -- the actor -----------------------------------------------------------------------------
    def _spawn(self) -> None:
        import ray

        eng = self.engine
        lim = eng.limits
        self.state = "restarting" if self.restarts else "starting"
        cls = ray.remote(ReplicaActor).options(
            num_cpus=eng.replica_cpus, num_gpus=eng.replica_gpus, max_restarts=0,
            max_concurrency=1, name=None)
        actor = cls.remote(self.model.spec, lim.max_result, lim.max_print, eng.replica_threads)
        self.actor = actor
        ref = actor.ready.remote()
        deadline = time.monotonic() + lim.load_timeout
        while time.monotonic() < deadline and not self.model.stopping:
            try:
                done, _ = ray.wait([ref], timeout=0.2)
                if not done:
                    continue
                msg = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the actor died while loading
                self.failure = f"the Ray replica did not start: {type(exc).__name__}: {exc}"
                break
            if msg[:1] == b"Y":
                info = json.loads(msg[1:])
                self.model.names = info["names"]
                self.pid = info["pid"]
                self.state = "ready"
                return
            self.failure = json.loads(msg[1:])["message"]
            break
        self._kill()
        self.state = "failed"
        self.failure = self.failure or f"the Ray replica for {self.model.spec!r} did not start"

    def _kill(self) -> None:
        actor, self.actor, self.pid = self.actor, None, None
        if actor is not None:
            import ray

            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001, S110 - already gone
                pass

    def _replace(self) -> None:
        """The actor is gone or must go: start a fresh one now, so the replica comes back
        before the next job."""
        self._kill()
        if not self.model.stopping:
            self.restarts += 1
            self._spawn()

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug of ours: no job may hang because of it
            self.state = "failed"
            self.failure = f"the replica stopped: {type(exc).__name__}: {exc}"
            self._kill()
            if self.current is not None:
                self.engine._finish(self.current, "ERROR", error={
                    "type": "RuntimeError", "message": self.failure})
            self.model.replica_failed()
            raise

    def _loop(self) -> None:
        self._spawn()
        while not self.model.stopping:
            if self.state == "failed":
                self.model.replica_failed()
                return
            job = self.engine._take(self.model)
            if job is None:
                continue
            self.current = job
            try:
                self._run_job(job)
            finally:
                self.current = None

    def _run_job(self, job: Job) -> None:
        import ray

        eng = self.engine
        lim = eng.limits
        eng._start(job)
        try:
            stream = self.actor.run.remote(job.data)
        except Exception as exc:  # noqa: BLE001
            eng._finish(job, "ERROR", error={
                "type": "RuntimeError",
                "message": f"the Ray replica was gone ({type(exc).__name__}); it is restarted"})
            self._replace()
            return
        deadline = time.monotonic() + lim.job_timeout
        while True:
            if job.cancel_requested:
                eng._finish(job, "CANCELLED", detail="cancelled while running; the Ray "
                            "replica was stopped and is restarted")
                self._replace()
                return
            if time.monotonic() > deadline:
                eng._finish(job, "ERROR", error={
                    "type": "TimeoutError",
                    "message": f"the job ran longer than this server's limit of "
                               f"{lim.job_timeout:g} s and was stopped (its Ray replica was "
                               "killed and is restarted)"})
                self._replace()
                return
            try:
                ready, _ = ray.wait([stream], timeout=0.05)
                if not ready:
                    continue
                msg = ray.get(next(stream))
            except StopIteration:
                msg = None
            except ray.exceptions.RayTaskError as exc:  # our code in the replica raised
                eng._finish(job, "ERROR", error={
                    "type": "RuntimeError",
                    "message": f"server error in the Ray replica: {exc.cause!r}; the replica "
                               "is restarted"})
                self._replace()
                return
            except Exception as exc:  # noqa: BLE001 - ActorDiedError & co.
                eng._finish(job, "ERROR", error={
                    "type": "RuntimeError",
                    "message": f"the Ray replica running the job died ({type(exc).__name__}; "
                               "out of memory, or its node went away?); it is restarted"})
                self._replace()
                return
            if msg is None:
                eng._finish(job, "ERROR", error={
                    "type": "RuntimeError",
                    "message": "the Ray replica ended the job without a result; it is "
                               "restarted"})
                self._replace()
                return
            tag, body = msg[:1], msg[1:]
            if tag == b"P":
                eng._event(job, "print", {"text": body.decode("utf-8", "replace")})
            elif tag == b"R":
                eng._finish(job, "COMPLETED", result=bytes(body))
                return
            elif tag == b"E":
                eng._finish(job, "ERROR", error=json.loads(body))
                return
            elif tag == b"D":
                eng._finish(job, "ERROR", error=json.loads(body))
                self._replace()
                return


class RayModel:
    """One served model: its queue and its replicas (what ``Engine`` calls a runner)."""

    def __init__(self, engine: RayEngine, spec: str, replicas: int) -> None:
        self.engine = engine
        self.spec = spec
        self.names: list[str] = [spec]
        self.queue: collections.deque[Job] = collections.deque()
        self.stopping = False
        self.replicas = [Replica(self, i) for i in range(replicas)]

    @property
    def state(self) -> str:
        states = {r.state for r in self.replicas}
        if states & {"ready", "restarting"}:  # a replica coming back is not a model loading
            return "ready"
        return "starting" if "starting" in states else "failed"

    @property
    def failure(self) -> str:
        return next((r.failure for r in self.replicas if r.failure), "")

    @property
    def restarts(self) -> int:
        return sum(r.restarts for r in self.replicas)

    def start(self) -> None:
        for r in self.replicas:
            r.start()

    def stop(self) -> None:
        self.stopping = True
        with self.engine.cond:
            self.engine.cond.notify_all()
        for r in self.replicas:
            r.join(5)
            r._kill()

    def replica_failed(self) -> None:
        """A replica could not start: when none is left, fail what waits (never hang)."""
        if self.state != "failed":
            return
        with self.engine.cond:
            while self.queue:
                self.engine._finish_locked(self.queue.popleft(), "ERROR", error={
                    "type": "RuntimeError",
                    "message": f"the server could not load model {self.spec!r}: "
                               f"{self.failure}"})


class RayEngine(Persistent, Engine):
    """``Engine`` with each model in ``replicas`` Ray actors.

    ``address``: None starts a local Ray instance on this machine (loopback only);
    ``"auto"`` or ``"HOST:PORT"`` joins a running cluster (``ray start --head``).
    ``replica_cpus`` / ``replica_gpus``: what Ray reserves for each replica;
    ``replica_threads``: torch's threads in a replica (default: Ray's, the replica's
    CPUs).  Results equal a local run bit for bit when the thread counts are equal.
    """

    def __init__(self, specs: list[str], limits: Limits | None = None, *, replicas: int = 1,
                 address: str | None = None, num_cpus: int | None = None,
                 replica_cpus: float = 1.0, replica_gpus: float = 0.0,
                 replica_threads: int | None = None) -> None:
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        super().__init__([], limits)
        self.replicas = replicas
        self.address = address
        self.num_cpus = num_cpus
        self.replica_cpus = replica_cpus
        self.replica_gpus = replica_gpus
        self.replica_threads = replica_threads
        self._started_ray = False
        self.runners = [RayModel(self, spec, replicas) for spec in specs]

    def start(self) -> None:
        import ray

        if not ray.is_initialized():
            # ray.init sets its own SIGTERM handler (sys.exit); keep the server's (uvicorn
            # shuts down cleanly: in-flight jobs end, the actors and Ray stop).
            main = threading.current_thread() is threading.main_thread()
            previous = signal.getsignal(signal.SIGTERM) if main else None
            if self.address is None:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False,
                         configure_logging=False)
            else:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self._started_ray = True
        super().start()

    def close(self) -> None:
        super().close()
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def models(self) -> dict[str, dict]:
        out = super().models()
        for r in self.runners:
            out[r.spec]["replicas"] = [{"state": p.state, "restarts": p.restarts,
                                        "busy": p.current is not None} for p in r.replicas]
        return out

    def _take(self, model: RayModel) -> Job | None:
        """The next queued job of ``model`` (None after a short wait without one)."""
        with self.cond:
            if not model.queue:
                self.cond.wait(0.5)
            if not model.queue or model.stopping:
                return None
            job = model.queue.popleft()
            for i, j in enumerate(model.queue):
                j.push("status", j.view(i + 1))
            self.cond.notify_all()
            return job


__all__ = ["FINAL", "RayEngine", "ReplicaActor"]
