"""Panel files: the documented form works; every error names the file, key, expected and found."""

from __future__ import annotations

import pytest

from qdplex.errors import PanelError
from qdplex.panel import canonical_fluor, read_panel

DOC_FORM = '''
name = "breast-5plex"
nuclear_stain = "DAPI"

[[markers]]
name = "HER2"
fluor = "QD655"
compartment = "membrane"      # nucleus | cytoplasm | membrane | cell

[[markers]]
name = "ER"
fluor = "QD605"
compartment = "nucleus"

[spectra]
files = ["library.csv"]

[autofluorescence]
control = "unstained.ome.tif"
'''


def test_documented_form_reads(tmp_path):
    (tmp_path / "library.csv").write_text("wavelength_nm,QD655\n600,0.1\n655,1\n700,0.1\n")
    (tmp_path / "unstained.ome.tif").write_bytes(b"")
    p = tmp_path / "panel.toml"
    p.write_text(DOC_FORM)
    panel = read_panel(p)
    assert panel.name == "breast-5plex"
    assert panel.marker_names == ["HER2", "ER"]
    assert [m.compartment for m in panel.markers] == ["membrane", "nucleus"]
    assert panel.fluors == ["DAPI", "QD655", "QD605"]
    assert panel.spectra_files == [tmp_path / "library.csv"]
    assert panel.autofluorescence_control == tmp_path / "unstained.ome.tif"
    assert panel.fluor_to_marker() == {"DAPI": "DAPI", "QD655": "HER2", "QD605": "ER"}


def test_all_pipelines_read(breast_panel_path):
    for p in sorted(breast_panel_path.parent.glob("*.toml")):
        panel = read_panel(p)
        assert panel.markers, p


@pytest.mark.parametrize("name,expected", [("Qdot 655", "QD655"), ("qd605", "QD605"), ("QD-525", "QD525"),
                                           ("Qdot800", "QD800"), ("DAPI", "DAPI")])
def test_canonical_fluor(name, expected):
    assert canonical_fluor(name) == expected


@pytest.mark.parametrize(
    "body,key,found",
    [
        ('nuclear_stain = "DAPI"\n[[markers]]\nname="A"\nfluor="QD655"', "'name'", "key missing"),
        ('name = "x"', "'markers'", "nothing"),
        ('name = "x"\n[[markers]]\nname="A"\nfluor="QD655"\ncompartment="nuclear"', "markers[0].compartment", "'nuclear'"),
        ('name = "x"\n[[markers]]\nname="A"\nfluor="QD655"\nthreshold=-1', "markers[0].threshold", "-1"),
        ('name = "x"\ncolour = 1\n[[markers]]\nname="A"\nfluor="QD655"', "'colour'", "'colour'"),
        ('name = "x"\n[[markers]]\nname="A"\nfluor="QD655"\n[[markers]]\nname="A"\nfluor="QD605"', "markers[].name", "['A']"),
        ('name = "x"\n[[markers]]\nname="A"\nfluor="QD655"\n[[markers]]\nname="B"\nfluor="Qdot 655"', "markers[].fluor", "['QD655']"),
        ('name = "x"\n[[markers]]\nname="A"\nfluor="QD655"\n[spectra]\nfiles=["nope.csv"]', "spectra.files", "nope.csv"),
        ('name = "x"\n[[markers]]\nname="A"\nfluor="QD655"\n[unmixing]\nmethod="pca"', "unmixing.method", "'pca'"),
        ('name = "x"\n[[markers]]\nname="A"\nfluor="QD655"\n[segmentation]\nexpand_um="far"', "segmentation.expand_um", "'far'"),
        ('name = "x"\n[[markers]]\nname="A"\nfluor="QD655"\n[autofluorescence]\ncontrol="none.tif"', "autofluorescence.control", "none.tif"),
        ('name = "x"\n[[markers]]\nname="A"\nfluor="QD655"\n[image]\ncamera_offset=-5', "image.camera_offset", "-5"),
        ('name = "x"\n[[markers]]\nname="A"\nfluor="QD655"\n[scoring]\nmethd="gmm"', "scoring.methd", "'methd'"),
    ],
)
def test_errors_name_file_key_expected_found(tmp_path, body, key, found):
    p = tmp_path / "bad.toml"
    p.write_text(body)
    with pytest.raises(PanelError) as e:
        read_panel(p)
    msg = str(e.value)
    assert str(p) in msg and key in msg and "expected" in msg and found in msg, msg


def test_syntax_error_and_missing_file(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("name = ")
    with pytest.raises(PanelError, match="broken.toml.*expected valid TOML"):
        read_panel(p)
    with pytest.raises(PanelError, match="missing.toml.*no such file"):
        read_panel(tmp_path / "missing.toml")


def test_camera_offset_precedence(tmp_path):
    from qdplex.model import MultiplexImage

    img = MultiplexImage(__import__("numpy").zeros((1, 4, 4)), ["c"], metadata={"camera_offset": 100.0})
    base = 'name = "x"\n[[markers]]\nname="A"\nfluor="QD655"\n'
    cases = [("", 100.0), ("[image]\ncamera_offset = 90\n", 90.0),
             ("[image]\ncamera_offset = 90\n[unmixing]\noffset = 80\n", 80.0)]
    for extra, expected in cases:
        p = tmp_path / "p.toml"
        p.write_text(base + extra)
        assert read_panel(p).camera_offset_for(img) == expected
    p.write_text(base)
    assert read_panel(p).camera_offset_for(MultiplexImage(__import__("numpy").zeros((1, 4, 4)), ["c"])) is None


FULL = '''
name = "every-key"
description = "a panel that sets every key"
nuclear_stain = "Hoechst"

[[markers]]
name = "HER2"
fluor = "Qdot 655"
compartment = "membrane"
threshold = 0.5
antibody = "4B5"
description = "HER2"

[[markers]]
name = "ER"
fluor = "QD605"
compartment = "nucleus"
threshold = "gmm"

[[markers]]
name = "PR"
fluor = "QD565"

[spectra]
files = ["library.csv"]

[autofluorescence]
control = "unstained.ome.tif"
components = 2

[image]
pixel_size_um = 0.5
camera_offset = 100

[unmixing]
method = "poisson"
offset = [100, 101, 102]
saturation = 4095
exclude_saturated = true
refine = false

[segmentation]
method = "stardist"
model = "models/nuclei.onnx"
diameter_um = 8.5
expand_um = 4
membrane_width_um = 1.5
membrane_guided = true
tile = 1024
overlap = 64

[quantification]
stats = ["mean", "std", "sum", "median"]
quantiles = [0.5, 0.9]
compartments = ["nucleus", "membrane"]

[scoring]
method = "control"
control_quantile = 0.95
cutoffs = { HER2 = [0.5, 1.0, 2.0] }
allred = ["ER", "PR"]
her2 = "HER2"
complete = 0.8
phenotype = ["ER", "PR", "HER2"]

[synth]
nuclear_brightness = 2.0
'''


def _full(tmp_path):
    (tmp_path / "library.csv").write_text("wavelength_nm,QD655\n600,0.1\n655,1\n700,0.1\n")
    (tmp_path / "unstained.ome.tif").write_bytes(b"II*\0")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "nuclei.onnx").write_bytes(b"onnx")
    p = tmp_path / "every.toml"
    p.write_text(FULL)
    return read_panel(p)


def test_typed_settings_hold_every_key(tmp_path):
    from pathlib import Path

    s = _full(tmp_path).settings
    assert s.image.pixel_size_um == 0.5 and s.image.camera_offset == 100.0
    assert s.autofluorescence.control == tmp_path / "unstained.ome.tif" and s.autofluorescence.components == 2
    u = s.unmixing
    assert (u.method, u.offset, u.saturation, u.exclude_saturated, u.refine) == ("poisson", (100.0, 101.0, 102.0),
                                                                                  4095.0, True, False)
    g = s.segmentation
    assert g.method == "stardist" and g.model == tmp_path / "models" / "nuclei.onnx" and isinstance(g.model, Path)
    assert (g.diameter_um, g.expand_um, g.membrane_width_um, g.membrane_guided, g.tile, g.overlap) == (
        8.5, 4.0, 1.5, True, 1024, 64)
    q = s.quantification
    assert q.stats == ("mean", "std", "sum", "median") and q.quantiles == (0.5, 0.9)
    assert q.compartments == ("nucleus", "membrane")
    c = s.scoring
    assert (c.method, c.control_quantile, c.her2, c.complete) == ("control", 0.95, "HER2", 0.8)
    assert c.cutoffs == {"HER2": (0.5, 1.0, 2.0)} and c.allred == ("ER", "PR") and c.phenotype == ("ER", "PR", "HER2")


def test_typed_defaults_written_once(tmp_path):
    from qdplex.panel import PanelSettings

    p = tmp_path / "p.toml"
    p.write_text('name = "x"\n[[markers]]\nname="A"\nfluor="QD655"\n')
    s = read_panel(p).settings
    assert s == PanelSettings()
    assert (s.unmixing.method, s.unmixing.offset, s.unmixing.refine) == ("nnls", "auto", True)
    assert (s.segmentation.method, s.segmentation.expand_um, s.segmentation.membrane_width_um) == ("auto", 5.0, 1.0)
    assert s.quantification.stats == ("mean", "std", "sum") and s.scoring.method == "mixture"
    assert s.autofluorescence.components == 1


def test_from_record_inverts_to_dict_for_every_key(tmp_path):
    """Every panel key survives Panel.to_dict → JSON (run.json) → Panel.from_record."""
    import json

    from qdplex.panel import Panel

    panel = _full(tmp_path)
    rec = json.loads(json.dumps(panel.to_dict()))
    back = Panel.from_record(rec)
    assert back == panel
    assert back.settings == panel.settings
    assert back.to_dict() == rec
    # the record stays readable when the files it names are gone
    for f in ("library.csv", "unstained.ome.tif", "models/nuclei.onnx"):
        (tmp_path / f).unlink()
    assert Panel.from_record(rec) == panel
    # a record from before description / synth were recorded reads with their defaults
    old = {k: v for k, v in rec.items() if k not in ("description", "synth")}
    assert Panel.from_record(old).description == "" and Panel.from_record(old).synth == {}


def test_auto_values_and_new_keys(tmp_path):
    base = 'name = "x"\n[[markers]]\nname="A"\nfluor="QD655"\n'
    p = tmp_path / "p.toml"
    p.write_text(base + '[unmixing]\noffset = "auto"\nrefine = true\n[autofluorescence]\ncomponents = "auto"\n'
                 '[segmentation]\nmethod = "classical"\n')
    panel = read_panel(p)
    assert panel.settings.unmixing.offset == "auto" and panel.settings.autofluorescence.components == "auto"
    from qdplex.model import MultiplexImage
    import numpy as np

    img = MultiplexImage(np.zeros((1, 4, 4)), ["c"], metadata={"camera_offset": 7.0})
    assert panel.camera_offset_for(img) == 7.0  # "auto": the file's recorded offset


@pytest.mark.parametrize("key,value", [("autofluorescence", 'spectrum = "af.csv"'), ("unmixing", "chunk = 512")])
def test_keys_never_read_are_gone(tmp_path, key, value):
    p = tmp_path / "p.toml"
    p.write_text(f'name = "x"\n[[markers]]\nname="A"\nfluor="QD655"\n[{key}]\n{value}\n')
    with pytest.raises(PanelError, match="never read"):
        read_panel(p)


def test_every_shipped_panel_round_trips_through_its_record(breast_panel_path):
    import json

    from qdplex.panel import Panel

    for p in sorted(breast_panel_path.parent.glob("*.toml")) + [breast_panel_path.parents[1] / "sample_data" / "panel.toml"]:
        panel = read_panel(p)
        back = Panel.from_record(json.loads(json.dumps(panel.to_dict())))
        assert back == panel and back.settings == panel.settings, p
