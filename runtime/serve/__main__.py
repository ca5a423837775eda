"""``python -m runtime.serve --model smollm2-135m [--model PATH ...] [--host 127.0.0.1]
[--port 8765] [--api-keys FILE] [--job-timeout SECONDS] [--engine local|ray]
[--replicas N] [--results-dir DIR]``.

Binds to loopback by default and refuses any other address without API keys
(a file with one key per line).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from .engine import Limits


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_keys(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        keys = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    if not keys:
        raise SystemExit(f"runtime.serve: {path} holds no API key (one per line)")
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.serve",
                                     description="Serve models for remote intervene blocks.")
    parser.add_argument("--model", action="append", required=True,
                        help="a model to serve: 'smollm2-135m', a folder or a cached hub id "
                             "(repeat for several)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--api-keys", help="file with the accepted API keys, one per line")
    parser.add_argument("--job-timeout", type=float, default=300.0,
                        help="seconds a job may run before it is stopped (default 300)")
    parser.add_argument("--max-result-mb", type=float, default=256.0)
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="memory a worker may take beyond its loaded model (Linux, CPU "
                             "models; off by default): a bigger allocation fails the job")
    parser.add_argument("--max-queued", type=int, default=8,
                        help="jobs waiting or running per API key (default 8)")
    parser.add_argument("--batch-window-ms", type=float, default=5.0,
                        help="how long the first waiting job waits for others to share its "
                             "forward pass (default 5 ms)")
    parser.add_argument("--batch-max-jobs", type=int, default=16,
                        help="jobs per batch; 1 runs one job at a time (default 16)")
    parser.add_argument("--batch-max-tokens", type=int, default=4096,
                        help="rows x positions of one shared forward pass (default 4096)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: a worker process per model on this machine (default); "
                             "ray: each model in --replicas Ray actors (pip install "
                             "'intervene[ray]')")
    parser.add_argument("--replicas", type=int, default=1,
                        help="Ray actors per model (--engine ray; default 1)")
    parser.add_argument("--replica-cpus", type=float, default=1.0,
                        help="CPUs Ray reserves for each replica (--engine ray; default 1)")
    parser.add_argument("--replica-gpus", type=float, default=0.0,
                        help="GPUs Ray reserves for each replica (--engine ray; default 0)")
    parser.add_argument("--replica-threads", type=int, default=None,
                        help="torch threads in each replica (--engine ray; default: its CPUs)")
    parser.add_argument("--ray-address", default=None,
                        help="join this Ray cluster ('auto' or HOST:PORT, after `ray start "
                             "--head`); default: start a local Ray instance")
    parser.add_argument("--results-dir", default=None,
                        help="keep job records and results in this folder, so they can be "
                             "fetched after a disconnect and a restart says what it ended")
    parser.add_argument("--results-ttl", type=float, default=86400.0,
                        help="seconds a finished job stays in --results-dir (default 86400)")
    args = parser.parse_args(argv)

    keys = read_keys(args.api_keys) if args.api_keys else None
    if keys is None and not is_loopback(args.host):
        print(f"runtime.serve: refusing to serve on {args.host} without API keys: anyone who "
              "can reach it could run code on this machine. Pass --api-keys FILE, or bind "
              "127.0.0.1.", file=sys.stderr)
        return 2
    if args.job_timeout <= 0:
        parser.error("--job-timeout must be positive")
    if args.batch_max_jobs < 1 or args.batch_max_tokens < 1 or args.batch_window_ms < 0:
        parser.error("--batch-max-jobs and --batch-max-tokens must be positive, "
                     "--batch-window-ms at least 0")
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    if args.engine != "ray" and (args.replicas != 1 or args.ray_address):
        parser.error("--replicas and --ray-address need --engine ray")
    if args.engine == "ray" and args.max_memory_gb:
        parser.error("--max-memory-gb applies to the local engine's workers only (with Ray, "
                     "use Ray's memory monitor)")
    if args.replica_cpus < 0 or args.replica_gpus < 0 or (args.replica_threads or 1) < 1:
        parser.error("--replica-cpus/--replica-gpus/--replica-threads must be positive")
    if args.results_ttl <= 0:
        parser.error("--results-ttl must be positive")

    import uvicorn

    from .app import create_app
    from .results import LocalEngine, ResultStore

    limits = Limits(job_timeout=args.job_timeout, max_result=int(args.max_result_mb * 2**20),
                    max_queued=args.max_queued, batch_window=args.batch_window_ms / 1000,
                    batch_max_jobs=args.batch_max_jobs, batch_max_tokens=args.batch_max_tokens,
                    max_memory=int(args.max_memory_gb * 2**30) if args.max_memory_gb else None)
    if args.engine == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise SystemExit("runtime.serve: --engine ray needs Ray: pip install -c "
                             "constraints.txt 'intervene[ray]'")
        from .ray_engine import RayEngine  # ray itself is imported when the engine starts

        engine = RayEngine(args.model, limits, replicas=args.replicas, address=args.ray_address,
                           replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                           replica_threads=args.replica_threads)
    else:
        engine = LocalEngine(args.model, limits)
    if args.results_dir:
        engine.store = ResultStore(args.results_dir, args.results_ttl)
    app = create_app(engine, keys)
    print(f"intervene server on http://{args.host}:{args.port} serving "
          f"{', '.join(args.model)} with the {args.engine} engine (loading)", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
