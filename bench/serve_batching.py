"""``python -m bench.serve_batching [--clients 16] [--jobs 12] [--no-write]``: jobs per
second of a server that batches jobs from different clients into one forward pass,
against the same server running one job at a time (``--batch-max-jobs 1``).

Starts ``python -m runtime.serve --model smollm2-135m`` on 127.0.0.1 twice (batching on
with the defaults, and off), each with torch's default threads (every core; ``--threads N``
sets ``OMP_NUM_THREADS``); in rounds that alternate
between the two, ``--clients`` threads each send ``--jobs`` small traces (one prompt, the last position of the last layer
saved) through the real client (``Client.run``: one ``POST /v1/run`` request per job,
whose response streams the job's status and then its result), one after the other.
Reports jobs/s and the p50 / p99 latency of a job as a client sees it, checks that
every batched result equals the one-at-a-time result (1e-4), and writes
``bench/SERVING.md`` (unless ``--no-write``).  Target: at least 4x the jobs/s.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import threading
import time
from pathlib import Path

from .serve_proc import ROOT, start_server

PROMPT = "The capital of France is"  # 5 tokens
SOURCE = '''def job(model, prompt):
    with model.trace(prompt):
        last = model.model.layers[-1].output[:, -1].save()
'''


def _start(extra: list[str], threads: int | None):
    return start_server(["--model", "smollm2-135m", "--max-queued", "64", *extra], threads)


def _message(prompt: str) -> bytes:
    from compiler.version import compiler_version
    from runtime.remote import protocol

    trees, tensors = protocol.encode_values({"prompt": prompt})
    head = {"protocol": protocol.PROTOCOL_VERSION, "compiler": compiler_version(),
            "model": "smollm2-135m",
            "function": "job", "source": SOURCE, "filename": "bench.py", "first_line": 1,
            "block": 0, "values": trees}
    return protocol.pack(head, tensors)


def _load(url: str, clients: int, jobs: int, prompt: str) -> dict:
    from runtime.remote import protocol
    from runtime.remote.client import Client

    data = _message(prompt)
    Client(url, None, status_stream=io.StringIO()).run(data)  # warm: compile, first pass
    latencies: list[float] = []
    results: list = []
    errors: list = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client() -> None:
        c = Client(url, None, status_stream=io.StringIO())
        start.wait()
        for _ in range(jobs):
            t = time.perf_counter()
            try:
                reply = c.run(data)
            except Exception as exc:  # noqa: BLE001 - counted and shown
                with lock:
                    errors.append(repr(exc))
                continue
            dt = time.perf_counter() - t
            header, tensors = protocol.unpack(reply)
            with lock:
                latencies.append(dt)
                results.append(tensors[header["saved"]["last"]["k"]])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    return {"lat": latencies, "errors": errors, "wall": wall, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_batching")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=4, help="jobs per client and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt", action="append",
                        help=f"a prompt (repeat for several; default {PROMPT!r})")
    parser.add_argument("--threads", type=int, default=None,
                        help="the servers' torch threads (default: torch's, every core)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    import torch

    prompts = args.prompt or [PROMPT]
    began = time.time()
    configs = (("batching (defaults)", []), ("one job at a time", ["--batch-max-jobs", "1"]))
    servers = {name: _start(extra, args.threads) for name, extra in configs}
    runs: dict = {}
    try:
        # Rounds alternate between the two servers, so that a change in the load of this
        # shared machine weighs on both alike.
        for prompt in prompts:
            for _round in range(args.rounds):
                for name, _ in configs:
                    got = _load(servers[name][1], args.clients, args.jobs, prompt)
                    into = runs.setdefault((prompt, name), {"lat": [], "results": [],
                                                            "errors": [], "wall": 0.0})
                    into["lat"] += got["lat"]
                    into["results"] += got["results"]
                    into["errors"] += got["errors"]
                    into["wall"] += got["wall"]
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(15)
    for r in runs.values():
        lat = sorted(r["lat"])
        r["jobs"] = len(lat)
        r["rate"] = len(lat) / r["wall"]
        r["p50"] = statistics.median(lat)
        r["p99"] = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]

    lines = ["| prompt | server | jobs | jobs/s | p50 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|"]
    summaries = []
    ok = True
    for prompt in prompts:
        on, off = runs[prompt, configs[0][0]], runs[prompt, configs[1][0]]
        ref = off["results"][0]
        worst = max(float((r - ref).abs().max()) for r in on["results"] + off["results"])
        rel = worst / float(ref.abs().max())
        close = all(torch.allclose(r, ref, atol=1e-4, rtol=1e-4) for r in on["results"])
        speedup = on["rate"] / off["rate"]
        for name, _ in configs:
            r = runs[prompt, name]
            lines.append(f"| {prompt!r} | {name} | {r['jobs']} | {r['rate']:.1f} | "
                         f"{r['p50'] * 1e3:.0f} | {r['p99'] * 1e3:.0f} | {len(r['errors'])} |")
        met = speedup >= 4 and not on["errors"] and not off["errors"] and close
        ok &= met
        summaries.append(f"- {prompt!r}: {speedup:.2f}x the jobs/s (target 4x: "
                         f"{'met' if met else 'NOT met'}); results against the one-at-a-time "
                         f"server's: largest difference {worst:.1e} ({rel:.1e} of the largest "
                         f"value), {'all' if close else 'NOT all'} within 1e-4")
    table = "\n".join(lines)
    summary = "\n".join(summaries)
    print(table)
    print(summary)
    for r in runs.values():
        for e in r["errors"][:3]:
            print("error:", e)
    if not args.no_write:
        load = os.getloadavg()
        threads = (f"`OMP_NUM_THREADS={args.threads}`" if args.threads else
                   f"torch's default threads ({torch.get_num_threads()} here, every core)")
        text = f"""# Serving: jobs batched into one forward pass

Generated by `python -m bench.serve_batching` ({time.time() - began:.0f} s); do not edit by hand.

{args.clients} concurrent clients, each sending {args.jobs} small traces one after the other
in each of {args.rounds} rounds per server (the rounds alternate between the two servers)
(`smollm2-135m`, one prompt, the last position of the last layer saved) through
the real client (one `POST /v1/run` request per job, its response streaming the job's
status and then its result) to `python -m runtime.serve` on loopback,
{threads}; the same server with the default batching options
(`--batch-window-ms 5 --batch-max-jobs 16 --batch-max-tokens 4096`) and with
`--batch-max-jobs 1`.  Latency: from sending the request to having the result, as a
client sees it.

{table}

{summary}

Both servers end a trace's forward pass once no job waits for a value (here after the
last decoder layer: the final norm and the LM head, whose results no job asked for, do
not run).

Why not more: on a CPU a forward pass costs about the same for 1 row as for a few
(reading the weights dominates), so 16 jobs of a few tokens share one pass for little
more than the price of one; as rows x tokens grow the pass becomes compute-bound and
the gain shrinks toward (cost of 1 row) / (cost per row of the batch).

Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores (shared
by the clients and the server), torch {torch.__version__}, python {platform.python_version()},
load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f},
{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.
"""
        Path(ROOT, "bench", "SERVING.md").write_text(text, encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
