"""The compiler's walks over libcst trees, through libcst's public API only.

``visit`` drives a ``CSTVisitor`` (``visit_X`` / ``leave_X`` and the field pairs),
``transform`` a ``CSTTransformer``, ``positions`` gives every node's range as
``PositionProvider`` computes it, and ``replace`` swaps one node by identity.  All
four are thin: libcst's own traversal and metadata do the work, so a libcst
upgrade changes nothing here (``tests/test_compiler_internals.py`` checks that no
module of the compiler or the runtime imports libcst's private ``libcst._...``).
"""

from __future__ import annotations

import libcst as cst
import libcst.metadata as meta

Span = tuple[int, int, int, int]  # first line, first column, last line, end column


def visit(visitor: cst.CSTVisitor, node: cst.CSTNode) -> None:
    """Walk ``node`` with a read-only visitor."""
    node.visit(visitor)


def transform(transformer: cst.CSTTransformer, node: cst.CSTNode):
    """Walk ``node`` with a transformer; returns the new node."""
    return node.visit(transformer)


class _Wrapper(meta.MetadataWrapper):
    """``resolve`` runs a batched traversal for the batchable providers it resolves,
    even when there is none (``PositionProvider`` is not batchable, it generates the
    code once): that traversal visits nothing and costs as much as the positions
    themselves, so it is skipped.  Should libcst stop calling ``visit_batched`` there,
    this override is merely unused."""

    def visit_batched(self, visitors, before_visit=None, after_leave=None):
        if not visitors and before_visit is None and after_leave is None:
            return self.module
        return super().visit_batched(visitors, before_visit, after_leave)


def positions(module: cst.Module) -> dict[cst.CSTNode, Span]:
    """``node -> (first line, first column, last line, end column)`` for every node
    of ``module`` (lines from 1, columns from 0), from ``PositionProvider``.  The
    nodes are ``module``'s own (no copy is made)."""
    ranges = _Wrapper(module, unsafe_skip_copy=True).resolve(meta.PositionProvider)
    return {node: (r.start.line, r.start.column, r.end.line, r.end.column)
            for node, r in ranges.items()}


def replace(tree: cst.CSTNode, old: cst.CSTNode, new: cst.CSTNode) -> cst.CSTNode:
    """``tree`` with the node ``old`` (by identity) replaced by ``new``."""
    if tree is old:
        return new
    return tree.deep_replace(old, new)
