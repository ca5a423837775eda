"""The samples run and print what they promise.

Each sample is imported from its file (importing runs nothing) and its ``main()`` is
called with stdout captured.
"""

from __future__ import annotations

import re

import pytest
from support import load_sample

# The samples switch autograd off for themselves: each test gets its grad mode back.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("keep_grad_mode")]


@pytest.fixture(autouse=True)
def plots(tmp_path, monkeypatch):
    """Pictures go to a temporary folder, not samples/out."""
    monkeypatch.setenv("INTERVENE_PLOTS", str(tmp_path))
    return tmp_path


def picture_line(out: str, plots, name: str) -> None:
    """The sample said where its picture went (or that matplotlib is missing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "(no picture: matplotlib is not installed" in out
        return
    assert f"picture: {plots / (name + '.png')}" in out
    assert (plots / f"{name}.png").stat().st_size > 10_000


@pytest.mark.parametrize("name", ["basics", "patching", "barrier", "generation", "steering"])
def test_importing_runs_nothing(name, capsys):
    module = load_sample(name)
    assert callable(module.main)
    assert capsys.readouterr().out == ""


def test_basics(capsys):
    load_sample("basics").main()
    out = capsys.readouterr().out
    lines = out.splitlines()
    unchanged = next(line for line in lines if line.startswith("unchanged"))
    assert "-> ' Paris'" in unchanged
    # Zeroing the last token mid-model loses the answer; the Colosseum's last token at
    # the last layer brings its own answer.
    assert "' Paris'" not in next(line for line in lines if line.startswith("zero layer 15"))
    assert "-> ' Rome'" in next(line for line in lines if "at layer 29" in line)


def test_basics_plans_are_static():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "compiler", "show-plan", "samples/basics.py"],
        cwd=root, capture_output=True, text=True, check=True,
    )
    for name in ("save_hidden_and_logits", "zero_last_token", "add_noise", "replace_from"):
        assert name in result.stdout
    assert any(line.split()[2:] == ["model.lm_head", "output", "read", "save"]
               for line in result.stdout.splitlines())


def test_patching(capsys, plots):
    load_sample("patching").main()
    out = capsys.readouterr().out
    picture_line(out, plots, "patching")
    assert "clean:   'The Eiffel Tower is in the city of' -> top ' Paris'" in out
    assert "corrupt: 'The Colosseum is in the city of' -> top ' Rome'" in out
    rows = re.findall(r"^layer +(\d+) \|([#.]+)\| ([+-]\d+\.\d\d)$", out, re.MULTILINE)
    assert [int(r[0]) for r in rows] == list(range(30))
    fractions = [float(r[2]) for r in rows]
    # the last layer's residual stream is all the logits see: patching it recovers all
    assert fractions[-1] == pytest.approx(1.0, abs=0.01)
    assert rows[-1][1] == "#" * 40
    assert abs(fractions[0]) < 0.05


def test_barrier(capsys):
    load_sample("barrier").main()
    out = capsys.readouterr().out
    lines = {line.split("->")[0].strip(): line.split("->")[1] for line in out.splitlines()
             if "->" in line}
    assert lines["clean alone"].strip().startswith("' Paris'")
    assert lines["corrupt alone (before)"].strip().startswith("' Rome'")
    assert lines["corrupt with clean embeddings (after)"].strip().startswith("' Paris'")


def test_generation(capsys):
    load_sample("generation").main()
    out = capsys.readouterr().out
    assert "no intervention:             ' Paris." in out
    steps = re.findall(r"step (\d+): hidden \((\d+), (\d+), 576\)", out)
    assert [int(s[0]) for s in steps] == list(range(8))
    assert steps[0][1:] == ("1", "9") and all(s[1:] == ("1", "1") for s in steps[1:])
    assert "2. steps 2-4 only" in out
    without = re.search(r"without: +(.*)$", out, re.MULTILINE).group(1)
    with_ = re.search(r"   with: +(.*)$", out, re.MULTILINE).group(1)
    assert without != with_
    assert "first 2 new token(s) unchanged" in out


def test_steering(capsys, plots):
    sample = load_sample("steering")
    sample.main()
    out = capsys.readouterr().out
    picture_line(out, plots, "steering")
    sweep = {float(a): (float(p), float(n)) for a, p, n in
             re.findall(r"^  ([+-]\d\.\d\d) +(\d\.\d{3}) +(\d\.\d{3})$", out, re.MULTILINE)}
    assert sorted(sweep) == sample.SCALES
    # the positive direction raises p(' amazing') and lowers p(' terrible'), and back
    assert sweep[0.5][0] > 3 * sweep[0.0][0] and sweep[0.5][1] < sweep[0.0][1]
    assert sweep[-1.0][1] > 3 * sweep[0.0][1] and sweep[-1.0][0] < sweep[0.0][0]
    texts = re.findall(r"^(unsteered|[+-]\d\.\d x direction added): +(['\"].*['\"])$", out,
                       re.MULTILINE)
    assert [t[0] for t in texts] == ["unsteered", f"+{sample.ALPHA:.1f} x direction added",
                                     f"-{sample.ALPHA:.1f} x direction added"]
    unsteered, positive, negative = (t[1] for t in texts)
    assert len({unsteered, positive, negative}) == 3  # steering changes the text
    assert "direction at layer 15" in out
