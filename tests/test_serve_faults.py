"""Faults on the local engine (tiny Llama, loopback only, every wait bounded): a worker
killed in the middle of a job, a client that disconnects mid-stream and fetches its result
later from the results folder (``--results-dir``, ``--results-ttl``), a server that shuts
down or is killed and restarted with jobs in flight.  (A killed Ray replica:
tests/test_ray_engine.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from serve_support import (
    free_port,
    http_fixture,  # noqa: F401 (a fixture)
    running,
    stop_server,
    wait_healthy,
)
from test_remote_app import HARMLESS, IDS, LOOP, job_message, run_raw, wait_for

from runtime.remote import protocol
from runtime.serve import Limits, create_app
from runtime.serve.engine import FINAL
from runtime.serve.results import LocalEngine, ResultStore

ROOT = Path(__file__).resolve().parent.parent
PRINTS = '''def job(model, x):
    with model.trace(x, remote=True):
        for i in range(3):
            print("line", i)
        h = model.model.layers[1].output.save()
'''


@pytest.fixture(scope="module")
def results_dir():
    with tempfile.TemporaryDirectory(prefix="intervene-results-") as d:
        yield d


@pytest.fixture(scope="module")
def engine(results_dir):
    eng = LocalEngine(["tiny-llama"], Limits(job_timeout=20.0, max_queued=8,
                                             keep_finished=3600.0))
    eng.store = ResultStore(results_dir, ttl=3600.0)
    with running(eng):
        yield eng


@pytest.fixture(scope="module")
def expected(http):
    done = run_raw(http, job_message(HARMLESS, values={"x": IDS}))
    assert done["status"] == "COMPLETED"
    return http.get(f"/v1/jobs/{done['id']}/result").content


def saved(reply: bytes) -> dict:
    """The saved variables of a reply message."""
    header, tensors = protocol.unpack(reply)
    return protocol.decode_values(header["saved"], tensors)


def same_result(a: bytes, b: bytes) -> bool:
    """Equal saved values; tensors to 1e-4 (a job that shared a batched pass equals
    the same job alone to that, not always to the bit)."""
    x, y = saved(a), saved(b)
    if sorted(x) != sorted(y):
        return False
    for k in x:
        if isinstance(x[k], torch.Tensor):
            if not (x[k].shape == y[k].shape and x[k].dtype == y[k].dtype
                    and torch.allclose(x[k], y[k], rtol=1e-4, atol=1e-5)):
                return False
        elif x[k] != y[k]:
            return False
    return True


def final(http, job: str, seconds: float = 60) -> dict:
    return wait_for(lambda: (s := http.get(f"/v1/jobs/{job}").json())["status"] in FINAL
                    and s, seconds)


def test_a_killed_worker_fails_its_job_clearly_the_others_complete(http, engine, expected):
    """The looping job and three others, submitted together (they may share a batch): the
    worker is killed while the looping job runs.  Jobs of a killed batch are retried
    alone; the one still running when its worker dies alone fails, the others complete."""
    restarts = engine.models()["tiny-llama"]["restarts"]
    looping = http.post("/v1/jobs", content=job_message(LOOP, values={"x": IDS})).json()["id"]
    others = [http.post("/v1/jobs", content=job_message(HARMLESS, values={"x": IDS})).json()
              ["id"] for _ in range(3)]
    runner = engine.runners[0]
    kills = 0
    for _ in range(4):  # a batch, then the looping job alone: two kills; a few spare
        wait_for(lambda: http.get(f"/v1/jobs/{looping}").json()["status"] in FINAL
                 or (looping in [j.id for j in runner.current or ()] and runner._alive()), 30)
        if http.get(f"/v1/jobs/{looping}").json()["status"] in FINAL:
            break
        proc, alone = runner.proc, [j.id for j in runner.current] == [looping]
        os.kill(proc.pid, signal.SIGKILL)  # as the OOM killer would
        kills += 1
        wait_for(lambda p=proc: runner.proc is not p, 30)  # the runner saw it die
        if alone:
            break
    end = final(http, looping, 20)
    assert end["status"] == "ERROR" and end["error"]["type"] == "RuntimeError"
    assert end["error"]["message"].startswith("the worker process running the job died "
                                              "(exit code -9")
    assert end["error"]["message"].endswith("it is restarted")
    for job in others:  # in the batch or queued behind it: right results on a fresh worker
        assert final(http, job)["status"] == "COMPLETED"
        assert same_result(http.get(f"/v1/jobs/{job}/result").content, expected)
    assert engine.models()["tiny-llama"]["restarts"] == restarts + kills
    assert engine.models()["tiny-llama"]["state"] == "ready"


def test_a_client_that_disconnects_mid_stream_fetches_its_result_later(http, engine,
                                                                          expected):
    job = http.post("/v1/jobs", content=job_message(PRINTS, values={"x": IDS})).json()["id"]
    with http.stream("GET", f"/v1/jobs/{job}/events") as resp:
        first = next(resp.iter_lines())  # one event, then the client goes away
        assert first.startswith("event:")
    assert final(http, job)["status"] == "COMPLETED"
    # The server's memory forgets the job (as it does after Limits.keep_finished); the
    # results folder still has it.
    with engine.cond:
        del engine.jobs[job]
    status = http.get(f"/v1/jobs/{job}").json()
    assert status["status"] == "COMPLETED" and status["id"] == job
    assert http.get(f"/v1/jobs/{job}/result").content == expected
    # Its event stream ends at once with the final status (no endless heartbeats).
    text = http.get(f"/v1/jobs/{job}/events").text
    assert '"status": "COMPLETED"' in text and text.count("event:") == 1


def test_results_on_disk_are_private_to_their_key_and_expire(engine, expected, results_dir):
    with TestClient(create_app(engine, {"key-a", "key-b"}, manage_engine=False)) as tc:
        a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
        done = run_raw(tc, job_message(HARMLESS, values={"x": IDS}), a)
        with engine.cond:
            del engine.jobs[done["id"]]
        assert tc.get(f"/v1/jobs/{done['id']}/result", headers=a).content == expected
        assert tc.get(f"/v1/jobs/{done['id']}", headers=b).status_code == 404
        assert tc.get(f"/v1/jobs/{done['id']}/result", headers=b).status_code == 404
        # The key is on disk only as a hash.
        record = Path(results_dir, f"{done['id']}.json").read_text()
        assert "key-a" not in record and json.loads(record)["status"] == "COMPLETED"
        # No path of the caller's choosing is ever opened.
        assert tc.get("/v1/jobs/..%2F..%2Fetc%2Fpasswd", headers=a).status_code == 404
        # Past the TTL the record and the result are deleted.
        store = ResultStore(results_dir, ttl=1e-3)
        time.sleep(0.01)
        assert store.sweep(force=True) >= 1
        assert not Path(results_dir, f"{done['id']}.result").exists()
        assert tc.get(f"/v1/jobs/{done['id']}", headers=a).status_code == 404


def test_a_stopping_server_fails_in_flight_jobs_saying_why(results_dir):
    eng = LocalEngine(["tiny-llama"], Limits(job_timeout=20.0))
    eng.store = ResultStore(results_dir)
    eng.start()
    try:
        wait_for(eng.ready, 120)
        running = eng.submit("anonymous", "tiny-llama", job_message(LOOP, values={"x": IDS}))
        wait_for(lambda: running.status == "RUNNING", 20)
        queued = eng.submit("anonymous", "tiny-llama", job_message(HARMLESS, values={"x": IDS}))
    finally:
        eng.close()
    assert running.status == queued.status == "ERROR"
    assert running.error["message"].startswith("the server shut down while the job ran")
    assert queued.error["message"].startswith("the server shut down while the job waited")
    again = ResultStore(results_dir).load(running.id, "anonymous")
    assert again.status == "ERROR" and again.error == running.error


def start_server(port: int, results: str, log) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.serve", "--model", "tiny-llama", "--port", str(port),
         "--job-timeout", "60", "--results-dir", results, "--results-ttl", "600"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if wait_healthy(proc, f"http://127.0.0.1:{port}"):  # about 2 minutes at most
        return proc
    log.seek(0)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"the server did not come up:\n{log.read()[-3000:]}")


def test_a_killed_server_restarts_and_says_what_it_ended(tmp_path, expected):
    results = str(tmp_path / "results")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "w+") as log:
        proc = start_server(port, results, log)
        try:
            with httpx.Client(base_url=url, timeout=30) as c:
                done = c.post("/v1/jobs", content=job_message(HARMLESS, values={"x": IDS}))
                done = done.json()["id"]
                final(c, done)
                looping = c.post("/v1/jobs", content=job_message(LOOP, values={"x": IDS}))
                looping = looping.json()["id"]
                wait_for(lambda: c.get(f"/v1/jobs/{looping}").json()["status"] == "RUNNING",
                         20)
                queued = c.post("/v1/jobs", content=job_message(HARMLESS, values={"x": IDS}))
                queued = queued.json()["id"]
                assert c.get(f"/v1/jobs/{queued}").json()["status"] == "QUEUED"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the server and its worker, no goodbye
            proc.wait(10)
        proc = start_server(port, results, log)
        try:
            with httpx.Client(base_url=url, timeout=30) as c:
                ran = c.get(f"/v1/jobs/{looping}").json()
                assert ran["status"] == "ERROR" and ran["error"]["message"].startswith(
                    "the server restarted while the job ran")
                waited = c.get(f"/v1/jobs/{queued}").json()
                assert waited["status"] == "ERROR" and waited["error"]["message"].startswith(
                    "the server restarted while the job waited in the queue")
                # What completed before the restart is still there.
                assert c.get(f"/v1/jobs/{done}").json()["status"] == "COMPLETED"
                assert same_result(c.get(f"/v1/jobs/{done}/result").content, expected)
                # And the restarted server serves.
                again = c.post("/v1/jobs", content=job_message(HARMLESS, values={"x": IDS}))
                again = again.json()["id"]
                assert final(c, again)["status"] == "COMPLETED"
                assert same_result(c.get(f"/v1/jobs/{again}/result").content, expected)
        finally:
            stop_server(proc, 20)


def test_records_written_from_many_threads_end_with_the_latest_state(tmp_path):
    # The app's thread (queued) and the runner's (running, ended) write the same record at
    # once: no write may fail, and the last state wins.
    import threading

    from runtime.serve.engine import Job

    store = ResultStore(str(tmp_path))
    job = Job("a" * 32, "anonymous", "tiny-llama", b"")
    errors = []

    def write():
        try:
            for _ in range(50):
                store.record(job)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    job.status, job.result, job.finished = "COMPLETED", b"reply", time.time()
    store.record(job)
    for t in threads:
        t.join(30)
    assert errors == []
    again = store.load(job.id, "anonymous")
    assert again.status == "COMPLETED" and again.result == b"reply"
    assert store.load(job.id, "someone else") is None
    assert not list(tmp_path.glob("*.tmp"))


def test_a_model_that_cannot_load_fails_its_jobs_saying_why(tmp_path):
    from runtime.serve import Engine

    missing = str(tmp_path / "no-such-model")
    eng = Engine([missing], Limits(job_timeout=5.0))
    eng.start()
    try:
        wait_for(lambda: eng.models()[missing]["state"] == "failed", 60)
        job = eng.submit("k", missing, job_message(HARMLESS, values={"prompt": IDS}))
        wait_for(lambda: job.status in FINAL, 30)
    finally:
        eng.close()
    assert job.status == "ERROR", job.error
    assert job.error["type"] == "RuntimeError"
    assert job.error["message"].startswith(f"the server could not load model {missing!r}: "), job.error
