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
harmless there (it is remote already).
"""

from __future__ import annotations

from typing import Any, Self


class Session:
    """What ``with model.session() as session:`` binds.  ``here``: the body runs
    in this process (false once a remote session ran on the server); ``values``: what
    the server sent back."""

    __slots__ = ("here", "model", "remote", "values")

    def __init__(self, model, remote: bool = False, **kwargs: Any) -> None:
        self._setup(model, remote, kwargs)
        if self.remote:  # `model.session(remote=True)` that no compiler lowered
            raise NotImplementedError(
                "`model.session(remote=True)`, one remote request for all of its traces, "
                "is sent from an @intervene function, whose compiler lowers the session "
                "(write `remote=` as a keyword of `model.session(...)`); here it is not "
                "compiled: decorate the function with @intervene, or give each trace "
                "remote=True (`with model.trace(x, remote=True):` inside "
                "`with model.session():`)"
            )

    def _setup(self, model, remote, kwargs: dict) -> None:
        if kwargs:
            raise TypeError(f"model.session() takes no keywords but remote=; got "
                            f"{', '.join(sorted(kwargs))}")
        self.model = model
        self.remote = bool(remote)
        self.here = True
        self.values: dict = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def __repr__(self) -> str:
        where = "remote " if self.remote else ""
        return f"<{where}Session of {self.model._path}>"


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
    from compiler.version import compiler_version

    from .remote import protocol
    from .remote.client import RemoteError, model_name
    from .remote.helpers import encode_job_values, server_module
    from .remote.protocol import PROTOCOL_VERSION, UnsendableError

    src = handle.source
    if src is None:
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
            if server_module(value):
                continue
        else:  # a builtin, or not bound: the server says so at its line
            continue
        if value is model:
            continue
        values[name] = value
        labels[name] = f"variable `{name}` (read at line {line})"
    try:
        trees, tensors, helpers = encode_job_values(values, labels)
    except UnsendableError as exc:
        raise UnsendableError(
            f"line {lines[0]}: the remote session cannot send {exc}; compute it inside the "
            "session or pass a plain value"
        ) from None
    header = {
        "protocol": PROTOCOL_VERSION,
        "compiler": compiler_version(),
        "model": model_name(model),
        "function": handle.plan.name,
        "source": src.text,
        "filename": src.filename,
        "first_line": src.first_line,
        "block": index,
        "session": True,
        "values": trees,
        "saved": list(wanted),
    }
    if helpers:
        header["helpers"] = helpers
    return protocol.pack(header, tensors)


def run_remote_session(handle, model, index: int, lines: tuple, wanted: tuple, free: tuple,
                       frame) -> dict:
    """Send the session, wait, and return the values it sent back (the containers it
    changed are changed here too, in place, as after a remote trace)."""
    from .config import CONFIG
    from .remote import protocol
    from .remote.client import Client

    data = request_for_session(handle, model, index, lines, wanted, free, frame)
    client = Client(CONFIG.host, CONFIG.api_key)
    reply = client.run(data, filename=handle.plan.filename, line=lines[0])
    header, tensors = protocol.unpack(reply)
    saved = protocol.decode_values(header.get("saved", {}), tensors, model)
    mutated = protocol.decode_values(header.get("mutated", {}), tensors, model)
    for name, value in mutated.items():
        target = frame.f_locals.get(name, frame.f_globals.get(name))
        if isinstance(target, list) and isinstance(value, list):
            target[:] = value
        elif isinstance(target, dict) and isinstance(value, dict):
            target.clear()
            target.update(value)
    return {n: v for n, v in saved.items() if n in wanted}
