"""Nucleus segmentation: the classical, model-free segmenter and the backend switch.

The classical segmenter works in five steps:

1. **Scale.** The nucleus diameter ``d`` in pixels comes from ``diameter_um``
   and the pixel size, or is estimated from the image (:func:`estimate_diameter`).
2. **Background.** A smooth lower envelope a few nuclei wide (:func:`background`)
   is subtracted, which removes illumination gradients and haze; the pixel
   noise is measured robustly (:func:`noise_sigma`).
3. **Seeds.** One seed per nucleus: local maxima, at least about half a
   nucleus apart, of a scale-normalised blob filter (Laplacian of Gaussian
   tuned to the nucleus radius) of the smoothed, background-corrected image.
   The blob filter peaks at the centre of each of two touching nuclei.
4. **Local foreground.** A seeded watershed of the smoothed image grows each
   seed over the pixels significantly above the noise; each nucleus then keeps
   only its pixels above a fixed fraction of its own peak height, so dim and
   bright nuclei are cut at the same relative level (no global threshold).
5. **Clean-up.** Holes inside a nucleus are filled, a nucleus split by the cut
   keeps its largest piece, and specks far smaller than a nucleus are dropped.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from ..errors import SegmentationError
from . import _kernels
from ._checks import check_diameter, check_image, check_positive, diameter_px as _diameter_px

__all__ = ["segment_nuclei", "estimate_diameter", "background", "noise_sigma", "METHODS"]

#: Nucleus segmentation backends: ``"auto"`` is qdplex's own ONNX model (:mod:`.infer`).
METHODS = ("auto", "classical", "cellpose", "stardist")

#: Images of more than 4 × TILE² pixels are segmented in TILE × TILE tiles (see :mod:`.tiles`).
TILE = 1024


# --------------------------------------------------------------------------- background and noise
def _block_reduce(img: np.ndarray, k: int, func) -> np.ndarray:
    """Reduce non-overlapping k×k blocks with ``func``; partial edge blocks use what they have."""
    H, W = img.shape
    ny, nx = -(-H // k), -(-W // k)
    Hf, Wf = (H // k) * k, (W // k) * k
    out = np.empty((ny, nx), img.dtype)
    if Hf and Wf:
        out[: H // k, : W // k] = func(img[:Hf, :Wf].reshape(H // k, k, W // k, k), axis=(1, 3))
    if Wf < W and Hf:
        out[: H // k, -1] = func(img[:Hf, Wf:].reshape(H // k, k, W - Wf), axis=(1, 2))
    if Hf < H and Wf:
        out[-1, : W // k] = func(img[Hf:, :Wf].reshape(H - Hf, W // k, k), axis=(0, 2))
    if Hf < H and Wf < W:
        out[-1, -1] = func(img[Hf:, Wf:], axis=(0, 1))
    return out


def _upsample(small: np.ndarray, k: int, shape, offset=(0, 0)) -> np.ndarray:
    """Bilinear interpolation of a grid of k×k block centres to ``shape``.

    ``offset`` is the (y, x) position of the output's first pixel in the grid's
    full-resolution frame, so that a tile can take its part of a slide's grid.
    """

    def axis(n, off, m):
        c = np.clip((np.arange(n, dtype=np.float64) + off + 0.5) / k - 0.5, 0, m - 1)
        i0 = np.minimum(c.astype(np.int64), m - 1)
        return i0, np.minimum(i0 + 1, m - 1), (c - i0).astype(np.float32)

    y0, y1, wy = axis(shape[0], offset[0], small.shape[0])
    x0, x1, wx = axis(shape[1], offset[1], small.shape[1])
    small = small.astype(np.float32, copy=False)
    rows = small[:, x0] * (1 - wx) + small[:, x1] * wx  # interpolate along x on the coarse rows
    out = rows[y0] * (1 - wy)[:, None]
    out += rows[y1] * wy[:, None]
    return out


def background_block(diameter_px: float) -> int:
    """Side in pixels of the blocks of the background grid: about two nucleus diameters."""
    return max(int(round(2.0 * diameter_px)), 2)


def smoothing_sigma(diameter_px: float) -> float:
    """Gaussian σ (pixels) of the scale-aware smoothing: 1/16 of the nucleus diameter, ≥ 0.7."""
    return max(0.7, float(diameter_px) / 16.0)


def smoothed_noise(noise: float, sigma: float) -> float:
    """Standard deviation left of white pixel noise ``noise`` after a Gaussian blur of ``sigma``."""
    return float(noise) / (2.0 * math.sqrt(math.pi) * sigma)


#: Background blocks are summarised by these percentiles of their smoothed pixels.
_PCTS = (10.0, 30.0)
_Z10 = 1.2816  # standard-normal distance from the 10th percentile to the mean
_Z10_30 = 1.2816 - 0.5244  # … and from the 10th to the 30th percentile
#: The local noise (correlated noise, haze texture) may exceed white pixel noise by this factor at most.
_NOISE_CAP = 3.0


def block_percentiles(smooth: np.ndarray, k: int) -> np.ndarray:
    """Per k×k block of the smoothed image, its 10th and 30th percentiles (ny × nx × 2)."""

    def pct(a, axis):
        a = np.moveaxis(a, axis, tuple(range(a.ndim - len(axis), a.ndim)))
        a = a.reshape(a.shape[: a.ndim - len(axis)] + (-1,))
        n = a.shape[-1] - 1
        kth = [int(p / 100.0 * n) for p in _PCTS]
        part = np.partition(a, kth, axis=-1)
        return np.stack([part[..., j] for j in kth], axis=-1)

    H, W = smooth.shape
    ny, nx = -(-H // k), -(-W // k)
    out = np.empty((ny, nx, len(_PCTS)), np.float32)
    Hf, Wf = (H // k) * k, (W // k) * k
    if Hf and Wf:
        out[: H // k, : W // k] = pct(smooth[:Hf, :Wf].reshape(H // k, k, W // k, k), (1, 3))
    if Wf < W and Hf:
        out[: H // k, -1] = pct(smooth[:Hf, Wf:].reshape(H // k, k, W - Wf), (1, 2))
    if Hf < H and Wf:
        out[-1, : W // k] = pct(smooth[Hf:, :Wf].reshape(H - Hf, W // k, k), (0, 2))
    if Hf < H and Wf < W:
        out[-1, -1] = pct(smooth[Hf:, Wf:], (0, 1))
    return out


def _repair(grid: np.ndarray) -> np.ndarray:
    """Replace blocks that read high because nuclei cover them, then smooth the grid.

    Each block takes the third lowest value of its 3 × 3 neighbourhood (a true
    background value as long as three neighbours see some background).
    """
    if grid.size >= 9:
        grid = ndi.percentile_filter(grid, 25, size=3, mode="nearest")
    grid = ndi.uniform_filter(grid, size=3, mode="nearest")
    return ndi.gaussian_filter(grid, 1.0, mode="nearest").astype(np.float32)


def background_grids(pcts: np.ndarray, noise_floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Background level and noise grids from block percentiles.

    In a block of pure background the smoothed pixels are about normal:
    the spread between the 10th and 30th percentiles gives the local noise
    (which also covers correlated noise and fixed-pattern texture that pixel
    differences miss), and the 10th percentile lifted by 1.28 noise levels
    gives the mean. Blocks covered by nuclei are repaired from their
    neighbours (:func:`_repair`). The noise lies between ``noise_floor`` (white
    pixel noise after smoothing) and ``_NOISE_CAP`` times it: in densely packed
    tissue no block is pure background and the spread measures nuclei, not noise.
    """
    p10, p30 = pcts[..., 0], pcts[..., 1]
    sig = np.clip((p30 - p10) / _Z10_30, noise_floor, _NOISE_CAP * noise_floor)
    bg = _repair(p10 + _Z10 * sig)
    sig = np.clip(_repair(sig), noise_floor, _NOISE_CAP * noise_floor)
    return bg, sig


def _background_and_noise(smooth: np.ndarray, d: float, noise_floor: float):
    k = background_block(d)
    bg, sig = background_grids(block_percentiles(smooth, k), noise_floor)
    return _upsample(bg, k, smooth.shape), _upsample(sig, k, smooth.shape)


def background(image, diameter_px: float, *, noise: float | None = None) -> np.ndarray:
    """Smooth background of a nuclear image, gradients and haze included, nuclei excluded.

    The image is smoothed at the nucleus scale and summarised on a grid of
    blocks about two nucleus diameters wide by a low percentile (lifted to the
    background mean using the measured noise). A block covered by nuclei is
    replaced from its neighbours (the third lowest of its 3 × 3 neighbourhood),
    and the grid is smoothed and interpolated back to full size. Illumination
    gradients and haze wider than a few nuclei are thereby removed; nuclei are not.

    Parameters
    ----------
    image : array_like
        2-D nuclear image.
    diameter_px : float
        Typical nucleus diameter in pixels.
    noise : float, optional
        Pixel noise level (:func:`noise_sigma` of the image when not given).

    Returns
    -------
    numpy.ndarray
        float32 background of the shape of ``image``.
    """
    img = check_image(image)
    d = check_positive(diameter_px, "nucleus diameter in pixels")
    sigma = smoothing_sigma(d)
    noise = noise_sigma(img) if noise is None else float(noise)
    smooth = ndi.gaussian_filter(img, sigma, mode="nearest")
    return _background_and_noise(smooth, d, smoothed_noise(noise, sigma))[0]


def noise_sigma(image) -> float:
    """Robust pixel-noise level: MAD of the differences of neighbouring pixels / √2.

    Differences cancel everything smooth (background, the inside of nuclei),
    so the median absolute difference measures the pixel noise.
    """
    img = np.asarray(image, np.float32)
    step = max(1, int(math.sqrt(img.size / 500_000)))  # a regular subsample is plenty
    sub = img[::step, :]
    d = np.concatenate([np.diff(sub, axis=1).ravel(), np.diff(img[:, ::step], axis=0).ravel()])
    if d.size == 0:
        return 0.0
    mad = np.median(np.abs(d - np.median(d)))
    return float(1.4826 * mad / math.sqrt(2.0))


# --------------------------------------------------------------------------- scale
def estimate_diameter(image, *, default: float = 20.0) -> float:
    """Estimate the typical nucleus diameter (pixels) of a nuclear image.

    Foreground from an Otsu threshold (at least 3 × the noise) of the
    background-corrected, smoothed image. Each connected object gives its
    equivalent diameter ``2·sqrt(area/π)`` when it is roundish and alone
    (equivalent diameter ≤ 1.6 × inscribed diameter, the inscribed diameter
    being twice the largest distance to the background), and 1.15 × its
    inscribed diameter otherwise (a clump of touching nuclei is about one
    nucleus wide). The answer is the size-weighted median; a second pass
    repeats the measurement with the background scaled to the first answer.
    Large images are measured on a central 1024 × 1024 crop.

    Parameters
    ----------
    image : array_like
        2-D nuclear image.
    default : float
        Returned when no object is found (e.g. an empty field).

    Returns
    -------
    float
        Typical nucleus diameter in pixels (at least 3).
    """
    from skimage.filters import threshold_otsu

    img = check_image(image)
    crop = 1024
    if img.shape[0] > crop or img.shape[1] > crop:
        y0 = max((img.shape[0] - crop) // 2, 0)
        x0 = max((img.shape[1] - crop) // 2, 0)
        img = np.ascontiguousarray(img[y0 : y0 + crop, x0 : x0 + crop])
    if not np.ptp(img) > 0:
        return float(default)
    noise = noise_sigma(img)
    guess = float(default)
    for _ in range(2):
        corr = ndi.gaussian_filter(img, 1.0, mode="nearest")
        bg, sig = _background_and_noise(corr, guess, smoothed_noise(noise, 1.0))
        corr -= bg
        if not np.ptp(corr) > 0:
            return float(default)
        t = max(float(threshold_otsu(corr)), 3.0 * float(np.median(sig)))
        fg = corr > t
        lab, n = ndi.label(fg)
        if n == 0:
            return float(default)
        area = np.bincount(lab.ravel())[1:].astype(float)
        edt = ndi.distance_transform_edt(fg)
        insc = 2.0 * _kernels.label_max(lab, edt, n)[1:]
        eqd = 2.0 * np.sqrt(area / np.pi)
        ok = (area >= 12) & (insc >= 2.0)
        if not ok.any():
            return float(default)
        area, insc, eqd = area[ok], insc[ok], eqd[ok]
        per_obj = np.where(eqd <= 1.6 * insc, eqd, 1.15 * insc)
        # weight by object size so that specks of debris do not dominate
        order = np.argsort(per_obj)
        w = np.cumsum(np.sqrt(area[order]))
        guess = float(per_obj[order][np.searchsorted(w, 0.5 * w[-1])])
    return max(guess, 3.0)


# --------------------------------------------------------------------------- classical segmenter
def _seeds(smooth: np.ndarray, fg: np.ndarray, d: float, threshold: np.ndarray) -> np.ndarray:
    """Seed markers: maxima of a nucleus-sized blob filter, about half a nucleus apart.

    The scale-normalised Laplacian of Gaussian (σ ≈ 0.28 d) of ``smooth`` is
    computed on a grid coarsened so that σ stays ≥ 2.5 grid pixels (the
    response is invariant to the coarsening); its local maxima inside ``fg``
    become seeds, each placed on the brightest full-resolution pixel of its grid
    cell, when the response there exceeds ``threshold`` (an image of levels).
    """
    sigma = max(1.0, 0.8 * (d / 2.0) / math.sqrt(2.0))
    f = max(1, int(sigma // 2.5))
    H, W = smooth.shape
    if f > 1:
        ny, nx = -(-H // f), -(-W // f)
        padded = np.full((ny * f, nx * f), -np.inf, np.float32)
        padded[:H, :W] = smooth
        cells = padded.reshape(ny, f, nx, f)
        small = _block_reduce(smooth, f, np.mean)
        fg_small = _block_reduce(fg, f, np.max)
    else:
        small, fg_small = smooth, fg
    blob = _log_response(small, sigma / f)
    min_dist = max(1, int(round(0.45 * d / f)))
    mx = ndi.maximum_filter(blob, size=2 * min_dist + 1, mode="nearest")
    peaks = (blob >= mx) & (blob > 0) & fg_small
    # a plateau of equal maxima is one seed
    plateau, n = ndi.label(peaks, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros(smooth.shape, np.int32)
    flat = _kernels.label_argmax(plateau, blob, n)[1:]
    strength = blob.ravel()[flat]
    pos = np.stack(np.unravel_index(flat, blob.shape), axis=1)
    if f > 1:
        blocks = cells[pos[:, 0], :, pos[:, 1], :].reshape(n, f * f)
        k = np.argmax(blocks, axis=1)
        pos = pos * f + np.stack([k // f, k % f], axis=1)
    keep = fg[pos[:, 0], pos[:, 1]] & (strength > threshold[pos[:, 0], pos[:, 1]])
    markers = np.zeros(smooth.shape, np.int32)
    markers[pos[keep, 0], pos[keep, 1]] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return markers


def _fill_holes(labels: np.ndarray) -> np.ndarray:
    """Fill each background region enclosed by a single object (not touching the image edge)."""
    bg, nb = ndi.label(labels == 0)
    if nb == 0:
        return labels
    owner = _kernels._hole_owner(bg, labels, nb)
    owner[0] = 0
    edge = np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))
    owner[edge] = 0
    owner[owner < 0] = 0
    if not owner.any():
        return labels
    fill = owner[bg]
    return np.where(fill > 0, fill, labels)


def _clean(labels: np.ndarray, *, min_area: float) -> np.ndarray:
    """Keep each label's largest connected piece, drop objects under ``min_area``, number 1..n (uint32)."""
    from skimage.measure import label as connected

    labels = np.asarray(labels)
    comp, nc = connected(labels, background=0, connectivity=1, return_num=True)
    if nc == 0:
        return np.zeros(labels.shape, np.uint32)
    area, owner = _kernels._component_owner(comp, labels.astype(np.int64, copy=False), nc)
    ids = np.arange(1, nc + 1)
    area, owner = area[1:], owner[1:]
    # the biggest piece of each label
    order = np.lexsort((-area, owner))
    first = np.ones(order.size, bool)
    first[1:] = owner[order][1:] != owner[order][:-1]
    best = order[first]
    best = best[area[best] >= min_area]
    best = best[np.argsort(owner[best])]  # number objects in the order of their old labels
    table = np.zeros(nc + 1, np.uint32)
    table[ids[best]] = np.arange(1, best.size + 1, dtype=np.uint32)
    return _kernels.relabel(comp.astype(np.int64, copy=False), table)


def _log_response(smooth: np.ndarray, sigma: float) -> np.ndarray:
    """Scale-normalised negative Laplacian of Gaussian (bright blobs positive)."""
    out = ndi.gaussian_laplace(smooth, sigma, mode="nearest")
    out *= -(sigma**2)
    return out


def classical_nuclei(
    image: np.ndarray,
    diameter_px: float,
    *,
    bg: np.ndarray | None = None,
    noise_map: np.ndarray | None = None,
    noise: float | None = None,
    rel_threshold: float = 0.35,
    snr: float = 3.0,
) -> np.ndarray:
    """The classical segmenter on a checked float32 image (see the module docstring).

    Parameters
    ----------
    image : numpy.ndarray
        2-D float32 nuclear image.
    diameter_px : float
        Typical nucleus diameter in pixels.
    bg, noise_map : numpy.ndarray, optional
        Background and noise level of the smoothed image, when they come from
        elsewhere (the whole slide, for a tile); measured on ``image`` otherwise.
    noise : float, optional
        White pixel-noise level (:func:`noise_sigma`), a floor for the noise map.
    rel_threshold : float
        Each nucleus keeps its pixels above this fraction of its peak height.
    snr : float
        Pixels (and seeds) must rise this many noise levels above the background.

    Returns
    -------
    numpy.ndarray
        uint32 labels 1..n.
    """
    d = float(diameter_px)
    r = d / 2.0
    noise = noise_sigma(image) if noise is None else float(noise)
    # smoothing scaled to the nucleus: suppresses chromatin texture and noise, keeps borders
    sigma = smoothing_sigma(d)
    smooth = ndi.gaussian_filter(image, sigma, mode="nearest")
    floor = smoothed_noise(noise, sigma)
    if not floor > 0:
        floor = max(1e-6 * float(np.abs(smooth).max()), 1e-12)
    if bg is None:
        bg, noise_map = _background_and_noise(smooth, d, floor)
    smooth -= bg
    fg = smooth > snr * noise_map
    if not fg.any():
        return np.zeros(image.shape, np.uint32)

    markers = _seeds(smooth, fg, d, 0.5 * snr * noise_map)
    # a foreground component without a seed gets one at its brightest pixel
    comp, ncomp = ndi.label(fg)
    has = np.zeros(ncomp + 1, bool)
    has[comp[markers > 0]] = True
    missing = np.flatnonzero(~has[1:]) + 1
    if missing.size:
        pos = _kernels.label_argmax(comp, smooth, ncomp)[missing]
        flat = markers.ravel()
        flat[pos] = int(markers.max()) + np.arange(1, missing.size + 1)
    del comp

    labels = _kernels.flood(-smooth, markers, fg)
    n = int(labels.max())
    if n == 0:
        return np.zeros(image.shape, np.uint32)
    # local foreground: each nucleus keeps its pixels above a fraction of its own peak
    peak = _kernels.label_max(labels, smooth, n).astype(np.float32)
    cut = rel_threshold * peak
    cut[0] = np.inf
    labels[smooth <= cut[labels]] = 0
    labels = _fill_holes(labels)
    return _clean(labels, min_area=max(0.08 * math.pi * r * r, 6.0))


# --------------------------------------------------------------------------- public
def resolve_method(method: str, model=None) -> str:
    """The backend that runs for ``method``: ``"auto"`` falls back to ``"classical"`` without onnxruntime.

    The fallback warns; when a ``model`` file was asked for explicitly it is an
    error instead.
    """
    if method not in METHODS:
        raise SegmentationError(f"expected a segmentation method in {METHODS}, found {method!r}")
    if method == "auto":
        from . import infer

        if not infer.available():
            if model is not None:
                raise SegmentationError(
                    f"expected onnxruntime to run the nucleus model {model}, found it not installed (pip install onnxruntime)"
                )
            import warnings

            warnings.warn("onnxruntime is not installed: segmenting nuclei with method='classical'", stacklevel=3)
            return "classical"
    return method


def segment_nuclei(
    image2d,
    *,
    diameter_um: float | None = None,
    pixel_size_um: float | None = None,
    method: str = "auto",
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
        Typical nucleus diameter in µm (needs ``pixel_size_um``). When neither
        this nor ``diameter_px`` is given it is measured from the image: by the
        model itself for ``"auto"`` (:func:`qdplex.segment.infer.estimate_diameter_model`,
        kept to nuclei of 3.5–20 µm when ``pixel_size_um`` is known), by
        :func:`estimate_diameter` for ``"classical"``.
    pixel_size_um : float, optional
        Pixel size in µm.
    method : {"auto", "classical", "cellpose", "stardist"}
        ``"auto"`` (default) runs qdplex's nucleus model (the one shipped in the
        package, or ``model``) with onnxruntime, offline; without onnxruntime it
        falls back to ``"classical"`` with a warning. ``"classical"`` is
        model-free. The deep-learning backends are used only when their package
        and weights are already installed locally; nothing is ever downloaded,
        and a :class:`~qdplex.errors.SegmentationError` says what is missing otherwise.
    diameter_px : float, optional
        Typical nucleus diameter in pixels (overrides ``diameter_um``).
    model : str, optional
        ``"auto"``: path of an ONNX nucleus model (e.g. from ``qdplex train-nuclei``)
        instead of the shipped one. Deep backends: a model name or a local model path.

    Returns
    -------
    numpy.ndarray
        uint32 labels, 0 = background, nuclei numbered 1…n. A blank image (all
        pixels equal, e.g. all zero) gives all-zero labels.

    Raises
    ------
    SegmentationError
        On an empty array, wrong dimensions, NaN or infinite pixels, a
        non-numeric dtype, an unknown method, a nucleus diameter that does not
        fit the image, an image smaller than a nucleus at the model's scale, a
        missing or unreadable model file, or an unavailable deep backend.

    Examples
    --------
    >>> from qdplex.synth import nuclear_field
    >>> image, truth = nuclear_field((256, 256), pixel_size_um=0.5, seed=1)
    >>> labels = segment_nuclei(image, pixel_size_um=0.5)
    >>> labels.dtype, labels.shape
    (dtype('uint32'), (256, 256))
    """
    method = resolve_method(method, model)
    img = check_image(image2d, "nuclear image")
    d = check_positive(diameter_px, "nucleus diameter in pixels") if diameter_px is not None else None
    if d is None:
        d = _diameter_px(diameter_um, pixel_size_um)
    if d is not None:
        check_diameter(d, img.shape)
    if method not in ("classical", "auto"):
        from . import deep

        return deep.segment(img, d, method=method, model=model)
    if not np.ptp(img) > 0:  # a blank field: nothing to find
        return np.zeros(img.shape, np.uint32)
    if method == "auto":
        from . import infer

        m = infer.load_model(model)
        if d is None:
            d = infer.estimate_diameter_model(img, model=m, pixel_size_um=pixel_size_um)
            if d is None:
                return np.zeros(img.shape, np.uint32)
        if img.size > 16 * TILE * TILE:  # the network tiles internally; beyond 4096², tiles of 2048²
            from .tiles import segment_tiled

            return segment_tiled(img, tile=2 * TILE, diameter_px=d, method="auto", model=model)
        return infer.model_nuclei(img, d, model=m)
    if d is None:
        d = estimate_diameter(img)
    if img.size > 4 * TILE * TILE:
        # large images run in overlapping tiles: cache-friendly, and on all cores
        from .tiles import segment_tiled

        return segment_tiled(img, tile=TILE, diameter_px=d)
    return classical_nuclei(img, d)
