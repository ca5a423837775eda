"""Control flow on tensor values."""

from compiler import intervene


@intervene
def branch(model, x, threshold):
    with model.trace(x):
        if model.layers[0].output.sum() > threshold:
            model.layers[2].output = model.layers[2].output * 0
        else:
            model.layers[2].output[:, 0] = 100.0
        logits = model.head.output.save()
    return logits
