"""Cells as QuPath cell objects: ``cells.geojson``.

One GeoJSON Feature per cell, in QuPath's cell-object convention (what QuPath itself
writes with *File → Export objects as GeoJSON* and reads with *File → Import objects
from file*):

* ``geometry`` — the cell outline, ``nucleusGeometry`` (a member of the Feature) —
  its nucleus, both in full-resolution pixel coordinates with the origin at the
  top-left corner of the image (a pixel ``(row, col)`` covers ``[col, col + 1] ×
  [row, row + 1]``);
* ``properties.objectType = "cell"``;
* ``properties.measurements`` — every numeric column of ``cells.csv`` under the same
  name (``*_positive`` as 0/1; a NaN is left out, QuPath shows it as missing);
* ``properties.classification`` — the markers the cell is positive for, as a QuPath
  derived class (``"HER2: ER"``); a cell positive for no marker has no classification.

Outlines follow the pixel edges of the label image: each cell's mask (holes filled)
is traced with :func:`skimage.measure.find_contours` on a 2× nearest-neighbour
upsampling, so a polygon's area is the pixel count less 1/32 px² per convex corner.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError

__all__ = ["cells_geojson", "write_cells_geojson", "label_polygons"]

#: Namespace of the feature ids: uuid5(NAMESPACE, "<slide>/<CellID>") — stable across exports.
NAMESPACE = uuid.UUID("5b0e8d1e-7a43-4c0e-9a51-0f1d2c3b4a59")

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _rings(mask: np.ndarray, r0: int, c0: int) -> list[list[list[float]]]:
    """Outer rings (x, y lists, closed, counter-clockwise) of the components of ``mask``."""
    from scipy.ndimage import binary_fill_holes
    from skimage.measure import approximate_polygon, find_contours

    sub = np.pad(binary_fill_holes(mask), 1)
    up = sub.repeat(2, axis=0).repeat(2, axis=1).astype(np.float32)
    rings = []
    for contour in find_contours(up, 0.5):
        contour = approximate_polygon(contour, tolerance=0.01)  # drops collinear points only
        if len(contour) < 4:
            continue
        y = (contour[:, 0] + 0.5) / 2.0 - 1.0 + r0
        x = (contour[:, 1] + 0.5) / 2.0 - 1.0 + c0
        if np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)) < 0:  # shoelace: make it counter-clockwise
            x, y = x[::-1], y[::-1]
        ring = np.round(np.column_stack([x, y]), 4).tolist()
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        rings.append(ring)
    return rings


def _geometry(rings) -> dict | None:
    if not rings:
        return None
    if len(rings) == 1:
        return {"type": "Polygon", "coordinates": [rings[0]]}
    return {"type": "MultiPolygon", "coordinates": [[r] for r in rings]}


def label_polygons(labels: np.ndarray, ids=None) -> dict[int, dict]:
    """GeoJSON geometries (Polygon or MultiPolygon) of the objects of a label image.

    Parameters
    ----------
    labels : ndarray
        2-D integer labels, 0 = background.
    ids : iterable of int, optional
        Only these labels (default: every label present).

    Returns
    -------
    dict
        label → geometry dict, pixel coordinates (x = column, y = row, pixel corners).
    """
    from scipy.ndimage import find_objects

    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"expected a 2-D integer label image, found {labels.ndim}-D {labels.dtype}")
    slices = find_objects(labels)
    wanted = range(1, len(slices) + 1) if ids is None else [int(i) for i in ids]
    out = {}
    for lab in wanted:
        sl = slices[lab - 1] if 0 < lab <= len(slices) else None
        if sl is None:
            continue
        geom = _geometry(_rings(labels[sl] == lab, sl[0].start, sl[1].start))
        if geom is not None:
            out[lab] = geom
    return out


def _measurements(row: pd.Series) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, (bool, np.bool_)):
            out[k] = int(v)
        elif isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v):
            out[k] = v.item() if hasattr(v, "item") else v
    return out


def cells_geojson(cells: np.ndarray, nuclei: np.ndarray, table: pd.DataFrame, *, markers=None,
                  slide: str = "slide") -> dict:
    """A GeoJSON FeatureCollection of QuPath cell objects, one Feature per row of ``table``.

    Parameters
    ----------
    cells, nuclei : ndarray
        2-D uint label images; a cell's nucleus has the cell's ID.
    table : DataFrame
        The cell table (``cells.csv``), with ``CellID``.
    markers : list of str, optional
        Markers whose ``<marker>_positive`` column classifies a cell (default: every
        ``*_positive`` column, in table order).
    slide : str
        Slide name, part of each feature's stable UUID.

    Returns
    -------
    dict
        ``{"type": "FeatureCollection", "features": [...]}``.

    Raises
    ------
    InputError
        No ``CellID`` column, or a cell of the table has no pixel in ``cells``.
    """
    if "CellID" not in table.columns:
        raise InputError(f"expected a CellID column in the cell table, found {list(table.columns)[:5]}…")
    ids = table["CellID"].astype(np.int64).to_numpy()
    if markers is None:
        markers = [c[: -len("_positive")] for c in table.columns if c.endswith("_positive")]
    pos_cols = [f"{m}_positive" for m in markers if f"{m}_positive" in table.columns]
    cell_geoms = label_polygons(cells, ids)
    nuc_geoms = label_polygons(nuclei, ids)
    lost = [int(i) for i in ids if int(i) not in cell_geoms]
    if lost:
        raise InputError(f"expected every cell of the table in the cells label image, found {len(lost)} without "
                         f"pixels (CellID {lost[:5]})")
    colours = {}
    features = []
    numeric = table.select_dtypes(include=["number", "bool"])
    for i, cid in enumerate(ids):
        row = table.iloc[i]
        props = {"objectType": "cell", "name": f"cell {int(cid)}", "isLocked": False,
                 "measurements": _measurements(numeric.iloc[i])}
        positive = [c[: -len("_positive")] for c in pos_cols if bool(row[c])]
        if positive:
            name = ": ".join(positive)
            colour = colours.setdefault(name, _PALETTE[len(colours) % len(_PALETTE)])
            props["classification"] = {"name": name, "color": list(colour)}
        feature = {"type": "Feature", "id": str(uuid.uuid5(NAMESPACE, f"{slide}/{int(cid)}")),
                   "geometry": cell_geoms[int(cid)]}
        if int(cid) in nuc_geoms:
            feature["nucleusGeometry"] = nuc_geoms[int(cid)]
        feature["properties"] = props
        features.append(feature)
    return {"type": "FeatureCollection", "features": features}


def write_cells_geojson(slide_dir, out_path=None) -> Path:
    """Write ``cells.geojson`` (QuPath cell objects) for a finished slide folder.

    Parameters
    ----------
    slide_dir : str or Path
        ``OUT/<slide>`` as written by ``qdplex run`` (labels, ``cells.csv``, ``run.json``).
    out_path : str or Path, optional
        Where to write (default ``slide_dir/cells.geojson``). A file inside the slide
        folder is added to its ``run.json`` record of outputs.

    Returns
    -------
    Path
        The written file.
    """
    from ..io import atomic_path, read_labels
    from ..outputs import register_outputs
    from ._slide import read_slide_outputs

    s = read_slide_outputs(slide_dir)
    out = Path(out_path) if out_path is not None else s.folder / "cells.geojson"
    doc = cells_geojson(read_labels(s.cells), read_labels(s.nuclei), s.table,
                        markers=list(s.panel.marker_names), slide=s.name)
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, separators=(",", ":"), allow_nan=False)
    register_outputs(s.folder, [out])  # qdplex wrote it: `qdplex run --force` may still replace the folder
    return out
