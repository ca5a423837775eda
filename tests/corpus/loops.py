"""Loops over the layers: dynamic module paths."""

from compiler import intervene


@intervene
def every_layer(model, x):
    outs = []
    with model.trace(x):
        for layer in model.layers:
            outs.append(layer.output.save())
    return outs


@intervene
def indexed_loop(model, x):
    norms = []
    with model.trace(x):
        for i in range(len(model.layers)):
            model.layers[i].output = model.layers[i].output + i
            norms.append(model.layers[i].output.norm().save())
        i = 0
        while i < 2:
            i += 1
        logits = model.head.output.save()
    return norms, logits
