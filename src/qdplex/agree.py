"""Agreement of qdplex slide scores with orthogonal measurements (IHC, FISH, Western blot).

The comparisons QD-IHC papers report: Pearson and Spearman correlation for
continuous measures (e.g. HER2 load against Western blot or the FISH ratio),
Cohen's κ for categories (weighted for ordinal scores such as HER2 0/1+/2+/3+ or
Allred), and Bland–Altman bias and 95 % limits of agreement for measures on one
scale (e.g. % ER-positive cells by QD against by IHC).

Layering: :func:`pearson`, :func:`spearman`, :func:`cohen_kappa`,
:func:`bland_altman` on arrays → :func:`compare` on two tables →
:func:`agree_files` on two CSV files → ``qdplex agree COHORT_SUMMARY REFERENCE.csv``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import InputError

__all__ = [
    "pearson",
    "spearman",
    "cohen_kappa",
    "bland_altman",
    "ordinal_values",
    "compare",
    "agree_files",
]

_GRADE = re.compile(r"^\s*([0-3])\s*\+?\s*$")


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise InputError(f"expected two 1-D series of one length, found shapes {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def pearson(x, y) -> dict:
    """Pearson r, its two-sided p-value and 95 % confidence interval (Fisher z), over finite pairs."""
    from scipy import stats

    x, y = _pair(x, y)
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"r": np.nan, "p": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n": n}
    res = stats.pearsonr(x, y)
    ci = res.confidence_interval(0.95) if n > 3 else type("ci", (), {"low": np.nan, "high": np.nan})()
    return {"r": float(res.statistic), "p": float(res.pvalue), "ci_low": float(ci.low), "ci_high": float(ci.high), "n": n}


def spearman(x, y) -> dict:
    """Spearman ρ and its two-sided p-value, over finite pairs."""
    from scipy import stats

    x, y = _pair(x, y)
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": np.nan, "p": np.nan, "n": n}
    res = stats.spearmanr(x, y)
    return {"rho": float(res.statistic), "p": float(res.pvalue), "n": n}


def cohen_kappa(a, b, *, weights: str | None = None, labels: Sequence | None = None) -> dict:
    """Cohen's κ between two raters' categories (``sklearn.metrics.cohen_kappa_score``).

    Parameters
    ----------
    a, b : array-like
        Categories (numbers or strings); pairs with a missing value are dropped.
    weights : {None, "linear", "quadratic"}
        Weighted κ for ordinal scores (categories must then be numbers or given in
        order by ``labels``).
    labels : sequence, optional
        All categories, in order.

    Returns
    -------
    dict
        ``kappa``, ``weights``, ``n``, ``observed_agreement`` (fraction of equal pairs).
    """
    from sklearn.metrics import cohen_kappa_score

    if weights not in (None, "linear", "quadratic"):
        raise InputError(f"expected weights None, 'linear' or 'quadratic', found {weights!r}")
    sa, sb = pd.Series(list(a)), pd.Series(list(b))
    if len(sa) != len(sb):
        raise InputError(f"expected two series of one length, found {len(sa)} and {len(sb)}")
    ok = sa.notna() & sb.notna()
    sa, sb = sa[ok].to_numpy(), sb[ok].to_numpy()
    n = len(sa)
    if n == 0:
        return {"kappa": np.nan, "weights": weights or "none", "n": 0, "observed_agreement": np.nan}
    if labels is None:
        labels = sorted(set(sa.tolist()) | set(sb.tolist()))
    if len(labels) < 2 or (len(set(sa.tolist())) == 1 and len(set(sb.tolist())) == 1 and sa[0] == sb[0]):
        kappa = 1.0 if np.all(sa == sb) else np.nan  # one category only: κ undefined, agreement perfect
    else:
        if weights is not None:  # weighted κ uses positions in `labels`, so map categories to ranks
            rank = {v: i for i, v in enumerate(labels)}
            sa = np.array([rank[v] for v in sa])
            sb = np.array([rank[v] for v in sb])
            labels = list(range(len(rank)))
        kappa = float(cohen_kappa_score(sa, sb, labels=labels, weights=weights))
    return {"kappa": kappa, "weights": weights or "none", "n": n, "observed_agreement": float(np.mean(sa == sb))}


def bland_altman(x, y) -> dict:
    """Bland–Altman: mean difference (x − y), SD of differences, 95 % limits (bias ± 1.96 SD)."""
    x, y = _pair(x, y)
    n = len(x)
    if n < 2:
        return {"bias": np.nan, "sd": np.nan, "loa_low": np.nan, "loa_high": np.nan, "n": n}
    d = x - y
    bias = float(d.mean())
    sd = float(d.std(ddof=1))
    return {"bias": bias, "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd, "n": n}


def ordinal_values(series) -> pd.Series | None:
    """Ordinal grades as numbers: ``"0", "1+", "2+", "3+"`` → 0–3, integers unchanged; None if not ordinal."""
    s = pd.Series(series)
    nn = s.dropna()
    if len(nn) == 0:
        return None
    if nn.map(lambda v: isinstance(v, str)).all():
        m = nn.str.match(_GRADE)
        if not m.all():
            return None
        return s.map(lambda v: float(_GRADE.match(v).group(1)) if isinstance(v, str) else np.nan)
    num = pd.to_numeric(s, errors="coerce")
    vals = num.dropna()
    if len(vals) == len(nn) and np.all(vals == np.round(vals)) and vals.min() >= 0 and vals.max() <= 10:
        return num
    return None


def _kind(ours: pd.Series, ref: pd.Series, name: str) -> str:
    if ordinal_values(ours) is not None and ordinal_values(ref) is not None:
        return "ordinal"
    o = pd.to_numeric(ours, errors="coerce")
    r = pd.to_numeric(ref, errors="coerce")
    if o.notna().sum() == ours.notna().sum() and r.notna().sum() == ref.notna().sum():
        return "continuous"
    return "categorical"


def compare(cohort: pd.DataFrame, reference: pd.DataFrame, *, on: str = "slide",
            pairs: Mapping[str, str] | None = None, weights: str = "linear") -> pd.DataFrame:
    """Agreement between cohort-summary columns and reference columns, one row per pair.

    Parameters
    ----------
    cohort : pandas.DataFrame
        ``cohort_summary.csv`` (one row per slide).
    reference : pandas.DataFrame
        The orthogonal measurements, one row per slide, with the ``on`` column.
    on : str
        Column that identifies a slide in both tables.
    pairs : mapping, optional
        cohort column → reference column. Default: every column present in both.
    weights : {"linear", "quadratic"}
        κ weights for ordinal pairs (categorical pairs use unweighted κ).

    Returns
    -------
    pandas.DataFrame
        Columns ``ours, reference, kind, n`` (matched slides with both values), then
        ``pearson_r, pearson_p, pearson_ci_low, pearson_ci_high, spearman_rho,
        spearman_p`` (continuous and ordinal), ``kappa, kappa_weights,
        observed_agreement`` (ordinal and categorical), ``ba_bias, ba_sd, ba_loa_low,
        ba_loa_high`` (continuous).
    """
    for name, df in (("cohort summary", cohort), ("reference", reference)):
        if on not in df.columns:
            raise InputError(f"expected a {on!r} column in the {name}, found columns {list(df.columns)}")
    if pairs is None:
        pairs = {c: c for c in cohort.columns if c != on and c in reference.columns}
    if not pairs:
        raise InputError(
            f"expected columns shared by the cohort summary and the reference (or explicit pairs), "
            f"found reference columns {[c for c in reference.columns if c != on]}"
        )
    for o, r in pairs.items():
        if o not in cohort.columns:
            raise InputError(f"expected column {o!r} in the cohort summary, found {list(cohort.columns)}")
        if r not in reference.columns:
            raise InputError(f"expected column {r!r} in the reference, found {list(reference.columns)}")
    left = cohort.assign(**{on: cohort[on].astype(str)})
    right = reference.assign(**{on: reference[on].astype(str)})
    dup = right[on][right[on].duplicated()].tolist()
    if dup:
        raise InputError(f"expected one reference row per {on}, found duplicates {dup[:5]}")
    merged = left.merge(right, on=on, how="inner", suffixes=("", "__ref"))
    if merged.empty:
        raise InputError(
            f"expected slides in common on {on!r}, found none (cohort {left[on].tolist()[:5]}…, "
            f"reference {right[on].tolist()[:5]}…)"
        )
    rows = []
    for o, r in pairs.items():
        rc = r + "__ref" if r in cohort.columns and r != on else r
        x, y = merged[o], merged[rc]
        both = x.notna() & y.notna()
        x, y = x[both], y[both]
        kind = _kind(x, y, o)
        row = {"ours": o, "reference": r, "kind": kind, "n": int(len(x))}
        if kind in ("continuous", "ordinal"):
            xn = ordinal_values(x) if kind == "ordinal" else pd.to_numeric(x)
            yn = ordinal_values(y) if kind == "ordinal" else pd.to_numeric(y)
            p = pearson(xn, yn)
            s = spearman(xn, yn)
            row.update({"pearson_r": p["r"], "pearson_p": p["p"], "pearson_ci_low": p["ci_low"],
                        "pearson_ci_high": p["ci_high"], "spearman_rho": s["rho"], "spearman_p": s["p"]})
        if kind == "ordinal":
            xn = ordinal_values(x)
            yn = ordinal_values(y)
            cats = sorted(set(xn.tolist()) | set(yn.tolist()))
            k = cohen_kappa(xn, yn, weights=weights, labels=cats)
            row.update({"kappa": k["kappa"], "kappa_weights": k["weights"], "observed_agreement": k["observed_agreement"]})
        elif kind == "categorical":
            k = cohen_kappa(x.astype(str), y.astype(str))
            row.update({"kappa": k["kappa"], "kappa_weights": k["weights"], "observed_agreement": k["observed_agreement"]})
        if kind == "continuous":
            b = bland_altman(pd.to_numeric(x), pd.to_numeric(y))
            row.update({"ba_bias": b["bias"], "ba_sd": b["sd"], "ba_loa_low": b["loa_low"], "ba_loa_high": b["loa_high"]})
        rows.append(row)
    cols = ["ours", "reference", "kind", "n", "pearson_r", "pearson_p", "pearson_ci_low", "pearson_ci_high",
            "spearman_rho", "spearman_p", "kappa", "kappa_weights", "observed_agreement",
            "ba_bias", "ba_sd", "ba_loa_low", "ba_loa_high"]
    return pd.DataFrame(rows).reindex(columns=cols)


def _read_table(path) -> pd.DataFrame:
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, sep=None, engine="python")
    except FileNotFoundError:
        raise InputError("expected a CSV table, found no such file", path=path) from None
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise InputError(f"expected a readable CSV table, found {type(e).__name__}: {e}", path=path) from None


def agree_files(cohort_summary, reference, *, on: str = "slide", pairs: Mapping[str, str] | None = None,
                weights: str = "linear", out=None) -> pd.DataFrame:
    """:func:`compare` on a ``cohort_summary.csv`` and a reference CSV; optionally write the result (atomically)."""
    res = compare(_read_table(cohort_summary), _read_table(reference), on=on, pairs=pairs, weights=weights)
    if out is not None:
        from .io import atomic_path

        with atomic_path(out) as tmp:
            res.to_csv(tmp, index=False)
    return res
