"""``module.source``: values inside a module's own forward (issue 14).

Every value read through a call site is compared with a hand-written monkeypatch of
the same forward (or of the function it calls); every write with the same write made
by hand.  Tiny models only, except one slow test on the default model.
"""

from __future__ import annotations

import functools
import inspect
import textwrap
import traceback
import types

import pytest
import torch
import transformers.models.llama.modeling_llama as llama

from compiler import intervene
from runtime import LanguageModel, NNsight, OutOfOrderError
from runtime import source as source_mod
from runtime.errors import MissedCheckpointError, NotInTraceError
from runtime.models import tiny_llama
from tests.support import assert_no_hooks

IDS = torch.tensor([[1, 5, 7, 9, 11, 3]])
TWO = torch.tensor([[1, 5, 7, 9, 11, 3], [1, 8, 4, 6, 2, 10]])


def _deco(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    return wrapper


class Base(torch.nn.Module):
    def forward(self, x):
        return x + 1


class Net(Base):
    """A plain module: repeated names, nested calls, a torch function, a method call,
    a branch, a loop, super(), a private attribute and a decorator."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.out = torch.nn.Linear(4, 2)
        self.__scale = 2.0

    @_deco
    def forward(self, x, flag: bool = False):
        h = torch.relu(self.fc(x))
        h = self.fc(h) * self.__scale
        if flag:
            h = torch.tanh(h)
        for _ in range(2):
            h = h.clamp(-5, 5)
        h = super().forward(h)
        return self.out(h)


def net() -> NNsight:
    torch.manual_seed(0)
    return NNsight(Net().eval())


def x4(rows: int = 3) -> torch.Tensor:
    return torch.randn(rows, 4, generator=torch.Generator().manual_seed(1))


def eager_llama() -> LanguageModel:
    return LanguageModel(tiny_llama(0, attn_implementation="eager"))


# -- naming -------------------------------------------------------------------------------


def test_printed_source_names_each_call_in_a_margin():
    model = net()
    text = str(model.source)
    assert "Net.forward" in text
    lines = text.splitlines()
    line = next(ln for ln in lines if "h = torch.relu(self.fc(x))" in ln)
    assert line.split("->")[0].strip() == "relu_0, fc_0"
    line = next(ln for ln in lines if "h = self.fc(h) * self.__scale" in ln)
    assert line.split("->")[0].strip() == "fc_1"
    assert next(ln for ln in lines if "h.clamp(" in ln).split("->")[0].strip() == "clamp_0"
    assert next(ln for ln in lines if "super().forward" in ln).split("->")[0].strip() == "forward_0"
    assert repr(model.source) == text
    assert dir(model.source) == ["clamp_0", "fc_0", "fc_1", "forward_0", "out_0", "range_0",
                                 "relu_0", "tanh_0"]
    # The margin's line numbers are the file's.
    first = inspect.getsourcelines(Net.forward.__wrapped__)[1]
    assert f"{first + 2}  " in line_of(text, "h = torch.relu(self.fc(x))")


def line_of(text: str, marker: str) -> str:
    return next(ln for ln in text.splitlines() if marker in ln)


def test_llama_attention_mlp_and_layer_names():
    model = eager_llama()
    attn = dir(model.model.layers[0].self_attn.source)
    for name in ("q_proj_0", "k_proj_0", "v_proj_0", "view_0", "view_2", "transpose_1",
                 "apply_rotary_pos_emb_0", "update_0", "get_interface_0",
                 "attention_interface_0", "reshape_0", "o_proj_0"):
        assert name in attn
    assert dir(model.model.layers[0].mlp.source) == ["act_fn_0", "down_proj_0", "gate_proj_0",
                                                     "up_proj_0"]
    layer = dir(model.model.layers[0].source)
    assert {"input_layernorm_0", "self_attn_0", "post_attention_layernorm_0", "mlp_0"} <= set(layer)
    text = str(model.model.layers[0].self_attn.source)
    assert line_of(text, "= self.o_proj(attn_output)").split("->")[0].strip() == "o_proj_0"


def test_typo_and_source_itself_have_no_value():
    model = eager_llama()
    src = model.model.layers[0].self_attn.source
    with pytest.raises(AttributeError, match=r"no call site `o_prj_0`\. Did you mean `o_proj_0`"):
        src.o_prj_0  # noqa: B018
    with pytest.raises(AttributeError, match=r"`.source` has no value of its own"):
        src.output  # noqa: B018
    with pytest.raises(NotInTraceError, match=r"source\.o_proj_0\.output` exists only while"):
        src.o_proj_0.output  # noqa: B018
    with pytest.raises(AttributeError, match=r"is a call site of a forward: it has `\.output`"):
        src.o_proj_0.weight  # noqa: B018


# -- forwards without source ------------------------------------------------------------


class Builtin(torch.nn.Module):
    forward = torch.relu  # a built-in function


def test_forward_without_source_is_a_clear_error():
    with pytest.raises(AttributeError, match=r"`model.source`: the forward of `model` "
                                             r"\(Builtin\) is a builtin_function_or_method"):
        NNsight(Builtin()).source  # noqa: B018
    scripted = torch.nn.Sequential(torch.jit.script(torch.nn.Linear(2, 2)))
    with pytest.raises(AttributeError, match=r"`model\[0\]\.source`: .*is TorchScript"):
        NNsight(scripted)[0].source  # noqa: B018
    namespace: dict = {}
    exec("import torch\nclass Made(torch.nn.Module):\n    def forward(self, x):\n"  # noqa: S102
         "        return x\n", namespace)
    with pytest.raises(AttributeError, match=r"\(Made\) has no source to read"):
        NNsight(namespace["Made"]()).source  # noqa: B018
    assert not hasattr(NNsight(Builtin()), "source")


def top_level_forward(self, x):
    return torch.tanh(self.fc(x)) * 2


class TopLevel(torch.nn.Module):
    forward = top_level_forward  # written at the top level of its file

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)


def test_closures_and_a_forward_written_at_the_top_level():
    scale = torch.tensor(3.0)

    class Local(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.sigmoid(self.fc(x)) * scale  # `scale`: a closure variable

    @intervene
    def read(model, x):
        with model.trace(x):
            s = model.source.sigmoid_0.output.save()
            out = model.output.save()
        return s, out

    torch.manual_seed(0)
    local, top = Local(), TopLevel()
    x = x4()
    s, out = read(NNsight(local), x)
    assert torch.equal(s, torch.sigmoid(local.fc(x))) and torch.equal(out, s * 3)

    @intervene
    def zero(model, x):
        with model.trace(x):
            model.source.tanh_0.output[:] = 0
            out = model.output.save()
        return out

    assert torch.count_nonzero(zero(NNsight(top), x)) == 0
    first = inspect.getsourcelines(top_level_forward)[1]
    assert f"tanh_0, fc_0 -> {first + 1}  " in str(NNsight(top).source)
    assert_no_hooks(local)
    assert_no_hooks(top)


def test_a_forward_set_on_the_instance_or_a_module_already_running():
    model = net()
    model._module.forward = lambda x: x

    @intervene
    def read(model, x):
        with model.trace(x):
            r = model.source.relu_0.output.save()
        return r

    with pytest.raises(AttributeError, match=r"`model` has its own `forward` set on the "
                                             r"instance, which `.source` cannot rewrite"):
        read(model, x4())
    del model._module.forward

    lm = eager_llama()

    @intervene
    def late(model, ids):
        with model.trace(ids):
            for layer in model.model.layers:
                q = layer.self_attn.q_proj.output.save()  # self_attn is running after this
                o = layer.self_attn.source.o_proj_0.output.save()
        return q, o

    with pytest.raises(RuntimeError, match=r"`model\.model\.layers\[0\]\.self_attn\.source` is "
                                           r"named while `model\.model\.layers\[0\]\.self_attn` "
                                           r"is watched already in this pass"):
        late(lm, IDS)
    assert_no_hooks(lm)
    assert source_mod._LIVE == {}


class Swap(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x)


def test_a_class_forward_replaced_after_its_calls_were_named():
    model = NNsight(Swap())
    x = x4()

    @intervene
    def read(model, x):
        with model.trace(x):
            r = model.source.relu_0.output.save()
        return r

    assert torch.equal(read(model, x), torch.relu(x))
    original = Swap.forward

    def forward(self, x):
        return torch.relu(x * 2)

    Swap.forward = forward
    try:
        assert torch.equal(read(model, x), torch.relu(x * 2))  # the new forward's relu_0
        assert "relu(x * 2)" in str(model.source)
    finally:
        Swap.forward = original
    assert_no_hooks(model)


# -- reading, equal to a hand-written patch ---------------------------------------------------


def test_reads_equal_a_hand_written_patch_of_the_same_forward():
    model = net()
    x = x4()

    @intervene
    def read(model, x):
        with model.trace(x):
            first = model.source.fc_0.output.save()
            relu_in = model.source.relu_0.input.save()  # after fc_0's output: nested calls
            second = model.source.fc_1.inputs.save()
            clamp = model.source.clamp_0.output.save()  # the first of its two calls
            out = model.output.save()
        return relu_in, first, second, clamp, out

    relu_in, first, second, clamp, out = read(model, x)
    # By hand: the same forward, with the values kept.
    m = model._module
    kept = {}
    h0 = m.fc(x)
    kept["relu_in"] = h0
    h = torch.relu(h0)
    kept["second"] = ((h,), {})
    h = m.fc(h) * 2.0
    h = h.clamp(-5, 5)
    kept["clamp"] = h
    h = h.clamp(-5, 5)
    expected = m.out(h + 1)
    assert torch.equal(first, h0) and torch.equal(relu_in, kept["relu_in"])
    assert torch.equal(second[0][0], kept["second"][0][0]) and second[1] == {}
    assert torch.equal(clamp, kept["clamp"])
    assert torch.equal(out, expected)
    assert_no_hooks(model)
    assert source_mod._LIVE == {}


def test_writes_equal_the_same_write_by_hand():
    model = net()
    x = x4()

    @intervene
    def write(model, x):
        with model.trace(x):
            model.source.fc_0.output[:, 0] = 0          # in place
            model.source.fc_1.input = model.source.fc_1.input * 3  # assignment
            model.source.clamp_0.output += 1            # augmented
            out = model.output.save()
        return out

    m = model._module
    h = m.fc(x)
    h[:, 0] = 0
    h = torch.relu(h)
    h = m.fc(h * 3) * 2.0
    h = h.clamp(-5, 5) + 1
    h = h.clamp(-5, 5)
    assert torch.equal(write(model, x), m.out(h + 1))
    assert torch.equal(model(x), m.out(m.fc(torch.relu(m.fc(x))).mul(2).clamp(-5, 5) + 1))
    assert_no_hooks(model)


def test_attention_head_read_and_zeroed_equal_a_patch_of_the_attention_function():
    model = eager_llama()
    head = 1

    @intervene
    def zero_head(model, ids, head):
        with model.trace(ids):
            weights = model.model.layers[0].self_attn.source.attention_interface_0.output[1][:, head].save()
            model.model.layers[0].self_attn.source.attention_interface_0.output[0][:, :, head] = 0
            logits = model.lm_head.output.save()
        return weights, logits

    weights, logits = zero_head(model, IDS, head)
    attn0 = model.model.layers[0].self_attn._module
    seen = {}
    original = llama.eager_attention_forward

    def patched(module, *args, **kwargs):
        out, w = original(module, *args, **kwargs)
        if module is attn0:
            seen["w"] = w[:, head].clone()
            out[:, :, head] = 0
        return out, w

    llama.eager_attention_forward = patched
    try:
        expected = model._module(IDS).logits
    finally:
        llama.eager_attention_forward = original
    assert torch.equal(weights, seen["w"])
    assert torch.equal(logits, expected)
    assert not torch.equal(logits, model._module(IDS).logits)  # the write did change them
    assert_no_hooks(model)


def test_mlp_read_and_write_equal_a_monkeypatched_forward():
    model = eager_llama()

    @intervene
    def edit(model, ids):
        with model.trace(ids):
            gate = model.model.layers[1].mlp.source.gate_proj_0.output.save()
            model.model.layers[1].mlp.source.act_fn_0.output[..., :8] = 0
            up = model.model.layers[1].mlp.source.up_proj_0.output.clone().save()
            logits = model.lm_head.output.save()
        return gate, up, logits

    gate, up, logits = edit(model, IDS)
    mlp = model.model.layers[1].mlp._module
    kept = {}

    def forward(self, x):  # LlamaMLP.forward, edited by hand
        g = self.gate_proj(x)
        kept["gate"] = g
        a = self.act_fn(g)
        a[..., :8] = 0
        u = self.up_proj(x)
        kept["up"] = u.clone()
        return self.down_proj(a * u)

    mlp.forward = types.MethodType(forward, mlp)
    try:
        expected = model._module(IDS).logits
    finally:
        del mlp.forward
    assert torch.equal(gate, kept["gate"]) and torch.equal(up, kept["up"])
    assert torch.equal(logits, expected)
    assert_no_hooks(model)


def test_only_the_named_module_gets_the_rewritten_forward_and_only_for_the_trace():
    model = eager_llama()
    before = llama.LlamaAttention.forward
    seen = []

    def look(mod, args, kwargs):
        seen.append((mod.layer_idx, "forward" in mod.__dict__))

    handles = [layer.self_attn._module.register_forward_pre_hook(look, with_kwargs=True)
               for layer in model.model.layers]

    @intervene
    def one(model, ids):
        with model.trace(ids):
            o = model.model.layers[1].self_attn.source.o_proj_0.output.save()
        return o

    one(model, IDS)
    for h in handles:
        h.remove()
    assert seen == [(0, False), (1, True)]
    assert_no_hooks(model)
    assert llama.LlamaAttention.forward is before
    # Rewritten once per class: both layers' `.source` share it.
    assert (model.model.layers[0].self_attn.source._rewritten
            is model.model.layers[1].self_attn.source._rewritten
            is source_mod.rewritten(llama.LlamaAttention, "x"))
    rewritten = source_mod.rewritten(llama.LlamaAttention, "x").forward
    assert inspect.unwrap(rewritten).__code__.co_filename == llama.__file__
    assert inspect.unwrap(rewritten).__code__.co_firstlineno == inspect.unwrap(before).__code__.co_firstlineno


# -- order ---------------------------------------------------------------------------------


def test_call_sites_in_the_wrong_order_are_refused_before_the_run():
    model = eager_llama()
    ran = []
    handle = model._module.register_forward_pre_hook(lambda *a: ran.append(1))

    @intervene
    def wrong(model, ids):
        with model.trace(ids):
            o = model.model.layers[0].self_attn.source.o_proj_0.output.save()
            q = model.model.layers[0].self_attn.source.q_proj_0.output.save()
        return o, q

    with pytest.raises(OutOfOrderError, match=r"source\.q_proj_0\.output` \(line \d+\) is asked "
                                              r"for after `model\.model\.layers\[0\]\.self_attn\."
                                              r"source\.o_proj_0\.output`"):
        wrong(model, IDS)
    handle.remove()
    assert ran == []
    assert_no_hooks(model)


def test_order_between_sites_their_module_and_other_modules():
    model = eager_llama()

    @intervene
    def good(model, ids):
        with model.trace(ids):
            a = model.model.layers[0].self_attn.input.save()
            q = model.model.layers[0].self_attn.source.q_proj_0.output.save()
            w = model.model.layers[0].self_attn.source.attention_interface_0.output[0].save()
            o = model.model.layers[0].self_attn.output[0].save()
            d = model.model.layers[1].mlp.source.down_proj_0.output.save()
        return a, q, w, o, d

    a, q, w, o, d = good(model, IDS)
    assert q.shape == (1, 6, 32) and d.shape == (1, 6, 32) and a.shape == (1, 6, 32)
    assert w.shape == (1, 6, 4, 8) and o.shape == (1, 6, 32)

    @intervene
    def late(model, ids):
        with model.trace(ids):
            o = model.model.layers[1].output.save()
            q = model.model.layers[0].self_attn.source.q_proj_0.output.save()
        return o, q

    with pytest.raises(OutOfOrderError, match=r"layers\[0\]\.self_attn\.source\.q_proj_0\.output"):
        late(model, IDS)

    @intervene
    def nested(model, ids):  # the inner call runs first: act_fn's input is gate_proj's output
        with model.trace(ids):
            g = model.model.layers[0].mlp.source.gate_proj_0.output.save()
            a = model.model.layers[0].mlp.source.act_fn_0.input.save()
            u = model.model.layers[0].mlp.source.up_proj_0.output.save()
            dn = model.model.layers[0].mlp.source.down_proj_0.input.save()
        return g, a, u, dn

    g, a, u, dn = nested(model, IDS)
    mlp = model.model.layers[0].mlp._module
    assert torch.equal(g, a) and torch.equal(dn, mlp.act_fn(g) * u)
    assert_no_hooks(model)


def test_dynamic_paths_and_loops_over_layers():
    model = eager_llama()

    @intervene
    def every(model, ids):
        outs = []
        with model.trace(ids):
            for layer in model.model.layers:
                outs.append(layer.self_attn.source.o_proj_0.output.save())
        return outs

    outs = every(model, IDS)
    attns = [layer.self_attn._module for layer in model.model.layers]
    kept = []
    handles = [a.o_proj.register_forward_hook(lambda m, i, o: kept.append(o)) for a in attns]
    model._module(IDS)
    for h in handles:
        h.remove()
    assert len(outs) == 2 and all(torch.equal(a, b) for a, b in zip(outs, kept))
    assert_no_hooks(model)


def test_call_sites_out_of_order_found_while_running():
    model = eager_llama()

    @intervene
    def wrong(model, ids):
        with model.trace(ids):
            for layer in model.model.layers[:1]:  # a variable path: known only while running
                o = layer.self_attn.source.o_proj_0.output.save()
                q = layer.self_attn.source.q_proj_0.output.save()
        return o, q

    with pytest.raises(OutOfOrderError, match=r"`model\.model\.layers\[0\]\.self_attn\.source\."
                                              r"q_proj_0\.output` is asked for at line \d+, after "
                                              r"the model had already run"):
        wrong(model, IDS)
    assert_no_hooks(model)


def test_inputs_assigned_and_shapes_in_a_scan():
    model = net()
    x = x4()

    @intervene
    def inputs(model, x):
        with model.trace(x):
            args, kwargs = model.source.out_0.inputs
            model.source.out_0.inputs = ((args[0] * 0,), kwargs)
            out = model.output.save()
        return out

    assert torch.equal(inputs(model, x), model._module.out.bias.expand(3, 2))

    @intervene
    def shapes(model, x):
        with model.scan(x):
            shape = model.source.fc_1.output.shape.save()
        return shape

    assert tuple(shapes(model, x)) == (3, 4)
    assert_no_hooks(model)


def test_variable_paths_asked_for_during_the_call_that_holds_them():
    model = eager_llama()

    @intervene
    def during(model, ids):
        downs, attns = [], []
        with model.trace(ids):
            for layer in model.model.layers:
                n = layer.source.input_layernorm_0.output  # the layer has not started yet
                g = layer.mlp.source.gate_proj_0.output  # noqa: F841 - in down_proj_0's arguments
                downs.append(layer.mlp.source.down_proj_0.input.save())
        with model.trace(ids):
            for layer in model.model.layers[:1]:
                n = layer.source.input_layernorm_0.output  # noqa: F841
                q = layer.self_attn.q_proj.output  # noqa: F841 - inside the layer's self_attn_0
                attns.append(layer.source.self_attn_0.output[0].save())
        return downs, attns

    downs, attns = during(model, IDS)
    kept = {"down": [], "attn": []}
    handles = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda m, a: kept["down"].append(a[0])) for layer in model._module.model.layers]
    handles.append(model._module.model.layers[0].self_attn.register_forward_hook(
        lambda m, a, out: kept["attn"].append(out[0])))
    model._module(IDS)
    for h in handles:
        h.remove()
    assert len(downs) == 2 and all(torch.equal(a, b) for a, b in zip(downs, kept["down"]))
    assert torch.equal(attns[0], kept["attn"][0])
    assert_no_hooks(model)


# -- invokes, gradients, generation ---------------------------------------------------------


def test_invokes_see_their_own_rows():
    model = eager_llama()

    @intervene
    def rows(model, a, b):
        with model.trace() as tracer:
            with tracer.invoke(a):
                first = model.model.layers[0].mlp.source.act_fn_0.output.save()
            with tracer.invoke(b):
                model.model.layers[0].mlp.source.act_fn_0.output[:] = 0
                second = model.model.layers[0].mlp.source.act_fn_0.output.save()
                logits = model.lm_head.output.save()
        return first, second, logits

    first, second, logits = rows(model, TWO[:1], TWO[1:])
    mlp = model.model.layers[0].mlp._module
    kept = []
    original = mlp.act_fn.forward

    def act(x):
        out = original(x)
        kept.append(out.clone())
        out[1:] = 0
        return out

    mlp.act_fn.forward = act
    try:
        expected = model._module(TWO).logits[1:]
    finally:
        del mlp.act_fn.forward
    assert torch.equal(first, kept[0][:1])
    assert first.shape[0] == 1 and torch.count_nonzero(second) == 0
    assert torch.equal(logits, expected)
    assert_no_hooks(model)


def test_gradient_of_a_call_site_value_equals_retain_grad():
    model = eager_llama()

    @intervene
    def grad(model, ids):
        with model.trace(ids):
            w = model.model.layers[0].self_attn.source.attention_interface_0.output[0]
            w.requires_grad = True
            loss = model.lm_head.output[0, -1, 5]
            with loss.backward():
                g = w.grad.save()
        return g

    g = grad(model, IDS)
    attn0 = model.model.layers[0].self_attn._module
    kept = {}
    original = llama.eager_attention_forward

    def patched(module, *args, **kwargs):
        out, wts = original(module, *args, **kwargs)
        if module is attn0:
            out.requires_grad_(True)
            out.retain_grad()
            kept["out"] = out
        return out, wts

    llama.eager_attention_forward = patched
    try:
        model._module(IDS).logits[0, -1, 5].backward()
    finally:
        llama.eager_attention_forward = original
    assert torch.allclose(g, kept["out"].grad, atol=0, rtol=0)
    assert_no_hooks(model)


def test_every_generation_step():
    model = eager_llama()

    @intervene
    def steps(model, ids):
        outs = []
        with model.generate(ids, max_new_tokens=3, do_sample=False) as tracer:  # noqa: SIM117
            with tracer.all():
                outs.append(model.model.layers[0].self_attn.source.o_proj_0.output[:, -1].save())
        return outs, tracer.result

    outs, tokens = steps(model, IDS)
    kept = []
    h = model.model.layers[0].self_attn._module.o_proj.register_forward_hook(
        lambda m, i, o: kept.append(o[:, -1]))
    plain = model._module.generate(IDS, max_new_tokens=3, do_sample=False)
    h.remove()
    assert torch.equal(tokens, plain)
    assert len(outs) == 3 and all(torch.equal(a, b) for a, b in zip(outs, kept))

    @intervene
    def both(model, ids):  # a call's input, then its output, at every step
        ins, outs = [], []
        with model.generate(ids, max_new_tokens=3, do_sample=False) as tracer:  # noqa: SIM117
            with tracer.all():
                ins.append(model.model.layers[1].mlp.source.down_proj_0.input[:, -1].save())
                model.model.layers[1].mlp.source.down_proj_0.output[:, -1] *= 2
                outs.append(model.model.layers[1].mlp.source.down_proj_0.output[:, -1].save())
        return ins, outs, tracer.result

    ins, outs, tokens = both(model, IDS)
    down = model.model.layers[1].mlp._module.down_proj
    assert len(ins) == len(outs) == 3
    assert all(torch.allclose(o, down(i) * 2, atol=1e-6) for i, o in zip(ins, outs))
    seen = []

    def double(m, a, out):
        seen.append(a[0][:, -1])
        out[:, -1] *= 2

    h = down.register_forward_hook(double)
    plain = model._module.generate(IDS, max_new_tokens=3, do_sample=False)
    h.remove()
    assert torch.equal(tokens, plain)
    assert all(torch.equal(a, b) for a, b in zip(ins, seen))
    assert_no_hooks(model)


# -- errors, clean-up, tracebacks -------------------------------------------------------------


def test_a_call_site_that_never_runs_and_an_error_leave_nothing():
    model = net()

    @intervene
    def missed(model, x):
        with model.trace(x):  # flag is False: tanh is not called
            t = model.source.tanh_0.output.save()
        return t

    with pytest.raises(MissedCheckpointError, match=r"`model\.source\.tanh_0\.output` is asked "
                                                    r"for at line \d+, but `model\.source\.tanh_0` "
                                                    r"did not run"):
        missed(model, x4())
    assert_no_hooks(model)
    assert source_mod._LIVE == {}

    @intervene
    def fails(model, x):
        with model.trace(x):
            model.source.fc_0.output[99] = 0

    with pytest.raises(IndexError):
        fails(model, x4())
    assert_no_hooks(model)
    assert source_mod._LIVE == {}


def _fail(y):
    raise ValueError("boom")


class Raises(torch.nn.Module):
    def forward(self, x):
        y = torch.relu(x)
        if y.sum() > 1e9:
            raise ValueError("huge")
        return _fail(y)  # the line a traceback must show


def test_traceback_points_at_the_real_file_and_line():
    model = NNsight(Raises())

    @intervene
    def run(model, x):
        with model.trace(x):
            r = model.source.relu_0.output.save()
        return r

    with pytest.raises(ValueError, match="boom") as info:
        run(model, x4())
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].name == "_fail"
    forward = next(f for f in frames if f.name == "forward" and f.filename == __file__)
    assert forward.filename == __file__ and forward.name == "forward"
    assert forward.lineno == inspect.getsourcelines(Raises.forward)[1] + 4
    assert forward.line == "return _fail(y)  # the line a traceback must show"
    # The line holds a rewritten call: shown whole, without carets under wrong columns.
    text = "".join(traceback.format_exception(info.value)).splitlines()
    at = text.index("    return _fail(y)  # the line a traceback must show")
    assert "^" not in text[at + 1]
    assert_no_hooks(model)


def test_show_plan_lists_call_sites_like_modules(tmp_path, capsys):
    from compiler.__main__ import main as cli_main

    path = tmp_path / "heads.py"
    path.write_text(textwrap.dedent('''\
        from compiler import intervene

        @intervene
        def heads(model, ids):
            with model.trace(ids):
                w = model.model.layers[0].self_attn.source.attention_interface_0.output[1].save()
                model.model.layers[0].self_attn.source.o_proj_0.output[:] = 0
            return w
    '''))
    assert cli_main(["show-plan", str(path)]) in (0, None)
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.split() == ["0", "6", "model.model.layers[0].self_attn.source.attention_interface_0",
                              "output", "read", "save"] for ln in lines), lines
    assert any(ln.split() == ["1", "7", "model.model.layers[0].self_attn.source.o_proj_0", "output",
                              "inplace"] for ln in lines), lines


ARCHITECTURES = {
    "gpt2": {"vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
    "t5": {"vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
           "num_decoder_layers": 2, "num_heads": 4, "decoder_start_token_id": 0,
           "pad_token_id": 0, "eos_token_id": 1},
    "bert": {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64},
}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_module_rewritten_at_once_changes_nothing(model_type):
    """Every module's rewritten forward installed (no call site waited for): the same
    output to the bit, and nothing left after."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **ARCHITECTURES[model_type])
    auto = {"gpt2": transformers.AutoModelForCausalLM, "t5": transformers.AutoModelForSeq2SeqLM,
            "bert": transformers.AutoModel}[model_type]
    torch.manual_seed(0)
    hf = auto.from_config(config).eval()
    kwargs = {"input_ids": IDS, **({"decoder_input_ids": IDS[:, :3]} if model_type == "t5" else {})}
    expected = hf(**kwargs)[0]
    model = NNsight(hf)

    trace = types.SimpleNamespace(attached={}, fired=set())  # what `_install` needs of a trace

    count = 0
    for name, module in hf.named_modules():
        env = model
        for part in name.split(".") if name else ():
            env = env[int(part)] if part.isdigit() else getattr(
                env, part + "_" if part in ("output", "input", "inputs") else part)
        source_mod._install(trace, env.source)
        count += 1
    assert count == len(list(hf.modules()))
    assert all("forward" in m.__dict__ for m in hf.modules())
    try:
        assert torch.equal(hf(**kwargs)[0], expected)
    finally:
        for undo in reversed(list(trace.attached.values())):
            undo.remove()
    assert_no_hooks(model)
    assert source_mod._LIVE == {}


# -- the default model -------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_attention_weights_of_one_head():
    # The README's example, against the same read and write patched into the attention
    # function by hand.
    model = LanguageModel("smollm2-135m", attn_implementation="eager")
    prompt = "The Eiffel Tower is in the city of"

    @intervene
    def head_off(model, prompt, layer, head):
        with model.trace(prompt):
            weights = model.model.layers[layer].self_attn.source.attention_interface_0.output[1][:, head].save()
            model.model.layers[layer].self_attn.source.attention_interface_0.output[0][:, :, head] = 0
            logits = model.lm_head.output[:, -1].save()
        return weights, logits

    weights, logits = head_off(model, prompt, 2, 3)
    hf = model._module
    attn = hf.model.layers[2].self_attn
    kept = {}
    original = llama.eager_attention_forward

    def patched(module, *args, **kwargs):
        out, w = original(module, *args, **kwargs)
        if module is attn:
            kept["w"] = w[:, 3].clone()
            out[:, :, 3] = 0
        return out, w

    ids = model.tokenizer(prompt, return_tensors="pt")
    llama.eager_attention_forward = patched
    try:
        expected = hf(**ids).logits[:, -1]
    finally:
        llama.eager_attention_forward = original
    assert weights.shape == (1, ids["input_ids"].shape[1], ids["input_ids"].shape[1])
    assert torch.allclose(weights.sum(-1), torch.ones(1, ids["input_ids"].shape[1]))
    assert torch.equal(weights, kept["w"]) and torch.equal(logits, expected)
    assert not torch.equal(logits, hf(**ids).logits[:, -1])
    assert_no_hooks(model)
