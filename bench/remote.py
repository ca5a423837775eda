"""``python -m bench.remote [--rounds N] [--quick]``: a remote block on loopback against
the same block run locally.

Starts ``python -m runtime.serve`` on 127.0.0.1 (a free port) with the tiny Llama and
the default model, then times one trace block (one saved layer output) run locally and
remotely, interleaved round by round, and prints the median per-job time of each and
their ratio.  The tiny model shows the fixed cost of a job (HTTP, the worker, encoding);
the default model shows it against real compute (target: at most 1.05x local).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import tempfile
import time

from .serve_proc import start_server


def _start(models: list[str]) -> tuple[subprocess.Popen, str]:
    args: list[str] = []
    for m in models:
        args += ["--model", m]
    return start_server(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.remote")
    parser.add_argument("--rounds", type=int, default=None, help="default 20 (--quick: 5)")
    parser.add_argument("--quick", action="store_true", help="tiny model only, 5 rounds")
    parser.add_argument("--phases", action="store_true",
                        help="also print where a remote job's time goes (runtime.remote.phases)")
    args = parser.parse_args(argv)
    stamps = None
    if args.phases:
        fd, stamps = tempfile.mkstemp(prefix="intervene-phases-", suffix=".txt")
        os.close(fd)
        os.environ["INTERVENE_PHASES"] = stamps  # the server and its worker inherit it
        from runtime.remote import phases

        phases.PATH = stamps

    import torch

    torch.set_num_threads(1)
    from compiler import intervene
    from runtime import CONFIG, LanguageModel
    from runtime.models import tiny_llama

    @intervene
    def one_layer(model, x, remote_flag):
        with model.trace(x, remote=remote_flag):
            hidden = model.model.layers[1].output.save()
        return hidden

    tiny = LanguageModel(tiny_llama(0))
    tiny._module.config._name_or_path = "tiny-llama"
    cases = [("tiny Llama, 5 tokens", tiny, torch.tensor([[1, 5, 7, 9, 11]]))]
    models = ["tiny-llama"]
    rounds = args.rounds or (5 if args.quick else 20)
    if not args.quick:
        default = LanguageModel("smollm2-135m", dispatch=True)
        cases.append(("default model, 9 tokens", default, "The Eiffel Tower is in the city of"))
        models.append("smollm2-135m")
    proc, url = _start(models)
    CONFIG.set_default_host(url)
    try:
        print(f"{'case':<28} {'local ms':>9} {'remote ms':>10} {'ratio':>7}")
        for name, lm, x in cases:
            for flag in (False, True):  # warm both paths (and the server's compile cache)
                one_layer(lm, x, flag)
            local, remote = [], []
            for _ in range(rounds):
                for flag, into in ((False, local), (True, remote)):
                    t = time.perf_counter()
                    one_layer(lm, x, flag)
                    into.append(time.perf_counter() - t)
            lo, re = statistics.median(local) * 1e3, statistics.median(remote) * 1e3
            print(f"{name:<28} {lo:>9.2f} {re:>10.2f} {re / lo:>6.2f}x")
            if stamps:
                print(phase_table(stamps, rounds))
                open(stamps, "w").close()
    finally:
        CONFIG.set_default_host(None)
        proc.terminate()
        proc.wait(15)
        if stamps:
            os.unlink(stamps)
    return 0


def phase_table(path: str, last: int) -> str:
    """The median time of each phase of the last ``last`` jobs in a stamps file
    (``runtime.remote.phases``): since the client started the block, and since the
    phase before it."""
    jobs: dict[str, dict[str, float]] = collections.defaultdict(dict)
    order: list[str] = []
    with open(path, encoding="ascii") as f:
        for line in f:
            job, phase, at = line.rsplit(" ", 2)[0].split(" ", 1)[0], " ".join(
                line.split()[1:-1]), float(line.split()[-1])
            if job not in order:
                order.append(job)
            jobs[job][phase] = at
    chosen = [jobs[j] for j in order if "c0 start" in jobs[j]][-last:]
    if not chosen:
        return "  (no stamps)"
    since: dict[str, list[float]] = collections.defaultdict(list)
    for st in chosen:
        for phase, at in st.items():
            since[phase].append((at - st["c0 start"]) * 1e3)
    rows = sorted((statistics.median(v), p) for p, v in since.items())
    out = [f"  {'phase':<24} {'at ms':>8} {'step ms':>8}"]
    prev = 0.0
    for at, phase in rows:
        out.append(f"  {phase:<24} {at:>8.2f} {at - prev:>8.2f}")
        prev = at
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
