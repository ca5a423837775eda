"""Activation patching on the default model: where does "Paris" live?

Two prompts that differ only in the landmark:

    clean:   "The Eiffel Tower is in the city of"   -> " Paris"
    corrupt: "The Colosseum is in the city of"      -> " Rome"

For every layer, one batched forward pass runs both prompts (two invokes). The
residual stream (the decoder layer's output) at the last token of the clean prompt
is copied into the corrupt prompt at the same layer, and we measure how much of
the clean answer comes back:

    recovered = (p_patched(Paris) - p_corrupt(Paris)) / (p_clean(Paris) - p_corrupt(Paris))

1.0 means the patched run is as sure of " Paris" as the clean one; 0.0 means the
patch changed nothing. Run it with ``python samples/patching.py``.
"""

from __future__ import annotations

import torch

from compiler import intervene
from runtime import LanguageModel

CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"
ANSWER = " Paris"
BAR_WIDTH = 40


@intervene
def clean_and_corrupt(model, clean, corrupt):
    """Both prompts in one batch, unchanged: the last-token logits of each."""
    with model.trace() as tracer:
        with tracer.invoke(clean):
            clean_logits = model.lm_head.output[:, -1].save()
        with tracer.invoke(corrupt):
            corrupt_logits = model.lm_head.output[:, -1].save()
    return clean_logits, corrupt_logits


@intervene
def patch(model, clean, corrupt, layer):
    """Copy the clean prompt's last-token residual stream at ``layer`` into the
    corrupt prompt; return the corrupt prompt's last-token logits."""
    with model.trace() as tracer:
        # Both invokes meet the same module; invokes are served in source order, so
        # `h` is read from the clean rows before the corrupt rows are written.
        with tracer.invoke(clean):
            h = model.model.layers[layer].output[:, -1, :]
        with tracer.invoke(corrupt):
            model.model.layers[layer].output[:, -1, :] = h
            logits = model.lm_head.output[:, -1].save()
    return logits


def prob(logits: torch.Tensor, token_id: int) -> float:
    return float(logits[0].detach().float().softmax(-1)[token_id])


def recovery(model, clean: str = CLEAN, corrupt: str = CORRUPT,
             answer: str = ANSWER) -> tuple[float, float, list[float]]:
    """(p_clean, p_corrupt, [recovered fraction for each layer])."""
    (answer_id,) = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    clean_logits, corrupt_logits = clean_and_corrupt(model, clean, corrupt)
    p_clean, p_corrupt = prob(clean_logits, answer_id), prob(corrupt_logits, answer_id)
    fractions = []
    for layer in range(len(model.model.layers)):
        p = prob(patch(model, clean, corrupt, layer), answer_id)
        fractions.append((p - p_corrupt) / (p_clean - p_corrupt))
    return p_clean, p_corrupt, fractions


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "#" * filled + "." * (width - filled)


def main() -> None:
    torch.set_grad_enabled(False)  # inference only
    model = LanguageModel("smollm2-135m")
    tok = model.tokenizer
    p_clean, p_corrupt, fractions = recovery(model)

    clean_logits, corrupt_logits = clean_and_corrupt(model, CLEAN, CORRUPT)
    print(f"clean:   {CLEAN!r} -> top {tok.decode(int(clean_logits[0].argmax()))!r}, "
          f"p({ANSWER!r}) = {p_clean:.3f}")
    print(f"corrupt: {CORRUPT!r} -> top {tok.decode(int(corrupt_logits[0].argmax()))!r}, "
          f"p({ANSWER!r}) = {p_corrupt:.3f}")
    print()
    print(f"patching the last token's residual stream, clean -> corrupt; "
          f"share of p({ANSWER!r}) recovered:")
    for layer, fraction in enumerate(fractions):
        print(f"layer {layer:>2} |{bar(fraction)}| {fraction:+.2f}")


if __name__ == "__main__":
    main()
