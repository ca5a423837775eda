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
import itertools
import re
import types
from dataclasses import dataclass

import libcst as cst

from . import plan as P
from . import walk
from .analyze import analyze
from .errors import CompileError
from .parse import Source, decorator_name, parse_error_position
from .rewrite import (
    LINE_MARK,
    RT,
    Rewriter,
    evaluation_order,
    number_checkpoints,
    tag_lines,
)

_MARK_RE = re.compile(r"[ \t]*" + re.escape(LINE_MARK) + r"\d+:\d+(?=\n|$)", re.MULTILINE)
_MARK_LINE_RE = re.compile(re.escape(LINE_MARK) + r"(\d+):(\d+)\s*$")
_NEWLINE_RE = re.compile(rb"\r\n|\r|\n")  # line ends as Python's tokenizer counts them


@dataclass(frozen=True)
class Compiled:
    plan: P.FunctionPlan
    code: str  # the rewritten function, as shown by `show-plan --code`
    factory_code: types.CodeType  # module code defining the factory
    name: str
    source: Source | None = None  # what was compiled (a remote block sends its text)
    # The function's decorators, top to bottom: (expression as written, line, last name).
    decorators: tuple[tuple[str, int, str | None], ...] = ()
    # A helper (an @intervene function with no block that reads module values): its
    # body is one lane run by its caller's (``yield from``); its site numbers start at
    # ``site_offset`` so that they never meet the caller's.
    helper: bool = False
    site_offset: int = 0

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


def _declare(fn: cst.FunctionDef, names: list[str], line: int) -> cst.FunctionDef:
    """``name: object`` makes a name local to the function without binding it,
    so a lane's ``nonlocal name`` has somewhere to point."""
    decls = [
        tag_lines(
            cst.SimpleStatementLine([cst.AnnAssign(cst.Name(n), cst.Annotation(cst.Name("object")))]),
            line, line,
        )
        for n in names
    ]
    body = list(fn.body.body)
    at = 0
    if body and isinstance(body[0], cst.SimpleStatementLine) and (
        isinstance(body[0].body[0], cst.Expr)
        and isinstance(body[0].body[0].value, (cst.SimpleString, cst.ConcatenatedString))
    ):
        at = 1  # keep the docstring first
    return fn.with_changes(body=fn.body.with_changes(body=body[:at] + decls + body[at:]))


def _renumbered(text: str, sites: list[ast.Constant], final: dict[int, int]) -> str:
    """``text`` (the rewritten function) with each checkpoint's provisional number
    replaced by its final one.  Only the spans of the constants ``evaluation_order``
    found on the ``ast`` (the number argument of each ``__iv.<site>(...)`` call) are
    rewritten: any other literal, even one of the same value, is left as written."""
    data = text.encode("utf-8")  # ast columns count UTF-8 bytes
    starts = [0] + [m.end() for m in _NEWLINE_RE.finditer(data)]
    spans = []
    for const in sites:
        number = final.get(const.value)
        if number is not None:
            first = starts[const.lineno - 1] + const.col_offset
            end = starts[const.end_lineno - 1] + const.end_col_offset
            assert data[first:end] == str(const.value).encode(), (data[first:end], const.value)
            spans.append((first, end, number))
    out, done = [], 0
    for first, end, number in sorted(spans):
        out += [data[done:first], str(number).encode()]
        done = end
    out.append(data[done:])
    return b"".join(out).decode("utf-8")


_helper_ids = itertools.count(1)


def compile_source(src: Source, freevars: tuple[str, ...] = (),
                   helpers: frozenset[str] = frozenset()) -> Compiled:
    """``helpers``: names of the file's @intervene helpers (a call of one in a lane
    runs it as part of the lane)."""
    parsed = _parse(src)
    compiled = _compile(src, *parsed, freevars, helpers, False)
    if not compiled.plan.blocks:  # the same tree, analyzed as a helper's body
        helper = _compile(src, *parsed, freevars, helpers, True)
        if any(lane.items for b in helper.plan.blocks for lane in b.lanes):
            return helper
    return compiled


def _parse(src: Source) -> tuple[cst.Module, cst.FunctionDef, dict]:
    """``src`` parsed: the module, its one function and every node's position."""
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
    return module, fn, walk.positions(module)


def _compile(src: Source, module: cst.Module, fn: cst.FunctionDef, positions: dict,
             freevars: tuple[str, ...], helpers: frozenset[str], helper: bool) -> Compiled:
    info = analyze(src, module, positions, helper)
    rewriter = Rewriter(src, fn, info, positions)
    rewriter.helpers = helpers
    new_fn = walk.transform(rewriter, module).body[0]
    assert isinstance(new_fn, cst.FunctionDef)
    fn_line = src.position(positions[fn][0], 0)[0]
    params = {p.name.value for p in (*fn.params.params, *fn.params.posonly_params,
                                     *fn.params.kwonly_params)}
    for star in (fn.params.star_arg, fn.params.star_kwarg):
        if isinstance(star, cst.Param):
            params.add(star.name.value)
    shared = sorted(
        {n for b in info.blocks for ln in b.lanes for n in ln.nonlocal_names}
        - info.outer_bound - params
    )
    new_fn = _declare(new_fn.with_changes(decorators=[]), shared, fn_line)

    text = cst.Module([new_fn]).code
    tree = ast.parse(text)
    sites = evaluation_order(tree)
    final, lanes = number_checkpoints([c.value for c in sites], rewriter.pending, rewriter.markers)
    shown = _renumbered(text, sites, final)
    offset = next(_helper_ids) * 1_000_000 if helper else 0
    for const in sites:
        if const.value in final:
            const.value = final[const.value] + offset
    _relocate(tree, _line_map(text), fn_line)
    code = compile(_in_factory(tree, fn.name.value, freevars, fn_line), src.filename, "exec",
                   dont_inherit=True)
    blocks = tuple(
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
            free=b.free,
            end_line=b.end_line,
        )
        for b in info.blocks
    )
    plan = P.FunctionPlan(fn.name.value, src.filename, fn_line, blocks)
    decorators = tuple(
        (cst.Module([]).code_for_node(d.decorator), src.position(positions[d][0], 0)[0],
         decorator_name(d))
        for d in fn.decorators
    )
    return Compiled(plan=plan, code=_MARK_RE.sub("", shown), factory_code=code,
                    name=fn.name.value, source=src, decorators=decorators, helper=helper,
                    site_offset=offset)


def _in_factory(tree: ast.Module, name: str, freevars: tuple[str, ...], line: int) -> ast.Module:
    """``def __iv_factory(__iv, <free variables>): <fn>; return <fn>``, built on the
    ``ast`` so the function's own text (and line numbers) stay as they are: its
    free variables become the factory's, so the built function gets closure
    cells for them, which ``Compiled.build`` fills with the original's."""
    factory = ast.FunctionDef(
        name=f"{RT}_factory",
        args=ast.arguments(
            posonlyargs=[], args=[ast.arg(n) for n in (RT, *freevars)], vararg=None,
            kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[],
        ),
        body=[*tree.body, ast.Return(ast.Name(name, ast.Load()))],
        decorator_list=[],
        returns=None,
        type_params=[],
    )
    module = ast.Module([factory], type_ignores=[])
    for node in (factory, factory.args, *factory.args.args, factory.body[-1],
                 factory.body[-1].value):
        node.lineno = node.end_lineno = line
        node.col_offset = node.end_col_offset = -1
    return module


def _line_map(text: str) -> dict[int, int]:
    """Generated line -> the user's line, from the ``# __iv@first:last`` marks."""
    out: dict[int, int] = {}
    spans = []
    for number, line in enumerate(text.splitlines(), 1):
        found = _MARK_LINE_RE.search(line)
        if found:
            first, last = int(found.group(1)), int(found.group(2))
            out[number] = last
            spans.append((number, first, last))
    # Lines of a multi-line statement, counted back from its marked last line.
    for number, first, last in spans:
        for k in range(1, last - first + 1):
            out.setdefault(number - k, last - k)
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
