"""Positivity thresholds and slide scores: % positive, H-score, Allred, HER2 0–3+, phenotypes.

Everything here works on a cell table (:func:`qdplex.tables.cell_table`: one row
per cell, a column per marker holding its mean in the marker's own compartment).

Thresholds (per marker, :func:`marker_threshold`)
    * a number (``Marker.threshold`` in the panel, or ``thresholds={marker: value}``)
      in the same units as the table (unmixed abundance);
    * ``"mixture"`` (the default): a mixture of 1–4 Gaussians on the log intensities
      of the cells with signal, the number chosen by BIC; the threshold is the deepest
      valley of the fitted density — between the negatives and the first population
      above them, so that a marker expressed in several populations (tumour and
      stroma, at different levels) keeps all of them positive (Otsu's threshold when
      the density has one mode);
    * ``"otsu"``: Otsu's threshold (``skimage.filters.threshold_otsu``) of the log
      intensities;
    * ``"gmm"``: a two-component Gaussian mixture (scikit-learn) on the log
      intensities; the threshold is where the posterior of the brighter component
      reaches 0.5 between the two means;
    * ``"control"``: learnt from a negative-control slide (unstained, isotype or
      known-negative tissue): the ``control_quantile`` (default 0.99) of that
      slide's cell values of the marker, i.e. at most 1 % of negative cells pass.

  Log intensities are ``log(x + c)`` with ``c`` 1 % of the 99th percentile of the
  positive values (NNLS abundances are often exactly 0). The default method is
  ``panel.scoring["method"]`` or ``"mixture"``; every threshold and how it was set are
  in the summary (``thresholds``, ``threshold_methods``); the panel's ``[scoring]`` table may
  also give ``control_quantile``, ``cutoffs = {MARKER = [c1, c2, c3]}``,
  ``allred = [...]``, ``her2 = "HER2"``, ``complete = 0.9``, ``phenotype = [...]``.

A cell is ``<marker>_positive`` when its value is ≥ the threshold.

Intensity grades and H-score
    Each cell gets grade 0, 1+, 2+ or 3+ from cut-offs ``c1 ≤ c2 ≤ c3``: by default
    ``c1`` = the positivity threshold, ``c2 = 2·c1`` and ``c3 = 4·c1`` (one grade per
    doubling of signal above threshold; QD signal is linear in antigen, unlike DAB).
    H-score = 1·(% 1+) + 2·(% 2+) + 3·(% 3+), from 0 to 300, over all cells.

Allred score (markers named ER/PR, ESR1/PGR, or listed in ``scoring.allred``)
    Proportion score PS from % positive: 0 (none), 1 (< 1 %), 2 (1–10 %),
    3 (10–33 %), 4 (33–66 %), 5 (> 66 %). Intensity score IS from the mean value of
    the positive cells graded with the same cut-offs: 1 weak, 2 intermediate,
    3 strong (0 when no cell is positive). Allred = PS + IS (0 or 2–8);
    positive when ≥ 3.

HER2 0/1+/2+/3+ (after the ASCO/CAP 2018 IHC criteria, on membrane signal)
    Per cell: intensity grade of the HER2 membrane mean (as above) and membrane
    completeness, the fraction of the membrane ring brighter than the positivity
    threshold. When the table has a ``<marker>_membrane_completeness`` column (from
    ``score_table(..., completeness=...)`` or :func:`qdplex.quantify.fraction_above`)
    that measured fraction is used; otherwise it is estimated from each cell's
    membrane mean μ and standard deviation σ as ``1 − Φ((t − μ)/σ)`` (normal
    approximation of the ring's pixel values). A membrane is *complete* when the
    fraction is ≥ 0.9 (``scoring.complete``).
    Slide score: 3+ when > 10 % of cells are 3+ and complete; else 2+ when > 10 %
    of cells are ≥ 1+ and complete (weak-to-moderate complete staining); else 1+
    when > 10 % of cells are ≥ 1+ (faint, incomplete); else 0.

Total HER2 load (as in the QD-IHC HER2 studies)
    Sum of the HER2 signal over all cells (``HER2_cell_sum``, else mean × area)
    divided by the segmented tissue (cell) area in µm² when the pixel size is known
    (``X_centroid_um`` present), else in px².

Phenotypes
    Counts of each combination of positivity of the phenotype markers
    (``scoring.phenotype``; default ER, PR, HER2 when present, else all markers,
    at most 6), named like ``ER+/PR+/HER2-``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import product
from typing import Any

import numpy as np
import pandas as pd

from ._threads import one_thread
from .errors import InputError, PanelError
from .panel import SCORING_METHODS, ScoringSettings

__all__ = [
    "marker_threshold",
    "thresholds_for",
    "add_positivity",
    "intensity_grades",
    "h_score",
    "allred",
    "her2_score",
    "her2_load",
    "phenotypes",
    "score_slide",
    "score_table",
    "cohort_summary",
    "METHODS",
]

METHODS = SCORING_METHODS
#: the threshold method when neither the marker nor ``[scoring] method`` names one
#: (written once, in :class:`qdplex.panel.ScoringSettings`)
DEFAULT_METHOD = ScoringSettings.method
_ALLRED_NAMES = {"ER", "PR", "ESR1", "PGR", "ERα", "ERA", "PGR1"}


# --------------------------------------------------------------------------- thresholds
def _log(values: np.ndarray) -> tuple[np.ndarray, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    pos = v[v > 0]
    c = 0.01 * float(np.percentile(pos, 99)) if pos.size else 1.0
    c = c if c > 0 else 1.0
    return np.log(np.clip(v, 0, None) + c), c


def marker_threshold(values, method="otsu", *, control=None, control_quantile: float = 0.99) -> float:
    """Positivity threshold of one marker.

    Parameters
    ----------
    values : array-like
        Per-cell values (the marker column of a cell table).
    method : float or {"mixture", "otsu", "gmm", "control"}
        A fixed threshold, or how to learn it (see the module docstring).
    control : array-like, optional
        Per-cell values of the same marker on a negative-control slide (``"control"``).
    control_quantile : float
        Quantile of the control values used as threshold.

    Returns
    -------
    float
    """
    if isinstance(method, (int, float, np.integer, np.floating)) and not isinstance(method, bool):
        if not np.isfinite(method) or method < 0:
            raise InputError(f"expected a finite threshold ≥ 0, found {method}")
        return float(method)
    if method == "control":
        if control is None:
            raise InputError("expected negative-control cell values for threshold 'control', found none")
        c = np.asarray(control, dtype=np.float64)
        c = c[np.isfinite(c)]
        if c.size == 0:
            raise InputError("expected negative-control cells with finite values, found none")
        if not 0 < control_quantile < 1:
            raise InputError(f"expected control_quantile in (0, 1), found {control_quantile}")
        return float(np.quantile(c, control_quantile))
    if method not in ("otsu", "gmm", "mixture"):
        raise InputError(f"expected a threshold number or one of {METHODS}, found {method!r}")
    logv, c = _log(values)
    if logv.size < 2 or np.ptp(logv) == 0:
        # nothing to separate (no cells, or one value everywhere, e.g. an absent stain):
        # a threshold just above the largest value, so that no cell is called positive
        top = float(np.exp(logv.max()) - c) if logv.size else 0.0
        return float(np.nextafter(max(top, 0.0), np.inf))
    if method == "mixture":
        t = _mixture_threshold(logv, c)
    elif method == "otsu":
        t = _otsu(logv)
    else:
        t = _gmm_threshold(logv)
    return float(max(np.exp(t) - c, 0.0))


def _otsu(x: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(x))


#: most Gaussian components the "mixture" threshold tries
MAX_MIXTURE = 4


def _mixture_threshold(x: np.ndarray, c: float) -> float:
    """Threshold (log scale) above the negative population of a mixture of 1–4 Gaussians.

    Cells with no signal (value 0: log c) are negative and left out of the fit; the
    number of components is chosen by BIC (a skewed negative population may take two);
    the threshold is the deepest valley of the fitted density (with at least 2 % of the
    cells on either side) — between the negatives and the first population above them
    when a marker is expressed in several (tumour and stroma, at different levels),
    where a two-class rule (Otsu, a two-Gaussian mixture) may split between the two
    positive populations. Without a valley (one mode) Otsu's threshold is used.
    """
    from sklearn.mixture import GaussianMixture

    v = x[x > np.log(c) + 1e-9]
    if v.size < 20 or np.ptp(v) == 0:
        return _otsu(x)
    if v.size > 20000:
        v = np.random.default_rng(0).choice(v, 20000, replace=False)
    with one_thread():
        fits = [GaussianMixture(k, random_state=0, n_init=2).fit(v[:, None]) for k in range(1, MAX_MIXTURE + 1)
                if v.size >= 10 * k]
        best = min(fits, key=lambda g: g.bic(v[:, None]))
    if best.n_components == 1:
        return _otsu(x)
    grid = np.linspace(v.min(), v.max(), 1024)
    pdf = np.exp(best.score_samples(grid[:, None]))
    cdf = np.cumsum(pdf) / pdf.sum()
    inner = np.flatnonzero((pdf[1:-1] < pdf[:-2]) & (pdf[1:-1] <= pdf[2:])) + 1
    inner = inner[(cdf[inner] >= 0.02) & (cdf[inner] <= 0.98)]
    if not inner.size:  # one mode: nothing the mixture can separate
        return _otsu(x)
    return float(grid[inner[np.argmin(pdf[inner])]])


def _gmm_threshold(x: np.ndarray) -> float:
    from sklearn.mixture import GaussianMixture

    with one_thread():
        gm = GaussianMixture(2, random_state=0, n_init=2).fit(x[:, None])
    means = gm.means_.ravel()
    lo, hi = np.argsort(means)
    grid = np.linspace(means[lo], means[hi], 512)
    post = gm.predict_proba(grid[:, None])[:, hi]
    above = np.flatnonzero(post >= 0.5)
    return float(grid[above[0]]) if above.size else float(grid.mean())


def _scoring(panel) -> dict:
    return dict(getattr(panel, "scoring", {}) or {})


def _values(table: pd.DataFrame, name: str) -> np.ndarray:
    if name not in table.columns:
        raise InputError(f"expected a column {name!r} in the cell table, found {list(table.columns)[:10]}…")
    return table[name].to_numpy(dtype=np.float64)


def thresholds_for(table: pd.DataFrame, panel, *, thresholds: Mapping | None = None, control: pd.DataFrame | None = None) -> tuple[dict, dict]:
    """Threshold of every marker of ``panel``.

    Priority: ``thresholds[marker]`` (a number or a method), then
    ``Marker.threshold``, then ``panel.scoring["method"]`` (default ``"mixture"``).

    Returns
    -------
    thresholds : dict
        marker → float.
    methods : dict
        marker → how it was set (``"fixed"``, ``"mixture"``, ``"otsu"``, ``"gmm"``, ``"control"``).
    """
    sc = _scoring(panel)
    default = sc.get("method", DEFAULT_METHOD)
    q = float(sc.get("control_quantile", 0.99))
    if default not in METHODS:
        raise PanelError(f"key 'scoring.method': expected one of {METHODS}, found {default!r}", path=getattr(panel, "path", None))
    given = dict(thresholds or {})
    out, how = {}, {}
    for m in panel.markers:
        method = given.get(m.name, m.threshold if m.threshold is not None else default)
        ctrl = None
        if method == "control":
            if control is None:
                raise InputError(
                    f"expected a negative-control cell table for marker {m.name} (threshold 'control'), found none"
                )
            ctrl = _values(control, m.name)
        out[m.name] = marker_threshold(_values(table, m.name), method, control=ctrl, control_quantile=q)
        how[m.name] = "fixed" if not isinstance(method, str) else method
    return out, how


def add_positivity(table: pd.DataFrame, thresholds: Mapping[str, float]) -> pd.DataFrame:
    """A copy of ``table`` with a boolean ``<marker>_positive`` column per threshold (value ≥ threshold)."""
    out = table.copy()
    for name, t in thresholds.items():
        out[f"{name}_positive"] = _values(table, name) >= t
    return out


# --------------------------------------------------------------------------- grades and scores
def _cutoffs(panel, marker: str, threshold: float) -> list[float]:
    cuts = (_scoring(panel).get("cutoffs") or {}).get(marker)
    if cuts is None:
        return [threshold, 2.0 * threshold, 4.0 * threshold]
    if len(cuts) != 3 or not all(isinstance(c, (int, float)) for c in cuts) or list(cuts) != sorted(cuts):
        raise PanelError(
            f"key 'scoring.cutoffs.{marker}': expected three increasing numbers [1+, 2+, 3+], found {cuts!r}",
            path=getattr(panel, "path", None),
        )
    return [float(c) for c in cuts]


def intensity_grades(values, cutoffs) -> np.ndarray:
    """Grade 0–3 of each value: the number of cut-offs (1+, 2+, 3+) it reaches."""
    v = np.asarray(values, dtype=np.float64)
    return (v[:, None] >= np.asarray(cutoffs, dtype=np.float64)[None, :]).sum(axis=1) if v.size else np.zeros(0, int)


def h_score(grades) -> float:
    """H-score 0–300: 1·%1+ + 2·%2+ + 3·%3+ over all cells."""
    g = np.asarray(grades)
    if g.size == 0:
        return float("nan")
    return float(sum(k * 100.0 * np.mean(g == k) for k in (1, 2, 3)))


def allred(percent_positive: float, intensity_score: int) -> dict:
    """Allred score from the % of positive cells and their intensity score (0–3)."""
    p = float(percent_positive)
    if p <= 0:
        ps = 0
    elif p < 1:
        ps = 1
    elif p <= 10:
        ps = 2
    elif p <= 100 / 3:
        ps = 3
    elif p <= 200 / 3:
        ps = 4
    else:
        ps = 5
    is_ = int(intensity_score) if ps > 0 else 0
    total = ps + is_
    return {"proportion_score": ps, "intensity_score": is_, "total": total, "positive": bool(total >= 3)}


def _norm_sf(z):
    from scipy.special import ndtr

    return 1.0 - ndtr(z)


def her2_score(table: pd.DataFrame, marker: str, threshold: float, cutoffs, *, complete: float = 0.9) -> dict:
    """HER2 0/1+/2+/3+ from membrane intensity and completeness (rules in the module docstring)."""
    mean = _values(table, f"{marker}_membrane_mean") if f"{marker}_membrane_mean" in table.columns else _values(table, marker)
    std_col = f"{marker}_membrane_std"
    measured = f"{marker}_membrane_completeness"
    if measured in table.columns:
        compl = table[measured].to_numpy(dtype=np.float64)
        compl = np.where(np.isfinite(compl), compl, 0.0)
        basis = "measured: fraction of membrane pixels at or above the threshold"
    elif std_col in table.columns:
        sd = table[std_col].to_numpy(dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (threshold - mean) / sd
        compl = np.where(sd > 0, _norm_sf(z), (mean >= threshold).astype(float))
        basis = "normal approximation from membrane mean and std"
    else:
        compl = (mean >= threshold).astype(float)
        basis = "membrane mean only (no membrane std column)"
    compl = np.where(np.isfinite(mean), compl, 0.0)
    grades = intensity_grades(np.nan_to_num(mean, nan=-np.inf), cutoffs)
    is_complete = compl >= complete
    n = max(len(mean), 1)
    f3 = 100.0 * np.sum((grades >= 3) & is_complete) / n
    f2 = 100.0 * np.sum((grades >= 1) & is_complete) / n
    f1 = 100.0 * np.sum(grades >= 1) / n
    score = 3 if f3 > 10 else 2 if f2 > 10 else 1 if f1 > 10 else 0
    return {
        "marker": marker,
        "score": f"{score}+" if score else "0",
        "score_value": score,
        "percent_strong_complete": f3,
        "percent_complete": f2,
        "percent_stained": f1,
        "mean_completeness": float(np.mean(compl)) if len(compl) else float("nan"),
        "completeness_basis": basis,
        "complete_at": complete,
    }


def her2_load(table: pd.DataFrame, marker: str) -> dict:
    """Total HER2 signal per tissue area (cells' summed signal / cells' area)."""
    if f"{marker}_cell_sum" in table.columns:
        total = float(np.nansum(_values(table, f"{marker}_cell_sum")))
    else:
        total = float(np.nansum(_values(table, marker) * _values(table, "Area")))
    area_px = float(np.nansum(_values(table, "Area")))
    unit = "px²"
    area = area_px
    if {"X_centroid", "X_centroid_um"} <= set(table.columns) and len(table):
        xs = table["X_centroid"].to_numpy(dtype=float)
        xu = table["X_centroid_um"].to_numpy(dtype=float)
        ok = np.isfinite(xu) & (xs > 0)
        if ok.any():
            px = float(np.median(xu[ok] / xs[ok]))
            area = area_px * px * px
            unit = "µm²"
    return {"load": total / area if area > 0 else float("nan"), "total_signal": total, "area": area, "area_unit": unit}


def phenotypes(table: pd.DataFrame, markers) -> dict:
    """Cell counts of every positivity combination of ``markers`` (e.g. ``ER+/PR+/HER2-``)."""
    markers = list(markers)
    pos = np.stack([table[f"{m}_positive"].to_numpy(dtype=bool) for m in markers], axis=1) if markers else np.zeros((len(table), 0), bool)
    out = {}
    for combo in product((True, False), repeat=len(markers)):
        name = "/".join(f"{m}{'+' if c else '-'}" for m, c in zip(markers, combo))
        out[name] = int(np.sum(np.all(pos == np.array(combo, bool)[None, :], axis=1))) if markers else 0
    return out


def _phenotype_markers(panel) -> list[str]:
    sc = _scoring(panel)
    names = panel.marker_names
    if "phenotype" in sc:
        bad = [m for m in sc["phenotype"] if m not in names]
        if bad:
            raise PanelError(f"key 'scoring.phenotype': expected markers from {names}, found {bad}", path=getattr(panel, "path", None))
        return list(sc["phenotype"])
    core = [m for m in ("ER", "PR", "HER2") if m in names]
    return core if core else names[:6]


def _her2_marker(panel) -> str | None:
    sc = _scoring(panel)
    if "her2" in sc:
        return sc["her2"] if sc["her2"] in panel.marker_names else None
    for m in panel.markers:
        if m.name.upper() in ("HER2", "ERBB2", "HER-2", "HER2/NEU"):
            return m.name
    return None


def score_slide(table: pd.DataFrame, panel, *, thresholds: Mapping[str, float] | None = None,
                control: pd.DataFrame | None = None) -> dict:
    """Slide scores as a JSON-able dict (``summary.json``).

    Parameters
    ----------
    table : pandas.DataFrame
        A cell table (with or without ``<marker>_positive`` columns).
    panel : Panel
    thresholds : mapping, optional
        marker → number or method; missing markers use the panel (module docstring).
    control : pandas.DataFrame, optional
        A negative-control slide's cell table (for ``"control"`` thresholds).

    Returns
    -------
    dict
        ``n_cells``, ``thresholds``, ``threshold_methods``, ``markers`` (per marker:
        compartment, threshold, cut-offs, percent positive, H-score, percent per
        grade, mean value, mean of positive cells), ``allred`` (ER/PR), ``her2``
        (score, completeness figures, load) and ``phenotypes`` (counts).
    """
    thr, how = thresholds_for(table, panel, thresholds=thresholds, control=control)
    return _summary(table, panel, thr, how)


def _summary(table: pd.DataFrame, panel, thr: dict, how: dict) -> dict:
    """:func:`score_slide` once the thresholds (and how each was set) are known."""
    t = add_positivity(table, thr)
    n = len(t)
    sc = _scoring(panel)
    markers: dict[str, Any] = {}
    allred_out: dict[str, Any] = {}
    allred_names = set(sc.get("allred", [])) or {m.name for m in panel.markers if m.name.upper() in _ALLRED_NAMES}
    for m in panel.markers:
        v = _values(t, m.name)
        cuts = _cutoffs(panel, m.name, thr[m.name])
        g = intensity_grades(np.nan_to_num(v, nan=-np.inf), cuts)
        pos = t[f"{m.name}_positive"].to_numpy(bool)
        pct = 100.0 * pos.mean() if n else float("nan")
        mean_pos = float(np.nanmean(v[pos])) if pos.any() else float("nan")
        markers[m.name] = {
            "compartment": m.compartment,
            "threshold": thr[m.name],
            "threshold_method": how[m.name],
            "cutoffs": cuts,
            "n_positive": int(pos.sum()),
            "percent_positive": pct,
            "h_score": h_score(g),
            "percent_grade": {f"{k}+": (100.0 * float(np.mean(g == k)) if n else float("nan")) for k in (1, 2, 3)},
            "mean": float(np.nanmean(v)) if n else float("nan"),
            "mean_positive": mean_pos,
        }
        if m.name in allred_names:
            is_ = int(intensity_grades([mean_pos], cuts)[0]) if pos.any() else 0
            allred_out[m.name] = allred(pct if n else 0.0, max(is_, 1) if pos.any() else 0)
    summary: dict[str, Any] = {
        "n_cells": int(n),
        "thresholds": thr,
        "threshold_methods": how,
        "markers": markers,
        "allred": allred_out,
    }
    her2 = _her2_marker(panel)
    if her2 is not None:
        cuts = markers[her2]["cutoffs"]
        h = her2_score(t, her2, thr[her2], cuts, complete=float(sc.get("complete", 0.9)))
        h.update({f"load_{k}" if k != "load" else "load": v for k, v in her2_load(t, her2).items()})
        summary["her2"] = h
    ph = _phenotype_markers(panel)
    summary["phenotype_markers"] = ph
    summary["phenotypes"] = phenotypes(t, ph)
    return _jsonable(summary)


def score_table(table: pd.DataFrame, panel, *, thresholds: Mapping | None = None,
                control: pd.DataFrame | None = None, completeness=None) -> tuple[pd.DataFrame, dict, dict]:
    """Thresholds, ``<marker>_positive`` columns and the slide summary in one call.

    Parameters
    ----------
    table, panel, thresholds, control
        As :func:`score_slide`.
    completeness : callable, optional
        ``completeness(marker, threshold) -> per-cell fractions`` (aligned with the
        table's rows), e.g. ``lambda m, t: fraction_above(abundances.plane(m),
        seg.membrane, t, ids=table["CellID"])``. Called for the HER2 marker once its
        threshold is known; the result becomes ``<marker>_membrane_completeness`` and
        the HER2 score uses it instead of the normal approximation.

    Returns
    -------
    tuple
        ``(table with <marker>_positive columns, thresholds, summary)``.
    """
    her2 = _her2_marker(panel)
    # learnt once: the completeness column does not enter any threshold
    thr, how = thresholds_for(table, panel, thresholds=thresholds, control=control)
    if completeness is not None and her2 is not None:
        frac = np.asarray(completeness(her2, thr[her2]), dtype=np.float64)
        if frac.shape != (len(table),):
            raise InputError(f"expected {len(table)} completeness values for {her2}, found shape {frac.shape}")
        table = table.assign(**{f"{her2}_membrane_completeness": frac})
    summary = _summary(table, panel, thr, how)
    thr = summary["thresholds"]
    return add_positivity(table, thr), thr, summary


def _jsonable(o):
    if isinstance(o, Mapping):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.bool_, bool)):
        return bool(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        f = float(o)
        return f if math.isfinite(f) else None
    return o


# --------------------------------------------------------------------------- cohort
def cohort_summary(summaries, panel=None) -> pd.DataFrame:
    """One row per slide from slide summaries (``OUT/cohort_summary.csv``).

    Parameters
    ----------
    summaries : mapping slide → summary dict, or sequence of summaries with a ``slide`` key
    panel : Panel, optional
        Orders the marker columns as the panel does.

    Returns
    -------
    pandas.DataFrame
        Columns ``slide, n_cells``, then per marker ``<m>_threshold, <m>_percent_positive,
        <m>_h_score, <m>_mean``, ``<m>_allred`` (ER/PR), ``HER2_score`` (0, 1+, 2+, 3+),
        ``HER2_score_value`` (0–3), ``HER2_load``, then ``phenotype:<name>`` counts.
    """
    if isinstance(summaries, Mapping):
        items = list(summaries.items())
    else:
        items = []
        for i, s in enumerate(summaries):
            items.append((s.get("slide", f"slide{i + 1}"), s))
    rows = []
    for slide, s in items:
        row: dict[str, Any] = {"slide": slide, "n_cells": s.get("n_cells")}
        mk = s.get("markers", {})
        order = panel.marker_names if panel is not None else list(mk)
        for m in order:
            d = mk.get(m, {})
            row[f"{m}_threshold"] = d.get("threshold")
            row[f"{m}_percent_positive"] = d.get("percent_positive")
            row[f"{m}_h_score"] = d.get("h_score")
            row[f"{m}_mean"] = d.get("mean")
            if m in s.get("allred", {}):
                row[f"{m}_allred"] = s["allred"][m].get("total")
        h = s.get("her2")
        if h:
            name = h.get("marker", "HER2")
            row[f"{name}_score"] = h.get("score")
            row[f"{name}_score_value"] = h.get("score_value")
            row[f"{name}_load"] = h.get("load")
            row[f"{name}_percent_complete"] = h.get("percent_complete")
        for ph, cnt in (s.get("phenotypes") or {}).items():
            row[f"phenotype:{ph}"] = cnt
        rows.append(row)
    return pd.DataFrame(rows)
