"""Finding source: a function object's source, or every @intervene function in a file.

The result is always a ``Source``: the function's own text (dedented), the file
it came from and where it starts there, so every later pass can report
positions in the user's file.
"""

from __future__ import annotations

import ast
import inspect
import linecache
import re
from dataclasses import dataclass

import libcst as cst

from . import walk
from .errors import CompileError


@dataclass(frozen=True)
class Source:
    text: str  # dedented source of the function, decorators included
    filename: str
    first_line: int  # line of ``text``'s first line in ``filename``
    indent: int  # columns removed by dedenting

    def position(self, line: int, col: int) -> tuple[int, int]:
        """A (line, column) in ``text`` -> the same place in the file."""
        return self.first_line + line - 1, col + self.indent


def _dedent(lines: list[str]) -> tuple[str, int]:
    first = lines[0]
    indent = len(first) - len(first.lstrip())
    prefix = first[:indent]
    out = [ln[indent:] if ln.startswith(prefix) else ln.lstrip() for ln in lines]
    return "".join(out), indent


def source_of(fn) -> Source:
    """The source of a live function, or a CompileError saying why there is none."""
    name = getattr(fn, "__qualname__", repr(fn))
    code = getattr(fn, "__code__", None)
    if code is None:
        raise CompileError(f"@intervene needs a plain function, got {type(fn).__name__}")
    filename = code.co_filename
    if fn.__name__ == "<lambda>":
        raise CompileError(
            "@intervene cannot compile a lambda: write the experiment as a `def` function",
            filename,
            code.co_firstlineno,
        )
    try:
        try:
            lines, first_line = inspect.getsourcelines(fn)
        except OSError:
            if not _recover_cell(code):
                raise
            lines, first_line = inspect.getsourcelines(fn)
    except (OSError, TypeError) as exc:
        raise CompileError(
            f"@intervene cannot read the source of {name}() ({exc}). It compiles the "
            "function from its source, which Python keeps only for code in a file or a "
            "notebook cell: define the experiment in a .py file (or a Jupyter/IPython "
            "cell), not in the plain REPL or through exec()/eval() of a string",
            filename,
            code.co_firstlineno,
        ) from None
    text, indent = _dedent(lines)
    return Source(text, filename, first_line, indent)


def _recover_cell(code) -> bool:
    """The source of a function defined in a ``%%time`` cell: ``recover_cell`` for it."""
    return recover_cell(code.co_filename, lambda text: _defines(text, code))


def recover_cell(filename: str, holds) -> bool:
    """IPython runs a ``%%time`` cell's body under a file name of its own
    (``<timed exec>``) that it never puts in ``linecache``; the cell it ran,
    ``get_ipython().run_cell_magic('time', '', '<body>')``, is there.  Find the
    newest such cell whose body ``holds`` (a function of its text: it has the code we
    look for at its line) and register the body under ``filename``, so the source (and
    traceback lines) can be read."""
    if not (filename.startswith("<") and filename.endswith(">")):
        return False
    for name, entry in reversed(list(linecache.cache.items())):
        lines = entry[2] if len(entry) > 2 else None
        if name == filename or not lines or not any("run_cell_magic(" in ln for ln in lines):
            continue
        try:
            tree = ast.parse("".join(lines))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "run_cell_magic" and len(node.args) >= 3
                    and isinstance(node.args[2], ast.Constant)
                    and isinstance(node.args[2].value, str)):
                continue
            if holds(node.args[2].value):
                body = node.args[2].value.splitlines(keepends=True)
                linecache.cache[filename] = (len(node.args[2].value), None, body, filename)
                return True
    return False


def has_with_at(text: str, line: int) -> bool:
    """``text`` has a ``with`` statement at ``line`` (a block written without a decorator)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return False
    return any(isinstance(node, ast.With) and node.lineno == line for node in ast.walk(tree))


def _defines(text: str, code) -> bool:
    """``text`` defines the function of ``code``: its name and parameters, at its line."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return False
    params = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == code.co_name:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            a = node.args
            names = tuple(p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs))
            if first == code.co_firstlineno and names == params:
                return True
    return False


def parse_error_position(exc: cst.ParserSyntaxError) -> tuple[int, int]:
    """Where a parse error is.  libcst's ``raw_line`` can point past the end of
    the bad line (at the next token); its message names the exact place."""
    found = re.search(r"error at (\d+):(\d+)", exc.message)
    if found:
        return int(found.group(1)), max(int(found.group(2)) - 1, 0)
    return exc.raw_line, exc.raw_column


def decorator_name(dec: cst.Decorator) -> str | None:
    node = dec.decorator
    if isinstance(node, cst.Call):
        node = node.func
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return node.attr.value
    return None


def is_intervene(fn: cst.FunctionDef, aliases: frozenset[str] = frozenset()) -> bool:
    """``@intervene``, ``@compiler.intervene`` (any ``X.intervene``) or a name in
    ``aliases`` (``from compiler import intervene as iv`` -> ``@iv``)."""
    return any(decorator_name(d) in {"intervene", *aliases} for d in fn.decorators)


class _Aliases(cst.CSTVisitor):
    """The names ``from ... import intervene as NAME`` binds, anywhere in a module."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
        if isinstance(node.names, cst.ImportStar):
            return
        for alias in node.names:
            if (isinstance(alias.name, cst.Name) and alias.name.value == "intervene"
                    and alias.asname is not None and isinstance(alias.asname.name, cst.Name)):
                self.names.add(alias.asname.name.value)


def decorator_aliases(module: cst.Module) -> frozenset[str]:
    """What else ``module`` calls the decorator (see ``_Aliases``)."""
    found = _Aliases()
    module.visit(found)
    return frozenset(found.names)


class _FindFunctions(cst.CSTVisitor):
    def __init__(self, positions: dict, aliases: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.positions = positions
        self.aliases = aliases
        self.found: list[tuple[str, int, int]] = []  # (name, first line, last line)

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        if is_intervene(node, self.aliases):
            pos = self.positions[node]
            first = min([pos[0]] + [self.positions[d][0] for d in node.decorators])
            self.found.append((node.name.value, first, pos[2]))


def functions_in_file(filename: str, text: str | None = None,
                      aliases: frozenset[str] = frozenset()) -> list[Source]:
    """Every ``@intervene`` function of a file, without importing or running it.
    ``aliases``: other names of the decorator, besides those the file imports (a
    notebook cell uses what an earlier cell imported)."""
    if text is None:
        with open(filename, encoding="utf-8") as f:
            text = f.read()
    try:
        module = cst.parse_module(text)
    except cst.ParserSyntaxError as exc:
        line, col = parse_error_position(exc)
        raise CompileError(f"cannot parse: {exc.message}", filename, line, col) from None
    finder = _FindFunctions(walk.positions(module), aliases | decorator_aliases(module))
    walk.visit(finder, module)
    all_lines = text.splitlines(keepends=True)
    out = []
    for _name, first, last in finder.found:
        body, indent = _dedent(all_lines[first - 1 : last])
        out.append(Source(body, filename, first, indent))
    return out
