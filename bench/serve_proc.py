"""Start ``python -m runtime.serve`` on loopback for a benchmark (shared by
``bench.remote`` and ``bench.serve_batching``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], threads: int | None = 1) -> tuple[subprocess.Popen, str]:
    """``python -m runtime.serve --port <free> *args`` with ``OMP_NUM_THREADS=threads``
    (None: torch's default, every core); returns the process and its URL once
    ``/v1/health`` says ready (SystemExit if it never does)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "runtime.serve", "--port", str(port), *args]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(900):
        if proc.poll() is not None:
            raise SystemExit("the server did not start")
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).json()["ready"]:
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready")
