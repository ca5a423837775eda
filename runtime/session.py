"""``with model.session():``: several traces in one block, values flowing between them.

Locally a session is a plain grouping: each trace block inside it runs when its
``with`` ends, as it would outside, and a later block uses what an earlier one
saved (ordinary variables of the function).  Each trace of a session may run
remotely (``model.trace(x, remote=True)``: one request per trace, the values
flowing between them travel as the next trace's free values).

``model.session(remote=True)`` sends the whole session as ONE request: the
compiler lowers a session with a ``remote=`` keyword (compiler/session.py) so
that ``Handle.session`` (``__iv.session``) decides as the ``with`` is entered.
Remotely, the function's source, the session's index, the values it reads
(``free``, as a remote trace's ``Block.free``) and its helpers go to the server
(``run_remote_session``, the remote trace's machinery of runtime/remote/client.py);
the body is skipped here.  The server validates the session (its traces and the
plain Python between them: compiler/validate.py ``validate_session``), compiles
it alone and runs it, its traces on its own copy of the model, and sends back
the values the code after the session needs (``wanted``): what its traces saved,
and the variables its body bound that the function reads after it, which the
lowered code binds (``Session.values``).  An inner trace's ``remote=True`` is
harmless there (it is remote already).  On the server a session job runs alone (its
traces never share a pass with other jobs: runtime/serve/batch.py).

Without a decorator (``with model.session(remote=True):`` at a script's or a cell's
top level, or in a plain function), ``Session.__enter__`` finds the statement in the
caller's source, compiles it wrapped in a function (compiler/session.py
``find_session``), runs that (the request goes out there), binds what came back (the
saves, and the variables read after the ``with`` in the rest of the file or cell) where
the ``with`` is, and skips the body, as runtime/direct.py does for a trace block.
"""

from __future__ import annotations

import sys
from typing import Any, Self

from .body import BodySkipper


class Session(BodySkipper):
    """What ``with model.session() as session:`` binds.  ``here``: the body runs
    in this process (false once a remote session ran on the server); ``values``: what
    the server sent back."""

    __slots__ = ("_body_line", "_direct", "_frame", "_old", "here", "model", "remote",
                 "values")

    def __init__(self, model, remote: bool = False, **kwargs: Any) -> None:
        self._setup(model, remote, kwargs)
        # `model.session(remote=True)` that no compiler lowered: compiled from its
        # source when entered (a script's or a cell's top level, a plain function)
        self._direct = self.remote

    def _setup(self, model, remote, kwargs: dict) -> None:
        if kwargs:
            raise TypeError(f"model.session() takes no keywords but remote=; got "
                            f"{', '.join(sorted(kwargs))}")
        self.model = model
        self.remote = bool(remote)
        self.here = True
        self.values: dict = {}
        self._direct = False
        self._frame = None

    def __enter__(self) -> Self:
        if self._direct:
            self._run_direct(sys._getframe(1))
        return self

    def _run_direct(self, frame) -> None:
        """Without a decorator: find the ``with`` statement in the caller's source,
        compile it wrapped in a function (compiler/session.py ``find_session``), run
        it (the request goes out there), bind what came back where the ``with`` is,
        and skip the body (as runtime/direct.py does for a trace block)."""
        from compiler.errors import CompileError
        from compiler.session import compile_session, find_session

        from .direct import _bind, _template, caller_lines, caller_params

        self._direct = False
        filename, line = frame.f_code.co_filename, frame.f_lineno
        lines = caller_lines(frame)
        if not lines:
            raise CompileError(
                f"`with {self.model._path}.session(remote=True)` outside an @intervene "
                f"function is compiled from its source, and there is none for {filename} "
                "(`python -c`, exec() of a string or the plain REPL keep no source): write "
                "it in a .py file or a notebook cell, or in a function decorated with "
                "@intervene", filename, line)
        found = find_session(filename, "".join(lines), line)
        local = frame.f_locals
        params = caller_params(frame, local, found["loads"], found["stores"])
        from compiler import imported_helpers

        extra = imported_helpers(frame.f_globals) - found["helpers"]
        if extra:  # helpers imported from other files
            found = {**found, "helpers": found["helpers"] | extra}
        compiled = compile_session(found, tuple(params))
        values = {p: (local[p] if p in local else frame.f_globals[p]) for p in params}
        del local
        handle = _direct_handle(compiled.plan, compiled.source,
                                found["later"] & found["stores"])
        compiled.build(handle, _template(frame.f_globals))(**values)
        opened = handle.opened
        handle.opened = None
        if opened is not None:
            self.here = opened.here
            self.values = opened.values
        _bind(frame, dict(self.values))
        self._skip_body(frame, found["body_line"])  # its body ran on the server

    def __repr__(self) -> str:
        where = "remote " if self.remote else ""
        return f"<{where}Session of {self.model._path}>"


_handle_class = None


def _direct_handle(plan, source, extra: frozenset):
    """The handle of a wrapped session: its ``session`` also asks for ``extra`` (the
    variables the code after the ``with`` reads) and keeps the Session it opened."""
    global _handle_class
    if _handle_class is None:
        from .api import Handle

        class DirectSessionHandle(Handle):
            __slots__ = ("extra", "opened")

            def session(self, model, index, lines, wanted, free, /, *args, **kwargs):
                wanted = tuple(sorted({*wanted, *self.extra}))
                self.opened = open_session(self, model, index, lines, wanted, free,
                                           sys._getframe(1), args, kwargs)
                return self.opened

        _handle_class = DirectSessionHandle
    handle = _handle_class(plan, source)
    handle.extra = extra
    handle.opened = None
    return handle


def open_session(handle, model, index: int, lines: tuple, wanted: tuple, free: tuple,
                 frame, args: tuple, kwargs: dict) -> Session:
    """``__iv.session(model, index, lines, wanted, free, *args, **kwargs)``: the
    session object; a remote one has run on the server when this returns."""
    if args:
        raise TypeError(f"model.session() takes no positional arguments ({len(args)} given)")
    session = Session.__new__(Session)
    session._setup(model, kwargs.pop("remote", False), kwargs)
    if session.remote:
        if model._edits:  # never a remote run that silently leaves the edits out
            raise NotImplementedError(
                "remote=True on an edited model (model.edit()) is not supported: the "
                "server runs its own copy of the model, without your edits; put the "
                "edit's interventions in the session's traces"
            )
        session.values = run_remote_session(handle, model, index, lines, wanted, free, frame)
        session.here = False
    return session


def request_for_session(handle, model, index: int, lines: tuple, wanted: tuple,
                        free: tuple, frame) -> bytes:
    """The job message of a remote session (errors for unsendable values first)."""
    from .remote.client import RemoteError, pack_job
    from .remote.helpers import server_module

    if handle.source is None:
        raise RemoteError("this session has no compiled source to send (compile it with "
                          "@intervene)")
    local_vars = frame.f_locals
    global_vars = frame.f_globals
    values: dict = {}
    labels: dict = {}
    for name, line in free:
        if name in local_vars:
            value = local_vars[name]
        elif name in global_vars:
            value = global_vars[name]
        else:  # a builtin, or not bound: the server says so at its line
            continue
        if server_module(value):
            continue
        if value is model:
            continue
        values[name] = value
        labels[name] = f"variable `{name}` (read at line {line})"
    return pack_job(handle, model, index, values, labels, lines[0], "session", wanted,
                    session=True)


def run_remote_session(handle, model, index: int, lines: tuple, wanted: tuple, free: tuple,
                       frame) -> dict:
    """Send the session, wait, and return the values it sent back (the containers it
    changed are changed here too, in place, as after a remote trace)."""
    from .config import CONFIG
    from .remote import protocol
    from .remote.client import Client, apply_mutated

    data = request_for_session(handle, model, index, lines, wanted, free, frame)
    client = Client(CONFIG.host, CONFIG.api_key)
    reply = client.run(data, filename=handle.plan.filename, line=lines[0])
    header, tensors = protocol.unpack(reply)
    saved = protocol.decode_values(header.get("saved", {}), tensors, model)
    apply_mutated(header, tensors, model, frame)
    return {n: v for n, v in saved.items() if n in wanted}
