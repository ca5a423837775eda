"""Helpers shipped with a remote block (the client's side).

A block may call ``@intervene`` functions that have no block of their own
(helpers: they read and write module values as part of the calling lane; or
plain compiled functions).  A function cannot travel as a value, so such a
free name is sent as its *source* instead: the helper's text, file and first
line, its defaults (as values) and the values of the names its body reads
from its module or closure (constants; other helpers are shipped the same way,
so helpers calling helpers work).  The server validates each helper with the
same allowlist as the block (``compiler.validate.validate_block``'s
``helpers=``), compiles it with its own compiler and gives it to the block
under the same name (``runtime/serve/execute.py``).

Only bytes of source and data travel: the server never evaluates a helper's
decorators, defaults or annotations (the defaults are sent as values).
"""

from __future__ import annotations

import ast
import builtins
import types
from typing import Any

from .protocol import Encoder, UnsendableError, encode_values

# Modules the server provides itself: a block or a helper may read these without sending them.
SERVER_MODULES = ("torch", "math")
MAX_HELPERS = 64


def server_module(value: Any) -> bool:
    """Whether ``value`` is a module the server provides (``SERVER_MODULES``, ``torch.*``)."""
    return isinstance(value, types.ModuleType) and (
        value.__name__ in SERVER_MODULES or value.__name__.startswith("torch."))


def compiled_of(value: Any):
    """The ``Compiled`` of an ``@intervene`` function with no block of its own (a
    helper, or a compiled function that reads no module value), else None."""
    from compiler.codegen import Compiled

    compiled = getattr(value, "compiled", None)
    if not isinstance(compiled, Compiled):
        return None
    return compiled if compiled.helper or not compiled.plan.blocks else None


def _original(fn):
    """The user's function under the compiled wrappers (its globals, defaults and
    closure cells: the compiled function has the same)."""
    for _ in range(100):
        inner = getattr(fn, "__wrapped__", None)
        if inner is None:
            break
        fn = inner
    return fn


def _body_reads(compiled) -> list[tuple[str, int]]:
    """The names the helper's body reads that it does not bind itself (nor are its
    parameters), with the line of their first read: decorators, defaults and
    annotations are left out (the server never evaluates them)."""
    src = compiled.source
    tree = ast.parse(src.text)
    fn = tree.body[0]
    assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
    a = fn.args
    bound = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
    bound |= {x.arg for x in (a.vararg, a.kwarg) if x is not None}
    reads: dict[str, int] = {}
    for stmt in fn.body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name):
                if isinstance(node.ctx, ast.Load):
                    reads.setdefault(node.id, node.lineno)
                else:
                    bound.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                bound.add(node.name)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
    return [(n, src.first_line + line - 1) for n, line in reads.items() if n not in bound]


def _lookup(fn, name: str) -> tuple[bool, Any]:
    """``name`` as the function reads it: a closure cell, its module, a builtin."""
    code = getattr(fn, "__code__", None)
    for var, cell in zip(getattr(code, "co_freevars", ()), getattr(fn, "__closure__", None) or ()):
        if var == name:
            try:
                return True, cell.cell_contents
            except ValueError:  # an empty cell: NameError there too
                return False, None
    glb = getattr(fn, "__globals__", {})
    if name in glb:
        return True, glb[name]
    return False, None


def split_helpers(values: dict, labels: dict) -> tuple[dict, dict]:
    """Take the compiled helpers out of a block's free ``values``: ``(values left,
    helpers)``; ``helpers`` maps each name to ``(compiled, fn, values, labels,
    defaults, kwdefaults)`` for every helper the block reaches (helpers called by
    helpers too).  Two different helpers under one name are an UnsendableError."""
    left = {}
    todo: list[tuple[str, Any, str]] = []
    for name, value in values.items():
        if compiled_of(value) is not None:
            todo.append((name, value, labels.get(name, f"`{name}`")))
        else:
            left[name] = value
    helpers: dict = {}
    while todo:
        name, value, where = todo.pop()
        compiled = compiled_of(value)
        if name in helpers:
            if helpers[name][0] is not compiled:
                raise UnsendableError(
                    f"{where}: two different @intervene functions are called `{name}` (in "
                    f"{helpers[name][0].source.filename} and {compiled.source.filename}); a "
                    "remote block ships helpers by name: rename one")
            continue
        if len(helpers) >= MAX_HELPERS:
            raise UnsendableError(f"{where}: a remote block can ship at most {MAX_HELPERS} "
                                  "helpers")
        if compiled.source is None:
            raise UnsendableError(f"{where} is an @intervene function without source text")
        fn = _original(value)
        own: dict = {}
        own_labels: dict = {}
        for read, line in _body_reads(compiled):
            found, got = _lookup(fn, read)
            if not found or read == name:
                continue  # a builtin, or undefined (the server names it)
            if server_module(got) or got is getattr(builtins, read, object()):
                continue  # the server has it
            label = (f"variable `{read}` (read by helper `{name}` at "
                     f"{compiled.source.filename}:{line})")
            if compiled_of(got) is not None:
                todo.append((read, got, label))
                continue
            own[read] = got
            own_labels[read] = label
        defaults = getattr(fn, "__defaults__", None)
        kwdefaults = getattr(fn, "__kwdefaults__", None)
        helpers[name] = (compiled, fn, own, own_labels, defaults, kwdefaults)
    return left, helpers


def encode_helpers(helpers: dict, encoder) -> dict:
    """The ``"helpers"`` entry of the job's header; their values go through
    ``encoder`` (the block's ``protocol.Encoder``, so one safetensors blob holds all)."""
    out = {}
    for name, (compiled, _fn, own, labels, defaults, kwdefaults) in helpers.items():
        src = compiled.source
        entry = {
            "source": src.text,
            "filename": src.filename,
            "first_line": src.first_line,
            "values": {k: encoder.encode(v, labels[k]) for k, v in own.items()},
        }
        if defaults:
            entry["defaults"] = encoder.encode(
                tuple(defaults), f"the default values of helper `{name}`")
        if kwdefaults:
            entry["kwdefaults"] = encoder.encode(
                dict(kwdefaults), f"the keyword defaults of helper `{name}`")
        out[name] = entry
    return out


def encode_sent(values: dict, labels: dict, line: int, what: str) -> tuple[dict, dict, dict]:
    """``encode_job_values``, with what cannot be sent said at the user's ``line`` of the
    remote ``what`` ("block", "session")."""
    try:
        return encode_job_values(values, labels)
    except UnsendableError as exc:
        raise UnsendableError(
            f"line {line}: the remote {what} cannot send {exc}; compute it inside the "
            f"{what} or pass a plain value"
        ) from None


def encode_job_values(values: dict, labels: dict) -> tuple[dict, dict, dict]:
    """A block's free values -> ``(trees, tensors, helpers)``: what
    ``protocol.encode_values`` gives, with the helpers shipped as source."""
    values, helpers = split_helpers(values, labels)
    enc = Encoder()
    trees, tensors = encode_values(values, labels, enc)
    shipped = encode_helpers(helpers, enc) if helpers else {}
    return trees, tensors, shipped
