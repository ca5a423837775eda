"""The HTTP surface (FastAPI): thin routes over the ``Engine``, all under ``/v1``.

- ``GET  /v1/health``: up, and the state of each model (no key needed)
- ``GET  /v1/env``: versions, protocol, models, limits
- ``POST /v1/jobs``: a job message (``runtime.remote.protocol``) -> ``{"id", "status"}``
- ``GET  /v1/jobs/{id}``: its status (and error)
- ``GET  /v1/jobs/{id}/events``: server-sent events: ``status`` and ``print``
- ``GET  /v1/jobs/{id}/result``: the reply message of a completed job
- ``POST /v1/jobs/{id}/cancel``

With API keys (``Authorization: Bearer KEY`` or ``X-API-Key``), every route but
health needs one, and a key sees only its own jobs.  Without keys (loopback
only, see ``__main__``) every caller shares one anonymous key.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import platform
import time
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..remote import phases, protocol
from .engine import FINAL, Engine, Job
from .execute import JobError, check_header

ANONYMOUS = "anonymous"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from compiler.version import compiler_version

    out = {"python": platform.python_version(), "protocol": protocol.PROTOCOL_VERSION,
           "compiler": compiler_version()}  # a job must have been compiled by this version
    for pkg in ("intervene", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def create_app(engine: Engine, api_keys: set[str] | None = None, *,
               manage_engine: bool = True) -> FastAPI:
    """The app; ``manage_engine``: start the engine's workers on startup and stop them
    on shutdown."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.close()

    app = FastAPI(title="intervene", lifespan=lifespan)
    keys = sorted(api_keys) if api_keys else None

    async def caller(request: Request) -> str:
        # async: FastAPI runs a plain `def` dependency in a thread pool, a thread hand-over
        # (and a GIL wait) on every request, for a few string compares.
        if keys is None:
            return ANONYMOUS
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            raise HTTPException(401, "an API key is required (Authorization: Bearer KEY)")
        ok = False
        for k in keys:  # compare with every key, in constant time each
            ok |= hmac.compare_digest(k.encode(), given.encode())
        if not ok:
            raise HTTPException(403, "this API key is not accepted")
        return given

    def job_of(job_id: str, key: str):
        job = engine.jobs.get(job_id)
        if job is None:  # forgotten here, kept on disk
            job = engine.recall(job_id, key)
        if job is None and engine.lost(job_id):
            raise HTTPException(410, {"type": "JobLost", "message": lost_message(job_id)})
        if job is None or (keys is not None and not hmac.compare_digest(job.key, key)):
            raise HTTPException(404, f"no job {job_id}")
        return job

    @app.get("/v1/health")
    def health() -> dict:
        return {"status": "ok", "ready": engine.ready(),
                "models": {k: v["state"] for k, v in engine.models().items()}}

    @app.get("/v1/env")
    def env(key: str = Depends(caller)) -> dict:
        return {**_versions(), "models": engine.models(), "limits": engine.limits.public()}

    async def accept(request: Request, key: str) -> Any:
        """The job of a submit request, queued; or the response that refuses it."""
        t0 = time.perf_counter()
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > engine.limits.max_request:
            return _refuse(413, "ValueError", f"the job is over the server's limit of "
                           f"{engine.limits.max_request // 2**20} MiB")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > engine.limits.max_request:
                return _refuse(413, "ValueError", f"the job is over the server's limit of "
                               f"{engine.limits.max_request // 2**20} MiB")
        t1 = time.perf_counter()
        data = bytes(data)
        try:
            header = protocol.read_header(data)
            check_header(header)
        except protocol.ProtocolError as exc:
            return _refuse(400, "ProtocolError", str(exc))
        except JobError as exc:
            return JSONResponse({"error": exc.info}, status_code=400)
        try:
            job = engine.submit(key, header["model"], data)
        except LookupError:
            names = sorted(n for m in engine.models().values() for n in m["names"][:1])
            return _refuse(400, "ValueError", f"this server does not serve model "
                           f"{header['model']!r}; it serves: {', '.join(names)}")
        except OverflowError:
            return _refuse(429, "RuntimeError", f"this API key has {engine.limits.max_queued} "
                           "jobs waiting or running, the server's limit: wait for one to end")
        if phases.PATH is not None:
            phases.stamp(job.id, "a0 submit route", t0)
            phases.stamp(job.id, "a1 body read", t1)
            phases.stamp(job.id, "a2 queued")
        return job

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request, key: str = Depends(caller)) -> Any:
        job = await accept(request, key)
        return engine.view(job) if isinstance(job, Job) else job

    @app.post("/v1/run")
    async def run(request: Request, key: str = Depends(caller)) -> Any:
        """Submit a job and follow it in one response: frames (``protocol.read_frames``)
        with its status (the first names the job), print output, and the result or the
        final status.  A client that loses this stream asks for the job by its id."""
        job = await accept(request, key)
        if not isinstance(job, Job):
            return job

        async def frames():
            first = True
            async for name, payload, final in follow(job):
                if name == "status" and not (first or final):
                    continue  # queued -> running: the next heartbeat tells (one wake-up less)
                first = False
                if final and payload.get("status") == "COMPLETED" and job.result is not None:
                    result = job.result
                    head = protocol.frame_head(b"R", len(result))
                    if len(result) < 2**20:
                        yield head + result
                    else:  # no copy of a big result
                        yield head
                        yield result
                    phases.stamp(job.id, "a5 result sent")
                    return
                tag = b"P" if name == "print" else b"S"  # a print, a status or a heartbeat
                yield protocol.frame(tag, json.dumps(payload).encode())

        return StreamingResponse(frames(), media_type=protocol.STREAM_TYPE,
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/v1/jobs/{job_id}")
    def status(job_id: str, key: str = Depends(caller)) -> dict:
        return engine.view(job_of(job_id, key))

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, key: str = Depends(caller)) -> dict:
        job = job_of(job_id, key)
        engine.cancel(job)
        return engine.view(job)

    @app.get("/v1/jobs/{job_id}/result")
    def result(job_id: str, key: str = Depends(caller)) -> Response:
        job = job_of(job_id, key)
        if job.status != "COMPLETED" or job.result is None:
            raise HTTPException(409, f"job {job_id} is {job.status}, it has no result")
        return Response(job.result, media_type="application/octet-stream")

    async def follow(job: Job):
        """``(event name, payload, final)`` for each event of ``job`` as it comes, and a
        ``heartbeat`` (its status now) each second of quiet; ends after the final status."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        job.waiters.append((loop, ready))
        sent = 0
        try:
            while True:
                ready.clear()
                fresh = job.events[sent:]
                sent += len(fresh)
                for name, payload in fresh:
                    final = name == "status" and payload.get("status") in FINAL
                    yield name, payload, final
                    if final:
                        return
                if fresh:
                    continue
                try:
                    await asyncio.wait_for(ready.wait(), 1.0)
                except TimeoutError:
                    # A heartbeat: where the job is now (elapsed time, queue position).
                    yield "heartbeat", engine.view(job), False
        finally:
            job.waiters.remove((loop, ready))

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, key: str = Depends(caller)) -> StreamingResponse:
        job = job_of(job_id, key)

        async def stream():
            async for name, payload, final in follow(job):
                name = "status" if name == "heartbeat" else name
                yield f"event: {name}\ndata: {json.dumps(payload)}\n\n"
                if final:
                    phases.stamp(job.id, "a5 final event sent")

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


def lost_message(job_id: str) -> str:
    return (f"the server restarted; job {job_id} was lost while running or waiting in the "
            "queue (it did not finish), resubmit it")


def _refuse(code: int, type_name: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": type_name, "message": message}}, status_code=code)
