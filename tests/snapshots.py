"""Golden-file snapshots for compiler output.

``assert_snapshot(name, text)`` compares ``text`` with ``tests/golden/<name>``.

- ``INTERVENE_UPDATE_SNAPSHOTS=1``: (re)write the golden file instead of comparing; use
  it on purpose after a deliberate change, then review ``git diff tests/golden``.
- A missing golden file fails with the command that creates it (never silently passes).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
UPDATE_ENV = "INTERVENE_UPDATE_SNAPSHOTS"
REFRESH_HINT = (
    f"{UPDATE_ENV}=1 .venv/bin/python -m pytest -q tests/test_compiler.py "
    "(then review `git diff tests/golden`)"
)


def updating() -> bool:
    return os.environ.get(UPDATE_ENV) == "1"


def assert_snapshot(name: str, text: str, golden_dir: Path | None = None) -> None:
    """Fail unless ``text`` equals the golden file ``name`` (or write it when updating)."""
    folder = GOLDEN_DIR if golden_dir is None else Path(golden_dir)
    path = folder / name
    if updating():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        return
    if not path.exists():
        pytest.fail(
            f"golden file {path} does not exist. Create it with: {REFRESH_HINT}",
            pytrace=False,
        )
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"golden/{name}",
                tofile="actual",
            )
        )
        pytest.fail(
            f"snapshot {name} differs from {path}:\n{diff}\n"
            f"If the change is intended, refresh with: {REFRESH_HINT}",
            pytrace=False,
        )
