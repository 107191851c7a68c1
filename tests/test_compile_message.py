"""A first run says once that it compiles qdplex's kernels; a run with the kernels cached says nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# one small kernel (compiled on its first call), called twice in one process
_CHILD = """
import numpy as np
from qdplex.quantify import label_extents
lab = np.arange(12, dtype=np.uint32).reshape(3, 4)
assert label_extents(np.arange(1, 12), lab)[4].tolist() == [1, 1, 1, 1]
label_extents(np.arange(1, 12), lab.astype(np.uint64))
print("done")
"""


def _run(cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)


def test_first_compile_prints_one_line_then_none(tmp_path):
    first = _run(tmp_path / "numba-cache")
    lines = [ln for ln in first.stderr.splitlines() if "compiling qdplex kernels" in ln]
    assert lines == [f"qdplex: compiling qdplex kernels (first run only, ~{_seconds()} s)"], first.stderr
    assert first.stdout.strip() == "done"
    second = _run(tmp_path / "numba-cache")  # the machine code is now in the disk cache
    assert "compiling" not in second.stderr, second.stderr


def _seconds() -> int:
    from qdplex._numba import COMPILE_SECONDS

    return COMPILE_SECONDS
