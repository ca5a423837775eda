"""Generation on the default model: step blocks checked against the model's own
``generate`` with plain forward hooks that count their calls.

Step k is the k-th forward pass of ``generate`` (0 reads the prompt; later steps one
new token each, with the KV cache).  Everything is greedy unless said otherwise, and
``max_new_tokens`` stays small so the file runs quickly.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from support import assert_no_hooks, forward_hooks, line_in

from compiler import intervene
from runtime import LanguageModel

pytestmark = pytest.mark.slow

THIS_FILE = Path(__file__).resolve()
PROMPT = "The Eiffel Tower is in the city of"
OTHER = "The Colosseum is in the city of"  # same length as PROMPT
N = 5
LAYER = 10


# --------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------


def line_of(marker: str) -> int:
    """The line of this file ending with ``marker`` (exactly once)."""
    return line_in(THIS_FILE, marker)


@pytest.fixture(scope="module")
def lm():
    return LanguageModel("smollm2-135m", dispatch=True)  # tests reach into _module


@pytest.fixture(scope="module")
def baseline(lm):
    """Plain greedy generation of N tokens from PROMPT."""
    with torch.no_grad():
        return plain_generate(lm)


@pytest.fixture
def model(lm):
    with torch.no_grad():
        yield lm
    assert_no_hooks(lm._module)


def plain_generate(lm, prompt=PROMPT, hooks=None, **kwargs):
    """The wrapped model's own ``generate`` with forward hooks ``{module: fn}``."""
    kwargs = {"max_new_tokens": N, "do_sample": False, **kwargs}
    with forward_hooks(hooks):
        enc = lm.tokenizer(prompt, return_tensors="pt")
        return lm._module.generate(**enc, **kwargs)


def n_prompt(lm, prompt=PROMPT) -> int:
    return len(lm.tokenizer(prompt)["input_ids"])


def layer(lm, i):
    return lm._module.model.layers[i]


# --------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------


@intervene
def generate_plain(model, prompt, n):
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:
        out = model.generator.output.save()
    return out, tracer.result


@intervene
def scale_every_step(model, prompt, n, layer):
    hs = []
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:
        with tracer.all():
            model.model.layers[layer].output[:] *= 0.9
            hs.append(model.model.layers[-1].output.save())
        out = model.generator.output.save()
    return hs, out, tracer.result


@intervene
def zero_steps_2_and_3(model, prompt, n, layer):
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:
        with tracer.iter[2:4]:
            model.model.layers[layer].output[:] = 0
        out = model.generator.output.save()
    return out


@intervene
def step_numbers(model, prompt, n):
    steps = []
    shapes = []
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:
        for step in tracer.all():
            steps.append(step)
            shapes.append(model.model.layers[0].output.shape)
    return steps, shapes


@intervene
def step_numbers_of_a_slice(model, prompt, n):
    steps = []
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:
        for step in tracer.iter[1:3]:
            steps.append(step)  # noqa: PERF402
    return steps


@intervene
def list_of_steps(model, prompt, n):
    seen = []
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:  # noqa: SIM117
        with tracer.iter[[1, 3]]:
            seen.append(model.model.layers[0].output.shape[1])
    return seen


@intervene
def code_after_the_block(model, prompt, n):
    hs = []
    counts = []
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:
        with tracer.all():
            hs.append(model.model.layers[-1].output[:, -1])
        stacked = torch.cat(hs).save()
        counts.append(len(hs))
    return stacked, counts


@intervene
def missing_steps(model, prompt, n):
    seen = []
    after = []
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:
        with tracer.iter[1:8]:  # MISSING-STEPS
            seen.append(model.model.layers[0].output.shape)
        after.append(len(seen))
    return seen, after


@intervene
def second_block_after_first(model, prompt, n):
    first, second = [], []
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:
        with tracer.iter[0]:
            first.append(model.model.layers[0].output.shape)
        with tracer.iter[2]:  # SECOND-BLOCK
            second.append(model.model.layers[0].output.shape)
    return first, second


@intervene
def invokes_with_own_steps(model, a, b, n, layer):
    with model.generate(max_new_tokens=n, do_sample=False) as tracer:
        with tracer.invoke(a):
            with tracer.iter[1]:
                model.model.layers[layer].output[:] = 0
            out_a = model.generator.output.save()
        with tracer.invoke(b):
            with tracer.all():
                model.model.layers[layer].output[:] *= 0.5
            out_b = model.generator.output.save()
    return out_a, out_b, tracer.result


@intervene
def invokes_of_different_lengths(model, a, b, n):
    shapes = []
    with model.generate(max_new_tokens=n, do_sample=False) as tracer:
        with tracer.invoke(a):
            out_a = model.generator.output.save()
        with tracer.invoke(b):
            out_b = model.generator.output.save()
        with tracer.invoke():  # noqa: SIM117
            with tracer.all():
                shapes.append(tuple(model.model.layers[0].output.shape))
    return out_a, out_b, shapes, tracer.result


@intervene
def sample(model, prompt, n, seed):
    torch.manual_seed(seed)
    with model.generate(prompt, max_new_tokens=n, do_sample=True, top_k=50) as tracer:
        pass
    return tracer.result


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_no_intervention_equals_plain_generate(model, baseline):
    out, result = generate_plain(model, PROMPT, N)
    assert torch.equal(out, baseline)
    assert torch.equal(result, baseline)
    assert model.tokenizer.decode(out[0, n_prompt(model):]).startswith(" Paris")
    # `model.generator.output` and `tracer.result`: the full ids, prompt included
    ids = model.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    assert out.shape == (1, ids.shape[1] + N)
    assert torch.equal(out[:, : ids.shape[1]], ids)


def test_scale_every_step_equals_counting_hook(model):
    calls = []
    seen = []

    def scale(module, args, output):
        calls.append(output.shape[1])
        output[:] *= 0.9

    expected = plain_generate(model, hooks={
        layer(model, LAYER): scale,
        layer(model, -1): lambda m, a, o: seen.append(o.clone()),
    })
    assert len(calls) == N and len(seen) == N

    hs, out, result = scale_every_step(model, PROMPT, N, LAYER)
    assert torch.equal(out, expected) and torch.equal(result, expected)
    assert len(hs) == N
    for step, (h, ref) in enumerate(zip(hs, seen)):
        assert torch.equal(h, ref), step


def test_shapes_per_step(model):
    hs, _, _ = scale_every_step(model, PROMPT, N, LAYER)
    assert [tuple(h.shape) for h in hs] == [(1, n_prompt(model), 576)] + [(1, 1, 576)] * (N - 1)


def test_iter_slice_equals_hook_on_calls_2_and_3(model, baseline):
    calls = []

    def zero(module, args, output):
        if len(calls) in (2, 3):
            output[:] = 0
        calls.append(1)

    expected = plain_generate(model, hooks={layer(model, LAYER): zero})
    assert len(calls) == N
    out = zero_steps_2_and_3(model, PROMPT, N, LAYER)
    assert torch.equal(out, expected)
    base = baseline
    # steps 0 and 1 choose the first two new tokens: untouched
    k = n_prompt(model)
    assert torch.equal(out[:, : k + 2], base[:, : k + 2])
    assert not torch.equal(out, base)


def test_for_all_binds_step_numbers(model):
    steps, shapes = step_numbers(model, PROMPT, N)
    assert steps == list(range(N))
    assert shapes[0][1] == n_prompt(model) and all(s[1] == 1 for s in shapes[1:])


def test_for_over_a_slice_binds_its_steps(model):
    assert step_numbers_of_a_slice(model, PROMPT, N) == [1, 2]


def test_list_of_steps(model):
    assert list_of_steps(model, PROMPT, N) == [1, 1]


def test_code_after_a_step_block_runs_after_generation(model):
    stacked, counts = code_after_the_block(model, PROMPT, N)
    assert counts == [N]  # ran once, after all N steps
    assert stacked.shape == (N, 576)


def test_missing_steps_warn_at_the_users_line(model):
    with pytest.warns(RuntimeWarning, match=r"never came") as record:
        seen, after = missing_steps(model, PROMPT, 3)
    assert after == [2]  # the code after the block still ran
    assert len(seen) == 2  # steps 1 and 2 of 0..2
    (warning,) = [w for w in record if issubclass(w.category, RuntimeWarning)]
    assert Path(warning.filename).resolve() == THIS_FILE
    assert warning.lineno == line_of("# MISSING-STEPS")
    assert f"line {line_of('# MISSING-STEPS')}" in str(warning.message)


def test_a_second_step_block_runs_at_its_own_steps(model):
    # Several step blocks follow each other: each runs at its own steps (issue 13), no
    # warning.  Step 2 of a 4-token generation sees one new token: shape [1, 1, hidden].
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        first, second = second_block_after_first(model, PROMPT, 4)
    assert len(first) == 1 and len(second) == 1
    assert second[0][1] == 1 and first[0][1] > 1


def test_no_warning_when_every_step_comes(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        step_numbers(model, PROMPT, 3)
        list_of_steps(model, PROMPT, 4)


def test_invokes_with_different_step_selections(model):
    calls = []

    def per_row(module, args, output):
        if len(calls) == 1:
            output[0] = 0
        output[1] *= 0.5
        calls.append(1)

    enc = model.tokenizer([PROMPT, OTHER], return_tensors="pt")
    assert enc["attention_mask"].all()  # same length: no padding
    handle = layer(model, LAYER).register_forward_hook(per_row)
    try:
        expected = model._module.generate(**enc, max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()

    out_a, out_b, result = invokes_with_own_steps(model, PROMPT, OTHER, 4, LAYER)
    assert out_a.shape == (1, n_prompt(model) + 4) and out_b.shape == out_a.shape
    assert torch.equal(result, expected)
    assert torch.equal(out_a, expected[0:1]) and torch.equal(out_b, expected[1:2])


def test_invokes_of_different_lengths_each_generate_as_alone(model, baseline):
    short = "Paris is the capital of"
    out_a, out_b, shapes, result = invokes_of_different_lengths(model, PROMPT, short, N)
    k = n_prompt(model)
    assert result.shape == (2, k + N)
    assert torch.equal(out_a, result[0:1]) and torch.equal(out_b, result[1:2])
    assert torch.equal(out_a, baseline)
    # the short prompt is left-padded; its new tokens are those it generates alone
    assert torch.equal(out_b[:, -N:], plain_generate(model, short)[:, -N:])
    # `tracer.invoke()` with no input sees both rows at every step
    assert shapes == [(2, k, 576)] + [(2, 1, 576)] * (N - 1)


def test_sampling_with_a_seed_equals_plain_generate(model):
    out = sample(model, PROMPT, N, 123)
    torch.manual_seed(123)
    expected = plain_generate(model, do_sample=True, top_k=50)
    assert torch.equal(out, expected)


@intervene
def root_logits_every_step(model, prompt, n):
    shapes = []
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:
        for _step in tracer.all():
            shapes.append(tuple(model.output.logits.shape))
    return shapes


def test_root_output_per_step_is_what_plain_generate_computes(model):
    # The root's forward is wrapped during the trace; generate still sees its real
    # signature (it asks whether forward takes `logits_to_keep`), so each step computes
    # the logits of the last position only, as plain generate does.
    shapes = root_logits_every_step(model, PROMPT, 3)
    seen = []
    plain_generate(model, max_new_tokens=3,
                   hooks={model._module: lambda m, a, o: seen.append(tuple(o.logits.shape))})
    assert shapes == seen
    assert all(s[1] == 1 for s in seen)
