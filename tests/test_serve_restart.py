"""A server that restarts (or vanishes) while a client waits for its job (tiny Llama,
loopback only, every wait bounded, every server stopped in ``finally``).

The client's stream breaks; it reconnects for a bounded time (``Client.reconnect_s``)
and asks about its job.  The restarted server tells it the job was lost: from its
results folder ("the server restarted while the job ran"), or, without one, from the
job's id, which names the run of the server that gave it ("the server restarted; job
... was lost").  The client raises a ``RemoteError`` with that text; a server that does
not come back is a ``ConnectionError`` once the bound has passed.  Also here: a lone
job does not wait out the batching window."""

from __future__ import annotations

import threading
import time

import httpx
from serve_support import free_port, kill_server, serve, stop_server, wait_for
from test_remote_app import HARMLESS, IDS, LOOP, job_message

from runtime.remote.client import Client, RemoteError, _pooled
from runtime.serve import Engine, Limits


class Waiting(threading.Thread):
    """A client running one job in the background: its outcome and when it came."""

    def __init__(self, url: str, data: bytes, reconnect_s: float) -> None:
        super().__init__(daemon=True)
        self.client = Client(url, None)
        self.client.reconnect_s = reconnect_s
        self.data = data
        self.error: BaseException | None = None
        self.result: bytes | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            self.result = self.client.run(self.data)
        except BaseException as exc:  # noqa: BLE001 - the outcome under test
            self.error = exc
        self.ended_at = time.monotonic()


def running_job(url: str, client: Waiting) -> str:
    """The id of ``client``'s job once the server runs it."""
    wait_for(lambda: client.client.job_id, 30)
    job = client.client.job_id
    with httpx.Client(base_url=url, timeout=10) as c:
        wait_for(lambda: c.get(f"/v1/jobs/{job}").json()["status"] == "RUNNING", 30)
    return job


def test_a_restart_mid_job_is_a_clear_error_and_an_absent_server_is_bounded(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ("--job-timeout", "60", "--results-dir", str(tmp_path / "results"))
    with open(tmp_path / "server.log", "w+") as log:
        proc = serve(port, log, *args)
        patient = Waiting(url, job_message(LOOP, values={"x": IDS}), reconnect_s=120)
        hasty = Waiting(url, job_message(HARMLESS, values={"x": IDS}), reconnect_s=1.0)
        try:
            patient.start()
            job = running_job(url, patient)
            hasty.start()  # queued behind the looping job
            wait_for(lambda: hasty.client.job_id, 30)
            kill_server(proc)  # the server and its worker, no goodbye
            killed = time.monotonic()
            # Nobody answers: the hasty client gives up after its bound, with a clear error.
            hasty.join(15)
            assert hasty.ended_at is not None, "the client hangs"
            assert isinstance(hasty.error, ConnectionError), repr(hasty.error)
            assert f"while job {hasty.client.job_id} ran" in str(hasty.error)
            assert "could not reach it again within 1 s" in str(hasty.error)
            assert hasty.ended_at - killed < 5
            assert patient.ended_at is None  # still trying to reach the server
            proc = serve(port, log, *args)  # the same port and results folder
            up = time.monotonic()
            patient.join(10)
            assert patient.ended_at is not None, "the client hangs"
            # The restarted server serves new jobs, with ids of its own run.
            fresh = Waiting(url, job_message(HARMLESS, values={"x": IDS}), reconnect_s=5)
            fresh.run()
            assert fresh.error is None and fresh.result
            assert fresh.client.job_id[:8] != job[:8]
            # The job's stream was read to its end: its connection waits in the pool for
            # the next job (a response closed early closes its connection).
            pool = _pooled(url, None)._transport._pool
            assert [c.is_idle() for c in pool.connections] == [True]
        finally:
            stop_server(proc, 20)
    assert isinstance(patient.error, RemoteError), repr(patient.error)
    assert patient.error.type_name == "JobLost"
    assert str(patient.error).startswith("the server restarted while the job ran; it did not "
                                         "finish. Submit it again.")
    # It noticed the server was back within its back-off (0.5 s at most) of it answering.
    assert killed < patient.ended_at < up + 5, (killed, patient.ended_at, up)
    # Without a results folder the restarted server knows the job only by its id, which
    # names the run that gave it: test_remote_app's
    # test_a_job_of_an_earlier_run_of_the_server_is_lost_not_unknown.


def test_a_lone_job_does_not_wait_for_company_a_busy_model_does():
    eng = Engine(["tiny-llama"], Limits(batch_window=0.3, batch_max_jobs=4))
    runner = eng.runners[0]  # not started: the queue alone
    first = eng.submit("k", "tiny-llama", b"")
    t = time.monotonic()
    assert eng._next_batch(runner) == [first]
    assert time.monotonic() - t < 0.2  # nothing else queued or running: no window
    first.status = "RUNNING"
    second = eng.submit("k", "tiny-llama", b"")  # it found company: the model is busy
    t = time.monotonic()
    assert eng._next_batch(runner) == [second]
    assert time.monotonic() - t >= 0.28
    assert first.id[:8] == second.id[:8] == eng.boot and first.id != second.id
    assert len(first.id) == 32 and not eng.lost(first.id)
    other = ("0" if eng.boot[0] != "0" else "1") + "f" * 31
    assert eng.lost(other) and not eng.lost("../" + "a" * 29) and not eng.lost(other[:31])
