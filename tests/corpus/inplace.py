"""Editing module values in place."""

from compiler import intervene


@intervene
def zero_and_scale(model, x):
    with model.trace(x):
        model.layers[0].output[:] = 0
        model.layers[1].output[:, 0] *= 0.5
        model.layers[2].output.mul_(-1.0)
        model.layers[3].output[:, 1:3].zero_()
        logits = model.head.output.save()
    return logits
