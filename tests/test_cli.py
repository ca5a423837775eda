"""The ``intervene`` console command: its help, and ``serve`` forwarding to
``python -m runtime.serve``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from compiler import __main__ as cli

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "intervene"


def test_console_script_runs_show_plan():
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} is missing: reinstall with `.venv/bin/pip install --no-deps -e .`")
    args = ["show-plan", "tests/corpus/basic_save.py"]
    script = subprocess.run([str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=False)
    module = subprocess.run([sys.executable, "-m", "compiler", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert script.returncode == 0, script.stderr
    assert script.stdout == module.stdout
    assert "basic_save  (tests/corpus/basic_save.py:7)" in script.stdout
    helped = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert helped.stdout.startswith("usage: intervene [-h] COMMAND ...")


def _show_plan_parser() -> argparse.ArgumentParser:
    parser = cli._parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices["show-plan"]


def test_help_is_plain_words(capsys):
    for argv in (["--help"], ["show-plan", "--help"]):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert "``" not in out and "`" not in out  # no reStructuredText markup
        assert "show-plan" in out
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "serve ..." in top and "python -m runtime.serve" in top
    assert cli.main(["show-plan", "--help"]) == 0
    out = capsys.readouterr().out
    for column in ("order", "line", "module", "value", "access", "steps", "repeats in"):
        assert f"\n  {column} " in out, column
    assert ".ipynb" in out and "exit status" in out


def test_every_argument_has_help():
    for action in _show_plan_parser()._actions:
        assert action.help, action.dest


def test_usage_errors(capsys):
    assert cli.main([]) == 2
    assert "a command is needed (show-plan or serve)" in capsys.readouterr().err
    assert cli.main(["explain"]) == 2
    assert "invalid choice: 'explain'" in capsys.readouterr().err
    assert cli.main(["show-plan"]) == 2
    assert "the following arguments are required: FILE" in capsys.readouterr().err


def test_serve_forwards_every_argument(monkeypatch):
    import importlib.util
    import runpy

    calls = []

    def run_module(name, run_name=None, alter_sys=False):
        calls.append((name, run_name, alter_sys, list(sys.argv)))
        raise SystemExit(3)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(runpy, "run_module", run_module)
    argv_before = list(sys.argv)
    assert cli.main(["serve", "--port", "9", "--help"]) == 3
    assert calls == [("runtime.serve", "__main__", True,
                      [f"{cli._prog()} serve", "--port", "9", "--help"])]
    assert sys.argv == argv_before


def test_serve_without_the_server(monkeypatch, capsys):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "serve: error: the server is not part of this installation" in err
    assert "no module runtime.serve" in err


def test_serve_package_without_main(monkeypatch, capsys):
    import importlib.util
    import runpy

    def run_module(name, run_name=None, alter_sys=False):
        raise ImportError(f"No module named {name}.__main__", name=f"{name}.__main__")

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(runpy, "run_module", run_module)
    assert cli.main(["serve"]) == 2
    assert "No module named runtime.serve.__main__" in capsys.readouterr().err
