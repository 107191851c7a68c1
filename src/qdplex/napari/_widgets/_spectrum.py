"""Spectrum view: a pixel's (or a cell's mean) measured spectrum against the fitted mixture.

The fit is rebuilt from the unmixed abundances shown in the viewer and the mixing
matrix of the library the slide was unmixed with,
``SpectralLibrary.matrix(image.channels)`` (C×K): fitted = M · a, residual =
measured − offset − fitted.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QButtonGroup, QFormLayout, QHBoxLayout, QLabel, QRadioButton, QVBoxLayout, QWidget

from qdplex.model import Channel

from .._colors import emission_nm, wavelength_to_rgb
from ._common import LayerCombo, follow_clicks, is_cells, kind, meta

__all__ = ["SpectrumWidget", "fit_spectrum"]


def _offset(state) -> float | np.ndarray:
    """The camera offset removed before unmixing: as recorded at run time, else the panel's or the file's."""
    if state.get("offset") is not None:
        return state["offset"]
    panel, image = state.get("panel"), state.get("image")
    if panel is not None:
        v = panel.camera_offset_for(image)
    else:
        v = image.metadata.get("camera_offset") if image is not None else None
    return 0.0 if v is None else v


def fit_spectrum(measured, abundances: dict, matrix: np.ndarray, names: list[str], offset: float = 0.0) -> dict:
    """Measured vs fitted spectrum for one pixel (or one cell's mean).

    Parameters
    ----------
    measured : array-like
        ``(C,)`` measured channel values (raw, offset included).
    abundances : dict
        Library endmember name → unmixed abundance.
    matrix : numpy.ndarray
        ``C×K`` mixing matrix whose columns are the endmembers ``names``.
    offset : float or array-like
        Camera offset removed from ``measured`` (one value, or one per channel).

    Returns
    -------
    dict
        ``measured`` (offset removed), ``fitted``, ``residual``, ``components``
        (name → C-vector), ``rms`` and ``r2`` (fraction of the signal explained).
    """
    y = np.asarray(measured, dtype=float) - np.asarray(offset, dtype=float)
    comps = {n: matrix[:, names.index(n)] * float(a) for n, a in abundances.items() if n in names}
    fitted = np.sum(list(comps.values()), axis=0) if comps else np.zeros_like(y)
    res = y - fitted
    ss = float(np.sum((y - y.mean()) ** 2))
    return {
        "measured": y,
        "fitted": fitted,
        "residual": res,
        "components": comps,
        "rms": float(np.sqrt(np.mean(res**2))),
        "r2": float(1.0 - np.sum(res**2) / ss) if ss > 0 else float("nan"),
    }


class SpectrumWidget(QWidget):
    """Click a pixel (or a cell) in the viewer to see its spectrum and the fitted mixture."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.viewer = napari_viewer
        self.last: dict | None = None
        self._matrix_cache: dict = {}
        self.cells = LayerCombo(napari_viewer, lambda ly: is_cells(ly) and meta(ly).get("image") is not None)
        self.pixel = QRadioButton("pixel")
        self.cell = QRadioButton("cell mean")
        self.pixel.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.pixel)
        group.addButton(self.cell)
        modes = QHBoxLayout()
        modes.addWidget(self.pixel)
        modes.addWidget(self.cell)
        modes.addStretch(1)
        self.figure = Figure(figsize=(4.2, 3.6), dpi=90, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(260)
        self.ax, self.ax_res = self.figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
        self.info = QLabel("Click a pixel or a cell in the viewer.")
        self.info.setWordWrap(True)
        form = QFormLayout()
        form.addRow("cells", self.cells)
        form.addRow("show", modes)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.canvas, 1)
        lay.addWidget(self.info)
        follow_clicks(self, napari_viewer, self._on_click)

    # -------------------------------------------------------------- data
    def _matrix(self, state, library, image):
        if state.get("matrix") is not None and state.get("endmembers"):
            return np.asarray(state["matrix"], dtype=float), list(state["endmembers"])
        key = (id(library), tuple(image.channels))
        if key not in self._matrix_cache:
            self._matrix_cache = {key: (np.asarray(library.matrix(image.channels), dtype=float), list(library.names))}
        return self._matrix_cache[key]

    def _abundance_layers(self, slide):
        return [ly for ly in self.viewer.layers if kind(ly) == "abundance" and meta(ly).get("slide") == slide]

    def show_pixel(self, y: int, x: int) -> dict | None:
        """Plot pixel (y, x) of the slide; returns :func:`fit_spectrum`'s dict."""
        return self._show(int(y), int(x), None)

    def show_cell(self, cell_id: int) -> dict | None:
        """Plot the mean spectrum of cell ``cell_id``; returns :func:`fit_spectrum`'s dict."""
        return self._show(None, None, int(cell_id))

    def _show(self, y, x, cell_id):
        layer = self.cells.layer
        state = meta(layer)
        image, library = state.get("image"), state.get("library")
        if layer is None or image is None or library is None:
            self.info.setText("No raw slide or spectral library for this cells layer.")
            return None
        m, names = self._matrix(state, library, image)
        planes = {}
        for ly in self._abundance_layers(state.get("slide")):
            ch = meta(ly)["channel"]
            key = ch.fluor if ch.fluor in names else ch.name
            planes[key] = ly.data
        if cell_id is None:
            measured = np.asarray(image.data[:, y, x], dtype=float)
            ab = {k: float(np.asarray(p[y, x])) for k, p in planes.items()}
            title = f"pixel y={y}, x={x}"
        else:
            labels = np.asarray(layer.data)
            ys, xs = np.nonzero(labels == cell_id)
            if ys.size == 0:
                self.info.setText(f"cell {cell_id} not found")
                return None
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            mask = labels[y0:y1, x0:x1] == cell_id
            block = np.asarray(image.data[:, y0:y1, x0:x1], dtype=float)
            measured = block[:, mask].mean(axis=1)
            ab = {k: float(np.asarray(p[y0:y1, x0:x1])[mask].mean()) for k, p in planes.items()}
            title = f"cell {cell_id} ({int(mask.sum())} px)"
        fit = fit_spectrum(measured, ab, m, names, _offset(state))
        fit["title"] = title
        self.last = fit
        self._plot(fit, image, library, state.get("panel"))
        return fit

    # -------------------------------------------------------------- plot
    def _plot(self, fit, image, library, panel):
        wl = image.wavelengths
        x = wl if np.all(np.isfinite(wl)) else np.arange(len(wl))
        to_marker = panel.fluor_to_marker() if panel is not None else {}
        ax, axr = self.ax, self.ax_res
        ax.clear()
        axr.clear()
        for name, comp in fit["components"].items():
            nm = emission_nm(Channel(name, fluor=name), library)
            color = wavelength_to_rgb(nm) * 0.85 if nm is not None else (0.5, 0.5, 0.5)
            ax.plot(x, comp, "--", lw=1, color=color, label=to_marker.get(name, name))
        ax.plot(x, fit["fitted"], "-", lw=2, color="tab:red", label="fitted mixture")
        ax.plot(x, fit["measured"], "o", ms=3.5, color="black", label="measured")
        ax.set_ylabel("counts − offset")
        ax.set_title(f"{fit['title']}: R² = {fit['r2']:.3f}", fontsize=9)
        ax.legend(fontsize=6, ncol=2, loc="upper right")
        width = float(np.median(np.diff(x))) * 0.8 if len(x) > 1 else 0.8
        axr.bar(x, fit["residual"], width=width, color="tab:gray")
        axr.axhline(0, color="black", lw=0.5)
        axr.set_ylabel("residual")
        axr.set_xlabel("emission (nm)" if x is wl else "channel")
        self.canvas.draw_idle()
        self.info.setText(f"{fit['title']}: RMS residual {fit['rms']:.3g}")

    # -------------------------------------------------------------- clicks
    def _on_click(self, viewer, event):
        layer = self.cells.layer
        if layer is None or event.button not in (None, 1) or not self.isVisible():
            return
        y, x = (int(round(v)) for v in layer.world_to_data(event.position)[-2:])
        h, w = layer.data.shape[-2:]
        if not (0 <= y < h and 0 <= x < w):
            return
        if self.cell.isChecked():
            cid = int(layer.data[y, x])
            if cid:
                self.show_cell(cid)
        else:
            self.show_pixel(y, x)
