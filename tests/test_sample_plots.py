"""The samples' pictures, from small made-up numbers (no model is loaded): each chart is
a PNG with a title and labelled axes where $INTERVENE_PLOTS says, and without matplotlib
the sample prints its text chart and says why there is no picture."""

from __future__ import annotations

import sys

import pytest
from support import load_sample

LAYERS = 4


def fake_lens():
    lens = load_sample("logit_lens")
    inputs = ["The", " E", "iffel", " of"]
    top = [[" the", "\n", " Tower", " Paris"] for _ in range(LAYERS)]
    p_top = [[0.1 * (layer + 1) * (pos + 1) / 4 for pos in range(4)] for layer in range(LAYERS)]
    return lens.Grid(inputs, top, p_top, [0.0, 0.1, 0.3, 0.6], " Paris")


# (sample, the function that prints the chart, its arguments, the picture's name, a line
# of the text chart)
CHARTS = {
    "patching": lambda m: (m.show_recovery, ([0.0, 0.2, 0.7, 1.0],), "patching",
                           "layer  3 |" + "#" * 40 + "| +1.00"),
    "attribution": lambda m: (m.show_attributions, ([0.5, -0.2, 1.0, 0.0],
                                                    [0.1, 0.4, -0.3, 0.0], 12.5),
                              "attribution", "    2 |   +1.00 " + "#" * 24),
    "steering": lambda m: (m.show_sweep, ([-1.0, 0.0, 1.0],
                                          {" amazing": [0.0, 0.06, 0.3],
                                           " terrible": [0.07, 0.01, 0.0]}),
                           "steering", "  +1.00             0.300             0.000"),
    "logit_lens": lambda m: (m.show_lens, (fake_lens(),), "logit_lens",
                             "layer  3  ' Paris'        0.400   0.600  " + "#" * 18),
}


@pytest.fixture
def plots(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERVENE_PLOTS", str(tmp_path / "pictures"))
    return tmp_path / "pictures"


@pytest.mark.parametrize("name", sorted(CHARTS))
def test_chart_writes_a_png(name, plots, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    show, args, picture, row = CHARTS[name](load_sample(name))
    show(*args)
    out = capsys.readouterr().out
    path = plots / f"{picture}.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(path).shape
    assert width >= 900 and height >= 500  # a readable size at 150 dpi
    assert row in out  # the text chart is printed too
    assert out.rstrip().endswith(f"picture: {path}")


@pytest.mark.parametrize("name", sorted(CHARTS))
def test_chart_has_title_and_labelled_axes(name, plots, monkeypatch):
    pytest.importorskip("matplotlib")
    module = load_sample(name)
    show, args, _, _ = CHARTS[name](module)
    drawn = []
    monkeypatch.setattr(module, "save", lambda fig, stem: drawn.append(fig) or plots / stem)
    show(*args)
    (fig,) = drawn
    ax = fig.axes[0]
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    if name == "logit_lens":  # a heatmap: cells labelled with tokens, a colour bar with units
        (colorbar,) = fig.axes[1:]
        assert colorbar.get_ylabel() == "probability of the top token (0 to 1)"
        labels = [t.get_text() for t in ax.texts]
        assert len(labels) == LAYERS * 4 and "' Paris'"[1:-1] in labels and "'\\n'" in labels
        assert [t.get_text() for t in ax.get_xticklabels()] == ["The", " E", "iffel", " of"]
    else:
        assert ax.get_legend() is not None or name == "patching"


@pytest.mark.parametrize("name", sorted(CHARTS))
def test_without_matplotlib_the_text_chart_stays(name, plots, monkeypatch, capsys):
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)  # `import matplotlib` raises ImportError
    show, args, _, row = CHARTS[name](load_sample(name))
    show(*args)
    out = capsys.readouterr().out
    assert row in out
    assert out.rstrip().endswith("(no picture: matplotlib is not installed; "
                                 "`pip install -c constraints.txt -e '.[plots]'` or "
                                 "`make demo` installs it)")
    assert "\npicture:" not in out
    assert not plots.exists()


def test_pictures_go_to_samples_out_by_default(monkeypatch):
    figures = load_sample("figures")
    monkeypatch.delenv("INTERVENE_PLOTS", raising=False)
    assert figures.out_dir() == figures.Path(figures.__file__).resolve().parent / "out"
    monkeypatch.setenv("INTERVENE_PLOTS", "/somewhere/else")
    assert str(figures.out_dir()) == "/somewhere/else"
