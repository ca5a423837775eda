"""Barriers: hand a value from one invoke to another at the same module.

Two prompts run as one batch (two invokes). Both need the embedding layer's output:
the first to read it, the second to overwrite its own with it. A barrier makes the
second invoke wait at ``barrier()`` until the first has reached it too, so the value
is there when the second one writes it.

The corrupt prompt then sees the clean prompt's token embeddings, and predicts what
the clean prompt predicts. Run it with ``python samples/barrier.py``.
"""

from __future__ import annotations

import torch

from compiler import intervene
from runtime import LanguageModel

CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"


@intervene
def last_logits(model, prompt):
    """The last-token logits of ``prompt``, unchanged."""
    with model.trace(prompt):
        logits = model.lm_head.output[:, -1].save()
    return logits


@intervene
def barrier_copy(model, a, b):
    """Copy prompt ``a``'s token embeddings into prompt ``b`` (same length) in one
    batched pass; return ``b``'s last-token logits."""
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


def top(model, logits: torch.Tensor, k: int = 3) -> str:
    probs = logits[0].detach().float().softmax(-1)
    values, ids = probs.topk(k)
    return ", ".join(
        f"{model.tokenizer.decode(int(i))!r} {float(p):.2f}" for p, i in zip(values, ids)
    )


def main() -> None:
    torch.set_grad_enabled(False)  # inference only
    model = LanguageModel("smollm2-135m")
    print(f"clean prompt:   {CLEAN!r}")
    print(f"corrupt prompt: {CORRUPT!r}\n")
    print(f"clean alone                           -> {top(model, last_logits(model, CLEAN))}")
    print(f"corrupt alone (before)                -> {top(model, last_logits(model, CORRUPT))}")
    after = barrier_copy(model, CLEAN, CORRUPT)
    print(f"corrupt with clean embeddings (after) -> {top(model, after)}")


if __name__ == "__main__":
    main()
