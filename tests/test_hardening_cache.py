"""Hardening of ``tracer.cache()`` and of backward blocks (issue 10).

The cache: an invoke's rows, value types kept, every call of a module kept, modules
still running when the cache is made, paths checked as they are written, nothing left
behind by a failing trace.  Backward blocks: the model's parameters keep the ``.grad``
they had, the gradients the block reads equal plain ``torch.autograd``.

Every value is compared with the same model run through plain PyTorch hooks.
"""

from __future__ import annotations

import gc
import weakref
from collections import namedtuple

import pytest
import torch
from support import assert_no_hooks, forward_hooks, x_input
from torch import nn

from compiler import intervene
from runtime import LanguageModel, MissedCheckpointError, NNsight
from runtime.models import tiny_llama, tiny_mlp

IDS = torch.tensor([[1, 5, 7, 9, 11], [1, 4, 6, 8, 10]])


def llama():
    return NNsight(tiny_llama(0))


def plain_llama_outputs(ids, paths):
    """Plain ``tiny_llama(0)(ids)`` with forward hooks capturing the outputs (and the
    (args, kwargs) inputs) of ``paths`` (HF paths, '' = the root)."""
    plain = tiny_llama(0)
    seen = {}

    def capture(name):
        def hook(mod, args, kwargs, out):
            seen.setdefault(name, (out, args, kwargs))
        return hook

    handles = [plain.get_submodule(p).register_forward_hook(capture(p), with_kwargs=True)
               for p in paths]
    try:
        with torch.no_grad():
            out = plain(ids)
    finally:
        for h in handles:
            h.remove()
    return out, seen


# --------------------------------------------------------------------------------------
# 8. A cache in an invoke records that invoke's rows
# --------------------------------------------------------------------------------------


@intervene
def caches_in_invokes(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            first = tracer.cache()  # a lane without checkpoints
        with tracer.invoke(x2):
            second = tracer.cache(include_inputs=True)  # a lane with one, after it
            h = model.layers[2].output.save()
        with tracer.invoke():
            whole = tracer.cache(modules=[model.head])  # no input: the whole batch
    return first, second, whole, h


def test_cache_in_each_invoke_holds_its_rows_of_every_module():
    model = NNsight(tiny_mlp())
    ref = tiny_mlp()
    x1, x2 = x_input(1, batch=2), x_input(2, batch=3)
    first, second, whole, h = caches_in_invokes(model, x1, x2)
    batch = torch.cat([x1, x2])
    seen = {}
    with forward_hooks({m: lambda mod, a, o, n=n: seen.setdefault(n, o)
                        for n, m in ref.named_modules() if n not in ("", "layers")}):
        out = ref(batch)
    seen["model"] = out
    for name, value in seen.items():
        key = name if name == "model" else f"model.{name}"
        assert torch.equal(first[key].output, value[:2]), key
        assert torch.equal(second[key].output, value[2:]), key
    assert torch.equal(second["layers.2"].output, h)
    assert torch.equal(second["model"].input, x2)  # inputs are the invoke's rows too
    assert torch.equal(whole["head"].output, out)
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------
# 13. Types are kept; every call is kept
# --------------------------------------------------------------------------------------


@intervene
def cache_llama(model, ids, dtype):
    with model.trace(ids) as tracer:
        cache = tracer.cache(dtype=dtype)
    return cache


def test_cache_keeps_model_output_and_layer_types():
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

    cache = cache_llama(llama(), IDS, None)
    out, seen = plain_llama_outputs(IDS, ["model", "model.layers.0", "model.rotary_emb"])
    root = cache["model"].output
    assert isinstance(root, CausalLMOutputWithPast)
    assert torch.equal(root.logits, out.logits)
    assert torch.equal(cache.model.output.logits, out.logits)
    decoder = cache["model.model"].output
    assert isinstance(decoder, BaseModelOutputWithPast)
    assert torch.equal(decoder.last_hidden_state, seen["model"][0].last_hidden_state)
    layer = cache.model.model.layers[0].output
    assert type(layer) is type(seen["model.layers.0"][0])
    rotary = cache["model.model.rotary_emb"].output  # a tuple (cos, sin)
    assert type(rotary) is tuple and len(rotary) == 2
    assert all(torch.equal(a, b) for a, b in zip(rotary, seen["model.rotary_emb"][0]))


def test_cache_dtype_applies_inside_a_model_output():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    cache = cache_llama(llama(), IDS, torch.float16)
    out, _ = plain_llama_outputs(IDS, [])
    root = cache["model"].output
    assert isinstance(root, CausalLMOutputWithPast)
    assert root.logits.dtype == torch.float16
    assert torch.equal(root.logits, out.logits.half())
    assert not root.logits.requires_grad


Pair = namedtuple("Pair", "low high")


class _Shapes(nn.Module):
    """Outputs of several container types, and a module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.other = nn.Linear(4, 4)
        self.split = _Split()
        self.top = _Top()

    def forward(self, x):
        h = self.shared(self.other(self.shared(x)))
        pair = self.split(h)
        return self.top(pair.low + pair.high)


class _Split(nn.Module):
    def forward(self, x):
        return Pair(x * 2, x + 1)


class _Top(nn.Module):
    def forward(self, x):
        return torch.max(x, dim=-1)  # torch.return_types.max


@intervene
def cache_shapes(model, x):
    with model.trace(x) as tracer:
        cache = tracer.cache(include_inputs=True)
        first = model.shared.output.save()
    return cache, first


def test_cache_keeps_namedtuples_and_torch_return_types():
    torch.manual_seed(0)
    net = _Shapes()
    x = torch.randn(3, 4)
    cache, _ = cache_shapes(NNsight(net), x)
    plain = net(x)
    pair = cache["split"].output
    assert type(pair) is Pair
    assert torch.equal(pair.high, net.shared(net.other(net.shared(x))) + 1)
    top = cache["top"].output
    assert type(top) is type(plain)
    assert torch.equal(top.values, plain.values) and torch.equal(top.indices, plain.indices)
    assert type(cache["model"].output) is type(plain)


def test_module_called_twice_keeps_every_call_and_output_is_the_first():
    torch.manual_seed(0)
    net = _Shapes()
    x = torch.randn(3, 4)
    cache, first = cache_shapes(NNsight(net), x)
    calls = []
    with forward_hooks({net.shared: lambda m, a, o: calls.append((a[0], o))}):
        net(x)
    entry = cache["shared"]
    assert len(entry.calls) == 2
    # `.output` is the first call, as `model.shared.output` is in a block
    assert torch.equal(entry.output, calls[0][1])
    assert torch.equal(first, calls[0][1])
    assert [torch.equal(a, b[1]) for a, b in zip(entry.outputs, calls)] == [True, True]
    assert torch.equal(entry.calls[1].input, calls[1][0])
    assert torch.equal(entry.calls[1].output, calls[1][1])
    assert len(cache.model.shared.calls) == 2
    assert len(cache.model.shared.outputs) == 2
    assert len(cache["other"].calls) == 1
    assert "2 calls" in repr(entry)


@intervene
def generate_cache(model, ids):
    with model.generate(ids, max_new_tokens=3, do_sample=False) as tracer:
        cache = tracer.cache(modules=[model.model.layers[0], model.model.norm])
    return cache


def test_generate_cache_one_entry_per_step():
    lm = LanguageModel(tiny_llama(0), tokenizer=None)
    ids = torch.tensor([[1, 5, 7, 9]])
    cache = generate_cache(lm, ids)
    entries = cache["model.layers.0"]
    assert [e.step for e in entries] == [0, 1, 2]
    assert [tuple(e.output.shape) for e in entries] == [(1, 4, 32), (1, 1, 32), (1, 1, 32)]
    assert all(len(e.calls) == 1 for e in entries)
    assert len(cache.model.model.norm.output) == 3
    assert_no_hooks(lm)


# --------------------------------------------------------------------------------------
# Modules still running when the cache is made
# --------------------------------------------------------------------------------------


@intervene
def cache_after_a_layer(model, ids):
    with model.trace(ids) as tracer:
        h = model.model.layers[0].output.save()
        cache = tracer.cache(include_inputs=True)
    return h, cache


def test_late_cache_records_the_modules_still_running():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    model = llama()
    with pytest.warns(RuntimeWarning, match="after the forward pass has started"):
        _, cache = cache_after_a_layer(model, IDS)
    out, seen = plain_llama_outputs(IDS, ["model", "model.layers.0", "model.layers.1"])
    # the root and the decoder were running: recorded when they returned
    assert isinstance(cache["model"].output, CausalLMOutputWithPast)
    assert torch.equal(cache["model"].output.logits, out.logits)
    assert torch.equal(cache["model.model"].output.last_hidden_state,
                       seen["model"][0].last_hidden_state)
    # their inputs are those the call began with
    assert torch.equal(cache["model"].input, IDS)
    # the layer being served when the cache was made, and the one after it
    assert torch.equal(cache["model.model.layers.0"].output, seen["model.layers.0"][0])
    assert torch.equal(cache["model.model.layers.1"].output, seen["model.layers.1"][0])
    # what had already returned is not there, and the error says why
    with pytest.raises(KeyError, match="did not return after tracer.cache"):
        cache["model.model.embed_tokens"]
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------
# Paths are checked as they are written
# --------------------------------------------------------------------------------------


def test_cache_paths_fail_at_once():
    cache = cache_llama(llama(), IDS, None)
    with pytest.raises(IndexError, match=r"cache\.model\.model\.layers\[30\].*has 2 modules"):
        cache.model.model.layers[30]
    with pytest.raises(AttributeError, match=r"no child module `layerz` \(did you mean `layers`\?\)"):
        _ = cache.model.model.layerz
    with pytest.raises(AttributeError, match="its children: embed_tokens, layers, norm"):
        _ = cache.model.model.nope
    with pytest.raises(AttributeError, match="has no child module `lm_heads`"):
        _ = cache.lm_heads
    with pytest.raises(TypeError, match="is not a list of modules"):
        cache.model.lm_head[0]
    # negative indices and the HF path without the root (`cache.model.layers` is
    # `model.model.layers`) work
    last = cache.model.model.layers[-1].output
    assert torch.equal(last, cache["model.model.layers.1"].output)
    assert torch.equal(cache.model.layers[1].output, last)


def test_cache_key_errors_say_why():
    model = NNsight(tiny_mlp())

    @intervene
    def some(model, x):
        with model.trace(x) as tracer:
            cache = tracer.cache(modules=[model.layers[1]])
        return cache

    cache = some(model, x_input())
    with pytest.raises(KeyError, match="not among the modules given"):
        cache["layers.2"]
    with pytest.raises(KeyError, match="no such module"):
        cache["layers.9"]
    with pytest.raises(KeyError, match="list of modules"):
        _ = cache.model.layers.output
    assert "layers.9" not in cache and "layers.1" in cache


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.spare = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


def test_cache_key_error_for_a_chosen_module_that_did_not_run():
    @intervene
    def both(model, x):
        with model.trace(x) as tracer:
            cache = tracer.cache(modules=[model.used, model.spare])
        return cache

    cache = both(NNsight(_Unused()), torch.randn(2, 4))
    assert list(cache) == ["model.used"]
    with pytest.raises(KeyError, match="'model.spare' was not recorded: it did not run in this forward pass"):
        _ = cache.model.spare.output


def test_cache_keeps_no_reference_to_the_model():
    net = tiny_mlp()
    model = NNsight(net)

    @intervene
    def one(model, x):
        with model.trace(x) as tracer:
            cache = tracer.cache()
        return cache

    cache = one(model, x_input())
    ref = weakref.ref(net)
    del model, net
    gc.collect()
    assert ref() is None
    assert cache.layers[3].output.shape == (3, 8)


# --------------------------------------------------------------------------------------
# A failing trace with a cache leaves nothing behind
# --------------------------------------------------------------------------------------


@intervene
def failing_with_cache(model, x, refs, late):
    with model.trace(x) as tracer:
        if late:
            h = model.layers[1].output
            cache = tracer.cache()
        else:
            cache = tracer.cache()
            h = model.layers[1].output
        refs.append(weakref.ref(cache))
        raise ValueError(f"boom {h.shape[0]}")
    return cache


@pytest.mark.parametrize("late", [False, True])
def test_failing_trace_with_cache_leaves_no_hooks_and_no_cached_tensors(late, recwarn):
    net = tiny_mlp()
    model = NNsight(net)
    refs = []
    with pytest.raises(ValueError, match="boom 3"):
        failing_with_cache(model, x_input(), refs, late)
    assert_no_hooks(model)
    gc.collect()
    assert refs[0]() is None  # nothing (a hook's closure, the model) keeps the cache
    # and the model still runs plainly, unrecorded
    assert torch.equal(model._module(x_input()), tiny_mlp()(x_input()))


# --------------------------------------------------------------------------------------
# Backward blocks leave the model's parameter gradients alone
# --------------------------------------------------------------------------------------


@intervene
def saliency(model, ids):
    with model.trace(ids):
        h0 = model.model.layers[0].output
        h1 = model.model.layers[1].output
        logits = model.lm_head.output
        loss = logits[:, -1, 3].sum()
        with loss.backward():
            g1 = h1.grad.save()
            g0 = h0.grad.save()
    return g0, g1


def plain_saliency_grads(ids):
    plain = tiny_llama(0)
    seen = {}
    with forward_hooks({plain.model.layers[i]: lambda m, a, o, i=i: seen.setdefault(i, o)
                        for i in (0, 1)}):
        loss = plain(ids).logits[:, -1, 3].sum()
    return torch.autograd.grad(loss, [seen[0], seen[1]])


def test_backward_block_leaves_parameter_grads_as_they_were():
    model = llama()
    params = list(model._module.parameters())
    assert all(p.requires_grad for p in params)
    e0, e1 = plain_saliency_grads(IDS)
    for _ in range(3):  # nothing accumulates run after run
        g0, g1 = saliency(model, IDS)
        assert all(p.grad is None for p in params)
        assert torch.equal(g0, e0) and torch.equal(g1, e1)
    # gradients the user had put there stay, untouched
    before = [torch.full_like(p, 0.5) for p in params]
    for p, b in zip(params, before):
        p.grad = b
    saliency(model, IDS)
    assert all(p.grad is b for p, b in zip(params, before))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in params)
    assert_no_hooks(model)


@intervene
def saliency_per_invoke(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            h = model.model.layers[1].output
            loss = model.lm_head.output[:, -1, 3].sum()
            with loss.backward(retain_graph=True):
                ga = h.grad.save()
        with tracer.invoke(b):
            h = model.model.layers[1].output
            loss = model.lm_head.output[:, -1, 3].sum()
            with loss.backward():
                gb = h.grad.save()
    return ga, gb


def test_backward_blocks_in_invokes_leave_parameter_grads_alone():
    model = llama()
    ga, gb = saliency_per_invoke(model, IDS[:1], IDS[1:])
    assert ga.shape == gb.shape == (1, 5, 32)
    assert all(p.grad is None for p in model._module.parameters())


@intervene
def steer_and_read(model, ids, vec):
    with model.trace(ids):
        model.model.layers[0].output += vec
        h1 = model.model.layers[1].output
        loss = model.lm_head.output[:, -1, 3].sum()
        with loss.backward():
            g1 = h1.grad.save()
            gv = vec.grad.save()  # a leaf of the user's own, asked for second
    return g1, gv


def test_user_leaves_get_their_grad_like_pytorch():
    model = llama()
    vec = torch.linspace(-1, 1, 32).requires_grad_(True)
    g1, gv = steer_and_read(model, IDS, vec)
    plain = tiny_llama(0)
    vec2 = torch.linspace(-1, 1, 32).requires_grad_(True)
    seen = {}

    def add(m, a, o):
        return o + vec2

    with forward_hooks({plain.model.layers[0]: add,
                        plain.model.layers[1]: lambda m, a, o: seen.setdefault(1, o)}):
        loss = plain(IDS).logits[:, -1, 3].sum()
    e1, ev = torch.autograd.grad(loss, [seen[1], vec2], retain_graph=True)
    loss.backward(inputs=[vec2])
    assert torch.equal(g1, e1)
    assert torch.equal(gv, ev)
    assert torch.equal(vec.grad, vec2.grad)  # accumulated as plain backward does
    assert all(p.grad is None for p in model._module.parameters())


@intervene
def param_grad_first(model, ids):
    with model.trace(ids):
        loss = model.lm_head.output[:, -1, 3].sum()
        with loss.backward():
            gw = model.lm_head.weight.grad.save()
    return gw


def test_parameter_asked_for_first_is_computed_and_accumulated():
    model = llama()
    gw = param_grad_first(model, IDS)
    plain = tiny_llama(0)
    (ew,) = torch.autograd.grad(plain(IDS).logits[:, -1, 3].sum(), [plain.lm_head.weight])
    assert torch.equal(gw, ew)
    assert torch.equal(model._module.lm_head.weight.grad, ew)  # asked for: PyTorch's .grad
    others = [p for n, p in model._module.named_parameters() if n != "lm_head.weight"]
    assert all(p.grad is None for p in others)


@intervene
def param_grad_second(model, ids):
    with model.trace(ids):
        h = model.model.layers[1].output
        loss = model.lm_head.output[:, -1, 3].sum()
        with loss.backward():
            g = h.grad.save()
            gw = model.model.embed_tokens.weight.grad.save()  # PARAM-SECOND
    return g, gw


def test_parameter_asked_for_later_says_how_to_get_it():
    model = llama()
    with pytest.raises(MissedCheckpointError, match="parameter of the model") as info:
        param_grad_second(model, IDS)
    assert "plain `loss.backward()`" in str(info.value)
    assert all(p.grad is None for p in model._module.parameters())
    assert_no_hooks(model)


@intervene
def retain_route(model, ids):
    with model.trace(ids):
        h = model.model.layers[1].output.save()
        h.retain_grad()
        loss = model.lm_head.output[:, -1, 3].sum()
        loss.backward()
    return h


def test_plain_backward_in_a_trace_stays_pytorch():
    model = llama()
    h = retain_route(model, IDS)
    plain = tiny_llama(0)
    plain(IDS).logits[:, -1, 3].sum().backward()
    assert torch.equal(h.grad, plain_saliency_grads(IDS)[1])
    for (name, p), q in zip(model._module.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name


@intervene
def default_model_saliency(model, prompt):
    with model.trace(prompt):
        h = model.model.layers[-1].output
        h.requires_grad = True
        loss = model.lm_head.output[0, -1].max()
        with loss.backward():
            g = h.grad.save()
    return g


@pytest.mark.slow
def test_default_model_saliency_leaves_no_parameter_grads():
    # The case: one saliency run used to leave 513 MB of parameter gradients.
    lm = LanguageModel("smollm2-135m")
    prompt = "The Eiffel Tower is in the city of"
    g = default_model_saliency(lm, prompt)
    g2 = default_model_saliency(lm, prompt)
    assert g.shape[-1] == 576 and g[0, -1].abs().sum() > 0
    assert torch.equal(g, g2)
    assert all(p.grad is None for p in lm._module.parameters())
    assert_no_hooks(lm)


def test_exported_cache_rebuilds_with_every_call():
    # The form a remote run sends: every call and step survives, paths still checked.
    from runtime.cache import Cache

    torch.manual_seed(0)
    net = _Shapes()
    cache, _ = cache_shapes(NNsight(net), torch.randn(3, 4))
    again = Cache.rebuilt(None, False, True, cache.exported())
    assert sorted(again) == sorted(cache)
    assert len(again["shared"].calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(again.model.shared.outputs, cache["shared"].outputs))
    assert torch.equal(again["shared"].calls[1].input, cache["shared"].calls[1].input)
    with pytest.raises(AttributeError, match="no child module `sharde`"):
        _ = again.model.sharde
    checked = Cache.rebuilt(net, False, True, cache.exported())  # paths of the real model
    with pytest.raises(KeyError, match="no such module"):
        checked["nope"]
    with pytest.raises(TypeError, match="not a list of modules"):
        _ = checked.model.top[0]
