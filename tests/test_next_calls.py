"""``module.next()``: later calls of a module called several times in one forward pass.

``m.output`` is the call a plain request gets (the one being handed out, else the next
call); ``m.next(n).output`` (or ``.next()`` n times) is n calls after that one.  Checked
against plain forward hooks that record every call of a shared ``Linear`` applied three
times in one forward.
"""

from __future__ import annotations

import pytest
import torch
from support import SharedLinear, assert_no_hooks, lin_calls, seeded, x_input

from compiler import intervene
from runtime import NNsight
from runtime.errors import MissedCheckpointError, NotInTraceError

CALLS = 3


@pytest.fixture
def net():
    module = seeded(SharedLinear, CALLS)
    yield module
    assert_no_hooks(module)


@pytest.fixture
def x():
    return x_input(batch=2, hidden=4)


@intervene
def each_call(model, x):
    with model.trace(x):
        a = model.lin.output.save()
        b = model.lin.next().output.save()
        c = model.lin.next().output.save()
    return a, b, c


def test_next_walks_the_calls_in_order(net, x):
    seen, _ = lin_calls(net, x)
    model = NNsight(net)
    for _ in range(2):  # the second run has learned the model's order
        with torch.no_grad():
            got = each_call(model, x)
        for value, (_, out) in zip(got, seen):
            assert torch.equal(value, out)


@intervene
def skipping(model, x):
    with model.trace(x):
        first_later = model.lin.next().output.save()  # nothing read yet: call 1
    with model.trace(x):
        two = model.lin.next(2).output.save()
    with model.trace(x):
        chained = model.lin.next().next().output.save()
    return first_later, two, chained


def test_next_before_any_read_and_next_n(net, x):
    seen, _ = lin_calls(net, x)
    with torch.no_grad():
        first_later, two, chained = skipping(NNsight(net), x)
    assert torch.equal(first_later, seen[1][1])
    assert torch.equal(two, seen[2][1]) and torch.equal(chained, seen[2][1])


@intervene
def inputs_and_outputs(model, x):
    with model.trace(x):
        out0 = model.lin.output.save()
        in1 = model.lin.next().input.save()  # the next call's input
        out1 = model.lin.output.save()  # the call being handed out now: call 1
        in2 = model.lin.next().input.save()
    return out0, in1, out1, in2


def test_next_input_after_an_output(net, x):
    seen, _ = lin_calls(net, x)
    with torch.no_grad():
        out0, in1, out1, in2 = inputs_and_outputs(NNsight(net), x)
    assert torch.equal(out0, seen[0][1])
    assert torch.equal(in1, seen[1][0]) and torch.equal(out1, seen[1][1])
    assert torch.equal(in2, seen[2][0])


@intervene
def write_second(model, x, zero):
    with model.trace(x):
        h = model.lin.next().output  # call 1, being handed out
        model.lin.output = h * 0  # the call being handed out: call 1
        y = model.output.save()
    with model.trace(x):
        model.lin.next().output = zero  # nothing read yet: call 1
        y2 = model.output.save()
    with model.trace(x):
        h = model.lin.next().output  # call 1
        model.lin.next().output = h * 0  # the call after it: call 2
        y3 = model.output.save()
    return y, y2, y3


def test_write_to_a_later_call(net, x):
    _, want = lin_calls(net, x, edit=lambda i, out: out * 0 if i == 1 else None)
    _, want_third = lin_calls(net, x, edit=lambda i, out: out * 0 if i == 2 else None)
    _, plain = lin_calls(net, x)
    with torch.no_grad():
        y, y2, y3 = write_second(NNsight(net), x, torch.zeros(2, 4))
    assert torch.equal(y, want) and not torch.equal(y, plain)
    assert torch.equal(y2, want)
    assert torch.equal(y3, want_third) and not torch.equal(y3, want)


@intervene
def invokes(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            a = model.lin.next(2).output.save()
        with tracer.invoke(x2):
            b = model.lin.output.save()
            c = model.lin.next().output.save()
    return a, b, c


def test_next_in_invokes(net, x):
    seen, _ = lin_calls(net, x)  # x's two rows, batched as the two invokes are
    with torch.no_grad():
        a, b, c = invokes(NNsight(net), x[:1], x[1:])
    assert torch.equal(a, seen[2][1][:1])
    assert torch.equal(b, seen[0][1][1:]) and torch.equal(c, seen[1][1][1:])


@intervene
def too_far(model, x):
    with model.trace(x):
        y = model.lin.output.save()
        z = model.lin.next(3).output.save()  # TOO-FAR
    return y, z


def test_next_past_the_last_call_is_an_error(net, x):
    with pytest.raises(MissedCheckpointError) as info, torch.no_grad():
        too_far(NNsight(net), x)
    msg = str(info.value)
    assert "`model.lin.next(3).output`" in msg
    assert "was not called 3 more time(s) in this forward pass" in msg
    assert info.value.line == _line("TOO-FAR")


def _line(marker: str) -> int:
    from pathlib import Path

    lines = Path(__file__).read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if text.rstrip().endswith("# " + marker))


def test_next_takes_a_positive_int(net):
    model = NNsight(net)
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match=r"`model.lin.next\(n\)` takes a positive int"):
            model.lin.next(bad)


def test_next_outside_a_trace(net):
    model = NNsight(net)
    with pytest.raises(NotInTraceError):
        model.lin.next().output  # noqa: B018
    assert "next(1)" in repr(model.lin.next())


@intervene
def next_in_generate(lm, ids):
    with lm.generate(ids, max_new_tokens=3) as tracer:  # noqa: SIM117 - a step block inside the generate block
        with tracer.iter[0]:
            later = lm.model.layers[0].next().output.save()
    return later


def test_next_in_a_generate_block_counts_calls_across_steps():
    from runtime import LanguageModel
    from runtime.models import tiny_llama

    lm = LanguageModel(tiny_llama(0), tokenizer=None)
    ids = torch.tensor([[5, 6, 7]])
    seen = []
    layer = lm._module.model.layers[0]
    h = layer.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        with torch.no_grad():
            lm._module.generate(ids, max_new_tokens=3, do_sample=False)
    finally:
        h.remove()
    with torch.no_grad():
        later = next_in_generate(lm, ids)
    assert later.shape[1] == 1  # step 1's call (one new token), not the prompt's
    assert torch.equal(later, seen[1])
    assert_no_hooks(lm._module)
