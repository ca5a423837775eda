"""The order check before a run compares only checkpoints of one forward pass: two
step blocks of other selections (``tracer.iter[0:2]`` then ``tracer.iter[3]``) ask for
values of different passes, so a later block may name an earlier module.  It was
refused (OutOfOrderError) once the model's order was known; checked against the
model's own ``generate`` with a hook that counts its calls."""

from __future__ import annotations

import pytest
import torch

from compiler import intervene
from runtime import LanguageModel
from runtime.errors import OutOfOrderError
from runtime.tiny import tiny_llama

PROMPT = torch.tensor([[1, 5, 7, 9, 11]])


@intervene
def later_step_earlier_module(model, x):
    with model.generate(x, max_new_tokens=5, do_sample=False) as tracer:
        with tracer.iter[0:2]:
            logits = model.lm_head.output.save()  # noqa: F841 - a checkpoint the order check sees
        with tracer.iter[3]:
            model.model.layers[0].output[:] = 0
        out = model.generator.output.save()
    return out


@intervene
def same_step_earlier_module(model, x):
    with model.generate(x, max_new_tokens=5, do_sample=False) as tracer:
        with tracer.iter[3]:
            logits = model.lm_head.output.save()  # noqa: F841 - a checkpoint the order check sees
        with tracer.iter[3]:
            model.model.layers[0].output[:] = 0
        out = model.generator.output.save()
    return out


def plain_zeroing_call(lm, call: int):
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == call + 1:
            return torch.zeros_like(output)
        return None

    handle = lm._module.model.layers[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return lm._module.generate(PROMPT, max_new_tokens=5, do_sample=False)
    finally:
        handle.remove()


@pytest.mark.parametrize("runs", [1, 2], ids=["fresh model", "order known"])
def test_a_later_step_block_may_name_an_earlier_module(runs):
    lm = LanguageModel(tiny_llama(0))
    for _ in range(runs):  # the second run checks the order before it starts
        with torch.no_grad():
            out = later_step_earlier_module(lm, PROMPT)
    assert out.tolist() == plain_zeroing_call(lm, 3).tolist()
    assert out.tolist() != plain_zeroing_call(lm, 99).tolist()  # the write changed the tokens


def test_two_blocks_of_the_same_step_still_keep_the_model_s_order():
    lm = LanguageModel(tiny_llama(0))
    with torch.no_grad():
        later_step_earlier_module(lm, PROMPT)  # the order is known from here on
        with pytest.raises(OutOfOrderError, match=r"`model.model.layers\[0\].output` \(line 37\) "
                           r"is asked for after `model.lm_head.output` \(line 35\)"):
            same_step_earlier_module(lm, PROMPT)
