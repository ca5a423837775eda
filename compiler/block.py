"""Blocks without a decorator: one ``with model.trace(...):`` compiled on its own.

``with model.trace(prompt):`` written at the top level of a script, in a notebook
cell or in a plain function is compiled when it is entered: the runtime
(``runtime/direct.py``) gives the file and line of the ``with`` statement; this
module finds that statement in the file's source, wraps it in a function of its
own (``def <block>(<names it takes from around it>): <the with statement>;
return locals()``) and compiles that with the same passes as an ``@intervene``
function.  Lines and columns stay the user's: the wrapper's first line is the line
above the ``with``, and the statement is the user's text, node for node.

``blocks_in_file`` lists such blocks for ``show-plan``.
"""

from __future__ import annotations

import ast
import dataclasses
import threading
from dataclasses import dataclass

import libcst as cst

from . import walk
from .analyze import block_item
from .codegen import Compiled, compile_source
from .errors import CompileError
from .parse import Source, decorator_aliases, is_intervene, parse_error_position

__all__ = ["DirectBlock", "blocks_in_file", "compile_block", "find_block"]

NAME = "__block__"  # the wrapper's name in the compiled code (never shown)
_CACHE_MAX = 256


@dataclass(frozen=True)
class DirectBlock:
    """A ``with`` statement found in a file: the wrapper's source, and what the
    runtime needs to run it in the caller's namespace."""

    source: Source  # the wrapper: `def __block__(...):` on the line above the `with`
    line: int  # the `with` statement's first line
    body_line: int  # its body's first line
    end_line: int
    target: str | None  # `as NAME`: the tracer's name, if one is given
    loads: frozenset[str]  # names the block reads
    stores: frozenset[str]  # names the block binds
    # (name, line, column) of the first read of each name after the block, in the
    # scope around it (the function, or the module)
    later: tuple[tuple[str, int, int], ...] = ()
    helpers: frozenset[str] = frozenset()  # the file's @intervene helpers


class _Blocks(cst.CSTVisitor):
    """Every ``with`` statement whose item is a trace block (``X.trace(...)``,
    ``X.generate(...)``, ``X.scan(...)``), outside ``@intervene`` functions and
    outside other such blocks."""

    def __init__(self, aliases: frozenset[str]) -> None:
        super().__init__()
        self.aliases = aliases
        self.found: list[cst.With] = []
        self._depth = 0

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return not is_intervene(node, self.aliases)

    def visit_With(self, node: cst.With) -> bool:
        if block_item(node) is not None:
            self.found.append(node)
            return False  # a block inside a block is the compiler's to judge
        return True


_files: dict[str, tuple] = {}
_compiled: dict[tuple, Compiled] = {}
_lock = threading.Lock()


def _parse(filename: str, text: str) -> tuple[cst.Module, dict, list[cst.With], ast.Module]:
    with _lock:
        got = _files.get(filename)
    if got is not None and got[0] == text:
        return got[1], got[2], got[3], got[4]
    try:
        module = cst.parse_module(text)
    except cst.ParserSyntaxError as exc:
        line, col = parse_error_position(exc)
        raise CompileError(f"cannot parse: {exc.message}", filename, line, col) from None
    positions = walk.positions(module)
    finder = _Blocks(decorator_aliases(module))
    walk.visit(finder, module)
    try:
        tree = ast.parse(text)
    except SyntaxError:
        tree = ast.Module([], [])
    with _lock:
        if len(_files) >= 64:
            del _files[next(iter(_files))]
        _files[filename] = (text, module, positions, finder.found, tree)
    return module, positions, finder.found, tree


def _reads_after(tree: ast.Module, line: int, end_line: int) -> tuple[tuple[str, int, int], ...]:
    """The first read of each name after line ``end_line`` in the innermost function
    around ``line`` (or the module)."""
    scope: ast.AST = tree
    while True:
        inner = [n for n in ast.iter_child_nodes(scope) if isinstance(
            n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.lineno <= line <= (n.end_lineno or 0)]
        inner = inner or [n for n in ast.walk(scope) if n is not scope and isinstance(
            n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.lineno <= line <= (n.end_lineno or 0)]
        if not inner:
            break
        scope = inner[0]
    first: dict[str, tuple[int, int]] = {}
    for n in ast.walk(scope):
        if (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.lineno > end_line
                and (n.id not in first or (n.lineno, n.col_offset) < first[n.id])):
            first[n.id] = (n.lineno, n.col_offset)
    return tuple((k, ln, col) for k, (ln, col) in sorted(first.items()))


def _wrap(node: cst.With, filename: str, line: int, col: int, end_line: int,
          body_line: int = 0) -> DirectBlock:
    """``def __block__(): <node>; return locals()`` whose ``with`` keeps its lines."""
    body = node.body
    if not isinstance(body, cst.IndentedBlock):
        raise CompileError(
            "a trace block outside an @intervene function needs its body on the lines "
            "below the `with` (the body is skipped when the block runs compiled): write "
            "`with ...:` and the body on the next line",
            filename, line, col,
        )
    text, loads, stores = wrapped(node, NAME)
    item = node.items[block_item(node)]
    target = None
    if item.asname is not None and isinstance(item.asname.name, cst.Name):
        target = item.asname.name.value
    # The wrapper's `def` sits on the line above the `with`; its body is indented
    # 4 columns where the user's `with` is at `col`.
    src = Source(text, filename, line - 1, col - 4)
    return DirectBlock(src, line, body_line or line + 1, end_line, target, loads, stores)


def wrapped(node: cst.With, name: str) -> tuple[str, frozenset[str], frozenset[str]]:
    """``def <name>(): <node>; return locals()`` as text, with the names ``node`` reads
    (``loads``) and binds in its own scope (``stores``)."""
    ret = cst.SimpleStatementLine(
        [cst.Return(cst.Call(cst.Name("locals")))]
    )
    fn = cst.FunctionDef(
        name=cst.Name(name),
        params=cst.Parameters(),
        body=cst.IndentedBlock([node.with_changes(leading_lines=()), ret]),
    )
    text = cst.Module([fn]).code
    tree = ast.parse(text)
    loads, stores = set(), set()
    todo: list[tuple[ast.AST, bool]] = [(tree.body[0].body[0], False)]
    while todo:  # stores of the block's own scope (not of comprehensions, defs, lambdas)
        n, inner = todo.pop()
        if isinstance(n, ast.AugAssign) and isinstance(n.target, ast.Name):
            loads.add(n.target.id)  # `n += 1` reads `n` too
        if isinstance(n, ast.Name):
            (loads if isinstance(n.ctx, ast.Load) else (loads if inner else stores)).add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not inner:
            stores.add(n.name)
        elif isinstance(n, ast.alias) and not inner:
            stores.add((n.asname or n.name).partition(".")[0])
        nested = inner or isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                         ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp,
                                         ast.GeneratorExp))
        todo.extend((c, nested) for c in ast.iter_child_nodes(n))
    return text, frozenset(loads), frozenset(stores)


def innermost_at(found, positions: dict, line: int):
    """Of the ``with`` statements ``found``, the innermost whose header spans ``line``:
    ``(node, first line, column, last line)``, or None."""
    best = None
    for node in found:
        first, col, last, _ = positions[node]
        body = node.body
        head_end = positions[body.body[0]][0] - 1 if isinstance(body, cst.IndentedBlock) else last
        if first <= line <= max(head_end, first) and (best is None or first >= best[1]):
            best = (node, first, col, last)
    return best


def find_block(filename: str, text: str, line: int) -> DirectBlock:
    """The trace block whose ``with`` header is on ``line`` of ``text`` (the
    innermost one, when blocks are nested in other ``with`` statements)."""
    module, positions, found, tree = _parse(filename, text)
    best = innermost_at(found, positions, line)
    if best is None:
        raise CompileError(
            f"no `with ....trace(...)` / `.generate(...)` / `.scan(...)` statement found at "
            f"line {line} of {filename}: a trace block outside an @intervene function is "
            "compiled from its source, so it must be written as a `with` statement",
            filename, line,
        )
    node, first, col, last = best
    body = node.body
    body_line = positions[body.body[0]][0] if isinstance(body, cst.IndentedBlock) else 0
    block = _wrap(node, filename, first, col, last, body_line)
    return dataclasses.replace(block, later=_reads_after(tree, first, last),
                               helpers=helper_names(filename, text, module))


def compile_block(block: DirectBlock, params: tuple[str, ...]) -> Compiled:
    """The block compiled as a function taking ``params`` (names the caller binds);
    cached by the block's text, file, line and parameters."""
    key = (block.source.text, block.source.filename, block.line, params, block.helpers)
    with _lock:
        got = _compiled.get(key)
    if got is not None:
        return got
    src = block.source
    if params:
        head = f"def {NAME}():"
        assert src.text.startswith(head)
        src = dataclasses.replace(src, text=f"def {NAME}({', '.join(params)}):" + src.text[len(head):])
    compiled = compile_source(src, (), block.helpers)
    saved = set(compiled.plan.blocks[0].saved) if compiled.plan.blocks else set()
    for name, line, col in block.later:
        if name in block.stores and name not in saved and name != block.target:
            raise CompileError(
                f"`{name}` is assigned inside the block at line {block.line} but read at "
                f"line {line}, after the block, without being saved: write "
                f"`{name} = ....save()` in the block (or call `{name}.save()` there) to keep it",
                block.source.filename, line, col,
            )
    plan = dataclasses.replace(compiled.plan, name=f"<block at line {block.line}>",
                               line=block.line)
    compiled = dataclasses.replace(compiled, plan=plan)
    with _lock:
        if len(_compiled) >= _CACHE_MAX:
            del _compiled[next(iter(_compiled))]
        _compiled[key] = compiled
    return compiled


def blocks_in_file(filename: str, text: str) -> list[DirectBlock]:
    """Every trace block of a file written outside an ``@intervene`` function (for
    ``show-plan``); the file is parsed, never run."""
    module, positions, found, _tree = _parse(filename, text)
    helpers = helper_names(filename, text, module)
    out = []
    for node in found:
        first, col, last, _ = positions[node]
        block = _wrap(node, filename, first, col, last)
        out.append(dataclasses.replace(block, helpers=helpers))
    return out


class _Helpers(cst.CSTVisitor):
    """Names of the ``@intervene`` functions without a trace block of their own."""

    def __init__(self, aliases: frozenset[str]) -> None:
        super().__init__()
        self.aliases = aliases
        self.names: set[str] = set()
        self._stack: list[list] = []

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self._stack.append([node, is_intervene(node, self.aliases), False])

    def leave_FunctionDef(self, node: cst.FunctionDef) -> None:
        _node, decorated, has_block = self._stack.pop()
        if decorated and not has_block:
            self.names.add(node.name.value)

    def visit_With(self, node: cst.With) -> None:
        if block_item(node) is not None and self._stack:
            self._stack[-1][2] = True


_helper_cache: dict[str, tuple[str, frozenset[str]]] = {}


def helper_names(filename: str, text: str, module: cst.Module | None = None) -> frozenset[str]:
    """The names of a file's helpers (``@intervene`` functions with no block): a call
    of one inside a block runs it as part of the calling lane.  ``module``: ``text``
    already parsed (by ``_parse``), so it is not parsed again."""
    with _lock:
        got = _helper_cache.get(filename)
    if got is not None and got[0] == text:
        return got[1]
    if module is None:
        try:
            module = cst.parse_module(text)
        except cst.ParserSyntaxError:
            return frozenset()
    finder = _Helpers(decorator_aliases(module))
    walk.visit(finder, module)
    names = frozenset(finder.names)
    with _lock:
        if len(_helper_cache) >= 64:
            del _helper_cache[next(iter(_helper_cache))]
        _helper_cache[filename] = (text, names)
    return names
