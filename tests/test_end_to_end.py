"""End to end: a synthetic slide through unmix → segment → quantify → score, checked against truth.

Every check runs on both storages of the one slide path (``storage="memory"`` and
``"disk"``, tiled far below the slide size), and the two must give equal tables and scores.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import qdplex
from qdplex.metrics import match_labels
from qdplex.synth import make_slide, write_slide

MCQUANT_MORPH = ["X_centroid", "Y_centroid", "Area", "MajorAxisLength", "MinorAxisLength",
                 "Eccentricity", "Solidity", "Extent", "Orientation"]


@pytest.fixture(scope="module")
def slide(panel):
    return make_slide(panel, shape=(384, 384), pixel_size_um=0.5, seed=7, name="e2e")


@pytest.fixture(scope="module", params=["memory", "disk"])
def result(request, slide, panel):
    res = qdplex.run_slide(slide.image, panel, storage=request.param, tile=128)
    yield res
    res.close()


def test_both_storages_give_equal_tables_and_scores(slide, panel):
    mem = qdplex.run_slide(slide.image, panel, storage="memory", tile=128)
    with qdplex.run_slide(slide.image, panel, storage="disk", tile=128) as disk:
        pd.testing.assert_frame_equal(mem.table, disk.table, rtol=1e-6)
        assert mem.summary["her2"] == disk.summary["her2"] and mem.summary["markers"] == disk.summary["markers"]
        assert mem.thresholds == pytest.approx(disk.thresholds)


def _matched_pairs(truth_labels, pred_labels, iou=0.5):
    """(truth_id, pred_id) for objects matched at IoU ≥ 0.5 (one-to-one)."""
    t = truth_labels.ravel().astype(np.int64)
    p = pred_labels.ravel().astype(np.int64)
    both = (t > 0) & (p > 0)
    pairs, inter = np.unique(np.stack([t[both], p[both]]), axis=1, return_counts=True)
    at = np.bincount(t)
    ap = np.bincount(p)
    ious = inter / (at[pairs[0]] + ap[pairs[1]] - inter)
    keep = ious >= iou
    return pairs[0][keep], pairs[1][keep]


def test_nucleus_f1_against_truth(slide, result):
    m = match_labels(slide.nuclei, np.asarray(result.segmentation.nuclei[:, :]), iou=0.5)
    print(f"nucleus F1 @ IoU 0.5 = {m['f1']:.3f} (tp={m['tp']}, fp={m['fp']}, fn={m['fn']})")
    assert m["f1"] >= 0.85


def test_cell_ids_equal_nucleus_ids(result):
    nuclei = np.asarray(result.segmentation.nuclei[:, :])
    cells = np.asarray(result.segmentation.cells[:, :])
    nuc_ids = set(np.unique(nuclei)) - {0}
    cell_ids = set(np.unique(cells)) - {0}
    assert nuc_ids == cell_ids
    inside = nuclei > 0
    assert np.array_equal(cells[inside], nuclei[inside])


def test_marker_correlation_with_truth(slide, result, panel):
    tid, pid = _matched_pairs(slide.nuclei, np.asarray(result.segmentation.nuclei[:, :]))
    truth = slide.truth.set_index("CellID").loc[tid]
    table = result.table.set_index("CellID").loc[pid]
    rs = {}
    for m in panel.markers:
        rs[m.name] = float(np.corrcoef(truth[m.name].to_numpy(), table[m.name].to_numpy())[0, 1])
    print("per-cell Pearson r vs truth:", {k: round(v, 3) for k, v in rs.items()})
    assert min(rs.values()) >= 0.9, rs


def test_table_is_in_mcquant_order(result, panel):
    cols = list(result.table.columns)
    assert cols[0] == "CellID"
    assert cols[1:1 + len(panel.markers)] == panel.marker_names
    i = cols.index("X_centroid")
    assert cols[i:i + len(MCQUANT_MORPH)] == MCQUANT_MORPH
    # everything between the marker columns and X_centroid is a marker statistic
    for c in cols[1 + len(panel.markers):i]:
        assert c.split("_")[0] in panel.marker_names, c


def test_cli_run_writes_the_layout(tmp_path, slide, panel, breast_panel_path):
    write_slide(slide, tmp_path / "data")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "qdplex.cli", "run", str(tmp_path / "data" / "slides"),
         "--panel", str(breast_panel_path), "--out", str(out), "--no-report", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    d = out / "e2e"
    for f in ("unmixed.ome.tif", "nuclei.ome.tif", "cells.ome.tif", "cells.csv", "run.json", "summary.json"):
        assert (d / f).is_file(), f
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest["status"]) == ["ok"] and list(manifest["slide"]) == ["e2e"]
    # the written table equals the in-memory pipeline's (same slide, same panel)
    cells = pd.read_csv(d / "cells.csv")
    mem = qdplex.run_slide(qdplex.read_image(tmp_path / "data" / "slides" / "e2e.ome.tif"), panel).table
    assert list(cells.columns[:6]) == list(mem.columns[:6])
    np.testing.assert_allclose(cells["HER2"].to_numpy(), mem["HER2"].to_numpy(), rtol=1e-5, atol=1e-6)
    # labels on disk are the segmentation: uint32, cell IDs equal nucleus IDs
    nuc = qdplex.io.read_labels(d / "nuclei.ome.tif")
    cel = qdplex.io.read_labels(d / "cells.ome.tif")
    assert nuc.dtype == np.uint32 and cel.dtype == np.uint32
    assert set(np.unique(nuc)) == set(np.unique(cel))
    assert set(cells["CellID"]) == set(np.unique(cel)) - {0}
    run = json.loads((d / "run.json").read_text())
    assert run["panel"]["name"] == panel.name and "numpy" in run["versions"]
    # unmixed planes are named
    img = qdplex.read_image(d / "unmixed.ome.tif")
    assert {"DAPI", "HER2", "ER", "PR", "EGFR", "mTOR", "residual"} <= set(img.channel_names)


def test_cli_bad_panel_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[markers]]\nname = "HER2"\nfluor = "QD655"\ncompartment = "nuclear"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "qdplex.cli", "run", str(tmp_path), "--panel", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "bad.toml" in lines[0] and "markers[0].compartment" in lines[0] and "nuclear" in lines[0]


def test_cli_missing_input_is_one_line(tmp_path, breast_panel_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qdplex.cli", "run", str(tmp_path / "nope"), "--panel", str(breast_panel_path),
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "nope" in lines[0] and "no such path" in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()
