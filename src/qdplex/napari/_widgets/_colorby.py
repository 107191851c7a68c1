"""Colour the cells by any numeric column of the cell table, with a colour bar.

Colours go through the labels layer's ``DirectLabelColormap`` (quantised to 256
levels), which stays fluid with 50,000 cells.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QPushButton, QVBoxLayout, QWidget

from .._colors import values_to_rgba
from ._common import LayerCombo, is_cells, meta, set_base_colors

__all__ = ["ColorByWidget", "CMAPS"]

CMAPS = ("viridis", "magma", "inferno", "plasma", "cividis", "coolwarm", "turbo")


class _ColorBar(QWidget):
    """A horizontal matplotlib colour bar."""

    def __init__(self, parent=None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.2, 0.75), dpi=100, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(70)
        QVBoxLayout(self).addWidget(self.canvas)
        self.ax = self.figure.add_subplot(111)
        self.clear()

    def clear(self):
        self.ax.clear()
        self.ax.set_axis_off()
        self.canvas.draw_idle()

    def show_bar(self, cmap: str, vmin: float, vmax: float, label: str):
        from matplotlib import colorbar, colors

        self.ax.clear()
        self.ax.set_axis_on()
        colorbar.ColorbarBase(
            self.ax, cmap=cmap, norm=colors.Normalize(vmin=vmin, vmax=vmax), orientation="horizontal", label=label
        )
        self.canvas.draw_idle()


class ColorByWidget(QWidget):
    """Pick a cells layer, a column and a colormap; the cells take the column's colours."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.layer = None
        self.limits = None
        self._applied = None
        self.cells = LayerCombo(napari_viewer, is_cells)
        self.column = QComboBox()
        self.cmap = QComboBox()
        self.cmap.addItems(CMAPS)
        self.log = QCheckBox("log₁₀(1 + value)")
        reset = QPushButton("Default colours")
        reset.clicked.connect(self.reset)
        self.colorbar = _ColorBar()

        form = QFormLayout()
        form.addRow("cells", self.cells)
        form.addRow("column", self.column)
        form.addRow("colormap", self.cmap)
        form.addRow("", self.log)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.colorbar)
        lay.addWidget(reset)
        lay.addStretch(1)

        self.cells.layer_changed.connect(self._set_layer)
        self.column.currentTextChanged.connect(self.apply)
        self.cmap.currentTextChanged.connect(self.apply)
        self.log.toggled.connect(self.apply)
        self._set_layer(self.cells.layer)

    def _set_layer(self, layer):
        if self.layer is not None:
            self.layer.events.features.disconnect(self._columns)
        self.layer = layer
        if layer is not None:
            layer.events.features.connect(self._columns)
        self._columns()

    def _columns(self, *_):
        keep = self.column.currentText()
        cols = []
        if self.layer is not None:
            f = self.layer.features
            cols = [
                c for c in f.columns
                if c not in ("index", "CellID") and (np.issubdtype(f[c].dtype, np.number) or f[c].dtype == bool)
            ]
        self.column.blockSignals(True)
        self.column.clear()
        self.column.addItem("")
        self.column.addItems(cols)
        self.column.setCurrentText(keep if keep in cols else "")
        self.column.blockSignals(False)
        self.apply()

    def apply(self, *_):
        """Colour the cells by the chosen column (no column: napari's default colours)."""
        name = self.column.currentText()
        if self.layer is None or not name:
            self._applied = None
            self.colorbar.clear()
            self.limits = None
            if self.layer is not None:
                set_base_colors(self.layer, None)
            return
        v = self.layer.features[name].to_numpy(dtype=float)
        key = (id(self.layer), name, self.cmap.currentText(), self.log.isChecked())
        same = self._applied is not None and self._applied[0] == key
        if same and meta(self.layer).get("_colored") and np.array_equal(self._applied[1], v, equal_nan=True):
            return  # the table changed elsewhere (e.g. a threshold): these colours still hold
        self._applied = (key, v)
        label = name
        if self.log.isChecked():
            v = np.log10(1.0 + np.clip(v, 0, None))
            label = f"log₁₀(1 + {name})"
        cmap = self.cmap.currentText()
        rgba, vmin, vmax = values_to_rgba(v, cmap)
        self.limits = (vmin, vmax)
        set_base_colors(self.layer, rgba)
        self.colorbar.show_bar(cmap, vmin, vmax, label)

    def color_by(self, column: str, cmap: str | None = None) -> None:
        """Colour by ``column`` (programmatic use)."""
        if cmap:
            self.cmap.blockSignals(True)
            self.cmap.setCurrentText(cmap)
            self.cmap.blockSignals(False)
        self.column.blockSignals(True)
        self.column.setCurrentText(column)
        self.column.blockSignals(False)
        self.apply()

    def reset(self):
        self.column.setCurrentText("")
        self.apply()
