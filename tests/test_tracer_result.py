"""``tracer.result`` inside a block (nnsight's spelling of the block's result): in a
generate block the token ids generation ends with (= ``model.generator.output``), in a
trace what the model returned (= ``model.output``, the last value of the pass).  It was
None inside the block, silently; a trace keeps nothing after its block (an error says
so).  Checked against plain transformers, locally and in a server's shared pass."""

from __future__ import annotations

import pytest
import torch
from test_batching import A, B, lm, message, run, saved  # noqa: F401 - lm is a fixture

from compiler import intervene
from compiler.errors import CompileError
from runtime import LanguageModel
from runtime.errors import OutOfOrderError
from runtime.tiny import tiny_llama


@pytest.fixture(scope="module")
def local():
    return LanguageModel(tiny_llama(0))


@intervene
def generated(model, x):
    with model.generate(x, max_new_tokens=3, do_sample=False) as tracer:
        ids = tracer.result.save()
    return ids, tracer.result


@intervene
def traced(model, x):
    with model.trace(x) as tracer:
        h = model.model.layers[0].output.save()
        out = tracer.result.save()
    return h, out


@intervene
def result_first(model, x):
    with model.trace(x) as tracer:
        out = tracer.result.save()
        h = model.model.layers[0].output.save()  # result-first
    return h, out


@intervene
def after_a_trace(model, x):
    with model.trace(x) as tracer:
        h = model.model.layers[0].output.save()  # noqa: F841 - a checkpoint, not used after
    return tracer.result


def test_inside_a_generate_block_it_is_the_generated_ids(local):
    with torch.no_grad():
        ids, after = generated(local, A)
        plain = local._module.generate(A, max_new_tokens=3, do_sample=False)
    assert ids.tolist() == after.tolist() == plain.tolist()


def test_inside_a_trace_it_is_what_the_model_returned(local):
    with torch.no_grad():
        h, out = traced(local, A)
        plain = local._module(A)
    torch.testing.assert_close(out.logits, plain.logits, atol=0, rtol=0)
    assert h.shape == (1, 5, 32)


def test_it_is_the_last_value_of_a_trace(local):
    line = result_first.__code__.co_firstlineno + 3
    with pytest.raises(OutOfOrderError, match=rf"\(line {line}\) is asked for after `model.output`"):
        result_first(local, A)


def test_a_trace_keeps_no_result_after_its_block(local):
    with pytest.raises(AttributeError, match=r"`tracer.result` of a trace is what the model "
                       r"returned, kept only if saved inside the block: `out = tracer.result.save\(\)`"):
        after_a_trace(local, A)


def test_the_plan_names_what_it_stands_for():
    rows = [(c.path, c.value) for c in traced.plan.functions[0].blocks[0].lanes[0].checkpoints]
    assert rows == [("model.model.layers[0]", "output"), ("model", "output")]
    rows = [(c.path, c.value) for c in generated.plan.functions[0].blocks[0].lanes[0].checkpoints]
    assert rows == [("model.generator", "output")]


def test_it_cannot_be_assigned():
    with pytest.raises(CompileError, match=r"`tracer.result` cannot be assigned"):
        @intervene
        def assigns(model, x):
            with model.trace(x) as tracer:
                tracer.result = 0


GENERATE_RESULT = '''def job(model, x):
    with model.generate(x, max_new_tokens=3, do_sample=False) as tracer:
        ids = tracer.result.save()
'''


def test_remote_jobs_sharing_a_generate_call_get_their_own_ids(lm):  # noqa: F811
    got, _, _ = run(lm, [message(GENERATE_RESULT, x=A), message(GENERATE_RESULT, x=B)])
    for reply, x in zip(got, (A, B)):
        assert reply[0] == b"R", reply
        with torch.no_grad():
            plain = lm._module.generate(x, max_new_tokens=3, do_sample=False)
        assert saved(reply, "ids").tolist() == plain.tolist()
