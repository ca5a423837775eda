"""``python -m bench.profile [CASE] [--calls N] [--top K]``: where intervene's time goes.

Runs intervene's side of one case ``N`` times under cProfile and prints the
functions of ``compiler/`` and ``runtime/`` (and the torch hook machinery they
trigger) by own time, each with its calls per trace and its cost per trace, next
to the same count of plain-hook calls for scale.  Cases: ``save_one``,
``write_save``, ``save_12``, ``save_64`` (64-layer MLP), ``invokes_16``,
``compile`` (decoration of the 40-line experiment).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import pstats
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _setup(case: str):
    from . import generated, ours, plain
    from .cases import _fresh
    from .models import inputs, mlp_trio

    if case == "compile":
        from compiler import intervene

        from .compile_case import experiment

        intervene(_fresh(experiment))
        return (lambda: intervene(_fresh(experiment))), None
    if case == "invokes_16":
        trio = mlp_trio(12, 32)
        xs = [inputs(2, 32, seed=100 + i) for i in range(16)]
        fn = ours.compiled(generated.module().ours_invokes_16)
        return (functools.partial(fn, trio.ours, xs),
                functools.partial(plain.invokes, trio.plain, xs, 5))
    layers = 64 if case == "save_64" else 12
    trio = mlp_trio(layers, 32)
    x = inputs(2, 32)
    if case in ("save_12", "save_64"):
        idx = list(range(layers))
        return (functools.partial(ours.compiled(ours.save_loop), trio.ours, x, idx),
                functools.partial(plain.save_loop, trio.plain, x, idx))
    fn = getattr(ours, case)
    return (functools.partial(ours.compiled(fn), trio.ours, x),
            functools.partial(getattr(plain, case), trio.plain, x))


def _ours_or_hooks(filename: str) -> bool:
    f = filename.replace("\\", "/")
    return ("/compiler/" in f or "/runtime/" in f or "torch/nn/modules/module.py" in f
            or "torch/utils/hooks.py" in f or "bench_invokes_" in f or "/bench/ours.py" in f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("case", nargs="?", default="save_one",
                        choices=["save_one", "write_save", "save_12", "save_64", "invokes_16",
                                 "compile"])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import torch

    from . import timing

    torch.set_num_threads(1)
    run, baseline = _setup(args.case)
    calls = args.calls if args.case != "compile" else min(args.calls, 30)
    for _ in range(20 if args.case != "compile" else 2):
        run()
        if baseline:
            baseline()

    # Without the profiler, interleaved as in the suite: medians, and the median of the
    # per-round differences.
    sides = {"ours": run, "plain": baseline} if baseline else {"ours": run}
    samples = timing.interleaved(sides, rounds=calls, warmup=0)
    ours_us = timing.median(samples["ours"])
    plain_us = timing.median(samples["plain"]) if baseline else None
    diff_us = (timing.median([a - b for a, b in zip(samples["ours"], samples["plain"])])
               if baseline else None)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        run()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    entries = stats.stats.items()  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, nc, tt, ct, _callers) in entries:
        if _ours_or_hooks(filename):
            where = filename.split("/work/main/")[-1] if "/work/main/" in filename else (
                filename.split("site-packages/")[-1])
            rows.append((tt, ct, nc, f"{where}:{line}({name})"))
    rows.sort(reverse=True)
    print(f"case {args.case}: {calls} calls; without profiler (medians): intervene "
          f"{ours_us:.1f} µs" + (f", plain hooks {plain_us:.1f} µs, paired difference "
                                 f"{diff_us:+.1f} µs" if baseline else "") + " per call")
    print("under cProfile (times inflated by the profiler; compare rows with each other):")
    print(f"{'own µs/call':>12} {'cum µs/call':>12} {'calls/call':>10}  function")
    for tt, ct, nc, label in rows[: args.top]:
        print(f"{tt / calls * 1e6:12.2f} {ct / calls * 1e6:12.2f} {nc / calls:10.1f}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
