"""Hostile and careless runs of ``qdplex run`` / ``qdplex report`` (issue 15, items 4, 6, 7).

Each case runs small slides and asserts the outcome: resume notices every change that
alters the outputs (a channel sidecar changed or added, reports turned on, another
output format, an output corrupted without changing its size); a full disk, a
read-only OUT and SIGTERM each give one clear line, leave no lock and no staging
folder, and the manifest says what completed; an empty lock file is stale.

The disk cases run the CLI in a private mount namespace (``unshare -rm``) on a small
tmpfs, so nothing outside the test's folders is touched; they skip where that is
not allowed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
PANEL = ROOT / "pipelines" / "breast-5plex.toml"
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"))


@pytest.fixture(scope="module")
def panel():
    from qdplex.panel import read_panel

    return read_panel(PANEL)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, panel):
    from qdplex.synth import make_slide, write_slide

    root = tmp_path_factory.mktemp("fuzz")
    for i in range(3):
        write_slide(make_slide(panel, shape=(128, 128), seed=20 + i, name=f"s{i}"), root)
    return root / "slides"


@pytest.fixture(scope="module")
def more_slides(tmp_path_factory, panel):
    from qdplex.synth import make_slide, write_slide

    root = tmp_path_factory.mktemp("more")
    for i in range(3, 8):
        write_slide(make_slide(panel, shape=(128, 128), seed=20 + i, name=f"s{i}"), root)
    return root / "slides"


def _copy(slides: Path, dest: Path, names=("s0",)) -> Path:
    dest.mkdir(parents=True)
    for n in names:
        shutil.copy(slides / f"{n}.ome.tif", dest / f"{n}.ome.tif")
    return dest


def _run(inputs, panel, out, **kw):
    from qdplex.batch import run_batch

    return run_batch(inputs, panel, out, scheduler="synchronous", quiet=True, **kw)


def _cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "qdplex.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, **kw)


def _lines(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.strip()]


def _assert_clean(out: Path) -> None:
    assert not (out / ".qdplex.lock").exists()
    assert not (out / ".qdplex-staging").exists()


# --------------------------------------------------------------------------- resume identity
def test_changed_or_added_sidecar_recomputes(slides, panel, tmp_path):
    from qdplex.io import read_image

    src = _copy(slides, tmp_path / "in")
    out = tmp_path / "out"
    assert list(_run([src], panel, out, report=False)["action"]) == ["computed"]
    assert list(_run([src], panel, out, report=False)["action"]) == ["skipped"]
    # a sidecar added beside the slide, naming the channels the file already has
    chans = read_image(src / "s0.ome.tif").channels
    rows = "\n".join(f"{i + 1},{c.name},{c.emission_nm},{c.bandwidth_nm}" for i, c in enumerate(chans))
    side = src / "s0.channels.csv"
    side.write_text("channel,name,emission_nm,bandwidth_nm\n" + rows + "\n")
    assert list(_run([src], panel, out, report=False)["action"]) == ["computed"]
    assert list(_run([src], panel, out, report=False)["action"]) == ["skipped"]
    # ... then edited (same channels, one more decimal): the slide is recomputed again
    side.write_text(side.read_text().replace(f",{chans[0].emission_nm},", f",{chans[0].emission_nm:.2f},"))
    m = _run([src], panel, out, report=False)
    assert list(m["action"]) == ["computed"], m["error"].tolist()


def test_options_are_part_of_the_identity(slides, panel, tmp_path):
    src = _copy(slides, tmp_path / "in")
    out = tmp_path / "out"
    assert list(_run([src], panel, out, report=False)["action"]) == ["computed"]
    assert not (out / "s0" / "qc").exists()
    # reports asked for: recomputed, and the report is there
    assert list(_run([src], panel, out, report=True)["action"]) == ["computed"]
    assert (out / "s0" / "qc" / "report.html").is_file() and (out / "report.html").is_file()
    # TIFF then zarr: the folder holds the zarr images only
    assert list(_run([src], panel, out, fmt="zarr")["action"]) == ["computed"]
    names = sorted(p.name for p in (out / "s0").iterdir())
    assert "cells.ome.zarr" in names and not any(n.endswith(".ome.tif") for n in names)
    assert list(_run([src], panel, out, fmt="zarr")["action"]) == ["skipped"]
    # the storage changes no output: not a reason to recompute
    assert list(_run([src], panel, out, fmt="zarr", storage="disk")["action"]) == ["skipped"]


@pytest.mark.parametrize("name", ["cells.csv", "cells.parquet"])
def test_same_size_corruption_of_an_output_recomputes(slides, panel, tmp_path, name):
    src = _copy(slides, tmp_path / "in")
    out = tmp_path / "out"
    _run([src], panel, out, report=False)
    good = (out / "s0" / name).read_bytes()
    path = out / "s0" / name
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # one byte flipped: same size
    path.write_bytes(bytes(bad))
    assert path.stat().st_size == len(good)
    assert list(_run([src], panel, out, report=False)["action"]) == ["computed"]
    assert (out / "s0" / name).read_bytes() == good  # the same computation, written again


# --------------------------------------------------------------------------- lock, signals
def test_an_empty_lock_file_is_stale(slides, panel, tmp_path):
    src = _copy(slides, tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".qdplex.lock").write_text("")  # left by a run killed between creating and writing it
    m = _run([src], panel, out, report=False)
    assert list(m["status"]) == ["ok"]
    _assert_clean(out)


def test_a_live_lock_still_refuses(slides, panel, tmp_path):
    import json
    import socket

    from qdplex.errors import OutputError

    src = _copy(slides, tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".qdplex.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(OutputError, match="another|other qdplex batch"):
        _run([src], panel, out, report=False)
    assert (out / ".qdplex.lock").exists()  # not ours to remove


def test_sigterm_is_one_line_cleans_up_and_the_manifest_says_what_completed(slides, more_slides, tmp_path):
    src = _copy(slides, tmp_path / "in", names=("s0", "s1", "s2"))
    for i in range(3, 8):  # enough slides that the signal lands mid-batch
        shutil.copy(more_slides / f"s{i}.ome.tif", src / f"s{i}.ome.tif")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "qdplex.cli", "run", str(src), "--panel", str(PANEL), "--out",
                             str(out), "--scheduler", "synchronous", "--quiet", "--no-report"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            m = out / "manifest.csv"
            if m.is_file() and "ok" in pd.read_csv(m)["status"].tolist():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the batch ended before the signal"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr
    lines = _lines(stderr)
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "manifest.csv" in lines[0], stderr
    assert "Traceback" not in stderr
    _assert_clean(out)
    man = pd.read_csv(out / "manifest.csv")
    assert len(man) == 8
    done = man[man["status"] == "ok"]
    assert len(done) >= 1 and (man["action"] == "interrupted").sum() >= 1
    assert set(man["action"]) <= {"computed", "interrupted"}
    for s in done["slide"]:
        assert (out / s / "cells.csv").is_file()
    # the rerun resumes: completed slides skipped, the others computed
    rerun = _cli("run", src, "--panel", PANEL, "--out", out, "--scheduler", "synchronous", "--quiet", "--no-report")
    assert rerun.returncode == 0, rerun.stderr
    again = pd.read_csv(out / "manifest.csv").set_index("slide")
    assert (again.loc[done["slide"], "action"] == "skipped").all()
    assert set(again["status"]) == {"ok"}


# --------------------------------------------------------------------------- full disk, read-only OUT
def _in_private_mount(out: Path, options: str, *args) -> subprocess.CompletedProcess:
    if shutil.which("unshare") is None:
        pytest.skip("unshare not available")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user and mount namespaces not allowed here")
    out.mkdir(parents=True, exist_ok=True)
    cli = " ".join(f"'{a}'" for a in [sys.executable, "-m", "qdplex.cli", *map(str, args)])
    script = f"mount -t tmpfs -o {options} tmpfs '{out}' && {cli}; rc=$?; ls -a '{out}' > '{out}.ls'; exit $rc"
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env=ENV)


def test_full_disk_is_a_clear_line_per_slide(slides, tmp_path):
    out = tmp_path / "out"
    proc = _in_private_mount(out, "size=64k", "run", slides, "--panel", PANEL, "--out", out,
                             "--scheduler", "synchronous", "--quiet")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr
    failed = [l for l in _lines(proc.stderr) if l.startswith("qdplex: failed")]
    assert len(failed) == 3 and all("disk" in l and "full" in l for l in failed), proc.stderr
    left = (tmp_path / "out.ls").read_text().split()
    assert ".qdplex.lock" not in left and ".qdplex-staging" not in left and "manifest.csv" in left


def test_no_space_at_all_is_one_line(slides, tmp_path):
    out = tmp_path / "out"
    proc = _in_private_mount(out, "size=8k", "run", slides, "--panel", PANEL, "--out", out,
                             "--scheduler", "synchronous", "--quiet")
    assert proc.returncode == 2, proc.stderr
    lines = _lines(proc.stderr)
    assert len(lines) == 1 and "disk full" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    left = (tmp_path / "out.ls").read_text().split()
    assert ".qdplex.lock" not in left and ".qdplex-staging" not in left


def test_read_only_out_is_one_line(slides, tmp_path):
    out = tmp_path / "out"
    proc = _in_private_mount(out, "ro", "run", slides, "--panel", PANEL, "--out", out, "--scheduler", "synchronous")
    assert proc.returncode == 2, proc.stderr
    lines = _lines(proc.stderr)
    assert len(lines) == 1 and "read-only" in lines[0] and str(out) in lines[0], proc.stderr
    assert "internal error" not in proc.stderr
