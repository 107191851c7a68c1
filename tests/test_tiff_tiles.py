"""The direct tile reader of uncompressed tiled TIFF pages (qdplex.io.tiff) gives exactly
what tifffile gives, for any region, and steps aside for layouts it does not handle."""

import numpy as np
import pytest
import tifffile

from qdplex.io.tiff import TiffArray, _uncompressed_tiles


def _array(path, shape, dtype):
    return TiffArray(path, series=0, level=0, shape=shape, dtype=dtype)


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_direct_tiles_equal_tifffile(tmp_path, byteorder, dtype):
    rng = np.random.default_rng(0)
    data = (rng.random((4, 150, 211)) * 4000).astype(dtype)  # not a multiple of the tiles
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, data, tile=(32, 48), byteorder=byteorder, compression=None, photometric="minisblack")
    layout = _uncompressed_tiles(path, 0, 0, data.shape, data.dtype)
    assert layout is not False and layout[1] == (32, 48)
    arr = _array(path, data.shape, data.dtype)
    keys = [np.s_[:, :, :], np.s_[1, 10:97, 33:200], np.s_[0:2, 149:150, 0:211], np.s_[3], np.s_[-1, 5:6, -7:],
            np.s_[:, 31:33, 47:49], np.s_[1:1, :, :]]
    for key in keys:
        got = arr[key]
        assert got.dtype == data.dtype
        np.testing.assert_array_equal(got, data[key])


def test_compressed_or_strip_pages_go_through_zarr(tmp_path):
    data = np.arange(2 * 64 * 80, dtype=np.uint16).reshape(2, 64, 80)
    for kw in ({"tile": (32, 32), "compression": "zlib"}, {"compression": None}):
        path = tmp_path / f"t_{len(kw)}.tif"
        tifffile.imwrite(path, data, photometric="minisblack", **kw)
        assert _uncompressed_tiles(path, 0, 0, data.shape, data.dtype) is False
        np.testing.assert_array_equal(_array(path, data.shape, data.dtype)[1, 3:40, 7:70], data[1, 3:40, 7:70])
