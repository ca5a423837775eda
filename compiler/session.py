"""``with model.session(remote=...):``: a session the runtime may send as one request.

A session whose call has a ``remote=`` keyword is lowered so that the runtime
decides, as the ``with`` is entered, where its body runs::

    with model.session(remote=True):
        <body>
    # becomes
    with __iv.session(model, 0, (3, 4, 9), ('h', 'n'), (('prompt', 5),), remote=True) as __iv_session0:
        if __iv_session0.here:
            <body, rewritten as usual>
        else:
            if 'h' in __iv_session0.values:
                h = __iv_session0.values['h']
            ...

``__iv.session`` gets the session's index among the function's sessions (what a
remote job names, as a trace job names its block), its lines (``with``, first
body line, last line), the names the code after it needs and the free names it
reads (``(name, first line)``, as ``Block.free``).  Locally (``remote=False``)
``here`` is true and the body runs as before; remotely the runtime sends the
function's source, the session's index and the free values, and the body is
skipped: the values that come back are bound by the ``else`` branch, in the
function's own scope, as a local run would have left them.

The names that come back: every name a trace of the session saves (and, as in
any session, what one trace hands to a later one), and every variable the
session's body binds that the function reads after the session (plain values
computed between the traces included), when the server has it bound.  A session
without a ``remote=`` keyword is not lowered at all (a plain ``with``).
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from .analyze import Analysis, _param_names, free_names, statements
from .rewrite import RT, _rt

_SESSION = m.Call(func=m.Attribute(attr=m.Name("session")))


def session_item(node: cst.With) -> int | None:
    """The index of the ``X.session(...)`` item of a ``with`` statement, or None."""
    for i, item in enumerate(node.items):
        if m.matches(item.item, _SESSION):
            return i
    return None


def session_statements(fn: cst.FunctionDef) -> list[cst.With]:
    """The ``with X.session(...)`` statements of ``fn``, in order: what a remote
    session job's index counts (the client's compiler and the server's agree)."""
    return [s for s in statements(fn) if isinstance(s, cst.With) and session_item(s) is not None]


def remote_keyword(node: cst.With) -> bool:
    """The session call of ``node`` has a ``remote=`` keyword (only those are lowered)."""
    at = session_item(node)
    if at is None:
        return False
    call = node.items[at].item
    return any(a.keyword is not None and a.keyword.value == "remote" for a in call.args)


def session_names(info: Analysis, fn: cst.FunctionDef, line: int, end: int,
                  tracers: set[str]) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    """``(wanted, free)`` of the session on lines ``line``..``end``: the names the
    code after it needs (saved in its traces, or bound in it and read after it), and
    the names it reads from around it with the line of the first read."""
    refs = info.refs
    inside = [r for r in refs if line <= r.line <= end]
    bound = {r.name for r in inside if r.store and not r.nested}
    after = {r.name for r in refs if not r.store and r.line > end}
    saved = {n for b in info.blocks if line <= b.line <= end for n in b.saved}
    wanted = tuple(sorted(saved | (bound & after)))
    outside = set(_param_names(fn.params)) | {r.name for r in refs if r.store and not
                                              line <= r.line <= end}
    inside.sort(key=lambda r: (r.line, r.col))
    return wanted, free_names(inside, outside, tracers)


def lower_session(rw, original: cst.With, updated: cst.With) -> cst.With | None:
    """``updated`` (a session with ``remote=``) lowered as the module docstring
    shows; None for any other ``with``.  ``rw``: the Rewriter."""
    if rw.block is not None or not remote_keyword(original):
        return None
    index = next(i for i, s in enumerate(session_statements(rw.fn)) if s is original)
    line, end = rw.span(original)
    if not isinstance(original.body, cst.IndentedBlock) or not original.body.body:
        raise rw.error(original, "a remote session's body goes on its own lines, below "
                       "`with ....session(remote=...):`")
    body_line = rw.span(original.body.body[0])[0]
    tracers = {b.tracer for b in rw.info.blocks if line <= b.line <= end and b.tracer}
    wanted, free = session_names(rw.info, rw.fn, line, end, tracers)
    at = session_item(updated)
    assert at is not None
    item = updated.items[at]
    call = item.item
    if any(a.star for a in call.args):
        raise rw.error(original, "`model.session(...)` with `*`/`**` arguments and `remote=`: "
                       "write `remote=` and nothing else")
    asname = item.asname
    if asname is not None and not isinstance(asname.name, cst.Name):
        raise rw.error(original, "`with model.session(remote=...) as ...:` binds a plain name "
                       "only")
    var = asname.name.value if asname is not None else f"{RT}_session{index}"
    wanted = tuple(n for n in wanted if n != var)  # the `with` binds it here

    def text(value) -> cst.BaseExpression:
        return cst.parse_expression(repr(value))

    new_call = cst.Call(_rt("session"), [
        cst.Arg(call.func.value),
        cst.Arg(cst.Integer(str(index))),
        cst.Arg(text((line, body_line, end))),
        cst.Arg(text(wanted)),
        cst.Arg(text(free)),
        *call.args,
    ])
    items = list(updated.items)
    items[at] = item.with_changes(item=new_call, asname=cst.AsName(cst.Name(var)))
    binds: list[cst.BaseStatement] = []
    for name in wanted:
        assign = rw.remember(cst.parse_statement(f"{name} = {var}.values[{name!r}]\n"), end)
        check = cst.parse_statement(f"if {name!r} in {var}.values:\n    pass\n")
        check = check.with_changes(body=cst.IndentedBlock([assign]))
        binds.append(rw.remember(check, end))
    if not binds:
        binds = [rw.remember(cst.parse_statement("pass\n"), end)]
    guard = cst.If(
        test=cst.Attribute(cst.Name(var), cst.Name("here")),
        body=updated.body.with_changes(body=list(updated.body.body)),
        orelse=cst.Else(cst.IndentedBlock(binds)),
    )
    guard = rw.remember(guard, line)
    return updated.with_changes(items=items, body=cst.IndentedBlock([guard]))



# -- without a decorator ---------------------------------------------------------------
# `with model.session(remote=True):` at a script's or a notebook cell's top level, or in
# a plain function: as for a trace block without a decorator (compiler/block.py), the
# statement is found in the file, wrapped in `def __session__(<names>): <it>; return
# locals()` (the `def` on the line above the `with`) and compiled; runtime/session.py runs
# it, binds what comes back where the `with` is and skips the body.


class _Sessions(cst.CSTVisitor):
    """Every ``with X.session(remote=...)`` statement outside ``@intervene`` functions
    and outside trace blocks."""

    def __init__(self, aliases: frozenset[str]) -> None:
        super().__init__()
        self.aliases = aliases
        self.found: list[cst.With] = []

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        from .parse import is_intervene

        return not is_intervene(node, self.aliases)

    def visit_With(self, node: cst.With) -> bool:
        from .analyze import block_item

        if block_item(node) is not None:
            return False
        if remote_keyword(node):
            self.found.append(node)
        return True


def find_session(filename: str, text: str, line: int) -> dict:
    """The remote session whose ``with`` header is on ``line`` of ``text``, wrapped:
    ``{"source", "line", "body_line", "end_line", "loads", "stores", "later", "helpers"}``
    (``later``: the names read after it in the scope around it)."""
    from . import walk
    from .block import _parse, _reads_after, helper_names, innermost_at, wrapped
    from .errors import CompileError
    from .parse import Source, decorator_aliases

    module, positions, _found, tree = _parse(filename, text)
    finder = _Sessions(decorator_aliases(module))
    walk.visit(finder, module)
    best = innermost_at(finder.found, positions, line)
    if best is None:
        raise CompileError(
            f"no `with ....session(remote=...)` statement found at line {line} of {filename}: "
            "a remote session is compiled from its source, so write it as a `with` statement "
            "of its own, `remote=` a keyword of `model.session(...)`, its traces in its body",
            filename, line)
    node, first, col, last = best
    if not isinstance(node.body, cst.IndentedBlock):
        raise CompileError("a remote session's body goes on its own lines, below "
                           "`with ....session(remote=...):`", filename, first, col)
    wrapper, loads, stores = wrapped(node, "__session__")
    return {
        "source": Source(wrapper, filename, first - 1, col - 4),
        "line": first,
        "body_line": positions[node.body.body[0]][0],
        "end_line": last,
        "loads": loads - {"locals"},
        "stores": stores,
        "later": frozenset(name for name, _l, _c in _reads_after(tree, first, last)),
        "helpers": helper_names(filename, text, module),
    }


_compiled: dict = {}


def compile_session(found: dict, params: tuple[str, ...]):
    """The wrapped session compiled as a function taking ``params`` (cached)."""
    import dataclasses

    from .codegen import compile_source

    src = found["source"]
    key = (src.text, src.filename, src.first_line, params, found["helpers"])
    got = _compiled.get(key)
    if got is not None:
        return got
    head = "def __session__():"
    assert src.text.startswith(head)
    src = dataclasses.replace(src, text=f"def __session__({', '.join(params)}):"
                              + src.text[len(head):])
    got = _compiled[key] = compile_source(src, (), found["helpers"])
    while len(_compiled) > 64:
        _compiled.pop(next(iter(_compiled)))
    return got
