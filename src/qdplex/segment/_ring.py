"""Compiled (numba) kernel of the membrane ring (:func:`qdplex.segment.membrane_ring`).

One pass over the rows with a rolling buffer of ``2r+1`` rows of horizontal
distances, so memory is a few rows beyond the input and output.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, inline="always")
def _is_edge(lab, y, x, H, W):  # pragma: no cover - compiled
    v = lab[y, x]
    if v == 0:
        return False
    return ((y > 0 and lab[y - 1, x] != v) or (y < H - 1 and lab[y + 1, x] != v)
            or (x > 0 and lab[y, x - 1] != v) or (x < W - 1 and lab[y, x + 1] != v))


@numba.njit(cache=True, nogil=True)
def _row_distance(lab, y, W, cap, out):  # pragma: no cover - compiled
    """Column distance from each pixel of row ``y`` to the nearest edge pixel of that row (≤ cap)."""
    d = cap
    for x in range(W):
        if _is_edge(lab, y, x, lab.shape[0], W):
            d = 0
        elif d < cap:
            d += 1
        out[x] = d
    d = cap
    for x in range(W - 1, -1, -1):
        if out[x] == 0:
            d = 0
        elif d < cap:
            d += 1
        if d < out[x]:
            out[x] = d


@numba.njit(cache=True, nogil=True)
def ring(lab, width):  # pragma: no cover - compiled
    """Cell pixels whose Euclidean distance to the nearest edge pixel is < ``width``, labelled.

    An edge pixel is a labelled pixel with a 4-neighbour of another value inside the
    image. The distance test is ``sqrt(dy² + dx²) < width`` in float64, as
    ``scipy.ndimage.distance_transform_edt(~edge) < width``.
    """
    H, W = lab.shape
    out = np.zeros((H, W), np.uint32)
    r = 0  # rows that can hold an edge pixel nearer than width: |dy| ≤ r
    while np.float64(r + 1) < width:
        r += 1
    cap = r + 1  # horizontal distances are only needed up to r (≥ cap never counts)
    n = 2 * r + 1
    buf = np.empty((n, W), np.int64)
    for yy in range(min(r, H)):  # rows 0..r-1 (row y+r is filled at y)
        _row_distance(lab, yy, W, cap, buf[yy % n])
    for y in range(H):
        if y + r < H:
            _row_distance(lab, y + r, W, cap, buf[(y + r) % n])
        a = max(0, y - r)
        b = min(H - 1, y + r)
        for x in range(W):
            v = lab[y, x]
            if v == 0:
                continue
            hit = False
            for yy in range(a, b + 1):
                h = buf[yy % n, x]
                if h >= cap:
                    continue
                dy = yy - y
                if np.sqrt(np.float64(dy * dy + h * h)) < width:
                    hit = True
                    break
            if hit:
                out[y, x] = v
    return out


def ring_by_edt(cells, width):
    """The ring by its definition, with ``scipy.ndimage.distance_transform_edt`` (numpy).

    This was :func:`qdplex.segment.membrane_ring` before the compiled :func:`ring`; it
    stays as the reference the tests compare :func:`ring` with (bit for bit) and the
    baseline ``benchmarks/bench_quantify.py`` times it against.
    """
    from scipy import ndimage as ndi

    lab = np.asarray(cells).astype(np.uint32, copy=False)
    edge = np.zeros(lab.shape, bool)
    dy = lab[1:, :] != lab[:-1, :]
    dx = lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge &= lab > 0
    if not edge.any():
        return np.zeros(lab.shape, np.uint32)
    ring_ = edge if width <= 1 else (ndi.distance_transform_edt(~edge) < width) & (lab > 0)
    return np.where(ring_, lab, 0).astype(np.uint32)
