"""``python -m bench.remote [--rounds N] [--quick] [--phases]``: a remote block on loopback
against the same block run locally (also case 8 of ``python -m bench``).

Starts ``python -m runtime.serve`` on 127.0.0.1 (a free port) with the tiny Llama and
the default model, then times one trace block (one saved layer output and the next
token) run locally and remotely, interleaved round by round, and prints the median per-job time of each,
their ratio and the milliseconds a job adds (both paired per round).  The tiny model
shows the fixed cost of a job (HTTP, the worker, encoding); the default model shows it
against real compute (target: at most 1.05x local).  ``--phases`` adds a table of where
a remote job's time goes (``runtime.remote.phases``: median times since the client
started the block, per phase of client, app, engine and worker).
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


def missing() -> str | None:
    """Why the remote case cannot run here (the serve extra is not installed), or None."""
    import importlib.util

    gone = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if gone:
        return (f"{' / '.join(gone)} not installed: the remote case needs the serve extra "
                "(pip install -c constraints.txt 'intervene[serve]')")
    return None


def measure(rounds: int, tiny_rounds: int, default: bool = True, stamps: str | None = None,
            report=print) -> list[dict]:
    """Start a loopback server and time one trace block (one saved layer output and the
    next token) run locally and remotely, interleaved round by round: for the tiny Llama (the fixed cost
    of a job) and, with ``default``, the default model.  One dict per model: name,
    ``local`` and ``remote`` samples (seconds), ``phases`` (a table, with ``stamps``)."""
    import torch

    torch.set_num_threads(1)
    from compiler import intervene
    from runtime import CONFIG, LanguageModel
    from runtime.models import tiny_llama

    # The predicted token too: the whole forward runs on both sides (a server ends a
    # trace after the last value its lanes ask for: layer 1 alone would compare less
    # work remotely with the whole forward locally).
    @intervene
    def one_layer(model, x, remote_flag):
        with model.trace(x, remote=remote_flag):
            hidden = model.model.layers[1].output.save()
            token = model.lm_head.output[:, -1].argmax(-1).save()
        return hidden, token

    tiny = LanguageModel(tiny_llama(0))
    tiny._module.config._name_or_path = "tiny-llama"
    cases = [("tiny Llama, 5 tokens", tiny, torch.tensor([[1, 5, 7, 9, 11]]), tiny_rounds)]
    models = ["tiny-llama"]
    if default:
        lm = LanguageModel("smollm2-135m", dispatch=True)
        cases.append(("default model, 9 tokens", lm, "The Eiffel Tower is in the city of",
                      rounds))
        models.append("smollm2-135m")
    proc, url = _start(models)
    CONFIG.set_default_host(url)
    out = []
    try:
        for name, lm, x, n in cases:
            for flag in (False, True):  # warm both paths (and the server's compile cache)
                one_layer(lm, x, flag)
            local, remote = [], []
            for _ in range(n):
                for flag, into in ((False, local), (True, remote)):
                    t = time.perf_counter()
                    one_layer(lm, x, flag)
                    into.append(time.perf_counter() - t)
            got = {"name": name, "local": local, "remote": remote}
            if stamps:
                got["phases"] = phase_table(stamps, n)
                open(stamps, "w").close()
            report(got)
            out.append(got)
    finally:
        CONFIG.set_default_host(None)
        proc.terminate()
        proc.wait(15)
    return out


def paired(got: dict) -> tuple[float, float]:
    """(median of remote / local per round, median of remote - local per round in s)."""
    pairs = list(zip(got["remote"], got["local"]))
    return (statistics.median(r / lo for r, lo in pairs),
            statistics.median(r - lo for r, lo in pairs))


TARGET = 1.05  # default model: remote at most 1.05x local


def remote_case(cfg):
    """Case 8 of ``python -m bench``: rows for RESULTS.md (see the module docstring)."""
    from .cases import Outcome, Row

    case = "8. remote execution (loopback server, `python -m bench.remote`)"
    why = missing()
    if why is not None:
        return Outcome([Row(case, "default model, 9 tokens, one saved layer output and the next token",
                            target=f"≤ {TARGET:.2f}x local", status="skipped", note=why)])
    try:
        # 115 ms forwards move by a few ms from round to round: 60 rounds of them.
        measured = measure(5 if cfg.quick else 60, 10 if cfg.quick else 60,
                           report=lambda got: None)
    except SystemExit as exc:  # the server did not start
        return Outcome([Row(case, "default model, 9 tokens, one saved layer output and the next token",
                            target=f"≤ {TARGET:.2f}x local", status="n/a",
                            note=f"not measured: {exc}")])
    rows = []
    for got in measured:
        ratio, extra = paired(got)
        row = Row(case, got["name"] + ", one saved layer output and the next token",
                  statistics.median(got["remote"]) * 1e6, statistics.median(got["local"]) * 1e6,
                  ratios={"ours": ratio})
        row.note = (f"intervene column: the block through a loopback server; plain-hooks "
                    f"column: the same block run locally (intervene); {len(got['local'])} "
                    f"rounds; a job's fixed cost: +{extra * 1e3:.1f} ms (paired median)")
        if got["name"].startswith("default"):
            row.target = f"≤ {TARGET:.2f}x local"
            row.status = "PASS" if ratio <= TARGET else "MISS"
        rows.append(row)
    return Outcome(rows)


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
    rounds = args.rounds or (5 if args.quick else 20)
    print(f"{'case':<28} {'local ms':>9} {'remote ms':>10} {'ratio':>7} {'+ms/job':>8}")

    def report(got: dict) -> None:
        lo, re = statistics.median(got["local"]) * 1e3, statistics.median(got["remote"]) * 1e3
        ratio, extra = paired(got)
        print(f"{got['name']:<28} {lo:>9.2f} {re:>10.2f} {ratio:>6.3f}x {extra * 1e3:>8.2f}",
              flush=True)
        if got.get("phases"):
            print(got["phases"])

    try:
        measure(rounds, rounds, default=not args.quick, stamps=stamps, report=report)
    finally:
        if stamps:
            os.unlink(stamps)
    return 0


def phase_table(path: str, last: int) -> str:
    """The median time of each phase of the last ``last`` jobs in a stamps file
    (``runtime.remote.phases``): since the client started the block, and since the
    phase before it."""
    jobs: dict[str, dict[str, float]] = collections.defaultdict(dict)  # in file order
    with open(path, encoding="ascii") as f:
        for line in f:
            job, *words, at = line.split()  # a phase's name has spaces ("c0 start")
            jobs[job][" ".join(words)] = float(at)
    chosen = [st for st in jobs.values() if "c0 start" in st][-last:]
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
