"""A small live plot of training losses, hand-drawn with QPainter.

napari ships no plotting library, and matplotlib or pyqtgraph would be a heavy
dependency for a few polylines in a dock widget. One ``paintEvent`` that walks
the points once is enough; it takes its colours from the widget's palette, so
it fits napari's dark and light themes.
"""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, QSize, Qt
from qtpy.QtGui import QColor, QPainter, QPalette, QPen, QPolygonF
from qtpy.QtWidgets import QWidget

#: Okabe-Ito colours (colour-blind safe), readable on dark and light backgrounds.
COLOURS = ("#56B4E9", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#0072B2", "#F0E442")
HINT = "the losses appear here once training starts"


class LossPlot(QWidget):
    """Live plot of named loss series against the training step.

    Each series is a faint raw polyline under a thicker exponential moving
    average, in its own colour, with a legend of the names on top.

    Parameters
    ----------
    parent : QWidget, optional
        The Qt parent.
    max_points : int
        The most points kept per series (at least 4). Beyond it every other
        point of the older half is dropped, so the whole history stays visible.
    """

    def __init__(self, parent: QWidget | None = None, max_points: int = 1000):
        super().__init__(parent)
        if max_points < 4:
            raise ValueError(f"max_points must be at least 4, got {max_points}")
        self.max_points = max_points
        self._series: dict[str, list[tuple[int, float]]] = {}
        self._log_y: bool | None = None
        self.setMinimumHeight(120)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        """The preferred size, 320 x 160."""
        return QSize(320, 160)

    @property
    def series(self) -> dict[str, list[tuple[int, float]]]:
        """Copies of the kept points: series name -> list of ``(step, value)``."""
        return {name: list(points) for name, points in self._series.items()}

    @property
    def log_y(self) -> bool:
        """Whether the y axis is logarithmic.

        By default it is when all values are > 0; assign True or False to force
        it, None to go back to automatic. A forced log axis still falls back to
        linear while any value is <= 0.
        """
        return self._all_positive() if self._log_y is None else self._log_y

    @log_y.setter
    def log_y(self, value: bool | None) -> None:
        self._log_y = None if value is None else bool(value)
        self.update()

    def _all_positive(self) -> bool:
        return all(v > 0 for points in self._series.values() for _, v in points)

    def add(self, step: int, losses: dict[str, float]) -> None:
        """Append one point per named loss at ``step``; non-finite values are skipped.

        Parameters
        ----------
        step : int
            The training step (the x coordinate).
        losses : dict of str to float
            Loss values by series name, e.g. ``{"adv": 0.7, "kd": 0.1}``.
        """
        for name, value in losses.items():
            value = float(value)
            if not math.isfinite(value):
                continue
            points = self._series.setdefault(name, [])
            points.append((int(step), value))
            if len(points) > self.max_points:
                half = len(points) // 2
                points[:half] = points[:half:2]
        self.update()

    def clear(self) -> None:
        """Forget all series."""
        self._series.clear()
        self.update()

    def _plot_rect(self) -> QRectF:
        """The axes box inside the widget, leaving room for labels and legend."""
        fm, h = self.fontMetrics(), self.fontMetrics().height()
        label_w = fm.horizontalAdvance("-0.00e-00") + 6
        return QRectF(label_w, h + 4, self.width() - label_w - 8, self.height() - 2 * h - 10)

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        """Draw the axes, labels, legend and series (O(points))."""
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        pal = self.palette()
        text = pal.color(QPalette.WindowText)
        p.fillRect(self.rect(), pal.color(QPalette.Window))
        series = [(name, pts) for name, pts in self._series.items() if pts]
        if not series:
            faint = QColor(text)
            faint.setAlpha(160)
            p.setPen(faint)
            p.drawText(QRectF(self.rect()), Qt.AlignCenter | Qt.TextWordWrap, HINT)
            p.end()
            return
        log = self.log_y and self._all_positive()
        tf = math.log10 if log else float
        ys = [[tf(v) for _, v in pts] for _, pts in series]
        lo, hi = min(min(y) for y in ys), max(max(y) for y in ys)
        steps = [s for _, pts in series for s, _ in pts]
        s0, s1 = min(steps), max(steps)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        r, fm = self._plot_rect(), p.fontMetrics()
        sx = r.width() / max(s1 - s0, 1)
        sy = r.height() / (hi - lo)
        # axes box and labels
        p.setPen(QPen(text, 1))
        p.drawRect(r)
        label = (lambda y: f"{10 ** y:.3g}") if log else (lambda y: f"{y:.3g}")
        p.drawText(QRectF(0, r.top() - 2, r.left() - 4, fm.height()), Qt.AlignRight, label(hi))
        p.drawText(
            QRectF(0, r.bottom() - fm.height() + 2, r.left() - 4, fm.height()),
            Qt.AlignRight, label(lo),
        )
        below = QRectF(r.left(), r.bottom() + 2, r.width(), fm.height())
        p.drawText(below, Qt.AlignLeft, f"step {s0}")
        p.drawText(below, Qt.AlignRight, f"{s1}" + ("  (log y)" if log else ""))
        # series: faint raw line under a thicker EMA, clipped to the box
        colours = [QColor(COLOURS[i % len(COLOURS)]) for i in range(len(series))]
        p.setClipRect(r.adjusted(-2, -2, 2, 2))
        for (_, pts), y, colour in zip(series, ys, colours):
            xs = [r.left() + (s - s0) * sx for s, _ in pts]
            raw = QPolygonF([QPointF(a, r.bottom() - (b - lo) * sy) for a, b in zip(xs, y)])
            alpha, e, ema = 2 / (max(2, len(y) // 20) + 1), y[0], QPolygonF()
            for a, b in zip(xs, y):
                e += alpha * (b - e)
                ema.append(QPointF(a, r.bottom() - (e - lo) * sy))
            faint = QColor(colour)
            faint.setAlpha(80)
            p.setPen(QPen(faint, 1))
            p.drawPolyline(raw)
            p.setPen(QPen(colour, 2))
            p.drawPolyline(ema)
            p.drawEllipse(raw[len(raw) - 1], 1.5, 1.5)
        p.setClipping(False)
        x = r.left()
        for (name, _), colour in zip(series, colours):  # legend: names in their colours
            p.setPen(colour)
            p.drawText(QPointF(x, fm.ascent() + 1), name)
            x += fm.horizontalAdvance(name) + 10
        p.end()
