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
    generated for each K (the small loops written out) and cached on disk
    (``$QDPLEX_KERNEL_DIR``, else ``~/.cache/qdplex/kernels``), keyed by the source,
    numba, numpy and Python versions; an unusable cache entry is recompiled in memory
    (with a RuntimeWarning) and replaced. Work runs on every core: a thread pool for
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

For a :class:`~qdplex.model.MultiplexImage` the work is lazy and block-wise
(:func:`dask.array.map_blocks` over spatial chunks with all channels per block),
so memory stays bounded by the chunk size; chunks of an in-memory image are cut
into blocks as views, not copies.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import dask.array as da
import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

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


_MAX_TABLE_K = 12  # precompute a pivoting table for all 2^K passive sets up to this many endmembers
_TILE = 256  # pixels per tile of the fused kernel
_SWEEP = 4  # channels per sweep over a tile in the projection


@functools.lru_cache(maxsize=16)
def _pivot_table_for(gram: bytes, K: int) -> np.ndarray:
    """Raveled, read-only :func:`_pivot_table` of the K×K Gram matrix in ``gram`` (cached:
    2^K small solves, ~3 ms for K = 7, ~0.1 s for K = 12, once per library and channels)."""
    tab = _pivot_table(np.frombuffer(gram, dtype=np.float64).reshape(K, K)).ravel()
    tab.flags.writeable = False
    return tab


def _pivot_table(G: np.ndarray) -> np.ndarray:
    """Per passive set F (bit j of the index = endmember j), the K×K matrix R_F with ``R_F x``
    = the passive-set solution z_j (j ∈ F) and the gradient (G z − b)_j (j ∉ F), where x is
    the unconstrained solution (so b = G x): one matrix–vector product per pivoting step.

    z_F = (G_FF)⁻¹ G_F: x and G z − b = G (A_F − I) x with A_F the rows z = A_F x.
    """
    K = G.shape[0]
    eye = np.eye(K)
    tab = np.zeros((1 << K, K, K))
    for code in range(1 << K):
        f = np.array([(code >> j) & 1 for j in range(K)], dtype=bool)
        A = np.zeros((K, K))
        if f.any():
            A[f] = np.linalg.solve(G[np.ix_(f, f)], G[f])
        tab[code][f] = A[f]
        tab[code][~f] = (G @ (A - eye))[~f]
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


def _fused_source(K: int) -> str:
    """Source of the fused kernel for K endmembers (see ``_FUSED_DOC``); loops over the
    K endmembers and the channel groups are written out so that the compiler keeps the
    small per-pixel problem in (vector) registers."""
    K = int(K)
    ks = range(K)
    L = []
    a = L.append
    a("def _fused(Y, C, sc, sy, P, offx, M, off, R, gscale, nonneg, sat, want_rms, X, rms, flag, y0, y1, x0, x1):")
    S = _SWEEP
    a(f"    CS = C - C % {S}")
    a(f"    T = {_TILE}")
    a(f"    acc = np.empty(({K}, T), dtype=np.float32)")
    a("    mx = np.empty(T, dtype=np.float32)")
    a("    sq = np.empty(T, dtype=np.float32)")
    a("    pred = np.empty(T, dtype=np.float32)")
    a(f"    res = np.empty(({K}, T), dtype=np.float32)")
    a("    pend = np.empty(T, dtype=np.int64)")
    a("    pcode = np.empty(T, dtype=np.int64)")
    a("    pbeta = np.empty(T, dtype=np.int64)")
    a("    ptol = np.empty(T)")
    a("    rest = np.empty(T, dtype=np.int64)")
    a(f"    full = {(1 << K) - 1}")
    a("    check_sat = sat < np.inf")
    a("    sat32 = np.float32(sat) if check_sat else np.float32(0.0)")
    a("    nbad = 0")
    a("    for yy in range(y0, y1):")
    a("        for t0 in range(x0, x1, T):")
    a("            m = min(T, x1 - t0)")
    # projection, four channels per sweep over the tile
    for k in ks:
        a(f"            o{k} = -offx[{k}]")
    a("            for i in range(m):")
    for k in ks:
        a(f"                acc[{k}, i] = o{k}")
    a("                mx[i] = -np.inf")
    a(f"            for c in range(0, CS, {S}):")
    for j in range(S):
        a(f"                b{j} = (c + {j}) * sc + yy * sy + t0")
        a(f"                r{j} = Y[b{j}:b{j} + m]")
    for k in ks:
        for j in range(S):
            a(f"                p{k}_{j} = P[{k}, c + {j}]")
    a("                for i in range(m):")
    for j in range(S):
        a(f"                    v{j} = np.float32(r{j}[i])")

    def tree(terms):  # pairwise sum: short dependency chains
        while len(terms) > 1:
            terms = [f"({terms[n]} + {terms[n + 1]})" if n + 1 < len(terms) else terms[n]
                     for n in range(0, len(terms), 2)]
        return terms[0]

    for k in ks:
        a(f"                    acc[{k}, i] += " + tree([f"p{k}_{j} * v{j}" for j in range(S)]))
    a("                    mx[i] = max(mx[i], " + tree([f"v{j}" for j in range(S)]).replace("(", "max(").replace(" + ", ", ") + ")")
    a("            for c in range(CS, C):")
    a("                b0 = c * sc + yy * sy + t0")
    a("                r0 = Y[b0:b0 + m]")
    for k in ks:
        a(f"                p{k}_0 = P[{k}, c]")
    a("                for i in range(m):")
    a("                    v0 = np.float32(r0[i])")
    for k in ks:
        a(f"                    acc[{k}, i] += p{k}_0 * v0")
    a("                    mx[i] = max(mx[i], v0)")
    # per pixel: flags; pixels with a negative component are queued for NNLS
    a("            npend = 0")
    a("            for i in range(m):")
    for k in ks:
        a(f"                u{k} = acc[{k}, i]")
    a("                s = " + " + ".join(f"np.float64(u{k})" for k in ks))
    a("                code = " + " | ".join(f"(np.int64(u{k} > 0.0) << {k})" for k in ks))
    a("                fl = np.uint8(2) if check_sat and mx[i] >= sat32 else np.uint8(0)")
    a("                if not np.isfinite(s):")
    a("                    flag[yy, t0 + i] = fl | np.uint8(1)")
    a("                    nbad += 1")
    for k in ks:
        a(f"                    res[{k}, i] = 0.0")
    a("                    continue")
    a("                flag[yy, t0 + i] = fl")
    for k in ks:
        a(f"                res[{k}, i] = u{k}")
    a("                pend[npend] = i")
    a("                pcode[npend] = code")
    a("                ptol[npend] = -1e-10 * max(" + ", ".join(f"abs(np.float64(u{k}))" for k in ks) + (", 0.0)" if K == 1 else ")"))
    a("                npend += np.int64(nonneg and code != full)")
    # exact NNLS by block principal pivoting (Kim & Park 2011): first the step from the
    # sign pattern for every queued pixel, without data-dependent branches (independent
    # pixels overlap in the CPU; most are done after it), then the full iteration, with
    # its safeguards, for the others from the state that step left
    K8, KR = _padded(K), _table_rows(K)
    simd = K <= 8

    def load_u(ind):
        if not simd:
            for k in ks:
                a(f"{ind}u{k} = np.float64(acc[{k}, i])")
        a(f"{ind}tol = ptol[q]")
        a(f"{ind}tolg = tol * gscale")

    def step(ind, want_flip=True):
        a(f"{ind}rb = np.uint64(code) * np.uint64({KR * K8})")
        if simd:
            a(f"{ind}{'flip = ' if want_flip else ''}_pivot(R, rb, acc, res, i, code, tol, tolg)")
            return
        for j in ks:  # two partial sums per row: shorter dependency chains
            e = " + ".join(f"R[rb + np.uint64({p * K8 + j})] * u{p}" for p in ks if p % 2 == 0)
            o = " + ".join(f"R[rb + np.uint64({p * K8 + j})] * u{p}" for p in ks if p % 2 == 1) or "0.0"
            a(f"{ind}w{j} = ({e}) + ({o})")
        if want_flip:
            a(f"{ind}flip = " + " | ".join(
                f"(np.int64(w{j} < (tol if (code >> {j}) & 1 else tolg)) << {j})" for j in ks))

    def store(ind):
        if simd:
            return  # _pivot wrote the column
        for k in ks:
            a(f"{ind}res[{k}, i] = max(w{k}, 0.0) if (code >> {k}) & 1 else 0.0")

    a("            nrest = 0")
    a("            for q in range(npend):")
    a("                i = pend[q]")
    a("                code = pcode[q]")
    load_u("                ")
    step("                ")
    store("                ")
    a("                pcode[q] = code ^ flip")
    a("                pbeta[q] = " + " + ".join(f"((flip >> {j}) & 1)" for j in ks))
    a("                rest[nrest] = q")
    a("                nrest += np.int64(flip != 0)")
    a("            for r in range(nrest):")
    a("                q = rest[r]")
    a("                i = pend[q]")
    a("                code = pcode[q]")
    a("                beta = pbeta[q]")
    a("                alpha = 3")
    a("                flip = 1")
    load_u("                ")
    a(f"                for _ in range({10 * K + 49}):")
    step("                    ")
    a("                    if flip == 0:")
    a("                        break")
    a("                    nv = " + " + ".join(f"((flip >> {j}) & 1)" for j in ks))
    a("                    if nv < beta:")
    a("                        beta = nv")
    a("                        alpha = 3")
    a("                        code ^= flip")
    a("                    elif alpha >= 1:")
    a("                        alpha -= 1")
    a("                        code ^= flip")
    a("                    else:")
    a("                        last = 0")
    a(f"                        for j in range({K}):")
    a("                            if (flip >> j) & 1:")
    a("                                last = j")
    a("                        code ^= 1 << last")
    a("                if flip != 0:")
    step("                    ", want_flip=False)
    store("                ")
    # RMS residual while the tile is in cache
    a("            if want_rms:")
    a("                for i in range(m):")
    a("                    sq[i] = 0.0")
    a("                for c in range(C):")
    a("                    b0 = c * sc + yy * sy + t0")
    a("                    row = Y[b0:b0 + m]")
    a("                    o = off[c]")
    for k in ks:
        a(f"                    q{k} = M[c, {k}]")
    a("                    for i in range(m):")
    a("                        d = np.float32(row[i]) - (o + " + " + ".join(f"q{k} * res[{k}, i]" for k in ks) + ")")
    a("                        sq[i] += d * d")
    a("                for i in range(m):")
    a("                    rms[yy, t0 + i] = np.sqrt(sq[i] / C) if (flag[yy, t0 + i] & 1) == 0 else np.nan")
    a("            for i in range(m):")
    for k in ks:
        a(f"                X[{k}, yy, t0 + i] = res[{k}, i]")
    a("    return nbad")
    return "\n".join(L) + "\n"


_GENERATORS = {"fused": (_fused_source, "_fused")}
_KERNELS: dict = {}
_KERNEL_LOCK = threading.Lock()
_JIT_OPTIONS = "nogil=True, fastmath={'contract'}"


def _kernel_source(kind: str, K: int) -> tuple[str, str]:
    generate, name = _GENERATORS[kind]
    head = "import numpy as np\nimport numba\n\nfrom qdplex.unmix import _pivot_for\n\n"
    return head + f"_pivot = _pivot_for({int(K)})\n\n" + generate(K), name


def _cache_key(src: str) -> str:
    """Source hash + numba/numpy/Python versions: a cache entry is only ever reused by the
    exact code and compiler that wrote it."""
    import hashlib

    from pathlib import Path

    here = Path(__file__).read_bytes()  # the intrinsics the kernels call live here
    tag = f"{numba.__version__}|{np.__version__}|{sys.version_info[:3]}|{src}|{hashlib.sha1(here).hexdigest()}"
    return hashlib.sha1(tag.encode()).hexdigest()[:16]


def _kernel_module(kind: str, K: int):
    """Import the generated source of kernel ``kind`` for K from a cache folder (so numba
    can cache its machine code on disk); None when no folder is usable."""
    import importlib.util
    import tempfile
    from pathlib import Path

    body, name = _kernel_source(kind, K)
    src = body + f"\n\n{name} = numba.njit(cache=True, {_JIT_OPTIONS})({name})\n"
    key = _cache_key(src)
    for base in (os.environ.get("QDPLEX_KERNEL_DIR"), Path.home() / ".cache" / "qdplex" / "kernels",
                 Path(tempfile.gettempdir()) / "qdplex-kernels"):
        if not base:
            continue
        try:
            folder = Path(base)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"qdplex_{kind}_k{K}_{key}.py"
            try:
                ok = path.read_text(encoding="utf-8") == src
            except (OSError, UnicodeError):
                ok = False
            if not ok:  # missing, truncated or stale: (re)write atomically
                tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
                tmp.write_text(src, encoding="utf-8")
                os.replace(tmp, path)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # numba's disk cache looks the module up by name
            spec.loader.exec_module(module)
            return getattr(module, name), path
        except Exception:  # noqa: BLE001 - any failure here only costs the disk cache
            continue
    return None, None


def _compile_in_memory(kind: str, K: int):
    body, name = _kernel_source(kind, K)
    ns: dict = {}
    exec(body, ns)  # noqa: S102 - fixed template, K an int
    return numba.njit(nogil=True, fastmath={"contract"})(ns[name])


class _Kernel:
    """A generated kernel: the disk-cached compile when it loads, else an in-memory compile.

    numba reads its disk cache lazily, at the first call for each argument type; a stale
    or corrupted cache entry (e.g. from another numba version or an older generated
    source) then raises there (``ModuleNotFoundError``, pickle or LLVM errors). Our kernels
    raise nothing themselves, so any exception from the cached function means a bad cache:
    the call is redone with a fresh in-memory compile, which is kept from then on.
    """

    def __init__(self, kind: str, K: int):
        self.kind, self.K = kind, K
        self.cached, self.path = _kernel_module(kind, K)
        self.fresh = None

    def _fresh(self):
        with _KERNEL_LOCK:
            if self.fresh is None:
                self.fresh = _compile_in_memory(self.kind, self.K)
        return self.fresh

    def __call__(self, *args):
        if self.cached is not None and self.fresh is None:
            try:
                return self.cached(*args)
            except numba.core.errors.TypingError:
                raise  # compiled afresh and the arguments do not type: not a cache problem
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                import warnings

                warnings.warn(f"qdplex: unusable numba disk cache for the {self.kind} kernel (K={self.K}) in "
                              f"{self.path.parent}: {type(exc).__name__}: {exc}; recompiling in memory",
                              RuntimeWarning, stacklevel=2)
                self.cached = None
                for f in (self.path.parent / "__pycache__").glob(f"{self.path.stem}.*"):
                    try:  # the next process writes a fresh cache entry
                        f.unlink()
                    except OSError:
                        pass
        return self._fresh()(*args)


def _kernel(kind: str, K: int) -> _Kernel:
    """The compiled kernel ``kind`` for K endmembers (disk-cached machine code when possible)."""
    with _KERNEL_LOCK:
        fn = _KERNELS.get((kind, K))
        if fn is None:
            fn = _KERNELS[(kind, K)] = _Kernel(kind, K)
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
    tab = _pivot_table_for(G.tobytes(), K) if K <= _MAX_TABLE_K else np.zeros(1)
    P = np.linalg.pinv(M)
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
    Y = _kernel_input(arr)
    K = M.shape[1]
    C, H, W = Y.shape
    out = np.empty((K, H, W), dtype=np.float32)
    flag = np.empty((H, W), dtype=np.uint8)
    spans = _spans(H, W, os.cpu_count() or 1, max(1, int(chunk) ** 2))
    if len(spans) == 1:
        _fit(Y, plan, out, None, flag, spans[0])
    else:
        with ThreadPoolExecutor(max_workers=min(len(spans), os.cpu_count() or 1)) as pool:
            list(pool.map(lambda s: _fit(Y, plan, out, None, flag, s), spans))
    return out[:, 0, :] if flat else out


def _spans(H: int, W: int, workers: int, max_px: int) -> list[tuple[int, int, int, int]]:
    """Split H×W pixels into (y0, y1, x0, x1) spans: about 4 per worker (load balance;
    fewer, longer spans stream memory better), whole rows when there are enough rows,
    at most ``max_px`` pixels each."""
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
    data = _blocks(image.data, chunk)
    K = len(names)
    out = da.map_blocks(_unmix_block, data, plan=plan, dtype=np.float32,
                        chunks=((K + 2,),) + data.chunks[1:], token=f"qdplex-unmix-{method}")
    chans = [Channel(n, emission_nm=library.peak_nm(n), fluor=n) for n in names]
    abund = MultiplexImage(data=out[:K], channels=chans, pixel_size_um=image.pixel_size_um,
                           name=image.name, source=image.source, metadata=dict(image.metadata))
    return UnmixResult(abundances=abund, residual=out[K], saturated=out[K + 1] > 0.5,
                       library=library, method=method, matrix=M)
