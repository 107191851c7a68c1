"""Spectral library: built-ins vs measured spectra, CSV, save/load, band sampling, controls, panels."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from qdplex.crosstalk import check_panel, format_panel_check
from qdplex.errors import SpectraError
from qdplex.model import Channel, MultiplexImage
from qdplex.panel import panel_from_dict
from qdplex.spectra import (
    BUILTIN_NAMES,
    SpectralLibrary,
    estimate_autofluorescence,
    estimate_spectrum,
    lambda_grid,
    library_for_panel,
)

# measured file -> built-in name
MEASURED = {
    "qdot525_em_pubspectra.csv": "QD525",
    "qdot565_em_pubspectra.csv": "QD565",
    "qdot585_em_pubspectra.csv": "QD585",
    "qdot585_em_thermo.csv": "QD585",
    "qdot605_em_pubspectra.csv": "QD605",
    "qdot655_em_pubspectra.csv": "QD655",
    "qdot655_em_thermo.csv": "QD655",
    "qdot705_em_thermo.csv": "QD705",
    "qdot800_em_thermo.csv": "QD800",
    "dapi_em_pubspectra.csv": "DAPI",
    "hoechst33258_em_pubspectra.csv": "Hoechst",
}


def measured_library(shared_data, files=None) -> SpectralLibrary:
    lib = SpectralLibrary()
    for f, name in MEASURED.items():
        if files is not None and f not in files:
            continue
        d = pd.read_csv(shared_data / "spectra" / f)
        lib.add(name, d["wavelength_nm"], d["intensity"], source=f"measured: {f}")
    return lib


def test_builtin_names_and_order():
    lib = SpectralLibrary.builtin()
    assert lib.names == ["QD525", "QD565", "QD585", "QD605", "QD625", "QD655", "QD705", "QD800",
                         "DAPI", "Hoechst", "AF"]
    assert tuple(lib.names) == BUILTIN_NAMES
    sub = SpectralLibrary.builtin(["Qdot 655", "dapi", "AF"])
    assert SpectralLibrary.builtin(["Hoechst 33342"]).names == ["Hoechst"] and "hoechst-33258" in lib
    assert lib.subset(["Hoechst 33342", "qdot 605"]).names == ["Hoechst 33342", "QD605"]
    assert sub.names == ["QD655", "DAPI", "AF"]
    for n in BUILTIN_NAMES:
        assert lib[n].source.startswith("builtin:")
    assert abs(lib.peak_nm("QD655") - 655) <= 1 and abs(lib.peak_nm("DAPI") - 461) <= 1
    with pytest.raises(SpectraError, match="QD999"):
        SpectralLibrary.builtin(["QD999"])


@pytest.mark.parametrize("fname", sorted(MEASURED))
def test_builtin_matches_measured_spectrum(shared_data, fname):
    """Cosine similarity ≥ 0.98 on a 10 nm band grid over the measured spectrum's range."""
    meas = measured_library(shared_data, [fname])
    name = MEASURED[fname]
    w0, w1 = meas[name].range_nm
    edges = np.arange(np.ceil(w0 / 10) * 10, w1 - 10 + 1e-9, 10.0)
    grid = [Channel(f"b{e:g}", emission_nm=e + 5, bandwidth_nm=10) for e in edges]
    a = meas.matrix(grid)[:, 0]
    b = SpectralLibrary.builtin([name]).matrix(grid)[:, 0]
    cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos >= 0.98, f"{name} vs {fname}: cosine {cos:.4f}"


def test_matrix_integrates_over_bands():
    lib = SpectralLibrary()
    wl = np.linspace(400, 800, 401)
    lib.add("flat", wl, np.ones_like(wl), source="test").add("ramp", wl, (wl - 400) / 400, source="test")
    chans = [Channel("a", 500, 20), Channel("b", 600, 1), Channel("c", 700, None), Channel("d", 450, 50)]
    M = lib.matrix(chans)
    # flat spectrum: band width; ramp: width × value at centre (linear)
    np.testing.assert_allclose(M[:, 0], [20, 1, 1, 50], rtol=1e-9)
    np.testing.assert_allclose(M[:, 1], [20 * 0.25, 0.5, 0.75, 50 * 0.125], rtol=1e-9)
    # filter channel = sum of the λ-stack bands it spans (same library, 10 nm vs 1 × 30 nm)
    b = SpectralLibrary.builtin(["QD605", "DAPI"])
    wide = b.matrix([Channel("f", 605, 30)])
    narrow = b.matrix([Channel(f"n{c}", c, 10) for c in (595, 605, 615)]).sum(axis=0)
    np.testing.assert_allclose(wide[0], narrow, rtol=1e-9)


def test_matrix_coverage_errors():
    lib = SpectralLibrary().add("QD655", [600, 650, 700], [0.5, 1.0, 0.8], source="cut")
    with pytest.raises(SpectraError, match=r"QD655.*600–700 nm.*channels span 415–725 nm"):
        lib.matrix(lambda_grid())
    # a spectrum that has tailed off at its ends is zero beyond them
    tail = SpectralLibrary().add("QD605", [580, 605, 630], [0.01, 1.0, 0.02], source="ok")
    M = tail.matrix(lambda_grid())
    assert M[0, 0] == 0 and M[19, 0] > 0
    with pytest.raises(SpectraError, match="no emission"):
        tail.matrix([Channel("x", 450, 10)])
    with pytest.raises(SpectraError, match="'nm\\?': expected an emission wavelength"):
        tail.matrix([Channel("nm?")])


def test_csv_canonical_names_merge_subset(tmp_path):
    wl = np.arange(400, 801, 5.0)
    df = pd.DataFrame({"wavelength_nm": wl,
                       "Qdot 655": np.exp(-0.5 * ((wl - 650) / 10) ** 2),
                       "MyDye": np.exp(-0.5 * ((wl - 520) / 20) ** 2)})
    df.loc[df.wavelength_nm > 700, "MyDye"] = np.nan  # shorter range is allowed
    p = tmp_path / "lib.csv"
    df.to_csv(p, index=False)
    csv = SpectralLibrary.from_csv(p)
    assert csv.names == ["QD655", "MyDye"] and "qd655" in csv and "Qdot655" in csv
    assert csv["MyDye"].range_nm == (400, 700)
    assert "lib.csv" in csv["QD655"].source
    merged = SpectralLibrary.builtin().merge(csv)
    assert merged.peak_nm("QD655") == 650  # the CSV overrides the built-in
    assert merged.names[: len(BUILTIN_NAMES)] == list(BUILTIN_NAMES)
    sub = merged.subset(["AF", "MyDye", "QD655"])
    assert sub.names == ["AF", "MyDye", "QD655"]
    with pytest.raises(SpectraError, match=r"\['QD999'\]"):
        merged.subset(["QD999"])
    bad = tmp_path / "bad.csv"
    bad.write_text("wl,QD605\n500,1\n")
    with pytest.raises(SpectraError, match="bad.csv.*wavelength_nm"):
        SpectralLibrary.from_csv(bad)
    bad.write_text("wavelength_nm,QD605\n500,1\n510,x\n")
    with pytest.raises(SpectraError, match="QD605.*'x'"):
        SpectralLibrary.from_csv(bad)


def test_save_load_roundtrip(tmp_path):
    lib = SpectralLibrary.builtin(["DAPI", "QD605"]).merge(
        SpectralLibrary().add("AF", [400, 500, 600, 700], [0.2, 1, 0.6, 0.1], source="estimated: test control"))
    p = lib.save(tmp_path / "lib.json")
    raw = json.loads(p.read_text())
    assert raw["format"] == "qdplex-spectral-library" and raw["version"] == 1
    back = SpectralLibrary.load(p)
    assert back.names == lib.names and back.sources() == lib.sources()
    chans = lambda_grid(450, 650, 10)
    np.testing.assert_array_equal(back.matrix(chans), lib.matrix(chans))
    raw["version"] = 99
    p.write_text(json.dumps(raw))
    with pytest.raises(SpectraError, match="version 1, found 99"):
        SpectralLibrary.load(p)


def _control(lib: SpectralLibrary, abund: np.ndarray, chans, *, offset=100.0, seed=0):
    rng = np.random.default_rng(seed)
    M = lib.matrix(chans)
    y = rng.poisson(np.einsum("ck,kyx->cyx", M, abund)) + offset
    return MultiplexImage(y.astype(np.uint16), chans, name="control")


def test_estimate_spectrum_from_single_stain_control():
    chans = lambda_grid(420, 720, 10)
    truth = SpectralLibrary.builtin(["QD605", "AF"])
    rng = np.random.default_rng(1)
    ab = np.zeros((2, 96, 96))
    ab[0] = (rng.random((96, 96)) < 0.1) * rng.uniform(50, 100, (96, 96))  # stained spots
    ab[1] = 5.0  # uniform tissue autofluorescence background
    est = estimate_spectrum(_control(truth, ab, chans), name="Qdot 605", offset=100)
    assert est.names == ["QD605"] and "single-stain control" in est["QD605"].source
    a, b = est.matrix(chans)[:, 0], truth.matrix(chans)[:, 0]
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.995
    assert abs(est.peak_nm("QD605") - 605) <= 10


def test_estimate_autofluorescence_components():
    chans = lambda_grid(420, 720, 10)
    wl = np.arange(380, 760, 1.0)
    truth = SpectralLibrary()
    truth.add("flavin", wl, np.exp(-0.5 * ((wl - 520) / 35) ** 2), source="t")
    truth.add("lipo", wl, np.exp(-0.5 * ((wl - 640) / 45) ** 2), source="t")
    rng = np.random.default_rng(2)
    ab = np.stack([rng.gamma(2.0, 10.0, (80, 80)), rng.gamma(1.0, 10.0, (80, 80))])
    img = _control(truth, ab, chans, offset=50)
    one = estimate_autofluorescence(img, offset=50)
    assert one.names == ["AF"]
    two = estimate_autofluorescence(img, 2, offset=50)
    assert two.names == ["AF", "AF2"]
    Mt = truth.matrix(chans)
    Me = two.matrix(chans)
    cos = (Me / np.linalg.norm(Me, axis=0)).T @ (Mt / np.linalg.norm(Mt, axis=0))
    assert cos[0, 0] > 0.99 and cos[1, 1] > 0.99, cos  # AF = the larger (flavin-like)


def test_library_for_panel(tmp_path):
    wl = np.arange(400, 801, 5.0)
    pd.DataFrame({"wavelength_nm": wl, "QD605": np.exp(-0.5 * ((wl - 600) / 12) ** 2)}).to_csv(
        tmp_path / "lib.csv", index=False)
    raw = {"name": "p", "markers": [{"name": "HER2", "fluor": "QD655", "compartment": "membrane"},
                                    {"name": "ER", "fluor": "Qdot 605", "compartment": "nucleus"}]}
    lib = library_for_panel(panel_from_dict(raw, base_dir=tmp_path))
    assert lib.names == ["DAPI", "QD655", "QD605", "AF"]
    assert lib["AF"].source.startswith("builtin:")
    raw["spectra"] = {"files": ["lib.csv"]}
    lib = library_for_panel(panel_from_dict(raw, base_dir=tmp_path), lambda_grid())
    assert lib.peak_nm("QD605") == 600 and "lib.csv" in lib["QD605"].source
    raw["markers"].append({"name": "X", "fluor": "MysteryDye"})
    with pytest.raises(SpectraError, match="MysteryDye"):
        library_for_panel(panel_from_dict(raw, base_dir=tmp_path))


def test_check_panel_reports_and_refuses_singular():
    lib = SpectralLibrary.builtin(["DAPI", "QD525", "QD565", "QD605", "QD655", "QD705", "AF"])
    chk = check_panel(lib, lambda_grid())
    assert chk.condition_number < 20
    assert chk.angles.loc["QD605", "QD655"] > 80 and chk.angles.loc["QD605", "QD605"] < 1e-3
    assert chk.crosstalk.loc["QD605", "QD605"] == pytest.approx(1.0)
    assert chk.crosstalk.loc["QD605", "QD655"] < 0.01
    text = format_panel_check(chk)
    assert "condition number" in text and "QD705" in text
    # nearly collinear pair: warned; identical pair: refused, naming it
    near = lib.merge(SpectralLibrary().add("QD610", lib["QD605"].wavelength_nm + 2, lib["QD605"].intensity,
                                            source="shifted"))
    chk = check_panel(near.subset(["QD605", "QD610", "QD655"]), lambda_grid())
    assert any("QD605 and QD610" in w for w in chk.warnings)
    twin = lib.merge(SpectralLibrary().add("Twin", lib["QD655"].wavelength_nm, lib["QD655"].intensity,
                                            source="copy"))
    with pytest.raises(SpectraError, match="QD655 and Twin"):
        check_panel(twin.subset(["QD605", "QD655", "Twin"]), lambda_grid())


def test_cli_check_panel(tmp_path, capsys):
    from qdplex.cli import main

    wl = np.arange(400, 801, 2.0)
    twin = np.exp(-0.5 * ((wl - 655) / 12) ** 2)
    pd.DataFrame({"wavelength_nm": wl, "QD655": twin, "Twin": twin}).to_csv(tmp_path / "lib.csv", index=False)
    panel = tmp_path / "p.toml"
    panel.write_text('name = "p"\n[[markers]]\nname = "HER2"\nfluor = "QD655"\n'
                     '[[markers]]\nname = "ER"\nfluor = "QD605"\n')
    assert main(["check-panel", str(panel)]) == 0
    out = capsys.readouterr().out
    assert "default λ-stack grid 420–720 nm in 10 nm steps" in out
    assert "condition number" in out and "crosstalk" in out and "QD605" in out
    panel.write_text(panel.read_text() + '[[markers]]\nname = "X"\nfluor = "Twin"\n[spectra]\nfiles = ["lib.csv"]\n')
    assert main(["check-panel", str(panel)]) == 2
    err = capsys.readouterr().err
    assert "QD655 and Twin" in err and err.count("\n") == 1


def test_library_for_panel_estimates_af_from_unstained_control_file(tmp_path):
    from qdplex.io import write_ome_tiff

    chans = lambda_grid(420, 720, 10)
    wl = np.arange(380, 760, 1.0)
    truth = SpectralLibrary()
    truth.add("flavin", wl, np.exp(-0.5 * ((wl - 520) / 35) ** 2), source="t")
    truth.add("lipo", wl, np.exp(-0.5 * ((wl - 640) / 45) ** 2), source="t")
    rng = np.random.default_rng(5)
    ab = np.stack([rng.gamma(2.0, 10.0, (64, 64)), rng.gamma(1.0, 10.0, (64, 64))])
    ctrl = _control(truth, ab, chans, offset=100)
    write_ome_tiff(tmp_path / "unstained.ome.tif", ctrl.data, ctrl.channels, pixel_size_um=0.5)
    raw = {"name": "p", "markers": [{"name": "HER2", "fluor": "QD655"}],
           "unmixing": {"offset": 100}, "autofluorescence": {"control": "unstained.ome.tif", "components": 2}}
    lib = library_for_panel(panel_from_dict(raw, base_dir=tmp_path), chans)
    assert lib.names == ["DAPI", "QD655", "AF", "AF2"]
    assert "unstained.ome.tif" in lib["AF"].source and "NMF component 1 of 2" in lib["AF"].source
    Mt = truth.matrix(chans)
    Me = lib.subset(["AF", "AF2"]).matrix(chans)
    cos = (Me / np.linalg.norm(Me, axis=0)).T @ (Mt / np.linalg.norm(Mt, axis=0))
    assert cos[0, 0] > 0.99 and cos[1, 1] > 0.99, cos
