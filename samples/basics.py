"""The basics on the default model: save, zero, add noise, replace, see the effect.

Run it with ``python samples/basics.py`` (``make demo`` does, then prints the
plans with ``python -m compiler show-plan samples/basics.py``).
"""

from __future__ import annotations

import torch

from compiler import intervene
from runtime import LanguageModel

PROMPT = "The Eiffel Tower is in the city of"
LAYER = 15


@intervene
def save_hidden_and_logits(model, prompt):
    """Read a layer's output and the logits; nothing is changed."""
    with model.trace(prompt):
        hidden = model.model.layers[LAYER].output.save()
        logits = model.lm_head.output.save()
    return hidden, logits


@intervene
def zero_last_token(model, prompt, layer):
    """Zero the residual stream at the last token after ``layer``."""
    with model.trace(prompt):
        model.model.layers[layer].output[:, -1, :] = 0
        logits = model.lm_head.output.save()
    return logits


@intervene
def add_noise(model, prompt, scale, seed):
    """Add Gaussian noise to every layer's output (a fixed seed: reproducible)."""
    gen = torch.Generator().manual_seed(seed)
    with model.trace(prompt):
        for layer in model.model.layers:
            out = layer.output
            layer.output = out + scale * torch.randn(out.shape, generator=gen)
        logits = model.lm_head.output.save()
    return logits


@intervene
def replace_from(model, source_prompt, target_prompt, layer):
    """Replace a layer's last-token output with the one from another prompt."""
    with model.trace(source_prompt):
        donor = model.model.layers[layer].output[:, -1, :].save()
    with model.trace(target_prompt):
        model.model.layers[layer].output[:, -1, :] = donor
        logits = model.lm_head.output.save()
    return logits


def top(model, logits, k: int = 3) -> str:
    probs = logits[0, -1].detach().softmax(-1)
    values, ids = probs.topk(k)
    return ", ".join(
        f"{model.tokenizer.decode(int(i))!r} {float(p):.2f}" for p, i in zip(values, ids)
    )


def main() -> None:
    torch.manual_seed(0)
    model = LanguageModel("smollm2-135m")
    print(f"prompt: {PROMPT!r}\n")

    hidden, logits = save_hidden_and_logits(model, PROMPT)
    print(f"layer {LAYER} output: shape {tuple(hidden.shape)}, norm {hidden.norm():.1f}")
    print(f"unchanged           -> {top(model, logits)}")

    for layer in (2, 15, 29):
        print(f"zero layer {layer:>2} last  -> {top(model, zero_last_token(model, PROMPT, layer))}")

    for scale in (0.5, 2.0):
        logits = add_noise(model, PROMPT, scale, seed=0)
        print(f"noise x{scale:<3}          -> {top(model, logits)}")

    other = "The Colosseum is in the city of"
    print(f"last token replaced by the one of {other!r}:")
    for layer in (10, 20, 26, 29):
        logits = replace_from(model, other, PROMPT, layer)
        print(f"  at layer {layer:>2}         -> {top(model, logits)}")


if __name__ == "__main__":
    main()
