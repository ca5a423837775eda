"""The model wrappers users create: ``NNsight`` for any module, ``LanguageModel``
for transformers causal LMs.

They are the root envoy of the tree, plus what a trace needs from a model:
how to turn the inputs given to ``trace``/``invoke`` into call arguments
(``_prepare``, ``_batch``), how to run it (``_run``), and the order facts the
checks learn about it.  Outside a trace they behave like the wrapped model.
"""

from __future__ import annotations

import difflib
import sys
from typing import Any

import torch

from .envoy import Envoy
from .errors import NotInTraceError
from .paths import shown


class NNsight(Envoy):
    """Wraps any ``torch.nn.Module`` for use in ``@intervene`` experiments."""

    __slots__ = (
        "_checked",
        "_edits",
        "_order",
        "_order_complete",
        "_parent_map",
        "_paths",
        "_precedes_cache",
        "_recording",
        "_renames",
        "_repeated",
    )

    _generator = None  # LanguageModel: the envoy standing for the generation loop

    def __init__(self, module: torch.nn.Module, *, rename: dict[str, str] | None = None) -> None:
        module = unwrap(module)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"NNsight wraps a torch.nn.Module, got {type(module).__name__}")
        super().__init__(module, "model", None)
        object.__setattr__(self, "_renames", None)
        object.__setattr__(self, "_edits", None)  # model.edit(): runtime/edit.py
        object.__setattr__(self, "_recording", None)
        if rename:
            object.__setattr__(self, "_renames", self._check_renames(rename))
        object.__setattr__(self, "_parent_map", None)
        object.__setattr__(self, "_order", {})
        object.__setattr__(self, "_order_complete", False)
        object.__setattr__(self, "_repeated", set())
        object.__setattr__(self, "_precedes_cache", {})
        object.__setattr__(self, "_checked", {})
        object.__setattr__(self, "_paths", None)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in NNsight.__slots__:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _check_renames(self, rename: dict[str, str]) -> dict:
        """nnsight's ``rename=``: ``{"model.layers": "layers"}`` makes ``model.layers``
        the module at ``model.model.layers`` (a dotted key is a path from the wrapped
        module, as ``named_modules()`` names it; a dotted value mounts the alias under
        that parent); ``{"self_attn": "attn"}`` (no dot) names every child ``self_attn``
        also ``attn``.  The real names keep working; paths in messages are the real ones."""
        renames: dict = {}
        names = dict(self._module.named_modules())
        for key, alias in rename.items():
            if not (isinstance(key, str) and isinstance(alias, str) and key and alias):
                raise TypeError(f"rename= maps module paths to names (str: str), got "
                                f"{key!r}: {alias!r}")
            mount, _, short = alias.rpartition(".")
            if not short.isidentifier():
                raise ValueError(f"rename={{{key!r}: {alias!r}}}: `{short}` is not a name")
            if "." not in key:
                if not any(key in m._modules for m in names.values()):
                    raise ValueError(f"rename={{{key!r}: {alias!r}}}: no module has a child "
                                     f"named `{key}`")
                renames[("*", short)] = key
                continue
            if key not in names:
                close = difflib.get_close_matches(key, list(names), n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                raise ValueError(f"rename={{{key!r}: {alias!r}}}: the wrapped model has no "
                                 f"module `{key}`{hint}")
            if mount and mount not in names:
                raise ValueError(f"rename={{{key!r}: {alias!r}}}: the wrapped model has no "
                                 f"module `{mount}` to put `{short}` under")
            parts = tuple(int(p) if p.isdigit() else p for p in key.split("."))
            renames[(shown(mount), short)] = parts  # keyed by the envoy's path
        return renames

    # -- blocks outside @intervene ---------------------------------------------
    def trace(self, *args, **kwargs):
        """``with model.trace(...):`` outside @intervene: compiled on entry (runtime/direct.py)."""
        return self._direct("trace", args, kwargs)

    def scan(self, *args, **kwargs):
        return self._direct("scan", args, kwargs)

    def edit(self, *args, **kwargs):
        return self._direct("edit", args, kwargs)

    def _direct(self, kind: str, args: tuple, kwargs: dict):
        """The block ``with model.<kind>(...):`` opens in the frame that called ``kind``
        (two up from here); NotInTraceError when that call opens no ``with``."""
        from .direct import DirectTracer, opens_with

        if not opens_with(sys._getframe(2)):
            raise NotInTraceError(self._path, kind)
        return DirectTracer(self, kind, args, kwargs)

    def clear_edits(self) -> None:
        """Drop the interventions ``model.edit(inplace=True)`` put on this wrapper."""
        self._edits = None

    def _add_lane(self, fn, spec, index: int) -> None:
        from .edit import add_lane  # `__iv.lane(edited, ...)` in an edit block

        add_lane(self, fn, spec, index)

    def session(self, *, remote: bool = False, **kwargs):
        """``with model.session():`` groups several trace blocks (runtime/session.py)."""
        from .session import Session

        return Session(self, remote, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._module!r})"

    # -- structure facts ---------------------------------------------------------
    def _parents(self) -> dict[int, torch.nn.Module]:
        if self._parent_map is None:
            parents: dict[int, torch.nn.Module] = {}
            paths: dict[int, str] = {id(self._module): "model"}
            for name, mod in self._module.named_modules():
                for child_name, child in mod._modules.items():
                    if child is not None and id(child) not in parents:
                        parents[id(child)] = mod
                        paths.setdefault(id(child), shown(f"{name}.{child_name}" if name
                                                          else child_name))
            self._parent_map = parents
            self._paths = paths
        return self._parent_map

    def _path_of(self, module) -> str:
        self._parents()
        return self._paths.get(id(module), type(module).__name__)

    def _ran(self, module) -> bool:
        return id(module) in self._order

    def _learn_order(self) -> list:
        """Record the order modules are first called in, during the first forward
        pass of the first trace.  A module called again within that pass (and its
        ancestors) is marked repeated: its order against others is not a fact."""
        seen = self._order
        repeated = self._repeated
        parents = self._parents()
        root = self._module
        done = [False]

        def record(mod, args):
            if done[0]:
                return
            if id(mod) in seen:
                if mod is not root:
                    node = mod
                    while node is not None and node is not root:
                        repeated.add(id(node))
                        node = parents.get(id(node))
                return
            # Containers that are never called (ModuleList) take the place of
            # their first called descendant.
            chain = []
            node = mod
            while node is not None and id(node) not in seen:
                chain.append(node)
                node = parents.get(id(node))
            for node in reversed(chain):
                seen[id(node)] = len(seen)

        def first_pass_over(mod, args, output):
            done[0] = True

        # Scripted modules take no Python hooks: they give no order facts.
        if isinstance(root, torch.jit.ScriptModule):
            return []
        return [root.register_forward_hook(first_pass_over)] + [
            m.register_forward_pre_hook(record) for m in root.modules()
            if not isinstance(m, torch.jit.ScriptModule)
        ]

    # -- inputs and running --------------------------------------------------------
    def _prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def _batch(self, inputs: list, lanes=None) -> tuple[tuple, dict, list]:
        """Several invokes' inputs -> one call's arguments and each invoke's rows.
        ``inputs``: per invoke ``(args, kwargs)``, or None for an invoke without input;
        ``lanes``: the block's lanes (their lines name an invoke in errors).

        Positional tensors are concatenated along dim 0; a keyword is passed once when
        every invoke gives the same object (or equal plain values), and concatenated when
        each invoke gives a tensor with its own rows."""
        prepare = self._prepare
        given: list[tuple[int, tuple, dict, int]] = []
        rows: list = []
        start = 0
        for index, item in enumerate(inputs):
            if item is None:
                rows.append(None)
                continue
            args, kwargs = prepare(item[0], item[1])
            n = None
            for i, a in enumerate(args):
                if not isinstance(a, torch.Tensor) or a.dim() == 0:
                    raise TypeError(
                        f"{invoke_name(index, lanes)}: input {i} is a {type(a).__name__}; to batch invokes of a "
                        "plain module every positional input must be a tensor with a batch "
                        "dimension"
                    )
                if n is None:
                    n = a.shape[0]
            given.append((index, args, kwargs, n or 0))
            rows.append(slice(start, start + (n or 0)))
            start += n or 0
        if not given:
            raise ValueError("a trace needs at least one invoke with an input")
        first_index, first_args, first_kwargs, _ = given[0]
        for index, args, kwargs, _ in given[1:]:
            if len(args) != len(first_args) or kwargs.keys() != first_kwargs.keys():
                name, first = invoke_name(index, lanes), invoke_name(first_index, lanes)
                raise ValueError(
                    f"{name}: its inputs differ from {first}'s ({len(args)} positional inputs "
                    f"and keywords {sorted(kwargs)}, against {len(first_args)} and "
                    f"{sorted(first_kwargs)}): batched invokes take the same kinds of input"
                )
            for i, (a, b) in enumerate(zip(args, first_args)):
                if a.shape[1:] != b.shape[1:]:
                    name, first = invoke_name(index, lanes), invoke_name(first_index, lanes)
                    raise ValueError(
                        f"{name}: input {i} has shape {tuple(a.shape)} but {first}'s has "
                        f"{tuple(b.shape)}: invokes are batched along dim 0, so every other "
                        "dimension must match"
                    )
        batched = tuple(
            torch.cat([args[i] for _, args, _, _ in given], dim=0) for i in range(len(first_args))
        )
        merged = {
            key: merge_keyword(key, [(i, kw[key], n) for i, _, kw, n in given], lanes)
            for key in first_kwargs
        }
        return batched, merged, rows

    def _run(self, kind: str, args: tuple, kwargs: dict, tracer) -> Any:
        if kind == "trace":
            return self._module(*args, **kwargs)
        if kind == "scan":
            return self._scan(args, kwargs)
        raise NotImplementedError(f"`{kind}` blocks are not supported for {type(self).__name__}")

    def _scan(self, args: tuple, kwargs: dict) -> Any:
        """Run on fake tensors: shapes and dtypes flow, nothing is computed and no
        weight is copied (parameters are seen through fake views)."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils._pytree import tree_map

        # Inputs go where the parameters are; for a model not loaded yet (on the
        # meta device) only their shapes and dtypes travel.
        param = next(self._module.parameters(), None)
        device = param.device if param is not None else None

        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            def fake(x):
                if not isinstance(x, torch.Tensor):
                    return x
                if device is not None and x.device != device:
                    x = x.to(device)
                return mode.from_tensor(x)

            return self._module(*tree_map(fake, args), **tree_map(fake, kwargs))


def unwrap(module):
    """The torch module under a wrapper given where a module is expected
    (``NNsight(NNsight(net))``, ``NNsight(lm.model)``): wrapping a wrapper again wraps
    its module (loaded first, if it is a LanguageModel's whose weights wait)."""
    if isinstance(module, Envoy):
        load = getattr(module._root, "_load", None)
        if load is not None:
            load()
        return module._module
    return module


def invoke_name(index: int, lanes=None) -> str:
    """``invoke 1 (line 12)``: an invoke as errors name it."""
    line = None
    if lanes is not None and 0 <= index < len(lanes):
        line = getattr(lanes[index], "line", None)
    return f"invoke {index} (line {line})" if line else f"invoke {index}"


def merge_keyword(key: str, values: list, lanes=None) -> Any:
    """One keyword input of several invokes (``[(index, value, rows)]``): the value
    itself when all give the same, else their tensors concatenated along dim 0."""
    first_index, first, _ = values[0]
    if all(_same(v, first) for _, v, _ in values[1:]):
        return first
    for index, v, n in values:
        name = invoke_name(index, lanes)
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != n:
            what = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(
                f"{name}: keyword input `{key}` ({what}) differs from "
                f"{invoke_name(first_index, lanes)}'s and cannot be batched: give every invoke "
                f"the same value, or a tensor with one row per row of its input ({n})"
            )
        if v.shape[1:] != first.shape[1:]:
            raise ValueError(
                f"{name}: keyword input `{key}` has shape {tuple(v.shape)} but "
                f"{invoke_name(first_index, lanes)}'s has {tuple(first.shape)}: invokes are "
                "batched along dim 0, so every other dimension must match"
            )
    return torch.cat([v for _, v, _ in values], dim=0)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an odd __eq__: not the same
        return False
