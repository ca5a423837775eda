"""What nnsight users type: ``save(x)``, ``import intervene``, loading keywords, hub ids,
double wrapping, ``rename=``, invokers' inputs, streamers, sessions, ``skip`` and ``edit``
(issue 13, runtime side).  Tiny models only; offline."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compiler import intervene
from runtime import LanguageModel, NNsight, save
from runtime.models import tiny_llama, tiny_mlp

ROOT = Path(__file__).resolve().parent.parent


# -- save(x) ------------------------------------------------------------------------


def test_save_function_is_exported_and_returns_its_value():
    import runtime

    assert runtime.save is save
    x = torch.ones(2)
    assert save(x) is x


def test_save_function_inside_a_block_keeps_the_value():
    net = tiny_mlp()
    model = NNsight(net)

    @intervene
    def f(model, x):
        with model.trace(x):
            h = save(model.layers[0].output)
            h.save()  # the compiler keeps a variable that `.save()` names (see for-compiler-13)
        return h

    x = torch.randn(3, 8)
    assert torch.equal(f(model, x), net.layers[0](x))


# -- import intervene ----------------------------------------------------------------


def test_import_intervene_is_cheap_and_exports_the_api():
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            import sys
            import intervene
            assert "torch" not in sys.modules, "import intervene loaded torch"
            from intervene import intervene as iv, CompileError, CONFIG
            import compiler, runtime
            assert iv is compiler.intervene and CompileError is compiler.CompileError
            assert CONFIG is runtime.CONFIG
            from intervene import LanguageModel, NNsight, OutOfOrderError, save
            from intervene import MissedCheckpointError
            assert save is runtime.save and NNsight is runtime.NNsight
            print("ok", sorted(dir(intervene)))
        """)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_import_intervene_is_not_shadowed_by_a_users_runtime_py(tmp_path):
    (tmp_path / "runtime.py").write_text("print('USER RUNTIME RAN')\nMINE = 1\n")
    (tmp_path / "compiler.py").write_text("print('USER COMPILER RAN')\nMINE = 2\n")
    (tmp_path / "script.py").write_text(textwrap.dedent("""
        import torch
        from intervene import intervene, NNsight, save
        from runtime.models import tiny_mlp
        net = tiny_mlp()
        model = NNsight(net)

        @intervene
        def f(model, x):
            with model.trace(x):
                h = model.layers[0].output.save()
            return h

        x = torch.randn(2, 8)
        print("equal", torch.equal(f(model, x), net.layers[0](x)))
    """))
    out = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "equal True" in out.stdout
    assert "USER" not in out.stdout  # the user's files were never run by `import intervene`
    # `import runtime` itself finds the user's file first: `intervene` is the safe import.
    (tmp_path / "script.py").write_text("import runtime\nprint('mine', runtime.MINE)\n")
    out = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert "mine 1" in out.stdout
