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
    """Pixels of a slide: ``Y`` C×N raw values (float64) of the usable pixels, their
    ``smooth_total`` (3×3 box mean of the channel sum, within the tile), and per channel
    the ``noise_var``: the mean square second difference of horizontally neighbouring raw
    values over 6 (shot + read noise, plus a little texture), over the same tiles."""

    Y: np.ndarray
    smooth_total: np.ndarray
    noise_var: np.ndarray
    n_tiles: int

    @property
    def n(self) -> int:
        return int(self.Y.shape[1])


def pixel_sample(image, *, tile: int = 64, grid: int = 4, saturation: float = np.inf) -> PixelSample:
    """The :class:`PixelSample` of a :class:`~qdplex.model.MultiplexImage` (or C×Y×X array).

    Pixels with a non-finite value or a channel at or above ``saturation`` are left
    out of ``Y`` (not of the noise estimate's neighbours, which skip them too).
    """
    import dask
    from scipy import ndimage as ndi

    data = getattr(image, "data", image)
    C, H, W = data.shape
    t = int(min(tile, H, W))
    gy, gx = max(1, min(grid, H // t)), max(1, min(grid, W // t))
    ys = np.linspace(0, H - t, gy).astype(int)
    xs = np.linspace(0, W - t, gx).astype(int)
    pieces = [data[:, y:y + t, x:x + t] for y in ys for x in xs]
    if hasattr(data, "dask"):
        import dask.array as da

        pieces = list(dask.compute(da.stack(pieces), scheduler="threads")[0])
    Ys, tot, d2, nd = [], [], np.zeros(C), np.zeros(C)
    for p in pieces:
        p = np.asarray(p, dtype=np.float32)
        good = np.all(np.isfinite(p), axis=0) & np.all(p < saturation, axis=0)
        s = ndi.uniform_filter(np.where(good, p.sum(axis=0), np.nan), 3, mode="nearest")
        if p.shape[2] > 2:  # second differences: a linear trend (an edge's slope) cancels
            ok = good[:, 2:] & good[:, 1:-1] & good[:, :-2]
            diff = (p[:, :, 2:] - 2 * p[:, :, 1:-1] + p[:, :, :-2])[:, ok].astype(np.float64)
            d2 += (diff * diff).sum(axis=1)
            nd += diff.shape[1]
        keep = good & np.isfinite(s)
        Ys.append(p[:, keep])
        tot.append(s[keep])
    Y = np.concatenate(Ys, axis=1).astype(np.float64) if Ys else np.zeros((C, 0))
    noise = d2 / 6.0 / np.maximum(nd, 1)  # var(a − 2b + c) = 6σ² for independent noise
    return PixelSample(Y=Y, smooth_total=np.concatenate(tot) if tot else np.zeros(0), noise_var=noise,
                       n_tiles=len(pieces))
