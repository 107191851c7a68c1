"""Tests of qdplex.synth: synthetic slides and their ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from qdplex.synth import nuclear_field, tissue_layout


def _touching_pairs(labels):
    """Number of distinct label pairs sharing a 4-connected border."""
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()])
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()])
    m = (a != b) & (a > 0) & (b > 0)
    return len({(min(x, y), max(x, y)) for x, y in zip(a[m], b[m])})


def test_nuclear_field_deterministic_for_a_seed():
    a_img, a_nuc = nuclear_field((128, 160), seed=3)
    b_img, b_nuc = nuclear_field((128, 160), seed=3)
    c_img, _ = nuclear_field((128, 160), seed=4)
    assert a_img.dtype == np.float32 and a_nuc.dtype == np.uint32
    assert a_img.shape == a_nuc.shape == (128, 160)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_nuc, b_nuc)
    assert not np.array_equal(a_img, c_img)


def test_nuclear_field_realistic_nuclei():
    img, nuc = nuclear_field((256, 256), pixel_size_um=0.5, seed=0)
    ids = np.unique(nuc[nuc > 0])
    np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))  # contiguous 1..n
    assert ids.size > 30
    # every nucleus is one connected piece
    for i, sl in enumerate(ndi.find_objects(nuc), start=1):
        assert ndi.label(nuc[sl] == i)[1] == 1
    # interior (not cut by the edge) nuclei: median equivalent diameter 8-12 µm
    border = np.unique(np.concatenate([nuc[0], nuc[-1], nuc[:, 0], nuc[:, -1]]))
    areas = np.bincount(nuc.ravel())[1:]
    inner = np.setdiff1d(ids, border)
    diam = 2 * np.sqrt(areas[inner - 1] * 0.25 / np.pi)
    assert 7.0 < np.median(diam) < 12.0
    # nuclei are brighter than background by a wide margin (SNR)
    fg, bg = img[nuc > 0].mean(), img[ndi.distance_transform_edt(nuc == 0) > 6].mean()
    assert fg > 5 * bg


def test_nuclear_field_crowded_touches_more_and_uneven_spreads_brightness():
    _, nuc = nuclear_field((256, 256), seed=1)
    _, nuc_c = nuclear_field((256, 256), crowded=True, seed=1)
    assert nuc_c.max() > 1.3 * nuc.max()
    assert _touching_pairs(nuc_c) > 2 * max(_touching_pairs(nuc), 1)
    img, nuc = nuclear_field((256, 256), seed=2)
    img_u, nuc_u = nuclear_field((256, 256), uneven=True, seed=2)
    np.testing.assert_array_equal(nuc, nuc_u)  # same layout, different photometry
    ids = np.arange(1, nuc.max() + 1)
    m = ndi.mean(img, nuc, ids)
    m_u = ndi.mean(img_u, nuc_u, ids)
    assert np.std(np.log(m_u)) > 1.8 * np.std(np.log(m))


def test_tissue_layout_cells_share_nucleus_ids():
    lay = tissue_layout((192, 192), seed=5)
    assert lay.cells.shape == lay.nuclei.shape
    inside = lay.nuclei > 0
    np.testing.assert_array_equal(lay.cells[inside], lay.nuclei[inside])
    np.testing.assert_array_equal(np.unique(lay.cells[lay.cells > 0]), np.unique(lay.nuclei[inside]))
    # cells are larger than their nuclei (a cytoplasm exists)
    assert (lay.cells > 0).sum() > 1.3 * inside.sum()
