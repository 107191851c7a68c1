"""Block accumulation of per-cell sums and shape moments, and the table they make.

One pass over each image block adds, for every cell and compartment, the pixel
count and each channel's sum, sum of squares (and, on request, minimum and
maximum) into an :class:`Accumulator`; the same pass adds the cell's raw shape
moments, bounding box, perimeter contributions and the row extents whose convex
hull gives the convex area. Every one of these combines exactly across blocks, so
a whole slide can be quantified tile by tile (:func:`accumulate_block` per tile,
then :func:`finalize`) and gives the same table as one call on the whole image.
The compiled passes are in :mod:`qdplex.quantify._kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import sqrt

import numpy as np
import pandas as pd

from ..errors import InputError, SegmentationError
from ..model import COMPARTMENTS
from ._kernels import (CELL, CX, CYT, NOUT, NUC, accumulate, hull_pixel_counts, hulls, hulls_from_runs, mark_present,
                       minmax, shape_sums)

__all__ = [
    "Accumulator",
    "accumulate_block",
    "finalize",
    "morphology",
    "MORPHOLOGY_COLUMNS",
    "QC_COLUMNS",
    "DEFAULT_STATS",
]

DEFAULT_STATS = ("mean", "std", "sum")
ADDITIVE_STATS = {"mean", "std", "var", "sum", "count", "min", "max"}
ORDER_STATS = {"median"}

#: Morphology columns in MCQuant order, then qdplex's additions.
MORPHOLOGY_COLUMNS = (
    "X_centroid",
    "Y_centroid",
    "Area",
    "MajorAxisLength",
    "MinorAxisLength",
    "Eccentricity",
    "Solidity",
    "Extent",
    "Orientation",
    "Perimeter",
    "NucleusArea",
    "NucleusCellAreaRatio",
    "X_centroid_um",
    "Y_centroid_um",
)

#: Per-cell quality columns written when quantifying an ``UnmixResult``.
QC_COLUMNS = ("residual_mean", "af_fraction", "saturated_fraction")

# accumulate by label ID directly (no dense relabelling pass) while the arrays stay this small
_DIRECT_BYTES = 64 << 20

_PERIM_W = np.zeros(50, dtype=np.float64)
_PERIM_W[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIM_W[[21, 33]] = sqrt(2.0)
_PERIM_W[[13, 23]] = (1.0 + sqrt(2.0)) / 2.0


def _derive_cells(count, s1, s2):
    """Cell totals = cytoplasm + nucleus − nucleus-outside-own-cell + cell-inside-other-nucleus."""
    count[CELL] = count[CYT] + count[NUC] - count[NOUT] + count[CX]
    for a in (s1, s2):
        a[CELL] = a[CYT] + a[NUC] - a[NOUT] + a[CX]


# --------------------------------------------------------------------------- accumulator
@dataclass
class Accumulator:
    """Exactly combinable per-label sums for one image (see :func:`accumulate_block`).

    Attributes
    ----------
    labels : ndarray of uint64
        Sorted label IDs seen so far (cells and nuclei); row ``i`` of every array is ``labels[i]``.
    channel_names : list of str
    count : ndarray, shape (4, n)
        Pixels per compartment (order of :data:`qdplex.model.COMPARTMENTS`).
    sum, sumsq : ndarray, shape (4, n, C)
    min, max : ndarray, shape (4, n, C) or None
        Only when ``minmax=True``.
    geo : ndarray, shape (n, 5)
        Σrow, Σcol, Σrow², Σcol², Σrow·col over the cell's pixels.
    bbox : ndarray, shape (n, 4)
        min row, max row, min col, max col.
    perimeter : ndarray, shape (n,)
    hull_start, hull_vertices : ndarray
        Convex hull vertices (row, col) of each label so far.
    shape : (int, int)
        Y×X size of the whole image.
    """

    channel_names: list[str]
    shape: tuple[int, int]
    minmax: bool = False
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    count: np.ndarray | None = None
    sum: np.ndarray | None = None
    sumsq: np.ndarray | None = None
    min: np.ndarray | None = None
    max: np.ndarray | None = None
    geo: np.ndarray | None = None
    bbox: np.ndarray | None = None
    perimeter: np.ndarray | None = None
    hull_start: np.ndarray | None = None
    hull_vertices: np.ndarray | None = None
    has_membrane: bool = False

    def __post_init__(self):
        if self.count is None:
            self._alloc(0)

    def _alloc(self, n, slots=4):
        # 4 compartment slots; a block being accumulated has 2 more (see accumulate)
        C = len(self.channel_names)
        self.count = np.zeros((slots, n), np.int64)
        self.sum = np.zeros((slots, n, C), np.float64)
        self.sumsq = np.zeros((slots, n, C), np.float64)
        if self.minmax:
            self.min = np.full((4, n, C), np.inf)
            self.max = np.full((4, n, C), -np.inf)
        self.geo = np.zeros((n, 5), np.float64)
        self.bbox = np.empty((n, 4), np.int64)
        self.bbox[:, 0::2] = np.iinfo(np.int64).max
        self.bbox[:, 1::2] = np.iinfo(np.int64).min
        self.perimeter = np.zeros(n, np.float64)
        self.hull_start = np.zeros(n + 1, np.int64)
        self.hull_vertices = np.zeros((0, 2), np.float64)

    def merge(self, other: "Accumulator") -> "Accumulator":
        """Add ``other`` (another block of the same image) into this accumulator, in place.

        Blocks are kept aside and combined once, when the totals are read
        (:meth:`consolidate`, called by :func:`finalize`), so adding a block costs
        no more than the block itself.
        """
        if list(other.channel_names) != list(self.channel_names) or tuple(other.shape) != tuple(self.shape):
            raise InputError(
                f"expected blocks of a {self.shape} image with channels {self.channel_names}, "
                f"found {other.shape} with {other.channel_names}"
            )
        if other.minmax != self.minmax:
            raise InputError(f"expected blocks with minmax={self.minmax}, found minmax={other.minmax}")
        self._pending = getattr(self, "_pending", []) + [other] + getattr(other, "_pending", [])
        other._pending = []
        return self

    def consolidate(self) -> "Accumulator":
        """Combine the pending blocks into the totals (exact: sums add, extremes and hulls combine)."""
        parts = [p for p in [self] + getattr(self, "_pending", []) if len(p.labels)]
        self._pending = []
        if len(parts) <= 1:
            if parts and parts[0] is not self:
                self.__dict__.update({k: v for k, v in parts[0].__dict__.items()})
            return self
        labels = np.unique(np.concatenate([p.labels for p in parts]))
        new = Accumulator(self.channel_names, self.shape, self.minmax)
        new._alloc(len(labels))
        new.labels = labels
        new.has_membrane = any(p.has_membrane for p in parts)
        hull_lab, hull_v = [], []
        for p in parts:
            ix = np.searchsorted(labels, p.labels)  # unique within a part: fancy += is exact
            new.count[:, ix] += p.count
            new.sum[:, ix] += p.sum
            new.sumsq[:, ix] += p.sumsq
            if self.minmax:
                new.min[:, ix] = np.minimum(new.min[:, ix], p.min)
                new.max[:, ix] = np.maximum(new.max[:, ix], p.max)
            new.geo[ix] += p.geo
            new.perimeter[ix] += p.perimeter
            new.bbox[ix, 0::2] = np.minimum(new.bbox[ix, 0::2], p.bbox[:, 0::2])
            new.bbox[ix, 1::2] = np.maximum(new.bbox[ix, 1::2], p.bbox[:, 1::2])
            hull_lab.append(np.repeat(ix, np.diff(p.hull_start)))
            hull_v.append(p.hull_vertices)
        # the hull of a union is the hull of the parts' hull vertices
        lab = np.concatenate(hull_lab).astype(np.int64)
        verts = np.concatenate(hull_v)
        order = np.argsort(lab, kind="stable")
        new.hull_start, new.hull_vertices = hulls(
            lab[order], np.ascontiguousarray(verts[order, 0]), np.ascontiguousarray(verts[order, 1]), len(labels)
        )
        self.__dict__.update(new.__dict__)
        self._pending = []
        return self


def _context(arr, y0, y1, x0, x1, halo=2):
    """``arr[y0-halo:y1+halo, x0-halo:x1+halo]`` clipped to the array, and the (top, left) halo kept."""
    H, W = arr.shape
    a0 = max(0, y0 - halo)
    b0 = max(0, x0 - halo)
    out = np.ascontiguousarray(arr[a0:min(H, y1 + halo), b0:min(W, x1 + halo)])  # one compiled layout
    return out, y0 - a0, x0 - b0


def accumulate_block(acc: Accumulator, block, cells, nuclei=None, membrane=None, *, origin=(0, 0)) -> Accumulator:
    """Add one image block to ``acc`` (label-indexed sums, one pass over the block).

    Parameters
    ----------
    acc : Accumulator
        Made with ``Accumulator(channel_names, shape=(H, W), minmax=...)``; updated in place.
    block : ndarray, shape (C, h, w)
        The block's pixels (any real dtype; sums are taken in float64).
    cells, nuclei, membrane : array-like, shape (H, W)
        The WHOLE image's label images (numpy, memory-mapped or zarr arrays: only
        the block and a 2-pixel border around it are read). ``nuclei`` and
        ``membrane`` are optional; a cell's cytoplasm is its pixels outside any nucleus.
    origin : (int, int)
        Row and column of the block's first pixel in the whole image.

    Returns
    -------
    Accumulator
        ``acc``, for chaining.
    """
    block = np.asarray(block)
    if block.ndim == 2:
        block = block[None]
    if block.ndim != 3 or block.shape[0] != len(acc.channel_names):
        raise InputError(
            f"expected a C×h×w block with C={len(acc.channel_names)}, found shape {block.shape}"
        )
    if not np.issubdtype(block.dtype, np.number) or np.iscomplexobj(block):
        raise InputError(f"expected a real-valued image block, found dtype {block.dtype}")
    H, W = acc.shape
    y0, x0 = int(origin[0]), int(origin[1])
    h, w = block.shape[1:]
    if y0 < 0 or x0 < 0 or y0 + h > H or x0 + w > W:
        raise InputError(f"expected a block inside the {H}×{W} image, found origin {origin} and size {h}×{w}")
    cl, hy, hx = _context(cells, y0, y0 + h, x0, x0 + w)
    core = (slice(hy, hy + h), slice(hx, hx + w))
    nu = _context(nuclei, y0, y0 + h, x0, x0 + w)[0] if nuclei is not None else None
    me = _context(membrane, y0, y0 + h, x0, x0 + w)[0] if membrane is not None else None
    cl = as_labels(cl, "cells")
    nu = as_labels(nu, "nuclei") if nu is not None else None
    me = as_labels(me, "membrane") if me is not None else None
    common = np.result_type(*[a.dtype for a in (cl, nu, me) if a is not None])
    if common.kind != "u":  # e.g. uint64 with a smaller type: numpy promotes to float
        common = np.dtype(np.uint64)
    cl, nu, me = (None if a is None else a.astype(common, copy=False) for a in (cl, nu, me))

    # dense indices for the labels of this block
    nu_core = nu[core] if nu is not None else None
    me_core = me[core] if me is not None else None
    maxlab = int(cl[core].max(initial=0))
    for a in (nu_core, me_core):
        if a is not None:
            maxlab = max(maxlab, int(a.max(initial=0)))
    C = len(acc.channel_names)
    direct = (maxlab + 1) * (12 * C + 12) * 8 <= _DIRECT_BYTES
    if direct:  # accumulate by label ID itself, drop the absent IDs afterwards
        labels = np.arange(1, maxlab + 1, dtype=np.uint64)
        lut = np.arange(-1, maxlab, dtype=np.int64)
    elif maxlab < max(1 << 22, 4 * h * w):
        flags = np.zeros(maxlab + 1, np.uint8)
        for a in (cl[core], nu_core, me_core):
            if a is not None:
                mark_present(a, flags)
        flags[0] = 0
        labels = np.flatnonzero(flags).astype(np.uint64)
        lut = np.full(maxlab + 1, -1, np.int64)
        lut[labels.astype(np.int64)] = np.arange(len(labels))
    else:  # huge, sparse IDs: relabel the block densely first
        # (the halo's labels too, so that neighbour comparisons stay exact)
        parts = [cl, nu, me]
        labels = np.unique(np.concatenate([np.unique(p) for p in parts if p is not None]))
        labels = labels[labels != 0].astype(np.uint64)
        cl = _dense(cl, labels)
        nu = _dense(nu, labels) if nu is not None else None
        me = _dense(me, labels) if me is not None else None
        lut = np.concatenate([[-1], np.arange(len(labels))]).astype(np.int64)

    part = Accumulator(acc.channel_names, acc.shape, acc.minmax)
    part._alloc(len(labels), slots=6)
    part.labels = labels
    part.has_membrane = me is not None
    dummy = np.zeros((1, 1), common)
    labs = (block, cl, nu if nu is not None else dummy, me if me is not None else dummy,
            nu is not None, me is not None, lut, hy, hx)
    accumulate(*labs, part.count, part.sum, part.sumsq)
    if acc.minmax:
        minmax(*labs, part.min, part.max)
    _derive_cells(part.count, part.sum, part.sumsq)
    part.count, part.sum, part.sumsq = part.count[:4].copy(), part.sum[:4].copy(), part.sumsq[:4].copy()
    runs = shape_sums(cl, lut, hy, hx, h, w, y0, x0, H, W, part.geo, part.bbox, part.perimeter, _PERIM_W)
    part.hull_start, part.hull_vertices = hulls_from_runs(runs, len(labels))
    del runs
    if direct:
        _keep(part, np.flatnonzero((part.count > 0).any(axis=0)))
    return acc.merge(part)


def _keep(part: Accumulator, rows) -> None:
    """Keep only ``rows`` of a block's accumulator (labels without any pixel have no hull vertices)."""
    part.labels = part.labels[rows]
    part.count = part.count[:, rows]
    part.sum = part.sum[:, rows]
    part.sumsq = part.sumsq[:, rows]
    if part.minmax:
        part.min = part.min[:, rows]
        part.max = part.max[:, rows]
    part.geo = part.geo[rows]
    part.bbox = part.bbox[rows]
    part.perimeter = part.perimeter[rows]
    part.hull_start = np.append(part.hull_start[rows], part.hull_start[-1])


def _dense(a, labels):
    idx = np.searchsorted(labels, a.astype(np.uint64))
    out = (idx + 1).astype(np.uint32)
    out[a == 0] = 0
    return out


def as_labels(a, what):
    a = np.asarray(a)
    if a.ndim != 2:
        raise SegmentationError(f"expected a Y×X {what} label image, found shape {a.shape}")
    if a.dtype.kind == "b":
        return a.astype(np.uint8)
    if a.dtype.kind == "i":
        if a.size and a.min() < 0:
            raise SegmentationError(f"expected non-negative {what} labels, found {a.min()}")
        return a.astype(np.uint64 if a.dtype.itemsize > 4 else np.uint32, copy=False)
    if a.dtype.kind != "u":
        raise SegmentationError(f"expected an integer {what} label image, found dtype {a.dtype}")
    return a


# --------------------------------------------------------------------------- finalize
def stat_name(q: float) -> str:
    pct = 100.0 * float(q)
    return f"q{pct:g}".replace(".", "_")


def finalize(acc: Accumulator, *, stats=DEFAULT_STATS, compartments=COMPARTMENTS, pixel_size_um=None,
             cell_ids=None, names=None) -> pd.DataFrame:
    """Turn accumulated sums into the per-cell table (index ``CellID``).

    Columns: ``<name>_<compartment>_<stat>`` for each channel, compartment and
    additive statistic (``mean``, ``std`` (population, as scipy.ndimage), ``var``,
    ``sum``, ``count``, ``min``, ``max``), then :data:`MORPHOLOGY_COLUMNS`.
    Rows are the labels of ``cells`` (or ``cell_ids`` when given), ascending.
    """
    acc.consolidate()
    names = list(names or acc.channel_names)
    bad = [s for s in stats if s not in ADDITIVE_STATS]
    if bad:
        raise InputError(f"expected statistics from {sorted(ADDITIVE_STATS)} when combining blocks, found {bad}")
    if ("min" in stats or "max" in stats) and not acc.minmax:
        raise InputError("expected an Accumulator made with minmax=True for 'min'/'max', found minmax=False")
    comp_idx = []
    for comp in compartments:
        if comp not in COMPARTMENTS:
            raise SegmentationError(f"expected compartments from {COMPARTMENTS}, found {comp!r}")
        comp_idx.append(COMPARTMENTS.index(comp))
    cell_count = acc.count[CELL]
    if cell_ids is None:
        rows = np.flatnonzero(cell_count > 0)
    else:
        want = np.asarray(cell_ids, np.uint64)
        rows = np.minimum(np.searchsorted(acc.labels, want), max(len(acc.labels) - 1, 0))
        missing = want[(len(acc.labels) == 0) | (acc.labels[rows] != want)] if len(want) else want
        if len(missing):
            raise SegmentationError(f"expected cell IDs present in the label images, found absent IDs {missing[:5].tolist()}")
    ids = acc.labels[rows]
    cols: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for comp, k in zip(compartments, comp_idx):
            n = acc.count[k, rows].astype(np.float64)[:, None]
            s = acc.sum[k, rows]
            mean = np.where(n > 0, s / n, np.nan)
            var = None
            if "std" in stats or "var" in stats:
                var = np.where(n > 0, acc.sumsq[k, rows] / n - mean * mean, np.nan)
                var = np.maximum(var, 0.0)
            for ci, name in enumerate(names):
                for st in stats:
                    col = f"{name}_{comp}_{st}"
                    if st == "mean":
                        cols[col] = mean[:, ci]
                    elif st == "sum":
                        cols[col] = s[:, ci].copy()
                    elif st == "std":
                        cols[col] = np.sqrt(var[:, ci])
                    elif st == "var":
                        cols[col] = var[:, ci]
                    elif st == "count":
                        cols[col] = n[:, 0].copy()
                    elif st == "min":
                        cols[col] = np.where(n[:, 0] > 0, acc.min[k, rows, ci], np.nan)
                    elif st == "max":
                        cols[col] = np.where(n[:, 0] > 0, acc.max[k, rows, ci], np.nan)
    out = pd.DataFrame(cols, index=pd.Index(ids.astype(np.int64), name="CellID"))
    morph = _morphology_from_acc(acc, rows, pixel_size_um)
    morph.index = out.index
    return pd.concat([out, morph], axis=1)


def _morphology_from_acc(acc: Accumulator, rows, pixel_size_um) -> pd.DataFrame:
    area = acc.count[CELL, rows].astype(np.float64)
    g = acc.geo[rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        cr = g[:, 0] / area
        cc = g[:, 1] / area
        mu_rr = g[:, 2] / area - cr * cr
        mu_cc = g[:, 3] / area - cc * cc
        mu_rc = g[:, 4] / area - cr * cc
        # skimage inertia tensor [[a, b], [b, c]] = [[mu_cc, -mu_rc], [-mu_rc, mu_rr]] / area
        a = mu_cc
        b = -mu_rc
        c = mu_rr
        half = np.sqrt(((a - c) / 2.0) ** 2 + b * b)
        l1 = np.maximum((a + c) / 2.0 + half, 0.0)
        l2 = np.maximum((a + c) / 2.0 - half, 0.0)
        major = 4.0 * np.sqrt(l1)
        minor = 4.0 * np.sqrt(l2)
        ecc = np.where(l1 > 0, np.sqrt(np.clip(1.0 - l2 / l1, 0.0, 1.0)), 0.0)
        orient = np.where(
            a - c == 0, np.where(b < 0, np.pi / 4.0, -np.pi / 4.0), 0.5 * np.arctan2(-2.0 * b, c - a)
        )
        bb = acc.bbox[rows]
        bbox_area = (bb[:, 1] - bb[:, 0] + 1) * (bb[:, 3] - bb[:, 2] + 1)
        extent = area / bbox_area
        conv = hull_pixel_counts(acc.hull_start, acc.hull_vertices)[rows]
        solidity = area / conv
        nuc_area = acc.count[NUC, rows].astype(np.float64)
        ratio = nuc_area / area
    px = float(pixel_size_um) if pixel_size_um else np.nan
    return pd.DataFrame(
        {
            "X_centroid": cc,
            "Y_centroid": cr,
            "Area": area,
            "MajorAxisLength": major,
            "MinorAxisLength": minor,
            "Eccentricity": ecc,
            "Solidity": solidity,
            "Extent": extent,
            "Orientation": orient,
            "Perimeter": acc.perimeter[rows].copy(),
            "NucleusArea": nuc_area,
            "NucleusCellAreaRatio": ratio,
            "X_centroid_um": cc * px,
            "Y_centroid_um": cr * px,
        }
    )


def morphology(cells, nuclei=None, *, pixel_size_um=None) -> pd.DataFrame:
    """MCQuant morphology (+ perimeter, nucleus/cell area ratio, µm centroids) of a label image.

    Equal to ``skimage.measure.regionprops`` (area, centroid, axis lengths,
    eccentricity, solidity, extent, orientation, perimeter) but one compiled pass.
    """
    cells = as_labels(cells, "cells")
    acc = Accumulator([], cells.shape)
    accumulate_block(acc, np.zeros((0,) + cells.shape, np.float32), cells, nuclei)
    return finalize(acc, stats=(), compartments=(), pixel_size_um=pixel_size_um)
