"""A small, spread-out sample of a slide's pixels for the on-slide estimates of
:func:`qdplex.unmix.unmix` (dark level, refined spectra, fit warnings).

The sample is a grid of up to 4×4 square tiles (64 px a side) spread evenly over the
image: contiguous pixels, so that a noise level can be read from neighbouring pixels
and totals can be smoothed before the darkest pixels are picked, and few enough
(≤ 65 536) that estimating costs a fraction of unmixing the slide. For an image on
disk only those tiles are read.
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


def pixel_sample(image, *, tile: int = 64, grid: int = 4, saturation: float = np.inf) -> PixelSample:
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
    pieces = [data[:, y:y + t, x:x + t] for y in ys for x in xs]
    if hasattr(data, "dask"):
        import dask

        pieces = dask.compute(*pieces, scheduler="sync")  # an image on disk: only these tiles are read
    raw = np.stack([np.asarray(p) for p in pieces])  # n×C×t×t
    P = raw.astype(np.float32)
    good = np.ones((raw.shape[0], t, t), bool)
    if raw.dtype.kind == "f":
        good &= np.isfinite(P).all(axis=1)
    if np.isfinite(saturation):
        good &= (raw < saturation).all(axis=1)
    all_good = bool(good.all())
    total = P.sum(axis=1)
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
            diff = np.where(ok[:, None], diff, np.float32(0.0))  # (a product would keep NaN)
        d2 = np.einsum("nctx,nctx->c", diff, diff).astype(np.float64)
        nd = diff.shape[0] * diff.shape[2] * diff.shape[3] if all_good else int(ok.sum())
    else:
        d2, nd = np.zeros(C), 0
    keep = good & np.isfinite(s)
    Y = np.ascontiguousarray(P.transpose(1, 0, 2, 3).reshape(C, -1))
    if not keep.all():
        Y = Y[:, keep.ravel()]
    noise = np.asarray(d2, np.float64) / 6.0 / max(nd, 1)  # var(a − 2b + c) = 6σ² for independent noise
    return PixelSample(Y=Y, smooth_total=s[keep].astype(np.float64), noise_var=noise, n_tiles=len(pieces))
