"""Input validation shared by the segmentation modules."""

from __future__ import annotations

import numpy as np

from ..errors import SegmentationError


def check_shape(arr, what: str = "image"):
    """``arr`` (numpy or dask, not computed) if it is a non-empty numeric 2-D array, else SegmentationError."""
    if arr.ndim != 2:
        raise SegmentationError(
            f"expected a 2-D Y×X {what}, found {arr.ndim} dimensions with shape {tuple(arr.shape)}"
        )
    if arr.size == 0:
        raise SegmentationError(f"expected a non-empty 2-D {what}, found shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biuf":
        raise SegmentationError(f"expected a numeric {what}, found dtype {arr.dtype}")
    return arr


def check_image(image, what: str = "image") -> np.ndarray:
    """A finite, non-empty 2-D float32 array, or :class:`SegmentationError`."""
    if hasattr(image, "compute") and not isinstance(image, np.ndarray):
        image = image.compute()
    arr = check_shape(np.asarray(image), what)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        n = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise SegmentationError(
            f"expected only finite values in the {what}, found {n} NaN or infinite pixels"
        )
    return arr


def check_labels(labels, what: str = "labels") -> np.ndarray:
    """A 2-D non-negative integer label image as uint32, or :class:`SegmentationError`."""
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


def check_positive(value, what: str, *, allow_zero: bool = False) -> float:
    """``value`` as a float, when it is a positive (or non-negative) number."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise SegmentationError(f"expected a {kind} {what}, found {value!r}")
    return float(value)


def diameter_px(diameter_um, pixel_size_um) -> float | None:
    """Nucleus diameter in pixels from µm and the pixel size (None when not given)."""
    if diameter_um is None:
        return None
    d = check_positive(diameter_um, "diameter_um")
    if pixel_size_um is None:
        raise SegmentationError(
            f"expected pixel_size_um to convert diameter_um={diameter_um} to pixels, found None "
            "(give the pixel size, or leave diameter_um out to estimate it)"
        )
    return d / check_positive(pixel_size_um, "pixel_size_um")


def check_diameter(d: float, shape, what: str = "nuclear image") -> float:
    """``d`` (pixels) when a nucleus that wide fits the image (≥ 0.5 px, ≤ the longer side), else SegmentationError.

    Checked before anything is allocated, so that an absurd diameter (e.g. a
    µm value given as pixels) fails at once instead of filling memory.
    """
    side = max(int(s) for s in shape)
    if not (0.5 <= d <= side):
        raise SegmentationError(
            f"expected a nucleus diameter between 0.5 px and the image's longer side ({side} px) "
            f"for the {what} of shape {tuple(int(s) for s in shape)}, found {d:.4g} px"
        )
    return float(d)
