"""Pictures for the samples: each chart a sample prints is also written as a PNG.

matplotlib is optional (``pip install -c constraints.txt -e '.[plots]'``; ``make demo``
installs it): without it ``new_figure`` gives None and the samples print their text
charts only.  Pictures go to ``samples/out/`` (ignored by git), or to the folder
``$INTERVENE_PLOTS`` names.  Only matplotlib's object interface is used (``Figure``,
no ``pyplot``), so drawing changes no global state and needs no display.
"""

from __future__ import annotations

import os
from pathlib import Path

PLOTS_ENV = "INTERVENE_PLOTS"
NO_MATPLOTLIB = ("(no picture: matplotlib is not installed; "
                 "`pip install -c constraints.txt -e '.[plots]'` or `make demo` installs it)")


def out_dir() -> Path:
    """Where pictures go: ``$INTERVENE_PLOTS``, else ``samples/out``."""
    return Path(os.environ.get(PLOTS_ENV) or Path(__file__).resolve().parent / "out")


def new_figure(width: float = 8.0, height: float = 4.5):
    """An empty matplotlib ``Figure`` (inches), or None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=(width, height), layout="constrained")


def save(fig, name: str) -> Path:
    """Write ``fig`` as ``<out_dir>/<name>.png`` and return the path."""
    folder = out_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=150)
    return path


def report(path: Path | None) -> None:
    """Say where the picture went (or why there is none)."""
    if path is None:
        print(NO_MATPLOTLIB)
        return
    try:
        shown = path.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = path
    print(f"picture: {shown}")
