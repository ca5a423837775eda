"""``python -m compiler show-plan FILE.py [--function NAME] [--json] [--code]``

Static: the file is parsed, never imported or run, and torch is never loaded.
"""

from __future__ import annotations

import argparse
import json
import sys

from .codegen import compile_source
from .errors import CompileError
from .parse import functions_in_file
from .plan import Plan, render_function, to_jsonable


def show_plan(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compiler show-plan",
        description="Print the plan of every @intervene function in FILE, without running it.",
    )
    parser.add_argument("file")
    parser.add_argument("--function", help="only this function")
    parser.add_argument("--json", action="store_true", help="machine-readable plan")
    parser.add_argument("--code", action="store_true", help="also print the rewritten source")
    args = parser.parse_args(argv)
    try:
        sources = functions_in_file(args.file)
        compiled = [compile_source(s) for s in sources]
    except CompileError as exc:
        print(f"{exc.filename}:{exc.lineno}: error: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.file}: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if args.function:
        compiled = [c for c in compiled if c.name == args.function]
        if not compiled:
            print(f"{args.file}: error: no @intervene function named {args.function!r}",
                  file=sys.stderr)
            return 1
    if args.json:
        doc = to_jsonable(Plan(tuple(c.plan for c in compiled)))
        if args.code:
            for f, c in zip(doc["functions"], compiled):
                f["code"] = c.code
        print(json.dumps(doc, indent=2))
        return 0
    if not compiled:
        print(f"{args.file}: no @intervene functions")
    parts = []
    for c in compiled:
        text = render_function(c.plan)
        if args.code:
            text += "\n\n  rewritten code:\n" + "\n".join(
                "    " + line if line else "" for line in c.code.rstrip().splitlines()
            )
        parts.append(text)
    print("\n\n".join(parts))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] != "show-plan":
        print(f"unknown command {argv[0]!r}; the command is: show-plan", file=sys.stderr)
        return 2
    return show_plan(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
