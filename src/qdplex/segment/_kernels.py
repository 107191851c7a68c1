"""Compiled (numba) kernels of the nucleus segmenter.

Each is a single pass over the pixels; they release the GIL so that tiles can
run in threads. Label images are int32/int64 with 0 as background.
"""

from __future__ import annotations

import numba
import numpy as np



@numba.njit(cache=True, nogil=True)
def _flood(levels, labels, n_levels):  # pragma: no cover - compiled
    """Seeded watershed by flooding with a bucket (hierarchical) queue, in place.

    ``levels`` are quantised elevations 0..n_levels-1; ``labels`` hold the seeds
    (> 0), the pixels to flood (0) and the pixels never to enter (−1). A pixel
    takes the label of the neighbour that reaches it first at the lowest level
    (first in, first out within a level), as in Meyer's flooding algorithm.
    """
    H, W = levels.shape
    n = H * W
    out = labels.ravel()
    lev = levels.ravel()
    head = np.full(n_levels, -1, np.int32)
    tail = np.full(n_levels, -1, np.int32)
    nxt = np.empty(n, np.int32)
    for p in range(n):
        if out[p] > 0:
            b = lev[p]
            nxt[p] = -1
            if tail[b] < 0:
                head[b] = p
            else:
                nxt[tail[b]] = p
            tail[b] = p
    for b in range(n_levels):
        p = head[b]
        while p >= 0:
            y = p // W
            x = p - y * W
            lab = out[p]
            for k in range(4):
                if k == 0:
                    if y == 0:
                        continue
                    q = p - W
                elif k == 1:
                    if y == H - 1:
                        continue
                    q = p + W
                elif k == 2:
                    if x == 0:
                        continue
                    q = p - 1
                else:
                    if x == W - 1:
                        continue
                    q = p + 1
                if out[q] != 0:
                    continue
                out[q] = lab
                c = lev[q]
                if c < b:
                    c = b
                nxt[q] = -1
                if tail[c] < 0:
                    head[c] = q
                else:
                    nxt[tail[c]] = q
                tail[c] = q
            p = nxt[p]
            head[b] = p
        tail[b] = -1
    return labels


def flood(elevation, markers, mask, n_levels=4096):
    """Seeded watershed of ``elevation`` from ``markers`` within ``mask`` (compiled, 4-connected).

    Elevations are quantised to ``n_levels`` levels between their minimum and
    maximum inside the mask. Returns int32 labels (0 outside the mask and
    where no seed reaches).
    """
    markers = np.asarray(markers)
    mask = np.asarray(mask, dtype=np.bool_)
    el = np.asarray(elevation, np.float32)
    inside = el[mask]
    if inside.size == 0:
        return np.where(markers > 0, markers, 0).astype(np.int32)
    lo, hi = float(inside.min()), float(inside.max())
    scale = (n_levels - 1) / (hi - lo) if hi > lo else 0.0
    q = el - lo
    q *= scale
    np.clip(q, 0, n_levels - 1, out=q)
    labels = np.where(mask, 0, -1).astype(np.int32)
    np.copyto(labels, markers.astype(np.int32, copy=False), where=markers > 0)
    _flood(q.astype(np.uint16), labels, n_levels)
    labels[labels < 0] = 0
    return labels


@numba.njit(cache=True, nogil=True)
def label_max(labels, values, n):  # pragma: no cover - compiled
    """Maximum of ``values`` over each label 1..n (−inf for absent labels; index 0 unused)."""
    out = np.full(n + 1, -np.inf, np.float64)
    lab = labels.ravel()
    val = values.ravel()
    for i in range(lab.size):
        j = lab[i]
        if j > 0 and val[i] > out[j]:
            out[j] = val[i]
    return out


@numba.njit(cache=True, nogil=True)
def _component_owner(comp, labels, n_comp):  # pragma: no cover - compiled
    """Per connected component: its area and the label it carries (0 = background)."""
    area = np.zeros(n_comp + 1, np.int64)
    owner = np.zeros(n_comp + 1, np.int64)
    c = comp.ravel()
    lab = labels.ravel()
    for i in range(c.size):
        k = c[i]
        if k > 0:
            area[k] += 1
            owner[k] = lab[i]
    return area, owner


@numba.njit(cache=True, nogil=True)
def _hole_owner(holes, labels, n_holes):  # pragma: no cover - compiled
    """For each hole component: the one label around it, or −1 when it borders several."""
    H, W = labels.shape
    owner = np.zeros(n_holes + 1, np.int64)
    for y in range(H):
        for x in range(W):
            h = holes[y, x]
            if h == 0:
                continue
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                yy = y + dy
                xx = x + dx
                if yy < 0 or yy >= H or xx < 0 or xx >= W:
                    continue
                lab = labels[yy, xx]
                if lab > 0:
                    if owner[h] == 0:
                        owner[h] = lab
                    elif owner[h] != lab:
                        owner[h] = -1
    return owner


@numba.njit(cache=True, nogil=True)
def relabel(labels, table):  # pragma: no cover - compiled
    """``table[labels]`` without the temporary arrays of fancy indexing."""
    out = np.empty(labels.shape, np.uint32)
    o = out.ravel()
    lab = labels.ravel()
    for i in range(lab.size):
        o[i] = table[lab[i]]
    return out


@numba.njit(cache=True, nogil=True)
def label_argmax(labels, values, n):  # pragma: no cover - compiled
    """Flat index of the maximum of ``values`` in each label 1..n (−1 when absent)."""
    best = np.full(n + 1, -np.inf, np.float64)
    pos = np.full(n + 1, -1, np.int64)
    lab = labels.ravel()
    val = values.ravel()
    for i in range(lab.size):
        j = lab[i]
        if j > 0 and val[i] > best[j]:
            best[j] = val[i]
            pos[j] = i
    return pos
