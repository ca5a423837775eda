"""``model.session()`` with remote traces (issue 11): each trace of a session runs on the
server (one request per trace) and the values flowing between them give the local
session's results.  ``model.session(remote=True)`` (one request for all):
tests/test_remote_session_whole.py."""

from __future__ import annotations

import pytest
import torch
from serve_support import (
    free_port,
    http_fixture,  # noqa: F401 (a fixture)
    lm_fixture,  # noqa: F401 (a fixture)
    remote_fixture,  # noqa: F401 (a fixture)
    running,
    serve,
    stop_server,
)

from compiler import intervene
from compiler.version import compiler_version
from runtime import CONFIG
from runtime.remote import client as remote_client
from runtime.serve import Engine, Limits

IDS = torch.tensor([[1, 5, 7, 9, 11]])
OTHER = torch.tensor([[2, 4, 6, 8, 10]])


@pytest.fixture(scope="module")
def engine():
    eng = Engine(["tiny-llama"], Limits(job_timeout=20.0, max_result=2**22, max_print=4096))
    with running(eng):
        yield eng


@intervene
def patched(model, clean, corrupt, remote_flag):
    with model.session():
        with model.trace(clean, remote=remote_flag):
            h = model.model.layers[0].output[:, -1]  # flows on without .save()
        with model.trace(corrupt, remote=remote_flag):
            model.model.layers[0].output[:, -1] = h
            logits = model.lm_head.output.save()
        with model.trace(clean, remote=remote_flag):
            model.model.layers[1].output[:] = model.model.layers[1].output * 0.5
            again = model.lm_head.output.save()
    return h, logits, again


def test_a_session_of_remote_traces_equals_the_local_session(remote, lm):
    local = patched(lm, IDS, OTHER, False)
    got = patched(lm, IDS, OTHER, True)
    for a, b in zip(got, local):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert not torch.equal(local[1], patched(lm, OTHER, OTHER, False)[1])  # the patch mattered


@intervene
def last_row(model, k):
    """A helper: shipped with each remote trace that calls it."""
    return model.model.layers[k].output[:, -1]


@intervene
def with_helper(model, clean, corrupt, remote_flag):
    with model.session():
        with model.trace(clean, remote=remote_flag):
            h = last_row(model, 0)
        with model.trace(corrupt, remote=remote_flag):
            model.model.layers[0].output[:, -1] = h
            logits = model.lm_head.output.save()
    return h, logits


def test_sessions_and_helpers_through_a_real_server_on_loopback(lm, monkeypatch, tmp_path):
    import httpx

    monkeypatch.setattr(remote_client.Client, "http_override", None)
    port = free_port()
    with open(tmp_path / "server.log", "w+") as log:
        proc = serve(port, log, "--job-timeout", "60")
        try:
            url = f"http://127.0.0.1:{port}"
            assert httpx.get(f"{url}/v1/env", timeout=10).json()["compiler"] == compiler_version()
            CONFIG.set_default_host(url)
            try:
                local = with_helper(lm, IDS, OTHER, False)
                got = with_helper(lm, IDS, OTHER, True)
            finally:
                CONFIG.set_default_host(None)
        finally:
            stop_server(proc, 20)
    for a, b in zip(got, local):
        assert a.dtype == b.dtype and torch.equal(a, b)
