"""The plan IR: what a compiled experiment will ask of the model, as plain data.

A plan is a closed set of small frozen dataclasses (Plan > FunctionPlan > Block >
Lane > Checkpoint | Marker).  It holds no live objects, so it renders as text
(``show-plan``), as JSON (``--json``), can be shipped elsewhere, and feeds the
runtime's pre-run checks: static module paths are resolved against the model
and impossible orders are reported before the forward pass starts.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

BlockKind = Literal["trace", "generate", "scan", "edit"]
Value = Literal["output", "input", "inputs", "grad"]
Access = Literal["read", "write", "inplace"]

# Bumped whenever the JSON form changes shape or meaning (2: ``path`` is the path as
# written, rooted at the model's variable, no longer relative to it).
JSON_VERSION = 2


@dataclass(frozen=True)
class Checkpoint:
    """One module value the code waits for.

    ``order`` is the checkpoint's position in its block (source order), and the
    ``site`` number the rewritten code passes to the runtime.  ``path`` is the
    module path exactly as written (``model.transformer.h[5]``, ``layer`` for a loop
    variable): the spelling runtime errors and cache keys use too (runtime/paths.py);
    ``parts`` is that path parsed, relative to the traced model (attribute names and
    integer indices: ``("transformer", "h", 5)``), or ``None`` when it is ``dynamic``
    (a variable index, a loop variable, ...).
    ``scope`` names the enclosing control flow (``if@12``, ``for@3``...) inside
    the lane; two checkpoints with the same scope surely both run, in order.
    """

    order: int
    path: str
    value: Value
    access: Access
    line: int
    col: int
    parts: tuple[str | int, ...] | None = None
    saves: bool = False
    steps: str | None = None
    scope: tuple[str, ...] = ()

    @property
    def dynamic(self) -> bool:
        return self.parts is None


@dataclass(frozen=True)
class Marker:
    """A non-module event in a lane: ``barrier``, ``stop``, ``cache``, ``steps``,
    ``backward``.  ``detail`` is the source text that made it."""

    order: int
    kind: str
    line: int
    detail: str = ""
    scope: tuple[str, ...] = ()


@dataclass(frozen=True)
class Lane:
    """The code of one invoke (or of a trace without invokes): it runs as one
    generator, in source order, and sees only its own rows of the batch."""

    index: int
    line: int
    input: str | None  # source text of the invoke's input; None: the trace's own
    items: tuple[Checkpoint | Marker, ...] = ()

    @property
    def checkpoints(self) -> tuple[Checkpoint, ...]:
        return tuple(i for i in self.items if isinstance(i, Checkpoint))


@dataclass(frozen=True)
class Block:
    """One ``with model.trace(...)`` / ``generate`` / ``scan`` block."""

    index: int
    kind: BlockKind
    model: str  # the traced model as written (``model``, ``self.lm``)
    args: str  # the call's arguments as written
    line: int
    lanes: tuple[Lane, ...] = ()
    saved: tuple[str, ...] = ()  # names that outlive the block
    # (name, first line) of what the block reads from around it, and its last line:
    # what a remote run sends and where the block ends.
    free: tuple[tuple[str, int], ...] = ()
    end_line: int = 0

    def checkpoint(self, site: int) -> Checkpoint:
        for lane in self.lanes:
            for item in lane.items:
                if isinstance(item, Checkpoint) and item.order == site:
                    return item
        raise KeyError(site)


@dataclass(frozen=True)
class FunctionPlan:
    name: str
    filename: str
    line: int
    blocks: tuple[Block, ...] = ()


@dataclass(frozen=True)
class Plan:
    functions: tuple[FunctionPlan, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        return json.dumps(to_jsonable(self), indent=2)

    def __str__(self) -> str:
        return render_text(self)

    # The readable text wherever the plan is shown: the REPL (``repr``), IPython
    # (``_repr_pretty_``) and notebooks (``_repr_html_``), not a dump of the dataclasses
    # (their fields stay available as attributes).
    def __repr__(self) -> str:
        return render_text(self)

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        printer.text(render_text(self))

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(render_text(self))}</pre>"


def to_jsonable(plan: Plan) -> dict:
    """The stable machine-readable form (documented in the README)."""

    def item(i: Checkpoint | Marker) -> dict:
        d = asdict(i)
        d["type"] = "checkpoint" if isinstance(i, Checkpoint) else "marker"
        if isinstance(i, Checkpoint):
            d["dynamic"] = i.dynamic
            d["parts"] = None if i.parts is None else list(i.parts)
        d["scope"] = list(i.scope)
        return d

    return {
        "version": JSON_VERSION,
        "functions": [
            {
                "name": f.name,
                "filename": f.filename,
                "line": f.line,
                "blocks": [
                    {
                        "index": b.index,
                        "kind": b.kind,
                        "model": b.model,
                        "args": b.args,
                        "line": b.line,
                        "saved": list(b.saved),
                        "lanes": [
                            {
                                "index": ln.index,
                                "line": ln.line,
                                "input": ln.input,
                                "items": [item(i) for i in ln.items],
                            }
                            for ln in b.lanes
                        ],
                    }
                    for b in f.blocks
                ],
            }
            for f in plan.functions
        ],
    }


# -- text --------------------------------------------------------------------------------
# One row per lane item, in columns named by a header row; widths are computed per block
# (a long dynamic path or step selection widens its column for the whole block).  The
# steps and "repeats in" columns appear only in blocks that have a value for them; a
# marker's text spans the module to steps columns.

_LOOP_KINDS = ("for", "while", "comp")


def location(filename: str, line: int) -> str:
    """``file.py:12``; in a notebook cell (``nb.ipynb, cell 3``) ``nb.ipynb, cell 3, line 12``."""
    if re.search(r"\.ipynb, cell \d+$", filename):
        return f"{filename}, line {line}"
    return f"{filename}:{line}"


def _loops(scope: tuple[str, ...]) -> str:
    """The loops around an item (``for@3 comp@7``), outermost first: it runs once per
    iteration of each."""
    return " ".join(s for s in scope if s.partition("@")[0] in _LOOP_KINDS)


def _block_rows(b: Block) -> list[str]:
    items = [i for lane in b.lanes for i in lane.items]
    cps = [i for i in items if isinstance(i, Checkpoint)]
    show_steps = any(c.steps for c in cps)
    show_loops = any(_loops(i.scope) for i in items)

    def module(c: Checkpoint) -> str:
        return c.path + ("  (dynamic)" if c.dynamic else "")

    def access(c: Checkpoint) -> str:
        return c.access + (" save" if c.saves else "")

    def marker(m: Marker) -> str:
        return f"-- {m.kind} {m.detail}".rstrip()

    # (title, text of a checkpoint) of the columns a marker's text spans
    spanned = [("module", module), ("value", lambda c: c.value), ("access", access)]
    if show_steps:
        spanned.append(("steps", lambda c: c.steps or ""))
    widths = [max([len(t)] + [len(f(c)) for c in cps]) for t, f in spanned]
    span = sum(widths) + 2 * (len(widths) - 1)
    line_w = max([len("line")] + [len(str(i.line)) for i in items])

    def row(order: str, line: str, cells: str, loops: str) -> str:
        # a marker's text longer than the columns it spans pushes only its own row's
        # "repeats in" to the right
        text = f"    {order:>5}  {line:>{line_w}}  {cells:<{span}}"
        return f"{text}  {loops}" if show_loops else text

    titles = "  ".join(f"{t:<{w}}" for (t, _), w in zip(spanned, widths))
    rows = [row("order", "line", titles, "repeats in")] if items else []
    for lane in b.lanes:
        if lane.input is not None or len(b.lanes) > 1:
            src = "whole batch" if lane.input is None else lane.input
            rows.append(f"    invoke {lane.index} ({src})  line {lane.line}")
        if not lane.items:
            rows.append("      (no checkpoints)")
        for i in lane.items:
            if isinstance(i, Marker):
                cells = marker(i)
            else:
                cells = "  ".join(f"{f(i):<{w}}" for (_, f), w in zip(spanned, widths))
            rows.append(row(str(i.order), str(i.line), cells, _loops(i.scope)))
    return rows


def render_function(f: FunctionPlan) -> str:
    """The readable plan of one function (what ``show-plan`` prints for it)."""
    out = [f"{f.name}  ({location(f.filename, f.line)})"]
    if not f.blocks:
        out.append("  (no trace blocks)")
    for b in f.blocks:
        if b.model == "(helper)":  # an @intervene helper: its body runs in its caller's lane
            out.append(f"  helper body (runs in the calling block's lane)  line {b.line}")
        else:
            out.append(f"  block {b.index}: {b.model}.{b.kind}({b.args})  line {b.line}")
        out.extend(line.rstrip() for line in _block_rows(b))
        if b.saved:
            out.append(f"    saved after the block: {', '.join(b.saved)}")
    return "\n".join(out)


def render_text(plan: Plan) -> str:
    return "\n\n".join(render_function(f) for f in plan.functions)
