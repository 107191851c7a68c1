"""Compiled integrals of piecewise-linear sampled spectra: what
:meth:`qdplex.spectra.Spectrum.cumulative` computes, and what the on-slide warp of
:mod:`qdplex.unmix.refine` integrates over each band (~100 numpy calls per refinement
before, each a few µs of overhead on arrays of a few hundred values)."""

from __future__ import annotations

import numba

__all__ = ["cumulative_at", "cumulative_into"]

_jit = numba.njit(cache=True, nogil=True)


@_jit
def cumulative_at(w, v, cum, x):
    """``∫ s(λ) dλ`` from ``w[0]`` to ``x`` (clipped to ``[w[0], w[-1]]``) of the spectrum
    that is linear between the samples ``(w, v)`` (increasing ``w``, steps allowed); ``cum``
    holds the integral at each sample."""
    n = w.shape[0]
    if x < w[0]:
        x = w[0]
    elif x > w[n - 1]:
        x = w[n - 1]
    lo, hi = 0, n  # numpy.searchsorted(w, x, side="right")
    while lo < hi:
        mid = (lo + hi) >> 1
        if w[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    i = min(max(lo - 1, 0), n - 2)
    dw = w[i + 1] - w[i]
    frac = (x - w[i]) / dw if dw > 0 else 0.0
    vx = v[i] + frac * (v[i + 1] - v[i])
    return cum[i] + (x - w[i]) * (v[i] + vx) / 2.0


@_jit
def cumulative_into(w, v, cum, x, out):
    """:func:`cumulative_at` of each value of the 1-D ``x``, into ``out``."""
    for j in range(x.shape[0]):
        out[j] = cumulative_at(w, v, cum, x[j])
