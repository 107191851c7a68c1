"""Nucleus and cell segmentation, compartments, and tiled segmentation of whole slides.

The default nucleus segmenter is classical and model-free (nothing to download):

1. **Scale.** The nucleus diameter in pixels comes from ``diameter_um`` and the
   pixel size, or is estimated from the image (:func:`estimate_diameter`).
2. **Background.** A smooth background (lower envelope on a coarse grid, a few
   nucleus diameters wide) is subtracted, which removes illumination gradients
   and autofluorescence haze; the noise level is measured on the result.
3. **Seeds.** One seed per nucleus: local maxima of a scale-normalised blob
   filter (Laplacian of Gaussian tuned to the nucleus radius) on the
   background-corrected image, which separates touching nuclei.
4. **Local foreground.** A seeded watershed of the smoothed image grows each
   seed over the pixels significantly above the noise; each nucleus then keeps
   only the pixels above a fixed fraction of its own peak height, so that dim
   and bright nuclei are cut at the same relative level (no global threshold).
5. **Clean-up.** Holes are filled and objects far smaller than a nucleus dropped.

Cells are nuclei grown by a distance shared fairly between neighbours
(:func:`expand_nuclei`, optionally guided by a membrane image); the membrane
compartment is a ring at the inner cell boundary (:func:`membrane_ring`).
:func:`segment_tiled` segments images of any size tile by tile on dask.

All label images are ``uint32`` with 0 as background; a cell's ID equals its
nucleus's ID.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .errors import SegmentationError
from .model import Segmentation

__all__ = [
    "segment",
    "segment_nuclei",
    "expand_nuclei",
    "membrane_ring",
    "segment_tiled",
    "estimate_diameter",
    "METHODS",
]

#: Nucleus segmentation backends.
METHODS = ("classical", "cellpose", "stardist")

#: Nucleus diameter assumed to convert µm to pixels when the pixel size is unknown.
TYPICAL_NUCLEUS_UM = 10.0


# --------------------------------------------------------------------------- input checks
def _check_image(image, what="image") -> np.ndarray:
    """A finite, non-empty 2-D float32 array, or SegmentationError."""
    if hasattr(image, "compute") and not isinstance(image, np.ndarray):
        image = image.compute()
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise SegmentationError(
            f"expected a 2-D Y×X {what}, found {arr.ndim} dimensions with shape {tuple(arr.shape)}"
        )
    if arr.size == 0:
        raise SegmentationError(f"expected a non-empty 2-D {what}, found shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biuf":
        raise SegmentationError(f"expected a numeric {what}, found dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        n = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise SegmentationError(
            f"expected only finite values in the {what}, found {n} NaN or infinite pixels"
        )
    return arr


def _check_labels(labels, what="labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise SegmentationError(
            f"expected a 2-D Y×X {what} image, found {arr.ndim} dimensions with shape {tuple(arr.shape)}"
        )
    if arr.dtype.kind not in "biu":
        raise SegmentationError(f"expected integer {what}, found dtype {arr.dtype}")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise SegmentationError(f"expected non-negative {what}, found minimum {arr.min()}")
    return arr.astype(np.uint32, copy=False)


def _diameter_px(diameter_um, pixel_size_um) -> float | None:
    if diameter_um is None:
        return None
    if not (isinstance(diameter_um, (int, float)) and diameter_um > 0):
        raise SegmentationError(f"expected a positive diameter_um, found {diameter_um!r}")
    if pixel_size_um is None:
        raise SegmentationError(
            f"expected pixel_size_um to convert diameter_um={diameter_um} to pixels, found None "
            "(give the pixel size, or leave diameter_um out to estimate it)"
        )
    if not pixel_size_um > 0:
        raise SegmentationError(f"expected a positive pixel_size_um, found {pixel_size_um!r}")
    return float(diameter_um) / float(pixel_size_um)


# --------------------------------------------------------------------------- building blocks
def _block_reduce(img: np.ndarray, k: int, func) -> np.ndarray:
    """Reduce non-overlapping k×k blocks (edges padded by reflection) with ``func``."""
    if k <= 1:
        return img
    ny, nx = -(-img.shape[0] // k), -(-img.shape[1] // k)
    pad = ((0, ny * k - img.shape[0]), (0, nx * k - img.shape[1]))
    if pad[0][1] or pad[1][1]:
        img = np.pad(img, pad, mode="reflect" if min(img.shape) > 1 else "edge")
    return func(img.reshape(ny, k, nx, k), axis=(1, 3))


def _upsample(small: np.ndarray, k: int, shape, offset=(0, 0)) -> np.ndarray:
    """Bilinear interpolation of a coarse grid of k×k block centres to ``shape``.

    ``offset`` is the (y, x) position of the output's first pixel in the grid's
    full-resolution frame, so a tile can take its part of a whole-slide grid.
    """
    yy = (np.arange(shape[0], dtype=np.float32) + offset[0] + 0.5) / k - 0.5
    xx = (np.arange(shape[1], dtype=np.float32) + offset[1] + 0.5) / k - 0.5
    yy = np.clip(yy, 0, small.shape[0] - 1)
    xx = np.clip(xx, 0, small.shape[1] - 1)
    y0 = np.minimum(yy.astype(np.int64), small.shape[0] - 1)
    x0 = np.minimum(xx.astype(np.int64), small.shape[1] - 1)
    y1 = np.minimum(y0 + 1, small.shape[0] - 1)
    x1 = np.minimum(x0 + 1, small.shape[1] - 1)
    wy = (yy - y0)[:, None]
    wx = (xx - x0)[None, :]
    top = small[y0][:, x0] * (1 - wx) + small[y0][:, x1] * wx
    bot = small[y1][:, x0] * (1 - wx) + small[y1][:, x1] * wx
    return (top * (1 - wy) + bot * wy).astype(np.float32)


def _background_block(diameter_px: float) -> int:
    """Side of the coarse background grid's blocks: about two nucleus diameters."""
    return max(int(round(2.0 * diameter_px)), 2)


def _block_minima(image: np.ndarray, k: int) -> np.ndarray:
    """Minimum of each k×k block of the 3×3-averaged image."""
    pre = ndi.uniform_filter(image, size=3, mode="nearest") if min(image.shape) >= 3 else image
    return _block_reduce(pre, k, np.min)


def _smooth_grid(small: np.ndarray) -> np.ndarray:
    """Lower envelope of the block minima: erode over neighbours, then smooth."""
    small = ndi.grey_erosion(small, size=(3, 3), mode="nearest")
    small = ndi.uniform_filter(small, size=3, mode="nearest")
    return ndi.gaussian_filter(small, 1.0, mode="nearest").astype(np.float32)


def background(image: np.ndarray, diameter_px: float) -> np.ndarray:
    """Smooth background of a nuclear image: a lower envelope a few nuclei wide.

    The image is reduced to a coarse grid (block minimum of the lightly smoothed
    image, blocks about two nucleus diameters wide), eroded over its neighbours
    so that a block fully covered by nuclei takes a background value from
    beside it, smoothed, and interpolated back to full size.

    Parameters
    ----------
    image : numpy.ndarray
        2-D float image.
    diameter_px : float
        Typical nucleus diameter in pixels.

    Returns
    -------
    numpy.ndarray
        float32 background of the shape of ``image``.
    """
    k = _background_block(diameter_px)
    return _upsample(_smooth_grid(_block_minima(image, k)), k, image.shape)


def _noise_sigma(image: np.ndarray) -> float:
    """Robust pixel noise: MAD of differences of horizontal and vertical neighbours."""
    d = np.concatenate([np.diff(image, axis=1).ravel(), np.diff(image, axis=0).ravel()])
    if d.size == 0:
        return 0.0
    if d.size > 4_000_000:  # a regular subsample is plenty
        d = d[:: d.size // 2_000_000]
    mad = np.median(np.abs(d - np.median(d)))
    return float(1.4826 * mad / math.sqrt(2.0))


def estimate_diameter(image, *, default: float = 20.0) -> float:
    """Estimate the typical nucleus diameter (pixels) of a nuclear image.

    Foreground from an Otsu threshold of the background-corrected, smoothed
    image; for each connected object both the equivalent diameter
    (``2·sqrt(area/π)``) and the inscribed diameter (twice the largest
    distance to the background) are measured. Isolated roundish objects
    (equivalent ≤ 1.6 × inscribed) give the answer directly; clumps of touching
    nuclei contribute their inscribed diameter, which stays close to one
    nucleus's width. Large images are measured on a few central crops.

    Parameters
    ----------
    image : array
        2-D nuclear image.
    default : float
        Returned when no object is found (e.g. an empty field).

    Returns
    -------
    float
        Median nucleus diameter in pixels.
    """
    from skimage.filters import threshold_otsu

    img = _check_image(image)
    crop = 1024
    if img.shape[0] > crop or img.shape[1] > crop:
        y0 = max((img.shape[0] - crop) // 2, 0)
        x0 = max((img.shape[1] - crop) // 2, 0)
        img = np.ascontiguousarray(img[y0 : y0 + crop, x0 : x0 + crop])
    # two passes: a first guess sets the background scale, the second refines it
    guess = float(default)
    for _ in range(2):
        corr = ndi.gaussian_filter(img - background(img, guess), 1.0)
        if not np.ptp(corr) > 0:
            return float(default)
        noise = _noise_sigma(img)
        try:
            t = threshold_otsu(corr)
        except ValueError:
            return float(default)
        t = max(t, 3.0 * noise)
        fg = corr > t
        lab, n = ndi.label(fg)
        if n == 0:
            return float(default)
        area = np.bincount(lab.ravel())[1:].astype(float)
        edt = ndi.distance_transform_edt(fg)
        insc = 2.0 * np.asarray(ndi.maximum(edt, lab, np.arange(1, n + 1)), float)
        eqd = 2.0 * np.sqrt(area / np.pi)
        ok = (area >= 12) & (insc >= 2.0)
        if not ok.any():
            return float(default)
        area, insc, eqd = area[ok], insc[ok], eqd[ok]
        single = eqd <= 1.6 * insc
        per_obj = np.where(single, eqd, 1.15 * insc)
        # weight by object size so specks of debris do not dominate
        order = np.argsort(per_obj)
        w = np.cumsum(np.sqrt(area[order]))
        guess = float(per_obj[order][np.searchsorted(w, 0.5 * w[-1])])
    return max(guess, 3.0)


def _log_response(smooth: np.ndarray, sigma: float) -> np.ndarray:
    """Scale-normalised negative Laplacian of Gaussian (bright blobs positive)."""
    return -(sigma**2) * ndi.gaussian_laplace(smooth, sigma, mode="nearest")


def _classical_nuclei(
    img: np.ndarray,
    d: float,
    *,
    bg: np.ndarray | None = None,
    noise: float | None = None,
    rel_threshold: float = 0.35,
    snr: float = 3.0,
) -> np.ndarray:
    """The classical segmenter; ``bg`` and ``noise`` may come from the whole slide (tiles)."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    r = d / 2.0
    corr = img - (background(img, d) if bg is None else bg)
    noise = _noise_sigma(img) if noise is None else float(noise)
    # smoothing scaled to the nucleus: suppresses texture and noise, keeps borders
    s_smooth = max(0.7, d / 16.0)
    smooth = ndi.gaussian_filter(corr, s_smooth, mode="nearest")
    noise_s = max(noise / (2.0 * math.sqrt(math.pi) * s_smooth), 1e-12)  # noise after smoothing
    if noise == 0.0:
        noise_s = max(1e-6 * float(np.abs(smooth).max()), 1e-12)
    fg = smooth > snr * noise_s
    if not fg.any():
        return np.zeros(img.shape, np.uint32)

    # seeds: blob filter at the nucleus scale
    s_blob = max(1.0, r / math.sqrt(2.0) * 0.8)
    blob = _log_response(smooth, s_blob)
    min_dist = max(2, int(round(0.45 * d)))
    coords = peak_local_max(
        blob,
        min_distance=min_dist,
        threshold_abs=snr * noise_s * 0.5,
        labels=fg.astype(np.uint8),
        exclude_border=False,
    )
    markers = np.zeros(img.shape, np.int32)
    markers[tuple(coords.T)] = np.arange(1, len(coords) + 1)

    # foreground components without a seed get one at their maximum
    comp, ncomp = ndi.label(fg)
    if ncomp:
        has = np.zeros(ncomp + 1, bool)
        has[comp[tuple(coords.T)]] = True
        missing = np.flatnonzero(~has[1:]) + 1
        if missing.size:
            pos = ndi.maximum_position(smooth, comp, missing)
            start = len(coords) + 1
            for i, (y, x) in enumerate(pos):
                markers[y, x] = start + i

    labels = watershed(-smooth, markers=markers, mask=fg)
    n = int(labels.max())
    if n == 0:
        return np.zeros(img.shape, np.uint32)
    # per-object threshold: a fixed fraction of the nucleus's own peak height
    idx = np.arange(1, n + 1)
    peak = np.zeros(n + 1, np.float32)
    peak[1:] = ndi.maximum(smooth, labels, idx)
    cut = np.maximum(rel_threshold * peak, snr * noise_s)
    keep = smooth > cut[labels]
    labels = np.where(keep, labels, 0)
    labels = _fill_holes(labels)
    labels = _clean(labels, min_area=max(0.08 * math.pi * r * r, 6.0))
    return labels


def _fill_holes(labels: np.ndarray) -> np.ndarray:
    """Fill holes inside each object (holes enclosed by one label)."""
    holes = ndi.binary_fill_holes(labels > 0) & (labels == 0)
    if not holes.any():
        return labels
    hl, nh = ndi.label(holes)
    # a hole takes the label of the object around it (max of the dilated ring)
    around = ndi.grey_dilation(labels, size=(3, 3))
    fill = np.zeros(nh + 1, labels.dtype)
    fill[1:] = ndi.maximum(around, hl, np.arange(1, nh + 1))
    out = labels.copy()
    out[holes] = fill[hl[holes]]
    return out


def _clean(labels: np.ndarray, *, min_area: float) -> np.ndarray:
    """Keep the largest piece of each label, drop small objects, relabel 1..n (uint32)."""
    from skimage.segmentation import relabel_sequential

    labels = labels.astype(np.int64, copy=False)
    # split labels fragmented by the per-object cut: keep each label's largest piece
    conn, nconn = ndi.label(labels > 0)
    if nconn:
        # pieces = (label, component) pairs; a label in >1 component is fragmented
        pair = labels[labels > 0] * (nconn + 1) + conn[labels > 0]
        uniq, cnt = np.unique(pair, return_counts=True)
        lab_of = uniq // (nconn + 1)
        order = np.lexsort((-cnt, lab_of))
        first = np.ones(order.size, bool)
        first[1:] = lab_of[order][1:] != lab_of[order][:-1]
        best = set(uniq[order][first].tolist())
        if len(best) != uniq.size:
            keep_pair = np.isin(pair, uniq[order][first])
            flat = labels[labels > 0]
            flat[~keep_pair] = 0
            labels = labels.copy()
            labels[labels > 0] = flat
    area = np.bincount(labels.ravel())
    small = area < min_area
    small[0] = False
    if small.any():
        labels = np.where(small[labels], 0, labels)
    out, _, _ = relabel_sequential(labels)
    return out.astype(np.uint32)


# --------------------------------------------------------------------------- deep backends
def _cellpose_nuclei(img: np.ndarray, d: float | None, model: str | None = None) -> np.ndarray:
    if importlib.util.find_spec("cellpose") is None:
        raise SegmentationError(
            "expected the optional 'cellpose' package for method='cellpose', found it not installed "
            "(install cellpose and its model weights locally, or use method='classical')"
        )
    from cellpose import models  # pragma: no cover - optional

    home = Path(os.environ.get("CELLPOSE_LOCAL_MODELS_PATH", Path.home() / ".cellpose" / "models"))
    name = model or "nuclei"
    path = Path(name)
    if not path.exists():
        found = sorted(p.name for p in home.glob("*")) if home.is_dir() else []
        hits = [p for p in found if p.startswith(name)] or [p for p in found if "cpsam" in p]
        if not hits:
            raise SegmentationError(
                f"expected Cellpose weights for model {name!r} under {home}, found {found or 'none'} "
                "(qdplex never downloads weights: fetch them once with cellpose, or use method='classical')"
            )
    try:  # cellpose ≥ 2
        net = models.CellposeModel(pretrained_model=str(path)) if path.exists() else models.CellposeModel(model_type=name)
    except TypeError:
        net = models.CellposeModel(pretrained_model=str(path) if path.exists() else name)
    norm = (img - img.min()) / max(float(np.ptp(img)), 1e-12)
    out = net.eval(norm, diameter=d, channels=[0, 0]) if d else net.eval(norm, channels=[0, 0])
    return _clean(np.asarray(out[0]), min_area=1)


def _stardist_nuclei(img: np.ndarray, d: float | None, model: str | None = None) -> np.ndarray:
    if importlib.util.find_spec("stardist") is None:
        raise SegmentationError(
            "expected the optional 'stardist' package for method='stardist', found it not installed "
            "(install stardist and its model weights locally, or use method='classical')"
        )
    from stardist.models import StarDist2D  # pragma: no cover - optional

    name = model or "2D_versatile_fluo"
    path = Path(name)
    if path.is_dir():
        net = StarDist2D(None, name=path.name, basedir=str(path.parent))
    else:
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / "StarDist2D" / name
        if not cache.is_dir() or not any(cache.rglob("*.h5")):
            raise SegmentationError(
                f"expected StarDist weights for {name!r} under {cache}, found none "
                "(qdplex never downloads weights: fetch them once with stardist, or use method='classical')"
            )
        net = StarDist2D(None, name=cache.name, basedir=str(cache.parent))
    lo, hi = np.percentile(img, [1, 99.8])
    norm = (img - lo) / max(hi - lo, 1e-12)
    scale = None if not d else max(0.25, min(4.0, 17.0 / d))  # versatile model: ~17 px nuclei
    labels, _ = net.predict_instances(norm, scale=scale)
    return _clean(np.asarray(labels), min_area=1)


# --------------------------------------------------------------------------- public API
def segment_nuclei(
    image2d,
    *,
    diameter_um: float | None = None,
    pixel_size_um: float | None = None,
    method: str = "classical",
    diameter_px: float | None = None,
    model: str | None = None,
) -> np.ndarray:
    """Segment nuclei in a 2-D nuclear-stain image.

    Parameters
    ----------
    image2d : array_like
        Y×X nuclear-stain image (DAPI / Hoechst abundance or channel), any numeric
        dtype; dask arrays are computed.
    diameter_um : float, optional
        Typical nucleus diameter in µm (needs ``pixel_size_um``). Estimated from
        the image when neither this nor ``diameter_px`` is given.
    pixel_size_um : float, optional
        Pixel size in µm.
    method : {"classical", "cellpose", "stardist"}
        ``"classical"`` (default) is model-free. The deep-learning backends are
        used only when their package and weights are already installed locally;
        nothing is ever downloaded, and a :class:`~qdplex.errors.SegmentationError`
        says what is missing otherwise.
    diameter_px : float, optional
        Typical nucleus diameter in pixels (overrides ``diameter_um``).
    model : str, optional
        Deep backends only: a model name or a local model path.

    Returns
    -------
    numpy.ndarray
        uint32 labels, 0 = background, nuclei numbered 1…n. A blank image (all
        pixels equal, e.g. all zero) gives all-zero labels.

    Raises
    ------
    SegmentationError
        On an empty array, wrong dimensions, NaN or infinite pixels, an unknown
        method, or an unavailable deep backend.
    """
    if method not in METHODS:
        raise SegmentationError(f"expected a segmentation method in {METHODS}, found {method!r}")
    img = _check_image(image2d, "nuclear image")
    d = float(diameter_px) if diameter_px is not None else _diameter_px(diameter_um, pixel_size_um)
    if d is not None and not d > 0:
        raise SegmentationError(f"expected a positive nucleus diameter in pixels, found {d!r}")
    if method == "cellpose":
        return _cellpose_nuclei(img, d, model)
    if method == "stardist":
        return _stardist_nuclei(img, d, model)
    if not np.ptp(img) > 0:  # blank field: nothing to find
        return np.zeros(img.shape, np.uint32)
    if d is None:
        d = estimate_diameter(img)
    return _classical_nuclei(img, d)


def expand_nuclei(nuclei, distance_px: float, *, membrane=None) -> np.ndarray:
    """Grow nuclei into cells by up to ``distance_px``, shared fairly between neighbours.

    Without ``membrane`` every background pixel within ``distance_px`` of a
    nucleus joins the nearest nucleus (:func:`skimage.segmentation.expand_labels`).
    With a membrane image, the same reach is split between neighbours by a
    seeded watershed on the smoothed membrane intensity, so that cell borders
    follow the membrane staining.

    Parameters
    ----------
    nuclei : array of int
        Y×X nucleus labels.
    distance_px : float
        Largest growth in pixels (≥ 0).
    membrane : array_like, optional
        Y×X membrane-marker image (e.g. the sum of membrane markers' abundances).

    Returns
    -------
    numpy.ndarray
        uint32 cell labels; each cell carries its nucleus's ID and contains it.
    """
    from skimage.segmentation import expand_labels, watershed

    nuc = _check_labels(nuclei, "nucleus labels")
    if not (isinstance(distance_px, (int, float, np.floating, np.integer)) and distance_px >= 0):
        raise SegmentationError(f"expected a non-negative expansion distance in pixels, found {distance_px!r}")
    if membrane is None:
        return expand_labels(nuc, distance=float(distance_px)).astype(np.uint32)
    mem = _check_image(membrane, "membrane image")
    if mem.shape != nuc.shape:
        raise SegmentationError(
            f"expected a membrane image of the nuclei's shape {nuc.shape}, found {mem.shape}"
        )
    reach = ndi.distance_transform_edt(nuc == 0) <= float(distance_px)
    elev = ndi.gaussian_filter(mem, 1.0, mode="nearest")
    cells = watershed(elev, markers=nuc.astype(np.int32), mask=reach | (nuc > 0))
    cells = cells.astype(np.uint32)
    cells[nuc > 0] = nuc[nuc > 0]
    return cells


def membrane_ring(cells, width_px: float) -> np.ndarray:
    """The membrane compartment: a ring of ``width_px`` at the inner boundary of each cell.

    A pixel of a cell belongs to the ring when it lies closer than ``width_px``
    to the cell's boundary (the cell's own pixels that touch the background or
    another cell count as distance 0). The image border is not a boundary.

    Parameters
    ----------
    cells : array of int
        Y×X cell labels.
    width_px : float
        Ring width in pixels (> 0); a width of 1 gives the one-pixel outline.

    Returns
    -------
    numpy.ndarray
        uint32 labels with the cells' IDs on the ring, 0 elsewhere.
    """
    lab = _check_labels(cells, "cell labels")
    if not (isinstance(width_px, (int, float, np.floating, np.integer)) and width_px > 0):
        raise SegmentationError(f"expected a positive membrane width in pixels, found {width_px!r}")
    edge = np.zeros(lab.shape, bool)
    # a pixel is on its cell's boundary when a 4-neighbour carries another label
    dy = lab[1:, :] != lab[:-1, :]
    dx = lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge &= lab > 0
    if not edge.any():
        return np.zeros(lab.shape, np.uint32)
    if width_px <= 1:
        ring = edge
    else:
        ring = (ndi.distance_transform_edt(~edge) < float(width_px)) & (lab > 0)
    return np.where(ring, lab, 0).astype(np.uint32)


def _um_to_px(value_um: float, pixel_size_um, diameter_px_est, what: str) -> float:
    if pixel_size_um is not None:
        if not pixel_size_um > 0:
            raise SegmentationError(f"expected a positive pixel_size_um, found {pixel_size_um!r}")
        return float(value_um) / float(pixel_size_um)
    # unknown pixel size: scale by the nucleus size (a nucleus is ~TYPICAL_NUCLEUS_UM across)
    return float(value_um) * diameter_px_est / TYPICAL_NUCLEUS_UM


def segment(
    nuclear2d,
    *,
    pixel_size_um: float | None = None,
    diameter_um: float | None = None,
    expand_um: float = 5.0,
    membrane_width_um: float = 1.0,
    membrane_image=None,
    method: str = "classical",
    tile: int | None = None,
) -> Segmentation:
    """Nuclei, cells and compartments from a nuclear-stain image.

    Parameters
    ----------
    nuclear2d : array_like
        Y×X nuclear-stain image (numpy or dask).
    pixel_size_um : float, optional
        Pixel size in µm. When unknown, µm are converted to pixels assuming the
        estimated nucleus diameter is 10 µm (a warning says so).
    diameter_um : float, optional
        Typical nucleus diameter in µm; estimated when not given.
    expand_um : float
        How far cells reach beyond their nucleus, in µm (default 5).
    membrane_width_um : float
        Width of the membrane ring at the cell boundary, in µm (default 1).
    membrane_image : array_like, optional
        Membrane-marker image to guide the cell borders (see :func:`expand_nuclei`).
    method : {"classical", "cellpose", "stardist"}
        Nucleus segmentation backend (see :func:`segment_nuclei`).
    tile : int, optional
        Segment nuclei tile by tile (:func:`segment_tiled`) when the image is
        larger than ``tile`` pixels on a side.

    Returns
    -------
    qdplex.model.Segmentation
        ``nuclei`` and ``cells`` (same IDs) and ``membrane_width_px``; the
        ``cytoplasm`` and ``membrane`` compartments derive from them.
    """
    img = _check_image(nuclear2d, "nuclear image")
    for name, v in (("expand_um", expand_um), ("membrane_width_um", membrane_width_um)):
        if not (isinstance(v, (int, float)) and v >= 0):
            raise SegmentationError(f"expected a non-negative {name}, found {v!r}")
    d = _diameter_px(diameter_um, pixel_size_um)
    if d is None and np.ptp(img) > 0 and (pixel_size_um is None or method == "classical"):
        d = estimate_diameter(img)
    if pixel_size_um is None:
        warnings.warn(
            f"pixel size unknown: converting µm to pixels assuming a {TYPICAL_NUCLEUS_UM:g} µm nucleus "
            f"is {d or 20.0:.1f} px across",
            stacklevel=2,
        )
    if tile is not None and max(img.shape) > tile:
        nuclei = segment_tiled(img, tile=tile, method=method, diameter_px=d)
    else:
        nuclei = segment_nuclei(img, method=method, diameter_px=d)
    d_ref = d or 20.0
    expand_px = _um_to_px(expand_um, pixel_size_um, d_ref, "expand_um")
    width_px = max(_um_to_px(membrane_width_um, pixel_size_um, d_ref, "membrane_width_um"), 1.0)
    cells = expand_nuclei(nuclei, expand_px, membrane=membrane_image)
    return Segmentation(nuclei=nuclei, cells=cells, membrane_width_px=width_px)


# --------------------------------------------------------------------------- tiles
def _tile_objects(block, core, d, method, kwargs, grid=None, k=None, offset=(0, 0), noise=None) -> tuple:
    """Segment one padded tile; return its labels and the IDs whose centroid lies in ``core``.

    ``core`` is (y0, y1, x0, x1) in the tile's own coordinates, widened by a
    small margin so that a nucleus on a tile border is kept by at least one tile.
    ``grid`` is the whole slide's coarse background grid (classical method).
    """
    if method == "classical" and grid is not None:
        img = _check_image(block, "nuclear image")
        if not np.ptp(img) > 0:
            return np.zeros(img.shape, np.uint32), np.zeros(0, np.int64)
        bg = _upsample(grid, k, img.shape, offset)
        lab = _classical_nuclei(img, d, bg=bg, noise=noise)
    else:
        lab = segment_nuclei(block, diameter_px=d, method=method, **kwargs)
    n = int(lab.max())
    if n == 0:
        return lab, np.zeros(0, np.int64)
    idx = np.arange(1, n + 1)
    cen = np.asarray(ndi.center_of_mass(np.ones(lab.shape, np.float32), lab, idx)).reshape(-1, 2)
    y0, y1, x0, x1 = core
    inside = (cen[:, 0] >= y0) & (cen[:, 0] < y1) & (cen[:, 1] >= x0) & (cen[:, 1] < x1)
    return lab, idx[inside]


def _slide_background_grid(arr, k: int, tile: int) -> np.ndarray:
    """The coarse background grid of a whole (dask) slide, computed chunk by chunk."""
    import dask.array as da

    step = max(k * max(tile // k, 1), k)
    a = arr.astype(np.float32).rechunk((step, step))
    padded = da.overlap.overlap(a, depth=1, boundary="nearest")

    def minima(b):
        return _block_reduce(ndi.uniform_filter(b, size=3, mode="nearest")[1:-1, 1:-1], k, np.min)

    minima = padded.map_blocks(
        minima,
        chunks=tuple(tuple(-(-c // k) for c in ch) for ch in a.chunks),
        dtype=np.float32,
    )
    return _smooth_grid(np.asarray(minima.compute()))


def segment_tiled(
    nuclear,
    *,
    tile: int = 2048,
    overlap: int | None = None,
    diameter_um: float | None = None,
    pixel_size_um: float | None = None,
    diameter_px: float | None = None,
    method: str = "classical",
    out=None,
    workers: int | None = None,
    **kwargs,
) -> np.ndarray:
    """Segment nuclei of an image of any size tile by tile (dask), with overlap.

    Each tile is segmented together with a border of ``overlap`` pixels; a
    nucleus is kept by the tile that holds its centroid, whole (also where it
    reaches into the neighbouring tile), and is written once: a nucleus found
    again by a neighbour (centroid on the border) is recognised by its overlap
    with the one already written. IDs are global and sequential. Tiles are read
    from ``nuclear`` a few at a time, so working memory is bounded by the tile
    size, not the slide (the output array itself can be a memory map or zarr
    array passed as ``out``).

    Parameters
    ----------
    nuclear : numpy.ndarray or dask.array.Array
        Y×X nuclear image.
    tile : int
        Tile side in pixels (core, without the overlap).
    overlap : int, optional
        Border read around each tile; default 2 × the nucleus diameter.
    diameter_um, pixel_size_um, diameter_px :
        Nucleus scale, as in :func:`segment_nuclei`; when none is given it is
        estimated once for the whole image (on a central crop) and used by
        every tile, so tiles agree.
    method : str
        Nucleus segmentation backend.
    out : array-like, optional
        Y×X uint32 array to write into (e.g. ``numpy.memmap`` or a zarr array).
    workers : int, optional
        Tiles segmented at once (default: the CPU count).
    **kwargs
        Passed to :func:`segment_nuclei` (e.g. ``model``).

    Returns
    -------
    numpy.ndarray (or ``out``)
        uint32 nucleus labels 1…n.
    """
    import dask
    import dask.array as da

    arr = nuclear if isinstance(nuclear, da.Array) else None
    if arr is None:
        np_arr = np.asarray(nuclear)
        if np_arr.ndim != 2:
            raise SegmentationError(
                f"expected a 2-D Y×X nuclear image, found {np_arr.ndim} dimensions with shape {tuple(np_arr.shape)}"
            )
        arr = da.from_array(np_arr, chunks=(min(tile, max(np_arr.shape[0], 1)), min(tile, max(np_arr.shape[1], 1))))
    if arr.ndim != 2:
        raise SegmentationError(
            f"expected a 2-D Y×X nuclear image, found {arr.ndim} dimensions with shape {tuple(arr.shape)}"
        )
    if arr.size == 0:
        raise SegmentationError(f"expected a non-empty 2-D nuclear image, found shape {tuple(arr.shape)}")
    if not (isinstance(tile, (int, np.integer)) and tile >= 16):
        raise SegmentationError(f"expected a tile size of at least 16 pixels, found {tile!r}")
    H, W = (int(s) for s in arr.shape)
    d = float(diameter_px) if diameter_px is not None else _diameter_px(diameter_um, pixel_size_um)
    if d is not None and not d > 0:
        raise SegmentationError(f"expected a positive nucleus diameter in pixels, found {d!r}")
    if out is None:
        out = np.zeros((H, W), np.uint32)
    elif tuple(out.shape) != (H, W):
        raise SegmentationError(f"expected an output array of shape {(H, W)}, found {tuple(out.shape)}")
    grid = k = noise = None
    if method == "classical":
        # slide-wide scale, noise and background, so that every tile decides alike
        cy, cx = H // 2, W // 2
        h, w = min(H, 2048) // 2, min(W, 2048) // 2
        crop = _check_image(arr[cy - h : cy + (min(H, 2048) - h), cx - w : cx + (min(W, 2048) - w)].compute())
        if not np.ptp(crop) > 0 and not np.ptp(arr).compute() > 0:
            return out  # a blank slide: no nuclei
        if d is None:
            d = estimate_diameter(crop)
        noise = _noise_sigma(crop)
        k = _background_block(d)
        grid = _slide_background_grid(arr, k, tile)
    ov = int(overlap) if overlap is not None else int(math.ceil(2.0 * (d or 30.0)))
    margin = 0.25 * (d or 30.0)

    tiles = [(y, x) for y in range(0, H, tile) for x in range(0, W, tile)]
    nw = workers or os.cpu_count() or 1
    next_id = 1
    for start in range(0, len(tiles), nw):
        batch = tiles[start : start + nw]
        jobs = []
        for ty, tx in batch:
            y0, x0 = max(ty - ov, 0), max(tx - ov, 0)
            y1, x1 = min(ty + tile + ov, H), min(tx + tile + ov, W)
            core = (
                ty - y0 - (margin if ty > 0 else np.inf),
                min(ty + tile, H) - y0 + (margin if ty + tile < H else np.inf),
                tx - x0 - (margin if tx > 0 else np.inf),
                min(tx + tile, W) - x0 + (margin if tx + tile < W else np.inf),
            )
            block = dask.delayed(np.asarray)(arr[y0:y1, x0:x1])
            task = dask.delayed(_tile_objects)(block, core, d, method, kwargs, grid, k, (y0, x0), noise)
            jobs.append((y0, x0, task))
        results = dask.compute(*[j[2] for j in jobs], scheduler="threads", num_workers=nw)
        for (y0, x0, _), (lab, keep_ids) in zip(jobs, results):
            if keep_ids.size == 0:
                continue
            sl = (slice(y0, y0 + lab.shape[0]), slice(x0, x0 + lab.shape[1]))
            region = np.asarray(out[sl])
            kept = np.zeros(int(lab.max()) + 1, bool)
            kept[keep_ids] = True
            mine = kept[lab]
            # drop a nucleus that mostly overlaps one already written (found twice on a border)
            area = np.bincount(lab[mine], minlength=kept.size)
            taken = np.bincount(lab[mine & (region > 0)], minlength=kept.size)
            dup = taken > 0.5 * np.maximum(area, 1)
            kept &= ~dup
            mine = kept[lab] & (region == 0)
            new_id = np.zeros(kept.size, np.uint32)
            n_new = int(kept.sum())
            new_id[kept] = np.arange(next_id, next_id + n_new, dtype=np.uint32)
            next_id += n_new
            region = region.copy()
            region[mine] = new_id[lab[mine]]
            out[sl] = region
    return out
