"""Reading and saving module values."""

from compiler import intervene


@intervene
def basic_save(model, x):
    with model.trace(x):
        hidden = model.layers[1].output.save()
        logits = model.head.output.save()
    return hidden, logits


@intervene
def save_method_and_value(model, x):
    with model.trace(x) as tracer:  # noqa: F841
        first = model.layers[0].output
        first.save()
        doubled = (model.layers[2].output * 2).save()
    return first.value, doubled
