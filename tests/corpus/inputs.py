"""Module inputs: `.input` (first argument) and `.inputs` (args, kwargs)."""

from compiler import intervene


@intervene
def inputs(model, x):
    with model.trace(x):
        first = model.layers[1].input.save()
        _args, _kwargs = model.layers[2].inputs
        both = model.layers[2].inputs.save()
        model.layers[3].input = first
    return first, both
