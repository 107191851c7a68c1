"""Every ready pipeline in pipelines/ runs end to end on a synthetic slide made for its panel,
and its per-cell measurements agree with the slide's ground truth.

Accuracy bounds, per marker, on the cells matched one-to-one to true cells (IoU ≥ 0.5).
"Measured" is the minimum over the six panels and seeds 0–4 (the test uses seed 3):

* Pearson correlation of the measured mean (the marker's own column of the cell table)
  with the true mean abundance in the marker's compartment:
  - ≥ 0.95 for nucleus, cytoplasm and whole-cell markers (measured ≥ 0.99): these
    compartments are tens to hundreds of pixels, so unmixing noise averages out and a
    pixel of boundary error moves the mean little;
  - ≥ 0.90 for membrane markers (measured ≥ 0.967): the ring is 1 µm (2 px) wide, so a
    one-pixel shift of the segmented border against the true one swaps a large part of
    the ring for cytoplasm, background or the neighbour's membrane.
* ≥ 90 % of the true cells matched (segmentation recall at IoU 0.5; measured ≥ 96.8 %).
* The measured values separate the truly positive from the truly negative cells: area
  under the ROC curve ≥ 0.95 (measured ≥ 0.994), independent of the automatic threshold;
* and the scorer's calls (``<marker>_positive``, automatic threshold) equal the truth's
  for ≥ 80 % of the matched cells (measured ≥ 83 %, lowest for membrane markers whose
  negative and positive cells touch).

``pytest tests/test_pipelines.py -s`` prints the measured values.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from qdplex.metrics import iou_pairs
from qdplex.panel import read_panel

ROOT = Path(__file__).resolve().parents[1]
PANELS = sorted((ROOT / "pipelines").glob("*.toml"))
WORKFLOWS = {"breast-5plex", "her2-qdihc", "ovarian-ca125", "pancreatic-claudin4", "prostate-ar-psa", "gi-5plex"}

MIN_R = {"nucleus": 0.95, "cytoplasm": 0.95, "cell": 0.95, "membrane": 0.90}
MIN_MATCHED = 0.90
MIN_AUC = 0.95
MIN_AGREEMENT = 0.80


def test_every_workflow_has_a_panel():
    assert WORKFLOWS <= {p.stem for p in PANELS}


@pytest.mark.parametrize("path", PANELS, ids=lambda p: p.stem)
def test_panel_cites_its_workflow(path):
    comments = "\n".join(l for l in path.read_text(encoding="utf-8").splitlines() if l.lstrip().startswith("#"))
    # an author-year reference: a journal year and either a DOI or volume:pages
    assert re.search(r"\b(19|20)\d\d\b", comments), f"{path.name}: no year in the citation comment"
    assert re.search(r"doi:10\.\d{4,}/|\d+\(\d+\):\d+|\d+:\d+-\d+", comments), f"{path.name}: no DOI or volume:pages"
    panel = read_panel(path)
    assert panel.description


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve of ``pos`` against ``neg`` (Mann–Whitney U / n₁n₀); NaN without both."""
    from scipy.stats import mannwhitneyu

    if pos.size == 0 or neg.size == 0:
        return float("nan")
    return float(mannwhitneyu(pos, neg).statistic / (pos.size * neg.size))


def _measure(panel, seed=3):
    from qdplex.slide import run_slide
    from qdplex.synth import make_slide

    slide = make_slide(panel, shape=(192, 192), seed=seed, name=panel.name)
    res = run_slide(slide.image, panel)
    t_ids, p_ids, iou = iou_pairs(slide.cells, res.segmentation.cells)[:3]
    keep = iou >= 0.5
    t_ids, p_ids = t_ids[keep], p_ids[keep]
    truth = slide.truth.set_index("CellID")
    table = res.table.set_index("CellID")
    out = {"matched": len(t_ids) / len(truth), "n_true": len(truth), "markers": {}}
    for m in panel.markers:
        est = table.loc[p_ids, m.name].to_numpy(float)
        true = truth.loc[t_ids, m.name].to_numpy(float)
        ok = np.isfinite(est)
        r = float(np.corrcoef(est[ok], true[ok])[0, 1])
        true_pos = truth.loc[t_ids, f"{m.name}_positive"].to_numpy(bool)
        pos = table.loc[p_ids, f"{m.name}_positive"].to_numpy(bool)
        agree = float(np.mean(pos == true_pos))
        auc = _auc(est[ok & true_pos], est[ok & ~true_pos])
        out["markers"][m.name] = {"compartment": m.compartment, "r": r, "auc": auc, "positive_agreement": agree,
                                  "threshold": float(res.thresholds[m.name])}
    return res, out


@pytest.mark.parametrize("path", PANELS, ids=lambda p: p.stem)
def test_pipeline_end_to_end_accuracy(path):
    panel = read_panel(path)
    res, m = _measure(panel)
    print(f"\n{path.stem}: {m['matched']:.0%} of {m['n_true']} true cells matched; " + "; ".join(
        f"{k} ({v['compartment']}) r={v['r']:.3f} AUC={v['auc']:.3f} scorer agreement {v['positive_agreement']:.0%}"
        for k, v in m["markers"].items()))
    assert m["matched"] >= MIN_MATCHED
    for name, v in m["markers"].items():
        assert v["r"] >= MIN_R[v["compartment"]], (name, v)
        assert np.isnan(v["auc"]) or v["auc"] >= MIN_AUC, (name, v)
        assert v["positive_agreement"] >= MIN_AGREEMENT, (name, v)
    # every stage ran and reported its time, and the scores name every marker
    assert {"unmix", "segment", "quantify", "score"} <= set(res.timings)
    assert set(res.thresholds) == set(panel.marker_names)
