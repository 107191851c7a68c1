"""The test suite leaves the checkout as it found it.

``conftest.py`` takes :func:`checkout_state` before the first test (a session fixture)
and sorts :func:`test_checkout_left_as_found` after every other test, so this check
sees what the whole run wrote: a tracked file rewritten (a screenshot, generated docs)
or an untracked file left behind fails it. Entries already present before the run are
compared by size and modification time, so a developer's own uncommitted edits do not
fail it, but a test that rewrites one of them does.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def checkout_state(root: Path = ROOT) -> dict | None:
    """``git status --porcelain`` of ``root``: each entry → (size, mtime) of its path.

    Returns None when git is missing or ``root`` is not the top of a git work tree
    (an unpacked release, a copy inside another repository).
    """
    git = shutil.which("git")
    if git is None:
        return None
    top = subprocess.run([git, "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True, timeout=60)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root.resolve():
        return None
    proc = subprocess.run([git, "status", "--porcelain=v1", "--untracked-files=all"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return None
    state = {}
    for line in proc.stdout.splitlines():
        path = root / line[3:].split(" -> ")[-1].strip('"')
        try:
            st = path.stat()
            state[line] = (st.st_size, st.st_mtime_ns)
        except OSError:
            state[line] = None
    return state


def test_checkout_left_as_found(checkout_before):
    if checkout_before is None:
        pytest.skip("not the top of a git checkout (or git is missing): nothing to compare against")
    after = checkout_state()
    changed = sorted(line for line in set(after) | set(checkout_before)
                     if after.get(line, "gone") != checkout_before.get(line, "new"))
    assert not changed, ("the test run changed the checkout (git status --porcelain):\n  "
                         + "\n  ".join(changed))
