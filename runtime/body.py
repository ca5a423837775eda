"""Skipping a ``with`` statement's body: for blocks compiled from their source when
entered (``runtime/direct.py``'s undecorated trace blocks, ``runtime/session.py``'s
undecorated remote sessions), whose body already ran in compiled form (or on a
server) by the time ``__enter__`` returns.  ``BodySkipper`` raises ``_SkipBody`` on the
body's first line, through a trace function set on the caller's frame only, and its
``__exit__`` swallows it and puts back the trace functions it found."""

from __future__ import annotations

import sys


class _SkipBody(Exception):
    """Raised on the body's first line; ``BodySkipper.__exit__`` swallows it."""


def _no_trace(frame, event, arg):
    return None


class BodySkipper:
    """A mixin for context managers whose ``__enter__`` calls ``_skip_body``; the class
    (or its ``__slots__``) has ``_frame``, ``_body_line`` and ``_old``."""

    __slots__ = ()

    def _skip_body(self, frame, body_line: int) -> None:
        """Skip the body of the ``with`` running in ``frame`` (its lines from
        ``body_line`` on; not the header's)."""
        self._frame = frame
        self._body_line = body_line
        self._old = sys.gettrace(), frame.f_trace
        sys.settrace(_no_trace)
        frame.f_trace = self._skip
        frame.f_trace_lines = True

    def _skip(self, frame, event, arg):
        if event == "line" and frame.f_lineno >= self._body_line:  # not the header's lines
            raise _SkipBody
        return self._skip

    def __exit__(self, exc_type, exc, tb) -> bool:
        frame, self._frame = self._frame, None
        if frame is not None:
            old_global, old_local = self._old
            frame.f_trace = old_local
            sys.settrace(old_global)
            self._old = None
        return exc_type is _SkipBody
