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
patch changed nothing. Run it with ``python samples/patching.py``; with matplotlib it
also draws the recovery per layer (``samples/out/patching.png``, see figures.py).
"""

from __future__ import annotations

import torch
from figures import new_figure, report, save  # samples/figures.py

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


def plot_recovery(fractions: list[float], answer: str = ANSWER):
    """The recovered share per layer as a PNG; its path, or None without matplotlib."""
    fig = new_figure(8, 4.5)
    if fig is None:
        return None
    ax = fig.subplots()
    layers = range(len(fractions))
    ax.bar(layers, fractions, color="tab:blue")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--", label="clean run (1.0)")
    ax.set_title(f"Activation patching, clean -> corrupt: where does {answer.strip()!r} live?\n"
                 "the last token's residual stream (decoder layer output) copied at one layer")
    ax.set_xlabel("layer patched")
    ax.set_ylabel(f"share of p({answer!r}) recovered\n(0 = corrupt run, 1 = clean run)")
    ax.set_xticks(list(layers)[::2])
    ax.set_xlim(-0.7, len(fractions) - 0.3)
    ax.legend(loc="upper left")
    return save(fig, "patching")


def show_recovery(fractions: list[float], answer: str = ANSWER) -> None:
    """The text chart (one bar per layer), and the picture when matplotlib is there."""
    print(f"patching the last token's residual stream, clean -> corrupt; "
          f"share of p({answer!r}) recovered:")
    for layer, fraction in enumerate(fractions):
        print(f"layer {layer:>2} |{bar(fraction)}| {fraction:+.2f}")
    report(plot_recovery(fractions, answer))


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
    show_recovery(fractions)


if __name__ == "__main__":
    main()
