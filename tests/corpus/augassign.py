"""Augmented assignment on a module value itself."""

from compiler import intervene


@intervene
def shift(model, x, delta):
    with model.trace(x):
        model.layers[0].output += delta
        model.layers[2].output *= 3
        model.layers[3].input -= 1.0
        logits = model.head.output.save()
    return logits
