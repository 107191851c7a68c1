"""The one slide path (issue 13): memory and disk storage give the same numbers.

A synthetic slide is run with ``storage="memory"`` and ``storage="disk"`` on tiles far
smaller than the slide; the tables, scores and written files must agree, HER2
membrane completeness must be the measured one (equal to a whole-plane count),
medians and quantiles computed tile by tile must equal numpy's on whole planes, and
``run.json`` must have one shape.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

SHAPE = (512, 512)
TILE = 128


@pytest.fixture(scope="module")
def panel(breast_panel_path):
    from qdplex.panel import read_panel

    p = read_panel(breast_panel_path)
    # every order statistic the panel can ask for, so the tile-by-tile medians are exercised
    return replace(p, quantification={**p.quantification, "stats": ["mean", "std", "sum", "median"],
                                      "quantiles": [0.25, 0.9]})


@pytest.fixture(scope="module")
def slide(panel):
    from qdplex.synth import make_slide

    return make_slide(panel, shape=SHAPE, seed=3, name="ws")


@pytest.fixture(scope="module")
def runs(slide, panel, tmp_path_factory):
    from qdplex.slide import run_slide

    scratch = tmp_path_factory.mktemp("scratch")
    mem = run_slide(slide.image, panel, storage="memory", tile=TILE)
    disk = run_slide(slide.image, panel, storage="disk", tile=TILE, scratch=scratch)
    yield {"memory": mem, "disk": disk, "scratch": scratch}
    disk.close()


def test_storages_give_equal_tables_and_scores(runs, slide):
    from qdplex.metrics import match_labels

    mem, disk = runs["memory"], runs["disk"]
    assert mem.storage == "memory" and disk.storage == "disk"
    assert not disk.segmentation.in_memory  # labels stayed in scratch storage
    assert len(mem.table) > 100
    pd.testing.assert_frame_equal(mem.table, disk.table, rtol=1e-6)
    assert mem.thresholds == pytest.approx(disk.thresholds, rel=1e-9)
    assert json.dumps(mem.summary, sort_keys=True, default=str) == json.dumps(disk.summary, sort_keys=True, default=str)
    # tiles of 128 px: still the nuclei of the ground truth
    f1 = match_labels(slide.nuclei, np.asarray(mem.segmentation.nuclei), iou=0.5)["f1"]
    assert f1 >= 0.85, f1


def test_her2_completeness_is_measured_on_the_ring(runs):
    from qdplex.quantify import fraction_above

    for res in (runs["memory"], runs["disk"]):
        her2 = res.summary["her2"]
        assert her2["completeness_basis"].startswith("measured")
        ab = res.unmixed.abundances
        plane = np.asarray(ab.plane("HER2"))
        ring = np.asarray(res.segmentation.membrane[:, :])
        whole = fraction_above(plane, ring, res.thresholds["HER2"], ids=res.table["CellID"].to_numpy())
        np.testing.assert_allclose(res.table["HER2_membrane_completeness"].to_numpy(), whole)
        assert 0 < np.nanmean(whole) < 1


def test_tile_by_tile_medians_and_quantiles_equal_numpy(runs):
    res = runs["disk"]
    table = res.table.set_index("CellID")
    ab = np.asarray(res.unmixed.abundances.data)
    names = res.unmixed.abundances.channel_names
    cells = np.asarray(res.segmentation.cells[:, :])
    nuclei = np.asarray(res.segmentation.nuclei[:, :])
    # cells on tile borders (their pixels in 2-4 tiles) and cells inside one tile
    ys = table["Y_centroid"].to_numpy()
    border = table.index[(np.abs((ys + 0.5) % TILE - TILE / 2) > TILE / 2 - 8)][:15]
    inner = table.index[:15]
    checked = 0
    for cid in list(border) + list(inner):
        for marker in ("HER2", "ER"):
            v = ab[names.index(marker)][cells == cid].astype(np.float64)
            assert table.loc[cid, f"{marker}_cell_median"] == pytest.approx(np.median(v), rel=1e-9, abs=1e-12)
            assert table.loc[cid, f"{marker}_cell_q25"] == pytest.approx(np.quantile(v, 0.25), rel=1e-9, abs=1e-12)
            vn = ab[names.index(marker)][nuclei == cid].astype(np.float64)
            assert table.loc[cid, f"{marker}_nucleus_q90"] == pytest.approx(np.quantile(vn, 0.9), rel=1e-9, abs=1e-12)
            checked += 1
    assert checked >= 40 and len(border) >= 5
    # column order: per plane and compartment the statistics as asked, then the quantiles
    cols = list(res.table.columns)
    i = cols.index("HER2_cell_mean")
    assert cols[i:i + 6] == ["HER2_cell_mean", "HER2_cell_std", "HER2_cell_sum", "HER2_cell_median",
                             "HER2_cell_q25", "HER2_cell_q90"]


def test_one_writer_one_record_for_both_storages(slide, panel, tmp_path):
    from qdplex.batch import process_slide
    from qdplex.io import read_image, read_labels
    from qdplex.synth import write_slide

    paths = write_slide(slide, tmp_path / "data")
    rows, recs = {}, {}
    for storage in ("memory", "disk"):
        out = tmp_path / storage
        rows[storage] = process_slide(paths["slide"], panel, out, fmt="zarr", report=False, storage=storage, tile=TILE)
        recs[storage] = json.loads((out / "ws" / "run.json").read_text())
        # the scratch storage is gone once the slide is written
        assert sorted(p.name for p in out.iterdir()) == ["ws"]
    a, b = recs["memory"], recs["disk"]
    assert sorted(a) == sorted(b) and sorted(a["timings"]) == sorted(b["timings"])
    assert "timings_s" not in a and "mode" not in a["parameters"]
    assert a["library_sha256"] == b["library_sha256"] and len(a["library_sha256"]) == 64
    assert (a["parameters"]["storage"], b["parameters"]["storage"]) == ("memory", "disk")
    assert a["stages"]["unmixing"] == b["stages"]["unmixing"]
    for storage in ("memory", "disk"):
        d = tmp_path / storage / "ws"
        zattrs = json.loads((d / "cells.ome.zarr" / ".zattrs").read_text())
        assert zattrs["qdplex"]["labels"] is True  # the label writer, not the image writer
        assert read_labels(d / "cells.ome.zarr").dtype == np.uint32
    ta = pd.read_csv(tmp_path / "memory" / "ws" / "cells.csv")
    tb = pd.read_csv(tmp_path / "disk" / "ws" / "cells.csv")
    pd.testing.assert_frame_equal(ta, tb, rtol=1e-6)
    ua = np.asarray(read_image(tmp_path / "memory" / "ws" / "unmixed.ome.zarr").data)
    ub = np.asarray(read_image(tmp_path / "disk" / "ws" / "unmixed.ome.zarr").data)
    np.testing.assert_array_equal(ua, ub)


def test_storage_choice_and_bad_values(slide, panel):
    from qdplex.errors import QdplexError
    from qdplex.slide import choose_storage, run_slide

    assert choose_storage(slide.image) == "memory"
    assert choose_storage(slide.image, max_pixels=100 * 100) == "disk"
    assert choose_storage(slide.image, "disk") == "disk"
    with pytest.raises(QdplexError, match="storage"):
        run_slide(slide.image, panel, storage="ram")
    with pytest.raises(QdplexError, match="tile size"):
        run_slide(slide.image, panel, tile=8)
