"""Jobs with step blocks in a shared pass (runtime/serve/batch.py): greedy ``generate``
jobs with ``tracer.all()`` / ``tracer.iter[...]`` / ``for step in ...`` share one
generate call, and traces with step blocks (calls of each module) one forward, each job's
result equal to running it alone (and to plain transformers with hooks); a write at a
step touches only its job's rows; a job whose rows end sooner than the call's last step
runs again alone; a failing step-block job fails alone.  In-process on the tiny Llama."""

# ruff: noqa: F811 - `lm` and `forwards` are test_batching's fixtures, imported as parameters
from __future__ import annotations

import pytest
import torch
from test_batching import (  # noqa: F401 - lm, forwards: fixtures
    GEN,
    READ,
    A,
    B,
    C,
    forwards,
    lm,
    message,
    run,
    same,
    saved,
    tensor_refs,
)

from runtime.serve.stable import outputs_stable

# Every step: the last position's hidden state after layer 0, one entry per step.
ALL = '''def job(model, x):
    with model.generate(x, max_new_tokens=4, do_sample=False) as tracer:
        hs = list().save()
        with tracer.all():
            hs.append(model.model.layers[0].output[:, -1].clone())
        out = model.generator.output.save()
'''
# A write at step 2 only (the third new token is the first it changes).
AT_2 = '''def job(model, x):
    with model.generate(x, max_new_tokens=4, do_sample=False) as tracer:
        with tracer.iter[2]:
            model.model.layers[0].output[:] = 0
        out = model.generator.output.save()
'''
# `for step in ...` binds the step; a second block at steps that never all come (4 steps:
# 0..3), the code after it still runs (a RuntimeWarning alone and shared).
LOOPS = '''def job(model, x):
    with model.generate(x, max_new_tokens=4, do_sample=False) as tracer:
        picks = list().save()
        for s in tracer.iter[0:2]:
            picks.append((s, model.lm_head.output[:, -1].argmax(-1)))
        seen = list().save()
        for s in tracer.iter[2:6]:
            seen.append(s)
        out = model.generator.output.save()
'''
# Step blocks of their own in each invoke.
INVOKES = '''def job(model, a, b):
    with model.generate(max_new_tokens=4, do_sample=False) as tracer:
        with tracer.invoke(a):
            with tracer.iter[1]:
                model.model.layers[1].output[:] = 0
            x = model.generator.output.save()
        with tracer.invoke(b):
            logits = list().save()
            with tracer.all():
                logits.append(model.lm_head.output[:, -1].clone())
            y = model.generator.output.save()
'''
# A barrier at step 1 between its invokes: invoke b takes invoke a's value there.
BARRIER = '''def job(model, a, b):
    with model.generate(max_new_tokens=4, do_sample=False) as tracer:
        bar = tracer.barrier(2)
        with tracer.invoke(a):
            with tracer.iter[1]:
                h = model.model.layers[0].output
                bar()
        with tracer.invoke(b):
            with tracer.iter[1]:
                bar()
                model.model.layers[0].output[:] = h
            y = model.generator.output.save()
'''
# Its step 1 forces the end token (2): alone, generation stops after 2 steps.
EOS_AT_1 = '''def job(model, x):
    with model.generate(x, max_new_tokens=4, do_sample=False) as tracer:
        steps = list().save()
        for s in tracer.all():
            steps.append(s)
            if s == 1:
                model.lm_head.output[:, -1, 2] = 1e4
        out = model.generator.output.save()
'''
# Ends at step 0 alone, then writes over its generated ids (the end token included).
EOS_HIDDEN = '''def job(model, x):
    with model.generate(x, max_new_tokens=4, do_sample=False) as tracer:
        with tracer.iter[0]:
            model.lm_head.output[:, -1, 2] = 1e4
        model.generator.output[:] = 5
        out = model.generator.output.save()
'''
# One invoke ends at step 0, the other goes on: the job's generation runs to the end.
ONE_ROW_ENDS = '''def job(model, a, b):
    with model.generate(max_new_tokens=4, do_sample=False) as tracer:
        with tracer.invoke(a):
            with tracer.iter[0]:
                model.lm_head.output[:, -1, 2] = 1e4
            x = model.generator.output.save()
        with tracer.invoke(b):
            picks = list().save()
            for s in tracer.all():
                picks.append(model.lm_head.output[:, -1].argmax(-1))
            y = model.generator.output.save()
'''
# Reads a row it does not own, at step 2: an IndexError there (alone too).
FAILS_AT_2 = '''def job(model, x):
    with model.generate(x, max_new_tokens=4, do_sample=False) as tracer:
        with tracer.iter[2]:
            bad = model.model.layers[0].output[7].save()
        out = model.generator.output.save()
'''


def same_generate(got, alone) -> None:
    """The same reply as alone: the same saved names, values and ``tracer.result``
    (token ids and plain values exactly, floats within 1e-4)."""
    assert got[0] == alone[0] == b"R", (got, alone)

    def walk(g, a):
        if isinstance(g, dict) and g.get("t") == "tensor":
            assert isinstance(a, dict) and a.get("t") == "tensor", (g, a)
            x, y = got[2][g["k"]], alone[2][a["k"]]
            assert x.shape == y.shape and x.dtype == y.dtype
            if x.dtype.is_floating_point:
                torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
            else:
                assert torch.equal(x, y)
        elif isinstance(g, dict):
            assert isinstance(a, dict) and g.keys() == a.keys(), (g, a)
            for k in g:
                walk(g[k], a[k])
        elif isinstance(g, list):
            assert isinstance(a, list) and len(g) == len(a), (g, a)
            for x, y in zip(g, a):
                walk(x, y)
        else:
            assert g == a

    walk(got[1]["saved"], alone[1]["saved"])
    walk(got[1]["result"], alone[1]["result"])


def plain_generate(lm, x, hook=None):
    """Plain transformers greedy generate of 4 tokens, ``hook(call, output)`` on layer 0."""
    calls = []

    def wrap(module, args, output):
        calls.append(1)
        return hook(len(calls) - 1, output)

    handle = lm._module.model.layers[0].register_forward_hook(wrap) if hook else None
    try:
        with torch.no_grad():
            return lm._module.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4,
                                       do_sample=False)
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.filterwarnings("ignore:the step block at line 7 selected step")  # LOOPS
def test_step_block_generate_jobs_share_one_call_and_equal_each_alone(lm, forwards):
    jobs = [message(ALL, x=C), message(AT_2, x=C), message(LOOPS, x=A),
            message(INVOKES, a=A, b=B), message(GEN, x=C), message(ALL, x=B),
            message(BARRIER, a=A, b=B)]
    batched, _, _ = run(lm, jobs)
    assert len(forwards) == 4  # one generate call of 4 steps for all seven jobs
    alone, _, _ = run(lm, jobs, max_jobs=1)
    assert len(forwards) == 4 + 7 * 4
    for got, ref in zip(batched, alone):
        same_generate(got, ref)
    # Against plain transformers with hooks.
    recorded = []
    plain_c = plain_generate(lm, C, lambda i, out: recorded.append(out[:, -1].clone()))
    assert torch.equal(saved(batched[0], "out"), plain_c)
    assert torch.equal(saved(batched[4], "out"), plain_c)
    hs = [batched[0][2][k] for k in tensor_refs(batched[0][1]["saved"]["hs"])]
    assert len(hs) == 4 and all(h.shape == (2, 32) for h in hs)
    for got, want in zip(hs, recorded):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # The write at step 2 changed its own rows from the third new token on, only them
    # (job 0 and job 4 read the same input C in the same pass, unchanged).
    zero_at_2 = plain_generate(lm, C, lambda i, out: out * 0 if i == 2 else None)
    at_2 = saved(batched[1], "out")
    assert torch.equal(at_2, zero_at_2)
    assert torch.equal(at_2[:, :5 + 2], plain_c[:, :5 + 2])
    assert not torch.equal(at_2, plain_c)
    # The barrier at step 1 handed invoke a's value to invoke b, in its job only.
    assert not torch.equal(saved(batched[6], "y"), plain_generate(lm, B))
    # `for step in ...` bound the steps; the block past the last step ended with it.
    header = batched[2][1]["saved"]
    assert [p["v"][0] for p in header["picks"]["v"]] == [0, 1]
    assert header["seen"] == alone[2][1]["saved"]["seen"] == {"t": "list", "v": [2, 3]}


def test_a_step_block_job_whose_rows_end_sooner_alone_runs_again_alone(lm, forwards):
    jobs = [message(ALL, x=A), message(EOS_AT_1, x=B), message(AT_2, x=C),
            message(EOS_HIDDEN, x=B), message(ONE_ROW_ENDS, a=A, b=B)]
    batched, _, _ = run(lm, jobs)
    # The shared call (4 steps), then the jobs whose generation ends sooner, alone: at
    # step 1 (2 steps), at step 0 (1 step; told by the ids generate returned, not by
    # those the job wrote over them).
    assert len(forwards) == 4 + 2 + 1
    alone, _, _ = run(lm, jobs, max_jobs=1)
    for got, ref in zip(batched, alone):
        same_generate(got, ref)
    out = saved(batched[1], "out")
    assert out.shape == (1, 5 + 2) and out[0, -1].item() == 2
    assert batched[1][1]["saved"]["steps"] == alone[1][1]["saved"]["steps"] == {
        "t": "list", "v": [0, 1]}
    assert saved(batched[3], "out").tolist() == [[5] * 6]
    # A job with a row that ended and one that did not shares the call to its end, the
    # ended row padded after its end token as alone (pad id 0).
    assert saved(batched[4], "x").tolist() == [[*A[0].tolist(), 2, 0, 0, 0]]
    assert len(tensor_refs(batched[4][1]["saved"]["picks"])) == 4


def test_a_failing_step_block_job_fails_alone(lm, forwards):
    jobs = [message(ALL, x=A), message(FAILS_AT_2, x=C), message(AT_2, x=B)]
    batched, _, _ = run(lm, jobs)
    # The shared call fails at step 2 (3 steps), the failing job alone (3 steps), the
    # other two share a call once more (4 steps).
    assert len(forwards) == 3 + 3 + 4
    alone, _, _ = run(lm, jobs, max_jobs=1)
    assert batched[1][0] == b"E" and batched[1][1]["type"] == "IndexError"
    assert batched[1][1] == alone[1][1]  # the same error, line and all
    same_generate(batched[0], alone[0])
    same_generate(batched[2], alone[2])


def test_sampling_with_step_blocks_runs_alone(lm, forwards):
    sampling = ALL.replace("do_sample=False", "do_sample=True")
    batched, _, _ = run(lm, [message(ALL, x=A), message(sampling, x=B), message(ALL, x=C)])
    assert len(forwards) == 4 + 4  # the greedy two together, the sampling job alone
    assert [b[0] for b in batched] == [b"R"] * 3


# Traces: a step block reads call i of each module (the tiny Llama calls each once).
TRACE_ALL = '''def job(model, x):
    with model.trace(x) as tracer:
        hs = list().save()
        for i in tracer.all():
            hs.append(model.model.layers[0].output)
        out = model.output.logits.save()
'''
TRACE_AT_0 = '''def job(model, x):
    with model.trace(x) as tracer:
        with tracer.iter[0]:
            model.model.layers[1].output[:] = 0
        out = model.lm_head.output.save()
'''
TRACE_MISSED = '''def job(model, x):
    with model.trace(x) as tracer:
        with tracer.iter[0:2]:
            h = model.model.layers[0].output.save()
'''


def test_trace_step_block_jobs_share_a_pass_of_their_own(lm, forwards):
    jobs = [message(TRACE_ALL, x=C), message(READ, x=A), message(TRACE_AT_0, x=B),
            message(TRACE_ALL, x=A)]
    batched, _, _ = run(lm, jobs)
    assert len(forwards) == 2  # the three step-block traces together, the plain one apart
    alone, _, _ = run(lm, jobs, max_jobs=1)
    for got, ref in zip(batched, alone):
        same(got, ref)
    with torch.no_grad():
        plain = lm._module(C).logits
    torch.testing.assert_close(saved(batched[0], "out"), plain, atol=1e-4, rtol=0)
    # A selected call that never comes: that job's MissedCheckpointError, as alone.
    jobs = [message(TRACE_ALL, x=C), message(TRACE_MISSED, x=A), message(TRACE_AT_0, x=B)]
    forwards.clear()
    batched, _, _ = run(lm, jobs)
    assert len(forwards) == 3  # the failed pass, the failing job alone, the others again
    alone, _, _ = run(lm, jobs, max_jobs=1)
    assert batched[1][0] == b"E" and batched[1][1]["type"] == "MissedCheckpointError"
    assert batched[1][1] == alone[1][1]
    same(batched[0], alone[0])
    same(batched[2], alone[2])


@pytest.mark.parametrize("source", [ALL, AT_2])
def test_a_lone_step_block_job_equals_plain_generate(lm, source):
    got, _, _ = run(lm, [message(source, x=A)])
    hook = (lambda i, out: out * 0 if i == 2 else None) if source is AT_2 else (lambda i, o: None)
    assert torch.equal(saved(got[0], "out"), plain_generate(lm, A, hook))


# A model whose layer 0 runs twice per forward (layers[1] is layers[0]): the calls counted.
TWICE = '''def job(model, x):
    with model.trace(x) as tracer:
        hs = list().save()
        for i in tracer.iter[0:2]:
            hs.append(model.model.layers[0].output)
        out = model.lm_head.output.save()
'''
ZERO_CALL_1 = '''def job(model, x):
    with model.trace(x) as tracer:
        with tracer.iter[1]:
            model.model.layers[0].output[:] = 0
        out = model.lm_head.output.save()
'''
OPEN = '''def job(model, x):
    with model.trace(x) as tracer:
        sums = list().save()
        for i in tracer.all():
            sums.append(model.model.layers[0].output.sum(-1))
        out = model.output.logits.save()
'''


def test_trace_step_blocks_in_a_shared_pass_count_each_modules_calls():
    from runtime import LanguageModel
    from runtime.tiny import tiny_llama

    module = tiny_llama(0, use_cache=False)
    module.model.layers[1] = module.model.layers[0]
    module.requires_grad_(False)
    root = LanguageModel(module)
    outputs_stable(root)  # the server's probe forward, before counting
    passes = []
    handle = module.register_forward_pre_hook(lambda *a: passes.append(1))
    try:
        jobs = [message(TWICE, x=C), message(ZERO_CALL_1, x=A), message(OPEN, x=B)]
        batched, _, _ = run(root, jobs)
        assert len(passes) == 1
        alone, _, _ = run(root, jobs, max_jobs=1)
        for got, ref in zip(batched, alone):
            same(got, ref)
    finally:
        handle.remove()
    # Against plain forward hooks on the layer.
    outs = []

    def record(mod, args, out):
        outs.append(out.clone())

    h = module.model.layers[0].register_forward_hook(record)
    try:
        with torch.no_grad():
            plain = module(C).logits
    finally:
        h.remove()
    hs = [batched[0][2][k] for k in tensor_refs(batched[0][1]["saved"]["hs"])]
    assert len(hs) == 2
    for got, want in zip(hs, outs):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(saved(batched[0], "out"), plain, atol=1e-4, rtol=0)

    def zero_call_1(mod, args, out):
        outs.append(1)
        return out * 0 if len(outs) == 2 else None

    outs.clear()
    h = module.model.layers[0].register_forward_hook(zero_call_1)
    try:
        with torch.no_grad():
            plain = module(A).logits
    finally:
        h.remove()
    torch.testing.assert_close(saved(batched[1], "out"), plain, atol=1e-4, rtol=0)
    assert len(tensor_refs(batched[2][1]["saved"]["sums"])) == 2  # the open block: both calls
