"""Running compiled experiments on real models, checked against hand-written PyTorch hooks.

Every experiment here is compared, bit for bit where the arithmetic is the same, with
the same model (same seed) and the same input run through plain ``register_forward_hook``
/ ``register_forward_pre_hook`` code.  After every run no hook may stay on the model.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from support import assert_no_hooks, forward_hooks, line_in, x_input
from torch import nn

from compiler import intervene
from runtime import NNsight, NotInTraceError
from runtime.models import tiny_llama, tiny_mlp

THIS_FILE = Path(__file__).resolve()


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def line_of(marker: str) -> int:
    """The line of this file ending with ``marker`` (exactly once)."""
    return line_in(THIS_FILE, marker)


def with_hooks(module, x, *, out=None, pre=None, **kwargs):
    """Run ``module(x)`` with forward hooks ``out={submodule: fn}`` and pre hooks
    ``pre={submodule: fn}``, removing them afterwards."""
    with forward_hooks(out, pre):
        return module(x, **kwargs) if x is not None else module(**kwargs)


@pytest.fixture
def mlp():
    """(wrapped model, an identical plain reference model)."""
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    yield model, tiny_mlp(n_layers=4, hidden=8, seed=0)
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------
# Reading values
# --------------------------------------------------------------------------------------


@intervene
def read_output(model, x):
    with model.trace(x):
        hidden = model.layers[1].output.save()
        logits = model.head.output.save()
    return hidden, logits


def test_read_output_matches_forward_hook(mlp):
    model, ref = mlp
    x = x_input()
    hidden, logits = read_output(model, x)
    seen = {}
    expected = with_hooks(ref, x, out={ref.layers[1]: lambda m, a, o: seen.setdefault("h", o)})
    assert torch.equal(hidden, seen["h"])
    assert torch.equal(logits, expected)
    assert isinstance(hidden, torch.Tensor) and hidden.shape == (3, 8)


def test_model_output_of_root(mlp):
    model, ref = mlp

    @intervene
    def root_output(model, x):
        with model.trace(x):
            out = model.output.save()
        return out

    x = x_input(2)
    assert torch.equal(root_output(model, x), ref(x))


@intervene
def read_input(model, x):
    with model.trace(x):
        inp = model.layers[2].input.save()
        both = model.layers[3].inputs.save()
    return inp, both


def test_read_input_and_inputs_match_pre_hooks(mlp):
    model, ref = mlp
    x = x_input()
    inp, both = read_input(model, x)
    seen = {}
    with_hooks(ref, x, pre={
        ref.layers[2]: lambda m, a, k: seen.setdefault("in2", (a, k)),
        ref.layers[3]: lambda m, a, k: seen.setdefault("in3", (a, k)),
    })
    assert torch.equal(inp, seen["in2"][0][0])
    args, kwargs = both
    assert isinstance(args, tuple) and isinstance(kwargs, dict)
    assert len(args) == 1 and kwargs == {}
    assert torch.equal(args[0], seen["in3"][0][0])


def test_root_input_is_the_trace_input(mlp):
    model, _ = mlp

    @intervene
    def root_input(model, x):
        with model.trace(x):
            inp = model.input.save()
        return inp

    x = x_input()
    assert root_input(model, x) is x


# --------------------------------------------------------------------------------------
# Writing values
# --------------------------------------------------------------------------------------


@intervene
def write_output(model, x):
    with model.trace(x):
        model.layers[1].output = model.layers[1].output * 2
        after = model.layers[1].output.save()
        logits = model.head.output.save()
    return after, logits


def test_write_output_matches_hook_returning_value(mlp):
    model, ref = mlp
    x = x_input()
    after, logits = write_output(model, x)
    expected = with_hooks(ref, x, out={ref.layers[1]: lambda m, a, o: o * 2})
    assert torch.equal(logits, expected)
    assert not torch.equal(logits, ref(x))  # the write did change something
    seen = {}
    with_hooks(ref, x, out={ref.layers[1]: lambda m, a, o: seen.setdefault("h", o) * 2})
    assert torch.equal(after, seen["h"] * 2)


def test_write_output_with_constant_tensor(mlp):
    model, ref = mlp

    @intervene
    def write_const(model, x, value):
        with model.trace(x):
            model.layers[0].output = value
            logits = model.head.output.save()
        return logits

    x = x_input()
    value = torch.full((3, 8), 0.25)
    expected = with_hooks(ref, x, out={ref.layers[0]: lambda m, a, o: value})
    assert torch.equal(write_const(model, x, value), expected)


@intervene
def inplace_zero(model, x):
    with model.trace(x):
        model.layers[2].output[:] = 0
        logits = model.head.output.save()
    return logits


def test_inplace_slice_assign_matches_hook(mlp):
    model, ref = mlp
    x = x_input()

    def hook(m, a, o):
        o[:] = 0

    assert torch.equal(inplace_zero(model, x), with_hooks(ref, x, out={ref.layers[2]: hook}))
    # with layer 2 zeroed, the logits are the head's bias after two relu(bias) layers
    assert torch.equal(inplace_zero(model, x)[0], inplace_zero(model, x)[1])


@intervene
def inplace_scale_column(model, x):
    with model.trace(x):
        model.layers[1].output[:, 0] *= 0.5
        col = model.layers[1].output[:, 0].save()
        logits = model.head.output.save()
    return col, logits


def test_inplace_augassign_on_index_matches_hook(mlp):
    model, ref = mlp
    x = x_input()
    col, logits = inplace_scale_column(model, x)
    seen = {}

    def hook(m, a, o):
        o[:, 0] *= 0.5
        seen["col"] = o[:, 0].clone()

    assert torch.equal(logits, with_hooks(ref, x, out={ref.layers[1]: hook}))
    assert torch.equal(col, seen["col"])
    assert not torch.equal(logits, ref(x))


@intervene
def augassign_whole_output(model, x):
    with model.trace(x):
        model.layers[0].output += 1.0
        model.layers[3].output *= 3
        logits = model.head.output.save()
    return logits


def test_augassign_on_output_matches_hook(mlp):
    model, ref = mlp
    x = x_input()

    def add(m, a, o):
        o += 1.0

    def mul(m, a, o):
        o *= 3

    expected = with_hooks(ref, x, out={ref.layers[0]: add, ref.layers[3]: mul})
    assert torch.equal(augassign_whole_output(model, x), expected)


@intervene
def inplace_method(model, x):
    with model.trace(x):
        model.layers[1].output.mul_(-1.5)
        model.layers[2].output[:, 1:3].zero_()
        logits = model.head.output.save()
    return logits


def test_inplace_method_matches_hook(mlp):
    model, ref = mlp
    x = x_input()

    def h1(m, a, o):
        o.mul_(-1.5)

    def h2(m, a, o):
        o[:, 1:3].zero_()

    expected = with_hooks(ref, x, out={ref.layers[1]: h1, ref.layers[2]: h2})
    assert torch.equal(inplace_method(model, x), expected)
    assert not torch.equal(expected, ref(x))


@intervene
def write_input(model, x, v):
    with model.trace(x):
        model.layers[2].input = v
        seen = model.layers[2].input.save()
        logits = model.head.output.save()
    return seen, logits


def test_write_input_matches_pre_hook(mlp):
    model, ref = mlp
    x = x_input()
    v = x_input(seed=7)
    seen, logits = write_input(model, x, v)

    def pre(m, args, kwargs):
        return (v, *args[1:]), kwargs

    assert torch.equal(logits, with_hooks(ref, x, pre={ref.layers[2]: pre}))
    assert seen is v
    # layers[2] only sees v, so the result does not depend on x at all
    assert torch.equal(logits, write_input(model, x_input(seed=99), v)[1])


def test_inplace_on_input_matches_pre_hook(mlp):
    model, ref = mlp

    @intervene
    def scale_input(model, x):
        with model.trace(x):
            model.layers[1].input[:, :4] *= 0.0
            logits = model.head.output.save()
        return logits

    def pre(m, args, kwargs):
        args[0][:, :4] *= 0.0

    x = x_input()
    assert torch.equal(scale_input(model, x), with_hooks(ref, x, pre={ref.layers[1]: pre}))


# --------------------------------------------------------------------------------------
# Plain Python around module values
# --------------------------------------------------------------------------------------


@intervene
def loop_over_layers(model, x):
    outs = []
    with model.trace(x):
        for layer in model.layers:
            outs.append(layer.output.save())
    return outs


def _all_layer_outputs(ref, x):
    seen = []
    with_hooks(ref, x, out={layer: (lambda m, a, o: seen.append(o)) for layer in ref.layers})
    return seen


def test_for_loop_over_model_layers(mlp):
    model, ref = mlp
    x = x_input()
    outs = loop_over_layers(model, x)
    expected = _all_layer_outputs(ref, x)
    assert len(outs) == 4
    for got, want in zip(outs, expected):
        assert torch.equal(got, want)


@intervene
def loop_write_each_layer(model, x):
    with model.trace(x):
        for i, layer in enumerate(model.layers):
            layer.output = layer.output + i
        logits = model.head.output.save()
    return logits


def _add_const(i):
    return lambda m, a, o: o + i


def test_for_loop_writing_each_layer(mlp):
    model, ref = mlp
    x = x_input()
    hooks = {layer: _add_const(i) for i, layer in enumerate(ref.layers)}
    assert torch.equal(loop_write_each_layer(model, x), with_hooks(ref, x, out=hooks))


@intervene
def list_comprehension(model, x):
    with model.trace(x):
        outs = [model.layers[i].output.save() for i in range(4)]
    return outs


def test_list_comprehension(mlp):
    model, ref = mlp
    x = x_input()
    outs = list_comprehension(model, x)
    assert isinstance(outs, list) and len(outs) == 4
    for got, want in zip(outs, _all_layer_outputs(ref, x)):
        assert torch.equal(got, want)


@intervene
def dict_comprehension(model, x):
    with model.trace(x):
        outs = {f"layer{i}": model.layers[i].output.sum(dim=-1) for i in range(0, 4, 2)}.save()
    return outs


def test_dict_comprehension(mlp):
    model, ref = mlp
    x = x_input()
    outs = dict_comprehension(model, x)
    expected = _all_layer_outputs(ref, x)
    assert set(outs) == {"layer0", "layer2"}
    assert torch.equal(outs["layer0"], expected[0].sum(dim=-1))
    assert torch.equal(outs["layer2"], expected[2].sum(dim=-1))


@intervene
def branch_taken(model, x, threshold):
    taken = []
    with model.trace(x):
        if model.layers[0].output.sum() > threshold:
            taken.append("if")
            model.layers[2].output = model.layers[2].output * 0
        else:
            taken.append("else")
            model.layers[2].output[:, 0] = 100.0
        logits = model.head.output.save()
    return taken, logits


@pytest.mark.parametrize("threshold", [float("-inf"), float("inf")])
def test_if_else_on_tensor_value(mlp, threshold):
    model, ref = mlp
    x = x_input()
    taken, logits = branch_taken(model, x, threshold)

    def hook0(m, a, o):
        hook0.big = bool(o.sum() > threshold)

    def hook2(m, a, o):
        if hook0.big:
            return o * 0
        o[:, 0] = 100.0

    expected = with_hooks(ref, x, out={ref.layers[0]: hook0, ref.layers[2]: hook2})
    assert taken == (["if"] if threshold < 0 else ["else"])
    assert torch.equal(logits, expected)


@intervene
def while_loop(model, x):
    outs = []
    with model.trace(x):
        i = 0
        while i < 3:
            outs.append(model.layers[i].output.save())
            i += 1
    return outs


def test_while_loop(mlp):
    model, ref = mlp
    x = x_input()
    outs = while_loop(model, x)
    expected = _all_layer_outputs(ref, x)
    assert len(outs) == 3
    for got, want in zip(outs, expected):
        assert torch.equal(got, want)


def _normalize(t):
    return t / t.norm(dim=-1, keepdim=True)


@intervene
def helper_and_print(model, x):
    with model.trace(x):
        h = model.layers[1].output
        print("norm shape", tuple(_normalize(h).shape))
        model.layers[1].output = _normalize(h)
        logits = model.head.output.save()
    return logits


def test_helper_call_and_print(mlp, capsys):
    model, ref = mlp
    x = x_input()
    logits = helper_and_print(model, x)
    assert capsys.readouterr().out == "norm shape (3, 8)\n"
    expected = with_hooks(ref, x, out={ref.layers[1]: lambda m, a, o: _normalize(o)})
    assert torch.equal(logits, expected)


@intervene
def two_blocks(model, x1, x2):
    with model.trace(x1):
        clean = model.layers[1].output.save()
        clean_logits = model.head.output.save()
    with model.trace(x2):
        model.layers[1].output = clean
        patched = model.head.output.save()
    return clean_logits, patched


def test_two_blocks_second_uses_saved_value(mlp):
    model, ref = mlp
    x1, x2 = x_input(1), x_input(2)
    clean_logits, patched = two_blocks(model, x1, x2)
    seen = {}
    with_hooks(ref, x1, out={ref.layers[1]: lambda m, a, o: seen.setdefault("h", o)})
    expected = with_hooks(ref, x2, out={ref.layers[1]: lambda m, a, o: seen["h"]})
    assert torch.equal(patched, expected)
    # everything after layer 1 depends only on layer 1, so patching restores the clean run
    assert torch.equal(patched, clean_logits)
    assert torch.equal(clean_logits, ref(x1))
    assert not torch.equal(ref(x2), ref(x1))


@intervene
def unsaved_disappears(model, x):
    with model.trace(x):
        tmp = model.layers[0].output * 2
        kept = (tmp + 1).save()
    names = set(locals())
    return names, kept


def test_unsaved_variable_does_not_exist_after_block(mlp):
    model, ref = mlp
    x = x_input()
    names, kept = unsaved_disappears(model, x)
    assert "kept" in names and "tmp" not in names
    seen = {}
    with_hooks(ref, x, out={ref.layers[0]: lambda m, a, o: seen.setdefault("h", o)})
    assert torch.equal(kept, seen["h"] * 2 + 1)


@intervene
def nested_no_grad(model, x):
    with model.trace(x):
        with torch.no_grad():
            h = model.layers[1].output.save()
            grad_inside = torch.is_grad_enabled().save()
            later = model.layers[3].output.save()
        logits = model.head.output.save()
    return h, later, logits, grad_inside


def test_no_grad_nested_in_block(mlp):
    model, ref = mlp
    x = x_input()
    assert torch.is_grad_enabled()
    h, later, logits, grad_inside = nested_no_grad(model, x)
    assert torch.is_grad_enabled(), "no_grad leaked out of the trace"
    assert grad_inside is False
    outs = _all_layer_outputs(ref, x)
    assert torch.equal(h, outs[1])
    assert torch.equal(later, outs[3])
    assert torch.equal(logits, ref(x))
    # the model's own computation (between checkpoints inside the user's no_grad) keeps grad
    assert later.requires_grad and later.grad_fn is not None
    assert logits.requires_grad and logits.grad_fn is not None


def test_no_grad_around_the_call_is_kept(mlp):
    model, ref = mlp
    x = x_input()
    with torch.no_grad():
        _hidden, logits = read_output(model, x)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert not logits.requires_grad
    with torch.no_grad():
        assert torch.equal(logits, ref(x))


@intervene
def value_of_saved(model, x):
    with model.trace(x):
        h = model.layers[2].output.save()
    return h.value is h, h.value


def test_saved_value_attribute_is_the_value(mlp):
    model, ref = mlp
    x = x_input()
    same, value = value_of_saved(model, x)
    assert same is True
    assert isinstance(value, torch.Tensor)
    assert torch.equal(value, _all_layer_outputs(ref, x)[2])


# --------------------------------------------------------------------------------------
# Gradients: `x.requires_grad = True` on a module value
# --------------------------------------------------------------------------------------


@intervene
def grad_of_hidden(model, x):
    with model.trace(x):
        hidden = model.layers[1].output.save()
        hidden.requires_grad = True
        logits = model.head.output.save()
    loss = logits.sum()
    loss.backward()
    return hidden, logits


def _rest_of_mlp(ref, h):
    """The tiny MLP's forward from layer 1's (pre-relu) output onwards."""
    y = torch.relu(h)
    for layer in list(ref.layers)[2:]:
        y = torch.relu(layer(y))
    return ref.head(y)


@pytest.mark.parametrize("params_require_grad", [True, False])
def test_requires_grad_on_hidden_then_backward(params_require_grad):
    model = NNsight(tiny_mlp(seed=0))
    ref = tiny_mlp(seed=0)
    if not params_require_grad:
        model._module.requires_grad_(False)
        ref.requires_grad_(False)
    x = x_input()
    hidden, logits = grad_of_hidden(model, x)
    assert_no_hooks(model)
    assert hidden.grad is not None
    # by hand: gradient of the same loss with respect to layer 1's output
    seen = {}
    with_hooks(ref, x, out={ref.layers[1]: lambda m, a, o: seen.setdefault("h", o)})
    h = seen["h"].detach().clone().requires_grad_(True)
    out = _rest_of_mlp(ref, h)
    assert torch.equal(out.detach(), logits.detach())
    (expected,) = torch.autograd.grad(out.sum(), h)
    assert torch.equal(hidden.grad, expected)
    if params_require_grad:
        assert model._module.layers[0].weight.grad is not None
    else:
        assert model._module.layers[0].weight.grad is None


# --------------------------------------------------------------------------------------
# Methods and closures
# --------------------------------------------------------------------------------------


class Experiment:
    def __init__(self, model, factor):
        self.model = model
        self.factor = factor

    @intervene
    def run(self, x):
        with self.model.trace(x):
            self.model.layers[0].output = self.model.layers[0].output * self.factor
            h = self.model.layers[0].output.save()
            logits = self.model.head.output.save()
        return h, logits


def test_method_of_class_with_self_model(mlp):
    model, ref = mlp
    exp = Experiment(model, 0.5)
    x = x_input()
    _h, logits = exp.run(x)
    assert torch.equal(logits, with_hooks(ref, x, out={ref.layers[0]: lambda m, a, o: o * 0.5}))
    assert Experiment.run.plan.functions[0].blocks[0].model == "self.model"
    assert Experiment.run.plan.functions[0].blocks[0].lanes[0].checkpoints[0].path == "self.model.layers[0]"


def test_closure_sees_outer_variables_live(mlp):
    model, ref = mlp
    scale = 2.0

    @intervene
    def closure(x):
        with model.trace(x):
            model.layers[2].output = model.layers[2].output * scale
            logits = model.head.output.save()
        return logits

    x = x_input()
    first = closure(x)
    assert torch.equal(first, with_hooks(ref, x, out={ref.layers[2]: lambda m, a, o: o * 2.0}))
    scale = 3.0  # changed after decoration (and after a first call): seen by the next call
    second = closure(x)
    assert torch.equal(second, with_hooks(ref, x, out={ref.layers[2]: lambda m, a, o: o * 3.0}))
    assert not torch.equal(first, second)
    assert_no_hooks(model)


def test_function_defaults_and_kwargs(mlp):
    model, ref = mlp

    @intervene
    def with_defaults(model, x, *, layer=1, factor=2.0):
        with model.trace(x):
            model.layers[layer].output = model.layers[layer].output * factor
            logits = model.head.output.save()
        return logits

    x = x_input()
    got = with_defaults(model, x)
    assert torch.equal(got, with_hooks(ref, x, out={ref.layers[1]: lambda m, a, o: o * 2.0}))
    got = with_defaults(model, x, layer=3, factor=-1.0)
    assert torch.equal(got, with_hooks(ref, x, out={ref.layers[3]: lambda m, a, o: o * -1.0}))


def test_decorated_function_is_the_compiled_one_once_torch_is_loaded(mlp):
    # torch is loaded here, so decorating builds at once and adds no wrapper:
    # calling the experiment runs the rewritten code directly.
    def plain(model, x):
        with model.trace(x):
            h = model.layers[1].output.save()
        return h

    built = intervene(plain)
    assert "__iv" in built.__code__.co_freevars
    assert built.__wrapped__ is plain and built.__name__ == "plain"
    assert built.plan.functions[0].blocks[0].lanes[0].checkpoints[0].path == "model.layers[1]"
    model, ref = mlp
    x = x_input()
    seen = {}
    with_hooks(ref, x, out={ref.layers[1]: lambda m, a, o: seen.setdefault("h", o)})
    assert torch.equal(built(model, x), seen["h"])


def test_repeated_calls_are_independent(mlp):
    model, ref = mlp
    for seed in range(3):
        x = x_input(seed)
        _hidden, logits = read_output(model, x)
        assert torch.equal(logits, ref(x))
        assert_no_hooks(model)


def test_plain_call_outside_trace_unchanged(mlp):
    model, ref = mlp
    x = x_input()
    write_output(model, x)
    assert torch.equal(model(x), ref(x))
    assert len(model.layers) == 4
    assert isinstance(model.layers[-1]._module, nn.Linear)


# --------------------------------------------------------------------------------------
# User exceptions inside a block
# --------------------------------------------------------------------------------------


@intervene
def raises_in_block(model, x):
    with model.trace(x):
        h = model.layers[1].output
        if h.shape[0] == 3:
            raise ValueError("user error in block")  # RAISE-HERE-VALUE
        logits = model.head.output.save()
    return logits


def _frames_in_this_file(exc):
    return [(f.filename, f.lineno) for f in traceback.extract_tb(exc.__traceback__)
            if Path(f.filename).resolve() == THIS_FILE]


def test_user_exception_keeps_type_and_line(mlp):
    model, _ = mlp
    with pytest.raises(ValueError, match="user error in block") as info:
        raises_in_block(model, x_input())
    assert type(info.value) is ValueError
    lines = [ln for _, ln in _frames_in_this_file(info.value)]
    assert line_of("# RAISE-HERE-VALUE") in lines
    assert_no_hooks(model)
    # and the model still works afterwards
    _hidden, logits = read_output(model, x_input(4))
    assert logits.shape == (3, 2)


@intervene
def type_error_in_block(model, x):
    with model.trace(x):
        model.layers[0].output.sum()
        b = model.layers[2].output
        torch.matmul(b, torch.ones(5, 5))  # RAISE-HERE-MATMUL
        logits = model.head.output.save()
    return logits


def test_torch_error_in_block_keeps_type_and_line(mlp):
    model, _ = mlp
    with pytest.raises(RuntimeError) as info:
        type_error_in_block(model, x_input())
    lines = [ln for _, ln in _frames_in_this_file(info.value)]
    assert line_of("# RAISE-HERE-MATMUL") in lines
    assert_no_hooks(model)


def test_exception_after_block_is_normal(mlp):
    model, _ = mlp

    @intervene
    def fails_after(model, x):
        with model.trace(x):
            h = model.layers[0].output.save()
        raise KeyError(h.shape)  # RAISE-HERE-AFTER

    with pytest.raises(KeyError) as info:
        fails_after(model, x_input())
    assert line_of("# RAISE-HERE-AFTER") in [ln for _, ln in _frames_in_this_file(info.value)]
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------
# Keyword inputs
# --------------------------------------------------------------------------------------


class Scale(nn.Module):
    def forward(self, h, factor=1.0):
        return h * factor


class KwModel(nn.Module):
    """Submodules called with keyword arguments."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(8, 8)
        self.scale = Scale()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inner(input=x)
        h = self.scale(h, factor=2.0)
        return self.head(h)


@intervene
def keyword_values(model, x, v):
    with model.trace(x):
        inner_in = model.inner.input.save()
        inner_inputs = model.inner.inputs.save()
        scale_inputs = model.scale.inputs.save()
        model.scale.input = v
        logits = model.head.output.save()
    return inner_in, inner_inputs, scale_inputs, logits


def test_keyword_called_submodules():
    model = NNsight(KwModel())
    ref = KwModel()
    x = x_input()
    v = x_input(5)
    inner_in, inner_inputs, scale_inputs, logits = keyword_values(model, x, v)
    assert_no_hooks(model)
    assert inner_in is x
    assert inner_inputs[0] == () and set(inner_inputs[1]) == {"input"}
    assert inner_inputs[1]["input"] is x
    args, kwargs = scale_inputs
    assert len(args) == 1 and kwargs == {"factor": 2.0}

    def pre(m, a, k):
        return (v,), k

    assert torch.equal(logits, with_hooks(ref, x, pre={ref.scale: pre}))
    assert torch.equal(logits, ref.head(v * 2.0))


def test_trace_with_keyword_input(mlp):
    model, ref = mlp

    @intervene
    def kw_trace(model, t):
        with model.trace(x=t):
            logits = model.head.output.save()
        return logits

    x = x_input()
    assert torch.equal(kw_trace(model, x), ref(x))


# --------------------------------------------------------------------------------------
# tiny Llama (transformers)
# --------------------------------------------------------------------------------------


@intervene
def llama_read(model, ids):
    with model.trace(ids):
        inp0 = model.model.layers[0].input.save()
        h0 = model.model.layers[0].output.save()
        logits = model.lm_head.output.save()
    return h0, inp0, logits


@pytest.fixture
def llama_pair():
    model = NNsight(tiny_llama(0))
    yield model, tiny_llama(0)
    assert_no_hooks(model)


IDS = torch.tensor([[1, 5, 9, 2, 7], [3, 3, 8, 1, 4]])


def test_llama_read_layer_output(llama_pair):
    model, ref = llama_pair
    h0, inp0, logits = llama_read(model, IDS)
    seen = {}

    def pre(m, a, k):
        seen["in"] = a[0] if a else next(iter(k.values()))

    with_hooks(ref, IDS, out={ref.model.layers[0]: lambda m, a, o: seen.setdefault("h", o)},
               pre={ref.model.layers[0]: pre})
    assert isinstance(h0, torch.Tensor) and h0.shape == seen["h"].shape
    assert torch.equal(h0, seen["h"])
    assert torch.equal(inp0, seen["in"])
    assert torch.equal(logits, ref(IDS).logits)


@intervene
def static_child_then_dynamic_layer(model, ids, k):
    with model.trace(ids):
        mlp = model.model.layers[0].mlp.output.save()
        layer = model.model.layers[k].output.save()  # layer 0 is running when asked for
    return mlp, layer


def test_dynamic_ancestor_of_a_static_checkpoint(llama_pair):
    model, ref = llama_pair
    seen = {}
    with_hooks(ref, IDS, out={ref.model.layers[0].mlp: lambda m, a, o: seen.setdefault("mlp", o),
                              ref.model.layers[0]: lambda m, a, o: seen.setdefault("layer", o)})
    for _ in range(2):
        mlp, layer = static_child_then_dynamic_layer(model, IDS, 0)
        assert torch.equal(mlp, seen["mlp"]) and torch.equal(layer, seen["layer"])


@intervene
def llama_zero_last(model, ids):
    with model.trace(ids):
        model.model.layers[1].output[:, -1] = 0
        logits = model.lm_head.output.save()
    return logits


def test_llama_zero_last_position(llama_pair):
    model, ref = llama_pair

    def hook(m, a, o):
        o[:, -1] = 0

    logits = llama_zero_last(model, IDS)
    expected = with_hooks(ref, IDS, out={ref.model.layers[1]: hook}).logits
    assert torch.equal(logits, expected)
    clean = ref(IDS).logits
    # causal: earlier positions unchanged, the last one changed
    assert torch.equal(logits[:, :-1], clean[:, :-1])
    assert not torch.equal(logits[:, -1], clean[:, -1])


# --------------------------------------------------------------------------------------
# Where values are taken: the module's forward, wrapped for the trace only
# --------------------------------------------------------------------------------------


@intervene
def layer_then_root(model, x):
    with model.trace(x):
        hidden = model.layers[1].output.save()
        logits = model.output.save()
    return hidden, logits


@intervene
def input_then_output(model, x):
    with model.trace(x):
        inp = model.layers[2].input.save()
        out = model.layers[2].output.save()
    return inp, out


@intervene
def dynamic_layer_then_root(model, x, k):
    with model.trace(x):
        layer = model.layers[k]
        inp = layer.input.save()
        out = layer.output.save()
        logits = model.output.save()
    return inp, out, logits


def test_ancestor_output_after_dynamic_descendant(mlp):
    # Paths the plan cannot resolve: attached while running, with their ancestors.
    model, ref = mlp
    for k in (1, 2, 1):
        x = x_input(k)
        inp, out, logits = dynamic_layer_then_root(model, x, k)
        assert torch.equal(out, ref.layers[k](inp))
        assert torch.equal(logits, ref(x))
        assert_no_hooks(model)


def test_ancestor_output_after_descendant_on_every_trace(mlp):
    # The root is running when `model.output` is asked for; it must be taken on every
    # trace, not only on the model's first (a bug once: the first trace's order-learning
    # hooks hid it).
    model, ref = mlp
    seen = {}
    for seed in range(3):
        x = x_input(seed)
        hidden, logits = layer_then_root(model, x)
        seen.clear()
        expected = with_hooks(ref, x, out={ref.layers[1]: lambda m, a, o: seen.setdefault("h", o)})
        assert torch.equal(hidden, seen["h"]) and torch.equal(logits, expected)
        inp, out = input_then_output(model, x)
        assert torch.equal(out, ref.layers[2](inp))
        assert_no_hooks(model)


def test_no_wrapped_forward_left_after_a_failing_trace(mlp):
    model, _ = mlp
    with pytest.raises(ValueError, match="user error in block"):
        raises_in_block(model, x_input())
    assert_no_hooks(model)


def test_own_instance_forward_is_used_and_restored(mlp):
    model, ref = mlp
    sub = model._module.layers[1]

    def doubled(x):
        return type(sub).forward(sub, x) * 2

    sub.forward = doubled
    try:
        x = x_input()
        hidden, logits = layer_then_root(model, x)
        plain_hidden = ref.layers[1](torch.relu(ref.layers[0](x)))
        ref.layers[1].forward = lambda t: type(ref.layers[1]).forward(ref.layers[1], t) * 2
        assert torch.equal(hidden, plain_hidden * 2)  # the module's own forward ran
        assert torch.equal(logits, ref(x))
        assert sub.__dict__["forward"] is doubled
        assert_no_hooks(model, keep_forward=[sub])
    finally:
        del sub.forward


def test_values_are_what_forward_returns_and_receives(mlp):
    # A forward hook of the user's runs after the lanes (it sees their writes, and what
    # it returns is not what `.output` saw); a pre-hook of the user's runs before (its
    # change is what `.input` sees, as it is what forward receives).
    model, ref = mlp
    x = x_input()
    seen = {}
    layer1, layer2 = model._module.layers[1], model._module.layers[2]
    handles = [
        layer1.register_forward_hook(lambda m, a, o: seen.setdefault("hook", o.clone()) * 0 + 5),
        layer2.register_forward_pre_hook(lambda m, a: (a[0] + 1,)),
    ]

    @intervene
    def write_and_read(model, x):
        with model.trace(x):
            raw = model.layers[1].output.clone().save()
            model.layers[1].output[:] = 3
            got = model.layers[2].input.save()
        return raw, got

    try:
        raw, got = write_and_read(model, x)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(raw, ref.layers[1](torch.relu(ref.layers[0](x))))  # before the user's hook
    assert torch.equal(seen["hook"], torch.full_like(raw, 3.0))  # the user's hook saw the write
    assert torch.equal(got, torch.full_like(raw, 5.0).relu() + 1)  # its return, then the pre-hook
    assert_no_hooks(model)


class _WithScripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.jit.script(nn.Linear(4, 4))
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x))


@intervene
def scripted_read_write(model, x):
    with model.trace(x):
        inp = model.a.input.save()
        out = model.a.output.clone().save()
        model.a.output[:] = 0
        logits = model.output.save()
    return inp, out, logits


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_scripted_submodule_values_and_nothing_left():
    # A scripted module takes no Python hooks: its input and output are both taken in
    # its wrapped forward, and its own compiled forward is back afterwards.
    net = _WithScripted()
    own = net.a.__dict__["forward"]
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    model = NNsight(net)
    for _ in range(2):
        inp, out, logits = scripted_read_write(model, x)
        assert torch.equal(inp, x)
        assert torch.equal(out, net.a(x))
        assert torch.equal(logits, net.b(torch.zeros(3, 4)))
        assert net.a.__dict__["forward"] is own
        assert_no_hooks(net, keep_forward=[net.a])


def test_signature_of_a_wrapped_forward_is_the_modules(mlp):
    import inspect

    model, _ = mlp
    before = inspect.signature(model._module.forward)
    during = {}

    @intervene
    def look(model, x):
        with model.trace(x):
            model.layers[0].output.save()
            during["sig"] = inspect.signature(model._module.forward)
            during["wrapped"] = "forward" in model._module.__dict__
            model.output.save()

    look(model, x_input())
    assert during["wrapped"] and during["sig"] == before


# --------------------------------------------------------------------------------------
# Regressions: bugs found while writing these tests
# --------------------------------------------------------------------------------------


def test_comprehension_variable_does_not_shadow_outer_name(mlp):
    model, ref = mlp

    @intervene
    def shadow(model, x, i):
        with model.trace(x):
            h = model.layers[i].output.save()
            sums = [model.layers[3].output.sum() for i in range(1)].save()
        return h, sums, i

    x = x_input()
    h, sums, i = shadow(model, x, 2)
    outs = _all_layer_outputs(ref, x)
    assert i == 2
    assert torch.equal(h, outs[2])
    assert torch.equal(sums[0], outs[3].sum())


@pytest.mark.parametrize("flag", [True, False])
def test_conditional_expression_reads_one_branch(mlp, flag):
    model, ref = mlp

    @intervene
    def pick(model, x, flag):
        with model.trace(x):
            h = (model.layers[3].output if flag else model.layers[1].output).save()
        return h

    x = x_input()
    assert torch.equal(pick(model, x, flag), _all_layer_outputs(ref, x)[3 if flag else 1])


def test_out_of_order_read_in_branch_not_taken(mlp):
    model, ref = mlp

    @intervene
    def maybe(model, x, debug):
        with model.trace(x):
            h = model.layers[3].output.save()
            if debug:
                print(model.layers[1].output.save())
        return h

    x = x_input()
    assert torch.equal(maybe(model, x, False), _all_layer_outputs(ref, x)[3])


# --------------------------------------------------------------------------------------
# The envoy tree
# --------------------------------------------------------------------------------------


class _Named(nn.Module):
    """Children named like an envoy's own methods and attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.trace = nn.Linear(2, 2)
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(self.trace(x))


def test_children_are_cached_attributes_that_hide_nothing():
    model = NNsight(_Named())
    first = model.lin
    assert model.lin is first and model.__dict__["lin"] is first  # a plain attribute now
    # A child called like one of the wrapper's methods (reached by path, as a plan's
    # static path is): the method stays.
    child = model._child("trace")
    assert child._module is model._module.trace
    assert "trace" not in model.__dict__
    with pytest.raises(NotInTraceError):
        model.trace(x_input(hidden=2))


def test_a_replaced_child_gets_a_new_envoy():
    model = NNsight(_Named())
    old = model.lin
    model.lin = nn.Linear(2, 2)
    assert model.lin is not old and model.lin._module is model._module.lin
