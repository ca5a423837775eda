"""A faster walk over libcst trees, for the compiler's two passes.

libcst's own traversal rebuilds every node it passes (a new dataclass, validated)
and visits every token and every run of whitespace: about two thirds of the
nodes of an experiment function are spaces, dots, commas and brackets.  These
two functions drive the same visitors (``visit_X`` / ``leave_X`` and the
``visit_X_field`` / ``leave_X_field`` pairs, in the same order) but skip those
leaves and rebuild a node only when one of its children changed.

``visit`` is for a ``CSTVisitor`` (``leave_X(original)``), ``transform`` for a
``CSTTransformer`` (``leave_X(original, updated)``; a child may be removed or
flattened into several in a sequence, as with libcst).  Metadata is resolved by
the caller (``with visitor.resolve(wrapper): ...``).
"""

from __future__ import annotations

import re
import typing
from typing import Any

import libcst as cst
from libcst._nodes.internal import CodegenState  # what codegen writes to; positions extend it


def _subclasses(base: type) -> set[type]:
    out: set[type] = set()
    todo = [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.add(sub)
                todo.append(sub)
    return out


# Nodes that hold no expression or statement: nothing of the compiler's happens
# in them, and nothing below them changes.
_LEAVES = frozenset(
    {
        cst.SimpleWhitespace, cst.ParenthesizedWhitespace, cst.TrailingWhitespace,
        cst.EmptyLine, cst.Newline, cst.Comment, cst.Dot, cst.Comma, cst.Colon,
        cst.Semicolon, cst.AssignEqual, cst.LeftParen, cst.RightParen,
        cst.LeftSquareBracket, cst.RightSquareBracket, cst.LeftCurlyBrace,
        cst.RightCurlyBrace, cst.ImportStar,
    }
    | _subclasses(cst.BaseBinaryOp) | _subclasses(cst.BaseBooleanOp)
    | _subclasses(cst.BaseCompOp) | _subclasses(cst.BaseUnaryOp) | _subclasses(cst.BaseAugOp)
)

# Every node type that is not a leaf: only these are entered.
_NODES = frozenset(_subclasses(cst.CSTNode) - _LEAVES)
_FIELDS: dict[type, tuple[str, ...]] = {}


class _FieldRecorder(cst.CSTVisitor):
    """Records the fields libcst visits on one node, in its order (children are
    not entered)."""

    def __init__(self, node: cst.CSTNode) -> None:
        super().__init__()
        self.node = node
        self.fields: list[str] = []

    def on_visit(self, node: cst.CSTNode) -> bool:
        return node is self.node

    def on_visit_attribute(self, node: cst.CSTNode, attribute: str) -> None:
        if node is self.node:
            self.fields.append(attribute)


# libcst skips a field of these when it is None (everywhere else it reports every
# field): their order is learned per node, not per type.
_PER_NODE = frozenset(
    getattr(cst, name) for name in ("FormattedStringExpression", "TemplatedStringExpression")
    if hasattr(cst, name)
)


def _fields(node: cst.CSTNode) -> tuple[str, ...]:
    """The fields of ``node``'s type that can hold nodes, in libcst's visiting order
    (learned once per type from libcst itself)."""
    t = type(node)
    fields = _FIELDS.get(t)
    if fields is None:
        recorder = _FieldRecorder(node)
        node.visit(recorder)
        declared = getattr(t, "__dataclass_fields__", {})
        fields = tuple(f for f in dict.fromkeys(recorder.fields)
                       if f not in declared or not _holds_only_leaves(declared[f].type))
        if t not in _PER_NODE:
            _FIELDS[t] = fields
    return fields


_LEAF_BASES = (*_LEAVES, cst.BaseParenthesizableWhitespace, cst.BaseBinaryOp, cst.BaseBooleanOp,
               cst.BaseCompOp, cst.BaseUnaryOp, cst.BaseAugOp)
_NOTHING = (type(None), str, cst.MaybeSentinel)


def _holds_only_leaves(annotation) -> bool:
    """A field declared as leaves only (whitespace, brackets, an operator...), maybe
    in a sequence or optional: the walk never needs to look in it."""
    args = typing.get_args(annotation)
    if args:
        return all(_holds_only_leaves(a) for a in args)
    if isinstance(annotation, type):
        return issubclass(annotation, _LEAF_BASES) or issubclass(annotation, _NOTHING)
    return False  # a forward reference, a literal...: look


_Methods = tuple[Any, Any, dict[str, tuple[Any, Any]]]
_METHODS: dict[type, dict[type, _Methods]] = {}  # visitor class -> node type -> methods


def _methods(visitor: cst.CSTVisitor | cst.CSTTransformer, t: type,
             cache: dict[type, _Methods]) -> _Methods:
    found = cache.get(t)
    if found is None:
        name = t.__name__
        cls = type(visitor)
        per_field = {}
        for attr in dir(cls):
            if attr.startswith((f"visit_{name}_", f"leave_{name}_")):
                field = attr.split("_", 2)[2]
                per_field[field] = (getattr(cls, f"visit_{name}_{field}", None),
                                    getattr(cls, f"leave_{name}_{field}", None))
        found = cache[t] = (getattr(cls, f"visit_{name}", None),
                            getattr(cls, f"leave_{name}", None), per_field)
    return found


def visit(visitor: cst.CSTVisitor, node: cst.CSTNode) -> None:
    """Walk ``node`` with a read-only visitor."""
    _visit(visitor, node, _METHODS.setdefault(type(visitor), {}))


def _visit(visitor, node, cache) -> None:
    t = type(node)
    enter, leave, per_field = cache.get(t) or _methods(visitor, t, cache)
    if enter is None or enter(visitor, node) is not False:
        for field in _FIELDS.get(t) or _fields(node):
            hooks = per_field.get(field) if per_field else None
            if hooks is not None and hooks[0] is not None:
                hooks[0](visitor, node)
            value = getattr(node, field)
            vt = type(value)
            if vt is tuple or vt is list:
                for child in value:
                    if type(child) not in _LEAVES:
                        _visit(visitor, child, cache)
            elif vt in _NODES:
                _visit(visitor, value, cache)
            if hooks is not None and hooks[1] is not None:
                hooks[1](visitor, node)
    if leave is not None:
        leave(visitor, node)


def transform(transformer: cst.CSTTransformer, node: cst.CSTNode):
    """Walk ``node`` with a transformer; returns the new node (``node`` itself when
    nothing changed)."""
    return _transform(transformer, node, _METHODS.setdefault(type(transformer), {}))


def _transform(transformer, node, cache):
    t = type(node)
    enter, leave, per_field = cache.get(t) or _methods(transformer, t, cache)
    updated = node
    if enter is None or enter(transformer, node) is not False:
        changes = None
        for field in _FIELDS.get(t) or _fields(node):
            hooks = per_field.get(field) if per_field else None
            if hooks is not None and hooks[0] is not None:
                hooks[0](transformer, node)
            value = getattr(node, field)
            vt = type(value)
            if vt is tuple or vt is list:
                items = None
                for i, child in enumerate(value):
                    if type(child) in _LEAVES:
                        new = child
                    else:
                        new = _transform(transformer, child, cache)
                    if items is None:
                        if new is child:
                            continue
                        items = list(value[:i])
                    if isinstance(new, cst.FlattenSentinel):
                        items.extend(new.nodes)
                    elif not isinstance(new, cst.RemovalSentinel):
                        items.append(new)
                if items is not None:
                    if changes is None:
                        changes = {}
                    changes[field] = _drop_empty_lines(items) if field == "body" else items
            elif vt in _NODES:
                new = _transform(transformer, value, cache)
                if new is not value:
                    if isinstance(new, (cst.RemovalSentinel, cst.FlattenSentinel)):
                        raise TypeError(
                            f"a {vt.__name__} in {t.__name__}.{field} cannot be "
                            "removed or replaced by several nodes"
                        )
                    if changes is None:
                        changes = {}
                    changes[field] = new
            if hooks is not None and hooks[1] is not None:
                hooks[1](transformer, node)
        if changes is not None:
            updated = node.with_changes(**changes)
    if leave is not None:
        return leave(transformer, node, updated)
    return updated


def _drop_empty_lines(items: list) -> list:
    # As libcst does for bodies: a statement line whose statements were all removed goes.
    return [s for s in items
            if not (isinstance(s, cst.SimpleStatementLine) and not s.body)]


# -- positions ------------------------------------------------------------------------

_NEWLINE = re.compile(r"\r\n?|\n")


class _PositionState(CodegenState):
    """What libcst's ``PositionProvider`` computes (syntactic ranges: a node's own
    start and end, whitespace it owns excluded where libcst excludes it), as plain
    tuples, without its per-node context managers and regular expressions."""

    __slots__ = ("column", "computed", "line", "stack")

    def __init__(self, module: cst.Module) -> None:
        super().__init__(default_indent=module.default_indent,
                         default_newline=module.default_newline)
        self.line = 1
        self.column = 0
        self.computed: dict[cst.CSTNode, tuple[int, int, int, int]] = {}
        self.stack: list[tuple[int, int]] = []

    def _advance(self, value: str) -> None:
        if "\n" in value or "\r" in value:
            segments = _NEWLINE.split(value)
            self.line += len(segments) - 1
            self.column = len(segments[-1])
        else:
            self.column += len(value)

    def add_indent_tokens(self) -> None:
        self.tokens.extend(self.indent_tokens)
        for token in self.indent_tokens:
            self._advance(token)

    def add_token(self, value: str) -> None:
        self.tokens.append(value)
        self._advance(value)

    def before_codegen(self, node: cst.CSTNode) -> None:
        self.stack.append((self.line, self.column))

    def after_codegen(self, node: cst.CSTNode) -> None:
        line, column = self.stack.pop()
        if node not in self.computed:  # a syntactic range recorded inside wins
            self.computed[node] = (line, column, self.line, self.column)

    def record_syntactic_position(self, node, *, start_node=None, end_node=None):
        return _Syntactic(self, node, start_node, end_node)


class _Syntactic:
    __slots__ = ("end_node", "node", "start", "start_node", "state")

    def __init__(self, state: _PositionState, node, start_node, end_node) -> None:
        self.state = state
        self.node = node
        self.start_node = start_node
        self.end_node = end_node

    def __enter__(self) -> None:
        self.start = (self.state.line, self.state.column)

    def __exit__(self, *exc) -> bool:
        state = self.state
        computed = state.computed
        start = computed[self.start_node][:2] if self.start_node is not None else self.start
        end = (computed[self.end_node][2:] if self.end_node is not None
               else (state.line, state.column))
        computed[self.node] = (*start, *end)
        return False


def positions(module: cst.Module) -> dict[cst.CSTNode, tuple[int, int, int, int]]:
    """``node -> (first line, first column, last line, end column)`` for every node
    of ``module`` (lines from 1, columns from 0), as ``PositionProvider`` gives."""
    state = _PositionState(module)
    module._codegen(state)
    return state.computed


def replace(tree: cst.CSTNode, old: cst.CSTNode, new: cst.CSTNode) -> cst.CSTNode:
    """``tree`` with the node ``old`` (by identity) replaced by ``new``."""
    if tree is old:
        return new
    changes = None
    for field in _FIELDS.get(type(tree)) or _fields(tree):
        value = getattr(tree, field)
        if type(value) in _NODES:
            got = replace(value, old, new)
            if got is not value:
                changes = {**(changes or {}), field: got}
        elif isinstance(value, (tuple, list)):
            items = [replace(c, old, new) for c in value]
            if any(a is not b for a, b in zip(items, value)):
                changes = {**(changes or {}), field: items}
    return tree if changes is None else tree.with_changes(**changes)
