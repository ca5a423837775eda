"""The compiler's version: what a remote job says it was compiled with.

A server recompiles every block it runs with its own compiler, and a block's index,
its free names and its helpers' calls are the client's compiler's reading of the
source; both sides must read it the same way, so the server refuses a job from a
client whose compiler version differs from its own (``runtime/serve/execute.py``).
Light on purpose: the server's HTTP process imports it without torch or libcst.
"""

from __future__ import annotations

import functools

__all__ = ["compiler_version"]


@functools.cache
def compiler_version() -> str:
    """The installed ``intervene`` package's version ("0" when it is not installed)."""
    try:
        from importlib.metadata import version

        return version("intervene")
    except Exception:  # noqa: BLE001 # pragma: no cover - not installed as a package
        return "0"
