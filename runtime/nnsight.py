"""The model wrappers users create: ``NNsight`` for any module, ``LanguageModel``
for transformers causal LMs.

They are the root envoy of the tree, plus what a trace needs from a model:
how to turn the inputs given to ``trace``/``invoke`` into call arguments
(``_prepare``, ``_batch``), how to run it (``_run``), and the order facts the
checks learn about it.  Outside a trace they behave like the wrapped model.
"""

from __future__ import annotations

from typing import Any

import torch

from .envoy import Envoy
from .errors import NotInTraceError


class NNsight(Envoy):
    """Wraps any ``torch.nn.Module`` for use in ``@intervene`` experiments."""

    __slots__ = (
        "_checked",
        "_order",
        "_order_complete",
        "_parent_map",
        "_paths",
        "_precedes_cache",
        "_repeated",
    )

    _generator = None  # LanguageModel: the envoy standing for the generation loop

    def __init__(self, module: torch.nn.Module) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"NNsight wraps a torch.nn.Module, got {type(module).__name__}")
        super().__init__(module, "model", None)
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

    # -- blocks outside @intervene ---------------------------------------------
    def trace(self, *args, **kwargs):
        raise NotInTraceError(self._path, "trace")

    def scan(self, *args, **kwargs):
        raise NotInTraceError(self._path, "scan")

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
                        paths.setdefault(id(child), f"model.{name}.{child_name}" if name
                                         else f"model.{child_name}")
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

    def _batch(self, inputs: list) -> tuple[tuple, dict, list]:
        """Several invokes' inputs -> one call's arguments and each invoke's rows.
        ``inputs``: per invoke ``(args, kwargs)``, or None for an invoke without input."""
        prepare = self._prepare
        tensor = torch.Tensor
        rows: list = []
        columns: list[list] | None = None
        first_kwargs: dict = {}
        start = 0
        for index, item in enumerate(inputs):
            if item is None:
                rows.append(None)
                continue
            args, kwargs = prepare(item[0], item[1])
            if columns is None:
                columns = [[] for _ in args]
                first_kwargs = kwargs
            elif len(args) != len(columns) or kwargs.keys() != first_kwargs.keys():
                raise ValueError(f"invoke {index}: its inputs differ in shape from the first invoke's")
            n = None
            for i, a in enumerate(args):
                if not isinstance(a, tensor) or a.dim() == 0:
                    raise TypeError(
                        f"invoke {index}: input {i} is a {type(a).__name__}; to batch invokes of a "
                        "plain module every positional input must be a tensor with a batch dimension"
                    )
                columns[i].append(a)
                if n is None:
                    n = a.shape[0]
            rows.append(slice(start, start + (n or 0)))
            start += n or 0
        if columns is None:
            raise ValueError("a trace needs at least one invoke with an input")
        try:
            batched = tuple(torch.cat(col, dim=0) for col in columns)
        except RuntimeError as exc:
            raise ValueError(f"the invokes' inputs cannot be batched along dim 0: {exc}") from None
        return batched, dict(first_kwargs), rows

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
