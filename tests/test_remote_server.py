"""End to end: a real server (``python -m runtime.serve``, uvicorn on 127.0.0.1 and a free
port) serving the default model, and remote blocks that must equal the same blocks run
locally: the seed's remote example, invokes, generation, backward, cache."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch

from compiler import intervene
from runtime import CONFIG, LanguageModel
from runtime.remote import client as remote_client

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The Eiffel Tower is in the city of"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 - closed in the fixture's finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.serve", "--model", "smollm2-135m", "--port", str(port),
         "--job-timeout", "120"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        ready = False
        for _ in range(600):  # at most about 3 minutes (a cold model load)
            if proc.poll() is not None:
                break
            try:
                ready = httpx.get(f"{url}/v1/health", timeout=2).json()["ready"]
            except (httpx.HTTPError, ValueError):
                ready = False
            if ready:
                break
            time.sleep(0.3)
        if not ready:
            log.seek(0)
            pytest.fail(f"the server did not come up:\n{log.read()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        os.unlink(log.name)


@pytest.fixture(scope="module")
def lm(default_lm):
    model, tokenizer = default_lm
    return LanguageModel(model, tokenizer=tokenizer)


@pytest.fixture
def remote(server, monkeypatch):
    monkeypatch.setattr(remote_client.Client, "http_override", None)
    CONFIG.set_default_host(server)
    try:
        yield server
    finally:
        CONFIG.set_default_host(None)


def test_health_and_env(remote):
    env = httpx.get(f"{remote}/v1/env").json()
    assert env["models"]["smollm2-135m"]["state"] == "ready"
    assert env["protocol"] == 1 and isinstance(env["torch"], str) and env["limits"]["job_timeout"] == 120


def test_seed_remote_example_equals_local(remote, lm):
    @intervene
    def last_hidden(model, prompt, remote_flag):
        with model.trace(prompt, remote=remote_flag):
            hidden = model.model.layers[-1].output.save()
        return hidden

    local = last_hidden(lm, PROMPT, False)
    got = last_hidden(lm, PROMPT, True)
    assert got.dtype == local.dtype and torch.equal(got, local)


def test_invokes_patching_equals_local(remote, lm):
    @intervene
    def patch(model, clean, corrupt, layer, remote_flag):
        with model.trace(remote=remote_flag) as tracer:
            with tracer.invoke(clean):
                h = model.model.layers[layer].output[:, -1, :]
            with tracer.invoke(corrupt):
                model.model.layers[layer].output[:, -1, :] = h
                logits = model.lm_head.output[:, -1].save()
        return logits

    args = (PROMPT, "The Colosseum is in the city of", 5)
    assert torch.equal(patch(lm, *args, True), patch(lm, *args, False))


def test_generation_gives_the_same_greedy_tokens(remote, lm):
    @intervene
    def steer(model, prompt, remote_flag):
        with model.generate(prompt, max_new_tokens=6, do_sample=False,
                            remote=remote_flag) as tracer:
            with tracer.all():
                model.model.layers[10].output[:, -1] *= 1.5
            tokens = model.generator.output.save()
        return tokens, tracer.result

    got, local = steer(lm, PROMPT, True), steer(lm, PROMPT, False)
    assert torch.equal(got[0], local[0]) and torch.equal(got[1], local[1])
    assert got[1].shape[1] == local[1].shape[1]


def test_backward_equals_local(remote, lm):
    target = lm.tokenizer(" Paris")["input_ids"][0]

    @intervene
    def saliency(model, prompt, target_id, remote_flag):
        with model.trace(prompt, remote=remote_flag):
            hidden = model.model.layers[-1].output
            hidden.requires_grad = True
            logits = model.lm_head.output
            loss = logits[0, -1, target_id]
            with loss.backward():
                grad = hidden.grad.save()
        return grad

    got = saliency(lm, PROMPT, target, True)
    local = saliency(lm, PROMPT, target, False)
    assert torch.equal(got, local) and got.abs().sum() > 0


def test_cache_equals_local(remote, lm):
    @intervene
    def lens(model, prompt, remote_flag):
        with model.trace(prompt, remote=remote_flag) as tracer:
            cache = tracer.cache(modules=[model.model.layers[i] for i in (0, 15, 29)])
        return cache

    got, local = lens(lm, PROMPT, True), lens(lm, PROMPT, False)
    assert sorted(got) == sorted(local) == [f"model.model.layers[{i}]" for i in (0, 15, 29)]
    for key in local:
        assert torch.equal(got[key].output, local[key].output)


def test_a_remote_only_user_never_loads_the_weights(remote, lm):
    lazy = LanguageModel("smollm2-135m")
    assert all(p.device.type == "meta" for p in lazy._module.parameters())

    @intervene
    def last_hidden(model, prompt):
        with model.trace(prompt, remote=True):
            hidden = model.model.layers[-1].output.save()
        return hidden

    got = last_hidden(lazy, PROMPT)
    assert all(p.device.type == "meta" for p in lazy._module.parameters())
    assert torch.equal(got, _local_last_hidden(lm))


def _local_last_hidden(lm):
    @intervene
    def last_hidden(model, prompt):
        with model.trace(prompt):
            hidden = model.model.layers[-1].output.save()
        return hidden

    return last_hidden(lm, PROMPT)
