"""The logit lens on the default model: what would each layer predict?

One trace caches every decoder layer's output (``tracer.cache``).  After the trace,
each layer's residual stream at the last token goes through the model's own final
norm and unembedding (``model.model.norm(...)``, ``model.lm_head(...)``: calling an
envoy outside a trace runs the module), as if the layers above it were skipped.
Early layers mostly echo the input; the answer " Paris" surfaces in the late layers.

Run it with ``python samples/logit_lens.py``.
"""

from __future__ import annotations

import torch

from compiler import intervene
from runtime import LanguageModel

PROMPT = "The Eiffel Tower is in the city of"
ANSWER = " Paris"


@intervene
def cache_layers(model, prompt):
    """Every decoder layer's output, and the real logits at the last position."""
    with model.trace(prompt) as tracer:
        cache = tracer.cache(modules=list(model.model.layers))
        logits = model.lm_head.output[0, -1].save()
    return cache, logits


def lens(model, prompt: str = PROMPT,
         answer: str = ANSWER) -> tuple[list[tuple[str, float, float]], str]:
    """[(top token, its probability, the answer's probability) per layer], and the
    model's real top token."""
    tok = model.tokenizer
    (answer_id,) = tok(answer, add_special_tokens=False)["input_ids"]
    cache, logits = cache_layers(model, prompt)
    rows = []
    for i in range(len(model.model.layers)):
        h = cache.model.model.layers[i].output[:, -1]  # (1, hidden): the last token
        probs = model.lm_head(model.model.norm(h))[0].softmax(-1)
        p, top = probs.max(-1)
        rows.append((tok.decode(int(top)), float(p), float(probs[answer_id])))
    return rows, tok.decode(int(logits.argmax()))


def main() -> None:
    torch.set_grad_enabled(False)  # inference only
    model = LanguageModel("smollm2-135m")
    rows, real = lens(model)
    print(f"prompt: {PROMPT!r}; the model's answer: {real!r}")
    print("logit lens, last token: the top token if the model stopped after each layer")
    print()
    print(f"layer     top token      p(top)  p({ANSWER!r})")
    for layer, (token, p, p_answer) in enumerate(rows):
        print(f"layer {layer:>2}  {token!r:<14} {p:6.3f}  {p_answer:6.3f}  "
              f"{'#' * round(p_answer * 30)}".rstrip())


if __name__ == "__main__":
    main()
