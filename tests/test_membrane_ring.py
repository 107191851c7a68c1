"""The compiled membrane ring equals its definition by Euclidean distance transform, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels

from qdplex.segment import membrane_ring


def _ring_by_edt(cells, width):
    """The ring as defined (and as qdplex computed it before the compiled kernel): cell pixels
    closer than ``width`` to a boundary pixel, by ``scipy.ndimage.distance_transform_edt``."""
    lab = np.asarray(cells, np.uint32)
    edge = np.zeros(lab.shape, bool)
    dy = lab[1:, :] != lab[:-1, :]
    dx = lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge &= lab > 0
    if not edge.any():
        return np.zeros(lab.shape, np.uint32)
    ring = edge if width <= 1 else (ndi.distance_transform_edt(~edge) < width) & (lab > 0)
    return np.where(ring, lab, 0).astype(np.uint32)


@pytest.mark.parametrize("seed", range(4))
def test_ring_equals_distance_transform(seed):
    rng = np.random.default_rng(seed)
    H, W = rng.integers(20, 120, 2)
    seeds = (rng.random((H, W)) < 0.02) * rng.integers(1, 500, (H, W))
    cells = expand_labels(seeds, int(rng.integers(2, 9))).astype(np.uint32)
    cells[: H // 3, : W // 4] = 0  # background touching the image border
    for width in (0.4, 1, 1 + 1e-9, np.sqrt(2), 1.5, 2, np.sqrt(5), 2.5, 3, 4.7, 11):
        got = membrane_ring(cells, width)
        assert got.dtype == np.uint32
        np.testing.assert_array_equal(got, _ring_by_edt(cells, width), err_msg=f"width {width}")


def test_ring_edge_cases():
    assert not membrane_ring(np.zeros((5, 7), np.uint32), 2).any()
    full = np.full((6, 6), 4, np.uint32)  # the image border is not a boundary
    assert not membrane_ring(full, 3).any()
    line = np.zeros((1, 9), np.int64)
    line[0, 2:7] = 3
    np.testing.assert_array_equal(membrane_ring(line, 2), _ring_by_edt(line, 2))
