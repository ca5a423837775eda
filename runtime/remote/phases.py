"""Where a remote job's time goes: per-phase time stamps (``python -m bench.remote --phases``).

Off unless the environment variable ``INTERVENE_PHASES`` names a file when the
process starts: then the client, the server's app and engine, and the worker
process each append ``<job id> <phase> <time.perf_counter()>`` lines to it (on
Linux ``perf_counter`` is the machine's monotonic clock, so stamps of different
processes compare).  ``bench.remote`` reads them back into a table of medians.
Off, a stamp is one test of a module global.
"""

from __future__ import annotations

import os
import time

PATH = os.environ.get("INTERVENE_PHASES") or None


def stamp(job: str, phase: str, at: float | None = None) -> None:
    if PATH is None:
        return
    with open(PATH, "a", encoding="ascii") as f:
        f.write(f"{job or '-'} {phase} {time.perf_counter() if at is None else at:.7f}\n")
