"""Linear spectral unmixing: ordinary, non-negative and Poisson-weighted least squares.

Each pixel spectrum ``y`` (C channels, camera offset removed) is modelled as
``y ≈ M a`` with the C×K mixing matrix ``M`` of a :class:`~qdplex.spectra.SpectralLibrary`
and K abundances ``a``. Methods:

``"ols"``
    ``a = M⁺ y`` (unconstrained least squares).
``"nnls"``
    exact non-negative least squares, ``min ‖y − M a‖`` subject to ``a ≥ 0``.
    One float32 matrix product (BLAS) gives every pixel's unconstrained solution
    ``x``; pixels with a negative component then go through a compiled (numba)
    block-principal-pivoting active-set solver (Kim & Park 2011) on the K×K normal
    equations (``b = MᵀM x``), in float64, started from the sign pattern of ``x``,
    using precomputed inverses of every passive set (K ≤ 12) and stopped when the
    KKT conditions hold. The result equals :func:`scipy.optimize.nnls` to ~1e-6 of
    the largest abundance (the float32 product sets that limit). The kernels are
    generated for each K (so the compiler unrolls the small loops) and cached on
    disk (``$QDPLEX_KERNEL_DIR``, else ``~/.cache/qdplex/kernels``).
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
NaN residual. Integer input is converted to float32 before the offset is removed,
so uint16 never wraps.

For a :class:`~qdplex.model.MultiplexImage` the work is lazy and block-wise
(:func:`dask.array.map_blocks` over spatial chunks with all channels per block),
so memory stays bounded by the chunk size.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import dask.array as da
import numba
import numpy as np

from .errors import InputError, SpectraError
from .model import Channel, MultiplexImage

__all__ = ["unmix", "UnmixResult", "unmix_array", "METHODS"]

METHODS = ("nnls", "ols", "poisson")
NONFINITE = ("raise", "exclude")

# ---------------------------------------------------------------------------
# compiled kernels
# ---------------------------------------------------------------------------

_jit = numba.njit(cache=True, nogil=True)


@_jit
def _solve_passive(G, b, F, z, L, idx):
    """z_F = G_FF⁻¹ b_F (Cholesky), z elsewhere 0. Returns False when G_FF is not positive definite."""
    K = G.shape[0]
    m = 0
    for j in range(K):
        z[j] = 0.0
        if F[j]:
            idx[m] = j
            m += 1
    if m == 0:
        return True
    for i in range(m):
        for j in range(i + 1):
            s = G[idx[i], idx[j]]
            for p in range(j):
                s -= L[i, p] * L[j, p]
            if i == j:
                if s <= 0.0:
                    return False
                L[i, i] = np.sqrt(s)
            else:
                L[i, j] = s / L[j, j]
    # forward then back substitution (t stored in z[idx])
    for i in range(m):
        s = b[idx[i]]
        for p in range(i):
            s -= L[i, p] * z[idx[p]]
        z[idx[i]] = s / L[i, i]
    for i in range(m - 1, -1, -1):
        s = z[idx[i]]
        for p in range(i + 1, m):
            s -= L[p, i] * z[idx[p]]
        z[idx[i]] = s / L[i, i]
    return True


@_jit
def _nnls_gram(G, b, z, F, L, idx, yv):
    """min ½aᵀGa − bᵀa, a ≥ 0, by block principal pivoting (Kim & Park 2011).

    ``F`` (passive set) holds the starting guess on entry. On return ``z`` is the
    solution. Returns False if G is singular on a passive set.
    """
    K = G.shape[0]
    bscale = 0.0
    for j in range(K):
        bscale = max(bscale, abs(b[j]))
    if bscale == 0.0:
        for j in range(K):
            z[j] = 0.0
        return True
    tol_y = 1e-11 * bscale
    alpha = 3
    beta = K + 1
    for _ in range(10 * K + 50):
        if not _solve_passive(G, b, F, z, L, idx):
            return False
        zscale = 0.0
        for j in range(K):
            zscale = max(zscale, abs(z[j]))
        tol_z = 1e-11 * zscale
        nv = 0
        last = -1
        for j in range(K):
            if F[j]:
                yv[j] = 0.0
                bad = z[j] < -tol_z
            else:
                s = -b[j]
                for p in range(K):
                    if F[p]:
                        s += G[j, p] * z[p]
                yv[j] = s
                bad = s < -tol_y
            if bad:
                nv += 1
                last = j
        if nv == 0:
            break
        if nv < beta:
            beta = nv
            alpha = 3
            full = True
        elif alpha >= 1:
            alpha -= 1
            full = True
        else:
            full = False
        if full:
            for j in range(K):
                if (F[j] and z[j] < -tol_z) or ((not F[j]) and yv[j] < -tol_y):
                    F[j] = not F[j]
        else:
            F[last] = not F[last]
    for j in range(K):
        if z[j] < 0.0:
            z[j] = 0.0
    return True


_MAX_TABLE_K = 12  # precompute (G_FF)⁻¹ for all 2^K passive sets up to this many endmembers


def _inverse_table(G: np.ndarray) -> np.ndarray:
    """(G_FF)⁻¹ zero-padded to K×K, for every passive set F (bit j of the index = endmember j)."""
    K = G.shape[0]
    tab = np.zeros((1 << K, K, K))
    for code in range(1, 1 << K):
        f = np.array([(code >> j) & 1 for j in range(K)], dtype=bool)
        tab[code][np.ix_(f, f)] = np.linalg.inv(G[np.ix_(f, f)])
    return tab


# Per-pixel block principal pivoting (Kim & Park 2011) with precomputed passive-set
# inverses. The source is specialised for each number of endmembers K (a literal),
# so the compiler unrolls the K×K loops and keeps each pixel's small problem in
# registers: about twice as fast as the same code with a run-time K.
_BPP_TEMPLATE = """
def _nnls_pixels(X, offx, G, tab, nonneg, bad):
    K = {K}
    b = np.empty(K)
    z = np.empty(K)
    xv = np.empty(K)
    for n in range(X.shape[1]):
        code = 0
        s = 0.0
        for k in range(K):
            xv[k] = X[k, n] - offx[k]
            s += xv[k]
            if xv[k] > 0.0:
                code |= 1 << k
        if not np.isfinite(s):
            bad[n] = True
            for k in range(K):
                X[k, n] = 0.0
            continue
        if not nonneg or code == (1 << K) - 1:
            for k in range(K):
                X[k, n] = xv[k]
            continue
        bs = 0.0
        for k in range(K):
            t = 0.0
            for p in range(K):
                t += G[k, p] * xv[p]
            b[k] = t
            bs = max(bs, abs(t))
        tol_y = -1e-11 * bs
        alpha = 3
        beta = K + 1
        for _ in range(10 * K + 50):
            zs = 0.0
            for i in range(K):
                t = 0.0
                for j in range(K):
                    t += tab[code, i, j] * b[j]
                z[i] = t
                zs = max(zs, abs(t))
            tol_z = -1e-11 * zs
            flip = 0
            for j in range(K):
                g = -b[j]
                for p in range(K):
                    g += G[j, p] * z[p]
                inf_ = (code >> j) & 1
                flip |= ((inf_ & np.int64(z[j] < tol_z)) | ((1 - inf_) & np.int64(g < tol_y))) << j
            if flip == 0:
                break
            nv = 0
            last = 0
            for j in range(K):
                if (flip >> j) & 1:
                    nv += 1
                    last = j
            if nv < beta:
                beta = nv
                alpha = 3
                code ^= flip
            elif alpha >= 1:
                alpha -= 1
                code ^= flip
            else:
                code ^= 1 << last
        for k in range(K):
            X[k, n] = max(z[k], 0.0)
"""
# RMS misfit per pixel, y − offset − M x, in tiles (one pass over Y; K literal).
_RMS_TEMPLATE = """
def _rms_pixels(Y, off, M, X, rms):
    K = {K}
    C, N = Y.shape
    T = 256
    acc = np.empty(T, dtype=np.float32)
    pred = np.empty(T, dtype=np.float32)
    for n0 in range(0, N, T):
        m = min(T, N - n0)
        for i in range(m):
            acc[i] = 0.0
        for c in range(C):
            for i in range(m):
                pred[i] = np.float32(off[c])
            for k in range(K):
                mck = np.float32(M[c, k])
                for i in range(m):
                    pred[i] += mck * X[k, n0 + i]
            for i in range(m):
                d = np.float32(Y[c, n0 + i]) - pred[i]
                acc[i] += d * d
        for i in range(m):
            rms[n0 + i] = np.sqrt(acc[i] / C)
"""
_TEMPLATES = {"nnls": (_BPP_TEMPLATE, "_nnls_pixels"), "rms": (_RMS_TEMPLATE, "_rms_pixels")}
_KERNELS: dict = {}
_KERNEL_LOCK = threading.Lock()


def _kernel_module(kind: str, K: int):
    """Import the generated source of kernel ``kind`` for K from a cache folder (so numba
    can cache its machine code on disk); None when no folder is writable."""
    import hashlib
    import importlib.util
    import tempfile
    from pathlib import Path

    template, name = _TEMPLATES[kind]
    src = "import numpy as np\nimport numba\n\n" + template.format(K=int(K)) + (
        f"\n\n{name} = numba.njit(cache=True, nogil=True, fastmath={{'contract'}})({name})\n")
    digest = hashlib.sha1(src.encode()).hexdigest()[:12]
    for base in (os.environ.get("QDPLEX_KERNEL_DIR"), Path.home() / ".cache" / "qdplex" / "kernels",
                 Path(tempfile.gettempdir()) / "qdplex-kernels"):
        if not base:
            continue
        try:
            folder = Path(base)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"qdplex_{kind}_k{K}_{digest}.py"
            if not path.exists():
                tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
                tmp.write_text(src, encoding="utf-8")
                os.replace(tmp, path)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # numba's disk cache looks the module up by name
            spec.loader.exec_module(module)
            return getattr(module, name)
        except OSError:
            continue
    return None


def _kernel(kind: str, K: int):
    """The compiled kernel ``kind`` for K endmembers (disk-cached machine code when possible)."""
    with _KERNEL_LOCK:
        fn = _KERNELS.get((kind, K))
        if fn is None:
            fn = _kernel_module(kind, K)
            if fn is None:  # no writable folder: compile in memory
                template, name = _TEMPLATES[kind]
                ns = {"np": np}
                exec(template.format(K=int(K)), ns)  # noqa: S102 - fixed template, K an int
                fn = numba.njit(nogil=True, fastmath={"contract"})(ns[name])
            _KERNELS[(kind, K)] = fn
        return fn


@numba.njit(cache=True, nogil=True)
def _nnls_scalar(X, need, G):
    """Exact NNLS pixel by pixel (Cholesky active sets) for libraries too large for a table."""
    K = X.shape[0]
    b = np.empty(K)
    z = np.empty(K)
    yv = np.empty(K)
    F = np.empty(K, dtype=np.bool_)
    L = np.empty((K, K))
    idx = np.empty(K, dtype=np.int64)
    for q in range(need.shape[0]):
        n = need[q]
        for k in range(K):
            t = 0.0
            for p in range(K):
                t += G[k, p] * X[p, n]
            b[k] = t
            F[k] = X[k, n] > 0.0
        _nnls_gram(G, b, z, F, L, idx, yv)
        for k in range(K):
            X[k, n] = z[k]


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def _pixel_fit(Y, off, M, MM, X, rms, pix, sat, exclude_saturated, nonneg, reweight, gain, read_var, warm):
    """Per-pixel (weighted) fits for the pixels ``pix``: channel exclusion and Poisson weights.

    Usable channels: finite, and below ``sat`` when ``exclude_saturated``. The first
    pass is unweighted (skipped when ``warm``: X already holds that fit); each of
    ``reweight`` further passes uses weights 1 / (gain · max(M a, 0) + read_var),
    starting the active-set solver from the previous passive set. ``MM`` holds the
    per-channel outer products M[c]ᵀM[c] (C×K²). Writes X[:, n] and rms[n].
    """
    C, N = Y.shape
    K = M.shape[1]
    KK = K * K
    Gf = np.empty(KK)
    G = Gf.reshape((K, K))
    b = np.empty(K)
    z = np.empty(K)
    yv = np.empty(K)
    F = np.empty(K, dtype=np.bool_)
    L = np.empty((K, K))
    idx = np.empty(K, dtype=np.int64)
    w = np.empty(C)
    yc = np.empty(C)
    for q in range(pix.shape[0]):
        n = pix[q]
        nvalid = 0
        for c in range(C):
            y = np.float64(Y[c, n])
            ok = np.isfinite(y) and not (exclude_saturated and y >= sat)
            w[c] = 1.0 if ok else 0.0
            yc[c] = y - off[c] if ok else 0.0
            if ok:
                nvalid += 1
        good = nvalid >= K
        first = 0
        if good and warm:
            for k in range(K):
                z[k] = X[k, n]
                F[k] = z[k] > 0.0
            first = 1
        else:
            for k in range(K):
                F[k] = True
        for it in range(first, reweight + 1):
            if not good:
                break
            if it > 0:
                for c in range(C):
                    if w[c] > 0.0:
                        mu = 0.0
                        for k in range(K):
                            mu += M[c, k] * z[k]
                        w[c] = 1.0 / (gain * max(mu, 0.0) + read_var)
            for p in range(KK):
                Gf[p] = 0.0
            for k in range(K):
                b[k] = 0.0
            for c in range(C):
                wc = w[c]
                if wc > 0.0:
                    wy = wc * yc[c]
                    for k in range(K):
                        b[k] += wy * M[c, k]
                    for p in range(KK):
                        Gf[p] += wc * MM[c, p]
            if nonneg:
                if not _nnls_gram(G, b, z, F, L, idx, yv):
                    good = False
                    break
                for k in range(K):
                    F[k] = z[k] > 0.0
            elif not _solve_passive(G, b, F, z, L, idx):
                good = False
                break
        if not good:
            for k in range(K):
                X[k, n] = 0.0
            rms[n] = np.nan
            continue
        acc = 0.0
        for c in range(C):
            if w[c] > 0.0:
                pr = 0.0
                for k in range(K):
                    pr += M[c, k] * z[k]
                acc += (yc[c] - pr) ** 2
        for k in range(K):
            X[k, n] = z[k]
        rms[n] = np.sqrt(acc / nvalid)


# ---------------------------------------------------------------------------
# block function
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    M: np.ndarray          # C×K float64 mixing matrix
    P32: np.ndarray        # K×C float32 pseudo-inverse
    offx32: np.ndarray     # K float32: P @ offset
    MM: np.ndarray         # C×K² per-channel outer products (weighted fits)
    G: np.ndarray          # K×K float64 Gram matrix MᵀM
    tab: np.ndarray        # passive-set inverses (2^K×K×K) or a 1×1×1 dummy
    offset: np.ndarray     # C float64
    saturation: float
    method: str
    exclude_saturated: bool
    nonfinite: str
    poisson_iterations: int
    gain: float
    read_var: float
    where: str


def _fit_pixels(Y: np.ndarray, plan: _Plan, origin=None, want_resid: bool = True):
    """Fit C×N pixel spectra; returns (X K×N float32, rms N float32, saturated N bool).

    The unconstrained solutions come from one float32 matrix product (BLAS); the
    pixels with a negative component then get the exact NNLS (:func:`_finish_pixels`).
    """
    X = plan.P32 @ (Y if Y.dtype == np.float32 else Y.astype(np.float32))
    return _finish_pixels(Y, X, plan, origin, want_resid)


def _finish_pixels(Y: np.ndarray, X: np.ndarray, plan: _Plan, origin=None, want_resid: bool = True):
    """Complete the fit of C×N pixels whose X (K×N, in place) holds ``P @ y``.

    Removes the offset, flags non-finite and saturated pixels, solves NNLS where a
    component is negative, refits excluded-channel / Poisson pixels, and computes
    the RMS residual when asked. Returns (X, rms, saturated).
    """
    C, N = Y.shape
    sat = plan.saturation
    bad = np.zeros(N, dtype=bool)
    satd = Y.max(axis=0) >= sat if sat < np.inf else np.zeros(N, dtype=bool)
    if plan.tab.shape[0] > 1:
        # one pass: offset, non-finite flags, exact NNLS where a component is negative
        _kernel("nnls", plan.M.shape[1])(X, plan.offx32, plan.G, plan.tab, plan.method != "ols", bad)
    else:
        X -= plan.offx32[:, None]
        bad = ~np.isfinite(X.sum(axis=0))
        X[:, bad] = 0.0
        if plan.method != "ols":
            need = np.flatnonzero(X.min(axis=0) < 0.0)
            if need.size:
                _nnls_scalar(X, need, plan.G)
    rms = np.full(N, np.nan, dtype=np.float32)
    if want_resid:
        _kernel("rms", plan.M.shape[1])(Y, plan.offset, plan.M, X, rms)
    if plan.nonfinite == "raise" and bad.any():
        loc = "" if origin is None else f" in the block at y {origin[0]}, x {origin[1]}"
        raise InputError(
            f"expected finite pixel values, found {int(bad.sum())} pixels with NaN/inf{loc}; "
            f"pass nonfinite='exclude' to fit them from their finite channels", path=plan.where)
    redo = bad | satd if plan.exclude_saturated else bad
    pix = np.flatnonzero(redo).astype(np.int64)
    if plan.method == "poisson":
        # IRLS from the NNLS fit already in X, except where channels must be excluded
        warm = ~redo
        for sel, is_warm in ((np.flatnonzero(warm), True), (np.flatnonzero(redo), False)):
            if sel.size:
                _pixel_fit(Y, plan.offset, plan.M, plan.MM, X, rms, sel.astype(np.int64), sat,
                           plan.exclude_saturated, True, plan.poisson_iterations, plan.gain, plan.read_var,
                           is_warm)
    elif pix.size:
        _pixel_fit(Y, plan.offset, plan.M, plan.MM, X, rms, pix, sat, plan.exclude_saturated,
                   plan.method != "ols", 0, plan.gain, plan.read_var, False)
    return X, rms, satd


def _block_origin(block_info):
    if block_info is not None and 0 in block_info:
        loc = block_info[0]["array-location"]
        return (loc[1][0], loc[2][0])
    return None


def _unmix_block(block, plan: _Plan, block_info=None):
    """C×h×w block → (K+2)×h×w float32: abundances, RMS residual, saturated (0/1)."""
    C, h, w = block.shape
    X, rms, satd = _fit_pixels(np.ascontiguousarray(block).reshape(C, h * w), plan, _block_origin(block_info))
    K = X.shape[0]
    out = np.empty((K + 2, h * w), dtype=np.float32)
    out[:K] = X
    out[K] = rms
    out[K + 1] = satd
    return out.reshape(K + 2, h, w)


def _make_plan(M, *, method, offset, saturation, exclude_saturated, nonfinite, poisson_iterations,
               gain, read_noise, dtype, names, where) -> _Plan:
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
    from .crosstalk import require_unmixable

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
    tab = _inverse_table(G) if K <= _MAX_TABLE_K else np.zeros((1, 1, 1))
    P = np.linalg.pinv(M)
    return _Plan(M=M, P32=P.astype(np.float32), offx32=(P @ off).astype(np.float32),
                 MM=np.einsum("ci,cj->cij", M, M).reshape(C, K * K),
                 G=G, tab=tab, offset=off,
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
    method : str
    matrix : numpy.ndarray
        The C×K mixing matrix used.
    """

    abundances: MultiplexImage
    residual: da.Array
    saturated: da.Array
    library: object
    method: str
    matrix: np.ndarray | None = None

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

    One float32 matrix product gives every unconstrained solution; the rest of the
    fit runs on spans of at most ``chunk²`` pixels in a thread pool (the kernels
    release the GIL), in place in the output array. Options as in :func:`unmix`.
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
    K = M.shape[1]
    C, H, W = arr.shape
    out = np.empty((K, H, W), dtype=np.float32)
    Yf, X = arr.reshape(C, -1), out.reshape(K, -1)
    N = Yf.shape[1]
    workers = os.cpu_count() or 1
    step = max(1, min(chunk * chunk, -(-N // (4 * workers))))
    spans = [(a, min(N, a + step)) for a in range(0, N, step)]
    if Yf.dtype == np.float32:
        np.matmul(plan.P32, Yf, out=X)  # one BLAS call (itself multi-threaded)

    def work(span):
        a, b = span
        if Yf.dtype != np.float32:
            X[:, a:b] = plan.P32 @ Yf[:, a:b].astype(np.float32)
        _finish_pixels(Yf[:, a:b], X[:, a:b], plan, (a // W, a % W), want_resid=False)

    if len(spans) == 1:
        work(spans[0])
    else:
        with ThreadPoolExecutor(max_workers=min(len(spans), workers)) as pool:
            list(pool.map(work, spans))
    return out[:, 0, :] if flat else out


def _plan_options(options: dict) -> dict:
    allowed = {"offset": None, "saturation": None, "exclude_saturated": False, "nonfinite": "raise",
               "poisson_iterations": 3, "gain": 1.0, "read_noise": 1.0}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unmix() got unexpected options {unknown}; expected some of {sorted(allowed)}")
    return {k: options.get(k, v) for k, v in allowed.items()}


def unmix(image, library, method: str = "nnls", *, offset=None, saturation=None,
          exclude_saturated: bool = False, nonfinite: str = "raise", poisson_iterations: int = 3,
          gain: float = 1.0, read_noise: float = 1.0, chunk: int | None = 1024):
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
    offset : float or sequence of float, optional
        Camera offset (dark level) subtracted from every channel (or per channel).
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
    opts = dict(offset=offset, saturation=saturation, exclude_saturated=exclude_saturated,
                nonfinite=nonfinite, poisson_iterations=poisson_iterations, gain=gain, read_noise=read_noise)
    if not isinstance(image, MultiplexImage):
        if hasattr(library, "matrix") and not isinstance(library, np.ndarray):
            raise SpectraError("expected a C×K mixing matrix with a plain array (no channel metadata to sample "
                               "a SpectralLibrary on); wrap the array in a MultiplexImage with channels instead")
        return unmix_array(np.asarray(image), library, method, chunk=chunk or 1024, **opts)
    if not hasattr(library, "matrix") or isinstance(library, np.ndarray):
        raise SpectraError(f"expected a SpectralLibrary for a MultiplexImage, found {type(library).__name__}")
    where = image.source or image.name
    M = library.matrix(image.channels)
    names = list(library.names)
    plan = _make_plan(M, method=method, dtype=image.data.dtype, names=names, where=where, **opts)
    data = image.data
    data = data.rechunk({0: -1} if chunk is None else (-1, chunk, chunk))
    K = len(names)
    out = da.map_blocks(_unmix_block, data, plan=plan, dtype=np.float32,
                        chunks=((K + 2,),) + data.chunks[1:], token=f"qdplex-unmix-{method}")
    chans = [Channel(n, emission_nm=library.peak_nm(n), fluor=n) for n in names]
    abund = MultiplexImage(data=out[:K], channels=chans, pixel_size_um=image.pixel_size_um,
                           name=image.name, source=image.source, metadata=dict(image.metadata))
    return UnmixResult(abundances=abund, residual=out[K], saturated=out[K + 1] > 0.5,
                       library=library, method=method, matrix=M)
