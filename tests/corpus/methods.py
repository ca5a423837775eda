"""An experiment as a method, the model on `self`."""

from compiler import intervene


class Probe:
    def __init__(self, model, layer):
        self.model = model
        self.layer = layer

    @intervene
    def run(self, x):
        with self.model.trace(x):
            fixed = self.model.layers[2].output.save()
            chosen = self.model.layers[self.layer].output.save()
        return fixed, chosen


def not_an_experiment(model, x):
    return model(x)
