"""Two trace blocks: the second uses what the first saved."""

from compiler import intervene


@intervene
def patch(model, clean, corrupted):
    with model.trace(clean):
        hidden = model.layers[1].output.save()
    with model.trace(corrupted):
        model.layers[1].output = hidden
        patched = model.head.output.save()
    return patched
