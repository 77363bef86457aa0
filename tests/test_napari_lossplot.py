"""The fine-tune dock's hand-drawn loss plot: data handling and real painting."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("qtpy")
pytest.importorskip("pytestqt")

from qtpy.QtGui import QColor  # noqa: E402

from digital_stain._napari.lossplot import COLOURS, LossPlot  # noqa: E402


@pytest.fixture
def plot(qtbot):
    widget = LossPlot()
    qtbot.addWidget(widget)
    return widget


def _render(qtbot, widget):
    widget.resize(320, 160)
    widget.show()
    qtbot.waitExposed(widget)
    return widget.grab().toImage()


def _close(a: QColor, b: QColor, tol: int = 40) -> bool:
    return abs(a.red() - b.red()) + abs(a.green() - b.green()) + abs(a.blue() - b.blue()) <= tol


def test_add_keeps_series_and_returns_copies(plot):
    plot.add(0, {"adv": 1.0, "kd": 0.5})
    plot.add(10, {"adv": 0.8, "kd": 0.4, "d": 0.7})
    series = plot.series
    assert series == {
        "adv": [(0, 1.0), (10, 0.8)],
        "kd": [(0, 0.5), (10, 0.4)],
        "d": [(10, 0.7)],
    }
    series["adv"].append((99, 9.0))
    series["cyc"] = []
    assert plot.series["adv"] == [(0, 1.0), (10, 0.8)]
    assert "cyc" not in plot.series


def test_non_finite_values_are_skipped(plot):
    plot.add(0, {"adv": math.nan, "kd": 0.3, "cyc": math.inf, "d": -math.inf})
    plot.add(1, {"adv": 0.9})
    assert plot.series == {"kd": [(0, 0.3)], "adv": [(1, 0.9)]}


def test_decimation_bounds_points_and_keeps_ends(qtbot):
    widget = LossPlot(max_points=50)
    qtbot.addWidget(widget)
    for step in range(1000):
        widget.add(step, {"adv": 1.0 / (step + 1)})
        assert len(widget.series["adv"]) <= 50
    points = widget.series["adv"]
    steps = [s for s, _ in points]
    assert steps[0] == 0 and steps[-1] == 999
    assert steps == sorted(steps)
    assert len(points) > 25  # decimated, not truncated to a few
    assert len(LossPlot().series) == 0 and LossPlot().max_points == 1000
    with pytest.raises(ValueError):
        LossPlot(max_points=2)


def test_clear(plot):
    plot.add(0, {"adv": 1.0})
    plot.clear()
    assert plot.series == {}
    plot.add(5, {"kd": 2.0})
    assert plot.series == {"kd": [(5, 2.0)]}


def test_log_y_default_and_override(plot):
    assert plot.log_y is True  # empty: vacuously all positive
    plot.add(0, {"adv": 0.5})
    assert plot.log_y is True
    plot.add(1, {"d": -0.1})
    assert plot.log_y is False
    plot.log_y = True
    assert plot.log_y is True
    plot.log_y = None
    assert plot.log_y is False


def test_size_hint(plot):
    hint = plot.sizeHint()
    assert (hint.width(), hint.height()) == (320, 160)
    assert plot.minimumHeight() >= 100


def test_empty_plot_paints_hint(qtbot, plot):
    img = _render(qtbot, plot)
    assert not img.isNull() and img.width() >= 320
    background = img.pixelColor(1, 1)
    # the hint text is drawn around the centre
    centre = [img.pixelColor(x, y) for x in range(40, 280) for y in range(70, 90)]
    assert any(c != background for c in centre)


@pytest.mark.parametrize("log_y", [None, False])
def test_rising_series_is_drawn(qtbot, plot, log_y):
    plot.log_y = log_y
    for step in range(0, 200, 2):
        plot.add(step, {"adv": 1.0 + step, "kd": 2.0})
    img = _render(qtbot, plot)
    background = img.pixelColor(1, 1)
    r = plot._plot_rect()
    inside = [
        (x, y)
        for x in range(int(r.left()) + 3, int(r.right()) - 2)
        for y in range(int(r.top()) + 3, int(r.bottom()) - 2)
    ]
    assert any(img.pixelColor(x, y) != background for x, y in inside)
    colour = QColor(COLOURS[0])  # the first series, "adv"
    hits = [(x, y) for x, y in inside if _close(img.pixelColor(x, y), colour)]
    assert len(hits) > 50
    # it rises: its pixels on the right are higher up (smaller y) than on the left
    width = r.width()
    left = [y for x, y in hits if x < r.left() + width / 4]
    right = [y for x, y in hits if x > r.right() - width / 4]
    assert left and right
    assert sum(right) / len(right) < sum(left) / len(left) - 20
    # the legend names the series in their colours, above the box
    legend = [(x, y) for x in range(int(r.left()), int(r.right())) for y in range(int(r.top()) - 2)]
    assert any(_close(img.pixelColor(x, y), colour, 120) for x, y in legend)
