"""Several users' jobs in one forward pass (runtime/serve/batch.py): each job's result
equals running it alone, jobs are isolated (rows, errors, stop, cache, a changed
model), and the engine's window and caps.  In-process on the tiny Llama (run_batch
straight), plus one engine with a real worker for the time limit."""

from __future__ import annotations

import json
import time

import pytest
import torch
from serve_support import running, wait_for
from test_remote_app import job_message

from runtime.remote import protocol
from runtime.serve import Engine, Limits, execute
from runtime.serve.batch import run_batch
from runtime.serve.engine import FINAL, Job
from runtime.serve.stable import outputs_stable
from runtime.serve.worker import load_model, pack_batch, unpack_batch

A = torch.tensor([[1, 5, 7, 9, 11]])
B = torch.tensor([[2, 3, 4, 5, 6]])
C = torch.tensor([[3, 3, 3, 3, 3], [8, 9, 10, 11, 12]])
SHORT = torch.tensor([[4, 4, 4]])

READ = '''def job(model, x):
    with model.trace(x):
        h = model.model.layers[0].output.save()
        out = model.lm_head.output.save()
'''
WRITE = '''def job(model, x):
    with model.trace(x):
        model.model.layers[0].output[:] = 0
        out = model.lm_head.output.save()
'''
INVOKES = '''def job(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            x = model.lm_head.output.save()
        with tracer.invoke(b):
            model.model.layers[1].output[:] = model.model.layers[1].output * 2
            y = model.lm_head.output.save()
        with tracer.invoke():
            everything = model.lm_head.output.save()
'''
CACHE = '''def job(model, x):
    with model.trace(x) as tracer:
        cache = tracer.cache()
        out = model.lm_head.output.save()
'''
BARRIER = '''def job(model, a, b):
    with model.trace() as tracer:
        bar = tracer.barrier(2)
        with tracer.invoke(a):
            h = model.model.layers[0].output
            bar()
        with tracer.invoke(b):
            bar()
            model.model.layers[0].output[:] = h
            y = model.lm_head.output.save()
'''
FAILS = '''def job(model, x):
    with model.trace(x):
        h = model.model.layers[0].output
        bad = h[7].save()
'''
STOP = '''def job(model, x):
    with model.trace(x) as tracer:
        h = model.model.layers[0].output.save()
        tracer.stop()
'''
def message(source: str, **values) -> bytes:
    return job_message(source, values=values)


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-llama")


@pytest.fixture
def forwards(lm):
    """How many forward passes of the whole model ran (after the server's probe
    forward: runtime/serve/stable.py)."""
    outputs_stable(lm)
    calls = []
    handle = lm._module.register_forward_pre_hook(lambda *a: calls.append(1))
    yield calls
    handle.remove()


def run(lm, jobs, max_jobs=16, max_tokens=4096, guard=None):
    """{job id: (tag, header, tensors) or (tag, error dict)}, and the print output."""
    out, prints = {}, {}

    def send(tag, job_id, body):
        if tag == b"P":
            prints[job_id] = prints.get(job_id, "") + body.decode()
        elif tag == b"R":
            out[job_id] = (tag, *protocol.unpack(body))
        else:
            out[job_id] = (tag, json.loads(body) if body else None)

    ids = [(f"{i:032d}", data, False) for i, data in enumerate(jobs)]
    changed = run_batch(lm, guard, ids, send, 2**24, 4096, max_jobs, max_tokens)
    return [out.get(i) for i, _, _ in ids], prints, changed


def saved(got, name):
    _, header, tensors = got
    return tensors[header["saved"][name]["k"]]


def same(got, alone):
    assert got[0] == alone[0] == b"R", (got, alone)
    assert got[2].keys() == alone[2].keys()
    for k in got[2]:
        assert got[2][k].shape == alone[2][k].shape
        torch.testing.assert_close(got[2][k], alone[2][k], atol=1e-4, rtol=0)


def test_shared_pass_equals_each_job_alone(lm, forwards):
    jobs = [message(READ, x=A), message(WRITE, x=B), message(INVOKES, a=A, b=C),
            message(CACHE, x=B), message(BARRIER, a=A, b=B), message(READ, x=C)]
    batched, _, _ = run(lm, jobs)
    assert len(forwards) == 1  # one forward pass for all six jobs
    alone, _, _ = run(lm, jobs, max_jobs=1)
    assert len(forwards) == 1 + len(jobs)
    for got, ref in zip(batched, alone):
        same(got, ref)
    # And against plain transformers: the reading job's logits.
    with torch.no_grad():
        plain = lm._module(A).logits
    torch.testing.assert_close(saved(batched[0], "out"), plain, atol=1e-4, rtol=0)


def test_each_job_sees_only_its_rows(lm, forwards):
    # `tracer.invoke()` without an input sees its job's rows (3), not the pass's (3 + 2 + 1).
    jobs = [message(INVOKES, a=A, b=C), message(READ, x=C), message(READ, x=B)]
    batched, _, _ = run(lm, jobs)
    assert len(forwards) == 1
    everything = saved(batched[0], "everything")
    assert everything.shape[0] == 3
    torch.testing.assert_close(everything, torch.cat([saved(batched[0], "x"),
                                                      saved(batched[0], "y")]))
    # A trace without invokes: its module values have its own rows only.
    assert saved(batched[1], "h").shape[0] == 2 and saved(batched[2], "h").shape[0] == 1
    # Reading a row it does not own fails that job alone (as alone: IndexError), the
    # others complete.
    jobs = [message(READ, x=A), message(FAILS, x=C), message(READ, x=B)]
    forwards.clear()
    batched, _, _ = run(lm, jobs)
    # The failed shared pass, the failing job alone, the other two together again.
    assert len(forwards) == 3
    alone, _, _ = run(lm, jobs, max_jobs=1)
    assert batched[1][0] == b"E" and batched[1][1]["type"] == "IndexError"
    assert batched[1][1] == alone[1][1]  # the same error, line and all
    same(batched[0], alone[0])
    same(batched[2], alone[2])


def test_module_cache_records_only_the_jobs_rows(lm, forwards):
    batched, _, _ = run(lm, [message(READ, x=C), message(CACHE, x=A), message(READ, x=B)])
    assert len(forwards) == 1
    tensors = batched[1][2]
    entries = [v for k, v in tensors.items() if v.dim() == 3]
    assert entries and all(t.shape[0] == 1 for t in entries)  # its one row of four


def test_stop_runs_alone_and_prints_arrive_once(lm, forwards):
    printing = READ.replace("        out = ", "        print('job', x.shape[0])\n        out = ")
    jobs = [message(printing, x=A), message(STOP, x=B), message(printing, x=C)]
    batched, prints, _ = run(lm, jobs)
    assert len(forwards) == 2  # the two readers together; the stopping job on its own
    alone, _, _ = run(lm, jobs, max_jobs=1)
    for got, ref in zip(batched, alone):
        same(got, ref)
    assert prints == {f"{0:032d}": "job 1\n", f"{2:032d}": "job 2\n"}
    # A failing job makes its shared pass run again alone: the others' output is not doubled.
    jobs = [message(printing, x=A), message(FAILS, x=A)]
    forwards.clear()
    batched, prints, _ = run(lm, jobs)
    assert batched[0][0] == b"R" and batched[1][0] == b"E"
    assert prints == {f"{0:032d}": "job 1\n"}
    assert len(forwards) == 3  # the failed shared pass, then each job alone


def test_jobs_of_other_lengths_or_over_the_caps_get_passes_of_their_own(lm, forwards):
    jobs = [message(READ, x=A), message(READ, x=SHORT), message(READ, x=B)]
    batched, _, _ = run(lm, jobs)
    assert len(forwards) == 2  # A and B (5 tokens) together; SHORT (3 tokens) alone
    alone, _, _ = run(lm, jobs, max_jobs=1)
    for got, ref in zip(batched, alone):
        same(got, ref)
    forwards.clear()
    run(lm, [message(READ, x=A)] * 4, max_jobs=2)
    assert len(forwards) == 2
    forwards.clear()
    run(lm, [message(READ, x=A)] * 4, max_tokens=10)  # 5 tokens each: two per pass
    assert len(forwards) == 2


def test_a_shared_pass_that_changed_the_model_sends_its_jobs_back(lm, monkeypatch):
    monkeypatch.setattr(execute, "validate", lambda *a: None)
    fresh = load_model("tiny-llama")
    guard = execute.ModelGuard(fresh._module)
    edit = '''def job(model, x):
    with model.trace(x):
        w = model.model.norm.weight.mul_(1)
'''
    got, _, changed = run(fresh, [message(READ, x=A), message(edit, x=B)], guard=guard)
    assert changed
    assert [g[0] for g in got] == [b"A", b"A"]  # to be run again alone, on a fresh model
    guard = execute.ModelGuard(fresh._module)
    got, _, changed = run(fresh, [message(edit, x=B)], guard=guard)
    assert changed and got[0][0] == b"E"
    assert "the job changed the served model" in got[0][1]["message"]


def test_batch_message_round_trip():
    jobs = [("a" * 32, b"one", False), ("b" * 32, b"", True), ("c" * 32, b"three", False)]
    assert unpack_batch(pack_batch(jobs, 16, 4096)) == (jobs, 16, 4096)


def test_window_and_cap():
    eng = Engine(["tiny-llama"], Limits(batch_window=0.05, batch_max_jobs=3))
    runner = eng.runners[0]  # not started: the queue alone
    jobs = [Job(f"{i:032d}", "k", "tiny-llama", b"") for i in range(5)]
    runner.queue.extend(jobs)
    t = time.monotonic()
    assert eng._next_batch(runner) == jobs[:3]  # the cap: no waiting once full
    assert time.monotonic() - t < 0.04
    t = time.monotonic()
    assert eng._next_batch(runner) == jobs[3:]  # waits out the window for company
    assert time.monotonic() - t >= 0.045
    alone = Job("x" * 32, "k", "tiny-llama", b"", alone=True)
    runner.queue.extend([jobs[0], alone, jobs[1]])
    assert eng._next_batch(runner) == [jobs[0]]  # a job to run alone is not joined
    assert eng._next_batch(runner) == [alone]
    assert eng._next_batch(runner) == [jobs[1]]
    one = Engine(["tiny-llama"], Limits(batch_max_jobs=1))
    one.runners[0].queue.extend(jobs[:2])
    assert one._next_batch(one.runners[0]) == [jobs[0]]
    assert eng.limits.public()["batch_max_jobs"] == 3


def test_cli_checks_the_batch_options():
    from runtime.serve.__main__ import main

    with pytest.raises(SystemExit):
        main(["--model", "tiny-llama", "--batch-max-jobs", "0"])


LOOP = '''def job(model, x):
    with model.trace(x):
        h = model.model.layers[0].output
        while True:
            h = h + 0
'''


def test_a_job_past_the_time_limit_or_cancelled_fails_alone_in_a_batch():
    eng = Engine(["tiny-llama"], Limits(job_timeout=3.0, batch_window=0.5))
    with running(eng):
        jobs = [eng.submit("k", "tiny-llama", message(READ, x=A)),
                eng.submit("k", "tiny-llama", message(LOOP, x=B)),
                eng.submit("k", "tiny-llama", message(READ, x=B))]
        wait_for(lambda: all(j.status in FINAL for j in jobs), 60)
        assert [j.status for j in jobs] == ["COMPLETED", "ERROR", "COMPLETED"], [j.error for j in jobs]
        assert jobs[1].error["type"] == "TimeoutError"
        with torch.no_grad():
            plain = load_model("tiny-llama")._module(A).logits
        got = (b"R", *protocol.unpack(jobs[0].result))
        torch.testing.assert_close(saved(got, "out"), plain, atol=1e-4, rtol=0)
        # Cancelling the looping job of a running batch: it ends CANCELLED, the others run.
        jobs = [eng.submit("k", "tiny-llama", message(LOOP, x=B)),
                eng.submit("k", "tiny-llama", message(READ, x=A))]
        wait_for(lambda: jobs[0].status == "RUNNING", 60, step=0.02)
        eng.cancel(jobs[0])
        wait_for(lambda: all(j.status in FINAL for j in jobs), 60)
        assert [j.status for j in jobs] == ["CANCELLED", "COMPLETED"], [j.error for j in jobs]
        got = (b"R", *protocol.unpack(jobs[1].result))
        torch.testing.assert_close(saved(got, "out"), plain, atol=1e-4, rtol=0)


INPUTS = '''def job(model, x):
    with model.trace(x):
        args, kwargs = model.model.layers[0].inputs
        first = args[0].save()
        out = model.lm_head.output.save()
'''


def test_a_job_reading_inputs_runs_alone(lm, forwards):
    # `.inputs` may hold keywords without the batch dimension first (cache_position,
    # position_ids of one row): rows of them would not be what the job sees alone.
    jobs = [message(READ, x=C), message(INPUTS, x=B), message(READ, x=A)]
    batched, _, _ = run(lm, jobs)
    assert len(forwards) == 2  # the readers together, the `.inputs` job alone
    alone, _, _ = run(lm, jobs, max_jobs=1)
    for got, ref in zip(batched, alone):
        same(got, ref)
    assert saved(batched[1], "first").shape[0] == 1


# Generate blocks: greedy jobs with the same generation keywords share one generate call.
GEN = '''def job(model, x):
    with model.generate(x, max_new_tokens=4, do_sample=False) as tracer:
        h = model.model.layers[0].output.save()
        out = model.generator.output.save()
'''
GEN_WRITE = '''def job(model, x):
    with model.generate(x, max_new_tokens=4, do_sample=False) as tracer:
        model.model.layers[0].output[:] = 0
        out = model.generator.output.save()
'''
GEN_INVOKES = '''def job(model, a, b):
    with model.generate(max_new_tokens=4, do_sample=False) as tracer:
        with tracer.invoke(a):
            logits = model.lm_head.output.save()
            x = model.generator.output.save()
        with tracer.invoke(b):
            model.model.layers[1].output[:] = model.model.layers[1].output * 2
            y = model.generator.output.save()
'''
GEN_CACHE = '''def job(model, x):
    with model.generate(x, max_new_tokens=4, do_sample=False) as tracer:
        cache = tracer.cache(modules=[model.model.layers[0]])
        out = model.generator.output.save()
'''
GEN_3 = GEN.replace("max_new_tokens=4", "max_new_tokens=3")
# Its first new token is forced to the end token (2): alone, generation stops there.
GEN_EOS = '''def job(model, x):
    with model.generate(x, max_new_tokens=4, do_sample=False) as tracer:
        model.lm_head.output[:, -1, 2] = 1e4
        out = model.generator.output.save()
'''
GEN_FAILS = FAILS.replace("model.trace(x)", "model.generate(x, max_new_tokens=4, do_sample=False)")


def tensor_refs(node) -> list[str]:
    """The tensors of an encoded value (a cache: one per module and step), in order."""
    if isinstance(node, dict):
        if node.get("t") == "tensor":
            return [node["k"]]
        return [r for v in node.values() for r in tensor_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in tensor_refs(v)]
    return []


def same_generate(got, alone):
    """The same saved values (token ids exactly, floats within 1e-4) and tracer.result."""
    assert got[0] == alone[0] == b"R", (got, alone)
    assert got[1]["saved"].keys() == alone[1]["saved"].keys()
    for name in [*got[1]["saved"], None]:
        g_node = got[1]["saved"][name] if name else got[1]["result"]
        a_node = alone[1]["saved"][name] if name else alone[1]["result"]
        gk, ak = tensor_refs(g_node), tensor_refs(a_node)
        assert len(gk) == len(ak) > 0, name
        for x, y in zip(gk, ak):
            g, a = got[2][x], alone[2][y]
            assert g.shape == a.shape and g.dtype == a.dtype, name
            if g.dtype == torch.long:
                assert torch.equal(g, a), name
            else:
                torch.testing.assert_close(g, a, atol=1e-4, rtol=0)


def test_generate_jobs_share_one_generate_call_and_equal_each_alone(lm, forwards):
    jobs = [message(GEN, x=A), message(GEN_WRITE, x=C), message(GEN_INVOKES, a=A, b=B),
            message(GEN, x=C), message(GEN_CACHE, x=B)]
    batched, _, _ = run(lm, jobs)
    assert len(forwards) == 4  # one generate call: 4 steps for all five jobs
    alone, _, _ = run(lm, jobs, max_jobs=1)
    assert len(forwards) == 4 + 5 * 4
    for got, ref in zip(batched, alone):
        same_generate(got, ref)
    # The write at step 0 changed its own job's tokens only (job 3 reads the same rows).
    assert not torch.equal(saved(batched[1], "out"), saved(batched[3], "out"))
    assert saved(batched[0], "h").shape[0] == 1 and saved(batched[3], "h").shape[0] == 2
    # The cache: one entry per step (4), each of the job's own row.
    shapes = [batched[4][2][k].shape for k in tensor_refs(batched[4][1]["saved"]["cache"])]
    assert shapes == [(1, 5, 32), (1, 1, 32), (1, 1, 32), (1, 1, 32)]
    # And against plain transformers' greedy generate.
    plain = lm._module.generate(A, max_new_tokens=4, do_sample=False)
    assert torch.equal(saved(batched[0], "out"), plain)
    assert torch.equal(saved(batched[2], "x"), plain)


def test_generate_jobs_with_other_keywords_get_calls_of_their_own(lm, forwards):
    # Other max_new_tokens, a trace, sampling: each a call of its own; a step block
    # shares the first job's call (tests/test_batching_steps.py).
    sampling = GEN.replace("do_sample=False", "do_sample=True")
    steps = GEN.replace("        h = model", "        with tracer.all():\n            h = model")
    jobs = [message(GEN, x=A), message(GEN_3, x=B), message(READ, x=C),
            message(sampling, x=A), message(steps, x=B)]
    batched, _, _ = run(lm, jobs)
    assert len(forwards) == 4 + 3 + 1 + 4
    assert batched[3][0] == batched[4][0] == b"R"
    alone, _, _ = run(lm, jobs, max_jobs=1)
    same_generate(batched[0], alone[0])
    same_generate(batched[1], alone[1])
    assert torch.equal(saved(batched[4], "out"), saved(alone[4], "out"))
    assert saved(batched[1], "out").shape == (1, 5 + 3)


def test_a_job_whose_generation_ends_sooner_alone_runs_again_alone(lm, forwards):
    jobs = [message(GEN, x=A), message(GEN_EOS, x=B), message(GEN, x=C)]
    batched, _, _ = run(lm, jobs)
    # The shared call (4 steps), then the job that ended at its first token, alone (1).
    assert len(forwards) == 4 + 1
    alone, _, _ = run(lm, jobs, max_jobs=1)
    for got, ref in zip(batched, alone):
        same_generate(got, ref)
    assert saved(batched[1], "out").tolist() == [[*B[0].tolist(), 2]]


def test_a_failing_generate_job_fails_alone(lm, forwards):
    jobs = [message(GEN, x=A), message(GEN_FAILS, x=C), message(GEN, x=B)]
    batched, _, _ = run(lm, jobs)
    alone, _, _ = run(lm, jobs, max_jobs=1)
    assert batched[1][0] == b"E" and batched[1][1]["type"] == "IndexError"
    assert batched[1][1] == alone[1][1]
    same_generate(batched[0], alone[0])
    same_generate(batched[2], alone[2])


def test_generate_jobs_through_the_engine_equal_plain_generate():
    eng = Engine(["tiny-llama"], Limits(batch_window=0.5))
    module = load_model("tiny-llama")._module
    with running(eng):
        jobs = [eng.submit("k", "tiny-llama", message(GEN, x=A)),
                eng.submit("k", "tiny-llama", message(GEN_EOS, x=B)),
                eng.submit("k", "tiny-llama", message(GEN, x=C))]
        wait_for(lambda: all(j.status in FINAL for j in jobs), 60)
        assert [j.status for j in jobs] == ["COMPLETED"] * 3, [j.error for j in jobs]
        got = [(b"R", *protocol.unpack(j.result)) for j in jobs]
    for x, g in ((A, got[0]), (C, got[2])):
        plain = module.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4,
                                do_sample=False)
        assert torch.equal(saved(g, "out"), plain)
        assert torch.equal(g[2][g[1]["result"]["k"]], plain)
    assert saved(got[1], "out").tolist() == [[*B[0].tolist(), 2]]
