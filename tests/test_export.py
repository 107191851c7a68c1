"""SpatialData and QuPath GeoJSON exports of a finished slide folder, checked against cells.csv and the labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qdplex.export.geojson import cells_geojson, label_polygons

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory) -> Path:
    """OUT/sample from the bundled sample slide (no QC report: not what is tested here)."""
    from qdplex.batch import process_slide

    out = tmp_path_factory.mktemp("out")
    row = process_slide(SAMPLE / "slides" / "sample.ome.tif", SAMPLE / "panel.toml", out, report=False)
    assert row["status"] == "ok", row
    return out / "sample"


def _labels(slide_dir: Path, name: str) -> np.ndarray:
    from qdplex.io import read_labels

    return read_labels(slide_dir / f"{name}.ome.tif")


# --------------------------------------------------------------------------- GeoJSON
def test_polygons_follow_pixel_edges():
    shapely = pytest.importorskip("shapely.geometry")
    lab = np.zeros((20, 30), np.uint32)
    lab[2:12, 3:13] = 1                       # a 10×10 square
    lab[5:15, 20:28] = 2
    lab[8:11, 23:25] = 0                      # with a hole: the outline is filled
    lab[16, 1] = lab[17, 2] = 3               # two pixels touching at a corner only: two parts
    geoms = label_polygons(lab)
    square = shapely.shape(geoms[1])
    assert square.is_valid and square.area == pytest.approx(100 - 4 / 32)
    assert square.bounds == (3.0, 2.0, 13.0, 12.0)  # pixel corners, x = column, y = row
    holed = shapely.shape(geoms[2])
    assert holed.is_valid and len(holed.interiors) == 0 and holed.area == pytest.approx(80 - 4 / 32)
    parts = shapely.shape(geoms[3])
    assert geoms[3]["type"] == "MultiPolygon" and parts.is_valid and parts.area == pytest.approx(2 * (1 - 4 / 32))


def test_cells_geojson_matches_labels_and_table(slide_dir):
    shapely = pytest.importorskip("shapely.geometry")
    from qdplex.export import write_cells_geojson

    path = write_cells_geojson(slide_dir)
    assert path == slide_dir / "cells.geojson"
    doc = json.loads(path.read_text(encoding="utf-8"))
    table = pd.read_csv(slide_dir / "cells.csv")
    cells, nuclei = _labels(slide_dir, "cells"), _labels(slide_dir, "nuclei")
    feats = doc["features"]
    assert doc["type"] == "FeatureCollection" and len(feats) == len(table) > 20
    assert len({f["id"] for f in feats}) == len(feats)
    cell_area = np.bincount(cells.ravel())
    nuc_area = np.bincount(nuclei.ravel(), minlength=len(cell_area))
    positive = [c for c in table.columns if c.endswith("_positive")]
    numeric = table.select_dtypes(include=["number", "bool"])
    for f, (_, row), (_, nrow) in zip(feats, table.iterrows(), numeric.iterrows()):
        cid = int(row["CellID"])
        props = f["properties"]
        assert props["objectType"] == "cell" and props["measurements"]["CellID"] == cid
        cell = shapely.shape(f["geometry"])
        assert cell.is_valid and abs(cell.area - cell_area[cid]) <= 0.05 * cell_area[cid], cid
        assert cell.area == pytest.approx(row["Area"], rel=0.05)
        if nuc_area[cid]:
            nucleus = shapely.shape(f["nucleusGeometry"])
            assert nucleus.is_valid and abs(nucleus.area - nuc_area[cid]) <= 0.05 * nuc_area[cid], cid
            assert cell.buffer(1e-6).contains(nucleus), cid
        # measurements: every numeric column of cells.csv, equal; NaN left out
        m = props["measurements"]
        for col, v in nrow.items():
            if pd.isna(v):
                assert col not in m
            else:
                assert m[col] == pytest.approx(float(v), rel=1e-12, abs=0), (cid, col)
        # classification: the markers the cell is positive for
        pos = [c[: -len("_positive")] for c in positive if bool(row[c])]
        if pos:
            assert props["classification"]["name"] == ": ".join(pos)
        else:
            assert "classification" not in props
    # the centroid of each outline sits on the table's centroid (same pixel convention, +0.5)
    f0, r0 = feats[0], table.iloc[0]
    c = shapely.shape(f0["geometry"]).centroid
    assert abs(c.x - (r0["X_centroid"] + 0.5)) < 1.0 and abs(c.y - (r0["Y_centroid"] + 0.5)) < 1.0


def test_cells_geojson_refuses_a_cell_without_pixels():
    from qdplex.errors import InputError

    lab = np.zeros((8, 8), np.uint32)
    lab[1:4, 1:4] = 1
    with pytest.raises(InputError, match="without pixels"):
        cells_geojson(lab, lab, pd.DataFrame({"CellID": [1, 2]}))


# --------------------------------------------------------------------------- SpatialData
def test_spatialdata_round_trip(slide_dir, tmp_path):
    sd = pytest.importorskip("spatialdata", reason="spatialdata not installed (pip install 'qdplex[spatialdata]')")
    from spatialdata.transformations import get_transformation

    from qdplex.export import write_spatialdata
    from qdplex.io import read_image

    out = write_spatialdata(slide_dir, tmp_path / "sample.zarr")
    sdata = sd.read_zarr(out)
    table = pd.read_csv(slide_dir / "cells.csv")
    cells = _labels(slide_dir, "cells")
    unmixed = read_image(slide_dir / "unmixed.ome.tif")
    # images: raw and unmixed, multiscale, planes named
    assert set(sdata.images) == {"raw", "unmixed"} and set(sdata.labels) == {"nuclei", "cells"}
    assert len(sdata.images["unmixed"]) >= 2 and len(sdata.images["raw"]) >= 2
    assert list(sdata.images["unmixed"]["scale0"]["image"].coords["c"].values) == list(unmixed.channel_names)
    planes = sdata.images["unmixed"]["scale0"]["image"].values
    assert np.array_equal(planes, unmixed.data.compute())
    raw = read_image(SAMPLE / "slides" / "sample.ome.tif")
    assert np.array_equal(sdata.images["raw"]["scale0"]["image"].values, raw.data.compute())
    # pixel size as a scale transformation to the global (µm) coordinate system
    for name in ("raw", "unmixed", "nuclei", "cells"):
        t = get_transformation(sdata[name], to_coordinate_system="global")
        assert np.allclose(t.to_affine_matrix(("y", "x"), ("y", "x"))[:2, :2], np.diag([unmixed.pixel_size_um] * 2))
    labels = sdata.labels["cells"]["scale0"]["image"].values
    assert np.array_equal(labels, cells)
    # the table annotates the cells labels; joined, every row is a label present in the image
    t = sdata.tables["table"]
    attrs = t.uns["spatialdata_attrs"]
    assert attrs["region"] == "cells" and attrs["instance_key"] == "instance_id"
    _, joined = sd.join_spatialelement_table(sdata, spatial_element_names="cells", table_name="table", how="left")
    assert joined.n_obs == len(table)
    ids = joined.obs["instance_id"].to_numpy()
    assert set(ids) == set(np.unique(cells)) - {0}
    rows = table.set_index("CellID").loc[ids]
    markers = list(t.var_names)
    assert markers == ["HER2", "ER", "PR", "EGFR", "mTOR"]
    assert np.allclose(np.asarray(joined.X), rows[markers].to_numpy(np.float32))
    assert np.array_equal(np.bincount(labels.ravel())[ids], rows["Area"].to_numpy())
    assert np.allclose(joined.obsm["spatial"], rows[["X_centroid", "Y_centroid"]].to_numpy())


def test_spatialdata_without_raw_and_a_moved_input(slide_dir, tmp_path):
    sd = pytest.importorskip("spatialdata", reason="spatialdata not installed (pip install 'qdplex[spatialdata]')")
    from qdplex.errors import InputError
    from qdplex.export import to_spatialdata

    assert "raw" not in to_spatialdata(slide_dir, raw=False).images
    with pytest.raises(InputError, match="raw slide"):
        to_spatialdata(slide_dir, raw=tmp_path / "moved.ome.tif")
    assert sd  # imported


def test_export_command_and_a_forced_rerun(tmp_path, capsys):
    """`qdplex export geojson` writes into the slide folder and lists the file in its record,
    so `qdplex run --force` still replaces the folder (qdplex wrote everything in it)."""
    import shutil

    from qdplex.cli import main

    out = tmp_path / "OUT"
    assert main(["run", str(SAMPLE / "slides"), "--panel", str(SAMPLE / "panel.toml"), "--out", str(out),
                 "--scheduler", "synchronous", "--quiet", "--no-report"]) == 0
    capsys.readouterr()
    assert main(["export", "geojson", str(out / "sample")]) == 0
    assert capsys.readouterr().out.strip().endswith("cells.geojson")
    record = json.loads((out / "sample" / "run.json").read_text())["batch"]["outputs"]
    from qdplex.provenance import file_sha256

    assert record["cells.geojson"] == file_sha256(out / "sample" / "cells.geojson")
    assert main(["run", str(SAMPLE / "slides"), "--panel", str(SAMPLE / "panel.toml"), "--out", str(out),
                 "--scheduler", "synchronous", "--quiet", "--no-report", "--force"]) == 0
    assert not (out / "sample" / "cells.geojson").exists()
    assert main(["export", "geojson", str(out / "sample"), str(out / "sample"), "--out", str(tmp_path / "x")]) == 2
    assert "one SLIDE_DIR with --out" in capsys.readouterr().err
    shutil.rmtree(out)


def test_run_writes_the_exports_and_resumes_them(tmp_path, capsys):
    """`qdplex run --geojson` (and `--format spatialdata`) write the exports into each slide
    folder; they are part of the completion record (a rerun skips), and a rerun without the
    option recomputes (the option is part of the slide's identity)."""
    from qdplex.cli import main

    out = tmp_path / "OUT"
    fmt = ["--format", "spatialdata"] if _has("spatialdata") else []
    args = ["run", str(SAMPLE / "slides"), "--panel", str(SAMPLE / "panel.toml"), "--out", str(out),
            "--scheduler", "synchronous", "--quiet", "--no-report"]
    assert main(args + ["--geojson"] + fmt) == 0
    doc = json.loads((out / "sample" / "cells.geojson").read_text())
    table = pd.read_csv(out / "sample" / "cells.csv")
    assert len(doc["features"]) == len(table) > 0
    if fmt:
        import spatialdata

        sd = spatialdata.read_zarr(out / "sample" / "spatialdata.zarr")
        assert len(sd.tables["table"]) == len(table)
    m = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert list(m["action"]) == ["computed"] and "cells.geojson" in m["outputs"].iloc[0]
    assert main(args + ["--geojson"] + fmt) == 0
    assert list(pd.read_csv(out / "manifest.csv", keep_default_na=False)["action"]) == ["skipped"]
    assert main(args) == 0
    assert list(pd.read_csv(out / "manifest.csv", keep_default_na=False)["action"]) == ["computed"]
    assert not (out / "sample" / "cells.geojson").exists()
    capsys.readouterr()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
