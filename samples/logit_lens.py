"""The logit lens on the default model: what would each layer predict?

One trace caches every decoder layer's output (``tracer.cache``).  After the trace,
each layer's residual stream at the last token goes through the model's own final
norm and unembedding (``model.model.norm(...)``, ``model.lm_head(...)``: calling an
envoy outside a trace runs the module), as if the layers above it were skipped.
Early layers mostly echo the input; the answer " Paris" surfaces in the late layers.

Run it with ``python samples/logit_lens.py``; with matplotlib it also draws the lens at
every input position, a layer x position heatmap of the top token's probability
(``samples/out/logit_lens.png``, see figures.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from figures import new_figure, report, save  # samples/figures.py

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


class Grid(NamedTuple):
    """The lens at every layer and input position."""

    inputs: list[str]  # the input tokens
    top: list[list[str]]  # [layer][position]: the top next token
    p_top: list[list[float]]  # [layer][position]: its probability
    p_answer: list[float]  # [layer]: the answer's probability at the last position
    real: str  # the model's real top token at the last position


def lens_grid(model, prompt: str = PROMPT, answer: str = ANSWER) -> Grid:
    tok = model.tokenizer
    (answer_id,) = tok(answer, add_special_tokens=False)["input_ids"]
    cache, logits = cache_layers(model, prompt)
    top, p_top, p_answer = [], [], []
    for i in range(len(model.model.layers)):
        h = cache.model.model.layers[i].output[0]  # (positions, hidden)
        probs = model.lm_head(model.model.norm(h)).softmax(-1)
        p, ids = probs.max(-1)
        top.append([tok.decode(int(t)) for t in ids])
        p_top.append([float(x) for x in p])
        p_answer.append(float(probs[-1, answer_id]))
    inputs = [tok.decode(int(t)) for t in tok(prompt)["input_ids"]]
    return Grid(inputs, top, p_top, p_answer, tok.decode(int(logits.argmax())))


def lens(model, prompt: str = PROMPT,
         answer: str = ANSWER) -> tuple[list[tuple[str, float, float]], str]:
    """[(top token, its probability, the answer's probability) per layer] at the last
    position, and the model's real top token."""
    g = lens_grid(model, prompt, answer)
    return [(t[-1], p[-1], pa) for t, p, pa in zip(g.top, g.p_top, g.p_answer)], g.real


def _label(token: str) -> str:
    """A token as a short cell label; whitespace-only tokens quoted so they show."""
    return repr(token) if not token.strip() else repr(token)[1:-1][:9]


def plot_grid(grid: Grid, prompt: str = PROMPT):
    """The top token's probability per layer and position as a PNG heatmap, each cell
    labelled with its token; the path, or None without matplotlib."""
    layers, positions = len(grid.top), len(grid.inputs)
    fig = new_figure(max(7.0, 1.2 + 1.05 * positions), max(4.0, 1.6 + 0.3 * layers))
    if fig is None:
        return None
    ax = fig.subplots()
    image = ax.imshow(grid.p_top, origin="lower", aspect="auto", cmap="viridis",
                      vmin=0.0, vmax=1.0, interpolation="nearest")
    for layer in range(layers):
        for pos in range(positions):
            p = grid.p_top[layer][pos]
            ax.text(pos, layer, _label(grid.top[layer][pos]), ha="center", va="center",
                    fontsize=6.5, color="black" if p > 0.6 else "white")
    ax.set_xticks(range(positions), [_label(t) for t in grid.inputs], rotation=30,
                  ha="right")
    ax.set_yticks(range(0, layers, 2))
    ax.set_xlabel("input token (the prediction is for the token after it)")
    ax.set_ylabel("decoder layer (its output, through the final norm and unembedding)")
    ax.set_title(f"Logit lens: the top next token after each layer\n{prompt!r}")
    fig.colorbar(image, ax=ax, label="probability of the top token (0 to 1)")
    return save(fig, "logit_lens")


def show_lens(grid: Grid, answer: str = ANSWER, prompt: str = PROMPT) -> None:
    """The text chart (last position, one row per layer), and the heatmap when
    matplotlib is there."""
    print("logit lens, last token: the top token if the model stopped after each layer")
    print()
    print(f"layer     top token      p(top)  p({answer!r})")
    for layer, (top, p, p_answer) in enumerate(zip(grid.top, grid.p_top, grid.p_answer)):
        print(f"layer {layer:>2}  {top[-1]!r:<14} {p[-1]:6.3f}  {p_answer:6.3f}  "
              f"{'#' * round(p_answer * 30)}".rstrip())
    report(plot_grid(grid, prompt))


def main() -> None:
    torch.set_grad_enabled(False)  # inference only
    model = LanguageModel("smollm2-135m")
    grid = lens_grid(model)
    print(f"prompt: {PROMPT!r}; the model's answer: {grid.real!r}")
    show_lens(grid)


if __name__ == "__main__":
    main()
