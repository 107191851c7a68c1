"""Compiled (numba) kernels of :mod:`qdplex.unmix`: exact NNLS solvers, the pivoting
table, the 8-lane pivoting intrinsic and the per-pixel (weighted) fit.

The fused per-block kernel itself is generated for each number of endmembers by
:mod:`qdplex.unmix._codegen` and cached on disk by :mod:`qdplex.unmix._cache`.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from .._integrals import cumulative_at

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


_MAX_TABLE_K = 12  # precompute a pivoting table for all 2^K passive sets up to this many endmembers
_TILE = 256  # pixels per tile of the fused kernel
_SWEEP = 4  # channels per sweep over a tile in the projection


@functools.lru_cache(maxsize=16)
def _pivot_table_for(gram: bytes, K: int) -> np.ndarray:
    """Raveled, read-only :func:`_pivot_table` of the K×K Gram matrix in ``gram`` (cached).

    Compiled (:func:`_pivot_table_into`, 2^K Cholesky solves: ~0.2 ms for K = 8 where the
    batched numpy version takes ~2.6 ms — it was rebuilt for every fit of the on-slide
    refinement's pixel sample, whose matrix changes each round); the numpy version where a
    passive set's Gram block is not positive definite.
    """
    G = np.frombuffer(gram, dtype=np.float64).reshape(K, K)
    tab = np.zeros((1 << K, _table_rows(K), _padded(K)))
    if not _pivot_table_into(G, tab):
        tab = _pivot_table(G)
    tab = tab.ravel()
    tab.flags.writeable = False
    return tab


@_jit
def _pivot_table_into(G, out):
    """:func:`_pivot_table` of the K×K Gram matrix ``G`` written into the zeroed ``out``
    (2^K × rows × padded K). Passive sets are visited depth first, each extending its
    parent by a larger index, so the Cholesky factor of G_FF is the parent's plus one row
    (O(m²) per set instead of O(m³)). Returns False (``out`` then partly written) when
    some G_FF is not positive definite."""
    K = G.shape[0]
    L = np.zeros((K, K))  # rows 0..m-1: the Cholesky factor of the current G_FF
    Z = np.zeros((K, K))
    idx = np.zeros(K, np.int64)
    for c in range(K):  # the empty passive set: every row is the gradient −G
        for i in range(K):
            out[0, c, i] = -G[i, c]
    m = 0
    code = 0
    nxt = 0
    while True:
        if nxt >= K:  # back up
            if m == 0:
                break
            m -= 1
            code &= ~(1 << idx[m])
            nxt = idx[m] + 1
            continue
        idx[m] = nxt
        for j in range(m + 1):  # row m of the factor of G_FF = L Lᵀ
            s = G[idx[m], idx[j]]
            for p in range(j):
                s -= L[m, p] * L[j, p]
            if j == m:
                if s <= 1e-12 * G[idx[m], idx[m]]:  # (numerically) singular
                    return False
                L[m, m] = np.sqrt(s)
            else:
                L[m, j] = s / L[j, j]
        m += 1
        code |= 1 << nxt
        nxt += 1
        for c in range(K):  # rows F of A: G_FF⁻¹ G_F:, column by column
            for i in range(m):
                s = G[idx[i], c]
                for p in range(i):
                    s -= L[i, p] * Z[p, c]
                Z[i, c] = s / L[i, i]
            for i in range(m - 1, -1, -1):
                s = Z[i, c]
                for p in range(i + 1, m):
                    s -= L[p, i] * Z[p, c]
                Z[i, c] = s / L[i, i]
        f = 0
        for i in range(K):  # row i: z_i (i ∈ F) or the gradient (G (A_F − I))_i; stored transposed
            if (code >> i) & 1:
                for c in range(K):
                    out[code, c, i] = Z[f, c]
                f += 1
            else:
                for c in range(K):
                    s = -G[i, c]
                    for q in range(m):  # (A is zero outside the rows F)
                        s += G[i, idx[q]] * Z[q, c]
                    out[code, c, i] = s
    return True


def _pivot_table(G: np.ndarray) -> np.ndarray:
    """Per passive set F (bit j of the index = endmember j), the K×K matrix R_F with ``R_F x``
    = the passive-set solution z_j (j ∈ F) and the gradient (G z − b)_j (j ∉ F), where x is
    the unconstrained solution (so b = G x): one matrix–vector product per pivoting step.

    z_F = (G_FF)⁻¹ G_F: x and G z − b = G (A_F − I) x with A_F the rows z = A_F x.
    """
    K = G.shape[0]
    eye = np.eye(K)
    codes = np.arange(1 << K)
    bits = ((codes[:, None] >> np.arange(K)) & 1).astype(bool)  # [code, j]
    A = np.zeros((1 << K, K, K))
    for m in range(1, K + 1):  # one batched solve per passive-set size
        cs = codes[bits.sum(axis=1) == m]
        idx = np.array([np.flatnonzero(bits[c]) for c in cs])  # [n, m]
        Gff = G[idx[:, :, None], idx[:, None, :]]  # [n, m, m]
        A[cs[:, None], idx] = np.linalg.solve(Gff, G[idx])  # rows z_F = G_FF⁻¹ G_F
    grad = np.einsum("ij,cjk->cik", G, A - eye)
    tab = np.where(bits[:, :, None], A, grad)
    out = np.zeros((1 << K, _table_rows(K), _padded(K)))  # [code, p, j]: the product runs down columns
    out[:, :K, :K] = tab.transpose(0, 2, 1)
    return out


# One fused pass per block of pixels, generated for each number of endmembers K (the
# K-loops written out, so the compiler keeps each pixel's small problem in registers):
# the projection x = P y − P·offset in float32 (vectorised across a tile of pixels, four
# channels per sweep; each spectrum read once from memory, integer input converted on
# the fly), the saturation and non-finite flags, the exact NNLS of every pixel with a
# negative component by block principal pivoting (Kim & Park 2011) on the precomputed
# passive-set table (float64, one K×K matrix–vector product per step, started from the
# sign pattern of x, stopped when the KKT conditions hold), and the RMS residual
# y − offset − M a while the tile is still in cache. Y is C×H×W with any strides (a dask
# block may be a view) but unit stride along x.
def _padded(K: int) -> int:
    """Row length of the pivoting table: 8 (one AVX-512 / two AVX vectors, see
    :func:`_pivot_for`) up to 8 endmembers, else K rounded up to 4."""
    return 8 if K <= 8 else -(-K // 4) * 4


def _table_rows(K: int) -> int:
    """Rows per passive set in the pivoting table (padded with zeros to 8 up to K = 8)."""
    return 8 if K <= 8 else K


@functools.lru_cache(maxsize=None)
def _pivot_for(K: int):
    """One pivoting step for K ≤ 8 endmembers as 8-lane vector code (LLVM IR: numba does
    not vectorise this small matrix–vector product by itself).

    ``_pivot(R, rb, acc, res, i, code, tol, tolg)`` takes u from column i of the K×T
    float32 tile ``acc``, computes ``w[0:8] = Σ_p R[rb + 8p : rb + 8p + 8] · u_p`` (table
    lanes beyond K are zero), writes the passive-set solution (max(w, 0) where bit j of
    ``code`` is set, 0 elsewhere) to column i of ``res``, and returns the bit mask of
    KKT violations: ``w_j < tol`` on the passive set (negative solution), ``w_j < tolg``
    elsewhere (negative gradient).
    """
    K = int(K)

    @intrinsic
    def _pivot(typingctx, R, rb, acc, res, i, code, tol, tolg):
        sig = types.int64(R, rb, acc, res, i, code, tol, tolg)

        def codegen(context, builder, signature, args):
            from llvmlite import ir

            R_, rb_, acc_, res_, i_, code_, tol_, tolg_ = args
            i32, i64, f32, f64 = ir.IntType(32), ir.IntType(64), ir.FloatType(), ir.DoubleType()
            v8d, v8i = ir.VectorType(f64, 8), ir.VectorType(i64, 8)
            lane0 = ir.Constant(ir.VectorType(i32, 8), [0] * 8)

            def splat(vtype, x):
                v = builder.insert_element(ir.Constant(vtype, ir.Undefined), x, ir.Constant(i32, 0))
                return builder.shuffle_vector(v, ir.Constant(vtype, ir.Undefined), lane0)

            rptr = context.make_array(signature.args[0])(context, builder, R_).data
            A = context.make_array(signature.args[2])(context, builder, acc_)
            B = context.make_array(signature.args[3])(context, builder, res_)
            T = builder.extract_value(A.shape, 1)
            Tr = builder.extract_value(B.shape, 1)
            w = ir.Constant(v8d, [0.0] * 8)
            for p in range(K):
                up = builder.fpext(builder.load(builder.gep(A.data, [builder.add(builder.mul(ir.Constant(i64, p), T), i_)])), f64)
                row = builder.load(builder.bitcast(builder.gep(rptr, [builder.add(rb_, ir.Constant(i64, 8 * p))]),
                                                   v8d.as_pointer()), align=8)
                w = builder.fadd(w, builder.fmul(row, splat(v8d, up)))
            bits = builder.and_(builder.lshr(splat(v8i, code_), ir.Constant(v8i, list(range(8)))), ir.Constant(v8i, [1] * 8))
            passive = builder.icmp_unsigned("!=", bits, ir.Constant(v8i, [0] * 8))
            thr = builder.select(passive, splat(v8d, tol_), splat(v8d, tolg_))
            flip = builder.zext(builder.bitcast(builder.fcmp_ordered("<", w, thr), ir.IntType(8)), i64)
            zero = ir.Constant(v8d, [0.0] * 8)
            pos = builder.select(builder.fcmp_ordered(">", w, zero), w, zero)
            out = builder.select(passive, pos, zero)
            for k in range(K):
                v = builder.fptrunc(builder.extract_element(out, ir.Constant(i32, k)), f32)
                builder.store(v, builder.gep(B.data, [builder.add(builder.mul(ir.Constant(i64, k), Tr), i_)]))
            return flip

        return sig, codegen

    return _pivot


@_jit
def increasing_fit(y, fit, err):
    """Pool-adjacent-violators on the 1-D float64 ``y``: writes the least-squares
    non-decreasing fit to ``fit`` and, for every prefix ``y[:i + 1]``, the squared error of
    its own non-decreasing fit to ``err[i]``, in one pass (see
    :func:`qdplex.unmix.refine._increasing_fit`)."""
    n = y.shape[0]
    sums = np.empty(n)
    sqs = np.empty(n)
    ns = np.empty(n, np.int64)
    m = 0  # blocks
    total = 0.0  # the blocks' within-block squared errors
    for i in range(n):
        s = y[i]
        q = y[i] * y[i]
        c = 1
        while m > 0 and sums[m - 1] / ns[m - 1] >= s / c:  # merge while the previous block is not below
            m -= 1
            total -= sqs[m] - sums[m] * sums[m] / ns[m]
            s += sums[m]
            q += sqs[m]
            c += ns[m]
        sums[m] = s
        sqs[m] = q
        ns[m] = c
        m += 1
        total += q - s * s / c
        err[i] = total
    i = 0
    for b in range(m):
        v = sums[b] / ns[b]
        for _ in range(ns[b]):
            fit[i] = v
            i += 1


@_jit
def peak_of(m, interpolate):
    """Peak of the 1-D ``m`` (see :func:`qdplex.unmix.refine._peak`): its largest value, or
    when ``interpolate`` the apex of the parabola in log through it and its neighbours."""
    n = m.shape[0]
    i = np.argmax(m)
    if not interpolate or not 0 < i < n - 1 or min(m[i - 1], m[i + 1]) <= 0:
        return m[i]
    a, b, c = np.log(m[i - 1]), np.log(m[i]), np.log(m[i + 1])
    den = a - 2 * b + c
    if den >= 0:
        return m[i]
    d = 0.5 * (a - c) / den
    return np.exp(b - 0.25 * (a - c) * d)


@_jit
def peaks_of(rows, interpolate, out):
    """:func:`peak_of` of each row of the 2-D ``rows`` into ``out`` (1 where a row is all zero)."""
    for r in range(rows.shape[0]):
        out[r] = peak_of(rows[r], interpolate) if rows[r].max() > 0 else 1.0


@_jit
def warped_band_integrals(w, v, cum, p, lo, hi, thetas, out):
    """Band integrals of a spectrum (samples ``w``, ``v``, integral ``cum``; peak ``p``)
    shifted by ``thetas[t, 0]`` nm and its sides stretched by ``thetas[t, 1]`` (short) and
    ``thetas[t, 2]`` (long) about the peak, over the bands ``lo``–``hi``: ``out[t, c]``
    (see :func:`qdplex.unmix.refine._warped_columns`)."""
    c0 = cumulative_at(w, v, cum, p)
    for t in range(thetas.shape[0]):
        q = p + thetas[t, 0]  # the warped peak
        for c in range(lo.shape[0]):
            x = lo[c]
            f = thetas[t, 1] if x < q else thetas[t, 2]
            a = f * (cumulative_at(w, v, cum, p + (x - q) / f) - c0)
            x = hi[c]
            f = thetas[t, 1] if x < q else thetas[t, 2]
            b = f * (cumulative_at(w, v, cum, p + (x - q) / f) - c0)
            out[t, c] = b - a


@_jit
def _select(a, i):
    """The ``i``-th smallest (0-based) of the 1-D ``a``, by Hoare's quickselect in place:
    afterwards ``a[:i]`` hold values ≤ it (numba's ``np.partition`` is ~2× numpy's)."""
    lo, hi = 0, a.shape[0] - 1
    while hi > lo:
        mid = (lo + hi) // 2
        x, y, z = a[lo], a[mid], a[hi]  # median of three as the pivot
        pivot = max(min(x, y), min(max(x, y), z))
        p, q = lo, hi
        while p <= q:
            while a[p] < pivot:
                p += 1
            while a[q] > pivot:
                q -= 1
            if p <= q:
                a[p], a[q] = a[q], a[p]
                p += 1
                q -= 1
        if i <= q:
            hi = q
        elif i >= p:
            lo = p
        else:
            return a[i]
    return a[i]


@_jit
def _order_stat(x, i):
    """The ``i``-th smallest of the 1-D ``x`` (0-based; ``x`` is not changed)."""
    return _select(x.copy(), i)


@_jit
def _median_of(x):
    """``numpy.median`` of a non-empty 1-D array without NaN (the same value, exactly;
    ``x`` is reordered)."""
    n = x.shape[0]
    h = n // 2
    v = _select(x, h)
    if n % 2:
        return v
    return 0.5 * (x[:h].max() + v)


@_jit
def least_marked(a, dominant, contrib, k, thin, others, min_pixels, share, floor_factor):
    """The pixels an endmember's spectrum is re-fitted on (step 2 of
    :func:`qdplex.unmix.refine.refine_matrix`), in increasing order.

    Of the pixels where ``dominant`` (N bools), when ``thin``: those where its abundance
    ``a`` is at or above its median there, then (of more than ``min_pixels``) the ``share``
    with the least of the ``others``' fitted signal ``contrib`` (K×N) relative to its own
    ``contrib[k]``, but none whose ratio exceeds ``floor_factor`` × the ratio's 5th
    percentile, and at least ``min_pixels`` (the smallest ratios; ties in pixel order, as a
    stable sort would take them)."""
    idx = np.flatnonzero(dominant)
    if not thin:
        return idx
    if idx.size:
        cut = _median_of(a[idx])  # (fancy indexing: a copy)
        keep = np.empty(idx.size, np.bool_)
        for p in range(idx.size):
            keep[p] = a[idx[p]] >= cut
        idx = idx[keep]
    n_idx = idx.size
    if n_idx <= min_pixels:
        return idx
    ratio = np.empty(n_idx)
    for p in range(n_idx):
        s = 0.0
        first = True
        for q in range(others.shape[0]):
            if others[q]:
                s = contrib[q, idx[p]] if first else s + contrib[q, idx[p]]
                first = False
        ratio[p] = s / max(contrib[k, idx[p]], 1e-12)
    h = 0.05 * (n_idx - 1)  # the 5th percentile, linearly interpolated (numpy.quantile)
    i = int(np.floor(h))
    j = min(i + 1, n_idx - 1)
    part = ratio.copy()
    lo = _select(part, i)
    hi = lo if j == i else part[i + 1:].min()
    q05 = lo + (h - i) * (hi - lo)
    below = 0
    for p in range(n_idx):
        if ratio[p] <= floor_factor * q05:
            below += 1
    n = max(min(int(n_idx * share), below), min_pixels)
    v = _order_stat(ratio, n - 1)
    ties = n
    for p in range(n_idx):
        if ratio[p] < v:
            ties -= 1
    keep = np.empty(n_idx, np.bool_)
    for p in range(n_idx):
        keep[p] = ratio[p] < v
        if ratio[p] == v and ties > 0:
            keep[p] = True
            ties -= 1
    return idx[keep]


@_jit
def ratio_median(Y, A, idx, k, sub, M, out):
    """``out[c]``: the median over the pixels ``idx`` of (``Y[c]`` − ``M[c, sub]`` ``A[sub]``)
    / ``A[k]``, the per-channel spectrum of endmember ``k`` there with the endmembers ``sub``
    taken out (:func:`qdplex.unmix.refine.refine_matrix`)."""
    npix = idx.size
    S = sub.shape[0]
    a = np.empty(npix)  # the abundances at those pixels, gathered once for all channels
    As = np.empty((S, npix))
    for p in range(npix):
        a[p] = A[k, idx[p]]
        for q in range(S):
            As[q, p] = A[sub[q], idx[p]]
    r = np.empty(npix)
    for c in range(Y.shape[0]):
        for p in range(npix):
            rest = 0.0
            for q in range(S):
                rest = M[c, sub[q]] * As[q, p] if q == 0 else rest + M[c, sub[q]] * As[q, p]
            r[p] = (Y[c, idx[p]] - rest) / a[p]
        out[c] = _median_of(r)


@_jit
def unimodal_fit(m, lo, hi, out):
    """Stout's unimodal regression of the 1-D float64 ``m`` with the mode sought in
    ``lo``–``hi``: writes to ``out`` the non-decreasing fit of ``m[:p + 1]`` followed by the
    non-increasing fit of ``m[p + 1:]`` for the split ``p`` in ``lo``–``hi`` of least total
    squared error (the first such; see :func:`qdplex.unmix.refine._unimodal`)."""
    C = m.shape[0]
    fit = np.empty(C)
    inc = np.empty(C)
    dec = np.empty(C)
    rev = np.empty(C)
    for i in range(C):
        rev[i] = m[C - 1 - i]
    increasing_fit(m, fit, inc)
    increasing_fit(rev, fit, dec)  # dec[C - 1 - i]: error of the non-increasing fit of m[i:]
    p = lo
    best = np.inf
    for q in range(lo, hi + 1):
        cost = inc[q] + (dec[C - 2 - q] if q + 1 < C else 0.0)
        if cost < best:
            best = cost
            p = q
    increasing_fit(m[:p + 1].copy(), out[:p + 1], inc[:p + 1])
    n = C - 1 - p
    if n > 0:
        increasing_fit(rev[:n].copy(), fit[:n], dec[:n])
        for i in range(n):
            out[C - 1 - i] = fit[i]


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
