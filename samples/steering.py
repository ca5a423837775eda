"""Steering generation with a direction found by contrast.

1. Run a set of positive prompts and a set of negative prompts (one batch each) and
   take the mean last-token output of a middle layer for each set. Their difference is
   a "positive minus negative" direction in the residual stream.
2. Generate greedily from a neutral prompt, adding ``alpha * direction`` to that
   layer's output at every step, and compare with the text generated unsteered.
3. Sweep the steering scale ``alpha``: the probability of a positive (" amazing") and a
   negative (" terrible") next token after the neutral prompt, for each scale.

Run it with ``python samples/steering.py``; with matplotlib it also draws the sweep
(``samples/out/steering.png``, see figures.py).
"""

from __future__ import annotations

import torch
from figures import new_figure, report, save  # samples/figures.py

from compiler import intervene
from runtime import LanguageModel

LAYER = 15
ALPHA = 0.8
NEW_TOKENS = 20
NEUTRAL = "I went to see the new movie yesterday. Honestly, it was"
TARGETS = (" amazing", " terrible")  # next tokens whose probability the sweep follows
SCALES = [x / 4 for x in range(-8, 9)]  # alpha from -2 to 2

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


@intervene
def steered_next_token(model, prompt, layer, vector):
    """The next-token distribution after ``prompt`` with ``vector`` added to ``layer``'s
    output at every position (what generation's first step sees)."""
    with model.trace(prompt):
        model.model.layers[layer].output += vector
        probs = model.lm_head.output[0, -1].softmax(-1).save()
    return probs


def sweep(model, vector: torch.Tensor, scales=SCALES, targets=TARGETS,
          prompt: str = NEUTRAL, layer: int = LAYER) -> dict[str, list[float]]:
    """{target token: [its probability as the next token, for each scale]}."""
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
    out: dict[str, list[float]] = {t: [] for t in targets}
    for alpha in scales:
        probs = steered_next_token(model, prompt, layer, alpha * vector)
        for t, (i,) in zip(targets, ids):
            out[t].append(float(probs[i]))
    return out


def plot_sweep(scales: list[float], probs: dict[str, list[float]], layer: int = LAYER,
               prompt: str = NEUTRAL):
    """The target tokens' probabilities against the steering scale as a PNG; its path,
    or None without matplotlib."""
    fig = new_figure(8, 4.5)
    if fig is None:
        return None
    ax = fig.subplots()
    for token, ps in probs.items():
        ax.plot(scales, ps, marker="o", markersize=3, label=f"p({token!r})")
    ax.axvline(0.0, color="gray", linewidth=0.8, linestyle="--", label="unsteered")
    ax.set_title(f"Steering at layer {layer}: the next token after\n{prompt!r}")
    ax.set_xlabel("steering scale alpha (times the positive-minus-negative direction)")
    ax.set_ylabel("probability of the next token (0 to 1)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, "steering")


def show_sweep(scales: list[float], probs: dict[str, list[float]]) -> None:
    """The text chart (one row per scale), and the picture when matplotlib is there."""
    print("next-token probability against the steering scale:")
    print("  alpha  " + "  ".join(f"{'p(' + repr(t) + ')':>16}" for t in probs))
    for k, alpha in enumerate(scales):
        print(f"  {alpha:+5.2f}  " + "  ".join(f"{ps[k]:16.3f}" for ps in probs.values()))
    report(plot_sweep(scales, probs))


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
    print()
    show_sweep(SCALES, sweep(model, d))


if __name__ == "__main__":
    main()
