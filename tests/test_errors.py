"""User mistakes: each gives the documented error, with a helpful message and the
user's line, and never leaves a hook on the model."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from support import assert_no_hooks, line_in
from torch import nn

from compiler import CompileError, intervene
from runtime import MissedCheckpointError, NNsight, NotInTraceError, OutOfOrderError
from runtime.models import tiny_mlp

THIS_FILE = Path(__file__).resolve()


def line_of(marker: str) -> int:
    """The line of this file ending with ``marker`` (exactly once)."""
    return line_in(THIS_FILE, marker)


def x_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))


def same_file(name: str) -> bool:
    return Path(name).resolve() == THIS_FILE


class CountingMLP(nn.Module):
    """tiny-MLP shaped, counting its forward calls; ``unused`` is never called."""

    def __init__(self, with_unused: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 2)
        if with_unused:
            self.unused = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


# --------------------------------------------------------------------------------------
# CompileError: found in the source, before anything runs
# --------------------------------------------------------------------------------------


def test_compile_error_is_a_syntax_error():
    assert issubclass(CompileError, SyntaxError)


def test_unsaved_variable_read_after_block():
    with pytest.raises(CompileError) as info:
        @intervene
        def leak(model, x):
            with model.trace(x):
                hidden = model.layers[1].output  # ASSIGNED-UNSAVED
                kept = model.head.output.save()
            return hidden, kept  # READ-UNSAVED

    err = info.value
    assigned, read = line_of("# ASSIGNED-UNSAVED"), line_of("# READ-UNSAVED")
    assert err.lineno == read
    assert same_file(err.filename)
    assert "`hidden`" in err.message
    assert f"line {assigned}" in err.message and f"line {read}" in err.message
    assert "save" in err.message
    assert err.offset is not None and err.offset >= 1
    # str() names the place too
    assert f"line {read}" in str(err)


def test_saved_variable_read_after_block_is_fine():
    @intervene
    def ok(model, x):
        with model.trace(x):
            hidden = model.layers[1].output.save()
        return hidden

    assert ok.plan.functions[0].blocks[0].saved == ("hidden",)


def test_save_outside_block():
    with pytest.raises(CompileError) as info:
        @intervene
        def outside(model, x):
            y = x.save()  # SAVE-OUTSIDE
            with model.trace(x):
                h = model.layers[0].output.save()
            return h, y

    assert info.value.lineno == line_of("# SAVE-OUTSIDE")
    assert "`.save()` outside a trace block" in info.value.message


@pytest.mark.parametrize("stmt,phrase", [
    ("yield h", "`yield` cannot be used inside a trace block"),
    ("global GLOBAL_THING", "`global` cannot be used inside a trace block"),
    ("return h", "`return` cannot be used inside a trace block"),
])
def test_forbidden_statement_in_block(stmt, phrase):
    # parametrized through separate real functions below (source must come from a file)
    fn = FORBIDDEN[stmt]
    with pytest.raises(CompileError) as info:
        intervene(fn)
    assert phrase in info.value.message
    assert info.value.lineno == line_of(f"# FORBIDDEN {stmt}")
    assert same_file(info.value.filename)


def _forbid_yield(model, x):
    with model.trace(x):
        h = model.layers[0].output
        yield h  # FORBIDDEN yield h


def _forbid_global(model, x):
    with model.trace(x):
        h = model.layers[0].output
        global GLOBAL_THING  # FORBIDDEN global GLOBAL_THING
        GLOBAL_THING = h


def _forbid_return(model, x):
    with model.trace(x):
        h = model.layers[0].output
        return h  # FORBIDDEN return h


FORBIDDEN = {
    "yield h": _forbid_yield,
    "global GLOBAL_THING": _forbid_global,
    "return h": _forbid_return,
}


def test_nonlocal_in_block():
    outer = None

    with pytest.raises(CompileError) as info:
        @intervene
        def uses_nonlocal(model, x):
            with model.trace(x):
                nonlocal outer  # NONLOCAL-HERE
                outer = model.layers[0].output
            return outer

    assert "`nonlocal` cannot be used inside a trace block" in info.value.message
    assert info.value.lineno == line_of("# NONLOCAL-HERE")


def test_async_def():
    with pytest.raises(CompileError) as info:
        @intervene
        async def awaits(model, x):
            with model.trace(x):
                h = await model.layers[0].output
            return h

    assert "async def" in info.value.message
    assert same_file(info.value.filename)


def test_lambda_touching_output_in_block():
    with pytest.raises(CompileError) as info:
        @intervene
        def with_lambda(model, x):
            with model.trace(x):
                f = lambda: model.layers[0].output  # LAMBDA-OUTPUT
                h = f().save()
            return h

    assert info.value.lineno == line_of("# LAMBDA-OUTPUT")
    assert "lambda or nested function" in info.value.message


def test_nested_def_touching_output_in_block():
    with pytest.raises(CompileError) as info:
        @intervene
        def with_def(model, x):
            with model.trace(x):
                def get():
                    return model.layers[0].output  # NESTED-DEF-OUTPUT
                h = get().save()
            return h

    assert info.value.lineno == line_of("# NESTED-DEF-OUTPUT")
    assert "lambda or nested function" in info.value.message


def test_break_leaving_block():
    with pytest.raises(CompileError) as info:
        @intervene
        def breaks(model, x):
            for _ in range(2):
                with model.trace(x):
                    h = model.layers[0].output.save()
                    break  # BREAK-HERE
            return h

    assert info.value.lineno == line_of("# BREAK-HERE")
    assert "`break` would leave the trace block" in info.value.message


def test_continue_leaving_block():
    with pytest.raises(CompileError) as info:
        @intervene
        def continues(model, x):
            for _ in range(2):
                with model.trace(x):
                    h = model.layers[0].output.save()
                    continue  # CONTINUE-HERE
            return h

    assert info.value.lineno == line_of("# CONTINUE-HERE")
    assert "`continue` would leave the trace block" in info.value.message


def test_break_inside_loop_in_block_is_fine():
    @intervene
    def breaks_inner(model, x):
        outs = []
        with model.trace(x):
            for layer in model.layers:
                outs.append(layer.output.save())
                if len(outs) == 2:
                    break
        return outs

    model = NNsight(tiny_mlp())
    assert len(breaks_inner(model, x_input())) == 2
    assert_no_hooks(model)


def test_source_unavailable_exec():
    namespace: dict = {}
    exec("def from_string(model, x):\n    return x\n", namespace)  # noqa: S102
    with pytest.raises(CompileError) as info:
        intervene(namespace["from_string"])
    assert "source" in info.value.message
    assert "from_string" in info.value.message


def test_lambda_passed_to_intervene():
    with pytest.raises(CompileError) as info:
        intervene(lambda model, x: x)
    assert "lambda" in info.value.message
    assert "def" in info.value.message


def test_trace_with_neither_input_nor_invokes():
    with pytest.raises(CompileError) as info:
        @intervene
        def empty(model):
            with model.trace():  # EMPTY-TRACE
                h = model.layers[0].output.save()
            return h

    assert info.value.lineno == line_of("# EMPTY-TRACE")
    assert "neither an input nor any `tracer.invoke(...)`" in info.value.message


def test_trace_with_input_and_invokes():
    with pytest.raises(CompileError) as info:
        @intervene
        def both(model, x):
            with model.trace(x) as tracer:  # noqa: SIM117 # INPUT-AND-INVOKE
                with tracer.invoke(x):
                    h = model.layers[0].output.save()
            return h

    assert info.value.lineno == line_of("# INPUT-AND-INVOKE")
    assert "has an input and also `tracer.invoke(...)`" in info.value.message


def test_invoke_inside_invoke():
    with pytest.raises(CompileError) as info:
        @intervene
        def nested(model, x):
            with model.trace() as tracer:  # noqa: SIM117
                with tracer.invoke(x):  # OUTER-INVOKE
                    with tracer.invoke(x):  # INNER-INVOKE
                        h = model.layers[0].output.save()
            return h

    assert info.value.lineno == line_of("# INNER-INVOKE")
    assert "invoke inside an invoke" in info.value.message
    assert f"line {line_of('# OUTER-INVOKE')}" in info.value.message


def test_output_outside_block_after_it():
    with pytest.raises(CompileError) as info:
        @intervene
        def outside(model, x):
            with model.trace(x):
                h = model.layers[1].output.save()
            late = model.layers[0].output  # OUTPUT-AFTER-BLOCK
            return h, late

    assert info.value.lineno == line_of("# OUTPUT-AFTER-BLOCK")
    assert "only available inside a trace block" in info.value.message


def test_output_outside_block_before_it():
    with pytest.raises(CompileError) as info:
        @intervene
        def outside_first(model, x):
            early = model.layers[0].output  # OUTPUT-BEFORE-BLOCK
            with model.trace(x):
                h = model.layers[1].output.save()
            return h, early

    assert info.value.lineno == line_of("# OUTPUT-BEFORE-BLOCK")
    assert "only available inside a trace block" in info.value.message


def test_multiple_targets_with_output():
    with pytest.raises(CompileError) as info:
        @intervene
        def multi(model, x):
            with model.trace(x):
                a = model.layers[0].output = x  # noqa: F841 # MULTI-TARGET
                h = model.head.output.save()
            return h

    assert info.value.lineno == line_of("# MULTI-TARGET")
    assert "several assignment targets" in info.value.message


def test_reserved_name_in_block():
    with pytest.raises(CompileError) as info:
        @intervene
        def reserved(model, x):
            with model.trace(x):
                __iv_mine = model.layers[0].output  # RESERVED-NAME
                h = model.head.output.save()
            return h

    assert info.value.lineno == line_of("# RESERVED-NAME")
    assert "reserved" in info.value.message


# --------------------------------------------------------------------------------------
# Order: OutOfOrderError, MissedCheckpointError
# --------------------------------------------------------------------------------------


@intervene
def backwards_in_list(model, x):
    with model.trace(x):
        late = model.layers[3].output.save()  # ORDER-FIRST
        early = model.layers[1].output.save()  # ORDER-SECOND
    return late, early


def test_out_of_order_static_list_before_running():
    inner = CountingMLP()
    model = NNsight(inner)
    with pytest.raises(OutOfOrderError) as info:
        backwards_in_list(model, x_input())
    assert inner.calls == 0, "the model ran although the order was known to be impossible"
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.module == "model.layers[1]"  # as the block spells it
    assert err.line == line_of("# ORDER-SECOND")
    assert f"line {line_of('# ORDER-SECOND')}" in str(err)
    assert f"line {line_of('# ORDER-FIRST')}" in str(err)
    assert "`model.layers[1].output`" in str(err) and "`model.layers[3].output`" in str(err)
    assert_no_hooks(model)
    # and again: still raised, still before the forward
    with pytest.raises(OutOfOrderError):
        backwards_in_list(model, x_input())
    assert inner.calls == 0
    assert_no_hooks(model)


@intervene
def head_then_layer(model, x):
    with model.trace(x):
        logits = model.head.output.save()
        hidden = model.layers[1].output.save()  # HEAD-THEN-LAYER
    return logits, hidden


def test_out_of_order_siblings_at_run_time_then_before_running():
    inner = CountingMLP()
    model = NNsight(inner)
    with pytest.raises(OutOfOrderError) as info:
        head_then_layer(model, x_input())
    assert inner.calls == 1  # a fresh model: only the run can tell
    assert info.value.module == "model.layers[1]"
    assert info.value.line == line_of("# HEAD-THEN-LAYER")
    assert f"line {line_of('# HEAD-THEN-LAYER')}" in str(info.value)
    assert "`model.layers[1].output`" in str(info.value)
    assert_no_hooks(model)
    # the order is now known: the second call fails before the forward
    with pytest.raises(OutOfOrderError) as info2:
        head_then_layer(model, x_input())
    assert inner.calls == 1
    assert info2.value.line == line_of("# HEAD-THEN-LAYER")
    assert_no_hooks(model)


def test_out_of_order_error_traceback_points_at_user_line():
    import traceback

    model = NNsight(CountingMLP())
    with pytest.raises(OutOfOrderError) as info:
        head_then_layer(model, x_input())
    frames = [f.lineno for f in traceback.extract_tb(info.value.__traceback__)
              if same_file(f.filename)]
    assert line_of("# HEAD-THEN-LAYER") in frames
    assert_no_hooks(model)


def test_out_of_order_dynamic_index_at_run_time():
    @intervene
    def dynamic(model, x, i, j):
        with model.trace(x):
            a = model.layers[i].output.save()
            b = model.layers[j].output.save()  # DYNAMIC-SECOND
        return a, b

    inner = CountingMLP()
    model = NNsight(inner)
    dynamic(model, x_input(), 0, 2)  # fine in this order
    with pytest.raises(OutOfOrderError) as info:
        dynamic(model, x_input(), 2, 0)
    assert info.value.line == line_of("# DYNAMIC-SECOND")
    assert_no_hooks(model)


@intervene
def reads_unused(model, x):
    with model.trace(x):
        h = model.layers[0].output.save()
        u = model.unused.output.save()  # NEVER-RUNS
    return h, u


def test_module_that_never_runs():
    inner = CountingMLP(with_unused=True)
    model = NNsight(inner)
    with pytest.raises(MissedCheckpointError) as info:
        reads_unused(model, x_input())
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.module == "model.unused"
    assert err.line == line_of("# NEVER-RUNS")
    assert "model.unused" in str(err) and f"line {line_of('# NEVER-RUNS')}" in str(err)
    assert "did not run" in str(err)
    assert_no_hooks(model)
    # second call (order known) gives the same error, still no hang or leak
    with pytest.raises(MissedCheckpointError):
        reads_unused(model, x_input())
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------
# Envoy mistakes
# --------------------------------------------------------------------------------------


@intervene
def typo(model, x):
    with model.trace(x):
        h = model.layer[0].output.save()  # TYPO-HERE
    return h


def test_typo_in_module_name_in_trace():
    inner = CountingMLP()
    model = NNsight(inner)
    with pytest.raises(AttributeError) as info:
        typo(model, x_input())
    msg = str(info.value)
    assert "Did you mean `layers`?" in msg
    assert "layers" in msg and "head" in msg  # the children are listed
    assert f"line {line_of('# TYPO-HERE')}" in msg
    assert inner.calls == 0
    assert_no_hooks(model)


def test_typo_in_module_name_outside_trace():
    model = NNsight(tiny_mlp())
    with pytest.raises(AttributeError) as info:
        _ = model.hed
    msg = str(info.value)
    assert "Did you mean `head`?" in msg
    assert "Its children: layers, head" in msg
    with pytest.raises(AttributeError, match="no child module or attribute `zzz`"):
        _ = model.layers[0].zzz


def test_non_module_attribute_is_real_attribute():
    model = NNsight(tiny_mlp())
    assert model.layers[0].weight is model._module.layers[0].weight
    assert model.training is False


def test_output_on_envoy_outside_function():
    model = NNsight(tiny_mlp())
    for what in ("output", "input", "inputs"):
        with pytest.raises(NotInTraceError) as info:
            getattr(model.layers[0], what)
        assert isinstance(info.value, RuntimeError)
        msg = str(info.value)
        assert f"`model.layers[0].{what}`" in msg
        assert "@intervene" in msg and "model.trace" in msg
    with pytest.raises(NotInTraceError):
        model.layers[0].output = torch.zeros(3, 8)
    assert_no_hooks(model)


def _read_in_helper(model):
    return model.layers[0].output  # HELPER-READ


def test_module_value_read_by_a_helper_called_from_a_block():
    # Only the block's own code is compiled: a helper cannot wait for the model.
    @intervene
    def uses_helper(model, x):
        with model.trace(x):
            h = _read_in_helper(model).save()
        return h

    model = NNsight(tiny_mlp())
    with pytest.raises(NotInTraceError) as info:
        uses_helper(model, x_input())
    assert "reads module values only if you decorate it with @intervene" in str(info.value)
    assert traceback.extract_tb(info.value.__traceback__)[-2].lineno == line_of("HELPER-READ")
    assert_no_hooks(model)


def test_trace_outside_intervene():
    # `with model.trace(x):` outside @intervene is compiled as it is entered
    # (tests/test_undecorated.py); called without `with`, it is refused.
    model = NNsight(tiny_mlp())
    with pytest.raises(NotInTraceError) as info:
        model.trace(x_input())
    assert isinstance(info.value, RuntimeError)
    assert "@intervene" in str(info.value)
    with model.trace(x_input()):
        out = model.output.save()
    assert torch.equal(out, model._module(x_input()))
    assert_no_hooks(model)


def test_raw_module_given_to_block():
    @intervene
    def raw(model, x):
        with model.trace(x):
            h = model.layers[0].output.save()
        return h

    inner = CountingMLP()
    with pytest.raises(TypeError) as info:
        raw(inner, x_input())
    assert "NNsight" in str(info.value)
    assert "CountingMLP" in str(info.value)
    assert inner.calls == 0
    assert_no_hooks(inner)


def test_envoy_part_given_to_block():
    @intervene
    def part(model, x):
        with model.trace(x):
            h = model.output.save()
        return h

    model = NNsight(tiny_mlp())
    with pytest.raises(TypeError, match="Envoy"):
        part(model.layers[0], x_input())
    assert_no_hooks(model)


def test_nnsight_of_non_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        NNsight(object())


@intervene
def out_of_range(model, x):
    with model.trace(x):
        h = model.layers[10].output.save()  # INDEX-HERE
    return h


def test_index_out_of_range_in_trace():
    inner = CountingMLP()
    model = NNsight(inner)
    with pytest.raises(IndexError) as info:
        out_of_range(model, x_input())
    msg = str(info.value)
    assert "4 modules" in msg and "10" in msg
    assert f"line {line_of('# INDEX-HERE')}" in msg
    assert inner.calls == 0
    assert_no_hooks(model)


def test_index_out_of_range_outside_trace():
    model = NNsight(tiny_mlp())
    with pytest.raises(IndexError, match="has 4 modules; index 4 is out of range"):
        model.layers[4]
    with pytest.raises(IndexError):
        model.layers[-5]
    assert model.layers[-1]._module is model._module.layers[3]
    assert [e._module for e in model.layers[1:3]] == list(model._module.layers[1:3])


def test_dynamic_index_out_of_range_at_run_time():
    @intervene
    def dyn(model, x, i):
        with model.trace(x):
            h = model.layers[i].output.save()  # DYN-INDEX
        return h

    model = NNsight(tiny_mlp())
    with pytest.raises(IndexError):
        dyn(model, x_input(), 7)
    assert_no_hooks(model)
    assert dyn(model, x_input(), -1).shape == (3, 8)
    assert_no_hooks(model)


def test_user_error_mid_forward_leaves_no_hooks_and_model_reusable():
    @intervene
    def boom(model, x):
        with model.trace(x):
            a = model.layers[0].output.save()
            _b = model.layers[2].output
            raise ZeroDivisionError("boom")
        return a

    inner = tiny_mlp()
    model = NNsight(inner)
    with pytest.raises(ZeroDivisionError):
        boom(model, x_input())
    assert_no_hooks(model)
    assert torch.equal(model(x_input()), tiny_mlp()(x_input()))


# -- late requests: at once during generation, at the end of a single pass ----------------


@intervene
def late_in_generation(model, ids, i):
    with model.generate(ids, max_new_tokens=3, do_sample=False):
        late = model.model.layers[1].output.save()
        early = model.model.layers[i].output.save()  # LATE-IN-GENERATION
    return late, early


def test_late_request_during_generation_is_stopped_at_once():
    # Waiting would hand the request the next step's value: it must fail instead.
    from runtime import LanguageModel
    from runtime.models import tiny_llama

    lm = LanguageModel(tiny_llama(0), tokenizer=None)
    with pytest.raises(OutOfOrderError) as info:
        late_in_generation(lm, torch.tensor([[1, 5, 7, 9]]), 0)
    assert "`model.model.layers[0].output`" in str(info.value)
    assert info.value.line == line_of("LATE-IN-GENERATION")
    assert traceback.extract_tb(info.value.__traceback__)[-1].lineno == line_of("LATE-IN-GENERATION")
    assert_no_hooks(lm)


@intervene
def late_in_one_pass(model, x, i):
    with model.trace(x):
        late = model.layers[3].output.save()
        early = model.layers[i].output.save()  # LATE-IN-ONE-PASS
    return late, early


def test_late_request_in_one_pass_is_reported_at_its_line():
    model = NNsight(tiny_mlp())
    with pytest.raises(OutOfOrderError) as info:
        late_in_one_pass(model, x_input(), 1)
    assert info.value.line == line_of("LATE-IN-ONE-PASS")
    assert traceback.extract_tb(info.value.__traceback__)[-1].lineno == line_of("LATE-IN-ONE-PASS")
    assert_no_hooks(model)


class _Twice(nn.Module):
    """Calls the same module twice in one forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.other = nn.Linear(4, 4)

    def forward(self, x):
        return self.shared(self.other(self.shared(x)))


@intervene
def second_call(model, x):
    with model.trace(x):
        first = model.shared.output.save()
        between = model.other.output.save()
        again = model.shared.output.save()
    return first, between, again


def test_a_module_called_twice_serves_its_next_call():
    net = _Twice()
    model = NNsight(net)
    x = torch.randn(2, 4)
    # Twice: the second run has learned the model's order, and a module called
    # twice must not make that order reject the experiment.
    for _ in range(2):
        first, between, again = second_call(model, x)
        a = net.shared(x)
        b = net.other(a)
        assert torch.equal(first, a) and torch.equal(between, b)
        assert torch.equal(again, net.shared(b))
        assert_no_hooks(net)
