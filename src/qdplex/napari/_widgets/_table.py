"""The cell table, linked both ways with the cells labels layer.

Click a cell in the viewer → its row is selected (Shift-click adds to the
selection); select rows → those cells are outlined in an overlay labels layer. The table model reads the features' numpy columns lazily, so 50,000
rows cost nothing until they are scrolled into view; sorting is one argsort.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QAbstractTableModel, QItemSelection, QItemSelectionModel, QModelIndex, Qt
from qtpy.QtWidgets import QAbstractItemView, QFormLayout, QLabel, QTableView, QVBoxLayout, QWidget

from ._common import LayerCombo, follow_clicks, cell_ids, is_cells, show_selection

__all__ = ["CellTableWidget", "DataFrameModel"]


class DataFrameModel(QAbstractTableModel):
    """A read-only, sortable Qt model over a pandas DataFrame (hidden ``index`` column)."""

    def __init__(self, df=None, parent=None):
        super().__init__(parent)
        self.set_frame(df)

    def set_frame(self, df):
        self.beginResetModel()
        if df is None:
            self._cols, self._data, self._n = [], [], 0
        else:
            self._cols = [c for c in df.columns if c != "index"]
            self._data = [df[c].to_numpy() for c in self._cols]
            self._n = len(df)
        self._order = np.arange(self._n)
        self.endResetModel()

    # row r of the view shows row self._order[r] of the frame
    def frame_row(self, view_row: int) -> int:
        return int(self._order[view_row])

    def view_rows(self, frame_rows) -> np.ndarray:
        inv = np.empty_like(self._order)
        inv[self._order] = np.arange(self._n)
        return inv[np.asarray(frame_rows, dtype=np.int64)]

    def rowCount(self, parent=QModelIndex()):
        return 0 if parent.isValid() else self._n

    def columnCount(self, parent=QModelIndex()):
        return 0 if parent.isValid() else len(self._cols)

    def data(self, index, role=Qt.DisplayRole):
        if role != Qt.DisplayRole or not index.isValid():
            return None
        v = self._data[index.column()][self._order[index.row()]]
        if isinstance(v, (float, np.floating)):
            return f"{v:.4g}"
        if isinstance(v, (np.bool_, bool)):
            return "yes" if v else "no"
        return str(v)

    def headerData(self, section, orientation, role=Qt.DisplayRole):
        if role != Qt.DisplayRole:
            return None
        if orientation == Qt.Horizontal:
            return self._cols[section]
        return str(section + 1)

    def sort(self, column, order=Qt.AscendingOrder):
        if not 0 <= column < len(self._cols):
            return
        self.layoutAboutToBeChanged.emit()
        col = self._data[column]
        try:
            idx = np.argsort(col, kind="stable")
        except TypeError:  # mixed objects: sort by their text
            idx = np.argsort(col.astype(str), kind="stable")
        self._order = idx[::-1] if order == Qt.DescendingOrder else idx
        self.layoutChanged.emit()


class CellTableWidget(QWidget):
    """Cell table of the chosen cells layer, selection linked both ways with the viewer."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.layer = None
        self._ids = np.empty(0, np.int64)
        self._syncing = False

        self.cells = LayerCombo(napari_viewer, is_cells)
        self.model = DataFrameModel()
        self.view = QTableView()
        self.view.setModel(self.model)
        self.view.setSortingEnabled(True)
        self.view.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.view.verticalHeader().setDefaultSectionSize(20)
        self.view.setMinimumHeight(160)
        self.view.selectionModel().selectionChanged.connect(self._rows_selected)
        self.info = QLabel("")

        form = QFormLayout()
        form.addRow("cells", self.cells)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.view, 1)
        lay.addWidget(self.info)

        self.cells.layer_changed.connect(self._set_layer)
        follow_clicks(self, napari_viewer, self._on_click)
        self._set_layer(self.cells.layer)

    # ------------------------------------------------------------- layer
    def _set_layer(self, layer):
        if self.layer is not None:
            self.layer.events.features.disconnect(self._reload)
        self.layer = layer
        if layer is not None:
            layer.events.features.connect(self._reload)
        self._reload()

    def _reload(self, *_):
        layer = self.layer
        keep = self.selected_ids()
        self.model.set_frame(None if layer is None else layer.features)
        self._ids = np.empty(0, np.int64) if layer is None else cell_ids(layer)
        self.info.setText("" if layer is None else f"{len(self._ids)} cells")
        if keep.size:
            self.select_cells(keep, scroll=False)

    # ------------------------------------------------------------- table → viewer
    def selected_ids(self) -> np.ndarray:
        """Cell IDs of the selected rows."""
        rows = [self.model.frame_row(i.row()) for i in self.view.selectionModel().selectedRows()]
        return np.sort(self._ids[rows]) if rows else np.empty(0, np.int64)

    def _rows_selected(self, *_):
        if self._syncing or self.layer is None:
            return
        ids = self.selected_ids()
        show_selection(self.viewer, self.layer, ids)
        self.info.setText(f"{len(self._ids)} cells, {ids.size} selected")

    # ------------------------------------------------------------- viewer → table
    def select_cells(self, ids, *, add: bool = False, scroll: bool = True) -> None:
        """Select the rows of cells ``ids`` (and highlight them); ``add`` keeps the current rows."""
        ids = np.asarray(list(ids), dtype=np.int64)
        frame_rows = np.flatnonzero(np.isin(self._ids, ids))
        view_rows = np.sort(self.model.view_rows(frame_rows))
        sel = QItemSelection()
        last = self.model.columnCount() - 1
        for r in view_rows:
            sel.select(self.model.index(int(r), 0), self.model.index(int(r), last))
        flags = QItemSelectionModel.Select if add else QItemSelectionModel.ClearAndSelect
        self.view.selectionModel().select(sel, flags | QItemSelectionModel.Rows)
        if not frame_rows.size:
            self.view.selectionModel().clearSelection()
        if scroll and view_rows.size:
            self.view.scrollTo(self.model.index(int(view_rows[0]), 0))

    def _on_click(self, viewer, event):
        layer = self.layer
        if layer is None or not layer.visible or event.button not in (None, 1):
            return
        value = layer.get_value(
            event.position, view_direction=event.view_direction, dims_displayed=event.dims_displayed, world=True
        )
        if value is None:
            return
        value = int(value)
        add = "Shift" in [str(getattr(m, "name", m)) for m in event.modifiers]
        if value == 0:
            if not add:
                self.select_cells([])
            return
        self.select_cells([value], add=add)
