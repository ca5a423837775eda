"""Case 7: ``.source`` (issue 14) costs nothing where it is not used.

A tiny Llama (4 layers, hidden 64, eager attention), one batch of token ids:

- a trace that names no ``.source``, run after ``.source`` has been used in this
  process, against the same read with a plain forward hook: the normal path is
  unchanged (target as case 1);
- a trace reading one call site inside layer 0's attention
  (``attention_interface_0``), against a hand-written monkeypatch of the attention
  function that keeps the same value: the rewritten forward is installed on that one
  module only, for the trace, and its other call sites are plain calls.

After each row the model is checked for anything left on it (``measure(shared=...)``).
"""

from __future__ import annotations

import functools

import torch

from .cases import Config, Outcome, _ours, measure

CASE = "7. .source (tiny Llama, 4 layers, hidden 64, eager attention, 16 tokens)"


# -- the experiments (compiled by bench.ours.compiled, which reads their source) ----------


def ours_last_layer(model, ids):
    with model.trace(ids):
        h = model.model.layers[3].output.save()
    return h


def ours_attention(model, ids):
    with model.trace(ids):
        out = model.model.layers[0].self_attn.source.attention_interface_0.output[0].save()
    return out


# -- the same by hand ------------------------------------------------------------------------


def plain_last_layer(hf, ids):
    kept = []
    handle = hf.model.layers[3].register_forward_hook(lambda m, a, out: kept.append(out))
    try:
        hf(ids)
    finally:
        handle.remove()
    return kept[0]


def plain_attention(hf, ids):
    import transformers.models.llama.modeling_llama as llama

    attn = hf.model.layers[0].self_attn
    original = llama.eager_attention_forward
    kept = []

    def patched(module, *args, **kwargs):
        out = original(module, *args, **kwargs)
        if module is attn:
            kept.append(out[0])
        return out

    llama.eager_attention_forward = patched
    try:
        hf(ids)
    finally:
        llama.eager_attention_forward = original
    return kept[0]


def plain_forward(hf, ids):
    return hf(ids).logits


def source_cost(cfg: Config) -> Outcome:
    from runtime import NNsight
    from runtime.models import tiny_llama

    hf = tiny_llama(0, num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                    attn_implementation="eager")
    hf.requires_grad_(False)
    model = NNsight(hf)  # called with the ids as they are, as plain hooks call it
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    str(model.model.layers[0].self_attn.source)  # `.source` used in this process
    out = Outcome()
    for ours, plain, what, target in (
        (ours_last_layer, plain_last_layer,
         "trace naming no .source, after .source was used", 1.05),
        (ours_attention, plain_attention,
         "one call site of layer 0's attention, vs a patch", 1.10),
    ):
        timed = measure(
            {
                "ours": _ours(ours, model, ids),
                "plain": functools.partial(plain, hf, ids),
                "nnsight": None,
            },
            cfg,
            shared=hf,
            errors={"nnsight": "not measured for this case"},
        )
        out.rows.append(timed.row(CASE, what, target=target))
    return out
