"""Synthetic multiplexed quantum-dot slides with ground truth.

A synthetic slide is made in four steps, each a plain function of a seeded
random generator:

1. **Tissue layout** (:func:`tissue_layout`): epithelial nests (smooth random
   blobs) packed with large, roundish, often touching nuclei; sparse stroma
   around them with elongated fibroblast nuclei and small round lymphocytes.
   Nuclei are ellipses with slightly irregular outlines, 8–12 µm across for
   epithelium. Cells grow from their nuclei by a seeded watershed limited to a
   per-cell-type reach, so neighbouring epithelial cells touch and stromal
   cells keep a thin rim of cytoplasm. Nucleus and cell share one ID.
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

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["nuclear_field", "tissue_layout", "TissueLayout"]

# cell types of the layout, in the order of TissueLayout.cell_type codes
CELL_TYPES = ("epithelial", "stromal", "immune")

# per cell type: (minor radius µm range, aspect ratio range, relative DAPI brightness, cell reach µm)
_NUCLEUS_SHAPE = {
    "epithelial": ((4.0, 5.6), (1.0, 1.45), 1.0, 5.0),
    "stromal": ((1.8, 2.6), (2.2, 3.6), 1.15, 2.5),
    "immune": ((2.8, 3.4), (1.0, 1.15), 1.6, 1.5),
}


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
    """Gaussian-filtered white noise rescaled to zero mean, unit standard deviation."""
    f = ndi.gaussian_filter(rng.standard_normal(shape), max(float(sigma_px), 0.5), mode="wrap")
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
        from .errors import InputError

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
    reach_map = reach[cell_type[nearest]] * (1.0 + 0.2 * _smooth_noise(rng, shape, 3.0 / px))
    allowed = (d_out <= reach_map) | (nuclei > 0)
    elev = d_out + 1.5 * _smooth_noise(rng, shape, 2.0 / px)
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
        shot += rng.normal(0.0, read_noise, expected.shape).astype(np.float32)
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
    """
    ss = np.random.SeedSequence(int(seed)).spawn(3)
    layout = tissue_layout(shape, pixel_size_um=pixel_size_um, crowded=crowded, seed=np.random.default_rng(ss[0]))
    rng = np.random.default_rng(ss[1])
    dens = _nuclear_stain(rng, layout, uneven=uneven)
    illum, bg = _illumination(rng, dens.shape, uneven)
    expected = _psf(dens * illum + bg, psf_sigma_um / float(pixel_size_um)) * float(photons)
    image = _camera(np.random.default_rng(ss[2]), expected, float(read_noise))
    return image, layout.nuclei
