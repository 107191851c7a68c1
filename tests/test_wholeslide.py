"""Whole slides out of core (issue 6 item 5): the tiled flow agrees with the in-memory one.

A synthetic slide is run twice — in memory (:func:`qdplex.pipeline.run_slide`) and tile
by tile through on-disk arrays (:func:`qdplex.wholeslide.run_wholeslide`, tiles far
smaller than the slide) — and the measured results must agree: nucleus F1 against
the ground truth, the per-cell marker values against the in-memory table, and the
written images against what the tables were computed from.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

SHAPE = (512, 512)
TILE = 128


@pytest.fixture(scope="module")
def panel(breast_panel_path):
    from qdplex.panel import read_panel

    return read_panel(breast_panel_path)


@pytest.fixture(scope="module")
def slide(panel):
    from qdplex.synth import make_slide

    return make_slide(panel, shape=SHAPE, seed=3, name="ws")


@pytest.fixture(scope="module")
def in_memory(slide, panel):
    from qdplex.pipeline import run_slide

    return run_slide(slide.image, panel)


@pytest.fixture(scope="module")
def tiled(slide, panel, tmp_path_factory):
    from qdplex.wholeslide import run_wholeslide

    out = tmp_path_factory.mktemp("ws") / "ws"
    res = run_wholeslide(slide.image, panel, out, tile=TILE, workers=1)
    return res, out, None


def test_tiled_segmentation_matches_in_memory(tiled, slide, in_memory):
    from qdplex.io import read_labels
    from qdplex.metrics import match_labels

    res, out, _ = tiled
    nuclei = read_labels(out / "nuclei.ome.tif")
    cells = read_labels(out / "cells.ome.tif")
    assert nuclei.shape == cells.shape == SHAPE
    # tiles of 128 px (segmentation tiles of 256 px): the same nuclei as one whole-image pass ...
    same = match_labels(in_memory.segmentation.nuclei, nuclei, iou=0.5)["f1"]
    assert same >= 0.98, f"nucleus F1 tiled vs in-memory: {same:.3f}"
    same_cells = match_labels(in_memory.segmentation.cells, cells, iou=0.5)["f1"]
    assert same_cells >= 0.98, f"cell F1 tiled vs in-memory: {same_cells:.3f}"
    # ... and as accurate against the ground truth
    f1_tiled = match_labels(slide.nuclei, nuclei, iou=0.5)["f1"]
    f1_mem = match_labels(slide.nuclei, in_memory.segmentation.nuclei, iou=0.5)["f1"]
    assert f1_tiled >= f1_mem - 0.01, f"nucleus F1 vs truth: tiled {f1_tiled:.3f}, in memory {f1_mem:.3f}"
    # a cell carries its nucleus's ID and contains it
    inside = nuclei > 0
    assert np.array_equal(cells[inside], nuclei[inside])
    assert set(np.unique(cells[cells > 0])) == set(np.unique(nuclei[nuclei > 0]))
    assert res.n_cells == len(np.unique(cells[cells > 0]))


def test_tiled_table_agrees_with_in_memory(tiled, in_memory, panel):
    from qdplex.io import read_labels

    res, out, _ = tiled
    mem = in_memory.table.set_index("CellID")
    til = pd.read_csv(out / "cells.csv").set_index("CellID")
    assert list(til.columns[: len(panel.markers)]) == panel.marker_names
    # match cells of the two runs by their nucleus (IoU ≥ 0.5), then compare marker values
    nuc_t = read_labels(out / "nuclei.ome.tif")
    nuc_m = in_memory.segmentation.nuclei
    pairs = _pairs(nuc_m, nuc_t)
    assert len(pairs) >= 0.9 * len(mem)
    for marker in panel.marker_names:
        a = mem.loc[[p[0] for p in pairs], marker].to_numpy()
        b = til.loc[[p[1] for p in pairs], marker].to_numpy()
        r = np.corrcoef(a, b)[0, 1]
        assert r >= 0.98, f"{marker}: tiled vs in-memory correlation {r:.4f}"


def test_tiled_outputs_are_the_quantified_planes(tiled, in_memory):
    from qdplex.io import read_image

    res, out, _ = tiled
    img = read_image(out / "unmixed.ome.tif")
    mem = in_memory.unmixed.to_image()
    assert img.channel_names == mem.channel_names
    a = np.asarray(img.data)
    b = np.asarray(mem.data.compute())
    # the same unmixing, tile by tile: equal up to float32 rounding
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3 * float(np.abs(b).max()))


def test_zarr_output(slide, panel, tmp_path):
    from qdplex.io import read_image
    from qdplex.wholeslide import run_wholeslide

    small = slide.image.select(slide.image.channel_names)
    small = type(small)(data=small.data[:, :256, :256], channels=small.channels,
                        pixel_size_um=small.pixel_size_um, name="z")
    res = run_wholeslide(small, panel, tmp_path / "z", tile=TILE, fmt="zarr", workers=1)
    img = read_image(tmp_path / "z" / "unmixed.ome.zarr")
    assert img.shape[1:] == (256, 256) and "residual" in img.channel_names
    assert (tmp_path / "z" / "cells.ome.zarr").is_dir()
    assert len(res.table) > 10 and not any(p.name.startswith(".wholeslide") for p in (tmp_path / "z").iterdir())


def _pairs(a: np.ndarray, b: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one (id_a, id_b) pairs of objects overlapping with IoU ≥ 0.5."""
    m = (a > 0) & (b > 0)
    pa, pb = a[m].astype(np.int64), b[m].astype(np.int64)
    key = pa * (int(b.max()) + 1) + pb
    uk, inter = np.unique(key, return_counts=True)
    ia, ib = uk // (int(b.max()) + 1), uk % (int(b.max()) + 1)
    area_a = np.bincount(a.ravel())
    area_b = np.bincount(b.ravel())
    iou = inter / (area_a[ia] + area_b[ib] - inter)
    keep = iou >= 0.5
    return list(zip(ia[keep].tolist(), ib[keep].tolist()))
