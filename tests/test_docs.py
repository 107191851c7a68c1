"""The documentation builds with warnings as errors and says what the code does:
every CLI option, panel key, manifest and table column and napari widget is documented,
and the Python API tutorial runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="mkdocs not installed (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_docs_build_strict_and_offline(site):
    for page in ("index", "cli/index", "panels/index", "pipelines/index", "outputs/index", "exports/index",
                 "qc-report/index", "tutorial/index", "napari/index", "architecture/index"):
        assert (site / f"{page}.html").is_file(), page
    # the built pages load nothing from the network (scripts, styles, images are local)
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        for url in re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="(https?:)?//[^"]+"', text):
            pytest.fail(f"{html.relative_to(site)} loads a network resource")


def test_cli_reference_covers_the_parser(site):
    from qdplex.cli import build_parser

    page = (site / "cli" / "index.html").read_text(encoding="utf-8")
    parser = build_parser()
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0].choices
    assert {"run", "synth", "report"} <= set(subs)
    for name, sub in subs.items():
        assert f"qdplex {name}" in page, name
        for action in sub._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert opt in page, f"qdplex {name} {opt} missing from the CLI reference"


def test_cli_generator_is_deterministic_and_complete():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a, b = mod.cli_markdown(), mod.cli_markdown()
    assert a == b
    assert "## `qdplex report`" in a and "`--no-report`" in a and "`OUT`" in a


def test_panel_reference_lists_every_key():
    from qdplex import panel

    page = _read("panels.md")
    keys = set(panel._TOP_KEYS) | set(panel._MARKER_KEYS)
    for section, allowed in panel._SECTION_KEYS.items():
        keys |= set(allowed)
        assert f"## `[{section}]`" in page, section
    missing = sorted(k for k in keys if f"`{k}`" not in page)
    assert not missing, f"panel keys not documented in docs/panels.md: {missing}"
    assert "## `[[markers]]`" in page and "## `[scoring]`" in page and "## `[synth]`" in page


def test_panel_reference_lists_scoring_and_synth_keys():
    import inspect

    from qdplex import score, synth

    page = _read("panels.md")
    src = inspect.getsource(score)
    scoring = set(re.findall(r'(?:\bsc|_scoring\(panel\))\.get\("(\w+)"', src)) | set(re.findall(r'"(\w+)" in sc\b', src))
    assert {"method", "cutoffs", "her2"} <= scoring  # the scorer still reads its settings this way
    section = page[page.index("## `[scoring]`"):page.index("## `[synth]`")]
    missing = sorted(k for k in scoring if f"`{k}`" not in section)
    assert not missing, f"[scoring] keys read by qdplex.score but not documented: {missing}"
    known = re.search(r"known = \{([^}]*)\}", inspect.getsource(synth._synth_options)).group(1)
    synth_keys = set(re.findall(r'"(\w+)"', known))
    section = page[page.index("## `[synth]`"):]
    missing = sorted(k for k in synth_keys if f"`{k}`" not in section)
    assert not missing, f"[synth] keys accepted by qdplex.synth but not documented: {missing}"


def test_output_reference_lists_every_column():
    from qdplex.batch import MANIFEST_COLUMNS
    from qdplex.quantify import QC_COLUMNS
    from qdplex.tables import MCQUANT_MORPHOLOGY

    page = _read("outputs.md")
    for col in list(MANIFEST_COLUMNS) + list(QC_COLUMNS) + list(MCQUANT_MORPHOLOGY):
        assert col in page, f"{col} not documented in docs/outputs.md"
    # the layout block matches the architecture contract
    arch = _read("architecture.md")
    for f in re.findall(r"^\s+(\S+\.(?:tif|csv|parquet|h5ad|json|html))\s", arch, re.M):
        assert f in page, f


def test_napari_guide_lists_every_widget():
    import yaml  # napari's dependency, present with the plugin

    manifest = yaml.safe_load((ROOT / "src" / "qdplex" / "napari" / "napari.yaml").read_text())
    page = _read("napari.md")
    for w in manifest["contributions"]["widgets"]:
        assert f"**{w['display_name']}**" in page, w["display_name"]
    for s in manifest["contributions"]["sample_data"]:
        assert s["display_name"].split(" (")[0] in page


def test_tutorial_runs(tmp_path):
    env = dict(os.environ, QDPLEX_TUTORIAL_OUT=str(tmp_path), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(DOCS / "tutorial.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "out" / "tutorial" / "qc" / "report.html").is_file()
    assert (tmp_path / "out" / "tutorial" / "cells.csv").is_file()
    assert "nucleus F1" in proc.stdout


def test_output_reference_matches_a_real_run():
    from qdplex.model import COMPARTMENTS
    from qdplex.panel import read_panel
    from qdplex.slide import run_slide
    from qdplex.synth import make_slide

    panel = read_panel(ROOT / "pipelines" / "prostate-ar-psa.toml")
    res = run_slide(make_slide(panel, shape=(96, 96), seed=0).image, panel)
    page = _read("outputs.md")
    for key in res.summary:
        assert f"`{key}`" in page, f"summary.json key {key!r} not documented in docs/outputs.md"
    planes = res.unmixed.abundances.channel_names
    per_cell = re.compile(rf"^({'|'.join(map(re.escape, planes))})_({'|'.join(COMPARTMENTS)})_\w+$")
    for col in res.table.columns:
        if col == "CellID" or col in panel.marker_names or per_cell.match(col):
            continue
        name = "<marker>_positive" if col.endswith("_positive") else col
        assert name in page, f"cells.csv column {col!r} not documented in docs/outputs.md"


# pages whose statements this file checks against the code (architecture.md is the
# contract, owned and checked elsewhere)
_PAGES = ("index.md", "panels.md", "pipelines.md", "outputs.md", "exports.md", "qc-report.md", "tutorial.md",
          "napari.md")


def test_every_python_name_in_the_docs_exists():
    """Every `qdplex.x.y` the guides name resolves to a module or an attribute."""
    import importlib

    import qdplex

    names = set()
    for page in _PAGES:
        names |= set(re.findall(r"`(qdplex(?:\.\w+)+)", _read(page)))
    assert len(names) > 20
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        obj = qdplex
        for i, part in enumerate(parts[1:], start=1):
            try:  # a submodule (qdplex.unmix.unmix: the module qdplex.unmix, then its function)
                obj = importlib.import_module(".".join(parts[: i + 1]))
            except ModuleNotFoundError:
                if not hasattr(obj, part):
                    missing.append(name)
                    break
                obj = getattr(obj, part)
    assert not missing, f"names in the docs that qdplex does not have: {missing}"
    # the stage functions the tutorial calls stay functions on the package after their modules are imported
    import inspect

    for f in ("unmix", "segment", "quantify"):
        assert callable(getattr(qdplex, f)) and not inspect.ismodule(getattr(qdplex, f)), f


def test_every_command_line_in_the_docs_parses():
    """`qdplex SUB --option ...` in the guides: the subcommand and each option exist."""
    import argparse

    from qdplex.cli import build_parser

    parser = build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0].choices
    seen = 0
    for page in _PAGES:
        text = _read(page)
        for line in re.findall(r"(?:^|`)qdplex ([a-z][\w-]*(?: [^`\n]*)?)", text, re.M):
            sub, *rest = line.split()
            if sub not in subs:  # prose such as "qdplex turns ..." or "qdplex reads"
                continue
            seen += 1
            opts = {o for a in subs[sub]._actions for o in a.option_strings}
            bad = [w for w in rest if w.startswith("--") and w.rstrip("`,.;)") not in opts]
            assert not bad, f"{page}: 'qdplex {line}' uses options {bad} that 'qdplex {sub}' does not have"
    assert seen >= 8


def test_napari_guide_names_the_real_controls():
    """The napari guide names the selection overlay, the Spectrum modes and the colormaps as the widgets do."""
    page = _read("napari.md")
    widgets = ROOT / "src" / "qdplex" / "napari" / "_widgets"
    common = (widgets / "_common.py").read_text(encoding="utf-8")
    selection = re.search(r'^SELECTION_LAYER = "([^"]+)"', common, re.M).group(1)
    assert f"`{selection}`" in page
    spectrum = (widgets / "_spectrum.py").read_text(encoding="utf-8")
    for label in re.findall(r'QRadioButton\("([^"]+)"\)', spectrum):
        assert label in page, f"Spectrum mode {label!r} not in docs/napari.md"
    colorby = (widgets / "_colorby.py").read_text(encoding="utf-8")
    cmaps = re.search(r"^CMAPS = \(([^)]*)\)", colorby, re.M).group(1)
    for cmap in re.findall(r'"(\w+)"', cmaps):
        assert cmap in page, f"colormap {cmap!r} not in docs/napari.md"
    for button in re.findall(r'QPushButton\("([^"…]+)"\)', colorby + (widgets / "_run.py").read_text(encoding="utf-8")):
        assert f"**{button}**" in page, f"button {button!r} not in docs/napari.md"


def test_panel_page_examples_are_real(tmp_path):
    """The minimal panel of docs/panels.md reads; its typo example gives the error the page shows."""
    from qdplex.errors import PanelError
    from qdplex.panel import read_panel

    page = _read("panels.md")
    toml = re.search(r"```toml\n(.*?)```", page, re.S).group(1)
    (tmp_path / "ok.toml").write_text(toml, encoding="utf-8")
    panel = read_panel(tmp_path / "ok.toml")
    assert [(m.name, m.fluor, m.compartment) for m in panel.markers] == [
        ("HER2", "QD655", "membrane"), ("ER", "QD605", "nucleus")]
    shown = re.search(r"```text\nqdplex: error: panels/my\.toml: (.*?)\n```", page).group(1)
    (tmp_path / "my.toml").write_text(toml.replace('"nucleus"', '"membrame"'), encoding="utf-8")
    with pytest.raises(PanelError) as err:
        read_panel(tmp_path / "my.toml")
    assert shown in str(err.value)
