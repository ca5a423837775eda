"""Compiling: source -> plan + rewritten code -> a function with the user's lines.

``compile_source`` runs the passes (parse, analyze, rewrite, number) and
returns a ``Compiled``: the plan, the rewritten function's text, and the code
of a small factory around it.  ``Compiled.build`` turns that into a live
function that shares the original's globals and closure cells, with every
line number mapped back to the user's file, so tracebacks and pdb show the
user's own code.  Nothing here imports torch: the runtime handle is passed
in by whoever builds.
"""

from __future__ import annotations

import ast
import re
import types
from dataclasses import dataclass

import libcst as cst
import libcst.metadata as meta

from . import plan as P
from .analyze import analyze
from .errors import CompileError
from .parse import Source, parse_error_position
from .rewrite import RT, TMP_BASE, Rewriter, number_checkpoints

_TMP_RE = re.compile(r"\b777\d{7}\b")
assert str(TMP_BASE).startswith("777") and len(str(TMP_BASE)) == 10


@dataclass(frozen=True)
class Compiled:
    plan: P.FunctionPlan
    code: str  # the rewritten function, as shown by `show-plan --code`
    factory_code: types.CodeType  # module code defining the factory
    name: str

    def build(self, runtime_handle: object, original: types.FunctionType) -> types.FunctionType:
        """A live function: the rewritten code with ``original``'s globals,
        defaults and closure cells, and ``runtime_handle`` as ``__iv``."""
        factory = next(
            c for c in self.factory_code.co_consts
            if isinstance(c, types.CodeType) and c.co_name == f"{RT}_factory"
        )
        inner = next(
            c for c in factory.co_consts if isinstance(c, types.CodeType) and c.co_name == self.name
        )
        cells = dict(zip(original.__code__.co_freevars, original.__closure__ or ()))
        closure = tuple(
            types.CellType(runtime_handle) if name == RT else cells.get(name, types.CellType())
            for name in inner.co_freevars
        )
        fn = types.FunctionType(
            inner, original.__globals__, original.__name__, original.__defaults__, closure
        )
        fn.__kwdefaults__ = original.__kwdefaults__
        fn.__qualname__ = original.__qualname__
        fn.__module__ = original.__module__
        fn.__doc__ = original.__doc__
        fn.__annotations__ = getattr(original, "__annotations__", {})
        return fn


def _declare(fn: cst.FunctionDef, names: list[str]):
    """``name: object`` makes a name local to the function without binding it,
    so a lane's ``nonlocal name`` has somewhere to point."""
    decls = [
        cst.SimpleStatementLine([cst.AnnAssign(cst.Name(n), cst.Annotation(cst.Name("object")))])
        for n in names
    ]
    body = list(fn.body.body)
    at = 0
    if body and isinstance(body[0], cst.SimpleStatementLine) and (
        isinstance(body[0].body[0], cst.Expr)
        and isinstance(body[0].body[0].value, (cst.SimpleString, cst.ConcatenatedString))
    ):
        at = 1  # keep the docstring first
    return fn.with_changes(body=fn.body.with_changes(body=body[:at] + decls + body[at:])), decls


def compile_source(src: Source, freevars: tuple[str, ...] = ()) -> Compiled:
    try:
        module = cst.parse_module(src.text)
    except cst.ParserSyntaxError as exc:
        line, col = src.position(*parse_error_position(exc))
        raise CompileError(f"cannot parse: {exc.message}", src.filename, line, col) from None
    fn = module.body[0] if module.body else None
    if not isinstance(fn, cst.FunctionDef):
        raise CompileError("@intervene applies to a `def` function", src.filename, src.first_line)
    if fn.asynchronous is not None:
        raise CompileError(
            "@intervene cannot compile an `async def`: the model runs synchronously",
            src.filename, src.first_line,
        )
    wrapper = meta.MetadataWrapper(module, unsafe_skip_copy=True)
    info = analyze(src, wrapper, fn)
    rewriter = Rewriter(src, fn, info)
    new_module = wrapper.visit(rewriter)
    new_fn = new_module.body[0]
    assert isinstance(new_fn, cst.FunctionDef)
    fn_line = src.position(wrapper.resolve(meta.PositionProvider)[fn].start.line, 0)[0]
    params = {p.name.value for p in (*fn.params.params, *fn.params.posonly_params,
                                     *fn.params.kwonly_params)}
    for star in (fn.params.star_arg, fn.params.star_kwarg):
        if isinstance(star, cst.Param):
            params.add(star.name.value)
    shared = sorted(
        {n for b in info.blocks for ln in b.lanes for n in ln.nonlocal_names}
        - info.outer_bound - params
    )
    new_fn = new_fn.with_changes(decorators=[])
    new_fn, decls = _declare(new_fn, shared)
    for d in decls:
        rewriter.remember(d, fn_line, fn_line, exact=False)
    final, lanes = number_checkpoints(cst.Module([new_fn]), rewriter.pending, rewriter.markers)

    blocks = []
    for b in info.blocks:
        blocks.append(
            P.Block(
                index=b.index,
                kind=b.kind,  # type: ignore[arg-type]
                model=b.model,
                args=b.args,
                line=b.line,
                lanes=tuple(
                    P.Lane(ln.index, ln.line, ln.input, tuple(lanes.get((b.index, ln.index), ())))
                    for ln in b.lanes
                ),
                saved=tuple(sorted(b.saved)),
            )
        )
    plan = P.FunctionPlan(fn.name.value, src.filename, fn_line, tuple(blocks))

    # The factory: `def __iv_factory(__iv, <free variables>): <fn>; return <fn>`
    factory = cst.FunctionDef(
        name=cst.Name(f"{RT}_factory"),
        params=cst.Parameters([cst.Param(cst.Name(n)) for n in (RT, *freevars)]),
        body=cst.IndentedBlock(
            [new_fn, cst.SimpleStatementLine([cst.Return(cst.Name(fn.name.value))])]
        ),
    )
    factory_module = cst.Module([factory])

    def renumber(text: str) -> str:
        return _TMP_RE.sub(lambda mt: str(final.get(int(mt.group()), mt.group())), text)

    text = renumber(factory_module.code)
    line_map = _line_map(factory_module, rewriter.line_of, fn_line)
    tree = ast.parse(text)
    _relocate(tree, line_map, fn_line)
    code = compile(tree, src.filename, "exec", dont_inherit=True)
    shown = renumber(cst.Module([new_fn]).code)
    return Compiled(plan=plan, code=shown, factory_code=code, name=fn.name.value)


def _line_map(module: cst.Module, records, default: int) -> dict[int, int]:
    positions = meta.MetadataWrapper(module, unsafe_skip_copy=True).resolve(meta.PositionProvider)
    out: dict[int, int] = {}
    for node, first, last, exact in records:
        pos = positions.get(node)
        if pos is None:
            continue
        start, end = pos.start.line, pos.end.line
        if exact and end - start == last - first:
            for i in range(end - start + 1):
                out.setdefault(start + i, first + i)
        else:
            out.setdefault(start, first)
            for i in range(start + 1, end + 1):
                out.setdefault(i, first)
    return out


def _relocate(tree: ast.AST, line_map: dict[int, int], default: int) -> None:
    """Generated line numbers -> the user's; columns are dropped (they would
    point into the rewritten text, not the user's line)."""
    cache: dict[int, int] = {}

    def mapped(n: int) -> int:
        if n not in cache:
            k = n
            while k > 0 and k not in line_map:
                k -= 1
            cache[n] = line_map.get(k, default)
        return cache[n]

    for node in ast.walk(tree):
        if "lineno" in node._attributes and hasattr(node, "lineno"):
            start = mapped(node.lineno)
            node.lineno = start
            node.end_lineno = max(start, mapped(node.end_lineno or node.lineno))
            node.col_offset = -1  # -1: no column, so tracebacks draw no carets
            node.end_col_offset = -1
