"""``LanguageModel`` on the default model, checked against plain transformers.

Every traced run is compared bit for bit with the same computation done by hand on
the wrapped model (``lm._module``): a plain forward call, or the same intervention
written as a ``register_forward_hook``.  After every test no hook stays on the model.
"""

from __future__ import annotations

import pytest
import torch
from support import assert_no_hooks, forward_hooks

from compiler import intervene
from runtime import LanguageModel

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is in the city of"
OTHER = "The Colosseum is in the city of"
LAYER = 5


# --------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    return LanguageModel("smollm2-135m", dispatch=True)  # tests reach into _module


@pytest.fixture(autouse=True)
def no_hooks_left(lm):
    torch.set_grad_enabled(False)
    try:
        yield
    finally:
        torch.set_grad_enabled(True)
    assert_no_hooks(lm._module)


def plain_logits(lm, prompt=PROMPT, hooks=None):
    """``lm._module(**tok(prompt))`` with forward hooks ``{module: fn}`` (removed after)."""
    with forward_hooks(hooks):
        return lm._module(**lm.tokenizer(prompt, return_tensors="pt")).logits


def layer(lm, i):
    return lm._module.model.layers[i]


def n_tokens(lm, prompt=PROMPT):
    """9 for PROMPT; a conversion made by transformers 4.x adds a BOS token (10)."""
    return len(lm.tokenizer(prompt)["input_ids"])


# --------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------


@intervene
def logits_of(model, prompt):
    with model.trace(prompt):
        logits = model.lm_head.output.save()
    return logits


@intervene
def save_layer(model, prompt, i):
    with model.trace(prompt):
        hidden = model.model.layers[i].output.save()
        logits = model.lm_head.output.save()
    return hidden, logits


@intervene
def zero_last_token(model, prompt, i):
    with model.trace(prompt):
        model.model.layers[i].output[:, -1, :] = 0
        logits = model.lm_head.output.save()
    return logits


@intervene
def add_noise(model, prompt, i, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    with model.trace(prompt):
        out = model.model.layers[i].output
        model.model.layers[i].output = out + scale * torch.randn(out.shape, generator=gen)
        logits = model.lm_head.output.save()
    return logits


@intervene
def replace_output(model, prompt, i, value):
    with model.trace(prompt):
        model.model.layers[i].output = value
        logits = model.lm_head.output.save()
    return logits


# --------------------------------------------------------------------------------------
# Plain runs
# --------------------------------------------------------------------------------------


def test_paris_is_the_top_prediction(lm):
    logits = logits_of(lm, PROMPT)
    assert lm.tokenizer.decode(int(logits[0, -1].argmax())) == " Paris"


def test_traced_logits_equal_plain_transformers(lm):
    logits = logits_of(lm, PROMPT)
    assert torch.equal(logits, plain_logits(lm))


def test_model_outside_a_trace_is_the_wrapped_model(lm):
    enc = lm.tokenizer(PROMPT, return_tensors="pt")
    assert torch.equal(lm(**enc).logits, plain_logits(lm))


# --------------------------------------------------------------------------------------
# The seed's interventions equal plain forward hooks
# --------------------------------------------------------------------------------------


def test_save_layer_equals_hook(lm):
    seen = []
    expected_logits = plain_logits(lm, hooks={layer(lm, LAYER): lambda m, a, o: seen.append(o)})
    hidden, logits = save_layer(lm, PROMPT, LAYER)
    assert hidden.shape == (1, n_tokens(lm), 576)
    assert torch.equal(hidden, seen[0])
    assert torch.equal(logits, expected_logits)


def test_zero_last_token_equals_hook(lm):
    def hook(module, args, output):
        output[:, -1, :] = 0

    expected = plain_logits(lm, hooks={layer(lm, LAYER): hook})
    logits = zero_last_token(lm, PROMPT, LAYER)
    assert torch.equal(logits, expected)
    assert not torch.equal(logits, plain_logits(lm))


def test_add_noise_equals_hook(lm):
    gen = torch.Generator().manual_seed(7)

    def hook(module, args, output):
        return output + 0.5 * torch.randn(output.shape, generator=gen)

    expected = plain_logits(lm, hooks={layer(lm, LAYER): hook})
    logits = add_noise(lm, PROMPT, LAYER, 0.5, 7)
    assert torch.equal(logits, expected)
    assert not torch.equal(logits, plain_logits(lm))


def test_replace_with_constant_equals_hook(lm):
    value = torch.full((1, n_tokens(lm), 576), 0.25)
    expected = plain_logits(lm, hooks={layer(lm, LAYER): lambda m, a, o: value.clone()})
    logits = replace_output(lm, PROMPT, LAYER, value)
    assert torch.equal(logits, expected)
    assert not torch.equal(logits, plain_logits(lm))


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def test_all_input_kinds_give_the_same_logits(lm):
    tok = lm.tokenizer
    enc = tok(PROMPT, return_tensors="pt")
    ids = enc["input_ids"]
    expected = plain_logits(lm)
    inputs = {
        "str": PROMPT,
        "list of str": [PROMPT],
        "1-D tensor": ids[0],
        "2-D tensor": ids,
        "list of ids": ids[0].tolist(),
        "list of lists of ids": [ids[0].tolist()],
        "dict": {"input_ids": ids, "attention_mask": enc["attention_mask"]},
        "dict of ids only": {"input_ids": ids},
        "BatchEncoding": enc,
    }
    for kind, value in inputs.items():
        logits = logits_of(lm, value)
        assert logits.shape == expected.shape, kind
        assert torch.equal(logits, expected), kind


def test_a_list_of_prompts_gives_each_its_alone_logits(lm):
    logits = logits_of(lm, [PROMPT, "Paris is the capital of"])
    # batched matmuls may round differently: close, not bit-equal
    torch.testing.assert_close(logits[0], plain_logits(lm)[0], atol=1e-4, rtol=1e-4)
    short = plain_logits(lm, "Paris is the capital of")[0]
    # left-padded: the short prompt's positions are the last ones of its row
    torch.testing.assert_close(logits[1, -short.shape[0]:], short, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------
# The envoy tree
# --------------------------------------------------------------------------------------


def test_repr_shows_the_tree(lm):
    text = repr(lm)
    for name in ("LlamaForCausalLM", "(embed_tokens)", "(layers)", "LlamaDecoderLayer",
                 "(lm_head)", "(norm)"):
        assert name in text, name
    assert "30 x LlamaDecoderLayer" in text


def test_tree_navigation(lm):
    assert len(lm.model.layers) == 30
    assert lm.model.layers[-1]._module is lm._module.model.layers[29]
    assert [e._module for e in lm.model.layers[2:4]] == list(lm._module.model.layers[2:4])
    assert lm.tokenizer is not None and lm.config.num_hidden_layers == 30


def test_unknown_attribute_lists_children(lm):
    with pytest.raises(AttributeError) as info:
        _ = lm.model.layerz
    message = str(info.value)
    for child in ("embed_tokens", "layers", "norm"):
        assert child in message
    assert "layers" in message.split("Did you mean")[-1]


def test_unknown_attribute_of_root_lists_children(lm):
    with pytest.raises(AttributeError, match="lm_head"):
        _ = lm.transformer
