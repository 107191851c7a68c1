"""Thresholds, positivity and slide scores on tables with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qdplex.errors import InputError, PanelError
from qdplex.panel import Marker, Panel
from qdplex.score import (
    allred,
    cohort_summary,
    h_score,
    her2_score,
    intensity_grades,
    marker_threshold,
    phenotypes,
    score_slide,
    score_table,
)


def _bimodal(n_neg, n_pos, seed=0, neg=(1.0, 0.35), pos=(12.0, 0.3)):
    rng = np.random.default_rng(seed)
    v = np.concatenate([rng.lognormal(np.log(neg[0]), neg[1], n_neg), rng.lognormal(np.log(pos[0]), pos[1], n_pos)])
    truth = np.r_[np.zeros(n_neg, bool), np.ones(n_pos, bool)]
    return v, truth


@pytest.mark.parametrize("method", ["otsu", "gmm"])
def test_automatic_thresholds_separate_populations(method):
    v, truth = _bimodal(3000, 1000)
    t = marker_threshold(v, method)
    acc = np.mean((v >= t) == truth)
    assert acc >= 0.99, (method, t, acc)
    assert 1.0 < t < 12.0


def test_control_threshold_is_the_control_quantile():
    rng = np.random.default_rng(1)
    ctrl = rng.lognormal(0, 0.4, 5000)
    t = marker_threshold(np.ones(10), "control", control=ctrl, control_quantile=0.99)
    assert t == pytest.approx(np.quantile(ctrl, 0.99))
    neg = rng.lognormal(0, 0.4, 20000)  # another negative slide: ~1 % false positives
    assert np.mean(neg >= t) == pytest.approx(0.01, abs=0.004)
    with pytest.raises(InputError, match="negative-control"):
        marker_threshold(np.ones(3), "control")
    with pytest.raises(InputError, match="otsu"):
        marker_threshold(np.ones(3), "mean")


def test_grades_h_score_allred():
    cuts = [1.0, 2.0, 4.0]
    v = np.array([0.5, 1.0, 1.5, 2.0, 3.9, 4.0, 10.0, 0.0])
    g = intensity_grades(v, cuts)
    np.testing.assert_array_equal(g, [0, 1, 1, 2, 2, 3, 3, 0])
    assert h_score(g) == pytest.approx(100 * (2 * 1 + 2 * 2 + 2 * 3) / 8)
    assert h_score(np.full(10, 3)) == 300 and h_score(np.zeros(10)) == 0
    assert allred(0, 0) == {"proportion_score": 0, "intensity_score": 0, "total": 0, "positive": False}
    assert allred(0.5, 1)["total"] == 2
    assert allred(5, 2)["proportion_score"] == 2
    assert allred(20, 3)["total"] == 6
    assert allred(50, 2)["proportion_score"] == 4
    assert allred(80, 3) == {"proportion_score": 5, "intensity_score": 3, "total": 8, "positive": True}


def _her2_table(n, frac_strong_complete, frac_weak_complete, frac_faint_incomplete, t=1.0, seed=0):
    """Cells with membrane mean/std chosen to land in each HER2 class."""
    rng = np.random.default_rng(seed)
    k3 = int(n * frac_strong_complete)
    k2 = int(n * frac_weak_complete)
    k1 = int(n * frac_faint_incomplete)
    k0 = n - k3 - k2 - k1
    mean = np.r_[rng.uniform(5, 8, k3), rng.uniform(1.5, 3, k2), rng.uniform(1.05, 1.5, k1), rng.uniform(0, 0.5, k0)]
    std = np.r_[np.full(k3, 0.5), np.full(k2, 0.2), np.full(k1, 2.0), np.full(k0, 0.2)] * t
    return pd.DataFrame({"HER2": mean, "HER2_membrane_mean": mean, "HER2_membrane_std": std})


@pytest.mark.parametrize(
    "fractions, expected",
    [((0.3, 0.1, 0.1), "3+"), ((0.05, 0.3, 0.1), "2+"), ((0.02, 0.05, 0.3), "1+"), ((0.02, 0.02, 0.03), "0")],
)
def test_her2_rules(fractions, expected):
    t = _her2_table(1000, *fractions)
    h = her2_score(t, "HER2", 1.0, [1.0, 2.0, 4.0])
    assert h["score"] == expected, h


PANEL = Panel(
    "breast",
    [Marker("HER2", "QD655", "membrane"), Marker("ER", "QD605", "nucleus", 2.0), Marker("PR", "QD565", "nucleus", "gmm")],
)


def _slide_table(seed=0, n=2000, her2_pos=0.3, er_pos=0.6, pr_pos=0.4):
    rng = np.random.default_rng(seed)
    er = np.where(rng.random(n) < er_pos, rng.lognormal(np.log(8), 0.3, n), rng.lognormal(0, 0.3, n))
    pr = np.where(rng.random(n) < pr_pos, rng.lognormal(np.log(10), 0.3, n), rng.lognormal(0, 0.3, n))
    hp = rng.random(n) < her2_pos
    her2 = np.where(hp, rng.lognormal(np.log(20), 0.2, n), rng.lognormal(np.log(0.5), 0.3, n))
    area = rng.integers(80, 120, n).astype(float)
    return pd.DataFrame({
        "CellID": np.arange(1, n + 1) * 2, "HER2": her2, "ER": er, "PR": pr,
        "HER2_membrane_mean": her2, "HER2_membrane_std": her2 * 0.1, "HER2_cell_sum": her2 * area * 0.5,
        "X_centroid": rng.uniform(1, 500, n), "Y_centroid": rng.uniform(1, 500, n), "Area": area,
    }).assign(X_centroid_um=lambda d: d["X_centroid"] * 0.5), (hp, er, pr)


def test_score_slide_summary():
    table, (hp, er, pr) = _slide_table()
    s = score_slide(table, PANEL)
    json.dumps(s, allow_nan=False)  # JSON-able, no NaN
    assert s["n_cells"] == len(table)
    assert s["threshold_methods"] == {"HER2": "mixture", "ER": "fixed", "PR": "gmm"}  # mixture: the default
    assert s["thresholds"]["ER"] == 2.0
    assert s["markers"]["ER"]["percent_positive"] == pytest.approx(100 * np.mean(er >= 2.0))
    assert s["markers"]["HER2"]["percent_positive"] == pytest.approx(100 * hp.mean(), abs=0.5)
    assert set(s["allred"]) == {"ER", "PR"}
    assert s["allred"]["ER"]["proportion_score"] == 4  # ~60 % positive
    assert s["her2"]["score"] == "3+"  # 30 % strong, complete membranes
    # HER2 load: summed signal over tissue area in µm²
    assert s["her2"]["load_area_unit"] == "µm²"
    expected = table["HER2_cell_sum"].sum() / (table["Area"].sum() * 0.25)
    assert s["her2"]["load"] == pytest.approx(expected)
    # phenotypes: counts of every ER/PR/HER2 combination add up and match a crosstab
    ph = s["phenotypes"]
    assert s["phenotype_markers"] == ["ER", "PR", "HER2"] and sum(ph.values()) == len(table)
    t2, thr, _ = score_table(table, PANEL)
    want = int(np.sum(t2["ER_positive"] & ~t2["PR_positive"] & t2["HER2_positive"]))
    assert ph["ER+/PR-/HER2+"] == want
    assert {"HER2_positive", "ER_positive", "PR_positive"} <= set(t2.columns)
    assert thr == s["thresholds"]


def test_control_thresholds_from_negative_slide():
    table, _ = _slide_table(seed=2)
    ctrl, _ = _slide_table(seed=3, her2_pos=0, er_pos=0, pr_pos=0)
    panel = Panel("c", [Marker("ER", "QD605", "nucleus", "control"), Marker("PR", "QD565", "nucleus", "control")])
    s = score_slide(table, panel, control=ctrl)
    assert s["thresholds"]["ER"] == pytest.approx(np.quantile(ctrl["ER"], 0.99))
    assert s["markers"]["ER"]["percent_positive"] == pytest.approx(60, abs=3)
    with pytest.raises(InputError, match="negative-control"):
        score_slide(table, panel)


def test_phenotypes_and_cutoff_errors():
    t = pd.DataFrame({"A_positive": [True, True, False, False], "B_positive": [True, False, False, False]})
    assert phenotypes(t, ["A", "B"]) == {"A+/B+": 1, "A+/B-": 1, "A-/B+": 0, "A-/B-": 2}
    bad = Panel("b", [Marker("ER", "QD605", "nucleus", 1.0)], scoring={"cutoffs": {"ER": [3, 2, 1]}})
    with pytest.raises(PanelError, match="scoring.cutoffs.ER"):
        score_slide(pd.DataFrame({"ER": [1.0, 2.0]}), bad)


def test_cohort_summary_rows():
    a, _ = _slide_table(seed=4, her2_pos=0.3)
    b, _ = _slide_table(seed=5, her2_pos=0.0)
    df = cohort_summary({"s1": score_slide(a, PANEL), "s2": score_slide(b, PANEL, thresholds={"HER2": 5.0})}, PANEL)
    assert list(df["slide"]) == ["s1", "s2"]
    assert list(df.columns[:3]) == ["slide", "n_cells", "HER2_threshold"]
    assert df.loc[0, "HER2_score"] == "3+" and df.loc[1, "HER2_score"] == "0"
    assert df.loc[1, "HER2_percent_positive"] == 0
    assert {"ER_allred", "PR_allred", "HER2_load", "phenotype:ER+/PR+/HER2+"} <= set(df.columns)


@pytest.fixture(scope="module")
def synthetic_table():
    from qdplex.model import Segmentation
    from qdplex.panel import read_panel
    from qdplex.quantify import quantify
    from qdplex.synth import make_slide
    from qdplex.tables import cell_table

    panel = read_panel(Path(__file__).resolve().parents[1] / "pipelines" / "breast-5plex.toml")
    slide = make_slide(panel, shape=(512, 512), seed=1)
    seg = Segmentation(slide.nuclei, slide.cells, membrane_width_px=2)
    table = cell_table(quantify(slide.abundances, seg, panel), panel)
    truth = slide.truth.set_index("CellID").loc[table["CellID"]]
    return panel, table, truth, slide, seg


@pytest.mark.parametrize("method, min_kappa", [("otsu", 0.85), ("gmm", 0.95)])
def test_positivity_matches_synthetic_truth(synthetic_table, method, min_kappa):
    """On true abundances and labels, learnt thresholds recover the true positive cells."""
    from qdplex.agree import cohen_kappa

    panel, table, truth, *_ = synthetic_table
    scored, _, summary = score_table(table, panel, thresholds={m: method for m in panel.marker_names})
    for m in panel.marker_names:
        k = cohen_kappa(scored[f"{m}_positive"].to_numpy(), truth[f"{m}_positive"].to_numpy())["kappa"]
        print(f"{method} {m}: kappa {k:.3f}")
        assert k >= min_kappa, (m, k)
        assert summary["markers"][m]["percent_positive"] == pytest.approx(100 * truth[f"{m}_positive"].mean(), abs=1.5)


def test_measured_membrane_completeness(synthetic_table):
    from qdplex.quantify import fraction_above

    panel, table, truth, slide, seg = synthetic_table
    plane = slide.abundances.plane("QD655").compute()  # HER2's fluor
    calls = []

    def completeness(marker, t):
        calls.append((marker, t))
        return fraction_above(plane, seg.membrane, t, ids=table["CellID"])

    scored, thr, s = score_table(table, panel, completeness=completeness)
    assert calls == [("HER2", thr["HER2"])]
    frac = scored["HER2_membrane_completeness"].to_numpy()
    assert np.all((frac >= 0) & (frac <= 1))
    assert s["her2"]["completeness_basis"].startswith("measured")
    # positive cells have mostly complete membranes, negative cells almost none
    pos = truth["HER2_positive"].to_numpy()
    assert frac[pos].mean() > 0.8 and frac[~pos].mean() < 0.1


@pytest.mark.parametrize("method", ["otsu", "gmm"])
def test_no_signal_means_no_positive_cells(method):
    assert marker_threshold(np.zeros(100), method) > 0
    table = pd.DataFrame({"ER": np.zeros(50), "Area": np.full(50, 10.0)})
    s = score_slide(table, Panel("z", [Marker("ER", "QD605", "nucleus", method)]))
    assert s["markers"]["ER"]["percent_positive"] == 0 and s["allred"]["ER"]["total"] == 0
    empty = score_slide(table.iloc[:0], Panel("z", [Marker("ER", "QD605", "nucleus", method)]))
    assert empty["n_cells"] == 0 and empty["markers"]["ER"]["percent_positive"] is None
