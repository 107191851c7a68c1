"""qdplex deletes or overwrites nothing it did not create (issue 15, item 1).

Each case is one a user hit: input slides under ``OUT/<slide>``, a user's file in a
slide folder, a hidden input whose slide name is ``..``. Every case asserts that the
inputs are byte-for-byte where they were and that the refusal names the path.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from qdplex.errors import OutputError

SHAPE = (96, 96)


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory, panel):
    from qdplex.synth import make_slide, write_slide

    root = tmp_path_factory.mktemp("src")
    for i in range(2):
        write_slide(make_slide(panel, shape=SHAPE, seed=40 + i, name=f"s{i + 1}"), root)
    return root / "slides"


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_inputs_under_out_slide_folder_are_refused(two_slides, panel, tmp_path):
    from qdplex.batch import run_batch

    p = tmp_path / "P"
    (p / "s1").mkdir(parents=True)
    for f in ("s1.ome.tif", "s2.ome.tif"):
        shutil.copy(two_slides / f, p / "s1" / f)
    before = _digest(p)
    with pytest.raises(OutputError, match="under a path qdplex writes"):
        run_batch([p / "s1"], panel, p, scheduler="synchronous", quiet=True, report=False)
    with pytest.raises(OutputError, match="under a path qdplex writes"):
        run_batch([p / "s1" / "s1.ome.tif"], panel, p, scheduler="synchronous", quiet=True, report=False)
    assert _digest(p) == before  # nothing written, nothing moved


def test_cli_refuses_with_one_line_and_keeps_inputs(two_slides, breast_panel_path, tmp_path, capsys):
    from qdplex.cli import main

    g = tmp_path / "g"
    (g / "s1").mkdir(parents=True)
    shutil.copy(two_slides / "s1.ome.tif", g / "s1" / "s1.ome.tif")
    before = _digest(g)
    code = main(["run", str(g / "s1" / "s1.ome.tif"), "--panel", str(breast_panel_path), "--out", str(g),
                 "--quiet", "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "never overwrites inputs" in err[0]
    assert _digest(g) == before


def test_user_file_in_a_slide_folder_is_kept(two_slides, panel, tmp_path):
    from qdplex.batch import run_batch

    out = tmp_path / "out"
    m = run_batch([two_slides / "s1.ome.tif"], panel, out, scheduler="synchronous", quiet=True, report=False)
    assert list(m["status"]) == ["ok"]
    (out / "s1" / "notes.txt").write_text("my notes")
    m = run_batch([two_slides / "s1.ome.tif"], panel, out, scheduler="synchronous", quiet=True, report=False,
                  force=True)
    assert list(m["status"]) == ["failed"] and "notes.txt" in m["error"].iloc[0]
    assert (out / "s1" / "notes.txt").read_text() == "my notes"
    assert (out / "s1" / "cells.csv").is_file()  # the earlier outputs are still there too


def test_foreign_folder_with_a_slide_name_is_kept(two_slides, panel, tmp_path):
    from qdplex.batch import run_batch

    out = tmp_path / "out"
    (out / "s2").mkdir(parents=True)
    (out / "s2" / "thesis.docx").write_bytes(b"irreplaceable")
    m = run_batch([two_slides / "s2.ome.tif"], panel, out, scheduler="synchronous", quiet=True, report=False)
    assert list(m["status"]) == ["failed"] and "never replaces what it did not write" in m["error"].iloc[0]
    assert (out / "s2" / "thesis.docx").read_bytes() == b"irreplaceable"
    # a qdplex folder is still replaced on --force: the rule refuses only what is not ours
    shutil.rmtree(out / "s2")
    run_batch([two_slides / "s2.ome.tif"], panel, out, scheduler="synchronous", quiet=True, report=False)
    m = run_batch([two_slides / "s2.ome.tif"], panel, out, scheduler="synchronous", quiet=True, report=False,
                  force=True)
    assert list(m["status"]) == ["ok"] and list(m["action"]) == ["computed"]


def test_dot_dot_slide_name_is_refused(two_slides, panel, tmp_path):
    from qdplex.batch import run_batch

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(two_slides / "s1.ome.tif", src / "...ome.tif")
    out = tmp_path / "deep" / "out"
    sentinel = tmp_path / "deep" / "keep.txt"
    sentinel.parent.mkdir()
    sentinel.write_text("keep")
    m = run_batch([src / "...ome.tif"], panel, out, scheduler="synchronous", quiet=True, report=False)
    assert list(m["status"]) == ["failed"] and "only dots" in m["error"].iloc[0]
    assert sentinel.read_text() == "keep" and (src / "...ome.tif").is_file()
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["keep.txt", "out"]
