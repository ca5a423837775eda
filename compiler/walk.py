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


def positions(module: cst.Module) -> dict[cst.CSTNode, Span]:
    """``node -> (first line, first column, last line, end column)`` for every node
    of ``module`` (lines from 1, columns from 0), from ``PositionProvider``.  The
    nodes are ``module``'s own (no copy is made)."""
    ranges = meta.MetadataWrapper(module, unsafe_skip_copy=True).resolve(meta.PositionProvider)
    return {node: (r.start.line, r.start.column, r.end.line, r.end.column)
            for node, r in ranges.items()}


def replace(tree: cst.CSTNode, old: cst.CSTNode, new: cst.CSTNode) -> cst.CSTNode:
    """``tree`` with the node ``old`` (by identity) replaced by ``new``."""
    if tree is old:
        return new
    return tree.deep_replace(old, new)
