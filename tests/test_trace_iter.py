"""``tracer.iter[...]`` / ``tracer.all()`` inside a plain trace (issue 13): iteration i of
the step block reads call i of each module named in it (each module's calls counted
separately, as nnsight counts a module's iterations in a trace).

Checked against plain forward hooks that record (and edit) every call of a ``Linear``
applied four times in one forward, and on a tiny Llama where nothing repeats.
"""

from __future__ import annotations

import pytest
import torch
from support import SharedLinear, assert_no_hooks, lin_calls, seeded, x_input

from compiler import intervene
from runtime import LanguageModel, NNsight, save
from runtime.errors import MissedCheckpointError, OutOfOrderError
from runtime.models import tiny_llama

CALLS = 4


class Uneven(torch.nn.Module):
    """``lin`` four times, ``act`` after the first three only: counts that differ."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.act = torch.nn.Tanh()

    def forward(self, x):
        for i in range(CALLS):
            x = self.lin(x)
            if i < CALLS - 1:
                x = self.act(x)
        return x


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # as the plain hooks run
        yield


@pytest.fixture
def net():
    module = seeded(SharedLinear, CALLS)
    yield module
    assert_no_hooks(module)


@pytest.fixture
def x():
    return x_input(batch=2, hidden=4)


def _equal(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# -- reads ---------------------------------------------------------------------------------


@intervene
def first_three(model, x):
    with model.trace(x) as tracer:
        outs = [].save()
        with tracer.iter[0:3]:
            outs.append(model.lin.output)
    with model.trace(x) as tracer:
        loop = [].save()
        steps = [].save()
        for step in tracer.iter[0:3]:
            steps.append(step)
            loop.append(model.lin.output)
    return outs, loop, steps


def test_a_slice_reads_those_calls(net, x):
    seen, _ = lin_calls(net, x)
    model = NNsight(net)
    for _ in range(2):  # the second run has learned the model's order
        outs, loop, steps = first_three(model, x)
        _equal(outs, [out for _, out in seen[:3]])
        _equal(loop, [out for _, out in seen[:3]])
        assert steps == [0, 1, 2]


@intervene
def selections(model, x):
    with model.trace(x) as tracer:
        one = [].save()
        with tracer.iter[2]:
            one.append(model.lin.output)
    with model.trace(x) as tracer:
        picked = [].save()
        with tracer.iter[[1, 3]]:
            picked.append(model.lin.output)
    with model.trace(x) as tracer:
        strided = [].save()
        with tracer.iter[0:4:2]:
            strided.append(model.lin.output)
    with model.trace(x) as tracer:
        inputs = [].save()
        with tracer.iter[1:3]:
            inputs.append(model.lin.input)
    return one, picked, strided, inputs


def test_an_int_a_list_a_stride_and_inputs(net, x):
    seen, _ = lin_calls(net, x)
    one, picked, strided, inputs = selections(NNsight(net), x)
    _equal(one, [seen[2][1]])
    _equal(picked, [seen[1][1], seen[3][1]])
    _equal(strided, [seen[0][1], seen[2][1]])
    _equal(inputs, [seen[1][0], seen[2][0]])


@intervene
def open_ended(model, x):
    with model.trace(x) as tracer:
        every = [].save()
        with tracer.iter[:]:
            every.append(model.lin.output)
        after = save(len(every))  # runs once the block is over
    with model.trace(x) as tracer:
        late = [].save()
        for step in tracer.iter[2:]:
            late.append(model.lin.output)
    with model.trace(x) as tracer:
        each = [].save()
        for step in tracer.all():
            each.append(model.lin.output)
        y = model.output.save()  # after an open block: only once the forward is over
    return every, after, late, each, y


def test_open_selections_run_for_every_call_that_happens(net, x):
    seen, want = lin_calls(net, x)
    every, after, late, each, y = open_ended(NNsight(net), x)
    _equal(every, [out for _, out in seen])
    assert after == CALLS
    _equal(late, [out for _, out in seen[2:]])
    _equal(each, [out for _, out in seen])
    assert torch.equal(y, want)


@intervene
def blocks_in_a_row(model, x):
    with model.trace(x) as tracer:
        first = [].save()
        with tracer.iter[0:2]:
            first.append(model.lin.output)
        between = save(len(first))  # right after call 1
        second = [].save()
        with tracer.iter[2:4]:
            second.append(model.lin.output)
        y = model.head.output.save()  # after the last selected call: served as usual
    return first, between, second, y


def test_step_blocks_one_after_another_and_code_after_them(net, x):
    seen, want = lin_calls(net, x)
    first, between, second, y = blocks_in_a_row(NNsight(net), x)
    _equal(first, [seen[0][1], seen[1][1]])
    assert between == 2
    _equal(second, [seen[2][1], seen[3][1]])
    assert torch.equal(y, want)


@intervene
def broken_off(model, x):
    with model.trace(x) as tracer:
        outs = [].save()
        for step in tracer.iter[:]:
            if step == 2:
                break
            outs.append(model.lin.output)
        y = model.head.output.save()  # the block was left by `break`: read as usual
    return outs, y


def test_break_leaves_the_step_block(net, x):
    seen, want = lin_calls(net, x)
    outs, y = broken_off(NNsight(net), x)
    _equal(outs, [seen[0][1], seen[1][1]])
    assert torch.equal(y, want)


@intervene
def scanned(model, x):
    with model.scan(x) as tracer:
        shapes = [].save()
        with tracer.iter[1:3]:
            shapes.append(model.lin.output.shape)
    return shapes


def test_a_scan_counts_calls_too(net, x):
    assert scanned(NNsight(net), x) == [x.shape, x.shape]


@intervene
def next_inside(model, x):
    with model.trace(x) as tracer:
        pairs = [].save()
        with tracer.iter[0:3]:
            pairs.append((model.lin.output, model.lin.next().output))
    return pairs


def test_next_inside_a_step_block_is_the_call_after(net, x):
    seen, _ = lin_calls(net, x)
    pairs = next_inside(NNsight(net), x)
    assert len(pairs) == 3
    for i, (a, b) in enumerate(pairs):
        assert torch.equal(a, seen[i][1]) and torch.equal(b, seen[i + 1][1])


# -- writes --------------------------------------------------------------------------------


@intervene
def zero_second(model, x):
    with model.trace(x) as tracer:
        with tracer.iter[1]:
            model.lin.output[:] = 0
        y = model.output.save()
    return y


@intervene
def double_middle(model, x):
    with model.trace(x) as tracer:
        with tracer.iter[1:3]:
            model.lin.output = model.lin.output * 2
        y = model.output.save()
    return y


@intervene
def scale_all(model, x):
    with model.trace(x) as tracer:
        for step in tracer.all():
            model.lin.output[:] *= step + 1
        y = model.output.save()
    return y


def test_writes_go_to_the_selected_calls(net, x):
    _, plain = lin_calls(net, x)
    _, want = lin_calls(net, x, edit=lambda i, out: out * 0 if i == 1 else None)
    _, want2 = lin_calls(net, x, edit=lambda i, out: out * 2 if i in (1, 2) else None)
    _, want3 = lin_calls(net, x, edit=lambda i, out: out * (i + 1))
    model = NNsight(net)
    y, y2, y3 = zero_second(model, x), double_middle(model, x), scale_all(model, x)
    assert torch.equal(y, want) and not torch.equal(y, plain)
    assert torch.equal(y2, want2)
    assert torch.equal(y3, want3)


# -- invokes --------------------------------------------------------------------------------


@intervene
def with_invokes(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            reads = [].save()
            with tracer.iter[0:3]:
                reads.append(model.lin.output)
        with tracer.invoke(b):
            with tracer.iter[1]:
                model.lin.output[:] = 0
            y = model.output.save()
    return reads, y


def test_step_blocks_in_invokes_count_the_batch_calls_on_their_rows(net, x):
    a, b = x[:1], x[1:]

    def zero_rows_of_b(i, out):
        if i != 1:
            return None
        out = out.clone()
        out[1:] = 0
        return out

    seen, want = lin_calls(net, torch.cat([a, b]), edit=zero_rows_of_b)
    reads, y = with_invokes(NNsight(net), a, b)
    # invoke 0's rows are untouched by invoke 1's write (rows are separate)
    _equal(reads, [out[:1] for _, out in seen[:3]])
    assert torch.equal(y, want[1:])


# -- errors: a selected call that never comes, a call that has passed ------------------------


@intervene
def too_many(model, x):
    with model.trace(x) as tracer:
        outs = [].save()
        with tracer.iter[0:6]:
            outs.append(model.lin.output)  # CALL-TOO-FAR
    return outs


def test_a_selected_call_that_never_comes_is_an_error_at_the_line(net, x):
    with pytest.raises(MissedCheckpointError) as info:
        too_many(NNsight(net), x)
    msg = str(info.value)
    line = too_many.plan.functions[0].blocks[0].lanes[0].checkpoints[0].line
    assert f"`model.lin.output` of call {CALLS} is asked for at line {line}" in msg
    assert f"ran only {CALLS} time(s)" in msg and "tracer.iter[0:6]" in msg
    assert "an open selection" in msg
    assert info.value.line == line
    assert any(fr.lineno == line for fr in _frames(info.value))


def _frames(exc):
    import traceback

    return traceback.extract_tb(exc.__traceback__)


@intervene
def once_only(model, x):
    with model.trace(x) as tracer:
        heads = [].save()
        with tracer.iter[0:2]:
            heads.append(model.head.output)
    return heads


def test_a_module_called_once_has_only_call_zero(net, x):
    with pytest.raises(MissedCheckpointError,
                       match=r"`model.head.output` of call 1 .* ran only 1 time\(s\)"):
        once_only(NNsight(net), x)


@intervene
def partial_iteration(model, x):
    with model.trace(x) as tracer:
        pairs = [].save()
        with tracer.iter[:]:
            h = model.lin.output
            pairs.append((h, model.act.output))
    return pairs


def test_an_open_selection_never_ends_halfway_through_an_iteration():
    # `act` runs once less than `lin`: iteration 3 gets lin's call 3, then waits for
    # act's call 3, which never comes: an error, never a quiet half iteration.
    model = NNsight(seeded(Uneven))
    x = torch.randn(2, 4)
    with pytest.raises(MissedCheckpointError, match=r"`model.act.output` of call 3 .* ran only 3"):
        partial_iteration(model, x)
    assert_no_hooks(model)


@intervene
def passed(model, x):
    with model.trace(x) as tracer:
        a = model.lin.next(2).output.save()  # call 2
        with tracer.iter[1]:
            b = model.lin.output.save()  # call 1: already passed
    return a, b


def test_a_call_that_has_passed_is_an_out_of_order_error(net, x):
    with pytest.raises(OutOfOrderError,
                       match=r"`model.lin.output` of call 1 .* had already run 3 time\(s\)"):
        passed(NNsight(net), x)


@intervene
def after_open(model, x):
    with model.trace(x) as tracer:
        with tracer.all():
            model.lin.output[:] *= 2
        y = model.head.output.save()  # HEAD-AFTER-OPEN
    return y


def test_a_module_read_after_an_open_block_says_why(net, x):
    with pytest.raises(OutOfOrderError) as info:
        after_open(NNsight(net), x)
    line = after_open.plan.functions[0].blocks[0].lanes[0].checkpoints[-1].line
    block = line - 2
    msg = str(info.value)
    assert f"`model.head.output` is asked for at line {line}" in msg
    assert f"the open step block at line {block} took every call of the forward pass" in msg
    assert "`tracer.iter[0:4]`" in msg


@intervene
def act_of(model):  # a helper: its module is named only as it runs
    return model.act.output


@intervene
def named_late(model, x, name):
    with model.trace(x) as tracer:
        outs = [].save()
        with tracer.iter[0:3]:
            h = model.lin.output
            outs.append((h, getattr(model, name).output, act_of(model)))
    return outs


def _act_calls(net, x):
    seen = []
    h = net.act.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        net(x)
    finally:
        h.remove()
    return seen


def test_a_variable_path_or_a_helper_in_a_step_block_counts_from_the_start():
    # `act` is named through a variable and in a helper: modules known only while the
    # forward runs are counted all the same (every module is watched in such a trace).
    net = seeded(Uneven)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    acts = _act_calls(net, x)
    lins = []
    h = net.lin.register_forward_hook(lambda mod, args, out: lins.append(out))
    try:
        net(x)
    finally:
        h.remove()
    outs = named_late(NNsight(net), x, "act")
    assert len(outs) == 3
    for i, (lin, act, helper) in enumerate(outs):
        assert torch.equal(lin, lins[i]) and torch.equal(act, acts[i])
        assert torch.equal(helper, acts[i])
    assert_no_hooks(net)


@intervene
def other_model(model, other, x):
    with model.trace(x) as tracer:
        outs = [].save()
        with tracer.iter[0:2]:
            outs.append(model.lin.output)
            outs.append(other.lin.output)  # OTHER-MODEL
    return outs


def test_a_module_of_another_model_in_a_step_block_is_an_error(net, x):
    other = NNsight(seeded(SharedLinear, CALLS))
    with pytest.raises(OutOfOrderError) as info:
        other_model(NNsight(net), other, x)
    msg = str(info.value)
    line = other_model.plan.functions[0].blocks[0].lanes[0].checkpoints[1].line
    # (the path as an envoy carries it: rooted at `model`)
    assert f"`model.lin.output` (call 0) is asked for at line {line} in the step block" in msg
    assert info.value.line == line
    assert "was not watched from the start of the forward pass" in msg
    assert "is this one of another model?" in msg
    assert_no_hooks(other)


@intervene
def negative(model, x):
    with model.trace(x) as tracer:  # noqa: SIM117 - a step block inside the trace
        with tracer.iter[-1]:
            h = model.lin.output.save()
    return h


def test_a_negative_selection_is_refused(net, x):
    with pytest.raises(ValueError, match="negative"):
        negative(NNsight(net), x)


def test_traces_without_step_blocks_count_nothing(net, x):
    """No call counting (and so no cost per call) where no step block asks for it."""
    from runtime import interleave

    made = []
    real = interleave.Interleaver.count_calls

    def spy(self):
        made.append(self)
        real(self)

    interleave.Interleaver.count_calls = spy
    try:
        first_three(NNsight(net), x)
        assert len(made) == 2
        seen, _ = lin_calls(net, x)

        @intervene
        def plain(model, x):
            with model.trace(x):
                h = model.lin.output.save()
            return h

        assert torch.equal(plain(NNsight(net), x), seen[0][1])
        assert len(made) == 2
    finally:
        interleave.Interleaver.count_calls = real


# -- a model where nothing repeats -----------------------------------------------------------


@intervene
def llama_steps(model, ids):
    with model.trace(ids) as tracer:
        with tracer.iter[0]:
            h = model.model.layers[0].output.save()
        every = [].save()
        with tracer.iter[:]:
            every.append(model.model.layers[1].output)
        logits = model.output.logits.save()  # the model's output comes after every call
    return h, every, logits


@intervene
def llama_two(model, ids):
    with model.trace(ids) as tracer:  # noqa: SIM117 - a step block inside the trace
        with tracer.iter[0:2]:
            h = model.model.layers[0].output.save()
    return h


def test_tiny_llama_where_each_module_runs_once():
    lm = LanguageModel(tiny_llama(0), tokenizer=None)
    ids = torch.tensor([[1, 5, 9, 2]])
    seen = {}
    mods = {"0": lm._module.model.layers[0], "1": lm._module.model.layers[1]}
    handles = [m.register_forward_hook(lambda mod, a, out, k=k: seen.setdefault(k, out))
               for k, m in mods.items()]
    try:
        want = lm._module(ids).logits
    finally:
        for h in handles:
            h.remove()
    h, every, logits = llama_steps(lm, ids)
    assert torch.equal(h if isinstance(h, torch.Tensor) else h[0],
                       seen["0"] if isinstance(seen["0"], torch.Tensor) else seen["0"][0])
    assert len(every) == 1
    assert torch.equal(logits, want)
    with pytest.raises(MissedCheckpointError,
                       match=r"`model.model.layers\[0\].output` of call 1 .* ran only 1 time"):
        llama_two(lm, ids)
    assert_no_hooks(lm._module)


# -- the plan --------------------------------------------------------------------------------


def test_the_plan_shows_the_call_selection():
    text = first_three.plan.render() if hasattr(first_three.plan, "render") else None
    if text is None:
        from compiler.plan import render_text

        text = render_text(first_three.plan)
    assert "-- steps [0:3] (calls of each module)" in text
    rows = [ln for ln in text.splitlines() if "lin" in ln and "output" in ln]
    assert len(rows) == 2 and all("calls [0:3]" in ln for ln in rows)
    assert "end-steps" not in text  # code after a trace's step block does not wait
    kinds = [getattr(i, "kind", None) for i in first_three.plan.functions[0].blocks[0].lanes[0].items]
    assert kinds.count("steps") == 1


# -- without the decorator -----------------------------------------------------------------


def test_undecorated_block(net, x):
    seen, _ = lin_calls(net, x)
    model = NNsight(net)

    def run():
        with model.trace(x) as tracer:
            outs = [].save()
            with tracer.iter[1:3]:
                outs.append(model.lin.output)
        return outs

    _equal(run(), [seen[1][1], seen[2][1]])


# -- a negative selection: the message speaks of calls in a trace, of steps in generate ------


@intervene
def negative_slice(model, x):
    with model.trace(x) as tracer:  # noqa: SIM117 - a step block inside the trace
        with tracer.iter[-2:]:
            h = model.lin.output.save()
    return h


@intervene
def negative_generate(model, ids):
    with model.generate(ids, max_new_tokens=2) as tracer:  # noqa: SIM117
        with tracer.iter[-1]:
            h = model.model.layers[0].output.save()
    return h


def test_a_negative_selection_in_a_trace_speaks_of_calls_of_each_module(net, x):
    import re

    for fn, shown in ((negative, r"tracer.iter\[-1\]"), (negative_slice, r"tracer.iter\[-2:\]")):
        with pytest.raises(ValueError) as info:
            fn(NNsight(net), x)
        msg = str(info.value)
        assert re.match(shown + ": in a trace a step block selects calls of each module", msg)
        assert "known only once the forward pass has ended" in msg
        assert "select calls by their number from 0" in msg
        assert "generation" not in msg and "prompt" not in msg
    assert_no_hooks(net)
    lm = LanguageModel(tiny_llama(0), tokenizer=None)
    with pytest.raises(ValueError, match=r"tracer.iter\[-1\]: negative steps count from the end "
                       r"of generation.*\(step 0 is the prompt\)") as info:
        negative_generate(lm, torch.tensor([[1, 5, 9]]))
    assert "calls of each module" not in str(info.value)
    assert_no_hooks(lm._module)
