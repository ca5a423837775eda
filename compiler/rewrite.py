"""The rewrite: trace blocks -> lanes of checkpointed code the runtime drives.

Each trace block becomes ``with __iv.block(<the user's call>, <index>) as t:``
whose body defines one generator function per lane (an invoke, or the whole
body) and hands it to the runtime.  Inside a lane every module value access
becomes a ``yield`` of a checkpoint request::

    h = model.layers[5].output[0].save()
    # becomes
    h = __iv.save((yield __iv.read(model.layers[5], 'output', 0))[0])

so the runtime can suspend the lane until the module runs and resume it with
the real value.  Names a lane shares with the rest of the function are
``nonlocal``; those it does not save are unbound again after the block.
Comprehensions that touch module values are lowered to loops (``yield``
cannot live in them).  Checkpoint numbers follow evaluation order, and every
rewritten statement remembers the line it came from so tracebacks and pdb
show the user's own lines.
"""

from __future__ import annotations

import ast
import itertools
import sys
from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from . import walk
from .analyze import (
    VALUE_ATTRS,
    Analysis,
    BlockInfo,
    LaneInfo,
    _names_in_target,
    barrier_names,
    binds_save,
    block_call,
    block_item,
    invoke_call,
    invoke_item,
    is_invoker_inputs,
    save_argument,
)
from .errors import CompileError
from .parse import Source
from .plan import Checkpoint, Marker

RT = "__iv"
TMP_BASE = 7_770_000_000  # provisional checkpoint numbers, renumbered in evaluation order


def _rt(attr: str) -> cst.Attribute:
    return cst.Attribute(cst.Name(RT), cst.Name(attr))


def _call(attr: str, *args: cst.BaseExpression) -> cst.Call:
    return cst.Call(_rt(attr), [cst.Arg(a) for a in args])


def _paren(e: cst.BaseExpression) -> cst.BaseExpression:
    return e.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])


def _stmt(*small: cst.BaseSmallStatement) -> cst.SimpleStatementLine:
    return cst.SimpleStatementLine(list(small))


@dataclass
class PendingCheckpoint:
    block: int
    lane: int
    path: str
    parts: tuple | None
    value: str
    access: str
    line: int
    col: int
    saves: bool
    scope: tuple[str, ...]
    steps: str | None = None


def _dotted(expr: cst.BaseExpression) -> str | None:
    """``a.b.c`` as text without generating code; None for anything else."""
    if isinstance(expr, cst.Name):
        return expr.value
    if isinstance(expr, cst.Attribute):
        base = _dotted(expr.value)
        return None if base is None else f"{base}.{expr.attr.value}"
    return None


def path_parts(expr: cst.BaseExpression, model: str) -> tuple | None:
    """``model.transformer.h[5]`` -> ("transformer", "h", 5); None if not static."""
    if _dotted(expr) == model:
        return ()
    if isinstance(expr, cst.Attribute):
        base = path_parts(expr.value, model)
        return None if base is None else (*base, expr.attr.value)
    if isinstance(expr, cst.Subscript) and len(expr.slice) == 1:
        idx = expr.slice[0].slice
        if isinstance(idx, cst.Index):
            v = idx.value
            sign = 1
            if isinstance(v, cst.UnaryOperation) and isinstance(v.operator, cst.Minus):
                sign, v = -1, v.expression
            if isinstance(v, cst.Integer):
                base = path_parts(expr.value, model)
                return None if base is None else (*base, sign * int(v.value, 0))
    return None


def written_path(expr: cst.BaseExpression) -> str:
    """The module path as the user wrote it (``model.transformer.h[5]``, ``layer``): the
    one spelling plans, errors and cache keys use (runtime/paths.py)."""
    return cst.Module([]).code_for_node(expr)


class Rewriter(cst.CSTTransformer):
    def __init__(self, src: Source, fn: cst.FunctionDef, info: Analysis, positions: dict) -> None:
        super().__init__()
        self.src = src
        self.fn = fn
        self.info = info
        self.positions = positions  # node -> (line, column, end line, end column)
        self.block: BlockInfo | None = None
        self.lane: LaneInfo | None = None
        self.pending: dict[int, PendingCheckpoint] = {}
        self.tmp = itertools.count(TMP_BASE)
        self.write_targets: set[int] = set()  # id() of target attributes of writes
        self.inplace_roots: set[int] = set()  # id() of value attributes edited in place
        self.save_depth = 0
        self.invoke_tail: cst.BaseStatement | None = None  # the last invoke's last statement
        self.helpers: frozenset[str] = frozenset()  # names of this file's @intervene helpers
        self.step_inits: set[int] = set()  # id() of each step block's first statement
        self.step_ends: dict[int, cst.BaseStatement] = {}  # ... and of its `end_steps`
        self.saving_stmt = False
        self.scope: list[str] = []
        self.block_loops = 0  # loops of the block (outside lanes) around the node visited
        self.hoist: list[list[cst.BaseStatement]] = []  # per statement being rebuilt
        self.comp_hoist: list[list[cst.BaseStatement]] = []
        self.comp_count = itertools.count()
        self.comp_touched: list[bool] = []
        self.reads: list[cst.BaseExpression] = []  # every read request made, in order
        self.assign_marks: list[tuple[int, int]] = []  # reads before targets / before value
        self.steps: list[str] = []  # step selections around the current code
        self.step_count = itertools.count()
        self.barriers: set[str] = set()  # names bound to `tracer.barrier(n)` in the block
        self.markers: dict[int, tuple] = {}  # provisional number -> (block, lane, kind, line, detail, scope)
        self.backward_depth = 0  # inside `with loss.backward():` of a lane
        self.fstring_quotes: list[str] = []  # quotes of the f-strings around the code

    # -- positions -----------------------------------------------------------
    def pos(self, node: cst.CSTNode) -> tuple[int, int]:
        p = self.positions[node]
        return self.src.position(p[0], p[1])

    def span(self, node: cst.CSTNode) -> tuple[int, int]:
        p = self.positions[node]
        return self.src.position(p[0], 0)[0], self.src.position(p[2], 0)[0]

    def error(self, node: cst.CSTNode, message: str) -> CompileError:
        line, col = self.pos(node)
        return CompileError(message, self.src.filename, line, col)

    def remember(self, new, first: int, last: int | None = None):
        """``new`` tagged with the user's lines it came from (see ``tag_lines``)."""
        return tag_lines(new, first, first if last is None else last)

    # -- blocks and lanes ------------------------------------------------------
    def visit_With(self, node: cst.With) -> None:
        self._visit_statement(node)  # the statement bookkeeping, then the block logic
        block = self.info.block_of.get(id(node))
        if block is not None:
            self.block = block
            self.barriers = barrier_names(node.body)
        sel = self._step_selection(node.items[0].item) if len(node.items) == 1 else None
        if sel is not None:
            self.steps.append(self._steps_label(sel))
        if self._backward_call(node) is not None:
            self.backward_depth += 1
        lane = self.info.lane_of.get(id(node))
        if lane is not None:
            self.lane = lane
            self.scope = []

    def leave_With(self, original: cst.With, updated: cst.With):
        lane = self.info.lane_of.get(id(original))
        block = self.info.block_of.get(id(original))
        if block is None and lane is None:
            if self._backward_call(original) is not None:
                self.backward_depth -= 1
                return self._statement(original, self._lower_backward(original, updated))
            if len(original.items) == 1 and self._step_selection(original.items[0].item):
                self.steps.pop()
                return self._statement(original, self._lower_steps(original, updated, None))
            from .session import lower_session  # `with model.session(remote=...):`

            return self._statement(original, lower_session(self, original, updated) or updated)
        self.hoist.pop()
        line = self.pos(original)[0]
        assert self.block is not None
        tracer = self.block.tracer or f"{RT}_t{self.block.index}"
        out: list[cst.BaseStatement] = []
        if lane is not None:
            body = list(updated.body.body)
            invoke = None if block is not None else invoke_call(updated)
            # `with model.trace(x), torch.no_grad():` is `with model.trace(x):` around
            # `with torch.no_grad():`, so the other context managers wrap the lane's
            # body, which is what runs while the model does (an invoke's: all of them).
            at = block_item(updated) if block is not None else invoke_item(updated)
            assert at is not None
            extra = updated.items[at + 1 :] if block is not None else (
                updated.items[:at] + updated.items[at + 1 :])
            if extra:
                inner_with = cst.With(
                    items=[it.with_changes(comma=cst.MaybeSentinel.DEFAULT) for it in extra],
                    body=cst.IndentedBlock(body),
                )
                body = [self.remember(inner_with, line)]
            target = None
            if invoke is not None:
                asname = updated.items[invoke_item(updated)].asname
                if asname is not None and isinstance(asname.name, cst.Name):
                    target = asname.name.value
            out = self._lane(lane, body, tracer, invoke, line, target)
            self.lane = None
        if block is None:
            self.invoke_tail = out[-1]  # the last invoke so far ends with this statement
            return cst.FlattenSentinel(out)
        # The block itself.
        call = block_call(updated)
        assert call is not None
        inner = out if lane is not None else list(updated.body.body)
        # Code after the last invoke runs once every invoke is done: after the pass,
        # so after the `with` (whose end runs the model).
        after: list[cst.BaseStatement] = []
        tail = self.invoke_tail
        self.invoke_tail = None
        if lane is None and tail is not None:
            at_tail = next((i for i, st in enumerate(inner) if st is tail), None)
            if at_tail is not None:
                inner, after = inner[: at_tail + 1], inner[at_tail + 1 :]
        # `model.trace(x)` -> `__iv.block(model, 'trace', 0, x)`: outside a
        # compiled function `model.generate(...)` stays the model's own.
        opened = cst.Call(
            _rt("block"),
            [
                cst.Arg(call.func.value),
                cst.Arg(cst.SimpleString(repr(block.kind))),
                cst.Arg(cst.Integer(str(block.index))),
                *call.args,
            ],
        )
        at = block_item(updated)
        assert at is not None
        before = [it.with_changes(comma=cst.MaybeSentinel.DEFAULT) for it in updated.items[:at]]
        new_with = updated.with_changes(
            items=[*before, cst.WithItem(opened, asname=cst.AsName(cst.Name(tracer)))],
            lpar=cst.MaybeSentinel.DEFAULT, rpar=cst.MaybeSentinel.DEFAULT,
            body=updated.body.with_changes(body=inner),
        )
        new_with = self.remember(new_with, line)
        result: list[cst.BaseStatement] = [new_with, *after]
        if block.unsaved_shared:
            names = block.unsaved_shared
            targets = [cst.AssignTarget(cst.Name(n)) for n in names]
            unbind = _stmt(cst.Assign(targets, cst.Name("None")))
            delete = _stmt(
                cst.Del(cst.Tuple([cst.Element(cst.Name(n)) for n in names], lpar=[], rpar=[]))
            )
            unbind = self.remember(unbind, block.end_line)
            delete = self.remember(delete, block.end_line)
            result += [unbind, delete]
        self.block = None
        return cst.FlattenSentinel(result)

    def _lane(self, lane: LaneInfo, body, tracer: str, invoke, line: int, target=None):
        assert self.block is not None
        name = f"{RT}_lane{self.block.index}_{lane.index}"
        stmts = list(body)
        if lane.nonlocal_names:
            nl = _stmt(cst.Nonlocal([cst.NameItem(cst.Name(n)) for n in lane.nonlocal_names]))
            nl = self.remember(nl, line)
            stmts.insert(0, nl)
        fdef = cst.FunctionDef(
            name=cst.Name(name),
            params=cst.Parameters(),
            body=cst.IndentedBlock(stmts),
        )
        # The lane starts where the user's function does: tools that show a frame's
        # code from its first line on (IPython's traceback excerpts, `inspect` of a
        # frame) then number its lines as the user's file does.
        fdef = self.remember(fdef, self.pos(self.fn)[0])
        spec: cst.BaseExpression = invoke if invoke is not None else cst.Name("None")
        if (target is None and invoke is not None and _is_attr(invoke.func, "invoke")
                and isinstance(invoke.func.value, cst.Name) and invoke.func.value.value == tracer
                and len(invoke.args) == 1 and invoke.args[0].keyword is None
                and not invoke.args[0].star):
            # `__iv.invoke(tracer, fn, index, sets, x)`: `tracer.invoke(x)` (one input,
            # the common case) and `__iv.lane(...)` in one call.  `sets`: the variable
            # the lane's one module value goes to when that is all the lane does (see
            # `_lazy_target`), else None.
            sets = self._lazy_target(stmts, lane)
            reg = _stmt(cst.Expr(cst.Call(_rt("invoke"), [
                cst.Arg(invoke.func.value), cst.Arg(cst.Name(name)),
                cst.Arg(cst.Integer(str(lane.index))),
                cst.Arg(cst.SimpleString(repr(sets)) if sets is not None else cst.Name("None")),
                invoke.args[0].with_changes(comma=cst.MaybeSentinel.DEFAULT),
            ])))
            return [fdef, self.remember(reg, line)]
        reg = _stmt(
            cst.Expr(
                _call("lane", cst.Name(tracer), cst.Name(name), spec, cst.Integer(str(lane.index)))
            )
        )
        reg = self.remember(reg, line)
        if target is not None:  # `as invoker`: bound to the invoke before its lane runs
            bind = self.remember(_stmt(cst.Assign([cst.AssignTarget(cst.Name(target))], spec)), line)
            reg = reg.with_changes(body=[reg.body[0].with_changes(value=_call(
                "lane", cst.Name(tracer), cst.Name(name), cst.Name(target),
                cst.Integer(str(lane.index))))])
            return [bind, fdef, reg]
        return [fdef, reg]

    def _lazy_target(self, stmts: list, lane: LaneInfo) -> str | None:
        """An invoke of a `trace` whose whole code is `x = model.a[1].output.save()` (or
        without `.save()`), `x` shared with the function: nothing of the user's runs
        before or after its one module value (a static path from the block's model), so
        the runtime need not start it as a generator before the pass: it parks the lane on
        that value itself and, once the value comes, sets `x`'s cell (the one the lane's
        `nonlocal x` would set) to it.  The generator stays for everything else (other
        tracers, another grad mode, errors thrown in at the user's line).  Returns `x`, or
        None when the lane is not of that shape."""
        block = self.block
        assert block is not None
        body = stmts[1:] if lane.nonlocal_names else stmts
        if block.kind != "trace" or block.model_rebound or len(body) != 1 or self.block_loops:
            # (in a loop of the block: its lanes come again, out of source order, where
            # attach_static may not run lazily started lanes together)
            return None
        stmt = body[0]
        if not isinstance(stmt, cst.SimpleStatementLine) or len(stmt.body) != 1:
            return None
        assign = stmt.body[0]
        if (not isinstance(assign, cst.Assign) or len(assign.targets) != 1
                or not isinstance(assign.targets[0].target, cst.Name)
                or assign.targets[0].target.value not in lane.nonlocal_names):
            return None
        value = assign.value
        if (isinstance(value, cst.Call) and _is_rt(value.func, "save") and len(value.args) == 1
                and value.args[0].keyword is None and not value.args[0].star):
            value = value.args[0].value
        if not isinstance(value, cst.Yield) or not isinstance(value.value, cst.Call):
            return None
        req = value.value
        if not _is_rt(req.func, "read") or len(req.args) != 3:
            return None
        env = req.args[0].value
        # `model.layers[5]`: attributes and integer indices from the model
        while isinstance(env, cst.Attribute) or (
                isinstance(env, cst.Subscript) and len(env.slice) == 1
                and isinstance(env.slice[0].slice, cst.Index)
                and isinstance(env.slice[0].slice.value, cst.Integer)):
            env = env.value
        if not isinstance(env, cst.Name) or env.value != block.model:
            return None
        return assign.targets[0].target.value

    # -- statements: line memory and hoisting ------------------------------
    def _visit_statement(self, node: cst.CSTNode) -> None:
        self.hoist.append([])

    def _statement(self, original: cst.CSTNode, updated):
        hoisted = self.hoist.pop() if self.hoist else []
        first, last = self.span(original)
        if isinstance(original, cst.SimpleStatementLine):
            updated = self.remember(updated, first, last)
        else:
            updated = self.remember(updated, first)
        if hoisted:
            if isinstance(original, cst.While):
                raise self.error(
                    original,
                    "a comprehension that reads module values in a `while` condition: "
                    "compute it in the loop body into a variable instead",
                )
            return cst.FlattenSentinel([*hoisted, updated])
        return updated

    def visit_SimpleStatementLine(self, node) -> None:
        self._visit_statement(node)

    def leave_SimpleStatementLine(self, original, updated):
        return self._statement(original, updated)

    # Compound statements: hoisting per statement; the control-flow scope of
    # each body (a checkpoint surely follows another only when its scope
    # extends the other's) through libcst's per-field hooks.
    def _push(self, tag: str, node: cst.CSTNode) -> None:
        if self.lane is not None:
            self.scope.append(f"{tag}@{self.pos(node)[0]}")

    def _pop(self) -> None:
        if self.lane is not None and self.scope:
            self.scope.pop()

    def visit_If(self, node):
        self._visit_statement(node)

    def leave_If(self, original, updated):
        return self._statement(original, updated)

    def visit_If_body(self, node):
        self._push("if", node)

    def leave_If_body(self, node):
        self._pop()

    def visit_If_orelse(self, node):
        self._push("else", node)

    def leave_If_orelse(self, node):
        self._pop()

    def visit_For(self, node):
        self._visit_statement(node)
        sel = self._step_selection(node.iter)
        if sel is not None:
            if node.orelse is not None:
                raise self.error(node, "a step loop (`for step in tracer.all():`) cannot have `else`")
            self.steps.append(self._steps_label(sel))

    def leave_For(self, original, updated):
        if self._step_selection(original.iter) is not None:
            self.steps.pop()
            return self._statement(original, self._lower_steps(original, updated, updated.target))
        return self._statement(original, updated)

    # -- backward blocks ------------------------------------------------------------------
    def _backward_call(self, node: cst.With) -> cst.Call | None:
        if self.lane is None or len(node.items) != 1:
            return None
        item = node.items[0].item
        if m.matches(item, m.Call(func=m.Attribute(attr=m.Name("backward")))):
            return item
        return None

    def _lower_backward(self, original: cst.With, updated: cst.With):
        """``with loss.backward(**kw): BODY`` -> ``yield __iv.backward(loss, n, **kw)``,
        BODY (``x.grad`` is a checkpoint), ``yield __iv.end_backward(n)``: the
        backward pass runs while BODY waits for gradients, in reverse order."""
        call = updated.items[0].item
        detail = cst.Module([]).code_for_node(original.items[0].item.func.value)
        t_start = self._marker("backward", original, detail)
        t_end = self._marker("end-backward", original, detail)
        start = _stmt(cst.Expr(cst.Yield(cst.Call(
            _rt("backward"),
            [cst.Arg(call.func.value), cst.Arg(cst.Integer(str(t_start))), *call.args],
        ))))
        end = _stmt(cst.Expr(cst.Yield(_call("end_backward", cst.Integer(str(t_end))))))
        line = self.pos(original)[0]
        start = self.remember(start, line)
        end = self.remember(end, line)
        return cst.FlattenSentinel([start, *updated.body.body, end])

    # -- generation steps -------------------------------------------------------------
    def _step_selection(self, expr: cst.BaseExpression) -> str | None:
        """``tracer.all()`` -> "all"; ``tracer.iter[2:5]`` -> "[2:5]"; else None."""
        if self.lane is None or self.block is None or self.block.tracer is None:
            return None
        tracer = m.Name(self.block.tracer)
        if m.matches(expr, m.Call(func=m.Attribute(value=tracer, attr=m.Name("all")), args=[])):
            return "all"
        if m.matches(expr, m.Subscript(value=m.Attribute(value=tracer, attr=m.Name("iter")))):
            code = cst.Module([]).code_for_node(expr)
            return code[code.index("[") :]
        return None

    def _counts_calls(self) -> bool:
        """Step blocks of a trace (or scan) select calls of each module they read (call i
        at iteration i), not generation steps."""
        return self.block is not None and self.block.kind != "generate"

    def _steps_label(self, sel: str) -> str:
        """What the plan's steps column shows for a checkpoint in this step block."""
        return f"calls {sel}" if self._counts_calls() else sel

    def _marker(self, kind: str, node: cst.CSTNode, detail: str = "") -> int:
        assert self.block is not None and self.lane is not None
        tmp = next(self.tmp)
        self.markers[tmp] = (self.block.index, self.lane.index, kind, self.pos(node)[0], detail,
                             tuple(self.scope))
        return tmp

    def _lower_steps(self, original, updated, target):
        """``with tracer.iter[1:3]: BODY`` ->
        ``s = tracer.iter[1:3]; while (yield __iv.next_step(s, n)): BODY``, then
        ``yield __iv.end_steps(tracer, n)``: code after a step block runs once
        generation has ended.

        In a trace the selection is of each module's calls, and the block's code goes on
        right after its last selected call: no ``end_steps``.  Its body is wrapped in
        ``try: ... except s.Over: break``: an open selection (``tracer.iter[2:]``) ends
        where the runtime finds no more calls (runtime/interleave.py ``StepsOver``)."""
        assert self.block is not None
        sel_expr = original.iter if isinstance(original, cst.For) else original.items[0].item
        detail = self._step_selection(sel_expr) or ""
        name = f"{RT}_steps{next(self.step_count)}"
        calls = self._counts_calls()
        line = self.pos(original)[0]
        t_next = self._marker("steps", original, f"{detail} (calls of each module)" if calls else detail)
        t_end = None if calls else self._marker("end-steps", original, detail)
        body = list(updated.body.body)
        if target is not None:
            body.insert(0, _stmt(cst.Assign([cst.AssignTarget(target)],
                                             cst.Attribute(cst.Name(name), cst.Name("current")))))
        if calls:
            leave = cst.ExceptHandler(
                body=cst.IndentedBlock([self.remember(_stmt(cst.Break()), line)]),
                type=cst.Attribute(cst.Name(name), cst.Name("Over")),
            )
            wrapped = cst.Try(body=cst.IndentedBlock(body), handlers=[self.remember(leave, line)])
            body = [self.remember(wrapped, line)]
        sel_new = updated.iter if isinstance(updated, cst.For) else updated.items[0].item
        init = _stmt(cst.Assign([cst.AssignTarget(cst.Name(name))], sel_new))
        loop = cst.While(
            test=_paren(cst.Yield(_call("next_step", cst.Name(name), cst.Integer(str(t_next))))),
            body=updated.body.with_changes(body=body),
        )
        if calls:
            # `end_steps(selection)`: a block left by `break` is left in the runtime too.
            end = _stmt(cst.Expr(cst.Yield(_call("end_steps", cst.Name(name),
                                                     cst.Integer(str(t_next))))))
            return cst.FlattenSentinel([self.remember(st, line) for st in (init, loop, end)])
        end = _stmt(cst.Expr(cst.Yield(_call("end_steps", cst.Name(self.block.tracer),
                                                 cst.Integer(str(t_end))))))
        init, loop, end = (self.remember(st, line) for st in (init, loop, end))
        self.step_inits.add(id(init))
        self.step_ends[id(end)] = end
        return cst.FlattenSentinel([init, loop, end])

    def leave_IndentedBlock(self, original, updated):
        """Step blocks one after another: each runs at its own steps, so only the last
        one waits for the end of generation (``end_steps``); the code between two of
        them runs once the first one's steps are done."""
        if not self.step_ends:
            return updated
        body = list(updated.body)
        inits = [i for i, st in enumerate(body) if id(st) in self.step_inits]
        if not inits:
            return updated
        keep = [st for i, st in enumerate(body) if not (id(st) in self.step_ends and i < inits[-1])]
        return updated if len(keep) == len(body) else updated.with_changes(body=keep)

    def visit_For_body(self, node):
        self._push("for", node)
        if self.lane is None and self.block is not None:
            self.block_loops += 1

    def leave_For_body(self, node):
        self._pop()
        if self.lane is None and self.block is not None:
            self.block_loops -= 1

    def visit_For_orelse(self, node):
        self._push("for-else", node)

    def leave_For_orelse(self, node):
        self._pop()

    def visit_While(self, node):
        self._visit_statement(node)

    def leave_While(self, original, updated):
        return self._statement(original, updated)

    def visit_While_body(self, node):
        self._push("while", node)
        if self.lane is None and self.block is not None:
            self.block_loops += 1

    def leave_While_body(self, node):
        self._pop()
        if self.lane is None and self.block is not None:
            self.block_loops -= 1

    def visit_While_orelse(self, node):
        self._push("while-else", node)

    def leave_While_orelse(self, node):
        self._pop()

    def visit_IfExp_body(self, node):
        self._push("ifexp", node)

    def leave_IfExp_body(self, node):
        self._pop()

    def visit_IfExp_orelse(self, node):
        self._push("ifexp-else", node)

    def leave_IfExp_orelse(self, node):
        self._pop()

    def visit_BooleanOperation_right(self, node):
        self._push("bool", node)  # `a and b`: b may not be evaluated

    def leave_BooleanOperation_right(self, node):
        self._pop()

    # `try`, its handlers, `else` and `finally`, and each `case` of a `match`, are
    # scopes of their own, like `if` arms: which of them run is known only while running.
    def visit_Try(self, node):
        self._visit_statement(node)

    def leave_Try(self, original, updated):
        return self._statement(original, updated)

    visit_TryStar = visit_Try
    leave_TryStar = leave_Try

    def visit_Try_body(self, node):
        self._push("try", node)

    def leave_Try_body(self, node):
        self._pop()

    def visit_Try_orelse(self, node):
        self._push("try-else", node)

    def leave_Try_orelse(self, node):
        self._pop()

    def visit_Try_finalbody(self, node):
        self._push("finally", node)

    def leave_Try_finalbody(self, node):
        self._pop()

    visit_TryStar_body = visit_Try_body
    leave_TryStar_body = leave_Try_body
    visit_TryStar_orelse = visit_Try_orelse
    leave_TryStar_orelse = leave_Try_orelse
    visit_TryStar_finalbody = visit_Try_finalbody
    leave_TryStar_finalbody = leave_Try_finalbody

    def visit_ExceptHandler(self, node):
        self._push("except", node)

    def leave_ExceptHandler(self, original, updated):
        self._pop()
        return updated

    visit_ExceptStarHandler = visit_ExceptHandler
    leave_ExceptStarHandler = leave_ExceptHandler

    def visit_Match(self, node):
        self._visit_statement(node)

    def leave_Match(self, original, updated):
        return self._statement(original, updated)

    def visit_MatchCase(self, node):
        self._push("case", node)

    def leave_MatchCase(self, original, updated):
        self._pop()
        return updated

    def visit_FunctionDef(self, node):
        if node is not self.fn:
            self._visit_statement(node)
        elif self.info.blocks and self.info.blocks[0].node is node:  # a helper: one lane
            self.block = self.info.blocks[0]
            self.lane = self.block.lanes[0]
            self.scope = []

    def leave_FunctionDef(self, original, updated):
        if original is self.fn:
            return updated
        return self._statement(original, updated)

    def visit_ClassDef(self, node):
        self._visit_statement(node)

    def leave_ClassDef(self, original, updated):
        return self._statement(original, updated)


    # -- checkpoints -----------------------------------------------------------
    def _checkpoint(self, node: cst.Attribute, env: cst.BaseExpression, access: str,
                    at: cst.CSTNode | None = None) -> int:
        """``at``: the node the user wrote, when ``node`` stands for it (``tracer.result``)."""
        assert self.block is not None and self.lane is not None
        tmp = next(self.tmp)
        line, col = self.pos(node if at is None else at)
        self.pending[tmp] = PendingCheckpoint(
            block=self.block.index,
            lane=self.lane.index,
            path=written_path(node.value),
            parts=path_parts(node.value, self.block.model),
            value=node.attr.value,
            access=access,
            line=line,
            col=col,
            saves=self.save_depth > 0 or self.saving_stmt,
            scope=tuple(self.scope),
            steps=self.steps[-1] if self.steps else None,
        )
        return tmp

    def _values(self) -> frozenset:
        """Attributes that are checkpoints here: ``.grad`` only in backward blocks."""
        return VALUE_ATTRS | {"grad"} if self.backward_depth else VALUE_ATTRS

    def _read(self, original: cst.Attribute, updated: cst.Attribute,
              at: cst.CSTNode | None = None) -> cst.BaseExpression:
        access = "inplace" if id(original) in self.inplace_roots else "read"
        tmp = self._checkpoint(original, updated.value, access, at)
        req = _call("read", updated.value, self._string(original.attr.value, at or original),
                    cst.Integer(str(tmp)))
        if self.comp_hoist:
            self._comp_touch()
        node = _paren(cst.Yield(req))
        self.reads.append(node)
        return node

    # Inside an f-string (before Python 3.12) a string may not use the f-string's
    # own quote: the value names in requests take the other one.
    def visit_FormattedString(self, node: cst.FormattedString) -> None:
        self.fstring_quotes.append(node.quote)

    def leave_FormattedString(self, original, updated):
        self.fstring_quotes.pop()
        return updated

    def _string(self, text: str, node: cst.CSTNode) -> cst.SimpleString:
        used = "".join(self.fstring_quotes)
        if "'" in used and '"' in used and sys.version_info < (3, 12):
            raise self.error(
                node, f"`.{text}` inside f-strings nested with both quote kinds: before "
                "Python 3.12 the rewritten code cannot name the value there; read it into a "
                "variable first and use the variable in the f-string",
            )
        quote = '"' if "'" in used else "'"
        return cst.SimpleString(f"{quote}{text}{quote}")

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute):
        attr = original.attr.value
        if (
            attr == "value"
            and isinstance(updated.value, cst.Name)
            and updated.value.value in self.info.saved_anywhere
        ):
            return updated.value  # seed style: `saved.value` is the saved value itself
        if self._is_result(original):
            return self._result(original)
        if self.lane is None or attr not in self._values() or id(original) in self.write_targets:
            return updated
        if is_invoker_inputs(original, self.info.invokers):
            return updated
        if self.backward_depth and attr in VALUE_ATTRS:
            raise self.error(
                original,
                f"`.{attr}` inside a backward block: the forward pass is over by then; read "
                f"the value into a variable before `with ....backward():` and use "
                f"`variable.grad` inside it",
            )
        return self._read(original, updated)

    def _is_result(self, node: cst.Attribute) -> bool:
        """``tracer.result`` (the block's own tracer) in a lane."""
        return (node.attr.value == "result" and self.lane is not None
                and self.block.tracer is not None
                and m.matches(node.value, m.Name(self.block.tracer)))

    def _result(self, original: cst.Attribute) -> cst.BaseExpression:
        """``tracer.result`` inside the block (nnsight's spelling): what the block's run
        returns, asked for as a checkpoint: ``model.generator.output`` in a generate
        block (the token ids, prompt included), ``model.output`` in a trace."""
        if self.backward_depth:
            raise self.error(original, "`.result` inside a backward block: the forward pass "
                             "is over by then; read it into a variable before "
                             "`with ....backward():`")
        if id(original) in self.write_targets:
            raise self.error(original, "`tracer.result` cannot be assigned: write "
                             "`model.output` (a trace) or `model.generator.output` (generate)")
        env: cst.BaseExpression = cst.Name(self.block.model)
        if self.block.kind == "generate":
            env = cst.Attribute(value=env, attr=cst.Name("generator"))
        stands_for = cst.Attribute(value=env, attr=cst.Name("output"))
        return self._read(stands_for, stands_for, at=original)

    def _helper_call(self, node: cst.Call) -> str | None:
        """``h(...)`` in a lane, ``h`` an @intervene helper of this file (a function with no
        block of its own): its name.  It runs as part of the lane (``yield from``)."""
        if (self.lane is not None and isinstance(node.func, cst.Name)
                and node.func.value in self.helpers and node.func.value != self.fn.name.value):
            return node.func.value
        return None

    def _save_argument(self, node: cst.Call):
        """``save(x)`` (``nnsight.save(x)`` ...): ``x``; see analyze.save_argument."""
        return save_argument(node, binds_save(self.fn))

    def visit_Call(self, node: cst.Call) -> None:
        if (self.lane is not None or self.block is not None) and (
            (_is_attr(node.func, "save") and not node.args) or self._save_argument(node) is not None
        ):
            self.save_depth += 1
        # `m.output[0].zero_()`, `m.output.mul_(2)`: in-place through a method.
        if self.lane is not None and isinstance(node.func, cst.Attribute):
            name = node.func.attr.value
            if name.endswith("_") and not name.endswith("__"):
                root = _value_root(node.func.value, self._values())
                if root is not None:
                    self.inplace_roots.add(id(root))

    def leave_Expr(self, original: cst.Expr, updated: cst.Expr):
        call = original.value
        if (
            self.lane is not None
            and isinstance(call, cst.Call)
            and isinstance(call.func, cst.Name)
            and call.func.value in self.barriers
            and not call.args
        ):
            tmp = self._marker("barrier", original, call.func.value)
            return updated.with_changes(
                value=cst.Yield(_call("barrier", cst.Name(call.func.value), cst.Integer(str(tmp))))
            )
        return updated

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        in_block = self.lane is not None or self.block is not None
        helper = self._helper_call(original)
        if helper is not None:
            tmp = self._marker("helper", original, helper)
            return _paren(cst.Yield(cst.From(cst.Call(_rt("helper"), [
                cst.Arg(cst.Integer(str(tmp))), cst.Arg(cst.Integer(str(self.block.index))),
                cst.Arg(updated.func), *updated.args]))))
        if in_block and _is_attr(original.func, "save") and not original.args:
            self.save_depth -= 1
            return _call("save", updated.func.value)
        if in_block and self._save_argument(original) is not None:
            self.save_depth -= 1
            return _call("save", updated.args[0].value)
        if (
            self.lane is not None
            and self.block is not None
            and self.block.tracer is not None
            and (_is_attr(original.func, "stop") or _is_attr(original.func, "cache"))
            and isinstance(original.func.value, cst.Name)
            and original.func.value.value == self.block.tracer
        ):
            # Shown in the plan; the call itself is unchanged.
            kind = original.func.attr.value
            detail = cst.Module([]).code_for_node(original)
            tmp = self._marker(kind, original, detail if kind == "cache" else "")
            return _call("mark", cst.Integer(str(tmp)), updated)
        if (
            self.lane is not None
            and _is_attr(original.func, "skip")
            and len(original.args) == 1
            and original.args[0].keyword is None
            and not original.args[0].star
        ):
            # `m.skip(value)`: the module's next call does not run (runtime/skip.py);
            # shown in the plan as `-- skip m`.
            path = cst.Module([]).code_for_node(original.func.value)
            model = self.block.model if self.block is not None else ""
            if model and path.startswith(model + "."):
                path = path[len(model) + 1 :]
            tmp = self._marker("skip", original, path)
            return _call("mark", cst.Integer(str(tmp)), updated)
        return updated

    # -- writes ------------------------------------------------------------------
    def _mark_targets(self, target: cst.BaseExpression) -> None:
        if isinstance(target, (cst.Tuple, cst.List)):  # `a, m.output[0] = ...`: in place
            for el in target.elements:
                value = el.value.value if isinstance(el.value, cst.StarredElement) else el.value
                root = _value_root(value, self._values())
                if root is not None:
                    self.inplace_roots.add(id(root))
            return
        if isinstance(target, cst.Attribute) and (target.attr.value in self._values()
                                                  or self._is_result(target)):
            self.write_targets.add(id(target))
        else:
            root = _value_root(target, self._values())
            if root is not None:
                self.inplace_roots.add(id(root))

    def visit_Assign(self, node: cst.Assign) -> None:
        self.assign_marks.append((len(self.reads), len(self.reads)))
        if self.lane is None:
            return
        for t in node.targets:
            self._mark_targets(t.target)
        names = {n for t in node.targets for n in _names_in_target(t.target)}
        assert self.block is not None
        self.saving_stmt = bool(names & self.block.saved)

    def visit_Assign_value(self, node: cst.Assign) -> None:
        start, _ = self.assign_marks[-1]
        self.assign_marks[-1] = (start, len(self.reads))

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign):
        self.saving_stmt = False
        start, value_start = self.assign_marks.pop()
        if self.lane is None:
            return updated
        target = updated.targets[0].target
        # Python evaluates the value before the target.  When only the target
        # waits for a module, wait first: the value (`h` from an earlier invoke,
        # say) is then read when the module has run, as the experiment means.
        value_waits = len(self.reads) > value_start
        if id(original.targets[0].target) in self.write_targets:
            tmp = self._checkpoint(original.targets[0].target, target.value, "write")
            kind = cst.SimpleString(repr(target.attr.value))
            write = cst.Expr(
                cst.Yield(_call("write", target.value, kind, cst.Integer(str(tmp)), updated.value))
            )
            if value_waits:
                return write
            arrive = cst.Expr(cst.Yield(_call("read", target.value.deep_clone(), kind,
                                              cst.Integer(str(tmp)))))
            return cst.FlattenSentinel([arrive, write])
        waits = self.reads[start:value_start]
        if len(updated.targets) == 1 and len(waits) == 1 and not value_waits:
            # `m.output[:, -1] = h`  ->  `t = (yield read m); t[:, -1] = h`
            slot = cst.Name(f"{RT}_target")
            first = cst.Assign([cst.AssignTarget(slot)], _paren(waits[0].deep_clone()))
            rest = updated.with_changes(
                targets=[cst.AssignTarget(_replace_node(target, waits[0], cst.Name(f"{RT}_target")))]
            )
            return cst.FlattenSentinel([first, rest])
        if _is_attr(target, "requires_grad"):
            return cst.Expr(_call("requires_grad", target.value, updated.value))
        return updated

    def visit_AugAssign(self, node: cst.AugAssign) -> None:
        if self.lane is not None:
            self._mark_targets(node.target)

    def leave_AnnAssign(self, original: cst.AnnAssign, updated: cst.AnnAssign):
        # A name the lane shares with the function is `nonlocal` there, and Python
        # refuses an annotation on it; a local annotation is never evaluated anyway.
        if (
            self.lane is not None
            and isinstance(original.target, cst.Name)
            and original.target.value in self.lane.nonlocal_names
        ):
            if updated.value is None:
                return cst.Pass()
            return cst.Assign([cst.AssignTarget(updated.target)], updated.value)
        return updated

    def leave_AugAssign(self, original: cst.AugAssign, updated: cst.AugAssign):
        if self.lane is None or id(original.target) not in self.write_targets:
            return updated
        # `m.output += v`  ->  t = read; t += v; write t   (the value may be in-place)
        target = updated.target
        kind = cst.SimpleString(repr(target.attr.value))
        def tmp_name() -> cst.Name:
            return cst.Name(f"{RT}_value")

        t_read = self._checkpoint(original.target, target.value, "inplace")
        t_write = self._checkpoint(original.target, target.value, "write")
        return cst.FlattenSentinel(
            [
                cst.Assign(
                    [cst.AssignTarget(tmp_name())],
                    _paren(cst.Yield(_call("read", target.value, kind, cst.Integer(str(t_read))))),
                ),
                updated.with_changes(target=tmp_name()),
                cst.Expr(cst.Yield(_call("write", target.value.deep_clone(), kind,
                                         cst.Integer(str(t_write)), tmp_name()))),
            ]
        )

    # -- comprehensions -> loops --------------------------------------------------
    def _comp_visit(self, node) -> None:
        if self.lane is not None:
            self.comp_hoist.append([])
            self.scope.append(f"comp@{self.pos(node)[0]}")
            self.comp_touched.append(False)

    def _comp_touch(self) -> None:
        self.comp_touched[-1] = True

    def _comp_leave(self, original, updated):
        if self.lane is None:
            return updated
        inner = self.comp_hoist.pop()
        self.scope.pop()
        touched = self.comp_touched.pop()
        if not touched and not inner:
            return updated
        if self.comp_touched:
            self.comp_touched[-1] = True  # an outer comprehension must be lowered too
        if any(f.asynchronous is not None for f in _comp_fors(updated.for_in)):
            raise self.error(original, "an async comprehension cannot read module values")
        name = cst.Name(f"{RT}_c{next(self.comp_count)}")
        if isinstance(updated, cst.DictComp):
            init: cst.BaseExpression = cst.Dict([])
            add: cst.BaseSmallStatement = cst.Assign(
                [cst.AssignTarget(cst.Subscript(name, [cst.SubscriptElement(cst.Index(updated.key))]))],
                updated.value,
            )
        else:
            init = cst.Call(cst.Name("set")) if isinstance(updated, cst.SetComp) else cst.List([])
            method = "add" if isinstance(updated, cst.SetComp) else "append"
            add = cst.Expr(cst.Call(cst.Attribute(name, cst.Name(method)), [cst.Arg(updated.elt)]))
        body: list[cst.BaseStatement] = [*inner, _stmt(add)]
        for clause in reversed(_comp_fors(updated.for_in)):
            for cond in reversed(clause.ifs):
                body = [cst.If(test=cond.test, body=cst.IndentedBlock(body))]
            body = [cst.For(target=clause.target, iter=clause.iter, body=cst.IndentedBlock(body))]
        # The comprehension's variables had a scope of their own: give them
        # fresh names so the lowered loop cannot shadow the lane's variables.
        fresh = {
            n: f"{RT}_{n}_{next(self.comp_count)}"
            for clause in _comp_fors(updated.for_in)
            for n in _names_in_target(clause.target)
        }
        body = [st.visit(_Rename(fresh)) for st in body]
        stmts = [_stmt(cst.Assign([cst.AssignTarget(name)], init)), *body]
        line = self.pos(original)[0]
        stmts = [self.remember(st, line) for st in stmts]
        target = self.comp_hoist[-1] if self.comp_hoist else self.hoist[-1]
        target.extend(stmts)
        return name

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comp_visit
    leave_ListComp = leave_SetComp = leave_DictComp = leave_GeneratorExp = _comp_leave


LINE_MARK = "# __iv@"


def tag_lines(node, first: int, last: int):
    """Mark a rewritten statement with the user's lines it came from, as a trailing
    comment (``# __iv@12:13``) on its (header's) last line: codegen reads these
    back from the generated text to map every line to the user's file, without
    another pass over the tree.  ``show-plan --code`` strips them."""
    if isinstance(node, cst.FlattenSentinel):
        return node
    mark = f"{LINE_MARK}{first}:{last}"

    def with_mark(tw: cst.TrailingWhitespace) -> cst.TrailingWhitespace:
        text = f"{tw.comment.value}  {mark}" if tw.comment is not None else mark
        return tw.with_changes(whitespace=cst.SimpleWhitespace("  "), comment=cst.Comment(text))

    if isinstance(node, cst.SimpleStatementLine):
        return node.with_changes(trailing_whitespace=with_mark(node.trailing_whitespace))
    body = getattr(node, "body", None)
    if isinstance(body, cst.IndentedBlock):
        return node.with_changes(body=body.with_changes(header=with_mark(body.header)))
    if isinstance(body, cst.SimpleStatementSuite):
        return node.with_changes(body=body.with_changes(
            trailing_whitespace=with_mark(body.trailing_whitespace)))
    return node


class _Rename(cst.CSTTransformer):
    """Rename variables (never attribute names or keyword names)."""

    def __init__(self, names: dict[str, str]) -> None:
        super().__init__()
        self.names = names

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.Name:
        new = self.names.get(original.value)
        return updated.with_changes(value=new) if new else updated

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.Attribute:
        return updated.with_changes(attr=original.attr)

    def leave_Arg(self, original: cst.Arg, updated: cst.Arg) -> cst.Arg:
        return updated.with_changes(keyword=original.keyword)


def _is_attr(node: cst.CSTNode, name: str) -> bool:
    """``node`` is ``<something>.name``."""
    return isinstance(node, cst.Attribute) and node.attr.value == name


def _is_rt(node: cst.CSTNode, name: str) -> bool:
    """``node`` is ``__iv.name``."""
    return (isinstance(node, cst.Attribute) and node.attr.value == name
            and isinstance(node.value, cst.Name) and node.value.value == RT)


def _replace_node(tree: cst.CSTNode, old: cst.CSTNode, new: cst.CSTNode):
    """``tree`` with the node ``old`` (by identity) replaced by ``new``."""
    return walk.replace(tree, old, new)


def _comp_fors(for_in: cst.CompFor) -> list[cst.CompFor]:
    out = []
    node: cst.CompFor | None = for_in
    while node is not None:
        out.append(node)
        node = node.inner_for_in
    return out


def _value_root(node: cst.BaseExpression, values=VALUE_ATTRS) -> cst.Attribute | None:
    """The ``m.output`` at the root of ``m.output[0][:, -1]`` (or ``m.output.x_()``)."""
    while True:
        if isinstance(node, cst.Attribute) and node.attr.value in values:
            return node
        if isinstance(node, (cst.Subscript, cst.Attribute)):
            node = node.value
        else:
            return None


_SITE_ARG = {"read": 2, "write": 2, "next_step": 1, "end_steps": 1, "barrier": 1,
             "backward": 1, "end_backward": 0, "mark": 0, "helper": 0}


def evaluation_order(tree: ast.AST) -> list[ast.Constant]:
    """The provisional checkpoint numbers of the generated code (as their ``ast``
    constants), in the order Python evaluates them: a request is made once its
    arguments are evaluated, and an assignment's value before its targets."""
    out: list[ast.Constant] = []

    def walk(node: ast.AST) -> None:
        if isinstance(node, ast.Assign):
            walk(node.value)
            for t in node.targets:
                walk(t)
            return
        if isinstance(node, ast.AnnAssign):
            if node.value is not None:
                walk(node.value)
            walk(node.target)
            return
        for child in ast.iter_child_nodes(node):
            walk(child)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == RT
            and node.func.attr in _SITE_ARG
        ):
            arg = node.args[_SITE_ARG[node.func.attr]]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, int):
                out.append(arg)

    walk(tree)
    return out


def number_checkpoints(
    order: list[int], pending: dict[int, PendingCheckpoint], markers: dict[int, tuple]
) -> tuple[dict[int, int], dict[tuple[int, int], list]]:
    """Provisional -> final numbers (per block, evaluation order), and the
    checkpoints and markers of each (block, lane)."""
    counters: dict[int, int] = {}
    final: dict[int, int] = {}
    lanes: dict[tuple[int, int], list] = {}
    for tmp in order:
        if tmp in final:
            continue
        if tmp in markers:
            block, lane, kind, line, detail, scope = markers[tmp]
            order = counters.get(block, 0)
            counters[block] = order + 1
            final[tmp] = order
            lanes.setdefault((block, lane), []).append(Marker(order, kind, line, detail, scope))
            continue
        p = pending[tmp]
        order = counters.get(p.block, 0)
        counters[p.block] = order + 1
        final[tmp] = order
        lanes.setdefault((p.block, p.lane), []).append(
            Checkpoint(
                order=order,
                path=p.path,
                value=p.value,  # type: ignore[arg-type]
                access=p.access,  # type: ignore[arg-type]
                line=p.line,
                col=p.col,
                parts=p.parts,
                saves=p.saves,
                steps=p.steps,
                scope=p.scope,
            )
        )
    return final, lanes
