"""``kvbench report --plots``: every press stays visible (own marker and line style, set a little apart where
presses coincide) and the budget axis reads the budgets as plain numbers."""

import math

import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure

from kvbench.results.plots import plot
from tests.synthetic_store import build, row


@pytest.fixture
def figures(tmp_path, monkeypatch):
    """Every figure ``plot`` saves, by file name, drawn from the synthetic store plus h2o and snapkv-d at 32."""
    drawn = {}
    save = Figure.savefig

    def record(fig, path, *args, **kwargs):
        drawn[path.name] = fig
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    extra = [row(press, (), 32, "gsm8k", i, c) for press in ("h2o", "snapkv-d") for i, c in enumerate([1, 0, 0, 0])]
    paths = plot(build(tmp_path / "store", extra), tmp_path / "plots")
    assert sorted(drawn) == sorted(p.name for p in paths)
    return drawn


def _lines(ax) -> dict:
    """Each legend entry's data line, by label (an errorbar's line, or the full cache's plain line)."""
    handles, labels = ax.get_legend_handles_labels()
    return {label: h.lines[0] if isinstance(h, ErrorbarContainer) else h for h, label in zip(handles, labels)}


def test_every_line_has_its_own_marker_and_style(figures):
    for name, fig in figures.items():
        for ax in fig.axes:
            lines = _lines(ax)
            assert set(lines) == {"full", "h2o", "snapkv-d"}, name
            markers = [line.get_marker() for line in lines.values()]
            assert all(m not in (None, "", " ", "None") for m in markers), (name, markers)
            assert len(set(markers)) == len(markers), (name, markers)
            styles = {(line.get_marker(), line.get_linestyle()) for line in lines.values()}
            assert len(styles) == len(lines)
            # The same press looks the same in every panel of a figure
            assert {k: v.get_marker() for k, v in lines.items()} == \
                {k: v.get_marker() for k, v in _lines(fig.axes[0]).items()}


def test_coinciding_presses_sit_apart_around_each_budget(figures):
    # Output tokens are the same for every press in the store: without offsets the lines lie on top of each other
    tokens = figures["demo_model__gsm8k.png"].axes[1]
    lines = _lines(tokens)
    assert len({tuple(line.get_ydata()) for line in lines.values()}) == 1  # they do coincide
    xs = {label: list(line.get_xdata()) for label, line in lines.items()}
    for budget_index, budget in enumerate((32, 64, 128)):
        at = [x[budget_index] for x in xs.values()]
        assert len(set(at)) == len(at), at  # no two presses at the same x
        # ... yet each stays close to its budget (well under half an octave) and in the same order everywhere
        assert all(abs(math.log2(x / budget)) < 0.25 for x in at), at
    order = [sorted(xs, key=lambda label: xs[label][i]) for i in range(3)]
    assert order[0] == order[1] == order[2]
    # Accuracy at 128: h2o and snapkv-d both 75 %; still two points apart
    accuracy = _lines(figures["demo_model__gsm8k.png"].axes[0])
    assert accuracy["h2o"].get_ydata()[-1] == accuracy["snapkv-d"].get_ydata()[-1]
    assert accuracy["h2o"].get_xdata()[-1] != accuracy["snapkv-d"].get_xdata()[-1]


def test_budget_ticks_are_the_budgets_as_plain_numbers(figures):
    for name, budgets in (("demo_model__gsm8k.png", [32, 64, 128]), ("demo_model__folio.png", [64, 128])):
        fig = figures[name]
        fig.canvas.draw()
        for ax in fig.axes:
            assert ax.get_xscale() == "log"
            assert list(ax.get_xticks()) == budgets
            assert [t.get_text() for t in ax.get_xticklabels()] == [str(b) for b in budgets]
            assert list(ax.xaxis.get_minorticklocs()) == []  # no unlabelled 2^k ticks between them
            lo, hi = ax.get_xlim()
            assert lo < budgets[0] and hi > budgets[-1]


def test_the_full_cache_is_a_flat_black_line_across_the_budgets(figures):
    ax = figures["demo_model__folio.png"].axes[0]
    full = _lines(ax)["full"]
    assert set(full.get_ydata()) == {50.0} and full.get_color() == "black"
    assert [round(math.log2(x / b), 1) for x, b in zip(full.get_xdata(), (64, 128), strict=True)] == [0.0, 0.0]
    assert _lines(ax)["h2o"].get_color() != "black"
