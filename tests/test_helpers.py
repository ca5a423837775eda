"""What nnsight users type inside blocks (issue 13): ``save(x)`` as a function,
helpers decorated with @intervene, lambdas and nested defs."""

from __future__ import annotations

import pytest
import torch
from support import layer_outputs

import runtime
from compiler import CompileError, intervene
from runtime import NNsight, save
from runtime.models import tiny_mlp


def _net_and_x():
    net = tiny_mlp()
    return net, NNsight(net), torch.randn(3, 8)


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
    want = layer_outputs(net, x)
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


# -- helpers -------------------------------------------------------------------------


@intervene
def layer_output(model, k):
    """A helper: reads a module value, no block of its own."""
    return model.layers[k].output


@intervene
def scaled(model, k, factor):
    h = layer_output(model, k)  # a helper calling a helper
    model.layers[k].output[:] = h * factor
    return h


def test_a_helper_runs_as_part_of_the_calling_lane():
    net, model, x = _net_and_x()

    @intervene
    def f(model, x):
        with model.trace(x):
            a = layer_output(model, 0).save()
            b = layer_output(model, 2).save()
        return a, b

    a, b = f(model, x)
    want = layer_outputs(net, x)
    assert torch.equal(a, want[0]) and torch.equal(b, want[2])
    items = f.plan.functions[0].blocks[0].lanes[0].items
    assert [(i.kind, i.detail) for i in items] == [("helper", "layer_output")] * 2
    assert "-- helper layer_output" in str(f.plan)
    assert "layers[k]" in str(layer_output.plan)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_a_helper_that_writes_and_calls_a_helper_equals_hooks():
    net, model, x = _net_and_x()

    @intervene
    def f(model, x):
        with model.trace(x):
            h = scaled(model, 1, 3.0).save()
            out = model.output.save()
        return h, out

    h, out = f(model, x)
    hook = net.layers[1].register_forward_hook(lambda m, i, o: o * 3.0)
    try:
        want = net(x)
    finally:
        hook.remove()
    # `h` is the layer's output itself, changed in place (as in plain PyTorch)
    assert torch.equal(out, want) and torch.equal(h, layer_outputs(net, x)[1] * 3.0)


def test_a_helper_in_an_undecorated_block():
    net, model, x = _net_and_x()
    with model.trace(x):
        a = layer_output(model, 3).save()
    assert torch.equal(a, layer_outputs(net, x)[3])


def test_a_helper_called_outside_a_block_says_where_to_call_it():
    _net, model, _x = _net_and_x()
    with pytest.raises(RuntimeError, match=r"`layer_output` is an @intervene helper that reads "
                                           r"module values \(line \d+\): it runs as part of a trace block"):
        layer_output(model, 0)


def _plain_reader(model):
    return model.layers[0].output


def test_an_undecorated_function_reading_module_values_suggests_the_decorator():
    from runtime import NotInTraceError

    _net, model, x = _net_and_x()

    @intervene
    def f(model, x):
        with model.trace(x):
            a = _plain_reader(model).save()
        return a

    with pytest.raises(NotInTraceError, match="decorate it with @intervene"):
        f(model, x)


def test_a_lambda_reading_module_values_is_refused_clearly():
    with pytest.raises(CompileError, match=r"inside a lambda or nested function in a trace block"):
        @intervene
        def f(model, x):
            with model.trace(x):
                get = lambda: model.layers[0].output
                a = get().save()
            return a

    with pytest.raises(CompileError, match=r"inside a lambda or nested function in a trace block"):
        @intervene
        def g(model, x):
            with model.trace(x):
                def get():
                    return model.layers[0].output
                a = get().save()
            return a


def test_a_helper_imported_from_another_file(tmp_path):
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "myhelpers.py").write_text(textwrap.dedent("""
        from compiler import intervene

        @intervene
        def first_out(model):
            return model.layers[0].output
    """))
    (tmp_path / "use.py").write_text(textwrap.dedent("""
        import torch
        from compiler import intervene
        from runtime import NNsight
        from runtime.models import tiny_mlp
        from myhelpers import first_out

        net = tiny_mlp()
        model = NNsight(net)
        x = torch.randn(2, 8)

        @intervene
        def f(model, x):
            with model.trace(x):
                a = first_out(model).save()
            return a

        with model.trace(x):
            b = first_out(model).save()
        print(torch.equal(f(model, x), net.layers[0](x)), torch.equal(b, net.layers[0](x)))
    """))
    out = subprocess.run([sys.executable, "use.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, check=False, env={"PYTHONPATH": f"{root}:{tmp_path}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
