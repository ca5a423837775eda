"""``python -m compiler show-plan``: the command line, run as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert any(ln.split() == ["0", "layers[1]", "output", "read", "save", "line", "7"]
               for ln in lines)
    assert any(ln.split() == ["0", "layers[0]", "output", "read", "line", "18"] for ln in lines)
    assert any(ln.split() == ["1", "layers[0]", "output", "write", "line", "18"] for ln in lines)
    assert any(ln.split() == ["2", "head", "output", "read", "save", "line", "19"]
               for ln in lines)
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
    assert doc["version"] == 1
    assert [f["name"] for f in doc["functions"]] == ["first", "second"]
    second = doc["functions"][1]
    assert second["line"] == 16 and second["filename"] == str(path)
    (block,) = second["blocks"]
    assert block["kind"] == "trace" and block["model"] == "model" and block["args"] == "x"
    assert block["saved"] == ["out"]
    items = block["lanes"][0]["items"]
    assert [(i["order"], i["path"], i["access"], i["line"]) for i in items] == [
        (0, "layers[0]", "read", 18), (1, "layers[0]", "write", 18), (2, "head", "read", 19)]
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
    assert doc == {"version": 1, "functions": []}


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
