"""The Ray engine (``--engine ray``): a local Ray instance (2 CPUs, no dashboard, node on
127.0.0.1) with the tiny Llama in two replicas, behind the same app.  The integration
checks of the local engine (tests/test_remote_app.py) run against it unchanged, plus what
only replicas do: two jobs at once, a killed replica (its job fails clearly, the others
complete, it comes back), a job that changed the model replaces its replica, and the
``python -m runtime.serve --engine ray`` command line end to end."""

from __future__ import annotations

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
from serve_support import (
    free_port,
    http_fixture,  # noqa: F401 (a fixture)
    lm_fixture,  # noqa: F401 (a fixture)
    remote_fixture,  # noqa: F401 (a fixture)
    stop_server,
)
from test_remote_app import (  # the local engine's integration checks, run here as well
    HARMLESS,
    IDS,
    LOOP,
    job_message,
    run_raw,
    test_api_keys,
    test_client_raises_a_remote_timeout,
    test_ctrl_c_while_waiting_cancels_the_job,
    test_health_and_env,
    test_refused_block_names_line_and_construct,
    test_remote_generate_and_cache,
    test_remote_invokes_and_containers,
    test_remote_scan_and_stop,
    test_remote_trace_equals_local_bit_for_bit_and_prints,
    test_result_and_print_limits,
    test_second_block_in_a_loop_uses_the_first_blocks_values,
    test_user_error_keeps_its_type_and_the_users_line,
    test_wrong_protocol_and_unknown_model_are_refused,
    wait_for,
)
from test_serve_faults import same_result

from runtime.remote import client as remote_client
from runtime.serve import Limits

ray = pytest.importorskip("ray")
from runtime.serve.ray_engine import RayEngine, ReplicaActor

ROOT = Path(__file__).resolve().parent.parent
REUSED = [test_api_keys, test_client_raises_a_remote_timeout,
          test_ctrl_c_while_waiting_cancels_the_job, test_health_and_env,
          test_refused_block_names_line_and_construct, test_remote_generate_and_cache,
          test_remote_invokes_and_containers, test_remote_scan_and_stop,
          test_remote_trace_equals_local_bit_for_bit_and_prints, test_result_and_print_limits,
          test_second_block_in_a_loop_uses_the_first_blocks_values,
          test_user_error_keeps_its_type_and_the_users_line,
          test_wrong_protocol_and_unknown_model_are_refused]


def all_replicas_ready(engine) -> bool:
    return all(p.state == "ready" for r in engine.runners for p in r.replicas)


@pytest.fixture(scope="module")
def engine():
    eng = RayEngine(["tiny-llama"], Limits(job_timeout=4.0, max_result=2**20, max_print=4096,
                                           max_queued=3), replicas=2, num_cpus=2,
                    replica_threads=torch.get_num_threads())  # as the local runs here
    try:
        eng.start()
        wait_for(lambda: all_replicas_ready(eng), 180)
        yield eng
    finally:
        eng.close()  # stops the actors and the local Ray instance, even after a failure
    assert not ray.is_initialized()


@pytest.fixture(autouse=True)
def replicas_back(request):
    """Each test starts with both replicas up (a test before may have replaced one)."""
    if "engine" in request.fixturenames:
        eng = request.getfixturevalue("engine")
        if eng.runners[0].replicas[0].is_alive():
            wait_for(lambda: all_replicas_ready(eng), 120)


def looping_job(http, engine) -> tuple[bytes, int, str]:
    """A harmless job's result, the replicas' restarts so far, and the id of a job that
    loops, once it runs (on one replica)."""
    baseline = run_raw(http, job_message(HARMLESS, values={"x": IDS}))
    expected = http.get(f"/v1/jobs/{baseline['id']}/result").content
    restarts = engine.models()["tiny-llama"]["restarts"]
    looping = http.post("/v1/jobs", content=job_message(LOOP, values={"x": IDS})).json()["id"]
    wait_for(lambda: http.get(f"/v1/jobs/{looping}").json()["status"] == "RUNNING", 10)
    return expected, restarts, looping


def test_ray_is_not_imported_by_the_local_server():
    code = ("import sys, runtime.serve, runtime.serve.__main__, runtime.serve.results; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.stdout.strip() == "False", out.stderr


def test_env_shows_the_replicas(http, engine):
    env = http.get("/v1/env").json()
    replicas = env["models"]["tiny-llama"]["replicas"]
    assert len(replicas) == 2 and {r["state"] for r in replicas} == {"ready"}
    assert ray.cluster_resources()["CPU"] == 2


def test_two_replicas_run_two_jobs_at_once_and_cancel_replaces_one(http, engine):
    expected, restarts, looping = looping_job(http, engine)
    # The other replica serves while the first one is busy.
    done = run_raw(http, job_message(HARMLESS, values={"x": IDS}))
    assert done["status"] == "COMPLETED"
    assert http.get(f"/v1/jobs/{looping}").json()["status"] == "RUNNING"
    assert http.get(f"/v1/jobs/{done['id']}/result").content == expected
    http.post(f"/v1/jobs/{looping}/cancel")
    end = wait_for(lambda: (s := http.get(f"/v1/jobs/{looping}").json())["status"]
                   != "RUNNING" and s, 10)
    assert end["status"] == "CANCELLED" and "Ray replica was stopped" in end["detail"]
    assert engine.models()["tiny-llama"]["restarts"] == restarts + 1
    wait_for(lambda: all_replicas_ready(engine), 120)


def test_a_killed_replica_fails_its_job_clearly_and_comes_back(http, engine):
    expected, restarts, looping = looping_job(http, engine)
    others = [http.post("/v1/jobs", content=job_message(HARMLESS, values={"x": IDS})).json()
              ["id"] for _ in range(2)]
    replica = next(p for p in engine.runners[0].replicas
                   if looping in [j.id for j in p.current or ()])
    os.kill(replica.pid, signal.SIGKILL)  # the actor's process, as the OOM killer would
    end = wait_for(lambda: (s := http.get(f"/v1/jobs/{looping}").json())["status"]
                   != "RUNNING" and s, 30)
    assert end["status"] == "ERROR" and end["error"]["type"] == "RuntimeError"
    assert end["error"]["message"].startswith("the Ray replica running the job died")
    assert "it is restarted" in end["error"]["message"]
    for job in others:
        done = wait_for(lambda j=job: (s := http.get(f"/v1/jobs/{j}").json())["status"]
                        in ("COMPLETED", "ERROR", "CANCELLED") and s, 60)
        assert done["status"] == "COMPLETED"  # the two may share a pass: 1e-4
        assert same_result(http.get(f"/v1/jobs/{job}/result").content, expected)
    wait_for(lambda: all_replicas_ready(engine), 120)  # the replica came back
    assert engine.models()["tiny-llama"]["restarts"] == restarts + 1
    assert replica.pid is not None and replica.state == "ready"
    # Both replicas serve again: two jobs, both right.
    again = [run_raw(http, job_message(HARMLESS, values={"x": IDS})) for _ in range(2)]
    assert all(http.get(f"/v1/jobs/{d['id']}/result").content == expected for d in again)


def test_jobs_submitted_together_complete_right(http, engine):
    """Jobs that arrive together may go to a replica as one batch (the local engine's
    window and caps): each equals the job run alone to 1e-4."""
    baseline = run_raw(http, job_message(HARMLESS, values={"x": IDS}))
    expected = http.get(f"/v1/jobs/{baseline['id']}/result").content
    ids = [http.post("/v1/jobs", content=job_message(HARMLESS, values={"x": IDS})).json()
           ["id"] for _ in range(3)]
    for job in ids:
        done = wait_for(lambda j=job: (s := http.get(f"/v1/jobs/{j}").json())["status"]
                        in ("COMPLETED", "ERROR", "CANCELLED") and s, 60)
        assert done["status"] == "COMPLETED"
        assert same_result(http.get(f"/v1/jobs/{job}/result").content, expected)


def test_a_job_that_changes_the_model_retires_its_replica(monkeypatch):
    # The allowlist keeps weights out of reach; this checks the guard behind it, in one
    # replica object run in this process with the allowlist switched off.
    import json

    from runtime.remote import protocol
    from runtime.serve import execute

    monkeypatch.setattr(execute, "validate", lambda *a: None)
    actor = ReplicaActor("tiny-llama", 2**20, 4096)
    assert actor.ready()[:1] == b"Y"
    source = '''def job(model, x):
    with model.trace(x):
        print("editing")
        w = model.model.norm.weight.mul_(2)
'''
    trees, tensors = protocol.encode_values({"x": torch.tensor([[1, 2, 3]])})
    data = protocol.pack({"protocol": 1, "model": "tiny-llama", "function": "job",
                          "source": source, "filename": "job.py", "first_line": 1,
                          "block": 0, "values": trees}, tensors)
    from runtime.serve.worker import pack_batch

    job = "b" * 32
    msgs = list(actor.run_batch(pack_batch([(job, data, False)], 16, 4096)))
    assert msgs[0] == b"P" + job.encode() + b"editing\n"
    assert [m[:33] for m in msgs[1:]] == [b"E" + job.encode(), b"X"]
    message = json.loads(msgs[1][33:])["message"]
    assert message.startswith("the job changed the served model (parameter `model.model.norm.weight` "
                              "was modified in place)")


def test_replica_that_cannot_load_fails_the_jobs_not_hangs(engine):
    # Not through Ray (a second instance would not fit in 2 CPUs): the model object's
    # bookkeeping when every replica failed to start.
    from runtime.serve.ray_engine import RayModel

    model = RayModel(engine, "no-such-model", 1)
    model.replicas[0].state = "failed"
    model.replicas[0].failure = "OSError: no-such-model is not a model"
    from runtime.serve.engine import Job

    job = Job("0" * 32, "anonymous", "no-such-model", b"x")
    engine.jobs[job.id] = job
    model.queue.append(job)
    model.replica_failed()
    assert job.status == "ERROR" and "could not load model 'no-such-model': OSError" in \
        job.error["message"]
    del engine.jobs[job.id]


def test_command_line_errors():
    for args, message in ((["--replicas", "2"], "--replicas and --ray-address need --engine ray"),
                          (["--engine", "ray", "--replicas", "0"], "at least 1"),
                          (["--engine", "gpu"], "invalid choice: 'gpu'"),
                          (["--engine", "ray", "--max-memory-gb", "1"],
                           "--max-memory-gb applies to the local engine's workers only")):
        out = subprocess.run([sys.executable, "-m", "runtime.serve", "--model", "tiny-llama",
                              *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode == 2 and message in out.stderr, out.stderr


# Kept last: a second Ray instance, so the module's one (engine fixture) is closed first.
def test_the_command_line_serves_with_ray_and_stops_it(engine, lm, monkeypatch):
    engine.close()
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.serve", "--model", "tiny-llama", "--port", str(port),
         "--engine", "ray", "--replicas", "2", "--job-timeout", "30",
         "--replica-threads", str(torch.get_num_threads())],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        models = None
        for _ in range(600):  # about 3 minutes at most
            if proc.poll() is not None:
                break
            try:
                models = httpx.get(f"{url}/v1/env", timeout=2).json()["models"]
                if all(r["state"] == "ready" for r in models["tiny-llama"]["replicas"]):
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.3)
        else:
            models = None
        if not models:
            log.seek(0)
            pytest.fail(f"the Ray server did not come up:\n{log.read()[-3000:]}")
        assert len(models["tiny-llama"]["replicas"]) == 2
        monkeypatch.setattr(remote_client.Client, "http_override", None)
        from runtime import CONFIG

        CONFIG.set_default_host(url)
        try:
            _trace_equals_local(lm)
        finally:
            CONFIG.set_default_host(None)
    finally:
        code = stop_server(proc, 60)
        log.seek(0)
        text = log.read()
        log.close()
        os.unlink(log.name)
    # uvicorn shuts down, then re-raises the signal it caught: a clean stop, no traceback.
    assert code in (0, -signal.SIGTERM) and "Traceback" not in text, text[-3000:]
    # Nothing of that Ray instance is left running (its processes were in the server's
    # session).
    # Ray's helper processes exit on their own once the server has gone: give them a
    # bounded while (10 s) before counting what is left.
    for _ in range(50):
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True,
                              check=False)
        if not left.stdout.strip():
            break
        time.sleep(0.2)
    if left.stdout.strip():
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # not left behind for the next test
        except ProcessLookupError:
            pass
    assert left.stdout.strip() == "", left.stdout


def _trace_equals_local(lm):
    from compiler import intervene

    @intervene
    def run(model, x, remote_flag):
        with model.trace(x, remote=remote_flag):
            hidden = model.model.layers[0].output.save()
        return hidden

    assert torch.equal(run(lm, IDS, True), run(lm, IDS, False))

