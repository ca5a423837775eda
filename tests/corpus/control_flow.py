"""match/case and try/except arms (scopes of their own), several items in one `with`,
and a decorator below @intervene."""

import torch

from compiler import intervene


@intervene
def arms(model, x, which):
    with model.trace(x):
        match which:
            case "late":
                hidden = model.layers[3].output.save()
            case _:
                hidden = model.layers[0].output.save()
        try:
            model.layers[3].output[:] = 0
        except RuntimeError:
            model.layers[1].output[:] = 0
        finally:
            logits = model.head.output.save()
    return hidden, logits


@intervene
def with_items(model, x):
    with model.trace(x) as tracer, torch.no_grad():
        hidden = model.layers[1].output.save()
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(x), torch.enable_grad():
            logits = model.head.output.save()
    return hidden, logits


@intervene
@torch.no_grad()
def decorated(model, x):
    with model.trace(x):
        a, model.layers[0].output[:, 0] = 1, 0.0
        hidden = model.layers[0].output.save()
    return hidden
