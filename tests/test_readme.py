"""The README's Python example runs as written, on the bundled sample."""

from __future__ import annotations

import os
import re

import numpy as np

from conftest import ROOT


def test_readme_python_example_runs(monkeypatch):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(ROOT)
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)  # noqa: S102 - our own README
    # what the example promises
    assert ns["result"].table.shape[0] > 10
    assert list(ns["result"].table.columns[:6]) == ["CellID", "HER2", "ER", "PR", "EGFR", "mTOR"]
    assert ns["nuclei"].dtype == np.uint32 and ns["nuclei"].max() > 10
    assert len(ns["table"]) == ns["seg"].n_cells
    # the example's numbers are run_slide's: same offset, same refined spectra, same planes
    ex, run = ns["unmixed"], ns["result"].unmixed
    assert ex.offset_record == run.offset_record == {"values": 100.0, "source": "given"}
    np.testing.assert_allclose(ex.matrix, run.matrix)
    a = np.asarray(ex.abundances.data)
    b = np.asarray(run.abundances.data)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    qd655 = [c.fluor for c in run.abundances.channels].index("QD655")
    assert abs(float(a[qd655].mean()) - float(b[qd655].mean())) < 1e-3
    t, r = ns["table"], ns["result"].table.set_index("CellID")  # quantify's table is indexed by CellID
    common = t.index.intersection(r.index)
    assert len(common) >= 0.95 * len(r)
    np.testing.assert_allclose(t.loc[common, "HER2_membrane_mean"], r.loc[common, "HER2"], rtol=1e-4, atol=1e-4)


def test_readme_commands_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert f"make {target}" in text and re.search(rf"^{target}:", make, flags=re.M)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci and os.access(ROOT / ".ci" / "run", os.X_OK)
