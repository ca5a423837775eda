"""How invokes start: each lane runs to its first request before the forward pass.

``Interleaver.attach_static`` parks a lane whose first request names a module attached
before the run without going through ``advance``; everything else (another grad mode,
a request after ``tracer.stop()``, a lane that ends at once, lanes of a loop, a plain
call of the model in a lane) must behave exactly as through ``advance``.  Checked
against a plain forward with hooks.
"""

from __future__ import annotations

import pytest
import torch
from support import assert_no_hooks

from compiler import intervene
from runtime import NNsight, save
from runtime.errors import MissedCheckpointError
from runtime.models import tiny_mlp


@pytest.fixture
def mlp():
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    yield model
    assert_no_hooks(model._module)


def _line_of(marker: str) -> int:
    with open(__file__, encoding="utf-8") as f:
        return next(i for i, text in enumerate(f, 1) if text.rstrip().endswith(marker))


def xs(n: int, rows: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(rows, 8, generator=g) for _ in range(n)]


def layer_outputs(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's output for ``x``, by plain forward hooks."""
    outs: list = []
    handles = [layer.register_forward_hook(lambda m, a, o: outs.append(o.detach()))
               for layer in model._module.layers]
    try:
        model._module(x)
    finally:
        for h in handles:
            h.remove()
    return outs


@intervene
def first_in_no_grad(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):  # noqa: SIM117 - the grad mode changes inside the invoke on purpose
            with torch.no_grad():
                ha = (model.layers[1].output * 2).save()
                mode = save(torch.is_grad_enabled())
        with tracer.invoke(b):
            hb = (model.layers[1].output * 2).save()
    return ha, hb, mode


def test_a_first_request_in_another_grad_mode(mlp):
    a, b = xs(2)
    ha, hb, mode = first_in_no_grad(mlp, a, b)
    want = layer_outputs(mlp, torch.cat([a, b]))[1] * 2
    assert torch.equal(ha, want[:2]) and torch.equal(hb, want[2:])
    assert mode is False
    assert not ha.requires_grad  # computed in the lane's own grad mode
    assert hb.requires_grad
    assert torch.is_grad_enabled()


@intervene
def stop_first(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            tracer.stop()
        with tracer.invoke(b):
            hb = model.layers[1].output.save()  # STOPPED
    return hb


def test_a_first_request_after_stop_in_an_earlier_invoke(mlp):
    a, b = xs(2)
    with pytest.raises(MissedCheckpointError, match=r"after tracer\.stop\(\)") as info:
        stop_first(mlp, a, b)
    assert info.value.line == _line_of("# STOPPED")


@intervene
def ends_at_once(model, a, b, read):
    with model.trace() as tracer:
        with tracer.invoke(a):
            ha = None
            if read:
                ha = model.layers[0].output.save()
        with tracer.invoke(b):
            hb = model.layers[2].output.save()
    return ha, hb


def test_an_invoke_that_ends_before_any_request(mlp):
    a, b = xs(2)
    ha, hb = ends_at_once(mlp, a, b, False)
    assert ha is None
    assert torch.equal(hb, layer_outputs(mlp, torch.cat([a, b]))[2][2:])


@intervene
def loop_invokes(model, inputs):
    out = []
    with model.trace() as tracer:
        i = 0
        while i < len(inputs):
            with tracer.invoke(inputs[i]):
                out.append(("first", model.layers[1].output.save()))
            with tracer.invoke(inputs[i + 1]):
                out.append(("second", model.layers[1].output.save()))
            i += 2
    return out


def test_invokes_of_a_loop_are_served_in_source_order(mlp):
    inputs = xs(4)
    out = loop_invokes(mlp, inputs)
    want = layer_outputs(mlp, torch.cat(inputs))[1]
    # Served in source order: the first invoke's lanes (one per iteration), then the
    # second's; each gets its own rows.
    assert [k for k, _ in out] == ["first", "first", "second", "second"]
    got = {id(v): v for _, v in out}
    assert len(got) == 4
    rows = [want[2 * i:2 * i + 2] for i in range(4)]
    assert torch.equal(out[0][1], rows[0]) and torch.equal(out[1][1], rows[2])
    assert torch.equal(out[2][1], rows[1]) and torch.equal(out[3][1], rows[3])


@intervene
def many_same(model, inputs):
    with model.trace() as tracer:
        with tracer.invoke(inputs[0]):
            h0 = model.layers[3].output.save()
        with tracer.invoke(inputs[1]):
            h1 = model.layers[3].output.save()
        with tracer.invoke(inputs[2]):
            h2 = model.layers[0].output.save()
        with tracer.invoke(inputs[3]):
            h3 = model.layers[3].input.save()
        with tracer.invoke(inputs[4]):
            h4 = model.layers[3].output.save()
    return h0, h1, h2, h3, h4


def test_invokes_asking_for_the_same_and_other_values(mlp):
    inputs = xs(5)
    got = many_same(mlp, inputs)
    outs = layer_outputs(mlp, torch.cat(inputs))
    want = [outs[3][0:2], outs[3][2:4], outs[0][4:6], torch.relu(outs[2][6:8]), outs[3][8:10]]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
