"""The envoy tree: a thin wrapper mirroring a module tree, and the model wrapper.

``NNsight(module)`` wraps any ``torch.nn.Module``.  Attribute access walks the
module tree (``model.layers[3].fc``), returning one cached ``Envoy`` per
module; anything that is not a child module is the real attribute.  Envoys
carry no state of a trace: the interleaver keys everything by module, so an
envoy is only a name for a module and a place to report mistakes well.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import torch

from .errors import NotInTraceError

_VALUE_NAMES = ("output", "input", "inputs")


class Envoy:
    """A module of the wrapped model, named by its path (``model.layers.3``)."""

    # `__dict__` holds children seen before under their names (see `_child`), so that
    # `model.layers` is a plain attribute read, not a failed lookup and `__getattr__`.
    __slots__ = ("__dict__", "_children", "_module", "_path", "_root")

    def __init__(self, module: torch.nn.Module, path: str, root: Envoy | None) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_root", root if root is not None else self)
        object.__setattr__(self, "_children", {})

    # -- navigation --------------------------------------------------------
    def _child(self, key: str) -> Envoy:
        env = self._children.get(key)
        if env is None:
            env = Envoy(self._module._modules[key], f"{self._path}.{key}", self._root)
            self._children[key] = env
            if key not in _class_names(type(self)):  # never hides a method or property
                self.__dict__[key] = env
        return env

    def __getattr__(self, name: str) -> Any:
        env = self._children.get(name)  # the hot path: a child seen before
        if env is not None:
            return env
        module = object.__getattribute__(self, "_module")
        if name in module._modules and module._modules[name] is not None:
            return self._child(name)
        try:
            return getattr(module, name)
        except AttributeError:
            pass
        children = [k for k, v in module._modules.items() if v is not None]
        close = difflib.get_close_matches(name, children, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        listing = ", ".join(children) if children else "none"
        raise AttributeError(
            f"`{self._path}` ({type(module).__name__}) has no child module or attribute "
            f"`{name}`.{hint} Its children: {listing}"
        ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _VALUE_NAMES:
            raise NotInTraceError(self._path, name)
        setattr(self._module, name, value)
        # A child replaced or removed: its envoy is made again on the next access.
        self.__dict__.pop(name, None)
        self._children.pop(name, None)

    def _is_list(self) -> bool:
        return isinstance(self._module, (torch.nn.ModuleList, torch.nn.Sequential))

    def __getitem__(self, key):
        if key.__class__ is int:
            env = self._children.get(key)  # the hot path: `layers[i]` seen before
            if env is not None:
                return env
        module = self._module
        if isinstance(module, torch.nn.ModuleDict):
            if key not in module._modules:
                raise KeyError(f"`{self._path}` has no entry {key!r}; it has {list(module.keys())}")
            return self._child(key)
        if not self._is_list():
            raise TypeError(f"`{self._path}` ({type(module).__name__}) is not a list of modules")
        keys = list(module._modules.keys())
        if isinstance(key, slice):
            return [self._child(k) for k in keys[key]]
        if isinstance(key, int) or hasattr(key, "__index__"):
            i = key.__index__()
            n = len(keys)
            if not -n <= i < n:
                raise IndexError(f"`{self._path}` has {n} modules; index {i} is out of range")
            env = self._child(keys[i])
            if key.__class__ is int:
                self._children[key] = env
            return env
        raise TypeError(f"`{self._path}[...]` takes an int or a slice, got {type(key).__name__}")

    def __len__(self) -> int:
        if self._is_list() or isinstance(self._module, torch.nn.ModuleDict):
            return len(self._module)
        raise TypeError(f"`{self._path}` ({type(self._module).__name__}) has no len()")

    def __iter__(self) -> Iterator[Envoy]:
        if isinstance(self._module, torch.nn.ModuleDict):
            return iter([self._child(k) for k in self._module._modules])
        if not self._is_list():
            raise TypeError(f"`{self._path}` ({type(self._module).__name__}) is not iterable")
        return iter([self._child(k) for k in self._module._modules])

    def _resolve(self, parts) -> Envoy:
        env: Envoy = self
        for p in parts:
            env = env[p] if isinstance(p, int) else getattr(env, p)
            if not isinstance(env, Envoy):
                raise AttributeError(  # noqa: TRY004 - a missing module, as for a typo
                    f"`{p}` is not a module (it is a {type(env).__name__})"
                )
        return env

    # -- values outside a trace --------------------------------------------
    @property
    def output(self):
        raise NotInTraceError(self._path, "output")

    @property
    def input(self):
        raise NotInTraceError(self._path, "input")

    @property
    def inputs(self):
        raise NotInTraceError(self._path, "inputs")

    # -- plain use ----------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Envoy({self._path}): {self._module!r}"

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._module._modules) | set(dir(self._module)))


_CLASS_NAMES: dict[type, frozenset[str]] = {}


def _class_names(cls: type) -> frozenset[str]:
    names = _CLASS_NAMES.get(cls)
    if names is None:
        names = _CLASS_NAMES[cls] = frozenset(dir(cls))
    return names


def module_of(obj) -> torch.nn.Module | None:
    if isinstance(obj, Envoy):
        return obj._module
    return None
