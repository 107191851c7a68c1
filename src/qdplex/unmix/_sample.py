"""A small, spread-out sample of a slide's pixels for the on-slide estimates of
:func:`qdplex.unmix.unmix` (dark level, refined spectra, fit warnings).

The sample is a grid of up to 4×4 square tiles (32 px a side) spread evenly over the
image: contiguous pixels, so that a noise level can be read from neighbouring pixels
and totals can be smoothed before the darkest pixels are picked, and few enough
(≤ 16 384: the refinement takes every other one, the fit check a quarter of the others) that
estimating costs a fraction of unmixing the slide. (64 px tiles, four times the pixels,
gave the same accuracy on ``bench_accuracy``'s slides and four others — within ±0.03
of the error ratios — for ~7 ms more at 768².) For an image on disk only those tiles
are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PixelSample", "pixel_sample"]


@dataclass
class PixelSample:
    """Pixels of a slide: ``Y`` C×N raw values (float32) of the usable pixels, their
    ``smooth_total`` (3×3 box mean of the channel sum, within the tile), and per channel
    the ``noise_var``: the mean square second difference of horizontally neighbouring raw
    values (on every other row) over 6 (shot + read noise, plus a little texture), over the same tiles."""

    Y: np.ndarray
    smooth_total: np.ndarray
    noise_var: np.ndarray
    n_tiles: int

    @property
    def n(self) -> int:
        return int(self.Y.shape[1])

    def subset(self, n: int, seed: int) -> np.ndarray:
        """``Y`` of at most ``n`` of the pixels: every ``N // n``-th, starting at ``seed``
        (modulo the stride; so seeds 0 and 1 give disjoint sets), cached."""
        key = (int(n), int(seed))
        cache = self.__dict__.setdefault("_subsets", {})
        if key not in cache:
            Y, N = self.Y, self.Y.shape[1]
            if N > n:
                step = N // n
                Y = Y[:, seed % step::step][:, :n]
            cache[key] = np.ascontiguousarray(Y)
        return cache[key]


def _in_memory_blocks(data) -> dict | None:
    """``{(i, j, k): numpy block}`` when every block of the dask array ``data`` is a numpy
    array held in its graph (an in-memory image, :func:`dask.array.from_array` of an
    ndarray), else None."""
    graph = data.__dask_graph__()
    keys = [k for k in graph if isinstance(k, tuple) and k and k[0] == data.name]
    if len(keys) != int(np.prod(data.numblocks)) or len(graph) != len(keys):
        return None
    out = {}
    for k in keys:
        v = graph[k]
        if type(v) is not np.ndarray:
            return None
        out[tuple(k[1:])] = v
    return out


def _region(blocks: dict, chunks, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """All channels of rows y0:y1, columns x0:x1, assembled from in-memory blocks."""
    from itertools import accumulate

    ey, ex = [0, *accumulate(chunks[1])], [0, *accumulate(chunks[2])]
    rows = []
    for i in range(len(chunks[1])):
        if ey[i + 1] <= y0 or ey[i] >= y1:
            continue
        row = []
        for j in range(len(chunks[2])):
            if ex[j + 1] <= x0 or ex[j] >= x1:
                continue
            sy = slice(max(y0, ey[i]) - ey[i], min(y1, ey[i + 1]) - ey[i])
            sx = slice(max(x0, ex[j]) - ex[j], min(x1, ex[j + 1]) - ex[j])
            pieces = [blocks[(c, i, j)][:, sy, sx] for c in range(len(chunks[0]))]  # cut, then join the channels
            row.append(pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0))
        rows.append(row[0] if len(row) == 1 else np.concatenate(row, axis=2))
    return rows[0] if len(rows) == 1 else np.concatenate(rows, axis=1)  # (a view when one block holds it)


def pixel_sample(image, *, tile: int = 32, grid: int = 4, saturation: float = np.inf) -> PixelSample:
    """The :class:`PixelSample` of a :class:`~qdplex.model.MultiplexImage` (or C×Y×X array).

    Pixels with a non-finite value or a channel at or above ``saturation`` are left
    out of ``Y`` (not of the noise estimate's neighbours, which skip them too).
    """
    from scipy import ndimage as ndi

    data = getattr(image, "data", image)
    C, H, W = data.shape
    t = int(min(tile, H, W))
    gy, gx = max(1, min(grid, H // t)), max(1, min(grid, W // t))
    ys = np.linspace(0, H - t, gy).astype(int)
    xs = np.linspace(0, W - t, gx).astype(int)
    corners = [(y, x) for y in ys for x in xs]
    P = np.empty((C, len(corners), t, t), np.float32)  # channel-major: Y below is a view
    blocks = _in_memory_blocks(data) if hasattr(data, "dask") else None
    if blocks is not None:  # numpy chunks held in the graph: slice them (dask's graph costs ~25 ms here)
        for i, (y, x) in enumerate(corners):
            P[:, i] = np.ascontiguousarray(_region(blocks, data.chunks, y, y + t, x, x + t))  # (a faster cast)
    else:
        pieces = [data[:, y:y + t, x:x + t] for y, x in corners]
        if hasattr(data, "dask"):
            import dask

            pieces = dask.compute(*pieces, scheduler="sync")  # an image on disk: only these tiles are read
        for i, p in enumerate(pieces):
            P[:, i] = np.asarray(p)
    total = P.sum(axis=0)  # n×t×t
    good = np.isfinite(total) if data.dtype.kind == "f" else np.ones(total.shape, bool)  # NaN/inf in any channel
    if np.isfinite(saturation) and P.max() >= saturation:  # (one pass when nothing saturates)
        good &= P.max(axis=0) < saturation
    all_good = bool(good.all())
    if not all_good:
        total[~good] = np.nan
    s = ndi.uniform_filter(total, size=(1, 3, 3), mode="nearest")  # within each tile
    if t > 2:  # second differences (every other row): a linear trend (an edge's slope) cancels
        Q, g = P[:, :, ::2], good[:, ::2]
        diff = Q[..., 2:] + Q[..., :-2]
        diff -= Q[..., 1:-1]
        diff -= Q[..., 1:-1]
        if not all_good:
            ok = g[..., 2:] & g[..., 1:-1] & g[..., :-2]
            diff = np.where(ok[None], diff, np.float32(0.0))  # (a product would keep NaN)
        d2 = np.einsum("cntx,cntx->c", diff, diff).astype(np.float64)
        nd = diff.shape[1] * diff.shape[2] * diff.shape[3] if all_good else int(ok.sum())
    else:
        d2, nd = np.zeros(C), 0
    keep = good & np.isfinite(s)
    Y = P.reshape(C, -1)
    if not keep.all():
        Y = np.ascontiguousarray(Y[:, keep.ravel()])
    noise = np.asarray(d2, np.float64) / 6.0 / max(nd, 1)  # var(a − 2b + c) = 6σ² for independent noise
    return PixelSample(Y=Y, smooth_total=s[keep].astype(np.float64), noise_var=noise, n_tiles=len(corners))
