"""How a module path is spelled for a user: one spelling everywhere.

Every message, error attribute, plan row and cache key names a module the way the
user writes it in a block: a Python expression rooted at the wrapper's variable
(``model.model.layers[5].mlp``, ``model.lm_head``), with list indices in brackets
and a child module named ``output``/``input``/``inputs`` as ``output_`` (its name in
a block).  Where the variable is not known (outside a block, in a plain call) the
root is ``model``.  The plan shows the path exactly as written (dynamic ones with
their variable, ``model.model.layers[i]``), so it spells the same module the same.

Internally the runtime keys modules by torch's dotted names (``model.layers.5``, as
``named_modules()`` gives them); ``shown`` turns one into the displayed form, and
``names`` reads any spelling back (cache keys accept them all).  Pure string work:
formatting happens when a message or a listing is made, never per call.
"""

from __future__ import annotations

import re

ROOT = "model"  # the root's name where the user's variable is not known

VALUE_NAMES = frozenset(("output", "input", "inputs"))
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_PART = re.compile(r"""\.?([A-Za-z_][A-Za-z0-9_]*|\d+)|\[\s*(-?\d+|'[^']*'|"[^"]*")\s*\]""")


def segment(name: str) -> str:
    """One child's part of a displayed path: ``.mlp``, ``[5]`` (a list index),
    ``.output_`` (a child named like a value), ``['a-b']`` (a dict key that is no name)."""
    if name.isdigit():
        return f"[{name}]"
    if name in VALUE_NAMES:
        return f".{name}_"
    if name.isidentifier():
        return f".{name}"
    return f"[{name!r}]"


def shown(torch_path: str, root: str = ROOT) -> str:
    """``layers.0.mlp`` (a path as ``named_modules()`` names it; ``""``: the root
    itself) -> ``model.layers[0].mlp``, rooted at ``root`` (the user's variable)."""
    if not torch_path:
        return root
    return root + "".join(segment(n) for n in torch_path.split("."))


def rooted(path: str, root: str | None) -> str:
    """A displayed path rooted at ``model`` (what envoys carry) rooted at the user's
    variable instead (``lm.model.layers[0]``), when ``root`` names one."""
    if not root or root == ROOT or not _DOTTED_NAME.match(root):
        return path
    if path == ROOT or path.startswith((ROOT + ".", ROOT + "[")):
        return root + path[len(ROOT):]
    return path


def names(path: str) -> list[str] | None:
    """Any spelling of a module path read back as its names: ``model.layers[0].mlp``,
    ``model.layers.0.mlp`` and ``model.layers["0"].mlp`` all give
    ``["model", "layers", "0", "mlp"]``; None when it is no path."""
    out: list[str] = []
    pos = 0
    path = path.strip()
    while pos < len(path):
        m = _PART.match(path, pos)
        if m is None or (pos == 0 and path.startswith(".")):
            return None
        name = m.group(1)
        if name is None:
            name = m.group(2)
            if name[0] in "'\"":
                name = name[1:-1]
        out.append(name)
        pos = m.end()
    return out or None


def unescaped(parts: list[str]) -> list[str]:
    """``output_`` -> ``output``: the torch name of a child the user reaches as
    ``.output_`` (see ``segment``)."""
    return [p[:-1] if p[:-1] in VALUE_NAMES and p.endswith("_") else p for p in parts]
