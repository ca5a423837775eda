"""The benchmark suite of intervene: ``python -m bench`` (``make bench``).

Every case is measured three ways in the same process, interleaved round-robin
(intervene, plain PyTorch hooks written by hand, nnsight 0.8.1), so that machine
noise hits all three alike; the tables report medians and the ratios against
plain hooks, with the project's targets marked PASS or MISS.  The full run
writes ``bench/RESULTS.md`` and the plot ``bench/checkpoints.png``.

Modules:

- ``timing``: the interleaved timer, medians, slopes, the machine's description.
- ``models``: seeded test MLPs and the default language model, one copy per side.
- ``ours`` / ``plain`` / ``theirs``: the same experiments written for intervene,
  with plain hooks, and for nnsight.
- ``generated``: experiments whose code depends on a number (N invokes).
- ``cases``: the six cases and their targets; ``compile_case``: case 5's subject.
- ``memory``: peak tensor memory from the CPU allocator's events.
- ``report``: the Markdown table and the plot; ``suite``: the command line.
- ``profile``: cProfile of intervene's side of one case (``python -m bench.profile``).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from .suite import main as run

    return run(argv)
