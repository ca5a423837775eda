"""``python -m compiler show-plan``: the command line (as a subprocess, or in process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from compiler.__main__ import main as cli_main  # in-process: show-plan loads no torch

REPO = Path(__file__).resolve().parents[1]

GOOD = '''\
from compiler import intervene


@intervene
def first(model, x):
    with model.trace(x):
        h = model.layers[1].output.save()
    return h


def helper(model, x):
    return x


@intervene
def second(model, x):
    with model.trace(x):
        model.layers[0].output = model.layers[0].output * 2
        out = model.head.output.save()
    return out
'''


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "compiler", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_text_lists_every_function_and_checkpoint(tmp_path):
    path = write(tmp_path, "exp.py", GOOD)
    result = run("show-plan", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"first  ({path}:5)" in out
    assert f"second  ({path}:16)" in out
    assert "helper" not in out
    assert "block 0: model.trace(x)  line 6" in out
    lines = out.splitlines()
    assert any(ln.split() == ["0", "7", "model.layers[1]", "output", "read", "save"] for ln in lines)
    assert any(ln.split() == ["0", "18", "model.layers[0]", "output", "read"] for ln in lines)
    assert any(ln.split() == ["1", "18", "model.layers[0]", "output", "write"] for ln in lines)
    assert any(ln.split() == ["2", "19", "model.head", "output", "read", "save"] for ln in lines)
    assert "saved after the block: h" in out
    assert "rewritten code" not in out


def test_function_filter(tmp_path):
    path = write(tmp_path, "exp.py", GOOD)
    result = run("show-plan", str(path), "--function", "second")
    assert result.returncode == 0
    assert "second" in result.stdout and "first" not in result.stdout
    doc = json.loads(run("show-plan", str(path), "--function", "first", "--json").stdout)
    assert [f["name"] for f in doc["functions"]] == ["first"]


def test_function_filter_unknown_name(tmp_path):
    path = write(tmp_path, "exp.py", GOOD)
    result = run("show-plan", str(path), "--function", "nope")
    assert result.returncode == 1
    assert "nope" in result.stderr and "no @intervene function" in result.stderr
    assert result.stdout == ""


def test_json_is_valid_and_versioned(tmp_path):
    path = write(tmp_path, "exp.py", GOOD)
    result = run("show-plan", str(path), "--json")
    assert result.returncode == 0
    doc = json.loads(result.stdout)
    assert doc["version"] == 2
    assert [f["name"] for f in doc["functions"]] == ["first", "second"]
    second = doc["functions"][1]
    assert second["line"] == 16 and second["filename"] == str(path)
    (block,) = second["blocks"]
    assert block["kind"] == "trace" and block["model"] == "model" and block["args"] == "x"
    assert block["saved"] == ["out"]
    items = block["lanes"][0]["items"]
    assert [(i["order"], i["path"], i["access"], i["line"]) for i in items] == [
        (0, "model.layers[0]", "read", 18), (1, "model.layers[0]", "write", 18),
        (2, "model.head", "read", 19)]
    assert items[0]["parts"] == ["layers", 0] and items[0]["dynamic"] is False
    assert "code" not in second


def test_json_with_code(tmp_path):
    path = write(tmp_path, "exp.py", GOOD)
    doc = json.loads(run("show-plan", str(path), "--json", "--code").stdout)
    code = doc["functions"][0]["code"]
    assert code.startswith("def first(model, x):")
    assert "__iv.read(model.layers[1], 'output', 0)" in code


def test_code_flag_adds_rewritten_source(tmp_path):
    path = write(tmp_path, "exp.py", GOOD)
    out = run("show-plan", str(path), "--code").stdout
    assert out.count("rewritten code:") == 2
    assert "    def second(model, x):" in out
    assert "yield __iv.write(model.layers[0], 'output', 1," in out


def test_static_never_runs_the_file(tmp_path):
    sentinel = tmp_path / "ran.txt"
    text = (
        "import this_module_does_not_exist\n"
        f"open({str(sentinel)!r}, 'w').write('ran')\n" + GOOD
    )
    path = write(tmp_path, "exp.py", text)
    result = run("show-plan", str(path))
    assert result.returncode == 0, result.stderr
    assert not sentinel.exists()
    assert "first" in result.stdout


def _broken(tmp_path):
    # line 7 of GOOD is `h = model.layers[1].output.save()`: make it unparsable
    text = GOOD.replace("h = model.layers[1]", "h = = model.layers[1]")
    assert text.splitlines()[6].strip().startswith("h = = ")
    return write(tmp_path, "broken.py", text)


def test_parse_error_one_line_with_file_and_line(tmp_path):
    path = _broken(tmp_path)
    result = run("show-plan", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    where, _, message = lines[0].partition(": error: ")
    assert message.startswith("cannot parse")
    filename, _, line = where.rpartition(":")
    assert filename == str(path)
    assert line.isdigit() and 6 <= int(line) <= 8
    assert "Traceback" not in result.stderr


def test_parse_error_names_the_exact_line(tmp_path):
    path = _broken(tmp_path)
    result = run("show-plan", str(path))
    assert result.stderr.startswith(f"{path}:7: error: ")


def test_compile_error_in_file(tmp_path):
    text = GOOD.replace("h = model.layers[1].output.save()", "h = model.layers[1].output")
    path = write(tmp_path, "leak.py", text)
    result = run("show-plan", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    # the read after the block (line 8) is the error's place; the message names both lines
    assert lines[0].startswith(f"{path}:8: error: ")
    assert "line 7" in lines[0] and "`h`" in lines[0]


def test_missing_file(tmp_path):
    result = run("show-plan", str(tmp_path / "absent.py"))
    assert result.returncode == 1
    assert "absent.py" in result.stderr and "error" in result.stderr
    assert "Traceback" not in result.stderr


def test_file_without_experiments(tmp_path):
    path = write(tmp_path, "plain.py", "def f(x):\n    return x\n")
    result = run("show-plan", str(path))
    assert result.returncode == 0
    assert "no @intervene functions" in result.stdout
    doc = json.loads(run("show-plan", str(path), "--json").stdout)
    assert doc == {"version": 2, "functions": []}


def test_relative_path_is_kept_as_given():
    result = run("show-plan", "tests/corpus/basic_save.py")
    assert result.returncode == 0
    assert "basic_save  (tests/corpus/basic_save.py:7)" in result.stdout
    assert str(REPO) not in result.stdout


def test_usage_and_unknown_command():
    assert run().returncode == 2
    helped = run("--help")
    assert helped.returncode == 0 and "show-plan" in helped.stdout
    unknown = run("explain", "x.py")
    assert unknown.returncode == 2 and "show-plan" in unknown.stderr


def test_decorator_spellings_found(tmp_path):
    text = (
        "import compiler\n"
        "from compiler import intervene as intervene\n\n"
        "@compiler.intervene\n"
        "def a(model, x):\n"
        "    with model.trace(x):\n"
        "        h = model.head.output.save()\n"
        "    return h\n\n"
        "class C:\n"
        "    @intervene\n"
        "    def b(self, x):\n"
        "        with self.m.trace(x):\n"
        "            h = self.m.head.output.save()\n"
        "        return h\n"
    )
    path = write(tmp_path, "spell.py", text)
    doc = json.loads(run("show-plan", str(path), "--json").stdout)
    assert [(f["name"], f["line"]) for f in doc["functions"]] == [("a", 5), ("b", 12)]
    assert doc["functions"][1]["blocks"][0]["model"] == "self.m"
    assert doc["functions"][1]["blocks"][0]["lanes"][0]["items"][0]["line"] == 14


# --------------------------------------------------------------------------------------
# The text form: header, aligned columns, loops
# --------------------------------------------------------------------------------------

WIDE = '''\
from compiler import intervene


@intervene
def wide(model, prompt, layer, n):
    with model.generate(prompt, max_new_tokens=n) as tracer:
        with tracer.iter[1:3]:
            model.model.layers[layer].output[:, -1] *= 2
        for i in range(2):
            model.model.layers[i].output[:, 0] = 0
            outs = [model.model.layers[j].output.sum() for j in range(3)]
        while n > 0:
            n -= 1
            cache = tracer.cache(modules=list(model.model.layers))
        out = model.lm_head.output.save()
    return out
'''


def show(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(["show-plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def block_rows(out: str) -> tuple[str, list[str]]:
    """The header row and the item rows of the only block in ``out``."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["order", "line"])
    rows = [ln for ln in lines[start + 1:] if ln.split() and ln.split()[0].isdigit()]
    return lines[start], rows


def test_header_names_the_columns(tmp_path, capsys):
    code, out, _ = show(capsys, str(write(tmp_path, "exp.py", GOOD)))
    assert code == 0
    headers = [ln.split() for ln in out.splitlines() if ln.split()[:1] == ["order"]]
    assert headers == [["order", "line", "module", "value", "access"]] * 2


def test_columns_align_with_dynamic_paths_steps_and_loops(tmp_path, capsys):
    code, out, err = show(capsys, str(write(tmp_path, "wide.py", WIDE)))
    assert code == 0, err
    header, rows = block_rows(out)
    assert header.split() == ["order", "line", "module", "value", "access", "steps",
                              "repeats", "in"]
    starts = {name: header.index(name) for name in ("module", "value", "access", "steps",
                                                    "repeats in")}
    checkpoints = [r for r in rows if "--" not in r]
    assert len(checkpoints) == 4
    for r in checkpoints:
        for name, col in starts.items():
            if col < len(r) and r[col] != " ":
                assert r[col - 1] == " ", (name, r)  # every cell starts at its column
        # order and line are right-aligned under their titles
        assert r[header.index("order") + len("order") - 1].isdigit()
        assert r[header.index("line") + len("line") - 1].isdigit()
        assert r[starts["value"]:].split()[0] == "output"
    dynamic = next(r for r in checkpoints if "layers[layer]" in r)
    # the path as written, rooted at the model's variable (the spelling errors use too)
    assert dynamic[starts["module"]:].startswith("model.model.layers[layer]  (dynamic)")
    assert dynamic[starts["steps"]:].split()[0] == "[1:3]"
    # a marker's text spans the module to steps columns
    cache = next(r for r in rows if "-- cache" in r)
    assert cache.index("-- cache") == starts["module"]


def test_loops_are_shown_with_their_line(tmp_path, capsys):
    _, out, _ = show(capsys, str(write(tmp_path, "wide.py", WIDE)))
    header, rows = block_rows(out)
    col = header.index("repeats in")
    loops = {(r.split()[1], r[col:].strip() if len(r) > col else "") for r in rows}
    assert ("10", "for@9") in loops  # the for loop's own line
    assert ("11", "for@9 comp@11") in loops  # a comprehension in the loop: both
    assert ("14", "while@12") in loops  # a marker in a loop too
    assert ("8", "") in loops and ("15", "") in loops  # outside loops: runs once


def test_loop_column_only_where_there_are_loops(tmp_path, capsys):
    _, out, _ = show(capsys, str(write(tmp_path, "exp.py", GOOD)))
    assert "repeats in" not in out and "steps" not in out


# --------------------------------------------------------------------------------------
# Finding the functions: aliases, errors per function
# --------------------------------------------------------------------------------------


def test_alias_and_module_spellings_found(tmp_path, capsys):
    text = (
        "import compiler\n"
        "import intervene\n"
        "from compiler import intervene as iv\n\n"
        "@iv\n"
        "def a(model, x):\n"
        "    with model.trace(x):\n"
        "        h = model.head.output.save()\n"
        "    return h\n\n"
        "@intervene.intervene\n"
        "def b(model, x):\n"
        "    with model.trace(x):\n"
        "        h = model.head.output.save()\n"
        "    return h\n\n"
        "@compiler.intervene\n"
        "def c(model, x):\n"
        "    with model.trace(x):\n"
        "        h = model.head.output.save()\n"
        "    return h\n\n"
        "@other\n"
        "def not_an_experiment(model, x):\n"
        "    return x\n"
    )
    code, out, err = show(capsys, str(write(tmp_path, "alias.py", text)), "--json")
    assert code == 0, err
    assert [(f["name"], f["line"]) for f in json.loads(out)["functions"]] == [
        ("a", 6), ("b", 12), ("c", 18)]


def test_one_bad_function_reports_and_the_others_still_show(tmp_path, capsys):
    bad = GOOD.replace("h = model.layers[1].output.save()", "h = model.layers[1].output")
    text = bad + (
        "\n\n@intervene\n"
        "def third(model, x):\n"
        "    with model.trace(x):\n"
        "        y = model.head.output.save()\n"
        "    return y\n"
    )
    path = write(tmp_path, "mixed.py", text)
    code, out, err = show(capsys, str(path))
    assert code == 1
    assert err.count("error:") == 1 and err.startswith(f"{path}:8: error: ")
    assert "first" not in out
    assert f"second  ({path}:16)" in out and f"third  ({path}:24)" in out
    code, out, err = show(capsys, str(path), "--json")
    assert code == 1 and err.startswith(f"{path}:8: error: ")
    assert [f["name"] for f in json.loads(out)["functions"]] == ["second", "third"]
    # asking for a good function only: its plan, and no word of the bad one
    code, out, err = show(capsys, str(path), "--function", "third")
    assert (code, err) == (0, "") and "third" in out
    code, out, err = show(capsys, str(path), "--function", "first")
    assert code == 1 and out == "" and err.startswith(f"{path}:8: error: ")


def test_broken_pipe_ends_quietly(tmp_path):
    path = write(tmp_path, "exp.py", GOOD * 3)
    proc = subprocess.Popen([sys.executable, "-m", "compiler", "show-plan", str(path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written, like `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err and err == ""


def test_head_of_a_long_plan_ends_quietly(tmp_path):
    path = write(tmp_path, "exp.py", GOOD)
    result = subprocess.run(
        f"{sys.executable} -m compiler show-plan {path} | head -n 1",
        shell=True, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.stdout == f"first  ({path}:5)\n"
    assert result.stderr == ""


# --------------------------------------------------------------------------------------
# Notebooks
# --------------------------------------------------------------------------------------


def notebook(tmp_path: Path, *cells: tuple[str, str]) -> Path:
    doc = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": kind, "metadata": {}, "source": text.splitlines(keepends=True),
         **({"outputs": [], "execution_count": None} if kind == "code" else {})}
        for kind, text in cells]}
    path = tmp_path / "analysis.ipynb"
    path.write_text(json.dumps(doc))
    return path


EXPERIMENT_CELL = '''\
@iv
def probe(model, x):
    with model.trace(x):
        h = model.layers[2].output.save()
    return h
'''


def test_notebook_cells_in_order(tmp_path, capsys):
    path = notebook(
        tmp_path,
        ("markdown", "# A probe\n`@iv` below is an alias"),
        ("code", "%pip install torch\n!ls\nfrom compiler import intervene as iv\n"),
        ("code", EXPERIMENT_CELL),
        ("code", "%%bash\necho this is not python = =\n"),
        ("code", "%%time\n" + EXPERIMENT_CELL.replace("probe", "second")),
    )
    code, out, err = show(capsys, str(path))
    assert (code, err) == (0, "")
    # cells count from 1, markdown included, as notebook editors number them
    assert f"probe  ({path}, cell 3, line 2)" in out
    assert f"second  ({path}, cell 5, line 3)" in out
    assert out.index("probe") < out.index("second")
    assert any(ln.split() == ["0", "4", "model.layers[2]", "output", "read", "save"]
               for ln in out.splitlines())


def test_notebook_errors_name_the_cell_and_line(tmp_path, capsys):
    path = notebook(
        tmp_path,
        ("code", "from compiler import intervene\nx = = 1\n"),
        ("code", EXPERIMENT_CELL.replace("@iv", "@intervene")),
        ("code", EXPERIMENT_CELL.replace("@iv", "@intervene").replace("probe", "leak")
         .replace(".output.save()", ".output")),
    )
    code, out, err = show(capsys, str(path))
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}, cell 1, line 2: error: cannot parse")
    assert lines[1].startswith(f"{path}, cell 3, line 5: error: `h` is assigned")
    assert f"probe  ({path}, cell 2, line 2)" in out and "leak" not in out


def test_not_a_notebook(tmp_path, capsys):
    path = tmp_path / "broken.ipynb"
    path.write_text("{not json")
    code, out, err = show(capsys, str(path))
    assert code == 1 and out == ""
    assert err.startswith(f"{path}:1: error: not a Jupyter notebook (invalid JSON")
    path.write_text("[1, 2]")
    assert show(capsys, str(path))[2] == f"{path}: error: not a Jupyter notebook (no list of cells)\n"


# --------------------------------------------------------------------------------------
# The plan object as a notebook shows it
# --------------------------------------------------------------------------------------


def _small_plan():
    from compiler.plan import Block, Checkpoint, FunctionPlan, Lane, Plan

    cp = Checkpoint(0, "model.layers[0]", "output", "read", 3, 8, parts=("layers", 0), saves=True)
    block = Block(0, "trace", "model", "x < y & z", 2, lanes=(Lane(0, 2, None, (cp,)),),
                  saved=("h",))
    return Plan((FunctionPlan("probe", "exp.py", 1, (block,)),))


def test_plan_repr_is_the_readable_text():
    plan = _small_plan()
    assert repr(plan) == str(plan)
    assert str(plan).splitlines()[:3] == [
        "probe  (exp.py:1)", "  block 0: model.trace(x < y & z)  line 2",
        "    order  line  module           value   access"]
    assert "Checkpoint(" not in repr(plan)
    seen = []

    class Printer:  # IPython's pretty printer, as far as _repr_pretty_ uses it
        def text(self, s):
            seen.append(s)

    plan._repr_pretty_(Printer(), False)
    assert seen == [str(plan)]


def test_plan_repr_html_is_the_escaped_text():
    import html

    plan = _small_plan()
    page = plan._repr_html_()
    assert page == f"<pre>{html.escape(str(plan))}</pre>"
    assert "x &lt; y &amp; z" in page and "x < y" not in page
