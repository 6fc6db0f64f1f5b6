"""A small Qt bar plot of class shares with target marks (no plotting library needed)."""

from __future__ import annotations

from typing import Sequence

from qtpy.QtCore import QRectF, QSize, Qt
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["ClassBars"]


class ClassBars(QWidget):
    """One bar per class (its share of nuclei, in the class colour) and a white tick at its
    target share. Shares are fractions in [0, 1]."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.names: list[str] = []
        self.colours: list[tuple[int, int, int]] = []
        self.shares: list[float] = []
        self.targets: list[float] = []
        self.setMinimumHeight(90)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt name)
        return QSize(240, 110)

    def set_data(
        self,
        names: Sequence[str],
        colours: Sequence[tuple[int, int, int]],
        shares: Sequence[float],
        targets: Sequence[float],
    ) -> None:
        """Replace what is drawn and repaint."""
        self.names, self.colours = list(names), list(colours)
        self.shares, self.targets = [float(s) for s in shares], [float(t) for t in targets]
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt name)
        n = len(self.names)
        if n == 0:
            return
        p = QPainter(self)
        try:
            w, h = self.width(), self.height()
            label_h, top = 16, 6
            plot_h = h - label_h - top
            top_share = max(0.05, max(self.shares + self.targets, default=0.0)) * 1.1
            slot = w / n
            for i, (name, rgb, share) in enumerate(zip(self.names, self.colours, self.shares)):
                x0 = i * slot + slot * 0.15
                bw = slot * 0.7
                bh = plot_h * share / top_share
                p.fillRect(QRectF(x0, top + plot_h - bh, bw, bh), QColor(*rgb))
                if i < len(self.targets):
                    ty = top + plot_h - plot_h * self.targets[i] / top_share
                    p.setPen(QPen(QColor(255, 255, 255), 2, Qt.PenStyle.DashLine))
                    p.drawLine(int(x0 - 2), int(ty), int(x0 + bw + 2), int(ty))
                p.setPen(QColor(220, 220, 220))
                p.drawText(QRectF(i * slot, h - label_h, slot, label_h), Qt.AlignmentFlag.AlignCenter, name[:10])
        finally:
            p.end()
