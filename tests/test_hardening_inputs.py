"""Issue 10, inputs and models: every input reaches the model or is refused by name.

Keyword inputs, dict keys beyond input_ids (BERT's token_type_ids, T5's
decoder_input_ids), unknown trace keywords, empty and out-of-vocabulary inputs,
unbatchable invokes, the wrapper's own methods (`.to()` ...), weak references and
`del model`, nnsight names we do not have, and a child module named `output`.
Tiny models built from configs only; values are compared with plain transformers.
"""

from __future__ import annotations

import gc
import traceback
import weakref
from pathlib import Path

import pytest
import torch
from support import assert_no_hooks, tiny_bert

from compiler import intervene
from runtime import LanguageModel, NNsight, NotInTraceError
from runtime.models import tiny_llama, tiny_mlp

IDS = torch.tensor([[5, 9, 17, 3, 40]])
OTHER = torch.tensor([[7, 8, 11]])


@pytest.fixture
def lm():
    model = LanguageModel(tiny_llama(0))
    yield model
    assert_no_hooks(model._module)


def plain(lm, **inputs):
    with torch.no_grad():
        return lm._module(**inputs).logits


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                      num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T5ForConditionalGeneration(config).eval()


def line_of(marker: str) -> int:
    """The line of this file that ends with ``marker``."""
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if text.endswith(marker))


def raised_at(exc_info, line: int) -> bool:
    """The traceback of ``exc_info`` passes through this file at ``line``."""
    frames = traceback.extract_tb(exc_info.tb)
    return any(f.filename == __file__ and f.lineno == line for f in frames)


# --------------------------------------------------------------------------------------
# 9. keyword inputs
# --------------------------------------------------------------------------------------


@intervene
def logits_kw(model, ids, mask):
    with model.trace(input_ids=ids, attention_mask=mask):
        logits = model.lm_head.output.save()
    return logits


@intervene
def logits_of(model, x):
    with model.trace(x):
        logits = model.lm_head.output.save()
    return logits


@intervene
def generate_kw(model, ids):
    with model.generate(input_ids=ids, max_new_tokens=3, do_sample=False) as tracer:
        pass
    return tracer.result


@intervene
def invokes_kw(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(input_ids=a):
            first = model.lm_head.output.save()
        with tracer.invoke(input_ids=b, attention_mask=torch.ones_like(b)):
            second = model.lm_head.output.save()
    return first, second


def test_trace_takes_keyword_inputs(lm):
    got = logits_kw(lm, IDS, torch.ones_like(IDS))
    assert torch.equal(got, plain(lm, input_ids=IDS))


def test_generate_takes_keyword_inputs(lm):
    tokens = generate_kw(lm, IDS)
    expected = lm._module.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS),
                                   max_new_tokens=3, do_sample=False)
    assert torch.equal(tokens, expected)


def test_invokes_take_keyword_inputs(lm):
    first, second = invokes_kw(lm, IDS, OTHER)
    assert torch.allclose(first, plain(lm, input_ids=IDS), atol=1e-5)
    assert torch.allclose(second[:, -1], plain(lm, input_ids=OTHER)[:, -1], atol=1e-5)


@intervene
def twice(model, ids):
    with model.trace(ids, input_ids=ids):
        logits = model.lm_head.output.save()
    return logits


@intervene
def mask_only(model, ids):
    with model.trace(attention_mask=torch.ones_like(ids)):
        logits = model.lm_head.output.save()
    return logits


@intervene
def options_only(model):
    with model.trace(output_attentions=True):
        logits = model.lm_head.output.save()
    return logits


@intervene
def embeds_only(model, embeds):
    with model.trace(inputs_embeds=embeds):
        logits = model.lm_head.output.save()
    return logits


def test_a_trace_of_options_only_asks_for_the_input(lm):
    with pytest.raises(TypeError) as info:
        options_only(lm)
    assert str(info.value).endswith("got none (only the keywords output_attentions)")


def test_inputs_embeds_alone_are_an_input(lm):
    embeds = lm._module.get_input_embeddings()(IDS)
    assert torch.equal(embeds_only(lm, embeds), plain(lm, inputs_embeds=embeds))


@intervene
def invoke_without_ids(model, a, d):
    with model.trace() as tracer:
        with tracer.invoke(a):
            first = model.lm_head.output.save()
        with tracer.invoke(decoder_input_ids=d):
            second = model.lm_head.output.save()
    return first, second


@intervene
def invokes_unlike(model, a, b, types):
    with model.trace() as tracer:
        with tracer.invoke({"input_ids": a, "token_type_ids": types}):
            first = model.encoder.layer[0].output.save()
        with tracer.invoke(b):
            second = model.encoder.layer[0].output.save()
    return first, second


def test_invoke_input_mistakes_are_named():
    t5 = LanguageModel(tiny_t5())
    with pytest.raises(TypeError, match=r"invoke 1 \(line \d+\): a LanguageModel trace takes one "
                       r"input .* got none \(only the keywords decoder_input_ids\)"):
        invoke_without_ids(t5, IDS, torch.tensor([[0, 4]]))
    bert = LanguageModel(tiny_bert())
    with pytest.raises(ValueError) as info:
        invokes_unlike(bert, IDS, OTHER, torch.zeros_like(IDS))
    assert "invoke 1 (line " in str(info.value)
    assert "differ from invoke 0 (line " in str(info.value)
    assert "(in ['token_type_ids'])" in str(info.value)


def test_invokes_pad_token_type_ids_with_the_tokens():
    bert = tiny_bert()
    types = torch.tensor([[0, 0, 1, 1, 1]])
    short, short_types = OTHER, torch.tensor([[0, 1, 1]])
    first, second = invokes_unlike_ok(LanguageModel(bert), IDS, types, short, short_types)
    with torch.no_grad():
        alone = bert(input_ids=short, token_type_ids=short_types).last_hidden_state
        full = bert(input_ids=IDS, token_type_ids=types).last_hidden_state
    first, second = (v[0] if isinstance(v, tuple) else v for v in (first, second))
    assert torch.allclose(first, full, atol=1e-5)
    # the short row is left-padded: its last 3 positions are the prompt alone
    assert second.shape == (1, 5, 32)
    assert torch.allclose(second[:, -3:], alone, atol=1e-5)


@intervene
def invokes_unlike_ok(model, a, ta, b, tb):
    with model.trace() as tracer:
        with tracer.invoke({"input_ids": a, "token_type_ids": ta}):
            first = model.encoder.layer[-1].output.save()
        with tracer.invoke({"input_ids": b, "token_type_ids": tb}):
            second = model.encoder.layer[-1].output.save()
    return first, second


def test_keyword_input_mistakes_are_named(lm):
    with pytest.raises(TypeError, match="given twice: positionally and as `input_ids=`"):
        twice(lm, IDS)
    with pytest.raises(TypeError, match="`attention_mask=` is given without `input_ids=`"):
        mask_only(lm, IDS)


# --------------------------------------------------------------------------------------
# 10. unknown trace keywords
# --------------------------------------------------------------------------------------


@intervene
def trace_with(model, ids, extra):
    with model.trace(ids, **extra):
        logits = model.lm_head.output.save()
    return logits


@intervene
def generate_with(model, ids):
    with model.generate(ids, max_new_tokens=2, do_sample=False, output_scores=False) as tracer:
        pass
    return tracer.result


def test_generation_settings_in_a_trace_are_refused(lm):
    with pytest.raises(TypeError) as info:
        trace_with(lm, IDS, {"max_new_tokens": 3})
    message = str(info.value)
    assert "LlamaForCausalLM.forward does not take `max_new_tokens`" in message
    assert "belong in `model.generate(...)`" in message
    assert "It takes: input_ids, attention_mask, position_ids" in message


def test_a_misspelled_keyword_is_refused_by_name(lm):
    with pytest.raises(TypeError, match="does not take `attention_masks`"):
        trace_with(lm, IDS, {"attention_masks": torch.ones_like(IDS)})
    assert_no_hooks(lm._module)


def test_keywords_the_forward_takes_pass(lm):
    got = trace_with(lm, IDS, {"logits_to_keep": 1, "return_dict": True})
    assert got.shape[1] == 1  # logits_to_keep reached the model
    assert torch.equal(got, plain(lm, input_ids=IDS, logits_to_keep=1))


def test_generate_keeps_taking_generate_keywords(lm):
    assert generate_with(lm, IDS).shape == (1, IDS.shape[1] + 2)


# --------------------------------------------------------------------------------------
# 11. the wrapper's own methods, weak references, del
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "args"),
    [("to", ("cpu",)), ("to", (torch.float32,)), ("cpu", ()), ("float", ()), ("eval", ()),
     ("train", (False,)), ("requires_grad_", (False,)), ("apply", (lambda m: None,))],
)
def test_module_methods_return_the_wrapper(method, args):
    net = NNsight(tiny_mlp())
    assert getattr(net, method)(*args) is net
    layer = net.layers[0]
    assert getattr(layer, method)(*args) is layer  # a part returns its envoy too
    assert net.parameters is not None and next(net.parameters()).dtype == torch.float32


def test_moving_a_model_not_loaded_yet_loads_it_first(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tiny_llama(0).save_pretrained(tmp_path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="</s>")
    lm = LanguageModel(str(tmp_path), tokenizer=tok)
    assert next(lm._module.parameters()).is_meta  # built without its weights
    assert lm.to("cpu") is lm
    assert torch.equal(lm._module.lm_head.weight, tiny_llama(0).lm_head.weight)
    assert lm.float() is lm and not next(lm._module.parameters()).is_meta


def test_wrappers_can_be_weakly_referenced():
    net = NNsight(tiny_mlp())
    assert weakref.ref(net)() is net
    assert weakref.ref(net.layers[0])() is net.layers[0]
    lm = LanguageModel(tiny_llama(0))
    assert weakref.ref(lm)() is lm


def test_del_model_frees_the_weights_without_the_cycle_collector():
    module = tiny_mlp()
    ref = weakref.ref(module)
    net = NNsight(module)
    layer = net.layers[1]
    del module
    gc.disable()
    try:
        del net, layer
        assert ref() is None
    finally:
        gc.enable()


@intervene
def save_last(model, ids):
    with model.trace(ids):
        logits = model.lm_head.output.save()
    return logits


def test_del_language_model_after_a_trace_frees_it():
    module = tiny_llama(0)
    ref = weakref.ref(module)
    lm = LanguageModel(module)
    save_last(lm, IDS)
    wrapper = weakref.ref(lm)
    del module
    gc.disable()
    try:
        del lm
        assert wrapper() is None  # no cycle through the wrapper itself
    finally:
        gc.enable()
    gc.collect()  # transformers' own modules hold cycles of their own
    assert ref() is None


# --------------------------------------------------------------------------------------
# 12. every model input reaches the model; others are refused by name
# --------------------------------------------------------------------------------------


@intervene
def bert_last(model, inputs):
    with model.trace(inputs):
        hidden = model.encoder.layer[-1].output.save()
    return hidden


def test_bert_token_type_ids_reach_the_model():
    bert = tiny_bert()
    types = torch.tensor([[0, 0, 1, 1, 1]])
    got = bert_last(LanguageModel(bert), {"input_ids": IDS, "token_type_ids": types})
    got = got[0] if isinstance(got, tuple) else got  # a tuple in transformers 4.57
    with torch.no_grad():
        expected = bert(input_ids=IDS, token_type_ids=types).last_hidden_state
        without = bert(input_ids=IDS).last_hidden_state
    assert torch.equal(got, expected)
    assert not torch.allclose(got, without)  # the key made a difference


@intervene
def t5_logits(model, inputs):
    with model.trace(inputs):
        logits = model.lm_head.output.save()
    return logits


@intervene
def t5_invokes(model, a, da, b, db):
    with model.trace() as tracer:
        with tracer.invoke(a, decoder_input_ids=da):
            first = model.lm_head.output.save()
        with tracer.invoke(b, decoder_input_ids=db):
            second = model.lm_head.output.save()
    return first, second


def test_t5_decoder_input_ids_reach_the_model():
    t5 = tiny_t5()
    dec = torch.tensor([[0, 4, 6]])
    got = t5_logits(LanguageModel(t5), {"input_ids": IDS, "decoder_input_ids": dec})
    expected = t5(input_ids=IDS, attention_mask=torch.ones_like(IDS),
                  decoder_input_ids=dec).logits  # with grad, like the trace
    assert torch.equal(got, expected)
    assert got.shape[1] == 3  # one position per decoder input id


def test_invokes_batch_extra_model_inputs():
    t5 = tiny_t5()
    da, db = torch.tensor([[0, 4, 6]]), torch.tensor([[0, 9, 2]])
    same_len = torch.tensor([[7, 8, 11, 12, 13]])
    first, second = t5_invokes(LanguageModel(t5), IDS, da, same_len, db)
    with torch.no_grad():
        assert torch.allclose(first, t5(input_ids=IDS, decoder_input_ids=da).logits, atol=1e-5)
        assert torch.allclose(second, t5(input_ids=same_len, decoder_input_ids=db).logits,
                              atol=1e-5)


def test_invoke_extra_inputs_that_cannot_batch_name_the_invoke():
    t5 = LanguageModel(tiny_t5())
    with pytest.raises(ValueError) as info:
        t5_invokes(t5, IDS, torch.tensor([[0, 4, 6]]), IDS, torch.tensor([[0, 4]]))
    message = str(info.value)
    assert "invoke 1 (line " in message
    assert "keyword input `decoder_input_ids` has shape (1, 2)" in message


def test_a_key_the_forward_does_not_take_is_refused_by_name(lm):
    with pytest.raises(TypeError) as info:
        logits_of(lm, {"input_ids": IDS, "token_type_ids": torch.zeros_like(IDS)})
    assert "LlamaForCausalLM.forward does not take `token_type_ids`" in str(info.value)


# --------------------------------------------------------------------------------------
# Empty and out-of-vocabulary inputs: clear errors at the user's line
# --------------------------------------------------------------------------------------


@intervene
def trace_at_line(model, x):
    with model.trace(x):  # WITH-LINE
        logits = model.lm_head.output.save()
    return logits


WITH_LINE = line_of("# WITH-LINE")


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.tensor([[5, 300, 7]]), ("token id 300 (row 0, position 1) is outside the "
                                       "vocabulary of LlamaForCausalLM: ids go from 0 to 127")),
        (torch.tensor([[5, -1]]), "token id -1 (row 0, position 1) is outside the vocabulary"),
        (torch.zeros(1, 0, dtype=torch.long), "the input has no tokens"),
        ([[], []], "cannot encode rows that are all empty"),
    ],
)
def test_bad_token_ids_are_refused_at_the_users_line(lm, x, message):
    with pytest.raises((ValueError, TypeError)) as info:
        trace_at_line(lm, x)
    assert message in str(info.value)
    assert raised_at(info, WITH_LINE)
    assert_no_hooks(lm._module)


@intervene
def invoke_bad(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            first = model.lm_head.output.save()
        with tracer.invoke(b):  # BAD-INVOKE
            second = model.lm_head.output.save()
    return first, second


BAD_INVOKE = line_of("# BAD-INVOKE")


def test_a_bad_invoke_input_names_the_invoke(lm):
    with pytest.raises(ValueError) as info:
        invoke_bad(lm, IDS, torch.tensor([[1000]]))
    assert str(info.value).startswith(f"invoke 1 (line {BAD_INVOKE}): token id 1000")


# --------------------------------------------------------------------------------------
# Unbatchable invokes of a plain module name the invoke and its line
# --------------------------------------------------------------------------------------


@intervene
def mlp_invokes(model, a, b, **kw):
    with model.trace() as tracer:
        with tracer.invoke(a):
            x = model.layers[0].output.save()
        with tracer.invoke(b, **kw):  # MLP-INVOKE
            y = model.layers[0].output.save()
    return x, y


MLP_INVOKE = line_of("# MLP-INVOKE")


def test_unbatchable_invoke_is_named_with_its_line():
    net = NNsight(tiny_mlp())
    with pytest.raises(ValueError) as info:
        mlp_invokes(net, torch.randn(2, 8), torch.randn(3, 7))
    assert str(info.value) == (
        f"invoke 1 (line {MLP_INVOKE}): input 0 has shape (3, 7) but invoke 0 (line "
        f"{MLP_INVOKE - 2})'s has (2, 8): invokes are batched along dim 0, so every other "
        "dimension must match"
    )
    assert_no_hooks(net._module)


def test_invokes_with_different_keywords_are_named():
    net = NNsight(tiny_mlp())
    with pytest.raises(ValueError, match=rf"invoke 1 \(line {MLP_INVOKE}\): its inputs differ"):
        mlp_invokes(net, torch.randn(2, 8), torch.randn(3, 8), flag=True)


# --------------------------------------------------------------------------------------
# nnsight names we do not have; a child module named `output`
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["all", "iter", "export_edits", "import_edits"])  # .next(): tests/test_next_calls.py
def test_missing_features_say_not_supported(name):
    net = NNsight(tiny_mlp())
    with pytest.raises(AttributeError) as info:
        getattr(net.layers[0], name)
    assert "not supported" in str(info.value)
    assert "no child module" not in str(info.value)


@intervene
def skip_layer(model, x):
    with model.trace(x):
        model.layers[0].skip(x)
        out = model.head.output.save()
    return out


def test_skip_inside_a_block_works():  # issue 13; more in tests/test_nnsight_compat.py
    net = NNsight(tiny_mlp())
    x = torch.randn(1, 8)
    out = skip_layer(net, x)
    h = x
    for i, layer in enumerate(net._module.layers):
        h = torch.relu(x if i == 0 else layer(h))
    assert torch.equal(out, net._module.head(h))
    assert_no_hooks(net._module)


@intervene
def bert_output_module(model, inputs):
    with model.trace(inputs):
        dense = model.encoder.layer[0].output_.dense.output.save()
        block = model.encoder.layer[0].output_.output.save()
        layer = model.encoder.layer[0].output.save()
    return dense, block, layer


def test_a_child_module_named_output_is_reached_as_output_():
    bert = tiny_bert()
    seen = {}
    target = bert.encoder.layer[0]
    handles = [
        target.output.dense.register_forward_hook(lambda m, a, o: seen.__setitem__("dense", o)),
        target.output.register_forward_hook(lambda m, a, o: seen.__setitem__("block", o)),
        target.register_forward_hook(lambda m, a, o: seen.__setitem__("layer", o)),
    ]
    try:
        with torch.no_grad():
            bert(input_ids=IDS)
    finally:
        for h in handles:
            h.remove()
    model = LanguageModel(bert)
    dense, block, layer = bert_output_module(model, IDS)
    assert torch.equal(dense, seen["dense"])
    assert torch.equal(block, seen["block"])
    layer_out = seen["layer"][0] if isinstance(seen["layer"], tuple) else seen["layer"]
    got_layer = layer[0] if isinstance(layer, tuple) else layer
    assert torch.equal(got_layer, layer_out)
    assert model.encoder.layer[0].output_._module is target.output
    assert_no_hooks(bert)


def test_errors_point_at_the_output_spelling():
    model = LanguageModel(tiny_bert())
    with pytest.raises(NotInTraceError) as info:
        model.encoder.layer[0].output  # noqa: B018
    assert ("`model.encoder.layer[0]` also has a child module named `output`: reach that "
            "module as `model.encoder.layer[0].output_`") in str(info.value)
    with pytest.raises(AttributeError) as info:
        model.encoder.layer[0].outptu  # noqa: B018
    message = str(info.value)
    assert "Its children: attention, intermediate, output_" in message
    assert "a child module named `output` is reached as `.output_`" in message


# --------------------------------------------------------------------------------------
# position_ids only where the forward takes them
# --------------------------------------------------------------------------------------


def test_position_ids_go_only_to_a_forward_that_names_them():
    from transformers import BloomConfig, BloomForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bloom = BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=32, n_layer=2,
                                             n_head=4)).eval()
    seen = {}
    handle = bloom.register_forward_pre_hook(
        lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        got = logits_of(LanguageModel(bloom), IDS)
    finally:
        handle.remove()
    assert "position_ids" not in seen and "attention_mask" in seen
    with torch.no_grad():
        assert torch.equal(got, bloom(input_ids=IDS).logits)
