"""Compiler hardening (issue 10): decorators under ``@intervene``, ``match``/``try`` scopes,
``with`` statements with several items, module values as unpacking / loop targets,
``@intervene`` twice, and the user's line numbers in notebook cells."""

from __future__ import annotations

import functools
import inspect
import linecache
import sys
import traceback
from pathlib import Path

import pytest
import torch
from support import assert_no_hooks, forward_hooks, line_in, x_input

from compiler import CompileError, intervene
from runtime import NNsight, OutOfOrderError
from runtime.models import tiny_mlp

THIS_FILE = Path(__file__).resolve()


def line_of(marker: str) -> int:
    return line_in(THIS_FILE, marker)


@pytest.fixture
def model():
    return NNsight(tiny_mlp())


def plain_outputs(model, x, *modules):
    """Outputs of ``modules`` (of the wrapped torch module) in a plain forward with hooks."""
    got = {}
    with forward_hooks(out={m: (lambda m, a, o: got.__setitem__(m, o)) for m in modules}):
        model._module(x)
    return [got[m] for m in modules]


def scopes(fn, block=0, lane=0):
    return [(c.path, c.scope) for c in fn.plan.functions[0].blocks[block].lanes[lane].checkpoints]


# --------------------------------------------------------------------------------------
# Decorators below @intervene are applied to the compiled function
# --------------------------------------------------------------------------------------


def test_no_grad_below_intervene_is_applied(model, keep_grad_mode):
    @intervene
    @torch.no_grad()
    def experiment(model, x):
        grad = [torch.is_grad_enabled()]
        with model.trace(x):
            hidden = model.layers[1].output.save()
        return hidden, grad

    hidden, grad = experiment(model, x_input())
    assert grad == [False]
    assert not hidden.requires_grad  # the model ran under no_grad, as the decorator says
    assert torch.is_grad_enabled()
    (expected,) = plain_outputs(model, x_input(), model._module.layers[1])
    assert torch.equal(hidden, expected)
    assert experiment.__name__ == "experiment" and experiment.plan.functions[0].blocks
    assert_no_hooks(model)


def counting(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        return fn(*args, **kwargs)

    wrapper.calls = 0
    return wrapper


def test_custom_wrappers_below_intervene_wrap_the_compiled_function(model):
    order = []

    def tag(name):
        def deco(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                order.append(name)
                return fn(*args, **kwargs)
            return wrapper
        return deco

    @intervene
    @counting
    @tag("outer")
    @tag("inner")
    def experiment(model, x):
        with model.trace(x):
            model.layers[0].output[:] = 0
            logits = model.head.output.save()
        return logits

    first = experiment(model, x_input())
    experiment(model, x_input())
    assert experiment.calls == 2  # the counter wraps what the user calls
    assert order == ["outer", "inner"] * 2  # applied in the order written
    # The body is the compiled one (the write happened), not the original function.
    seen = {}
    with forward_hooks(out={model._module.layers[0]: lambda m, a, o: torch.zeros_like(o),
                            model._module.head: lambda m, a, o: seen.setdefault("o", o)}):
        model._module(x_input())
    assert torch.equal(first, seen["o"])


def test_decorator_under_an_alias_of_intervene(model):
    iv = intervene

    @iv
    @counting
    def experiment(model, x):
        with model.trace(x):
            hidden = model.layers[2].output.save()
        return hidden

    hidden = experiment(model, x_input())
    assert experiment.calls == 1
    (expected,) = plain_outputs(model, x_input(), model._module.layers[2])
    assert torch.equal(hidden, expected)


def test_decorator_that_cannot_be_evaluated_again_is_a_compile_error():
    made = []

    def once():
        if made:
            raise RuntimeError("made twice")
        made.append(1)
        return counting

    with pytest.raises(CompileError) as err:
        @intervene
        @once()  # the bad decorator
        def experiment(model, x):
            with model.trace(x):
                hidden = model.layers[2].output.save()
            return hidden

    assert err.value.lineno == line_of("# the bad decorator")
    assert err.value.message == (
        "the decorator `@once()` below `@intervene` could not be evaluated again to wrap "
        "the compiled function (RuntimeError: made twice): put `@intervene` directly above "
        "`def`, with `@once()` above it"
    )


def hiding(fn):
    def wrapper(*args, **kwargs):  # no functools.wraps: the function is hidden
        return fn(*args, **kwargs)
    return wrapper


def test_wrapper_hiding_the_function_is_a_compile_error():
    with pytest.raises(CompileError) as err:
        @intervene  # over a hiding wrapper
        @hiding
        def experiment(model, x):
            with model.trace(x):
                hidden = model.layers[2].output.save()
            return hidden

    wrapper_line = line_of("# no functools.wraps: the function is hidden")
    assert (err.value.filename, err.value.lineno) == (str(THIS_FILE),
                                                       line_of("# over a hiding wrapper"))
    assert err.value.message == (
        f"@intervene was given `hiding.<locals>.wrapper` ({THIS_FILE}:{wrapper_line}), not "
        "the function written under it: a decorator below @intervene returned a wrapper "
        "without `functools.wraps`; use `functools.wraps` in that decorator, or put it above "
        "@intervene"
    )


def test_intervene_called_as_a_function_compiles_what_it_is_given(model):
    def experiment(model, x):
        with model.trace(x):
            hidden = model.layers[2].output.save()
        return hidden

    compiled = intervene(experiment)
    (expected,) = plain_outputs(model, x_input(), model._module.layers[2])
    assert torch.equal(compiled(model, x_input()), expected)


def test_intervene_twice_is_once(model):
    @intervene
    @intervene
    def experiment(model, x):
        with model.trace(x):
            hidden = model.layers[1].output.save()
        return hidden

    once = intervene(experiment)
    assert once is experiment
    (expected,) = plain_outputs(model, x_input(), model._module.layers[1])
    assert torch.equal(experiment(model, x_input()), expected)


def test_intervene_over_a_wrapped_compiled_function(model, keep_grad_mode):
    @intervene
    @torch.no_grad()
    @intervene
    def experiment(model, x):
        with model.trace(x):
            hidden = model.layers[1].output.save()
        return hidden

    assert not experiment(model, x_input()).requires_grad


# --------------------------------------------------------------------------------------
# match / case and try / except arms are scopes, like if / else
# --------------------------------------------------------------------------------------


def test_match_cases_are_scopes_and_run(model):
    @intervene
    def experiment(model, x, which):
        with model.trace(x):
            match which:
                case "late":
                    hidden = model.layers[3].output.save()
                case _:
                    hidden = model.layers[0].output.save()
        return hidden

    late_line, other_line = line_of('case "late":'), line_of("case _:")
    assert scopes(experiment) == [("model.layers[3]", (f"case@{late_line}",)),
                                  ("model.layers[0]", (f"case@{other_line}",))]
    late, early = plain_outputs(model, x_input(), model._module.layers[3], model._module.layers[0])
    assert torch.equal(experiment(model, x_input(), "late"), late)
    assert torch.equal(experiment(model, x_input(), "early"), early)


def test_match_case_guard_and_body_are_checked_before_running(model):
    @intervene
    def experiment(model, x, which):
        with model.trace(x):
            match which:
                case 1 if model.layers[2].output.sum() > -1e9:
                    hidden = model.layers[0].output.save()  # asked for after layer 2
        return hidden

    with pytest.raises(OutOfOrderError, match=r"line " + str(line_of("asked for after layer 2"))):
        experiment(model, x_input(), 1)
    assert_no_hooks(model)


def test_try_except_else_finally_are_scopes(model):
    @intervene
    def experiment(model, x, fail):
        with model.trace(x):
            try:  # the try
                if fail:
                    raise ValueError("no")
                hidden = model.layers[3].output.save()
            except ValueError:  # the handler
                hidden = model.layers[0].output.save()
            else:
                later = model.head.output.save()
            finally:
                last = model.head.output.save()
        return hidden, last, later if not fail else None

    try_line, handler_line = line_of("# the try"), line_of("# the handler")
    assert scopes(experiment) == [
        ("model.layers[3]", (f"try@{try_line}",)),
        ("model.layers[0]", (f"except@{handler_line}",)),
        ("model.head", (f"try-else@{try_line}",)),
        ("model.head", (f"finally@{try_line}",)),
    ]
    late, early, head = plain_outputs(model, x_input(), model._module.layers[3],
                                      model._module.layers[0], model._module.head)
    hidden, last, later = experiment(model, x_input(), False)
    assert torch.equal(hidden, late) and torch.equal(last, head) and torch.equal(later, head)
    hidden, last, _ = experiment(model, x_input(), True)
    assert torch.equal(hidden, early) and torch.equal(last, head)


def test_a_real_wrong_order_through_except_is_caught_while_running(model):
    @intervene
    def experiment(model, x):
        with model.trace(x):
            try:
                late = model.layers[3].output.save()
                raise ValueError("then go back")
            except ValueError:
                early = model.layers[0].output.save()  # too late
        return late, early

    with pytest.raises(OutOfOrderError) as err:
        experiment(model, x_input())
    assert "`model.layers[0].output`" in str(err.value)  # as the block spells it
    frames = [f for f in traceback.extract_tb(err.value.__traceback__) if f.filename == str(THIS_FILE)]
    assert frames[-1].lineno == line_of("# too late")
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------
# `with model.trace(x), other():`
# --------------------------------------------------------------------------------------


def test_trace_with_no_grad_in_one_with(model, keep_grad_mode):
    @intervene
    def together(model, x):
        with model.trace(x) as tracer, torch.no_grad():
            grad = [torch.is_grad_enabled()].save()
            hidden = model.layers[1].output.save()
            doubled = (model.layers[2].output * 2).save()
        return hidden, doubled, grad, tracer

    @intervene
    def nested(model, x):
        with model.trace(x):  # noqa: SIM117 - the nested form is the reference
            with torch.no_grad():
                hidden = model.layers[1].output.save()
                doubled = (model.layers[2].output * 2).save()
        return hidden, doubled

    hidden, doubled, grad, _tracer = together(model, x_input())
    assert grad == [False]  # the body ran under no_grad, as Python nests the two
    ref_hidden, ref_doubled = nested(model, x_input())
    assert torch.equal(hidden, ref_hidden) and torch.equal(doubled, ref_doubled)
    assert hidden.requires_grad == ref_hidden.requires_grad
    assert not doubled.requires_grad
    assert torch.is_grad_enabled()
    assert_no_hooks(model)


def test_no_grad_then_trace_in_one_with(model, keep_grad_mode):
    @intervene
    def experiment(model, x):
        with torch.no_grad(), model.trace(x):
            hidden = model.layers[1].output.save()
        return hidden

    hidden = experiment(model, x_input())
    assert not hidden.requires_grad  # the whole trace (the forward too) ran under no_grad
    (expected,) = plain_outputs(model, x_input(), model._module.layers[1])
    assert torch.equal(hidden, expected)
    assert torch.is_grad_enabled()


def test_invoke_with_no_grad_in_one_with(model, keep_grad_mode):
    @intervene
    def experiment(model, x):
        with model.trace() as tracer:
            with tracer.invoke(x), torch.no_grad():
                quiet = [torch.is_grad_enabled()].save()
                a = (model.layers[1].output * 1).save()
            with tracer.invoke(x):
                loud = [torch.is_grad_enabled()].save()
                b = (model.layers[1].output * 1).save()
        return quiet, loud, a, b

    quiet, loud, a, b = experiment(model, x_input())
    assert quiet == [False] and loud == [True]
    assert torch.equal(a, b) and not a.requires_grad and b.requires_grad


def test_trace_and_extra_manager_with_invokes_is_refused():
    with pytest.raises(CompileError) as err:
        @intervene
        def experiment(model, x):
            with model.trace() as tracer, torch.no_grad():  # noqa: SIM117 # with invokes
                with tracer.invoke(x):
                    hidden = model.layers[1].output.save()
            return hidden

    assert err.value.lineno == line_of("# with invokes")
    assert err.value.message == (
        "`with model.trace(...), torch.no_grad():` with invokes: the invokes run after this "
        "`with` statement's body, so `torch.no_grad()` would not cover them; write "
        "`with torch.no_grad():` inside each invoke instead"
    )


def test_two_blocks_in_one_with_is_refused():
    with pytest.raises(CompileError) as err:
        @intervene
        def experiment(model, x):
            with model.trace(x), model.trace(x):  # two blocks
                hidden = model.layers[1].output.save()
            return hidden

    assert err.value.lineno == line_of("# two blocks")
    assert err.value.message == (
        "`model.trace(x)` and `model.trace(x)` in one `with` statement: open one trace "
        "block or invoke per `with`, one inside the other's body"
    )


# --------------------------------------------------------------------------------------
# Module values as unpacking / loop / `as` targets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("a, model.layers[0].output = 1, 2",
         ("`model.layers[0].output` as an element of a tuple-unpacking target: a module value "
         "can only be written by an assignment of its own; assign it on a line of its own "
         "(`m.output = value`)")),
        ("[a, *model.layers[0].input] = 1, 2",
         ("`model.layers[0].input` as an element of a tuple-unpacking target: a module value "
         "can only be written by an assignment of its own; assign it on a line of its own "
         "(`m.output = value`)")),
        ("for model.layers[0].output in [1]: pass",
         ("`model.layers[0].output` as a `for` target: a module value can only be written by "
         "an assignment of its own; assign it inside the loop (`for v in ...: m.output = v`)")),
        ("xs = [1 for model.head.output in [1]]",
         ("`model.head.output` as a comprehension's `for` target: a module value can only be "
         "written by an assignment of its own; use a plain variable as the target")),
        ("del model.head.output", "`del ...output`: a module value cannot be deleted"),
        ("del a, model.layers[1].input", "`del ...input`: a module value cannot be deleted"),
        ("model.head.output: torch.Tensor = x",
         ("`model.head.output` with an annotation: a module value cannot be annotated; "
          "write `model.head.output = value` without the annotation")),
        ("with open('f') as model.head.output: pass",
         ("`model.head.output` as an `as` target: a module value can only be written by an "
         "assignment of its own; bind a plain variable and assign it (`m.output = v`) on the "
         "next line")),
    ],
)
def test_module_value_as_a_binding_target_is_a_compile_error(tmp_path, statement, message):
    source = (
        "from compiler import intervene\n"
        "@intervene\n"
        "def experiment(model, x):\n"
        "    with model.trace(x):\n"
        f"        {statement}\n"
    )
    path = tmp_path / "target_case.py"
    path.write_text(source)
    code = compile(source, str(path), "exec")
    with pytest.raises(CompileError) as err:
        exec(code, {"__name__": "target_case"})  # noqa: S102
    assert err.value.message == message
    assert (err.value.filename, err.value.lineno) == (str(path), 5)


def test_in_place_edit_inside_a_tuple_target(model):
    @intervene
    def experiment(model, x):
        with model.trace(x):
            a, model.layers[0].output[:, 0] = 1, 5.0
            a = [a].save()
            hidden = model.layers[0].output.save()
        return a, hidden

    assert [(c.path, c.access) for c in experiment.plan.functions[0].blocks[0].lanes[0]
            .checkpoints] == [("model.layers[0]", "inplace"), ("model.layers[0]", "read")]
    a, hidden = experiment(model, x_input())
    assert a == [1] and torch.all(hidden[:, 0] == 5.0)


def test_annotated_variables_shared_between_invokes(model):
    @intervene
    def experiment(model, x):
        with model.trace() as tracer:
            with tracer.invoke(x):
                first: torch.Tensor = model.layers[0].output
                later: int  # noqa: F842  (an annotation alone, on purpose)
            with tracer.invoke(x):
                both: torch.Tensor = (model.layers[1].output + first).save()
        return both

    first, second = plain_outputs(model, torch.cat([x_input(), x_input()]),
                                  model._module.layers[0], model._module.layers[1])
    assert torch.equal(experiment(model, x_input()), second[3:] + first[:3])


def test_module_values_inside_f_strings(model):
    @intervene
    def experiment(model, x):
        with model.trace(x):
            single = f'{model.layers[0].output.shape[0]}-{model.layers[1].output.sum():.3f}'
            double = f"{model.layers[2].output.shape}"
            nested = f"{f'{3}'} {model.head.output.shape[1]}"
            texts = [single, double, nested].save()
        return texts

    first, second, third = plain_outputs(model, x_input(), model._module.layers[0],
                                         model._module.layers[1], model._module.layers[2])
    assert experiment(model, x_input()) == [
        f"{first.shape[0]}-{second.sum():.3f}", f"{third.shape}", "3 2"]


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="any quotes nest from Python 3.12 on")
def test_module_value_in_f_strings_nested_with_both_quotes_is_a_compile_error():
    with pytest.raises(CompileError) as err:
        @intervene
        def experiment(model, x):
            with model.trace(x):
                text = f"{f'{model.head.output.shape[1]}'}".save()  # both quotes
            return text

    assert err.value.lineno == line_of("# both quotes")
    assert err.value.message == (
        "`.output` inside f-strings nested with both quote kinds: before Python 3.12 the "
        "rewritten code cannot name the value there; read it into a variable first and use "
        "the variable in the f-string"
    )


# --------------------------------------------------------------------------------------
# Notebook cells: the user's line numbers, and %%time cells
# --------------------------------------------------------------------------------------

CELL = '''import torch

@intervene
def experiment(model, x):
    before = 1

    with model.trace(x):
        hidden = model.layers[0].output.save()
        other = 2
        raise ValueError("boom")
    return hidden
'''


def _error_frame(exc: BaseException):
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame


def test_cell_lines_in_tracebacks_and_excerpts(model):
    name = "<ipython-input-1-abc>"
    linecache.cache[name] = (len(CELL), None, CELL.splitlines(True), name)
    try:
        ns = {"intervene": intervene}
        exec(compile(CELL, name, "exec"), ns)  # noqa: S102
        with pytest.raises(ValueError, match="boom") as err:
            ns["experiment"](model, x_input())
        frame = _error_frame(err.value)
        assert frame.f_code.co_filename == name
        assert frame.f_lineno == 10
        assert traceback.extract_tb(err.value.__traceback__)[-1].line == 'raise ValueError("boom")'
        # The lane's code starts at the user's `def` (line 4), so tools that number a
        # frame's lines from its code's first line (IPython's excerpts) find line 10.
        assert frame.f_code.co_firstlineno == 4
        lines, _start = inspect.getsourcelines(frame)
        assert lines[frame.f_lineno - frame.f_code.co_firstlineno].strip() == (
            'raise ValueError("boom")')
        assert_no_hooks(model)
    finally:
        linecache.cache.pop(name, None)


BODY = '''x0 = 1
@intervene
def timed(model, x):
    with model.trace(x):
        hidden = model.layers[0].output.save()
        raise KeyError("timed")
    return hidden
'''


def test_time_magic_cell_source_is_found(model):
    # IPython runs `%%time` cells as get_ipython().run_cell_magic('time', '', body) (that
    # text is in linecache) and compiles the body as "<timed exec>" (which is not).
    cell_name = "<ipython-input-7-ffff>"
    ran = f"get_ipython().run_cell_magic('time', '', {BODY!r})\n"
    linecache.cache[cell_name] = (len(ran), None, [ran], cell_name)
    try:
        ns = {"intervene": intervene}
        exec(compile(BODY, "<timed exec>", "exec"), ns)  # noqa: S102
        timed = ns["timed"]
        assert timed.plan.functions[0].blocks[0].lanes[0].checkpoints[0].line == 5
        with pytest.raises(KeyError) as err:
            timed(model, x_input())
        frame = _error_frame(err.value)
        assert (frame.f_code.co_filename, frame.f_lineno) == ("<timed exec>", 6)
        assert traceback.extract_tb(err.value.__traceback__)[-1].line == 'raise KeyError("timed")'
    finally:
        linecache.cache.pop(cell_name, None)
        linecache.cache.pop("<timed exec>", None)


def test_exec_without_any_source_still_says_why():
    ns = {"intervene": intervene}
    source = BODY.replace("timed", "untimed")
    with pytest.raises(CompileError) as err:
        exec(compile(source, "<string-without-source>", "exec"), ns)  # noqa: S102
    assert err.value.message.startswith(
        "@intervene cannot read the source of untimed() (could not get source code). It "
        "compiles the function from its source"
    )
