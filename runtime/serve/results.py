"""Jobs and results kept on disk (``--results-dir DIR --results-ttl SECONDS``).

Every job's record (status, error, times; the API key only as a SHA-256) is
written to ``DIR/<id>.json`` when it is queued, starts and ends, and a
completed job's reply message to ``DIR/<id>.result``.  So:

- a client that lost its connection (or the server's memory forgot the job,
  ``Limits.keep_finished``) fetches the status and result from disk, for
  ``ttl`` seconds after the job ended;
- a server that restarts finds the jobs that were queued or running when it
  stopped and ends them: ERROR, "the server restarted while the job ran" (or
  "... waited in the queue"), which is what clients that ask are told.

``Persistent`` is the mixin that adds this to an engine (``LocalEngine``,
``RayEngine``); without a store the engine behaves as before.  Writes are
atomic (a temporary file, then ``os.replace``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import threading
import time
from typing import Any

from .engine import FINAL, Engine, Job

_ID = re.compile(r"^[0-9a-f]{32}$")
RESTARTED_RUNNING = ("the server restarted while the job ran; it did not finish. Submit it "
                     "again.")
RESTARTED_QUEUED = ("the server restarted while the job waited in the queue; it did not run. "
                    "Submit it again.")

SHUTDOWN_RUNNING = "the server shut down while the job ran; it did not finish. Submit it again."
SHUTDOWN_QUEUED = ("the server shut down while the job waited in the queue; it did not run. "
                   "Submit it again.")


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ResultStore:
    """The records and results of jobs in one folder, kept ``ttl`` seconds after the end."""

    def __init__(self, root: str, ttl: float = 86400.0) -> None:
        if ttl <= 0:
            raise ValueError("the results TTL must be positive")
        self.root = os.path.abspath(root)
        self.ttl = ttl
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self._swept = 0.0
        self._lock = threading.Lock()  # one writer at a time: records are never stale
        self._n = 0

    def _path(self, job_id: str, ext: str) -> str | None:
        if not _ID.match(job_id):  # never a path the caller chose
            return None
        return os.path.join(self.root, f"{job_id}.{ext}")

    def _write(self, path: str, data: bytes) -> None:
        self._n += 1  # under self._lock or at startup
        tmp = f"{path}.{os.getpid()}-{self._n}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def record(self, job: Job) -> None:
        """Write the job's record (and its result, once it has one) as it is now.  The
        threads that queue, start and end jobs all write: each write reads the job under
        the lock, so the last one written is the latest state."""
        with self._lock:
            self._record(job)

    def _record(self, job: Job) -> None:
        if job.status == "COMPLETED" and job.result is not None:
            self._write(self._path(job.id, "result"), job.result)
        rec = {"id": job.id, "key": _key_hash(job.key), "model": job.model,
               "status": job.status, "created": job.created, "started": job.started,
               "finished": job.finished, "error": job.error, "detail": job.detail}
        self._write(self._path(job.id, "json"), json.dumps(rec).encode())

    def _read(self, job_id: str) -> dict | None:
        path = self._path(job_id, "json")
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            return None

    def load(self, job_id: str, key: str) -> Job | None:
        """The job as last recorded, if ``key`` owns it (None otherwise)."""
        rec = self._read(job_id)
        if rec is None or not hmac.compare_digest(rec.get("key", ""), _key_hash(key)):
            return None
        job = Job(rec["id"], key, rec["model"], b"", status=rec["status"],
                  created=rec["created"], started=rec["started"], finished=rec["finished"],
                  error=rec["error"], detail=rec.get("detail") or "")
        if job.status == "COMPLETED":
            try:
                with open(self._path(job_id, "result"), "rb") as f:
                    job.result = f.read()
            except OSError:
                job.status, job.error = "ERROR", {
                    "type": "RuntimeError",
                    "message": "the job completed but its result is gone from the server's "
                               "results folder"}
        if job.status in FINAL:
            job.push("status", job.view())  # so an event stream ends at once
        return job

    def recover(self) -> int:
        """At startup: end every job that was queued or running when the server stopped.
        Returns how many."""
        count = 0
        now = time.time()
        for name in sorted(os.listdir(self.root)):
            if not name.endswith(".json"):
                continue
            rec = self._read(name[:-5])
            if rec is None or rec.get("status") in FINAL:
                continue
            ran = rec.get("status") == "RUNNING"
            rec.update(status="ERROR", finished=now, error={
                "type": "JobLost",
                "message": RESTARTED_RUNNING if ran else RESTARTED_QUEUED})
            self._write(os.path.join(self.root, name), json.dumps(rec).encode())
            count += 1
        self.sweep(force=True)
        return count

    def sweep(self, force: bool = False) -> int:
        """Delete what ended more than ``ttl`` seconds ago (at most once a minute)."""
        now = time.time()
        if not force and now - self._swept < 60:
            return 0
        self._swept = now
        gone = 0
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if name.endswith(".tmp"):
                try:
                    if now - os.path.getmtime(path) > 3600:
                        os.unlink(path)
                except OSError:
                    pass
                continue
            if not name.endswith(".json"):
                continue
            rec = self._read(name[:-5])
            if rec is None or rec.get("finished") is None or now - rec["finished"] <= self.ttl:
                continue
            for ext in ("json", "result"):
                try:
                    os.unlink(os.path.join(self.root, f"{name[:-5]}.{ext}"))
                except OSError:
                    pass
            gone += 1
        return gone


class Persistent:
    """Mixin for an ``Engine``: with ``store`` set, every job is recorded on disk."""

    store: ResultStore | None = None

    def start(self) -> None:
        if self.store is not None:
            self.store.recover()
        super().start()

    def close(self) -> None:
        # In-flight jobs fail (not "cancelled": nobody asked), saying why; a client that
        # asks after a restart reads the same from the results folder.
        with self.cond:
            for job in list(self.jobs.values()):
                if job.status not in FINAL:
                    ran = job.status == "RUNNING"
                    self._finish_locked(job, "ERROR", error={
                        "type": "JobLost", "message": SHUTDOWN_RUNNING if ran
                        else SHUTDOWN_QUEUED})
        super().close()

    def submit(self, key: str, model: str, data: bytes) -> Job:
        job = super().submit(key, model, data)
        if self.store is not None:
            self.store.record(job)
            self.store.sweep()
        return job

    def _start(self, job: Job) -> bool:
        started = super()._start(job)
        if self.store is not None and started:
            self.store.record(job)
        return started

    def _finish_locked(self, job: Job, status: str, **kw: Any) -> None:
        before = job.status
        super()._finish_locked(job, status, **kw)
        if self.store is not None and job.status != before:
            self.store.record(job)

    def recall(self, job_id: str, key: str) -> Job | None:
        """A job this server no longer holds in memory, from the results folder."""
        return self.store.load(job_id, key) if self.store is not None else None


class LocalEngine(Persistent, Engine):
    """The local engine (a worker process per model), with the optional results folder."""
