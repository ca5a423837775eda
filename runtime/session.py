"""``with model.session():``: several traces in one block, values flowing between them.

Locally a session is a plain grouping: each trace block inside it runs when its
``with`` ends, as it would outside, and a later block uses what an earlier one
saved (ordinary variables of the function).  ``remote=True`` for the whole session
(one request for all of its traces) is not there yet: give each trace ``remote=True``.
"""

from __future__ import annotations

from typing import Any, Self


class Session:
    """What ``with model.session() as session:`` binds."""

    __slots__ = ("model",)

    def __init__(self, model, remote: bool = False, **kwargs: Any) -> None:
        if remote:
            raise NotImplementedError(
                "`model.session(remote=True)` (one remote request for all of its traces) is "
                "not supported yet: pass remote=True to each `model.trace(...)` in the session"
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
