"""Generator of the fused unmixing kernel: Python source written out for each number
of endmembers K (the small loops unrolled so the compiler keeps each pixel's problem in
registers). :mod:`qdplex.unmix._cache` compiles and caches what it returns.
"""

from __future__ import annotations

from ._kernels import _SWEEP, _TILE, _padded, _table_rows

__all__ = ["kernel_source", "GENERATORS"]


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


GENERATORS = {"fused": (_fused_source, "_fused")}


def kernel_source(kind: str, K: int) -> tuple[str, str]:
    generate, name = GENERATORS[kind]
    head = "import numpy as np\nimport numba\n\nfrom qdplex.unmix._kernels import _pivot_for\n\n"
    return head + f"_pivot = _pivot_for({int(K)})\n\n" + generate(K), name
