"""Run unmix → segment → quantify → score on the open slide, in a background thread."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .._layers import result_layers
from ._common import LayerCombo, kind, meta, upsert_layers

__all__ = ["RunWidget"]


def _pipelines_dir() -> str:
    """The project's pipelines/ folder (ready panels) when running from a checkout, else ""."""
    import qdplex

    p = Path(qdplex.__file__).resolve().parents[2] / "pipelines"
    return str(p) if p.is_dir() else ""


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued signal)."""

    progressed = Signal(str, float)


def _process(image, panel, relay):
    """Worker body: the pipeline and the layer data (heavy work stays off the GUI thread)."""
    from qdplex.slide import run_slide

    result = run_slide(image, panel, progress=relay.progressed.emit)
    return result, result_layers(result)


class RunWidget(QWidget):
    """Run the qdplex pipeline on a slide layer with a panel file.

    The work runs in a napari thread worker; a progress bar follows the stages
    (unmix, segment, quantify, score) and the viewer stays responsive. When done,
    the unmixed planes (coloured by emission, named by marker), the nuclei and the
    cells (with the cell table as ``features``) are added, replacing an earlier run.
    """

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        # import the pipeline's modules now: imports in the worker would hold the GIL
        # (and the import lock) and stall the viewer at the start of the first run
        import qdplex.slide
        import qdplex.quantify
        import qdplex.score
        import qdplex.segment
        import qdplex.tables
        import qdplex.unmix  # noqa: F401

        self.viewer = napari_viewer
        self.result = None
        self.worker = None
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)

        self.slide = LayerCombo(napari_viewer, lambda ly: kind(ly) == "slide")
        self.panel_edit = QLineEdit()
        self.panel_edit.setPlaceholderText("panel TOML (empty: the slide's own panel)")
        browse = QPushButton("…")
        browse.setFixedWidth(28)
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.panel_edit)
        row.addWidget(browse)
        self.run_button = QPushButton("Run pipeline")
        self.run_button.clicked.connect(self.run)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("slide", self.slide)
        form.addRow("panel", row)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.run_button)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addStretch(1)
        self.slide.layer_changed.connect(self._slide_changed)
        self._slide_changed(self.slide.layer)

    # ------------------------------------------------------------------ inputs
    def _browse(self):
        path, _ = QFileDialog.getOpenFileName(self, "Panel file", _pipelines_dir(), "Panel (*.toml)")
        if path:
            self.panel_edit.setText(path)

    def _slide_changed(self, layer):
        p = meta(layer).get("panel_path")
        if p and not self.panel_edit.text():
            self.panel_edit.setText(p)

    def panel(self):
        """The panel to use: the chosen file, else the one the slide came with."""
        from qdplex.errors import PanelError
        from qdplex.panel import read_panel

        text = self.panel_edit.text().strip()
        if text:
            return read_panel(Path(text).expanduser())
        panel = meta(self.slide.layer).get("panel")
        if panel is None:
            raise PanelError("expected a panel file (choose one), found none")
        return panel

    # ------------------------------------------------------------------ run
    def run(self):
        """Start the pipeline in a background thread; returns the worker (None if not started)."""
        from napari.qt.threading import create_worker

        from qdplex.errors import QdplexError

        layer = self.slide.layer
        if layer is None:
            self.status.setText("Open a slide first (File ▸ Open, or File ▸ Open Sample ▸ qdplex).")
            return None
        try:
            panel = self.panel()
        except QdplexError as e:
            self.status.setText(str(e))
            return None
        image = meta(layer)["image"]
        self.run_button.setEnabled(False)
        self.progress.setValue(0)
        self.status.setText(f"running on {image.name} …")
        self.worker = create_worker(_process, image, panel, self._relay, _start_thread=False)
        self.worker.returned.connect(self._done)
        self.worker.errored.connect(self._failed)
        self.worker.start()
        return self.worker

    def _on_progress(self, stage: str, fraction: float):
        self.progress.setValue(int(round(100 * fraction)))
        self.status.setText(f"{stage} done")

    def _done(self, out):
        # add the layers one per event-loop turn, so the viewer keeps drawing meanwhile
        result, layers = out
        pending = list(layers)

        def add_next():
            if pending:
                upsert_layers(self.viewer, [pending.pop(0)])
                QTimer.singleShot(0, add_next)
            else:
                self._finish(result)

        add_next()

    def _finish(self, result):
        self.run_button.setEnabled(True)
        self.viewer.layers.selection.active = self.viewer.layers["cells"]
        self.result = result
        t = sum(result.timings.values())
        n = len(result.table)
        self.progress.setValue(100)
        self.status.setText(f"{result.image.name}: {n} cells in {t:.1f} s")

    def _failed(self, exc):
        self.run_button.setEnabled(True)
        self.progress.setValue(0)
        self.status.setText(f"failed: {exc}")
