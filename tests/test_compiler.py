"""The compiler: plan fields, checkpoint numbering, rewritten code, and golden snapshots
of ``show-plan`` (text, ``--code``, ``--json``) for the corpus in ``tests/corpus``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import snapshots
from support import line_in

from compiler import compile_function, intervene
from compiler.plan import Checkpoint, Plan

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CORPUS = sorted(p.name for p in (TESTS / "corpus").glob("*.py"))
THIS_FILE = Path(__file__).resolve()


def line_of(marker: str) -> int:
    """The line of this file ending with ``marker`` (exactly once)."""
    return line_in(THIS_FILE, marker)


def show_plan(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "compiler", "show-plan", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )


def checkpoints(fn, block: int = 0, lane: int = 0) -> tuple[Checkpoint, ...]:
    return fn.plan.functions[0].blocks[block].lanes[lane].checkpoints


def summary(fn, block: int = 0, lane: int = 0) -> list[tuple]:
    return [(c.order, c.path, c.value, c.access) for c in checkpoints(fn, block, lane)]


# --------------------------------------------------------------------------------------
# Golden snapshots of the corpus
# --------------------------------------------------------------------------------------


def test_corpus_is_there():
    assert len(CORPUS) >= 10


MODES = {"plan.txt": (), "code.txt": ("--code",), "json": ("--json",)}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("corpus_file", CORPUS)
def test_corpus_snapshot(corpus_file, mode):
    rel = f"tests/corpus/{corpus_file}"
    result = show_plan(rel, *MODES[mode])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    text = result.stdout
    assert str(REPO) not in text, "golden output must not hold machine-specific paths"
    assert rel in text
    if mode == "json":
        doc = json.loads(text)
        assert doc["version"] == 2
        assert doc["functions"], "every corpus file has @intervene functions"
    snapshots.assert_snapshot(f"{Path(corpus_file).stem}.{mode}", text)


def test_no_stale_golden_files():
    expected = {f"{Path(c).stem}.{mode}" for c in CORPUS for mode in MODES}
    present = {p.name for p in snapshots.GOLDEN_DIR.iterdir()} if snapshots.GOLDEN_DIR.exists() else set()
    assert present - expected == set(), "golden files with no corpus file: delete them"


def _load_corpus(stem: str):
    path = TESTS / "corpus" / f"{stem}.py"
    spec = importlib.util.spec_from_file_location(f"_corpus_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _show_plan_in_process(capsys, *args: str) -> str:
    from compiler.__main__ import main

    capsys.readouterr()
    assert main(["show-plan", *args]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("corpus_file", CORPUS)
def test_decorator_plan_equals_static_plan(corpus_file, capsys):
    """``fn.plan`` of the imported function is what show-plan finds statically."""
    stem = Path(corpus_file).stem
    module = _load_corpus(stem)
    path = str(TESTS / "corpus" / corpus_file)
    doc = json.loads(_show_plan_in_process(capsys, path, "--json"))
    assert doc["functions"]
    for f in doc["functions"]:
        fn = getattr(module, f["name"], None)
        if fn is None:  # a method
            fn = next(getattr(v, f["name"]) for v in vars(module).values()
                      if isinstance(v, type) and hasattr(v, f["name"]))
        assert json.loads(fn.plan.to_json())["functions"][0] == f
        text = _show_plan_in_process(capsys, path, "--function", f["name"])
        assert str(fn.plan) + "\n" == text


def _corpus_calls():
    import torch

    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randn(1, 8, generator=torch.Generator().manual_seed(1)).expand(3, 8)
    return {
        "basic_save.basic_save": lambda f, m: f(m, x),
        "basic_save.save_method_and_value": lambda f, m: f(m, x),
        "writes.double_layer": lambda f, m: f(m, x),
        "writes.set_input_and_output": lambda f, m: f(m, x),
        "inplace.zero_and_scale": lambda f, m: f(m, x),
        "augassign.shift": lambda f, m: f(m, x, 0.5),
        "loops.every_layer": lambda f, m: f(m, x),
        "loops.indexed_loop": lambda f, m: f(m, x),
        "comprehensions.comprehensions": lambda f, m: f(m, x),
        "branches.branch": lambda f, m: f(m, x, 0.0),
        "multiple_blocks.patch": lambda f, m: f(m, x, y),
        "invokes.two_invokes": lambda f, m: f(m, x, y),
        "inputs.inputs": lambda f, m: f(m, x),
        "no_grad.no_grad_inside": lambda f, m: f(m, x),
        "no_grad.gradient": lambda f, m: f(m, x),
        "methods.run": lambda f, m: f(m, x),
        "control_flow.arms": lambda f, m: f(m, x, "late"),
        "control_flow.with_items": lambda f, m: f(m, x),
        "control_flow.decorated": lambda f, m: f(m, x),
    }


def test_every_corpus_function_runs():
    """The corpus is made of working experiments: each runs on the tiny MLP."""
    from runtime import NNsight
    from runtime.models import tiny_mlp

    calls = _corpus_calls()
    seen = set()
    for corpus_file in CORPUS:
        stem = Path(corpus_file).stem
        module = _load_corpus(stem)
        for name, fn in vars(module).items():
            if name == "Probe":
                model = NNsight(tiny_mlp())
                calls["methods.run"](lambda m, x, cls=fn: cls(m, 3).run(x), model)
                seen.add("methods.run")
            elif hasattr(fn, "plan"):
                key = f"{stem}.{name}"
                assert key in calls, f"add a call for corpus function {key}"
                model = NNsight(tiny_mlp())
                calls[key](fn, model)
                seen.add(key)
            else:
                continue
            for sub in model._module.modules():
                assert not sub._forward_hooks and not sub._forward_pre_hooks
    assert seen == set(calls)


# -- the snapshot helper itself ----------------------------------------------------------


def test_snapshot_helper_missing_file_explains(tmp_path, monkeypatch):
    monkeypatch.delenv(snapshots.UPDATE_ENV, raising=False)
    with pytest.raises(pytest.fail.Exception) as info:
        snapshots.assert_snapshot("nothing.txt", "x", golden_dir=tmp_path)
    assert "does not exist" in str(info.value)
    assert f"{snapshots.UPDATE_ENV}=1" in str(info.value)
    assert not (tmp_path / "nothing.txt").exists()


def test_snapshot_helper_compares_and_updates(tmp_path, monkeypatch):
    monkeypatch.delenv(snapshots.UPDATE_ENV, raising=False)
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    snapshots.assert_snapshot("a.txt", "one\ntwo\n", golden_dir=tmp_path)
    with pytest.raises(pytest.fail.Exception) as info:
        snapshots.assert_snapshot("a.txt", "one\nthree\n", golden_dir=tmp_path)
    assert "-two" in str(info.value) and "+three" in str(info.value)
    assert snapshots.UPDATE_ENV in str(info.value)
    monkeypatch.setenv(snapshots.UPDATE_ENV, "1")
    snapshots.assert_snapshot("a.txt", "one\nthree\n", golden_dir=tmp_path)
    snapshots.assert_snapshot("new.txt", "fresh\n", golden_dir=tmp_path)
    assert (tmp_path / "a.txt").read_text() == "one\nthree\n"
    assert (tmp_path / "new.txt").read_text() == "fresh\n"


# --------------------------------------------------------------------------------------
# Plan fields
# --------------------------------------------------------------------------------------


@intervene
def basic(model, x):  # BASIC-DEF
    with model.trace(x) as tracer:  # noqa: F841 # BASIC-BLOCK
        hidden = model.layers[1].output.save()  # BASIC-READ
        logits = model.head.output  # BASIC-HEAD
        logits.save()
    return hidden, logits


def test_basic_plan_fields():
    plan = basic.plan
    assert isinstance(plan, Plan) and len(plan.functions) == 1
    f = plan.functions[0]
    assert f.name == "basic"
    assert Path(f.filename).resolve() == THIS_FILE
    assert f.line == line_of("# BASIC-DEF")
    (block,) = f.blocks
    assert (block.index, block.kind, block.model, block.args) == (0, "trace", "model", "x")
    assert block.line == line_of("# BASIC-BLOCK")
    assert block.saved == ("hidden", "logits")
    (lane,) = block.lanes
    assert lane.index == 0 and lane.input is None
    first, second = lane.checkpoints
    assert first == Checkpoint(
        order=0, path="model.layers[1]", value="output", access="read",
        line=line_of("# BASIC-READ"), col=17, parts=("layers", 1), saves=True, steps=None,
        scope=(),
    )
    assert not first.dynamic
    assert (second.order, second.path, second.parts, second.value) == (1, "model.head", ("head",), "output")
    assert second.line == line_of("# BASIC-HEAD")
    # `logits.save()` on its own line marks the assignment of `logits` as saving
    assert second.saves is True
    assert block.checkpoint(1) is second
    with pytest.raises(KeyError):
        block.checkpoint(2)


@intervene
def write_then_read(model, x):
    with model.trace(x):
        model.layers[1].output = model.layers[1].output * 2  # READ-WRITE-LINE
        h = model.layers[1].output.save()
    return h


def test_read_then_write_numbering():
    assert summary(write_then_read) == [
        (0, "model.layers[1]", "output", "read"),
        (1, "model.layers[1]", "output", "write"),
        (2, "model.layers[1]", "output", "read"),
    ]
    cps = checkpoints(write_then_read)
    assert cps[0].line == cps[1].line == line_of("# READ-WRITE-LINE")
    assert not cps[0].saves and not cps[1].saves and cps[2].saves
    code = write_then_read.code
    assert (
        "yield __iv.write(model.layers[1], 'output', 1, "
        "(yield __iv.read(model.layers[1], 'output', 0)) * 2)"
    ) in code
    assert "h = __iv.save((yield __iv.read(model.layers[1], 'output', 2)))" in code


@intervene
def evaluation_order(model, x, f):
    with model.trace(x):
        model.layers[3].output = model.layers[1].output + model.layers[2].output
        model.layers[3].input = f(model.layers[0].output, model.layers[1].input)
    return x


def test_numbering_follows_evaluation_order():
    # right-hand side first (left to right), then the write; arguments before the call
    assert summary(evaluation_order) == [
        (0, "model.layers[1]", "output", "read"),
        (1, "model.layers[2]", "output", "read"),
        (2, "model.layers[3]", "output", "write"),
        (3, "model.layers[0]", "output", "read"),
        (4, "model.layers[1]", "input", "read"),
        (5, "model.layers[3]", "input", "write"),
    ]


@intervene
def inplace_kinds(model, x):
    with model.trace(x):
        model.layers[0].output[:] = 0
        model.layers[1].output[:, 0] *= 0.5
        model.layers[2].output.mul_(2)
        model.layers[3].output += 1
        model.layers[3].input.zero_()
        model.head.output.clone()
    return x


def test_inplace_access_kinds():
    assert summary(inplace_kinds) == [
        (0, "model.layers[0]", "output", "inplace"),
        (1, "model.layers[1]", "output", "inplace"),
        (2, "model.layers[2]", "output", "inplace"),
        (3, "model.layers[3]", "output", "inplace"),
        (4, "model.layers[3]", "output", "write"),
        (5, "model.layers[3]", "input", "inplace"),
        (6, "model.head", "output", "read"),  # `.clone()` is not in-place
    ]


@intervene
def values_and_paths(model, x):
    with model.trace(x):
        a = model.layers[-1].input.save()
        print(model.layers[0].inputs)
        c = model.output.save()
        print(model.layers[0].inner.deeper[2].output)
    return a, c


def test_values_and_static_paths():
    cps = checkpoints(values_and_paths)
    assert [(c.path, c.parts, c.value) for c in cps] == [
        ("model.layers[-1]", ("layers", -1), "input"),
        ("model.layers[0]", ("layers", 0), "inputs"),
        ("model", (), "output"),
        ("model.layers[0].inner.deeper[2]", ("layers", 0, "inner", "deeper", 2), "output"),
    ]
    assert [c.saves for c in cps] == [True, False, True, False]
    assert not any(c.dynamic for c in cps)
    assert values_and_paths.plan.functions[0].blocks[0].saved == ("a", "c")


@intervene
def control_flow(model, x, n):
    with model.trace(x):
        for layer in model.layers:  # FOR-LINE
            layer.output = layer.output * 2
        if n > 0:  # IF-LINE
            h = model.layers[n].output.save()
        else:
            h = model.head.output.save()
        while n < 0:  # WHILE-LINE
            n += 1
            model.head.input[:] = 0
        print([model.layers[i].output for i in range(2)])  # COMP-LINE
    return h


def test_dynamic_paths_and_scopes():
    cps = checkpoints(control_flow)
    f, i, w, c = (line_of(m) for m in ("# FOR-LINE", "# IF-LINE", "# WHILE-LINE", "# COMP-LINE"))
    assert [(c_.path, c_.dynamic, c_.parts, c_.access, c_.scope) for c_ in cps] == [
        ("layer", True, None, "read", (f"for@{f}",)),
        ("layer", True, None, "write", (f"for@{f}",)),
        ("model.layers[n]", True, None, "read", (f"if@{i}",)),
        ("model.head", False, ("head",), "read", (f"else@{i}",)),
        ("model.head", False, ("head",), "inplace", (f"while@{w}",)),
        ("model.layers[i]", True, None, "read", (f"comp@{c}",)),
    ]
    assert [cp.order for cp in cps] == list(range(6))


@intervene
def two_blocks(model, x, y):
    with model.trace(x):  # BLOCK-0
        h = model.layers[1].output.save()
        g = model.head.output.save()
    with model.trace(y, 3):  # BLOCK-1
        model.layers[1].output = h
        out = model.head.output.save()
    return out, g


def test_numbering_restarts_per_block():
    blocks = two_blocks.plan.functions[0].blocks
    assert [(b.index, b.args, b.line, b.saved) for b in blocks] == [
        (0, "x", line_of("# BLOCK-0"), ("g", "h")),
        (1, "y, 3", line_of("# BLOCK-1"), ("out",)),
    ]
    assert summary(two_blocks, 0) == [(0, "model.layers[1]", "output", "read"),
                                      (1, "model.head", "output", "read")]
    assert summary(two_blocks, 1) == [(0, "model.layers[1]", "output", "write"),
                                      (1, "model.head", "output", "read")]


@intervene
def invokes(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):  # INVOKE-0
            first = model.layers[1].output.save()
        with tracer.invoke(b):  # INVOKE-1
            model.layers[3].output = model.layers[3].output + first
            second = model.head.output.save()
        with tracer.invoke():  # INVOKE-2
            everything = model.head.output.save()
    return first, second, everything


def test_invoke_lanes():
    (block,) = invokes.plan.functions[0].blocks
    assert block.args == ""
    assert [(ln.index, ln.input, ln.line) for ln in block.lanes] == [
        (0, "a", line_of("# INVOKE-0")),
        (1, "b", line_of("# INVOKE-1")),
        (2, None, line_of("# INVOKE-2")),
    ]
    # numbering runs on across the lanes of one block
    assert summary(invokes, 0, 0) == [(0, "model.layers[1]", "output", "read")]
    assert summary(invokes, 0, 1) == [(1, "model.layers[3]", "output", "read"),
                                      (2, "model.layers[3]", "output", "write"),
                                      (3, "model.head", "output", "read")]
    assert summary(invokes, 0, 2) == [(4, "model.head", "output", "read")]
    assert block.saved == ("everything", "first", "second")
    text = str(invokes.plan)
    assert "invoke 0 (a)" in text and "invoke 2 (whole batch)" in text


def test_methods_and_model_on_self():
    class Probe:
        @intervene
        def run(self, x):
            with self.lm.trace(x):
                h = self.lm.transformer.h[5].output[0].save()
            return h

    (block,) = Probe.run.plan.functions[0].blocks
    assert block.model == "self.lm"
    (cp,) = block.lanes[0].checkpoints
    assert (cp.path, cp.parts) == ("self.lm.transformer.h[5]", ("transformer", "h", 5))


def test_nested_no_grad_keeps_checkpoints_static():
    import torch  # only named in the source

    @intervene
    def ng(model, x):
        with model.trace(x):
            with torch.no_grad():
                h = model.layers[1].output.save()
            out = model.head.output.save()
        return h, out

    assert summary(ng) == [(0, "model.layers[1]", "output", "read"), (1, "model.head", "output", "read")]
    assert [c.scope for c in checkpoints(ng)] == [(), ()]


def test_compiling_twice_gives_equal_plans():
    a, b = compile_function(control_flow.__wrapped__), compile_function(control_flow.__wrapped__)
    assert a.plan == b.plan
    assert a.code == b.code
    again = intervene(basic.__wrapped__)
    assert again.plan == basic.plan
    assert again.code == basic.code
    assert again.plan.to_json() == basic.plan.to_json()


def test_plan_json_form():
    doc = json.loads(evaluation_order.plan.to_json())
    assert doc["version"] == 2
    (f,) = doc["functions"]
    assert f["name"] == "evaluation_order"
    item = f["blocks"][0]["lanes"][0]["items"][0]
    assert item["type"] == "checkpoint"
    assert item["dynamic"] is False
    assert item["parts"] == ["layers", 1]
    assert item["scope"] == []
    assert set(item) >= {"order", "path", "value", "access", "line", "col", "saves", "steps"}


def test_rewritten_code_has_no_decorator_and_keeps_names():
    code = basic.code
    assert code.startswith("def basic(model, x):")
    assert "@intervene" not in code
    assert "with __iv.block(model, 'trace', 0, x) as tracer:" in code
    assert "nonlocal hidden, logits" in code
    assert basic.__name__ == "basic" and basic.__wrapped__.__name__ == "basic"


def test_unsaved_shared_names_are_unbound_after_block():
    @intervene
    def shadow(model, x):
        tmp = 1
        with model.trace(x):
            tmp = model.layers[0].output
            h = model.head.output.save()
        tmp = 2
        return h, tmp

    # `tmp` is bound in the block and outside it, not saved: it is unbound on leaving
    assert "tmp = None" in shadow.code and "del tmp" in shadow.code


def test_decoration_compiles_once():
    calls = []

    import compiler

    original = compiler.compile_source

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    compiler.compile_source = counting
    try:
        @intervene
        def once(model, x):
            with model.trace(x):
                h = model.head.output.save()
            return h
    finally:
        compiler.compile_source = original
    assert calls == [1]


# --------------------------------------------------------------------------------------
# No torch at compile time
# --------------------------------------------------------------------------------------


def test_decoration_does_not_import_torch(tmp_path):
    mod = tmp_path / "exp_mod.py"
    mod.write_text(
        "from compiler import intervene\n\n\n"
        "@intervene\n"
        "def exp(model, x):\n"
        "    with model.trace(x):\n"
        "        h = model.layers[0].output.save()\n"
        "    return h\n"
    )
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import exp_mod; "
        "import runtime; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "print(exp_mod.exp.plan.functions[0].blocks[0].lanes[0].checkpoints[0].path)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "model.layers[0]"


def test_show_plan_does_not_import_torch():
    path = "tests/corpus/no_grad.py"  # this file itself imports torch: it must not be run
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['compiler', 'show-plan', {path!r}, '--code']\n"
        "try:\n"
        "    runpy.run_module('compiler', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print('NO-TORCH-OK')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "NO-TORCH-OK" in result.stdout
    assert "no_grad_inside" in result.stdout


def test_show_plan_importtime_has_no_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "compiler", "show-plan",
         "tests/corpus/basic_save.py", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0
    imported = [ln.split("|")[-1].strip() for ln in result.stderr.splitlines()
                if ln.startswith("import time:")]
    assert "libcst" in imported
    assert not any(name == "torch" or name.startswith("torch.") for name in imported)
