"""What nnsight users type: ``save(x)``, ``import intervene``, loading keywords, hub ids,
double wrapping, ``rename=``, invokers' inputs, streamers, sessions, ``skip`` and ``edit``
(issue 13, runtime side).  Tiny models only; offline."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compiler import intervene
from runtime import LanguageModel, NNsight, save
from runtime.models import tiny_llama, tiny_mlp

ROOT = Path(__file__).resolve().parent.parent


# -- save(x) ------------------------------------------------------------------------


def test_save_function_is_exported_and_returns_its_value():
    import runtime

    assert runtime.save is save
    x = torch.ones(2)
    assert save(x) is x


def test_save_function_inside_a_block_keeps_the_value():
    net = tiny_mlp()
    model = NNsight(net)

    @intervene
    def f(model, x):
        with model.trace(x):
            h = save(model.layers[0].output)
        return h

    x = torch.randn(3, 8)
    assert torch.equal(f(model, x), net.layers[0](x))


# -- import intervene ----------------------------------------------------------------


def test_import_intervene_is_cheap_and_exports_the_api():
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            import sys
            import intervene
            assert "torch" not in sys.modules, "import intervene loaded torch"
            from intervene import intervene as iv, CompileError, CONFIG
            import compiler, runtime
            assert iv is compiler.intervene and CompileError is compiler.CompileError
            assert CONFIG is runtime.CONFIG
            from intervene import LanguageModel, NNsight, OutOfOrderError, save
            from intervene import MissedCheckpointError
            assert save is runtime.save and NNsight is runtime.NNsight
            print("ok", sorted(dir(intervene)))
        """)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_import_intervene_is_not_shadowed_by_a_users_runtime_py(tmp_path):
    (tmp_path / "runtime.py").write_text("print('USER RUNTIME RAN')\nMINE = 1\n")
    (tmp_path / "compiler.py").write_text("print('USER COMPILER RAN')\nMINE = 2\n")
    (tmp_path / "script.py").write_text(textwrap.dedent("""
        import torch
        from intervene import intervene, NNsight, save
        from runtime.models import tiny_mlp
        net = tiny_mlp()
        model = NNsight(net)

        @intervene
        def f(model, x):
            with model.trace(x):
                h = model.layers[0].output.save()
            return h

        x = torch.randn(2, 8)
        print("equal", torch.equal(f(model, x), net.layers[0](x)))
    """))
    out = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "equal True" in out.stdout
    assert "USER" not in out.stdout  # the user's files were never run by `import intervene`
    # `import runtime` itself finds the user's file first: `intervene` is the safe import.
    (tmp_path / "script.py").write_text("import runtime\nprint('mine', runtime.MINE)\n")
    out = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=False)
    assert "mine 1" in out.stdout


# -- loading keywords ---------------------------------------------------------------


def _param_dtype(lm):
    return next(lm._module.parameters()).dtype


def test_torch_dtype_is_dtype():
    assert _param_dtype(LanguageModel(tiny_llama(0), torch_dtype=torch.bfloat16)) == torch.bfloat16
    assert _param_dtype(LanguageModel(tiny_llama(0), torch_dtype="float16")) == torch.float16
    with pytest.raises(ValueError, match="both dtype=torch.float32 and torch_dtype='float16'"):
        LanguageModel(tiny_llama(0), dtype=torch.float32, torch_dtype="float16")


def test_torch_dtype_on_a_folder_is_honoured_and_stays_lazy(tmp_path):
    _save_tiny(tmp_path)
    lm = LanguageModel(str(tmp_path), torch_dtype=torch.bfloat16, device_map="auto")
    assert next(lm._module.parameters()).is_meta  # still lazy: device_map="auto" on a CPU
    assert _param_dtype(lm) == torch.bfloat16
    lm._load()
    want = tiny_llama(0).lm_head.weight.to(torch.bfloat16)
    assert torch.equal(lm._module.lm_head.weight, want)


def test_dispatch_and_device_map_on_a_built_model():
    net = tiny_llama(0)
    for kwargs in ({"dispatch": True}, {"device_map": "cpu"}, {"device_map": "auto"},
                   {"device_map": torch.device("cpu"), "dispatch": True}):
        lm = LanguageModel(net, **kwargs)
        assert lm._module is net and next(net.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="cannot be split over devices"):
        LanguageModel(net, device_map={"": 0})
    with pytest.raises(ValueError, match="'xyz' is not a device"):
        LanguageModel(net, device_map="xyz")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            LanguageModel(net, device_map="cuda:0")


# -- models from the Hugging Face hub (offline: a cache laid out as the hub's) ---------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(20)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def _save_tiny(folder: Path) -> None:
    tiny_llama(0).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)


def test_hub_id_loads_from_the_hub_cache_offline(tmp_path):
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--intervene-tests--tiny-llama"
    _save_tiny(repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    script = textwrap.dedent("""
        import torch
        from intervene import LanguageModel, intervene
        from runtime.models import tiny_llama

        lm = LanguageModel("intervene-tests/tiny-llama")
        @intervene
        def f(lm):
            with lm.trace("w1 w2 w3"):
                logits = lm.lm_head.output.save()
            return logits
        ids = lm.tokenizer("w1 w2 w3", return_tensors="pt")["input_ids"]
        want = tiny_llama(0)(ids).logits
        print("equal", torch.equal(f(lm), want), ids.tolist())
        try:
            LanguageModel("intervene-tests/not-cached")
        except FileNotFoundError as err:
            print("error:", err)
    """)
    (tmp_path / "script.py").write_text(script)
    out = subprocess.run([sys.executable, "script.py"], capture_output=True, text=True,
                         timeout=180, cwd=tmp_path, check=False,
                         env={**os.environ, "HF_HOME": str(tmp_path / "hf"),
                              "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "equal True [[5, 6, 7]]" in out.stdout
    assert ("error: cannot load model 'intervene-tests/not-cached': it is not a local folder "
            "and not in the local Hugging Face cache") in out.stdout
    assert "downloading is off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)" in out.stdout


# -- wrapping twice ---------------------------------------------------------------------


@intervene
def _layer1(model, x):
    with model.trace(x):
        h = model.layers[1].output.save()
    return h


def test_nnsight_of_nnsight_wraps_the_module():
    net = tiny_mlp()
    x = torch.randn(2, 8)
    twice = NNsight(NNsight(net))
    assert twice._module is net
    assert torch.equal(_layer1(twice, x), net.layers[1](torch.relu(net.layers[0](x))))
    part = NNsight(NNsight(net).layers[1])  # a part of a wrapper
    assert part._module is net.layers[1]


@intervene
def _lm_layer(model, ids):
    with model.trace(ids):
        h = model.model.layers[0].output.save()
    return h


def test_language_model_of_language_model_keeps_tokenizer_and_lazy_load(tmp_path):
    _save_tiny(tmp_path)
    inner = LanguageModel(str(tmp_path))
    outer = LanguageModel(inner)
    assert outer._module is inner._module and outer.tokenizer is inner.tokenizer
    assert outer._pending is not None  # still not loaded
    ids = torch.tensor([[5, 6, 7]])
    want = _lm_layer(LanguageModel(tiny_llama(0)), ids)
    assert torch.equal(_lm_layer(outer, ids), want)
    assert torch.equal(_lm_layer(NNsight(outer), ids), want)  # NNsight of a LanguageModel


def test_wrapping_something_else_is_a_clear_error():
    with pytest.raises(TypeError, match="NNsight wraps a torch.nn.Module, got int"):
        NNsight(3)


# -- rename= ------------------------------------------------------------------------------


@intervene
def _renamed(model, ids):
    with model.trace(ids):
        a = model.layers[0].output.save()
        b = model.model.layers[1].attn.output[0].save()
        model.layers[1].mlp.output[:] = 0
        d = model.model.layers[1].output.save()
        c = model.model.final_norm.output.save()
    return a, b, c, d


def test_rename_aliases_module_paths_in_and_out_of_blocks():
    net = tiny_llama(0)
    lm = LanguageModel(net, rename={"model.layers": "layers", "self_attn": "attn",
                                    "model.norm": "model.final_norm"})
    assert lm.layers is lm.model.layers and lm.layers[0] is lm.model.layers[0]
    assert lm.model.layers[1].attn is lm.model.layers[1].self_attn
    assert lm.model.final_norm._path == "model.model.norm"  # messages name the real path
    ids = torch.tensor([[5, 6, 7]])
    a, b, c, d = _renamed(lm, ids)
    got = {}
    handles = [
        net.model.layers[0].register_forward_hook(lambda m, i, o: got.__setitem__("a", o)),
        net.model.layers[1].self_attn.register_forward_hook(
            lambda m, i, o: got.__setitem__("b", o[0])),
        net.model.layers[1].mlp.register_forward_hook(lambda m, i, o: torch.zeros_like(o)),
        net.model.layers[1].register_forward_hook(lambda m, i, o: got.__setitem__("d", o)),
        net.model.norm.register_forward_hook(lambda m, i, o: got.__setitem__("c", o)),
    ]
    try:
        net(ids)
    finally:
        for h in handles:
            h.remove()
    for name, value in zip("abcd", (a, b, c, d)):
        assert torch.equal(value, got[name]), name


def test_rename_errors():
    with pytest.raises(ValueError, match="has no module `model.layer` \\(did you mean `model.layers`"):
        LanguageModel(tiny_llama(0), rename={"model.layer": "layers"})
    with pytest.raises(ValueError, match="no module has a child named `attention`"):
        NNsight(tiny_mlp(), rename={"attention": "attn"})
    with pytest.raises(ValueError, match="`x-y` is not a name"):
        NNsight(tiny_mlp(), rename={"layers": "x-y"})


# -- sessions --------------------------------------------------------------------------------


@intervene
def _session(model, x):
    with model.session() as session:
        with model.trace(x):
            a = model.layers[0].output.save()
        with model.trace(x):
            model.layers[0].output = a * 2  # a value of the first trace
            b = model.layers[1].output.save()
    return session, a, b


def test_session_groups_traces_and_values_flow_between_them():
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.randn(3, 8)
    session, a, b = _session(model, x)
    assert repr(session) == "<Session of model>"
    assert torch.equal(a, net.layers[0](x))
    assert torch.equal(b, net.layers[1](torch.relu(2 * net.layers[0](x))))


def test_session_errors():
    model = NNsight(tiny_mlp())
    with pytest.raises(RuntimeError, match="has no name a server could know it by"):  # noqa: SIM117
        with model.session(remote=True):  # one request (a model built here has no name)
            pass
    with pytest.raises(TypeError, match="takes no keywords but remote=; got foo"):
        model.session(foo=1)


# -- skip ------------------------------------------------------------------------------------


def _plain(net, x, replace=None):
    """The TinyMLP's forward by hand; ``replace``: {layer index: output}."""
    replace = replace or {}
    for i, layer in enumerate(net.layers):
        x = torch.relu(replace[i] if i in replace else layer(x))
    return net.head(x)


@intervene
def _skip_layer(model, x, v):
    with model.trace(x):
        model.layers[1].skip(v)
        got = model.layers[1].output.save()
        out = model.output.save()
    return got, out


@intervene
def _skip_with_earlier_value(model, x):
    with model.trace(x):
        h = model.layers[0].output
        model.layers[2].skip(h * 3)
        out = model.output.save()
    return out


def test_skip_replaces_a_modules_output_without_running_it():
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.randn(3, 8)
    v = torch.randn(3, 8)
    calls = []
    handle = net.layers[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    forward_calls = []
    real = type(net.layers[1]).forward

    def counting(self, inp):
        forward_calls.append(1)
        return real(self, inp)

    net.layers[1].forward = counting.__get__(net.layers[1])
    try:
        got, out = _skip_layer(model, x, v)
    finally:
        handle.remove()
        del net.layers[1].forward
    assert torch.equal(got, v)
    assert torch.equal(out, _plain(net, x, {1: v}))
    assert calls == [1] and forward_calls == []  # hooks fire; the forward did not run
    assert "forward" not in net.layers[1].__dict__  # nothing left on the module
    # a value read earlier in the same pass works too
    h = net.layers[0](x)
    assert torch.equal(_skip_with_earlier_value(model, x), _plain(net, x, {2: h * 3}))
    # and the next trace runs the module again
    got, out = _layer1(model, x), _plain(net, x)
    assert torch.equal(got, net.layers[1](torch.relu(net.layers[0](x))))


@intervene
def _skip_too_late(model, x, v):
    with model.trace(x):
        h = model.layers[2].output.save()
        model.layers[1].skip(v)
    return h


def test_skip_after_the_module_ran_is_an_out_of_order_error():
    from runtime import OutOfOrderError

    model = NNsight(tiny_mlp())
    x = torch.randn(3, 8)
    _layer1(model, x)  # the model's order is known after a first trace
    with pytest.raises(OutOfOrderError, match=r"`model\.layers\[1\]\.skip\(value\)` is asked for at "
                       r"line \d+, but the model is already past its start \(it is now at "
                       r"`model\.layers\[2\]\.output`\)"):
        _skip_too_late(model, x, torch.zeros(3, 8))
    assert "forward" not in model.layers[1]._module.__dict__


def test_skip_outside_a_trace_is_an_error():
    model = NNsight(tiny_mlp())
    with pytest.raises(RuntimeError, match=r"works only inside a trace block of its model"):
        model.layers[1].skip(torch.zeros(1))


@intervene
def _skip_in_invoke(model, x1, x2, v):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            model.layers[1].skip(v)
            a = model.output.save()
        with tracer.invoke(x2):
            b = model.output.save()
    return a, b


def test_skip_in_an_invoke_replaces_its_rows_only():
    net = tiny_mlp()
    x1, x2, v = torch.randn(2, 8), torch.randn(3, 8), torch.randn(2, 8)
    a, b = _skip_in_invoke(NNsight(net), x1, x2, v)
    assert torch.allclose(a, _plain(net, x1, {1: v}), atol=1e-6)
    assert torch.allclose(b, _plain(net, x2), atol=1e-6)


# -- invoker.inputs ----------------------------------------------------------------------


def test_invoker_inputs_is_the_encoded_input():
    from runtime.tracer import InvokeSpec

    lm = LanguageModel(tiny_llama(0), tokenizer=_tiny_tokenizer())
    args, kwargs = InvokeSpec(("w1 w2",), {}, lm).inputs
    assert args == ()
    assert kwargs["input_ids"].tolist() == [[5, 6]]
    assert kwargs["attention_mask"].tolist() == [[1, 1]]
    x = torch.randn(2, 8)
    args, kwargs = InvokeSpec((x,), {}, NNsight(tiny_mlp())).inputs
    assert args[0] is x and kwargs == {}
    assert InvokeSpec((), {}, lm).inputs == ((), {})  # an invoke without input


# -- model.generator.streamer -----------------------------------------------------------------


@intervene
def _stream(model, ids, n, streamer):
    with model.generate(ids, max_new_tokens=n, do_sample=False, streamer=streamer) as tracer:
        steps = [].save()
        with tracer.all():
            steps.append(model.generator.streamer.output)
        tokens = model.generator.output.save()
    return steps, tokens


def test_streamer_output_is_each_steps_new_tokens_and_a_users_streamer_gets_them():
    net = tiny_llama(0)
    lm = LanguageModel(net, tokenizer=_tiny_tokenizer())
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])

    class Collect:
        def __init__(self):
            self.got, self.ended = [], False

        def put(self, value):
            self.got.append(value.clone())

        def end(self):
            self.ended = True

    mine = Collect()
    steps, tokens = _stream(lm, ids, 4, mine)
    want = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                        do_sample=False)
    assert torch.equal(tokens, want)
    assert len(steps) == 4
    for k, step in enumerate(steps):
        assert torch.equal(step, want[:, 3 + k])
    assert mine.ended and torch.equal(mine.got[0], ids)  # the prompt first, as transformers
    assert [t.tolist() for t in mine.got[1:]] == [s.tolist() for s in steps]


# -- model.edit() (the runtime side; the compiler emits this code for edit blocks) --------------


@intervene
def _edit_plan(model, x):
    with model.trace(x):  # only its plan is used: the edit block's checkpoints
        model.layers[0].output[:] = 0


@intervene
def _edit(model, inplace=False):
    """``with model.edit() as edited:`` compiled (an edit block)."""
    if inplace:
        with model.edit(inplace=True) as edited:
            model.layers[0].output[:] = 0
    else:
        with model.edit() as edited:
            model.layers[0].output[:] = 0
    return edited


def test_edit_applies_to_every_later_trace_of_the_edited_model_only():
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.randn(3, 8)
    edited = _edit(model)
    assert edited is not model and edited._module is net
    zeroed = _plain(net, x, {0: torch.zeros(3, 8)})
    for _ in range(2):  # every trace, and the edit's lanes are made afresh each time
        assert torch.equal(_layer1(edited, x), net.layers[1](torch.zeros(3, 8)))
        assert torch.equal(_skip_layer(edited, x, torch.ones(3, 8))[1],
                           _plain(net, x, {0: torch.zeros(3, 8), 1: torch.ones(3, 8)}))
    assert torch.equal(_layer1(model, x), net.layers[1](torch.relu(net.layers[0](x))))
    assert torch.equal(net(x), _plain(net, x))  # plain calls: untouched
    assert "forward" not in net.layers[0].__dict__
    # an edit of the edited model keeps the first edit too
    twice = _edit(edited)
    assert len(twice._edits) == 2 and torch.equal(_session(twice, x)[2],
                                                  net.layers[1](torch.zeros(3, 8)))
    assert not torch.equal(zeroed, _plain(net, x))


def test_edit_inplace_and_clear_edits():
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.randn(3, 8)
    assert _edit(model, inplace=True) is model
    assert torch.equal(_layer1(model, x), net.layers[1](torch.zeros(3, 8)))
    model.clear_edits()
    assert torch.equal(_layer1(model, x), net.layers[1](torch.relu(net.layers[0](x))))


def test_edit_errors():
    from runtime import NotInTraceError
    from runtime.api import handle_for

    model = NNsight(tiny_mlp())
    with pytest.raises(NotInTraceError, match=r"`model.edit\(...\)` must be used as `with "
                       r"model.edit\(...\):` inside a function decorated with @intervene"):
        model.edit()
    with pytest.raises(AttributeError, match="`.edit\\(\\)` is a method of the whole model"):
        model.layers[0].edit  # noqa: B018
    iv = handle_for(_edit_plan.compiled.plan)
    with pytest.raises(TypeError, match="takes only inplace=True/False"):
        iv.block(model, "edit", 0, torch.zeros(1))


def test_two_wrappers_of_a_model_not_loaded_yet_load_it_once(tmp_path, monkeypatch):
    from runtime import language

    _save_tiny(tmp_path)
    inner = LanguageModel(str(tmp_path))
    outer = LanguageModel(inner)
    loads = []
    real = language.load_causal_lm
    monkeypatch.setattr(language, "load_causal_lm",
                        lambda *a, **k: loads.append(1) or real(*a, **k))
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(_lm_layer(outer, ids), _lm_layer(inner, ids))
    assert loads == [1] and inner._pending is None and outer._pending is None


@pytest.mark.slow
def test_torch_dtype_is_honoured_for_the_default_model():
    from runtime.models import DEFAULT_ALIAS

    lm = LanguageModel(DEFAULT_ALIAS, torch_dtype=torch.bfloat16)
    assert _param_dtype(lm) == torch.bfloat16  # the tree built without weights
    lm._load()
    assert {p.dtype for p in lm._module.parameters()} == {torch.bfloat16}
    assert _param_dtype(LanguageModel(DEFAULT_ALIAS)) == torch.float32  # the default stays


@intervene
def _remote_layer(model, x):
    with model.trace(x, remote=True):
        h = model.layers[1].output.save()
    return h


def test_an_edited_model_is_never_run_remotely_without_its_edits():
    edited = _edit(NNsight(tiny_mlp()))
    with pytest.raises(NotImplementedError, match="remote=True on an edited model"):
        _remote_layer(edited, torch.randn(2, 8))


@intervene
def _skip_while_running(model, x, v):
    with model.trace(x):
        h = model.layers[1].output.save()
        model.layers[1].skip(v)
    return h


def test_skip_of_the_module_being_served_is_an_error():
    from runtime import OutOfOrderError

    model = NNsight(tiny_mlp())
    with pytest.raises(OutOfOrderError, match=r"line \d+, but the module has already run: ask "
                       r"for a skip before the module runs"):
        _skip_while_running(model, torch.randn(2, 8), torch.zeros(2, 8))
    assert "forward" not in model.layers[1]._module.__dict__


@intervene
def _invokes_layer1(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            a = model.layers[1].output.save()
        with tracer.invoke(x2):
            b = model.layers[1].output.save()
    return a, b


def test_an_edit_applies_to_every_invoke_of_a_later_trace():
    net = tiny_mlp()
    edited = _edit(NNsight(net))
    x1, x2 = torch.randn(2, 8), torch.randn(1, 8)
    a, b = _invokes_layer1(edited, x1, x2)
    assert torch.equal(a, net.layers[1](torch.zeros(2, 8)))
    assert torch.equal(b, net.layers[1](torch.zeros(1, 8)))
