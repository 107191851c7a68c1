"""Per-cell median and quantiles, exact, with memory bounded by a tile.

Order statistics do not add up across blocks the way sums do, so they are
computed per cell on all of that cell's pixels at once — but only for the cells
a tile *owns* (those whose centroid lies in the tile, :func:`owned`), reading the
window that holds every pixel of those cells (the union of their extents,
:func:`label_extents`). Each cell is owned by exactly one tile, so the tiles
together give every cell once, and each cell's values equal those of one call
on the whole image (the same multiset of pixels, sorted; numpy's ``linear``
quantile). Memory is that of one window: a tile plus the reach of its cells.

Layering: :func:`label_extents` (one pass over the label images, strip by strip) →
:func:`owned` per tile → :func:`order_stats_for` per tile; :func:`qdplex.quantify.quantify`
does this along the image's dask chunks, and the run layer can do it per tile.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InputError
from ..model import COMPARTMENTS
from ._kernels import label_extents_into, segment_quantiles
from .accumulate import as_labels, stat_name

__all__ = ["label_extents", "owned", "order_stats_for", "order_columns"]


def order_columns(names, comps, stats, quantiles) -> list[tuple[str, str, str, float]]:
    """(column, plane, compartment, q) of each order statistic, in table order."""
    qs = ([("median", 0.5)] if "median" in stats else []) + [(stat_name(q), float(q)) for q in quantiles]
    return [(f"{n}_{c}_{qn}", n, c, q) for n in names for c in comps for qn, q in qs]


def label_extents(ids, *labels, strip: int = 1024) -> np.ndarray:
    """Bounding box of each ID over one or more label images, read ``strip`` rows at a time.

    Parameters
    ----------
    ids : array of int
        Label IDs, ascending (e.g. a table's ``CellID``).
    *labels : array-like, shape (Y, X)
        Label images (numpy, memory-mapped or zarr; only row strips are read).
    strip : int
        Rows read at once.

    Returns
    -------
    numpy.ndarray of int64, shape (n, 4)
        min row, max row (inclusive), min col, max col of each ID's pixels in any of
        the images; ``[max, min, max, min]`` of int64 for an ID without pixels.
    """
    ids = np.asarray(ids, dtype=np.uint64)
    if len(ids) > 1 and not (np.diff(ids.astype(np.int64)) > 0).all():
        raise InputError(f"expected ascending unique cell IDs, found {ids[:8].tolist()}…")
    ext = np.empty((len(ids), 4), np.int64)
    ext[:, 0::2] = np.iinfo(np.int64).max
    ext[:, 1::2] = np.iinfo(np.int64).min
    for lab in labels:
        H = lab.shape[0]
        for y0 in range(0, H, strip):
            block = as_labels(np.asarray(lab[y0:min(H, y0 + strip)]), "labels").astype(np.uint64, copy=False)
            label_extents_into(block, ids, y0, ext)
    return ext


def owned(centroid_y, centroid_x, tile) -> np.ndarray:
    """Which cells a tile owns: centroid (row, col in pixels) in ``[y0, y1) × [x0, x1)``.

    ``tile`` is ``(y0, y1, x0, x1)``; tiles that cover an image without overlap own
    every cell exactly once.
    """
    y0, y1, x0, x1 = tile
    cy = np.asarray(centroid_y, np.float64)
    cx = np.asarray(centroid_x, np.float64)
    return (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)


def order_stats_for(data, cells, nuclei, membrane, ids, extents, names, comps, stats=("median",),
                    quantiles=()) -> pd.DataFrame:
    """Exact median and quantiles of the cells ``ids``, from the one window that holds them.

    Parameters
    ----------
    data : array-like, shape (C, Y, X)
        The whole image (numpy or dask; only the window is read).
    cells, nuclei, membrane : array-like, shape (Y, X)
        The whole image's label images (``nuclei``/``membrane`` may be None when no
        compartment needs them; cytoplasm = cell pixels outside any nucleus).
    ids : array of int
        Cell IDs, ascending (e.g. those :func:`owned` by one tile).
    extents : array, shape (len(ids), 4)
        Their rows of :func:`label_extents` over every label image used.
    names : sequence of str
        Plane names (columns ``<name>_<compartment>_<stat>``).
    comps : sequence of str
        Compartments.
    stats : sequence of str
        ``"median"`` is the order statistic read here; others are ignored.
    quantiles : sequence of float

    Returns
    -------
    pandas.DataFrame
        Index ``CellID`` = ``ids``; one column per plane, compartment and order statistic
        (NaN for a cell without pixels in a compartment).
    """
    ids = np.asarray(ids, dtype=np.int64)
    cols = order_columns(names, comps, stats, quantiles)
    out = {c: np.full(len(ids), np.nan) for c, *_ in cols}
    ext = np.asarray(extents, np.int64).reshape(-1, 4)
    present = ext[:, 1] >= ext[:, 0]
    if cols and present.any():
        r0, r1 = int(ext[present, 0].min()), int(ext[present, 1].max()) + 1
        c0, c1 = int(ext[present, 2].min()), int(ext[present, 3].max()) + 1
        win = (slice(r0, r1), slice(c0, c1))
        block = data[(slice(None),) + win]
        block = np.asarray(block.compute() if hasattr(block, "compute") else block)
        cl = np.asarray(cells[win])
        nu = np.asarray(nuclei[win]) if nuclei is not None else None
        labs = {}
        for comp in comps:
            if comp == "cell":
                labs[comp] = cl
            elif comp == "nucleus":
                labs[comp] = nu
            elif comp == "cytoplasm":
                labs[comp] = np.where(nu > 0, 0, cl) if nu is not None else cl
            elif comp == "membrane":
                labs[comp] = np.asarray(membrane[win])
            else:
                raise InputError(f"expected compartments from {COMPARTMENTS}, found {comp!r}")
        qs = np.array(sorted({q for *_, q in cols}), np.float64)
        for comp, lab in labs.items():
            res = _per_label(block, lab, ids, qs)  # (C, n, len(qs))
            for col, name, c, q in cols:
                if c == comp:
                    out[col] = res[list(names).index(name), :, int(np.searchsorted(qs, q))]
    return pd.DataFrame(out, index=pd.Index(ids, name="CellID"))


def _per_label(block, labels, ids, qs) -> np.ndarray:
    """Quantiles ``qs`` of each plane of ``block`` over each ID's pixels in ``labels``: (C, n, q)."""
    lab = as_labels(labels, "labels").ravel()
    sel = np.flatnonzero(lab)
    order = sel[np.argsort(lab[sel], kind="stable")]
    sorted_lab = lab[order]
    key = np.asarray(ids, dtype=sorted_lab.dtype)
    starts = np.searchsorted(sorted_lab, key, side="left")
    ends = np.searchsorted(sorted_lab, key, side="right")
    out = np.empty((block.shape[0], len(key), len(qs)))
    for ci in range(block.shape[0]):
        vals = block[ci].ravel()[order].astype(np.float64)
        out[ci] = segment_quantiles(vals, starts, ends, qs)
    return out
