"""The experiments, written for intervene.

They are plain module-level functions (the compiler reads their source with
``inspect``) and are compiled on first use by ``compiled``, not at import, so a
construct the compiler does not support yet becomes a "not supported yet" entry
of the results instead of an import error.  ``theirs`` holds the same
experiments for nnsight and ``plain`` the same with hand-written hooks.
"""

from __future__ import annotations

from collections.abc import Callable

_CACHE: dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``intervene(fn)``, once per function."""
    if fn not in _CACHE:
        from compiler import intervene

        _CACHE[fn] = intervene(fn)
    return _CACHE[fn]


# -- 1. fixed cost (12-layer MLP) ------------------------------------------------------


def save_one(model, x):
    with model.trace(x):
        h = model.layers[3].output.save()
    return h


def write_save(model, x):
    with model.trace(x):
        model.layers[2].output[:] = 0
        h = model.layers[5].output.save()
    return h


# -- 1 and 2. several checkpoints --------------------------------------------------------


def save_loop(model, x, idx):
    with model.trace(x):
        outs = []
        for i in idx:
            outs.append(model.layers[i].output)
        outs.save()
    return outs


# -- 3. the default model ----------------------------------------------------------------


def lm_layers(model, prompt, n):
    with model.trace(prompt):
        outs = []
        for i in range(n):
            outs.append(model.model.layers[i].output)
        outs.save()
    return outs


# -- 4. generation: candidates, the first that runs and agrees with plain is timed -------


def generate_with(model, prompt, n, layer):
    with model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False) as tracer:
        with tracer.all():
            model.model.layers[layer].output[:, -1] = 0
        out = model.generator.output.save()
    return out


def generate_for(model, prompt, n, layer):
    with model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False) as tracer:
        for _step in tracer.all():
            model.model.layers[layer].output[:, -1] = 0
        out = model.generator.output.save()
    return out


def generate_only(model, prompt, n, layer):
    # A nested `with` is how a step block is written (not one `with` of two items).
    with model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False) as tracer:  # noqa: SIM117
        with tracer.all():
            model.model.layers[layer].output[:, -1] = 0


GENERATE = (generate_with, generate_for, generate_only)
