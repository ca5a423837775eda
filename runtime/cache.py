"""``tracer.cache()``: every module's output (and input) as the run produced it.

Hooks go only on the chosen modules and run after the experiment's own hooks,
so the cache holds values after interventions.  Keys are module paths with
and without the leading ``model.``; attribute navigation works too
(``cache.model.layers[3].output``).  Under ``generate`` each key holds one
entry per step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class Entry:
    """One call of a module: ``output``, ``inputs`` (``(args, kwargs)``) and ``input``."""

    __slots__ = ("inputs", "output")

    def __init__(self, output, inputs) -> None:
        self.output = output
        self.inputs = inputs

    @property
    def input(self):
        if self.inputs is None:
            raise AttributeError("inputs were not recorded: use tracer.cache(include_inputs=True)")
        args, kwargs = self.inputs
        if args:
            return args[0]
        return next(iter(kwargs.values()), None)

    def __repr__(self) -> str:
        shape = getattr(self.output, "shape", None)
        return f"Entry(output={'shape ' + str(tuple(shape)) if shape is not None else type(self.output).__name__})"


def _convert(value, device, dtype, detach: bool):
    if isinstance(value, torch.Tensor):
        if detach:
            value = value.detach()
        if device is not None or dtype is not None:
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
        return value
    if isinstance(value, tuple):
        items = [_convert(v, device, dtype, detach) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_convert(v, device, dtype, detach) for v in value]
    if isinstance(value, dict):
        return {k: _convert(v, device, dtype, detach) for k, v in value.items()}
    return value


class Cache(Mapping):
    def __init__(self, root, modules, include_inputs, device, dtype, detach, per_step) -> None:
        self._root = root
        self._include_inputs = include_inputs
        self._device = device
        self._dtype = dtype
        self._detach = detach
        self._per_step = per_step
        self._entries: dict[str, list[Entry]] = {}
        self._handles: list = []
        self._targets = self._choose(modules)

    def _choose(self, modules) -> list[tuple[str, torch.nn.Module]]:
        from .envoy import Envoy

        if modules is None:
            return [
                ("model" if not name else f"model.{name}", mod)
                for name, mod in self._root._module.named_modules()
            ]
        chosen = []
        for item in modules:
            if isinstance(item, Envoy):
                chosen.append((item._path, item._module))
            elif isinstance(item, str):
                # With or without the root's `model.`; the wrapped module may itself
                # have a child called `model` (model.layers.2 of a Llama).
                subs = [item[len("model."):], item] if item.startswith("model.") else [item]
                if item == "model":
                    subs = ["", "model"]
                for sub in subs:
                    try:
                        mod = self._root._module.get_submodule(sub)
                    except AttributeError:
                        continue
                    chosen.append((f"model.{sub}" if sub else "model", mod))
                    break
                else:
                    raise KeyError(f"tracer.cache(modules=...): no module {item!r}")
            else:
                raise TypeError(
                    "tracer.cache(modules=...) takes envoys (model.layers[0]) or paths "
                    f"('model.layers.0'), got {type(item).__name__}"
                )
        return chosen

    def _attach_hooks(self) -> None:
        for path, mod in self._targets:
            self._handles.append(mod.register_forward_hook(self._recorder(path), with_kwargs=True))

    def _detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._targets = []

    def _recorder(self, path: str):
        conv = self._device, self._dtype, self._detach

        def record(mod, args, kwargs, output):
            inputs = _convert((args, kwargs), *conv) if self._include_inputs else None
            self._entries.setdefault(path, []).append(Entry(_convert(output, *conv), inputs))

        return record

    # -- reading ---------------------------------------------------------------------
    def _lookup(self, key: str):
        # A path with or without the leading `model.`; with a LanguageModel the
        # wrapped module is itself often called `model` (model.model.layers.0),
        # so try the key as written first, then under the root.
        entries = self._entries.get(key) if key == "model" or key.startswith("model.") else None
        if entries is None:
            entries = self._entries.get(f"model.{key}")
        return entries

    def __getitem__(self, key: str):
        entries = self._lookup(key)
        if entries is None:
            raise KeyError(f"{key!r} was not recorded (modules that ran: {len(self._entries)})")
        return entries if self._per_step else entries[-1]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return _CachePath(self, "model" if name == "model" else f"model.{name}")

    def __repr__(self) -> str:
        return f"Cache({len(self._entries)} modules)"


class _CachePath:
    """``cache.model.layers[3]`` -> the entry of ``model.layers.3``."""

    __slots__ = ("_cache", "_path")

    def __init__(self, cache: Cache, path: str) -> None:
        self._cache = cache
        self._path = path

    def __getattr__(self, name: str):
        if name in ("output", "inputs", "input"):
            entry = self._cache[self._path]
            if isinstance(entry, list):
                return [getattr(e, name) for e in entry]
            return getattr(entry, name)
        return _CachePath(self._cache, f"{self._path}.{name}")

    def __getitem__(self, index: int):
        return _CachePath(self._cache, f"{self._path}.{index}")
