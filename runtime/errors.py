"""Errors the runtime raises for mistakes in an experiment."""

from __future__ import annotations


class OutOfOrderError(RuntimeError):
    """A module value asked for after the model ran past it.

    ``module`` is the module path (``model.layers.2``), ``line`` the user's line
    that asked for it.
    """

    def __init__(self, message: str, module: str = "", line: int | None = None) -> None:
        super().__init__(message)
        self.module = module
        self.line = line


class MissedCheckpointError(RuntimeError):
    """A module value was awaited but the module never ran in that forward pass."""

    def __init__(self, message: str, module: str = "", line: int | None = None) -> None:
        super().__init__(message)
        self.module = module
        self.line = line


class NotInTraceError(RuntimeError):
    """A module value (``.output`` ...) or a trace used outside an @intervene function."""

    def __init__(self, path: str, what: str) -> None:
        if what in ("output", "input", "inputs"):
            message = (
                f"`{path}.{what}` exists only while the model runs: read it inside a "
                f"`with model.trace(...):` block of a function decorated with @intervene "
                "(only the block's own code is compiled: a function called from the block "
                "reads module values only if you decorate it with @intervene, which makes it a "
                "helper that runs as part of the block; or read them in the block and pass "
                "them in)"
            )
        else:
            message = (
                f"`{path}.{what}(...)` must be used as `with {path}.{what}(...):` inside a "
                "function decorated with @intervene (from compiler import intervene), which "
                "compiles the block before it runs"
            )
        super().__init__(message)
