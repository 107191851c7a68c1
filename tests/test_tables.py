"""Cell tables: MCQuant order, and files that pandas, scanpy and squidpy open."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from qdplex.errors import InputError
from qdplex.model import Channel, MultiplexImage, Segmentation
from qdplex.panel import Marker, Panel
from qdplex.quantify import quantify
from qdplex.tables import MCQUANT_MORPHOLOGY, cell_table, marker_columns, to_anndata, write_tables

PANEL = Panel(
    "t",
    [Marker("HER2", "QD655", "membrane", 1.5), Marker("ER", "QD605", "nucleus", "otsu"), Marker("mTOR", "QD525", "cytoplasm")],
)


@pytest.fixture(scope="module")
def quant():
    from skimage.segmentation import expand_labels

    rng = np.random.default_rng(0)
    shape = (80, 90)
    nuclei = np.zeros(shape, np.uint32)
    for k, (y, x) in enumerate([(y, x) for y in range(8, 80, 16) for x in range(8, 90, 16)]):
        nuclei[y - 3:y + 4, x - 3:x + 3] = 10 * (k + 1)  # non-contiguous IDs
    cells = expand_labels(nuclei, 4).astype(np.uint32)
    seg = Segmentation(nuclei, cells)
    ring = cells.copy()
    from scipy import ndimage as ndi

    inner = np.zeros_like(cells)
    for lab in np.unique(cells[cells > 0]):
        inner[ndi.binary_erosion(cells == lab, iterations=1)] = lab
    ring[inner > 0] = 0
    seg.__dict__["membrane"] = ring
    fl = ["DAPI", "QD655", "QD605", "QD525", "AF"]
    data = rng.gamma(2, 1, size=(len(fl),) + shape).astype(np.float32)
    img = MultiplexImage(data, [Channel(f, fluor=f) for f in fl], pixel_size_um=0.5)
    return quantify(img, seg, PANEL), quantify(img, seg)  # marker-named, fluor-named


def test_cell_table_mcquant_order(quant):
    by_marker, by_fluor = quant
    t = cell_table(by_marker, PANEL)
    cols = list(t.columns)
    assert cols[0] == "CellID"
    assert cols[1:4] == ["HER2", "ER", "mTOR"]
    ix = cols.index("X_centroid")
    assert cols[ix:ix + len(MCQUANT_MORPHOLOGY)] == list(MCQUANT_MORPHOLOGY)
    stats = cols[4:ix]
    assert stats and all(c.split("_")[0] in PANEL.marker_names for c in stats)
    assert len(stats) == 3 * 4 * 3  # markers × compartments × (mean, std, sum)
    assert marker_columns(t) == cols[1:ix]
    np.testing.assert_array_equal(t["HER2"], t["HER2_membrane_mean"])
    np.testing.assert_array_equal(t["ER"], t["ER_nucleus_mean"])
    np.testing.assert_array_equal(t["mTOR"], t["mTOR_cytoplasm_mean"])
    assert "DAPI_cell_mean" in cols[ix:] and "AF_nucleus_sum" in cols[ix:]
    np.testing.assert_array_equal(t["CellID"], by_marker.index)
    # a table quantified without the panel (fluor-named planes) gives the same result
    pd.testing.assert_frame_equal(cell_table(by_fluor, PANEL), t)


def test_cell_table_missing_compartment_is_explained(quant):
    by_marker, _ = quant
    with pytest.raises(InputError, match="HER2_membrane_mean"):
        cell_table(by_marker.drop(columns=["HER2_membrane_mean"]), PANEL)


def test_write_tables_open_in_pandas_scanpy_squidpy(quant, tmp_path):
    import anndata as ad
    import scanpy as sc

    t = cell_table(quant[0], PANEL)
    t["HER2_positive"] = t["HER2"] > t["HER2"].median()
    paths = write_tables(t, tmp_path / "slide", PANEL, provenance={"qdplex": "0.1.0", "none": None})
    assert set(paths) == {"cells_csv", "cells_parquet", "cells_h5ad"}
    csv = pd.read_csv(paths["cells_csv"])
    assert list(csv.columns) == list(t.columns)
    np.testing.assert_allclose(csv["HER2"], t["HER2"], rtol=1e-12)
    pq = pd.read_parquet(paths["cells_parquet"])
    pd.testing.assert_frame_equal(pq, t)
    assert not list((tmp_path / "slide").glob(".*"))  # no temporaries left

    a = sc.read_h5ad(paths["cells_h5ad"])
    assert a.shape == (len(t), 3) and list(a.var_names) == ["HER2", "ER", "mTOR"]
    np.testing.assert_allclose(a.X[:, 0], t["HER2"], rtol=1e-6)
    np.testing.assert_allclose(a.layers["membrane_mean"][:, 0], t["HER2_membrane_mean"], rtol=1e-6)
    np.testing.assert_allclose(a.layers["nucleus_std"][:, 1], t["ER_nucleus_std"], rtol=1e-6)
    assert {"Area", "Solidity", "HER2_positive", "DAPI_cell_mean"} <= set(a.obs.columns)
    np.testing.assert_allclose(a.obsm["spatial"], t[["X_centroid", "Y_centroid"]].to_numpy())
    assert a.var.loc["HER2", "compartment"] == "membrane" and a.var.loc["HER2", "fluor"] == "QD655"
    assert json.loads(a.uns["provenance"])["qdplex"] == "0.1.0"
    assert json.loads(a.uns["panel"])["name"] == "t"
    assert list(a.obs_names) == [str(i) for i in t["CellID"]]

    # scanpy and squidpy analyses run on it
    sc.pp.scale(a, layer="membrane_mean")
    import squidpy as sq

    sq.gr.spatial_neighbors(a, coord_type="generic", n_neighs=4)
    assert a.obsp["spatial_connectivities"].shape == (len(t), len(t))
    assert a.obsp["spatial_connectivities"].sum(axis=1).min() >= 4
    assert isinstance(ad.read_h5ad(paths["cells_h5ad"]).uns["provenance"], str)


def test_to_anndata_requires_markers(quant):
    t = cell_table(quant[0], PANEL).drop(columns=["ER"])
    with pytest.raises(InputError, match="ER"):
        to_anndata(t, PANEL)
