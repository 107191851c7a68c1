"""Spectra refined on the slide itself (semi-blind unmixing).

Built-in or CSV spectra are the fluor's nominal emission; on a given slide a QD lot,
its environment and the optics move and reshape it by a few nm, and tissue
autofluorescence never looks like a generic model. :func:`refine_matrix` adapts each
column of the mixing matrix to the slide by alternating non-negative least squares:

1. unmix a sample of pixels (:mod:`qdplex.unmix._sample`, offset removed) with the
   current matrix;
2. for each endmember (all from the same fit), take the pixels where it carries at least
   30 % of the fitted signal, keep the purest quarter of them (:data:`PURE_SHARE`; at least
   2 × :data:`MIN_PIXELS`, so that a fluor with few such pixels is not cut below the
   minimum) and of those the brighter half, and re-estimate its spectrum there as the per-channel
   median of (pixel − the other endmembers' fit) / its abundance — a median, so that
   pixels where another endmember is misfitted do not pull it; non-negative, scaled so
   that its interpolated peak equals the prior's (abundances keep their units), and kept
   close to the prior (which weighs as much as 25 pixels); unmix again;
3. repeat (three rounds; a fourth changed the benchmark figures by less than their ±0.03 noise
   and cost ~9 ms at 768²).

The **nuclear stain** (``stain``) is bright wherever the nuclear markers are, which
makes both estimates above biased: a stain spectrum that is slightly wrong in its red
tail is fitted as a little of every nuclear marker in every nucleus, and "the pixel
minus the other endmembers' fit" then lacks exactly that tail, so the error feeds
itself; and the nuclear markers never carry 30 % of a nucleus's signal, so they were
never refined. Hence:

* the stain's spectrum is re-estimated from the nuclei that carry the least marker: of
  the pixels it dominates (the brighter half), at most a quarter — those with the
  smallest ratio of the other refined endmembers' fitted signal to the stain's, and
  none above :data:`STAIN_FLOOR_FACTOR` × that ratio's 5th percentile (on a slide where
  three nuclei in four carry PR, a plain quarter took in PR-positive nuclei and the
  stain's spectrum took up QD565's). Nuclear markers only ever *add* signal to a
  nucleus, and a wrong stain tail adds about the same fitted marker share to every
  nucleus, so these are the nuclei without markers (every slide has some), whatever
  the markers' fit says. There the spectrum is the per-channel median of (pixel − the
  endmembers that are not being refined, i.e. autofluorescence measured on a control)
  / its abundance. (A per-channel lower quartile over all its nuclei, the earlier
  rule, is biased low by the noise in the dim channels of the stain's tail, where the
  red QDs sit: on ``bench_accuracy``'s hard slide HER2's and EGFR's errors were 1.16×
  and 1.18× the reference's with it, about 1.11× with this rule);
* the other endmembers' shares are computed without the stain's signal, so a nuclear
  marker's pixels are the nuclei where it is the main stain after the nuclear stain.

**Known limits** (measured with ``benchmarks/bench_accuracy.py``'s slides and four more
seeds of them, error of the marker plane ÷ that of NNLS given the true spectra): the
per-fluor re-fit cannot tell a fluor's own tail from a neighbour that sits in the same
pixels, so where the built-in model's tail is wrong and the neighbour is present the
error stays (worst seen: mTOR/QD525 1.65× beside QD565, EGFR/QD705 1.35× beside QD655);
and where almost every nucleus carries a nuclear marker the stain's spectrum keeps a
little of it (PR/QD565 1.5×). Without refinement the same slides give up to 3×, but on a
few markers refinement is the worse of the two (on one slide HER2 1.15× refined, 0.94×
not; mTOR 1.65× vs 1.38×). Tried
and not kept: re-fitting all spectra at once by least squares (3×: the stain took the
nuclear markers' spectra), re-fitting from the purest pixels without subtracting the
other markers (better where markers do not overlap, drift where they do), more pixels,
fewer or more rounds, other selection shares (all within ±0.03).

A refinement is refused (the prior kept, and the reason recorded) when the endmember
dominates too few pixels to be estimated, when its spectrum would turn away from its
prior (cosine below :data:`MIN_COSINE`), or when it would drift toward another
endmember (their angle shrinking below :data:`ANGLE_FLOOR` of the prior angle); all
refinements are dropped when the sample's residual does not fall by 2 %. Spectra
measured on controls (``estimate_spectrum`` on a single-stain control,
``estimate_autofluorescence`` on an unstained one) win: :func:`qdplex.unmix.unmix`
never refines them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["refine_matrix", "MIN_COSINE", "ANGLE_FLOOR", "STAIN_QUANTILE", "STAIN_FLOOR_FACTOR"]

#: smallest cosine between a refined spectrum and its prior (measured Qdot 525 is at 0.943 from
#: the built-in model, so a floor of 0.95 refused the right answer)
MIN_COSINE = 0.9
#: a pair's angle may not fall below this fraction of its prior angle
ANGLE_FLOOR = 0.8
#: the prior spectrum weighs as much as this many pixels in each re-fit
PRIOR_PIXELS = 25
#: an endmember dominates a pixel where it carries at least this share of the fitted signal
DOMINANT_SHARE = 0.3
#: a fluor's spectrum is re-fitted from this share of the pixels it dominates, the purest (then their brighter half)
PURE_SHARE = 0.25
#: fewest dominated pixels to re-fit a spectrum from
MIN_PIXELS = 20
ROUNDS = 3
#: refinements are kept only when they lower the sample's RMS residual by this share
MIN_GAIN = 0.02
#: pixels of the sample used for fitting
MAX_PIXELS = 8192
#: the nuclear stain's spectrum comes from at most this share of its pixels: those with the least marker
STAIN_QUANTILE = 0.25
#: ... and none whose marker-to-stain ratio exceeds this multiple of the ratio's 5th percentile
STAIN_FLOOR_FACTOR = 3.0


def _cos(a, b) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def _rms(Y, M, A) -> float:
    R = Y - np.asarray(M, np.float32) @ np.asarray(A, np.float32)
    return float(np.sqrt(np.einsum("ij,ij->", R, R) / max(R.size, 1)))


def _median(x: np.ndarray) -> np.ndarray:
    """``numpy.median`` along the last axis of a non-empty array without NaN (one
    partition, without the general function's overhead: ~50 of them per refinement)."""
    n = x.shape[-1]
    h = n // 2
    if n % 2:
        return np.partition(x, h, axis=-1)[..., h]
    p = np.partition(x, (h - 1, h), axis=-1)
    return 0.5 * (p[..., h - 1] + p[..., h])


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
    i = int(np.argmax(m))
    if centres is None or not 0 < i < len(m) - 1 or min(m[i - 1], m[i + 1]) <= 0:
        return float(m[i])
    a, b, c = np.log(m[i - 1]), np.log(m[i]), np.log(m[i + 1])
    den = a - 2 * b + c
    if den >= 0:
        return float(m[i])
    d = 0.5 * (a - c) / den
    return float(np.exp(b - 0.25 * (a - c) * d))


def _lambda_centres(channels):
    """Band centres when ``channels`` are an evenly spaced λ-stack, else None."""
    c = np.array([getattr(ch, "emission_nm", None) or np.nan for ch in channels], float)
    if channels is None or len(c) < 5 or not np.all(np.isfinite(c)):
        return None
    d = np.diff(c)
    return c if np.all(d > 0) and np.ptp(d) <= 1e-6 * d.mean() + 1e-9 else None


def _least_marked(sel: np.ndarray, contrib: np.ndarray, k: int, markers: np.ndarray) -> np.ndarray:
    """Of the pixels ``sel``, those where the ``markers``' fitted signal is smallest relative
    to endmember ``k``'s: the :data:`STAIN_QUANTILE` share, but none whose ratio exceeds
    :data:`STAIN_FLOOR_FACTOR` × the ratio's 5th percentile (when most nuclei carry a
    marker, a fixed share would take in marked ones); at least :data:`MIN_PIXELS`."""
    idx = np.flatnonzero(sel)
    if idx.size <= MIN_PIXELS:
        return sel
    sub = contrib[:, idx]
    ratio = sub[markers].sum(axis=0) / np.maximum(sub[k], 1e-12)
    n = int(idx.size * STAIN_QUANTILE)
    n = max(min(n, int((ratio <= STAIN_FLOOR_FACTOR * np.quantile(ratio, 0.05)).sum())), MIN_PIXELS)
    out = np.zeros_like(sel)
    out[idx[np.argsort(ratio, kind="stable")[:n]]] = True
    return out


def refine_matrix(Y: np.ndarray, M0: np.ndarray, names, *, fixed=(), unmix_fn,
                  channels=None, stain=()) -> tuple[np.ndarray, dict]:
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
        ``unmix_fn(Y, M) -> A`` (K×N non-negative abundances).
    channels : sequence of Channel, optional
        The image's channels (peak interpolation on evenly spaced λ-stacks).
    stain : collection of str
        The nuclear stain's endmember(s) (module docstring).

    Returns
    -------
    (M, record)
        The refined matrix and ``{"pixels", "rounds", "residual_before",
        "residual_after", "spectra": {name: {"refined", "cosine_to_prior",
        "pixels", "reason", "column"}}}``.
    """
    C, K = M0.shape
    names = list(names)
    if Y.shape[1] > MAX_PIXELS:
        Y = Y[:, np.random.default_rng(0).choice(Y.shape[1], MAX_PIXELS, replace=False)]
    Y = np.ascontiguousarray(Y, dtype=np.float32)
    Yd = Y.astype(np.float64)
    M = M0.copy()
    free = np.array([n not in fixed for n in names])
    stain = set(stain)
    is_stain = np.array([n in stain for n in names])
    centres = _lambda_centres(channels) if channels is not None else None
    peak0 = [_peak(M0[:, k], centres) for k in range(K)]
    A = unmix_fn(Y, M).astype(np.float64)
    before = _rms(Y, M, A)
    reason: dict[int, str] = {k: "measured on a control, or not asked for (controls win)"
                              for k in range(K) if not free[k]}
    npix = np.zeros(K, int)
    for _ in range(ROUNDS):
        contrib = M.sum(axis=0)[:, None] * A  # K×N fitted signal per endmember
        total = contrib.sum(axis=0)
        unstained = total - contrib[is_stain].sum(axis=0)  # without the nuclear stain
        share = contrib / np.maximum(unstained, 1e-12)
        share[is_stain] = contrib[is_stain] / np.maximum(total, 1e-12)
        dominant = (share >= DOMINANT_SHARE) & (A > 0)
        Mn = M.copy()
        for k in np.flatnonzero(free):  # every column from the same fit, then one unmixing
            sel = dominant[k]
            n_sel = int(np.count_nonzero(sel))
            if is_stain[k]:  # its brighter half, then the nuclei with the least marker
                if n_sel:
                    sel = sel & (A[k] >= _median(A[k, sel]))
                sel = _least_marked(sel, contrib, k, free & ~is_stain)
            elif n_sel >= 2 * MIN_PIXELS:  # the purest quarter (≥ 2 × MIN_PIXELS), brighter half
                keep = max(int(n_sel * PURE_SHARE), 2 * MIN_PIXELS)
                sel = sel & (share[k] >= np.partition(share[k, sel], n_sel - keep)[n_sel - keep])
                sel &= A[k] >= _median(A[k, sel])
            npix[k] = int(sel.sum())
            if npix[k] < MIN_PIXELS:
                continue
            As = A[:, sel]
            a = As[k]
            if is_stain[k]:  # minus the fixed endmembers only (the markers there are ~absent)
                sub = np.flatnonzero(~free & (np.arange(K) != k))
                rest = Yd[:, sel] - M[:, sub] @ As[sub]
            else:  # minus every other endmember's fit
                rest = Yd[:, sel] - M @ As + M[:, k:k + 1] * a
            # median of the per-pixel ratios: robust to pixels where another endmember is misfitted
            m = np.clip(_median(rest / a), 0.0, None)
            if not m.max() > 0:
                continue
            w = PRIOR_PIXELS / (PRIOR_PIXELS + npix[k])  # the prior counts as this many pixels
            m = (1 - w) * m * (peak0[k] / _peak(m, centres)) + w * M0[:, k]
            Mn[:, k] = m * (peak0[k] / _peak(m, centres))
        M = Mn
        A = unmix_fn(Y, M).astype(np.float64)
    for k in np.flatnonzero(free):
        if npix[k] < MIN_PIXELS:
            reason[k] = f"dominates only {npix[k]} sampled pixels (needs {MIN_PIXELS})"
    # guards: close to the prior, no drift toward another endmember
    refused = {k: r for k, r in reason.items()}
    for k in range(K):
        if k not in refused and _cos(M[:, k], M0[:, k]) < MIN_COSINE:
            refused[k] = f"turned away from its prior (cosine {_cos(M[:, k], M0[:, k]):.3f} < {MIN_COSINE})"
    a0 = _angles(M0)
    while True:  # refuse, pair by pair, the one that moved more from its prior; until no pair is too close
        cur = M.copy()
        cur[:, list(refused)] = M0[:, list(refused)]
        a1 = _angles(cur)
        bad = [(i, j) for i, j in zip(*np.triu_indices(K, 1))
               if not (i in refused and j in refused) and a1[i, j] < ANGLE_FLOOR * a0[i, j]]
        if not bad:
            break
        i, j = bad[0]
        k = min((q for q in (i, j) if q not in refused), key=lambda q: _cos(M[:, q], M0[:, q]))
        other = names[j if k == i else i]
        refused[k] = f"drifted toward {other} (angle {a1[i, j]:.1f}° < {ANGLE_FLOOR:g} × prior {a0[i, j]:.1f}°)"
    reverted = [k for k in refused if free[k]]
    for k in reverted:
        M[:, k] = M0[:, k]
    if reverted:
        A = unmix_fn(Y, M).astype(np.float64)
    after = _rms(Y, M, A)
    if after > (1.0 - MIN_GAIN) * before and len(refused) < K:
        for k in range(K):
            refused.setdefault(k, f"refinement lowered the residual by less than {MIN_GAIN:.0%} "
                                  f"({before:.4g} → {after:.4g}): the prior fits")
        M, after = M0.copy(), before
    spectra = {}
    for k, n in enumerate(names):
        spectra[n] = {"refined": k not in refused, "cosine_to_prior": round(_cos(M[:, k], M0[:, k]), 5),
                      "pixels": int(npix[k]), "reason": refused.get(k, ""),
                      "column": [round(float(v), 6) for v in M[:, k]]}
    return M, {"pixels": int(Y.shape[1]), "rounds": ROUNDS, "residual_before": round(before, 4),
               "residual_after": round(after, 4), "spectra": spectra}
