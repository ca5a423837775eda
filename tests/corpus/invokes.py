"""Batched invokes inside one trace."""

from compiler import intervene


@intervene
def two_invokes(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            first = model.layers[1].output.save()
        with tracer.invoke(b):
            model.layers[3].output = model.layers[3].output + first
            second = model.head.output.save()
        with tracer.invoke():
            everything = model.head.output.save()
    return first, second, everything
