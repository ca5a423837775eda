"""``model.generator.streamer.output`` (each step's new tokens) in remote generate
blocks: allowed by the server's validation, equal to the local run and to the new
tokens of plain ``generate``, alone or sharing a generate call; anything else named
``streamer`` is still refused."""

from __future__ import annotations

import torch
from test_batching import A, B, lm, message, run, saved  # noqa: F401 - lm is a fixture

STREAMED = '''def job(model, x):
    with model.generate(x, max_new_tokens=4, do_sample=False) as tracer:
        toks = list().save()
        with tracer.all():
            toks.append(model.generator.streamer.output)
        out = model.generator.output.save()
'''
NOT_A_MODULE = '''def job(model, x):
    with model.generate(x, max_new_tokens=4, do_sample=False) as tracer:
        with tracer.all():
            t = model.lm_head.streamer.output.save()
'''


def streamed(reply) -> list[int]:
    _, header, tensors = reply
    return [int(tensors[leaf["k"]]) for leaf in header["saved"]["toks"]["v"]]


def test_streamed_tokens_are_each_step_s_new_tokens_shared_or_alone(lm):  # noqa: F811
    shared, _, _ = run(lm, [message(STREAMED, x=A), message(STREAMED, x=B)])
    alone, _, _ = run(lm, [message(STREAMED, x=A), message(STREAMED, x=B)], max_jobs=1)
    for got, ref, x in zip(shared, alone, (A, B)):
        assert got[0] == ref[0] == b"R", (got, ref)
        with torch.no_grad():
            plain = lm._module.generate(x, max_new_tokens=4, do_sample=False)
        assert saved(got, "out").tolist() == plain.tolist()
        assert streamed(got) == streamed(ref) == plain[0, x.shape[1]:].tolist()


def test_streamer_of_anything_but_the_generator_is_refused(lm):  # noqa: F811
    (reply,), _, _ = run(lm, [message(NOT_A_MODULE, x=A)])
    assert reply[0] == b"E", reply
    assert "`streamer` is not a module of the served model" in reply[1]["message"], reply[1]
