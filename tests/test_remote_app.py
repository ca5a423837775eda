"""The server's app in-process (FastAPI's TestClient, an httpx client over ASGI) with a
real worker process serving the tiny Llama: remote blocks against local runs, errors,
refusals, auth, limits, cancel and timeout (the worker killed and back)."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from serve_support import (
    http_fixture,  # noqa: F401 (a fixture)
    lm_fixture,  # noqa: F401 (a fixture)
    remote_fixture,  # noqa: F401 (a fixture)
    running,
    wait_for,
)

from compiler import intervene
from runtime.remote import client as remote_client
from runtime.remote import protocol
from runtime.serve import Engine, Limits, create_app

IDS = torch.tensor([[1, 5, 7, 9, 11]])
KEYS = {"key-a", "key-b"}


@pytest.fixture(scope="module")
def engine():
    eng = Engine(["tiny-llama"], Limits(job_timeout=4.0, max_result=2**20, max_print=4096,
                                        max_queued=3, max_memory=512 * 2**20,
                                        batch_max_jobs=1))  # queue positions: one at a time
    with running(eng):
        yield eng


def job_message(source: str, block: int = 0, values: dict | None = None, **header) -> bytes:
    trees, tensors = protocol.encode_values(values or {})
    head = {"protocol": protocol.PROTOCOL_VERSION, "compiler": remote_client.compiler_version(),
            "model": "tiny-llama",
            "function": "job", "source": source, "filename": "job.py", "first_line": 1,
            "block": block, "values": trees, **header}
    return protocol.pack(head, tensors)


def run_raw(http, data: bytes, headers: dict | None = None) -> dict:
    resp = http.post("/v1/jobs", content=data, headers=headers or {})
    assert resp.status_code == 202, resp.text
    job = resp.json()["id"]
    return wait_for(lambda: (s := http.get(f"/v1/jobs/{job}", headers=headers or {}).json())
                    ["status"] in ("COMPLETED", "ERROR", "CANCELLED") and s, 60)


LOOP = '''def job(model, x):
    with model.trace(x, remote=True):
        n = 0
        while True:
            n += 1
'''
HARMLESS = '''def job(model, x):
    with model.trace(x, remote=True):
        h = model.model.layers[1].output.save()
'''



@intervene
def forever(model, x):
    """A remote block that never ends (the server's time limit or a cancel stops it)."""
    with model.trace(x, remote=True):
        n = 0
        while True:
            n += 1
    return x


# -- the client against the app -------------------------------------------------------------
def test_health_and_env(http):
    assert http.get("/v1/health").json() == {"status": "ok", "ready": True,
                                             "models": {"tiny-llama": "ready"}}
    env = http.get("/v1/env").json()
    assert env["protocol"] == protocol.PROTOCOL_VERSION
    assert env["models"]["tiny-llama"]["state"] == "ready"
    assert env["limits"]["job_timeout"] == 4.0


def test_remote_trace_equals_local_bit_for_bit_and_prints(remote, lm, capsys):
    @intervene
    def run(model, x, scale, remote_flag):
        with model.trace(x, remote=remote_flag):
            hidden = model.model.layers[0].output.save()
            model.model.layers[1].output[:, -1] *= scale
            logits = model.lm_head.output.save()
            print("shape", tuple(hidden.shape))
        return hidden, logits

    local = run(lm, IDS, 0.5, False)
    assert capsys.readouterr().out == "shape (1, 5, 32)\n"
    got = run(lm, IDS, 0.5, True)
    assert capsys.readouterr().out == "shape (1, 5, 32)\n"  # streamed from the server
    for a, b in zip(got, local):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_remote_invokes_and_containers(remote, lm):
    @intervene
    def run(model, a, b, remote_flag):
        seen = []
        with model.trace(remote=remote_flag) as tracer:
            with tracer.invoke(a):
                first = model.model.layers[0].output[:, -1].save()
            with tracer.invoke(b):
                model.model.layers[0].output[:, -1] = first
                second = model.lm_head.output.save()
                seen.append(second.shape[1])
        return first, second, seen

    a, b = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6]])
    local = run(lm, a, b, False)
    got = run(lm, a, b, True)
    assert torch.equal(got[0], local[0]) and torch.equal(got[1], local[1])
    assert got[2] == local[2] == [3]  # the list the block appended to, changed here too


def test_remote_generate_and_cache(remote, lm):
    @intervene
    def gen(model, x, remote_flag):
        with model.generate(x, max_new_tokens=3, do_sample=False, remote=remote_flag) as tracer:
            tokens = model.generator.output.save()
        return tokens, tracer.result

    local = gen(lm, IDS, False)
    got = gen(lm, IDS, True)
    assert torch.equal(got[0], local[0]) and torch.equal(got[1], local[1])

    @intervene
    def cached(model, x, remote_flag):
        with model.trace(x, remote=remote_flag) as tracer:
            cache = tracer.cache(modules=[model.model.layers[0], model.model.norm])
        return cache

    here, there = cached(lm, IDS, False), cached(lm, IDS, True)
    assert sorted(there) == sorted(here)
    assert torch.equal(there["model.model.layers.0"].output, here["model.model.layers.0"].output)
    assert torch.equal(there.model.model.norm.output, here.model.model.norm.output)


def test_user_error_keeps_its_type_and_the_users_line(remote, lm):
    @intervene
    def run(model, x):
        with model.trace(x, remote=True):
            h = model.model.layers[0].output.save()
            y = h[7]  # noqa: F841 - the error is the point
        return h

    with pytest.raises(IndexError, match="index 7 is out of bounds") as info:
        run(lm, IDS)
    line = run.plan.functions[0].blocks[0].line + 2
    last = info.traceback[-1]
    assert last.path.name == "test_remote_app.py" and last.lineno + 1 == line
    assert "raised on the intervene server" in "".join(info.value.__notes__)


def test_refused_block_names_line_and_construct(remote, lm):
    @intervene
    def run(model, x):
        with model.trace(x, remote=True):
            w = model.lm_head.weight.save()
        return w

    from compiler.validate import ValidationError

    line = run.plan.functions[0].blocks[0].line + 1
    with pytest.raises(ValidationError, match=rf"line {line}: .*weight"):
        run(lm, IDS)


# -- the HTTP surface ------------------------------------------------------------------------------
def test_wrong_protocol_and_unknown_model_are_refused(http):
    resp = http.post("/v1/jobs", content=job_message(HARMLESS, protocol=99))
    assert resp.status_code == 400
    assert resp.json()["error"]["message"].startswith("the client speaks protocol 99 and this "
                                                      "server 1")
    resp = http.post("/v1/jobs", content=job_message(HARMLESS, model="gpt-9"))
    assert resp.status_code == 400
    assert "does not serve model 'gpt-9'; it serves: tiny-llama" in resp.json()["error"]["message"]
    resp = http.post("/v1/jobs", content=b"\x80\x04 not ours")
    assert resp.status_code == 400 and "bad magic" in resp.json()["error"]["message"]
    assert http.get("/v1/jobs/nope").status_code == 404


def test_api_keys(engine):
    with TestClient(create_app(engine, KEYS, manage_engine=False)) as tc:
        assert tc.get("/v1/health").status_code == 200  # no key needed
        assert tc.get("/v1/env").status_code == 401
        assert tc.get("/v1/env", headers={"Authorization": "Bearer nope"}).status_code == 403
        a = {"Authorization": "Bearer key-a"}
        done = run_raw(tc, job_message(HARMLESS, values={"x": IDS}), a)
        assert done["status"] == "COMPLETED"
        # Another key cannot see (or fetch, or cancel) it.
        for key in ({"X-API-Key": "key-b"}, {}):
            assert tc.get(f"/v1/jobs/{done['id']}", headers=key).status_code in (401, 404)
        assert tc.get(f"/v1/jobs/{done['id']}/result", headers=a).status_code == 200


def test_result_and_print_limits(http):
    big = '''def job(model, x):
    with model.trace(x, remote=True):
        z = torch.zeros(600, 600).save()
'''
    done = run_raw(http, job_message(big, values={"x": IDS}))
    assert done["status"] == "ERROR"
    assert "over this server's limit of 1.0 MiB" in done["error"]["message"]
    flood = '''def job(model, x):
    with model.trace(x, remote=True):
        for i in range(100000):
            print("spam spam spam spam")
'''
    resp = http.post("/v1/jobs", content=job_message(flood, values={"x": IDS}))
    job = resp.json()["id"]
    stream = http.get(f"/v1/jobs/{job}/events").text
    assert "print output over 4096 bytes; the rest is dropped" in stream
    assert stream.count("spam") < 4096 / 4
    assert '"status": "COMPLETED"' in stream


def test_cancel_timeout_queue_limit_and_the_worker_comes_back(http, engine):
    baseline = run_raw(http, job_message(HARMLESS, values={"x": IDS}))
    expected = http.get(f"/v1/jobs/{baseline['id']}/result").content
    restarts = engine.models()["tiny-llama"]["restarts"]

    looping = http.post("/v1/jobs", content=job_message(LOOP, values={"x": IDS})).json()["id"]
    queued = [http.post("/v1/jobs", content=job_message(HARMLESS, values={"x": IDS})).json()
              for _ in range(2)]
    assert queued[-1]["status"] == "QUEUED" and queued[-1]["position"] == 2
    over = http.post("/v1/jobs", content=job_message(HARMLESS, values={"x": IDS}))
    assert over.status_code == 429 and "3 jobs waiting or running" in over.text
    # Cancel one queued job, then the running one: the worker is killed and restarted.
    assert http.post(f"/v1/jobs/{queued[1]['id']}/cancel").json()["status"] == "CANCELLED"
    wait_for(lambda: http.get(f"/v1/jobs/{looping}").json()["status"] == "RUNNING", 10)
    http.post(f"/v1/jobs/{looping}/cancel")
    assert wait_for(lambda: http.get(f"/v1/jobs/{looping}").json()["status"] != "RUNNING",
                    10) and http.get(f"/v1/jobs/{looping}").json()["status"] == "CANCELLED"
    done = wait_for(lambda: (s := http.get(f"/v1/jobs/{queued[0]['id']}").json())["status"]
                    in ("COMPLETED", "ERROR") and s, 60)
    assert done["status"] == "COMPLETED"
    assert http.get(f"/v1/jobs/{queued[0]['id']}/result").content == expected

    # A job past the time limit is stopped, and the next one gives the same result.
    timed = run_raw(http, job_message(LOOP, values={"x": IDS}))
    assert timed["status"] == "ERROR" and timed["error"]["type"] == "TimeoutError"
    assert "longer than this server's limit of 4 s" in timed["error"]["message"]
    after = run_raw(http, job_message(HARMLESS, values={"x": IDS}))
    assert http.get(f"/v1/jobs/{after['id']}/result").content == expected
    assert engine.models()["tiny-llama"]["restarts"] == restarts + 2


def test_client_raises_a_remote_timeout(remote, lm):
    with pytest.raises(TimeoutError, match="the job ran longer than this server's limit of 4 s"):
        forever(lm, IDS)


def test_remote_scan_and_stop(remote, lm):
    @intervene
    def shapes(model, x, remote_flag):
        with model.scan(x, remote=remote_flag):
            shape = model.model.layers[1].output.shape.save()
        return shape

    assert shapes(lm, IDS, True) == shapes(lm, IDS, False) == torch.Size([1, 5, 32])

    @intervene
    def early(model, x, remote_flag):
        with model.trace(x, remote=remote_flag) as tracer:
            h = model.model.layers[0].output.save()
            tracer.stop()
        return h

    assert torch.equal(early(lm, IDS, True), early(lm, IDS, False))


def test_second_block_in_a_loop_uses_the_first_blocks_values(remote, lm):
    @intervene
    def run(model, x, remote_flag):
        with model.trace(x, remote=remote_flag):
            first = model.model.layers[0].output.save()
        outs = []
        for i in range(2):
            if i >= 0:
                with model.trace(x, remote=remote_flag):
                    model.model.layers[i].output[:] = first * (i + 1)
                    outs.append(model.lm_head.output[:, -1].save())
        return first, outs

    got, local = run(lm, IDS, True), run(lm, IDS, False)
    assert torch.equal(got[0], local[0])
    assert len(got[1]) == 2 and all(torch.equal(a, b) for a, b in zip(got[1], local[1]))


def test_memory_limit_fails_the_job_not_the_machine(http):
    hog = '''def job(model, x):
    with model.trace(x, remote=True):
        big = torch.ones(2**28)
        h = model.model.layers[1].output.save()
'''
    done = run_raw(http, job_message(hog, values={"x": IDS}))
    assert done["status"] == "ERROR" and done["error"]["type"] == "RuntimeError", done
    assert "can't allocate memory" in done["error"]["message"]
    after = run_raw(http, job_message(HARMLESS, values={"x": IDS}))
    assert after["status"] == "COMPLETED"


def test_ctrl_c_while_waiting_cancels_the_job(remote, lm, engine, monkeypatch):
    seen = {}

    def interrupted(self, http, resp):  # Ctrl-C once the job runs
        tag, body = next(protocol.read_frames(resp.iter_bytes()))
        assert tag == b"S"
        job = self.job_id = json.loads(body)["id"]
        wait_for(lambda: engine.jobs[job].status == "RUNNING", 10)
        seen["job"] = job
        raise KeyboardInterrupt

    monkeypatch.setattr(remote_client.Client, "_frames", interrupted)

    with pytest.raises(KeyboardInterrupt):
        forever(lm, IDS)
    job = engine.jobs[seen["job"]]
    wait_for(lambda: job.status != "RUNNING", 10)
    assert job.status == "CANCELLED" and "cancelled while running" in job.detail


# -- one request per job (POST /v1/run) and jobs an earlier run lost ---------------------------
PRINTS = '''def job(model, x):
    with model.trace(x, remote=True):
        print("first")
        h = model.model.layers[1].output.save()
        print("second")
'''


def test_run_streams_status_prints_and_the_result_in_one_response(http, engine):
    with http.stream("POST", "/v1/run", content=job_message(PRINTS, values={"x": IDS})) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == protocol.STREAM_TYPE
        frames = list(protocol.read_frames(resp.iter_bytes()))
    tags = [t for t, _ in frames]
    assert tags[0] == b"S" and tags[-1] == b"R" and tags.count(b"R") == 1
    first = json.loads(frames[0][1])
    assert first["status"] == "QUEUED" and first["id"].startswith(engine.boot)
    assert [json.loads(b)["text"] for t, b in frames if t == b"P"] == ["first\n", "second\n"]
    # The result inline is the one kept for a later GET (a client that lost the stream).
    job = first["id"]
    assert http.get(f"/v1/jobs/{job}").json()["status"] == "COMPLETED"
    assert frames[-1][1] == http.get(f"/v1/jobs/{job}/result").content
    header, tensors = protocol.unpack(frames[-1][1])
    assert protocol.decode_values(header["saved"], tensors)["h"].shape == (1, 5, 32)


def test_run_ends_with_the_final_status_of_a_failed_job(http):
    bad = '''def job(model, x):
    with model.trace(x, remote=True):
        h = model.model.layers[1].output.save()
        y = x[99]
'''
    with http.stream("POST", "/v1/run", content=job_message(bad, values={"x": IDS})) as resp:
        frames = list(protocol.read_frames(resp.iter_bytes()))
    end = json.loads(frames[-1][1])
    assert frames[-1][0] == b"S" and end["status"] == "ERROR"
    assert end["error"]["type"] == "IndexError" and end["error"]["line"] == 4
    # Refused before queueing: the same 400 with the error as POST /v1/jobs.
    resp = http.post("/v1/run", content=job_message(HARMLESS, values={"x": IDS}, protocol=0))
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "ProtocolError"


def test_a_job_of_an_earlier_run_of_the_server_is_lost_not_unknown(http, engine, remote, lm):
    other = ("0" if engine.boot[0] != "0" else "1") + engine.boot[1:] + "a" * 24
    resp = http.get(f"/v1/jobs/{other}")
    assert resp.status_code == 410
    assert resp.json()["detail"] == {
        "type": "JobLost",
        "message": f"the server restarted; job {other} was lost while running or waiting in "
                   "the queue (it did not finish), resubmit it"}
    for path in ("/result", "/events"):
        assert http.get(f"/v1/jobs/{other}{path}").status_code == 410
    # An id this run could have given but did not: plainly unknown.
    assert http.get(f"/v1/jobs/{engine.boot}{'b' * 24}").status_code == 404
    assert http.get("/v1/jobs/not-an-id").status_code == 404
    # The client asking about such a job raises a RemoteError with the server's text.
    with pytest.raises(remote_client.RemoteError, match=f"job {other} was lost") as info:
        remote_client.Client("http://test", None)._recover(http, other, None)
    assert info.value.type_name == "JobLost"


def test_frames_round_trip_and_a_cut_stream_is_an_error():
    data = protocol.frame(b"S", b'{"id": "x"}') + protocol.frame(b"R", b"\0" * 70_000)
    chunks = [data[i:i + 1000] for i in range(0, len(data), 1000)]
    assert list(protocol.read_frames(chunks)) == [(b"S", b'{"id": "x"}'), (b"R", b"\0" * 70_000)]
    with pytest.raises(protocol.ProtocolError, match="ended inside a frame"):
        list(protocol.read_frames([data[:-1]]))
