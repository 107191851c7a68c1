"""The compiled membrane ring equals its definition by Euclidean distance transform (scipy), bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.segmentation import expand_labels

from qdplex.segment import membrane_ring
from qdplex.segment._ring import ring_by_edt as _ring_by_edt  # the definition (the former implementation)


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
