"""Shared plumbing of the widgets: finding qdplex layers, adding results, colouring cells.

Cells are coloured by a column through the cells layer's ``DirectLabelColormap``
(:func:`set_base_colors`), which scales to 50,000 cells where shapes would not.
Selected cells are highlighted by a small overlay labels layer holding only them,
drawn as bright outlines (:func:`show_selection`): selecting never recomputes the
colours of all cells.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox

__all__ = [
    "meta",
    "kind",
    "LayerCombo",
    "follow_clicks",
    "upsert_layers",
    "cell_ids",
    "set_base_colors",
    "show_selection",
    "SELECTION_LAYER",
]

#: name of the overlay layer that outlines the selected cells
SELECTION_LAYER = "selected cells"
#: outline colour of selected cells
SELECTED_RGBA = np.array([1.0, 0.95, 0.1, 1.0])


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
        for e in (ev.inserted, ev.removed, ev.reordered):
            e.connect(self.refresh)
        refresh = self.refresh

        def _stop(*_):
            for e in (ev.inserted, ev.removed, ev.reordered):
                e.disconnect(refresh)

        self.destroyed.connect(_stop)
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


def follow_clicks(widget, viewer, callback) -> None:
    """Call ``callback(viewer, event)`` on mouse presses in the viewer until ``widget`` is destroyed."""
    viewer.mouse_drag_callbacks.append(callback)

    def _stop(*_):
        if callback in viewer.mouse_drag_callbacks:
            viewer.mouse_drag_callbacks.remove(callback)

    widget.destroyed.connect(_stop)


def upsert_layers(viewer, layer_tuples) -> list:
    """Add layer-data tuples to the viewer; a layer of the same name and type is updated in place.

    Updating in place (a re-run) keeps the user's layer order and view settings and
    avoids napari's costly layer removal.
    """
    from napari import layers

    out = []
    for data, kwargs, ltype in layer_tuples:
        name = kwargs.get("name")
        old = viewer.layers[name] if name in viewer.layers else None
        if old is not None and isinstance(old, getattr(layers, ltype.capitalize())):
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
    from napari.utils.colormaps import DirectLabelColormap

    m = layer.metadata.setdefault("qdplex", {})
    if "_default_colormap" not in m:
        m["_default_colormap"] = layer.colormap
    m["_colored"] = rgba is not None
    if rgba is None:
        layer.colormap = m["_default_colormap"]
        return
    # colours as '#rrggbbaa' strings: napari caches their parsing, so the few distinct
    # colours of a quantised colormap are parsed once, not once per cell
    from matplotlib.colors import to_hex

    uniq, inverse = np.unique(np.clip(np.asarray(rgba, dtype=float), 0, 1), axis=0, return_inverse=True)
    hexes = np.array([to_hex(c, keep_alpha=True) for c in uniq], dtype=object)[inverse.ravel()]
    colors = dict(zip(cell_ids(layer).tolist(), hexes.tolist()))
    colors[None] = "transparent"
    colors[0] = "transparent"
    layer.colormap = DirectLabelColormap(color_dict=colors)


def show_selection(viewer, layer, ids) -> None:
    """Outline the cells ``ids`` of ``layer`` (empty: none); a single cell also becomes the selected label."""
    from napari.utils.colormaps import DirectLabelColormap

    ids = np.unique(np.asarray(list(ids), dtype=np.int64))
    layer.metadata.setdefault("qdplex", {})["_selected"] = ids
    if ids.size == 1:
        layer.selected_label = int(ids[0])
    data = np.asarray(layer.data)
    overlay = np.where(np.isin(data, ids), data, 0) if ids.size else np.zeros_like(data)
    if SELECTION_LAYER in viewer.layers:
        sel = viewer.layers[SELECTION_LAYER]
        sel.scale, sel.translate = layer.scale, layer.translate
        sel.data = overlay
        sel.visible = bool(ids.size)
        return
    if not ids.size:
        return
    active = viewer.layers.selection.active
    sel = viewer.add_labels(
        overlay,
        name=SELECTION_LAYER,
        scale=layer.scale,
        translate=layer.translate,
        opacity=1.0,
        colormap=DirectLabelColormap(color_dict={None: SELECTED_RGBA, 0: np.zeros(4)}),
        metadata={"qdplex": {"kind": "selection", "slide": meta(layer).get("slide")}},
    )
    sel.contour = 2
    if active is not None:
        viewer.layers.selection.active = active
