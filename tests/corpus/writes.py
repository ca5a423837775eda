"""Replacing module values."""

from compiler import intervene


@intervene
def double_layer(model, x):
    with model.trace(x):
        model.layers[1].output = model.layers[1].output * 2
        logits = model.head.output.save()
    return logits


@intervene
def set_input_and_output(model, x):
    with model.trace(x):
        model.layers[2].input = model.layers[0].output
        model.layers[-1].output = model.layers[-1].output.clamp(min=0.0)
        logits = model.output.save()
    return logits
