"""``with model.session():``: several traces in one block, values flowing between them.

Locally a session is a plain grouping: each trace block inside it runs when its
``with`` ends, as it would outside, and a later block uses what an earlier one
saved (ordinary variables of the function).  Each trace of a session may run
remotely (``model.trace(x, remote=True)``: one request per trace, the values
flowing between them travel as the next trace's free values).  ``remote=True`` for
the whole session (one request for all of its traces) is not there yet: the server
would have to check and run the code between the traces too.  It is refused at
``model.session(remote=True)``, before anything is sent or run.
"""

from __future__ import annotations

from typing import Any, Self


class Session:
    """What ``with model.session() as session:`` binds."""

    __slots__ = ("model",)

    def __init__(self, model, remote: bool = False, **kwargs: Any) -> None:
        if remote:
            raise NotImplementedError(
                "remote sessions are not supported yet: run each trace with remote=True "
                "(`with model.trace(x, remote=True):` inside `with model.session():`); "
                "`model.session(remote=True)`, one remote request for all of its traces, is "
                "planned"
            )
        if kwargs:
            raise TypeError(f"model.session() takes no keywords but remote=; got "
                            f"{', '.join(sorted(kwargs))}")
        self.model = model

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<Session of {self.model._path}>"
