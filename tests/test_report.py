"""QC reports: content of the slide and cohort pages, rendering in headless Chromium,
rebuilding from files on disk (``qdplex report OUT``)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qdplex import report
from qdplex.model import Channel, MultiplexImage, Segmentation
from qdplex.panel import read_panel

ROOT = Path(__file__).resolve().parents[1]
BREAST = ROOT / "pipelines" / "breast-5plex.toml"


# --------------------------------------------------------------------------- helpers
def _images(page: str) -> list[np.ndarray]:
    """Every inline PNG of a page, decoded to an array."""
    from matplotlib.image import imread

    out = []
    for fmt, b64 in re.findall(r'src="data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)"', page):
        im = imread(io.BytesIO(base64.b64decode(b64)), format=fmt)
        out.append(im / 255.0 if im.dtype == np.uint8 else im)
    return out


def _no_network(page: str) -> None:
    # nothing fetched from anywhere: every src / href is inline or relative
    for attr in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert attr.startswith("data:") or not re.match(r"^[a-z]+://|^//", attr), attr
    assert "@import" not in page and "url(" not in page


def _synthetic_result(shape=(160, 200), seed=1):
    """Abundance planes painted from a synthetic tissue layout, with a known positive fraction."""
    from qdplex.spectra import SpectralLibrary, lambda_grid
    from qdplex.synth import tissue_layout

    panel = read_panel(BREAST)
    lay = tissue_layout(shape, pixel_size_um=0.5, seed=seed)
    seg = Segmentation(lay.nuclei, lay.cells)
    rng = np.random.default_rng(seed)
    n = lay.n
    planes, levels = [], {}
    for m in panel.markers:
        lev = np.where(rng.random(n + 1) < 0.4, rng.lognormal(1.5, 0.2, n + 1), rng.lognormal(-1.0, 0.3, n + 1))
        lev[0] = 0.0
        levels[m.name] = lev
        planes.append(lev[seg.compartment(m.compartment)].astype(np.float32))
    planes.append((lay.nuclei > 0).astype(np.float32) * 5.0)
    planes.append(rng.random(shape).astype(np.float32) * 0.2)
    names = panel.marker_names + ["DAPI", "AF"]
    fluors = [m.fluor for m in panel.markers] + ["DAPI", "AF"]
    ab = MultiplexImage(np.stack(planes), [Channel(nm, fluor=f) for nm, f in zip(names, fluors)], 0.5, name="synthetic")
    ids = np.arange(1, n + 1)
    table = pd.DataFrame({"CellID": ids, **{m: levels[m][ids] for m in panel.marker_names}})
    thresholds = {m: 1.0 for m in panel.marker_names}
    summary = {"n_cells": int(n), "markers": {m: {"pct_positive": float(np.mean(levels[m][ids] > 1.0) * 100)}
                                              for m in panel.marker_names}}
    residual = rng.random(shape).astype(np.float32)
    channels = lambda_grid(420, 720, 10)
    library = SpectralLibrary.builtin(["DAPI"] + [m.fluor for m in panel.markers] + ["AF"])
    return dict(name="synthetic", panel=panel, abundances=ab, nuclei=seg.nuclei, cells=seg.cells, table=table,
                thresholds=thresholds, summary=summary, residual=residual, library=library, channels=channels)


@pytest.fixture(scope="module")
def synthetic():
    return _synthetic_result()


def _chromium() -> str | None:
    for exe in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(exe)
        if path:
            return path
    return None


def _screenshot(html_path: Path, tmp_path: Path, size=(1280, 2000)) -> np.ndarray:
    from matplotlib.image import imread

    exe = _chromium()
    if exe is None:
        pytest.skip("headless Chromium not installed (Debian package 'chromium'; `make test` installs it)")
    png = tmp_path / "shot.png"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chrome-profile'}",
           f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", html_path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"chromium wrote no screenshot: {proc.stderr[-2000:]}"
    return imread(png)


# --------------------------------------------------------------------------- pure parts
def test_summary_tables_splits_per_marker_scores():
    summary = {"n_cells": 10, "markers": {"HER2": {"pct_positive": 40.0, "her2_score": "2+"},
                                          "ER": {"pct_positive": 10.0, "h_score": 35.5}},
               "phenotypes": {"HER2+ER-": 4}}
    per_marker, scalars = report.summary_tables(summary, ["HER2", "ER", "PR"])
    assert list(per_marker.index) == ["HER2", "ER"]
    assert per_marker.loc["HER2", "pct_positive"] == 40.0
    assert per_marker.loc["ER", "h_score"] == 35.5
    assert dict(zip(scalars["key"], scalars["value"])) == {"n_cells": 10, "phenotypes.HER2+ER-": 4}


def test_slide_report_content(synthetic):
    r = synthetic
    page = report.slide_report_html(**r)
    _no_network(page)
    assert "not drawn" not in page, re.findall(r"<div class=err>(.*?)</div>", page)
    imgs = _images(page)
    # composite, segmentation, residual (pixel for pixel), histograms, spectra
    assert len(imgs) == 5
    assert imgs[0].shape[:2] == r["abundances"].shape[1:]  # previews keep the image's pixels
    # the crosstalk check: a shaded table of every endmember against every other
    heat = re.search(r"<table class=heat>(.*?)</table>", page, re.S).group(1)
    assert heat.count("<tr>") == 1 + len(r["library"].names)
    for im in imgs:
        assert im.ndim == 3 and float(im[..., :3].std()) > 0.02  # real pictures, not blank canvases
    # every marker is named with its fluor, compartment, threshold and score
    for m in r["panel"].markers:
        assert f"<td class=l>{m.name}</td>" in page and m.fluor in page
    # the composite shows the markers where the cells are: colour inside cells, dark outside
    comp = imgs[0][..., :3]
    assert comp.shape[0] > 100
    pct = r["summary"]["markers"]["HER2"]["pct_positive"]
    assert f"{pct:.4g}" in page


def test_write_slide_report_is_atomic_and_self_contained(tmp_path, synthetic):
    from qdplex import io as qio

    r = synthetic
    d = tmp_path / "slideA"
    d.mkdir()
    ab = r["abundances"]
    planes = np.concatenate([np.asarray(ab.data), np.asarray(r["residual"], np.float32)[None]])
    qio.write_ome_tiff(d / "unmixed.ome.tif", planes, list(ab.channels) + [Channel("residual")], pixel_size_um=0.5)
    qio.write_labels(d / "nuclei.ome.tif", r["nuclei"], pixel_size_um=0.5)
    qio.write_labels(d / "cells.ome.tif", r["cells"], pixel_size_um=0.5)
    record = {"inputs": [{"path": "/data/slideA.ome.tif"}], "thresholds": r["thresholds"],
              "timings": {"unmix": 1.0, "segment": 2.0}, "warnings": ["a <b>warning</b> of one stage"]}
    path = report.write_slide_report(d, panel=r["panel"], record=record, table=r["table"], summary=r["summary"],
                                     library=r["library"], channels=r["channels"])
    assert path == d / "qc" / "report.html"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]  # no temp file left over
    page = path.read_text(encoding="utf-8")
    assert "QC report: slideA" in page and "/data/slideA.ome.tif" in page
    assert "not drawn" not in page and len(_images(page)) == 5
    assert "warning: a &lt;b&gt;warning&lt;/b&gt; of one stage" in page  # escaped, shown
    _no_network(page)


def test_report_never_follows_a_manifest_row_out_of_out(tmp_path):
    """A manifest row whose slide is '../victim' (or a link leaving OUT) is refused, never read or written."""
    from qdplex.errors import InputError

    out = tmp_path / "OUT"
    victim = tmp_path / "victim"
    (victim / "qc").mkdir(parents=True)
    (victim / "run.json").write_text("{}")
    (victim / "qc" / "report.html").write_text("theirs")
    out.mkdir()
    (out / "link").symlink_to(victim, target_is_directory=True)
    pd.DataFrame({"slide": ["../victim", "link"], "input": ["x.tif", "y.tif"], "status": ["ok", "ok"],
                  "error": ["", ""]}).to_csv(out / "manifest.csv", index=False)
    with pytest.raises(InputError) as e:
        report.report_from_outputs(out)
    assert "../victim" in str(e.value) and "link" in str(e.value)
    assert (victim / "qc" / "report.html").read_text() == "theirs"
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "href=\"../victim" not in page and "href=\"link" not in page


def test_cohort_report_lists_failures_and_links(tmp_path):
    out = tmp_path / "OUT"
    (out / "s1" / "qc").mkdir(parents=True)
    (out / "s1" / "qc" / "report.html").write_text("<html></html>")
    pd.DataFrame({
        "slide": ["s1", "s2", "s3"], "input": ["a/s1.tif", "a/s2.tif", "a/s3.tif"],
        "status": ["ok", "ok", "failed"], "error": ["", "", "a/s3.tif: expected a C×Y×X image, found 2 dimensions"],
        "seconds": [1.5, 2.0, 0.1],
    }).to_csv(out / "manifest.csv", index=False)
    pd.DataFrame({"slide": ["s1", "s2"], "HER2_pct_positive": [12.0, 55.0], "ER_h_score": [100.0, 20.0]}
                 ).to_csv(out / "cohort_summary.csv", index=False)
    path = report.write_cohort_report(out)
    page = path.read_text(encoding="utf-8")
    _no_network(page)
    assert "1 failed" in page and "found 2 dimensions" in page
    assert '<a href="s1/qc/report.html">s1</a>' in page and '<a href="s2' not in page
    assert "55" in page and "HER2_pct_positive" in page
    assert len(_images(page)) == 1


def test_cohort_report_from_summaries_when_no_cohort_csv(tmp_path):
    out = tmp_path / "OUT"
    (out / "s1").mkdir(parents=True)
    (out / "s1" / "summary.json").write_text(json.dumps({"n_cells": 42, "markers": {"HER2": {"pct_positive": 7.5}}}))
    pd.DataFrame({"slide": ["s1"], "input": ["s1.tif"], "status": ["ok"], "error": [""]}).to_csv(out / "manifest.csv", index=False)
    page = report.write_cohort_report(out).read_text(encoding="utf-8")
    assert "markers.HER2.pct_positive" in page and "7.5" in page and "42" in page


def test_cohort_report_needs_a_manifest(tmp_path):
    from qdplex.errors import InputError

    with pytest.raises(InputError, match="manifest.csv"):
        report.write_cohort_report(tmp_path)


# --------------------------------------------------------------------------- rendering
def test_slide_report_renders_in_chromium(tmp_path, synthetic):
    r = synthetic
    path = tmp_path / "report.html"
    path.write_text(report.slide_report_html(**r), encoding="utf-8")
    shot = _screenshot(path, tmp_path)[..., :3]
    # a blank page is one flat colour; the report has text, tables and pictures
    assert float(shot.std()) > 0.08
    non_white = np.mean(np.any(shot < 0.9, axis=-1))
    assert non_white > 0.10
    # the composite image (dark background, coloured cells) made it onto the screen
    dark = np.mean(np.all(shot < 0.15, axis=-1))
    assert dark > 0.02


# --------------------------------------------------------------------------- end to end
def test_run_writes_reports_and_report_command_rebuilds_them(tmp_path):
    from qdplex.cli import main
    from qdplex.synth import make_slide, write_slide

    panel_path = ROOT / "pipelines" / "prostate-ar-psa.toml"
    panel = read_panel(panel_path)
    syn = tmp_path / "syn"
    for i in range(2):
        write_slide(make_slide(panel, shape=(96, 96), seed=i, name=f"s{i}"), syn)
    (syn / "slides" / "broken.ome.tif").write_bytes(b"II*\x00 truncated")
    out = tmp_path / "out"
    argv = ["run", str(syn / "slides"), "--panel", str(panel_path), "--out", str(out),
            "--scheduler", "synchronous", "--quiet"]
    assert main(argv) == 1  # one slide failed, the others went on

    cohort = (out / "report.html").read_text(encoding="utf-8")
    _no_network(cohort)
    assert "2 ok" in cohort and "1 failed" in cohort and "broken" in cohort
    assert '<a href="s0/qc/report.html">s0</a>' in cohort
    for s in ("s0", "s1"):
        page = (out / s / "qc" / "report.html").read_text(encoding="utf-8")
        _no_network(page)
        assert "not drawn" not in page, re.findall(r"<div class=err>(.*?)</div>", page)
        assert len(_images(page)) == 5 and "<table class=heat>" in page
        assert f"QC report: {s}" in page and "AR" in page and "PSA" in page

    # rebuilt from the files on disk by `qdplex report OUT`
    (out / "s0" / "qc" / "report.html").unlink()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    page = (out / "s0" / "qc" / "report.html").read_text(encoding="utf-8")
    assert len(_images(page)) == 5 and "not drawn" not in page
    assert (out / "report.html").is_file()

    # an unreadable slide folder is named, and the other reports are still written
    (out / "s1" / "cells.parquet").rename(out / "s1" / "cells.parquet.bak")
    (out / "s1" / "cells.csv").rename(out / "s1" / "cells.csv.bak")
    (out / "report.html").unlink()
    from qdplex.errors import InputError

    with pytest.raises(InputError, match=r"s1.*cells\.csv"):
        report.report_from_outputs(out)
    assert (out / "report.html").is_file()
    (out / "s1" / "cells.parquet.bak").rename(out / "s1" / "cells.parquet")
    (out / "s1" / "cells.csv.bak").rename(out / "s1" / "cells.csv")

    # a rebuilt report does not make the batch think the slides are incomplete
    from qdplex.batch import run_batch

    manifest = run_batch([syn / "slides"], panel, out, scheduler="synchronous", quiet=True)
    assert sorted(manifest.loc[manifest["status"] == "ok", "action"]) == ["skipped", "skipped"]

    shot = _screenshot(out / "s0" / "qc" / "report.html", tmp_path)[..., :3]
    assert float(shot.std()) > 0.08 and np.mean(np.all(shot < 0.15, axis=-1)) > 0.02


def test_report_of_a_tiled_whole_slide_run_reads_a_reduced_pyramid_level(tmp_path):
    from qdplex.batch import process_slide
    from qdplex.io import read_image, write_ome_tiff
    from qdplex.synth import make_slide, write_slide

    panel = read_panel(ROOT / "pipelines" / "prostate-ar-psa.toml")
    paths = write_slide(make_slide(panel, shape=(160, 160), seed=2, name="ws"), tmp_path / "syn")
    row = process_slide(paths["slide"], panel, tmp_path / "out", storage="disk", tile=96)  # tiled, on disk
    assert row["status"] == "ok"
    page = report.slide_report_from_outputs(tmp_path / "out" / "ws").read_text(encoding="utf-8")
    assert "not drawn" not in page and len(_images(page)) == 5 and "image 160×160 px" in page

    # a pyramidal image is previewed from its coarsest level that still has max_side pixels
    write_ome_tiff(tmp_path / "pyr.ome.tif", read_image(paths["slide"]), pyramid=2)
    assert report._read_for_preview(tmp_path / "pyr.ome.tif", 64).shape[1:] == (80, 80)
    assert report._read_for_preview(tmp_path / "pyr.ome.tif", 40).shape[1:] == (40, 40)
    assert report._read_for_preview(tmp_path / "pyr.ome.tif", 1024).shape[1:] == (160, 160)


def test_composite_keeps_a_negative_marker_dark():
    from qdplex.figures import composite_rgb

    rng = np.random.default_rng(0)
    noise = rng.random((64, 64)).astype(np.float32) * 0.1  # background only, far below the threshold
    bright = np.zeros((64, 64), np.float32)
    bright[20:40, 20:40] = 5.0
    stretched = composite_rgb([noise, bright], [(1, 0, 0), (0, 1, 0)])
    floored = composite_rgb([noise, bright], [(1, 0, 0), (0, 1, 0)], [2.0 * 1.0, 2.0 * 1.0])
    assert stretched[..., 0].mean() > 0.3  # plain percentile stretch: noise fills the red channel
    assert floored[..., 0].max() <= 0.05  # floored at twice the threshold: red stays dark
    assert floored[30, 30, 1] == 1.0  # the positive square stays at full colour
