"""``module.source``: the values inside a module's own ``forward``, as checkpoints.

``envoy.source`` reads the ``forward`` of the module's class (``inspect``) and names
every call in it after the called name's last part, numbered per name from 0 in
source order (``self.q_proj(x)`` -> ``q_proj_0``, ``torch.relu(h)`` -> ``relu_0``).
Printed, it shows the source with those names in a margin.  In a block,
``envoy.source.q_proj_0.output`` (``.input``, ``.inputs``) is a checkpoint like a
module's: a call site is a small ``CallSite`` object that the interleaver attaches as
it attaches a module (a wrapped ``forward`` for its output, a pre-hook for its input).

The ``forward`` is rewritten once per class (cached): libcst finds and names the
calls, and each named call ``f(args)`` becomes ``__intervene_site__(self, k, f)(args)``.
That helper returns ``f`` itself unless a trace has installed the rewritten forward on
this very module; then the call goes through call site ``k``, which hands its input
and output to the interleaver when a lane waits for them (decided as the call runs,
after its arguments, so a request made while they run is still served).  The rewritten function is compiled with the original's
file and line numbers (tracebacks show the real file and line), globals and closure
cells, and put back inside the original's decorators (``deprecate_kwarg``, the
gradient-checkpointing wrapper).  A trace installs it on the module instance only,
for the trace (an instance attribute, as the wrapped ``forward``), and cleanup takes
it away again: other instances of the class, and every later plain call, run the
original.  Nothing of this runs for a trace that names no ``.source``.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import textwrap
import threading
import types
import weakref
from dataclasses import dataclass

import torch

from .envoy import Envoy
from .errors import NotInTraceError
from .paths import rooted

__all__ = ["CallSite", "Source", "SourceError", "install_static", "site_order"]

# Set once any `.source` call site has been named: until then a trace skips this module.
USED = False

_HELPER = "__intervene_site__"
_VALUES = ("output", "input", "inputs")
# Calls that read the calling frame: they must stay plain calls of the forward's frame.
_UNNAMED = frozenset({"super", "locals", "globals", "vars", "dir", "eval", "exec",
                      "breakpoint"})


class SourceError(AttributeError):
    """``.source`` of a module whose ``forward`` has no Python source to rewrite (an
    ``AttributeError``, as for a missing attribute: ``hasattr(m, "source")`` is False)."""


@dataclass(frozen=True)
class SiteInfo:
    """One named call site of a ``forward``: what the margin and the order checks use."""

    name: str  # q_proj_0
    index: int  # k in the rewritten call (source order)
    line: int  # of the called name, in the real file
    end: tuple[int, int]  # (line, column) where the call ends: when it runs, relative to others
    conditional: bool  # inside if/try/match, a conditional expression, after a conditional return
    repeated: bool  # inside a loop, a comprehension, a lambda or a nested def


@dataclass(frozen=True)
class Rewritten:
    """A class's ``forward`` rewritten (shared by all its instances)."""

    original: object  # the class attribute it was made from
    forward: types.FunctionType  # the rewritten function, inside the original's decorators
    sites: tuple[SiteInfo, ...]
    by_name: dict
    qualname: str
    filename: str
    first_line: int
    lines: tuple[str, ...]


# -- rewriting a forward, once per class ---------------------------------------------

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def rewritten(cls: type, path: str) -> Rewritten:
    """The rewritten ``forward`` of ``cls`` (made on first use, cached while the
    class's ``forward`` stays the same).  ``path`` names the module in errors."""
    original = cls.__dict__.get("forward", None)
    original = getattr(cls, "forward", None) if original is None else original
    got = _CACHE.get(cls)
    if got is not None and got.original is original:
        return got
    with _LOCK:
        got = _CACHE.get(cls)
        if got is None or got.original is not original:
            got = _CACHE[cls] = _rewrite(cls, original, path)
        return got


def _unavailable(path: str, cls: type, why: str) -> SourceError:
    return SourceError(
        f"`{path}.source`: the forward of `{path}` ({cls.__name__}) {why}, so its calls "
        "cannot be named: `.source` needs a forward written in Python, with its source file "
        "at hand (read the inputs and outputs of its submodules instead)"
    )


def _rewrite(cls: type, original, path: str) -> Rewritten:
    if issubclass(cls, torch.jit.ScriptModule):
        raise _unavailable(path, cls, "is TorchScript (compiled)")
    chain = [original]
    while isinstance(getattr(chain[-1], "__wrapped__", None), types.FunctionType):
        chain.append(chain[-1].__wrapped__)
    raw = chain[-1]
    if not isinstance(raw, types.FunctionType):
        raise _unavailable(path, cls, f"is a {type(raw).__name__}, not a Python function")
    try:
        lines, first = inspect.getsourcelines(raw)
    except (OSError, TypeError) as exc:
        raise _unavailable(path, cls, f"has no source to read ({exc})") from None
    if raw.__code__.co_argcount < 1:
        raise _unavailable(path, cls, "takes no `self` argument")
    self_name = raw.__code__.co_varnames[0]
    text = "".join(lines)
    indent = len(lines[0]) - len(lines[0].lstrip())
    owner = raw.__qualname__.rsplit(".", 2)
    cls_name = owner[-2] if len(owner) >= 2 and owner[-2].isidentifier() else None
    frees = raw.__code__.co_freevars
    if indent < (2 if frees else 1):
        # A forward written at the top level of its file: indented into the wrappers
        # below (a multi-line string inside it gains the indentation too).
        text, indent = textwrap.indent(textwrap.dedent(text), "    "), 4
    try:
        sites, new_text, changed = _name_and_rewrite(f"class {cls_name or '_C'}:\n" + text,
                                                     self_name, first - 2)
    except Exception as exc:  # noqa: BLE001 - libcst cannot parse it: say so
        raise _unavailable(path, cls, f"could not be parsed ({type(exc).__name__}: {exc})") from None
    # Compiled inside a function taking the original's free variables (so they stay
    # free variables, given the original's cells) and inside a class of the same name
    # (so `self.__x` is mangled as in the original).
    header = f"def __intervene_factory__({', '.join((_HELPER, *frees))}):\n"
    body = " " + new_text if cls_name else new_text.split("\n", 1)[1]
    tree = ast.parse(header + body)
    ast.increment_lineno(tree, first - 3 if cls_name else first - 2)
    for node in ast.walk(tree):
        start = getattr(node, "lineno", None)
        if start is None:
            continue
        if start < 1:  # the wrappers' lines, for a forward on line 1 or 2 of its file
            node.lineno = node.end_lineno = 1
        elif start in changed or node.end_lineno in changed:
            # A line with a rewritten call: its columns are those of the rewritten text,
            # so the node is placed on the whole original line(s) (tracebacks then show
            # the line without carets under the wrong characters).
            i, j = start - first, node.end_lineno - first
            if 0 <= i <= j < len(lines):
                node.col_offset = len(lines[i].encode()) - len(lines[i].lstrip().encode())
                node.end_col_offset = len(lines[j].rstrip("\r\n").encode())
    code = compile(tree, raw.__code__.co_filename, "exec", dont_inherit=True)
    inner = _find_code(code, raw.__name__, cls_name)
    cells = dict(zip(frees, raw.__closure__ or ()))
    cells[_HELPER] = _HELPER_CELL
    fn = types.FunctionType(inner, raw.__globals__, raw.__name__, raw.__defaults__,
                            tuple(cells[n] for n in inner.co_freevars))
    fn.__kwdefaults__ = None if raw.__kwdefaults__ is None else dict(raw.__kwdefaults__)
    fn.__dict__.update(raw.__dict__)
    for attr in ("__qualname__", "__module__", "__doc__", "__annotations__"):
        setattr(fn, attr, getattr(raw, attr))
    # Back inside the decorators: each wrapper is copied with the cell that held the
    # function it wraps now holding the rewritten one.
    for wrapper, inner_fn in zip(reversed(chain[:-1]), reversed(chain[1:])):
        fn = _rewrap(wrapper, inner_fn, fn, path, cls)
    return Rewritten(original, fn, tuple(sites), {s.name: s for s in sites}, raw.__qualname__,
                     raw.__code__.co_filename, first, tuple(lines))


def _find_code(code: types.CodeType, name: str, cls_name: str | None) -> types.CodeType:
    def child(c, want):
        for const in c.co_consts:
            if isinstance(const, types.CodeType) and const.co_name == want:
                return const
        raise RuntimeError(f"no code object `{want}` in the rewritten forward")

    factory = child(code, "__intervene_factory__")
    return child(child(factory, cls_name) if cls_name else factory, name)


def _rewrap(wrapper, old, new, path: str, cls: type):
    closure = wrapper.__closure__ or ()
    found = False
    cells = []
    for cell in closure:
        try:
            held = cell.cell_contents
        except ValueError:  # an empty cell
            held = None
        if held is old:
            cells.append(types.CellType(new))
            found = True
        else:
            cells.append(cell)
    if not found:
        raise _unavailable(path, cls, f"is wrapped by `{wrapper.__qualname__}`, which does "
                                      "not hold the function it wraps in its closure")
    out = types.FunctionType(wrapper.__code__, wrapper.__globals__, wrapper.__name__,
                             wrapper.__defaults__, tuple(cells))
    out.__kwdefaults__ = wrapper.__kwdefaults__
    out.__dict__.update(wrapper.__dict__)
    out.__wrapped__ = new
    for attr in ("__qualname__", "__module__", "__doc__", "__annotations__"):
        setattr(out, attr, getattr(wrapper, attr))
    return out


def _name_and_rewrite(text: str, self_name: str, line_offset: int):
    """Name the calls of the one function in ``text`` (inside a one-line class
    header) and rewrite them; ``line_offset`` + a line of ``text`` = the real line."""
    import libcst as cst
    from libcst.metadata import MetadataWrapper

    wrapper = MetadataWrapper(cst.parse_module(text))
    found = _collector()()
    wrapper.visit(found)
    found.calls.sort(key=lambda c: c[1])
    counts: dict[str, int] = {}
    sites = []
    index_of = {}
    for k, (name, pos, end, cond, loop, node, _lines) in enumerate(found.calls):
        n = counts.get(name, 0)
        counts[name] = n + 1
        late = any(exit_pos < pos for exit_pos in found.exits)
        sites.append(SiteInfo(f"{name}_{n}", k, pos[0] + line_offset,
                              (end[0] + line_offset, end[1]), cond or late, loop))
        index_of[id(node)] = k
    changed = {line + line_offset for c in found.calls for line in c[6]}

    class Rewrite(cst.CSTTransformer):
        def leave_Call(self, original, updated):
            k = index_of.get(id(original))
            if k is None:
                return updated
            helper = cst.Call(func=cst.Name(_HELPER), args=[
                cst.Arg(cst.Name(self_name)), cst.Arg(cst.Integer(str(k))), cst.Arg(updated.func)])
            return updated.with_changes(func=helper)

    return sites, wrapper.module.visit(Rewrite()).code, changed


@functools.cache
def _collector():
    """The visitor class (made on first use: libcst is imported only where `.source` is)."""
    import libcst as cst
    from libcst.metadata import PositionProvider

    cond_nodes = (cst.If, cst.Try, cst.TryStar, cst.Match, cst.IfExp, cst.BooleanOperation,
                  cst.Assert)
    loop_nodes = (cst.For, cst.While, cst.ListComp, cst.SetComp, cst.DictComp,
                  cst.GeneratorExp, cst.Lambda)

    class Collect(cst.CSTVisitor):
        """The calls of the outermost function (not its decorators, parameters or
        annotations): (name, name position, end position, conditional, repeated, node,
        the lines the called expression starts and ends on)."""

        METADATA_DEPENDENCIES = (PositionProvider,)

        def __init__(self) -> None:
            super().__init__()
            self.calls: list = []
            self.exits: list = []  # positions of returns/raises inside control flow
            self.depth = 0  # function definitions entered
            self.cond = 0
            self.loop = 0

        def on_visit(self, node) -> bool:
            if isinstance(node, cst.FunctionDef):
                self.depth += 1
                if self.depth > 1:
                    self.loop += 1
            elif isinstance(node, cond_nodes):
                self.cond += 1
            elif isinstance(node, loop_nodes):
                self.loop += 1
            elif isinstance(node, (cst.Decorator, cst.Annotation)) or (
                    isinstance(node, cst.Parameters) and self.depth == 1):
                return False  # not run with the body (the top function's own parameters)
            elif isinstance(node, (cst.Return, cst.Raise)) and self.depth == 1 and (
                    self.cond or self.loop):
                pos = self.get_metadata(PositionProvider, node).start
                self.exits.append((pos.line, pos.column))
            elif isinstance(node, cst.Call) and self.depth >= 1:
                func = node.func
                name_node = (func if isinstance(func, cst.Name) else
                             func.attr if isinstance(func, cst.Attribute) else None)
                if name_node is not None and not (isinstance(func, cst.Name) and
                                                  func.value in _UNNAMED):
                    pos = self.get_metadata(PositionProvider, name_node).start
                    end = self.get_metadata(PositionProvider, node).end
                    where = self.get_metadata(PositionProvider, func)  # text goes in there
                    self.calls.append((name_node.value, (pos.line, pos.column),
                                       (end.line, end.column), self.cond > 0, self.loop > 0,
                                       node, (where.start.line, where.end.line)))
            return True

        def on_leave(self, original) -> None:
            if isinstance(original, cst.FunctionDef):
                if self.depth > 1:
                    self.loop -= 1
                self.depth -= 1
            elif isinstance(original, cond_nodes):
                self.cond -= 1
            elif isinstance(original, loop_nodes):
                self.loop -= 1

    return Collect




# -- call sites at run time ------------------------------------------------------------

# id(module) -> (its CallSites by index, the trace's set of events that happened), while
# a trace has the rewritten forward installed.
_LIVE: dict[int, tuple] = {}


def _report(owner, index: int, fn):
    """``__intervene_site__(self, k, f)``: ``f`` itself unless a trace installed the
    rewritten forward on ``self``; then a call through site k, which hands its values to
    the interleaver where a lane waits for them."""
    live = _LIVE.get(id(owner))
    if live is None:
        return fn
    # Whether the trace waits is decided as the call runs, after its arguments (which
    # may run other call sites that a lane waits for, and then asks for this one).
    return functools.partial(live[0][index]._call, live[1], fn)


class _Given:
    """A call's output, made once: handed to the interleaver's wrapped ``forward``."""

    __slots__ = ("out",)

    def __init__(self, out) -> None:
        self.out = out

    def __call__(self):
        return self.out


_HELPER_CELL = types.CellType(_report)


class CallSite:
    """One call site of one module's ``forward``, attached by the interleaver like a
    module: ``forward`` (handing out the call's output: wrapped for the trace when it is
    waited for) and the pre-hook dicts (its input).  ``__dict__`` is empty unless the
    output is attached."""

    __slots__ = (
        "__dict__",
        "__weakref__",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "info",
        "out_key",
        "owner",
        "owner_source",
        "path",
        "pre_key",
    )

    def __init__(self, owner: torch.nn.Module, info: SiteInfo, path: str) -> None:
        self.owner = owner
        self.info = info
        self.path = path
        self.owner_source = None  # the Source that named it (set when named)
        self.pre_key, self.out_key = (id(self), "pre"), (id(self), "out")  # the interleaver's keys
        self._forward_pre_hooks: dict = {}
        self._forward_pre_hooks_with_kwargs: dict = {}

    def forward(self, fn, /, *args, **kwargs):
        return fn(*args, **kwargs)

    def _call(self, fired, fn, /, *args, **kwargs):
        """The call, through the interleaver where it waits.  ``fired``: the trace's
        set of events that happened (a request that comes after this point for this
        call is out of order, not a call that "did not run")."""
        hooks = self._forward_pre_hooks
        if hooks:
            for hook in tuple(hooks.values()):
                result = hook(self, args, kwargs)
                if result is not None:
                    args, kwargs = result
        fired.add(self.pre_key)
        out = fn(*args, **kwargs)
        if self.__dict__:  # its output is waited for (perhaps asked for during the call)
            return self.forward(_Given(out))
        fired.add(self.out_key)
        return out

    def __repr__(self) -> str:
        return f"<call site {self.path} (line {self.info.line})>"


class _Installed:
    """What cleanup undoes for one module whose rewritten forward a trace installed."""

    __slots__ = ("bound", "live", "module")

    def __init__(self, module, live, bound) -> None:
        self.module = module
        self.live = live
        self.bound = bound

    def remove(self) -> None:
        attrs = self.module.__dict__
        if attrs.get("forward") is self.bound:
            del attrs["forward"]
        if _LIVE.get(id(self.module)) is self.live:
            del _LIVE[id(self.module)]


def _install(inter, source: Source, strict: bool = True) -> None:
    """Put ``source``'s rewritten forward on its module for the trace ``inter`` runs
    (once per trace; cleanup takes it away).  Not ``strict``: a ``source`` whose class
    forward was replaced since is forgotten quietly (the block's code names the new
    forward's calls when it runs)."""
    module = source._owner
    key = (id(module), "source")
    attached = inter.attached
    if key in attached:
        return
    path = rooted(source._owner_path, getattr(getattr(inter, "block", None), "model", None))
    rw = rewritten(type(module), path)
    if rw is not source._rewritten:
        envoy = source._envoy()
        if envoy is not None and envoy.__dict__.get("source") is source:
            del envoy.__dict__["source"]  # the next `.source` names the new forward's calls
        if not strict:
            return
        raise SourceError(f"`{path}.source`: the forward of {type(module).__name__} was "
                          "replaced since its call sites were named: run the block again")
    if "forward" in module.__dict__:
        if (id(module), "out") in attached or (id(module), "pre") in attached:
            raise RuntimeError(
                f"`{path}.source` is named while `{path}` is watched already in this pass "
                "(its forward may have begun): name its call sites with a path written out "
                f"(`{path}` as in the model, no variable index), or before other values of "
                f"`{path}` in the block"
            )
        raise SourceError(f"`{path}.source`: `{path}` has its own `forward` set on the "
                          "instance, which `.source` cannot rewrite")
    bound = types.MethodType(rw.forward, module)
    live = (source._sites, inter.fired)
    undo = attached[key] = _Installed(module, live, bound)  # recorded first
    _LIVE[id(module)] = live
    module.__dict__["forward"] = undo.bound


def install_static(inter, facts) -> None:
    """Before the run (before anything is attached): install the rewritten forward of
    every module whose call sites the block names with a static path."""
    for module, _phase in facts.attach:
        if module.__class__ is CallSite:
            src = module.owner_source
            if src is not None:
                _install(inter, src, strict=False)


def _active(root):
    from . import interleave

    inter = getattr(getattr(interleave, "_ACTIVE", None), "inter", None)
    if inter is not None and inter.root is root and not inter.ended:
        return inter
    return None


# -- the envoys: `module.source` and `module.source.q_proj_0` ---------------------------


class _NoValue:
    """``Source._module``: `.source` itself is not something to ask values of."""


class Source(Envoy):
    """``module.source``: prints the module's forward with its call sites named;
    ``.<name>`` is a call site, whose ``.output`` / ``.input`` / ``.inputs`` are
    checkpoints in a block."""

    __slots__ = ("_envoy", "_owner", "_owner_path", "_rewritten", "_site_envoys", "_sites")

    def __init__(self, envoy: Envoy) -> None:
        module = envoy._module
        rw = rewritten(type(module), envoy._path)
        object.__setattr__(self, "_path", envoy._path + ".source")
        object.__setattr__(self, "_root_ref", weakref.ref(envoy._root))
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_owner", module)
        object.__setattr__(self, "_envoy", weakref.ref(envoy))  # it holds this one
        object.__setattr__(self, "_owner_path", envoy._path)
        object.__setattr__(self, "_rewritten", rw)
        object.__setattr__(self, "_sites", [
            CallSite(module, info, f"{envoy._path}.source.{info.name}") for info in rw.sites])
        object.__setattr__(self, "_site_envoys", {})

    @property
    def _module(self):
        raise AttributeError(
            f"`{self._path}` has no value of its own: ask for one of its call sites, "
            f"`{self._path}.<name>.output` (print `{self._path}` outside a block to see "
            "the names)"
        )

    def __getattr__(self, name: str):
        env = self._site_envoys.get(name)
        if env is None:
            info = self._rewritten.by_name.get(name) if not name.startswith("__") else None
            if info is None:
                raise AttributeError(self._no_site(name)) from None
            site = self._sites[info.index]
            env = _SiteEnvoy(site, site.path, self._root)
            self._site_envoys[name] = env
            self._register(site)
        inter = _active(self._root)
        if inter is not None:
            _install(inter, self)
        return env

    def _register(self, site: CallSite) -> None:
        """The site is a child of its module in the model's structure maps (so that
        order checks, static attaching and messages know it)."""
        global USED
        USED = True
        site.owner_source = self
        root = self._root
        parents = getattr(root, "_parents", None)
        if parents is not None:
            parents()[id(site)] = self._owner
            root._paths[id(site)] = site.path

    def _no_site(self, name: str) -> str:
        names = list(self._rewritten.by_name)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        if name in _VALUES:
            return (f"`{self._path}.{name}`: `.source` has no value of its own; ask for a call "
                    f"site's: `{self._path}.<name>.{name}`, the names being {', '.join(names)}")
        shown = ", ".join(names) if names else "none"
        return (f"`{self._path}` has no call site `{name}`.{hint} Its call sites: {shown} "
                f"(print `{self._path}` to see them in the source)")

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"`{self._path}.{name}` cannot be set: call sites are read-only "
                             f"names (write their values: `{self._path}.<name>.output = ...`)")

    def __dir__(self):
        return sorted(self._rewritten.by_name)

    def __len__(self) -> int:
        return len(self._sites)

    def __iter__(self):
        return iter(self._rewritten.by_name)

    def __call__(self, *args, **kwargs):
        raise TypeError(f"`{self._path}` is not callable")

    def __str__(self) -> str:
        return render(self._rewritten, self._path)

    def __repr__(self) -> str:
        return render(self._rewritten, self._path)

    @property
    def output(self):
        raise AttributeError(self._no_site("output"))

    @property
    def input(self):
        raise AttributeError(self._no_site("input"))

    @property
    def inputs(self):
        raise AttributeError(self._no_site("inputs"))


class _SiteEnvoy(Envoy):
    """``module.source.q_proj_0``: a call site, asked for like a module."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"`{self._path}` is a call site of a forward: it has `.output`, `.input` and "
            f"`.inputs` (in a block), not `.{name}`"
        )

    def __setattr__(self, name: str, value) -> None:
        if name in _VALUES:
            raise NotInTraceError(self._path, name)
        raise AttributeError(f"`{self._path}.{name}` cannot be set")

    def __call__(self, *args, **kwargs):
        raise TypeError(f"`{self._path}` is a call site, not a module: it cannot be called")

    @property
    def output(self):
        raise NotInTraceError(self._path, "output")

    @property
    def input(self):
        raise NotInTraceError(self._path, "input")

    @property
    def inputs(self):
        raise NotInTraceError(self._path, "inputs")

    def __repr__(self) -> str:
        site = self._module
        return f"CallSite({self._path}): line {site.info.line} of {site.owner.__class__.__name__}.forward"

    def __dir__(self):
        return list(_VALUES)


def source_of(envoy: Envoy) -> Source:
    """``envoy.source`` (cached on the envoy)."""
    src = Source(envoy)
    envoy.__dict__["source"] = src
    return src


# -- showing it -------------------------------------------------------------------------


def render(rw: Rewritten, path: str) -> str:
    """The forward's source with each line's call sites in a margin."""
    at: dict[int, list[str]] = {}
    for s in rw.sites:
        at.setdefault(s.line, []).append(s.name)
    margins = {line: ", ".join(names) for line, names in at.items()}
    width = min(max((len(m) for m in margins.values()), default=0), 48)
    body = textwrap.dedent("".join(rw.lines)).rstrip("\n").split("\n")
    digits = len(str(rw.first_line + len(body)))
    count = f"{len(rw.sites)} call site" + ("" if len(rw.sites) == 1 else "s")
    head = (f"{path}: {rw.qualname} ({rw.filename}:{rw.first_line}), {count}; in a block: "
            f"{path}.<name>.output / .input / .inputs")
    out = [head]
    for i, text in enumerate(body):
        line = rw.first_line + i
        margin = margins.get(line, "")
        arrow = " -> " if margin else "    "
        if len(margin) > width:
            out.append(f"  {margin} ->")
            margin, arrow = "", "    "
        out.append(f"  {margin:>{width}}{arrow}{line:>{digits}}  {text}".rstrip())
    return "\n".join(out)


# -- order facts (runtime/order.py asks) ---------------------------------------------------

GENERIC = object()  # "not a call-site question": order.py decides as for modules


def site_order(root, ma, pa: str, mb, pb: str):
    """Does event (ma, pa) surely come before (mb, pb), where one is a call site?
    True / False / None (not known), or GENERIC when the module rules apply (a site
    is a child of its module in the model's structure map)."""
    a_site, b_site = ma.__class__ is CallSite, mb.__class__ is CallSite
    if a_site and id(ma.owner) in root._repeated or b_site and id(mb.owner) in root._repeated:
        return None  # its module runs more than once in a pass
    if ma is mb:
        return None if ma.info.repeated else (pa == "pre" and pb == "out")
    if a_site and b_site and ma.owner is mb.owner:
        ia, ib = ma.info, mb.info
        if ia.conditional or ib.conditional or ia.repeated or ib.repeated:
            return None
        # A call runs when it ends: a call nested in another's arguments runs first.
        return ia.end < ib.end
    site, other = (ma, mb) if a_site else (mb, ma)
    parents = root._parents()
    node = parents.get(id(other))
    while node is not None:  # `other` inside the site's module: its calls are not named
        if node is site.owner:
            return None
        node = parents.get(id(node))
    return GENERIC
