"""Utilities in a trace: ``tracer.stop()``, ``model.scan(...)`` and ``tracer.cache(...)``.

Checked against plain PyTorch: forward hooks capture the reference values, counting
modules tell which parts of the forward ran and whether they saw real or fake tensors.
After every run no hook may stay on the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import assert_no_hooks, forward_hooks, x_input
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from compiler import intervene
from runtime import MissedCheckpointError, NNsight
from runtime.models import tiny_mlp

THIS_FILE = Path(__file__).resolve()
PROMPT = "The Eiffel Tower is in the city of"


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def plain_outputs(module, x, names):
    """``module(x)`` with forward hooks capturing the outputs of submodules ``names``."""
    seen = {}
    with forward_hooks({module.get_submodule(n): lambda m, a, o, n=n: seen.setdefault(n, o)
                        for n in names}):
        out = module(x)
    return out, seen


class Probe(nn.Module):
    """Runs ``inner`` and records, per call, whether its input was a FakeTensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[bool] = []

    def forward(self, x):
        self.calls.append(isinstance(x, FakeTensor))
        return self.inner(x)


def probed_mlp():
    """tiny_mlp with every layer and the head wrapped in a Probe (same numbers)."""
    plain = tiny_mlp(n_layers=4, hidden=8, seed=0)
    for i in range(len(plain.layers)):
        plain.layers[i] = Probe(plain.layers[i])
    plain.head = Probe(plain.head)
    return plain


def calls(plain):
    return [len(layer.calls) for layer in plain.layers] + [len(plain.head.calls)]


@pytest.fixture
def mlp():
    """(wrapped model, an identical plain reference model)."""
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    yield model, tiny_mlp(n_layers=4, hidden=8, seed=0)
    assert_no_hooks(model)


@pytest.fixture(scope="module")
def lm():
    from runtime import LanguageModel

    return LanguageModel("smollm2-135m", dispatch=True)  # tests reach into _module


# --------------------------------------------------------------------------------------
# tracer.stop()
# --------------------------------------------------------------------------------------


@intervene
def stop_after_layer1(model, x):
    with model.trace(x) as tracer:
        h0 = model.layers[0].output.save()
        h1 = model.layers[1].output.save()
        tracer.stop()
    return h0, h1


def test_stop_skips_the_rest_and_keeps_saved():
    plain = probed_mlp()
    model = NNsight(plain)
    x = x_input()
    h0, h1 = stop_after_layer1(model, x)
    assert calls(plain) == [1, 1, 0, 0, 0]
    _, seen = plain_outputs(tiny_mlp(n_layers=4, hidden=8, seed=0), x, ["layers.0", "layers.1"])
    assert torch.equal(h0, seen["layers.0"])
    assert torch.equal(h1, seen["layers.1"])
    assert_no_hooks(model)
    # the model is usable afterwards, whole forward again
    for p in [*plain.layers, plain.head]:
        p.calls.clear()
    assert torch.equal(model(x), tiny_mlp(n_layers=4, hidden=8, seed=0)(x))
    assert calls(plain) == [1, 1, 1, 1, 1]


@intervene
def stop_after_write(model, x):
    with model.trace(x) as tracer:
        model.layers[0].output[:] = 0
        h1 = model.layers[1].output.save()
        tracer.stop()
    return h1


def test_stop_after_a_write_keeps_the_written_effect(mlp):
    model, ref = mlp
    x = x_input(2)
    h1 = stop_after_write(model, x)
    expected = torch.relu(ref.layers[1](torch.zeros(3, 8)))
    assert torch.equal(h1, ref.layers[1](torch.zeros(3, 8)))
    assert torch.equal(torch.relu(h1), expected)


@intervene
def stop_when(model, x, flag):
    with model.trace(x) as tracer:
        h1 = model.layers[1].output.save()
        if flag:
            tracer.stop()
        out = model.head.output.save()
    return h1, out


def test_stop_in_a_branch():
    plain = probed_mlp()
    model = NNsight(plain)
    x = x_input(3)
    h1, out = stop_when(model, x, False)
    assert calls(plain) == [1] * 5
    assert h1.shape == (3, 8)
    assert torch.equal(out, tiny_mlp(n_layers=4, hidden=8, seed=0)(x))
    for p in [*plain.layers, plain.head]:
        p.calls.clear()
    # stopped: the code after stop() runs, and its module value is a MissedCheckpointError
    with pytest.raises(MissedCheckpointError, match="after tracer.stop"):
        stop_when(model, x, True)
    assert calls(plain) == [1, 1, 0, 0, 0]
    assert_no_hooks(model)


@intervene
def stop_with_cache(model, x):
    with model.trace(x) as tracer:
        cache = tracer.cache()
        h1 = model.layers[1].output.save()
        tracer.stop()
    return cache, h1


def test_stop_with_cache_records_only_what_ran(mlp):
    model, _ = mlp
    cache, h1 = stop_with_cache(model, x_input())
    assert h1.shape == (3, 8)
    assert "model.layers.0" in cache
    for absent in ("model.layers.2", "model.layers.3", "model.head", "model"):
        assert absent not in cache


@intervene
def stop_in_first_invoke(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            a = model.layers[1].output.save()
            tracer.stop()
        with tracer.invoke(x2):
            b = model.layers[3].output.save()  # NEVER-SERVED
    return a, b


def test_stop_in_one_invoke_reports_other_invokes_missed_value(mlp):
    model, _ = mlp
    with pytest.raises(MissedCheckpointError):
        stop_in_first_invoke(model, x_input(1, batch=2), x_input(2, batch=2))


def test_plan_shows_stop_and_cache_markers():
    text = str(stop_with_cache.plan)
    assert "-- stop" in text
    assert "-- cache" in text
    assert text.index("-- cache") < text.index("layers[1]") < text.index("-- stop")


# --------------------------------------------------------------------------------------
# model.scan(...)
# --------------------------------------------------------------------------------------


@intervene
def scan_shapes(model, x):
    with model.scan(x):
        s1 = model.layers[1].output.shape.save()
        d1 = model.layers[1].output.dtype.save()
        h1 = model.layers[1].output.save()
        s_in = model.layers[2].input.shape.save()
        s_out = model.head.output.shape.save()
    return s1, d1, h1, s_in, s_out


def test_scan_shapes_match_real_run_without_compute():
    plain = probed_mlp()
    model = NNsight(plain)
    x = x_input(batch=5)
    s1, d1, h1, s_in, s_out = scan_shapes(model, x)
    assert s1 == (5, 8) and s_in == (5, 8) and s_out == (5, 2)
    assert d1 == torch.float32
    assert isinstance(h1, FakeTensor)
    # every module ran, on fake tensors only
    assert all(p.calls == [True] for p in [*plain.layers, plain.head])
    out, seen = plain_outputs(tiny_mlp(n_layers=4, hidden=8, seed=0), x, ["layers.1"])
    assert s1 == seen["layers.1"].shape and s_out == out.shape
    assert_no_hooks(model)
    # nothing of the scan stays: parameters untouched and real
    for p, q in zip(plain.parameters(), tiny_mlp(n_layers=4, hidden=8, seed=0).parameters()):
        assert not isinstance(p, FakeTensor) and torch.equal(p, q) and p.grad is None


@intervene
def scan_dtype(model, x):
    with model.scan(x):
        d = model.head.output.dtype.save()
    return d


def test_scan_follows_dtype():
    model = NNsight(tiny_mlp().to(torch.float64))
    assert scan_dtype(model, x_input().double()) == torch.float64


@intervene
def scan_with_write(model, x):
    with model.scan(x):
        model.layers[1].output[:] = 0
        s = model.head.output.shape.save()
    return s


def test_scan_with_write_and_then_real_trace(mlp):
    model, ref = mlp
    x = x_input(4)
    assert scan_with_write(model, x) == (3, 2)

    @intervene
    def real(model, x):
        with model.trace(x):
            out = model.head.output.save()
        return out

    got = real(model, x)
    assert not isinstance(got, FakeTensor)
    assert torch.equal(got, ref(x))


@intervene
def scan_invokes(model, x1, x2):
    with model.scan() as tracer:
        with tracer.invoke(x1):
            a = model.layers[1].output.shape.save()
        with tracer.invoke(x2):
            b = model.layers[1].output.shape.save()
    return a, b


def test_scan_with_invokes_gives_each_its_rows(mlp):
    model, _ = mlp
    assert scan_invokes(model, x_input(batch=2), x_input(batch=3)) == ((2, 8), (3, 8))


@intervene
def scan_wrong_shape(model, x):
    with model.scan(x):
        s = model.layers[0].output.shape.save()
    return s


def test_scan_reports_a_shape_mismatch(mlp):
    model, _ = mlp
    with pytest.raises(RuntimeError):
        scan_wrong_shape(model, torch.randn(2, 5))


@intervene
def scan_lm(model, prompt):
    with model.scan(prompt):
        s = model.model.layers[1].output.shape.save()
        h = model.model.layers[1].output.save()
        logits = model.lm_head.output.shape.save()
    return s, h, logits


@pytest.mark.slow
def test_scan_on_the_default_model(lm):
    n = len(lm.tokenizer(PROMPT)["input_ids"])
    s, h, logits = scan_lm(lm, PROMPT)
    assert s == (1, n, 576)
    assert isinstance(h, FakeTensor)
    assert logits == (1, n, lm.config.vocab_size)
    assert_no_hooks(lm)


# --------------------------------------------------------------------------------------
# tracer.cache(...)
# --------------------------------------------------------------------------------------

# the keys as a block spells the modules (lookups take the dotted torch names too)
ALL_MLP = ["model", "model.layers", "model.layers[0]", "model.layers[1]", "model.layers[2]",
           "model.layers[3]", "model.head"]


@intervene
def cache_all(model, x):
    with model.trace(x) as tracer:
        cache = tracer.cache()
    return cache


def test_cache_records_every_module_like_plain_hooks(mlp):
    model, ref = mlp
    x = x_input(5)
    cache = cache_all(model, x)
    names = ["layers.0", "layers.1", "layers.2", "layers.3", "head"]
    out, seen = plain_outputs(ref, x, names)
    for name in names:
        assert torch.equal(cache[name].output, seen[name]), name
        assert torch.equal(cache[f"model.{name}"].output, seen[name]), name
    assert torch.equal(cache["model"].output, out)
    # every module that ran (a ModuleList is never called)
    assert set(cache) == set(ALL_MLP) - {"model.layers"}
    assert len(cache) == 6
    # attribute navigation
    assert torch.equal(cache.model.layers[1].output, seen["layers.1"])
    assert torch.equal(cache.layers[2].output, seen["layers.2"])
    assert torch.equal(cache.model.head.output, out)
    with pytest.raises(KeyError):
        cache["layers.9"]
    assert_no_hooks(model)


@intervene
def cache_after_zero(model, x):
    with model.trace(x) as tracer:
        cache = tracer.cache()
        model.layers[1].output[:] = 0
        model.layers[2].output = model.layers[2].output * 2
    return cache


def test_cache_holds_values_after_interventions(mlp):
    model, ref = mlp
    x = x_input(6)
    cache = cache_after_zero(model, x)
    assert torch.equal(cache["layers.1"].output, torch.zeros(3, 8))
    expected2 = ref.layers[2](torch.zeros(3, 8)) * 2
    assert torch.equal(cache["layers.2"].output, expected2)
    # and the forward went on from them
    assert torch.equal(cache["model"].output,
                       ref.head(torch.relu(ref.layers[3](torch.relu(expected2)))))


@intervene
def cache_some(model, x):
    with model.trace(x) as tracer:
        cache = tracer.cache(modules=[model.layers[1], "layers.2"])
    return cache


def test_cache_modules_hooks_only_those(mlp):
    model, ref = mlp
    x = x_input(7)
    cache = cache_some(model, x)
    assert sorted(cache) == ["model.layers[1]", "model.layers[2]"]
    for absent in ("layers.0", "layers.3", "head", "model"):
        with pytest.raises(KeyError):
            cache[absent]
    _, seen = plain_outputs(ref, x, ["layers.1", "layers.2"])
    assert torch.equal(cache["layers.1"].output, seen["layers.1"])
    assert torch.equal(cache["model.layers.2"].output, seen["layers.2"])


@intervene
def cache_some_counting(model, x):
    with model.trace(x) as tracer:
        cache = tracer.cache(modules=["model.layers.0", model.head])
        n_hooks = sum(len(m._forward_hooks) for m in model._module.modules())
        h = model.layers[3].output.save()
        n_hooks = n_hooks.save()
    return cache, n_hooks, h


def test_cache_modules_registers_one_hook_per_chosen_module(mlp):
    model, _ = mlp
    cache, n_hooks, h = cache_some_counting(model, x_input())
    assert h.shape == (3, 8)
    # two cache hooks; the experiment's own checkpoint may add its own
    assert n_hooks in (2, 3)
    assert sorted(cache) == ["model.head", "model.layers[0]"]


def test_cache_modules_unknown_name(mlp):
    model, _ = mlp

    @intervene
    def bad(model, x):
        with model.trace(x) as tracer:
            cache = tracer.cache(modules=["layers.7"])
        return cache

    with pytest.raises(KeyError, match="layers.7"):
        bad(model, x_input())


@intervene
def cache_inputs(model, x):
    with model.trace(x) as tracer:
        cache = tracer.cache(include_inputs=True)
    return cache


def test_cache_include_inputs(mlp):
    model, ref = mlp
    x = x_input(8)
    cache = cache_inputs(model, x)
    seen = {}
    handle = ref.layers[2].register_forward_pre_hook(
        lambda m, a, k: seen.setdefault("in", (a, k)), with_kwargs=True)
    try:
        ref(x)
    finally:
        handle.remove()
    args, kwargs = cache["layers.2"].inputs
    assert isinstance(args, tuple) and len(args) == 1 and kwargs == {}
    assert torch.equal(args[0], seen["in"][0][0])
    assert torch.equal(cache["layers.2"].input, seen["in"][0][0])
    assert torch.equal(cache["model"].input, x)
    assert torch.equal(cache.model.layers[2].input, seen["in"][0][0])


def test_cache_without_inputs_has_no_input(mlp):
    model, _ = mlp
    cache = cache_all(model, x_input())
    with pytest.raises(AttributeError, match="include_inputs"):
        _ = cache["layers.1"].input


@intervene
def cache_half(model, x):
    with model.trace(x) as tracer:
        cache = tracer.cache(dtype=torch.float16, include_inputs=True, device="cpu")
        out = model.head.output.save()
    return cache, out


def test_cache_dtype_converts(mlp):
    model, ref = mlp
    x = x_input(9)
    cache, out = cache_half(model, x)
    _, seen = plain_outputs(ref, x, ["layers.1"])
    assert cache["layers.1"].output.dtype == torch.float16
    assert cache["layers.1"].input.dtype == torch.float16
    assert torch.equal(cache["layers.1"].output, seen["layers.1"].half())
    # the run itself stays in float32
    assert out.dtype == torch.float32
    assert torch.equal(out, ref(x))


@intervene
def cache_grad(model, x, detach):
    with model.trace(x) as tracer:
        cache = tracer.cache(detach=detach)
    return cache


def test_cache_detach(mlp):
    model, _ = mlp
    x = x_input(10)
    detached = cache_grad(model, x, True)
    assert detached["layers.1"].output.grad_fn is None
    assert not detached["layers.1"].output.requires_grad
    kept = cache_grad(model, x, False)
    assert kept["layers.1"].output.grad_fn is not None
    assert torch.equal(kept["layers.1"].output.detach(), detached["layers.1"].output)


@intervene
def cache_late(model, x):
    with model.trace(x) as tracer:
        h = model.layers[2].output.save()
        cache = tracer.cache()
    return h, cache


def test_cache_called_late_warns_at_the_user_line(mlp):
    # A cache started mid-forward cannot hold what already ran: say so, at the user's line.
    model, ref = mlp
    with pytest.warns(RuntimeWarning, match=r"after the forward pass has started") as record:
        h, cache = cache_late(model, x_input())
    assert record[0].filename == __file__
    assert "model.layers.0" not in cache  # ran before the call
    assert "model.layers.3" in cache and "model.head" in cache
    # the layer being served and the root (still running) are recorded when they return
    assert torch.equal(cache["layers.2"].output, h)
    assert torch.equal(cache["model"].output, ref(x_input()))
    assert_no_hooks(model._module)


@intervene
def cache_with_invokes(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            cache = tracer.cache(modules=[model.layers[1]])
        with tracer.invoke(x2):
            h = model.layers[1].output.save()
    return cache, h


def test_cache_in_an_invoke_holds_its_rows(mlp):
    # A cache called in invoke i records invoke i's rows of every module.
    model, ref = mlp
    x1, x2 = x_input(1, batch=2), x_input(2, batch=3)
    cache, h = cache_with_invokes(model, x1, x2)
    _, seen = plain_outputs(ref, torch.cat([x1, x2]), ["layers.1"])
    got = cache["layers.1"].output
    assert got.shape == (2, 8)
    assert torch.equal(got, seen["layers.1"][:2])
    assert torch.equal(h, seen["layers.1"][2:])


def test_cache_hooks_removed_after_error(mlp):
    model, _ = mlp

    @intervene
    def fails(model, x):
        with model.trace(x) as tracer:
            cache = tracer.cache()
            h = model.layers[1].output
            raise ValueError(f"boom {h.shape[0]}")
        return cache

    with pytest.raises(ValueError, match="boom"):
        fails(model, x_input())
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------
# cache on the default model
# --------------------------------------------------------------------------------------


@intervene
def lm_cache(model, prompt):
    with model.trace(prompt) as tracer:
        cache = tracer.cache(modules=[model.model.layers[0], model.model.layers[29]])
        logits = model.lm_head.output.save()
    return cache, logits


@pytest.mark.slow
def test_default_model_cache_matches_hooks(lm):
    cache, logits = lm_cache(lm, PROMPT)
    assert logits.shape[-1] == lm.config.vocab_size
    hf = lm._module
    ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    seen = {}
    hooks = {hf.model.layers[i]: lambda m, a, o, i=i: seen.setdefault(
        i, o[0] if isinstance(o, tuple) else o) for i in (0, 29)}
    with forward_hooks(hooks), torch.no_grad():
        hf(ids)
    assert sorted(cache) == ["model.model.layers[0]", "model.model.layers[29]"]
    assert torch.equal(cache["model.model.layers.0"].output, seen[0])
    assert torch.equal(cache.model.model.layers[29].output, seen[29])
    assert_no_hooks(lm)


@pytest.mark.slow
def test_default_model_cache_takes_hf_module_path(lm):
    """``model.layers.0`` (the HF path) and ``model.model.layers.0`` (with the root)."""
    cache, _ = lm_cache(lm, PROMPT)
    assert torch.equal(cache["model.layers.0"].output, cache["model.model.layers.0"].output)
    assert cache["model.layers.29"].output.shape[-1] == 576
    with pytest.raises(KeyError):
        cache["model.layers.5"]


@intervene
def lm_cache_by_name(model, prompt):
    with model.trace(prompt) as tracer:
        cache = tracer.cache(modules=["model.layers.2"])
    return cache


@pytest.mark.slow
def test_default_model_cache_modules_by_hf_path(lm):
    cache = lm_cache_by_name(lm, PROMPT)
    assert len(cache) == 1


@intervene
def lm_generate_cache(model, prompt):
    with model.generate(prompt, max_new_tokens=3) as tracer:
        cache = tracer.cache(modules=[model.model.layers[0]], include_inputs=True)
    return cache


@pytest.mark.slow
def test_default_model_generate_cache_one_entry_per_step(lm):
    n = len(lm.tokenizer(PROMPT)["input_ids"])
    cache = lm_generate_cache(lm, PROMPT)
    entries = cache["model.layers.0"]
    assert entries is cache["model.model.layers.0"] or entries == cache["model.model.layers.0"]
    assert isinstance(entries, list) and len(entries) == 3
    assert [tuple(e.output.shape) for e in entries] == [(1, n, 576), (1, 1, 576), (1, 1, 576)]
    assert [tuple(e.input.shape) for e in entries] == [(1, n, 576), (1, 1, 576), (1, 1, 576)]
    outputs = cache.model.model.layers[0].output
    assert isinstance(outputs, list) and len(outputs) == 3
    assert torch.equal(outputs[0], entries[0].output)
    assert_no_hooks(lm)


# -- scan before the weights are loaded ------------------------------------------------


@intervene
def scan_meta_shapes(model, x):
    with model.scan(x):
        first = model[0].output.shape.save()
        dtype = model[2].output.dtype.save()
    return first, dtype


def test_scan_works_on_a_model_whose_weights_are_not_loaded():
    # Parameters on the meta device hold no data at all: a real forward would fail,
    # a scan still gives every shape and dtype.
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    shape, dtype = scan_meta_shapes(NNsight(net), torch.randn(3, 8))
    assert shape == torch.Size([3, 16])
    assert dtype == torch.float32
    assert_no_hooks(net)


@intervene
def scan_meta_llama(model, ids):
    with model.scan(ids):
        hidden = model.model.layers[1].output.shape.save()
        logits = model.lm_head.output.shape.save()
    return hidden, logits


def test_scan_of_a_transformers_model_on_the_meta_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        lm = LlamaForCausalLM(config)
    hidden, logits = scan_meta_llama(NNsight(lm), torch.tensor([[1, 2, 3, 4]]))
    assert hidden == torch.Size([1, 4, 32])
    assert logits == torch.Size([1, 4, 128])
    assert_no_hooks(lm)
