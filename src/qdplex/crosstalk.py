"""Pre-flight check of a panel's library on a channel list: can it be unmixed, and how well?

:func:`check_panel` reports, for the C×K mixing matrix of a library on some channels:

* the condition number of the column-normalised matrix (1 = orthogonal spectra);
* pairwise spectral angles in degrees (0° = identical shape);
* the expected crosstalk (spillover) matrix: the signal of each fluor in the
  peak channel of each other fluor, relative to its signal in its own peak channel —
  what reading channels without unmixing would give;
* the noise amplification of unmixing per endmember (√((MᵀM)⁻¹)ₖₖ·‖mₖ‖, 1 for
  orthogonal spectra) and the correlation of unmixing noise between endmembers;
* the fraction of each spectrum's emission inside the channel bands;
* warnings for near-collinear pairs, poor coverage and high noise amplification.

A singular library (two spectra indistinguishable on these channels) is refused
with a :class:`~qdplex.errors.SpectraError` naming the pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import SpectraError
from .model import Channel

__all__ = ["PanelCheck", "check_panel", "check_panel_for", "format_panel_check", "require_unmixable",
           "COLLINEAR_DEG", "SINGULAR_COND"]

#: Pairs closer than this spectral angle (degrees) are warned about.
COLLINEAR_DEG = 10.0
#: Column-normalised condition numbers above this are refused as singular.
SINGULAR_COND = 1e5
_WARN_COND = 100.0
_WARN_NOISE = 5.0
_WARN_COVERAGE = 0.25


def _normalised(M: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(M, axis=0)
    return M / np.where(norms > 0, norms, 1.0)


def _angles_deg(M: np.ndarray) -> np.ndarray:
    Mn = _normalised(M)
    cos = np.clip(Mn.T @ Mn, -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def _names(names, K):
    return list(names) if names is not None else [f"endmember {k}" for k in range(K)]


def require_unmixable(M: np.ndarray, names=None) -> float:
    """Raise SpectraError naming the pair if ``M`` (C×K) cannot be unmixed; return its condition number."""
    M = np.asarray(M, dtype=float)
    C, K = M.shape
    names = _names(names, K)
    zero = [names[k] for k in range(K) if not np.any(M[:, k] != 0)]
    if zero:
        raise SpectraError(f"expected every endmember to have some signal in the channels, found none for {zero}")
    if K > C:
        raise SpectraError(f"expected at most as many endmembers as channels, found {K} endmembers "
                           f"{names} for {C} channels")
    s = np.linalg.svd(_normalised(M), compute_uv=False)
    cond = float(s[0] / s[-1]) if s[-1] > 0 else np.inf
    if cond > SINGULAR_COND:
        ang = _angles_deg(M)
        np.fill_diagonal(ang, np.inf)
        i, j = np.unravel_index(int(np.argmin(ang)), ang.shape)
        _, _, vt = np.linalg.svd(_normalised(M))
        v = np.abs(vt[-1])
        involved = [names[k] for k in np.argsort(-v) if v[k] > 0.1 * v.max()]
        if len(involved) <= 2 or ang[i, j] < 1.0:
            what = f"{names[i]} and {names[j]} (spectral angle {ang[i, j]:.2f}°)"
        else:
            what = f"{involved[0]} and {involved[1]} (a combination of {involved})"
        raise SpectraError(
            f"expected a library whose spectra are distinguishable on these channels, found a singular "
            f"library (condition number {cond:.3g}): {what} cannot be separated; remove one or image "
            f"more channels")
    return cond


@dataclass
class PanelCheck:
    """Result of :func:`check_panel` (all tables indexed by endmember name)."""

    names: list[str]
    channels: list[Channel]
    condition_number: float
    angles: pd.DataFrame
    crosstalk: pd.DataFrame
    noise_amplification: pd.Series
    noise_correlation: pd.DataFrame
    coverage: pd.Series
    peak_channel: pd.Series
    warnings: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.warnings


def check_panel(library, channels, *, collinear_deg: float = COLLINEAR_DEG) -> PanelCheck:
    """Check that ``library`` can be unmixed on ``channels``.

    Parameters
    ----------
    library : SpectralLibrary
    channels : sequence of Channel or MultiplexImage
    collinear_deg : float
        Warn for pairs of spectra closer than this angle.

    Returns
    -------
    PanelCheck

    Raises
    ------
    SpectraError
        When the library does not cover the channels, or is singular on them
        (the message names the pair).
    """
    if hasattr(channels, "channels"):
        channels = channels.channels
    channels = list(channels)
    names = list(library.names)
    M = library.matrix(channels)
    cond = require_unmixable(M, names)
    K = len(names)
    ang = pd.DataFrame(_angles_deg(M), index=names, columns=names)
    peak = np.argmax(M, axis=0)
    # spill[j, i]: signal of fluor j in the peak channel of fluor i, relative to j in its own peak channel
    spill = M[peak, :].T / M[peak, np.arange(K)][:, None]
    crosstalk = pd.DataFrame(spill, index=pd.Index(names, name="from"), columns=pd.Index(names, name="into"))
    ginv = np.linalg.inv(M.T @ M)
    amp = np.sqrt(np.diag(ginv)) * np.linalg.norm(M, axis=0)
    sd = np.sqrt(np.diag(ginv))
    ncorr = pd.DataFrame(ginv / np.outer(sd, sd), index=names, columns=names)
    totals = np.array([s.cumulative(s.wavelength_nm[-1]) for s in library], dtype=float)
    coverage = pd.Series(np.clip(M.sum(axis=0) / totals, 0.0, 1.0), index=names, name="coverage")
    warnings = []
    for a in range(K):
        for b in range(a + 1, K):
            if ang.iat[a, b] < collinear_deg:
                warnings.append(f"{names[a]} and {names[b]} are nearly collinear on these channels "
                                f"(spectral angle {ang.iat[a, b]:.1f}° < {collinear_deg:g}°): expect "
                                f"noisy, anti-correlated abundances")
    if cond > _WARN_COND:
        warnings.append(f"condition number {cond:.3g} > {_WARN_COND:g}: unmixing will amplify noise")
    for k, n in enumerate(names):
        if coverage.iat[k] < _WARN_COVERAGE:
            warnings.append(f"{n}: only {100 * coverage.iat[k]:.0f}% of its emission falls in the channels")
        if amp[k] > _WARN_NOISE:
            warnings.append(f"{n}: unmixing amplifies its noise {amp[k]:.1f}× (> {_WARN_NOISE:g}×)")
    return PanelCheck(
        names=names, channels=channels, condition_number=cond, angles=ang, crosstalk=crosstalk,
        noise_amplification=pd.Series(amp, index=names, name="noise_amplification"),
        noise_correlation=ncorr, coverage=coverage,
        peak_channel=pd.Series([channels[p].name for p in peak], index=names, name="peak_channel"),
        warnings=warnings,
    )


def _table(df: pd.DataFrame, fmt: str) -> str:
    return df.to_string(float_format=lambda v: format(v, fmt))


def format_panel_check(check: PanelCheck) -> str:
    """Plain-text report of a :class:`PanelCheck` (for the CLI)."""
    ch = check.channels
    lo = min(c.band[0] for c in ch)
    hi = max(c.band[1] for c in ch)
    lines = []
    if check.note:
        lines.append(check.note)
    lines += [
        f"endmembers ({len(check.names)}): {', '.join(check.names)}",
        f"channels ({len(ch)}): {lo:g}–{hi:g} nm",
        f"condition number (column-normalised): {check.condition_number:.3g}",
        "",
        "per endmember:",
        _table(pd.DataFrame({"peak_channel": check.peak_channel,
                             "coverage_%": 100 * check.coverage,
                             "noise_amplification": check.noise_amplification}), ".2f"),
        "",
        "pairwise spectral angles (degrees):",
        _table(check.angles, ".1f"),
        "",
        "expected crosstalk without unmixing (% of a fluor's own peak-channel signal seen in the "
        "peak channel of each other fluor; rows: from, columns: into):",
        _table(100 * check.crosstalk, ".1f"),
        "",
        "correlation of unmixing noise between endmembers:",
        _table(check.noise_correlation, ".2f"),
        "",
    ]
    if check.warnings:
        lines.append(f"WARNINGS ({len(check.warnings)}):")
        lines += [f"  - {w}" for w in check.warnings]
    else:
        lines.append("no warnings: the library is well separated on these channels")
    return "\n".join(lines)


#: The λ-stack checked when no image is given: a grid 420–720 nm in 10 nm steps (31 bands, each 10 nm wide).
DEFAULT_GRID = (420.0, 720.0, 10.0)


def check_panel_for(panel, image=None) -> PanelCheck:
    """:func:`check_panel` for a panel's library (:func:`~qdplex.spectra.library_for_panel`).

    Parameters
    ----------
    panel : qdplex.panel.Panel
    image : MultiplexImage, optional
        Its channels are checked; without one, a default λ-stack grid
        (:data:`DEFAULT_GRID`) is used and the report says so.
    """
    from .spectra import lambda_grid, library_for_panel

    if image is None:
        channels = lambda_grid(*DEFAULT_GRID)
        where = (f"no image given: checked on a default λ-stack grid {DEFAULT_GRID[0]:g}–{DEFAULT_GRID[1]:g} nm "
                 f"in {DEFAULT_GRID[2]:g} nm steps ({len(channels)} bands); pass --image SLIDE for its channels")
    else:
        channels = image.channels
        where = f"channels of {image.source or image.name}"
    lib = library_for_panel(panel, channels)
    chk = check_panel(lib, channels)
    markers = ", ".join(f"{m.name}={m.fluor}" for m in panel.markers)
    chk.note = f"panel {panel.name!r} ({markers}; nuclear stain {panel.nuclear_stain})\n{where}"
    return chk
