"""Synthetic multiplexed quantum-dot slides with ground truth.

A synthetic slide is made in four steps, each a plain function of a seeded
random generator:

1. **Tissue layout** (:func:`tissue_layout`): epithelial nests (smooth random
   blobs) packed with large, roundish, often touching nuclei; sparse stroma
   around them with elongated fibroblast nuclei and small round lymphocytes.
   Nuclei are ellipses with slightly irregular outlines, 8–12 µm across for
   epithelium. Cells grow from their nuclei by a seeded watershed limited to a
   per-cell-type reach (5 µm epithelium, 4.5 µm fibroblasts, 3.5 µm
   lymphocytes, jittered), so neighbouring cells meet near the midline between
   their nuclei. Nucleus and cell share one ID.
2. **Abundances** (:func:`make_slide`): one noise-free plane per fluor. The
   nuclear stain fills the nuclei with a domed, chromatin-textured profile;
   each marker is expressed in its compartment (membrane ring, nucleus,
   cytoplasm or whole cell) at a per-cell level drawn from log-normal
   positive and negative subpopulations (positivity is clonal: it varies
   from nest to nest); tissue autofluorescence (``"AF"``) is brighter in
   stroma, with granules in the cytoplasm.
3. **Optics**: Gaussian PSF blur, then linear mixing through the emission
   spectra of :class:`qdplex.spectra.SpectralLibrary` into the channels of a
   λ-stack or of one filter per fluor.
4. **Camera**: Poisson shot noise, Gaussian read noise, a camera offset,
   rounding and clipping to uint16.

Abundance units are chosen so that unmixing the offset-subtracted slide with
the same library gives the abundance planes back: the expected count in
channel *c* is ``offset + sum_k M[c, k] * A[k]`` with ``M`` the library's
mixing matrix for the slide's channels.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .errors import InputError, PanelError
from .model import Channel, MultiplexImage

__all__ = [
    "nuclear_field",
    "tissue_layout",
    "TissueLayout",
    "SynthSlide",
    "make_slide",
    "write_slide",
    "read_synth_panel",
    "lambda_channels",
    "filter_channels",
    "truth_accuracy",
    "truth_accuracy_files",
    "perturbed_library",
    "MEASURED_SPECTRA",
    "AF_SPECIES",
]

# cell types of the layout, in the order of TissueLayout.cell_type codes
CELL_TYPES = ("epithelial", "stromal", "immune")

# per cell type: (minor radius µm range, aspect ratio range, relative DAPI brightness, cell reach µm).
# Cells reach 3.5-5 µm beyond their nuclei: close to the 5 µm expansion that nucleus-expansion
# segmenters assume ("cells by expanding nuclei"), so that the data are realistic but fair.
_NUCLEUS_SHAPE = {
    "epithelial": ((4.0, 5.6), (1.0, 1.45), 1.0, 5.0),
    "stromal": ((1.8, 2.6), (2.2, 3.6), 1.15, 4.5),
    "immune": ((2.8, 3.4), (1.0, 1.15), 1.6, 3.5),
}


#: relative jitter of a cell's reach (its free outline wobbles by this fraction)
_REACH_JITTER = 0.1
#: jitter (µm) of the borders between touching cells around the midline
_BORDER_JITTER_UM = 0.3


@dataclass
class TissueLayout:
    """A synthetic tissue: labelled nuclei and cells and what each cell is.

    Attributes
    ----------
    nuclei, cells : numpy.ndarray
        uint32 Y×X labels; a cell's ID equals its nucleus's ID (1…n, contiguous).
    cell_type : numpy.ndarray
        int8 code per ID (index 0 unused) into ``CELL_TYPES``.
    nest : numpy.ndarray
        int32 epithelial nest number per ID (0 = stroma), for clonal expression.
    nest_map : numpy.ndarray
        int32 Y×X nest number of every pixel (0 = stroma).
    profile : numpy.ndarray
        float32 Y×X normalised radial distance inside each nucleus (0 centre, 1 edge).
    pixel_size_um : float
    """

    nuclei: np.ndarray
    cells: np.ndarray
    cell_type: np.ndarray
    nest: np.ndarray
    nest_map: np.ndarray
    profile: np.ndarray
    pixel_size_um: float

    @property
    def n(self) -> int:
        return int(self.cell_type.size - 1)


def _smooth_noise(rng, shape, sigma_px) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean, unit standard deviation.

    Wide kernels are filtered on a grid coarser by up to a third of ``sigma_px``
    and interpolated back (the field is smooth at that scale anyway).
    """
    sigma_px = max(float(sigma_px), 0.5)
    step = max(int(sigma_px // 3), 1)
    if step > 1:
        small = tuple(int(np.ceil(n / step)) + 1 for n in shape)
        f = ndi.gaussian_filter(rng.standard_normal(small, dtype=np.float32), sigma_px / step, mode="wrap")
        f = ndi.zoom(f, step, order=1, mode="nearest", grid_mode=False)[: shape[0], : shape[1]]
    else:
        f = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_px, mode="wrap")
    s = f.std()
    return ((f - f.mean()) / (s if s > 0 else 1.0)).astype(np.float32)


def _nest_map(rng, shape, px, fraction) -> np.ndarray:
    """Epithelial nests: smooth random blobs covering about ``fraction`` of the field, numbered."""
    field = _smooth_noise(rng, shape, 14.0 / px)
    mask = field > np.quantile(field, 1.0 - fraction)
    mask = ndi.binary_opening(mask, iterations=2)
    nests, _ = ndi.label(mask)
    return nests.astype(np.int32)


def _place(rng, shape, px, allowed, kind, excl_range, tries, placed, excl):
    """Random sequential adsorption of nucleus centres of ``kind`` inside ``allowed``.

    ``placed`` (list of (y, x) in px) and ``excl`` (exclusion radii in px) hold
    nuclei already placed; a candidate is accepted when its distance to every
    placed nucleus exceeds the sum of the two exclusion radii.
    """
    (rmin, rmax), (amin, amax), _, _ = _NUCLEUS_SHAPE[kind]
    ys = rng.uniform(0, shape[0], tries)
    xs = rng.uniform(0, shape[1], tries)
    r = rng.uniform(rmin, rmax, tries) / px  # minor radius px
    a = rng.uniform(amin, amax, tries)  # aspect ratio
    f = rng.uniform(*excl_range, tries)  # exclusion factor
    out = []
    pts = np.array(placed, dtype=float).reshape(-1, 2)
    ex = np.array(excl, dtype=float)
    for i in range(tries):
        y, x = ys[i], xs[i]
        if not allowed[min(int(y), shape[0] - 1), min(int(x), shape[1] - 1)]:
            continue
        e = f[i] * r[i] * (1.0 + a[i]) / 2.0  # exclusion radius: mean semi-axis × factor
        if pts.shape[0]:
            d2 = (pts[:, 0] - y) ** 2 + (pts[:, 1] - x) ** 2
            if np.any(d2 < (ex + e) ** 2):
                continue
        pts = np.vstack([pts, (y, x)])
        ex = np.append(ex, e)
        out.append((y, x, r[i], a[i]))
    placed[:] = [tuple(p) for p in pts]
    excl[:] = list(ex)
    return out


def _render_nuclei(rng, shape, nuclei_params, orient_field):
    """Rasterise ellipses with wobbly outlines; overlaps go to the nearest (normalised) centre.

    Returns labels (uint32, 1…n in the order given; empty ones dropped later) and
    the normalised radial distance of every nuclear pixel.
    """
    labels = np.zeros(shape, np.uint32)
    best = np.full(shape, np.inf, np.float32)
    for i, (y, x, r, a, kind) in enumerate(nuclei_params, start=1):
        major = r * a
        if kind == "stromal":
            theta = orient_field[min(int(y), shape[0] - 1), min(int(x), shape[1] - 1)] + rng.normal(0, 0.15)
        else:
            theta = rng.uniform(0, np.pi)
        h = int(np.ceil(major * 1.15)) + 1
        y0, y1 = max(int(y) - h, 0), min(int(y) + h + 1, shape[0])
        x0, x1 = max(int(x) - h, 0), min(int(x) + h + 1, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - y, xx - x
        c, s = np.cos(theta), np.sin(theta)
        u = dx * c + dy * s  # along the major axis
        v = -dx * s + dy * c
        d = np.sqrt((u / major) ** 2 + (v / r) ** 2)
        ang = np.arctan2(v, u)
        wob = 1.0 + 0.05 * np.cos(2 * ang + rng.uniform(0, 6.3)) + 0.04 * np.cos(3 * ang + rng.uniform(0, 6.3))
        d = d / wob
        sub_best = best[y0:y1, x0:x1]
        take = (d < 1.0) & (d < sub_best)
        sub_best[take] = d[take]
        labels[y0:y1, x0:x1][take] = i
    best[labels == 0] = 0.0
    return labels, best


def _largest_piece(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest connected piece of every label."""
    out = np.zeros_like(labels)
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        m = labels[sl] == i
        lab, n = ndi.label(m)
        if n > 1:
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            m = lab == int(np.argmax(sizes))
        out[sl][m] = i
    return out


def tissue_layout(shape=(512, 512), *, pixel_size_um=0.5, crowded=False, seed=0) -> TissueLayout:
    """A tissue-like layout of labelled nuclei and cells.

    Parameters
    ----------
    shape : tuple of int
        Image shape (Y, X).
    pixel_size_um : float
        Pixel size in µm; nucleus and cell sizes are fixed in µm.
    crowded : bool
        Dense, mostly touching epithelium covering most of the field.
    seed : int or numpy.random.Generator
        Random seed; equal seeds give equal layouts.

    Returns
    -------
    TissueLayout
    """
    from skimage.segmentation import watershed

    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    px = float(pixel_size_um)
    if len(shape) != 2 or min(shape) < 16 or px <= 0:
        raise InputError(f"expected a Y×X shape of at least 16×16 and a positive pixel size, found {shape}, {px}")
    area_um2 = shape[0] * shape[1] * px * px
    nests = _nest_map(rng, shape, px, 0.72 if crowded else 0.5)
    epi_ok = ndi.binary_erosion(nests > 0, iterations=max(int(2.0 / px), 1))
    stroma_ok = ndi.distance_transform_edt(nests == 0) * px > 4.0
    orient = np.pi * _smooth_noise(rng, shape, 25.0 / px) * 0.6

    placed, excl = [], []
    params = []
    n_try = int(area_um2 / 8) + 200
    excl_epi = (0.9, 1.05) if crowded else (0.95, 1.35)
    for y, x, r, a in _place(rng, shape, px, epi_ok, "epithelial", excl_epi, n_try, placed, excl):
        params.append((y, x, r, a, "epithelial"))
    # stroma: fibroblasts then lymphocytes, sparse (few tries and wide exclusion)
    n_str = max(int(area_um2 / (700 if crowded else 450)), 3)
    for y, x, r, a in _place(rng, shape, px, stroma_ok, "stromal", (1.6, 2.2), n_str, placed, excl):
        params.append((y, x, r, a, "stromal"))
    n_imm = max(int(area_um2 / 2500), 2)
    for y, x, r, a in _place(rng, shape, px, stroma_ok, "immune", (1.4, 2.0), n_imm, placed, excl):
        params.append((y, x, r, a, "immune"))

    labels, dist = _render_nuclei(rng, shape, params, orient)
    labels = _largest_piece(labels)
    # drop slivers (mostly cut by the image edge): under 25 % of the nucleus's own area
    counts = np.bincount(labels.ravel(), minlength=len(params) + 1)
    expect = np.array([0.0] + [np.pi * r * r * a for (_, _, r, a, _) in params])
    keep = counts >= np.maximum(0.25 * expect, 12)
    keep[0] = False
    # relabel 1..n contiguous
    new_id = np.zeros(len(params) + 1, np.uint32)
    new_id[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    nuclei = new_id[labels]
    dist[nuclei == 0] = 0.0
    kinds = [params[i - 1][4] for i in np.flatnonzero(keep)]
    cell_type = np.zeros(len(kinds) + 1, np.int8)
    cell_type[1:] = [CELL_TYPES.index(k) for k in kinds]
    nest_of = np.zeros(len(kinds) + 1, np.int32)
    if len(kinds):
        com = ndi.center_of_mass(np.ones(shape), nuclei, np.arange(1, len(kinds) + 1))
        for j, (cy, cx) in enumerate(com, start=1):
            if cell_type[j] == 0:
                nest_of[j] = nests[min(int(cy), shape[0] - 1), min(int(cx), shape[1] - 1)]

    # cells: seeded watershed from the nuclei, each cell within its type's reach
    d_out, (iy, ix) = ndi.distance_transform_edt(nuclei == 0, return_indices=True)
    nearest = nuclei[iy, ix]
    reach = np.array([_NUCLEUS_SHAPE[k][3] for k in CELL_TYPES], np.float32) / px
    reach_map = reach[cell_type[nearest]] * (1.0 + _REACH_JITTER * _smooth_noise(rng, shape, 3.0 / px))
    allowed = (d_out <= reach_map) | (nuclei > 0)
    elev = d_out + _BORDER_JITTER_UM / px * _smooth_noise(rng, shape, 2.0 / px)
    cells = watershed(elev, markers=nuclei, mask=allowed).astype(np.uint32)
    cells = _largest_piece(cells)
    cells[nuclei > 0] = nuclei[nuclei > 0]
    return TissueLayout(nuclei, cells, cell_type, nest_of, nests, dist.astype(np.float32), px)


def _psf(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian PSF blur of the last two axes."""
    if sigma_px <= 0:
        return img
    sig = (0,) * (img.ndim - 2) + (sigma_px, sigma_px)
    return ndi.gaussian_filter(img, sig, mode="nearest")


def _nuclear_stain(rng, layout: TissueLayout, *, uneven: bool) -> np.ndarray:
    """Noise-free nuclear-stain density: domed, chromatin-textured nuclei, per-nucleus brightness."""
    px = layout.pixel_size_um
    n = layout.n
    spread = 0.55 if uneven else 0.2
    bright = np.zeros(n + 1, np.float32)
    bright[1:] = rng.lognormal(0.0, spread, n)
    rel = np.array([_NUCLEUS_SHAPE[k][2] for k in CELL_TYPES], np.float32)
    bright[1:] *= rel[layout.cell_type[1:]]
    texture = 1.0 + 0.22 * _smooth_noise(rng, layout.nuclei.shape, 0.6 / px)
    texture += 0.12 * _smooth_noise(rng, layout.nuclei.shape, 1.5 / px)
    dome = 1.0 - 0.4 * layout.profile**2
    out = bright[layout.nuclei] * dome * np.clip(texture, 0.3, None)
    out[layout.nuclei == 0] = 0.0
    return out.astype(np.float32)


def _illumination(rng, shape, uneven: bool):
    """(multiplicative illumination, additive background) fields for the nuclear channel."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    yy /= max(shape[0] - 1, 1)
    xx /= max(shape[1] - 1, 1)
    if not uneven:
        return np.ones(shape, np.float32), np.full(shape, 0.03, np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)) + 0.5  # 0…1 roughly
    cy, cx = rng.uniform(0.3, 0.7, 2)
    vignette = 1.0 - 0.35 * ((yy - cy) ** 2 + (xx - cx) ** 2) / 0.5
    return vignette.astype(np.float32), (0.02 + 0.18 * np.clip(ramp, 0, 1)).astype(np.float32)


def _camera(rng, expected: np.ndarray, read_noise: float) -> np.ndarray:
    """Poisson shot noise on expected photo-electrons plus Gaussian read noise (float32)."""
    shot = rng.poisson(np.clip(expected, 0, None)).astype(np.float32)
    if read_noise > 0:
        shot += np.float32(read_noise) * rng.standard_normal(expected.shape, dtype=np.float32)
    return shot


def nuclear_field(
    shape=(512, 512),
    *,
    pixel_size_um=0.5,
    crowded=False,
    uneven=False,
    photons=300.0,
    read_noise=4.0,
    psf_sigma_um=0.35,
    seed=0,
):
    """A DAPI-like nuclear image with its true nuclei.

    Tissue-like clusters of ellipsoidal, chromatin-textured, often touching
    nuclei (epithelial nests) and sparse elongated and small round nuclei
    (stroma), blurred by a Gaussian PSF, with Poisson shot and Gaussian read
    noise.

    Parameters
    ----------
    shape : tuple of int
        Image shape (Y, X).
    pixel_size_um : float
        Pixel size in µm (epithelial nuclei are 8–12 µm across).
    crowded : bool
        Dense, mostly touching nuclei over most of the field.
    uneven : bool
        Dim and bright nuclei (wide log-normal brightness), an illumination
        fall-off and a background gradient.
    photons : float
        Expected photo-electrons at the centre of a nucleus of median brightness.
    read_noise : float
        Standard deviation of the Gaussian read noise in electrons.
    psf_sigma_um : float
        Standard deviation of the Gaussian PSF in µm.
    seed : int
        Random seed; equal seeds give equal images.

    Returns
    -------
    image : numpy.ndarray
        float32 Y×X in photo-electrons (camera offset removed; may dip below 0).
    nuclei : numpy.ndarray
        uint32 Y×X true nucleus labels 1…n.

    Examples
    --------
    >>> from qdplex.synth import nuclear_field
    >>> image, nuclei = nuclear_field((128, 128), seed=0)
    >>> image.dtype.name, nuclei.dtype.name, image.shape
    ('float32', 'uint32', (128, 128))
    >>> bool(image[nuclei > 0].mean() > 10 * image[nuclei == 0].mean())
    True
    """
    ss = np.random.SeedSequence(int(seed)).spawn(3)
    layout = tissue_layout(shape, pixel_size_um=pixel_size_um, crowded=crowded, seed=np.random.default_rng(ss[0]))
    rng = np.random.default_rng(ss[1])
    dens = _nuclear_stain(rng, layout, uneven=uneven)
    illum, bg = _illumination(rng, dens.shape, uneven)
    expected = _psf(dens * illum + bg, psf_sigma_um / float(pixel_size_um)) * float(photons)
    image = _camera(np.random.default_rng(ss[2]), expected, float(read_noise))
    return image, layout.nuclei


# --------------------------------------------------------------------------- slides
#: camera offset (counts) added to every synthetic pixel, as a real camera's bias
CAMERA_OFFSET = 100.0
#: width of the true membrane ring in µm
MEMBRANE_WIDTH_UM = 1.0
#: reference band (nm) over which a fluor's peak count is defined (see make_slide ``photons``)
_REF_BAND_NM = 10.0


@dataclass
class SynthSlide:
    """A synthetic slide and its ground truth.

    Attributes
    ----------
    image : MultiplexImage
        The slide as a camera records it: uint16 C×Y×X (λ-stack or filter channels,
        each with ``emission_nm`` and ``bandwidth_nm``), camera offset included
        (``image.metadata["camera_offset"]``).
    nuclei, cells : numpy.ndarray
        uint32 Y×X true labels; a cell's ID equals its nucleus's ID.
    truth : pandas.DataFrame
        One row per cell: ``CellID``, one column per marker (the true mean
        abundance in the marker's compartment, before blur), ``X_centroid``,
        ``Y_centroid``, ``Area``, then phenotypes: ``cell_type``
        (epithelial / stromal / immune), ``nest`` (epithelial nest, 0 = stroma)
        and ``<marker>_positive``.
    abundances : MultiplexImage
        float32 K×Y×X noise-free abundance planes after PSF blur, named by fluor
        (nuclear stain, marker fluors, ``"AF"``): the slide's expected value is
        ``camera_offset + mixing @ abundances``.
    mixing : numpy.ndarray
        C×K mixing matrix (the library's spectra over the slide's channels).
    unstained : MultiplexImage or None
        An unstained control (autofluorescence only, another field of the same tissue).
    panel : Panel
    settings : dict
        How the slide was made (JSON-able): arguments, seed, channels, endmembers,
        spectral shifts; written to ``synth.json`` by :func:`write_slide`.
    """

    image: MultiplexImage
    nuclei: np.ndarray
    cells: np.ndarray
    truth: pd.DataFrame
    abundances: MultiplexImage
    mixing: np.ndarray
    unstained: MultiplexImage | None
    panel: object
    settings: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.image.name


def lambda_channels(first=420.0, last=720.0, step=10.0) -> list[Channel]:
    """Channels of a λ-stack: bands of width ``step`` centred on ``first, first+step, …, last``."""
    first, last, step = float(first), float(last), float(step)
    if step <= 0 or last < first:
        raise InputError(f"expected λ-stack wavelengths FIRST ≤ LAST and STEP > 0, found {first}, {last}, {step}")
    n = int(np.floor((last - first) / step + 1e-6)) + 1
    return [Channel(f"{w:g}nm", emission_nm=float(w), bandwidth_nm=step) for w in first + step * np.arange(n)]


def _library(library, panel=None):
    """The given library, else the built-ins plus the panel's ``[spectra] files``."""
    if library is not None:
        return library
    from .spectra import SpectralLibrary

    lib = SpectralLibrary.builtin()
    for f in getattr(panel, "spectra_files", None) or ():
        lib = lib.merge(SpectralLibrary.from_csv(f))
    return lib


def _matrix(library, fluors, channels) -> np.ndarray:
    """C×K mixing matrix of ``fluors`` over ``channels`` from the library."""
    m = np.asarray(library.subset(list(fluors)).matrix(list(channels)), dtype=np.float64)
    if m.shape != (len(channels), len(fluors)):
        raise InputError(f"expected a {len(channels)}×{len(fluors)} mixing matrix, found shape {m.shape}")
    return m


def _shifted_library(library, names, sd_nm: float, rng):
    """A library holding ``names`` with each spectrum shifted by a random N(0, sd_nm) nm."""
    from .spectra import SpectralLibrary

    out, shifts = SpectralLibrary(), {}
    for n in names:
        sp = library[n]
        d = float(rng.normal(0.0, sd_nm))
        out.add(n, sp.wavelength_nm + d, sp.intensity, source=f"{sp.source} (shifted {d:+.2f} nm by qdplex.synth)")
        shifts[n] = round(d, 3)
    return out, shifts


def _reference_peaks(library, fluors) -> np.ndarray:
    """Each fluor's response in a 10 nm band centred on its emission peak."""
    out = []
    for f in fluors:
        band = Channel("peak", float(library.peak_nm(f)), _REF_BAND_NM)
        out.append(float(_matrix(library, [f], [band])[0, 0]))
    return np.array(out)


def filter_channels(fluors, *, library=None, bandwidth_nm=20.0, nuclear_bandwidth_nm=40.0, af_channel=True):
    """One filter channel per fluor, centred on its emission peak, plus an autofluorescence channel.

    Parameters
    ----------
    fluors : sequence of str
        The fluors to image, the nuclear stain first (as ``Panel.fluors``).
    library : SpectralLibrary, optional
        Where the emission peaks come from (default: the built-in library).
    bandwidth_nm, nuclear_bandwidth_nm : float
        Filter widths for the markers' fluors and for the nuclear stain.
    af_channel : bool
        Add a channel where autofluorescence dominates the panel's fluors, so
        that autofluorescence can be unmixed as an extra endmember.

    Returns
    -------
    list of Channel
        Named by fluor (``"QD655"``); the autofluorescence channel ``"AF<nm>"``.
    """
    lib = _library(library)
    fluors = list(fluors)
    peaks = [lib.peak_nm(f) for f in fluors]
    chans = [
        Channel(f, emission_nm=float(p), bandwidth_nm=float(nuclear_bandwidth_nm if i == 0 else bandwidth_nm))
        for i, (f, p) in enumerate(zip(fluors, peaks))
    ]
    if af_channel:
        cand = [Channel(f"{w:g}", float(w), float(bandwidth_nm)) for w in np.arange(420.0, 801.0, 5.0)]
        names = fluors + ["AF"]
        m = _matrix(lib, names, cand)
        m = m / np.maximum(m.max(axis=0), 1e-12)
        score = m[:, -1] - m[:, :-1].max(axis=1)  # AF's share over the brightest fluor
        for c in chans:  # keep clear of the fluor filters
            score[np.abs(np.array([x.emission_nm for x in cand]) - c.emission_nm) < bandwidth_nm] = -np.inf
        best = cand[int(np.argmax(score))]
        chans.append(Channel(f"AF{best.emission_nm:g}", best.emission_nm, best.bandwidth_nm))
    return chans


def _membrane(cells: np.ndarray, width_px: float) -> np.ndarray:
    """True membrane: the pixels of each cell within ``width_px`` of its outline (cell IDs)."""
    from skimage.segmentation import find_boundaries

    edge = find_boundaries(cells, mode="inner") & (cells > 0)
    near = ndi.distance_transform_edt(~edge) < max(width_px - 0.5, 0.5)
    return np.where(near, cells, 0).astype(np.uint32)


def _compartments(layout: TissueLayout) -> dict[str, np.ndarray]:
    cyto = layout.cells.copy()
    cyto[layout.nuclei > 0] = 0
    return {
        "nucleus": layout.nuclei,
        "cell": layout.cells,
        "cytoplasm": cyto,
        "membrane": _membrane(layout.cells, MEMBRANE_WIDTH_UM / layout.pixel_size_um),
    }


def _expression(rng, layout: TissueLayout, fraction=None, stroma=None):
    """Per-cell expression levels (index = cell ID) and positivity of one marker.

    Positivity is clonal in epithelium: each nest is mostly positive or mostly
    negative; stromal and immune cells are rarely positive. ``fraction`` (from the
    panel's ``[synth] positive_fraction``) instead makes every epithelial cell
    positive with that probability. Levels are log-normal: positives around 1
    (σ = 0.45), negatives around 0.04 (σ = 0.5, unspecific binding).
    ``stroma = (fraction, level)`` makes the marker a second population's too: that
    fraction of stromal (fibroblast) cells positive around ``level`` (σ = 0.45).
    """
    n = layout.n
    ct = layout.cell_type
    p = np.zeros(n + 1)
    if fraction is None:
        n_nest = int(layout.nest.max()) if n else 0
        nest_p = np.where(rng.random(n_nest + 1) < 0.5, rng.uniform(0.7, 0.95, n_nest + 1), rng.uniform(0.0, 0.15, n_nest + 1))
        p[1:] = np.where(ct[1:] == 0, nest_p[layout.nest[1:]], 0.04)
    else:
        p[1:] = np.where(ct[1:] == 0, float(fraction), 0.04)
    if stroma is not None:
        p[1:] = np.where(ct[1:] == 1, float(stroma[0]), p[1:])
    pos = rng.random(n + 1) < p
    pos[0] = False
    level = np.where(pos, rng.lognormal(0.0, 0.45, n + 1), rng.lognormal(np.log(0.04), 0.5, n + 1))
    if stroma is not None:
        sp = pos & (ct == 1)
        level = np.where(sp, rng.lognormal(np.log(float(stroma[1])), 0.45, n + 1), level)
    level[0] = 0.0
    return level.astype(np.float32), pos


def _autofluorescence(rng, layout: TissueLayout, species: int = 1) -> np.ndarray:
    """Tissue autofluorescence density: a smooth base, fibrous stroma, granules in epithelial cytoplasm.

    One species (Y×X): all three together. Several (S×Y×X, in :data:`AF_SPECIES`
    order): ``AF`` the base and fibres, ``AF2`` lipofuscin-like granules (2.5× brighter);
    with three, the stroma fibres become their own ``AF3`` (collagen-like).
    """
    px = layout.pixel_size_um
    shape = layout.cells.shape
    base = 0.12 * np.exp(0.35 * _smooth_noise(rng, shape, 12.0 / px))
    stroma = (layout.nest_map == 0) & (layout.cells == 0)
    stroma = ndi.gaussian_filter(stroma.astype(np.float32), 1.5 / px)
    fibres = np.clip(_smooth_noise(rng, shape, 1.2 / px), 0, None) * np.exp(0.3 * _smooth_noise(rng, shape, 6.0 / px))
    fib = 0.25 * stroma * fibres
    gran = np.zeros(shape, np.float32)
    cyto = (layout.cells > 0) & (layout.nuclei == 0) & (layout.cell_type[layout.cells] == 0)
    ys, xs = np.nonzero(cyto)
    if ys.size:
        k = rng.random(ys.size) < (px * px / 25.0)  # about one granule per 25 µm² of cytoplasm
        dots = np.zeros(shape, np.float32)
        dots[ys[k], xs[k]] = rng.lognormal(np.log(1.0), 0.4, int(k.sum()))
        gran = ndi.gaussian_filter(dots, 0.4 / px) * (2 * np.pi * (0.4 / px) ** 2)
    if species <= 1:
        return (base + fib + gran).astype(np.float32)
    if species == 2:
        return np.stack([base + fib, 2.5 * gran]).astype(np.float32)
    return np.stack([base, 2.5 * gran, 1.5 * fib]).astype(np.float32)


#: measured emission spectra (files of ``../shared/data/spectra``) that
#: :func:`perturbed_library` reads, per fluor
MEASURED_SPECTRA = {
    "DAPI": "dapi_em_pubspectra.csv", "Hoechst": "hoechst33258_em_pubspectra.csv",
    "QD525": "qdot525_em_pubspectra.csv", "QD565": "qdot565_em_pubspectra.csv",
    "QD585": "qdot585_em_thermo.csv", "QD605": "qdot605_em_pubspectra.csv",
    "QD655": "qdot655_em_thermo.csv", "QD705": "qdot705_em_thermo.csv", "QD800": "qdot800_em_thermo.csv",
}

#: autofluorescence species of synthetic slides unlike the built-in ``"AF"`` (peak 510 nm,
#: FWHM 160 nm): name → (peak nm, FWHM nm, red/blue asymmetry, what it models)
AF_SPECIES = {
    "AF": (530.0, 175.0, 2.0, "broad, strongly red-skewed flavin/collagen-like tissue autofluorescence"),
    "AF2": (615.0, 140.0, 1.3, "lipofuscin-like granules: red-shifted, broad"),
    "AF3": (470.0, 105.0, 1.6, "collagen/elastin-like stroma fibres: blue-shifted"),
}


def perturbed_library(folder, names, *, shift_nm=5.0, width=0.15, af_species=1, seed=0):
    """Measured spectra, each shifted and stretched at random: a library unlike the built-ins.

    Each fluor's measured emission spectrum (:data:`MEASURED_SPECTRA`, read from
    ``folder``) is moved by a uniform random shift in ±``shift_nm`` and its width scaled
    by a uniform random factor in 1 ± ``width`` about its peak; the autofluorescence
    species (``af_species`` of :data:`AF_SPECIES`) are two-sided Gaussians unlike the
    built-in ``"AF"``, also shifted and stretched.

    Parameters
    ----------
    folder : path
        Folder of the measured spectra (``wavelength_nm,intensity`` CSVs), e.g.
        ``../shared/data/spectra``.
    names : sequence of str
        The fluors (autofluorescence is added: ``AF``, ``AF2``, …).
    shift_nm, width : float
        Largest peak shift (nm) and relative width change.
    af_species : int
        Number of autofluorescence species (0–3).
    seed : int

    Returns
    -------
    (SpectralLibrary, dict)
        The library and, per spectrum, the shift (nm) and width factor applied.
    """
    from .spectra import SpectralLibrary, _two_sided_gaussian

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    lib, changes = SpectralLibrary(), {}
    grid = np.arange(300.0, 1000.25, 0.5)
    for n in list(names) + list(AF_SPECIES)[: int(af_species)]:
        d, f = float(rng.uniform(-shift_nm, shift_nm)), float(rng.uniform(1 - width, 1 + width))
        if n in AF_SPECIES:
            peak, fwhm, asym, what = AF_SPECIES[n]
            wl, val = grid, _two_sided_gaussian(grid, peak, fwhm, asym)
            src = f"synthetic {what}: peak {peak:g} nm, FWHM {fwhm:g} nm"
        else:
            if n not in MEASURED_SPECTRA:
                raise InputError(f"expected a fluor with a measured spectrum {sorted(MEASURED_SPECTRA)}, found {n!r}")
            path = folder / MEASURED_SPECTRA[n]
            try:
                tab = pd.read_csv(path)
            except OSError as e:
                raise InputError(f"expected a measured spectrum CSV, found {type(e).__name__}: {e}", path=path) from None
            wl, val = tab.iloc[:, 0].to_numpy(float), np.clip(tab.iloc[:, 1].to_numpy(float), 0, None)
            src = f"measured: {path.name}"
            peak = float(wl[np.argmax(val)])
        lib.add(n, peak + (wl - peak) * f + d, val, source=f"{src}; shifted {d:+.2f} nm, width ×{f:.3f} (qdplex.synth)")
        changes[n] = {"shift_nm": round(d, 3), "width_factor": round(f, 4)}
    return lib, changes


def _centroid_table(cells: np.ndarray) -> pd.DataFrame:
    from skimage.measure import regionprops_table

    t = regionprops_table(cells, properties=("label", "centroid", "area"))
    return pd.DataFrame(
        {"CellID": t["label"], "Y_centroid": t["centroid-0"], "X_centroid": t["centroid-1"], "Area": t["area"]}
    )


def read_synth_panel(path):
    """Read a panel for making synthetic slides.

    As :func:`qdplex.panel.read_panel`, except that the panel's
    ``[autofluorescence] control`` need not exist yet: a synthetic slide's panel
    usually points at the unstained control that ``qdplex synth --unstained``
    is about to write.
    """
    import tomllib

    from .panel import panel_from_dict, read_panel

    path = Path(path)
    try:
        return read_panel(path)
    except PanelError:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            raise
        af = raw.get("autofluorescence")
        if not isinstance(af, dict) or "control" not in af:
            raise
        raw = dict(raw)
        raw["autofluorescence"] = {k: v for k, v in af.items() if k != "control"}
        return panel_from_dict(raw, path=path)


def _synth_options(panel) -> dict:
    """The panel's ``[synth]`` table, validated (errors name the file and key)."""
    opts = dict(getattr(panel, "synth", None) or {})
    where = getattr(panel, "path", None)
    known = {"positive_fraction", "brightness", "nuclear_brightness", "control_shape"}
    for key in opts:
        if key not in known:
            raise PanelError(f"key 'synth.{key}': expected one of {sorted(known)}, found {key!r}", path=where)
    names = set(panel.marker_names)
    for key, lo, hi in (("positive_fraction", 0.0, 1.0), ("brightness", 0.0, np.inf)):
        table = opts.get(key, {})
        if not isinstance(table, dict):
            raise PanelError(f"key 'synth.{key}': expected a table marker = number, found {table!r}", path=where)
        for m, v in table.items():
            if m not in names:
                raise PanelError(f"key 'synth.{key}.{m}': expected a marker of the panel {sorted(names)}, found {m!r}", path=where)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise PanelError(f"key 'synth.{key}.{m}': expected a number in [{lo}, {hi}], found {v!r}", path=where)
        opts[key] = table
    nb = opts.get("nuclear_brightness", 1.5)
    if isinstance(nb, bool) or not isinstance(nb, (int, float)) or nb <= 0:
        raise PanelError(f"key 'synth.nuclear_brightness': expected a positive number, found {nb!r}", path=where)
    cs = opts.get("control_shape")
    if cs is not None and not (
        isinstance(cs, list) and len(cs) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in cs)
    ):
        raise PanelError(f"key 'synth.control_shape': expected [Y, X] integers ≥ 16, found {cs!r}", path=where)
    return opts


def _mix_and_expose(rng, abundances, mixing, read_noise, offset=CAMERA_OFFSET) -> np.ndarray:
    """Camera counts (uint16) of noise-free abundances K×Y×X through a C×K mixing matrix."""
    k, h, w = abundances.shape
    flat = abundances.reshape(k, -1)
    out = np.empty((mixing.shape[0], h, w), np.uint16)
    for c, row in enumerate(mixing.astype(np.float32)):  # one channel at a time: memory ~ one plane
        counts = _camera(rng, (row @ flat).reshape(h, w), read_noise) + np.float32(offset)
        out[c] = np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max)
    return out


def make_slide(
    panel,
    *,
    shape=(512, 512),
    pixel_size_um=0.5,
    mode="lambda",
    wavelengths=(420.0, 720.0, 10.0),
    channels=None,
    crowded=False,
    uneven=False,
    autofluorescence=1.0,
    photons=200.0,
    read_noise=3.0,
    psf_sigma_um=0.35,
    spectral_shift_nm=0.0,
    unstained=False,
    control_shape=None,
    library=None,
    seed=0,
    name="synthetic",
    camera_offset=CAMERA_OFFSET,
    record_offset=True,
    autofluorescence_species=1,
    stroma_expression=None,
    stroma_level=0.4,
) -> SynthSlide:
    """A synthetic multiplexed QD slide of ``panel`` with its ground truth.

    Parameters
    ----------
    panel : Panel or path
        Markers (fluor, compartment) and nuclear stain (a path is read with
        :func:`read_synth_panel`). The panel's ``[synth]``
        table may set ``positive_fraction`` (marker → fraction of positive
        epithelial cells; default: clonal, nest by nest), ``brightness`` (marker →
        relative brightness, default 1), ``nuclear_brightness`` (default 1.5) and
        ``control_shape`` ([Y, X] of the unstained control).
    shape : tuple of int
        Image size (Y, X) in pixels.
    pixel_size_um : float
        Pixel size in µm.
    mode : {"lambda", "filter"}
        A λ-stack (``wavelengths``) or one filter per fluor (:func:`filter_channels`).
    wavelengths : (first, last, step)
        λ-stack band centres in nm (bands ``step`` wide).
    channels : list of Channel, optional
        Explicit channels (with emission bands); overrides ``mode``.
    crowded, uneven : bool
        Dense touching nuclei; dim and bright nuclei plus a nuclear-channel
        background gradient (see :func:`nuclear_field`).
    autofluorescence : float
        Scale of the tissue autofluorescence (0 = none).
    photons : float
        Expected photo-electrons in the brightest 10 nm band of a fluor at
        expression 1 (a typical positive cell).
    read_noise : float
        Gaussian read noise in electrons (gain 1 count per electron).
    psf_sigma_um : float
        Gaussian PSF standard deviation in µm.
    spectral_shift_nm : float
        Standard deviation (nm) of a random shift of each endmember's emission
        spectrum on this slide (QD lot-to-lot and environment shifts). The slide
        is made with the shifted spectra while a library of the nominal ones
        unmixes it: a realistic model mismatch. 0 (default) uses the library as is.
    unstained : bool
        Also make an unstained control (autofluorescence only, another field).
    control_shape : tuple of int, optional
        Size of the unstained control (default: the panel's ``[synth]
        control_shape``, else ``shape``).
    library : SpectralLibrary, optional
        Emission spectra (default: :meth:`SpectralLibrary.builtin`; must hold
        every fluor of the panel and ``"AF"``).
    seed : int
        Random seed: equal arguments and seed give identical slides.
    name : str
        Slide name.
    camera_offset : float
        The camera's dark level (counts) added to every channel.
    record_offset : bool
        Record the offset in ``image.metadata["camera_offset"]`` (as OME
        ``DetectorSettings/@Offset`` when written); False writes a slide that, like
        most acquisition software's, does not say its dark level.
    autofluorescence_species : int
        1–3 autofluorescence endmembers (:data:`AF_SPECIES`): with 2, lipofuscin-like
        granules (``AF2``) get their own red-shifted spectrum; with 3, stroma fibres
        (``AF3``) too. Spectra ``AF2``/``AF3`` missing from ``library`` are the
        :data:`AF_SPECIES` models.
    stroma_expression : mapping, optional
        marker → fraction of stromal cells that also express it (at ``stroma_level``):
        markers expressed in more than one population.
    stroma_level : float
        Expression of those stromal cells (positive epithelial cells ≈ 1).

    Returns
    -------
    SynthSlide

    Examples
    --------
    >>> from qdplex.panel import panel_from_dict
    >>> from qdplex.synth import make_slide
    >>> panel = panel_from_dict({"name": "p", "markers": [
    ...     {"name": "HER2", "fluor": "QD655", "compartment": "membrane"}]})
    >>> slide = make_slide(panel, shape=(64, 64), seed=1)
    >>> slide.image.shape, slide.image.data.dtype.name
    ((31, 64, 64), 'uint16')
    >>> slide.abundances.channel_names
    ['DAPI', 'QD655', 'AF']
    >>> list(slide.truth.columns[:2])
    ['CellID', 'HER2']
    """
    if isinstance(panel, (str, os.PathLike)):
        panel = read_synth_panel(panel)
    lib = _library(library, panel)
    px = float(pixel_size_um)
    shape = tuple(int(s) for s in shape)
    fluors = list(panel.fluors)
    use_af = float(autofluorescence) > 0
    n_af = int(autofluorescence_species) if use_af else 0
    if use_af and not 1 <= n_af <= len(AF_SPECIES):
        raise InputError(f"expected 1–{len(AF_SPECIES)} autofluorescence species, found {autofluorescence_species!r}")
    af_names = list(AF_SPECIES)[:n_af]
    missing = [a for a in af_names[1:] if a not in lib]
    if missing:
        from .spectra import _two_sided_gaussian

        grid = np.arange(300.0, 1000.25, 0.5)
        lib = lib.merge(type(lib)())  # a copy: the caller's library is left as it was
        for a in missing:
            peak, fwhm, asym, what = AF_SPECIES[a]
            lib.add(a, grid, _two_sided_gaussian(grid, peak, fwhm, asym), source=f"qdplex.synth: {what}")
    stroma_expression = dict(stroma_expression or {})
    unknown = sorted(set(stroma_expression) - set(panel.marker_names))
    if unknown:
        raise InputError(f"expected stroma_expression for markers of the panel {panel.marker_names}, found {unknown}")
    endmembers = fluors + af_names
    channel_mode = mode if channels is None else "channels"
    if channels is None:
        if mode == "lambda":
            channels = lambda_channels(*wavelengths)
            lo, hi = channels[0].band[0], channels[-1].band[1]
            outside = {f: lib.peak_nm(f) for f in fluors if not lo <= lib.peak_nm(f) <= hi}
            if outside:
                raise InputError(
                    f"expected every fluor to peak inside the λ-stack {lo:g}–{hi:g} nm, found "
                    + ", ".join(f"{f} at {p:g} nm" for f, p in outside.items())
                    + "; widen wavelengths (e.g. --wavelengths 420 820 10)"
                )
        elif mode == "filter":
            channels = filter_channels(fluors, library=lib, af_channel=use_af)
        else:
            raise InputError(f"expected mode 'lambda' or 'filter', found {mode!r}")
    channels = [c if isinstance(c, Channel) else Channel(str(c)) for c in channels]
    ss = np.random.SeedSequence(int(seed)).spawn(7)
    shifts = {}
    if spectral_shift_nm:
        lib, shifts = _shifted_library(lib, endmembers, float(spectral_shift_nm), np.random.default_rng(ss[6]))
    mixing = _matrix(lib, endmembers, channels)
    peaks = _reference_peaks(lib, endmembers)
    unit = float(photons) / np.maximum(peaks, 1e-12)  # abundance per unit expression, per endmember

    layout = tissue_layout(shape, pixel_size_um=px, crowded=crowded, seed=np.random.default_rng(ss[0]))
    comps = _compartments(layout)
    rng = np.random.default_rng(ss[1])
    opts = _synth_options(panel)
    fractions = opts.get("positive_fraction", {})
    brightness = opts.get("brightness", {})

    planes = np.zeros((len(endmembers),) + shape, np.float32)
    dapi = _nuclear_stain(rng, layout, uneven=uneven) * float(opts.get("nuclear_brightness", 1.5))
    if uneven:
        _, bg = _illumination(rng, shape, True)
        dapi = dapi + bg
    planes[0] = dapi * unit[0]
    truth = _centroid_table(layout.cells)
    ids = truth["CellID"].to_numpy()
    pheno = {}
    texture_rng = np.random.default_rng(ss[2])
    for m in panel.markers:
        k = endmembers.index(m.fluor)
        st = (stroma_expression[m.name], stroma_level) if m.name in stroma_expression else None
        level, pos = _expression(rng, layout, fractions.get(m.name), st)
        level = level * float(brightness.get(m.name, 1.0))
        lab = comps[m.compartment]
        texture = np.exp(0.2 * _smooth_noise(texture_rng, shape, 0.8 / px) - 0.02)
        dens = np.where(lab > 0, level[lab] * texture, 0.0).astype(np.float32)
        planes[k] += dens * unit[k]
        present = np.bincount(lab.ravel(), minlength=layout.n + 1)[ids] > 0
        mean = ndi.mean(dens, lab, ids) * unit[k]
        truth[m.name] = np.where(present, mean, np.nan).astype(np.float64)
        pheno[f"{m.name}_positive"] = pos[ids]
    if use_af:
        k0 = len(fluors)
        planes[k0:] = _autofluorescence(np.random.default_rng(ss[3]), layout, n_af) * float(autofluorescence) * unit[k0:, None, None]

    blurred = _psf(planes, psf_sigma_um / px)
    offset = float(camera_offset)
    counts = _mix_and_expose(np.random.default_rng(ss[4]), blurred, mixing, float(read_noise), offset)
    meta = {"synthetic": True, "seed": int(seed)}
    if record_offset:
        meta = {"camera_offset": offset, **meta}
    image = MultiplexImage(counts, channels, pixel_size_um=px, name=name, source=None, metadata=dict(meta))
    ab_channels = [Channel(e, fluor=e) for e in endmembers]
    abundances = MultiplexImage(blurred, ab_channels, pixel_size_um=px, name=f"{name}_abundances")

    truth = truth[["CellID"] + [m.name for m in panel.markers] + ["X_centroid", "Y_centroid", "Area"]]
    truth["cell_type"] = np.array(CELL_TYPES)[layout.cell_type[ids]]
    truth["nest"] = layout.nest[ids]
    for k, v in pheno.items():
        truth[k] = v

    control = None
    if unstained:
        crng = np.random.default_rng(ss[5])
        cshape = tuple(int(v) for v in (control_shape or opts.get("control_shape") or shape))
        clay = tissue_layout(cshape, pixel_size_um=px, crowded=crowded, seed=crng)
        cpl = np.zeros((len(endmembers),) + cshape, np.float32)
        if use_af:
            k0 = len(fluors)
            cpl[k0:] = _autofluorescence(crng, clay, n_af) * float(autofluorescence) * unit[k0:, None, None]
        ccounts = _mix_and_expose(crng, _psf(cpl, psf_sigma_um / px), mixing, float(read_noise), offset)
        control = MultiplexImage(ccounts, channels, pixel_size_um=px, name=f"{name}_unstained", metadata=dict(meta))

    settings = {
        "shape": list(shape), "pixel_size_um": px, "mode": channel_mode,
        "channels": [[c.name, c.emission_nm, c.bandwidth_nm] for c in channels],
        "crowded": bool(crowded), "uneven": bool(uneven), "autofluorescence": float(autofluorescence),
        "photons": float(photons), "read_noise": float(read_noise), "psf_sigma_um": float(psf_sigma_um),
        "camera_offset": offset, "offset_recorded": bool(record_offset), "seed": int(seed),
        "endmembers": endmembers, "autofluorescence_species": n_af,
        "stroma_expression": stroma_expression, "stroma_level": float(stroma_level),
        "spectral_shift_nm": float(spectral_shift_nm), "spectral_shifts_nm": shifts,
        "unstained": bool(unstained), "control_shape": None if control is None else list(control.shape[1:]),
        "name": name,
    }
    return SynthSlide(image, layout.nuclei, layout.cells, truth, abundances, mixing, control, panel, settings)


def _provenance(slide: SynthSlide) -> dict:
    from . import __version__

    panel = slide.panel
    return {
        "made_by": f"qdplex {__version__} qdplex.synth.make_slide",
        "settings": slide.settings,
        "panel": panel.to_dict() if hasattr(panel, "to_dict") else None,
        "mixing": {
            "channels": [c.name for c in slide.image.channels],
            "endmembers": slide.abundances.channel_names,
            "matrix": np.round(slide.mixing, 6).tolist(),
        },
        "truth": {
            "abundances": "noise-free planes after PSF blur; slide = camera_offset + mixing @ abundances + noise",
            "cells_truth.csv": "per cell: mean of the unblurred abundance over the marker's true compartment",
            "membrane_width_um": MEMBRANE_WIDTH_UM,
        },
    }


def write_slide(slide: SynthSlide, out_dir, *, compression="zlib") -> dict:
    """Write a synthetic slide and its ground truth (layout in docs/architecture.md).

    ``OUT/slides/N.ome.tif``, ``OUT/truth/N/{nuclei.tif, cells.tif,
    abundances.ome.tif, cells_truth.csv, synth.json}`` and, with a control,
    ``OUT/controls/N_unstained.ome.tif``. ``synth.json`` records how the slide
    was made (settings, seed, panel, mixing matrix, qdplex version). Every file
    is written atomically.

    Returns
    -------
    dict
        ``{"slide", "nuclei", "cells", "abundances", "truth", "settings"[, "unstained"]}`` → Path.
    """
    from .io import atomic_path, write_labels, write_ome_tiff
    from .io.checks import check_plain_name

    out = Path(out_dir)
    n = check_plain_name(slide.name)  # its files must stay inside out_dir
    paths = {
        "slide": out / "slides" / f"{n}.ome.tif",
        "nuclei": out / "truth" / n / "nuclei.tif",
        "cells": out / "truth" / n / "cells.tif",
        "abundances": out / "truth" / n / "abundances.ome.tif",
        "truth": out / "truth" / n / "cells_truth.csv",
        "settings": out / "truth" / n / "synth.json",
    }
    if slide.unstained is not None:
        paths["unstained"] = out / "controls" / f"{n}_unstained.ome.tif"
    for p in paths.values():
        os.makedirs(p.parent, exist_ok=True)
    px = slide.image.pixel_size_um
    write_ome_tiff(paths["slide"], slide.image, compression=compression)
    write_labels(paths["nuclei"], slide.nuclei, pixel_size_um=px, name="nuclei")
    write_labels(paths["cells"], slide.cells, pixel_size_um=px, name="cells")
    write_ome_tiff(paths["abundances"], slide.abundances, compression=compression)
    with atomic_path(paths["truth"]) as tmp:
        slide.truth.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(paths["settings"]) as tmp:
        Path(tmp).write_text(json.dumps(_provenance(slide), indent=2) + "\n", encoding="utf-8")
    if slide.unstained is not None:
        write_ome_tiff(paths["unstained"], slide.unstained, compression=compression)
    return paths


# --------------------------------------------------------------------------- accuracy against truth
def _marker_columns(table: pd.DataFrame) -> list[str]:
    """Marker columns of an MCQuant-order table: those between CellID and X_centroid."""
    cols = list(table.columns)
    end = cols.index("X_centroid") if "X_centroid" in cols else len(cols)
    return [c for c in cols[1:end] if "_" not in c]


def truth_accuracy(true_nuclei, truth: pd.DataFrame, nuclei, table: pd.DataFrame, *, iou=0.5) -> dict:
    """How well a segmentation and cell table recover a synthetic slide's ground truth.

    Nuclei are matched one-to-one at ``iou`` (:func:`qdplex.metrics.match_labels`);
    over the matched cells each marker's measured mean is compared with its true
    mean (Pearson r and least-squares slope) and, when the table has
    ``<marker>_positive``, the positivity calls with the true ones.

    Parameters
    ----------
    true_nuclei, nuclei : numpy.ndarray
        True and measured nucleus labels (cell IDs).
    truth : pandas.DataFrame
        The truth table (``SynthSlide.truth`` or ``cells_truth.csv``).
    table : pandas.DataFrame
        The measured cell table (``CellID`` and one column per marker).
    iou : float
        IoU threshold of a match, in [0.5, 1] (default 0.5).

    Returns
    -------
    dict
        ``f1``, ``precision``, ``recall``, ``tp``, ``fp``, ``fn``, ``mean_iou``,
        ``matched`` (cells compared) and ``markers``: marker → ``{"r", "slope",
        "positive_agreement"}`` (``positive_agreement`` only with positivity columns).
    """
    from .errors import SegmentationError
    from .metrics import iou_pairs, match_labels

    if not 0.5 <= iou <= 1:
        raise SegmentationError(f"expected an IoU threshold in [0.5, 1] (one-to-one matches), found {iou}")
    seg = match_labels(true_nuclei, nuclei, iou=iou)
    t_ids, p_ids, ious = iou_pairs(true_nuclei, nuclei)[:3]
    keep = ious >= iou  # above 0.5 every object has at most one partner
    t_ids, p_ids = t_ids[keep], p_ids[keep]
    tt = truth.set_index("CellID")
    mt = table.set_index("CellID")
    ok = np.isin(t_ids, tt.index.to_numpy()) & np.isin(p_ids, mt.index.to_numpy())
    t_ids, p_ids = t_ids[ok], p_ids[ok]
    out = {k: seg[k] for k in ("f1", "precision", "recall", "tp", "fp", "fn", "mean_iou")}
    out["matched"] = int(t_ids.size)
    out["markers"] = {}
    for m in _marker_columns(truth):
        if m not in mt.columns:
            continue
        x = tt.loc[t_ids, m].to_numpy(np.float64)
        y = mt.loc[p_ids, m].to_numpy(np.float64)
        fin = np.isfinite(x) & np.isfinite(y)
        x, y = x[fin], y[fin]
        ok2 = x.size > 1 and np.ptp(x) > 0 and np.ptp(y) > 0
        res = {
            "r": float(np.corrcoef(x, y)[0, 1]) if ok2 else float("nan"),
            "slope": float(np.polyfit(x, y, 1)[0]) if ok2 else float("nan"),
        }
        col = f"{m}_positive"
        if col in tt.columns and col in mt.columns:
            a = tt.loc[t_ids, col].to_numpy().astype(bool)
            b = mt.loc[p_ids, col].to_numpy().astype(bool)
            res["positive_agreement"] = float(np.mean(a == b)) if a.size else float("nan")
        out["markers"][m] = res
    return out


def truth_accuracy_files(truth_dir, result_dir, *, iou=0.5) -> dict:
    """:func:`truth_accuracy` from disk.

    Parameters
    ----------
    truth_dir : path
        A slide's truth folder (``DIR/truth/N`` with ``nuclei.tif`` and ``cells_truth.csv``).
    result_dir : path
        The pipeline's output folder of that slide (``OUT/N`` with
        ``nuclei.ome.tif`` and ``cells.csv``).
    """
    from .io import read_labels

    truth_dir, result_dir = Path(truth_dir), Path(result_dir)
    need = [truth_dir / "nuclei.tif", truth_dir / "cells_truth.csv", result_dir / "nuclei.ome.tif", result_dir / "cells.csv"]
    for p in need:
        if not p.is_file():
            raise InputError("expected this file of a synthetic slide's truth or its pipeline output, found none", path=p)
    return truth_accuracy(
        read_labels(need[0]), pd.read_csv(need[1]), read_labels(need[2]), pd.read_csv(need[3]), iou=iou
    )
