"""``with model.session(remote=True):`` as ONE request: the session's source, its free
values and helpers go to the server, which runs its traces and the Python between them;
what the code after the session needs comes back (runtime/session.py,
compiler/session.py, compiler/validate.py ``validate_session``)."""

from __future__ import annotations

import pytest
import torch
from serve_support import (
    http_fixture,  # noqa: F401 (a fixture)
    lm_fixture,  # noqa: F401 (a fixture)
    remote_fixture,  # noqa: F401 (a fixture)
)
from test_remote_session import IDS, OTHER, engine  # noqa: F401 - engine: the server's, a fixture

from compiler import intervene
from compiler.validate import ValidationError
from runtime.remote import client as remote_client
from runtime.remote.protocol import UnsendableError


class Sent(list):
    """The jobs the client sent (one per ``Client.run``); ``http``: every HTTP request."""

    http: list


@pytest.fixture
def requests(remote, monkeypatch):
    """Every job the client sends (one per ``Client.run``), and still sent."""
    sent = Sent()
    sent.http = []
    real = remote_client.Client.run

    def run(self, data, *args, **kwargs):
        sent.append(data)
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(remote_client.Client, "run", run)
    def counted(verb: str):
        real_call = getattr(remote, verb)

        def call(*args, **kwargs):
            sent.http.append((verb, args[:2]))
            return real_call(*args, **kwargs)

        return call

    for verb in ("stream", "get", "post"):
        monkeypatch.setattr(remote, verb, counted(verb))
    return sent


@intervene
def patched(model, clean, corrupt, scale, where):
    with model.session(remote=where):
        with model.trace(clean):
            h = model.model.layers[0].output[:, -1].save()
            first = model.lm_head.output.save()
        boost = h * scale + first.mean()  # plain Python between the traces
        rows = [boost.sum().item()]
        with model.trace(corrupt):
            model.model.layers[0].output[:, -1] = boost
            logits = model.lm_head.output.save()
        top = int(logits[0, -1].argmax())
    return first, boost, rows, logits, top


def _hooks(lm, clean, corrupt, scale):
    """The same experiment with plain PyTorch hooks."""
    module = lm._module
    got = {}
    h1 = module.model.layers[0].register_forward_hook(
        lambda m, a, out: got.__setitem__("h", out[:, -1].clone()))
    try:
        with torch.no_grad():
            first = module(clean).logits
    finally:
        h1.remove()
    boost = got["h"] * scale + first.mean()

    def patch(m, a, out):
        out = out.clone()
        out[:, -1] = boost
        return out

    h2 = module.model.layers[0].register_forward_hook(patch)
    try:
        with torch.no_grad():
            logits = module(corrupt).logits
    finally:
        h2.remove()
    return first, boost, logits


def test_a_remote_session_is_one_request_and_equals_the_local_one(lm, requests):
    local = patched(lm, IDS, OTHER, 2.0, False)
    assert requests == []  # remote=False: the session ran here
    got = patched(lm, IDS, OTHER, 2.0, True)
    assert len(requests) == 1  # the whole session, both traces and the Python between
    assert requests.http == [("stream", ("POST", "/v1/run"))]  # one HTTP request
    for a, b in zip(got, local):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b)
        else:
            assert a == b
    first, boost, logits = _hooks(lm, IDS, OTHER, 2.0)
    assert torch.equal(got[0], first) and torch.equal(got[1], boost)
    assert torch.equal(got[3], logits)
    assert not torch.equal(logits, _hooks(lm, OTHER, OTHER, 0.0)[0])  # the patch mattered


@intervene
def with_container(model, x, outs, flag):
    with model.session(remote=True) as session:
        with model.trace(x, remote=flag):  # already remote: harmless
            a = model.model.layers[0].output.save()
        outs.append(a.sum())
        with model.trace(x):
            b = model.model.layers[1].output.save()
        unused = b * 2  # bound, not read after the session: not sent back  # noqa: F841
    return a, b, session.here


def test_containers_inner_remote_flags_and_what_comes_back(lm, requests):
    outs = []
    a, b, here = with_container(lm, IDS, outs, True)
    assert len(requests) == 1 and here is False
    with lm.trace(IDS):
        la = lm.model.layers[0].output.save()
        lb = lm.model.layers[1].output.save()
    assert torch.equal(a, la) and torch.equal(b, lb)
    assert len(outs) == 1 and torch.equal(outs[0], la.sum())  # changed in place, as locally
    from runtime.remote import protocol

    header, _ = protocol.unpack(requests[0])
    assert header["session"] is True and header["saved"] == ["a", "b"]


@intervene
def failing(model, x):
    with model.session(remote=True):
        with model.trace(x):
            h = model.model.layers[0].output.save()
        bad = h[0, 99]  # raises on the server
        with model.trace(x):
            model.model.layers[0].output[:] = bad
    return h


def test_an_error_in_the_session_is_raised_at_the_users_line(lm, requests):
    import traceback

    with pytest.raises(IndexError) as info:
        failing(lm, IDS)
    line = failing.__wrapped__.__code__.co_firstlineno + 5  # `bad = h[0, 99]`
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].filename == __file__ and frames[-1].lineno == line
    assert "index 99 is out of bounds" in str(info.value)
    assert len(requests) == 1


@intervene
def reads_source(model, x):
    with model.session(remote=True):  # noqa: SIM117 - a session around its trace
        with model.trace(x):
            h = model.model.layers[0].self_attn.source.q_proj_0.output.save()
    return h


@intervene
def reads_source_trace(model, x):
    with model.trace(x, remote=True):
        h = model.model.layers[0].self_attn.source.q_proj_0.output.save()
    return h


def test_what_a_remote_trace_refuses_a_remote_session_refuses_alike(lm, requests):
    with pytest.raises(ValidationError) as in_session:
        reads_source(lm, IDS)
    with pytest.raises(ValidationError) as in_trace:
        reads_source_trace(lm, IDS)
    s_line = reads_source.__wrapped__.__code__.co_firstlineno + 4
    t_line = reads_source_trace.__wrapped__.__code__.co_firstlineno + 3
    assert in_session.value.line == s_line and in_trace.value.line == t_line
    assert str(in_session.value).replace(str(s_line), "N") == str(in_trace.value).replace(
        str(t_line), "N")
    assert "source" in str(in_session.value)


@intervene
def python_refused(model, x):
    with model.session(remote=True):
        with model.trace(x):
            h = model.model.layers[0].output.save()
        w = h.__class__  # plain Python between the traces is checked too
    return w


def test_the_python_between_the_traces_is_checked(lm, requests):
    with pytest.raises(ValidationError, match="attributes starting with `_`"):
        python_refused(lm, IDS)


def test_an_unsendable_value_is_refused_before_any_request(lm, requests):
    @intervene
    def sends_object(model, x, thing):
        with model.session(remote=True):
            with model.trace(x):
                h = model.model.layers[0].output.save()
            y = thing(h)
        return y

    with pytest.raises(UnsendableError, match="the remote session cannot send"):
        sends_object(lm, IDS, object())
    assert requests == []


def test_an_undecorated_remote_session_is_one_request_too(lm, requests):
    scale = 2.0
    with lm.session(remote=True) as session:  # compiled from this file when entered
        with lm.trace(IDS):
            h = lm.model.layers[0].output[:, -1].save()
        boost = h * scale
        with lm.trace(OTHER):
            lm.model.layers[0].output[:, -1] = boost
            logits = lm.lm_head.output.save()
    assert len(requests) == 1 and session.here is False
    local = patched(lm, IDS, OTHER, scale, False)
    with lm.trace(IDS):
        h_local = lm.model.layers[0].output[:, -1].save()
    assert torch.equal(h, h_local) and torch.equal(boost, h_local * scale)
    with lm.trace(OTHER):
        lm.model.layers[0].output[:, -1] = h_local * scale
        want = lm.lm_head.output.save()
    assert torch.equal(logits, want) and local[3].shape == logits.shape


SCRIPT = """with model.session(remote=True):
    with model.trace(ids):
        h = model.model.layers[0].output.save()
    n = float(h.norm())
    with model.trace(ids):
        model.model.layers[0].output[:] = h / n
        out = model.model.layers[1].output.save()
print(n > 0)
"""


def test_a_remote_session_on_a_scripts_first_line(lm, requests, tmp_path, capsys):
    import runpy

    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    got = runpy.run_path(str(path), init_globals={"model": lm, "ids": IDS})
    assert len(requests) == 1 and capsys.readouterr().out == "True\n"
    with lm.trace(IDS):
        h = lm.model.layers[0].output.save()
    with lm.trace(IDS):
        lm.model.layers[0].output[:] = h / float(h.detach().norm())
        out = lm.model.layers[1].output.save()
    assert torch.equal(got["h"], h) and got["n"] == float(h.detach().norm())
    assert torch.equal(got["out"], out)


def test_a_session_takes_only_remote(lm):
    with pytest.raises(TypeError, match="takes no keywords but remote=; got stream"):
        lm.session(remote=True, stream=1)


@intervene
def generating(model, x):
    with model.session(remote=True):
        with model.trace(x):
            h = model.model.layers[0].output[:, -1].save()
        with model.generate(x, max_new_tokens=3) as tracer:
            model.model.layers[0].output[:, -1] = h * 3
            first = model.lm_head.output.save()
        tokens = tracer.result  # plain Python after the generate block
    return h, first, tokens


def test_a_generate_block_in_a_remote_session(lm, requests):
    @intervene
    def here(model, x):
        with model.session():
            with model.trace(x):
                h = model.model.layers[0].output[:, -1].save()
            with model.generate(x, max_new_tokens=3) as tracer:
                model.model.layers[0].output[:, -1] = h * 3
                first = model.lm_head.output.save()
            tokens = tracer.result
        return h, first, tokens

    got, local = generating(lm, IDS), here(lm, IDS)
    assert len(requests) == 1
    for a, b in zip(got, local):
        assert torch.equal(a, b)
    assert got[2].shape == (1, IDS.shape[1] + 3)


SESSION = '''def job(model, x):
    with model.session(remote=True):
        with model.trace(x):
            h = model.model.layers[0].output.save()
        g = h * 2
        with model.trace(x):
            model.model.layers[0].output[:] = g
            out = model.lm_head.output.save()
'''
READ = '''def job(model, x):
    with model.trace(x):
        out = model.lm_head.output.save()
'''


def _message(source: str, session: bool, saved: list, **values) -> bytes:
    from compiler.version import compiler_version
    from runtime.remote import protocol

    trees, tensors = protocol.encode_values(values)
    head = {"protocol": protocol.PROTOCOL_VERSION, "compiler": compiler_version(),
            "model": "tiny-llama", "function": "job", "source": source, "filename": "job.py",
            "first_line": 1, "block": 0, "values": trees, "saved": saved}
    if session:
        head["session"] = True
    return protocol.pack(head, tensors)


def test_a_session_job_runs_alone_in_a_batch(lm):
    """In a worker's batch, the session job's traces run in passes of their own; the
    trace jobs still share theirs."""
    import json

    from runtime.remote import protocol
    from runtime.serve.batch import run_batch
    from runtime.serve.stable import outputs_stable
    from runtime.serve.worker import load_model

    root = load_model("tiny-llama")
    outputs_stable(root)  # the server's probe forward, before counting
    passes = []
    hook = root._module.register_forward_pre_hook(lambda *a: passes.append(1))
    out = {}

    def send(tag, job_id, body):
        if tag == b"R":
            header, tensors = protocol.unpack(body)
            out[job_id] = {k: tensors[v["k"]] for k, v in header["saved"].items()}
        elif tag == b"E":
            out[job_id] = json.loads(body)

    jobs = [("0" * 32, _message(READ, False, ["out"], x=IDS), False),
            ("1" * 32, _message(SESSION, True, ["g"], x=IDS), False),
            ("2" * 32, _message(READ, False, ["out"], x=OTHER), False)]
    try:
        assert run_batch(root, None, jobs, send, 2**24, 4096) is False
    finally:
        hook.remove()
    assert len(passes) == 3  # the two trace jobs share one pass; the session runs two
    session = out["1" * 32]
    assert sorted(session) == ["g", "h", "out"]
    with lm.trace(IDS):
        h = lm.model.layers[0].output.save()
    with lm.trace(IDS):
        lm.model.layers[0].output[:] = h * 2
        logits = lm.lm_head.output.save()
    assert torch.equal(session["h"], h) and torch.equal(session["g"], h * 2)
    torch.testing.assert_close(session["out"], logits, rtol=0, atol=0)
    with lm.trace(OTHER):
        other = lm.lm_head.output.save()
    torch.testing.assert_close(out["2" * 32]["out"], other, rtol=0, atol=1e-4)


def test_a_session_index_that_does_not_exist_is_refused(http):
    data = _message(READ, True, [], x=IDS)
    resp = http.post("/v1/run", content=data)
    assert b"session 0 does not exist: `job` has 0 session(s)" in resp.content


@pytest.mark.parametrize(("source", "message"), [
    (("def job(model, x):\n    with model.session(remote=True):\n        with model.trace(x):\n"
     "            h = model.model.layers[0].output.save()\n        import os\n"),
     b"imports are not allowed in remote blocks"),
    (("def job(model, x, other):\n    with model.session(remote=True):\n"
     "        with other.trace(x):\n            h = other.lm_head.output.save()\n"),
     b"a remote session runs blocks of its own model only"),
    (("def job(model, x):\n    with model.session(remote=True):\n        def f():\n"
     "            pass\n        with model.trace(x):\n            h = model.lm_head.output.save()\n"),
     b"function definitions are not allowed"),
    (("def job(model, x):\n    with model.session(remote=True):\n"
     "        with model.trace(x) as tracer:\n            h = model.lm_head.output.save()\n"
     "        w = tracer.register_hook\n"),
     b"register_hook"),
    (("def job(model, x):\n    with model.session(remote=True):\n"
     "        p = model.lm_head.weight\n"),
     b"weight"),
])
def test_hostile_sessions_are_refused_before_running(http, source, message):
    resp = http.post("/v1/run", content=_message(source, True, [], x=IDS))
    assert b"ValidationError" in resp.content and message in resp.content, resp.content[-400:]


@intervene
def tracer_after(model, x):
    with model.session(remote=True):  # noqa: SIM117 - a session around its trace
        with model.generate(x, max_new_tokens=2) as tracer:
            h = model.model.layers[0].output.save()
    return h, tracer.result


def test_a_tracer_read_after_a_remote_session_says_what_to_do(lm, requests):
    with pytest.raises(TypeError) as info:
        tracer_after(lm, IDS)
    assert str(info.value) == (
        "`tracer`, the tracer of a trace of the remote session, is read after the session, "
        "but a tracer stays on the server: read what you need of it into a variable inside "
        "the session (`tokens = tracer.result`)")


@intervene
def last_row(model, k):
    """A helper: shipped with the session that calls it."""
    return model.model.layers[k].output[:, -1]


@intervene
def with_helper(model, clean, corrupt, where):
    with model.session(remote=where):
        with model.trace(clean):
            h = last_row(model, 0).save()
        with model.trace(corrupt):
            model.model.layers[0].output[:, -1] = h
            logits = model.lm_head.output.save()
    return h, logits


def test_a_remote_session_ships_its_helpers(lm, requests):
    local = with_helper(lm, IDS, OTHER, False)
    got = with_helper(lm, IDS, OTHER, True)
    assert len(requests) == 1
    for a, b in zip(got, local):
        assert torch.equal(a, b)


@intervene
def one_with(model, x):
    with model.session(remote=True), model.trace(x):
        h = model.model.layers[0].output.save()
    return h


def test_a_session_and_its_trace_in_one_with_says_what_to_write(lm, requests):
    with pytest.raises(SyntaxError, match="write it as a `with` statement of its own"):
        one_with(lm, IDS)
    assert requests == []


def test_a_remote_session_without_a_trace_sends_back_what_it_bound():
    """Plain Python in a session (no trace block in it): its variables come back, not a
    server error (the reply looked for the first trace's saves)."""
    from test_batching import run

    from runtime.remote import protocol
    from runtime.serve.worker import load_model

    source = ("def job(model, x):\n    with model.session(remote=True):\n"
              "        a = x * 2\n        b = 3\n")
    got, _, _ = run(load_model("tiny-llama"), [_message(source, True, ["a", "b"], x=IDS)],
                    max_jobs=1)
    assert got[0][0] == b"R", got[0]
    header, tensors = got[0][1], got[0][2]
    assert torch.equal(tensors[header["saved"]["a"]["k"]], IDS * 2)
    assert protocol.decode_values({"b": header["saved"]["b"]}, tensors) == {"b": 3}
