"""Peak memory of one call, from the CPU allocator's own record of every tensor.

``tensor_bytes`` runs the call under ``torch.profiler`` with
``profile_memory=True``: the profiler then records every allocation and every
free made by torch's CPU allocator (all tensor storage, including temporaries
inside ops and anything the hooks or a library allocate), each with its size and
time.  Replaying those events in time order gives the live tensor bytes at every
moment of the call; the peak is the maximum, and what is still live at the end
is what the call's results hold on to.  Both are measured from the state before
the call (model and inputs already allocated), so they count only what the call
itself adds.  Unlike RSS this is exact and immune to the allocator keeping freed
pages, and unlike ``tracemalloc`` it sees tensor storage (which ``tracemalloc``
does not: torch allocates it outside Python's allocator).

``python_bytes`` is the other half, for information: the peak of Python's own
heap (``tracemalloc``) during the call: interpreter objects such as lanes,
frames, closures and the tracer's bookkeeping.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tracemalloc
from collections.abc import Callable


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs start/stop lines straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tensor_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak, retained): tensor bytes the call adds at its peak and keeps at its end."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    del result
    return peak, live


def python_bytes(fn: Callable[[], object]) -> int:
    """Peak growth of Python's heap during the call (``tracemalloc``)."""
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak - base
