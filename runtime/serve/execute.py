"""Running one shipped block on a served model, in the worker process.

The server trusts nothing it did not compile: ``prepare_job`` recompiles the
function's source with this process's compiler, runs the validator
(``compiler.validate.validate_block``) on the block, and then compiles only
that block, as the body of a fresh function whose parameters are the model
and the free variables sent (the block's lines keep their line numbers, so
errors name the user's line).  ``build_function`` runs it with a small set of builtins (its
``print`` goes to the job's output), ``torch`` and ``math``.  The saved
variables, ``tracer.result`` and the containers the block changed are
encoded as the reply.  ``ModelGuard`` checks afterwards that the job left
the served model as it found it.
"""

from __future__ import annotations

import builtins
import keyword
import math
import traceback
from typing import Any

from compiler.version import compiler_version

from ..paths import segment, shown
from ..remote import protocol
from ..remote.protocol import PROTOCOL_VERSION

MAX_SOURCE = 64 * 1024  # the block's function and its helpers, together
MAX_HELPERS = 64

_SAFE_BUILTINS = ["abs", "all", "any", "bool", "bytes", "callable", "chr", "complex", "dict", "divmod", "enumerate", "filter", "float", "frozenset", "hash", "hex", "int", "isinstance", "issubclass", "iter", "len", "list", "map", "max", "min", "next", "oct", "ord", "pow", "range", "repr", "reversed", "round", "set", "slice", "sorted", "str", "sum", "tuple", "zip", "True", "False", "None", "Ellipsis", "NotImplemented"]


class JobError(Exception):
    """A job refused or failed, with the type name, message and line to report."""

    def __init__(self, type_name: str, message: str, line: int | None = None,
                 filename: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.info = {"type": type_name, "message": message, "line": line,
                     "filename": filename, **extra}


def _builtins(print_fn) -> dict:
    out = {name: getattr(builtins, name) for name in _SAFE_BUILTINS}
    for name, obj in vars(builtins).items():
        if isinstance(obj, type) and issubclass(obj, Exception):  # not SystemExit & co.
            out[name] = obj
    out["print"] = print_fn
    return out


def validate(source: str, index: int, free_names, module, first_line: int,
             helpers: dict | None = None) -> None:
    """The server's allowlist check (``compiler.validate``), against the names sent
    and the served model's module names; ``helpers``: ``{name: HelperSource}``."""
    from compiler.validate import module_names_of, validate_block

    validate_block(source, index, free_names=free_names, module_names=module_names_of(module),
                   first_line=first_line, helpers=helpers)


def check_compiler(client: Any) -> None:
    """The job's compiler version must be this server's: the block's index, its free
    names and its helper calls are the client's compiler's reading of the source, and
    the server recompiles it with its own (a different version may read it otherwise)."""
    ours = compiler_version()
    if client == ours:
        return
    theirs = "an unknown version" if not isinstance(client, str) or not client else (
        f"version {client[:40]}")
    raise JobError(
        "VersionError",
        f"the client's intervene compiler is {theirs} and this server's is version {ours}: "
        "the server recompiles every block with its own compiler, so both must be the same "
        f"version; install intervene {ours} on the client (`pip install intervene=={ours}`), "
        "or ask the server's operator to run the client's version",
    )


def check_header(header: dict, models: dict | None = None) -> None:
    """What the app checks before queueing a job (cheap, no compiling)."""
    if header.get("protocol") != PROTOCOL_VERSION:
        raise JobError(
            "ProtocolError",
            f"the client speaks protocol {header.get('protocol')!r} and this server "
            f"{PROTOCOL_VERSION}: use the same intervene version on both sides",
        )
    check_compiler(header.get("compiler"))
    source = header.get("source")
    if not isinstance(source, str) or not source.strip():
        raise JobError("ProtocolError", "the job has no source text")
    size = len(source.encode("utf-8", "surrogatepass"))
    helpers = header.get("helpers", {})
    if not isinstance(helpers, dict) or len(helpers) > MAX_HELPERS:
        raise JobError("ProtocolError", f"the job's helpers are not a list of at most "
                       f"{MAX_HELPERS} functions")
    for name, h in helpers.items():
        if not (isinstance(h, dict) and isinstance(h.get("source"), str)
                and isinstance(h.get("filename"), str) and isinstance(h.get("first_line"), int)
                and h["first_line"] >= 1 and isinstance(h.get("values", {}), dict)):
            raise JobError("ProtocolError", f"the helper {str(name)[:60]!r} has no source, "
                           "file, first line or values")
        size += len(h["source"].encode("utf-8", "surrogatepass"))
    if size > MAX_SOURCE:
        raise JobError("ValueError", f"the source is over {MAX_SOURCE // 1024} KiB; send a "
                       "smaller function (only the function with the block, and the "
                       "helpers it calls, are sent)")
    if not isinstance(header.get("block"), int) or header["block"] < 0:
        raise JobError("ProtocolError", "the job has no block index")
    for key in ("filename", "function", "model"):
        if not isinstance(header.get(key), str):
            raise JobError("ProtocolError", f"the job has no {key}")
    # (0: the wrapper of a block or session without a decorator on a file's first line)
    if not isinstance(header.get("first_line"), int) or header["first_line"] < 0:
        raise JobError("ProtocolError", "the job has no first line")
    if models is not None and header["model"] not in models:
        raise JobError("ValueError", f"this server does not serve model {header['model']!r}; "
                       f"it serves: {', '.join(sorted(models)) or 'none'}")


def _block_function(source, block, pad: str = "    ") -> tuple[str, int]:
    """The block alone, as the body of ``remote_block(model, <free>...)``: its text and
    the first line (in the user's file) of that text; ``pad``: its indentation."""
    return _lines_as_body(source, block.line, block.end_line, pad), block.line - 1


def _lines_as_body(source, line: int, end_line: int, pad: str) -> str:
    """Lines ``line`` to ``end_line`` (of the user's file) of ``source``, dedented and
    indented by ``pad``; blank lines stay, so the text keeps its line numbers."""
    lines = source.text.splitlines(keepends=True)
    first = line - source.first_line  # 0-based in the text
    last = end_line - source.first_line
    body = lines[first : last + 1]
    head = body[0]
    indent = head[: len(head) - len(head.lstrip())]
    out = []
    for ln in body:
        if ln.startswith(indent):
            ln = ln[len(indent):]
        elif ln.strip():
            ln = ln.lstrip()
        out.append(pad + ln if ln.strip() else ln)
    if not out[-1].endswith("\n"):
        out[-1] += "\n"
    return "".join(out)


# Blocks this worker compiled (and validated) already: a repeated job skips both.
_COMPILED: dict = {}


def _helper_sources(header: dict, helper_values: dict) -> dict:
    """The helpers a job shipped, as the validator takes them."""
    from compiler.validate import HelperSource

    return {name: HelperSource(h["source"], h["first_line"], h["filename"],
                               frozenset(helper_values[name][0]))
            for name, h in (header.get("helpers") or {}).items()}


def _compile_helpers(specs: dict) -> dict:
    """Each shipped helper compiled (a call of one of them in a lane runs it in the lane)."""
    from compiler.codegen import compile_source
    from compiler.parse import Source

    names = frozenset(specs)
    return {name: compile_source(Source(h.source, h.filename, h.first_line, 0), (), names)
            for name, h in specs.items()}


def _check_values(values: dict, model: str, filename: str) -> None:
    """The names of the values sent become parameter names of the compiled function,
    beside the served model's."""
    for name in values:
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__"):
            raise JobError("ValueError", f"{name!r} is not a variable name", 1, filename)
    if model in values:
        raise JobError("ValueError", f"`{model}` is the served model; it cannot be sent")


def _compile_block(header: dict, values: dict, root, helper_values: dict,
                   wanted: tuple[str, ...] = ()):
    """Validate the job's block and its helpers, then compile the block alone and each
    helper: ``(Compiled, plan Block, {helper: Compiled})``."""
    from compiler.codegen import compile_source
    from compiler.parse import Source

    filename = header["filename"]
    index = header["block"]
    src = Source(header["source"], filename, header["first_line"], 0)
    specs = _helper_sources(header, helper_values)
    # The allowlist first: nothing else (not even our compiler) sees a refused source.
    validate(header["source"], index, frozenset(values), root._module, src.first_line, specs)
    helpers = _compile_helpers(specs)
    plan = compile_source(src).plan
    if index >= len(plan.blocks):
        raise JobError("ValueError", f"the function has no block {index}")
    block = plan.blocks[index]
    _check_values(values, block.model, filename)
    body, first = _block_function(src, block)
    names = [block.model, *sorted(values)]
    text = f"def remote_block({', '.join(names)}):\n{body}    return __iv_locals()\n"
    compiled = compile_source(Source(text, filename, first, 0), (), frozenset(specs))
    flows = [n for n in wanted if n not in compiled.plan.blocks[0].saved and n not in values
             and n != block.model]
    if flows and block.line >= 3:
        # In a session a later trace reads this block's variables without `.save()`; the
        # block alone would keep them local to its lanes.  The same session, with a later
        # trace reading them (never run), keeps them, as the client's compiler did.
        body, first = _block_function(src, block, " " * 8)
        reads = ", ".join(flows)
        text = (f"def remote_block({', '.join(names)}):\n"
                f"    with {block.model}.session():\n{body}"
                f"        if False:\n            with {block.model}.trace(None):\n"
                f"                ({reads},)\n    return __iv_locals()\n")
        compiled = compile_source(Source(text, filename, first - 1, 0), (), frozenset(specs))
    return compiled, block, helpers


class SessionBlock:
    """What a session job's ``Prepared.block`` says (a trace job's is its plan Block)."""

    kind = "session"

    def __init__(self, index: int, model: str, line: int) -> None:
        self.index = index
        self.model = model
        self.line = line


def _compile_session(header: dict, values: dict, root, helper_values: dict,
                     wanted: tuple[str, ...] = ()):
    """A remote session (``model.session(remote=True)``, runtime/session.py): validate
    it (``validate_session``: its body and its traces) and its helpers, then compile
    its body alone as ``def remote_block(model, <values>): with model.session(): ...``
    (its lines keep their numbers; its traces run here, ``remote=`` popped by the
    handle).  Nothing else of the function runs, not even the session's own call."""
    from compiler.codegen import compile_source
    from compiler.parse import Source
    from compiler.validate import module_names_of, validate_session

    filename = header["filename"]
    index = header["block"]
    src = Source(header["source"], filename, header["first_line"], 0)
    specs = _helper_sources(header, helper_values)
    model, body_line, end = validate_session(
        header["source"], index, free_names=frozenset(values),
        module_names=module_names_of(root._module), first_line=src.first_line, helpers=specs)
    helpers = _compile_helpers(specs)
    _check_values(values, model, filename)
    if body_line < 2:  # the `def` and the `with` go on the two lines above the body
        raise JobError("ValueError", "a remote session's body starts on line 2 of its file "
                       "or later", body_line, filename)
    block = SessionBlock(index, model, body_line - 1)
    body = _lines_as_body(src, body_line, end, " " * 8)
    text = (f"def remote_block({', '.join([model, *sorted(values)])}):\n"
            f"    with {model}.session():\n{body}    return __iv_locals()\n")
    compiled = compile_source(Source(text, filename, body_line - 2, 0), (), frozenset(specs))
    return compiled, block, helpers


class Prepared:
    """A job ready to run: its compiled block, the values sent and its helpers
    (``{name: (Compiled, values, defaults, kwdefaults)}``)."""

    __slots__ = ("block", "compiled", "filename", "helpers", "values", "wanted")

    def __init__(self, compiled, block, values: dict, filename: str,
                 helpers: dict | None = None, wanted: tuple = ()) -> None:
        self.compiled = compiled
        self.block = block
        self.values = values
        self.filename = filename
        self.helpers = helpers or {}
        self.wanted = wanted  # the variables the client binds after the block


def _wanted(header: dict) -> tuple[str, ...]:
    names = header.get("saved", [])
    if not (isinstance(names, list) and len(names) <= 4096 and all(
            isinstance(n, str) and n.isidentifier() and not n.startswith("__") for n in names)):
        raise protocol.ProtocolError("the job's saved names are not a list of variable names")
    return tuple(names)


def _helper_values(header: dict, tensors: dict) -> dict:
    """``{helper: (values, defaults, kwdefaults)}`` decoded from the job."""
    out = {}
    for name, h in (header.get("helpers") or {}).items():
        values = protocol.decode_values(h.get("values", {}), tensors)
        defaults = kwdefaults = None
        if h.get("defaults") is not None:
            defaults = protocol.decode(h["defaults"], tensors)
            if not isinstance(defaults, tuple):
                raise protocol.ProtocolError(f"the defaults of helper {name!r} are not a tuple")
        if h.get("kwdefaults") is not None:
            kwdefaults = protocol.decode(h["kwdefaults"], tensors)
            if not (isinstance(kwdefaults, dict) and all(isinstance(k, str) for k in kwdefaults)):
                raise protocol.ProtocolError(f"the keyword defaults of helper {name!r} are not "
                                             "a dict of names")
        out[name] = (values, defaults, kwdefaults)
    return out


def prepare_job(root, header: dict, tensors: dict) -> Prepared:
    """Decode the values, validate and compile the job's block (or a JobError)."""
    from compiler.errors import CompileError

    filename = header["filename"]
    try:
        values = protocol.decode_values(header.get("values", {}), tensors)
        helper_values = _helper_values(header, tensors)
        wanted = _wanted(header)
        key = (header["source"], header["block"], bool(header.get("session")),
               header["first_line"], filename,
               tuple(sorted(values)), wanted,
               tuple(sorted((n, h["source"], h["filename"], h["first_line"],
                             tuple(sorted(helper_values[n][0])))
                            for n, h in (header.get("helpers") or {}).items())))
        got = _COMPILED.get(key)
        if got is None:
            compile_job = _compile_session if header.get("session") else _compile_block
            got = compile_job(header, values, root, helper_values, wanted)
            _COMPILED[key] = got
            while len(_COMPILED) > 64:
                _COMPILED.pop(next(iter(_COMPILED)))
        compiled, block, helpers = got
    except CompileError as exc:
        raise JobError("CompileError", str(exc.msg), exc.lineno, exc.filename) from None
    except protocol.ProtocolError as exc:
        raise JobError("ProtocolError", str(exc)) from None
    except ImportError as exc:
        raise JobError("RuntimeError", f"the server cannot validate blocks: {exc}") from None
    except JobError:
        raise
    except Exception as exc:  # noqa: BLE001 - the validator's ValidationError (line, construct)
        raise JobError(type(exc).__name__, str(exc), getattr(exc, "line", None) or None,
                       getattr(exc, "filename", None) or filename,
                       construct=getattr(exc, "construct", None)) from None
    return Prepared(compiled, block, values, filename,
                    {n: (c, *helper_values[n]) for n, c in helpers.items()}, wanted)


def build_function(job: Prepared, print_fn, handle=None):
    """The job's block as a function ``(model, **values) -> its locals``; ``handle``:
    the runtime handle it calls (default: this process runs its ``remote=True``)."""
    glb = {"__builtins__": _builtins(print_fn), "torch": __import__("torch"), "math": math,
           "__iv_locals": locals, "__name__": "__remote__"}
    exec(compile("def remote_block(): pass", job.filename, "exec"), glb)  # noqa: S102 - a constant stub
    original = glb.pop("remote_block")
    if job.helpers:
        glb.update(_build_helpers(job, glb))
    if handle is None:
        handle = _ServerHandle(job.compiled.plan, job.compiled.source)
    return job.compiled.build(handle, original)


def _build_helpers(job: Prepared, base: dict) -> dict:
    """The job's helpers as the block calls them: each compiled by this server, built
    with globals of its own (the server's builtins, ``torch``, ``math``, the values
    sent for it, the other helpers) and the defaults sent, never evaluated here."""
    from compiler import _helper

    built: dict = {}
    spaces = []
    for name, (compiled, values, defaults, kwdefaults) in job.helpers.items():
        glb = {**base, "__name__": "__remote_helper__"}
        exec(compile("def remote_helper(): pass", compiled.source.filename, "exec"), glb)  # noqa: S102 - a constant stub
        stub = glb.pop("remote_helper")
        stub.__defaults__ = defaults
        stub.__kwdefaults__ = kwdefaults
        fn = compiled.build(_ServerHandle(compiled.plan, compiled.source), stub)
        fn.__name__ = fn.__qualname__ = compiled.name
        built[name] = _helper(fn, compiled) if compiled.helper else fn
        spaces.append((glb, values))
    for glb, values in spaces:
        glb.update(built)
        glb.update(values)  # its own module's values first, as in its file
    return built


def job_error(exc: BaseException, filename: str) -> JobError:
    """What the block raised, as the job's error (type, message, the user's line)."""
    if isinstance(exc, JobError):
        return exc
    return JobError(type(exc).__name__, str(exc), _user_line(exc, filename), filename,
                    module=getattr(exc, "module", None),
                    traceback=_user_traceback(exc, filename))


def encode_reply(job: Prepared, scope: dict, max_result: int) -> bytes:
    """The reply message: the block's saved variables, the containers it changed and
    (generate) ``tracer.result``; a JobError when they cannot be sent or are too big."""
    from ..tracer import Tracer

    compiled, block, values, filename = job.compiled, job.block, job.values, job.filename
    # The block's saves, and what the client's compiler says it binds after the block (in
    # a session, a later trace's reads of this one's variables): the block's own variables.
    if block.kind == "session":  # its traces' saves, and what its body bound (sent or not)
        saved = [*(n for b in compiled.plan.blocks for n in b.saved),
                 *(n for n in job.wanted if n != block.model)]
    else:
        saved = [*compiled.plan.blocks[0].saved,
                 *(n for n in job.wanted if n not in values and n != block.model)]
    out: dict = {}
    labels: dict = {}
    for name in saved:
        if name in scope:
            out[name] = scope[name]
            labels[name] = f"saved variable `{name}`" if name not in values else (
                f"variable `{name}`")
    mutated = {n: v for n, v in values.items() if isinstance(v, (list, dict)) and n in scope}
    tracer = next((v for v in scope.values() if isinstance(v, Tracer)), None)
    if block.kind == "session":
        for name, value in out.items():
            if isinstance(value, Tracer):  # read after the session: it stays here
                raise JobError(
                    "TypeError", f"`{name}`, the tracer of a trace of the remote session, is "
                    "read after the session, but a tracer stays on the server: read what you "
                    f"need of it into a variable inside the session (`tokens = {name}.result`)",
                    block.line, filename)
    enc = protocol.Encoder()
    try:
        reply: dict = {"saved": {n: enc.encode(v, labels[n]) for n, v in out.items()},
                       "mutated": {n: enc.encode(v, f"variable `{n}`") for n, v in
                                   mutated.items()}}
        if tracer is not None and tracer._kind == "generate":
            reply["result"] = enc.encode(tracer._result, "tracer.result")
    except protocol.UnsendableError as exc:
        raise JobError("TypeError", f"the block's result cannot be sent back: {exc}",
                       block.line, filename) from None
    size = sum(t.numel() * t.element_size() for t in enc.tensors.values())
    if size > max_result:
        raise JobError(
            "ValueError",
            f"the block's results are {size / 2**20:.1f} MiB, over this server's limit of "
            f"{max_result / 2**20:.1f} MiB: save less (a slice, or a reduction)",
            block.line, filename)
    return protocol.pack(reply, enc.tensors)


def _server_handle():
    from ..api import Handle

    class ServerHandle(Handle):
        """Here the block runs: its ``remote=True`` means this process."""

        def block(self, model, kind, index, /, *args, **kwargs):
            kwargs.pop("remote", None)
            tracer = Handle.block(self, model, kind, index, *args, **kwargs)
            tracer._end_when_served = True  # its reply is what it saved
            return tracer

    return ServerHandle


def _ServerHandle(plan, source):
    global _SERVER_HANDLE
    if _SERVER_HANDLE is None:
        _SERVER_HANDLE = _server_handle()
    return _SERVER_HANDLE(plan, source)


_SERVER_HANDLE = None


def _user_frames(exc: BaseException, filename: str) -> list:
    return [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]


def _user_line(exc: BaseException, filename: str) -> int | None:
    line = getattr(exc, "line", None)
    if isinstance(line, int):
        return line
    frames = _user_frames(exc, filename)
    return frames[-1].lineno if frames else None


def _user_traceback(exc: BaseException, filename: str) -> list[int]:
    return [f.lineno for f in _user_frames(exc, filename)]


def _shown_tensor(torch_name: str) -> str:
    """A parameter's or buffer's torch name (``model.norm.weight``) as a block spells it:
    its module's shown path and the tensor's name (``model.model.norm.weight``)."""
    module, _, leaf = torch_name.rpartition(".")
    return shown(module) + segment(leaf)


class ModelGuard:
    """What a job must not change on the served model, and a check that it did not:
    parameters and buffers (identity and in-place version counters), ``.grad`` on
    parameters, ``training`` flags, hooks and instance attributes of modules."""

    def __init__(self, module) -> None:
        self.module = module
        self.snapshot = self._take()

    def _take(self) -> dict:
        m = self.module
        return {
            "params": [(n, id(p), p._version) for n, p in m.named_parameters()],
            "buffers": [(n, id(b), b._version) for n, b in m.named_buffers()],
            "modules": [(n, id(mod), mod.training, len(mod._forward_hooks),
                         len(mod._forward_pre_hooks), len(mod._backward_hooks),
                         len(getattr(mod, "_forward_hooks_with_kwargs", ())),
                         "forward" in mod.__dict__)
                        for n, mod in m.named_modules()],
        }

    def changes(self) -> list[str]:
        """What the last job changed (empty: nothing)."""
        now = self._take()
        out = []
        for kind, word in (("params", "parameter"), ("buffers", "buffer")):
            before = {n: (i, v) for n, i, v in self.snapshot[kind]}
            after = {n: (i, v) for n, i, v in now[kind]}
            for name in sorted(set(before) | set(after)):
                b, a = before.get(name), after.get(name)
                if b is None or a is None or b[0] != a[0]:
                    out.append(f"{word} `{_shown_tensor(name)}` was replaced or removed")
                elif b[1] != a[1]:
                    out.append(f"{word} `{_shown_tensor(name)}` was modified in place")
        for name, p in self.module.named_parameters():
            if p.grad is not None:
                out.append(f"parameter `{_shown_tensor(name)}` was left with a .grad")
        before = {row[0]: row[1:] for row in self.snapshot["modules"]}
        for row in now["modules"]:
            b = before.get(row[0])
            if b is None or b[0] != row[1]:
                out.append(f"module `{shown(row[0])}` was added or replaced")
            elif b[1] != row[2]:
                out.append(f"module `{shown(row[0])}` was switched to "
                           f"{'training' if row[2] else 'eval'} mode")
            elif b[2:] != row[3:]:
                out.append(f"module `{shown(row[0])}` was left with hooks or a wrapped forward")
        if len(now["modules"]) != len(self.snapshot["modules"]):
            out.append("the module tree changed")
        return out[:10]

