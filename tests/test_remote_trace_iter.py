"""A step block in a remote trace (``tracer.iter[...]`` inside ``model.trace(..., remote=True)``)
against the same block run locally, on a real server (``python -m runtime.serve --model
tiny-llama`` on 127.0.0.1 and a free port, stopped at the end).

The server serves the tiny Llama (or a checkpoint), where every module runs once per
forward pass: so the step blocks here select call 0 (``[0:1]`` with a write, ``[0]``,
an open ``[:]`` as a ``for`` loop), and a selected call that never comes (``[0:2]``) must be
the same error remotely as locally.  Step blocks over modules called several times are
checked locally in test_trace_iter.py; what travels is the block's source, compiled again
on the server, so the counting is the same code on both sides.
"""

from __future__ import annotations

import pytest
import torch
from serve_support import free_port, serve, stop_server, tiny_lm

from compiler import intervene
from runtime import CONFIG
from runtime.errors import MissedCheckpointError
from runtime.remote import client as remote_client

IDS = torch.tensor([[1, 5, 7, 9, 11]])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    with open(tmp_path_factory.mktemp("serve") / "server.log", "w+") as log:
        proc = serve(port, log, "--job-timeout", "60")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_server(proc, 20)


@pytest.fixture
def remote(server, monkeypatch):
    """Remote blocks go to ``server`` (through INTERVENE_HOST; all undone after the test)."""
    monkeypatch.setattr(remote_client.Client, "http_override", None)
    monkeypatch.setattr(CONFIG, "_host", None)
    monkeypatch.setenv("INTERVENE_HOST", server)
    return server


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@intervene
def steps(model, x, remote_flag):
    with model.trace(x, remote=remote_flag) as tracer:
        firsts = [].save()
        with tracer.iter[0:1]:
            model.model.layers[0].mlp.output[:, -1] *= 0.5  # a write in the step block
            firsts.append(model.model.layers[0].output[0].clone())
        with tracer.iter[0]:
            norm = model.model.norm.output.save()
        each = [].save()
        for i in tracer.iter[:]:  # open: it runs to the end of the pass
            each.append((i, model.lm_head.output[0, -1].argmax()))
        logits = model.output.logits.save()
    return firsts, norm, each, logits


@intervene
def two_calls(model, x, remote_flag):
    with model.trace(x, remote=remote_flag) as tracer:  # noqa: SIM117 - a step block inside
        with tracer.iter[0:2]:
            h = model.model.layers[0].output.save()
    return h


def _same(got, want) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype
        assert torch.equal(got, want)
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want)
        for a, b in zip(got, want):
            _same(a, b)
    else:
        assert got == want


def test_a_remote_step_block_equals_the_local_run(remote, lm):
    local = steps(lm, IDS, False)
    firsts, _norm, each, logits = local
    assert len(firsts) == 1 and [i for i, _ in each] == [0]
    plain = lm._module(IDS).logits
    assert not torch.equal(logits, plain)  # the write in the step block took effect
    got = steps(lm, IDS, True)
    _same(got, local)


def test_a_call_that_never_comes_is_the_same_error_remotely(remote, lm):
    with pytest.raises(MissedCheckpointError) as info:
        two_calls(lm, IDS, False)
    local = str(info.value)
    assert local.startswith("`model.model.layers[0].output` of call 1 is asked for")
    assert "of call 1" in local and "ran only 1 time" in local
    with pytest.raises(MissedCheckpointError) as remote_info:  # the same type, from the server
        two_calls(lm, IDS, True)
    assert str(remote_info.value) == local  # the same line numbers: the user's file's
