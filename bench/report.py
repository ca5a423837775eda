"""Writing the results: the Markdown report (``RESULTS.md``) and the plot.

The plot (``checkpoints.png``, matplotlib's Agg backend) shows the per-trace
cost against the number of checkpoints for the three sides, with the bare
forward as a reference line, and, when invokes work, the cost against the
number of invokes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .cases import Outcome, Row

SIDE_LABELS = {"ours": "intervene", "plain": "plain hooks", "nnsight": "nnsight 0.8.1"}

METHOD = """\
## Method

- **Three sides, one process, interleaved.** Every row runs the same experiment
  written three ways: with intervene (`@intervene`, compiled once before timing),
  with plain PyTorch forward hooks written by hand (register, forward, remove: what
  a careful hand-written experiment costs, and the floor of any library built on
  hooks; intervene takes outputs by wrapping `forward` for the trace instead, so it
  can come out below it), and with nnsight 0.8.1. Timing goes
  round-robin (every round calls intervene, plain and nnsight once), so drifts of
  the machine hit all three alike. The order within a round changes from round
  to round (all permutations in turn): whichever side runs right after nnsight
  finds colder caches, and with the fixed order intervene, plain, nnsight this
  cost intervene about 10 µs per 100 µs trace (1.18x instead of 1.07x). One sample is one call (calls under 50 µs would be repeated back to
  back): short samples keep most of them clear of other processes on a shared
  machine. The table shows the **median** sample; the note "noise ±a% / ±b%" is
  half the interquartile range of intervene's / plain's samples. The rows of 2a
  (and those of 2b) are measured in the same rounds, so each count sees the same
  machine.
- **Same results first.** Before timing, each side runs once and its result is
  compared with plain hooks' (`torch.allclose`); a side that raises or disagrees
  is marked *not supported yet* / *wrong result* and is not timed.
- **Models.** nnsight sets a `forward` attribute on every module it wraps, which
  slows later plain calls of those modules (by about 9% on the 12-layer MLP), so
  nnsight runs its own copy of the same seeded weights. intervene leaves nothing on
  a module between traces, so it shares the plain-hooks model (the key comparison
  runs on the very same tensors); the suite checks after every row that no hook or
  patch was left behind. Weights are frozen (`requires_grad_(False)`): no autograd
  graph on any side.
- **Ratios are paired:** the ratio columns are the median over rounds of
  (side's sample / plain hooks' sample of the same round), which cancels drifts
  that last longer than a round; on a noisy machine it can differ from the ratio
  of the two medians shown. The notes give the quartiles of those per-round
  ratios: when a target lies inside them, the run cannot tell PASS from MISS.
- **CPU, one thread:** `torch.set_num_threads(1)`, fixed seeds, garbage collector
  left on (its cost is part of each library's cost).
- **nnsight idioms:** lists filled in a trace are created saved
  (`[].save()`), the generation loop is `for _ in tracer.iter[:n]` (code after
  an unbounded `tracer.all()` does not run in nnsight) and the tokens are
  `tracer.result`; for several invokes on a plain module, nnsight's `NNsight` is
  subclassed with its documented `_batch_size`/`_batch` hooks (dim-0 stacking).
- **Checkpoints** (case 2a) are `k` layer outputs evenly spaced over the 64
  layers, saved from a loop in all three; the slopes shown are least-squares fits
  of the medians over k = 1, 4, 16, 64, and the target is judged on the slope of
  the per-round paired differences (intervene - plain hooks), which drifts between
  rows cannot bias.
- **Invokes** (2b, 6): N inputs of 2 rows, each invoke saving its rows of layer 5's
  output; plain hooks concatenate the inputs and slice the rows in one hook. The
  N-invoke experiments are generated as source text (N `with tracer.invoke(...)`
  statements) into a temporary file, identical for intervene and nnsight.
- **Real model and generation** take the prompt as text on all three sides (plain
  hooks call the tokenizer themselves); generation is greedy with
  `min_new_tokens = max_new_tokens`, so all three run the same number of steps, and
  the write (`layers[10].output[:, -1] = 0`) happens at every step. The tokens are
  checked against plain hooks'.
- **Compile** times `intervene(fn)` on a fresh function object (same code) each
  time, after one warm-up decoration (imports). The call-path check patches every
  entry point that parses or compiles (`libcst.parse_module/_expression/_statement`,
  `ast.parse`, `inspect.getsource(lines)`, builtin `compile`) and counts calls
  during 100 later calls of the decorated function.
- **Memory** is measured from torch's CPU allocator: the call runs under
  `torch.profiler` with `profile_memory=True`, which records every allocation and
  free of tensor storage (temporaries inside ops included) with its size and time;
  replaying them gives the live tensor bytes at each moment, and the peak (minus
  what was live before the call: model and inputs) is the figure compared. It is
  exact and deterministic, unlike RSS deltas (the allocator keeps freed pages) and
  unlike `tracemalloc` (tensor storage is allocated outside Python's allocator).
  Python's own heap (lanes, frames, bookkeeping) is reported beside it, from
  `tracemalloc`, for information. Median of 3 measurements.
- **Remote** (case 8, `bench/remote.py`) starts `python -m runtime.serve` on 127.0.0.1
  (tiny Llama and the default model, one torch thread) and times a trace block saving one
  layer output through it, against the same block run locally with intervene (the
  plain-hooks column of those rows), interleaved round by round; ratio and added
  milliseconds are paired per round. Skipped, with a note, without the serve extra.
"""


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "µs":
        if value >= 10_000:
            return f"{value / 1000:,.1f} ms"
        return f"{value:,.1f} µs"
    if unit == "count":
        return f"{value:.0f}"
    if unit == "KiB":
        return f"{value:,.1f} KiB"
    return f"{value:,.2f} {unit}"


def _ratio(row: Row, side: str) -> str:
    r = row.ratio(side)
    if r is None or row.unit == "count":
        return ""
    return f"{r:.2f}x"


def _cell(row: Row, side: str) -> str:
    value = getattr(row, side)
    if value is None and f"{side}: not supported yet" in row.note:
        return "not supported yet"
    return _fmt(value, row.unit)


def table(rows: Iterable[Row]) -> str:
    lines = []
    current = None
    header = ("| experiment | intervene | plain hooks | nnsight | intervene / plain "
              "| nnsight / plain | target | status | notes |")
    for row in rows:
        if row.case != current:
            current = row.case
            lines += ["", f"### {row.case}", "", header, "|" + "---|" * 9]
        note = row.note.replace("|", "\\|")
        lines.append(
            f"| {row.name} | {_cell(row, 'ours')} | {_cell(row, 'plain')} | "
            f"{_cell(row, 'nnsight')} | {_ratio(row, 'ours')} | {_ratio(row, 'nnsight')} | "
            f"{row.target} | {_status(row.status)} | {note} |"
        )
    return "\n".join(lines).lstrip("\n")


def _status(status: str) -> str:
    return {"PASS": "**PASS**", "MISS": "**MISS**"}.get(status, status)


def summary(rows: list[Row]) -> str:
    targeted = [r for r in rows if r.status in ("PASS", "MISS", "n/a") and r.target]
    missed = [r for r in targeted if r.status == "MISS"]
    na = [r for r in targeted if r.status == "n/a"]
    out = [f"{len(targeted) - len(missed) - len(na)} of {len(targeted)} targets met."]
    for r in missed:
        said = r.headline or (f"intervene {_fmt(r.ours, r.unit)}"
                              + (f" ({_ratio(r, 'ours')})" if _ratio(r, "ours") else ""))
        out.append(f"- MISS: {r.case.split(' (')[0]}: {r.name}: {said}; target {r.target}.")
    for r in na:
        out.append(f"- n/a: {r.case.split(' (')[0]}: {r.name} (not supported yet).")
    return "\n".join(out)


def markdown(outcomes: list[Outcome], info: dict[str, str], quick: bool, seconds: float) -> str:
    rows = [r for o in outcomes for r in o.rows]
    machine = "\n".join(f"| {k} | {v} |" for k, v in info.items())
    kind = "quick run (`python -m bench --quick`): fewer repetitions" if quick else "full run"
    return f"""# intervene benchmarks

Generated by `make bench` (`python -m bench`); {kind}, {seconds:.0f} s in all.
Do not edit by hand: rerun the suite.

| machine | |
|---|---|
{machine}

Times per trace (per call), medians of interleaved samples; ratios against plain
PyTorch hooks written by hand (paired per round, see Method).
`torch.set_num_threads(1)` on every side; the load average shows how much else
ran on the machine meanwhile.

## Summary

{summary(rows)}

## Results

{table(rows)}

![per-trace cost against checkpoints](checkpoints.png)

{_history()}{METHOD}"""


def _history() -> str:
    """The hand-kept record of profiling findings and fixes (bench/HISTORY.md)."""
    from pathlib import Path

    path = Path(__file__).with_name("HISTORY.md")
    return path.read_text(encoding="utf-8") + "\n" if path.exists() else ""


def plot(outcomes: list[Outcome], path: str) -> bool:
    """Write the checkpoints plot; False when no case produced its data."""
    data = next((o.plot for o in outcomes if o.plot.get("checkpoints")), None)
    if data is None:
        return False
    try:
        import matplotlib
    except ImportError:  # the bench extra is not installed
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    invokes = data.get("invokes")
    panels = 2 if invokes and any(v is not None for v in invokes["series"]["ours"]) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)

    def label(side: str) -> str:
        s = data["slopes"].get(side)
        text = SIDE_LABELS.get(side, "forward, no hooks")
        return text + (f" ({s:.2f} µs/checkpoint)" if s is not None and side != "forward" else "")

    _panel(axes[0][0], data["checkpoints"], data["series"], label,
           "checkpoints (saved layer outputs) per trace",
           "64-layer MLP (hidden 32, batch 2), 1 CPU thread")
    if panels == 2:
        _panel(axes[0][1], invokes["counts"], invokes["series"], SIDE_LABELS.__getitem__,
               "invokes per trace (2 rows each)",
               "12-layer MLP (hidden 32), one saved output per invoke")
    fig.tight_layout()
    tmp = path + ".tmp"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return True


_STYLES = {"ours": ("tab:blue", "o", "-"), "plain": ("tab:green", "s", "-"),
           "nnsight": ("tab:red", "^", "-"), "forward": ("gray", "", "--")}


def _panel(ax, xs: list, series: dict, label, xlabel: str, title: str) -> None:
    """One panel: median time per trace of each side against ``xs`` (log 2 axis)."""
    for side, ys in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if not pts:
            continue
        color, marker, line = _STYLES[side]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=line,
                color=color, label=label(side))
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("median time per trace (µs)")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
