"""Batch at scale (issue 6): manifest, corrupt slides, kill -9 and resume, an existing dask cluster.

Every test compares measured outputs: per-cell tables of a batch that was killed and
resumed, or run on a separately started ``dask scheduler`` with two ``dask worker``
processes, must equal (exactly) those of one uninterrupted local run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qdplex.errors import OutputError

SHAPE = (160, 160)
N_GOOD = 3
BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort(tmp_path_factory, panel):
    """good/ with N_GOOD small synthetic slides, bad/ with a truncated and a garbage slide."""
    from qdplex.synth import make_slide, write_slide

    root = tmp_path_factory.mktemp("cohort")
    for i in range(N_GOOD):
        slide = make_slide(panel, shape=SHAPE, seed=10 + i, name=f"slide{i}")
        write_slide(slide, root / "synth")
    good = root / "synth" / "slides"
    bad = root / "bad"
    bad.mkdir()
    data = (good / "slide0.ome.tif").read_bytes()
    (bad / "truncated.ome.tif").write_bytes(data[: len(data) // 3])
    (bad / "garbage.tif").write_bytes(np.random.default_rng(0).bytes(4096))
    import tifffile

    planes = np.zeros((3, 64, 64), np.uint16)
    tifffile.imwrite(bad / "nometa.tif", planes)  # plain TIFF, no channel names anywhere
    tifffile.imwrite(bad / "wrongcount.tif", planes)  # its sidecar names 2 channels for 3 planes
    (bad / "wrongcount.channels.csv").write_text("channel,name\n1,DAPI\n2,HER2\n")
    return {"good": good, "bad": bad, "root": root}


@pytest.fixture(scope="module")
def reference(cohort, panel, tmp_path_factory):
    """One uninterrupted batch on the default local dask cluster (good and bad slides)."""
    from qdplex.batch import run_batch

    out = tmp_path_factory.mktemp("ref") / "out"
    manifest = run_batch([cohort["good"], cohort["bad"]], panel, out, workers=2, quiet=True, report=False)
    return out, manifest


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    return {d.name: pd.read_csv(d / "cells.csv") for d in sorted(out.iterdir())
            if d.is_dir() and (d / "cells.csv").is_file()}


def _assert_same_tables(a: Path, b: Path) -> None:
    ta, tb = _tables(a), _tables(b)
    assert sorted(ta) == sorted(tb) == [f"slide{i}" for i in range(N_GOOD)]
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_exact=True)


def _assert_complete(out: Path) -> None:
    """Every slide folder in OUT is complete: its batch record matches its files' content."""
    from qdplex.outputs import completion_record

    for d in out.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            assert completion_record(d) is not None, f"{d} looks like a slide folder but is not complete"


# --------------------------------------------------------------------------- tests
def test_batch_records_failures_and_goes_on(reference, cohort):
    from qdplex import provenance

    out, manifest = reference
    assert list(manifest["input"]) == sorted(manifest["input"])  # the order slides were found in
    by = manifest.set_index("slide")
    assert set(by.index) == {"slide0", "slide1", "slide2", "truncated", "garbage", "nometa", "wrongcount"}
    ok = by[by["status"] == "ok"]
    bad = by[by["status"] == "failed"]
    assert sorted(ok.index) == ["slide0", "slide1", "slide2"]
    assert sorted(bad.index) == ["garbage", "nometa", "truncated", "wrongcount"]
    for name, row in bad.iterrows():
        assert name in row["error"] and "\n" not in row["error"]  # one line naming the file
        assert not (out / name).exists()
    assert "channel" in bad.loc["nometa", "error"] and "3" in bad.loc["wrongcount", "error"]
    # the manifest on disk is the returned one
    disk = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert list(disk["slide"]) == list(manifest["slide"])
    # hashes on disk carry a prefix so no CSV reader takes them for numbers
    assert all(v == "sha256:" + manifest.loc[i, "input_sha256"]
               for i, v in zip(manifest.index, disk["input_sha256"]) if v)
    # provenance: input hash recorded and correct, outputs complete
    for name, row in ok.iterrows():
        assert row["input_sha256"] == provenance.file_sha256(row["input"])
        rec = json.loads((out / name / "run.json").read_text())["batch"]
        assert rec["input_sha256"] == row["input_sha256"] and rec["complete"]
        cells = pd.read_csv(out / name / "cells.csv")
        assert len(cells) >= 18 and list(cells.columns[:1]) == ["CellID"]
    _assert_complete(out)
    run = json.loads((out / "run.json").read_text())
    assert run["versions"]["dask"] and run["host"]["cpu_count"] >= 1 and len(run["panel_sha256"]) == 64
    assert {s["slide"] for s in run["slides"]} == set(by.index)
    cohort_df = pd.read_csv(out / "cohort_summary.csv")
    assert len(cohort_df) == N_GOOD
    log = (out / "qdplex.log").read_text()
    assert "truncated" in log and "slide2" in log
    # per-slide stages reported by the dask workers reach the client's log
    assert all(f"slide{i}: unmix done" in log for i in range(N_GOOD)), log
    assert not (out / ".qdplex-staging").exists() and not (out / ".qdplex.lock").exists()


def test_rerun_skips_complete_slides_and_exits_nonzero(reference, cohort, breast_panel_path, tmp_path, capsys):
    from qdplex.cli import main

    out, manifest = reference
    # a copy of the reference so the module fixture stays untouched
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = {p: p.stat().st_mtime_ns for p in copy.glob("slide*/cells.csv")}
    code = main(["run", str(cohort["good"]), str(cohort["bad"]), "--panel", str(breast_panel_path),
                 "--out", str(copy), "--scheduler", "synchronous", "--quiet", "--no-report"])
    assert code == 1  # the bad slides
    err = capsys.readouterr().err
    assert "truncated" in err and "garbage" in err
    m = pd.read_csv(copy / "manifest.csv", keep_default_na=False).set_index("slide")
    assert set(m.loc[[f"slide{i}" for i in range(N_GOOD)], "action"]) == {"skipped"}
    assert {p: p.stat().st_mtime_ns for p in copy.glob("slide*/cells.csv")} == before
    # a damaged output is not complete: that slide (only) is recomputed, to the same table
    victim = copy / "slide1" / "cells.csv"
    victim.write_text(victim.read_text()[:100])
    code = main(["run", str(cohort["good"]), "--panel", str(breast_panel_path), "--out", str(copy),
                 "--scheduler", "synchronous", "--quiet", "--no-report"])
    assert code == 0
    m = pd.read_csv(copy / "manifest.csv", keep_default_na=False).set_index("slide")
    assert m.loc["slide1", "action"] == "computed" and m.loc["slide0", "action"] == "skipped"
    _assert_same_tables(out, copy)
    # --force recomputes everything
    code = main(["run", str(cohort["good"]), "--panel", str(breast_panel_path), "--out", str(copy),
                 "--scheduler", "synchronous", "--quiet", "--no-report", "--force"])
    m = pd.read_csv(copy / "manifest.csv", keep_default_na=False)
    assert code == 0 and set(m["action"]) == {"computed"}
    _assert_same_tables(out, copy)


def test_refuses_output_inside_an_input_folder(cohort, panel):
    from qdplex.batch import run_batch

    inside = cohort["good"] / "results"
    with pytest.raises(OutputError, match="inside input folder"):
        run_batch([cohort["good"]], panel, inside, scheduler="synchronous")
    with pytest.raises(OutputError):
        run_batch([cohort["good"] / "slide0.ome.tif"], panel, cohort["good"], scheduler="synchronous")
    assert not inside.exists()


def test_kill9_then_resume_equals_uninterrupted(reference, cohort, breast_panel_path, panel, tmp_path):
    from qdplex.batch import run_batch

    out = tmp_path / "killed"
    cmd = [str(BIN / "qdplex"), "run", str(cohort["good"]), "--panel", str(breast_panel_path),
           "--out", str(out), "--scheduler", "synchronous", "--no-report"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        n_ok = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                m = pd.read_csv(out / "manifest.csv", keep_default_na=False)
                n_ok = int((m["status"] == "ok").sum())
            except (OSError, pd.errors.EmptyDataError, KeyError):
                n_ok = 0
            if n_ok >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the batch ended before it could be killed"
        assert n_ok >= 1, "no slide finished within 90 s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # nothing that looks complete and is not
    _assert_complete(out)
    killed = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert len(killed) < N_GOOD
    # rerun: resumes, complete manifest, same tables as the uninterrupted run
    manifest = run_batch([cohort["good"]], panel, out, scheduler="synchronous", quiet=True, report=False)
    assert len(manifest) == N_GOOD and set(manifest["status"]) == {"ok"}
    assert (manifest["action"] == "skipped").sum() >= 1
    _assert_same_tables(reference[0], out)
    _assert_complete(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real `dask scheduler` and two `dask worker` processes (one thread each) on 127.0.0.1."""
    from distributed import Client

    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    procs = []
    log = open(tmp_path_factory.mktemp("dask") / "dask.log", "wb")
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            stdout=log, stderr=log, start_new_session=True))
        for _ in range(2):
            procs.append(subprocess.Popen(
                [str(BIN / "dask"), "worker", addr, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1",
                 "--memory-limit", "4GB", "--death-timeout", "60"],
                stdout=log, stderr=log, start_new_session=True))
        with Client(addr, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield addr
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=15)
        log.close()


def test_existing_dask_cluster_gives_the_same_tables(reference, cohort, panel, tmp_path, cluster):
    from qdplex.batch import run_batch

    out = tmp_path / "out"
    manifest = run_batch([cohort["good"]], panel, out, scheduler=cluster, workers=2, quiet=True, report=False)
    assert set(manifest["status"]) == {"ok"} and len(manifest) == N_GOOD
    assert manifest["worker"].notna().all()
    _assert_same_tables(reference[0], out)
    run = json.loads((out / "run.json").read_text())
    assert run["parameters"]["scheduler"] == cluster


def test_one_tiled_slide_spreads_over_the_cluster(panel, tmp_path, cluster):
    """The tiles of one giant slide are tasks of the cluster: both workers run some, and the table
    equals a local run's."""
    from distributed import Client, get_task_stream

    from qdplex.batch import run_batch
    from qdplex.synth import make_slide, write_slide

    write_slide(make_slide(panel, shape=(512, 512), seed=5, name="big"), tmp_path / "syn")
    slides = tmp_path / "syn" / "slides"
    local = run_batch([slides], panel, tmp_path / "local", scheduler="synchronous", storage="disk", tile=128,
                      quiet=True, report=False)
    assert list(local["status"]) == ["ok"]
    with Client(cluster, timeout="30s") as client, get_task_stream(client) as ts:
        spread = run_batch([slides], panel, tmp_path / "spread", scheduler=cluster, storage="disk", tile=128,
                           quiet=True, report=False)
    stream = ts.data
    assert list(spread["status"]) == ["ok"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "local" / "big" / "cells.csv"),
                                  pd.read_csv(tmp_path / "spread" / "big" / "cells.csv"), rtol=1e-6)
    tiles = [t for t in stream if not str(t.get("key", "")).startswith("('qdplex-slide") and
             "qdplex-slide" not in str(t.get("key", ""))]
    by_worker = {t["worker"] for t in tiles}
    assert len(tiles) >= 16 and len(by_worker) == 2, (len(tiles), by_worker)


def test_provenance_hashes(tmp_path, panel):
    from qdplex import provenance

    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * (5 << 20))
    import hashlib

    assert provenance.file_sha256(f) == hashlib.sha256(b"x" * (5 << 20)).hexdigest()
    d = tmp_path / "store.zarr"
    (d / "0").mkdir(parents=True)
    (d / "0" / "c").write_bytes(b"abc")
    h1 = provenance.file_sha256(d)
    (d / "0" / "c").write_bytes(b"abd")
    assert provenance.file_sha256(d) != h1
    h = provenance.panel_sha256(panel)
    from dataclasses import replace

    assert provenance.panel_sha256(replace(panel, path=tmp_path / "elsewhere.toml")) == h
    assert provenance.panel_sha256(replace(panel, markers=panel.markers[:-1])) != h
    rec = provenance.run_record(panel=panel, inputs=[f], parameters={"tile": 1024}, timings={"unmix": 1.5})
    json.dumps(rec)
    assert rec["inputs"][0]["sha256"] == provenance.file_sha256(f) and rec["parameters"]["tile"] == 1024


def test_progress_plain_lines_and_log(tmp_path):
    import io

    from qdplex.progress import BatchProgress

    s = io.StringIO()
    p = BatchProgress(2, log_file=tmp_path / "q.log", stream=s, tty=False)
    p.start("a")
    p.stage("a", "unmix", 0.25)
    p.finish("a", "ok", 1.5)
    p.finish("b", "failed", 0.2, error="b.tif: expected a TIFF")
    p.close("1 of 2 ok")
    text = s.getvalue()
    assert "[1/2] a ok in 1.5 s" in text and "[2/2] b failed" in text and "expected a TIFF" in text
    assert "a: unmix done (25%)" in (tmp_path / "q.log").read_text()
    q = io.StringIO()
    p = BatchProgress(1, log_file=tmp_path / "q2.log", stream=q, quiet=True)
    p.finish("a", "ok", 1.0)
    p.close()
    assert q.getvalue() == "" and "[1/1] a ok" in (tmp_path / "q2.log").read_text()
    t = io.StringIO()
    p = BatchProgress(2, stream=t, tty=True)
    p.start("a")
    p.stage("a", "segment", 0.5)
    p.finish("a", "ok", 1.0)
    p.close()
    assert "slides" in t.getvalue() and "50%" in t.getvalue()


def test_ome_zarr_slide_in_zarr_out(reference, cohort, panel, tmp_path):
    """An OME-Zarr slide (a folder) goes through the batch like its TIFF twin; --format zarr output."""
    from qdplex.batch import run_batch
    from qdplex.io import read_image, write_ome_zarr

    img = read_image(cohort["good"] / "slide0.ome.tif")
    src = tmp_path / "zarr_in"
    write_ome_zarr(src / "slide0.ome.zarr", img)  # channels, pixel size and camera offset from the image
    assert read_image(src / "slide0.ome.zarr").metadata["camera_offset"] == img.metadata["camera_offset"]
    out = tmp_path / "out"
    manifest = run_batch([src], panel, out, scheduler="synchronous", fmt="zarr", quiet=True, report=False)
    assert list(manifest["slide"]) == ["slide0"] and list(manifest["status"]) == ["ok"]
    got = pd.read_csv(out / "slide0" / "cells.csv")
    ref = pd.read_csv(reference[0] / "slide0" / "cells.csv")
    pd.testing.assert_frame_equal(got, ref, check_exact=True)
    unmixed = read_image(out / "slide0" / "unmixed.ome.zarr")
    assert unmixed.shape[1:] == img.shape[1:] and "residual" in unmixed.channel_names
    # a folder slide is hashed by content; rerunning skips it
    again = run_batch([src], panel, out, scheduler="synchronous", fmt="zarr", quiet=True, report=False)
    assert list(again["action"]) == ["skipped"]
    with pytest.raises(OutputError):
        run_batch([src / "slide0.ome.zarr"], panel, src / "slide0.ome.zarr" / "out", scheduler="synchronous")


def test_two_slides_with_one_name(cohort, panel, tmp_path):
    """Two inputs that would both write OUT/slide0: the second fails up front, the first is kept."""
    import shutil

    from qdplex.batch import run_batch

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(cohort["good"] / "slide0.ome.tif", other / "slide0.ome.tif")
    out = tmp_path / "out"
    m = run_batch([cohort["good"], other], panel, out, include=["slide0*"], scheduler="synchronous",
                  quiet=True, report=False)
    assert list(m["status"]) == (["ok", "failed"] if str(cohort["good"]) < str(other) else ["failed", "ok"])
    bad = m[m["status"] == "failed"].iloc[0]
    assert "unique slide name" in bad["error"] and "slide0" in bad["error"]
    rec = json.loads((out / "slide0" / "run.json").read_text())["batch"]
    assert rec["input"] == m[m["status"] == "ok"].iloc[0]["input"]


def test_manifest_hashes_never_read_as_numbers(tmp_path):
    """A digest like 86e2417… is a float with a huge exponent to a CSV sniffer; the prefix prevents that."""
    from qdplex.outputs import MANIFEST_COLUMNS
    from qdplex.outputs import manifest_for_csv as _manifest_for_csv

    row = dict.fromkeys(MANIFEST_COLUMNS, "")
    row.update(slide="s", status="ok", input_sha256="86e24171728200f00bbe17c2" + "0" * 40,
               panel_sha256="1e5" + "0" * 61)
    path = tmp_path / "manifest.csv"
    _manifest_for_csv(pd.DataFrame([row], columns=MANIFEST_COLUMNS)).to_csv(path, index=False)
    text = path.read_text()
    assert "sha256:86e24171728200f00bbe17c2" in text and "sha256:1e5" in text
    back = pd.read_csv(path)
    assert back.loc[0, "panel_sha256"] == "sha256:1e5" + "0" * 61
