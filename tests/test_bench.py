"""The benchmark suite runs (a quick pass, in a subprocess): every intervene row is
measured and agrees with plain hooks, and later calls parse nothing.

Timings are never asserted here (targets are checked by ``make bench``); nnsight and
matplotlib (the bench extra) may be missing: their columns are then empty.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_bench_runs_and_ours_agrees_with_plain_hooks():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "fixed,scaling,compile,memory",
         "--no-write"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [ln for ln in out.splitlines() if " ours " in ln]
    assert len(rows) >= 12, out
    assert all(" n/a " not in ln.split(" plain ")[0] for ln in rows), out  # ours measured
    assert "wrong result" not in out and "not supported yet" not in out, out
    assert "left hooks or patches" not in out, out
    parses = next(ln for ln in rows if "parses/compiles during" in ln)
    assert parses.split(" ours ")[1].split()[0] == "0", parses
