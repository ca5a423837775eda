"""The command line: ``python -m bench [--quick] [--only CASES] [--no-write]``.

Runs the cases in order, prints each result with its target and PASS/MISS as it
goes, and (for a full run, unless ``--no-write``) writes ``bench/RESULTS.md``
and ``bench/checkpoints.png``.  A quick run writes nothing unless ``--write``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _print_row(row) -> None:
    from .report import _fmt, _ratio

    ratios = "  ".join(
        f"{label} {r}" for label, r in (("ours/plain", _ratio(row, "ours")),
                                        ("nnsight/plain", _ratio(row, "nnsight"))) if r
    )
    target = f"  [{row.target}: {row.status}]" if row.target else ""
    print(f"  {row.name:<44} ours {_fmt(row.ours, row.unit):>14}  plain "
          f"{_fmt(row.plain, row.unit):>14}  nnsight {_fmt(row.nnsight, row.unit):>14}  "
          f"{ratios}{target}", flush=True)
    if row.note:
        print(f"      {row.note}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions and 8 generated tokens (about a minute)")
    parser.add_argument("--only", default="",
                        help="comma-separated cases: fixed, scaling, model, generate, "
                             "compile, memory, source, remote")
    parser.add_argument("--write", action="store_true", help="write RESULTS.md even if quick")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from . import report, timing
    from .cases import CASES, Config
    from .remote import remote_case

    CASES = {**CASES, "remote": remote_case}  # the case table, and the remote case

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; the cases are {list(CASES)}")
    cfg = Config(quick=args.quick)
    info = timing.machine(ROOT)
    print("intervene benchmarks: " + ", ".join(
        f"{k} {v}" for k, v in info.items() if k in ("cpu", "torch", "python")), flush=True)

    start = time.perf_counter()
    outcomes = []
    for name in names:
        t0 = time.perf_counter()
        print(f"\n[{name}]", flush=True)
        outcome = CASES[name](cfg)
        outcomes.append(outcome)
        case = None
        for row in outcome.rows:
            if row.case != case:
                case = row.case
                print(f" {case}")
            _print_row(row)
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    seconds = time.perf_counter() - start
    info["load average at end"] = timing.load()
    at_end = timing.revision(ROOT)
    if at_end != info["intervene revision"]:
        info["intervene revision at end"] = at_end + " (the code changed during the run)"

    rows = [r for o in outcomes for r in o.rows]
    print("\n" + report.summary(rows))
    write = (args.write or not args.quick) and not args.no_write
    if write:
        md = report.markdown(outcomes, info, args.quick, seconds)
        path = os.path.join(HERE, "RESULTS.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(md)
        plotted = report.plot(outcomes, os.path.join(HERE, "checkpoints.png"))
        print(f"\nwrote {os.path.relpath(path)}"
              + (" and bench/checkpoints.png" if plotted else ""))
    print(f"total {seconds:.0f} s")
    return 0
