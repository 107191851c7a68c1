"""Per-marker positivity thresholds with live percent positive and H-score.

Each slider moves one marker's threshold; the slide is re-scored with
:func:`qdplex.score.score_slide` (debounced, so dragging stays smooth) and the
``<marker>_positive`` columns of the cell table follow.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import QDoubleSpinBox, QFormLayout, QGridLayout, QLabel, QSlider, QVBoxLayout, QWidget

from ._common import LayerCombo, is_cells, meta

__all__ = ["ThresholdWidget", "marker_scores", "slide_line"]

_STEPS = 1000


def _find(d: dict, *keys):
    for k in keys:
        if isinstance(d, dict) and k in d and d[k] is not None:
            return d[k]
    return None


def marker_scores(summary: dict, marker: str) -> tuple[float, float]:
    """``(percent_positive, h_score)`` of ``marker`` from a :func:`qdplex.score.score_slide` summary."""
    m = _find(summary.get("markers", {}), marker) or _find(summary, marker) or {}
    pct = _find(m, "percent_positive", "pct_positive", "positive_percent")
    h = _find(m, "h_score", "hscore", "H_score")
    if pct is None:
        pct = _find(summary, f"{marker}_percent_positive", f"{marker}_pct_positive")
    if h is None:
        h = _find(summary, f"{marker}_h_score", f"{marker}_hscore")
    return (float("nan") if pct is None else float(pct), float("nan") if h is None else float(h))


class _MarkerRow:
    """Slider + spin box + result labels for one marker."""

    def __init__(self, name: str, hi: float, value: float, on_change):
        self.name = name
        self.hi = max(float(hi), float(value) * 1.25, 1e-6)
        self.slider = QSlider(Qt.Horizontal)
        self.slider.setRange(0, _STEPS)
        self.spin = QDoubleSpinBox()
        self.spin.setDecimals(4)
        self.spin.setRange(0.0, self.hi * 4)
        self.spin.setSingleStep(self.hi / 100)
        self.pct = QLabel("")
        self.h = QLabel("")
        self._on_change = on_change
        self.slider.valueChanged.connect(self._from_slider)
        self.spin.valueChanged.connect(self._from_spin)
        self.set_value(value)

    def set_value(self, v: float):
        self.spin.setValue(float(v))

    @property
    def value(self) -> float:
        return float(self.spin.value())

    def _from_slider(self, pos: int):
        v = self.hi * pos / _STEPS
        if abs(v - self.spin.value()) > 0.5 * self.hi / _STEPS:
            self.spin.setValue(v)

    def _from_spin(self, v: float):
        self.slider.blockSignals(True)
        self.slider.setValue(int(round(min(v / self.hi, 1.0) * _STEPS)))
        self.slider.blockSignals(False)
        self._on_change()


class ThresholdWidget(QWidget):
    """Threshold sliders for the markers of the panel of the chosen cells layer."""

    #: emitted with the new summary after each re-scoring
    scored = Signal(dict)

    def __init__(self, napari_viewer, parent=None, *, delay_ms: int = 40):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.layer = None
        self.rows: dict[str, _MarkerRow] = {}
        self.summary: dict = {}
        self._run_id = None
        self.cells = LayerCombo(napari_viewer, lambda ly: is_cells(ly) and meta(ly).get("panel") is not None)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(delay_ms)
        self._timer.timeout.connect(self.rescore)
        self.grid = QGridLayout()
        self.note = QLabel("")
        self.note.setWordWrap(True)
        form = QFormLayout()
        form.addRow("cells", self.cells)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(self.grid)
        lay.addWidget(self.note)
        lay.addStretch(1)
        self.cells.layer_changed.connect(self._set_layer)
        self._set_layer(self.cells.layer)

    # --------------------------------------------------------------- layout
    def _clear(self):
        while self.grid.count():
            w = self.grid.takeAt(0).widget()
            if w is not None:
                w.deleteLater()
        self.rows = {}

    def _features_changed(self, *_):
        if meta(self.layer).get("run_id") != self._run_id:  # a re-run replaced the table
            self._set_layer(self.layer)

    def _set_layer(self, layer):
        self._clear()
        if self.layer is not None and self.layer is not layer:
            self.layer.events.features.disconnect(self._features_changed)
        if layer is not None and layer is not self.layer:
            layer.events.features.connect(self._features_changed)
        self.layer = layer
        state = meta(layer)
        self._run_id = state.get("run_id")
        panel = state.get("panel")
        if layer is None or panel is None:
            self.note.setText("Run the pipeline (or open a qdplex output folder) to score cells.")
            return
        table = layer.features
        thresholds = state.get("thresholds") or {}
        for i, h in enumerate(("marker", "threshold", "", "% positive", "H-score")):
            self.grid.addWidget(QLabel(f"<b>{h}</b>"), 0, i)
        for r, m in enumerate(panel.markers, start=1):
            if m.name not in table.columns:
                continue
            col = table[m.name].to_numpy(dtype=float)
            hi = np.nanpercentile(col, 99.5) if np.isfinite(col).any() else 1.0
            value = thresholds.get(m.name)
            if value is None or not np.isfinite(value):
                value = float(np.nanmedian(col)) if np.isfinite(col).any() else 0.0
            row = _MarkerRow(m.name, hi, value, self._timer.start)
            self.rows[m.name] = row
            for c, w in enumerate((QLabel(m.name), row.slider, row.spin, row.pct, row.h)):
                self.grid.addWidget(w, r, c)
        self.setToolTip("thresholds in unmixed abundance units, on each marker's mean in its own compartment")
        self.rescore()

    # --------------------------------------------------------------- scoring
    @property
    def thresholds(self) -> dict[str, float]:
        return {name: row.value for name, row in self.rows.items()}

    def set_threshold(self, marker: str, value: float) -> None:
        """Move ``marker``'s threshold to ``value`` (as a slider move would)."""
        self.rows[marker].set_value(value)

    def rescore(self):
        """Score the slide with the current thresholds and update the labels and the table."""
        from qdplex.score import score_slide

        self._timer.stop()
        layer = self.layer
        if layer is None or not self.rows:
            return
        state = meta(layer)
        panel = state["panel"]
        table = layer.features
        thr = self.thresholds
        summary = score_slide(table, panel, thresholds=thr)
        self.summary = summary
        state["thresholds"] = dict(thr)
        state["summary"] = summary
        for name, row in self.rows.items():
            pct, h = marker_scores(summary, name)
            row.pct.setText(f"{pct:.1f}")
            row.h.setText(f"{h:.0f}")
        line = slide_line(summary)
        self.note.setText(f"{summary.get('n_cells', len(table))} cells" + (f"; {line}" if line else ""))
        self._update_positive(layer, table, thr)
        self.scored.emit(summary)

    def _update_positive(self, layer, table, thr):
        """Refresh the ``<marker>_positive`` columns (:func:`qdplex.score.add_positivity`) when they change."""
        from qdplex.score import add_positivity

        new = add_positivity(table, thr)
        cols = [f"{name}_positive" for name in thr]
        if not all(c in table.columns and np.array_equal(new[c].to_numpy(), table[c].to_numpy()) for c in cols):
            layer.features = new


def slide_line(summary: dict) -> str:
    """One line of slide-level scores: HER2 0–3+ and Allred scores, when the summary has them."""
    parts = []
    her2 = summary.get("her2") or {}
    score = her2.get("score")
    if score is not None:
        score = str(score)
        parts.append(f"HER2 {score if score.endswith('+') else score + '+'}")
    for name, a in (summary.get("allred") or {}).items():
        if a and a.get("total") is not None:
            parts.append(f"{name} Allred {a['total']}/8")
    return ", ".join(parts)
