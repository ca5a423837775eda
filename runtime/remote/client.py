"""The client side of ``remote=True``: send one block, wait, bind what comes back.

``with model.trace(x, remote=True) as tracer:`` opens a ``RemoteTracer``.  The
compiled code registers its lanes as for a local block, but on leaving the
``with`` nothing runs here: the block's free variables (``Block.free``, from
the compiler) are read from the calling frame, checked and encoded, and sent
with the function's source text to the server (``CONFIG.host``), which
recompiles and validates the block and runs it on its own copy of the
model.  The saved variables that come back are written into the lanes'
closure cells, which are the function's own variables, so the code after the
block sees them exactly as after a local run; ``tracer.result`` and
``tracer.cache()`` are filled the same way.  While waiting, a one-line status
goes to stderr (when it is a terminal) and the block's ``print`` output to
stdout; an error on the server is raised here with its type, message, and a
traceback entry at the user's own line.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import json
import sys
import threading
import time
import types
from typing import Any

from compiler.version import compiler_version  # sent; the server checks it

from ..tracer import Tracer
from . import phases, protocol
from .helpers import encode_sent, server_module
from .protocol import PROTOCOL_VERSION

FINAL = ("COMPLETED", "ERROR", "CANCELLED")


class RemoteError(RuntimeError):
    """An error on the server (or in talking to it) with no matching local type."""

    def __init__(self, message: str, type_name: str = "RemoteError", line: int | None = None):
        super().__init__(message)
        self.type_name = type_name
        self.line = line


def remote_tracer(handle, model, kind: str, index: int, args: tuple, kwargs: dict, frame):
    tracer = RemoteTracer(model, kind, handle.plan.blocks[index], handle.sites[index], args, kwargs)
    tracer._filename = handle.plan.filename
    tracer._handle = handle
    tracer._frame = frame
    return tracer


class RemoteTracer(Tracer):
    """A block that runs on the server; see the module docstring."""

    _handle = None
    _frame = None

    def cache(self, *args, **kwargs):
        raise RuntimeError("tracer.cache() of a remote block runs on the server only")

    def _execute(self) -> None:
        try:
            run_block(self)
        finally:
            self._frame = None
            self._handle = None


def model_name(root) -> str:
    """The name a server knows this model by (what ``LanguageModel(name)`` was given)."""
    name = getattr(root, "_remote_name", None)
    if name:
        return str(name)
    module = getattr(root, "_module", None)
    config = getattr(module, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if name:
        return str(name)
    raise RemoteError(
        f"{type(root).__name__} has no name a server could know it by: remote blocks run on "
        "models created from a name or folder (LanguageModel('smollm2-135m'))"
    )


def free_values(tracer: RemoteTracer) -> tuple[dict, dict]:
    """The block's free variables as the server needs them: ``(values, labels)``.

    Builtins and the modules the server provides are left out; a name that is not
    bound is left out too (the server then raises NameError at its line, as a
    local run would)."""
    block = tracer._block
    frame = tracer._frame
    local_vars = frame.f_locals if frame is not None else {}
    global_vars = frame.f_globals if frame is not None else {}
    values: dict = {}
    labels: dict = {}
    for name, line in block.free:
        if name == block.model:
            continue
        if name in local_vars:
            value = local_vars[name]
        elif name in global_vars:
            value = global_vars[name]
            if server_module(value):
                continue
        elif hasattr(builtins, name):
            continue
        else:
            continue
        values[name] = value
        labels[name] = f"variable `{name}` (read at line {line})"
    return values, labels


def request_for(tracer: RemoteTracer) -> bytes:
    """The job message of a remote block; errors for unsendable values come first."""
    block = tracer._block
    handle = tracer._handle
    src = handle.source if handle is not None else None
    if src is None:
        raise RemoteError("this block has no compiled source to send (compile it with @intervene)")
    if not block.model.isidentifier():
        raise RemoteError(
            f"line {block.line}: a remote block must trace a model held in a plain variable "
            f"(`model.{block.kind}(...)`), not `{block.model}`"
        )
    values, labels = free_values(tracer)
    # what the client binds after the block: its saves, and in a session the values a
    # later trace reads (the server, compiling the block alone, cannot know those)
    return pack_job(handle, tracer._root, block.index, values, labels, block.line, "block",
                    block.saved)


def pack_job(handle, root, index: int, values: dict, labels: dict, line: int, what: str,
             saved, **extra) -> bytes:
    """The job message of block (or session) ``index`` of ``handle``'s compiled source,
    sending ``values`` (``encode_sent``: what cannot be sent is said at ``line``) and the
    @intervene helpers they hold (as source, runtime/remote/helpers.py); ``saved``: the
    names the reply is to bind; ``extra``: more header fields."""
    src = handle.source
    trees, tensors, helpers = encode_sent(values, labels, line, what)
    header = {
        "protocol": PROTOCOL_VERSION,
        "compiler": compiler_version(),
        "model": model_name(root),
        "function": handle.plan.name,
        "source": src.text,
        "filename": src.filename,
        "first_line": src.first_line,
        "block": index,
        **extra,
        "values": trees,
        "saved": list(saved),
    }
    if helpers:
        header["helpers"] = helpers
    return protocol.pack(header, tensors)


def run_block(tracer: RemoteTracer) -> None:
    from ..config import CONFIG

    t0 = time.perf_counter()
    data = request_for(tracer)
    t1 = time.perf_counter()
    block = tracer._block
    client = Client(CONFIG.host, CONFIG.api_key)
    reply = client.run(data, filename=tracer._filename, line=block.line)
    t2 = time.perf_counter()
    header, tensors = protocol.unpack(reply)
    saved = protocol.decode_values(header.get("saved", {}), tensors, tracer._root)
    cells: dict[str, types.CellType] = {}
    for fn, _spec, _index in tracer._lanes:
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            cells.setdefault(name, cell)
    for name, value in saved.items():
        cell = cells.get(name)
        if cell is None:
            raise RemoteError(f"the server returned `{name}`, which this block does not save")
        cell.cell_contents = value
    if "result" in header:
        tracer._result = protocol.decode(header["result"], tensors, tracer._root)
    # Containers the block changed (outs.append(...)) change here too, in place.
    apply_mutated(header, tensors, tracer._root, tracer._frame)
    if phases.PATH is not None:
        for name, at in (("c0 start", t0), ("c1 encoded", t1), *client.stamps,
                         ("c8 replied", t2), ("c9 bound", time.perf_counter())):
            phases.stamp(client.job_id, name, at)


def apply_mutated(header: dict, tensors: dict, root, frame) -> None:
    """The lists and dicts a job changed on the server (its reply's ``mutated``), changed
    the same way, in place, where ``frame`` (None: nowhere) sees them."""
    mutated = protocol.decode_values(header.get("mutated", {}), tensors, root)
    frame_locals = frame.f_locals if frame is not None else {}
    frame_globals = frame.f_globals if frame is not None else {}
    for name, value in mutated.items():
        target = frame_locals.get(name, frame_globals.get(name))
        if isinstance(target, list) and isinstance(value, list):
            target[:] = value
        elif isinstance(target, dict) and isinstance(value, dict):
            target.clear()
            target.update(value)


# -- HTTP ---------------------------------------------------------------------------------
class Client:
    """Talks to one server: submit a job, follow its events, fetch its result."""

    # Tests set this to an httpx.Client of their own (e.g. FastAPI's TestClient).
    http_override: Any = None
    # After a job's stream broke: how long to keep trying to reach the server (seconds
    # without an answer), and how many times to reopen the stream of one job.
    reconnect_s = 10.0
    max_reconnects = 20

    def __init__(self, host: str, api_key: str | None, *, status_stream: Any = None) -> None:
        self.host = host
        self.api_key = api_key
        self.status = _StatusLine(status_stream if status_stream is not None else sys.stderr)
        self.job_id = ""
        self.stamps: list[tuple[str, float]] = []  # (phase, time) for runtime.remote.phases

    def _http(self):
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if Client.http_override is not None:
            Client.http_override.headers.update(headers)
            return contextlib.nullcontext(Client.http_override)
        return contextlib.nullcontext(_pooled(self.host, self.api_key))

    def run(self, data: bytes, filename: str = "<remote>", line: int = 0) -> bytes:
        """Send one job message; its reply message, or the job's error raised."""
        import httpx

        try:
            with self._http() as http:
                try:
                    final, result = self._run(http, data)
                except KeyboardInterrupt:
                    if self.job_id:
                        self._cancel(http, self.job_id)
                    raise
                finally:
                    self.status.clear()
        except httpx.TransportError as exc:  # before the server had the job
            raise ConnectionError(
                f"cannot reach the intervene server at {self.host} ({exc}); start one with "
                "`python -m runtime.serve --model NAME` or set INTERVENE_HOST / "
                "CONFIG.set_default_host(...)"
            ) from None
        if result is not None:
            return result
        if final["status"] == "CANCELLED":
            raise RemoteError(f"the job was cancelled on the server: {final.get('detail', '')}",
                              "Cancelled")
        raise error_from(final.get("error") or {}, filename, line)

    def _run(self, http, data: bytes) -> tuple[dict, bytes | None]:
        """One request (``POST /v1/run``) submits the job and streams its status, print
        output and result; ``(final status, result or None)``.  When that stream
        breaks after the server took the job, ask for the job again (``_recover``)."""
        import httpx

        old_server = False
        try:
            with http.stream("POST", "/v1/run", content=data,
                             headers={"Content-Type": "application/octet-stream"}) as resp:
                if resp.status_code in (404, 405):  # a server without /v1/run
                    old_server = True
                else:
                    if resp.status_code == 400:
                        resp.read()
                        _refused(resp)
                    _check(resp)
                    got = self._frames(http, resp)
                    if got is not None and (got[1] is not None or got[0]["status"] != "COMPLETED"):
                        return got
                broke: BaseException | None = None  # ended early, or completed without result
        except (httpx.TransportError, protocol.ProtocolError) as exc:
            if not self.job_id:
                raise
            broke = exc
        if old_server:
            self.job_id = self._submit(http, data)
        elif not self.job_id:
            raise RemoteError("the intervene server ended the stream before it took the job",
                              "Disconnected")
        return self._recover(http, self.job_id, broke)

    def _frames(self, http, resp) -> tuple[dict, bytes | None] | None:
        """Read a ``/v1/run`` stream: ``(final status, result)`` (the result None when
        it was not sent: fetch it); None when the stream ended before the job did.  It
        reads to the stream's end (right after the last frame), so that the connection
        goes back to the pool: closing a response before its end closes the connection,
        and the next job would pay for a new one."""
        outcome = None
        for tag, body in protocol.read_frames(resp.iter_bytes()):
            if outcome is not None:
                continue
            if tag == b"R":
                self.stamps.append(("c3 result read", time.perf_counter()))
                outcome = {"id": self.job_id, "status": "COMPLETED"}, body
                continue
            payload = json.loads(body)
            if tag == b"P":
                self.status.clear()
                sys.stdout.write(payload.get("text", ""))
                sys.stdout.flush()
            elif tag == b"S":
                if not self.job_id:
                    self.job_id = str(payload["id"])
                    self.stamps.append(("c2 submitted", time.perf_counter()))
                if payload["status"] in FINAL:
                    outcome = payload, None
                else:
                    self.status.show(payload)
        return outcome

    def _recover(self, http, job: str, cause: BaseException | None) -> tuple[dict, bytes | None]:
        """The job's outcome after its stream broke (or ended early): ask the server
        about it, follow its events again while it runs.  The server may be restarting:
        keep trying for ``reconnect_s`` seconds from the last answer, and reopen the
        stream at most ``max_reconnects`` times; a restarted server that lost the job
        says so (a ``RemoteError``)."""
        import httpx

        deadline = time.monotonic() + self.reconnect_s
        delay = 0.05
        reopened = 0
        while True:
            try:
                resp = http.get(f"/v1/jobs/{job}")
                if resp.status_code == 410:
                    raise RemoteError(_reason(resp), "JobLost")
                _check(resp)
                final = resp.json()
                if final["status"] not in FINAL:  # still there, queued or running
                    reopened += 1
                    if reopened > self.max_reconnects:
                        raise RemoteError(
                            f"the event stream of job {job} broke {reopened - 1} times; it is "
                            f"still {final['status']} on the server: ask for it later "
                            f"(GET {self.host}/v1/jobs/{job}, then /result)", "Disconnected")
                    final = self._follow(http, job)
                if final is not None:
                    if final["status"] == "COMPLETED":
                        return final, self._result(http, job)
                    return final, None
                deadline = time.monotonic() + self.reconnect_s  # it answered: a new window
                delay = 0.05
                continue
            except (httpx.TransportError, protocol.ProtocolError) as exc:
                cause = exc
            if time.monotonic() + delay > deadline:
                raise ConnectionError(
                    f"lost the connection to the intervene server at {self.host} while job "
                    f"{job} ran ({cause}) and could not reach it again within "
                    f"{self.reconnect_s:g} s; the job may still finish on the server: ask for "
                    f"it later (GET {self.host}/v1/jobs/{job}, then /result)") from None
            time.sleep(delay)  # only here, after a failure: the server is away
            delay = min(delay * 2, 0.5)

    def _result(self, http, job: str) -> bytes:
        resp = http.get(f"/v1/jobs/{job}/result")
        _check(resp)
        return resp.content

    def _submit(self, http, data: bytes) -> str:
        """``POST /v1/jobs`` (a server without ``/v1/run``): the job's id."""
        resp = http.post("/v1/jobs", content=data,
                         headers={"Content-Type": "application/octet-stream"})
        if resp.status_code == 400:
            _refused(resp)
        _check(resp)
        return resp.json()["id"]

    def _follow(self, http, job: str) -> dict | None:
        """Stream the job's events (server-sent) until it ends: its final status; None
        when the stream ended (or went quiet) before that."""
        import httpx

        try:
            with http.stream("GET", f"/v1/jobs/{job}/events") as resp:
                _check(resp)
                event = None
                for line in resp.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event:
                        payload = json.loads(line[5:].strip())
                        if event == "print":
                            self.status.clear()
                            sys.stdout.write(payload.get("text", ""))
                            sys.stdout.flush()
                        elif event == "status":
                            if payload["status"] in FINAL:
                                return payload
                            self.status.show(payload)
                        event = None
        except httpx.ReadTimeout:
            pass
        return None

    def _cancel(self, http, job: str) -> None:
        try:
            http.post(f"/v1/jobs/{job}/cancel")
        except Exception:  # noqa: BLE001, S110 - best effort: the user interrupted
            pass


_POOL: dict[tuple[str, str | None], Any] = {}  # (host, key) -> httpx.Client, oldest first
_POOL_MAX = 8
_POOL_LOCK = threading.Lock()


def _pooled(host: str, api_key: str | None):
    """One HTTP client (and its connections) per server and key, kept between jobs:
    making one costs more than a small job.  TCP_NODELAY: a request goes out as two writes
    (headers, then the job), and Nagle's algorithm would hold the second one back.  At most
    ``_POOL_MAX`` are kept (the least recently used one is closed); ``close_connections()``
    closes them all, and runs when the interpreter exits."""
    key = (host, api_key)
    with _POOL_LOCK:
        client = _POOL.pop(key, None)
        if client is None or client.is_closed:
            client = _new_client(host, api_key)
        _POOL[key] = client
        while len(_POOL) > _POOL_MAX:
            _POOL.pop(next(iter(_POOL))).close()
    return client


def _new_client(host: str, api_key: str | None):
    import socket

    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.Client(base_url=host, headers=headers, transport=transport,
                        timeout=httpx.Timeout(60.0, connect=10.0))


def close_connections() -> None:
    """Close the kept connections to every server (the next job opens new ones)."""
    with _POOL_LOCK:
        clients = list(_POOL.values())
        _POOL.clear()
    for client in clients:
        client.close()


atexit.register(close_connections)


def _refused(resp) -> None:
    """A job the server refused before queueing it (HTTP 400 with an error): raised."""
    try:
        error = resp.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        raise error_from(error, "<remote>", 0)


def _reason(resp) -> str:
    """What an error response says: its body's ``detail`` or ``error`` (their
    ``message`` when they have one), else the start of its text."""
    try:
        resp.read()
        body = resp.json()
        detail = body.get("detail") or body.get("error") or body
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
    except Exception:  # noqa: BLE001 - any body: fall back to the text
        detail = resp.text[:200]
    return str(detail)


def _check(resp) -> None:
    if resp.status_code < 400:
        return
    detail = _reason(resp)
    if resp.status_code in (401, 403):
        raise PermissionError(
            f"the intervene server refused the API key ({resp.status_code}): {detail}; set it "
            "with CONFIG.set_default_api_key(...) or INTERVENE_API_KEY"
        )
    raise RemoteError(f"the intervene server answered {resp.status_code}: {detail}",
                      f"HTTP{resp.status_code}")


_BUILTIN_ERRORS = {
    name: obj for name, obj in vars(builtins).items()
    if isinstance(obj, type) and issubclass(obj, Exception)
}


def error_from(error: dict, filename: str, line: int) -> BaseException:
    """The exception a server error stands for, with the user's file and line."""
    type_name = str(error.get("type") or "RemoteError")
    message = str(error.get("message") or "")
    at = error.get("line") or line
    where = error.get("filename") or filename
    exc: BaseException
    if type_name == "CompileError":
        from compiler.errors import CompileError

        exc = CompileError(message, where, at or None)
    elif type_name == "ValidationError":
        from compiler.validate import ValidationError

        exc = ValidationError(message)
        exc.line, exc.construct = at, str(error.get("construct") or "")
    elif type_name == "JobLost":  # the server restarted or shut down with the job in flight
        exc = RemoteError(message, type_name, at)
    elif type_name in ("OutOfOrderError", "MissedCheckpointError"):
        from .. import errors

        exc = getattr(errors, type_name)(message, str(error.get("module") or ""), at or None)
    elif type_name in _BUILTIN_ERRORS and type_name not in ("SystemExit", "KeyboardInterrupt"):
        try:
            exc = _BUILTIN_ERRORS[type_name](message)
        except Exception:  # noqa: BLE001 - an exception type we cannot build
            exc = RemoteError(f"{type_name}: {message}", type_name, at)
    else:
        exc = RemoteError(f"{type_name}: {message}", type_name, at)
    if hasattr(exc, "add_note"):
        exc.add_note(f"(raised on the intervene server, in the remote block's line {at})")
    return _at_line(exc, where, at)


def _at_line(exc: BaseException, filename: str, line: int) -> BaseException:
    """Give ``exc`` a traceback entry at ``filename:line`` (the user's own line), so a
    traceback of the remote error shows the user's code, as for a local run."""
    if not line or not filename:
        return exc
    try:
        code = compile("\n" * (int(line) - 1) + "raise __iv_error", filename, "exec")
        exec(code, {"__iv_error": exc, "__builtins__": {}})  # noqa: S102 - a constant `raise`
    except BaseException as raised:  # noqa: BLE001 - it is `exc`, now with a traceback
        return raised.with_traceback(raised.__traceback__.tb_next or raised.__traceback__)
    return exc  # pragma: no cover


class _StatusLine:
    """One line on stderr while waiting (only when stderr is a terminal)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.shown = False
        self.started = time.monotonic()
        try:
            self.enabled = bool(stream.isatty())
        except Exception:  # noqa: BLE001 - a stream without isatty
            self.enabled = False

    def show(self, payload: dict) -> None:
        if not self.enabled:
            return
        status = payload.get("status", "")
        if status == "QUEUED":
            pos = payload.get("position")
            text = f"intervene: job queued{f' (position {pos})' if pos else ''}"
        elif status == "RUNNING":
            text = f"intervene: job running ({payload.get('elapsed', 0):.1f} s)"
        else:
            text = f"intervene: job {status.lower()}"
        self.stream.write("\r" + text[:100].ljust(60))
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * 60 + "\r")
            self.stream.flush()
            self.shown = False
