"""Cells from nuclei, the membrane ring, and :func:`segment` (nuclei + cells + compartments)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage as ndi

from ..model import Segmentation
from . import _kernels, _ring
from ._checks import check_diameter, check_image, check_labels, check_positive, diameter_px as _diameter_px
from .nuclei import estimate_diameter, segment_nuclei

__all__ = ["expand_nuclei", "local_reach", "membrane_ring", "segment", "TYPICAL_NUCLEUS_UM"]

#: Nucleus diameter (µm) assumed to convert µm to pixels when the pixel size is unknown.
TYPICAL_NUCLEUS_UM = 10.0


#: Without a membrane image a cell reaches at most this fraction of the local nucleus spacing
#: (median centre distance to its nearest neighbours) from its centre.
SPACING_REACH = 0.6
#: Neighbours that define the local nucleus spacing.
SPACING_NEIGHBOURS = 4


def local_reach(nuclei: np.ndarray, distance_px: float) -> np.ndarray:
    """Per nucleus ID, how far (pixels beyond its edge) its cell may grow.

    ``min(distance_px, SPACING_REACH · L − r)`` (at least one pixel), where
    ``L`` is the median distance from the nucleus's centre to its
    :data:`SPACING_NEIGHBOURS` nearest neighbours and ``r`` its equivalent
    radius: in a dense neighbourhood a cell stays about as large as its share
    of the tissue, towards free space as well; an isolated nucleus grows the
    full ``distance_px``. Index 0 (background) is 0.
    """
    from scipy.spatial import cKDTree

    n = int(nuclei.max())
    reach = np.full(n + 1, float(distance_px))
    reach[0] = 0.0
    if n < 2:
        return reach
    flat = nuclei.ravel().astype(np.int64)
    area = np.bincount(flat, minlength=n + 1).astype(float)
    yy, xx = np.indices(nuclei.shape, dtype=np.float64)
    cy = np.bincount(flat, yy.ravel(), minlength=n + 1)
    cx = np.bincount(flat, xx.ravel(), minlength=n + 1)
    ids = np.flatnonzero(area[1:] > 0) + 1
    pts = np.stack([cy[ids] / area[ids], cx[ids] / area[ids]], axis=1)
    k = min(SPACING_NEIGHBOURS, len(ids) - 1)
    dist, _ = cKDTree(pts).query(pts, k=k + 1)
    spacing = np.median(np.atleast_2d(dist)[:, 1:], axis=1)
    r = np.sqrt(area[ids] / np.pi)
    reach[ids] = np.clip(SPACING_REACH * spacing - r, 1.0, float(distance_px))
    return reach


def _membrane_mask(mem: np.ndarray) -> np.ndarray | None:
    """Pixels with membrane signal: the smoothed image above an Otsu threshold (None when flat)."""
    from skimage.filters import threshold_otsu

    if not np.ptp(mem) > 0:
        return None
    t = float(threshold_otsu(mem))
    return mem > t


def expand_nuclei(nuclei, distance_px: float, *, membrane=None) -> np.ndarray:
    """Grow nuclei into cells by up to ``distance_px``, shared fairly between neighbours.

    Without ``membrane`` every background pixel joins the nearest nucleus when
    it lies within that nucleus's reach (:func:`local_reach`: ``distance_px``,
    but no more than the local nucleus spacing allows), so two neighbours split
    the gap between them at its middle and cells in dense tissue do not
    overshoot into their surroundings. With a membrane image the pixels within
    ``distance_px`` are shared by a seeded watershed of the smoothed membrane
    intensity, so that cell borders follow the membrane staining, and a cell
    stops where the signal ends: no pixel of it lies farther from its nucleus
    than its farthest pixel with membrane signal (above an Otsu threshold of
    the smoothed membrane image) plus one, nor beyond the reach it would have
    without membrane; a cell without membrane signal of its own (a
    marker-negative cell) is bounded as without membrane, and so is every
    cell when the membrane image is flat.

    Parameters
    ----------
    nuclei : array of int
        Y×X nucleus labels.
    distance_px : float
        Largest growth in pixels (≥ 0).
    membrane : array_like, optional
        Y×X membrane-marker image (e.g. the sum of the membrane markers' abundances).

    Returns
    -------
    numpy.ndarray
        uint32 cell labels; each cell carries its nucleus's ID and contains it.
    """
    nuc = check_labels(nuclei, "nucleus labels")
    dist = check_positive(distance_px, "expansion distance in pixels", allow_zero=True)
    if dist == 0 or not nuc.any():
        return nuc.copy()
    d_out, (iy, ix) = ndi.distance_transform_edt(nuc == 0, return_indices=True)
    mask = None
    if membrane is not None:
        mem = check_image(membrane, "membrane image")
        if mem.shape != nuc.shape:
            from ..errors import SegmentationError

            raise SegmentationError(f"expected a membrane image of the nuclei's shape {nuc.shape}, found {mem.shape}")
        elev = ndi.gaussian_filter(mem, 1.0, mode="nearest")
        mask = _membrane_mask(elev)
    if mask is None:
        nearest = nuc[iy, ix]
        reach = local_reach(nuc, dist)
        return np.where(d_out <= reach[nearest], nearest, 0).astype(np.uint32)
    cells = _kernels.flood(elev, nuc.astype(np.int64), d_out <= dist).astype(np.int64)
    # each cell stops at its membrane: no farther from its nucleus than its own membrane-positive pixels
    n = int(nuc.max())
    own = np.where(mask & (nuc == 0), cells, 0)
    limit = _kernels.label_max(own, d_out.astype(np.float32), n).astype(np.float64)
    spacing = local_reach(nuc, dist)
    limit = np.where(limit > 0, np.minimum(limit + 1.0, spacing), spacing)
    limit[0] = 0.0
    cells[d_out > limit[cells]] = 0
    cells[nuc > 0] = nuc[nuc > 0]
    return cells.astype(np.uint32)


def membrane_ring(cells, width_px: float) -> np.ndarray:
    """The membrane compartment: a ring of ``width_px`` at the inner boundary of each cell.

    A cell's boundary pixels are its own pixels with a 4-neighbour of another
    label (background or another cell); the ring holds the cell's pixels closer
    than ``width_px`` to a boundary pixel (boundary pixels at distance 0, so a
    width of 1 gives the one-pixel outline). The image border is not a boundary.

    Parameters
    ----------
    cells : array of int
        Y×X cell labels.
    width_px : float
        Ring width in pixels (> 0).

    Returns
    -------
    numpy.ndarray
        uint32 labels with the cells' IDs on the ring, 0 elsewhere.
    """
    lab = check_labels(cells, "cell labels")
    width = check_positive(width_px, "membrane width in pixels")
    return _ring.ring(np.ascontiguousarray(lab), float(width))


def _um_to_px(value_um: float, pixel_size_um, nucleus_px: float) -> float:
    if pixel_size_um is not None:
        return float(value_um) / check_positive(pixel_size_um, "pixel_size_um")
    # unknown pixel size: scale by the nucleus size (a nucleus is ~TYPICAL_NUCLEUS_UM across)
    return float(value_um) * nucleus_px / TYPICAL_NUCLEUS_UM


def segment(
    nuclear2d,
    *,
    pixel_size_um: float | None = None,
    diameter_um: float | None = None,
    expand_um: float = 5.0,
    membrane_width_um: float = 1.0,
    membrane_image=None,
    method: str = "auto",
    tile: int | None = None,
    overlap: int | None = None,
    model: str | None = None,
) -> Segmentation:
    """Nuclei, cells and compartments from a nuclear-stain image.

    Parameters
    ----------
    nuclear2d : array_like
        Y×X nuclear-stain image (numpy or dask).
    pixel_size_um : float, optional
        Pixel size in µm. When unknown, µm are converted to pixels assuming
        that the (estimated) nucleus diameter is 10 µm, with a warning.
    diameter_um : float, optional
        Typical nucleus diameter in µm; measured from the image when not given.
    expand_um : float
        How far cells reach beyond their nucleus at most, in µm (default 5);
        less in dense neighbourhoods (see :func:`expand_nuclei`).
    membrane_width_um : float
        Width of the membrane ring at the cell boundary, in µm (default 1;
        at least one pixel).
    membrane_image : array_like, optional
        Membrane-marker image to guide the cell borders (see :func:`expand_nuclei`).
    method : {"auto", "classical", "cellpose", "stardist"}
        Nucleus segmentation backend (see :func:`segment_nuclei`); ``"auto"``
        (default) is qdplex's shipped nucleus model.
    model : str, optional
        ``"auto"``: an ONNX nucleus model file instead of the shipped one.
    tile, overlap : int, optional
        Segment the nuclei tile by tile (:func:`segment_tiled`) when the image
        is larger than ``tile`` pixels on a side.

    Returns
    -------
    qdplex.model.Segmentation
        ``nuclei`` and ``cells`` (same IDs) and ``membrane_width_px``; the
        ``cytoplasm`` and ``membrane`` compartments derive from them.

    Examples
    --------
    >>> from qdplex.synth import nuclear_field
    >>> image, _ = nuclear_field((128, 128), pixel_size_um=0.5, seed=2)
    >>> seg = segment(image, pixel_size_um=0.5, expand_um=3.0)
    >>> bool((seg.cells[seg.nuclei > 0] == seg.nuclei[seg.nuclei > 0]).all())
    True
    """
    from .nuclei import resolve_method
    from .tiles import segment_tiled

    method = resolve_method(method, model)
    img = check_image(nuclear2d, "nuclear image")
    check_positive(expand_um, "expand_um", allow_zero=True)
    check_positive(membrane_width_um, "membrane_width_um", allow_zero=True)
    d = _diameter_px(diameter_um, pixel_size_um)
    if d is not None:
        check_diameter(d, img.shape)
    blank = not np.ptp(img) > 0
    if d is None and not blank and method == "auto":
        from .infer import estimate_diameter_model

        d = estimate_diameter_model(img, model=model, pixel_size_um=pixel_size_um)
    elif d is None and not blank and (method == "classical" or pixel_size_um is None):
        d = estimate_diameter(img)
    d_ref = d or 2.0 * TYPICAL_NUCLEUS_UM
    if pixel_size_um is None:
        warnings.warn(
            f"pixel size unknown: converting µm to pixels assuming a nucleus is "
            f"{TYPICAL_NUCLEUS_UM:g} µm ({d_ref:.1f} px) across",
            stacklevel=2,
        )
    if tile is not None and max(img.shape) > tile:
        nuclei = np.asarray(segment_tiled(img, tile=tile, overlap=overlap, method=method, diameter_px=d, model=model))
    elif method == "auto" and d is None and not blank:
        nuclei = np.zeros(img.shape, np.uint32)  # the model finds no nucleus at any scale
    else:
        nuclei = segment_nuclei(img, method=method, diameter_px=d, model=model)
    expand_px = _um_to_px(expand_um, pixel_size_um, d_ref)
    width_px = max(_um_to_px(membrane_width_um, pixel_size_um, d_ref), 1.0)
    cells = expand_nuclei(nuclei, expand_px, membrane=membrane_image)
    return Segmentation(nuclei=nuclei, cells=cells, membrane_width_px=width_px)
