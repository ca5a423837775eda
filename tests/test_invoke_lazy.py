"""Invokes started lazily (issue 12): `with tracer.invoke(x): h = model.a[1].output.save()`.

An invoke whose whole code is one module value put in a variable the function shares
is not run as a generator before the pass: the compiler says which variable
(``__iv.invoke(tracer, fn, index, 'h', x)``), ``Interleaver.attach_static`` parks the
lane with the request it would have made, and ``_serve`` sets the variable's cell.
Everything must stay as before: values bit-equal to plain hooks and to the same code
run as a generator, user code before a request still run at trace start, errors at the
user's line, other grad modes, loops, ``tracer.stop()``, the server's tracers.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from support import assert_no_hooks
from torch import nn

from compiler import intervene
from runtime import NNsight
from runtime.errors import MissedCheckpointError
from runtime.interleave import Interleaver
from runtime.models import tiny_mlp


@pytest.fixture
def mlp():
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    yield model
    assert_no_hooks(model._module)


@pytest.fixture
def started(monkeypatch):
    """Which lanes each trace started lazily (in source order), and the lanes woken."""
    seen: dict = {"lazy": [], "woken": 0}
    attach, wake = Interleaver.attach_static, Interleaver._wake

    def attach_static(self, *args, **kwargs):
        try:
            attach(self, *args, **kwargs)
        finally:
            seen["lazy"].append([lane.lazy is not None for lane in self.lanes])

    def _wake(self, lane):
        seen["woken"] += 1
        return wake(self, lane)

    monkeypatch.setattr(Interleaver, "attach_static", attach_static)
    monkeypatch.setattr(Interleaver, "_wake", _wake)
    return seen


def _line_of(marker: str) -> int:
    with open(__file__, encoding="utf-8") as f:
        return next(i for i, text in enumerate(f, 1) if text.rstrip().endswith(marker))


def xs(n: int, rows: int = 2, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 8, generator=g) for _ in range(n)]


def hooked(net, x, module, pre: bool = False):
    """``module``'s output (its first input with ``pre``) for ``x``, by a plain hook."""
    got: list = []
    if pre:
        h = module.register_forward_pre_hook(lambda m, a: got.append(a[0]))
    else:
        h = module.register_forward_hook(lambda m, a, o: got.append(o))
    try:
        net(x)
    finally:
        h.remove()
    return got[0]


# -- the compiled form -------------------------------------------------------------------------


@intervene
def shapes(model, a, b, c, d, e, events):
    with model.trace() as tracer:
        with tracer.invoke(a):
            ha = model.layers[1].output.save()
        with tracer.invoke(b):
            events.append("b starts")  # user code first: started before the pass
            hb = model.layers[1].output.save()
        with tracer.invoke(c):
            hc = model.layers[1].output.clone().save()  # user code after the value
        with tracer.invoke(d):
            hd = model.layers[2].input.save()
        with tracer.invoke(e):
            he = model.layers[2].output
            he = he.save()
    return ha, hb, hc, hd, he


def test_only_lanes_that_just_keep_one_value_start_lazily():
    code = shapes.code
    assert "__iv.invoke(tracer, __iv_lane0_0, 0, 'ha', a)" in code
    assert "__iv.invoke(tracer, __iv_lane0_1, 1, None, b)" in code
    assert "__iv.invoke(tracer, __iv_lane0_2, 2, None, c)" in code
    assert "__iv.invoke(tracer, __iv_lane0_3, 3, 'hd', d)" in code
    assert "__iv.invoke(tracer, __iv_lane0_4, 4, None, e)" in code
    # the generator stays, written as before (other tracers, errors at the user's line)
    assert "ha = __iv.save((yield __iv.read(model.layers[1], 'output', 0)))" in code


@intervene
def other_forms(model, a, b, other):
    with model.trace() as tracer:
        with other.invoke(a):  # not the block's tracer: registered on `tracer` as before
            ha = model.layers[1].output.save()
        with tracer.invoke(*b):
            hb = model.layers[1].output.save()
        with tracer.invoke(a) as inv:  # noqa: F841 - the `as` form is what is tested
            hc = model.layers[1].output.save()
    return ha, hb, hc


def test_other_invoke_forms_are_compiled_as_before():
    code = other_forms.code
    assert "__iv.lane(tracer, __iv_lane0_0, other.invoke(a), 0)" in code
    assert "__iv.lane(tracer, __iv_lane0_1, tracer.invoke(*b), 1)" in code
    assert "inv = tracer.invoke(a)" in code and "__iv.lane(tracer, __iv_lane0_2, inv, 2)" in code
    assert "__iv.invoke(" not in code


def test_lazy_and_started_lanes_give_plain_hooks_values_and_order(mlp, started):
    events: list = []
    mlp._module.register_forward_pre_hook(lambda m, a: events.append("forward"))
    try:
        inputs = xs(5)
        got = shapes(mlp, *inputs, events)
    finally:
        mlp._module._forward_pre_hooks.clear()
    assert events == ["b starts", "forward"]  # the print-like code ran at trace start
    assert started == {"lazy": [[True, False, False, True, False]], "woken": 0}
    net, batch = mlp._module, torch.cat(inputs)
    out1 = hooked(net, batch, net.layers[1])
    want = [out1[0:2], out1[2:4], out1[4:6], hooked(net, batch, net.layers[2], pre=True)[6:8],
            hooked(net, batch, net.layers[2])[8:10]]
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@intervene
def sixteen(model, inputs):
    with model.trace() as tracer:
        with tracer.invoke(inputs[0]):
            o0 = model.layers[2].output.save()
        with tracer.invoke(inputs[1]):
            o1 = model.layers[2].output.save()
        with tracer.invoke(inputs[2]):
            o2 = model.layers[0].output.save()
        with tracer.invoke(inputs[3]):
            o3 = model.layers[2].output.save()
        with tracer.invoke(inputs[4]):
            o4 = model.layers[2].inputs.save()
    return o0, o1, o2, o3, o4


def test_values_are_views_of_the_batch_bit_equal_to_plain_slicing(mlp):
    inputs = xs(5)
    got = sixteen(mlp, inputs)
    net, batch = mlp._module, torch.cat(inputs)
    out2, out0 = hooked(net, batch, net.layers[2]), hooked(net, batch, net.layers[0])
    for i, want in ((0, out2[0:2]), (1, out2[2:4]), (2, out0[4:6]), (3, out2[6:8])):
        assert torch.equal(got[i], want)
        assert got[i].requires_grad and got[i]._base is not None  # a view, as before
    (args, kwargs) = got[4]
    assert kwargs == {} and torch.equal(args[0], hooked(net, batch, net.layers[2], pre=True)[8:10])
    # the parameters' gradients through the invokes' rows: as through plain slices
    sum(o.sum() for o in got[:4]).backward()
    lazy_grads = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    out = []
    hs = [net.layers[2].register_forward_hook(lambda m, a, o: out.append(o)),
          net.layers[0].register_forward_hook(lambda m, a, o: out.append(o))]
    try:
        net(batch)
    finally:
        for h in hs:
            h.remove()
    first, second = out  # layers[0] runs first
    (second[0:2].sum() + second[2:4].sum() + first[4:6].sum() + second[6:8].sum()).backward()
    assert sum(g is not None for g in lazy_grads) == 6  # layers 0 to 2: weights and biases
    for g, p in zip(lazy_grads, net.parameters()):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    net.zero_grad(set_to_none=True)


@intervene
def in_a_loop(model, inputs):
    with model.trace() as tracer:
        for x in inputs:
            with tracer.invoke(x):
                h = model.layers[1].output.save()
        with tracer.invoke(inputs[0]):
            g = model.layers[1].output.save()
    return h, g


def test_lanes_of_a_loop_keep_source_order(mlp, started):
    inputs = xs(3)
    h, g = in_a_loop(mlp, inputs)
    # (an invoke in a loop of the block is started as a generator: its lanes come again,
    # out of source order; the one after the loop starts lazily)
    assert started["lazy"] == [[False, False, False, True]]
    assert "__iv.invoke(tracer, __iv_lane0_0, 0, None, x)" in in_a_loop.code
    want = hooked(mlp._module, torch.cat([*inputs, inputs[0]]), mlp._module.layers[1])
    assert torch.equal(h, want[4:6])  # the loop's last invoke is served last of the loop
    assert torch.equal(g, want[6:8])


# -- grad modes, rows that require grad --------------------------------------------------------


class _NoGradInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        with torch.no_grad():
            h = self.a(x)
        return self.b(h)


@intervene
def across_grad_modes(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            ha = model.a.output.save()  # handed out under the model's no_grad
        with tracer.invoke(b):
            hb = model.b.output.save()
    return ha, hb


def test_a_value_handed_out_in_another_grad_mode(started):
    model = NNsight(_NoGradInside())
    a, b = xs(2)
    ha, hb = across_grad_modes(model, a, b)
    assert started == {"lazy": [[True, True]], "woken": 1}  # the first: run as a generator
    net, batch = model._module, torch.cat([a, b])
    assert torch.equal(ha, hooked(net, batch, net.a)[0:2]) and not ha.requires_grad
    assert torch.equal(hb, hooked(net, batch, net.b)[2:4]) and hb.requires_grad
    assert torch.is_grad_enabled()
    assert_no_hooks(net)


@intervene
def whole_then_rows(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke():
            whole = model.layers[1].output
            whole.requires_grad_(True)  # in place, on the whole batch value
            whole = whole.save()
        with tracer.invoke(a):
            ha = model.layers[1].output.save()
        with tracer.invoke(b):
            hb = model.layers[1].output.save()
    return whole, ha, hb


def test_rows_of_a_value_made_to_require_grad_by_an_earlier_invoke():
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0).requires_grad_(False))
    a, b = xs(2)
    whole, ha, hb = whole_then_rows(model, a, b)
    assert ha.requires_grad and hb.requires_grad
    assert torch.equal(ha, whole[0:2]) and torch.equal(hb, whole[2:4])
    hb.retain_grad()  # the rows are linked to the batch value as before (one hook)
    (whole * 3).sum().backward()
    assert torch.equal(hb.grad, torch.full((2, 8), 3.0))
    assert_no_hooks(model._module)


# -- errors at the user's line -----------------------------------------------------------------


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.spare = nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x)


@intervene
def never_runs(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            ha = model.a.output.save()
        with tracer.invoke(b):
            hb = model.spare.output.save()  # NEVER-RUNS
    return ha, hb


def test_a_lazy_lane_whose_module_never_runs_fails_at_its_line(started):
    model = NNsight(_Unused())
    a, b = xs(2)
    assert "'hb', b)" in never_runs.code
    with pytest.raises(MissedCheckpointError, match=r"`model\.spare\.output`.*did not run") as info:
        never_runs(model, a, b)
    assert started == {"lazy": [[True, True]], "woken": 1}  # woken to be told, at its line
    assert info.value.line == _line_of("# NEVER-RUNS")
    assert traceback.extract_tb(info.value.__traceback__)[-1].lineno == _line_of("# NEVER-RUNS")
    assert_no_hooks(model._module)
    # and the model still works
    assert torch.equal(read_a(model, a), model._module.a(a))


@intervene
def read_a(model, a):
    with model.trace(a):
        ha = model.a.output.save()
    return ha


@intervene
def stopped_before(model, a, b, c):
    with model.trace() as tracer:
        with tracer.invoke(a):
            ha = model.layers[0].output.save()
        with tracer.invoke(b):
            tracer.stop()
        with tracer.invoke(c):
            hc = model.layers[1].output.save()  # AFTER-STOP
    return ha, hc


def test_a_lazy_lane_after_stop_fails_at_its_line(mlp, started):
    a, b, c = xs(3)
    with pytest.raises(MissedCheckpointError, match=r"after tracer\.stop\(\)") as info:
        stopped_before(mlp, a, b, c)
    assert started["lazy"] == [[True, False, False]]  # after stop(): started as before
    assert info.value.line == _line_of("# AFTER-STOP")
    assert traceback.extract_tb(info.value.__traceback__)[-1].lineno == _line_of("# AFTER-STOP")


def test_a_replaced_module_is_the_one_served(mlp):
    a, b = xs(2)
    sixteen(mlp, xs(5))  # the block's checks are cached now
    torch.manual_seed(5)
    mlp._module.layers[1] = nn.Linear(8, 8)
    ha, hb = across_two(mlp, a, b)
    net = mlp._module
    out = hooked(net, torch.cat([a, b]), net.layers[1])
    assert torch.equal(ha, out[0:2]) and torch.equal(hb, out[2:4])


@intervene
def across_two(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            ha = model.layers[1].output.save()
        with tracer.invoke(b):
            hb = model.layers[1].output.save()
    return ha, hb


# -- runs of lazily started lanes: one waiting entry --------------------------------------------


@intervene
def three_in_no_grad(model, a, b, c):
    with model.trace() as tracer:
        with tracer.invoke(a):
            ha = model.a.output.save()
        with tracer.invoke(b):
            hb = model.a.output.save()
        with tracer.invoke(c):
            hc = model.a.output.save()
    return ha, hb, hc


def test_a_run_handed_out_in_another_grad_mode_runs_lane_by_lane(started):
    model = NNsight(_NoGradInside())
    inputs = xs(3)
    got = three_in_no_grad(model, *inputs)
    assert started == {"lazy": [[True, True, True]], "woken": 3}
    net = model._module
    want = hooked(net, torch.cat(inputs), net.a)
    for i, g in enumerate(got):
        assert torch.equal(g, want[2 * i:2 * i + 2]) and not g.requires_grad
    assert_no_hooks(net)


@intervene
def three_never_run(model, a, b, c):
    with model.trace() as tracer:
        with tracer.invoke(a):
            ha = model.spare.output.save()  # FIRST-OF-RUN
        with tracer.invoke(b):
            hb = model.spare.output.save()
        with tracer.invoke(c):
            hc = model.spare.output.save()
    return ha, hb, hc


def test_a_run_whose_module_never_runs_fails_at_its_first_line(started):
    model = NNsight(_Unused())
    with pytest.raises(MissedCheckpointError, match=r"did not run") as info:
        three_never_run(model, *xs(3))
    assert info.value.line == _line_of("# FIRST-OF-RUN")
    assert traceback.extract_tb(info.value.__traceback__)[-1].lineno == _line_of("# FIRST-OF-RUN")
    assert started["woken"] == 1  # the first is told (the error ends the trace)
    assert_no_hooks(model._module)


@intervene
def run_then_reader(model, a, b, c):
    with model.trace() as tracer:
        with tracer.invoke(a):
            ha = model.layers[1].output.save()
        with tracer.invoke(b):
            hb = model.layers[1].output.save()
        with tracer.invoke(c):  # served after the run: reads what the run set
            hc = (model.layers[1].output + hb).save()
    return ha, hb, hc


def test_a_lane_served_after_a_run_sees_what_the_run_set(mlp, started):
    inputs = xs(3)
    ha, hb, hc = run_then_reader(mlp, *inputs)
    assert started["lazy"] == [[True, True, False]]
    out = hooked(mlp._module, torch.cat(inputs), mlp._module.layers[1])
    assert torch.equal(ha, out[0:2]) and torch.equal(hb, out[2:4])
    assert torch.equal(hc, out[4:6] + out[2:4])
