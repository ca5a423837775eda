"""The experiments with plain PyTorch forward hooks written by hand: the floor.

Each call does what a careful hand-written experiment does: register the hooks
it needs, run the forward once, remove the hooks, return what the hooks kept.
Registering and removing are part of every call, as they are of every trace.
"""

from __future__ import annotations

import torch


def _run(net, hooks, *args, **kwargs):
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        return net(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()


def forward(net, x):
    """No hooks at all (a reference line of the plot)."""
    return net(x)


def save_one(net, x):
    kept = []
    _run(net, [(net.layers[3], lambda m, a, out: kept.append(out))], x)
    return kept[0]


def _zero(m, a, out):
    out[:] = 0


def write_save(net, x):
    kept = []
    _run(net, [(net.layers[2], _zero), (net.layers[5], lambda m, a, out: kept.append(out))], x)
    return kept[0]


def save_loop(net, x, idx):
    kept = []

    def keep(m, a, out):
        kept.append(out)

    _run(net, [(net.layers[i], keep) for i in idx], x)
    return kept


def invokes(net, xs, layer):
    """N invokes: the inputs stacked into one batch, each invoke's rows of one output."""
    bounds = []
    start = 0
    for x in xs:
        bounds.append(slice(start, start + x.shape[0]))
        start += x.shape[0]
    kept = []
    _run(net, [(net.layers[layer], lambda m, a, out: kept.extend(out[b] for b in bounds))],
         torch.cat(xs))
    return kept


def lm_layers(hf, tok, prompt, n):
    enc = tok(prompt, return_tensors="pt")
    kept = []

    def keep(m, a, out):
        kept.append(out)

    _run(hf, [(hf.model.layers[i], keep) for i in range(n)], **enc)
    return kept


def _zero_last(m, a, out):
    out[:, -1] = 0


def generate_with(hf, tok, prompt, n, layer):
    enc = tok(prompt, return_tensors="pt")
    h = hf.model.layers[layer].register_forward_hook(_zero_last)
    try:
        return hf.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    finally:
        h.remove()


def generate_bare(hf, tok, prompt, n):
    enc = tok(prompt, return_tensors="pt")
    return hf.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
