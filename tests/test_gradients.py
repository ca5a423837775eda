"""Gradients in a trace: ``with loss.backward():`` blocks and ``retain_grad``.

Every gradient is compared with the same model (same seed) and input run through plain
PyTorch: forward hooks capture the module outputs, ``torch.autograd.grad`` (or a tensor
hook, for edited gradients) gives the reference.  After every run no hook may stay on
the model.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from support import assert_no_hooks, forward_hooks, line_in, x_input

from compiler import CompileError, intervene
from runtime import MissedCheckpointError, NNsight, OutOfOrderError
from runtime.models import tiny_mlp

THIS_FILE = Path(__file__).resolve()


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def line_of(marker: str) -> int:
    """The line of this file ending with ``marker`` (exactly once)."""
    return line_in(THIS_FILE, marker)


def reference_outputs(model, x, indices, *, edit=None):
    """Run plain ``model(x)`` capturing ``model.layers[i]`` outputs; ``edit={i: fn}``
    registers ``fn`` as a tensor hook on that output (a gradient edit)."""
    seen = {}

    def capture(i):
        def hook(mod, args, out):
            seen[i] = out
            if edit and i in edit:
                out.register_hook(edit[i])
        return hook

    with forward_hooks({model.layers[i]: capture(i) for i in indices}):
        out = model(x)
    return out, seen


@pytest.fixture
def mlp():
    """(wrapped model, an identical plain reference model)."""
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    yield model, tiny_mlp(n_layers=4, hidden=8, seed=0)
    assert_no_hooks(model)


def frozen_mlp():
    model = tiny_mlp(n_layers=4, hidden=8, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------
# Reading gradients
# --------------------------------------------------------------------------------------


@intervene
def grads(model, x):
    with model.trace(x):
        h1 = model.layers[1].output
        h3 = model.layers[3].output
        loss = model.head.output.sum()
        with loss.backward():
            g3 = h3.grad.save()
            g1 = h1.grad.save()
    return g1, g3


def test_grads_match_autograd(mlp):
    model, ref = mlp
    x = x_input()
    g1, g3 = grads(model, x)
    out, seen = reference_outputs(ref, x, [1, 3])
    e1, e3 = torch.autograd.grad(out.sum(), [seen[1], seen[3]])
    assert g1.shape == (3, 8) and g3.shape == (3, 8)
    assert torch.equal(g3, e3)
    assert torch.equal(g1, e1)
    assert g1.abs().sum() > 0


def test_grads_are_repeatable_and_leave_nothing(mlp):
    model, _ = mlp
    x = x_input(4)
    first = grads(model, x)
    assert_no_hooks(model)
    second = grads(model, x)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@intervene
def grad_of_input_of_layer(model, x):
    with model.trace(x):
        inp = model.layers[2].input
        loss = model.head.output[:, 0].sum()
        with loss.backward():
            g = inp.grad.save()
    return g


def test_grad_of_module_input(mlp):
    model, ref = mlp
    x = x_input(2)
    g = grad_of_input_of_layer(model, x)
    # The input of layers[2] is relu(layers[1] output), a tensor of its own.
    captured = {}
    handle = ref.layers[2].register_forward_pre_hook(lambda m, a: captured.setdefault("i", a[0]))
    try:
        out = ref(x)
    finally:
        handle.remove()
    (expected,) = torch.autograd.grad(out[:, 0].sum(), [captured["i"]])
    assert torch.equal(g, expected)


# --------------------------------------------------------------------------------------
# Writing gradients
# --------------------------------------------------------------------------------------


@intervene
def double_grad(model, x):
    with model.trace(x):
        h1 = model.layers[1].output
        h3 = model.layers[3].output
        loss = model.head.output.sum()
        with loss.backward():
            h3.grad = h3.grad * 2
            g1 = h1.grad.save()
    return g1


def test_assigned_grad_flows_on(mlp):
    model, ref = mlp
    x = x_input(5)
    g1 = double_grad(model, x)
    out, seen = reference_outputs(ref, x, [1, 3], edit={3: lambda g: g * 2})
    (expected,) = torch.autograd.grad(out.sum(), [seen[1]])
    assert torch.equal(g1, expected)
    out_plain, seen_plain = reference_outputs(ref, x, [1])
    (plain,) = torch.autograd.grad(out_plain.sum(), [seen_plain[1]])
    assert torch.allclose(g1, plain * 2)


@intervene
def zero_grad_in_place(model, x):
    with model.trace(x):
        h1 = model.layers[1].output
        h3 = model.layers[3].output
        loss = model.head.output.sum()
        with loss.backward():
            h3.grad[:] = 0
            g3 = h3.grad.save()
            g1 = h1.grad.save()
    return g1, g3


def test_in_place_zero_grad_stops_the_flow(mlp):
    model, _ = mlp
    g1, g3 = zero_grad_in_place(model, x_input(6))
    assert torch.equal(g3, torch.zeros(3, 8))
    assert torch.equal(g1, torch.zeros(3, 8))


@intervene
def zero_one_row_of_grad(model, x):
    with model.trace(x):
        h1 = model.layers[1].output
        h2 = model.layers[2].output
        loss = model.head.output.sum()
        with loss.backward():
            h2.grad[0] = 0
            g1 = h1.grad.save()
    return g1


def test_in_place_row_edit_matches_tensor_hook(mlp):
    model, ref = mlp
    x = x_input(7)
    g1 = zero_one_row_of_grad(model, x)

    def edit(g):
        g = g.clone()
        g[0] = 0
        return g

    out, seen = reference_outputs(ref, x, [1, 2], edit={2: edit})
    (expected,) = torch.autograd.grad(out.sum(), [seen[1]])
    assert torch.equal(g1, expected)
    assert torch.equal(g1[0], torch.zeros(8))
    assert g1[1:].abs().sum() > 0


# --------------------------------------------------------------------------------------
# Order and errors
# --------------------------------------------------------------------------------------


@intervene
def grads_wrong_order(model, x):
    with model.trace(x):
        h1 = model.layers[1].output
        h3 = model.layers[3].output
        loss = model.head.output.sum()
        with loss.backward():
            g1 = h1.grad.save()  # GRAD-FIRST
            g3 = h3.grad.save()  # GRAD-SECOND
    return g1, g3


def test_grads_in_forward_order_raise_out_of_order(mlp):
    model, _ = mlp
    with pytest.raises(OutOfOrderError) as info:
        grads_wrong_order(model, x_input())
    message = str(info.value)
    assert f"line {line_of('# GRAD-FIRST')}" in message
    assert f"line {line_of('# GRAD-SECOND')}" in message
    last = traceback.extract_tb(info.value.__traceback__)[-1]
    assert Path(last.filename).resolve() == THIS_FILE
    assert last.lineno == line_of("# GRAD-SECOND")


@intervene
def grad_of_unused_value(model, x):
    with model.trace(x):
        h1 = model.layers[1].output
        out = model.head.output
        loss = h1.sum()
        with loss.backward():
            g = out.grad.save()  # GRAD-UNUSED
    return g


def test_grad_of_value_the_loss_does_not_depend_on(mlp):
    model, _ = mlp
    with pytest.raises(MissedCheckpointError) as info:
        grad_of_unused_value(model, x_input())
    assert f"line {line_of('# GRAD-UNUSED')}" in str(info.value)


@intervene
def grad_of_loss_only_head(model, x):
    with model.trace(x):
        h3 = model.layers[3].output
        loss = model.head.output.sum()
        with loss.backward():
            g = h3.grad.save()  # GRAD-NO-REQUIRES
    return g


def test_frozen_params_need_requires_grad():
    model = NNsight(frozen_mlp())
    with pytest.raises(RuntimeError, match="requires_grad") as info:
        grad_of_loss_only_head(model, x_input())
    assert not isinstance(info.value, (OutOfOrderError, MissedCheckpointError))
    assert_no_hooks(model)


def test_output_inside_backward_block_is_compile_error():
    with pytest.raises(CompileError) as info:

        @intervene
        def output_in_backward(model, x):
            with model.trace(x):
                loss = model.head.output.sum()
                with loss.backward():
                    g = model.layers[1].output.grad.save()  # OUTPUT-IN-BACKWARD
            return g

        output_in_backward(NNsight(tiny_mlp()), x_input())
    assert info.value.lineno == line_of("# OUTPUT-IN-BACKWARD")


# --------------------------------------------------------------------------------------
# requires_grad on module values
# --------------------------------------------------------------------------------------


@intervene
def grads_with_requires_grad(model, x):
    with model.trace(x):
        h1 = model.layers[1].output
        h1.requires_grad = True
        h3 = model.layers[3].output
        loss = model.head.output.sum()
        with loss.backward():
            g3 = h3.grad.save()
            g1 = h1.grad.save()
    return g1, g3


@pytest.mark.parametrize("frozen", [True, False])
def test_requires_grad_on_module_value(frozen):
    plain = frozen_mlp() if frozen else tiny_mlp(n_layers=4, hidden=8, seed=0)
    model = NNsight(plain)
    ref = tiny_mlp(n_layers=4, hidden=8, seed=0)
    x = x_input(3)
    g1, g3 = grads_with_requires_grad(model, x)
    out, seen = reference_outputs(ref, x, [1, 3])
    e1, e3 = torch.autograd.grad(out.sum(), [seen[1], seen[3]])
    assert torch.equal(g1, e1)
    assert torch.equal(g3, e3)
    assert_no_hooks(model)
    if frozen:
        assert all(p.grad is None for p in plain.parameters())


@intervene
def grad_of_input_tensor(model, x):
    with model.trace(x):
        loss = model.head.output.sum()
        loss.backward()
    return x.grad


def test_leaf_input_requires_grad_with_plain_backward():
    model = NNsight(frozen_mlp())
    ref = tiny_mlp(n_layers=4, hidden=8, seed=0)
    x = x_input(8).requires_grad_(True)
    g = grad_of_input_tensor(model, x)
    x2 = x_input(8).requires_grad_(True)
    (expected,) = torch.autograd.grad(ref(x2).sum(), [x2])
    assert torch.equal(g, expected)
    assert_no_hooks(model)


@intervene
def grads_in_a_loop(model, x):
    with model.trace(x):
        hs = []
        for layer in model.layers:
            h = layer.output
            hs.append(h)
        loss = model.head.output[:, 1].sum()
        grads = [].save()
        with loss.backward():
            for h in reversed(hs):
                grads.append((h.grad * h).sum(-1))
    return grads


def test_grads_read_in_a_loop_in_reverse(mlp):
    model, ref = mlp
    x = x_input(13)
    got = grads_in_a_loop(model, x)
    out, seen = reference_outputs(ref, x, range(4))
    expected = torch.autograd.grad(out[:, 1].sum(), [seen[i] for i in range(4)])
    assert len(got) == 4
    for g, e, i in zip(got, reversed(expected), reversed(range(4))):
        assert torch.equal(g, (e * seen[i]).sum(-1).detach())


@intervene
def backward_block_reading_nothing(model, x):
    with model.trace(x):
        loss = model.head.output.sum()
        with loss.backward():
            pass


def test_backward_block_without_grads_leaves_param_grads_alone(mlp):
    # A backward block computes what its code asks for; the model's parameters get no
    # `.grad` (on a real model that would be its whole size, added to on every run).
    model, _ = mlp
    backward_block_reading_nothing(model, x_input(14))
    assert all(p.grad is None for p in model._module.parameters())


@intervene
def plain_backward_in_trace(model, x):
    with model.trace(x):
        loss = model.head.output.sum()
        loss.backward()


def test_plain_backward_in_trace_fills_param_grads_like_pytorch(mlp):
    # Plain `loss.backward()` (no block) is PyTorch's own: parameter gradients accumulate.
    model, ref = mlp
    x = x_input(14)
    for _ in range(2):
        plain_backward_in_trace(model, x)
        ref(x).sum().backward()
    for (name, p), q in zip(model._module.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        assert torch.equal(p.grad, q.grad), name


@intervene
def raise_in_backward(model, x):
    with model.trace(x):
        h1 = model.layers[1].output.save()
        h3 = model.layers[3].output.save()
        loss = model.head.output.sum()
        with loss.backward():
            g3 = h3.grad.save()
            raise ValueError("boom in backward")  # RAISE-IN-BACKWARD
            g1 = h1.grad.save()
    return h1, h3, g1, g3


def test_error_in_backward_block_keeps_type_and_removes_hooks(mlp):
    model, _ = mlp
    with pytest.raises(ValueError, match="boom in backward") as info:
        raise_in_backward(model, x_input())
    lines = [f.lineno for f in traceback.extract_tb(info.value.__traceback__)
             if Path(f.filename).resolve() == THIS_FILE]
    assert line_of("# RAISE-IN-BACKWARD") in lines
    assert_no_hooks(model)
    # and a run after it works
    g1, g3 = grads(model, x_input())
    assert g1.shape == (3, 8) and g3.shape == (3, 8)


# --------------------------------------------------------------------------------------
# Several backward blocks, invokes
# --------------------------------------------------------------------------------------


@intervene
def two_backward_blocks(model, x):
    with model.trace(x):
        h1 = model.layers[1].output
        out = model.head.output
        loss_a = out[:, 0].sum()
        loss_b = out[:, 1].sum()
        with loss_a.backward(retain_graph=True):
            ga = h1.grad.save()
        with loss_b.backward():
            gb = h1.grad.save()
    return ga, gb


def test_two_backward_blocks_retain_graph(mlp):
    model, ref = mlp
    x = x_input(9)
    ga, gb = two_backward_blocks(model, x)
    out, seen = reference_outputs(ref, x, [1])
    (ea,) = torch.autograd.grad(out[:, 0].sum(), [seen[1]], retain_graph=True)
    (eb,) = torch.autograd.grad(out[:, 1].sum(), [seen[1]])
    assert torch.equal(ga, ea)
    assert torch.equal(gb, eb)
    assert not torch.equal(ga, gb)


@intervene
def backward_per_invoke(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            a = model.layers[1].output
            loss_a = model.head.output[:, 0].sum()
            with loss_a.backward(retain_graph=True):
                ga = a.grad.save()
        with tracer.invoke(x2):
            b = model.layers[1].output
            loss_b = (model.head.output[:, 1] * 3).sum()
            with loss_b.backward(retain_graph=True):
                gb = b.grad.save()
    return ga, gb


def test_backward_per_invoke_gives_its_rows(mlp):
    model, ref = mlp
    x1, x2 = x_input(10, batch=2), x_input(11, batch=3)
    ga, gb = backward_per_invoke(model, x1, x2)
    assert ga.shape == (2, 8) and gb.shape == (3, 8)
    out1, seen1 = reference_outputs(ref, x1, [1])
    (e1,) = torch.autograd.grad(out1[:, 0].sum(), [seen1[1]])
    out2, seen2 = reference_outputs(ref, x2, [1])
    (e2,) = torch.autograd.grad((out2[:, 1] * 3).sum(), [seen2[1]])
    # rows of a batch: the same maths, possibly another kernel blocking
    torch.testing.assert_close(ga, e1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gb, e2, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------
# retain_grad and plain loss.backward() in the trace
# --------------------------------------------------------------------------------------


@intervene
def retain_grad_in_trace(model, x):
    with model.trace(x):
        h = model.layers[1].output.save()
        h.retain_grad()
        loss = model.head.output.sum()
        loss.backward()
    return h


def test_retain_grad_then_backward_in_trace(mlp):
    model, ref = mlp
    x = x_input(12)
    h = retain_grad_in_trace(model, x)
    out, seen = reference_outputs(ref, x, [1])
    (expected,) = torch.autograd.grad(out.sum(), [seen[1]])
    assert h.grad is not None
    assert torch.equal(h.grad, expected)
    assert torch.equal(h.detach(), seen[1].detach())


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


def test_plan_shows_backward_markers():
    text = str(grads.plan)
    assert "-- backward loss" in text
    assert "-- end-backward loss" in text
    assert "grad" in text
    assert text.index("-- backward") < text.rindex("grad")


# --------------------------------------------------------------------------------------
# The default model
# --------------------------------------------------------------------------------------


@intervene
def last_layer_grad(model, prompt):
    with model.trace(prompt):
        hidden = model.model.layers[-1].output
        hidden.requires_grad = True
        logits = model.lm_head.output
        loss = logits[0, -1].max()
        with loss.backward():
            grad = hidden.grad.save()
    return grad


@intervene
def paris_grads(model, prompt, target):
    with model.trace(prompt):
        h5 = model.model.layers[5].output
        h5.requires_grad = True
        h20 = model.model.layers[20].output
        h20.requires_grad = True
        logits = model.lm_head.output
        loss = torch.nn.functional.cross_entropy(logits[0, -1:], torch.tensor([target]))
        with loss.backward():
            g20 = h20.grad.save()
            g5 = h5.grad.save()
    return g5, g20


def plain_hf_grads(hf, ids, layers, loss_fn):
    """Plain transformers: capture ``model.layers[i]`` outputs, take autograd.grad."""
    seen = {}

    def capture(i):
        def hook(mod, args, out):
            seen[i] = out[0] if isinstance(out, tuple) else out
        return hook

    with forward_hooks({hf.model.layers[i]: capture(i) for i in layers}), torch.enable_grad():
        logits = hf(ids).logits
        loss = loss_fn(logits)
        for i in layers:
            assert seen[i].requires_grad
        return torch.autograd.grad(loss, [seen[i] for i in layers])


@pytest.fixture(scope="module")
def lm():
    from runtime import LanguageModel

    return LanguageModel("smollm2-135m", dispatch=True)  # tests reach into _module


@pytest.mark.slow
def test_default_model_hidden_grad_matches_hf(lm):
    prompt = "The Eiffel Tower is in the city of"
    grad = last_layer_grad(lm, prompt)
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    assert grad.shape == (1, n, 576)
    hf = lm._module
    (expected,) = plain_hf_grads(hf, ids, [29], lambda logits: logits[0, -1].max())
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert grad[0, -1].abs().sum() > 0
    assert_no_hooks(lm)


@pytest.mark.slow
def test_default_model_cross_entropy_paris(lm):
    prompt = "The Eiffel Tower is in the city of"
    (target,) = lm.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    g5, g20 = paris_grads(lm, prompt, target)
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    e5, e20 = plain_hf_grads(
        lm._module, ids, [5, 20],
        lambda logits: torch.nn.functional.cross_entropy(logits[0, -1:], torch.tensor([target])),
    )
    torch.testing.assert_close(g20, e20, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g5, e5, rtol=1e-5, atol=1e-6)
    assert_no_hooks(lm)
