"""What `qdplex run` prints: a header, progress, one closing summary (text or JSON), no third-party warnings."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pandas as pd
import pytest

from qdplex.progress import BatchProgress, batch_summary, format_summary, show_path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"


def test_header_on_the_stream_options_and_summary_in_the_log(tmp_path):
    s = io.StringIO()
    p = BatchProgress(3, log_file=tmp_path / "q.log", stream=s, tty=False)
    p.header(tmp_path / "OUT", {"scheduler": "local", "workers": 2, "fmt": "tiff"})
    p.info("only in the log", stream=False)
    p.finish("a", "ok", 1.0)
    p.close("3 of 3 slides ok")
    lines = s.getvalue().splitlines()
    assert lines[0] == f"qdplex: 3 slides → {show_path(tmp_path / 'OUT')}/ on a local dask cluster (2 workers)"
    assert len(lines) == 2 and lines[1].startswith("qdplex: [1/3] a ok in 1.0 s; ETA")
    log = (tmp_path / "q.log").read_text()
    assert '"fmt": "tiff"' in log and "only in the log" in log and "3 of 3 slides ok" in log
    q = io.StringIO()
    p = BatchProgress(1, stream=q, tty=False, quiet=True)
    p.header(tmp_path, {})
    p.close("done")
    assert q.getvalue() == ""


def test_summary_counts_and_paths(tmp_path, monkeypatch):
    out = tmp_path / "OUT"
    (out / "b" / "qc").mkdir(parents=True)
    for f in ("manifest.csv", "report.html", "qdplex.log", "b/cells.csv", "b/qc/report.html"):
        (out / f).write_text("x")
    manifest = pd.DataFrame({"slide": ["a", "b", "c"], "status": ["failed", "ok", "ok"],
                             "action": ["failed", "computed", "skipped"], "error": ["a.tif: truncated", "", ""]})
    s = batch_summary(manifest, out, 12.34)
    assert (s["slides"], s["ok"], s["skipped"], s["failed"], s["seconds"]) == (3, 1, 1, 1, 12.34)
    assert s["first_slide"] == "b" and s["cells_csv"] == str(out / "b" / "cells.csv")
    assert s["report_html"] == str(out / "b" / "qc" / "report.html") and s["failures"] == [
        {"slide": "a", "error": "a.tif: truncated"}]
    json.dumps(s)
    monkeypatch.chdir(tmp_path)
    text = format_summary(s)
    assert text.splitlines()[0] == "qdplex: 1 slide done, 1 skipped (already complete), 1 failed in 12.3 s"
    assert "  QC report:     OUT/b/qc/report.html  ← open in a browser" in text.splitlines()
    assert "OUT/manifest.csv" in text and "OUT/b/cells.csv" in text and str(tmp_path) not in text
    assert show_path("/") == "/"  # outside the working folder: absolute


@pytest.fixture
def busy_8787():
    """Port 8787 (dask's default dashboard port) taken, as by another dask client on the machine."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 8787))
        sock.listen()
    except OSError:
        pass  # already taken by someone else: the same situation
    yield
    sock.close()


def test_cli_run_prints_header_progress_and_one_summary(tmp_path, capfd, monkeypatch, busy_8787):
    from qdplex.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["run", str(SAMPLE / "slides"), "--panel", str(SAMPLE / "panel.toml"), "--out", "OUT", "--no-report"]
    assert main(args + ["--workers", "1"]) == 0  # a local dask cluster, while port 8787 is in use
    out, err = capfd.readouterr()
    assert err.splitlines()[0] == "qdplex: 1 slide → OUT/ on a local dask cluster (1 worker)"
    assert "qdplex: [1/1] sample ok in" in err
    assert "Port 8787" not in err and "Warning" not in err and "warn" not in err.lower(), err
    assert out.splitlines() == [out.splitlines()[0], "  manifest:      OUT/manifest.csv",
                                "  cells:         OUT/sample/cells.csv  (sample)", "  log:           OUT/qdplex.log"]
    assert out.startswith("qdplex: 1 slide done, 0 skipped (already complete), 0 failed in ")
    assert "{" not in err + out  # no raw dicts
    # again: complete, so skipped; --quiet prints only the summary, --json as JSON
    assert main(args + ["--scheduler", "synchronous", "--quiet", "--json"]) == 0
    out, err = capfd.readouterr()
    assert err == ""
    s = json.loads(out)
    assert (s["ok"], s["skipped"], s["failed"]) == (0, 1, 0)
    assert s["cells_csv"] == str(tmp_path / "OUT" / "sample" / "cells.csv") and s["report_html"] is None


@pytest.mark.parametrize("module, extra", [("imagecodecs", "codecs"), ("ome_zarr", "omezarr"), ("spatialdata", "spatialdata")])
def test_a_missing_optional_package_names_its_extra(module, extra, monkeypatch, capsys):
    import qdplex.cli as cli

    def needs(args):
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    monkeypatch.setattr(cli, "_cmd_report", needs)
    assert cli.main(["report", "OUT"]) == 2
    assert capsys.readouterr().err == (f"qdplex: error: this needs the optional package '{module}': "
                                       f"pip install 'qdplex[{extra}]'\n")
    # every extra the CLI names exists in pyproject.toml
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(cli._EXTRAS.values()) <= set(extras)
