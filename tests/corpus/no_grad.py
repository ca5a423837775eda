"""torch.no_grad inside a block, and gradients of a saved value."""

import torch

from compiler import intervene


@intervene
def no_grad_inside(model, x):
    with model.trace(x):
        with torch.no_grad():
            hidden = model.layers[1].output.save()
        logits = model.head.output.save()
    return hidden, logits


@intervene
def gradient(model, x):
    with model.trace(x):
        hidden = model.layers[1].output.save()
        hidden.requires_grad = True
        logits = model.head.output.save()
    logits.sum().backward()
    return hidden.grad
