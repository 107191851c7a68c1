"""Spectra refined on the slide itself (semi-blind unmixing).

Built-in or CSV spectra are the fluor's nominal emission; on a given slide a QD lot,
its environment and the optics move and reshape it by a few nm, and tissue
autofluorescence never looks like a generic model. :func:`refine_matrix` adapts each
column of the mixing matrix to the slide by alternating non-negative least squares:

0. **warp each marker's prior** (when the priors are given and the channels have band
   widths): a shift and a stretch of each side of its band about the peak — what a lot's
   size distribution and its environment do to a Qdot's band — fitted to the whole sample
   at once by damped Gauss–Newton (:data:`WARP_STEPS` steps, each moving a shift by at most
   3 nm and a width by 6 %, so at most 6 nm and 12 %; the abundances held, then one
   unmixing: a partial step toward the best warp, which the re-fit below completes). Three
   numbers per fluor are well determined by all the pixels, also for a fluor that
   dominates few of them; the warped prior is the start, what step 2 keeps the estimate
   close to and what a refused spectrum keeps. A warp that turns a prior away from itself
   or toward another prior (the guards below) is not kept. The nuclear stain is not warped
   (warping it too: easy mTOR 1.14×, 16 of 50 planes above 1.1×; see Known limits);
1. unmix a sample of pixels (:mod:`qdplex.unmix._sample`, offset removed) with the
   current matrix;
2. for each endmember (all from the same fit), take the pixels where it carries at least
   30 % of the fitted signal (the nuclear stain's own signal left out of a marker's
   share), the brighter half of them, and of those the **least marked**: the ones where
   the *other* refined markers' fitted signal is smallest relative to its own — at most
   a quarter (:data:`LEAST_MARKED_SHARE`), and none whose ratio exceeds
   :data:`FLOOR_FACTOR` × the ratio's 5th percentile (at least :data:`MIN_PIXELS`; a
   marker that dominates fewer than 2 × :data:`MIN_PIXELS` pixels uses them all);
   re-estimate its spectrum there as the per-channel median of (pixel − the endmembers
   that are not refined markers: autofluorescence measured on a control, spectra from
   single-stain controls, the nuclear stain when the endmember is a marker) / its
   abundance; on an evenly spaced λ-stack, project it onto the single-peaked spectra
   (Qdots and DNA stains emit one band; the least-squares increasing-then-decreasing
   fit) — this removes a bump of another fluor; clip at zero, scale it so that its
   interpolated peak equals the prior's (abundances keep their units) and keep it close
   to the (warped) prior (which weighs as much as 25 pixels); unmix again;
3. repeat (three rounds; a fourth changed the benchmark figures by less than their noise
   and would cost ~3 ms at 768²).

**Speed.** The refinement works on an 8192-pixel sample, so its cost is fixed (at 768²
about a quarter of plain NNLS unmixing, ~16–25 ms on this project's 2-CPU machines): five or six NNLS
fits of the sample, whose residuals come from the fit kernel itself, and between them small
steps compiled with numba (:mod:`qdplex.unmix._kernels`: the least-marked pixels, the
per-channel medians, the single-peaked fit, the warped band integrals and peaks; they
replaced ~150 numpy calls of a few µs each and give the same matrices to 1e-15).

**Why the least marked, and why the other markers are not subtracted.** A spectrum
that is wrong in a channel where another fluor emits — a red tail the built-in model
lacks, under the next Qdot; the nuclear stain's tail under the nuclear markers — is
fitted as a little of that other fluor in *every* pixel of its own. "The pixel minus
the other endmembers' fit" then lacks exactly the missing part, so an estimate that
subtracts the other markers agrees with the wrong spectrum (the earlier rule: on
``bench_accuracy``'s slides and eight more seeds, 29 of 50 marker planes above 1.1× the
error of an unmixing given the true spectra, worst 4.0×). Markers only ever *add*
signal, and a wrong tail adds about the same fitted share to every pixel, so the
pixels where the other markers' share is smallest are the ones without them (every
slide has some); there the other markers are not subtracted and the missing part
shows. A 5 nm shift of a Qdot is followed to cosine 0.999 with the truth (a 7 nm one too,
but there the drift guard below refuses it).

**Known limits** (``benchmarks/bench_accuracy.py --more-seeds 31,32,33,34``: its two slides
and eight more; error of the marker plane ÷ that of NNLS given the true spectra; 11 of
50 above 1.1×, geometric mean 1.06×; without the warp 15 of 50, 1.08×; without refinement
43 of 50, 1.69×): where almost every nucleus carries a nuclear marker, no nucleus shows
the stain alone and the stain's spectrum keeps some of the marker (worst PR/QD565 3.3×);
a broad fluor that dominates few pixels (QD705 beside QD655 in crowded stroma) is refused
and keeps its warped prior, or keeps a little of its neighbour (EGFR up to 1.15×). On
``bench_accuracy``'s hard slide QD705's 20 least-marked pixels all carry HER2 (the free
estimate's cosine to the true spectrum is 0.953, so refusing it is right); with QD705 at
its unwarped prior even the true QD655 left EGFR at 1.15×, with the warped prior EGFR is at
1.07×. Before the warp, fitting all 16 384 sampled pixels on an 8×8 tile grid gave
10 of 50 (worst 2.1×) but added ~19 ms at 768² (before the steps were compiled), beyond the time budget. Tried and not
kept (figures before the warp was added, against 15 of 50): subtracting the other markers
above their floor ratio, or only the markers whose bands do not meet the fluor's (both
worse: 21–28 of 50); the warp with tail exponents as well, its 2 % gain counted from the
warped start (29 of 50: the free re-fit was often dropped); re-fitting all spectra at once by least
squares (3×: the stain took the nuclear markers' spectra); a per-channel lower quartile
for the stain; lower guard floors (20 of 50, worst 4.1×); a prior weighed per channel by
the estimate's precision (prior s.d. 5–20 % of the peak: the hard slide's EGFR 1.09 but
its HER2 1.19, 20 of 50); removing from a re-fitted spectrum the other single-peaked
fluors' shapes (alternating the single-peaked fit with NNLS on their spectra: a ubiquitous
marker's bump, which the projection spreads into a plateau, goes; 14 of 50 but geometric
mean 1.09×, hard EGFR 1.18); the spectrum as the intercept of a per-channel regression of
(pixel / abundance) on the other markers' shares (the shares' noise is the pixel's own,
so the slope takes real tails away: 5 of the benchmark's 10 cells above 1.1×); the warp
fitted only for refused spectra, against the refined others (hard EGFR 1.14, HER2 1.16:
it bends toward the others' errors); two rounds instead of three after the warp (hard 32
HER2 3.8×).

A refinement is refused (the warped prior kept, and the reason recorded) when the endmember
dominates too few pixels to be estimated, when its spectrum would turn away from its
prior (cosine below :data:`MIN_COSINE`), or when it would drift toward another
endmember (their angle shrinking below :data:`ANGLE_FLOOR` of the prior angle); all
refinements are dropped, warps too, when the sample's residual does not fall by 2 % from
the unwarped priors'. Spectra
measured on controls (``estimate_spectrum`` on a single-stain control,
``estimate_autofluorescence`` on an unstained one) win: :func:`qdplex.unmix.unmix`
never refines them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["refine_matrix", "MIN_COSINE", "ANGLE_FLOOR", "LEAST_MARKED_SHARE", "FLOOR_FACTOR"]

#: smallest cosine between a refined spectrum and its prior (measured Qdot 525 is at 0.943 from
#: the built-in model, so a floor of 0.95 refused the right answer)
MIN_COSINE = 0.9
#: a pair's angle may not fall below this fraction of its prior angle
ANGLE_FLOOR = 0.8
#: the prior spectrum weighs as much as this many pixels in each re-fit
PRIOR_PIXELS = 25
#: an endmember dominates a pixel where it carries at least this share of the fitted signal
DOMINANT_SHARE = 0.3
#: fewest dominated pixels to re-fit a spectrum from
MIN_PIXELS = 20
ROUNDS = 3
#: refinements are kept only when they lower the sample's RMS residual by this share
MIN_GAIN = 0.02
#: pixels of the sample used for fitting
MAX_PIXELS = 8192
#: a spectrum is re-fitted from at most this share of (the brighter half of) the pixels its
#: endmember dominates: those with the least of the other markers
LEAST_MARKED_SHARE = 0.25
#: ... and none whose other-markers-to-own ratio exceeds this multiple of the ratio's 5th percentile
FLOOR_FACTOR = 3.0
#: the mode of a single-peaked spectrum is sought within this many channels of the prior's and the estimate's
MODE_REACH = 1
#: Gauss-Newton steps of the warp (the abundances held; one unmixing after them); each moves
#: a shift by at most 3 nm and a side's width by at most 6 %, which bounds the warp
#: (3 steps: the same figures, ~2 ms more)
WARP_STEPS = 2


def _cos(a, b) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0




def _angles(M: np.ndarray) -> np.ndarray:
    """K×K angles (degrees) between the columns of ``M``."""
    n = np.linalg.norm(M, axis=0)
    U = M / np.where(n > 0, n, 1.0)
    return np.degrees(np.arccos(np.clip(U.T @ U, -1.0, 1.0)))


def _peak(m: np.ndarray, centres) -> float:
    """The peak of a spectrum sampled as matrix column ``m``: through the largest value
    and its two neighbours, the apex of a parabola in log (a Gaussian; the value the
    band-integrated spectrum would reach at its true maximum), when the channels are
    evenly spaced λ bands; else the largest value."""
    from ._kernels import peak_of

    return float(peak_of(np.ascontiguousarray(m, dtype=np.float64), centres is not None))


def _peaks(rows: np.ndarray, centres) -> np.ndarray:
    """:func:`_peak` of each row of ``rows`` (1 where a row is all zero)."""
    from ._kernels import peaks_of

    rows = np.ascontiguousarray(rows, dtype=np.float64)
    out = np.empty(rows.shape[0])
    peaks_of(rows, centres is not None, out)
    return out


def _lambda_centres(channels):
    """Band centres when ``channels`` are an evenly spaced λ-stack, else None."""
    c = np.array([getattr(ch, "emission_nm", None) or np.nan for ch in channels], float)
    if channels is None or len(c) < 5 or not np.all(np.isfinite(c)):
        return None
    d = np.diff(c)
    return c if np.all(d > 0) and np.ptp(d) <= 1e-6 * d.mean() + 1e-9 else None


def _increasing_fit(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool-adjacent-violators: the least-squares non-decreasing fit to ``y`` and, for every
    prefix ``y[:i + 1]``, the squared error of its own non-decreasing fit, in one pass (the
    fit equals :func:`scipy.optimize.isotonic_regression`'s; compiled:
    :func:`qdplex.unmix._kernels.increasing_fit`)."""
    from ._kernels import increasing_fit

    y = np.ascontiguousarray(y, dtype=np.float64)
    fit, err = np.empty_like(y), np.empty_like(y)
    increasing_fit(y, fit, err)
    return fit, err


def _unimodal(m: np.ndarray, mode0: int) -> np.ndarray:
    """The least-squares single-peaked fit to ``m`` — non-decreasing up to its mode, then
    non-increasing (Stout's unimodal regression: the best split into an increasing prefix
    and a decreasing suffix) — the mode sought within :data:`MODE_REACH` channels of
    ``mode0`` and of ``m``'s largest value."""
    from ._kernels import unimodal_fit

    m = np.ascontiguousarray(m, dtype=np.float64)
    C = len(m)
    i = int(np.argmax(m))
    lo, hi = max(min(i, mode0) - MODE_REACH, 0), min(max(i, mode0) + MODE_REACH, C - 1)
    out = np.empty_like(m)
    unimodal_fit(m, lo, hi, out)  # compiled: ~5 µs instead of ~100 µs of numpy calls
    return out


def _warped_columns(spectrum, lo, hi, thetas) -> np.ndarray:
    """``spectrum`` shifted by ``theta[0]`` nm and its short- and long-wavelength sides
    stretched by ``theta[1]``, ``theta[2]`` about its peak, integrated over the bands
    ``lo``–``hi`` (of width > 0): one row per theta of ``thetas`` (T×3). Exact: the warp is
    linear on each side, so the warped integral up to ``x`` is the side's stretch times the
    spectrum's own (:meth:`~qdplex.spectra.Spectrum.cumulative`) from its peak to the
    wavelength ``x`` comes from."""
    from ._kernels import warped_band_integrals

    t = np.ascontiguousarray(thetas, dtype=np.float64)
    out = np.empty((t.shape[0], lo.size))
    warped_band_integrals(*spectrum._samples, spectrum.peak_nm, lo, hi, t, out)  # compiled
    return out


def _warp_fit(Y, M, A, ks, priors, lo, hi, peak0, centres, solve):
    """Gauss–Newton fit of a shift and two side widths of each prior spectrum ``priors[k]``
    for ``k`` in ``ks`` to the sample (all of them at once, the abundances and the other
    columns held), then one unmixing (``solve``); returns (M, A, its RMS residual, {k: (shift,
    short width, long width)})."""
    th = {k: np.array([0.0, 1.0, 1.0]) for k in ks}
    steps = np.array([0.5, 0.01, 0.01])  # finite-difference steps (nm, width factors)
    probe = np.vstack([np.zeros(3), np.diag(steps)])  # theta and a step in each parameter
    M = M.copy()
    YA, AA = Y.astype(np.float64) @ A.T, A @ A.T  # (Y − M A) Aᵀ = YA − M AA: the steps never touch the pixels
    for step in range(WARP_STEPS + 1):
        J = {}
        for k in ks:
            c = _warped_columns(priors[k], lo, hi, th[k] + probe)
            c *= (peak0[k] / _peaks(c, centres))[:, None]
            M[:, k] = c[0]
            J[k] = ((c[1:] - c[0]) / steps[:, None]).T
        if step == WARP_STEPS:
            break
        RA = YA - M @ AA
        n = 3 * len(ks)
        Jall = np.concatenate([J[k] for k in ks], axis=1)  # C × 3·len(ks)
        b = np.concatenate([J[k].T @ RA[:, k] for k in ks])
        G = (Jall.T @ Jall) * np.kron(AA[np.ix_(ks, ks)], np.ones((3, 3)))  # block (k, q): J_kᵀ J_q (A Aᵀ)_kq
        G += 1e-3 * np.diag(np.diag(G)) + 1e-12 * np.eye(n)  # Levenberg–Marquardt damping
        dx = np.linalg.solve(G, b)
        for i, k in enumerate(ks):
            th[k] = th[k] + np.clip(dx[3 * i:3 * i + 3], -6 * steps, 6 * steps)
    return (M, *solve(M), th)


def refine_matrix(Y: np.ndarray, M0: np.ndarray, names, *, fixed=(), unmix_fn,
                  channels=None, stain=(), single_peaked=(), priors=None) -> tuple[np.ndarray, dict]:
    """Refine the C×K mixing matrix ``M0`` on the offset-subtracted pixels ``Y`` (C×N).

    Parameters
    ----------
    Y : numpy.ndarray
        C×N pixel spectra, offset removed.
    M0 : numpy.ndarray
        C×K prior mixing matrix.
    names : sequence of str
        Endmember names (for the record).
    fixed : collection of str
        Endmembers never refined (single-stain controls).
    unmix_fn : callable
        ``unmix_fn(Y, M) -> (A, r)``: K×N non-negative abundances and the N pixels' RMS
        residuals.
    channels : sequence of Channel, optional
        The image's channels (peak interpolation on evenly spaced λ-stacks).
    stain : collection of str
        The nuclear stain's endmember(s) (module docstring).
    single_peaked : collection of str
        Endmembers whose emission has one band (Qdots, DNA stains): on an evenly spaced
        λ-stack their re-fitted spectrum is projected onto the single-peaked ones.
    priors : sequence of Spectrum or None, optional
        Each endmember's prior spectrum (None where there is none): the markers' priors are
        first warped to the slide (module docstring); needs channels with band widths.

    Returns
    -------
    (M, record)
        The refined matrix and ``{"pixels", "rounds", "residual_before",
        "residual_after", "spectra": {name: {"refined", "cosine_to_prior",
        "pixels", "reason", "column"[, "warp"]}}}``; ``"warp"`` (``{"shift_nm",
        "short_side_width", "long_side_width"}``) where the prior was warped: a refused
        spectrum keeps its warped prior.
    """
    from ._kernels import least_marked, ratio_median

    C, K = M0.shape
    names = list(names)
    if Y.shape[1] > MAX_PIXELS:
        Y = Y[:, np.random.default_rng(0).choice(Y.shape[1], MAX_PIXELS, replace=False)]
    Y = np.ascontiguousarray(Y, dtype=np.float32)
    M = M0.copy()
    free = np.array([n not in fixed for n in names])
    stain = set(stain)
    is_stain = np.array([n in stain for n in names])
    markers = free & ~is_stain
    single_peaked = set(single_peaked)
    single = np.array([n in single_peaked for n in names])
    centres = _lambda_centres(channels) if channels is not None else None
    peak0 = [_peak(M0[:, k], centres) for k in range(K)]

    def solve(M):  # the sample's abundances (float64) and RMS residual with M
        A, r = unmix_fn(Y, M)
        return A.astype(np.float64), float(np.sqrt(np.mean(np.square(r, dtype=np.float64))))

    A, before = solve(M)
    resid = before  # of the last fit, which is always of the current M
    Mp, warps = M0, {}  # the start, and what a refused spectrum keeps: the priors, the markers' warped
    bands = [getattr(ch, "band", None) for ch in channels] if channels is not None else [None]
    ks = [k for k in np.flatnonzero(markers & single) if priors is not None and priors[k] is not None]
    if ks and all(b is not None and b[1] > b[0] for b in bands):
        lo, hi = (np.ascontiguousarray(b) for b in np.array(bands, float).T)
        Mw, Aw, rw, th = _warp_fit(Y, M, A, ks, priors, lo, hi, peak0, centres, solve)
        aw, a0 = _angles(Mw), _angles(M0)
        ok = [k for k in ks if _cos(Mw[:, k], M0[:, k]) >= MIN_COSINE
              and np.all(np.delete(aw[k] >= ANGLE_FLOOR * a0[k], k))]
        if ok and rw < before:
            Mp = M0.copy()
            Mp[:, ok] = Mw[:, ok]
            M, warps = Mp.copy(), {k: th[k] for k in ok}
            A, resid = (Aw, rw) if len(ok) == len(ks) else solve(M)
    reason: dict[int, str] = {k: "measured on a control, or not asked for (controls win)"
                              for k in range(K) if not free[k]}
    npix = np.zeros(K, int)
    others = [markers & (np.arange(K) != k) for k in range(K)]  # the other refined markers
    subtracted = [np.flatnonzero(~markers & (np.arange(K) != k)) for k in range(K)]  # what is not one
    for _ in range(ROUNDS):
        contrib = M.sum(axis=0)[:, None] * A  # K×N fitted signal per endmember
        total = contrib.sum(axis=0)
        unstained = total - contrib[is_stain].sum(axis=0)  # without the nuclear stain
        share = contrib / np.maximum(unstained, 1e-12)
        share[is_stain] = contrib[is_stain] / np.maximum(total, 1e-12)
        dominant = (share >= DOMINANT_SHARE) & (A > 0)
        Mn = M.copy()
        for k in np.flatnonzero(free):  # every column from the same fit, then one unmixing
            # its brighter half, then the pixels with the least of the other markers (not when
            # a marker dominates too few pixels: then all of them); there, minus what is not a
            # refined marker (the markers there are ~absent; see the docstring), the median of
            # the per-pixel ratios: robust to pixels where another endmember is misfitted
            thin = bool(is_stain[k] or np.count_nonzero(dominant[k]) >= 2 * MIN_PIXELS)
            j = least_marked(A[k], dominant[k], contrib, k, thin, others[k], MIN_PIXELS, LEAST_MARKED_SHARE,
                             FLOOR_FACTOR)
            npix[k] = j.size
            if npix[k] < MIN_PIXELS:
                continue
            m = np.empty(C)
            ratio_median(Y, A, j, k, subtracted[k], M, m)
            if single[k] and centres is not None:  # (before clipping: zero-mean noise off the band pools to ~0)
                m = _unimodal(m, int(np.argmax(Mp[:, k])))
            m = np.clip(m, 0.0, None)
            if not m.max() > 0:
                continue
            w = PRIOR_PIXELS / (PRIOR_PIXELS + npix[k])  # the prior counts as this many pixels
            m = (1 - w) * m * (peak0[k] / _peak(m, centres)) + w * Mp[:, k]
            Mn[:, k] = m * (peak0[k] / _peak(m, centres))
        M = Mn
        A, resid = solve(M)
    for k in np.flatnonzero(free):
        if npix[k] < MIN_PIXELS:
            reason[k] = f"dominates only {npix[k]} sampled pixels (needs {MIN_PIXELS})"
    # guards: close to the prior, no drift toward another endmember
    refused = {k: r for k, r in reason.items()}
    for k in range(K):
        if k not in refused and _cos(M[:, k], Mp[:, k]) < MIN_COSINE:
            refused[k] = f"turned away from its prior (cosine {_cos(M[:, k], Mp[:, k]):.3f} < {MIN_COSINE})"
    a0 = _angles(Mp)
    while True:  # refuse, pair by pair, the one that moved more from its prior; until no pair is too close
        cur = M.copy()
        cur[:, list(refused)] = Mp[:, list(refused)]
        a1 = _angles(cur)
        bad = [(i, j) for i, j in zip(*np.triu_indices(K, 1))
               if not (i in refused and j in refused) and a1[i, j] < ANGLE_FLOOR * a0[i, j]]
        if not bad:
            break
        i, j = bad[0]
        k = min((q for q in (i, j) if q not in refused), key=lambda q: _cos(M[:, q], Mp[:, q]))
        other = names[j if k == i else i]
        refused[k] = f"drifted toward {other} (angle {a1[i, j]:.1f}° < {ANGLE_FLOOR:g} × prior {a0[i, j]:.1f}°)"
    reverted = [k for k in refused if free[k] and not np.array_equal(M[:, k], Mp[:, k])]
    for k in reverted:  # (one that dominated too few pixels never left its warped prior)
        M[:, k] = Mp[:, k]
    if reverted:
        A, resid = solve(M)
    after = resid
    if after > (1.0 - MIN_GAIN) * before and len(refused) < K:
        for k in range(K):
            refused.setdefault(k, f"refinement lowered the residual by less than {MIN_GAIN:.0%} "
                                  f"({before:.4g} → {after:.4g}): the prior fits")
        M, after, warps = M0.copy(), before, {}
    spectra = {}
    for k, n in enumerate(names):
        spectra[n] = {"refined": k not in refused, "cosine_to_prior": round(_cos(M[:, k], M0[:, k]), 5),
                      "pixels": int(npix[k]), "reason": refused.get(k, ""),
                      "column": [round(float(v), 6) for v in M[:, k]]}
        if k in warps:
            spectra[n]["warp"] = {"shift_nm": round(float(warps[k][0]), 3),
                                  "short_side_width": round(float(warps[k][1]), 4),
                                  "long_side_width": round(float(warps[k][2]), 4)}
    return M, {"pixels": int(Y.shape[1]), "rounds": ROUNDS, "residual_before": round(before, 4),
               "residual_after": round(after, 4), "spectra": spectra}
