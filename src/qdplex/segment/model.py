"""What the nucleus model and its training share: scale, intensity normalisation, targets.

The model sees nuclei at a fixed nominal size (:data:`NOMINAL_DIAMETER` pixels):
every image is rescaled so that its typical nucleus is that wide, both when
training and when segmenting. Intensities are normalised per image by robust
percentiles (:func:`normalise`), which makes 8-, 12- and 16-bit data, dim and
bright fields alike. The model predicts three classes per pixel —
background, nucleus interior and nucleus boundary (:func:`targets`) — from
which a seeded watershed recovers the instances (see :mod:`.infer`).

This module needs numpy and scipy only; training (:mod:`.train`) adds PyTorch,
inference (:mod:`.infer`) onnxruntime.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["NOMINAL_DIAMETER", "LOW_PCT", "HIGH_PCT", "normalise_levels", "normalise", "targets", "median_diameter"]

#: Nucleus diameter (pixels) at which the model sees nuclei.
NOMINAL_DIAMETER = 16.0
#: Percentiles mapped to 0 and 1 by :func:`normalise`.
LOW_PCT, HIGH_PCT = 1.0, 99.8
#: Classes predicted per pixel.
CLASSES = ("background", "interior", "boundary")


def normalise_levels(image: np.ndarray, *, max_samples: int = 1_000_000) -> tuple[float, float]:
    """The intensities mapped to 0 and 1: the LOW_PCT and HIGH_PCT percentiles (on a subsample).

    A flat image returns ``(v, v)``; callers treat a zero range as "nothing here".
    """
    a = np.asarray(image)
    step = max(1, int(np.sqrt(a.size / max_samples)))
    sub = np.asarray(a[::step, ::step], np.float32).ravel()
    lo, hi = np.percentile(sub, [LOW_PCT, HIGH_PCT])
    if not hi > lo:  # mostly flat (e.g. a few bright pixels on zeros): use the full range
        lo, hi = float(sub.min()), float(sub.max())
    return float(lo), float(hi)


def normalise(image: np.ndarray, levels: tuple[float, float] | None = None) -> np.ndarray:
    """float32 ``(image - lo) / (hi - lo)`` with ``levels = (lo, hi)`` (from :func:`normalise_levels`).

    A flat image (``hi == lo``) becomes all zeros.
    """
    lo, hi = normalise_levels(image) if levels is None else levels
    out = np.asarray(image, np.float32) - np.float32(lo)
    if hi > lo:
        out *= np.float32(1.0 / (hi - lo))
    else:
        out[:] = 0.0
    return out


def targets(labels: np.ndarray) -> np.ndarray:
    """Per-pixel class (0 background, 1 interior, 2 boundary) of an instance label image.

    A nucleus pixel is boundary when its 3 × 3 neighbourhood holds another
    label or background, so two touching nuclei are kept apart by two boundary
    pixels and every interior component is one nucleus.
    """
    lab = np.asarray(labels)
    mx = ndi.maximum_filter(lab, size=3, mode="nearest")
    mn = ndi.minimum_filter(lab, size=3, mode="nearest")
    out = np.zeros(lab.shape, np.int64)
    fg = lab > 0
    out[fg] = 1
    out[fg & ((mx != lab) | (mn != lab))] = 2
    return out


def median_diameter(labels: np.ndarray) -> float | None:
    """Median equivalent diameter ``2·sqrt(area/π)`` of the labelled objects (None when none)."""
    lab = np.asarray(labels)
    area = np.bincount(lab.ravel().astype(np.int64))[1:]
    area = area[area > 0]
    if area.size == 0:
        return None
    return float(2.0 * np.sqrt(np.median(area) / np.pi))
