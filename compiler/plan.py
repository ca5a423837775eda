"""The plan IR: what a compiled experiment will ask of the model, as plain data.

A plan is a closed set of small frozen dataclasses (Plan > FunctionPlan > Block >
Lane > Checkpoint | Marker).  It holds no live objects, so it renders as text
(``show-plan``), as JSON (``--json``), can be shipped elsewhere, and feeds the
runtime's pre-run checks: static module paths are resolved against the model
and impossible orders are reported before the forward pass starts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

BlockKind = Literal["trace", "generate", "scan"]
Value = Literal["output", "input", "inputs", "grad"]
Access = Literal["read", "write", "inplace"]

# Bumped whenever the JSON form changes shape.
JSON_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """One module value the code waits for.

    ``order`` is the checkpoint's position in its block (source order), and the
    ``site`` number the rewritten code passes to the runtime.  ``path`` is the
    module path as written, relative to the traced model (``transformer.h[5]``);
    ``parts`` is that path parsed (attribute names and integer indices), or
    ``None`` when it is ``dynamic`` (a variable index, a loop variable, ...).
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


def _render_item(i: Checkpoint | Marker) -> str:
    if isinstance(i, Marker):
        text = f"  {i.order:>3}  -- {i.kind}"
        if i.detail:
            text += f" {i.detail}"
        return f"{text:<60} line {i.line}"
    access = i.access + (" save" if i.saves else "")
    where = i.path + ("  (dynamic)" if i.dynamic else "")
    steps = f" steps {i.steps}" if i.steps else ""
    return f"  {i.order:>3}  {where:<28} {i.value:<7} {access:<12}{steps} line {i.line}"


def render_function(f: FunctionPlan) -> str:
    out = [f"{f.name}  ({f.filename}:{f.line})"]
    if not f.blocks:
        out.append("  (no trace blocks)")
    for b in f.blocks:
        out.append(f"  block {b.index}: {b.model}.{b.kind}({b.args})  line {b.line}")
        for lane in b.lanes:
            if lane.input is not None or len(b.lanes) > 1:
                src = "whole batch" if lane.input is None else lane.input
                out.append(f"    invoke {lane.index} ({src})  line {lane.line}")
            if not lane.items:
                out.append("      (no checkpoints)")
            for i in lane.items:
                out.append("    " + _render_item(i))
        if b.saved:
            out.append(f"    saved after the block: {', '.join(b.saved)}")
    return "\n".join(out)


def render_text(plan: Plan) -> str:
    return "\n\n".join(render_function(f) for f in plan.functions)
