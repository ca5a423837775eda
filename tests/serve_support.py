"""Shared by the serving tests (test_remote_app, test_ray_engine, test_serve_faults,
test_serve_load): bounded waits, an engine started and closed, the app behind a
TestClient, the tiny Llama as the server names it, and a real server process on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from runtime import LanguageModel
from runtime.models import tiny_llama
from runtime.remote import client as remote_client
from runtime.serve import create_app


def wait_for(predicate, seconds: float = 60.0, step: float = 0.05):
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / step) + 1):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    raise AssertionError("timed out waiting")


@contextlib.contextmanager
def running(eng, seconds: float = 120):
    """``eng`` started, its tiny Llama ready; closed on the way out (even after a failure)."""
    eng.start()
    try:
        wait_for(eng.ready, seconds)
        assert eng.models()["tiny-llama"]["state"] == "ready"
        yield eng
    finally:
        eng.close()


@contextlib.contextmanager
def app_client(engine):
    """The app in-process over ``engine`` (which the caller starts and closes)."""
    with TestClient(create_app(engine, manage_engine=False)) as tc:
        yield tc


def tiny_lm() -> LanguageModel:
    """The tiny Llama (seed 0), named as the server serves it: the local side of a run."""
    model = LanguageModel(tiny_llama(0))
    model._module.config._name_or_path = "tiny-llama"
    return model


# The fixtures ``http``, ``remote`` and ``lm`` of the serving tests: a test file imports
# ``http_fixture`` etc. (marked as unused for ruff) and defines ``engine`` (started and
# closed by itself, e.g. with ``running``) for ``http``.


@pytest.fixture(scope="module", name="http")
def http_fixture(engine):
    """The app in-process over the test file's ``engine``, for the file's tests."""
    with app_client(engine) as tc:
        yield tc


@pytest.fixture(name="remote")
def remote_fixture(http, monkeypatch):
    """The client's remote calls go to ``http`` during the test."""
    monkeypatch.setattr(remote_client.Client, "http_override", http)
    return http


@pytest.fixture(scope="module", name="lm")
def lm_fixture() -> LanguageModel:
    """``tiny_lm()``, shared by the file's tests."""
    return tiny_lm()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, tries: int = 400, step: float = 0.3) -> bool:
    """Whether the server at ``url`` says ready within ``tries`` polls (False at once when
    ``proc`` has exited)."""
    for _ in range(tries):
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).json()["ready"]:
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(step)
    return False


def stop_server(proc: subprocess.Popen, seconds: float) -> int:
    """SIGTERM, then after ``seconds`` SIGKILL to its whole session (started with
    ``start_new_session=True``); its exit code."""
    proc.terminate()
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(10)


def serve(port: int, log, *args: str) -> subprocess.Popen:
    """``python -m runtime.serve --model tiny-llama --port PORT *args`` in a session of its
    own (so that ``os.killpg`` ends it and its worker), once healthy; a server that does not
    come up fails the test with its log (``log``: a file open for writing and reading)."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--model", "tiny-llama",
                             "--port", str(port), *args], cwd=root, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    if wait_healthy(proc, f"http://127.0.0.1:{port}"):  # about 2 minutes at most
        return proc
    log.seek(0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    pytest.fail(f"the server did not come up:\n{log.read()[-3000:]}")


def kill_server(proc: subprocess.Popen) -> None:
    """SIGKILL to the server and its worker (no goodbye), as a crash or the OOM killer."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
