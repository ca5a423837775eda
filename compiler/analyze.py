"""Scopes and static checks: what each trace block binds, saves and shares.

One read-only pass over the function finds its trace blocks and their lanes
(the invokes, or the whole body), records every name the function touches and
where, and reports the mistakes that can be seen in the source alone: reading
an unsaved variable after its block, ``.save()`` outside a trace, syntax that
cannot live inside a checkpointed body.  The rewrite pass then uses the
result to decide which names a lane shares with the function (``nonlocal``)
and which it keeps to itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m

from . import walk
from .errors import CompileError
from .parse import Source

VALUE_ATTRS = frozenset({"output", "input", "inputs"})
BLOCK_KINDS = frozenset({"trace", "generate", "scan", "edit"})
RESERVED_PREFIX = "__iv"

_COMPS = (cst.ListComp, cst.SetComp, cst.DictComp, cst.GeneratorExp)
_LOOPS = (cst.For, cst.While)


def _is_block_call(item: cst.BaseExpression) -> bool:
    return m.matches(item, m.Call(func=m.Attribute(attr=m.Name()))) and (
        item.func.attr.value in BLOCK_KINDS
    )


SAVE_MODULES = frozenset({"nnsight", "intervene", "runtime"})


def save_argument(call: cst.Call, shadowed: bool = False) -> cst.BaseExpression | None:
    """``save(x)`` / ``nnsight.save(x)`` / ``intervene.save(x)`` / ``runtime.save(x)``
    (one positional argument): ``x``, which is saved as by ``x.save()``.  None for
    anything else, and for ``save(x)`` when the function binds ``save`` itself
    (``shadowed``)."""
    if len(call.args) != 1 or call.args[0].keyword is not None or call.args[0].star:
        return None
    func = call.func
    if isinstance(func, cst.Name) and func.value == "save" and not shadowed:
        return call.args[0].value
    if (isinstance(func, cst.Attribute) and func.attr.value == "save"
            and isinstance(func.value, cst.Name) and func.value.value in SAVE_MODULES):
        return call.args[0].value
    return None


def binds_save(fn: cst.FunctionDef) -> bool:
    """The function has a parameter called ``save`` (then ``save(x)`` is its own)."""
    return "save" in _param_names(fn.params)


def _is_invoke_call(item: cst.BaseExpression) -> bool:
    return m.matches(item, m.Call(func=m.Attribute(attr=m.Name("invoke"))))


def block_item(node: cst.With) -> int | None:
    """Which item of ``with a, model.trace(x) as t, b:`` is the trace block's call."""
    for i, it in enumerate(node.items):
        if _is_block_call(it.item):
            return i
    return None


def invoke_item(node: cst.With) -> int | None:
    """Which item of ``with tracer.invoke(x), b:`` is the invoke."""
    for i, it in enumerate(node.items):
        if _is_invoke_call(it.item):
            return i
    return None


def block_call(node: cst.With) -> cst.Call | None:
    """The ``X.trace(...)`` call of a trace block, or None."""
    i = block_item(node)
    return None if i is None else node.items[i].item


def invoke_call(node: cst.With) -> cst.Call | None:
    i = invoke_item(node)
    return None if i is None else node.items[i].item


def statements(node: cst.CSTNode):
    """Every statement under ``node``, through compound statements' bodies but not
    into nested functions or classes: far cheaper than a full visit."""
    body = getattr(node, "body", None)
    if isinstance(body, cst.BaseSuite):
        body = body.body
    parts = list(body) if isinstance(body, (list, tuple)) else []
    for attr in ("orelse", "finalbody"):
        extra = getattr(node, attr, None)
        if extra is not None:
            parts.append(extra)
    parts.extend(getattr(node, "handlers", ()))
    parts.extend(getattr(node, "cases", ()))
    for stmt in parts:
        if isinstance(stmt, (cst.Else, cst.Finally, cst.ExceptHandler, cst.ExceptStarHandler,
                             cst.MatchCase, cst.If)):
            if isinstance(stmt, cst.If):
                yield stmt
            yield from statements(stmt)
            continue
        yield stmt
        if isinstance(stmt, cst.BaseCompoundStatement) and not isinstance(
            stmt, (cst.FunctionDef, cst.ClassDef)
        ):
            yield from statements(stmt)


def _contains_invoke(block: cst.With) -> bool:
    return any(isinstance(s, cst.With) and invoke_call(s) is not None for s in statements(block))


@dataclass
class LaneInfo:
    index: int
    node: cst.CSTNode  # the With of the invoke, or the block's With
    line: int
    input: str | None
    bound: dict[str, int] = field(default_factory=dict)  # name -> first line bound
    nonlocal_names: tuple[str, ...] = ()
    first_wait: tuple[int, int] | None = None  # (line, col) of its first module value


@dataclass
class BlockInfo:
    index: int
    node: cst.With
    kind: str
    model: str
    args: str
    line: int
    end_line: int
    tracer: str | None  # the ``as`` name
    has_input: bool
    has_invokes: bool
    lanes: list[LaneInfo] = field(default_factory=list)
    saved: set[str] = field(default_factory=set)
    unsaved_shared: tuple[str, ...] = ()  # shared with the function, not saved: unbound after
    free: tuple[tuple[str, int], ...] = ()  # (name, first line) read from around the block
    session: int | None = None  # id() of the `with model.session():` around it
    model_rebound: bool = False  # the model's variable is assigned in the block


@dataclass(frozen=True)
class NameRef:
    name: str
    store: bool
    line: int
    col: int
    lane: LaneInfo | None
    block: BlockInfo | None
    nested: bool  # inside a def/lambda/class/comprehension of its own


@dataclass
class Analysis:
    blocks: list[BlockInfo]
    block_of: dict[int, BlockInfo]  # id(With node) -> block
    lane_of: dict[int, LaneInfo]  # id(With node) -> lane
    outer_bound: set[str]
    saved_anywhere: set[str]
    model_names: set[str]
    invokers: frozenset[str] = frozenset()  # `as` names of invokes
    refs: list = field(default_factory=list)  # every NameRef (compiler/session.py)


def is_invoker_inputs(node: cst.Attribute, invokers) -> bool:
    """``invoker.inputs`` of ``with tracer.invoke(x) as invoker:``: the invoke's input,
    a plain attribute (not a module value)."""
    return (node.attr.value == "inputs" and isinstance(node.value, cst.Name)
            and node.value.value in invokers)


class _Analyzer(cst.CSTVisitor):
    def __init__(self, src: Source, fn: cst.FunctionDef, positions: dict,
                 helper: bool = False) -> None:
        super().__init__()
        self.helper = helper
        self.src = src
        self.positions = positions  # node -> (line, column, end line, end column)
        self.fn = fn
        self.blocks: list[BlockInfo] = []
        self.block_of: dict[int, BlockInfo] = {}
        self.lane_of: dict[int, LaneInfo] = {}
        self.refs: list[NameRef] = []
        self.block: BlockInfo | None = None
        self.lane: LaneInfo | None = None
        self.nested = 0  # depth of def/lambda/class scopes inside the function
        self.comp = 0
        self.lane_loops = 0  # loops opened inside the current lane
        self.model_names = _traced_models(fn)
        self.barriers: set[str] = set()
        self.stores: set[int] = set()  # id() of Name nodes that bind a name
        self.not_expressions: set[int] = set()  # def/class names: recorded by hand
        self.assigning: list[list[str]] = []  # names the value being visited is assigned to
        self.invokers: set[str] = set()  # `with tracer.invoke(x) as NAME:` names
        self.sessions: list[int] = []  # id() of the `with model.session():` statements open

    # -- helpers ---------------------------------------------------------
    def where(self, node: cst.CSTNode) -> tuple[int, int]:
        pos = self.positions[node]
        return self.src.position(pos[0], pos[1])

    def error(self, node: cst.CSTNode, message: str) -> CompileError:
        line, col = self.where(node)
        return CompileError(message, self.src.filename, line, col)

    def code(self, node: cst.CSTNode) -> str:
        return cst.Module([]).code_for_node(node)

    # -- blocks and lanes --------------------------------------------------
    def visit_With(self, node: cst.With) -> None:
        self._session_enter(node)
        call = block_call(node)
        if call is not None and self.nested == 0:
            if self.block is not None:
                raise self.error(
                    node,
                    f"a `{call.func.attr.value}` block inside another trace block: close the "
                    f"first block (line {self.block.line}) before opening the next",
                )
            line, _ = self.where(node)
            end = self.positions[node][2]
            at = block_item(node)
            assert at is not None
            self._check_items(node, at)
            asname = node.items[at].asname
            tracer = (
                asname.name.value
                if asname is not None and isinstance(asname.name, cst.Name)
                else None
            )
            block = BlockInfo(
                index=len(self.blocks),
                node=node,
                kind=call.func.attr.value,
                model=self.code(call.func.value),
                args=", ".join(self.code(a).rstrip(", ") for a in call.args),
                line=line,
                end_line=self.src.position(end, 0)[0],
                tracer=tracer,
                # generate's keywords are generation options; trace/scan keywords
                # are the model's own inputs.
                has_input=bool(_inputs(call)) and (
                    call.func.attr.value != "generate" or not all(a.keyword for a in _inputs(call))
                    or any(a.keyword.value in ("input_ids", "inputs_embeds") for a in _inputs(call))
                ),
                has_invokes=_contains_invoke(node),
            )
            if block.kind == "edit":
                # `with model.edit() as edited:`: its keywords are the edit's own
                # (`inplace=True`); nothing runs at its end.
                block.has_input = True
                if block.has_invokes:
                    raise self.error(
                        node,
                        "`tracer.invoke(...)` in an edit block: an edit applies to every row "
                        "of every later trace of the edited model; write the interventions "
                        "directly in the edit block",
                    )
            if block.has_invokes and block.has_input:
                raise self.error(
                    node,
                    f"`{block.model}.{block.kind}({block.args})` has an input and also "
                    "`tracer.invoke(...)` blocks: give every input to an invoke and call "
                    f"`{block.model}.{block.kind}()` with no input",
                )
            if not block.has_invokes and not block.has_input:
                raise self.error(
                    node,
                    f"`{block.model}.{block.kind}()` has neither an input nor any "
                    f"`tracer.invoke(...)`: write `{block.model}.{block.kind}(input)` or add "
                    "`with tracer.invoke(input):` blocks inside it",
                )
            if block.has_invokes and at < len(node.items) - 1:
                extra = ", ".join(self.code(it.item) for it in node.items[at + 1 :])
                raise self.error(
                    node,
                    f"`with {block.model}.{block.kind}(...), {extra}:` with invokes: the invokes "
                    f"run after this `with` statement's body, so `{extra}` would not cover "
                    f"them; write `with {extra}:` inside each invoke instead",
                )
            block.session = self.sessions[-1] if self.sessions else None
            self.blocks.append(block)
            self.block_of[id(node)] = block
            self.barriers = barrier_names(node.body)
            self.block = block
            if not block.has_invokes:
                self._open_lane(node, None)
            return
        inv = invoke_call(node)
        if inv is not None and self.nested == 0:
            if self.block is None:
                raise self.error(node, "`tracer.invoke(...)` outside a trace block")
            if self.lane is not None:
                raise self.error(
                    node,
                    "an invoke inside an invoke: close the first invoke (line "
                    f"{self.lane.line}) before opening the next; each invoke is one input",
                )
            self._check_items(node, invoke_item(node))
            asname = node.items[invoke_item(node)].asname
            if asname is not None and isinstance(asname.name, cst.Name):
                self.invokers.add(asname.name.value)  # `as invoker`: `invoker.inputs` is plain
            self._open_lane(node, ", ".join(self.code(a).rstrip(", ") for a in inv.args) or None)

    def _check_items(self, node: cst.With, at: int | None) -> None:
        """One trace block or invoke per `with` statement."""
        for i, it in enumerate(node.items):
            if i != at and (_is_block_call(it.item) or _is_invoke_call(it.item)):
                first = self.code(node.items[at or 0].item)
                raise self.error(
                    it,
                    f"`{first}` and `{self.code(it.item)}` in one `with` statement: open "
                    "one trace block or invoke per `with`, one inside the other's body",
                )

    def _open_lane(self, node: cst.With, input_text: str | None) -> None:
        assert self.block is not None
        line, _ = self.where(node)
        lane = LaneInfo(len(self.block.lanes), node, line, input_text)
        self.block.lanes.append(lane)
        self.lane_of[id(node)] = lane
        self.lane = lane
        self.lane_loops = 0

    def _session_enter(self, node: cst.With) -> None:
        if self.block is None and self.nested == 0 and any(
            m.matches(it.item, m.Call(func=m.Attribute(attr=m.Name("session"))))
            for it in node.items
        ):
            self.sessions.append(id(node))

    def leave_With(self, node: cst.With) -> None:
        if self.sessions and self.sessions[-1] == id(node):
            self.sessions.pop()
        if self.lane is not None and self.lane.node is node:
            self.lane = None
        if self.block is not None and self.block.node is node:
            self.block = None

    # -- scopes ------------------------------------------------------------
    def _enter_scope(self) -> None:
        self.nested += 1

    def _leave_scope(self) -> None:
        self.nested -= 1

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool | None:
        self.not_expressions.add(id(node.name))
        if node is self.fn:
            for p in _param_names(node.params):
                self._ref(node, p, True)
            if self.helper:  # the whole body is one lane of a block of its caller
                line, _ = self.where(node)
                block = BlockInfo(index=0, node=node, kind="trace", model="(helper)", args="",
                                  line=line, end_line=self.src.position(self.positions[node][2], 0)[0],
                                  tracer=None, has_input=True, has_invokes=False)
                self.blocks.append(block)
                self.block_of[id(node)] = block
                self.block = block
                self._open_lane(node, None)
            return None
        self._ref(node, node.name.value, True)
        self._enter_scope()
        return None

    def leave_FunctionDef(self, node: cst.FunctionDef) -> None:
        if node is not self.fn:
            self._leave_scope()

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.not_expressions.add(id(node.name))
        self._ref(node, node.name.value, True)
        self._enter_scope()

    def leave_ClassDef(self, node: cst.ClassDef) -> None:
        self._leave_scope()

    def visit_Lambda(self, node: cst.Lambda) -> None:
        self._enter_scope()
        self.assigning.append([])

    def leave_Lambda(self, node: cst.Lambda) -> None:
        self._leave_scope()
        self.assigning.pop()

    def visit_Param(self, node: cst.Param) -> bool:
        # Parameter names of nested functions bind in their own scope; defaults
        # and annotations are read here.
        for part in (node.default, node.annotation):
            if part is not None:
                walk.visit(self, part)
        return False

    def _comp_enter(self, node: cst.CSTNode) -> None:
        self.comp += 1

    def _comp_leave(self, node: cst.CSTNode) -> None:
        self.comp -= 1

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comp_enter
    leave_ListComp = leave_SetComp = leave_DictComp = leave_GeneratorExp = _comp_leave

    def visit_For(self, node: cst.For) -> None:
        if self.lane is not None:
            self.lane_loops += 1
        if node.asynchronous is not None and self.lane is not None and self.nested == 0:
            raise self.error(node, "`async for` cannot be used inside a trace block")

    def leave_For(self, node: cst.For) -> None:
        if self.lane is not None:
            self.lane_loops -= 1

    def visit_While(self, node: cst.While) -> None:
        if self.lane is not None:
            self.lane_loops += 1

    def leave_While(self, node: cst.While) -> None:
        if self.lane is not None:
            self.lane_loops -= 1

    # -- names -------------------------------------------------------------
    def _ref(self, node: cst.CSTNode, name: str, store: bool) -> None:
        line, col = self.where(node)
        nested = self.nested > 0 or self.comp > 0
        self.refs.append(NameRef(name, store, line, col, self.lane, self.block, nested))
        if store and self.block is not None and name == self.block.tracer and self.lane is not None:
            # `as tracer` of the block: bound by the function, not by the lane.
            self.refs[-1] = NameRef(name, store, line, col, None, self.block, nested)
            return
        if store and not nested and self.lane is not None:
            if name.startswith(RESERVED_PREFIX):
                raise self.error(node, f"names starting with `{RESERVED_PREFIX}` are reserved")
            self.lane.bound.setdefault(name, line)

    def visit_Name(self, node: cst.Name) -> None:
        if id(node) not in self.not_expressions:
            self._ref(node, node.value, id(node) in self.stores)

    def visit_NameItem(self, node: cst.NameItem) -> None:
        self.not_expressions.add(id(node.name))  # `global x` / `nonlocal x`

    def _binds(self, target: cst.CSTNode | None) -> None:
        """Mark the names a target binds (not the bases of `a[i] = ...` / `a.x = ...`)."""
        if isinstance(target, cst.Name):
            self.stores.add(id(target))
        elif isinstance(target, (cst.Tuple, cst.List)):
            for el in target.elements:
                self._binds(el.value)
        elif isinstance(target, cst.StarredElement):
            self._binds(target.value)

    def visit_AssignTarget(self, node: cst.AssignTarget) -> None:
        self._binds(node.target)

    def visit_AnnAssign(self, node: cst.AnnAssign) -> None:
        self._binds(node.target)
        found = _bound_value(node.target)
        if found is not None and self.block is not None:
            raise self.error(
                found, f"`{self.code(found)}` with an annotation: a module value cannot be "
                f"annotated; write `{self.code(found)} = value` without the annotation",
            )

    def visit_AugAssign(self, node: cst.AugAssign) -> None:
        if isinstance(node.target, cst.Name):  # `n += 1` reads `n` before it binds it
            self._ref(node.target, node.target.value, False)
        self._binds(node.target)

    def visit_For_target(self, node: cst.For) -> None:
        self._binds(node.target)
        self._value_as_target(node.target, "a `for` target", "assign it inside the loop "
                              "(`for v in ...: m.output = v`)")

    def visit_CompFor(self, node: cst.CompFor) -> None:
        self._binds(node.target)
        self._value_as_target(node.target, "a comprehension's `for` target", "use a plain "
                              "variable as the target")

    def visit_AsName(self, node: cst.AsName) -> None:
        self._binds(node.name)
        self._value_as_target(node.name, "an `as` target", "bind a plain variable and assign "
                              "it (`m.output = v`) on the next line")

    def _value_as_target(self, target: cst.CSTNode, what: str, instead: str) -> None:
        """A module value bound by unpacking, a loop or `as`: only a plain
        assignment (`m.output = v`) or an in-place edit can write one."""
        found = _bound_value(target)
        if found is not None and self.block is not None:
            raise self.error(
                found, f"`{self.code(found)}` as {what}: a module value can only be written "
                f"by an assignment of its own; {instead}",
            )

    def visit_NamedExpr(self, node: cst.NamedExpr) -> None:
        self._binds(node.target)

    def visit_Del(self, node: cst.Del) -> None:
        self._binds(node.target)
        found = _bound_value(node.target)  # `del m.output`, `del a, m.output`
        if found is not None:
            raise self.error(node, f"`del ...{found.attr.value}`: a module value cannot be deleted")

    # The value of an assignment: `.save()` (or `tracer.cache()`) in it saves the targets.
    def visit_Assign_value(self, node: cst.Assign) -> None:
        self.assigning.append([n for t in node.targets for n in _names_in_target(t.target)])

    def leave_Assign_value(self, node: cst.Assign) -> None:
        self.assigning.pop()

    def visit_AnnAssign_value(self, node: cst.AnnAssign) -> None:
        self.assigning.append(_names_in_target(node.target))

    def leave_AnnAssign_value(self, node: cst.AnnAssign) -> None:
        self.assigning.pop()

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        attr = node.attr.value
        if attr in VALUE_ATTRS and not is_invoker_inputs(node, self.invokers):
            self._check_value_access(node)
        walk.visit(self, node.value)  # never the attribute's own name
        return False

    def visit_Arg(self, node: cst.Arg) -> bool:
        walk.visit(self, node.value)  # never the keyword's name
        return False

    def visit_ImportAlias(self, node: cst.ImportAlias) -> bool:
        if node.asname is not None and isinstance(node.asname.name, cst.Name):
            self._ref(node, node.asname.name.value, True)
        elif isinstance(node.name, cst.Name):
            self._ref(node, node.name.value, True)
        return False

    def _check_value_access(self, node: cst.Attribute) -> None:
        attr = node.attr.value
        if self.block is None:
            root = _root_name(node.value)
            if root is not None and root in self.model_names:
                raise self.error(
                    node,
                    f"`.{attr}` of a module is only available inside a trace block "
                    f"(`with {root}.trace(...):`); save it there with `.save()`",
                )
            return
        if self.lane is None:
            raise self.error(
                node,
                f"`.{attr}` outside any invoke: in a trace with invokes, module values are "
                "read inside `with tracer.invoke(...):`; use `tracer.invoke()` with no "
                "input to see the whole batch",
            )
        if self.lane.first_wait is None:
            self.lane.first_wait = self.where(node)
        if self.nested:
            raise self.error(
                node,
                f"`.{attr}` inside a lambda or nested function in a trace block: module "
                "values can only be awaited by the block's own code; read the value into "
                "a variable first and use the variable in the function",
            )

    # -- statements that cannot live in a lane ------------------------------
    def _forbid(self, node: cst.CSTNode, what: str, instead: str) -> None:
        if self.block is not None and self.nested == 0:
            raise self.error(node, f"{what} cannot be used inside a trace block: {instead}")

    def visit_Yield(self, node: cst.Yield) -> None:
        self._forbid(node, "`yield`", "the block's body is run by the runtime, not iterated")

    def visit_Await(self, node: cst.Await) -> None:
        self._forbid(node, "`await`", "the model runs synchronously")

    def visit_Global(self, node: cst.Global) -> None:
        self._forbid(node, "`global`", "assign to a variable and copy it after the block")

    def visit_Nonlocal(self, node: cst.Nonlocal) -> None:
        self._forbid(node, "`nonlocal`", "assign to a variable and copy it after the block")

    def visit_Return(self, node: cst.Return) -> None:
        if not self.helper:  # a helper's body is its lane: it returns what it computed
            self._forbid(node, "`return`", "save the value and return it after the block")

    def _loop_jump(self, node: cst.CSTNode, word: str) -> None:
        if self.lane is not None and self.nested == 0 and self.lane_loops == 0:
            raise self.error(
                node, f"`{word}` would leave the trace block: only loops inside the block can "
                "be left with it",
            )

    def visit_Break(self, node: cst.Break) -> None:
        self._loop_jump(node, "break")

    def visit_Continue(self, node: cst.Continue) -> None:
        self._loop_jump(node, "continue")

    def visit_Assign(self, node: cst.Assign) -> None:
        if len(node.targets) > 1 and any(
            m.matches(t.target, m.Attribute(attr=m.Name())) and t.target.attr.value in VALUE_ATTRS
            for t in node.targets
        ):
            raise self.error(
                node, "a module value as one of several assignment targets: write it in its own "
                "assignment (`m.output = value`)",
            )
        for t in node.targets:
            if isinstance(t.target, (cst.Tuple, cst.List)):
                self._value_as_target(t.target, "an element of a tuple-unpacking target",
                                      "assign it on a line of its own (`m.output = value`)")

    # -- saves ---------------------------------------------------------------
    def visit_Call(self, node: cst.Call) -> None:
        if (
            self.lane is not None
            and isinstance(node.func, cst.Name)
            and node.func.value in self.barriers
            and self.lane.first_wait is None
        ):
            self.lane.first_wait = self.where(node)  # `b()` waits too
        if (
            self.block is not None
            and self.block.tracer is not None
            and m.matches(node.func, m.Attribute(value=m.Name(self.block.tracer),
                                                 attr=m.Name("cache")))
        ):
            # `cache = tracer.cache()`: the cache is filled by the run and read after it.
            for name in self._assigned_names(node):
                self.block.saved.add(name)
            return
        argument = save_argument(node, binds_save(self.fn))
        if argument is None and not (
            m.matches(node.func, m.Attribute(attr=m.Name("save"))) and not node.args
        ):
            return
        if self.block is None:
            raise self.error(
                node,
                "`.save()` outside a trace block: `.save()` marks a value computed inside "
                "`with model.trace(...):` to be kept after it; outside a block every value "
                "is already kept",
            )
        # At the block's own level (a trace with invokes): code before the first invoke
        # runs before the pass, code after the last one once every invoke is done.
        if self.block.kind == "edit":
            raise self.error(
                node,
                "`.save()` in an edit block: nothing runs in an edit block (its interventions "
                "run in later traces of the edited model); save values in those traces",
            )
        receiver = node.func.value if argument is None else argument
        if isinstance(receiver, cst.Name):
            self.block.saved.add(receiver.value)
        for name in self._assigned_names(node):
            self.block.saved.add(name)

    def _assigned_names(self, node: cst.CSTNode) -> list[str]:
        """Names the expression being visited is assigned to (its statement's targets)."""
        return list(self.assigning[-1]) if self.assigning else []


def barrier_names(body: cst.BaseSuite) -> set[str]:
    """Names assigned ``<x>.barrier(n)`` directly in a block's body."""
    names = set()
    for stmt in getattr(body, "body", ()):
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                if (
                    isinstance(small, cst.Assign)
                    and m.matches(small.value, m.Call(func=m.Attribute(attr=m.Name("barrier"))))
                ):
                    names.update(_names_in_target(small.targets[0].target))
    return names


def _traced_models(fn: cst.FunctionDef) -> set[str]:
    """Root names of every model traced in the function (``model`` of ``model.trace``)."""
    names: set[str] = set()
    for stmt in statements(fn):
        if isinstance(stmt, cst.With):
            call = block_call(stmt)
            root = _root_name(call.func.value) if call is not None else None
            if root is not None:
                names.add(root)
    return names


def _root_name(node: cst.BaseExpression) -> str | None:
    while isinstance(node, (cst.Attribute, cst.Subscript, cst.Call)):
        node = node.value if not isinstance(node, cst.Call) else node.func
    return node.value if isinstance(node, cst.Name) else None


def _bound_value(t: cst.CSTNode) -> cst.Attribute | None:
    """The ``m.output`` that a target binds directly (alone or in a tuple / list)."""
    if isinstance(t, cst.Attribute) and t.attr.value in VALUE_ATTRS:
        return t
    if isinstance(t, (cst.Tuple, cst.List)):
        for el in t.elements:
            found = _bound_value(el.value)
            if found is not None:
                return found
    if isinstance(t, cst.StarredElement):
        return _bound_value(t.value)
    return None


def _names_in_target(t: cst.BaseExpression) -> list[str]:
    if isinstance(t, cst.Name):
        return [t.value]
    if isinstance(t, (cst.Tuple, cst.List)):
        out = []
        for el in t.elements:
            out.extend(_names_in_target(el.value))
        return out
    if isinstance(t, cst.StarredElement):
        return _names_in_target(t.value)
    return []


_CONSTANTS = frozenset({"True", "False", "None"})


def _inputs(call: cst.Call) -> list[cst.Arg]:
    """A block call's arguments but ``remote=...`` (where it runs, not an input)."""
    return [a for a in call.args if a.keyword is None or a.keyword.value != "remote"]


def _free_names(block: BlockInfo, block_refs: list[NameRef], refs: list[NameRef],
                params: set[str]) -> tuple[tuple[str, int], ...]:
    """What ``block`` reads from around it (a remote run sends these values): names
    it reads that the function binds elsewhere, or that nothing binds (globals,
    builtins); with the line of the first read."""
    outside = params | {r.name for r in refs if r.store and r.block is not block}
    return free_names(block_refs, outside, {block.tracer})


def free_names(inside_refs: list[NameRef], outside: set[str],
               skip: set) -> tuple[tuple[str, int], ...]:
    """``(name, first line)`` of each name ``inside_refs`` (the references of a block
    or session, in order) read that ``outside`` binds or that nothing of them binds
    (globals, builtins); not the names of ``skip`` (its tracers) nor constants."""
    inside = {r.name for r in inside_refs if r.store}
    free: dict[str, int] = {}
    for r in inside_refs:
        if r.store or r.name in skip or r.name in free or r.name in _CONSTANTS:
            continue
        if r.name in outside or r.name not in inside:
            free[r.name] = r.line
    return tuple(sorted(free.items()))


def _param_names(params: cst.Parameters) -> list[str]:
    out = [p.name.value for p in (*params.posonly_params, *params.params, *params.kwonly_params)]
    for star in (params.star_arg, params.star_kwarg):
        if isinstance(star, cst.Param):
            out.append(star.name.value)
    return out


def _check_invoke_flow(src: Source, block: BlockInfo, refs: list[NameRef], outer: set[str]) -> None:
    """An invoke runs its code up to its first module value when the pass starts,
    before earlier invokes have run: reading their variables there cannot work."""
    earlier: dict[str, tuple[int, int]] = {}  # name -> (invoke, line)
    for lane in block.lanes:
        first = lane.first_wait
        for r in refs:
            if r.lane is not lane or r.store or r.name not in earlier or r.name in outer:
                continue
            if first is not None and (r.line, r.col) >= first:
                continue
            own = lane.bound.get(r.name)
            if own is not None and own < r.line:
                continue
            index, line = earlier[r.name]
            raise CompileError(
                f"`{r.name}` comes from invoke {index} (line {line}), but invoke {lane.index} "
                f"reads it at line {r.line}, before it waits for any module value: at that "
                f"point invoke {index} has not run yet. Read `{r.name}` where this invoke "
                "writes or reads a module value (the code then waits for the model), or make "
                "both invokes meet at a `b = tracer.barrier(2)`",
                src.filename,
                r.line,
                r.col,
            )
        for name, line in lane.bound.items():
            earlier.setdefault(name, (lane.index, line))


def analyze(src: Source, module: cst.Module, positions: dict, helper: bool = False) -> Analysis:
    """What ``module``'s one function does: its blocks, lanes and names.  ``helper``:
    the function has no block of its own; its body is one lane (see codegen)."""
    fn = module.body[0]
    assert isinstance(fn, cst.FunctionDef)
    visitor = _Analyzer(src, fn, positions, helper)
    walk.visit(visitor, module)
    refs = visitor.refs
    blocks = visitor.blocks

    outer_bound = {r.name for r in refs if r.store and r.lane is None and not r.nested}
    for block in blocks:
        if block.session is not None:
            # In a session, what a later trace of it reads from this one flows without
            # `.save()` (as in nnsight).
            bound = {n for lane in block.lanes for n in lane.bound}
            block.saved |= {
                r.name for r in refs
                if r.name in bound and not r.store and r.block is not None
                and r.block is not block and r.block.session == block.session
                and r.line > block.end_line
            }
        block_refs = [r for r in refs if r.block is block]
        block.model_rebound = any(r.store and r.name == block.model for r in block_refs)
        bound_here: dict[str, int] = {}
        for lane in block.lanes:
            for name, line in lane.bound.items():
                bound_here.setdefault(name, line)
            outside = {r.name for r in refs if r.lane is not lane}
            lane.nonlocal_names = tuple(
                sorted(n for n in lane.bound if n in block.saved or n in outside)
            )
        _check_invoke_flow(src, block, refs, outer_bound)
        shared = {n for lane in block.lanes for n in lane.nonlocal_names}
        block.unsaved_shared = tuple(sorted(shared - block.saved))
        # An unsaved variable read after the block: both lines named.
        later = sorted(
            (r for r in refs if r.block is not block and r.line > block.end_line),
            key=lambda r: (r.line, r.col),
        )
        first_after: dict[str, NameRef] = {}
        for r in later:
            first_after.setdefault(r.name, r)
        for name, line in sorted(bound_here.items(), key=lambda kv: kv[1]):
            if name in block.saved:
                continue
            r = first_after.get(name)
            if r is not None and not r.store:
                raise CompileError(
                    f"`{name}` is assigned inside the {block.kind} block at line {line} but "
                    f"read at line {r.line}, after the block, without being saved: write "
                    f"`{name} = ....save()` at line {line} (or call `{name}.save()` in the "
                    "block) to keep it",
                    src.filename,
                    r.line,
                    r.col,
                )
        block.free = _free_names(block, block_refs, refs, set(_param_names(fn.params)))
        del block_refs
    saved_anywhere = set().union(*(b.saved for b in blocks)) if blocks else set()
    return Analysis(
        blocks=blocks,
        block_of=visitor.block_of,
        lane_of=visitor.lane_of,
        outer_bound=outer_bound,
        saved_anywhere=saved_anywhere,
        model_names={b.model for b in blocks},
        invokers=frozenset(visitor.invokers),
        refs=refs,
    )
