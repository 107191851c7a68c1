"""Cells from nuclei, the membrane ring, and :func:`segment` (nuclei + cells + compartments)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage as ndi

from ..model import Segmentation
from . import _kernels, _ring
from ._checks import check_image, check_labels, check_positive, diameter_px as _diameter_px
from .nuclei import estimate_diameter, segment_nuclei

__all__ = ["expand_nuclei", "membrane_ring", "segment", "TYPICAL_NUCLEUS_UM"]

#: Nucleus diameter (µm) assumed to convert µm to pixels when the pixel size is unknown.
TYPICAL_NUCLEUS_UM = 10.0


def expand_nuclei(nuclei, distance_px: float, *, membrane=None) -> np.ndarray:
    """Grow nuclei into cells by up to ``distance_px``, shared fairly between neighbours.

    Without ``membrane`` every background pixel within ``distance_px`` of a
    nucleus joins the nearest nucleus (:func:`skimage.segmentation.expand_labels`),
    so two neighbours split the gap between them at its middle. With a
    membrane image, the pixels within the same reach are shared by a seeded
    watershed of the smoothed membrane intensity, so that cell borders follow
    the membrane staining.

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
    from skimage.segmentation import expand_labels

    nuc = check_labels(nuclei, "nucleus labels")
    dist = check_positive(distance_px, "expansion distance in pixels", allow_zero=True)
    if membrane is None:
        if dist == 0 or not nuc.any():
            return nuc.copy()
        return expand_labels(nuc, distance=dist).astype(np.uint32)
    mem = check_image(membrane, "membrane image")
    if mem.shape != nuc.shape:
        from ..errors import SegmentationError

        raise SegmentationError(f"expected a membrane image of the nuclei's shape {nuc.shape}, found {mem.shape}")
    if not nuc.any():
        return nuc.copy()
    reach = ndi.distance_transform_edt(nuc == 0) <= dist
    elev = ndi.gaussian_filter(mem, 1.0, mode="nearest")
    cells = _kernels.flood(elev, nuc.astype(np.int64), reach).astype(np.uint32)
    cells[nuc > 0] = nuc[nuc > 0]
    return cells


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
    method: str = "classical",
    tile: int | None = None,
    overlap: int | None = None,
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
        Typical nucleus diameter in µm; estimated from the image when not given.
    expand_um : float
        How far cells reach beyond their nucleus, in µm (default 5).
    membrane_width_um : float
        Width of the membrane ring at the cell boundary, in µm (default 1;
        at least one pixel).
    membrane_image : array_like, optional
        Membrane-marker image to guide the cell borders (see :func:`expand_nuclei`).
    method : {"classical", "cellpose", "stardist"}
        Nucleus segmentation backend (see :func:`segment_nuclei`).
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
    from .tiles import segment_tiled

    img = check_image(nuclear2d, "nuclear image")
    check_positive(expand_um, "expand_um", allow_zero=True)
    check_positive(membrane_width_um, "membrane_width_um", allow_zero=True)
    d = _diameter_px(diameter_um, pixel_size_um)
    blank = not np.ptp(img) > 0
    if d is None and not blank and (method == "classical" or pixel_size_um is None):
        d = estimate_diameter(img)
    d_ref = d or 2.0 * TYPICAL_NUCLEUS_UM
    if pixel_size_um is None:
        warnings.warn(
            f"pixel size unknown: converting µm to pixels assuming a nucleus is "
            f"{TYPICAL_NUCLEUS_UM:g} µm ({d_ref:.1f} px) across",
            stacklevel=2,
        )
    if tile is not None and max(img.shape) > tile:
        nuclei = np.asarray(segment_tiled(img, tile=tile, overlap=overlap, method=method, diameter_px=d))
    else:
        nuclei = segment_nuclei(img, method=method, diameter_px=d)
    expand_px = _um_to_px(expand_um, pixel_size_um, d_ref)
    width_px = max(_um_to_px(membrane_width_um, pixel_size_um, d_ref), 1.0)
    cells = expand_nuclei(nuclei, expand_px, membrane=membrane_image)
    return Segmentation(nuclei=nuclei, cells=cells, membrane_width_px=width_px)
