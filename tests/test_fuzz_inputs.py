"""Hostile and careless inputs (issue 15): each case fails in seconds with one clear QdplexError.

Every case asserts the outcome: the exception class, and that the message names the
file, the key (for panels), what was expected and what was found. The memory cases run
in a subprocess under an address-space limit (``RLIMIT_AS``), so a reader that
allocates by a number written in a file fails the test instead of the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tifffile

from qdplex.errors import InputError, OutputError, PanelError, SpectraError
from qdplex.io import find_slides, read_image, write_ome_zarr
from qdplex.panel import Panel, read_panel

SRC = str(Path(__file__).resolve().parents[1] / "src")
CHANNELS = ["DAPI", "QD655", "QD605"]
#: Address space of the memory-case subprocesses: imports fit, a 100000² plane (20 GB) does not.
LIMIT = 2 * 2**30


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging) when the body runs longer than ``seconds``."""
    def boom(*_):
        raise TimeoutError(f"no answer within {seconds} s (a read that never ends?)")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _data(shape=(3, 256, 256)):
    return np.random.default_rng(0).integers(100, 4000, shape).astype(np.uint16)


@pytest.fixture
def zarr_slide(tmp_path):
    return write_ome_zarr(tmp_path / "z.ome.zarr", _data(), CHANNELS, pixel_size_um=0.5, chunk=128)


def _under_limit(code: str, timeout: float = 60.0):
    """Run ``code`` in a fresh interpreter limited to :data:`LIMIT` bytes of address space."""
    script = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT}))\n{code}"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": SRC})
    return r, time.perf_counter() - t


_READ_ALL = """
from qdplex.errors import InputError
from qdplex.io import read_image
try:
    img = read_image({path!r}, channels={channels!r})
    img.data.sum().compute()
except InputError as e:
    print("InputError:", e)
    raise SystemExit(0)
print("read without error")
raise SystemExit(1)
"""


def _assert_fast_input_error(path, *needles):
    r, seconds = _under_limit(_READ_ALL.format(path=str(path), channels=CHANNELS))
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    line = r.stdout.strip()
    assert line.startswith("InputError:") and "\n" not in line, line
    assert str(path) in line and "expected" in line and "found" in line, line
    for n in needles:
        assert n in line, line
    assert seconds < 30, seconds
    return line


# --------------------------------------------------------------------------- 15.2 memory bounded by the work
def test_zarr_declaring_100000_squared_over_256_squared_fails_fast_under_memory_limit(zarr_slide):
    za = zarr_slide / "0" / ".zarray"
    meta = json.loads(za.read_text())
    meta["shape"] = [3, 100000, 100000]
    za.write_text(json.dumps(meta))
    _assert_fast_input_error(zarr_slide, "(3, 100000, 100000)", "found 12")


def test_zarr_declaring_a_huge_chunk_fails_fast_under_memory_limit(zarr_slide):
    za = zarr_slide / "0" / ".zarray"
    meta = json.loads(za.read_text())
    meta["shape"], meta["chunks"] = [3, 100000, 100000], [1, 100000, 100000]
    za.write_text(json.dumps(meta))
    _assert_fast_input_error(zarr_slide, "(1, 100000, 100000)", "MiB")


@pytest.mark.parametrize("layout,rows,needle", [
    ({}, False, "declared 100000×100000"),
    ({"tile": (128, 128)}, False, "declared 100000×100000"),
    ({"compression": "zlib"}, False, "declared 100000×100000"),
    ({}, True, "expected 20000000000 bytes of uncompressed pixels"),  # RowsPerStrip patched too: one strip
    ({"compression": "zlib"}, True, "decoded, found 19073 MiB"),
])
def test_tiff_with_patched_image_width_and_length_fails_fast_under_memory_limit(tmp_path, layout, rows, needle):
    path = tmp_path / "patched.tif"
    tifffile.imwrite(path, _data(), photometric="minisblack", **layout)
    with tifffile.TiffFile(path, mode="r+") as tif:
        for page in tif.pages:
            page.tags["ImageWidth"].overwrite(100000)
            page.tags["ImageLength"].overwrite(100000)
            if rows:
                page.tags["RowsPerStrip"].overwrite(100000)
    _assert_fast_input_error(path, needle)


def test_patched_label_tiff_fails_fast_under_memory_limit(tmp_path):
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, np.arange(256 * 256, dtype=np.uint32).reshape(256, 256), photometric="minisblack")
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(100000)
        tif.pages[0].tags["ImageLength"].overwrite(100000)
    code = (f"from qdplex.io import read_labels\nfrom qdplex.errors import InputError\n"
            f"try:\n    read_labels({str(path)!r})\nexcept InputError as e:\n    print(e)\n    raise SystemExit(0)\n"
            f"raise SystemExit(1)\n")
    r, seconds = _under_limit(code)
    assert r.returncode == 0 and "declared 100000×100000 page, found 1" in r.stdout and seconds < 30, r


def test_diameter_1e9_fails_at_panel_read_under_memory_limit(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('name = "x"\n[[markers]]\nname = "HER2"\nfluor = "QD655"\n[segmentation]\ndiameter_um = 1e9\n')
    code = (f"from qdplex.panel import read_panel\nfrom qdplex.errors import PanelError\n"
            f"try:\n    read_panel({str(p)!r})\nexcept PanelError as e:\n    print(e)\n    raise SystemExit(0)\n"
            f"raise SystemExit(1)\n")
    r, seconds = _under_limit(code)
    assert r.returncode == 0 and "segmentation.diameter_um" in r.stdout and "1000000000" in r.stdout, r
    assert "[1, 100]" in r.stdout and seconds < 30


# --------------------------------------------------------------------------- special files
def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_special_files_refused_as_slides(tmp_path):
    fifo = _fifo(tmp_path / "pipe.ome.tif")
    with deadline(20):
        for p, kind in ((Path("/dev/zero"), "character device"), (fifo, "FIFO")):
            with pytest.raises(InputError, match=f"{p}.*expected a slide file or folder.*found a {kind}"):
                read_image(p)
            with pytest.raises(InputError, match=f"found a {kind}"):
                find_slides(p)
        # inside a searched folder: a slide whose reading fails (an error row), never a hang
        folder = tmp_path / "in"
        folder.mkdir()
        (folder / "zero.tif").symlink_to("/dev/zero")
        found = find_slides(folder)
        assert found == [Path("/dev/zero")]
        with pytest.raises(InputError, match="character device"):
            read_image(found[0])


def test_special_sidecars_refused(tmp_path):
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, _data((3, 32, 32)), photometric="minisblack")
    _fifo(tmp_path / "s.channels.csv")
    with deadline(20):
        with pytest.raises(InputError, match=r"s\.channels\.csv: expected a channel CSV \(a regular file\), found a FIFO"):
            read_image(path)
        from qdplex.io import read_channels_csv

        with pytest.raises(InputError, match="expected a channel CSV file.*character device"):
            read_channels_csv("/dev/zero")


def test_special_files_inside_a_zarr_or_channel_folder_refused(tmp_path, zarr_slide):
    with deadline(20):
        za = zarr_slide / "0" / ".zarray"
        za.unlink()
        _fifo(za)
        with pytest.raises(InputError, match=r"0/\.zarray: expected \.zarray to be a regular file, found a FIFO"):
            read_image(zarr_slide)
        (zarr_slide / ".zattrs").unlink()
        (zarr_slide / ".zattrs").symlink_to("/dev/zero")
        assert find_slides(tmp_path) == [zarr_slide.resolve()]  # still a slide, not dropped
        with pytest.raises(InputError, match=r"expected \.zattrs to be a regular file, found a character device"):
            read_image(zarr_slide)
        folder = _channel_folder(tmp_path / "chans", 2)
        _fifo(folder / "channels.csv")
        assert folder.resolve() in find_slides(tmp_path)
        with pytest.raises(InputError, match=r"channels.csv: expected a channel CSV file .*found a FIFO"):
            read_image(folder)
        ok = write_ome_zarr(tmp_path / "ok.ome.zarr", _data((1, 64, 64)), ["a"], chunk=32)
        chunk = ok / "0" / "0" / "1" / "1"
        chunk.unlink()
        _fifo(chunk)
        with pytest.raises(InputError, match=r"expected chunk files, found a FIFO \(named pipe\) at chunk '0/1/1'"):
            read_image(ok)


@pytest.mark.parametrize("section,key,value,what", [
    ("autofluorescence", "control", "/dev/zero", "character device"),
    ("spectra", "files", '["/dev/zero"]', "character device"),
    ("segmentation", "model", "pipe", "FIFO"),
])
def test_special_files_named_by_a_panel_refused_at_read(tmp_path, section, key, value, what):
    _fifo(tmp_path / "pipe")
    v = value if value.startswith("[") else json.dumps(value)
    p = tmp_path / "p.toml"
    p.write_text(f'name = "x"\n[[markers]]\nname = "HER2"\nfluor = "QD655"\n[{section}]\n{key} = {v}\n')
    with deadline(20), pytest.raises(PanelError) as e:
        read_panel(p)
    msg = str(e.value)
    assert str(p) in msg and f"{section}.{key}" in msg and "expected" in msg and what in msg, msg


def test_panel_file_that_is_a_fifo_refused(tmp_path):
    with deadline(20), pytest.raises(PanelError, match="expected a panel TOML file.*FIFO"):
        read_panel(_fifo(tmp_path / "panel.toml"))


def test_hashing_refuses_devices_and_fifos(tmp_path):
    """The control /dev/zero used to pass validation and make the panel hashing read forever."""
    from qdplex.panel import Marker
    from qdplex.provenance import file_sha256, panel_sha256

    with deadline(20):
        for p in ("/dev/zero", _fifo(tmp_path / "pipe")):
            with pytest.raises(InputError, match="expected a file to hash.*found a (character device|FIFO)"):
                file_sha256(p)
        panel = Panel("p", [Marker("HER2", "QD655", "membrane")], autofluorescence_control=Path("/dev/zero"))
        with pytest.raises(InputError, match="/dev/zero"):
            panel_sha256(panel)


# --------------------------------------------------------------------------- 15.3 never zeros, never dropped
def test_missing_zarr_chunk_is_an_error_not_zeros(zarr_slide):
    (zarr_slide / "0" / "1" / "1" / "0").unlink()
    with pytest.raises(InputError) as e:
        read_image(zarr_slide)
    msg = str(e.value)
    assert str(zarr_slide) in msg and "expected 12 chunk files" in msg and "found 11" in msg and "'1/1/0'" in msg


def test_zarr_chunk_removed_after_opening_is_an_error_on_read(zarr_slide):
    img = read_image(zarr_slide)
    (zarr_slide / "0" / "2" / "0" / "1").unlink()
    with pytest.raises(InputError, match=r"z\.ome\.zarr: expected Zarr chunk '2/0/1', found no such file"):
        img.data.compute()


def test_short_zarr_chunks_are_errors(tmp_path, zarr_slide):
    chunk = zarr_slide / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])  # Blosc would decode this into garbage silently
    with pytest.raises(InputError, match=r"expected a Blosc chunk of \d+ bytes in '0/0/0'.*found 100 bytes"):
        read_image(zarr_slide).data.compute()
    import zarr

    raw = tmp_path / "raw.zarr"
    write_ome_zarr(raw, _data((1, 64, 64)), ["a"], chunk=32)
    # rewrite level 0 uncompressed, then cut one chunk short
    z = zarr.open_group(str(raw), mode="r+")
    data = z["0"][:]
    del z["0"]
    a = z.create_array("0", shape=data.shape, chunks=(1, 32, 32), dtype=data.dtype, compressors=None,
                       chunk_key_encoding={"name": "v2", "separator": "/"})
    a[:] = data
    c = raw / "0" / "0" / "1" / "1"
    c.write_bytes(c.read_bytes()[:-2])
    with pytest.raises(InputError, match=r"expected 2048 bytes in uncompressed Zarr chunk '0/1/1', found 2046"):
        read_image(raw).data.compute()


def test_qdplex_writes_every_zarr_chunk_even_all_zero(tmp_path):
    data = np.zeros((2, 256, 256), np.uint16)
    data[0, :8, :8] = 5
    path = write_ome_zarr(tmp_path / "zeros.ome.zarr", data, ["a", "b"], chunk=128)
    np.testing.assert_array_equal(read_image(path).data.compute(), data)  # complete: the check passes


def test_unparsable_zattrs_is_a_failing_slide_not_dropped(tmp_path, zarr_slide):
    folder = tmp_path / "batch"
    folder.mkdir()
    bad = folder / "s.ome.zarr"
    shutil.copytree(zarr_slide, bad)
    (bad / ".zattrs").write_text('{"multiscales": [')
    assert find_slides(folder) == [bad.resolve()]
    with pytest.raises(InputError) as e:
        read_image(bad)
    msg = str(e.value)
    assert str(bad) in msg and "expected .zattrs to be JSON, found a syntax error at line 1" in msg
    (bad / ".zattrs").write_bytes(b"\xff\xfe garbage")
    assert find_slides(folder) == [bad.resolve()]
    with pytest.raises(InputError, match="expected .zattrs to be UTF-8 JSON, found undecodable bytes"):
        read_image(bad)


# --------------------------------------------------------------------------- 15.7 synth names
@pytest.mark.parametrize("name,problem", [("../../X", "a path separator"), ("/tmp/X", "a path separator"),
                                          ("..", "only dots"), ("", "an empty name"), (".hidden", "a hidden name")])
def test_synth_name_must_be_a_plain_file_name(tmp_path, breast_panel_path, name, problem):
    from qdplex.synth import make_slide, read_synth_panel, write_slide

    panel = read_synth_panel(breast_panel_path)
    slide = make_slide(panel, shape=(32, 32), seed=0, name=name or "x")
    if not name:
        slide.image.name = ""  # type: ignore[misc]
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(OutputError, match=f"expected a slide name that is a plain file name.*found {problem}"):
        write_slide(slide, out)
    assert not any(tmp_path.rglob("*.tif"))
    r = subprocess.run([sys.executable, "-m", "qdplex.cli", "synth", "--panel", str(breast_panel_path),
                        "--out", str(out), "--name", name, "--shape", "32", "32"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": SRC})
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and f"expected --name that is a plain file name" in r.stderr, r.stderr
    assert not any(tmp_path.rglob("*.tif"))


# --------------------------------------------------------------------------- 15.8 panel values
BASE = 'name = "x"\n[[markers]]\nname = "HER2"\nfluor = "QD655"\ncompartment = "membrane"\n'


@pytest.mark.parametrize("extra,key,found", [
    ('[unmixing]\noffset = "abc"', "unmixing.offset", "'abc'"),
    ("[unmixing]\noffset = nan", "unmixing.offset", "nan"),
    ("[unmixing]\noffset = [100, -1]", "unmixing.offset", "[100, -1]"),
    ("[unmixing]\noffset = inf", "unmixing.offset", "inf"),
    ("[unmixing]\nsaturation = -1", "unmixing.saturation", "-1"),
    ("[unmixing]\nsaturation = nan", "unmixing.saturation", "nan"),
    ('[unmixing]\nrefine = "yes"', "unmixing.refine", "'yes'"),
    ("[unmixing]\nexclude_saturated = 1", "unmixing.exclude_saturated", "1"),
    ("[autofluorescence]\ncomponents = 40", "autofluorescence.components", "40"),
    ('[autofluorescence]\ncomponents = "many"', "autofluorescence.components", "'many'"),
    ("[autofluorescence]\ncomponents = 0", "autofluorescence.components", "0"),
    ("[segmentation]\ndiameter_um = 1e9", "segmentation.diameter_um", "1000000000.0"),
    ("[segmentation]\ndiameter_um = 0", "segmentation.diameter_um", "0"),
    ("[segmentation]\nexpand_um = -5", "segmentation.expand_um", "-5"),
    ("[segmentation]\nexpand_um = 1e6", "segmentation.expand_um", "1000000.0"),
    ("[segmentation]\nmembrane_width_um = 0", "segmentation.membrane_width_um", "0"),
    ('[segmentation]\nmethod = "watershed"', "segmentation.method", "'watershed'"),
    ('[segmentation]\nmodel = "missing.onnx"', "segmentation.model", "missing.onnx'"),
    ("[segmentation]\ntile = 1000000000", "segmentation.tile", "1000000000"),
    ("[segmentation]\ntile = 256\noverlap = 200", "segmentation.overlap", "200"),
    ("[segmentation]\noverlap = -1", "segmentation.overlap", "-1"),
    ("[image]\npixel_size_um = 0", "image.pixel_size_um", "0"),
    ("[image]\ncamera_offset = nan", "image.camera_offset", "nan"),
    ('[quantification]\nstats = ["mean", "mode"]', "quantification.stats", "['mean', 'mode']"),
    ('[quantification]\nstats = ["sum"]', "quantification.stats", "['sum']"),
    ('[quantification]\nstats = "mean"', "quantification.stats", "'mean'"),
    ("[quantification]\nquantiles = [1.5]", "quantification.quantiles", "[1.5]"),
    ("[quantification]\nquantiles = [0.5, 0.5]", "quantification.quantiles", "[0.5, 0.5]"),
    ('[quantification]\ncompartments = ["nuclei"]', "quantification.compartments", "['nuclei']"),
    ("[scoring]\ncutoffs = { KI67 = [1, 2, 3] }", "scoring.cutoffs.KI67", "'KI67'"),
    ("[scoring]\ncutoffs = { HER2 = [3, 2, 1] }", "scoring.cutoffs.HER2", "[3, 2, 1]"),
    ("[scoring]\ncutoffs = { HER2 = [1, 2, inf] }", "scoring.cutoffs.HER2", "[1, 2, inf]"),
    ('[scoring]\nmethod = "mean"', "scoring.method", "'mean'"),
    ("[scoring]\ncontrol_quantile = 1", "scoring.control_quantile", "1"),
    ("[scoring]\ncomplete = 0", "scoring.complete", "0"),
    ('[scoring]\nphenotype = ["HER2", "ER"]', "scoring.phenotype", "['ER']"),
    ('[scoring]\nallred = ["PR"]', "scoring.allred", "['PR']"),
    ('[scoring]\nher2 = "ERBB2"', "scoring.her2", "'ERBB2'"),
    ('[[markers]]\nname = "Area"\nfluor = "QD605"', "markers[1].name", "'Area'"),
    ('[[markers]]\nname = "CellID"\nfluor = "QD605"', "markers[1].name", "'CellID'"),
    ('[[markers]]\nname = "HER2_membrane_mean"\nfluor = "QD605"', "markers[1].name", "'HER2_membrane_mean'"),
    ('[[markers]]\nname = "ER_positive"\nfluor = "QD605"', "markers[1].name", "'ER_positive'"),
    ('[[markers]]\nname = "af2"\nfluor = "QD605"', "markers[1].name", "'af2'"),
    ('[[markers]]\nname = "DAPI"\nfluor = "QD605"', "markers[].name", "'DAPI'"),
    ('[[markers]]\nname = "ER"\nfluor = "QD605"\nthreshold = inf', "markers[1].threshold", "inf"),
    ('[[markers]]\nname = "ER"\nfluor = "QD605"\nthreshold = nan', "markers[1].threshold", "nan"),
])
def test_every_panel_value_checked_at_read(tmp_path, extra, key, found):
    p = tmp_path / "bad.toml"
    p.write_text(BASE + extra + "\n")
    with pytest.raises(PanelError) as e:
        read_panel(p)
    msg = str(e.value)
    assert str(p) in msg and repr(key) in msg and "expected" in msg, msg
    assert msg.endswith(found) and "found " in msg, msg  # the found value closes the message
    assert "\n" not in msg


def test_check_panel_cli_prints_one_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(BASE + "[autofluorescence]\ncontrol = \"/dev/zero\"\n")
    r = subprocess.run([sys.executable, "-m", "qdplex.cli", "check-panel", str(p)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": SRC})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r
    assert r.stderr.startswith("qdplex: error: ") and "autofluorescence.control" in r.stderr
    assert "found a character device: '/dev/zero'" in r.stderr


# --------------------------------------------------------------------------- spectra CSVs
@pytest.mark.parametrize("body,needle", [
    ("wavelength_nm,QD655\n600,0.1\n655,-0.2\n700,0.1\n", "column 'QD655': expected intensities ≥ 0, found -0.2 at row 3"),
    ("wavelength_nm,QD655\n600,0.1\n600,1\n700,0.1\n", "found a duplicate at row 3 (600 then 600 nm)"),
    ("wavelength_nm,QD655\n600,0.1\n700,1\n650,0.1\n", "found a change of direction at row 4 (700 then 650 nm)"),
    ("wavelength_nm,QD655\n600,0.1\n,1\n700,0.1\n", "expected a positive wavelength in nm on every row, found '' at row 3"),
    ("wavelength_nm,QD655\n-600,0.1\n700,1\n", "expected a positive wavelength in nm on every row, found '-600' at row 2"),
    ("wavelength_nm,QD655,Qdot 655\n600,0.1,1\n700,1,1\n", "found columns 'QD655' and 'Qdot 655' for QD655"),
    ("wavelength_nm,QD655,QD655\n600,0.1,1\n700,1,1\n", "found columns 'QD655' and 'QD655' for QD655"),
    ("wavelength_nm,QD655\n600,0.1\n700,inf\n", "column 'QD655': expected numbers, found 'inf' at row 3"),
])
def test_malformed_spectra_csv_refused_not_fixed(tmp_path, body, needle):
    from qdplex.spectra import SpectralLibrary

    p = tmp_path / "lib.csv"
    p.write_text(body)
    with pytest.raises(SpectraError) as e:
        SpectralLibrary.from_csv(p)
    assert str(p) in str(e.value) and "expected" in str(e.value) and needle in str(e.value), str(e.value)


def test_well_formed_spectra_csv_still_reads(tmp_path):
    from qdplex.spectra import SpectralLibrary

    p = tmp_path / "lib.csv"
    p.write_text("wavelength_nm,QD655,MyDye\n700,0.1,\n655,1,0.5\n600,0.1,1\n")  # descending, ragged
    lib = SpectralLibrary.from_csv(p)
    assert lib.names == ["QD655", "MyDye"] and lib.peak_nm("QD655") == 655 and lib["MyDye"].range_nm == (600, 655)


def test_spectra_path_to_an_unrelated_file_is_not_echoed(tmp_path):
    """A panel naming /etc/shadow (here: a file like it) as spectra must not copy its first line anywhere."""
    from qdplex.spectra import SpectralLibrary, library_for_panel

    secret = tmp_path / "shadow"
    secret.write_text("toor:$6$s3cr3tSALT$hashhashhash:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    with pytest.raises(SpectraError) as e:
        SpectralLibrary.from_csv(secret)
    assert "s3cr3t" not in str(e.value) and "toor" not in str(e.value) and str(secret) in str(e.value)
    p = tmp_path / "p.toml"
    p.write_text(f'name = "x"\n[[markers]]\nname = "HER2"\nfluor = "QD655"\n[spectra]\nfiles = ["{secret}"]\n')
    with pytest.raises(SpectraError) as e:
        library_for_panel(read_panel(p))
    assert "s3cr3t" not in str(e.value) and "toor" not in str(e.value)
    from qdplex.io import read_channels_csv

    with pytest.raises(InputError) as e:
        read_channels_csv(secret)
    assert "s3cr3t" not in str(e.value) and "toor" not in str(e.value) and "daemon" not in str(e.value)


# --------------------------------------------------------------------------- 15.9 messages
def test_self_referencing_symlink_gives_one_clear_line(tmp_path, breast_panel_path):
    loop = tmp_path / "loop.ome.tif"
    loop.symlink_to(loop)
    with pytest.raises(InputError, match="loop.ome.tif: expected a slide file or folder.*found a symlink loop"):
        read_image(loop)
    with pytest.raises(InputError, match="symlink loop"):
        find_slides(loop)
    r = subprocess.run([sys.executable, "-m", "qdplex.cli", "run", str(loop), "--panel", str(breast_panel_path),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": SRC})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r
    assert r.stderr.startswith("qdplex: error: ") and "symlink loop" in r.stderr and "internal error" not in r.stderr


def _channel_folder(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        tifffile.imwrite(folder / f"ch{i}.tif", _data((1, 32, 32))[0], photometric="minisblack")
    return folder


def test_channels_csv_naming_a_missing_file_is_one_error(tmp_path):
    folder = _channel_folder(tmp_path / "slide", 30)
    rows = "".join(f"ch{i}.tif,M{i}\n" for i in range(31))
    (folder / "channels.csv").write_text("file,name\n" + rows)
    assert find_slides(tmp_path) == [folder.resolve()]  # one slide, not 30
    with pytest.raises(InputError) as e:
        read_image(folder)
    msg = str(e.value)
    assert str(folder) in msg and "expected every file channels.csv names, found ['ch30.tif'] missing" in msg


def test_channels_csv_naming_a_file_twice_is_an_error(tmp_path):
    folder = _channel_folder(tmp_path / "slide", 2)
    (folder / "channels.csv").write_text("file,name\nch0.tif,A\nch1.tif,B\nch1.tif,C\n")
    with pytest.raises(InputError, match=r"one channels.csv row per file, found \['ch1.tif'\] named twice"):
        read_image(folder)


def test_broken_channels_csv_is_one_failing_slide(tmp_path):
    folder = _channel_folder(tmp_path / "slide", 3)
    (folder / "channels.csv").write_text("file,colour\nch0.tif,red\n")
    assert find_slides(tmp_path) == [folder.resolve()]
    with pytest.raises(InputError, match=r"channels.csv: expected a 'name' .* column, found columns \['file', 'colour'\]"):
        read_image(folder)


@pytest.mark.parametrize("kind", ["complex", "bool"])
def test_complex_and_bool_pixels_refused_by_dtype(tmp_path, kind):
    data = _data((3, 32, 32))
    pixels = (data + 1j).astype(np.complex64) if kind == "complex" else data > 2000
    path = tmp_path / f"{kind}.ome.tif"
    tifffile.imwrite(path, pixels, photometric="minisblack")
    with pytest.raises(InputError) as e:
        read_image(path, channels=CHANNELS)
    msg = str(e.value)
    assert str(path) in msg and f"expected integer or floating-point pixels (intensities), found {kind}" in msg
    assert "channel" not in msg


def test_bool_zarr_refused_by_dtype(tmp_path):
    path = write_ome_zarr(tmp_path / "b.ome.zarr", np.ones((2, 32, 32), bool), ["a", "b"])
    with pytest.raises(InputError, match="found boolean pixels of dtype bool"):
        read_image(path)


def test_rgb_without_channel_names_refused_by_samples(tmp_path):
    path = tmp_path / "photo.tif"
    tifffile.imwrite(path, _data((32, 32, 3)).astype(np.uint8), photometric="rgb")
    with pytest.raises(InputError) as e:
        read_image(path)
    msg = str(e.value)
    assert str(path) in msg and "found a colour image (photometric RGB, 3 sample(s) per pixel, dtype uint8)" in msg
    # named samples (OME metadata, a sidecar or channels=) are read as channels, as before
    assert read_image(path, channels=["r", "g", "b"]).shape == (3, 32, 32)


def test_channels_csv_with_text_labels_stays_a_sidecar(tmp_path):
    """A channel column of labels (not file names) beside one multi-plane TIFF is still that TIFF's sidecar."""
    folder = tmp_path / "s"
    folder.mkdir()
    tifffile.imwrite(folder / "s.tif", _data((3, 32, 32)), photometric="minisblack")
    (folder / "channels.csv").write_text("channel,name\nc1,DAPI\nc2,QD655\nc3,QD605\n")
    assert find_slides(tmp_path) == [(folder / "s.tif").resolve()]
    assert read_image(folder / "s.tif").channel_names == CHANNELS
