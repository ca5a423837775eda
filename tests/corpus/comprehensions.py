"""Comprehensions reading module values are lowered to loops."""

from compiler import intervene


@intervene
def comprehensions(model, x):
    with model.trace(x):
        outs = [model.layers[i].output.save() for i in range(3)]
        sums = {i: o.sum() for i, o in enumerate(outs)}.save()
        tops = {name: model.layers[3].output.amax(dim=-1) for name in ["last"]}.save()
        logits = model.head.output.save()
    return outs, sums, tops, logits
