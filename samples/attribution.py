"""Gradient x activation attribution on the default model: which layers and tokens
push the " Paris" logit after "The Eiffel Tower is in the city of"?

One trace reads every decoder layer's output (the residual stream), marks it
``requires_grad``, takes the " Paris" logit at the last position as the loss and,
inside ``with loss.backward():``, reads each layer's gradient (in reverse order of
the forward: gradients arrive last layer first).  The attribution of a token at a
layer is

    attribution = sum over hidden units of (d logit / d h) * h

a first-order estimate of how much that token's residual stream at that layer
contributes to the logit.  The table shows it for the last token (" of") and for
" Eiffel" (its two sub-tokens, " E" + "iffel", summed).

Run it with ``python samples/attribution.py``; with matplotlib it also draws both
attributions per layer (``samples/out/attribution.png``, see figures.py).
"""

from __future__ import annotations

from figures import new_figure, report, save  # samples/figures.py

from compiler import intervene
from runtime import LanguageModel

PROMPT = "The Eiffel Tower is in the city of"
ANSWER = " Paris"
SUBJECT = " Eiffel"
BAR_WIDTH = 24


@intervene
def grad_times_activation(model, prompt, answer_id):
    """Per layer (first to last): (grad * h).sum(-1) for every token, and the logit."""
    with model.trace(prompt):
        hs = []
        for layer in model.model.layers:
            h = layer.output
            h.requires_grad = True
            hs.append(h)
        logit = model.lm_head.output[0, -1, answer_id]
        grads = [].save()
        with logit.backward():
            for h in reversed(hs):
                grads.append((h.grad * h).sum(-1)[0].detach())
        logit = logit.detach().save()
    return list(reversed(grads)), float(logit)


def token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Where the tokens of ``word`` sit in the tokenized ``prompt``."""
    ids = tokenizer(prompt)["input_ids"]
    sub = tokenizer(word, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(sub) + 1):
        if ids[start:start + len(sub)] == sub:
            return list(range(start, start + len(sub)))
    raise ValueError(f"{word!r} is not in {prompt!r}")


def attributions(model, prompt: str = PROMPT, answer: str = ANSWER,
                 subject: str = SUBJECT) -> tuple[float, list[float], list[float]]:
    """(the answer's logit, [last-token attribution per layer], [subject's per layer])."""
    tok = model.tokenizer
    (answer_id,) = tok(answer, add_special_tokens=False)["input_ids"]
    where = token_positions(tok, prompt, subject)
    per_layer, logit = grad_times_activation(model, prompt, answer_id)
    last = [float(a[-1]) for a in per_layer]
    subj = [float(a[where].sum()) for a in per_layer]
    return logit, last, subj


def bar(value: float, scale: float, width: int = BAR_WIDTH) -> str:
    """A bar of ``#`` (positive) or ``-`` (negative), ``width`` at ``|value| == scale``."""
    n = round(min(1.0, abs(value) / scale) * width) if scale > 0 else 0
    return ("#" if value >= 0 else "-") * n + " " * (width - n)


def plot_attributions(last: list[float], subj: list[float], logit: float):
    """Both attributions per layer as a PNG; its path, or None without matplotlib."""
    fig = new_figure(8, 4.5)
    if fig is None:
        return None
    ax = fig.subplots()
    layers = range(len(last))
    ax.plot(layers, last, marker="o", markersize=3, label="last token (' of')")
    ax.plot(layers, subj, marker="s", markersize=3, label=f"{SUBJECT!r} (its tokens summed)")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_title(f"Gradient x activation: what pushes the {ANSWER!r} logit ({logit:.2f})\n"
                 f"{PROMPT!r}")
    ax.set_xlabel("decoder layer (its output, the residual stream)")
    ax.set_ylabel(f"attribution to the {ANSWER!r} logit\n(logit units, first-order)")
    ax.set_xticks(list(layers)[::2])
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, "attribution")


def show_attributions(last: list[float], subj: list[float], logit: float) -> None:
    """The text chart (one row per layer, bars for both), and the picture when
    matplotlib is there."""
    scale = max(max(map(abs, last)), max(map(abs, subj)))
    print("gradient x activation per layer ('#' positive, '-' negative):")
    print()
    head = "last token (' of')"
    print(f"layer | {head:<{BAR_WIDTH + 9}}| {SUBJECT!r} tokens")
    for layer, (a, b) in enumerate(zip(last, subj)):
        print(f"{layer:>5} | {a:+7.2f} {bar(a, scale)} | {b:+7.2f} {bar(b, scale)}".rstrip())
    print()
    print("(the last layer's own term is ~0: the final RMSNorm makes the logit blind to the")
    print(" residual stream's scale, and grad x activation measures exactly that direction)")
    report(plot_attributions(last, subj, logit))


def main() -> None:
    model = LanguageModel("smollm2-135m")
    logit, last, subj = attributions(model)
    print(f"prompt: {PROMPT!r}; logit of {ANSWER!r} at the last token = {logit:.2f}")
    show_attributions(last, subj, logit)


if __name__ == "__main__":
    main()
