"""Invokes and barriers: several inputs in one batched forward pass.

Each invoke sees (and writes) only its own rows; its results equal the same prompt
run alone.  Barriers let one invoke hand a value to another at the same module.
Checked on the default model against runs alone and plain forward hooks, and on a
tiny MLP (``NNsight`` batching of plain modules).
"""

from __future__ import annotations

import pytest
import torch
from support import assert_no_hooks, forward_hooks

from compiler import CompileError, intervene
from runtime import LanguageModel, NNsight
from runtime.models import tiny_mlp

A = "The Eiffel Tower is in the city of"
B = "The Colosseum is in the city of"  # same length as A (9 tokens)
SHORT = "Paris is the capital of"  # 6 tokens
CLOSE = {"atol": 1e-4, "rtol": 1e-4}


# --------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    return LanguageModel("smollm2-135m", dispatch=True)  # tests reach into _module


@pytest.fixture
def model(lm):
    """The default model, inference only; no hook may stay after the test."""
    with torch.no_grad():
        yield lm
    assert_no_hooks(lm._module)


@pytest.fixture
def mlp():
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    yield model
    assert_no_hooks(model._module)


def alone(lm, prompt, hooks=None):
    """Logits of ``prompt`` run alone through the wrapped model, with forward hooks."""
    with forward_hooks(hooks):
        return lm._module(**lm.tokenizer(prompt, return_tensors="pt")).logits


def n_tokens(lm, prompt) -> int:
    return len(lm.tokenizer(prompt)["input_ids"])


# --------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------


@intervene
def two_invokes(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            hidden_a = model.model.layers[10].output.save()
            logits_a = model.lm_head.output.save()
        with tracer.invoke(b):
            hidden_b = model.model.layers[10].output.save()
            logits_b = model.lm_head.output.save()
    return hidden_a, logits_a, hidden_b, logits_b


@intervene
def one_trace(model, prompts):
    with model.trace(prompts):
        hidden = model.model.layers[10].output.save()
        logits = model.lm_head.output.save()
    return hidden, logits


@intervene
def zero_in_first(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            model.model.layers[3].output[:] = 0
            logits_a = model.lm_head.output.save()
        with tracer.invoke(b):
            logits_b = model.lm_head.output.save()
    return logits_a, logits_b


@intervene
def whole_batch(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            first = model.lm_head.output.save()
        with tracer.invoke(b):
            second = model.lm_head.output.save()
        with tracer.invoke():
            everything = model.lm_head.output.save()
    return first, second, everything


@intervene
def list_invoke(model, pair, single):
    with model.trace() as tracer:
        with tracer.invoke(pair):
            pair_logits = model.lm_head.output.save()
        with tracer.invoke(single):
            single_logits = model.lm_head.output.save()
    return pair_logits, single_logits


@intervene
def barrier_copy(model, a, b):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(a):
            embeddings = model.model.embed_tokens.output
            barrier()
        with tracer.invoke(b):
            barrier()
            model.model.embed_tokens.output = embeddings
            out = model.lm_head.output[:, -1].save()
    return out


@intervene
def barrier_patch(model, clean, corrupt, layer):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(clean):
            h = model.model.layers[layer].output[:, -1, :]
            barrier()
        with tracer.invoke(corrupt):
            barrier()
            model.model.layers[layer].output[:, -1, :] = h
            logits = model.lm_head.output[:, -1].save()
    return logits


@intervene
def patch_no_barrier(model, clean, corrupt, layer):
    with model.trace() as tracer:
        with tracer.invoke(clean):
            h = model.model.layers[layer].output[:, -1, :]
        with tracer.invoke(corrupt):
            model.model.layers[layer].output[:, -1, :] = h
            logits = model.lm_head.output[:, -1].save()
    return logits


@intervene
def patch_later_layer(model, clean, corrupt, layer):
    with model.trace() as tracer:
        with tracer.invoke(clean):
            h = model.model.layers[layer].output[:, -1, :]
        with tracer.invoke(corrupt):
            model.model.layers[layer + 1].output[:, -1, :] = h
            logits = model.lm_head.output[:, -1].save()
    return logits


@intervene
def flow_in_source_order(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            h = model.model.layers[4].output[:, -1, :]
        with tracer.invoke(b):
            out = model.model.layers[8].output
            out[:, -1, :] = h
            logits = model.lm_head.output[:, -1].save()
    return logits



def _line_of(marker: str) -> int:
    """The line of this file holding ``marker`` (in a comment)."""
    with open(__file__, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if marker in text and "_line_of" not in text:
                return number
    raise AssertionError(marker)


@intervene
def compute_after_a_barrier(model, a, b):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(a):
            h = model.model.layers[3].output
            barrier()
        with tracer.invoke(b):
            barrier()
            x = h * 2
            model.model.layers[5].output = x
            logits = model.lm_head.output[:, -1].save()
    return logits


@intervene
def barrier_of_three(model, a, b):
    with model.trace() as tracer:
        barrier = tracer.barrier(3)
        with tracer.invoke(a):
            x = model.model.embed_tokens.output
            barrier()
        with tracer.invoke(b):
            barrier()
            model.model.embed_tokens.output = x
            out = model.lm_head.output.save()
    return out


@intervene
def barrier_in_one_invoke(model, a, b):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(a):
            x = model.model.embed_tokens.output.save()
            barrier()
        with tracer.invoke(b):
            out = model.lm_head.output.save()
    return x, out


# --------------------------------------------------------------------------------------
# Each invoke gives what its prompt gives alone
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_each_invoke_equals_its_prompt_alone(model):
    hidden_a, logits_a, hidden_b, logits_b = two_invokes(model, A, SHORT)
    n_a, n_s = n_tokens(model, A), n_tokens(model, SHORT)
    # each invoke's values are its own rows of the left-padded batch
    assert hidden_a.shape == (1, n_a, 576) and logits_a.shape[:2] == (1, n_a)
    assert hidden_b.shape == (1, n_a, 576) and logits_b.shape[:2] == (1, n_a)
    torch.testing.assert_close(logits_a, alone(model, A), **CLOSE)
    torch.testing.assert_close(logits_b[:, -n_s:], alone(model, SHORT), **CLOSE)
    assert model.tokenizer.decode(int(logits_a[0, -1].argmax())) == " Paris"


@pytest.mark.slow
def test_short_prompt_first_is_padded_too(model):
    _, logits_s, _, logits_a = two_invokes(model, SHORT, A)
    n_s = n_tokens(model, SHORT)
    torch.testing.assert_close(logits_s[:, -n_s:], alone(model, SHORT), **CLOSE)
    torch.testing.assert_close(logits_a, alone(model, A), **CLOSE)


@pytest.mark.slow
def test_a_list_of_prompts_in_trace_behaves_the_same(model):
    hidden, logits = one_trace(model, [A, SHORT])
    _, logits_a, hidden_b, logits_b = two_invokes(model, A, SHORT)
    assert hidden.shape == (2, n_tokens(model, A), 576)
    torch.testing.assert_close(logits[0:1], logits_a, **CLOSE)
    torch.testing.assert_close(logits[1:2], logits_b, **CLOSE)
    torch.testing.assert_close(hidden[1:2], hidden_b, **CLOSE)
    n_s = n_tokens(model, SHORT)
    torch.testing.assert_close(logits[1:2, -n_s:], alone(model, SHORT), **CLOSE)


@pytest.mark.slow
def test_writes_stay_in_their_invoke(model):
    logits_a, logits_b = zero_in_first(model, A, SHORT)
    n_s = n_tokens(model, SHORT)
    torch.testing.assert_close(logits_b[:, -n_s:], alone(model, SHORT), **CLOSE)

    def zero(module, args, output):
        output[:] = 0

    expected_a = alone(model, A, hooks={model._module.model.layers[3]: zero})
    torch.testing.assert_close(logits_a, expected_a, **CLOSE)
    assert not torch.allclose(logits_a, alone(model, A), atol=1e-2)


@pytest.mark.slow
def test_invoke_without_input_sees_the_whole_batch(model):
    first, second, everything = whole_batch(model, A, SHORT)
    assert first.shape[0] == 1 and second.shape[0] == 1
    assert everything.shape == (2, *first.shape[1:])
    assert torch.equal(everything[0:1], first)
    assert torch.equal(everything[1:2], second)


@pytest.mark.slow
def test_an_invoke_with_a_list_of_two_prompts(model):
    pair, single = list_invoke(model, [A, SHORT], B)
    assert pair.shape[0] == 2 and single.shape[0] == 1
    n_s = n_tokens(model, SHORT)
    torch.testing.assert_close(pair[0:1], alone(model, A), **CLOSE)
    torch.testing.assert_close(pair[1:2, -n_s:], alone(model, SHORT), **CLOSE)
    torch.testing.assert_close(single, alone(model, B), **CLOSE)


# --------------------------------------------------------------------------------------
# Barriers and variables across invokes
# --------------------------------------------------------------------------------------


def batched_with_hooks(model, prompts, hooks):
    """The batch ``prompts`` (equal lengths: no padding) through the wrapped model."""
    with forward_hooks(hooks):
        return model._module(**model.tokenizer(prompts, return_tensors="pt")).logits


@pytest.mark.slow
def test_barrier_copy_equals_plain_hook(model):
    assert n_tokens(model, A) == n_tokens(model, B)

    def copy_row(module, args, output):
        output = output.clone()
        output[1] = output[0]
        return output

    expected = batched_with_hooks(model, [A, B], {model._module.model.embed_tokens: copy_row})
    out = barrier_copy(model, A, B)
    assert out.shape == (1, 49152)
    torch.testing.assert_close(out, expected[1:2, -1], **CLOSE)
    assert model.tokenizer.decode(int(out[0].argmax())) == " Paris"
    assert model.tokenizer.decode(int(alone(model, B)[0, -1].argmax())) == " Rome"


@pytest.mark.slow
@pytest.mark.parametrize("layer", [0, 12, 29])
def test_barrier_patch_equals_plain_hook(model, layer):
    def patch_row(module, args, output):
        output = output.clone()
        output[1, -1, :] = output[0, -1, :]
        return output

    expected = batched_with_hooks(model, [A, B],
                                  {model._module.model.layers[layer]: patch_row})
    out = barrier_patch(model, A, B, layer)
    torch.testing.assert_close(out, expected[1:2, -1], **CLOSE)


@pytest.mark.slow
def test_variables_flow_between_invokes_in_source_order(model):
    def patch_row(module, args, output):
        output[1, -1, :] = saved[0]

    saved = []
    hooks = {model._module.model.layers[4]: lambda m, a, o: saved.append(o[0, -1].clone()),
             model._module.model.layers[8]: patch_row}
    expected = batched_with_hooks(model, [A, B], hooks)
    out = flow_in_source_order(model, A, B)
    torch.testing.assert_close(out, expected[1:2, -1], **CLOSE)


@pytest.mark.slow
def test_patch_at_the_same_module_without_barrier(model):
    # `m.output[...] = h` reads `h` only once the module's value is there: by then the
    # earlier invoke (served first at the same module) has assigned it.
    expected = barrier_patch(model, A, B, 12)
    out = patch_no_barrier(model, A, B, 12)
    assert torch.equal(out, expected)


@pytest.mark.slow
def test_variable_used_first_in_a_later_invoke(model):
    def patch_row(module, args, output):
        output[1, -1, :] = saved[0]

    saved = []
    hooks = {model._module.model.layers[5]: lambda m, a, o: saved.append(o[0, -1].clone()),
             model._module.model.layers[6]: patch_row}
    expected = batched_with_hooks(model, [A, B], hooks)
    out = patch_later_layer(model, A, B, 5)
    torch.testing.assert_close(out, expected[1:2, -1], **CLOSE)


def test_computing_with_an_earlier_invokes_variable_before_any_module_is_a_compile_error():
    # Invoke 1's code up to its first module value runs when the pass starts, before
    # invoke 0 has run: reading invoke 0's `h` there cannot work, so it is reported early.
    with pytest.raises(CompileError) as info:
        @intervene
        def compute_first(model, a, b):
            with model.trace() as tracer:
                with tracer.invoke(a):
                    h = model.model.layers[3].output
                with tracer.invoke(b):
                    x = h * 2  # READ-TOO-EARLY
                    model.model.layers[5].output = x
                    logits = model.lm_head.output[:, -1].save()
            return logits

    message = str(info.value)
    assert "`h` comes from invoke 0" in message
    assert "before it waits for any module value" in message
    assert "tracer.barrier(2)" in message
    assert info.value.lineno == _line_of("READ-TOO-EARLY")


@pytest.mark.slow
def test_computing_with_an_earlier_invokes_variable_after_a_barrier(model):
    def write(module, args, output):
        output = output.clone()
        output[1] = saved[0] * 2
        return output

    saved = []
    hooks = {model._module.model.layers[3]: lambda m, a, o: saved.append(o[0].clone()),
             model._module.model.layers[5]: write}
    expected = batched_with_hooks(model, [A, B], hooks)
    out = compute_after_a_barrier(model, A, B)
    torch.testing.assert_close(out, expected[1:2, -1], **CLOSE)


@pytest.mark.slow
def test_barrier_never_reached_by_all_is_an_error(model):
    with pytest.raises(RuntimeError, match=r"barrier.*waits for 3 invokes but only 2"):
        barrier_of_three(model, A, B)
    assert_no_hooks(model._module)


@pytest.mark.slow
def test_barrier_reached_by_one_invoke_only_is_an_error(model):
    with pytest.raises(RuntimeError, match=r"barrier.*waits for 2 invokes but only 1"):
        barrier_in_one_invoke(model, A, B)
    assert_no_hooks(model._module)


# --------------------------------------------------------------------------------------
# NNsight: batching invokes of a plain module
# --------------------------------------------------------------------------------------


@intervene
def mlp_two_invokes(model, x, y):
    with model.trace() as tracer:
        with tracer.invoke(x):
            hidden_x = model.layers[1].output.save()
            out_x = model.head.output.save()
        with tracer.invoke(y):
            hidden_y = model.layers[1].output.save()
            out_y = model.head.output.save()
    return hidden_x, out_x, hidden_y, out_y


@intervene
def mlp_write_second(model, x, y):
    with model.trace() as tracer:
        with tracer.invoke(x):
            out_x = model.head.output.save()
        with tracer.invoke(y):
            model.layers[2].output[:] = 1.0
            out_y = model.head.output.save()
    return out_x, out_y


@intervene
def served_order(model, x, y):
    log = []
    with model.trace() as tracer:
        with tracer.invoke(x):
            model.layers[0].output.save()
            log.append(("first", model.layers[2].output.shape[0]))
        with tracer.invoke(y):
            log.append(("second", model.layers[2].output.shape[0]))  # waits there first
    return log


def test_lanes_waiting_at_one_module_run_in_source_order(mlp):
    # The second invoke waits at layers[2] from the start, the first only once layers[0]
    # has run; at layers[2] the first still goes first.
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    assert served_order(mlp, x, y) == [("first", 2), ("second", 3)]


def test_mlp_invokes_equal_separate_runs(mlp):
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    hidden_x, out_x, hidden_y, out_y = mlp_two_invokes(mlp, x, y)
    assert hidden_x.shape == (2, 8) and hidden_y.shape == (3, 8)
    assert out_x.shape == (2, 2) and out_y.shape == (3, 2)
    with torch.no_grad():
        torch.testing.assert_close(out_x, mlp._module(x), **CLOSE)
        torch.testing.assert_close(out_y, mlp._module(y), **CLOSE)
        torch.testing.assert_close(
            hidden_y, mlp._module.layers[1](torch.relu(mlp._module.layers[0](y))),
            **CLOSE)


def test_mlp_write_stays_in_its_invoke(mlp):
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    out_x, out_y = mlp_write_second(mlp, x, y)
    layers = mlp._module.layers
    with torch.no_grad():
        torch.testing.assert_close(out_x, mlp._module(x), **CLOSE)
        h = torch.ones(3, 8)
        h = torch.relu(layers[3](h))
        torch.testing.assert_close(out_y, mlp._module.head(h), **CLOSE)


def test_mlp_non_tensor_input_names_the_invoke(mlp):
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="invoke 1"):
        mlp_two_invokes(mlp, x, [[0.0] * 8])
    assert_no_hooks(mlp._module)


# --------------------------------------------------------------------------------------
# Mistakes the compiler catches
# --------------------------------------------------------------------------------------


def test_invoke_inside_invoke_is_a_compile_error():
    with pytest.raises(CompileError, match="invoke inside an invoke") as info:

        @intervene
        def nested(model, a, b):
            with model.trace() as tracer:  # noqa: SIM117
                with tracer.invoke(a):
                    with tracer.invoke(b):
                        out = model.head.output.save()
            return out

    assert "close the first invoke" in str(info.value)
    assert info.value.filename.endswith("test_invokes.py")


def test_trace_input_with_invokes_is_a_compile_error():
    with pytest.raises(CompileError) as info:

        @intervene
        def both(model, a, b):
            with model.trace(a) as tracer:  # noqa: SIM117
                with tracer.invoke(b):
                    out = model.head.output.save()
            return out

    message = str(info.value)
    assert "invoke" in message and "give every input to an invoke" in message


def test_trace_with_neither_input_nor_invokes_is_a_compile_error():
    with pytest.raises(CompileError) as info:

        @intervene
        def neither(model):
            with model.trace():
                out = model.head.output.save()
            return out

    message = str(info.value)
    assert "model.trace(input)" in message and "tracer.invoke(input)" in message


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


def test_plan_shows_both_lanes():
    text = str(two_invokes.plan)
    assert "invoke 0" in text and "invoke 1" in text
    lines = text.splitlines()
    first = next(i for i, t in enumerate(lines) if "invoke 0" in t)
    second = next(i for i, t in enumerate(lines) if "invoke 1" in t)
    assert first < second
    assert any("lm_head" in t for t in lines[first:second])
    assert any("lm_head" in t for t in lines[second:])
