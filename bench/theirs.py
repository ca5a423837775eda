"""The experiments, written for nnsight 0.8.1 (idiomatic for it).

nnsight runs a ``with model.trace(...)`` body from its source, so these too are
module-level functions of a file.  Differences forced by nnsight's API:

- a list filled inside a trace is created saved (``[].save()``);
- a generation loop that is followed by code must be bounded
  (``tracer.iter[:n]``: code after an unbounded ``tracer.all()`` never runs),
  and the generated ids are ``tracer.result``;
- ``NNsight`` on a plain module refuses several invokes, so ``Batched`` adds the
  two documented hooks (``_batch_size``, ``_batch``) that stack inputs on dim 0.
"""

from __future__ import annotations

import warnings

import torch
from nnsight import NNsight, NNsightDeprecationWarning

warnings.filterwarnings("ignore", category=NNsightDeprecationWarning)


class Batched(NNsight):
    """nnsight's wrapper for any module, batching invokes along dim 0."""

    def _batch_size(self, *inputs, **kwargs) -> int:
        return inputs[0].shape[0] if inputs else 0

    def _batch(self, invokes, fn):
        if len(invokes) == 1:
            return invokes[0]
        return (torch.cat([args[0] for args, _ in invokes]),), {}


def language_model(hf, tokenizer):
    """nnsight's wrapper for a built transformers causal LM."""
    try:
        from nnsight import TransformersModel

        return TransformersModel(hf, tokenizer=tokenizer, task="text-generation")
    except Exception:  # noqa: BLE001 - older spelling
        from nnsight import LanguageModel

        return LanguageModel(hf, tokenizer=tokenizer)


def save_one(model, x):
    with model.trace(x):
        h = model.layers[3].output.save()
    return h


def write_save(model, x):
    with model.trace(x):
        model.layers[2].output[:] = 0
        h = model.layers[5].output.save()
    return h


def save_loop(model, x, idx):
    with model.trace(x):
        outs = [].save()
        for i in idx:
            outs.append(model.layers[i].output)
    return outs


def lm_layers(model, prompt, n):
    with model.trace(prompt):
        outs = [].save()
        for i in range(n):
            outs.append(model.model.layers[i].output)
    return outs


def generate_with(model, prompt, n, layer):
    with model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False) as tracer:
        for _step in tracer.iter[:n]:
            model.model.layers[layer].output[:, -1] = 0
        out = tracer.result.save()
    return out


GENERATE = (generate_with,)
