"""``tracer.cache()``: every module's output (and input) as the run produced it.

Hooks go only on the chosen modules and run after the experiment's own hooks,
so the cache holds values after interventions.  Its keys are module paths as a
block spells them (``model.model.layers[3]``, rooted at the block's variable:
runtime/paths.py); a lookup takes any spelling (``model.model.layers.3``, with or
without the root, dots or brackets).  Attribute navigation works too
(``cache.model.layers[3].output``) and checks each name and index at once.
Inside, entries are keyed by torch's dotted names under ``model`` (``model.model.layers.3``:
what ``exported`` gives and ``rebuilt`` takes).

What an entry holds:

- ``.output`` / ``.inputs`` / ``.input``: the module's *first* call in the pass
  (as ``module.output`` in a block is its first call); ``.calls`` is every call
  in order (each with the same three), ``.outputs`` every call's output.
  Under ``generate`` a key holds one entry per step (each with its calls).
- Values keep their types (tuples, namedtuples, ``ModelOutput`` dataclasses);
  ``detach`` / ``device`` / ``dtype`` apply to the tensors inside.  Objects
  that are neither (a transformers KV ``Cache``) are kept as they are.
- Called inside an invoke, the cache records that invoke's rows of every module
  (tensors whose first dimension is the batch; others whole).
- A module still running when ``tracer.cache()`` is called (the root, a decoder
  around the layer being served) is recorded when it returns: the trace puts a
  no-op hook on every module before the run when the plan calls ``cache()``
  after a checkpoint, which makes torch look for hooks again when each call
  ends (see ``late_cache_hooks``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import torch
from torch.utils.hooks import RemovableHandle

from .paths import ROOT, names, rooted, shown, unescaped

_VALUES = ("output", "inputs", "input", "outputs", "calls")


class Entry:
    """One module in the cache: ``output``, ``inputs`` (``(args, kwargs)``) and ``input``
    of its first call; ``calls`` (every call) and ``outputs`` (every call's output)."""

    __slots__ = ("_more", "inputs", "output", "step")

    def __init__(self, output, inputs, step: int = 0) -> None:
        self.output = output
        self.inputs = inputs
        self.step = step  # the generation step (0 in a trace)
        self._more: list[Entry] = []

    @property
    def input(self):
        if self.inputs is None:
            raise AttributeError("inputs were not recorded: use tracer.cache(include_inputs=True)")
        args, kwargs = self.inputs
        if args:
            return args[0]
        return next(iter(kwargs.values()), None)

    @property
    def calls(self) -> list[Entry]:
        return [self, *self._more]

    @property
    def outputs(self) -> list:
        return [self.output] + [e.output for e in self._more]

    def __repr__(self) -> str:
        shape = getattr(self.output, "shape", None)
        what = "shape " + str(tuple(shape)) if shape is not None else type(self.output).__name__
        more = f", {1 + len(self._more)} calls" if self._more else ""
        return f"Entry(output={what}{more})"


def _convert(value, conv):
    """``value`` with ``conv`` applied to each tensor inside, its containers' types kept."""
    if isinstance(value, torch.Tensor):
        return conv(value)
    if isinstance(value, tuple):
        items = [_convert(v, conv) for v in value]
        cls = type(value)
        if cls is tuple:
            return tuple(items)
        if hasattr(value, "_fields"):  # a namedtuple
            return cls(*items)
        try:  # torch.return_types and other tuple subclasses built from one iterable
            return cls(items)
        except (TypeError, ValueError):
            return tuple(items)
    if isinstance(value, list):
        items = [_convert(v, conv) for v in value]
        return items if type(value) is list else _rebuild(value, items)
    if isinstance(value, dict):
        items = {k: _convert(v, conv) for k, v in value.items()}
        if type(value) is dict:
            return items
        try:  # transformers' ModelOutput dataclasses, OrderedDict, ...
            return type(value)(**items)
        except (TypeError, ValueError):
            return items
    return value


def _rebuild(value, items):
    try:
        return type(value)(items)
    except (TypeError, ValueError):
        return items


def _converter(rows, batch, device, dtype, detach: bool):
    """What is done to each tensor the cache records: an invoke's rows (of tensors
    whose first dimension is the batch), detach, device and dtype."""

    def conv(t: torch.Tensor) -> torch.Tensor:
        if rows is not None and t.dim() > 0 and t.shape[0] == batch:
            t = t[rows]
        if detach:
            t = t.detach()
        if device is not None or dtype is not None:
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return t

    return conv


def open_cache(tracer, modules, include_inputs, device, dtype, detach) -> Cache:
    """``tracer.cache(...)``: hook the chosen modules now; the trace removes the hooks."""
    inter = tracer._inter
    line = None
    if inter is not None and inter.current is not None:
        import warnings

        cp = tracer._sites.get(inter.current_site)
        line = cp.line if cp is not None else 0
        warnings.warn_explicit(
            "tracer.cache() is called after the forward pass has started (the code got "
            f"there from line {line}): modules that ran before it are not in the cache; "
            "call tracer.cache() before reading any module value",
            RuntimeWarning, tracer._filename, line,
        )
    rows, batch = _invoke_rows(tracer, inter)
    cache = Cache(tracer._root, modules, include_inputs, device, dtype, detach,
                  per_step=tracer._kind == "generate", rows=rows, batch=batch, inter=inter,
                  late_line=line, root_name=getattr(tracer._block, "model", ROOT))
    if tracer._caches is None:
        tracer._caches = []
    tracer._caches.append(cache)  # listed first: the trace removes its hooks whatever happens
    cache._attach_hooks()
    return cache


def _invoke_rows(tracer, inter):
    """The rows of the invoke whose code is calling ``tracer.cache()`` (None: all),
    and the batch size."""
    all_rows = getattr(tracer, "_rows", None)
    if not all_rows or inter is None:
        return None, None
    batch = max((r.stop for r in all_rows if r is not None), default=None)
    for lane in inter.lanes:
        # A lane that has checkpoints is a generator, running now if it is the caller.
        if getattr(lane.gen, "gi_running", False):
            return lane.rows, batch
    # A lane without checkpoints runs whole while it is being started, before the
    # interleaver lists it: it is the next one.
    i = len(inter.lanes)
    return (all_rows[i] if i < len(all_rows) else None), batch


def late_cache_hooks(tracer) -> None:
    """Before the run: when a lane calls ``tracer.cache()`` after anything else (a
    checkpoint, a step block), modules may be running when it is called.  torch
    reads a module's forward hooks after its forward only if the module had a hook
    when the call began; a no-op hook on every module makes sure it had, so the
    cache's hooks, added mid-call, still see those modules return.  The hooks go
    with the trace's caches (listed there before the first is added, so that an
    interrupt in between leaves none behind)."""
    for lane in tracer._block.lanes:
        for i, item in enumerate(lane.items):
            if i and getattr(item, "kind", None) == "cache":
                holder = _Placeholders()
                if tracer._caches is None:
                    tracer._caches = []
                tracer._caches.append(holder)
                holder.attach(tracer._root._module)
                return


def _nothing(module, args, output):
    return None


class _Placeholders:
    """No-op forward hooks on every module, put straight in each module's hook dict
    (what ``register_forward_hook`` does, without a handle per module)."""

    def __init__(self) -> None:
        self._on: list[tuple[torch.nn.Module, int]] = []

    def attach(self, module) -> None:
        for mod in module.modules():
            hid = RemovableHandle.next_id
            RemovableHandle.next_id = hid + 1
            self._on.append((mod, hid))  # listed first: removal tolerates a missing one
            mod._forward_hooks[hid] = _nothing

    def _detach_hooks(self) -> None:
        on = self._on
        while on:
            mod, hid = on[-1]
            mod._forward_hooks.pop(hid, None)
            on.pop()


def _module_tree(module) -> dict[str, list[str]]:
    """Every module path (with the leading ``model.``) -> its children's names."""
    tree = {}
    for name, mod in module.named_modules():
        tree[f"model.{name}" if name else "model"] = [n for n, _ in mod.named_children()]
    return tree


class Cache(Mapping):
    # Defaults on the class: a cache rebuilt from its parts (``Cache.rebuilt``, the
    # remote client) sets only what it has.
    _tree_made: dict[str, list[str]] | None = None
    _chosen: frozenset | None = None  # the paths given as modules=...; None: all
    _late_line = None
    _inter = None
    _root = None
    _root_name = ROOT  # the wrapper's variable in the block: the keys' first name

    def __init__(self, root, modules, include_inputs, device, dtype, detach, per_step,
                 rows=None, batch=None, inter=None, late_line=None, root_name=ROOT) -> None:
        self._root = root
        self._root_name = rooted(ROOT, root_name)  # a variable (`lm`, `self.lm`), else `model`
        self._include_inputs = include_inputs
        self._conv = _converter(rows, batch, device, dtype, detach)
        self._per_step = per_step
        self._inter = inter  # for the generation step; dropped with the hooks
        self._late_line = late_line
        self._entries: dict[str, list[Entry]] = {}
        self._handles: list = []
        # What attribute navigation checks against, kept without a reference to the model.
        self._tree_made = _module_tree(root._module)
        self._targets = self._choose(modules)
        if modules is not None:
            self._chosen = frozenset(path for path, _ in self._targets)

    @classmethod
    def rebuilt(cls, root, per_step: bool, include_inputs: bool, entries: dict) -> Cache:
        """A cache made from recorded values (a remote run's): ``entries`` maps each
        path to a list (one item per generation step; one item in a trace) of
        ``(step, [(output, inputs), ...every call])``; ``root``: the model the paths
        are checked against (None: only the recorded paths)."""
        cache = cls.__new__(cls)
        cache._root = None
        cache._include_inputs = include_inputs
        cache._per_step = per_step
        cache._handles = []
        cache._targets = []
        cache._entries = {}
        for path, items in entries.items():
            got = []
            for step, calls in items:
                first = Entry(calls[0][0], calls[0][1], step)
                first._more = [Entry(out, inputs, step) for out, inputs in calls[1:]]
                got.append(first)
            cache._entries[path] = got
        module = getattr(root, "_module", root)
        if isinstance(module, torch.nn.Module):
            cache._tree_made = _module_tree(module)
        return cache

    def exported(self) -> dict:
        """The recorded values in the form ``Cache.rebuilt`` takes."""
        return {path: [(e.step, [(c.output, c.inputs) for c in e.calls]) for e in entries]
                for path, entries in self._entries.items()}

    @property
    def _tree(self) -> dict[str, list[str]]:
        tree = self._tree_made
        if tree is None:
            module = getattr(self._root, "_module", None)
            if isinstance(module, torch.nn.Module):
                tree = _module_tree(module)
            else:  # only what was recorded, and the paths above it
                tree = {"model": []}
                for path in self._entries:
                    parts = path.split(".")
                    for i in range(1, len(parts)):
                        parent, child = ".".join(parts[:i]), parts[i]
                        kids = tree.setdefault(parent, [])
                        if child not in kids:
                            kids.append(child)
                    tree.setdefault(path, [])
            self._tree_made = tree
        return tree

    def _choose(self, modules) -> list[tuple[str, torch.nn.Module]]:
        from .envoy import Envoy

        if modules is None:
            return [
                ("model" if not name else f"model.{name}", mod)
                for name, mod in self._root._module.named_modules()
            ]
        chosen = []
        named = None
        for item in modules:
            if isinstance(item, Envoy):
                if named is None:
                    named = {id(m): n for n, m in self._root._module.named_modules()}
                name = named.get(id(item._module))
                if name is None:
                    raise KeyError(f"tracer.cache(modules=...): `{item._path}` is not a module "
                                   "of the traced model")
                chosen.append((f"model.{name}" if name else "model", item._module))
            elif isinstance(item, str):
                # Any spelling, with or without the root (`model.`); the wrapped module may
                # itself have a child called `model` (model.layers.2 of a Llama).
                for key in self._internal_keys(item):
                    sub = key[len("model."):] if key != "model" else ""
                    try:
                        mod = self._root._module.get_submodule(sub)
                    except AttributeError:
                        continue
                    chosen.append((key, mod))
                    break
                else:
                    raise KeyError(f"tracer.cache(modules=...): no module {item!r}")
            else:
                raise TypeError(
                    "tracer.cache(modules=...) takes envoys (model.layers[0]) or paths "
                    f"('model.layers[0]'), got {type(item).__name__}"
                )
        return chosen

    def _attach_hooks(self) -> None:
        # Straight in the module's hook dicts (what register_forward_hook does), each
        # listed before it is added, so that removal never misses one.
        handles = self._handles
        for path, mod in self._targets:
            hid = RemovableHandle.next_id
            RemovableHandle.next_id = hid + 1
            handles.append((mod, hid))
            mod._forward_hooks_with_kwargs[hid] = True
            mod._forward_hooks[hid] = self._recorder(path)

    def _detach_hooks(self) -> None:
        handles = self._handles
        while handles:
            mod, hid = handles[-1]
            mod._forward_hooks.pop(hid, None)
            mod._forward_hooks_with_kwargs.pop(hid, None)
            handles.pop()
        self._targets = []
        self._root = None  # the cache outlives the trace; the model need not
        self._inter = None

    def _recorder(self, path: str):
        conv = self._conv
        entries = self._entries
        include_inputs = self._include_inputs
        per_step = self._per_step

        def record(mod, args, kwargs, output):
            inputs = _convert((args, kwargs), conv) if include_inputs else None
            inter = self._inter
            step = inter.step if per_step and inter is not None else 0
            entry = Entry(_convert(output, conv), inputs, max(step, 0))
            got = entries.get(path)
            if got is None:
                entries[path] = [entry]
            elif per_step and got[-1].step != entry.step:
                got.append(entry)  # the first call of a new step
            else:
                got[-1]._more.append(entry)  # called again in the same pass (or step)

        return record

    # -- reading ---------------------------------------------------------------------
    def _internal_keys(self, key: str) -> list[str]:
        """The entry keys ``key`` may mean, most likely first: any spelling (dots or
        brackets, ``.output_`` for a child named `output`), rooted at the block's
        variable, at ``model``, or not at all.  With a LanguageModel the wrapped module
        is itself often called `model` (model.model.layers.0), so the key is tried as
        written first, then under the root."""
        parts = names(key)
        if parts is None:
            return [key]
        out: list[str] = []

        def add(candidate: list[str]) -> None:
            for c in (candidate, unescaped(candidate)):
                joined = ".".join(c)
                if joined not in out:
                    out.append(joined)

        root = self._root_name.split(".")
        if root != [ROOT] and parts[:len(root)] == root:
            add([ROOT, *parts[len(root):]])
        if parts[0] == ROOT:
            add(parts)
        add([ROOT, *parts])
        return out

    def _lookup(self, key: str):
        entries = self._entries
        for k in self._internal_keys(key):
            got = entries.get(k)
            if got is not None:
                return got
        return None

    def _shown(self, key: str) -> str:
        """An entry key (``model.model.layers.0``) as a block spells it."""
        return rooted(shown(key[len(ROOT) + 1:] if key != ROOT else ""), self._root_name)

    def __getitem__(self, key: str):
        entries = self._lookup(key) if isinstance(key, str) else None
        if entries is None:
            raise KeyError(self._why_missing(key))
        return entries if self._per_step else entries[0]

    def _why_missing(self, key) -> str:
        if not isinstance(key, str):
            return f"cache keys are module paths ('model.layers[0]'), got {type(key).__name__}"
        paths = [p for p in self._internal_keys(key) if p in self._tree]
        if not paths:
            return f"{key!r}: the model has no such module"
        path = paths[0]
        if self._tree[path] and all(n.isdigit() for n in self._tree[path]):
            return f"{key!r} is a list of modules (never called itself): index it"
        if self._chosen is not None and path not in self._chosen:
            return f"{key!r} was not recorded: it is not among the modules given to tracer.cache(modules=...)"
        if self._late_line is not None:
            return (
                f"{key!r} was not recorded: it did not return after tracer.cache() was called "
                f"(after line {self._late_line}, once the forward pass had started)"
            )
        return f"{key!r} was not recorded: it did not run in this forward pass"

    def __iter__(self):
        return iter([self._shown(k) for k in self._entries])

    def __len__(self) -> int:
        return len(self._entries)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        # `cache.model` is the root; with a LanguageModel it may also mean the
        # wrapped module's child `model` (cache.model.layers[0]).
        if name == "model":
            paths = ["model"] + (["model.model"] if "model.model" in self._tree else [])
        elif name == self._root_name:  # the block's variable (`cache.lm.lm_head`), as keys say
            paths = ["model"] + ([f"model.{name}"] if f"model.{name}" in self._tree else [])
        elif f"model.{name}" in self._tree:
            paths = [f"model.{name}"]
        else:
            raise AttributeError(_no_child("cache.model", self._tree["model"], name))
        return _CachePath(self, paths, f"cache.{name}")

    def __repr__(self) -> str:
        keys = [self._shown(k) for k in self._entries]
        listed = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        return f"Cache({len(keys)} modules{': ' + listed if keys else ''})"


def _no_child(shown: str, children: list[str], name: str) -> str:
    if not children:
        return f"`{shown}` has no child modules (asked for `{name}`)"
    close = difflib.get_close_matches(name, children, n=1)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return f"`{shown}` has no child module `{name}`{hint}; its children: {', '.join(children)}"


class _CachePath:
    """``cache.model.layers[3]`` -> the entry of ``model.layers.3``; every name and
    index is checked against the model's modules as it is written."""

    __slots__ = ("_cache", "_paths", "_shown")

    def __init__(self, cache: Cache, paths: list[str], shown: str) -> None:
        self._cache = cache
        self._paths = paths  # the module paths this may mean (see Cache.__getattr__)
        self._shown = shown  # as the user wrote it, for messages

    def _value(self, name: str):
        cache = self._cache
        path = next((p for p in self._paths if cache._lookup(p) is not None), self._paths[0])
        entry = cache[path]
        if isinstance(entry, list):  # generate: one entry per step
            return [getattr(e, name) for e in entry]
        return getattr(entry, name)

    def __getattr__(self, name: str):
        if name in _VALUES:
            return self._value(name)
        if name.startswith("_"):
            raise AttributeError(name)
        tree = self._cache._tree
        paths = [f"{p}.{name}" for p in self._paths if f"{p}.{name}" in tree]
        if not paths:
            raise AttributeError(_no_child(self._shown, tree[self._paths[0]], name))
        return _CachePath(self._cache, paths, f"{self._shown}.{name}")

    def __getitem__(self, index):
        if isinstance(index, str):
            return self.__getattr__(index)
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"`{self._shown}[...]` takes a module index (int), got {type(index).__name__}")
        tree = self._cache._tree
        paths = []
        sizes = []
        for p in self._paths:
            children = tree[p]
            if not children or not all(n.isdigit() for n in children):
                continue
            n = len(children)
            sizes.append(n)
            i = index + n if index < 0 else index
            if 0 <= i < n and f"{p}.{i}" in tree:
                paths.append(f"{p}.{i}")
        if not paths:
            if sizes:
                raise IndexError(
                    f"`{self._shown}[{index}]`: index out of range, `{self._shown}` has "
                    f"{sizes[0]} modules (0..{sizes[0] - 1})"
                )
            raise TypeError(
                f"`{self._shown}` is not a list of modules; its children: "
                f"{', '.join(tree[self._paths[0]]) or 'none'}"
            )
        return _CachePath(self._cache, paths, f"{self._shown}[{index}]")

    def __repr__(self) -> str:
        return f"<cache path {self._shown}>"
