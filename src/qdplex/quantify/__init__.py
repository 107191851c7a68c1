"""Per-cell statistics by label-indexed accumulation.

One pass over each image block accumulates every cell's sums and shape moments,
which combine exactly across blocks (:mod:`qdplex.quantify.accumulate`), so a whole
slide quantified tile by tile gives the same table as one call on the whole image.
Median and quantiles are exact per cell with memory bounded by a tile: each tile
gives the cells whose centroid it holds (:mod:`qdplex.quantify.order`).

Layering: :mod:`._kernels` (compiled passes) → :mod:`.accumulate`
(:func:`accumulate_block` / :func:`finalize`, arrays) and :mod:`.order` (median,
quantiles) → :func:`quantify` (``MultiplexImage`` / ``UnmixResult`` / plain
arrays) → tables and scores.

The morphology columns follow MCQuant (which calls
``skimage.measure.regionprops``) and equal regionprops' values: ``Area``,
``MajorAxisLength``, ``MinorAxisLength``, ``Eccentricity``, ``Solidity``,
``Extent``, ``Orientation`` (radians), ``Perimeter`` (regionprops' 4-neighbourhood
estimator), plus ``NucleusArea`` and ``NucleusCellAreaRatio``; centroids
``X_centroid, Y_centroid`` in pixels (column, row) and ``X_centroid_um,
Y_centroid_um`` in µm.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InputError, SegmentationError
from ..model import COMPARTMENTS, MultiplexImage, Segmentation
from ._kernels import CELL
from .accumulate import (
    ADDITIVE_STATS,
    DEFAULT_STATS,
    MORPHOLOGY_COLUMNS,
    ORDER_STATS,
    QC_COLUMNS,
    Accumulator,
    accumulate_block,
    as_labels,
    finalize,
    morphology,
    stat_name,
)
from .order import label_extents, order_stats_for, owned

__all__ = [
    "quantify",
    "Accumulator",
    "accumulate_block",
    "finalize",
    "morphology",
    "fraction_above",
    "label_extents",
    "owned",
    "order_stats_for",
    "MORPHOLOGY_COLUMNS",
    "QC_COLUMNS",
    "DEFAULT_STATS",
]


def fraction_above(plane, labels, threshold: float, ids=None) -> np.ndarray:
    """Per label, the fraction of its pixels with value ≥ ``threshold``.

    With the membrane ring as ``labels`` and a marker's positivity threshold this is
    the membrane completeness of each cell (HER2 scoring, :mod:`qdplex.score`).

    Parameters
    ----------
    plane : array-like, shape (Y, X)
        One marker plane (numpy or dask).
    labels : array-like, shape (Y, X)
        Label image (e.g. ``Segmentation.membrane``).
    threshold : float
    ids : array-like, optional
        Labels to report, in this order (default: every label present, ascending).

    Returns
    -------
    numpy.ndarray
        Fractions in [0, 1]; NaN for a label without pixels.
    """
    plane = np.asarray(plane)
    labels = as_labels(np.asarray(labels), "labels")
    if plane.shape != labels.shape:
        raise SegmentationError(f"expected a plane and labels of one Y×X shape, found {plane.shape} and {labels.shape}")
    lab = labels.ravel()
    if ids is None:
        ids = np.unique(lab[lab > 0])
    ids = np.asarray(ids, dtype=np.int64)
    uniq, inv = np.unique(lab, return_inverse=True)
    n = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    k = np.bincount(inv, weights=(plane.ravel() >= threshold), minlength=len(uniq))
    pos = np.searchsorted(uniq, ids)
    pos = np.minimum(pos, len(uniq) - 1)
    found = uniq[pos] == ids
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(found & (n[pos] > 0), k[pos] / n[pos], np.nan)


# --------------------------------------------------------------------------- public entry
def quantify(image, segmentation, panel=None, *, channel_names=None, stats=DEFAULT_STATS, quantiles=(),
             compartments=None, pixel_size_um=None) -> pd.DataFrame:
    """Per-cell intensity statistics, morphology and quality columns.

    Parameters
    ----------
    image : ndarray (C×Y×X), MultiplexImage or qdplex.unmix.UnmixResult
        A plain array needs ``channel_names`` (and then ``segmentation`` may be a
        plain cell label image: the result is steinbock-like, one column per
        channel holding the cell mean). A ``MultiplexImage`` is processed block by
        block along its dask chunks. An ``UnmixResult`` adds the quality columns
        ``residual_mean`` (mean per-pixel RMS misfit over the cell),
        ``af_fraction`` (autofluorescence planes ``AF``, ``AF2``… over all
        abundance planes, summed over the cell) and ``saturated_fraction``.
    segmentation : Segmentation or ndarray (Y×X cell labels)
    panel : Panel, optional
        Renames fluor planes to marker names (``Panel.fluor_to_marker``).
    channel_names : sequence of str, optional
        Names of the planes of a plain array (required then).
    stats : sequence of str
        Any of ``mean, std, var, sum, count, min, max, median`` (std is the
        population standard deviation, as ``scipy.ndimage.standard_deviation``).
    quantiles : sequence of float
        Extra per-cell quantiles in [0, 1] (columns ``…_q25``, ``…_q97_5``).
    compartments : sequence of str, optional
        Default: all of ``nucleus, cytoplasm, membrane, cell`` for a
        ``Segmentation``; ``cell`` for a plain label image.
    pixel_size_um : float, optional
        For the µm centroids (default: the image's pixel size).

    Returns
    -------
    pandas.DataFrame
        Indexed by ``CellID`` (ascending; IDs need not be contiguous).
        Columns ``<plane>_<compartment>_<stat>``, then :data:`MORPHOLOGY_COLUMNS`,
        then the quality columns (for an ``UnmixResult``). For a plain array with a
        plain label image: one column per channel (the cell mean), index ``CellID``.
    """
    stats = tuple(stats)
    quantiles = tuple(float(q) for q in quantiles)
    for q in quantiles:
        if not 0.0 <= q <= 1.0:
            raise InputError(f"expected quantiles in [0, 1], found {q}")
    unknown = [s for s in stats if s not in ADDITIVE_STATS | ORDER_STATS]
    if unknown:
        raise InputError(f"expected statistics from {sorted(ADDITIVE_STATS | ORDER_STATS)}, found {unknown}")

    residual = saturated = None
    steinbock_like = False
    if hasattr(image, "abundances") and hasattr(image, "residual"):
        residual = image.residual
        saturated = getattr(image, "saturated", None)
        image = image.abundances
    if isinstance(image, MultiplexImage):
        data = image.data
        names = image.channel_names
        if pixel_size_um is None:
            pixel_size_um = image.pixel_size_um
        where = image.source or image.name
    else:
        data = np.asarray(image)
        if data.ndim == 2:
            data = data[None]
        if channel_names is None:
            raise InputError(
                f"expected channel_names for a plain {data.ndim}-D array of shape {data.shape}, found none"
            )
        names = [str(c) for c in channel_names]
        if data.ndim != 3 or data.shape[0] != len(names):
            raise InputError(
                f"expected a C×Y×X array with C={len(names)} channels {names}, found shape {data.shape}"
            )
        where = "image"
    if panel is not None:
        mapping = panel.fluor_to_marker()
        names = [mapping.get(n, n) for n in names]

    if isinstance(segmentation, Segmentation):
        seg = segmentation
        if compartments is None and panel is not None and panel.quantification.get("compartments"):
            # the panel's list, plus every marker's own compartment (the table needs those)
            wanted = set(panel.quantification["compartments"]) | {m.compartment for m in panel.markers}
            compartments = [c for c in COMPARTMENTS if c in wanted]
        comps = tuple(compartments) if compartments is not None else COMPARTMENTS
    else:
        cells = np.asarray(segmentation)
        seg = None
        comps = tuple(compartments) if compartments is not None else ("cell",)
        steinbock_like = compartments is None and stats == DEFAULT_STATS and not quantiles
    cells = seg.cells if seg is not None else cells
    if cells.shape != tuple(data.shape[1:]):
        raise SegmentationError(
            f"expected a label image of the image's Y×X shape {tuple(data.shape[1:])}, found {cells.shape}",
            path=where if where != "image" else None,
        )
    nuclei = seg.nuclei if seg is not None and "nucleus" in comps or (seg is not None and "cytoplasm" in comps) else None
    membrane = seg.membrane if seg is not None and "membrane" in comps else None
    if seg is None and any(c != "cell" for c in comps):
        raise SegmentationError(f"expected a Segmentation for compartments {comps}, found a plain label image")

    extra_names = []
    extra = []
    if residual is not None:
        extra_names.append("__residual")
        extra.append(residual)
    if saturated is not None:
        extra_names.append("__saturated")
        extra.append(saturated)

    additive = tuple(s for s in stats if s in ADDITIVE_STATS)
    acc = Accumulator(list(names) + extra_names, cells.shape, minmax=("min" in stats or "max" in stats))
    for (y0, y1, x0, x1), block in _blocks(data, extra):
        accumulate_block(acc, block, cells, nuclei, membrane, origin=(y0, x0))

    table = finalize(acc, stats=additive if not steinbock_like else ("mean",), compartments=comps,
                     pixel_size_um=pixel_size_um)
    drop = [c for c in table.columns if c.startswith("__")]
    table = table.drop(columns=drop)

    if "median" in stats or quantiles:
        table = _with_order_stats(table, data, cells, seg, names, comps, stats, quantiles)

    if residual is not None or saturated is not None:
        table = _add_qc(table, acc, names, extra_names)

    if steinbock_like:
        table = table[[f"{n}_cell_mean" for n in names]]
        table.columns = names
    return table


def _with_order_stats(table, data, cells, seg, names, comps, stats, quantiles) -> pd.DataFrame:
    """``table`` with the median and quantile columns, in table order (:mod:`.order`).

    An in-memory image is read whole; a chunked (dask) image chunk by chunk, each
    chunk giving the cells whose centroid it holds, from the window of their pixels.
    """
    import dask.array as da

    ids = table.index.to_numpy()
    nuclei = seg.nuclei if seg is not None and ("nucleus" in comps or "cytoplasm" in comps) else None
    membrane = seg.membrane if seg is not None and "membrane" in comps else None
    if isinstance(data, da.Array):
        used = [cells] + [a for a in (nuclei if "nucleus" in comps else None, membrane) if a is not None]
        ext = label_extents(ids, *used)
        cy, cx = table["Y_centroid"].to_numpy(), table["X_centroid"].to_numpy()
        parts = []
        for tile in _tiles(data):
            mine = owned(cy, cx, tile)
            if mine.any():
                parts.append(order_stats_for(data, cells, nuclei, membrane, ids[mine], ext[mine], names, comps,
                                             stats, quantiles))
        extra = pd.concat(parts).reindex(table.index)
    else:
        H, W = cells.shape
        whole = np.tile(np.array([0, H - 1, 0, W - 1], np.int64), (len(ids), 1))
        extra = order_stats_for(data, cells, nuclei, membrane, ids, whole, names, comps, stats, quantiles)
    table = pd.concat([table, extra], axis=1)
    # order: per plane and compartment, the statistics as requested, then the quantiles
    qnames = [stat_name(q) for q in quantiles]
    front = [f"{n}_{c}_{st}" for n in names for c in comps for st in list(stats) + qnames]
    front = [f for f in front if f in table.columns]
    return table[front + [c for c in table.columns if c not in front]]


def _add_qc(table, acc, names, extra_names) -> pd.DataFrame:
    rows = np.searchsorted(acc.labels, table.index.to_numpy().astype(np.uint64))
    n = acc.count[CELL, rows].astype(np.float64)
    all_names = list(names) + extra_names
    qc = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        if "__residual" in extra_names:
            k = all_names.index("__residual")
            qc["residual_mean"] = acc.sum[CELL, rows, k] / n
        af = [i for i, nm in enumerate(names) if _is_af(nm)]
        abund = [i for i, nm in enumerate(names) if nm != "residual"]
        if af:
            tot = acc.sum[CELL][np.ix_(rows, abund)].sum(axis=1)
            afs = acc.sum[CELL][np.ix_(rows, af)].sum(axis=1)
            qc["af_fraction"] = np.where(tot > 0, afs / tot, np.nan)
        else:
            qc["af_fraction"] = np.full(len(rows), np.nan)
        if "__saturated" in extra_names:
            k = all_names.index("__saturated")
            qc["saturated_fraction"] = acc.sum[CELL, rows, k] / n
    return pd.concat([table, pd.DataFrame(qc, index=table.index)], axis=1)


def _is_af(name: str) -> bool:
    return name == "AF" or (name.startswith("AF") and name[2:].isdigit())


def _tiles(data):
    """(y0, y1, x0, x1) of each spatial chunk of a C×Y×X array (one tile for numpy)."""
    import dask.array as da

    if isinstance(data, da.Array):
        ychunks, xchunks = data.chunks[1], data.chunks[2]
    else:
        Y, X = data.shape[1:]
        ychunks, xchunks = (Y,), (X,)
    ys = np.concatenate([[0], np.cumsum(ychunks)]).astype(int)
    xs = np.concatenate([[0], np.cumsum(xchunks)]).astype(int)
    for i in range(len(ychunks)):
        for j in range(len(xchunks)):
            yield int(ys[i]), int(ys[i + 1]), int(xs[j]), int(xs[j + 1])


def _blocks(data, extra):
    """Yield ((y0, y1, x0, x1), C×h×w numpy block) along the image's spatial chunks.

    The extra Y×X planes (unmixing residual, saturation) are appended as channels;
    lazy pieces of one block are computed together, so a shared dask graph (the
    unmixing that yields abundances, residual and saturation) runs once per block.
    """
    import dask
    import dask.array as da

    for y0, y1, x0, x1 in _tiles(data):
        parts = [data[:, y0:y1, x0:x1]] + [e[y0:y1, x0:x1] for e in extra]
        if any(isinstance(p, da.Array) for p in parts):
            parts = list(dask.compute(*parts))
        block = np.asarray(parts[0])
        if extra:
            dt = block.dtype if block.dtype.kind == "f" else np.dtype(np.float32)
            block = np.concatenate([block.astype(dt, copy=False)] + [np.asarray(p, dtype=dt)[None] for p in parts[1:]])
        yield (y0, y1, x0, x1), block
