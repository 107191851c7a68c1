"""Linear spectral unmixing: ordinary, non-negative and Poisson-weighted least squares.

Each pixel spectrum ``y`` (C channels, camera offset removed) is modelled as
``y ≈ M a`` with the C×K mixing matrix ``M`` of a :class:`~qdplex.spectra.SpectralLibrary`
and K abundances ``a``. Methods:

``"ols"``
    ``a = M⁺ y`` (unconstrained least squares).
``"nnls"``
    exact non-negative least squares, ``min ‖y − M a‖`` subject to ``a ≥ 0``.
    One fused compiled (numba) pass per block of pixels reads each spectrum once:
    float32 projection ``x = M⁺(y − offset)`` (the unconstrained solution), then,
    for pixels with a negative component, block principal pivoting (Kim & Park
    2011) in float64 started from the sign pattern of ``x``, with a precomputed
    table per passive set (K ≤ 12; one K×K matrix–vector product per pivoting
    step), stopped when the KKT conditions hold; for K > 12 a Cholesky active-set
    solver. The result equals :func:`scipy.optimize.nnls` to ~1e-6 of the largest
    abundance (the float32 projection sets that limit). The same pass flags
    saturated and non-finite pixels and computes the RMS residual. Kernels are
    generated for each K (the small loops written out, :mod:`qdplex.unmix._codegen`) and
    cached on disk (:mod:`qdplex.unmix._cache`: ``$QDPLEX_KERNEL_DIR``, else
    ``~/.cache/qdplex/kernels``), keyed on the kernel code only (docstrings and
    comments left out) and the numba, numpy and Python versions; an unusable cache
    entry is recompiled in memory (with a RuntimeWarning) and replaced. The numba
    kernels themselves live in :mod:`qdplex.unmix._kernels`. Work runs on every core: a thread pool for
    arrays, dask's threads for images (the kernels release the GIL).
``"poisson"``
    non-negative, weighted by the inverse variance of each channel
    (``gain · max(M a, 0) + read_noise²``), re-weighted ``poisson_iterations``
    times from the NNLS solution; at convergence this is the Poisson (shot-noise)
    maximum-likelihood fit, better than NNLS at low counts.

Bad pixels: a pixel is *saturated* where any channel reaches ``saturation``
(default: the maximum of an integer dtype); ``exclude_saturated=True`` fits it from
its unsaturated channels only. Non-finite values (NaN/inf) raise an
:class:`~qdplex.errors.InputError` naming the image and the block, unless
``nonfinite="exclude"``, which fits those pixels from their finite channels. A
pixel left with fewer usable channels than endmembers gets zero abundances and a
NaN residual. Integer input is converted to float32 (on the fly, no copy) before
the offset is removed, so uint16 never wraps.

On-slide estimates (images only, on a small spread-out pixel sample,
:mod:`qdplex.unmix._sample`): the camera offset, when neither the caller nor the file
gives it, is estimated from the darkest pixels (:mod:`qdplex.unmix.offset`); the fluors'
spectra are refined on the slide (:mod:`qdplex.unmix.refine`, ``refine=False`` to skip);
the fit is compared with the slide's noise floor and plain-language warnings are kept
(:mod:`qdplex.unmix.checks`). :meth:`UnmixResult.record` gives all of it for ``run.json``;
one log line (logger ``qdplex.batch.unmix``) says what was used.

For a :class:`~qdplex.model.MultiplexImage` the work is lazy and block-wise
(:func:`dask.array.map_blocks` over spatial chunks with all channels per block),
so memory stays bounded by the chunk size; chunks of an in-memory image are cut
into blocks as views, not copies.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import dask.array as da
import numpy as np

from .._threads import one_thread
from ..errors import InputError, SpectraError
from ..model import Channel, MultiplexImage
from ._cache import kernel as _kernel
from ._kernels import _MAX_TABLE_K, _nnls_scalar, _pivot_table_for, _pixel_fit

__all__ = ["unmix", "UnmixResult", "unmix_array", "METHODS"]

METHODS = ("nnls", "ols", "poisson")
NONFINITE = ("raise", "exclude")


@dataclass(frozen=True)
class _Plan:
    M: np.ndarray          # C×K float64 mixing matrix
    P32: np.ndarray        # K×C float32 pseudo-inverse
    offx32: np.ndarray     # K float32: P @ offset
    M32: np.ndarray        # C×K float32 (residual)
    off32: np.ndarray      # C float32 (residual)
    MM: np.ndarray         # C×K² per-channel outer products (weighted fits)
    G: np.ndarray          # K×K float64 Gram matrix MᵀM
    gscale: float          # max |G|: scale of the gradient in the KKT test
    tab: np.ndarray        # pivoting table (2^K×K×K raveled, see _pivot_table) or a 1-element dummy
    offset: np.ndarray     # C float64
    saturation: float
    method: str
    exclude_saturated: bool
    nonfinite: str
    poisson_iterations: int
    gain: float
    read_var: float
    where: str


_KERNEL_DTYPES = {np.dtype(t) for t in (np.float32, np.float64, np.uint8, np.uint16, np.int16, np.uint32, np.int32)}
_DUMMY2 = np.zeros((1, 1), dtype=np.float32)


def _kernel_input(Y: np.ndarray) -> np.ndarray:
    """Y as the fused kernel reads it: a supported native dtype, unit stride along x (views kept)."""
    if Y.dtype not in _KERNEL_DTYPES or not Y.dtype.isnative:
        Y = Y.astype(np.float32)
    st = Y.strides
    if (Y.shape[2] > 1 and st[2] != Y.itemsize) or min(st) < 0 or any(s % Y.itemsize for s in st):
        Y = np.ascontiguousarray(Y)
    return Y


def _flat_view(Y: np.ndarray) -> tuple[np.ndarray, int, int]:
    """A C×h×w array with unit x-stride as (1-D contiguous view from its first element,
    channel stride, row stride) in elements: the kernel then reads every row segment as a
    contiguous slice (vectorised), even for a strided dask block, without a copy."""
    C, h, w = Y.shape
    it = Y.itemsize
    sc, sy = Y.strides[0] // it, Y.strides[1] // it
    n = (C - 1) * sc + (h - 1) * sy + w
    return np.lib.stride_tricks.as_strided(Y, shape=(n,), strides=(it,), writeable=False), int(sc), int(sy)


def _fit(Y: np.ndarray, plan: _Plan, X: np.ndarray, rms: np.ndarray | None, flag: np.ndarray,
         span=None, origin=(0, 0)) -> None:
    """Fit the C×h×w pixel spectra Y (rows y0:y1, columns x0:x1 of ``span``) in place.

    Writes the K×h×w float32 abundances ``X``, the h×w RMS residual ``rms`` (when not
    None) and the h×w uint8 ``flag`` (bit 0 non-finite, bit 1 saturated). One fused
    kernel pass does the work; pixels that need channel exclusion or Poisson weights
    are then refitted from their gathered spectra.
    """
    C, h, w = Y.shape
    y0, y1, x0, x1 = span or (0, h, 0, w)
    K = X.shape[0]
    if Y.size == 0:
        return
    table = plan.tab.shape[0] > 1
    nonneg = plan.method != "ols"
    want = rms is not None
    flat, sc, sy = _flat_view(Y)
    nbad = _kernel("fused", K)(flat, C, sc, sy, plan.P32, plan.offx32, plan.M32, plan.off32, plan.tab, plan.gscale,
                               nonneg and table, plan.saturation, want and (table or not nonneg),
                               X, rms if want else _DUMMY2, flag, y0, y1, x0, x1)
    if nbad and plan.nonfinite == "raise":
        ys, xs = np.nonzero(flag[y0:y1, x0:x1] & 1)
        raise InputError(
            f"expected finite pixel values, found {int(nbad)} pixels with NaN/inf in the block at "
            f"y {origin[0] + y0}, x {origin[1] + x0} (first at y {origin[0] + y0 + ys[0]}, "
            f"x {origin[1] + x0 + xs[0]}); pass nonfinite='exclude' to fit them from their finite channels",
            path=plan.where)
    Xs, Ys, fs = X[:, y0:y1, x0:x1], Y[:, y0:y1, x0:x1], flag[y0:y1, x0:x1]
    if nonneg and not table:  # K > table size: Cholesky active sets where a component is negative
        ys, xs = np.nonzero((Xs.min(axis=0) < 0.0) & ((fs & 1) == 0))
        if ys.size:
            sub = np.ascontiguousarray(Xs[:, ys, xs])
            _nnls_scalar(sub, np.arange(ys.size, dtype=np.int64), plan.G)
            Xs[:, ys, xs] = sub
        if want:
            d = Ys.astype(np.float32) - plan.off32[:, None, None] - np.tensordot(plan.M32, Xs, axes=1)
            r = np.sqrt(np.mean(d * d, axis=0))
            rms[y0:y1, x0:x1] = np.where(fs & 1, np.float32(np.nan), r)
    if not nbad and not plan.exclude_saturated and plan.method != "poisson":
        return  # nothing to refit
    redo = fs & (3 if plan.exclude_saturated else 1)
    groups = [(np.nonzero(redo), False)]
    if plan.method == "poisson":  # IRLS from the NNLS fit, except where channels must be excluded
        groups.append((np.nonzero(redo == 0), True))
    for (ys, xs), warm in groups:
        if not ys.size:
            continue
        Yg = np.ascontiguousarray(Ys[:, ys, xs])
        Xg = np.ascontiguousarray(Xs[:, ys, xs], dtype=np.float32)
        rg = np.full(ys.size, np.nan, dtype=np.float32)
        _pixel_fit(Yg, plan.offset, plan.M, plan.MM, Xg, rg, np.arange(ys.size, dtype=np.int64),
                   plan.saturation, plan.exclude_saturated, nonneg,
                   plan.poisson_iterations if plan.method == "poisson" else 0, plan.gain, plan.read_var, warm)
        Xs[:, ys, xs] = Xg
        if want:
            rms[y0:y1, x0:x1][ys, xs] = rg


def _block_origin(block_info):
    if block_info is not None and 0 in block_info:
        loc = block_info[0]["array-location"]
        return (loc[1][0], loc[2][0])
    return (0, 0)


def _unmix_block(block, plan: _Plan, block_info=None):
    """C×h×w block → (K+2)×h×w float32: abundances, RMS residual, saturated (0/1)."""
    Y = _kernel_input(np.asarray(block))
    C, h, w = Y.shape
    K = plan.M.shape[1]
    out = np.empty((K + 2, h, w), dtype=np.float32)
    flag = np.empty((h, w), dtype=np.uint8)
    _fit(Y, plan, out[:K], out[K], flag, origin=_block_origin(block_info))
    np.bitwise_and(flag >> 1, 1, out=out[K + 1], casting="unsafe")
    return out


def _pseudo_inverse(M: np.ndarray, G: np.ndarray) -> np.ndarray:
    """``numpy.linalg.pinv(M)`` for a C×K ``M`` of full column rank: (MᵀM)⁻¹Mᵀ, solved from
    the normal equations ``G = MᵀM`` (~50 µs instead of ~100 µs for an SVD: the refinement
    makes six or seven plans per slide); the SVD where a Cholesky factorisation finds ``G`` not safely
    positive definite."""
    try:
        L = np.linalg.cholesky(G)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(M)
    d = np.diag(L)
    if not d.min() > 1e-6 * d.max():
        return np.linalg.pinv(M)
    return np.linalg.solve(G, M.T)


def _make_plan(M, *, method, offset, saturation, exclude_saturated, nonfinite, poisson_iterations,
               gain, read_noise, dtype, names, where, verify: bool = True) -> _Plan:
    if method not in METHODS:
        raise SpectraError(f"expected method one of {METHODS}, found {method!r}")
    if nonfinite not in NONFINITE:
        raise SpectraError(f"expected nonfinite one of {NONFINITE}, found {nonfinite!r}")
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] < 1 or M.shape[1] < 1:
        raise SpectraError(f"expected a C×K mixing matrix, found shape {M.shape}")
    C, K = M.shape
    if not np.all(np.isfinite(M)):
        raise SpectraError("expected a finite mixing matrix, found NaN/inf entries")
    if verify:  # (the refinement's own fits of the sample skip the conditioning check)
        from ..crosstalk import require_unmixable

        require_unmixable(M, names)
    if offset is None:
        off = np.zeros(C)
    else:
        off = np.asarray(offset, dtype=np.float64).ravel()
        if off.size == 1:
            off = np.full(C, float(off[0]))
        if off.size != C:
            raise SpectraError(f"expected one camera offset or one per channel ({C}), found {off.size}", path=where)
    if saturation is None:
        dt = np.dtype(dtype)
        saturation = float(np.iinfo(dt).max) if dt.kind in "ui" else np.inf
    G = M.T @ M
    tab = _pivot_table_for(G.tobytes(), K) if K <= _MAX_TABLE_K else np.zeros(1)
    P = _pseudo_inverse(M, G)
    return _Plan(M=M, P32=P.astype(np.float32), offx32=(P @ off).astype(np.float32),
                 M32=M.astype(np.float32), off32=off.astype(np.float32),
                 MM=np.einsum("ci,cj->cij", M, M).reshape(C, K * K),
                 G=G, gscale=float(np.abs(G).max()), tab=tab, offset=off,
                 saturation=float(saturation), method=method, exclude_saturated=bool(exclude_saturated),
                 nonfinite=nonfinite, poisson_iterations=int(poisson_iterations), gain=float(gain),
                 read_var=float(read_noise) ** 2 if read_noise else 1e-6, where=where)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


@dataclass
class UnmixResult:
    """Output of :func:`unmix` on a :class:`MultiplexImage`.

    Attributes
    ----------
    abundances : MultiplexImage
        float32, one lazy plane per library endmember, ``Channel(name=fluor,
        fluor=fluor, emission_nm=peak)``.
    residual : dask.array.Array
        Y×X float32 RMS misfit per pixel (over the channels used in the fit).
    saturated : dask.array.Array
        Y×X bool, True where any channel reached the saturation level.
    library : SpectralLibrary
        The spectra used: the given library, with the spectra refined on the slide
        replaced (source ``"refined on slide …"``).
    method : str
    matrix : numpy.ndarray
        The C×K mixing matrix used (refined columns included).
    offset : numpy.ndarray
        The camera offset subtracted, per channel.
    offset_record : dict
        How the offset was found: ``values``, ``source`` (``"given"``, ``"file"``,
        ``"estimated"``) and, when estimated, ``estimate`` (:mod:`qdplex.unmix.offset`).
    refinement : dict
        ``enabled``, and when enabled ``residual_before``, ``residual_after``,
        ``pixels``, ``rounds`` and per spectrum ``refined``, ``cosine_to_prior``,
        ``pixels``, ``reason`` (why refused, "" if refined) and ``column`` (the matrix
        column used) (:mod:`qdplex.unmix.refine`).
    autofluorescence : dict or None
        How the autofluorescence components were chosen (the library's
        ``autofluorescence`` record, :func:`qdplex.spectra.estimate_autofluorescence`).
    quality : dict
        Residual against the slide's noise floor (:func:`qdplex.unmix.checks.fit_quality`).
    warnings : list of str
        Plain-language fit warnings (:mod:`qdplex.unmix.checks`).
    channels : list of str
        The input channels, in the order of the matrix rows.
    """

    abundances: MultiplexImage
    residual: da.Array
    saturated: da.Array
    library: object
    method: str
    matrix: np.ndarray | None = None
    offset: np.ndarray | None = None
    offset_record: dict = field(default_factory=dict)
    refinement: dict = field(default_factory=lambda: {"enabled": False})
    autofluorescence: dict | None = None
    quality: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    channels: list = field(default_factory=list)

    def record(self) -> dict:
        """Everything about how this slide was unmixed, as a JSON-able dict (for ``run.json``):
        method, endmembers and their sources, channels, offset (values and how found),
        refinement, autofluorescence choice, fit quality and warnings."""
        lib = self.library
        names = list(getattr(lib, "names", []))
        sources = lib.sources() if callable(getattr(lib, "sources", None)) else {}
        return _jsonable({
            "method": self.method,
            "endmembers": names,
            "sources": dict(sources),
            "channels": list(self.channels),
            # the mixing matrix actually used (C×K, rows = channels, columns = endmembers;
            # refined spectra included): a viewer refits any pixel exactly from it
            "matrix": None if self.matrix is None else np.asarray(self.matrix, dtype=float).tolist(),
            "offset": dict(self.offset_record),
            "refinement": dict(self.refinement),
            "autofluorescence": self.autofluorescence,
            "quality": dict(self.quality),
            "warnings": list(self.warnings),
        })

    def persist(self) -> "UnmixResult":
        """This result with abundances, residual and mask computed once and held in memory.

        One pass over the image (the three share their blocks); use it when a slide
        fits in memory and its planes are read several times (segmentation, then
        quantification, then writing), instead of recomputing the unmixing each time.
        """
        import dask

        ab, res, sat = dask.persist(self.abundances.data, self.residual, self.saturated)
        return replace(self, abundances=replace(self.abundances, data=ab), residual=res, saturated=sat)

    def to_image(self) -> MultiplexImage:
        """Abundances plus a ``"residual"`` plane, as one image for writing (one compute)."""
        a = self.abundances
        data = da.concatenate([a.data, self.residual[None].astype(np.float32)], axis=0)
        return MultiplexImage(data=data, channels=list(a.channels) + [Channel("residual")],
                              pixel_size_um=a.pixel_size_um, name=a.name, source=a.source,
                              metadata=dict(a.metadata))


def unmix_array(data: np.ndarray, matrix: np.ndarray, method: str = "nnls", *, chunk: int = 1024,
                **options) -> np.ndarray:
    """Unmix a plain C×Y×X (or C×N) numpy array with a C×K matrix; returns K×Y×X float32.

    One fused compiled pass per span of rows (projection, exact NNLS, flags) writes
    straight into the output; the spans run in a thread pool on every core (the
    kernel releases the GIL). The input is read in place, whatever its dtype (integer
    input is converted on the fly, never copied). ``chunk²`` bounds the pixels per
    span. Options as in :func:`unmix`.
    """
    arr = np.asarray(data)
    flat = arr.ndim == 2
    if flat:
        arr = arr[:, None, :]
    if arr.ndim != 3:
        raise InputError(f"expected a C×Y×X array, found shape {arr.shape}")
    M = np.asarray(matrix, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != arr.shape[0]:
        raise SpectraError(f"expected a mixing matrix with {arr.shape[0]} rows (one per channel), "
                           f"found shape {M.shape}")
    plan = _make_plan(M, method=method, dtype=arr.dtype, names=None, where="array",
                      **_plan_options(options))
    out = _unmix_planned(arr, plan, chunk)
    return out[:, 0, :] if flat else out


def _unmix_planned(arr: np.ndarray, plan: _Plan, chunk: int = 1024, residual: bool = False):
    """K×Y×X float32 abundances of a C×Y×X array with a ready ``plan`` (spans in a thread pool),
    and with ``residual`` the Y×X RMS residual too."""
    Y = _kernel_input(arr)
    K = plan.M.shape[1]
    C, H, W = Y.shape
    out = np.empty((K, H, W), dtype=np.float32)
    rms = np.empty((H, W), dtype=np.float32) if residual else None
    flag = np.empty((H, W), dtype=np.uint8)
    spans = _spans(H, W, _cpus(), max(1, int(chunk) ** 2))
    if len(spans) == 1:
        _fit(Y, plan, out, rms, flag, spans[0])
    else:
        with ThreadPoolExecutor(max_workers=min(len(spans), _cpus())) as pool:
            list(pool.map(lambda s: _fit(Y, plan, out, rms, flag, s), spans))
    return (out, rms) if residual else out


@functools.lru_cache(maxsize=1)
def _cpus() -> int:
    """``os.cpu_count()``, read once (~0.1 ms a call in a container; the refinement's small fits call it often)."""
    return os.cpu_count() or 1


def _spans(H: int, W: int, workers: int, max_px: int) -> list[tuple[int, int, int, int]]:
    """Split H×W pixels into (y0, y1, x0, x1) spans: about 4 per worker (load balance;
    fewer, longer spans stream memory better), whole rows when there are enough rows,
    at most ``max_px`` pixels each. Up to 2^16 pixels, one span: the refinement's fits of
    its 8192-pixel sample on two threads (a persistent pool) took ~0.4 ms longer in a run
    than on one (waking the other thread)."""
    if H * W <= 1 << 16 and H * W <= max_px:
        return [(0, H, 0, W)]  # small: one span, no thread pool
    n = max(4 * workers, -(-H * W // max_px))
    if H >= n or W == 1:
        step = max(1, -(-H // n))
        return [(a, min(H, a + step), 0, W) for a in range(0, H, step)]
    step = max(256, -(-W * H // n))  # few rows: split along x too
    return [(y, y + 1, a, min(W, a + step)) for y in range(H) for a in range(0, W, step)]


def _blocks(data: da.Array, chunk: int | None) -> da.Array:
    """``data`` with all channels in each block and spatial blocks of at most ``chunk``.

    Where the image's own spatial chunks are whole multiples of ``chunk`` (e.g. the
    2048² default of an in-memory image, or aligned tiles on disk), each chunk is cut
    into views (no copy: :meth:`dask.array.Array.rechunk` would copy the pieces);
    otherwise dask rechunks.
    """
    import operator

    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    if chunk is None:
        return data.rechunk({0: -1})
    chunk = int(chunk)
    if len(data.chunks[0]) > 1 or not all(s % chunk == 0 for ax in data.chunks[1:] for s in ax[:-1]):
        return data.rechunk((-1, chunk, chunk))  # one rechunk: bounded memory for planes on disk
    if all(s <= chunk for ax in data.chunks[1:] for s in ax):
        return data

    def pieces(sizes):  # (input block, slice within it, size) per output block
        out = []
        for b, s in enumerate(sizes):
            out += [(b, slice(a, min(s, a + chunk)), min(s, a + chunk) - a) for a in range(0, s, chunk)]
        return out

    py, px = pieces(data.chunks[1]), pieces(data.chunks[2])
    name = "qdplex-blocks-" + tokenize(data, chunk)
    dsk = {(name, 0, i, j): (operator.getitem, (data.name, 0, by, bx), (slice(None), sy, sx))
           for i, (by, sy, _) in enumerate(py) for j, (bx, sx, _) in enumerate(px)}
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[data])
    chunks = (data.chunks[0], tuple(n for *_, n in py), tuple(n for *_, n in px))
    return da.Array(graph, name, chunks=chunks, dtype=data.dtype, meta=data._meta)


def _plan_options(options: dict) -> dict:
    allowed = {"offset": None, "saturation": None, "exclude_saturated": False, "nonfinite": "raise",
               "poisson_iterations": 3, "gain": 1.0, "read_noise": 1.0}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unmix() got unexpected options {unknown}; expected some of {sorted(allowed)}")
    return {k: options.get(k, v) for k, v in allowed.items()}


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return [_jsonable(v) for v in o.tolist()]
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    return o


def unmix(image, library, method: str = "nnls", *, offset="auto", refine=True, saturation=None,
          exclude_saturated: bool = False, nonfinite: str = "raise", poisson_iterations: int = 3,
          gain: float = 1.0, read_noise: float = 1.0, chunk: int | None = 1024, check: bool = True,
          nuclear_stain: str | None = "auto"):
    """Unmix an image into one abundance plane per library endmember.

    Parameters
    ----------
    image : MultiplexImage or numpy.ndarray
        A multichannel image whose channels carry emission bands; or a plain
        C×Y×X array (then ``library`` is a C×K mixing matrix).
    library : SpectralLibrary or numpy.ndarray
        Endmember spectra (sampled on ``image.channels`` with
        :meth:`~qdplex.spectra.SpectralLibrary.matrix`), or a C×K matrix for arrays.
    method : {"nnls", "ols", "poisson"}
        See the module docstring.
    offset : "auto", None, float or sequence of float
        Camera offset (dark level) subtracted from every channel (or per channel).
        ``"auto"`` (default) or None: the offset the image records
        (``metadata["camera_offset"]``), else estimated from the slide's darkest
        pixels (:mod:`qdplex.unmix.offset`); a number wins. For a plain array (no
        metadata, no channels) "auto" and None mean no offset.
    refine : bool or sequence of str
        Refine the spectra on the slide (:mod:`qdplex.unmix.refine`): True (default)
        every fluor whose spectrum was not measured on a control (single-stain
        controls win); a list: those endmembers (still not control-measured ones);
        False: none. Autofluorescence (``AF``, ``AF2``, …) is refined only when
        listed: it is broad and everywhere, its purest pixels still hold faint stain,
        and refining it moved its spectrum into the nuclear stain's on a slide made
        with measured spectra (nuclei F1 0.98 → 0.72).
        Plain arrays are never refined.
    saturation : float, optional
        Raw level at or above which a channel value is saturated; default the
        maximum of an integer dtype, none for floats.
    exclude_saturated : bool
        Fit saturated pixels from their unsaturated channels only.
    nonfinite : {"raise", "exclude"}
        NaN/inf pixel values: raise an InputError, or fit from finite channels.
    poisson_iterations : int
        Re-weighting passes of ``method="poisson"``.
    gain, read_noise : float
        Camera gain (ADU per photo-electron) and read noise (ADU RMS) for the
        Poisson weights.
    chunk : int, optional
        Spatial block size in pixels (all channels per block); None keeps the
        image's chunks.
    check : bool
        Compare the fit with the slide's noise floor and fill ``quality`` and
        ``warnings`` (:mod:`qdplex.unmix.checks`).
    nuclear_stain : str or None
        The library's nuclear-stain endmember, which the refinement treats apart
        (:mod:`qdplex.unmix.refine`); ``"auto"`` (default): those named like a DNA
        stain (:data:`DNA_STAINS`: DAPI, Hoechst, DRAQ5, …); None: none.

    Returns
    -------
    UnmixResult or numpy.ndarray
        For a MultiplexImage an :class:`UnmixResult` with lazy dask planes; for an
        array a K×Y×X float32 numpy array.

    Raises
    ------
    SpectraError
        Library not covering the channels, singular library (names the pair), bad options.
    InputError
        Non-finite pixels with ``nonfinite="raise"`` (at compute time).
    """
    opts = dict(saturation=saturation, exclude_saturated=exclude_saturated,
                nonfinite=nonfinite, poisson_iterations=poisson_iterations, gain=gain, read_noise=read_noise)
    if not isinstance(image, MultiplexImage):
        if hasattr(library, "matrix") and not isinstance(library, np.ndarray):
            raise SpectraError("expected a C×K mixing matrix with a plain array (no channel metadata to sample "
                               "a SpectralLibrary on); wrap the array in a MultiplexImage with channels instead")
        off = None if offset is None or (isinstance(offset, str) and offset == "auto") else offset
        return unmix_array(np.asarray(image), library, method, chunk=chunk or 1024, offset=off, **opts)
    if not hasattr(library, "matrix") or isinstance(library, np.ndarray):
        raise SpectraError(f"expected a SpectralLibrary for a MultiplexImage, found {type(library).__name__}")
    from .offset import resolve_offset

    where = image.source or image.name
    M0 = library.matrix(image.channels)
    names = list(library.names)
    _make_plan(M0, method=method, dtype=image.data.dtype, names=names, where=where, offset=None, **opts)  # checks
    sat = _make_plan_saturation(saturation, image.data.dtype)
    cache: list = []

    def sample():
        if not cache:
            from ._sample import pixel_sample

            cache.append(pixel_sample(image, saturation=sat))
        return cache[0]

    def fit(Y, M, residual=False):
        """NNLS of the C×N sample (with ``residual``, and its N RMS residuals); M's
        conditioning is checked once, before the slide is unmixed."""
        plan = _make_plan(M, method="nnls", dtype=Y.dtype, names=None, where=where, verify=False,
                          **_plan_options({}))
        out = _unmix_planned(np.asarray(Y)[:, None, :], plan, residual=residual)
        return (out[0][:, 0, :], out[1][0]) if residual else out[:, 0, :]

    # the estimates work on small matrices between compiled kernels: BLAS threads only
    # contend with the kernels' threads there (measured: refinement 35 → 19 ms at 768²)
    with one_thread("blas"):
        off, off_rec = resolve_offset(offset, image, sample, M0)
        M, lib_used, refinement = M0, library, {"enabled": False}
        if refine is not False and refine is not None:
            from .refine import MAX_PIXELS, refine_matrix

            wanted = ({n for n in names if not _is_autofluorescence(n)} if refine is True
                      else {str(n) for n in refine})
            fixed = {n for n in names if n not in wanted or str(library[n].source).startswith(_MEASURED)}
            Y = sample().subset(MAX_PIXELS, seed=0) - off.astype(np.float32)[:, None]
            M, rec = refine_matrix(Y, M0, names, fixed=fixed, unmix_fn=functools.partial(fit, residual=True),
                                   channels=image.channels, stain=_stains(names, nuclear_stain),
                                   single_peaked=[n for n in names if not _is_autofluorescence(n)],
                                   priors=[library[n] for n in names])
            refinement = {"enabled": True, **rec}
            lib_used = _refined_library(library, image.channels, M, rec, where)
        quality, warns = {}, []
        if check:
            from .checks import fit_quality, fit_warnings
            from .offset import estimate_offset

            quality = fit_quality(sample(), M, off, fit)
            dark = off_rec.get("estimate") or estimate_offset(sample(), M)
            warns = fit_warnings(quality, image.channels, off_rec, dark, names)
    plan = _make_plan(M, method=method, dtype=image.data.dtype, names=names, where=where, offset=off, **opts)
    data = _blocks(image.data, chunk)
    K = len(names)
    out = da.map_blocks(_unmix_block, data, plan=plan, dtype=np.float32,
                        chunks=((K + 2,),) + data.chunks[1:], token=f"qdplex-unmix-{method}")
    chans = [Channel(n, emission_nm=library.peak_nm(n), fluor=n) for n in names]
    abund = MultiplexImage(data=out[:K], channels=chans, pixel_size_um=image.pixel_size_um,
                           name=image.name, source=image.source, metadata=dict(image.metadata))
    result = UnmixResult(abundances=abund, residual=out[K], saturated=out[K + 1] > 0.5,
                         library=lib_used, method=method, matrix=M, offset=off, offset_record=off_rec,
                         refinement=refinement, autofluorescence=getattr(library, "autofluorescence", None),
                         quality=quality, warnings=warns, channels=[c.name for c in image.channels])
    _log(where, result)
    return result


#: Name prefixes (lower case) of DNA stains: a library's nuclear stain when the caller names none.
DNA_STAINS = ("dapi", "hoechst", "draq", "syto", "nucblue", "nucspot", "redot", "propidium")


def _stains(names, nuclear_stain) -> set:
    """The nuclear-stain endmembers among ``names``."""
    if nuclear_stain is None:
        return set()
    if isinstance(nuclear_stain, str) and nuclear_stain == "auto":
        return {n for n in names if str(n).lower().replace(" ", "").startswith(DNA_STAINS)}
    if nuclear_stain not in names:
        raise SpectraError(f"expected the nuclear stain {nuclear_stain!r} among the library's endmembers, found {list(names)}")
    return {nuclear_stain}


def _is_autofluorescence(name: str) -> bool:
    """``AF``, ``AF2``, …: the autofluorescence endmembers."""
    import re

    return re.fullmatch(r"AF\d*", str(name)) is not None


#: spectra measured on controls (single-stain, unstained): never refined on the slide
_MEASURED = ("estimated: single-stain control", "estimated: unstained control")


def _make_plan_saturation(saturation, dtype) -> float:
    if saturation is not None:
        return float(saturation)
    dt = np.dtype(dtype)
    return float(np.iinfo(dt).max) if dt.kind in "ui" else np.inf


def _refined_library(library, channels, M: np.ndarray, rec: dict, where):
    """``library`` with each refined spectrum replaced by its matrix column as a step
    spectrum over the channel bands (for reports and the record)."""
    from ..spectra import SpectralLibrary, _step_spectrum

    out = SpectralLibrary(list(library))
    ks = [k for k, n in enumerate(library.names) if rec["spectra"][n]["refined"]]
    if ks:
        wl, dens = _step_spectrum(channels, M[:, ks])  # (the bands once for all)
    for i, k in enumerate(ks):
        n = library.names[k]
        r = rec["spectra"][n]
        out.add(n, wl, dens[:, i], source=f"refined on slide {where} from [{library[n].source}] "
                                          f"(cosine to prior {r['cosine_to_prior']:.4f}, {r['pixels']} pixels)")
    out.autofluorescence = getattr(library, "autofluorescence", None)
    return out


def _log(where, result: UnmixResult) -> None:
    """One log line: the offset used and how it was found, what refinement did, warnings."""
    import logging

    rec = result.offset_record
    v = rec.get("values")
    val = f"{v:.1f}" if isinstance(v, float) else "per channel " + ", ".join(f"{x:.1f}" for x in v)
    how = {"given": "as given", "file": "recorded in the file", "estimated": "estimated from the darkest pixels"}
    parts = [f"{where}: camera offset {val} ({how.get(rec.get('source'), rec.get('source'))})"]
    ref = result.refinement
    if ref.get("enabled"):
        done = [n for n, r in ref["spectra"].items() if r["refined"]]
        parts.append(f"spectra refined: {', '.join(done) or 'none'} (residual {ref['residual_before']:.3g} → "
                     f"{ref['residual_after']:.3g})")
    if result.quality:
        parts.append(f"residual {result.quality['residual_to_noise']:.2f}× noise")
    if result.warnings:
        parts.append("WARNING: " + "; ".join(result.warnings))
    # a child of the batch logger (qdplex.progress.LOGGER_NAME): the line lands in the run log
    logging.getLogger("qdplex.batch.unmix").log(logging.WARNING if result.warnings else logging.INFO,
                                                "; ".join(parts))
