"""The envoy tree: a thin wrapper mirroring a module tree, and the model wrapper.

``NNsight(module)`` wraps any ``torch.nn.Module``.  Attribute access walks the
module tree (``model.layers[3].fc``), returning one cached ``Envoy`` per
module; anything that is not a child module is the real attribute.  Envoys
carry no state of a trace: the interleaver keys everything by module, so an
envoy is only a name for a module and a place to report mistakes well.
"""

from __future__ import annotations

import difflib
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from .errors import NotInTraceError
from .paths import VALUE_NAMES, rooted, segment

# A child module whose name is a value name (BERT's `BertOutput` at `layer.output`) is
# reached with a trailing underscore: `layer.output_` (the compiler leaves that name alone).
_ESCAPED = {name + "_": name for name in VALUE_NAMES}

# The variable a pre-run check names paths with (``resolved_as``); error time only.
_SPELLING = threading.local()

# nnsight names we do not have: a clear "not supported" instead of "no child module".
_NOT_SUPPORTED = {
    "all": "`module.all()` is not supported: use `with tracer.all():` in a generate block",
    "iter": "`module.iter[...]` is not supported: use `with tracer.iter[...]:` in a generate "
    "block",
    "edit": "`.edit()` is a method of the whole model (`with model.edit() as edited:`), not "
    "of one of its modules",
    "export_edits": "exporting edits is not supported: run the edit block again where needed",
    "import_edits": "importing edits is not supported: run the edit block again where needed",
}

# Module methods that return the module itself: on an envoy they return the envoy, so
# `model = NNsight(net).to(device)` keeps the wrapper.
_RETURNS_SELF = (
    "to", "cuda", "cpu", "xpu", "mps", "float", "double", "half", "bfloat16", "type",
    "eval", "train", "requires_grad_", "share_memory", "apply", "to_empty",
)


class Envoy:
    """A module of the wrapped model, named by its path as a block spells it
    (``model.layers[3]``: runtime/paths.py)."""

    # `__dict__` holds children seen before under their names (see `_child`), so that
    # `model.layers` is a plain attribute read, not a failed lookup and `__getattr__`.
    # The root is held weakly (`_root_ref`): a strong reference from the root to itself
    # or from its children back to it would keep the model alive after `del model` until
    # the cyclic collector runs.
    __slots__ = ("__dict__", "__weakref__", "_children", "_module", "_path", "_root_ref")

    def __init__(self, module: torch.nn.Module, path: str, root: Envoy | None) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_root_ref", None if root is None else weakref.ref(root))
        object.__setattr__(self, "_children", {})

    @property
    def _root(self) -> Envoy:
        ref = self._root_ref
        return self if ref is None else ref()

    def _here(self) -> str:
        """This envoy's path for an error message, rooted at the variable the code that
        made the mistake holds the model in (error time only, never per call): the
        variable a pre-run check names (``resolved_as``); in a running trace, the innermost
        caller's variable bound to this model (a helper's parameter ``m``, the block's
        ``lm``), else the block's; outside a trace ``model.…`` as always."""
        root = getattr(_SPELLING, "root", None)
        if root is not None:
            return rooted(self._path, root)
        from .interleave import _ACTIVE

        inter = getattr(_ACTIVE, "inter", None)
        model = self._root
        if inter is None or getattr(inter, "root", None) is not model:
            return self._path
        block_var = getattr(getattr(inter, "block", None), "model", None)
        # Up from the mistake to the block's own lane at most (a helper's frame first).
        lanes = {id(getattr(lane.gen, "gi_frame", None)) for lane in getattr(inter, "lanes", ())}
        frame = sys._getframe(1)
        for _ in range(64):  # the user's code is a few frames up; the walk is bounded
            if frame is None:
                break
            code = frame.f_code
            if not code.co_filename.startswith(_RUNTIME_DIR):
                held = [n for n in code.co_varnames + code.co_cellvars + code.co_freevars
                        if n.isidentifier() and not n.startswith("__")
                        and frame.f_locals.get(n) is model]
                if held:
                    return rooted(self._path, block_var if block_var in held else held[0])
            if id(frame) in lanes:
                break
            frame = frame.f_back
        return rooted(self._path, block_var)

    # -- navigation --------------------------------------------------------
    def _child(self, key: str) -> Envoy:
        env = self._children.get(key)
        if env is None:
            env = Envoy(self._module._modules[key], self._path + segment(key), self._root)
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
        escaped = _ESCAPED.get(name)
        if escaped is not None and module._modules.get(escaped) is not None:
            return self._child(escaped)  # `layer.output_`: the child module named `output`
        alias = _renamed(self, name)  # `rename=` of the wrapper: runtime/nnsight.py
        if alias is not None:
            return alias
        if name == "source":  # the calls inside its forward: runtime/source.py
            from .source import source_of

            return source_of(self)
        if name in _NOT_SUPPORTED:
            raise AttributeError(f"`{self._here()}.{name}`: {_NOT_SUPPORTED[name]}") from None
        children = [k for k, v in module._modules.items() if v is not None]
        shown = [k + "_" if k in VALUE_NAMES else k for k in children]
        close = difflib.get_close_matches(name, shown, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        listing = ", ".join(shown) if shown else "none"
        raise AttributeError(
            f"`{self._here()}` ({type(module).__name__}) has no child module or attribute "
            f"`{name}`.{hint} Its children: {listing}{_escape_note(children)}"
        ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in VALUE_NAMES:
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
                raise KeyError(f"`{self._here()}` has no entry {key!r}; it has {list(module.keys())}")
            return self._child(key)
        if not self._is_list():
            raise TypeError(f"`{self._here()}` ({type(module).__name__}) is not a list of modules")
        keys = list(module._modules.keys())
        if isinstance(key, slice):
            return [self._child(k) for k in keys[key]]
        if isinstance(key, int) or hasattr(key, "__index__"):
            i = key.__index__()
            n = len(keys)
            if not -n <= i < n:
                raise IndexError(f"`{self._here()}` has {n} modules; index {i} is out of range")
            env = self._child(keys[i])
            if key.__class__ is int:
                self._children[key] = env
            return env
        raise TypeError(f"`{self._here()}[...]` takes an int or a slice, got {type(key).__name__}")

    def __len__(self) -> int:
        if self._is_list() or isinstance(self._module, torch.nn.ModuleDict):
            return len(self._module)
        raise TypeError(f"`{self._here()}` ({type(self._module).__name__}) has no len()")

    def __iter__(self) -> Iterator[Envoy]:
        if isinstance(self._module, torch.nn.ModuleDict):
            return iter([self._child(k) for k in self._module._modules])
        if not self._is_list():
            raise TypeError(f"`{self._here()}` ({type(self._module).__name__}) is not iterable")
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
    def _not_in_trace(self, what: str) -> NotInTraceError:
        exc = NotInTraceError(self._path, what)
        if self._module._modules.get(what) is not None:
            note = (f"`{self._path}` also has a child module named `{what}`: reach that "
                    f"module as `{self._path}.{what}_`")
            exc.args = (f"{exc.args[0]}. {note}",)
        return exc

    @property
    def output(self):
        raise self._not_in_trace("output")

    @property
    def input(self):
        raise self._not_in_trace("input")

    @property
    def inputs(self):
        raise self._not_in_trace("inputs")

    # -- in a block ------------------------------------------------------------
    def skip(self, value) -> None:
        """In a trace block: this module's next call does not run; ``value`` is its
        output (in an invoke: that invoke's rows of it).  See runtime/skip.py."""
        from .skip import skip

        skip(self, value)

    def next(self, step: int = 1) -> Envoy:
        """``module.next().output``: the module's call after the one ``module.output``
        would give at that line (``next(n)``, or ``.next()`` n times: n calls later), for a
        module called several times in one forward pass.  See runtime/interleave.py."""
        if step.__class__ is not int or step < 1:
            raise ValueError(f"`{self._path}.next(n)` takes a positive int, got {step!r}")
        later = object.__new__(_Later)
        for name in ("_module", "_path", "_root_ref", "_children"):
            object.__setattr__(later, name, object.__getattribute__(self, name))
        later.__dict__["_calls_later"] = self.__dict__.get("_calls_later", 0) + step
        return later

    # -- plain use ----------------------------------------------------------
    def __call__(self, *args, **kwargs):
        # A plain call waits for a trace of the same model running in another thread
        # (its modules are wrapped for that trace); the same thread may call freely.
        from .tracer import root_state

        with root_state(self._root).lock:
            return self._module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Envoy({self._path}): {self._module!r}"

    def __dir__(self):
        children = {k + "_" if k in VALUE_NAMES else k for k in self._module._modules}
        return sorted(set(super().__dir__()) | children | set(dir(self._module)))


class _Later(Envoy):
    """What ``module.next(n)`` returns: the module, ``n`` calls later (its requests are
    served by a later call; see ``Interleaver.advance``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Envoy({self._path}.next({self.__dict__['_calls_later']})): {self._module!r}"


# Of those, the ones that read or move the weights: a model whose weights are not loaded
# yet (a LanguageModel built on the meta device) loads them first.
_NEEDS_WEIGHTS = frozenset(_RETURNS_SELF) - {"eval", "train", "requires_grad_", "to_empty"}


def _returning_self(name: str):
    loads = name in _NEEDS_WEIGHTS

    def method(self, *args, **kwargs):
        if loads:
            load = getattr(self._root, "_load", None)
            if load is not None:
                load()
        out = getattr(self._module, name)(*args, **kwargs)
        return self if out is self._module else out

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"``module.{name}(...)``; returns this envoy where the module returns itself."
    return method


for _name in _RETURNS_SELF:
    setattr(Envoy, _name, _returning_self(_name))
del _name


def _renamed(envoy: Envoy, name: str) -> Envoy | None:
    """The module an alias of the wrapper's ``rename=`` names, cached as an attribute
    (so the next access is a plain read); None when ``name`` is no alias here."""
    root = envoy._root
    try:  # never through __getattr__: a part whose wrapper is gone is its own root
        renames = object.__getattribute__(root, "_renames")
    except AttributeError:
        return None
    if not renames:
        return None
    target = renames.get((envoy._path, name))
    if target is None:
        child = renames.get(("*", name))  # {"self_attn": "attn"}: wherever it is a child
        if child is None or envoy._module._modules.get(child) is None:
            return None
        env = envoy._child(child)
    else:
        env = root._resolve(target)
    envoy.__dict__[name] = env
    return env


_RUNTIME_DIR = __file__.rsplit("/", 1)[0] + "/"  # frames of the runtime are not the user's


def resolved_as(root: Envoy, parts, var: str | None) -> Envoy:
    """``root._resolve(parts)``, its errors naming paths rooted at ``var`` (the block's
    variable: a pre-run check, where no trace runs yet)."""
    _SPELLING.root = var
    try:
        return root._resolve(parts)
    finally:
        _SPELLING.root = None


def _escape_note(children) -> str:
    named = [k for k in children if k in VALUE_NAMES]
    if not named:
        return ""
    return (
        f" (a child module named `{named[0]}` is reached as `.{named[0]}_`: "
        f"`.{named[0]}` is the module's value)"
    )


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
