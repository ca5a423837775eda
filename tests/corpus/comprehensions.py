"""Comprehensions reading module values are lowered to loops."""

from compiler import intervene


@intervene
def comprehensions(model, x):
    with model.trace(x):
        outs = [model.layers[i].output.save() for i in range(4)]
        sums = {i: model.layers[i].output.sum() for i in range(0, 4, 2)}.save()
        plain = [i * i for i in range(3)]
        logits = model.head.output.save()
    return outs, sums, logits
