"""Property-based tests of the compiler (hypothesis, hypothesmith).

1. Random Python (hypothesmith) inside a trace block, with some integer literals
   turned into module values: the compiler either succeeds with valid Python or
   raises ``CompileError``, never anything else.
2. Differential: random experiments (reads, arithmetic, ``if``/``else`` on tensor values,
   loops over layers, in-place edits, writes, saves, and now and then a read out of
   order) run compiled against a tiny MLP (``NNsight`` of a ``Sequential``) and as plain
   Python over the same modules stepped by hand: the same values (to the bit), or an
   order error on both sides.
"""

from __future__ import annotations

import warnings

import hypothesmith
import libcst as cst
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import assert_no_hooks

from compiler import CompileError, intervene
from compiler.codegen import compile_source
from compiler.parse import Source
from runtime import NNsight, OutOfOrderError

# --------------------------------------------------------------------------------------
# 1. Random Python: CompileError or valid code
# --------------------------------------------------------------------------------------

_MODULE_VALUE = cst.parse_expression("model.layers[0].output")
_TEMPLATE = cst.parse_module(
    "def experiment(model, x):\n"
    "    with model.trace(x):\n"
    "        h = model.layers[0].output\n"
    "        model.layers[1].output[:] = h\n"
)


class _ToModuleValues(cst.CSTTransformer):
    """Every other name and every other integer literal becomes a module value: in
    targets, lambdas, defaults, f-strings, comprehensions, decorators, ... wherever
    the generator put one (what Python then refuses is skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.names = self.ints = 0

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.BaseExpression:
        self.names += 1
        return _MODULE_VALUE if self.names % 2 == 0 else updated

    def leave_Integer(self, original: cst.Integer, updated: cst.Integer) -> cst.BaseExpression:
        self.ints += 1
        return _MODULE_VALUE.with_changes(attr=cst.Name("input")) if self.ints % 2 else updated


def _as_experiment(generated: str) -> str | None:
    """The generated statements in a trace block, between a read and an in-place edit
    (libcst indents them); None when libcst cannot read them."""
    try:
        module = cst.parse_module(generated)
        change = _ToModuleValues()
        body = [st.visit(change) for st in module.body]
    except Exception:  # noqa: BLE001 - libcst refuses it (or cannot place a value there)
        return None
    fn = _TEMPLATE.body[0]
    block = fn.body.body[0]
    first, last = block.body.body
    try:
        return _TEMPLATE.with_changes(body=[fn.with_changes(body=fn.body.with_changes(body=[
            block.with_changes(body=block.body.with_changes(body=[first, *body, last]))
        ]))]).code
    except Exception:  # noqa: BLE001 - a node the transformation made unprintable
        return None


def _compile_checked(text: str, python_refuses=(SyntaxError,), with_line: bool = True):
    """The property: ``text`` that Python compiles either compiles with @intervene's
    compiler to code Python compiles again, or is a CompileError naming the file (and a
    line, ``with_line``).  The compiled function, or None (refused; an event says by whom)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compile(text, "<generated>", "exec", dont_inherit=True)
        except python_refuses:
            event("refused by Python")
            return None
        try:
            compiled = compile_source(Source(text, "<generated>", 1, 0))
        except CompileError as exc:
            assert exc.filename == "<generated>" and exc.message
            assert exc.lineno or not with_line
            event("CompileError")
            return None
        compile(compiled.code, "<rewritten>", "exec", dont_inherit=True)
    return compiled


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.one_of(hypothesmith.from_grammar(), hypothesmith.from_node()))
def test_random_python_compiles_or_is_a_compile_error(generated):
    text = _as_experiment(generated)
    if text is None:
        event("libcst cannot read it")
        return
    # Python itself may refuse it: @intervene never sees such a function.
    compiled = _compile_checked(text, (SyntaxError, ValueError, MemoryError, RecursionError),
                                with_line=False)
    if compiled is None:
        return
    items = len(compiled.plan.blocks[0].lanes[0].items)
    event("compiled, " + ("more checkpoints" if items > 2 else "the two around it"))
    assert compiled.plan.blocks and compiled.plan.blocks[0].lanes


# Module values in every syntactic place (hypothesmith rarely builds these): the same
# property, on statements from a small grammar of our own.

_ATOMS = ["model.layers[0].output", "model.layers[1].input", "model.head.output", "h", "1", "x",
          "h.output", "model.layers[h].inputs"]
_TARGETS = ["v", "model.layers[0].output", "model.layers[0].output[0]", "a, b",
            "a, model.layers[0].output", "(a, (b, model.layers[1].output[0]))",
            "model.layers[0].output.attr", "[a, *model.layers[2].input]", "h.output",
            "x[model.layers[0].output]", "model.layers[h].inputs"]


def _expressions():
    def extend(inner):
        two = st.tuples(inner, inner)
        return st.one_of(
            two.map(lambda t: f"({t[0]} + {t[1]})"),
            inner.map(lambda a: f"{a}[0]"),
            inner.map(lambda a: f"{a}.sum()"),
            inner.map(lambda a: f"f'{{{a}}}'"),
            inner.map(lambda a: f'f"{{{a}!r:>3}}"'),
            inner.map(lambda a: f"[{a} for _ in range(2) if {a} is not None]"),
            inner.map(lambda a: f"{{k: {a} for k in range(2)}}"),
            inner.map(lambda a: f"(lambda: {a})"),
            st.tuples(inner, inner, inner).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
            inner.map(lambda a: f"(w := {a})"),
            inner.map(lambda a: f"[*{a}]"),
            two.map(lambda t: f"({t[0]} and {t[1]})"),
            two.map(lambda t: f"{t[0]}[{t[1]}:]"),
            two.map(lambda t: f"print({t[0]}, sep={t[1]})"),
            two.map(lambda t: f"{{{t[0]}: {t[1]}}}"),
            inner.map(lambda a: f"(yield {a})"),
            inner.map(lambda a: f"(await {a})"),
        )

    return st.recursive(st.sampled_from(_ATOMS), extend, max_leaves=4)


def _statements():
    e, t = _expressions(), st.sampled_from(_TARGETS)
    return st.one_of(
        e.map(lambda a: f"v = {a}"),
        st.tuples(t, e).map(lambda p: f"{p[0]} = {p[1]}"),
        st.tuples(t, e).map(lambda p: f"{p[0]} += {p[1]}"),
        st.tuples(t, e).map(lambda p: f"{p[0]}: int = {p[1]}"),
        st.tuples(t, e).map(lambda p: f"for {p[0]} in {p[1]}:\n    pass"),
        st.tuples(e, t).map(lambda p: f"with {p[0]} as {p[1]}:\n    pass"),
        t.map(lambda a: f"del {a}"),
        st.tuples(e, e).map(lambda p: f"if {p[0]}:\n    v = {p[1]}\nelse:\n    pass"),
        e.map(lambda a: f"while {a}:\n    break"),
        st.tuples(e, e).map(lambda p: f"assert {p[0]}, {p[1]}"),
        st.tuples(e, e, e).map(lambda p: f"@{p[0]}\ndef g(a={p[1]}):\n    return {p[2]}"),
        st.tuples(e, e).map(lambda p: f"match {p[0]}:\n    case [1]:\n        v = {p[1]}"),
        st.tuples(e, e).map(
            lambda p: f"try:\n    v = {p[0]}\nexcept Exception as err:\n    v = {p[1]}"),
        e.map(lambda a: f"class K:\n    y = {a}"),
        st.just("return"),
        e.map(lambda a: f"print({a})"),
        st.tuples(e, e).map(lambda p: f"print(*{p[0]}, end={p[1]}, **{{}})"),
        st.tuples(e, e).map(lambda p: f"v = [w := {p[0]} for _ in {p[1]}]"),
        st.tuples(e, e).map(lambda p: f"v = {p[0]} < {p[1]} <= {p[0]}"),
    )


def _block(lines: list[str]) -> str:
    body = "".join(
        "".join(f"        {ln}\n" for ln in stmt.split("\n")) for stmt in lines)
    return f"def experiment(model, x):\n    h = 1\n    with model.trace(x):\n{body}"


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(_statements(), min_size=1, max_size=4))
def test_module_values_anywhere_compile_or_are_a_compile_error(lines):
    text = _block(lines)
    if _compile_checked(text) is not None:
        event("compiled")


def _indent(lines: list[str], by: int = 4) -> list[str]:
    return [" " * by + ln for stmt in lines for ln in stmt.split("\n")]


def _structures():
    """Invokes, step blocks, backward blocks, barriers, stop and cache around statements."""
    simple = st.lists(_statements(), min_size=1, max_size=2)

    def wrap(kind_and_body):
        kind, body = kind_and_body
        if kind == "steps":
            return "\n".join(["with tracer.iter[1:3]:", *_indent(body)])
        if kind == "step-loop":
            return "\n".join(["for step in tracer.all():", *_indent(body)])
        if kind == "backward":
            return "\n".join(["with h.sum().backward(retain_graph=True):",
                              *_indent(["g = h.grad", *body])])
        if kind == "barrier":
            return "\n".join(["b = tracer.barrier(1)", "b()", *body])
        if kind == "stop":
            return "\n".join([*body, "tracer.stop()"])
        return "\n".join(["c = tracer.cache()", *body])

    kinds = st.sampled_from(["steps", "step-loop", "backward", "barrier", "stop", "cache"])
    return st.tuples(kinds, simple).map(wrap)


@st.composite
def _blocks(draw):
    kind = draw(st.sampled_from(["trace", "generate", "scan"]))
    parts = st.one_of(_statements(), _structures())
    if draw(st.booleans()):  # invokes
        lanes = draw(st.lists(st.lists(parts, min_size=1, max_size=3), min_size=1, max_size=3))
        body = []
        for i, lane in enumerate(lanes):
            body += [f"with tracer.invoke(x{i}):", *_indent(lane)]
        call = f"model.{kind}()"
    else:
        body = draw(st.lists(parts, min_size=1, max_size=4))
        call = f"model.{kind}(x, max_new_tokens=3)" if kind == "generate" else f"model.{kind}(x)"
    lines = "".join(f"{ln}\n" for ln in _indent([f"with {call} as tracer:", *_indent(body)]))
    return f"def experiment(model, x, x0, x1, x2):\n    h = 1\n{lines}    return 1\n"


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(_blocks())
def test_blocks_invokes_steps_compile_or_are_a_compile_error(text):
    if _compile_checked(text) is not None:
        event("compiled")


# --------------------------------------------------------------------------------------
# 2. Differential: compiled vs plain Python
# --------------------------------------------------------------------------------------

N_LAYERS = 6  # modules of the layers' width: Linear, ReLU, Linear, Tanh, Linear, ReLU
HEAD = N_LAYERS  # the 2-way Linear after them


def _sequential() -> torch.nn.Sequential:
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
        torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net.eval()


class OrderError(Exception):
    """The reference's OutOfOrderError: a module asked for after the forward passed it."""


def _event(index: int, value: str) -> int:
    """Events in forward order: module i's input (2i), then its output (2i + 1)."""
    return 2 * index + (value == "output")


class _RefEnvoy:
    def __init__(self, ref: _Reference, index: int) -> None:
        self._ref, self._index = ref, index

    @property
    def input(self):
        return self._ref.value(self._index, "input")

    @input.setter
    def input(self, value) -> None:
        self._ref.replace(self._index, "input", value)

    @property
    def output(self):
        return self._ref.value(self._index, "output")

    @output.setter
    def output(self, value) -> None:
        self._ref.replace(self._index, "output", value)


class _Reference:
    """The ``Sequential``'s forward stepped by hand, one module at a time, as the body
    asks for values (``model[i]``, ``model[a:b]``): a module's input is the tensor it is
    given and its output the one it returned, which is the next module's input (so
    in-place edits and replacements reach the rest of the forward); asking for a value
    the forward has passed is an ``OrderError``."""

    def __init__(self, net) -> None:
        self.modules = list(net)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [_RefEnvoy(self, i) for i in range(len(self.modules))[key]]
        return _RefEnvoy(self, range(len(self.modules))[key])

    def trace(self, x):
        self.h, self.at = x, -1  # the value of the last event reached
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        if exc[0] is None:
            self._advance(_event(HEAD, "output"))
        return False

    def _advance(self, event: int) -> None:
        if event < self.at:
            raise OrderError(event)
        while self.at < event:
            self.at += 1
            if self.at % 2:  # an output: run the module on its (possibly edited) input
                self.h = self.modules[self.at // 2](self.h)

    def value(self, index: int, value: str):
        self._advance(_event(index, value))
        return self.h

    def replace(self, index: int, value: str, new) -> None:
        self._advance(_event(index, value))
        self.h = new


@st.composite
def _experiment_bodies(draw):
    """Lines of a trace body, module values mostly in forward order."""
    last_event = _event(N_LAYERS - 1, "output")
    state = {"p": 0, "last": -1, "n": 0, "saved": [], "depth": 0}
    names = ["bias"]  # tensors of the layers' shape available to the body

    def fresh(prefix: str) -> str:
        state["n"] += 1
        return f"{prefix}{state['n']}"

    def value(allow_back: bool = True) -> str | None:
        """``model[j].input`` / ``.output`` at or after the events asked for so far."""
        # Out of order only where it surely runs: the pre-run check reports a wrong
        # order inside a branch even when the branch is not taken (as documented).
        if allow_back and state["depth"] == 0 and state["last"] > 0 and (
                draw(st.integers(0, 9)) == 0):
            event = draw(st.integers(0, state["last"] - 1))  # out of order
        elif state["p"] > last_event:
            return None
        else:
            event = draw(st.integers(state["p"], last_event))
            state["p"], state["last"] = event, max(state["last"], event)
        return f"model[{event // 2}].{'output' if event % 2 else 'input'}"

    def const() -> str:
        return draw(st.sampled_from(["0.5", "2.0", "-1.0", "0.0", "1.5"]))

    def statements(depth: int, local: list[str], top: bool) -> list[str]:
        state["depth"] = depth
        out: list[str] = []
        for _ in range(draw(st.integers(1, 4 if top else 2))):
            kind = draw(st.sampled_from(
                ["read", "read", "arith", "inplace", "write", "keep", "if", "for"]
                + (["save"] if top else [])))
            avail = names + local
            if kind == "read":
                v, where = fresh("v"), value()
                if where is None:
                    continue
                out.append(f"{v} = {where}")
                local.append(v)
            elif kind == "arith":
                a, b = draw(st.sampled_from(avail)), draw(st.sampled_from(avail))
                op = draw(st.sampled_from(["+", "-", "*"]))
                v = fresh("v")
                out.append(f"{v} = ({a} {op} {b}) * {const()}")
                local.append(v)
            elif kind == "inplace":
                where = value(allow_back=False)
                if where is None:
                    continue
                k, src = draw(st.integers(0, 7)), draw(st.sampled_from(avail))
                out.append(draw(st.sampled_from([
                    f"{where}[:, {k}] = {const()}",
                    f"{where} *= {const()}",
                    f"{where}[:, {k}] += {src}[:, {k}]",
                    f"{where}.add_({src})",
                ])))
            elif kind == "write":
                where = value(allow_back=False)
                if where is None:
                    continue
                out.append(f"{where} = {draw(st.sampled_from(avail))} * {const()}")
                state["p"] += 1  # never asked for again once replaced
            elif kind == "keep":
                out.append(f"outs.append({draw(st.sampled_from(avail))}.clone())")
            elif kind == "save":
                s = fresh("s")
                out.append(f"{s} = ({draw(st.sampled_from(avail))} + 0).save()")
                state["saved"].append(s)
            elif kind == "if" and depth < 2:
                test = f"{draw(st.sampled_from(avail))}.sum() > {const()}"
                start = dict(state)
                then = statements(depth + 1, list(local), False)
                state["depth"] = depth
                after_then = (state["p"], state["last"])
                state["p"], state["last"] = start["p"], start["last"]
                other = statements(depth + 1, list(local), False)
                state["depth"] = depth
                state["p"] = max(after_then[0], state["p"])
                state["last"] = max(after_then[1], state["last"])
                out.append(f"if {test}:")
                out += ["    " + ln for ln in then]
                out.append("else:")
                out += ["    " + ln for ln in other]
            elif kind == "for" and depth < 2 and state["p"] <= last_event:
                a = draw(st.integers(state["p"] // 2 + 1 if state["p"] % 2 else state["p"] // 2,
                                     N_LAYERS))
                if a >= N_LAYERS:
                    continue
                b = draw(st.integers(a + 1, N_LAYERS))
                acc = fresh("acc")
                out.append(f"{acc} = {draw(st.sampled_from(avail))} * 0.0")
                out.append(f"for layer in model[{a}:{b}]:")
                if draw(st.booleans()):
                    out.append(f"    {acc} = {acc} + layer.input")
                out.append(f"    {acc} = {acc} + layer.output")
                if draw(st.booleans()):
                    out.append(f"    layer.output[:, {draw(st.integers(0, 7))}] *= {const()}")
                end = _event(b - 1, "output")
                state["p"], state["last"] = end, max(state["last"], end)
                local.append(acc)
        return out or ["pass"]

    body = statements(0, [], True)
    return body, list(state["saved"])


def _source(body: list[str], saved: list[str]) -> str:
    lines = "\n".join("        " + ln for ln in body)
    return (
        "def experiment(model, x, bias):\n"
        "    outs = []\n"
        "    with model.trace(x):\n"
        f"{lines}\n"
        f"        logits = model[{HEAD}].output.save()\n"
        f"    return outs, logits, [{', '.join(saved)}]\n"
    )


def _build(source: str, compiled: bool):
    namespace: dict = {"torch": torch, "intervene": intervene}
    import linecache

    filename = f"<differential-{abs(hash(source))}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    text = ("@intervene\n" + source) if compiled else source
    if compiled:
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    exec(compile(text, filename, "exec"), namespace)  # noqa: S102
    return namespace["experiment"], filename


def _run_plain(fn, net, x, bias):
    torch.Tensor.save = lambda self: self  # `.save()` is the identity in plain Python
    try:
        return fn(_Reference(net), x, bias)
    finally:
        del torch.Tensor.save


@pytest.fixture(scope="module")
def mlp():
    net = _sequential()
    model = NNsight(net)
    with torch.no_grad():
        net(torch.zeros(1, 8))
    return net, model


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(_experiment_bodies(), st.integers(0, 1000))
def test_compiled_equals_plain_python(mlp, generated, seed):
    import linecache

    net, model = mlp
    body, saved = generated
    source = _source(body, saved)
    gen = torch.Generator().manual_seed(seed)
    x, bias = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    plain, plain_file = _build(source, compiled=False)
    compiled, compiled_file = _build(source, compiled=True)
    try:
        with torch.no_grad():
            try:
                expected = _run_plain(plain, net, x.clone(), bias.clone())
            except OrderError:
                expected = OrderError
            try:
                got = compiled(model, x.clone(), bias.clone())
            except OutOfOrderError:
                got = OrderError
        assert_no_hooks(model)
        if expected is OrderError or got is OrderError:
            assert got is expected, source
            event("out of order on both sides")
            return
        event("equal values" + (" (with if)" if "if " in source else ""))
        (outs, logits, kept), (ref_outs, ref_logits, ref_kept) = got, expected
        assert torch.equal(logits, ref_logits), source
        assert len(outs) == len(ref_outs) and len(kept) == len(ref_kept), source
        for a, b in zip([*outs, *kept], [*ref_outs, *ref_kept]):
            assert torch.equal(a, b), source
    finally:
        linecache.cache.pop(plain_file, None)
        linecache.cache.pop(compiled_file, None)
