"""The compiler's own libcst walk (``compiler.walk``) against libcst itself.

The fast walk must call a visitor's methods in libcst's order (leaving out only the
token and whitespace leaves), rebuild what a transformer changes as libcst would, and
compute the same positions as ``libcst.metadata.PositionProvider``.
"""

from __future__ import annotations

from pathlib import Path

import libcst as cst
import libcst.metadata as meta
import pytest

from compiler import walk

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(
    [*ROOT.glob("tests/corpus/*.py"), *ROOT.glob("samples/*.py"), *ROOT.glob("compiler/*.py"),
     *ROOT.glob("runtime/*.py")]
)


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_positions_are_libcsts(path):
    module = cst.parse_module(path.read_text())
    ref = meta.MetadataWrapper(module, unsafe_skip_copy=True).resolve(meta.PositionProvider)
    mine = walk.positions(module)
    assert len(mine) == len(ref)
    for node, r in ref.items():
        assert mine[node] == (r.start.line, r.start.column, r.end.line, r.end.column), node


class _Log(cst.CSTVisitor):
    """Logs every method libcst calls, except on token and whitespace leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple] = []

    def on_visit(self, node):
        if type(node) not in walk._LEAVES:
            self.events.append(("visit", type(node).__name__, id(node)))
        return not isinstance(node, cst.Lambda)  # one subtree skipped, as visitors do

    def on_leave(self, node):
        if type(node) not in walk._LEAVES:
            self.events.append(("leave", type(node).__name__, id(node)))

    def on_visit_attribute(self, node, attribute):
        self.events.append(("attr", type(node).__name__, attribute, id(node)))

    def on_leave_attribute(self, node, attribute):
        self.events.append(("end", type(node).__name__, attribute, id(node)))


def _fast_log(module) -> list[tuple]:
    # The fast walk calls per-type methods (looked up on the class): give the log one
    # for every node type.
    cls = type("_FastLog", (_Log,), {})
    for t in _all_node_types():
        setattr(cls, f"visit_{t.__name__}", lambda self, node: self.on_visit(node))
        setattr(cls, f"leave_{t.__name__}", lambda self, node: self.on_leave(node))
    log = cls()
    walk.visit(log, module)
    return log.events


def _all_node_types():
    return walk._subclasses(cst.CSTNode)


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_visit_order_is_libcsts(path):
    module = cst.parse_module(path.read_text())
    ref = _Log()
    module.visit(ref)
    # Node events only: the fast walk reports a field only to a visitor that has a
    # method for it.
    expected = [e for e in ref.events if e[0] in ("visit", "leave")]
    got = [e for e in _fast_log(module) if e[0] in ("visit", "leave")]
    assert got == expected


class _Edit(cst.CSTTransformer):
    """Removes `pass`, doubles every `x += 1` into two statements, renames `a` to `b`."""

    def leave_Pass(self, original, updated):
        return cst.RemoveFromParent()

    def leave_SimpleStatementLine(self, original, updated):
        if m_aug(updated):
            return cst.FlattenSentinel([updated, updated])
        return updated

    def leave_Name(self, original, updated):
        return updated.with_changes(value="b") if updated.value == "a" else updated


def m_aug(line) -> bool:
    return len(line.body) == 1 and isinstance(line.body[0], cst.AugAssign)


def test_transform_is_libcsts():
    text = (
        "def f(a):\n"
        "    pass\n"
        "    a += 1\n"
        "    if a:\n"
        "        pass\n"
        "    x = [a for a in range(3)]; pass\n"
        "    return a\n"
    )
    module = cst.parse_module(text)
    expected = module.visit(_Edit()).code
    assert walk.transform(_Edit(), module).code == expected
    assert "b += 1\n    b += 1" in expected and "pass" in expected  # `if` keeps a body


def test_transform_keeps_untouched_nodes():
    module = cst.parse_module("def f(x):\n    return x + 1\n")
    assert walk.transform(cst.CSTTransformer(), module) is module


class _FieldLog(cst.CSTVisitor):
    """Field methods, as the analyzer and the rewriter use them."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple] = []

    def visit_Assign_value(self, node):
        self.events.append(("value", id(node)))

    def leave_Assign_value(self, node):
        self.events.append(("end value", id(node)))

    def visit_Name(self, node):
        self.events.append((node.value, id(node)))

    def visit_If_orelse(self, node):
        self.events.append(("orelse", id(node)))


def test_field_methods_are_called_where_libcst_calls_them():
    module = cst.parse_module("a = b = c\nif a:\n    x = y\nelse:\n    z = w\n")
    ref, mine = _FieldLog(), _FieldLog()
    module.visit(ref)
    walk.visit(mine, module)
    assert mine.events == ref.events
    assert [e[0] for e in ref.events][:5] == ["a", "b", "value", "c", "end value"]


def test_replace_swaps_one_node_by_identity():
    expr = cst.parse_expression("a.b[x] + a.b[x]")
    first = expr.left  # `a.b[x]`, equal to the right one but not the same node
    out = walk.replace(expr, first, cst.Name("t"))
    assert cst.Module([]).code_for_node(out) == "t + a.b[x]"
    assert walk.replace(expr, cst.Name("zz"), cst.Name("t")) is expr
