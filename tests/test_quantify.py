"""Per-cell quantification: equality with peers (skimage, steinbock, numpy) and exact tiling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage.measure import regionprops_table

from qdplex.errors import InputError, SegmentationError
from qdplex.model import COMPARTMENTS, Channel, MultiplexImage, Segmentation
from qdplex.quantify import Accumulator, accumulate_block, finalize, fraction_above, morphology, quantify

PANCREAS = ("E34", "G01", "J02")
MCQUANT = {
    "centroid-1": "X_centroid",
    "centroid-0": "Y_centroid",
    "area": "Area",
    "major_axis_length": "MajorAxisLength",
    "minor_axis_length": "MinorAxisLength",
    "eccentricity": "Eccentricity",
    "solidity": "Solidity",
    "extent": "Extent",
    "orientation": "Orientation",
    "perimeter": "Perimeter",
}


def _pancreas(shared_data, crop):
    import tifffile

    d = shared_data / "multiplex" / "cytomapper_imc_pancreas"
    names = pd.read_csv(d / "markers.csv")["marker_name"].tolist()
    return tifffile.imread(d / f"{crop}_imc.tiff"), tifffile.imread(d / f"{crop}_mask.tiff"), names


def _ring(cells, width=2):
    """Inner boundary ring of each cell (pixels within ``width`` of another label or background)."""
    cells = np.asarray(cells)
    eroded = np.zeros_like(cells)
    for lab in np.unique(cells[cells > 0]):
        m = ndi.binary_erosion(cells == lab, iterations=width, border_value=0)
        eroded[m] = lab
    ring = cells.copy()
    ring[eroded > 0] = 0
    return ring


def _synthetic_seg(shape=(96, 128), n=40, seed=0):
    rng = np.random.default_rng(seed)
    from skimage.segmentation import expand_labels

    nuclei = np.zeros(shape, np.uint32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ids = rng.choice(np.arange(1, 10_000), size=n, replace=False)  # non-contiguous IDs
    for lab in ids:
        cy, cx = rng.uniform(4, shape[0] - 4), rng.uniform(4, shape[1] - 4)
        a, b, t = rng.uniform(2, 5), rng.uniform(1.5, 4), rng.uniform(0, np.pi)
        u = (yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)
        v = -(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
        nuclei[((u / a) ** 2 + (v / b) ** 2 <= 1) & (nuclei == 0)] = lab
    cells = expand_labels(nuclei, 4).astype(np.uint32)
    # some nuclei without a surviving pixel would break ID equality; keep only present ones
    seg = Segmentation(nuclei, cells, membrane_width_px=2)
    seg.__dict__["membrane"] = _ring(cells, 2)
    return seg


# --------------------------------------------------------------------------- peers
@pytest.mark.parametrize("crop", PANCREAS)
def test_means_equal_steinbock_and_regionprops(shared_data, crop):
    from steinbock.measurement.intensities import IntensityAggregation, measure_intensites

    img, mask, names = _pancreas(shared_data, crop)
    ours = quantify(img, mask, channel_names=names)
    ref = measure_intensites(img, mask, names, IntensityAggregation.MEAN)
    assert list(ours.columns) == names
    np.testing.assert_array_equal(ours.index.to_numpy(), ref.index.to_numpy())
    assert np.abs(ours.to_numpy() - ref.to_numpy()).max() < 1e-5
    rp = regionprops_table(mask.astype(np.int32), np.moveaxis(img, 0, -1), properties=("label", "intensity_mean"))
    for i, name in enumerate(names):
        np.testing.assert_allclose(ours[name].to_numpy(), rp[f"intensity_mean-{i}"], atol=1e-5, rtol=0)
    # std / sum against steinbock's other aggregations
    full = quantify(img, Segmentation(mask, mask), channel_names=names, compartments=("cell",))
    for agg, st in ((IntensityAggregation.STD, "std"), (IntensityAggregation.SUM, "sum")):
        r = measure_intensites(img, mask, names, agg)
        for n in names:
            np.testing.assert_allclose(full[f"{n}_cell_{st}"].to_numpy(), r[n].to_numpy(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("crop", PANCREAS)
def test_morphology_equals_regionprops(shared_data, crop):
    _, mask, _ = _pancreas(shared_data, crop)
    ours = morphology(mask, pixel_size_um=0.5)
    rp = pd.DataFrame(regionprops_table(mask.astype(np.int32), properties=("label",) + tuple(
        p for p in ("centroid", "area", "major_axis_length", "minor_axis_length", "eccentricity",
                    "solidity", "extent", "orientation", "perimeter"))))
    np.testing.assert_array_equal(ours.index.to_numpy(), rp["label"].to_numpy())
    for k, v in MCQUANT.items():
        np.testing.assert_allclose(ours[v].to_numpy(), rp[k].to_numpy(), atol=1e-9, rtol=1e-9, err_msg=v)
    np.testing.assert_allclose(ours["X_centroid_um"], ours["X_centroid"] * 0.5)


def test_morphology_equals_regionprops_random_shapes():
    seg = _synthetic_seg((120, 150), n=60, seed=3)
    ours = morphology(seg.cells)
    rp = pd.DataFrame(regionprops_table(seg.cells.astype(np.int64), properties=(
        "label", "centroid", "area", "major_axis_length", "minor_axis_length", "eccentricity",
        "solidity", "extent", "orientation", "perimeter")))
    np.testing.assert_array_equal(ours.index.to_numpy(), rp["label"].to_numpy())
    for k, v in MCQUANT.items():
        np.testing.assert_allclose(ours[v].to_numpy(), rp[k].to_numpy(), atol=1e-9, rtol=1e-9, err_msg=v)


# --------------------------------------------------------------------------- compartments
def _brute(img, labels, ids):
    out = {}
    for i, lab in enumerate(ids):
        m = labels == lab
        vals = img[:, m].astype(np.float64)
        out[lab] = (m.sum(), vals.mean(axis=1) if m.any() else np.full(img.shape[0], np.nan),
                    vals.std(axis=1) if m.any() else np.full(img.shape[0], np.nan), vals.sum(axis=1))
    return out


def test_compartment_stats_equal_numpy():
    seg = _synthetic_seg()
    rng = np.random.default_rng(1)
    img = rng.gamma(2.0, 50.0, size=(3,) + seg.cells.shape).astype(np.float32)
    names = ["A", "B", "C"]
    df = quantify(MultiplexImage(img, [Channel(n) for n in names], pixel_size_um=0.65), seg,
                  stats=("mean", "std", "sum", "min", "max", "median"), quantiles=(0.1, 0.975))
    ids = df.index.to_numpy()
    assert np.all(np.diff(ids) > 0) and set(ids) == set(np.unique(seg.cells[seg.cells > 0]))
    for comp in COMPARTMENTS:
        lab = seg.compartment(comp)
        for lab_id in ids[::7]:
            m = lab == lab_id
            for ci, n in enumerate(names):
                vals = img[ci][m].astype(np.float64)
                if vals.size == 0:
                    assert np.isnan(df.at[lab_id, f"{n}_{comp}_mean"])
                    assert df.at[lab_id, f"{n}_{comp}_sum"] == 0
                    continue
                assert df.at[lab_id, f"{n}_{comp}_mean"] == pytest.approx(vals.mean(), rel=1e-12)
                assert df.at[lab_id, f"{n}_{comp}_std"] == pytest.approx(vals.std(), rel=1e-7)
                assert df.at[lab_id, f"{n}_{comp}_sum"] == pytest.approx(vals.sum(), rel=1e-12)
                assert df.at[lab_id, f"{n}_{comp}_min"] == vals.min()
                assert df.at[lab_id, f"{n}_{comp}_max"] == vals.max()
                assert df.at[lab_id, f"{n}_{comp}_median"] == pytest.approx(np.median(vals))
                assert df.at[lab_id, f"{n}_{comp}_q10"] == pytest.approx(np.quantile(vals, 0.1))
                assert df.at[lab_id, f"{n}_{comp}_q97_5"] == pytest.approx(np.quantile(vals, 0.975))
    area_n = np.array([(seg.nuclei == i).sum() for i in ids])
    np.testing.assert_array_equal(df["NucleusArea"].to_numpy(), area_n)
    np.testing.assert_allclose(df["NucleusCellAreaRatio"], area_n / df["Area"])
    np.testing.assert_allclose(df["Y_centroid_um"], df["Y_centroid"] * 0.65)


# --------------------------------------------------------------------------- tiling
def test_blocks_combine_exactly():
    seg = _synthetic_seg((100, 130), n=50, seed=5)
    rng = np.random.default_rng(2)
    img = rng.normal(100, 20, size=(2,) + seg.cells.shape)
    names = ["A", "B"]
    whole = quantify(img, seg, channel_names=names, stats=("mean", "std", "sum", "min", "max"))
    # the same image as a dask array with odd chunks (quantify walks the chunks)
    mi = MultiplexImage(img, [Channel(n) for n in names])
    mi.data = mi.data.rechunk((2, 23, 37))
    tiled = quantify(mi, seg, stats=("mean", "std", "sum", "min", "max"))
    pd.testing.assert_index_equal(whole.index, tiled.index)
    np.testing.assert_allclose(tiled.to_numpy(), whole.to_numpy(), rtol=1e-9, atol=1e-9)
    # and by hand with accumulate_block / finalize, blocks in a scrambled order
    acc = Accumulator(names, seg.cells.shape, minmax=True)
    blocks = [(y, x) for y in range(0, 100, 30) for x in range(0, 130, 45)]
    for y, x in blocks[::-1]:
        accumulate_block(acc, img[:, y:y + 30, x:x + 45], seg.cells, seg.nuclei, seg.membrane, origin=(y, x))
    manual = finalize(acc, stats=("mean", "std", "sum", "min", "max"))
    np.testing.assert_allclose(manual.to_numpy(), whole.to_numpy(), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- unmix results
class _Unmixed:
    def __init__(self, abundances, residual, saturated):
        self.abundances, self.residual, self.saturated = abundances, residual, saturated


def test_unmix_result_qc_columns_and_panel_names():
    from qdplex.panel import Marker, Panel

    seg = _synthetic_seg(seed=7)
    rng = np.random.default_rng(3)
    shape = seg.cells.shape
    planes = {"DAPI": 5.0, "QD655": 2.0, "QD605": 1.0, "AF": 0.5}
    data = np.stack([rng.exponential(v, size=shape) for v in planes.values()]).astype(np.float32)
    resid = rng.exponential(0.1, size=shape).astype(np.float32)
    sat = rng.random(shape) < 0.05
    ab = MultiplexImage(data, [Channel(n, fluor=n) for n in planes], pixel_size_um=0.5)
    panel = Panel("p", [Marker("HER2", "QD655", "membrane"), Marker("ER", "QD605", "nucleus")])
    df = quantify(_Unmixed(ab, resid, sat), seg, panel)
    assert "HER2_membrane_mean" in df.columns and "ER_nucleus_mean" in df.columns
    assert not any(c.startswith("QD") for c in df.columns)
    for lab in df.index[::9]:
        m = seg.cells == lab
        assert df.at[lab, "residual_mean"] == pytest.approx(resid[m].mean(), rel=1e-6)
        assert df.at[lab, "saturated_fraction"] == pytest.approx(sat[m].mean())
        tot = data[:, m].astype(np.float64).sum()
        assert df.at[lab, "af_fraction"] == pytest.approx(data[3][m].sum() / tot, rel=1e-6)


def test_errors_name_what_was_expected():
    img = np.zeros((2, 10, 10), np.float32)
    with pytest.raises(InputError, match="channel_names"):
        quantify(img, np.zeros((10, 10), np.uint32))
    with pytest.raises(InputError, match="C=3"):
        quantify(img, np.zeros((10, 10), np.uint32), channel_names=["a", "b", "c"])
    with pytest.raises(SegmentationError, match=r"\(10, 10\)"):
        quantify(img, np.zeros((9, 10), np.uint32), channel_names=["a", "b"])
    with pytest.raises(InputError, match="statistics"):
        quantify(img, np.zeros((10, 10), np.uint32), channel_names=["a", "b"], stats=("mode",))
    with pytest.raises(SegmentationError, match="integer"):
        quantify(img, np.zeros((10, 10), np.float32), channel_names=["a", "b"])


def test_panel_compartments_keep_each_markers_own():
    from qdplex.panel import Marker, Panel

    seg = _synthetic_seg(seed=11)
    img = np.random.default_rng(0).random((2,) + seg.cells.shape).astype(np.float32)
    panel = Panel("p", [Marker("HER2", "QD655", "membrane"), Marker("ER", "QD605", "nucleus")],
                  quantification={"compartments": ["cell"]})
    df = quantify(img, seg, panel, channel_names=["QD655", "QD605"])
    comps = {c.split("_")[1] for c in df.columns if c.startswith(("HER2_", "ER_"))}
    assert comps == {"membrane", "nucleus", "cell"}
    with pytest.raises(SegmentationError, match="absent"):
        acc = Accumulator(["a"], seg.cells.shape)
        accumulate_block(acc, img[:1], seg.cells, seg.nuclei)
        finalize(acc, cell_ids=[999_999])


def test_fraction_above_equals_numpy():
    seg = _synthetic_seg(seed=13)
    plane = np.random.default_rng(4).random(seg.cells.shape)
    ids = np.unique(seg.membrane[seg.membrane > 0])
    got = fraction_above(plane, seg.membrane, 0.7, ids=np.r_[ids, 123456])
    want = [np.mean(plane[seg.membrane == i] >= 0.7) for i in ids]
    np.testing.assert_allclose(got[:-1], want)
    assert np.isnan(got[-1])


@pytest.mark.parametrize("factor", [1, 97, 100_003])  # direct IDs, flag-mapped IDs, sparse huge IDs
def test_label_id_ranges_give_the_same_table(factor):
    seg = _synthetic_seg((90, 110), n=30, seed=17)
    img = np.random.default_rng(5).random((2,) + seg.cells.shape).astype(np.float32)
    base = quantify(img, seg, channel_names=["a", "b"])
    big = Segmentation(seg.nuclei.astype(np.uint64) * factor, seg.cells.astype(np.uint64) * factor)
    big.__dict__["membrane"] = seg.membrane.astype(np.uint64) * factor
    mi = MultiplexImage(img, [Channel("a"), Channel("b")])
    mi.data = mi.data.rechunk((2, 40, 50))
    got = quantify(mi, big)
    np.testing.assert_array_equal(got.index.to_numpy(), base.index.to_numpy() * factor)
    np.testing.assert_allclose(got.to_numpy(), base.to_numpy(), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- exact sums, order statistics by tile
def _run_order_sums(img, slots):
    """Per accumulator row: the sums of the pixels of each run of one row along x, each run summed
    left to right from 0.0 and then added to the row's total — the summation order of qdplex's
    accumulation, written out in Python (so the compiled kernel can be checked bit for bit)."""
    C, H, W = img.shape
    s1, s2 = {}, {}
    for y in range(H):
        x = 0
        while x < W:
            p, x0 = slots[y, x], x
            while x < W and slots[y, x] == p:
                x += 1
            if p == 0:
                continue
            t1, t2 = s1.setdefault(p, [0.0] * C), s2.setdefault(p, [0.0] * C)
            for k in range(C):
                a1 = a2 = 0.0
                for xx in range(x0, x):
                    v = float(img[k, y, xx])
                    a1 += v
                    a2 += v * v
                t1[k] += a1
                t2[k] += a2
    return s1, s2


def test_compartment_sums_follow_the_run_order_bit_for_bit():
    seg = _synthetic_seg((60, 70), n=14, seed=19)
    rng = np.random.default_rng(6)
    img = rng.gamma(2.0, 50.0, size=(5,) + seg.cells.shape).astype(np.float32)  # 4 + 1 channels
    names = list("abcde")
    acc = accumulate_block(Accumulator(names, seg.cells.shape), img, seg.cells, seg.nuclei, seg.membrane)
    acc.consolidate()
    for comp, lab in (("nucleus", seg.nuclei), ("cytoplasm", seg.cytoplasm), ("membrane", seg.membrane)):
        s1, s2 = _run_order_sums(img, lab)
        k = COMPARTMENTS.index(comp)
        rows = np.searchsorted(acc.labels, np.array(sorted(s1), np.uint64))
        np.testing.assert_array_equal(acc.sum[k, rows], np.array([s1[i] for i in sorted(s1)]), err_msg=comp)
        np.testing.assert_array_equal(acc.sumsq[k, rows], np.array([s2[i] for i in sorted(s2)]), err_msg=comp)


def _odd_segmentation():
    """Synthetic cells plus two awkward cases: a nucleus far outside its own cell, and a big cell."""
    seg = _synthetic_seg((110, 140), n=45, seed=23)
    nuclei, cells = seg.nuclei.copy(), seg.cells.copy()
    some = int(np.unique(cells[cells > 0])[3])
    nuclei[100:106, 130:137] = some  # this cell's nucleus also has pixels far away
    cells[2:60, 2:9] = 77_777  # a long thin cell crossing many tiles
    out = Segmentation(nuclei, cells, membrane_width_px=2)
    return out


def test_median_quantiles_by_tile_equal_whole_image():
    from qdplex.quantify import label_extents, order_stats_for, owned

    seg = _odd_segmentation()
    rng = np.random.default_rng(8)
    img = rng.gamma(2.0, 50.0, size=(3,) + seg.cells.shape).astype(np.float32)
    names = ["A", "B", "C"]
    kw = dict(stats=("mean", "median"), quantiles=(0.1, 0.5, 0.975))
    whole = quantify(img, seg, channel_names=names, **kw)
    mi = MultiplexImage(img, [Channel(n) for n in names])
    mi.data = mi.data.rechunk((3, 27, 41))  # order statistics per chunk, for the cells it owns
    tiled = quantify(mi, seg, **kw)
    cols = [c for c in whole.columns if c.endswith(("_median", "_q10", "_q50", "_q97_5"))]
    assert len(cols) == 3 * 4 * 4
    pd.testing.assert_frame_equal(tiled[cols], whole[cols], check_exact=True)
    # against numpy, for each compartment (the odd nucleus included)
    for comp in COMPARTMENTS:
        lab = seg.compartment(comp)
        for cid in list(whole.index[::9]) + [77_777]:
            vals = img[1][lab == cid].astype(np.float64)
            got = whole.at[cid, f"B_{comp}_q97_5"]
            assert (np.isnan(got) and vals.size == 0) or got == np.quantile(vals, 0.975)
    # by hand, as a run layer would: tiles of 50×50 rows/cols, each giving the cells it owns
    ids = whole.index.to_numpy()
    ext = label_extents(ids, seg.cells, seg.nuclei, seg.membrane, strip=17)
    parts = []
    for y0 in range(0, 110, 50):
        for x0 in range(0, 140, 50):
            mine = owned(whole["Y_centroid"], whole["X_centroid"], (y0, y0 + 50, x0, x0 + 50))
            parts.append(order_stats_for(img, seg.cells, seg.nuclei, seg.membrane, ids[mine], ext[mine], names,
                                         COMPARTMENTS, **kw))
    by_hand = pd.concat(parts).sort_index()
    assert by_hand.index.is_unique and len(by_hand) == len(ids)
    pd.testing.assert_frame_equal(by_hand[cols], whole[cols], check_exact=True)


def test_label_extents_equal_numpy():
    from qdplex.quantify import label_extents

    seg = _odd_segmentation()
    ids = np.unique(seg.cells[seg.cells > 0])
    ext = label_extents(np.r_[ids, 10**9], seg.cells, seg.nuclei, strip=13)
    for i, cid in enumerate(ids):
        ys, xs = np.nonzero((seg.cells == cid) | (seg.nuclei == cid))
        assert ext[i].tolist() == [ys.min(), ys.max(), xs.min(), xs.max()]
    assert ext[-1, 1] < ext[-1, 0]  # absent: an empty box


def test_order_stats_read_zarr_labels_by_window(tmp_path):
    """Labels on disk (the slide path's disk storage): the same medians, read tile by tile."""
    import zarr

    from qdplex.model import Segmentation

    seg = _odd_segmentation()
    img = np.random.default_rng(9).gamma(2.0, 50.0, size=(2,) + seg.cells.shape).astype(np.float32)
    root = zarr.open_group(str(tmp_path / "labels.zarr"), mode="w")
    arrays = []
    for name in ("nuclei", "cells", "membrane"):
        z = root.create_array(name, shape=seg.cells.shape, chunks=(32, 32), dtype=np.uint32)
        z[:] = getattr(seg, name)
        arrays.append(z)
    disk = Segmentation(arrays[0], arrays[1], seg.membrane_width_px, stored_membrane=arrays[2])
    mi = MultiplexImage(img, [Channel("A"), Channel("B")])
    mi.data = mi.data.rechunk((2, 32, 32))
    kw = dict(stats=("median",), quantiles=(0.25,), compartments=("nucleus", "membrane", "cell"))
    got = quantify(mi, disk, **kw)
    want = quantify(img, seg, channel_names=["A", "B"], **kw)
    cols = [c for c in want.columns if c.endswith(("_median", "_q25"))]
    pd.testing.assert_frame_equal(got[cols], want[cols], check_exact=True)
