"""Intervening while the model generates.

``model.generate(...)`` runs the model's own ``generate``; step k is its k-th forward
pass (step 0 reads the whole prompt, later steps one new token each, thanks to the
KV cache).

1. At every step (``tracer.all()``): scale layer 10's output by 0.9 and collect the
   last layer's hidden states.
2. At steps 2 to 4 only (``tracer.iter[2:5]``): zero layer 10's output, and compare
   the text with and without.

Run it with ``python samples/generation.py``.
"""

from __future__ import annotations

import torch

from compiler import intervene
from runtime import LanguageModel

PROMPT = "The Eiffel Tower is in the city of"
LAYER = 10
NEW_TOKENS = 8


@intervene
def plain(model, prompt, n):
    """No intervention: the generated ids, prompt included."""
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:
        pass
    return tracer.result


@intervene
def scale_all_steps(model, prompt, n, layer):
    """At every step: layer ``layer`` times 0.9; collect the last layer's output."""
    hs = []
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:
        with tracer.all():
            model.model.layers[layer].output[:] *= 0.9
            hs.append(model.model.layers[-1].output.save())
        out = model.generator.output.save()
    return hs, out


@intervene
def zero_some_steps(model, prompt, n, layer):
    """At steps 2, 3 and 4 only: zero layer ``layer``'s output."""
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:
        with tracer.iter[2:5]:
            model.model.layers[layer].output[:] = 0
        out = model.generator.output.save()
    return out


def main() -> None:
    torch.set_grad_enabled(False)  # inference only
    model = LanguageModel("smollm2-135m")
    tok = model.tokenizer
    n_prompt = len(tok(PROMPT)["input_ids"])

    def new_text(ids: torch.Tensor) -> str:
        return repr(tok.decode(ids[0, n_prompt:]))

    print(f"prompt: {PROMPT!r} ({n_prompt} tokens), {NEW_TOKENS} new tokens, greedy\n")
    base = plain(model, PROMPT, NEW_TOKENS)
    print(f"no intervention:             {new_text(base)}")

    print(f"\n1. every step: layer {LAYER} output x 0.9, last layer's hidden states saved")
    hs, out = scale_all_steps(model, PROMPT, NEW_TOKENS, LAYER)
    for step, h in enumerate(hs):
        print(f"   step {step}: hidden {tuple(h.shape)}")
    print(f"   text:                     {new_text(out)}")

    print(f"\n2. steps 2-4 only: layer {LAYER} output zeroed")
    out = zero_some_steps(model, PROMPT, NEW_TOKENS, LAYER)
    print(f"   without:                  {new_text(base)}")
    print(f"   with:                     {new_text(out)}")
    same = 0
    while same < NEW_TOKENS and out[0, n_prompt + same] == base[0, n_prompt + same]:
        same += 1
    print(f"   first {same} new token(s) unchanged (steps 0 and 1 run before the zeroing)")


if __name__ == "__main__":
    main()
