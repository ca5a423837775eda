"""What nnsight users type inside blocks (issue 13): ``save(x)`` as a function,
helpers decorated with @intervene, lambdas and nested defs."""

from __future__ import annotations

import pytest
import torch

import runtime
from compiler import CompileError, intervene
from runtime import NNsight, save
from runtime.models import tiny_mlp


def _net_and_x():
    net = tiny_mlp()
    return net, NNsight(net), torch.randn(3, 8)


def _outputs(net, x) -> list:
    """Each layer's output, by plain PyTorch hooks."""
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
             for layer in net.layers]
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


# -- save(x) -------------------------------------------------------------------------


def test_save_function_forms_save_like_the_method():
    net, model, x = _net_and_x()

    @intervene
    def f(model, x):
        with model.trace(x):
            a = save(model.layers[0].output)
            b = runtime.save(model.layers[1].output)
            c = model.layers[2].output
            save(c)
        return a, b, c

    a, b, c = f(model, x)
    want = _outputs(net, x)
    assert torch.equal(a, want[0]) and torch.equal(b, want[1]) and torch.equal(c, want[2])
    block = f.plan.functions[0].blocks[0]
    assert block.saved == ("a", "b", "c")
    assert all(cp.saves for cp in block.lanes[0].checkpoints)


def test_save_function_outside_a_block_is_the_method_error():
    with pytest.raises(CompileError, match=r"`.save\(\)` outside a trace block"):
        @intervene
        def f(model, x):
            y = save(x)
            return y


def test_a_parameter_called_save_is_not_the_save_function():
    with pytest.raises(CompileError, match="without being saved"):
        @intervene
        def f(model, x, save):
            with model.trace(x):
                a = save(model.layers[0].output)
            return a


def test_save_function_in_an_undecorated_block():
    net, model, x = _net_and_x()
    with model.trace(x):
        out = save(model.output)
    assert torch.equal(out, net(x))
