"""Colours for the plugin: emission wavelength → RGB, and table values → label colours.

Kept free of napari imports so it is cheap to test; napari objects are built by the
callers from the plain arrays returned here.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["wavelength_to_rgb", "emission_nm", "values_to_rgba"]

_QD_NM = re.compile(r"^QD(\d{3})$")


def wavelength_to_rgb(nm: float) -> np.ndarray:
    """An RGB display colour for light of wavelength ``nm``.

    Visible light (380–700 nm) follows the piecewise-linear approximation of
    D. Bruton (1996) at full brightness, so that each colour stays usable as a
    colormap end point. The near infrared (> 700 nm, e.g. Qdot 705 and 800) has no
    colour of its own; it is shown as a false colour going from red at 700 nm to
    magenta at 850 nm so that QD705 and QD800 stay distinct. Below 380 nm the
    380 nm violet is used.

    Parameters
    ----------
    nm : float
        Wavelength in nanometres.

    Returns
    -------
    numpy.ndarray
        ``(3,)`` float RGB in [0, 1].
    """
    w = float(nm)
    if w > 700:
        t = min((w - 700.0) / 150.0, 1.0)
        return np.array([1.0, 0.0, 0.25 + 0.75 * t])
    w = max(w, 380.0)
    if w < 440:
        rgb = (-(w - 440) / (440 - 380), 0.0, 1.0)
    elif w < 490:
        rgb = (0.0, (w - 440) / (490 - 440), 1.0)
    elif w < 510:
        rgb = (0.0, 1.0, -(w - 510) / (510 - 490))
    elif w < 580:
        rgb = ((w - 510) / (580 - 510), 1.0, 0.0)
    elif w < 645:
        rgb = (1.0, -(w - 645) / (645 - 580), 0.0)
    else:
        rgb = (1.0, 0.0, 0.0)
    return np.array(rgb, dtype=float)


def emission_nm(channel, library=None) -> float | None:
    """The emission peak used to colour ``channel`` (a :class:`qdplex.model.Channel`).

    In order: the channel's own ``emission_nm``; the peak of its fluor (or name) in
    ``library`` (a :class:`qdplex.spectra.SpectralLibrary`, via ``peak_nm``); the
    number in a Qdot name (``QD655`` emits at 655 nm by definition). None when
    nothing is known (autofluorescence, residual, unknown dyes).
    """
    if getattr(channel, "emission_nm", None) is not None and np.isfinite(channel.emission_nm):
        return float(channel.emission_nm)
    for name in (getattr(channel, "fluor", None), getattr(channel, "name", None)):
        if not name:
            continue
        if library is not None and name in library and not str(name).upper().startswith("AF"):
            try:
                return float(library.peak_nm(name))
            except Exception:  # a library without that spectrum's peak: try the next source
                pass
        m = _QD_NM.match(str(name).upper())
        if m:
            return float(m.group(1))
    return None


def values_to_rgba(values, cmap: str = "viridis", vmin=None, vmax=None, *, levels: int = 256):
    """Map numbers to RGBA colours through a matplotlib colormap.

    Values are quantised to ``levels`` colours (napari renders a label colormap
    with few distinct colours faster); NaN maps to transparent.

    Returns
    -------
    rgba : numpy.ndarray
        ``(N, 4)`` float colours.
    vmin, vmax : float
        The limits used (the 1st and 99th percentiles of the finite values when not given).
    """
    from matplotlib import colormaps

    v = np.asarray(values, dtype=float)
    finite = np.isfinite(v)
    if vmin is None or vmax is None:
        lo, hi = (np.percentile(v[finite], [1, 99]) if finite.any() else (0.0, 1.0))
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    vmin, vmax = float(vmin), float(vmax)
    span = vmax - vmin if vmax > vmin else 1.0
    idx = np.clip(((v - vmin) / span * (levels - 1)).round(), 0, levels - 1)
    table = colormaps[cmap].resampled(levels)(np.arange(levels))
    rgba = table[np.where(finite, idx, 0).astype(int)]
    rgba[~finite] = 0.0
    return rgba, vmin, vmax
