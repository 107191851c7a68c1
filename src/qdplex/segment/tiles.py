"""Tiled nucleus segmentation of whole slides on dask.

The slide is cut into ``tile × tile`` cores; each is segmented together with a
border of ``overlap`` pixels. A nucleus belongs to the tile whose core holds
its centroid and is written whole, also where it reaches into a neighbouring
core. Decisions that depend on more than a neighbourhood — the nucleus scale,
the noise level and the background — are measured once for the slide, so
tiles agree with each other and with an untiled run.
"""

from __future__ import annotations

import math
import os

import numpy as np
from scipy import ndimage as ndi

from ..errors import SegmentationError
from ._checks import check_diameter, check_image, check_positive, check_shape, diameter_px as _diameter_px
from .nuclei import (
    _upsample,
    background_block,
    background_grids,
    block_percentiles,
    classical_nuclei,
    estimate_diameter,
    noise_sigma,
    resolve_method,
    segment_nuclei,
    smoothed_noise,
    smoothing_sigma,
)

__all__ = ["segment_tiled"]

#: Side of the central crop that sets a slide's nucleus scale and noise level.
_PROBE = 2048


def _slide_grids(arr, d: float, noise: float, tile: int):
    """Background and noise grids (see :func:`qdplex.segment.background`) of a dask slide,
    computed chunk by chunk (chunks aligned to the grid's blocks, read with a halo for the blur)."""
    import dask.array as da

    k = background_block(d)
    sigma = smoothing_sigma(d)
    depth = int(math.ceil(4.0 * sigma)) + 1
    step = k * max(tile // k, 1)
    a = arr.astype(np.float32).rechunk((step, step))
    padded = da.overlap.overlap(a, depth=depth, boundary="nearest")

    def blocks(b):
        sm = ndi.gaussian_filter(b, sigma, mode="nearest")[depth:-depth, depth:-depth]
        return block_percentiles(sm, k)

    grid = padded.map_blocks(
        blocks,
        chunks=tuple(tuple(-(-c // k) for c in ch) for ch in a.chunks) + ((2,),),
        new_axis=2,
        dtype=np.float32,
    )
    return background_grids(np.asarray(grid.compute()), smoothed_noise(noise, sigma))


def _tile_objects(block, core, d, method, model, grids, k, offset, noise):
    """Segment one padded tile; return its labels and the IDs whose centroid lies in ``core``.

    ``core`` is (y0, y1, x0, x1) in the tile's own coordinates.
    """
    img = check_image(block, "nuclear image")
    if method == "auto":
        from .infer import model_nuclei

        lab = model_nuclei(img, d, model=model, levels=grids, origin=offset)
    elif method == "classical":
        if not np.ptp(img) > 0:
            return np.zeros(img.shape, np.uint32), np.zeros(0, np.int64)
        bg, sig = (_upsample(g, k, img.shape, offset) for g in grids)
        lab = classical_nuclei(img, d, bg=bg, noise_map=sig, noise=noise)
    else:
        lab = segment_nuclei(img, diameter_px=d, method=method, model=model)
    n = int(lab.max())
    if n == 0:
        return lab, np.zeros(0, np.int64)
    idx = np.arange(1, n + 1)
    cen = np.asarray(ndi.center_of_mass(np.ones(lab.shape, np.float32), lab, idx)).reshape(-1, 2)
    y0, y1, x0, x1 = core
    inside = (cen[:, 0] >= y0) & (cen[:, 0] < y1) & (cen[:, 1] >= x0) & (cen[:, 1] < x1)
    return lab, idx[inside]


def _as_dask(nuclear, tile):
    import dask.array as da

    if isinstance(nuclear, da.Array):
        arr = nuclear
    else:
        a = check_shape(np.asarray(nuclear), "nuclear image")
        arr = da.from_array(a, chunks=(min(tile, a.shape[0]), min(tile, a.shape[1])))
    return check_shape(arr, "nuclear image")


def segment_tiled(
    nuclear,
    *,
    tile: int = 2048,
    overlap: int | None = None,
    diameter_um: float | None = None,
    pixel_size_um: float | None = None,
    diameter_px: float | None = None,
    method: str = "auto",
    model: str | None = None,
    out=None,
    workers: int | None = None,
) -> np.ndarray:
    """Segment the nuclei of an image of any size, tile by tile on dask, with overlap.

    Each ``tile × tile`` core is segmented with a border of ``overlap`` pixels.
    A nucleus is kept by the tile whose core (widened by a quarter nucleus)
    holds its centroid and is written whole, also where it reaches into the
    next core; a nucleus found again by a neighbour (centroid on the border) is
    recognised by its overlap with the one already written and skipped. IDs are
    global and sequential in tile order. Whatever depends on more than a
    neighbourhood is measured once for the slide, so tiles decide alike: for
    the model (``"auto"``) the nucleus scale and the intensity normalisation on
    a central crop, and every tile is resampled on the slide's grid; for
    ``"classical"`` the scale and noise on a central crop and the background
    grid chunk by chunk. Tiles are
    read a few at a time (``workers`` threads, at most ``workers + 1`` tiles in flight;
    this thread merges the finished ones in tile order while the next ones run), so
    working memory is bounded by the tile size, not the slide; pass ``out`` (e.g. a
    ``numpy.memmap`` or zarr array) to keep the labels themselves out of memory.

    Parameters
    ----------
    nuclear : numpy.ndarray or dask.array.Array
        Y×X nuclear image.
    tile : int
        Side of a tile's core in pixels (≥ 16).
    overlap : int, optional
        Border read around each core; default four nucleus diameters for the
        model (its field of view), two for the other methods.
    diameter_um, pixel_size_um, diameter_px :
        Nucleus scale, as in :func:`segment_nuclei`; estimated once for the
        slide when none is given.
    method : {"auto", "classical", "cellpose", "stardist"}
        Nucleus segmentation backend (see :func:`qdplex.segment.segment_nuclei`).
    model : str, optional
        ``"auto"``: an ONNX model file instead of the shipped one; deep backends:
        model name or local path.
    out : array-like, optional
        Y×X uint32 array to write into.
    workers : int, optional
        Tiles segmented at once, in threads (default: the CPU count).

    Returns
    -------
    numpy.ndarray (or ``out``)
        uint32 nucleus labels 1…n.
    """
    import dask

    method = resolve_method(method, model)
    if not (isinstance(tile, (int, np.integer)) and tile >= 16):
        raise SegmentationError(f"expected a tile size of at least 16 pixels, found {tile!r}")
    arr = _as_dask(nuclear, tile)
    H, W = (int(s) for s in arr.shape)
    d = check_positive(diameter_px, "nucleus diameter in pixels") if diameter_px is not None else None
    if d is None:
        d = _diameter_px(diameter_um, pixel_size_um)
    if d is not None:
        check_diameter(d, (H, W))
    if out is None:
        out = np.zeros((H, W), np.uint32)
    elif tuple(out.shape) != (H, W):
        raise SegmentationError(f"expected an output array of shape {(H, W)}, found {tuple(out.shape)}")

    grids = k = noise = None
    if method == "classical":
        ph, pw = min(H, _PROBE), min(W, _PROBE)
        y0, x0 = (H - ph) // 2, (W - pw) // 2
        probe = check_image(arr[y0 : y0 + ph, x0 : x0 + pw].compute(), "nuclear image")
        if not np.ptp(probe) > 0 and not float(arr.max().compute()) > float(arr.min().compute()):
            return out  # a blank slide
        if d is None:
            d = estimate_diameter(probe)
        noise = noise_sigma(probe)
        k = background_block(d)
        grids = _slide_grids(arr, d, noise, tile)
    elif method == "auto":
        from .infer import estimate_diameter_model, load_model
        from .model import normalise_levels

        ph, pw = min(H, _PROBE), min(W, _PROBE)
        y0, x0 = (H - ph) // 2, (W - pw) // 2
        probe = check_image(arr[y0 : y0 + ph, x0 : x0 + pw].compute(), "nuclear image")
        grids = normalise_levels(probe)  # the slide's intensity normalisation
        if not grids[1] > grids[0]:
            if not float(arr.max().compute()) > float(arr.min().compute()):
                return out  # a blank slide
            step = max(1, int(math.sqrt(H * W / 4e6)))
            grids = normalise_levels(np.asarray(arr[::step, ::step].compute()))
        model = load_model(model)
        if d is None:
            d = estimate_diameter_model(probe, model=model, levels=grids, pixel_size_um=pixel_size_um)
            if d is None:
                return out  # no nucleus in the probe at any scale
    ov = int(overlap) if overlap is not None else int(math.ceil((4.0 if method == "auto" else 2.0) * (d or 30.0)))
    if ov < 0:
        raise SegmentationError(f"expected a non-negative overlap, found {overlap!r}")
    margin = 0.25 * (d or 30.0)

    cores = [(y, x) for y in range(0, H, tile) for x in range(0, W, tile)]
    nw = int(workers or os.cpu_count() or 1)

    def job(ty, tx):
        y0, x0 = max(ty - ov, 0), max(tx - ov, 0)
        y1, x1 = min(ty + tile + ov, H), min(tx + tile + ov, W)
        core = (
            ty - y0 - margin if ty > 0 else -np.inf,
            min(ty + tile, H) - y0 + margin if ty + tile < H else np.inf,
            tx - x0 - margin if tx > 0 else -np.inf,
            min(tx + tile, W) - x0 + margin if tx + tile < W else np.inf,
        )
        return (y0, x0), (arr[y0:y1, x0:x1], core, d, method, model, grids, k, (y0, x0), noise)

    next_id = 1

    def merge(y0, x0, lab, keep_ids):
        nonlocal next_id
        if keep_ids.size == 0:
            return
        sl = (slice(y0, y0 + lab.shape[0]), slice(x0, x0 + lab.shape[1]))
        region = np.array(out[sl])
        kept = np.zeros(int(lab.max()) + 1, bool)
        kept[keep_ids] = True
        mine = kept[lab]
        # a nucleus mostly covered by one already written was found twice: skip it
        area = np.bincount(lab[mine], minlength=kept.size)
        taken = np.bincount(lab[mine & (region > 0)], minlength=kept.size)
        kept &= ~(taken > 0.5 * np.maximum(area, 1))
        mine = kept[lab] & (region == 0)
        new_id = np.zeros(kept.size, np.uint32)
        n_new = int(kept.sum())
        new_id[kept] = np.arange(next_id, next_id + n_new, dtype=np.uint32)
        next_id += n_new
        region[mine] = new_id[lab[mine]]
        out[sl] = region

    sched = dask.config.get("scheduler", None)
    if hasattr(sched, "submit"):
        # tiles are tasks of a distributed client when one is in use (one slide over a cluster)
        for start in range(0, len(cores), nw):
            jobs = [job(ty, tx) for ty, tx in cores[start : start + nw]]
            results = dask.compute(*[dask.delayed(_tile_objects)(*args) for _, args in jobs], scheduler=sched)
            for ((y0, x0), _), (lab, keep_ids) in zip(jobs, results):
                merge(y0, x0, lab, keep_ids)
        return out
    # locally: tiles compute on the worker threads while this thread merges the finished
    # ones, in tile order (IDs do not depend on timing); at most nw + 1 tiles in flight
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def run(args):  # the tile is read in this thread (its chunks one after another)
        block = args[0].compute(scheduler="sync") if hasattr(args[0], "dask") else np.asarray(args[0])
        return _tile_objects(block, *args[1:])

    with ThreadPoolExecutor(max_workers=nw) as pool:
        pending = deque()
        todo = iter(cores)
        for ty, tx in todo:
            origin, args = job(ty, tx)
            pending.append((origin, pool.submit(run, args)))
            if len(pending) > nw:
                break
        while pending:
            (y0, x0), fut = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                origin, args = job(*nxt)
                pending.append((origin, pool.submit(run, args)))
            merge(y0, x0, *fut.result())
    return out
