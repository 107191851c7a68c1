"""QC pictures for the HTML reports: plain functions from arrays to pictures.

Image previews (composite, segmentation outlines, residual) are built as RGB arrays
(:func:`composite_rgb`, :func:`segmentation_rgb`, :func:`residual_rgb`) and inlined
pixel for pixel by :func:`rgb_to_data_uri`, with no plotting machinery. Charts
(histograms, spectra, score distributions) are :class:`matplotlib.figure.Figure`
objects on the Agg canvas (no pyplot, no global state, no display: safe on dask
workers), inlined by :func:`to_data_uri`.

Images are shown at most ``max_side`` pixels on their longer side:
:func:`preview` subsamples a (lazy) plane by striding before computing it, so a
whole-slide image never has to be loaded in full to draw its QC picture.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "PALETTE",
    "NUCLEAR_RGB",
    "AF_RGB",
    "preview",
    "previews",
    "stretch",
    "composite_rgb",
    "segmentation_rgb",
    "residual_rgb",
    "colormap_css",
    "rgb_to_data_uri",
    "histogram_figure",
    "spectra_figure",
    "distribution_figure",
    "to_data_uri",
]

#: Categorical colours of marker planes in the composite (distinct on black; DAPI is blue).
PALETTE = (
    (1.0, 0.15, 0.15),  # red
    (0.1, 1.0, 0.1),  # green
    (1.0, 0.1, 1.0),  # magenta
    (0.1, 1.0, 1.0),  # cyan
    (1.0, 1.0, 0.1),  # yellow
    (1.0, 0.55, 0.0),  # orange
    (0.6, 0.6, 1.0),  # lavender
    (1.0, 1.0, 1.0),  # white
)
NUCLEAR_RGB = (0.15, 0.35, 1.0)
AF_RGB = (0.6, 0.6, 0.6)
NUCLEUS_EDGE = (0.0, 0.9, 1.0)
CELL_EDGE = (1.0, 0.85, 0.0)
SATURATED_RGB = (0.0, 1.0, 0.0)


def _figure(width_in: float, height_in: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def preview(plane, max_side: int = 1024) -> np.ndarray:
    """A plane subsampled by striding so that its longer side is at most ``max_side``.

    Parameters
    ----------
    plane : array-like (numpy or dask), Y×X or C×Y×X
        The image; a dask array is sliced before it is computed.
    max_side : int
        Longest side of the result in pixels.

    Returns
    -------
    numpy.ndarray
        The subsampled plane (nearest-neighbour, so label images stay labels).
    """
    return previews([plane], max_side)[0]


def previews(planes: Sequence, max_side: int = 1024) -> list[np.ndarray | None]:
    """:func:`preview` of several planes in one dask computation.

    Planes that share a lazy graph (abundance planes, residual and saturation mask of one
    unmixing) are computed once, not once per plane. ``None`` entries stay ``None``.
    """
    import dask

    subs = []
    for plane in planes:
        if plane is None:
            subs.append(None)
            continue
        step = max(1, math.ceil(max(plane.shape[-2:]) / max_side))
        subs.append(plane[..., ::step, ::step])
    lazy = [i for i, a in enumerate(subs) if a is not None and hasattr(a, "dask")]
    if lazy:
        done = dask.compute(*[subs[i] for i in lazy])
        for i, a in zip(lazy, done):
            subs[i] = a
    return [None if a is None else np.asarray(a) for a in subs]


def stretch(plane: np.ndarray, low: float = 1.0, high: float = 99.5, *, min_top: float | None = None) -> np.ndarray:
    """Contrast-stretch a plane to [0, 1] between its ``low`` and ``high`` percentiles.

    ``min_top`` sets a floor for the top of the range (e.g. twice a marker's positivity
    threshold), so that a plane holding only background is not stretched into a
    bright picture of its noise. Non-finite pixels become 0; a constant plane, all zeros.
    """
    a = np.asarray(plane, dtype=np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.float32)
    lo, hi = np.percentile(a[finite], [low, high])
    if min_top is not None and np.isfinite(min_top):
        hi = max(hi, float(min_top))
    if not hi > lo:
        return np.zeros(a.shape, np.float32)
    out = (np.where(finite, a, lo) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def composite_rgb(planes: Sequence[np.ndarray], colors: Sequence[Sequence[float]],
                  min_tops: Sequence[float | None] | None = None) -> np.ndarray:
    """Additive colour composite of contrast-stretched planes.

    Parameters
    ----------
    planes : sequence of Y×X arrays
        One plane per colour.
    colors : sequence of RGB triples in [0, 1]
        The colour of each plane.
    min_tops : sequence of float or None, optional
        Per plane, a floor for the top of its stretch (see :func:`stretch`).

    Returns
    -------
    numpy.ndarray
        Y×X×3 float32 RGB in [0, 1].
    """
    if len(planes) != len(colors):
        raise ValueError(f"expected one colour per plane, found {len(colors)} colours for {len(planes)} planes")
    if not planes:
        raise ValueError("expected at least one plane, found none")
    tops = list(min_tops) if min_tops is not None else [None] * len(planes)
    rgb = np.zeros(np.asarray(planes[0]).shape + (3,), np.float32)
    for plane, color, top in zip(planes, colors, tops):
        rgb += stretch(plane, min_top=top)[..., None] * np.asarray(color, np.float32)
    return np.clip(rgb, 0.0, 1.0)


def segmentation_rgb(nuclear: np.ndarray, nuclei: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """The nuclear stain in grey with nucleus outlines (:data:`NUCLEUS_EDGE`) and cell outlines
    (:data:`CELL_EDGE`), as Y×X×3 float RGB in [0, 1]."""
    from skimage.segmentation import find_boundaries

    grey = stretch(nuclear)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[find_boundaries(np.asarray(cells), mode="inner")] = CELL_EDGE
    rgb[find_boundaries(np.asarray(nuclei), mode="inner")] = NUCLEUS_EDGE
    return rgb


def residual_rgb(residual: np.ndarray, saturated: np.ndarray | None = None, *, cmap: str = "magma",
                 vmax: float | None = None) -> tuple[np.ndarray, float]:
    """The per-pixel residual through a colormap (0 → ``vmax``, default its 99.5th percentile);
    saturated pixels in :data:`SATURATED_RGB`. Returns ``(Y×X×3 RGB, vmax)``."""
    from matplotlib import colormaps

    r = np.asarray(residual, dtype=np.float32)
    finite = np.isfinite(r)
    if vmax is None:
        vmax = float(np.percentile(r[finite], 99.5)) if finite.any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    rgb = colormaps[cmap](np.clip(np.where(finite, r, 0.0) / vmax, 0.0, 1.0))[..., :3]
    if saturated is not None:
        rgb[np.asarray(saturated, bool)] = SATURATED_RGB
    return rgb.astype(np.float32), vmax


def colormap_css(cmap: str = "magma", steps: int = 8) -> str:
    """A CSS ``linear-gradient`` of a matplotlib colormap (for an HTML colour bar)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cm = colormaps[cmap]
    stops = ", ".join(to_hex(cm(i / (steps - 1))) for i in range(steps))
    return f"linear-gradient(to right, {stops})"


def rgb_to_data_uri(rgb: np.ndarray, fmt: str = "png", *, quality: int = 88) -> str:
    """An RGB image (Y×X×3 floats in [0, 1]) as an inline ``data:`` URI, pixel for pixel.

    ``fmt="png"`` is lossless (crisp outlines); ``fmt="jpeg"`` is 5–10× smaller for noisy
    fluorescence pictures, where a report of a whole slide would otherwise weigh tens of MB.
    """
    from matplotlib.image import imsave

    if fmt not in ("png", "jpeg"):
        raise ValueError(f"expected fmt 'png' or 'jpeg', found {fmt!r}")
    buf = io.BytesIO()
    img = np.clip(np.asarray(rgb, dtype=np.float32), 0.0, 1.0)
    if fmt == "jpeg":
        imsave(buf, img, format="jpeg", pil_kwargs={"quality": int(quality)})
    else:
        imsave(buf, img, format="png")
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def histogram_figure(values: Mapping[str, np.ndarray], thresholds: Mapping[str, float] | None = None, *,
                     xlabel: str = "mean abundance in the marker's compartment", bins: int = 60):
    """One histogram of per-cell values per marker, with its positivity threshold as a red line.

    Parameters
    ----------
    values : mapping marker → 1-D array
        Per-cell values (e.g. the marker's column of ``cells.csv``).
    thresholds : mapping marker → float, optional
        Positivity thresholds; markers without one get no line.
    """
    thresholds = thresholds or {}
    names = list(values)
    n = max(len(names), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(3.4 * cols, 2.6 * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        v = np.asarray(values[name], dtype=float)
        v = v[np.isfinite(v)]
        color = PALETTE[i % len(PALETTE)]
        if v.size:
            ax.hist(v, bins=bins, color=tuple(0.8 * c for c in color), edgecolor="none")
        thr = thresholds.get(name)
        label = name
        if thr is not None and np.isfinite(thr):
            ax.axvline(float(thr), color="red", lw=1.5)
            pos = float(np.mean(v > thr) * 100) if v.size else float("nan")
            label = f"{name}  (threshold {thr:.3g}, {pos:.1f}% positive)"
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("cells", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14 / rows * 1.6, top=1 - 0.1 / rows * 1.6,
                        wspace=0.3, hspace=0.55)
    return fig


def spectra_figure(wavelengths: np.ndarray, spectra: Mapping[str, np.ndarray], *,
                   bands: Sequence[tuple[float, float]] | None = None,
                   labels: Mapping[str, str] | None = None, colors: Mapping[str, Sequence[float]] | None = None,
                   title: str = "Reference emission spectra"):
    """Reference spectra (each scaled to a maximum of 1) with the image's channel bands shaded.

    Parameters
    ----------
    wavelengths : 1-D array
        Common wavelength grid in nm.
    spectra : mapping name → 1-D array
        Intensity of each endmember on ``wavelengths``.
    bands : sequence of (low, high) in nm, optional
        The image's channel bands, shaded grey.
    labels : mapping name → str, optional
        Legend labels (e.g. ``"QD655 (HER2)"``).
    colors : mapping name → RGB, optional
        Line colours (default: the palette in order).
    """
    labels = labels or {}
    colors = colors or {}
    fig = _figure(8.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for low, high in bands or ():
        ax.axvspan(low, high, color="0.32", lw=0, zorder=0)
    wl = np.asarray(wavelengths, dtype=float)
    for i, (name, s) in enumerate(spectra.items()):
        s = np.asarray(s, dtype=float)
        peak = np.nanmax(s) if s.size and np.isfinite(s).any() else 0.0
        ax.plot(wl, s / peak if peak > 0 else s, lw=1.6, label=labels.get(name, name),
                color=colors.get(name, PALETTE[i % len(PALETTE)]))
    if bands:
        lo = min(b[0] for b in bands)
        hi = max(b[1] for b in bands)
        ax.set_xlim(lo - 60.0, hi + 60.0)
    ax.set_xlabel("wavelength (nm)")
    ax.set_ylabel("relative emission")
    ax.set_title(title, fontsize=11)
    ax.set_facecolor("0.08")
    ax.legend(fontsize=8, ncol=2, loc="upper right", facecolor="white")
    fig.tight_layout()
    return fig


def distribution_figure(table, columns: Sequence[str], *, title: str = "Score distributions across slides"):
    """Per-column strip plot with a box plot of slide-level scores (one point per slide).

    Parameters
    ----------
    table : pandas.DataFrame
        One row per slide.
    columns : sequence of str
        Numeric columns to show, one panel each.
    """
    columns = list(columns)
    n = max(len(columns), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _figure(2.9 * cols, 2.6 * rows)
    rng = np.random.default_rng(0)
    for i, col in enumerate(columns):
        ax = fig.add_subplot(rows, cols, i + 1)
        v = np.asarray(table[col], dtype=float)
        v = v[np.isfinite(v)]
        if v.size:
            ax.boxplot(v, widths=0.5, showfliers=False)
            ax.scatter(1 + rng.uniform(-0.12, 0.12, v.size), v, s=14, color=PALETTE[i % len(PALETTE)],
                       edgecolor="black", linewidths=0.4, zorder=3)
        ax.set_xticks([])
        ax.set_title(col, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def to_data_uri(fig, *, dpi: int = 100) -> str:
    """The figure as an inline ``data:image/png;base64,...`` URI (the figure is then closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    fig.clf()
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
