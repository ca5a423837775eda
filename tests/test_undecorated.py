"""Trace blocks without a decorator (issue 13, item 1): ``with model.trace(x):`` at
the top level of a script, in a plain function, in a notebook-like cell, compiled on
entry (runtime/direct.py, compiler/block.py) with the semantics of the decorated form."""

from __future__ import annotations

import linecache
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compiler import CompileError, intervene
from runtime import LanguageModel, NNsight
from runtime.models import tiny_llama, tiny_mlp

ROOT = Path(__file__).resolve().parent.parent


def _run_script(tmp_path, text: str) -> str:
    script = tmp_path / "experiment.py"
    script.write_text(textwrap.dedent(text))
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False, env={"PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return out.stdout


# nnsight-style snippets, pasted as written (module names for the tiny Llama).
SNIPPET = """
import torch
from runtime import LanguageModel
from runtime.models import tiny_llama

model = LanguageModel(tiny_llama(0), tokenizer=None)
ids = torch.tensor([[1, 5, 9, 2]])

with model.trace(ids):
    hidden = model.model.layers[0].output.save()
    model.model.layers[1].mlp.output[:] = 0
    logits = model.lm_head.output.save()

with model.trace() as tracer:
    with tracer.invoke(ids):
        a = model.model.layers[1].output.save()
    with tracer.invoke(ids[:, :2]):
        b = model.model.layers[1].output.save()

torch.save({"hidden": hidden, "logits": logits, "a": a, "b": b}, OUT)
"""


def _decorated(ids):
    model = LanguageModel(tiny_llama(0), tokenizer=None)

    @intervene
    def run(model, ids):
        with model.trace(ids):
            hidden = model.model.layers[0].output.save()
            model.model.layers[1].mlp.output[:] = 0
            logits = model.lm_head.output.save()
        with model.trace() as tracer:
            with tracer.invoke(ids):
                a = model.model.layers[1].output.save()
            with tracer.invoke(ids[:, :2]):
                b = model.model.layers[1].output.save()
        return {"hidden": hidden, "logits": logits, "a": a, "b": b}

    return run(model, ids)


def test_top_level_script_equals_the_decorated_form(tmp_path):
    out = tmp_path / "values.pt"
    _run_script(tmp_path, f"OUT = {str(out)!r}\n" + SNIPPET)
    got = torch.load(out)
    want = _decorated(torch.tensor([[1, 5, 9, 2]]))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_plain_function_equals_the_decorated_form(tmp_path):
    body = textwrap.indent(SNIPPET.split("ids = torch.tensor([[1, 5, 9, 2]])\n")[1], "    ")
    text = SNIPPET.split("model = LanguageModel")[0] + (
        "model = LanguageModel(tiny_llama(0), tokenizer=None)\n\n"
        "def experiment(model, ids):\n" + body + "\n"
        "experiment(model, torch.tensor([[1, 5, 9, 2]]))\n")
    out = tmp_path / "values.pt"
    _run_script(tmp_path, f"OUT = {str(out)!r}\n" + text)
    got = torch.load(out)
    want = _decorated(torch.tensor([[1, 5, 9, 2]]))
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_in_a_function_the_saved_names_are_its_locals_and_match_hooks():
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.randn(3, 8)

    def experiment(x):
        scale = 2.0
        with model.trace(x) as tracer:
            h = model.layers[0].output.save()
            model.layers[1].output[:] = model.layers[1].output * scale
            out = model.output.save()
        return h, out, tracer

    h, out, tracer = experiment(x)
    seen = {}
    hooks = [net.layers[0].register_forward_hook(lambda m, i, o: seen.setdefault("h", o.clone())),
             net.layers[1].register_forward_hook(lambda m, i, o: o * 2.0)]
    try:
        want = net(x)
    finally:
        for hk in hooks:
            hk.remove()
    assert torch.equal(h, seen["h"]) and torch.equal(out, want)
    assert "block at line" in str(tracer.plan) and "layers[0]" in str(tracer.plan)
    assert tracer.plan.functions[0].blocks[0].saved == ("h", "out")
    # no hook outlives the block
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_a_loop_of_blocks_reuses_the_compiled_block():
    from compiler import block

    net = tiny_mlp()
    model = NNsight(net)
    outs = []
    for i in range(3):
        with model.trace(torch.full((1, 8), float(i))):
            o = model.output.save()
        outs.append(o)
    for i, o in enumerate(outs):
        assert torch.equal(o, net(torch.full((1, 8), float(i))))
    keys = [k for k in block._compiled if k[1] == __file__ and "float(i)" in k[0]]
    assert len(keys) == 1


def test_body_is_skipped_and_the_tracer_is_the_as_name():
    net = tiny_mlp()
    model = NNsight(net)
    ran = []
    with model.trace(torch.ones(1, 8)) as tracer:
        out = model.output.save()  # noqa: F841 - bound by the compiled block
        ran.append(1)  # runs once, compiled: not a second time as the plain body
    assert ran == [1]
    assert tracer.plan.functions[0].blocks[0].saved == ("out",)
    assert sys.gettrace() is None or "coverage" in type(sys.gettrace()).__module__


def test_unsaved_variable_read_after_the_block_is_the_decorated_error():
    model = NNsight(tiny_mlp())
    with pytest.raises(CompileError, match=r"`o` is assigned inside the block .* without being saved"):
        with model.trace(torch.ones(1, 8)):
            o = model.output
        print(o)  # never reached: the error comes as the block is entered


def test_errors_before_the_run_name_the_users_line():
    model = NNsight(tiny_mlp())
    with pytest.raises(IndexError, match=r"line \d+: `model\.layers\[9\]`"):  # noqa: SIM117
        with model.trace(torch.ones(1, 8)):
            model.layers[9].output.save()


def test_runtime_error_traceback_shows_the_users_line():
    model = NNsight(tiny_mlp())
    try:
        with model.trace(torch.ones(1, 8)):
            h = model.layers[0].output
            h.no_such_method()
        raise AssertionError("not raised")
    except AttributeError as exc:
        tb = exc.__traceback__
        lines = []
        while tb is not None:
            lines.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
            tb = tb.tb_next
    me = sys._getframe().f_lineno
    assert (__file__, me - 8) in lines, lines  # `h.no_such_method()`


def test_no_source_is_a_clear_error():
    code = textwrap.dedent("""
        import torch
        from runtime import NNsight
        from runtime.models import tiny_mlp
        model = NNsight(tiny_mlp())
        with model.trace(torch.ones(1, 8)):
            out = model.output.save()
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode != 0
    assert "compiled from its source, and there is none for <string>" in out.stderr


def test_exec_of_a_string_is_a_clear_error():
    model = NNsight(tiny_mlp())
    with pytest.raises(CompileError, match="there is none for <string>"):
        exec("with model.trace(torch.ones(1, 8)):\n    out = model.output.save()\n",  # noqa: S102 - the case under test
             {"model": model, "torch": torch})


def test_a_notebook_cell_through_linecache():
    model = NNsight(tiny_mlp())
    cell = "with model.trace(x):\n    out = model.output.save()\n"
    name = "<ipython-input-7-abc>"
    linecache.cache[name] = (len(cell), None, cell.splitlines(True), name)
    ns = {"model": model, "x": torch.ones(2, 8)}
    try:
        exec(compile(cell, name, "exec"), ns)  # noqa: S102 - a notebook cell, as IPython runs it
    finally:
        linecache.cache.pop(name, None)
    assert torch.equal(ns["out"], model._module(torch.ones(2, 8)))


def test_a_time_magic_cell_through_linecache():
    # IPython runs a `%%time` cell as get_ipython().run_cell_magic('time', '', body) (that
    # text is in linecache) and compiles the body as "<timed exec>" (which is not).
    model = NNsight(tiny_mlp())
    body = "y = 1\nwith model.trace(x):\n    h = model.layers[0].output.save()\n    out = model.output.save()\n"
    ran = f"get_ipython().run_cell_magic('time', '', {body!r})\n"
    cell = "<ipython-input-8-abc>"
    linecache.cache[cell] = (len(ran), None, [ran], cell)
    ns = {"model": model, "x": torch.ones(2, 8)}
    try:
        exec(compile(body, "<timed exec>", "exec"), ns)  # noqa: S102 - a %%time cell, as IPython runs it
    finally:
        linecache.cache.pop(cell, None)
        linecache.cache.pop("<timed exec>", None)
    net = model._module
    assert torch.equal(ns["out"], net(torch.ones(2, 8)))
    assert torch.equal(ns["h"], net.layers[0](torch.ones(2, 8)))


def test_a_time_magic_cell_of_another_text_is_not_taken():
    # the newest %%time cell in linecache has no `with` at the block's line: no source
    model = NNsight(tiny_mlp())
    ran = "get_ipython().run_cell_magic('time', '', 'print(1)\\n')\n"
    cell = "<ipython-input-9-abc>"
    linecache.cache[cell] = (len(ran), None, [ran], cell)
    try:
        with pytest.raises(CompileError, match="there is none for <timed exec>"):
            exec(compile("with model.trace(x):\n    out = model.output.save()\n",  # noqa: S102
                         "<timed exec>", "exec"), {"model": model, "x": torch.ones(2, 8)})
    finally:
        linecache.cache.pop(cell, None)
        linecache.cache.pop("<timed exec>", None)


def test_body_on_the_with_line_is_refused():
    model = NNsight(tiny_mlp())
    with pytest.raises(CompileError, match="needs its body on the lines below"):  # noqa: SIM117
        with model.trace(torch.ones(1, 8)): out = model.output.save()  # noqa: F841


def test_show_plan_lists_top_level_blocks(tmp_path):
    f = tmp_path / "script.py"
    f.write_text("import torch\nwith model.trace(x):\n    h = model.layers[0].output.save()\n")
    out = subprocess.run([sys.executable, "-m", "compiler", "show-plan", str(f)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "<block at line 2>" in out.stdout and "layers[0]" in out.stdout


@pytest.mark.slow
def test_default_model_snippet(default_lm):
    model = LanguageModel("smollm2-135m")
    with model.trace("The Eiffel Tower is in the city of"):
        logits = model.lm_head.output.save()
    net, tok = default_lm
    ids = tok("The Eiffel Tower is in the city of", return_tensors="pt")
    with torch.no_grad():
        want = net(**ids).logits
    assert torch.allclose(logits, want, atol=1e-5)


def test_generate_block_and_plain_generate_call():
    model = LanguageModel(tiny_llama(0), tokenizer=None)
    ids = torch.tensor([[1, 5, 9, 2]])
    with model.generate(ids, max_new_tokens=3) as tracer:
        logits = model.lm_head.output.save()
    plain = model.generate(ids, max_new_tokens=3)  # not a `with`: transformers' generate
    assert torch.equal(tracer.result, plain)

    @intervene
    def decorated(model, ids):
        with model.generate(ids, max_new_tokens=3) as tracer:
            logits = model.lm_head.output.save()
        return logits, tracer.result

    want, result = decorated(model, ids)
    assert torch.equal(logits, want) and torch.equal(result, plain)


def test_a_header_over_several_lines_and_other_items():
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.randn(2, 8)
    with model.trace(
        x
    ) as tracer:
        out = model.output.save()
    assert torch.equal(out, net(x)) and tracer.plan is not None
    with torch.no_grad(), model.trace(
            x) as t:
        h = model.layers[0].output.save()
    assert torch.equal(h, net.layers[0](x)) and not h.requires_grad
    assert t.plan.functions[0].blocks[0].saved == ("h",)
