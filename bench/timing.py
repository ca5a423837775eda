"""Timing: interleaved round-robin measurement, medians, slopes, and the machine.

``interleaved`` times several callables in rounds: each round calls every side
once, so slow drifts of the machine (frequency, other tenants) land on all sides
alike.  The order within a round changes from round to round (every permutation
in turn; a seeded shuffle when there are many sides), because the call that
runs right after nnsight's finds colder caches: with a fixed order (intervene,
plain, nnsight) intervene always ran after nnsight and paid about 10 µs more on a
100 µs trace.  A sample is one call (or the mean of a few back-to-back calls when
they are very short), read with ``time.perf_counter_ns``; the reported figure is
the median of the samples.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import itertools
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable


def interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    inner: int = 1,
    warmup: int = 3,
) -> dict[str, list[float]]:
    """Per-call times in microseconds: ``{side: [sample, ...]}``, one sample per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    gc.collect()
    clock = time.perf_counter_ns
    samples: dict[str, list[float]] = {name: [] for name in fns}
    items = list(fns.items())
    if len(items) <= 4:
        orders = [list(p) for p in itertools.permutations(items)]
    else:
        rng = random.Random(0)
        orders = []
        for _ in range(24):
            rng.shuffle(items)
            orders.append(list(items))
    for r in range(rounds):
        for name, fn in orders[r % len(orders)]:
            t0 = clock()
            for _ in range(inner):
                fn()
            samples[name].append((clock() - t0) / inner / 1e3)
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """Half the interquartile range relative to the median (a robust noise figure)."""
    if len(xs) < 4:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    med = statistics.median(xs)
    return (q[2] - q[0]) / 2 / med if med else 0.0


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    den = sum((x - mx) ** 2 for x in xs)
    return num / den


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def revision(root: str) -> str:
    """The commit of intervene, plus a fingerprint of uncommitted changes to its code."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True).stdout

    try:
        rev = git("rev-parse", "--short", "HEAD").strip()
        diff = git("diff", "HEAD", "--", "compiler", "runtime")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not diff:
        return rev
    digest = hashlib.sha1(diff.encode()).hexdigest()[:10]
    return f"{rev} + uncommitted changes to compiler/ or runtime/ (diff sha1 {digest})"


def machine(root: str) -> dict[str, str]:
    """The facts RESULTS.md states about where it ran."""
    import torch

    try:
        from importlib.metadata import version

        nnsight_version = version("nnsight")
    except Exception:  # noqa: BLE001 - only informative
        nnsight_version = "not installed"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} logical ({usable} usable by this process)",
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "python": sys.version.split()[0],
        "nnsight": nnsight_version,
        "intervene revision": revision(root),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load average at start": load(),
    }


def load() -> str:
    """The 1/5/15-minute load averages: other processes sharing the cores."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"
