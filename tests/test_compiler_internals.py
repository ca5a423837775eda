"""The compiler's plumbing: libcst through its public API only, checkpoint numbers
assigned on the tree (a user's literal that looks like a provisional number is kept),
and the small walk helpers (``compiler.walk``) against libcst itself."""

from __future__ import annotations

import re
from pathlib import Path

import libcst as cst
import libcst.metadata as meta
import pytest
import torch
from support import forward_hooks, x_input

from compiler import intervene, walk
from compiler.codegen import compile_source
from compiler.parse import Source
from compiler.rewrite import TMP_BASE
from runtime import NNsight
from runtime.models import tiny_mlp

ROOT = Path(__file__).resolve().parent.parent

# `import libcst._nodes...`, `from libcst._x import y`, `libcst._parser.f(...)`, and
# the private codegen hooks of nodes (`node._codegen(state)`).
_PRIVATE = re.compile(r"\blibcst\._\w|\bcst\._\w|\._codegen(_impl)?\b|\bCodegenState\b")


def test_no_module_uses_libcst_private_internals():
    files = sorted([*ROOT.glob("compiler/**/*.py"), *ROOT.glob("runtime/**/*.py")])
    assert len(files) > 20  # the globs found the packages
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _PRIVATE.search(line.split("#", 1)[0]):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == [], "libcst private API used:\n" + "\n".join(found)


def test_the_private_pattern_catches_what_it_should():
    # The check above would see the old imports (a regression guard for the guard).
    for bad in ("from libcst._nodes.internal import CodegenState",
                "import libcst._parser.entrypoints as e", "module._codegen(state)",
                "x = cst._nodes.base"):
        assert _PRIVATE.search(bad), bad
    for fine in ("import libcst as cst", "import libcst.metadata as meta",
                 "cst.Module([]).code_for_node(node)"):
        assert not _PRIVATE.search(fine), fine


# --------------------------------------------------------------------------------------
# Checkpoint numbers: a user's literal in the provisional range is left alone
# --------------------------------------------------------------------------------------

LITERAL = TMP_BASE + 1  # what the second checkpoint is numbered before renumbering
assert LITERAL == 7770000001


@intervene
def _literal_experiment(model, x):
    number = 7770000001
    text = "7770000001"
    with model.trace(x):
        first = model.layers[0].output.save()
        shifted = (model.layers[1].output[:, :1] * 0 + 7770000001).save()
        tagged = model.layers[2].output.sum().save()
    return number, text, first, shifted, tagged


def test_literal_in_provisional_range_is_kept_in_code():
    code = _literal_experiment.code
    assert code.count("7770000001") == 3, code  # the int, the string, the one in the block
    assert 'text = "7770000001"' in code
    assert "number = 7770000001" in code
    assert "* 0 + 7770000001" in code
    # No provisional number is left anywhere else, and the checkpoints are 0, 1, 2.
    assert re.findall(r"\b777\d{7}\b", code) == ["7770000001"] * 3
    sites = re.findall(r"__iv\.read\(model\.layers\[(\d)\], 'output', (\d+)\)", code)
    assert sites == [("0", "0"), ("1", "1"), ("2", "2")], code
    plan = _literal_experiment.plan.functions[0].blocks[0].lanes[0].checkpoints
    assert [(c.order, c.path) for c in plan] == [
        (0, "model.layers[0]"), (1, "model.layers[1]"), (2, "model.layers[2]")]


def test_literal_in_provisional_range_is_kept_at_run_time():
    model = NNsight(tiny_mlp())
    x = x_input()
    number, text, first, shifted, tagged = _literal_experiment(model, x)
    assert number == 7770000001 and type(number) is int
    assert text == "7770000001"
    net = model._module
    got = {}
    with forward_hooks(out={m: (lambda m, a, o: got.__setitem__(m, o)) for m in net.layers}):
        net(x)
    assert torch.equal(first, got[net.layers[0]])
    assert torch.equal(shifted, got[net.layers[1]][:, :1] * 0 + 7770000001)
    assert torch.equal(tagged, got[net.layers[2]].sum())


# --------------------------------------------------------------------------------------
# compiler.walk: thin wrappers over libcst's public traversal and metadata
# --------------------------------------------------------------------------------------

FILES = sorted([*ROOT.glob("tests/corpus/*.py"), *ROOT.glob("compiler/*.py")])


@pytest.mark.parametrize("path", FILES[:4] + [ROOT / "compiler" / "rewrite.py"],
                         ids=lambda p: p.name)
def test_positions_are_libcsts(path):
    module = cst.parse_module(path.read_text(encoding="utf-8"))
    ref = meta.MetadataWrapper(module, unsafe_skip_copy=True).resolve(meta.PositionProvider)
    mine = walk.positions(module)
    assert len(mine) == len(ref) > 100
    for node, r in ref.items():
        assert mine[node] == (r.start.line, r.start.column, r.end.line, r.end.column), node


class _FieldLog(cst.CSTVisitor):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def visit_Assign_value(self, node):
        self.events.append("value")

    def leave_Assign_value(self, node):
        self.events.append("end value")

    def visit_Name(self, node):
        self.events.append(node.value)

    def visit_If_orelse(self, node):
        self.events.append("orelse")


def test_visit_calls_node_and_field_methods_in_order():
    module = cst.parse_module("a = b = c\nif a:\n    x = y\nelse:\n    z = w\n")
    log = _FieldLog()
    walk.visit(log, module)
    assert log.events == ["a", "b", "value", "c", "end value", "a", "x", "value", "y",
                          "end value", "orelse", "z", "value", "w", "end value"]


class _Edit(cst.CSTTransformer):
    """Removes `pass`, doubles every `x += 1`, renames `a` to `b`."""

    def leave_Pass(self, original, updated):
        return cst.RemoveFromParent()

    def leave_SimpleStatementLine(self, original, updated):
        if len(updated.body) == 1 and isinstance(updated.body[0], cst.AugAssign):
            return cst.FlattenSentinel([updated, updated])
        return updated

    def leave_Name(self, original, updated):
        return updated.with_changes(value="b") if updated.value == "a" else updated


def test_transform_removes_flattens_and_renames():
    module = cst.parse_module("def f(a):\n    pass\n    a += 1\n    if a:\n        pass\n"
                              "    return a\n")
    assert walk.transform(_Edit(), module).code == (
        "def f(b):\n    b += 1\n    b += 1\n    if b:\n        pass\n    return b\n")


def test_replace_swaps_one_node_by_identity():
    expr = cst.parse_expression("a.b[x] + a.b[x]")
    first = expr.left  # `a.b[x]`, equal to the right one but not the same node
    out = walk.replace(expr, first, cst.Name("t"))
    assert cst.Module([]).code_for_node(out) == "t + a.b[x]"
    assert walk.replace(expr, expr, cst.Name("t")).value == "t"
    assert cst.Module([]).code_for_node(walk.replace(expr, cst.Name("zz"), cst.Name("t"))) == (
        "a.b[x] + a.b[x]")


def test_numbers_land_on_their_sites_after_wide_characters_and_crlf():
    # ast columns count UTF-8 bytes: a wide character before a site on its line, and
    # Windows line ends, must not shift where the final numbers are written.
    text = ("def f(model, x):\r\n"
            "    with model.trace(x):\r\n"
            "        a = ('é€😀', model.layers[0].output.save(), 7770000000)\r\n"
            '        b = """7770000001\r\n'
            '        7770000002""", model.layers[1].output.save()\r\n'
            "    return a, b\r\n")
    code = compile_source(Source(text, "<crlf>", 1, 0)).code
    assert "('é€😀', __iv.save((yield __iv.read(model.layers[0], 'output', 0))), 7770000000)" in (
        code), code
    assert "7770000001\r\n        7770000002\"\"\", __iv.save((yield __iv.read(model.layers[1], " \
           "'output', 1)))" in code, code
