"""Case 5's subject: a 40-line experiment function (the ``def`` through its ``return``).

Five traces (one in a loop) of a 12-layer MLP (``model.layers``): reads, writes, in-place
edits, a loop of checkpoints, two invokes.  It is only compiled (and, for the
call-path check, called); nothing here runs at import.
"""

from __future__ import annotations

import torch


def experiment(model, x, y, scale):
    """Clean runs, a patched run, two invokes, a sweep: reads, writes and edits."""
    # 1. clean runs: every layer's output, then a few summaries
    with model.trace(x):
        clean = []
        for i in range(12):
            clean.append(model.layers[i].output)
        clean.save()
    with model.trace(x):
        first = model.layers[0].output.save()
        acts = model.layers[1].output.relu().sum(dim=0).save()
        norm = model.layers[5].output.norm(dim=-1).save()
        top = model.layers[11].output.argmax(dim=-1).save()
    # 2. patched run: scale one layer, zero another, read further down
    with model.trace(x):
        model.layers[2].output = model.layers[2].output * scale
        model.layers[4].output[:] = 0
        mid = model.layers[6].output
        shifted = (mid - mid.mean(dim=-1, keepdim=True)).save()
        patched = model.layers[8].output.save()
        total = model.layers[11].output.sum().save()
    # 3. two invokes in one batch, each with its own rows
    with model.trace() as tracer:
        with tracer.invoke(x):
            a3 = model.layers[3].output.save()
            model.layers[7].output[:] = 1
            a9 = model.layers[9].output.save()
        with tracer.invoke(y):
            b3 = model.layers[3].output.save()
            b9 = model.layers[9].output.save()
    sweep = []  # 4. zero each of three layers in turn
    for k in (1, 5, 9):
        with model.trace(x):
            model.layers[k].output[:] = 0
            sweep.append(model.layers[11].output.sum().save())
    drift = torch.stack([(c - p).abs().max() for c, p in zip(clean[8:9], [patched])])
    gaps = {"a": (a9 - a3).abs().mean(), "b": (b9 - b3).abs().mean()}
    summary = {"first": first, "norm": norm, "top": top, "shifted": shifted, "acts": acts}
    summary.update(total=total, drift=drift, gaps=gaps, sweep=sweep)
    return summary
