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
