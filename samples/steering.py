"""Steering generation with a direction found by contrast.

1. Run a set of positive prompts and a set of negative prompts (one batch each) and
   take the mean last-token output of a middle layer for each set. Their difference is
   a "positive minus negative" direction in the residual stream.
2. Generate greedily from a neutral prompt, adding ``alpha * direction`` to that
   layer's output at every step, and compare with the text generated unsteered.

Run it with ``python samples/steering.py``.
"""

from __future__ import annotations

import torch

from compiler import intervene
from runtime import LanguageModel

LAYER = 15
ALPHA = 0.8
NEW_TOKENS = 20
NEUTRAL = "I went to see the new movie yesterday. Honestly, it was"

POSITIVE = [
    "I love this. It is wonderful",
    "What a great day, I feel so happy",
    "This is the best thing ever, absolutely amazing",
    "I adore it, it makes me joyful",
    "Fantastic work, I am delighted",
]
NEGATIVE = [
    "I hate this. It is terrible",
    "What an awful day, I feel so sad",
    "This is the worst thing ever, absolutely horrible",
    "I despise it, it makes me miserable",
    "Dreadful work, I am disgusted",
]


@intervene
def last_token_hidden(model, prompts, layer):
    """The output of ``layer`` at each prompt's last token (rows are left-padded, so
    position -1 is every prompt's own last token)."""
    with model.trace(prompts):
        hidden = model.model.layers[layer].output[:, -1, :].save()
    return hidden


@intervene
def generate(model, prompt, n):
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:
        pass
    return tracer.result


@intervene
def steered_generate(model, prompt, n, layer, vector):
    """Greedy generation with ``vector`` added to ``layer``'s output at every step
    (every position of the prompt at step 0, the new token at the later steps)."""
    with model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:  # noqa: SIM117
        with tracer.all():
            model.model.layers[layer].output += vector
    return tracer.result


def direction(model, positive=POSITIVE, negative=NEGATIVE, layer: int = LAYER) -> torch.Tensor:
    pos = last_token_hidden(model, positive, layer).mean(0)
    neg = last_token_hidden(model, negative, layer).mean(0)
    return pos - neg


def main() -> None:
    torch.set_grad_enabled(False)  # inference only
    model = LanguageModel("smollm2-135m")
    tok = model.tokenizer
    n_prompt = len(tok(NEUTRAL)["input_ids"])

    d = direction(model)
    print(f"direction at layer {LAYER}: mean of {len(POSITIVE)} positive minus "
          f"{len(NEGATIVE)} negative prompts, norm {float(d.norm()):.1f}")
    print(f"prompt: {NEUTRAL!r}, {NEW_TOKENS} new tokens, greedy\n")

    before = generate(model, NEUTRAL, NEW_TOKENS)
    print(f"unsteered:              {tok.decode(before[0, n_prompt:])!r}")
    for alpha in (ALPHA, -ALPHA):
        after = steered_generate(model, NEUTRAL, NEW_TOKENS, LAYER, alpha * d)
        print(f"{alpha:+.1f} x direction added: {tok.decode(after[0, n_prompt:])!r}")


if __name__ == "__main__":
    main()
