"""Shared plumbing of the widgets: finding qdplex layers, adding results, colouring cells.

Cell colours are composed here so that colouring by a column (``_colorby``) and
highlighting the selected cells (``_table``) work together: the cells layer's
``metadata["qdplex"]`` keeps the base colours and the selection, and
:func:`apply_cell_colors` turns them into one ``DirectLabelColormap``. A label
colormap scales to 50,000 cells where shapes layers would not.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox

__all__ = [
    "meta",
    "kind",
    "LayerCombo",
    "upsert_layers",
    "cell_ids",
    "set_base_colors",
    "set_selection",
    "apply_cell_colors",
]

#: colour of selected cells when the layer has no base colours (napari's default random colours)
SELECTED_RGBA = np.array([1.0, 0.9, 0.1, 1.0])
#: colour of the other cells while some are selected (no base colours)
OTHERS_RGBA = np.array([0.6, 0.6, 0.6, 0.25])
#: alpha of unselected cells while some are selected (with base colours)
DIM_ALPHA = 0.2


def meta(layer) -> dict:
    """The layer's qdplex metadata dict (empty when it is not a qdplex layer)."""
    if layer is None:
        return {}
    return layer.metadata.get("qdplex", {})


def kind(layer) -> str | None:
    return meta(layer).get("kind")


def is_cells(layer) -> bool:
    """A labels layer with a qdplex cell table (``features`` with an ``index`` column)."""
    from napari.layers import Labels

    return isinstance(layer, Labels) and "index" in layer.features.columns and len(layer.features) > 0


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers passing ``accept(layer)``; kept in sync with the viewer.

    Emits ``layer_changed(layer_or_None)`` when the chosen layer changes, including
    when a layer of the same name is replaced (a re-run).
    """

    layer_changed = Signal(object)

    def __init__(self, viewer, accept, parent=None):
        super().__init__(parent)
        self._viewer = viewer
        self._accept = accept
        self._current = None
        self.currentIndexChanged.connect(self._changed)
        ev = viewer.layers.events
        ev.inserted.connect(self.refresh)
        ev.removed.connect(self.refresh)
        ev.reordered.connect(self.refresh)
        self.refresh()

    @property
    def layer(self):
        name = self.currentText()
        if name and name in self._viewer.layers:
            return self._viewer.layers[name]
        return None

    def refresh(self, *_):
        keep = self.currentText()
        names = [ly.name for ly in reversed(self._viewer.layers) if self._accept(ly)]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if keep in names:
            self.setCurrentText(keep)
        self.blockSignals(False)
        self._changed()

    def _changed(self, *_):
        layer = self.layer
        if layer is not self._current:
            self._current = layer
            self.layer_changed.emit(layer)


def upsert_layers(viewer, layer_tuples) -> list:
    """Add layer-data tuples to the viewer; a layer of the same name and type is updated in place.

    Updating in place (a re-run) keeps the user's layer order and view settings and
    avoids napari's costly layer removal.
    """
    out = []
    for data, kwargs, ltype in layer_tuples:
        name = kwargs.get("name")
        old = viewer.layers[name] if name in viewer.layers else None
        if old is not None and type(old).__name__.lower() == ltype:
            _update_layer(old, data, kwargs)
            out.append(old)
            continue
        if old is not None:
            viewer.layers.remove(old)
        out.append(getattr(viewer, f"add_{ltype}")(data, **kwargs))
    return out


def _update_layer(layer, data, kwargs) -> None:
    m = layer.metadata.setdefault("qdplex", {})
    default = m.get("_default_colormap")
    m.clear()  # drop the colours and selection of the previous run
    if default is not None:
        m["_default_colormap"] = default
        layer.colormap = default
    m.update(kwargs.get("metadata", {}).get("qdplex", {}))
    if "scale" in kwargs:
        layer.scale = kwargs["scale"]
    layer.data = data
    for key in ("colormap", "contrast_limits"):
        if key in kwargs:
            setattr(layer, key, kwargs[key])
    if "features" in kwargs:
        layer.features = kwargs["features"]


def cell_ids(layer) -> np.ndarray:
    """Cell IDs of a cells layer, in the row order of its features table."""
    return layer.features["index"].to_numpy()


def set_base_colors(layer, rgba=None) -> None:
    """Give each cell (row of ``features``) an RGBA colour; None restores napari's colours."""
    m = layer.metadata.setdefault("qdplex", {})
    m["_base_rgba"] = None if rgba is None else np.asarray(rgba, dtype=float)
    apply_cell_colors(layer)


def set_selection(layer, ids) -> None:
    """Highlight the cells ``ids`` (empty: no highlight) and make a single one the selected label."""
    ids = np.unique(np.asarray(list(ids), dtype=np.int64))
    m = layer.metadata.setdefault("qdplex", {})
    m["_selected"] = ids
    if ids.size == 1:
        layer.selected_label = int(ids[0])
    apply_cell_colors(layer)


def apply_cell_colors(layer) -> None:
    """Compose base colours and selection into the layer's ``DirectLabelColormap``."""
    from napari.utils.colormaps import DirectLabelColormap

    m = layer.metadata.setdefault("qdplex", {})
    base = m.get("_base_rgba")
    sel = m.get("_selected", np.empty(0, np.int64))
    if "_default_colormap" not in m:
        m["_default_colormap"] = layer.colormap
    if base is None and sel.size == 0:
        layer.colormap = m["_default_colormap"]
        return
    transparent = np.zeros(4)
    if base is None:
        # few entries: every other label takes the default (key None), so this stays cheap
        colors = {int(i): SELECTED_RGBA for i in sel}
        colors[None] = OTHERS_RGBA
    else:
        ids = cell_ids(layer)
        rgba = base.copy()
        if sel.size:
            rgba[~np.isin(ids, sel), 3] *= DIM_ALPHA
        colors = dict(zip(ids.tolist(), rgba))
        colors[None] = transparent
    colors[0] = transparent
    layer.colormap = DirectLabelColormap(color_dict=colors)
