"""The Ray engine: ``python -m runtime.serve --engine ray --replicas N``.

Each served model runs in N Ray actors (replicas), behind the same HTTP API and
the same job bookkeeping as the local engine (``Engine``: jobs, queues per API
key, statuses, events).  Ray actors rather than Ray Serve: the server already
has its HTTP layer, queue, cancel and time limit; an actor is one process we
can kill and start again, which is exactly what a timeout, a cancel or a job
that changed the model needs; Serve would add a second HTTP/routing layer and
its own request queue in front of ours, with no way to kill one request.

Only bytes travel, through Ray's object store: a batch of jobs is the local
worker's batch message (``worker.pack_batch``: the clients' request messages as
received); a replica's ``run_batch`` is a streaming generator that yields the
worker's tagged messages per job (``P`` print output, ``R`` the reply message,
safetensors + JSON, ``E`` an error, JSON, ``A`` run it again alone), then ``D``
or ``X`` (a job changed the model: replace the replica).  Nothing the client
receives is a pickle.

One thread per replica takes batches from the model's queue (``Engine._next_batch``:
the same window and caps as the local engine; jobs share forward passes inside
a replica, ``batch.run_batch``).  A job that runs past the time limit, is
cancelled while running, or whose replica dies, takes the replica with it: the
actor is killed, the job ends (ERROR or CANCELLED, with a clear message), the
other jobs of its batch run again (alone), and a fresh actor is started at once.  Ray is imported only here, and only when this engine is used.
"""

from __future__ import annotations

import collections
import json
import os
import queue as queue_mod
import signal
import threading
import time

from .engine import FINAL, Engine, Feeder, Job, Limits, load_error
from .results import Persistent


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

    def run_batch(self, data: bytes):
        """Run a batch message (``worker.pack_batch``): the jobs share forward passes where
        they can (``batch.run_batch``).  Yields ``tag + job id + body`` per message (``P``,
        ``R``, ``E``, ``A``: run it again alone), then ``D`` (done) or ``X`` (a job changed
        the model: replace this replica; the jobs not answered run again)."""
        import torch

        from .batch import run_batch
        from .worker import unpack_batch

        jobs, max_jobs, max_tokens = unpack_batch(data)
        out: queue_mod.Queue = queue_mod.Queue()

        def reply(tag: bytes, job_id: str, body: bytes) -> None:
            out.put(tag + job_id.encode("ascii") + body)

        def work() -> None:
            grad = torch.is_grad_enabled()
            changed = True  # a bug of ours below: replace the replica to be safe
            try:
                changed = run_batch(self.model, self.guard, jobs, reply, self.max_result,
                                    self.max_print, max_jobs, max_tokens)
            finally:
                torch.set_grad_enabled(grad)
                out.put(b"X" if changed else b"D")

        thread = threading.Thread(target=work, name="intervene-batch", daemon=True)
        thread.start()
        while True:
            msg = out.get()
            yield msg
            if msg[:1] in (b"D", b"X"):
                break
        thread.join()


class Replica(Feeder):
    """The thread that owns one actor and feeds it jobs from its model's queue."""

    what = "replica"

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
        self.current: list[Job] | None = None

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

    # -- the loop (Feeder.run) ---------------------------------------------------------------------
    @property
    def _queue_owner(self) -> RayModel:
        return self.model

    def _fail_all(self) -> None:
        for job in self.current or ():
            self.engine._finish(job, "ERROR", error={
                "type": "RuntimeError", "message": self.failure})
        self.model.replica_failed()

    def _may_take(self) -> bool:
        if self.state == "failed":
            self.model.replica_failed()
            return False
        return True

    def _run_batch(self, jobs: list[Job]) -> None:
        """Send ``jobs`` to the actor as one batch and relay each job's outcome, as the
        local engine does with its worker: when the replica has to go (a cancel, the time
        limit, its death), the jobs it had not answered run again (alone, when the batch
        had several, so that the one at fault fails alone); a job that was alone gets the
        error."""
        import ray

        from .worker import pack_batch

        eng = self.engine
        lim = eng.limits
        jobs = [j for j in jobs if eng._start(j)]  # not those cancelled meanwhile
        if not jobs:
            return
        waiting = {j.id: j for j in jobs}

        def fail_or_retry(message: str, type_name: str = "RuntimeError") -> None:
            self._fail_or_requeue(jobs, waiting, message, type_name)

        try:
            stream = self.actor.run_batch.remote(pack_batch(
                [(j.id, j.data, j.alone) for j in jobs], lim.batch_max_jobs,
                lim.batch_max_tokens))
        except Exception as exc:  # noqa: BLE001
            fail_or_retry(f"the Ray replica was gone ({type(exc).__name__}); it is restarted")
            self._replace()
            return
        deadline = time.monotonic() + lim.job_timeout
        while True:
            cancelled = [j for j in waiting.values() if j.cancel_requested]
            if cancelled:
                for job in cancelled:
                    del waiting[job.id]
                    eng._finish(job, "CANCELLED", detail="cancelled while running; the Ray "
                                "replica was stopped and is restarted")
                eng._requeue(self.model, list(waiting.values()), alone=False)
                self._replace()
                return
            if time.monotonic() > deadline:
                fail_or_retry(f"the job ran longer than this server's limit of "
                              f"{lim.job_timeout:g} s and was stopped (its Ray replica was "
                              "killed and is restarted)", "TimeoutError")
                self._replace()
                return
            try:
                ready, _ = ray.wait([stream], timeout=0.05)
                if not ready:
                    continue
                msg = ray.get(next(stream))
            except StopIteration:
                msg = b"X"  # ended without saying so: start afresh
            except ray.exceptions.RayTaskError as exc:  # our code in the replica raised
                fail_or_retry(f"server error in the Ray replica: {exc.cause!r}; the replica "
                              "is restarted")
                self._replace()
                return
            except Exception as exc:  # noqa: BLE001 - ActorDiedError & co.
                fail_or_retry(f"the Ray replica running the job died ({type(exc).__name__}; "
                              "out of memory, or its node went away?); it is restarted")
                self._replace()
                return
            tag = msg[:1]
            if tag in (b"D", b"X"):
                # X: a job changed the model (it was failed); the rest did not run.
                eng._requeue(self.model, list(waiting.values()), alone=False)
                if tag == b"X":
                    self._replace()
                return
            eng._relay(self.model, waiting, msg)


class RayModel:
    """One served model: its queue and its replicas (what ``Engine`` calls a runner)."""

    def __init__(self, engine: RayEngine, spec: str, replicas: int) -> None:
        self.engine = engine
        self.spec = spec
        self.names: list[str] = [spec]
        self.queue: collections.deque[Job] = collections.deque()
        self.stopping = False
        self.busy_at = -1e9  # time.monotonic() of the last submit that found company
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
                self.engine._finish_locked(self.queue.popleft(), "ERROR",
                                           error=load_error(self.spec, self.failure))


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

__all__ = ["FINAL", "RayEngine", "ReplicaActor"]
