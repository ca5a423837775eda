"""CompileError: a mistake found in an experiment's source before anything runs."""

from __future__ import annotations

import linecache


class CompileError(SyntaxError):
    """A mistake in an ``@intervene`` function, found before the model runs.

    It is a ``SyntaxError``, so tools show it with the file, line and column of
    the offending code.  ``str()`` gives the explanation followed by the place.
    """

    def __init__(self, message: str, filename: str = "<unknown>", line: int = 0, col: int = 0):
        text = linecache.getline(filename, line) if line else None
        super().__init__(message, (filename, line or None, (col + 1) if line else None, text))
        self.message = message

    def __str__(self) -> str:
        where = f"{self.filename}, line {self.lineno}" if self.lineno else self.filename
        return f"{self.message} ({where})"
