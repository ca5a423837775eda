"""The server ends a trace's forward pass once no lane waits for a value
(Tracer._ends_when_served): a job's reply is only what it saved, so the modules after
its last checkpoint would compute what no one sees.  Each job's values stay those of
plain transformers; anything that does see the rest (a cache, model.output, a lane
still waiting, a local trace) keeps the whole forward."""

from __future__ import annotations

import pytest
import torch
from test_batching import BARRIER as BATCH_BARRIER
from test_batching import A, B, C, lm, message, run, saved  # noqa: F401 - lm is a fixture

from runtime.serve.stable import outputs_stable
from runtime.serve.worker import load_model

EARLY = '''def job(model, x):
    with model.trace(x):
        h = model.model.layers[0].output.save()
'''
LATE = '''def job(model, x):
    with model.trace(x):
        out = model.lm_head.output.save()
'''
TWO_INVOKES = '''def job(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            h0 = model.model.layers[0].output.save()
        with tracer.invoke(b):
            h1 = model.model.layers[1].output.save()
'''
CACHED = '''def job(model, x):
    with model.trace(x) as tracer:
        cache = tracer.cache()
        h = model.model.layers[0].output.save()
'''
PRINTS = '''def job(model, x):
    with model.trace(x):
        h = model.model.layers[0].output.save()
        print("norm", float(h.norm()))
'''


@pytest.fixture
def calls(lm):  # noqa: F811 - the fixture imported above
    """How often layer 1 and the LM head began (pre-hooks: a trace's forward ends
    inside the call of its last module, before that module's own forward hooks)."""
    outputs_stable(lm)  # the server's probe forward, before counting (runtime/serve/stable.py)
    got = {"layer1": 0, "lm_head": 0}
    hf = lm._module
    hooks = [hf.model.layers[1].register_forward_pre_hook(lambda *a: got.__setitem__("layer1", got["layer1"] + 1)),
             hf.lm_head.register_forward_pre_hook(lambda *a: got.__setitem__("lm_head", got["lm_head"] + 1))]
    yield got
    for h in hooks:
        h.remove()


def hidden(lm, x, layer):  # noqa: F811
    """Plain transformers and a hook: the output of decoder layer ``layer``."""
    got = []
    hook = lm._module.model.layers[layer].register_forward_hook(lambda m, a, out: got.append(out))
    try:
        with torch.no_grad():
            lm._module(x)
    finally:
        hook.remove()
    return got[0]


@pytest.mark.parametrize("max_jobs", [16, 1], ids=["shared", "alone"])
def test_the_forward_ends_after_the_last_value_a_job_asks_for(lm, calls, max_jobs):  # noqa: F811
    got, prints, _ = run(lm, [message(EARLY, x=A), message(EARLY, x=B), message(PRINTS, x=C)],
                         max_jobs=max_jobs)
    assert calls == {"layer1": 0, "lm_head": 0}  # nothing after layer 0 ran
    for reply, x in zip(got, (A, B, C)):
        assert reply[0] == b"R", reply
        torch.testing.assert_close(saved(reply, "h"), hidden(lm, x, 0), atol=1e-5, rtol=0)
    assert list(prints.values()) == [f"norm {float(hidden(lm, C, 0).norm())}\n"]


def test_a_job_asking_for_a_later_value_keeps_the_forward_for_the_whole_pass(lm, calls):  # noqa: F811
    got, _, _ = run(lm, [message(EARLY, x=A), message(LATE, x=B)])
    assert calls == {"layer1": 1, "lm_head": 1}  # one shared pass, run to the LM head
    torch.testing.assert_close(saved(got[0], "h"), hidden(lm, A, 0), atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(saved(got[1], "out"), lm._module(B).logits, atol=1e-5, rtol=0)


def test_the_pass_runs_to_the_last_value_any_lane_waits_for(lm, calls):  # noqa: F811
    got, _, _ = run(lm, [message(TWO_INVOKES, a=A, b=B)])
    assert calls == {"layer1": 1, "lm_head": 0}
    torch.testing.assert_close(saved(got[0], "h0"), hidden(lm, A, 0), atol=1e-5, rtol=0)
    torch.testing.assert_close(saved(got[0], "h1"), hidden(lm, B, 1), atol=1e-5, rtol=0)


def test_a_cache_sees_the_whole_forward(lm, calls):  # noqa: F811
    got, _, _ = run(lm, [message(CACHED, x=A)], max_jobs=1)
    assert got[0][0] == b"R", got[0]
    assert calls == {"layer1": 1, "lm_head": 1}
    torch.testing.assert_close(saved(got[0], "h"), hidden(lm, A, 0), atol=1e-5, rtol=0)


def test_a_local_trace_runs_the_whole_forward():
    fresh = load_model("tiny-llama")
    got = {"n": 0}
    hook = fresh._module.lm_head.register_forward_hook(lambda *a: got.__setitem__("n", got["n"] + 1))
    try:
        with fresh.trace(A):
            h = fresh.model.layers[0].output.save()
        assert got["n"] == 1
        torch.testing.assert_close(h, hidden(fresh, A, 0), atol=0, rtol=0)
    finally:
        hook.remove()


def test_a_model_whose_trace_ended_early_runs_whole_traces_afterwards():
    """The first trace of a model learns its module order; ending it early must not
    leave that order (or a hook) half made."""
    fresh = load_model("tiny-llama")
    got, _, _ = run(fresh, [message(EARLY, x=A)])
    assert got[0][0] == b"R", got[0]
    with fresh.trace(B):
        h = fresh.model.layers[1].output.save()
        out = fresh.output.save()
    with torch.no_grad():
        logits = fresh._module(B).logits
    torch.testing.assert_close(h, hidden(fresh, B, 1), atol=0, rtol=0)
    torch.testing.assert_close(out.logits, logits, atol=0, rtol=0)
    assert not fresh._module._forward_hooks and not fresh._module._forward_pre_hooks


BREAKS = '''def job(model, x):
    with model.trace(x):
        h = model.model.layers[0].output.save()
        model.model.layers[0].output = h[..., :3]
'''


@pytest.mark.parametrize("max_jobs", [16, 1], ids=["shared", "alone"])
def test_a_job_that_replaced_a_value_keeps_the_forward_and_its_error(lm, calls, max_jobs):  # noqa: F811
    """The rest of the forward runs on what a lane wrote: the job gets the error its
    write causes there, as a local trace raises it (not a reply as if it had worked)."""
    with pytest.raises(RuntimeError, match="must match the size") as local:  # noqa: SIM117
        with lm.trace(A):
            h = lm.model.layers[0].output.save()
            lm.model.layers[0].output = h[..., :3]
    got, _, _ = run(lm, [message(BREAKS, x=A), message(EARLY, x=B)], max_jobs=max_jobs)
    assert got[0][0] == b"E", got[0]
    assert got[0][1]["type"] == "RuntimeError" and "must match the size" in got[0][1]["message"]
    assert str(local.value).split("\n")[0] in got[0][1]["message"]
    assert calls["layer1"] >= 1


MLP = '''def job(model, x):
    with model.trace(x):
        h = model.transformer.h[0].mlp.output.save()
'''


def test_a_value_the_model_changes_in_place_later_is_sent_as_a_local_trace_saves_it():
    """Falcon with parallel_attn changes the MLP's output in place after it returned
    (`mlp_output += attention_output`): the probe (runtime/serve/stable.py) sees it, and
    its traces run whole, so the job gets the changed tensor a local trace saves."""
    from transformers import FalconConfig, FalconForCausalLM

    from runtime.language import LanguageModel

    torch.manual_seed(0)
    config = FalconConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                          num_attention_heads=2, parallel_attn=True,
                          new_decoder_architecture=False, alibi=False)
    falcon = LanguageModel(FalconForCausalLM(config).eval())
    for p in falcon._module.parameters():
        p.requires_grad_(False)
    with falcon.trace(A):
        local = falcon.transformer.h[0].mlp.output.save()
    got, _, _ = run(falcon, [message(MLP, x=A)], max_jobs=1)
    assert got[0][0] == b"R", got[0]
    torch.testing.assert_close(saved(got[0], "h"), local, atol=1e-6, rtol=0)
    assert outputs_stable(falcon) is False


def test_the_probe_runs_once_and_finds_the_served_llama_stable(lm):  # noqa: F811
    from runtime.serve.stable import KEY

    assert outputs_stable(lm) is True and lm.__dict__[KEY] is True
    fresh = load_model("tiny-llama")
    assert not fresh._order_complete
    assert outputs_stable(fresh) is True
    # The probe learned the module order: a trace that learns it runs whole (cut short,
    # the order would stay unlearned and every later trace would learn it again).
    assert fresh._order_complete
    assert not fresh._module._forward_hooks and not fresh._module._forward_pre_hooks
    relu = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(inplace=True))
    from runtime import NNsight

    net = NNsight(relu)  # the ReLU changes its input in place; a probe of ids fails: False
    assert outputs_stable(net) is False


# test_batching's barrier job, saving layer 0 (not the LM head) at the end
BARRIER = BATCH_BARRIER.replace("model.lm_head.output.save()", "model.model.layers[0].output.save()")


def test_a_job_whose_barrier_was_released_ends_early_too(lm, calls):  # noqa: F811
    """A released barrier keeps no lane waiting: the pass ends after layer 0, and the
    value is the one a local trace saves (invoke b's rows replaced by invoke a's)."""
    got, _, _ = run(lm, [message(BARRIER, a=A, b=B)], max_jobs=1)
    assert got[0][0] == b"R", got[0]
    assert calls == {"layer1": 0, "lm_head": 0}
    torch.testing.assert_close(saved(got[0], "y"), hidden(lm, A, 0), atol=1e-5, rtol=0)
