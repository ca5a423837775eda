"""The ``intervene`` command (also ``python -m compiler``).

``intervene show-plan FILE`` prints what each ``@intervene`` function in a file or a
notebook will ask of the model; it is static: the file is parsed, never imported or
run, and torch is never loaded.  ``intervene serve ...`` hands its arguments to
``python -m runtime.serve``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .block import DirectBlock, blocks_in_file, compile_block, helper_names
from .codegen import Compiled, compile_source
from .errors import CompileError
from .parse import Source, functions_in_file
from .plan import JSON_VERSION, Plan, location, render_function, to_jsonable

SHOW_PLAN_HELP = """\
Print the plan of every @intervene function in FILE, and of every trace block written
outside one ("<block at line N>"), without running anything: for each trace block,
the module values the code waits for, in the order it asks for them.
FILE is read, never imported or run, and torch is not loaded."""

SHOW_PLAN_EPILOG = """\
columns of the text form:
  order       the checkpoint's place in its block (the order the code asks in)
  line        the source line that asks
  module      the module path as written (model.model.layers[5]), the spelling
              errors and cache keys use too; "(dynamic)" when it depends on a
              variable (a loop variable, an index)
  value       output, input, inputs (args and kwargs) or grad
  access      read, write (assigned) or inplace (changed in place), and "save"
              when the value is kept after the block
  steps       which generation steps (only in blocks that select steps); in a
              trace "calls [0:3]": which calls of each module
  repeats in  the loops around it, as kind@line (for@12, while@3, comp@7 for a
              comprehension): it runs once per iteration
Rows starting with "--" are events that are not module values (barrier, steps,
backward, stop, cache). Several invokes are listed one after the other.

exit status: 0 when every function compiled; 1 when the file cannot be read or
parsed, or a function has an error (its error goes to stderr as FILE:LINE: error:
MESSAGE; the other functions' plans are still printed)."""


def _prog() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "intervene" if name == "intervene" else "python -m compiler"


def _parser() -> argparse.ArgumentParser:
    prog = _prog()
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [-h] COMMAND ...",
        description=f"""\
Tools for @intervene experiments.

commands:
  show-plan FILE   print the plan of every @intervene function in a file or notebook
                   (nothing is run); '{prog} show-plan --help' says more
  serve ...        run the experiment server (python -m runtime.serve); every
                   argument after 'serve' goes to it: '{prog} serve --help'""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # the commands are listed in the description above
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     help=argparse.SUPPRESS)
    show = commands.add_parser(
        "show-plan",
        prog=f"{prog} show-plan",
        description=SHOW_PLAN_HELP,
        epilog=SHOW_PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("file", metavar="FILE",
                      help="a Python file (.py) or a Jupyter notebook (.ipynb, its code "
                           "cells in order; places read 'cell N, line M')")
    show.add_argument("--function", metavar="NAME",
                      help="show only the function called NAME")
    show.add_argument("--json", action="store_true",
                      help=f'print the plan as JSON (a stable form, "version": {JSON_VERSION}) '
                           "instead of text")
    show.add_argument("--code", action="store_true",
                      help="also print the rewritten source that runs (the module "
                           "accesses become checkpoints)")
    commands.add_parser("serve", add_help=False)  # never parsed here: see main()
    return parser


# -- reading the file ----------------------------------------------------------------------

# Cell magics whose body is Python; other cell magics (%%bash, %%html, ...) are skipped.
_PYTHON_CELL_MAGICS = {"time", "timeit", "capture", "prun", "debug"}


def _cell_text(lines: list[str] | str) -> str | None:
    """A notebook code cell as Python: line magics (``%x``, ``!x``) become comments of
    the same length (so columns stay right); None for a cell that is not Python."""
    text = lines if isinstance(lines, str) else "".join(lines)
    out = []
    for n, line in enumerate(text.splitlines(keepends=True)):
        stripped = line.lstrip()
        magic = stripped[2:].split(maxsplit=1)[:1] if stripped.startswith("%%") else None
        if n == 0 and magic is not None and not set(magic) & _PYTHON_CELL_MAGICS:
            return None
        if stripped.startswith(("%", "!")):
            line = line[: len(line) - len(stripped)] + "#" + stripped[1:]
        out.append(line)
    return "".join(out)


def _notebook_cells(path: str) -> list[tuple[str, str]]:
    """(where, text) of each Python code cell: ``nb.ipynb, cell N`` counts every cell
    from 1, as notebook editors number them."""
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as exc:
            raise CompileError(f"not a Jupyter notebook (invalid JSON: {exc.msg})",
                               path, exc.lineno, exc.colno - 1) from None
    cells = doc.get("cells") if isinstance(doc, dict) else None
    if not isinstance(cells, list):
        raise CompileError("not a Jupyter notebook (no list of cells)", path)
    out = []
    for n, cell in enumerate(cells, 1):
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            text = _cell_text(cell.get("source", ""))
            if text is not None:
                out.append((f"{path}, cell {n}", text))
    return out


def _sources(path: str) -> tuple[list[Source], list[CompileError]]:
    """The @intervene functions of a file or notebook, and the errors of the parts
    (notebook cells) that do not parse.  OSError when it cannot be read."""
    if not path.endswith(".ipynb"):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        found = functions_in_file(path, text)
        return _with_blocks(found, path, text), []
    import libcst as cst

    from .parse import decorator_aliases

    cells = _notebook_cells(path)
    aliases: frozenset[str] = frozenset()
    for _, text in cells:  # a decorator imported under another name in any cell
        try:
            aliases |= decorator_aliases(cst.parse_module(text))
        except cst.ParserSyntaxError:
            pass  # reported below
    sources, errors = [], []
    for where, text in cells:
        try:
            sources.extend(_with_blocks(functions_in_file(where, text, aliases), where, text))
        except CompileError as exc:
            errors.append(exc)
    return sources, errors


def _with_blocks(functions: list, filename: str, text: str) -> list:
    """The file's @intervene functions and its blocks written outside them (top level,
    plain functions), in the order of their lines."""
    names = helper_names(filename, text)
    if names:
        _HELPERS[filename] = names
    found = [*functions, *blocks_in_file(filename, text)]
    return sorted(found, key=lambda s: s.line if isinstance(s, DirectBlock) else s.first_line)


_HELPERS: dict[str, frozenset[str]] = {}  # file -> its @intervene helpers


def _compile(src) -> Compiled:
    if isinstance(src, DirectBlock):
        return compile_block(src, ())
    return compile_source(src, (), _HELPERS.get(src.filename, frozenset()))


def _error(exc: CompileError) -> str:
    where = location(exc.filename, exc.lineno) if exc.lineno else exc.filename
    return f"{where}: error: {exc.message}"


# -- show-plan -----------------------------------------------------------------------------


def show_plan(args: argparse.Namespace) -> int:
    try:
        sources, errors = _sources(args.file)
    except CompileError as exc:
        print(_error(exc), file=sys.stderr)
        return 1
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        print(f"{args.file}: error: {reason}", file=sys.stderr)
        return 1
    if args.function:
        sources = [s for s in sources if _name_of(s) == args.function]
        if not sources:
            for exc in errors:
                print(_error(exc), file=sys.stderr)
            print(f"{args.file}: error: no @intervene function named {args.function!r}",
                  file=sys.stderr)
            return 1
    compiled: list[Compiled] = []
    for src in sources:  # one bad function does not hide the others' plans
        try:
            compiled.append(_compile(src))
        except CompileError as exc:
            errors.append(exc)
    for exc in errors:
        print(_error(exc), file=sys.stderr)
    status = 1 if errors else 0
    if args.json:
        doc = to_jsonable(Plan(tuple(c.plan for c in compiled)))
        if args.code:
            for f, c in zip(doc["functions"], compiled):
                f["code"] = c.code
        print(json.dumps(doc, indent=2))
        return status
    if not compiled:
        if not errors:
            print(f"{args.file}: no @intervene functions")
        return status
    parts = []
    for c in compiled:
        text = render_function(c.plan)
        if args.code:
            text += "\n\n  rewritten code:\n" + "\n".join(
                "    " + line if line else "" for line in c.code.rstrip().splitlines()
            )
        parts.append(text)
    print("\n\n".join(parts))
    return status


def _name_of(src: Source | DirectBlock) -> str:
    """The function's name, read off its ``def`` line (cheaper than compiling it)."""
    if isinstance(src, DirectBlock):
        return f"<block at line {src.line}>"
    for line in src.text.splitlines():
        words = line.split()
        for i, word in enumerate(words[:-1]):
            if word == "def":
                return words[i + 1].partition("(")[0]
    return ""


# -- serve ---------------------------------------------------------------------------------


def serve(argv: list[str]) -> int:
    """``python -m runtime.serve ARGS``, run in this process."""
    import importlib.util
    import runpy

    missing = (f"{_prog()} serve: error: the server is not part of this installation "
               "(python -m runtime.serve cannot run: {})")
    try:
        found = importlib.util.find_spec("runtime.serve") is not None
    except ImportError:
        found = False
    if not found:
        print(missing.format("no module runtime.serve"), file=sys.stderr)
        return 2
    old = sys.argv
    sys.argv = [f"{_prog()} serve", *argv]
    try:
        # looked up only now: the server is optional and may be absent
        runpy.run_module("runtime.serve", run_name="__main__", alter_sys=True)
    except ImportError as exc:
        if exc.name not in (None, "runtime.serve", "runtime.serve.__main__"):
            raise  # the server itself failed to import something: show the real error
        print(missing.format(exc), file=sys.stderr)
        return 2
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = old
    return 0


# -- entry point ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    parser = _parser()
    if not argv:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: a command is needed (show-plan or serve); "
              f"see '{parser.prog} --help'", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has reported
        return exc.code if isinstance(exc.code, int) else 2
    try:
        status = show_plan(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        # `intervene show-plan x.py | head`: the reader has gone, which is fine. Point
        # stdout at /dev/null so the interpreter's own final flush stays quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
