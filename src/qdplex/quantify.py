"""Per-cell statistics by label-indexed accumulation.

One pass over each image block adds, for every cell and compartment, the pixel
count and each channel's sum, sum of squares (and, on request, minimum and
maximum) into an :class:`Accumulator`; the same pass adds the cell's raw shape
moments, bounding box, perimeter contributions and the row extents whose convex
hull gives the convex area. Every one of these combines exactly across blocks, so
a whole slide can be quantified tile by tile (:func:`accumulate_block` per tile,
then :func:`finalize`) and gives the same table as one call on the whole image.

Layering: :func:`accumulate_block` / :func:`finalize` (arrays) → :func:`quantify`
(``MultiplexImage`` / ``UnmixResult`` / plain arrays) → tables and scores.

The morphology columns follow MCQuant (which calls
``skimage.measure.regionprops``) and equal regionprops' values: ``Area``,
``MajorAxisLength``, ``MinorAxisLength``, ``Eccentricity``, ``Solidity``,
``Extent``, ``Orientation`` (radians), ``Perimeter`` (regionprops' 4-neighbourhood
estimator), plus ``NucleusArea`` and ``NucleusCellAreaRatio``; centroids
``X_centroid, Y_centroid`` in pixels (column, row) and ``X_centroid_um,
Y_centroid_um`` in µm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import sqrt

import numba
import numpy as np
import pandas as pd

from .errors import InputError, SegmentationError
from .model import COMPARTMENTS, MultiplexImage, Segmentation

__all__ = [
    "quantify",
    "Accumulator",
    "accumulate_block",
    "finalize",
    "morphology",
    "fraction_above",
    "MORPHOLOGY_COLUMNS",
    "QC_COLUMNS",
    "DEFAULT_STATS",
]

DEFAULT_STATS = ("mean", "std", "sum")
_ADDITIVE_STATS = {"mean", "std", "var", "sum", "count", "min", "max"}
_ORDER_STATS = {"median"}

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

# compartment slots in the accumulator arrays (fixed order = model.COMPARTMENTS)
_NUC, _CYT, _MEM, _CELL, _NOUT, _CX = range(6)

# accumulate by label ID directly (no dense relabelling pass) while the arrays stay this small
_DIRECT_BYTES = 64 << 20

_PERIM_W = np.zeros(50, dtype=np.float64)
_PERIM_W[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIM_W[[21, 33]] = sqrt(2.0)
_PERIM_W[[13, 23]] = (1.0 + sqrt(2.0)) / 2.0


# --------------------------------------------------------------------------- kernels
@numba.njit(cache=True, nogil=True)
def _mark_present(a, flags):
    for y in range(a.shape[0]):
        for x in range(a.shape[1]):
            v = a[y, x]
            if v != 0:
                flags[v] = 1


@numba.njit(cache=True, nogil=True)
def _accumulate(img, cells, nuclei, membrane, has_nuc, has_mem, lut, hy, hx, do_minmax, cnt, s1, s2, mn, mx):
    """Add the intensities of one C×h×w block to the per-label sums (one pass).

    Each pixel is added once to its nucleus (when in one) or else to its cell's
    cytoplasm, and once more to its membrane ring; the cell totals are derived
    afterwards (:func:`_derive_cells`). Two rare cases keep this exact for any
    label images: nucleus pixels outside their own cell go to slot ``_NOUT`` (to be
    subtracted from that cell) and cell pixels inside another object's nucleus to
    slot ``_CX`` (to be added). ``cells``/``nuclei``/``membrane`` carry ``hy``/``hx``
    rows/columns of context before the block.
    """
    C = img.shape[0]
    h = img.shape[1]
    w = img.shape[2]
    nl = s1.shape[1]
    f1 = s1.reshape((s1.shape[0] * nl, C))  # flat (slot * nl + row, channel) views
    f2 = s2.reshape((s2.shape[0] * nl, C))
    zero = cells[0, 0] - cells[0, 0]  # a 0 of the labels' type (keeps numba's typing unsigned)
    prim = np.empty(w, dtype=np.int64)  # slot * nl + row of the pixel's nucleus / cytoplasm, or -1
    memb = np.empty(w, dtype=np.int64)  # membrane row, or -1
    oddn = np.empty(w, dtype=np.int64)  # nucleus row of a nucleus pixel outside its own cell, or -1
    oddc = np.empty(w, dtype=np.int64)  # cell row of that pixel, or -1
    for y in range(h):
        ly = y + hy
        any_mem = False
        any_odd = False
        # decode this row's labels once (and count pixels)
        for x in range(w):
            lx = x + hx
            c = cells[ly, lx]
            n = nuclei[ly, lx] if has_nuc else zero
            m = membrane[ly, lx] if has_mem else zero
            ic = lut[c] if c != 0 else -1
            if n != 0:
                r = lut[n]
                p = _NUC * nl + r
                cnt[_NUC, r] += 1
            elif ic >= 0:
                p = _CYT * nl + ic
                cnt[_CYT, ic] += 1
            else:
                p = -1
            prim[x] = p
            im = lut[m] if m != 0 else -1
            memb[x] = im
            if im >= 0:
                cnt[_MEM, im] += 1
                any_mem = True
            if n != 0 and c != n:
                inn = lut[n]
                oddn[x] = inn
                oddc[x] = ic
                cnt[_NOUT, inn] += 1
                if ic >= 0:
                    cnt[_CX, ic] += 1
                any_odd = True
            else:
                oddn[x] = -1
                oddc[x] = -1
        # per channel: contiguous reads, sums kept in registers along each run of one label
        for k in range(C):
            cur = -1
            a1 = 0.0
            a2 = 0.0
            for x in range(w):
                p = prim[x]
                if p != cur:
                    if cur >= 0:
                        f1[cur, k] += a1
                        f2[cur, k] += a2
                    cur = p
                    a1 = 0.0
                    a2 = 0.0
                if p >= 0:
                    v = np.float64(img[k, y, x])
                    a1 += v
                    a2 += v * v
            if cur >= 0:
                f1[cur, k] += a1
                f2[cur, k] += a2
            if any_mem:
                cur = -1
                a1 = 0.0
                a2 = 0.0
                for x in range(w):
                    p = memb[x]
                    if p != cur:
                        if cur >= 0:
                            s1[_MEM, cur, k] += a1
                            s2[_MEM, cur, k] += a2
                        cur = p
                        a1 = 0.0
                        a2 = 0.0
                    if p >= 0:
                        v = np.float64(img[k, y, x])
                        a1 += v
                        a2 += v * v
                if cur >= 0:
                    s1[_MEM, cur, k] += a1
                    s2[_MEM, cur, k] += a2
            if any_odd:
                for x in range(w):
                    inn = oddn[x]
                    if inn < 0:
                        continue
                    v = np.float64(img[k, y, x])
                    s1[_NOUT, inn, k] += v
                    s2[_NOUT, inn, k] += v * v
                    ic = oddc[x]
                    if ic >= 0:
                        s1[_CX, ic, k] += v
                        s2[_CX, ic, k] += v * v
            if do_minmax:
                for x in range(w):
                    lx = x + hx
                    c = cells[ly, lx]
                    n = nuclei[ly, lx] if has_nuc else zero
                    v = np.float64(img[k, y, x])
                    if c != 0:
                        _minmax(mn, mx, _CELL, lut[c], k, v)
                        if n == 0:
                            _minmax(mn, mx, _CYT, lut[c], k, v)
                    if n != 0:
                        _minmax(mn, mx, _NUC, lut[n], k, v)
                    if memb[x] >= 0:
                        _minmax(mn, mx, _MEM, memb[x], k, v)


@numba.njit(cache=True, nogil=True, inline="always")
def _minmax(mn, mx, slot, row, k, v):
    if v < mn[slot, row, k]:
        mn[slot, row, k] = v
    if v > mx[slot, row, k]:
        mx[slot, row, k] = v


def _derive_cells(count, s1, s2):
    """Cell totals = cytoplasm + nucleus − nucleus-outside-own-cell + cell-inside-other-nucleus."""
    count[_CELL] = count[_CYT] + count[_NUC] - count[_NOUT] + count[_CX]
    for a in (s1, s2):
        a[_CELL] = a[_CYT] + a[_NUC] - a[_NOUT] + a[_CX]


@numba.njit(cache=True, nogil=True)
def _shape(cells, lut, hy, hx, h, w, y0, x0, H, W, geo, bbox, perim, perim_w):
    """Shape sums of the cells in one block from its row runs, plus perimeter contributions.

    Returns the runs (label index, row, first col, last col) for the convex hulls.
    """
    n_runs = 0
    for y in range(h):
        prev = 0
        for x in range(w):
            c = cells[y + hy, x + hx]
            if c != 0 and c != prev:
                n_runs += 1
            prev = c
    runs = np.empty((n_runs, 4), dtype=np.int64)
    i = 0
    for y in range(h):
        ly = y + hy
        gy = y0 + y
        fy = np.float64(gy)
        x = 0
        while x < w:
            c = cells[ly, x + hx]
            if c == 0:
                x += 1
                continue
            xs = x
            while x < w and cells[ly, x + hx] == c:
                # perimeter (skimage.measure.perimeter, 4-neighbourhood, per object)
                lx = x + hx
                if _is_border(cells, ly, lx, c, hy, hx, y0, x0, H, W):
                    gx = x0 + x
                    v = 1
                    for dy in range(-1, 2):
                        for dx in range(-1, 2):
                            if dy == 0 and dx == 0:
                                continue
                            if gy + dy < 0 or gy + dy >= H or gx + dx < 0 or gx + dx >= W:
                                continue
                            qy = ly + dy
                            qx = lx + dx
                            if qy < 0 or qy >= cells.shape[0] or qx < 0 or qx >= cells.shape[1]:
                                continue
                            if cells[qy, qx] != c:
                                continue
                            if _is_border(cells, qy, qx, c, hy, hx, y0, x0, H, W):
                                v += 2 if (dy == 0 or dx == 0) else 10
                    perim[lut[c]] += perim_w[v]
                x += 1
            ic = lut[c]
            a = np.float64(x0 + xs)
            b = np.float64(x0 + x - 1)
            L = b - a + 1.0
            sx = L * (a + b) / 2.0
            sxx = (b * (b + 1.0) * (2.0 * b + 1.0) - (a - 1.0) * a * (2.0 * a - 1.0)) / 6.0
            geo[ic, 0] += L * fy
            geo[ic, 1] += sx
            geo[ic, 2] += L * fy * fy
            geo[ic, 3] += sxx
            geo[ic, 4] += fy * sx
            if gy < bbox[ic, 0]:
                bbox[ic, 0] = gy
            if gy > bbox[ic, 1]:
                bbox[ic, 1] = gy
            if x0 + xs < bbox[ic, 2]:
                bbox[ic, 2] = x0 + xs
            if x0 + x - 1 > bbox[ic, 3]:
                bbox[ic, 3] = x0 + x - 1
            runs[i, 0] = ic
            runs[i, 1] = gy
            runs[i, 2] = x0 + xs
            runs[i, 3] = x0 + x - 1
            i += 1
    return runs


@numba.njit(cache=True, nogil=True, inline="always")
def _is_border(cells, ly, lx, c, hy, hx, y0, x0, H, W):
    gy = y0 + ly - hy
    gx = x0 + lx - hx
    lh = cells.shape[0]
    lw = cells.shape[1]
    if gy == 0 or gy == H - 1 or gx == 0 or gx == W - 1:
        return True
    # outside the label context is treated as "not this cell" (callers give ≥ 2 px context)
    if ly == 0 or ly == lh - 1 or lx == 0 or lx == lw - 1:
        return True
    return (cells[ly - 1, lx] != c or cells[ly + 1, lx] != c or cells[ly, lx - 1] != c or cells[ly, lx + 1] != c)


@numba.njit(cache=True)
def _cross(ox, oy, ax, ay, bx, by):
    return (ax - ox) * (by - oy) - (ay - oy) * (bx - ox)


@numba.njit(cache=True)
def _chain(qy, qx, k, key, order, hy, hx):
    """Convex hull (Andrew's monotone chain) of the first ``k`` points, whose
    coordinates are multiples of 0.5, into the buffers ``hy``/``hx`` (≥ 2k+1 long).

    Points are ordered by (row, column) with an insertion sort: points made run by
    run, row after row, arrive almost in order. Returns the number of vertices
    (no duplicate or collinear points).
    """
    ymin = qy[0]
    xmin = qx[0]
    xmax = qx[0]
    for t in range(k):
        ymin = min(ymin, qy[t])
        xmin = min(xmin, qx[t])
        xmax = max(xmax, qx[t])
    span = np.int64(2 * (xmax - xmin) + 0.5) + 1
    for t in range(k):
        kv = np.int64(2 * (qy[t] - ymin) + 0.5) * span + np.int64(2 * (qx[t] - xmin) + 0.5)
        j = t - 1
        while j >= 0 and key[j] > kv:
            key[j + 1] = key[j]
            order[j + 1] = order[j]
            j -= 1
        key[j + 1] = kv
        order[j + 1] = t
    h = 0
    for t in range(k):  # one chain
        if t > 0 and key[t] == key[t - 1]:
            continue
        o = order[t]
        while h >= 2 and _cross(hx[h - 2], hy[h - 2], hx[h - 1], hy[h - 1], qx[o], qy[o]) <= 0:
            h -= 1
        hx[h] = qx[o]
        hy[h] = qy[o]
        h += 1
    lower = h + 1
    for t in range(k - 1, -1, -1):  # the other chain
        if t < k - 1 and key[t] == key[t + 1]:
            continue
        o = order[t]
        while h >= lower and _cross(hx[h - 2], hy[h - 2], hx[h - 1], hy[h - 1], qx[o], qy[o]) <= 0:
            h -= 1
        hx[h] = qx[o]
        hy[h] = qy[o]
        h += 1
    if h > 1:
        h -= 1  # the last point repeats the first
    return h


@numba.njit(cache=True)
def _append(verts, nv, hy, hx, h):
    if nv + h > verts.shape[0]:
        grown = np.empty((2 * (nv + h), 2), dtype=np.float64)
        grown[:nv] = verts[:nv]
        verts = grown
    for t in range(h):
        verts[nv, 0] = hy[t]
        verts[nv, 1] = hx[t]
        nv += 1
    return verts, nv


@numba.njit(cache=True)
def _hulls_from_runs(runs, n_labels):
    """Convex hull of each label's pixels from its row runs (label index, row, c0, c1).

    As skimage.morphology.convex_hull_image, the hull is that of the pixels' edge
    midpoints ("diamond" offsets ±0.5); per run only its two end pixels can matter.
    Returns (start, vertices): label i's vertices (row, col) are
    ``vertices[start[i]:start[i+1]]``, in hull order.
    """
    m = runs.shape[0]
    first = np.zeros(n_labels + 1, dtype=np.int64)  # counting sort of the runs by label
    for r in range(m):
        first[runs[r, 0] + 1] += 1
    for L in range(n_labels):
        first[L + 1] += first[L]
    fill = first[:-1].copy()
    order = np.empty(m, dtype=np.int64)
    for r in range(m):
        L = runs[r, 0]
        order[fill[L]] = r
        fill[L] += 1
    start = np.zeros(n_labels + 1, dtype=np.int64)
    verts = np.empty((16 * n_labels + 8, 2), dtype=np.float64)
    kmax = 1
    for L in range(n_labels):
        kmax = max(kmax, first[L + 1] - first[L])
    qy = np.empty(6 * kmax, dtype=np.float64)
    qx = np.empty(6 * kmax, dtype=np.float64)
    key = np.empty(6 * kmax, dtype=np.int64)
    idx = np.empty(6 * kmax, dtype=np.int64)
    hy = np.empty(12 * kmax + 1, dtype=np.float64)
    hx = np.empty(12 * kmax + 1, dtype=np.float64)
    nv = 0
    for L in range(n_labels):
        start[L] = nv
        k = first[L + 1] - first[L]
        if k == 0:
            continue
        j = 0
        for t in range(first[L], first[L + 1]):
            r = order[t]
            row = np.float64(runs[r, 1])
            for e in range(2):
                c = np.float64(runs[r, 2 + e])
                qy[j] = row - 0.5
                qx[j] = c
                qy[j + 1] = row
                qx[j + 1] = c - 0.5 if e == 0 else c + 0.5
                qy[j + 2] = row + 0.5
                qx[j + 2] = c
                j += 3
        h = _chain(qy, qx, j, key, idx, hy, hx)
        verts, nv = _append(verts, nv, hy, hx, h)
    start[n_labels] = nv
    return start, verts[:nv].copy()


@numba.njit(cache=True)
def _hulls(lab, py, px, n_labels):
    """Convex hull of each label's points; ``lab`` sorted ascending (values < n_labels).

    Returns (start, vertices) as :func:`_hulls_from_runs`.
    """
    m = lab.shape[0]
    start = np.zeros(n_labels + 1, dtype=np.int64)
    verts = np.empty((m + 8, 2), dtype=np.float64)
    nv = 0
    a = 0
    for L in range(n_labels):
        start[L] = nv
        b = a
        while b < m and lab[b] == L:
            b += 1
        if b > a:
            k = b - a
            hy = np.empty(2 * k + 1, dtype=np.float64)
            hx = np.empty(2 * k + 1, dtype=np.float64)
            h = _chain(py[a:b], px[a:b], k, np.empty(k, np.int64), np.empty(k, np.int64), hy, hx)
            verts, nv = _append(verts, nv, hy, hx, h)
        a = b
    start[n_labels] = nv
    return start, verts[:nv].copy()


@numba.njit(cache=True)
def _hull_pixel_counts(start, verts):
    """Pixel centres inside or on each hull (skimage ``area_convex``)."""
    n = start.shape[0] - 1
    out = np.zeros(n, dtype=np.float64)
    eps = 1e-9
    for i in range(n):
        a = start[i]
        b = start[i + 1]
        if b - a < 3:
            continue
        r0 = np.int64(np.ceil(verts[a:b, 0].min() - eps))
        r1 = np.int64(np.floor(verts[a:b, 0].max() + eps))
        total = 0
        for r in range(r0, r1 + 1):
            fr = np.float64(r)
            lo = np.inf
            hi = -np.inf
            for e in range(a, b):
                f = e + 1 if e + 1 < b else a
                ya = verts[e, 0]; xa = verts[e, 1]
                yb = verts[f, 0]; xb = verts[f, 1]
                if (ya - fr) * (yb - fr) > 0:
                    continue
                if ya == yb:
                    xs0 = min(xa, xb)
                    xs1 = max(xa, xb)
                else:
                    t = (fr - ya) / (yb - ya)
                    xs0 = xa + t * (xb - xa)
                    xs1 = xs0
                if xs0 < lo:
                    lo = xs0
                if xs1 > hi:
                    hi = xs1
            if hi >= lo:
                c0 = np.int64(np.ceil(lo - eps))
                c1 = np.int64(np.floor(hi + eps))
                if c1 >= c0:
                    total += c1 - c0 + 1
        out[i] = total
    return out


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
        # 4 compartment slots; a block being accumulated has 2 more (see _accumulate)
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
        new.hull_start, new.hull_vertices = _hulls(
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
    out = np.asarray(arr[a0:min(H, y1 + halo), b0:min(W, x1 + halo)])
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
    cl = _as_labels(cl, "cells")
    nu = _as_labels(nu, "nuclei") if nu is not None else None
    me = _as_labels(me, "membrane") if me is not None else None
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
                _mark_present(a, flags)
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
    mm = (part.min, part.max) if acc.minmax else (np.zeros((4, 1, 1)), np.zeros((4, 1, 1)))
    _accumulate(
        block, cl, nu if nu is not None else dummy, me if me is not None else dummy,
        nu is not None, me is not None, lut, hy, hx, acc.minmax,
        part.count, part.sum, part.sumsq, mm[0], mm[1],
    )
    _derive_cells(part.count, part.sum, part.sumsq)
    part.count, part.sum, part.sumsq = part.count[:4].copy(), part.sum[:4].copy(), part.sumsq[:4].copy()
    runs = _shape(cl, lut, hy, hx, h, w, y0, x0, H, W, part.geo, part.bbox, part.perimeter, _PERIM_W)
    part.hull_start, part.hull_vertices = _hulls_from_runs(runs, len(labels))
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


def _as_labels(a, what):
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
def _stat_name(q: float) -> str:
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
    bad = [s for s in stats if s not in _ADDITIVE_STATS]
    if bad:
        raise InputError(f"expected statistics from {sorted(_ADDITIVE_STATS)} when combining blocks, found {bad}")
    if ("min" in stats or "max" in stats) and not acc.minmax:
        raise InputError("expected an Accumulator made with minmax=True for 'min'/'max', found minmax=False")
    comp_idx = []
    for comp in compartments:
        if comp not in COMPARTMENTS:
            raise SegmentationError(f"expected compartments from {COMPARTMENTS}, found {comp!r}")
        comp_idx.append(COMPARTMENTS.index(comp))
    cell_count = acc.count[_CELL]
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
    area = acc.count[_CELL, rows].astype(np.float64)
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
        conv = _hull_pixel_counts(acc.hull_start, acc.hull_vertices)[rows]
        solidity = area / conv
        nuc_area = acc.count[_NUC, rows].astype(np.float64)
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
    cells = _as_labels(cells, "cells")
    acc = Accumulator([], cells.shape)
    accumulate_block(acc, np.zeros((0,) + cells.shape, np.float32), cells, nuclei)
    return finalize(acc, stats=(), compartments=(), pixel_size_um=pixel_size_um)


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
    labels = _as_labels(np.asarray(labels), "labels")
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


# --------------------------------------------------------------------------- order statistics
def _order_stats(planes, labels, ids, names, comp, stats, quantiles) -> dict:
    """Median and quantiles per label: one stable sort of the labelled pixels, then per channel."""
    lab = np.asarray(labels).ravel()
    sel = np.flatnonzero(lab)
    order = sel[np.argsort(lab[sel], kind="stable")]
    sorted_lab = lab[order]
    bounds = np.searchsorted(sorted_lab, np.asarray(ids, dtype=sorted_lab.dtype), side="left")
    ends = np.searchsorted(sorted_lab, np.asarray(ids, dtype=sorted_lab.dtype), side="right")
    qs = []
    if "median" in stats:
        qs.append(("median", 0.5))
    qs += [(_stat_name(q), float(q)) for q in quantiles]
    out = {}
    for ci, name in enumerate(names):
        vals = np.asarray(planes[ci]).ravel()[order].astype(np.float64)
        res = _segment_quantiles(vals, bounds, ends, np.array([q for _, q in qs], np.float64))
        for j, (qname, _) in enumerate(qs):
            out[f"{name}_{comp}_{qname}"] = res[:, j]
    return out


@numba.njit(cache=True)
def _segment_quantiles(vals, starts, ends, qs):
    out = np.full((starts.shape[0], qs.shape[0]), np.nan)
    for i in range(starts.shape[0]):
        a = starts[i]
        b = ends[i]
        if b <= a:
            continue
        seg = np.sort(vals[a:b])
        n = b - a
        for j in range(qs.shape[0]):
            pos = qs[j] * (n - 1)  # numpy's default "linear" method
            lo = int(np.floor(pos))
            hi = min(lo + 1, n - 1)
            out[i, j] = seg[lo] + (pos - lo) * (seg[hi] - seg[lo])
    return out


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
    unknown = [s for s in stats if s not in _ADDITIVE_STATS | _ORDER_STATS]
    if unknown:
        raise InputError(f"expected statistics from {sorted(_ADDITIVE_STATS | _ORDER_STATS)}, found {unknown}")

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

    additive = tuple(s for s in stats if s in _ADDITIVE_STATS)
    acc = Accumulator(list(names) + extra_names, cells.shape, minmax=("min" in stats or "max" in stats))
    for (y0, y1, x0, x1), block in _blocks(data, extra):
        accumulate_block(acc, block, cells, nuclei, membrane, origin=(y0, x0))

    table = finalize(acc, stats=additive if not steinbock_like else ("mean",), compartments=comps,
                     pixel_size_um=pixel_size_um)
    drop = [c for c in table.columns if c.startswith("__")]
    table = table.drop(columns=drop)

    if "median" in stats or quantiles:
        ids = table.index.to_numpy()
        planes = [np.asarray(data[i]) for i in range(len(names))]  # whole planes: order statistics need them
        extra_cols = {}
        for comp in comps:
            lab = cells if seg is None else seg.compartment(comp)
            extra_cols.update(_order_stats(planes, np.asarray(lab), ids, names, comp, stats, quantiles))
        table = pd.concat([table, pd.DataFrame(extra_cols, index=table.index)], axis=1)
        # order: per plane and compartment, the statistics as requested, then the quantiles
        qnames = [_stat_name(q) for q in quantiles]
        front = [f"{n}_{c}_{st}" for n in names for c in comps for st in list(stats) + qnames]
        front = [f for f in front if f in table.columns]
        table = table[front + [c for c in table.columns if c not in front]]

    if residual is not None or saturated is not None:
        table = _add_qc(table, acc, names, extra_names)

    if steinbock_like:
        table = table[[f"{n}_cell_mean" for n in names]]
        table.columns = names
    return table


def _add_qc(table, acc, names, extra_names) -> pd.DataFrame:
    rows = np.searchsorted(acc.labels, table.index.to_numpy().astype(np.uint64))
    n = acc.count[_CELL, rows].astype(np.float64)
    all_names = list(names) + extra_names
    qc = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        if "__residual" in extra_names:
            k = all_names.index("__residual")
            qc["residual_mean"] = acc.sum[_CELL, rows, k] / n
        af = [i for i, nm in enumerate(names) if _is_af(nm)]
        abund = [i for i, nm in enumerate(names) if nm != "residual"]
        if af:
            tot = acc.sum[_CELL][np.ix_(rows, abund)].sum(axis=1)
            afs = acc.sum[_CELL][np.ix_(rows, af)].sum(axis=1)
            qc["af_fraction"] = np.where(tot > 0, afs / tot, np.nan)
        else:
            qc["af_fraction"] = np.full(len(rows), np.nan)
        if "__saturated" in extra_names:
            k = all_names.index("__saturated")
            qc["saturated_fraction"] = acc.sum[_CELL, rows, k] / n
    return pd.concat([table, pd.DataFrame(qc, index=table.index)], axis=1)


def _is_af(name: str) -> bool:
    return name == "AF" or (name.startswith("AF") and name[2:].isdigit())


def _blocks(data, extra):
    """Yield ((y0, y1, x0, x1), C×h×w numpy block) along the image's spatial chunks.

    The extra Y×X planes (unmixing residual, saturation) are appended as channels;
    lazy pieces of one block are computed together, so a shared dask graph (the
    unmixing that yields abundances, residual and saturation) runs once per block.
    """
    import dask
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
            y0, y1, x0, x1 = ys[i], ys[i + 1], xs[j], xs[j + 1]
            parts = [data[:, y0:y1, x0:x1]] + [e[y0:y1, x0:x1] for e in extra]
            if any(isinstance(p, da.Array) for p in parts):
                parts = list(dask.compute(*parts))
            block = np.asarray(parts[0])
            if extra:
                dt = block.dtype if block.dtype.kind == "f" else np.dtype(np.float32)
                block = np.concatenate([block.astype(dt, copy=False)] + [np.asarray(p, dtype=dt)[None] for p in parts[1:]])
            yield (y0, y1, x0, x1), block
