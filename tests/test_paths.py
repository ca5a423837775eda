"""One spelling of a module path everywhere: the plan, runtime errors (message and
``.module``), cache keys and ``.source`` name a module as the block writes it
(``model.model.layers[0]``, rooted at the wrapper's variable), and cache lookups take
every spelling."""

from __future__ import annotations

import pytest
import torch
from support import forward_hooks, tiny_bert

from compiler import intervene
from compiler.__main__ import main as cli_main
from runtime import LanguageModel, NNsight, OutOfOrderError
from runtime.errors import MissedCheckpointError
from runtime.models import tiny_llama, tiny_mlp
from runtime.paths import names, rooted, shown

IDS = torch.tensor([[1, 5, 7, 9, 11, 3]])
LAYER0 = "model.model.layers[0]"


def plan_text(capsys, fn_name: str) -> str:
    """What `intervene show-plan` prints for one function of this file."""
    capsys.readouterr()
    assert cli_main(["show-plan", __file__, "--function", fn_name]) == 0
    return capsys.readouterr().out


def plan_modules(text: str) -> list[str]:
    """The module column of a printed plan's rows."""
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.split()[:2] == ["order", "line"])
    start, end = header.index("module"), header.index("value")
    return [ln[start:end].strip() for ln in lines
            if ln.split() and ln.split()[0].isdigit() and "--" not in ln]


# -- the conversion itself ------------------------------------------------------------------


def test_torch_names_are_shown_as_a_block_writes_them():
    assert shown("") == "model"
    assert shown("model.layers.0.mlp") == "model.model.layers[0].mlp"
    assert shown("lm_head", "lm") == "lm.lm_head"
    assert shown("encoder.layer.0.output.dense") == "model.encoder.layer[0].output_.dense"
    assert shown("blocks.a-b") == "model.blocks['a-b']"
    assert rooted("model.model.layers[0]", "self.lm") == "self.lm.model.layers[0]"
    assert rooted("model.model.layers[0]", "(helper)") == "model.model.layers[0]"
    assert rooted("Linear", "lm") == "Linear"  # not a path under the root: as it is
    for spelling in ("model.layers[0].mlp", "model.layers.0.mlp", 'model.layers["0"].mlp',
                     "model.layers[ 0 ].mlp"):
        assert names(spelling) == ["model", "layers", "0", "mlp"], spelling
    assert names("blocks['a-b']") == ["blocks", "a-b"]
    assert names("model..layers") is None and names("") is None and names("[0") is None


# -- one module, every place ------------------------------------------------------------------


@intervene
def backwards(model, ids):
    with model.trace(ids) as tracer:
        cache = tracer.cache()
        late = model.lm_head.output.save()
        early = model.model.layers[0].output.save()  # BACKWARDS
    return cache, late, early


@intervene
def saved_layer0(model, ids):
    with model.trace(ids) as tracer:
        cache = tracer.cache()
        h = model.model.layers[0].output.save()
    return cache, h


def test_plan_error_cache_and_source_spell_a_module_alike(capsys):
    lm = LanguageModel(tiny_llama(0, attn_implementation="eager"))
    # the plan: exactly the user's code
    assert plan_modules(plan_text(capsys, "backwards")) == ["model.lm_head", LAYER0]
    assert plan_modules(str(backwards.plan)) == ["model.lm_head", LAYER0]
    # a runtime error (a fresh model's order is learned while it runs) ...
    with pytest.raises(OutOfOrderError) as info:
        backwards(lm, IDS)
    assert info.value.module == LAYER0
    assert f"`{LAYER0}.output` is asked for at line" in str(info.value)
    assert "after the model had already run that module" in str(info.value)
    # ... and the same mistake found before the run, next time
    with pytest.raises(OutOfOrderError) as info:
        backwards(lm, IDS)
    assert info.value.module == LAYER0
    assert f"`{LAYER0}.output` (line {info.value.line}) is asked for after " \
           "`model.lm_head.output`" in str(info.value)
    # the cache's keys
    cache, h = saved_layer0(lm, IDS)
    assert LAYER0 in list(cache)
    assert "model.model.layers[0].self_attn.o_proj" in list(cache)
    assert "model.model.layers.0" not in list(cache)
    listed = repr(cache).removeprefix(f"Cache({len(cache)} modules: ").removesuffix(", ...)")
    assert listed != repr(cache) and set(listed.split(", ")) <= set(cache)  # the keys' spelling
    # the printed source of a module in it
    printed = str(lm.model.layers[0].self_attn.source)
    assert printed.startswith(f"{LAYER0}.self_attn.source: ")
    # every lookup spelling finds the same entry, the one plain hooks see
    seen = {}
    with forward_hooks({lm._module.model.layers[0]: lambda m, a, o: seen.setdefault("h", o)}), \
            torch.no_grad():
        lm._module(IDS)
    for key in (LAYER0, "model.model.layers.0", "model.layers.0", "model.layers[0]",
                'model.model.layers["0"]'):
        assert torch.equal(cache[key].output, seen["h"]), key
        assert key in cache
    assert torch.equal(cache.model.layers[0].output, h)


@intervene
def stopped_then_read(model, ids):
    with model.trace(ids) as tracer:
        tracer.stop()
        h = model.model.layers[0].output.save()  # AFTER-STOP
    return h


@intervene
def dynamic_backwards(model, ids):
    with model.trace(ids):
        for i in [1, 0]:
            h = model.model.layers[i].output.save()
    return h


def test_missed_and_dynamic_errors_use_the_same_spelling(capsys):
    lm = LanguageModel(tiny_llama(0))
    with pytest.raises(MissedCheckpointError) as info:
        stopped_then_read(lm, IDS)
    assert info.value.module == LAYER0
    assert f"`{LAYER0}.output` is asked for at line {info.value.line}" in str(info.value)
    assert plan_modules(plan_text(capsys, "stopped_then_read")) == [LAYER0]
    # a dynamic index: the plan shows it as written, the error the module it was
    assert plan_modules(plan_text(capsys, "dynamic_backwards")) == [
        "model.model.layers[i]  (dynamic)"]
    with pytest.raises(OutOfOrderError) as info:
        dynamic_backwards(lm, IDS)
    assert info.value.module == LAYER0


# -- the wrapper's own variable -----------------------------------------------------------------


@intervene
def under_another_name(lm, ids):
    with lm.trace(ids) as tracer:
        cache = tracer.cache()
        late = lm.model.layers[1].output.save()
        early = lm.model.layers[0].output.save()
    return cache, late, early


@intervene
def cache_under_another_name(lm, ids):
    with lm.trace(ids) as tracer:
        cache = tracer.cache(modules=["lm.model.layers[0]", lm.model.layers[1]])
    return cache


def test_paths_are_rooted_at_the_variable_the_block_uses(capsys):
    lm = LanguageModel(tiny_llama(0))
    assert plan_modules(plan_text(capsys, "under_another_name")) == [
        "lm.model.layers[1]", "lm.model.layers[0]"]
    for _ in range(2):  # found while running, then before the run
        with pytest.raises(OutOfOrderError) as info:
            under_another_name(lm, IDS)
        assert info.value.module == "lm.model.layers[0]"
        assert "`lm.model.layers[0].output`" in str(info.value)
        assert "`lm.model.layers[1].output`" in str(info.value)
    cache = cache_under_another_name(lm, IDS)
    assert sorted(cache) == ["lm.model.layers[0]", "lm.model.layers[1]"]
    assert torch.equal(cache["lm.model.layers[0]"].output, cache["model.layers.0"].output)
    assert "lm.model.layers[0]" in repr(cache)
    assert torch.equal(cache.lm.model.layers[0].output, cache["model.layers[0]"].output)


# -- a child named like a value, and plain modules -----------------------------------------------


@intervene
def bert_output_child(model, ids):
    with model.trace(ids) as tracer:
        cache = tracer.cache()
        dense = model.encoder.layer[0].output_.dense.output.save()
    return cache, dense


def test_a_child_named_output_is_spelled_output_(capsys):
    model = LanguageModel(tiny_bert())
    written = "model.encoder.layer[0].output_.dense"
    assert plan_modules(plan_text(capsys, "bert_output_child")) == [written]
    assert model.encoder.layer[0].output_.dense._path == written
    cache, dense = bert_output_child(model, torch.tensor([[1, 5, 7, 9]]))
    assert written in list(cache) and "model.encoder.layer[0].output_" in list(cache)
    for key in (written, "encoder.layer.0.output.dense", "model.encoder.layer.0.output_.dense"):
        assert torch.equal(cache[key].output, dense), key


@intervene
def mlp_backwards(model, x):
    with model.trace(x):
        b = model.layers[2].output.save()
        a = model.layers[1].output.save()
    return a, b


def test_plain_modules_index_in_brackets(capsys):
    model = NNsight(tiny_mlp())
    assert plan_modules(plan_text(capsys, "mlp_backwards")) == ["model.layers[2]",
                                                               "model.layers[1]"]
    with pytest.raises(OutOfOrderError) as info:
        mlp_backwards(model, torch.randn(3, 8))
    assert info.value.module == "model.layers[1]"
    with pytest.raises(AttributeError, match=r"`model\.layers\[1\]` \(Linear\) has no child"):
        model.layers[1].nothing  # noqa: B018
    assert repr(model.layers[1]).startswith("Envoy(model.layers[1]): ")


@intervene
def cache_of_another_model(model, other, x):
    with model.trace(x) as tracer:
        cache = tracer.cache(modules=[other.layers[1]])
    return cache


def test_cache_of_a_module_of_another_model_names_it():
    model, other = NNsight(tiny_mlp()), NNsight(tiny_mlp(seed=1))
    with pytest.raises(KeyError, match=r"`model\.layers\[1\]` is not a module of the traced "
                                       r"model"):
        cache_of_another_model(model, other, torch.randn(3, 8))


# -- envoy errors name the variable of the code that made the mistake -----------------------


@intervene
def bad_index_on_lm(lm, ids):
    with lm.trace(ids):
        h = lm.model.layers[9].output.save()
    return h


@intervene
def bad_child_on_lm(lm, ids):
    with lm.trace(ids):
        h = lm.model.layerz[0].output.save()
    return h


@intervene
def dynamic_index_on_lm(lm, ids, k):
    with lm.trace(ids):
        h = lm.model.layers[k].output.save()
    return h


@intervene
def layer_of(m, k):
    return m.model.layers[k].output


@intervene
def helper_index_on_lm(lm, ids, k):
    with lm.trace(ids):
        h = layer_of(lm, k).save()
    return h


def _message(excinfo) -> str:
    text = str(excinfo.value)
    assert "model.model" not in text, text  # one root only
    return text


def test_envoy_errors_in_a_block_name_the_blocks_variable():
    lm = LanguageModel(tiny_llama(0))  # 2 layers
    line = bad_index_on_lm.__code__.co_firstlineno + 2
    with pytest.raises(IndexError) as e:
        bad_index_on_lm(lm, IDS)
    assert _message(e) == (f"line {line}: `lm.model.layers[9]`: `lm.model.layers` has 2 modules; "
                           "index 9 is out of range")
    with pytest.raises(AttributeError) as e:
        bad_child_on_lm(lm, IDS)
    assert "`lm.model.layerz[0]`: `lm.model` (LlamaModel) has no child module or attribute " \
           "`layerz`. Did you mean `layers`?" in _message(e)
    with pytest.raises(IndexError) as e:  # a dynamic path fails as the block runs
        dynamic_index_on_lm(lm, IDS, 9)
    assert _message(e) == "`lm.model.layers` has 2 modules; index 9 is out of range"
    # outside a block no variable is known: `model`, as always
    with pytest.raises(IndexError, match=r"^`model\.model\.layers` has 2 modules; index 9 "):
        lm.model.layers[9]


def test_envoy_errors_in_a_helper_name_the_helpers_parameter():
    lm = LanguageModel(tiny_llama(0))
    with pytest.raises(IndexError) as e:
        helper_index_on_lm(lm, IDS, 9)
    assert _message(e) == "`m.model.layers` has 2 modules; index 9 is out of range"
    assert helper_index_on_lm(lm, IDS, 1).shape == (1, 6, lm._module.config.hidden_size)


class _Probe:
    def __init__(self, lm):
        self.lm = lm

    @intervene
    def layer(self, ids, k):
        with self.lm.trace(ids):
            h = self.lm.model.layers[k].output.save()
        return h


def test_envoy_errors_in_a_method_name_the_attribute_the_block_uses():
    # the lane's frame holds no variable bound to the model: the block's `self.lm`, not
    # a variable of some caller further up (this test's `lm`)
    lm = LanguageModel(tiny_llama(0))
    with pytest.raises(IndexError) as e:
        _Probe(lm).layer(IDS, 9)
    assert _message(e) == "`self.lm.model.layers` has 2 modules; index 9 is out of range"
