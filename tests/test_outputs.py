"""The output module (issue 13 item 2): names of OUT/<slide>/, run.json written and read back,
and the panel recorded in run.json read back whole — by qdplex and by the napari reader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PANEL_TOML = """
name = "every-key"
description = "a panel that sets every key Panel.to_dict records"
nuclear_stain = "Hoechst"

[[markers]]
name = "HER2"
fluor = "Qdot 655"
compartment = "membrane"
threshold = 0.75

[[markers]]
name = "ER"
fluor = "QD605"
compartment = "nucleus"
threshold = "otsu"

[[markers]]
name = "Ki67"
fluor = "QD705"

[spectra]
files = ["spectra/measured.csv"]

[autofluorescence]
control = "controls/unstained.ome.tif"
components = 2

[image]
pixel_size_um = 0.325
camera_offset = 96.5

[unmixing]
method = "poisson"
saturation = 60000
exclude_saturated = true

[segmentation]
method = "classical"
diameter_um = 9.0
expand_um = 4.0
membrane_width_um = 1.5
membrane_guided = true
tile = 512
overlap = 40

[quantification]
stats = ["mean", "median", "max"]
quantiles = [0.1, 0.9]
compartments = ["cell", "membrane"]

[scoring]
method = "gmm"
control_quantile = 0.995
complete = 0.8
cutoffs = { HER2 = [0.5, 1.0, 2.0] }
"""


@pytest.fixture()
def every_key_panel(tmp_path):
    from qdplex.panel import read_panel

    d = tmp_path / "panel"
    (d / "spectra").mkdir(parents=True)
    (d / "controls").mkdir()
    (d / "spectra" / "measured.csv").write_text("wavelength_nm,QD705\n680,0.2\n705,1.0\n730,0.3\n")
    shutil.copy(ROOT / "sample_data" / "controls" / "sample_unstained.ome.tif", d / "controls" / "unstained.ome.tif")
    (d / "panel.toml").write_text(PANEL_TOML)
    return read_panel(d / "panel.toml")


def _same(a: dict, b: dict) -> None:
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}


def test_every_panel_key_round_trips_through_run_json(every_key_panel, tmp_path):
    from qdplex.outputs import panel_from_record, read_run_record, write_run_record

    panel = every_key_panel
    d = panel.to_dict()
    assert d["pixel_size_um"] == 0.325 and d["camera_offset"] == 96.5 and d["autofluorescence_components"] == 2
    assert d["spectra_files"] and d["autofluorescence_control"]
    write_run_record(tmp_path / "s1", {"panel": d})
    back = panel_from_record(read_run_record(tmp_path / "s1"))
    _same(back.to_dict(), d)
    # the panel file itself gone: the record alone still rebuilds it (files it names are absolute)
    (Path(d["path"])).unlink()
    _same(panel_from_record(read_run_record(tmp_path / "s1")).to_dict(), d)


def test_napari_reader_reads_the_recorded_panel_back(every_key_panel, tmp_path):
    from qdplex.napari._reader import _panel_from_run
    from qdplex.outputs import read_run_record, write_run_record

    write_run_record(tmp_path / "s1", {"panel": every_key_panel.to_dict()})
    back = _panel_from_run(read_run_record(tmp_path / "s1"))
    assert back is not None
    _same(back.to_dict(), every_key_panel.to_dict())


def test_a_record_whose_panel_files_are_gone_still_reads_back(every_key_panel, tmp_path):
    """A run.json is history: the panel reads back after the files it named are gone;
    a record that is not a panel is a PanelError (and a warning in the napari reader)."""
    from qdplex.errors import PanelError
    from qdplex.napari._reader import _panel_from_run
    from qdplex.outputs import panel_from_record

    rec = {"panel": every_key_panel.to_dict()}
    Path(rec["panel"]["spectra_files"][0]).unlink()
    _same(panel_from_record(rec).to_dict(), rec["panel"])
    bad = {"panel": dict(rec["panel"], markers="HER2")}
    with pytest.raises(PanelError, match="markers"):
        panel_from_record(bad)
    with pytest.warns(RuntimeWarning, match="cannot be read back"):
        assert _panel_from_run(bad) is None


def test_names_of_the_slide_folder(tmp_path):
    from qdplex.errors import OutputError, QdplexError
    from qdplex.outputs import find_image, image_path, report_path, slide_dir_in

    assert image_path(tmp_path, "cells", "zarr") == tmp_path / "cells.ome.zarr"
    assert image_path(tmp_path, "unmixed") == tmp_path / "unmixed.ome.tif"
    assert report_path(tmp_path) == tmp_path / "qc" / "report.html"
    assert find_image(tmp_path, "nuclei") is None
    (tmp_path / "nuclei.ome.zarr").mkdir()
    assert find_image(tmp_path, "nuclei") == tmp_path / "nuclei.ome.zarr"
    with pytest.raises(QdplexError):
        image_path(tmp_path, "membrane")
    for bad in ("..", "../victim", "a/b", "", "manifest.csv"):
        with pytest.raises(OutputError):
            slide_dir_in(tmp_path, bad)
    assert slide_dir_in(tmp_path, "s1") == tmp_path / "s1"
