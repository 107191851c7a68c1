"""Compiled (numba) kernels of the per-cell quantification.

Each is one pass over a block's pixels or over per-label arrays; the block
kernels release the GIL so that blocks can run in threads. They are compiled on
first use and cached on disk (``cache=True``; numba keys the cache on this file
alone, so editing the wrappers in :mod:`qdplex.quantify` recompiles nothing).
The wrappers are :mod:`qdplex.quantify.accumulate` (sums, shape, hulls) and
:mod:`qdplex.quantify.order` (median and quantiles).
"""

from __future__ import annotations

import numba
import numpy as np

from .._numba import announce_compilation

announce_compilation()  # one line on stderr when a first run compiles qdplex's kernels

# compartment slots of the accumulator arrays (fixed order = model.COMPARTMENTS),
# and two more while a block is accumulated (see accumulate)
NUC, CYT, MEM, CELL, NOUT, CX = range(6)


@numba.njit(cache=True, nogil=True)
def mark_present(a, flags):
    for y in range(a.shape[0]):
        for x in range(a.shape[1]):
            v = a[y, x]
            if v != 0:
                flags[v] = 1


@numba.njit(cache=True, nogil=True)
def accumulate(img, cells, nuclei, membrane, has_nuc, has_mem, lut, hy, hx, cnt, s1, s2):
    """Add the intensities of one C×h×w block to the per-label sums (one pass).

    Each pixel is added once to its nucleus (when in one) or else to its cell's
    cytoplasm, and once more to its membrane ring; the cell totals are derived
    afterwards (``accumulate._derive_cells``). Two rare cases keep this exact for any
    label images: nucleus pixels outside their own cell go to slot ``NOUT`` (to be
    subtracted from that cell) and cell pixels inside another object's nucleus to
    slot ``CX`` (to be added). ``cells``/``nuclei``/``membrane`` carry ``hy``/``hx``
    rows/columns of context before the block. Minima and maxima are :func:`minmax`'s.
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
    m1 = s1[MEM]
    m2 = s2[MEM]
    rs = np.empty(w, dtype=np.int64)  # the row's runs: first, end, accumulator row
    re = np.empty(w, dtype=np.int64)
    rp = np.empty(w, dtype=np.int64)
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
                p = NUC * nl + r
                cnt[NUC, r] += 1
            elif ic >= 0:
                p = CYT * nl + ic
                cnt[CYT, ic] += 1
            else:
                p = -1
            prim[x] = p
            im = lut[m] if m != 0 else -1
            memb[x] = im
            if im >= 0:
                cnt[MEM, im] += 1
                any_mem = True
            if n != 0 and c != n:
                inn = lut[n]
                oddn[x] = inn
                oddc[x] = ic
                cnt[NOUT, inn] += 1
                if ic >= 0:
                    cnt[CX, ic] += 1
                any_odd = True
            else:
                oddn[x] = -1
                oddc[x] = -1
        # runs of one label, then every channel of a run at once: the C sums are
        # independent chains (each still adds its run's pixels in order, left to right)
        _add_runs(img, y, prim, w, f1, f2, rs, re, rp)
        if any_mem:
            _add_runs(img, y, memb, w, m1, m2, rs, re, rp)
        if any_odd:
            for k in range(C):
                for x in range(w):
                    inn = oddn[x]
                    if inn < 0:
                        continue
                    v = np.float64(img[k, y, x])
                    s1[NOUT, inn, k] += v
                    s2[NOUT, inn, k] += v * v
                    ic = oddc[x]
                    if ic >= 0:
                        s1[CX, ic, k] += v
                        s2[CX, ic, k] += v * v


@numba.njit(cache=True, nogil=True)
def _add_runs(img, y, slot, w, f1, f2, rs, re, rp):  # pragma: no cover - compiled
    """Add row ``y`` of ``img`` to ``f1``/``f2`` (sum, sum of squares) along the runs of ``slot``
    (accumulator row per pixel, −1 = none), one run at a time, four channels of a pixel together."""
    C = img.shape[0]
    n = 0
    x = 0
    while x < w:
        p = slot[x]
        x0 = x
        x += 1
        while x < w and slot[x] == p:
            x += 1
        if p >= 0:
            rs[n] = x0
            re[n] = x
            rp[n] = p
            n += 1
    k0 = 0
    while k0 + 4 <= C:  # four channels at a time in registers: eight independent chains
        for r in range(n):
            b0 = b1 = b2 = b3 = 0.0
            q0 = q1 = q2 = q3 = 0.0
            for x in range(rs[r], re[r]):
                v0 = np.float64(img[k0, y, x])
                v1 = np.float64(img[k0 + 1, y, x])
                v2 = np.float64(img[k0 + 2, y, x])
                v3 = np.float64(img[k0 + 3, y, x])
                b0 += v0
                q0 += v0 * v0
                b1 += v1
                q1 += v1 * v1
                b2 += v2
                q2 += v2 * v2
                b3 += v3
                q3 += v3 * v3
            p = rp[r]
            f1[p, k0] += b0
            f2[p, k0] += q0
            f1[p, k0 + 1] += b1
            f2[p, k0 + 1] += q1
            f1[p, k0 + 2] += b2
            f2[p, k0 + 2] += q2
            f1[p, k0 + 3] += b3
            f2[p, k0 + 3] += q3
        k0 += 4
    for k in range(k0, C):  # the rest one by one
        for r in range(n):
            b0 = 0.0
            q0 = 0.0
            for x in range(rs[r], re[r]):
                v0 = np.float64(img[k, y, x])
                b0 += v0
                q0 += v0 * v0
            p = rp[r]
            f1[p, k] += b0
            f2[p, k] += q0


@numba.njit(cache=True, nogil=True, inline="always")
def _minmax(mn, mx, slot, row, k, v):
    if v < mn[slot, row, k]:
        mn[slot, row, k] = v
    if v > mx[slot, row, k]:
        mx[slot, row, k] = v



@numba.njit(cache=True, nogil=True)
def minmax(img, cells, nuclei, membrane, has_nuc, has_mem, lut, hy, hx, mn, mx):  # pragma: no cover - compiled
    """Per-compartment minimum and maximum of each channel over one block (a pass of its own,
    compiled only when a table asks for ``min``/``max``); arguments as :func:`accumulate`."""
    C = img.shape[0]
    zero = cells[0, 0] - cells[0, 0]
    for y in range(img.shape[1]):
        ly = y + hy
        for x in range(img.shape[2]):
            lx = x + hx
            c = cells[ly, lx]
            n = nuclei[ly, lx] if has_nuc else zero
            m = membrane[ly, lx] if has_mem else zero
            for k in range(C):
                v = np.float64(img[k, y, x])
                if c != 0:
                    _minmax(mn, mx, CELL, lut[c], k, v)
                    if n == 0:
                        _minmax(mn, mx, CYT, lut[c], k, v)
                if n != 0:
                    _minmax(mn, mx, NUC, lut[n], k, v)
                if m != 0:
                    _minmax(mn, mx, MEM, lut[m], k, v)


@numba.njit(cache=True, nogil=True)
def shape_sums(cells, lut, hy, hx, h, w, y0, x0, H, W, geo, bbox, perim, perim_w):
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
        for t in range(nv):  # element by element: a slice copy compiles a shape-error message (slow)
            grown[t, 0] = verts[t, 0]
            grown[t, 1] = verts[t, 1]
        verts = grown
    for t in range(h):
        verts[nv, 0] = hy[t]
        verts[nv, 1] = hx[t]
        nv += 1
    return verts, nv


@numba.njit(cache=True)
def hulls_from_runs(runs, n_labels):
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
    nv = start[0]  # 0, typed int64 (a literal 0 would compile _append twice)
    for L in range(n_labels):
        start[L] = nv
        k = first[L + 1] - first[L]
        if k == 0:
            continue
        j = k - k  # 0, typed int64 (a literal 0 would compile _chain twice)
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
def hulls(lab, py, px, n_labels):
    """Convex hull of each label's points; ``lab`` sorted ascending (values < n_labels).

    Returns (start, vertices) as :func:`hulls_from_runs`.
    """
    m = lab.shape[0]
    start = np.zeros(n_labels + 1, dtype=np.int64)
    verts = np.empty((m + 8, 2), dtype=np.float64)
    nv = start[0]  # 0, typed int64 (a literal 0 would compile _append twice)
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
def hull_pixel_counts(start, verts):
    """Pixel centres inside or on each hull (skimage ``area_convex``)."""
    n = start.shape[0] - 1
    out = np.zeros(n, dtype=np.float64)
    eps = 1e-9
    for i in range(n):
        a = start[i]
        b = start[i + 1]
        if b - a < 3:
            continue
        vmin = verts[a, 0]
        vmax = verts[a, 0]
        for e in range(a + 1, b):
            vmin = min(vmin, verts[e, 0])
            vmax = max(vmax, verts[e, 0])
        r0 = np.int64(np.ceil(vmin - eps))
        r1 = np.int64(np.floor(vmax + eps))
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


@numba.njit(cache=True)
def segment_quantiles(vals, starts, ends, qs):
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


@numba.njit(cache=True, nogil=True)
def label_extents_into(block, ids, y0, ext):  # pragma: no cover - compiled
    """Grow ``ext`` (min row, max row, min col, max col per ID in ascending ``ids``) by the
    pixels of one row strip ``block`` whose first row is ``y0`` of the image."""
    n = ids.shape[0]
    last = np.uint64(0)
    pos = -1
    for y in range(block.shape[0]):
        gy = y0 + y
        for x in range(block.shape[1]):
            v = block[y, x]
            if v == 0:
                continue
            if v != last:
                last = v
                lo = 0
                hi = n
                while lo < hi:  # binary search for v in ids
                    mid = (lo + hi) // 2
                    if ids[mid] < v:
                        lo = mid + 1
                    else:
                        hi = mid
                pos = lo if lo < n and ids[lo] == v else -1
            if pos < 0:
                continue
            if gy < ext[pos, 0]:
                ext[pos, 0] = gy
            if gy > ext[pos, 1]:
                ext[pos, 1] = gy
            if x < ext[pos, 2]:
                ext[pos, 2] = x
            if x > ext[pos, 3]:
                ext[pos, 3] = x
