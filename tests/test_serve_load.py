"""Under load (local engine, tiny Llama, a real server on 127.0.0.1): 16 clients, each
with its own API key, send jobs that mix traces, generation, failing jobs, refused jobs
and jobs cancelled at once.  Every accepted job must end COMPLETED, ERROR or CANCELLED;
every completed result must equal plain PyTorch (hooks, ``generate``) to 1e-4 (jobs share
batched passes); the server's memory must be flat at the end.

``make test`` runs 16 x 6 jobs; the full 16 x 100 is ``make test-load`` (``-m load``).
Every loop is bounded in count and time."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from serve_support import free_port, stop_server, wait_healthy
from test_remote_app import job_message

from runtime.models import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 16
LOCK = threading.Lock()
FINAL = ("COMPLETED", "ERROR", "CANCELLED")
PROMPTS = [torch.tensor([[1, 5, 7, 9, 11]]), torch.tensor([[3, 4]]),
           torch.tensor([[2, 8, 16, 32, 64, 100, 120]]), torch.tensor([[42]])]
SCALES = [0.5, 2.0]

TRACE = '''def job(model, x, scale):
    with model.trace(x, remote=True):
        model.model.layers[0].output[:, -1] *= scale
        logits = model.lm_head.output[:, -1].save()
'''
GENERATE = '''def job(model, x):
    with model.generate(x, max_new_tokens=3, do_sample=False, remote=True):
        tokens = model.generator.output.save()
'''
FAILING = '''def job(model, x):
    with model.trace(x, remote=True):
        h = model.model.layers[1].output.save()
        y = h[7]
'''
REFUSED = '''def job(model, x):
    with model.trace(x, remote=True):
        h = model.model.layers[1].output.__class__
'''


@pytest.fixture(scope="module")
def reference():
    """The expected values, from plain PyTorch on the same weights as the server's."""
    hf = tiny_llama(0)
    for p in hf.parameters():
        p.requires_grad_(False)
    trace, gen = {}, {}
    for i, x in enumerate(PROMPTS):
        for scale in SCALES:
            def hook(module, args, out, scale=scale):
                out = out.clone()
                out[:, -1] *= scale
                return out

            handle = hf.model.layers[0].register_forward_hook(hook)
            try:
                trace[i, scale] = hf(x).logits[:, -1]
            finally:
                handle.remove()
        gen[i] = hf.generate(x, max_new_tokens=3, do_sample=False)
    return trace, gen


def rss(proc: psutil.Process) -> dict:
    """Resident memory (MiB) of the server and of its worker processes."""
    workers = sum(c.memory_info().rss for c in proc.children(recursive=True))
    return {"server": round(proc.memory_info().rss / 2**20, 1),
            "workers": round(workers / 2**20, 1)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    keys = [f"load-key-{i}" for i in range(CLIENTS)]
    (tmp / "keys").write_text("\n".join(keys) + "\n")
    port = free_port()
    log = open(tmp / "server.log", "w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.serve", "--model", "tiny-llama", "--port", str(port),
         "--api-keys", str(tmp / "keys"), "--job-timeout", "60", "--max-queued", "4",
         "--results-dir", str(tmp / "results")],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(proc, url):  # about 2 minutes at most
            log.seek(0)
            pytest.fail(f"the server did not come up:\n{log.read()[-3000:]}")
        yield url, keys, psutil.Process(proc.pid)
    finally:
        stop_server(proc, 30)
        log.close()


def follow(c: httpx.Client, job: str) -> dict:
    """The job's final status, from its event stream (bounded: 120 s)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with c.stream("GET", f"/v1/jobs/{job}/events") as resp:
            assert resp.status_code == 200
            event = None
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "status":
                    payload = json.loads(line[5:])
                    if payload["status"] in FINAL:
                        return payload
    raise AssertionError(f"job {job} did not end in 120 s")


def saved(reply: bytes) -> dict:
    from runtime.remote import protocol

    header, tensors = protocol.unpack(reply)
    return protocol.decode_values(header["saved"], tensors)


def client(url: str, key: str, n: int, seed: int, reference, out: dict) -> None:
    try:
        _client(url, key, n, seed, reference, out)
    except Exception as exc:  # noqa: BLE001 - a client that broke is a failure of the test
        with LOCK:
            out.setdefault("errors", []).append(f"client {seed}: {type(exc).__name__}: {exc}")


def _client(url: str, key: str, n: int, seed: int, reference, out: dict) -> None:
    trace, gen = reference
    errors = out.setdefault("errors", [])
    counts = out.setdefault("counts", {})

    def count(name: str) -> None:
        with LOCK:
            counts[name] = counts.get(name, 0) + 1

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                      timeout=httpx.Timeout(120.0, connect=10.0)) as c:
        for i in range(n):
            kind = (seed + i) % 10
            p = (seed + i) % len(PROMPTS)
            scale = SCALES[(seed + i) // len(PROMPTS) % 2]
            x = PROMPTS[p]
            if kind < 5:
                msg = job_message(TRACE, values={"x": x, "scale": scale})
            elif kind < 7:
                msg = job_message(GENERATE, values={"x": x})
            elif kind == 7:
                msg = job_message(FAILING, values={"x": x})
            elif kind == 8:
                msg = job_message(REFUSED, values={"x": x})
            else:
                msg = job_message(TRACE, values={"x": x, "scale": scale})
            for _ in range(100):  # 429 (this key's queue is full) cannot happen with one
                resp = c.post("/v1/jobs", content=msg)  # job at a time; bounded anyway
                if resp.status_code != 429:
                    break
                time.sleep(0.1)
            if resp.status_code != 202:
                with LOCK:
                    errors.append(f"refused: {resp.status_code} {resp.text[:200]}")
                continue
            job = resp.json()["id"]
            count("accepted")
            if kind == 9:
                c.post(f"/v1/jobs/{job}/cancel")
            end = follow(c, job)
            count(end["status"])
            status = end["status"]
            try:
                if kind == 7:
                    assert status == "ERROR" and end["error"]["type"] == "IndexError", end
                elif kind == 8:
                    assert status == "ERROR" and "__class__" in end["error"]["message"], end
                elif kind == 9 and status == "CANCELLED":
                    pass
                else:
                    assert status == "COMPLETED", end
                    got = saved(c.get(f"/v1/jobs/{job}/result").content)
                    if kind < 5 or kind == 9:
                        want = trace[p, scale]
                        assert torch.allclose(got["logits"], want, rtol=1e-4, atol=1e-5), \
                            (got["logits"] - want).abs().max()
                    else:
                        assert torch.equal(got["tokens"], gen[p])
                    count("correct")
            except AssertionError as exc:
                with LOCK:
                    errors.append(f"job {job} kind {kind}: {exc}")


def run_load(server, reference, per_client: int) -> dict:
    url, keys, proc = server
    # A warm-up round (each kind once per client's offset), then memory, then the load.
    warm: dict = {}
    threads = [threading.Thread(target=client, args=(url, keys[i], 10, i, reference, warm))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not warm.get("errors"), warm["errors"][:5]
    before = rss(proc)
    out: dict = {}
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(url, keys[i], per_client, i * 7,
                                                      reference, out), daemon=True)
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, 900 - (time.monotonic() - started)))
    assert not any(t.is_alive() for t in threads), "clients still running after 900 s"
    seconds = time.monotonic() - started
    after = rss(proc)
    counts = out.get("counts", {})
    report = (f"load: {CLIENTS} clients x {per_client} jobs in {seconds:.1f} s "
              f"({counts.get('accepted', 0) / seconds:.1f} jobs/s): {counts}; RSS MiB before "
              f"{before}, after {after}")
    print(report)
    assert not out.get("errors"), out["errors"][:5]
    accepted = counts.get("accepted", 0)
    assert accepted == CLIENTS * per_client
    assert sum(counts.get(s, 0) for s in FINAL) == accepted  # every job ended
    assert counts.get("correct", 0) == counts.get("COMPLETED", 0)  # every result right
    assert counts.get("ERROR", 0) >= 2 * CLIENTS * per_client // 10 - CLIENTS
    # Flat memory: what grows is the finished jobs the server keeps (small results).
    assert after["server"] - before["server"] < 64, report
    assert after["workers"] - before["workers"] < 64, report
    return {"before": before, "after": after, "counts": counts, "seconds": seconds}


def test_load_16_clients_mixed_jobs(server, reference, record_property):
    result = run_load(server, reference, 6)
    record_property("load", result)


@pytest.mark.load
def test_load_16_clients_x_100_jobs(server, reference, record_property, request):
    if "load" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the full load (16 x 100 jobs): make test-load")
    result = run_load(server, reference, 100)
    record_property("load", result)
