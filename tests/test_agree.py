"""Agreement statistics against hand-computed values, and the ``qdplex agree`` command."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qdplex.agree import bland_altman, cohen_kappa, compare, ordinal_values, pearson, spearman
from qdplex.cli import main
from qdplex.errors import InputError


def test_correlations_match_definitions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 0.8 * x + rng.normal(scale=0.5, size=50)
    p = pearson(x, y)
    assert p["r"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    z, se = np.arctanh(p["r"]), 1 / np.sqrt(50 - 3)
    assert p["ci_low"] == pytest.approx(np.tanh(z - 1.959964 * se), abs=1e-6)
    assert p["ci_high"] == pytest.approx(np.tanh(z + 1.959964 * se), abs=1e-6)
    rank = lambda a: np.argsort(np.argsort(a))  # noqa: E731 (no ties here)
    assert spearman(x, y)["rho"] == pytest.approx(np.corrcoef(rank(x), rank(y))[0, 1], rel=1e-12)
    assert spearman(x, np.exp(x))["rho"] == pytest.approx(1.0)
    # missing values are dropped pairwise
    x2 = np.r_[x, np.nan]
    y2 = np.r_[y, 1.0]
    assert pearson(x2, y2)["n"] == 50


def test_cohen_kappa_hand_computed():
    # 2×2 textbook example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no (n = 50)
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    po = 35 / 50
    pe = (25 / 50) * (30 / 50) + (25 / 50) * (20 / 50)
    k = cohen_kappa(a, b)
    assert k["kappa"] == pytest.approx((po - pe) / (1 - pe))
    assert k["observed_agreement"] == pytest.approx(0.7)
    # linear weighted κ on HER2 grades, by the definition 1 − Σw·O / Σw·E
    ours = np.array([0, 1, 2, 3, 3, 2, 1, 0, 2, 3])
    ref = np.array([0, 1, 3, 3, 2, 2, 0, 0, 1, 3])
    O = np.zeros((4, 4))
    for i, j in zip(ours, ref):
        O[i, j] += 1
    E = np.outer(O.sum(1), O.sum(0)) / O.sum()
    W = np.abs(np.subtract.outer(np.arange(4), np.arange(4))) / 3
    assert cohen_kappa(ours, ref, weights="linear")["kappa"] == pytest.approx(1 - (W * O).sum() / (W * E).sum())
    Wq = W**2
    assert cohen_kappa(ours, ref, weights="quadratic")["kappa"] == pytest.approx(1 - (Wq * O).sum() / (Wq * E).sum())
    assert cohen_kappa([1, 2, 3], [1, 2, 3])["kappa"] == pytest.approx(1.0)


def test_bland_altman_and_ordinal_parsing():
    x = np.array([10.0, 20.0, 30.0, 40.0])
    y = np.array([12.0, 19.0, 33.0, 41.0])
    d = x - y
    b = bland_altman(x, y)
    assert b["bias"] == pytest.approx(d.mean())
    assert b["sd"] == pytest.approx(d.std(ddof=1))
    assert b["loa_low"] == pytest.approx(d.mean() - 1.96 * d.std(ddof=1))
    assert list(ordinal_values(["0", "1+", "2+", "3+", None])[:4]) == [0, 1, 2, 3]
    assert ordinal_values(["pos", "neg"]) is None
    assert ordinal_values([0.5, 1.7]) is None


def _files(tmp_path):
    rng = np.random.default_rng(3)
    n = 30
    slides = [f"S{i:02d}" for i in range(n)]
    her2_true = rng.integers(0, 4, n)
    load = np.exp(her2_true + rng.normal(0, 0.3, n))
    er = rng.uniform(0, 100, n)
    ours = pd.DataFrame({
        "slide": slides,
        "HER2_score": [f"{g}+" if g else "0" for g in her2_true],
        "HER2_load": load,
        "ER_percent_positive": er + rng.normal(2, 3, n),
    })
    ihc = np.where(rng.random(n) < 0.8, her2_true, np.clip(her2_true + 1, 0, 3))
    ref = pd.DataFrame({
        "slide": slides[::-1],  # order does not matter
        "IHC": [f"{g}+" if g else "0" for g in ihc[::-1]],
        "western": (load * 3 + rng.normal(0, 0.2, n))[::-1],
        "ER_percent_positive": er[::-1],
        "FISH": np.where(her2_true >= 3, "amplified", "not amplified")[::-1],
    })
    ours["HER2_amplified"] = np.where(her2_true >= 3, "amplified", "not amplified")
    a, b = tmp_path / "cohort_summary.csv", tmp_path / "reference.csv"
    ours.to_csv(a, index=False)
    ref.to_csv(b, index=False)
    return a, b, ours, ref, ihc, her2_true


def test_compare_kinds(tmp_path):
    _, _, ours, ref, ihc, truth = _files(tmp_path)
    res = compare(ours, ref, pairs={"HER2_score": "IHC", "HER2_load": "western",
                                    "ER_percent_positive": "ER_percent_positive", "HER2_amplified": "FISH"})
    res = res.set_index("ours")
    assert res.loc["HER2_score", "kind"] == "ordinal" and res.loc["HER2_score", "n"] == 30
    assert res.loc["HER2_score", "kappa"] == pytest.approx(cohen_kappa(truth, ihc, weights="linear", labels=[0, 1, 2, 3])["kappa"])
    assert res.loc["HER2_load", "kind"] == "continuous" and res.loc["HER2_load", "pearson_r"] > 0.95
    assert res.loc["ER_percent_positive", "ba_bias"] == pytest.approx(
        (ours["ER_percent_positive"] - ref.set_index("slide").loc[ours["slide"], "ER_percent_positive"].to_numpy()).mean())
    assert res.loc["HER2_amplified", "kind"] == "categorical" and res.loc["HER2_amplified", "kappa"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="'nope'"):
        compare(ours, ref, pairs={"nope": "IHC"})
    with pytest.raises(InputError, match="slide"):
        compare(ours.rename(columns={"slide": "id"}), ref)


def test_agree_cli(tmp_path, capsys):
    a, b, *_ = _files(tmp_path)
    out = tmp_path / "agreement.csv"
    rc = main(["agree", str(a), str(b), "--pair", "HER2_score=IHC", "--pair", "HER2_load=western",
               "--weights", "quadratic", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "HER2_score" in printed and "kappa" in printed
    res = pd.read_csv(out)
    assert list(res["ours"]) == ["HER2_score", "HER2_load"] and res.loc[0, "kappa_weights"] == "quadratic"
    # shared column names by default (only ER_percent_positive here)
    assert main(["agree", str(a), str(b)]) == 0
    assert "ER_percent_positive" in capsys.readouterr().out
    # errors: one line, non-zero exit
    assert main(["agree", str(a), str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.csv" in err
    assert main(["agree", str(a), str(b), "--pair", "HER2_score"]) == 2
