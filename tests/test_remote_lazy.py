"""``LanguageModel(name)`` loads config and tokenizer only; the weights load when a local
block first runs the model (``dispatch=True``: at once).  Plans, ``scan`` and remote
blocks never need them."""

from __future__ import annotations

import pytest
import torch

from compiler import intervene
from runtime import LanguageModel

pytestmark = pytest.mark.slow
PROMPT = "The Eiffel Tower is in the city of"


def on_meta(lm) -> bool:
    return all(p.device.type == "meta" for p in lm._module.parameters())


@intervene
def shapes(model, prompt):
    with model.scan(prompt):
        shape = model.model.layers[3].output.shape.save()
    return shape


@intervene
def last_hidden(model, prompt):
    with model.trace(prompt):
        hidden = model.model.layers[-1].output.save()
        logits = model.lm_head.output.save()
    return hidden, logits


def test_weights_load_at_the_first_local_block(default_lm):
    lm = LanguageModel("smollm2-135m")
    assert on_meta(lm) and lm.tokenizer is not None and lm.config.num_hidden_layers == 30
    layer = lm.model.layers[5]  # envoys made before loading stay valid after it
    assert shapes(lm, PROMPT) == torch.Size([1, 9, 576])
    assert on_meta(lm)  # scan ran on fake tensors: nothing loaded
    hidden, logits = last_hidden(lm, PROMPT)
    assert not any(p.device.type == "meta" for p in lm._module.parameters())
    assert not any(b.device.type == "meta" for b in lm._module.buffers())
    assert layer._module is lm._module.model.layers[5]
    eager = LanguageModel(default_lm[0], tokenizer=default_lm[1])
    want = last_hidden(eager, PROMPT)
    assert torch.equal(hidden, want[0]) and torch.equal(logits, want[1])
    # The tied embedding stays tied, and plain generate matches the eager model's.
    assert lm._module.lm_head.weight is lm._module.model.embed_tokens.weight
    assert torch.equal(lm.generate(PROMPT, max_new_tokens=3, do_sample=False),
                       eager.generate(PROMPT, max_new_tokens=3, do_sample=False))


def test_dispatch_true_and_plain_calls_load():
    assert not on_meta(LanguageModel("smollm2-135m", dispatch=True))
    lm = LanguageModel("smollm2-135m")
    ids = lm.tokenizer(PROMPT, return_tensors="pt")
    out = lm(**ids)  # a plain call outside a block loads first
    assert out.logits.shape == (1, 9, 49152) and not on_meta(lm)
