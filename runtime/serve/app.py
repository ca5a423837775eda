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
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..remote import protocol
from .engine import FINAL, Engine
from .execute import JobError, check_header

ANONYMOUS = "anonymous"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "protocol": protocol.PROTOCOL_VERSION}
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

    def caller(request: Request) -> str:
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
        if job is None and hasattr(engine, "recall"):  # forgotten here, kept on disk
            job = engine.recall(job_id, key)
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

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request, key: str = Depends(caller)) -> Any:
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
        try:
            header = protocol.read_header(bytes(data))
            check_header(header)
        except protocol.ProtocolError as exc:
            return _refuse(400, "ProtocolError", str(exc))
        except JobError as exc:
            return JSONResponse({"error": exc.info}, status_code=400)
        try:
            job = engine.submit(key, header["model"], bytes(data))
        except LookupError:
            names = sorted(n for m in engine.models().values() for n in m["names"][:1])
            return _refuse(400, "ValueError", f"this server does not serve model "
                           f"{header['model']!r}; it serves: {', '.join(names)}")
        except OverflowError:
            return _refuse(429, "RuntimeError", f"this API key has {engine.limits.max_queued} "
                           "jobs waiting or running, the server's limit: wait for one to end")
        return engine.view(job)

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

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, key: str = Depends(caller)) -> StreamingResponse:
        job = job_of(job_id, key)

        async def stream():
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
                        yield f"event: {name}\ndata: {json.dumps(payload)}\n\n"
                        if name == "status" and payload.get("status") in FINAL:
                            return
                    if fresh:
                        continue
                    try:
                        await asyncio.wait_for(ready.wait(), 1.0)
                    except TimeoutError:
                        # A heartbeat: where the job is now (elapsed time, queue position).
                        yield f"event: status\ndata: {json.dumps(engine.view(job))}\n\n"
            finally:
                job.waiters.remove((loop, ready))

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


def _refuse(code: int, type_name: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": type_name, "message": message}}, status_code=code)
