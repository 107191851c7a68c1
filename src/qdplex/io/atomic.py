"""Atomic outputs: write under a temporary name in the same folder, then rename.

An interrupted run therefore never leaves a file (or an OME-Zarr folder) that
looks complete and is not: the temporary name is hidden (leading dot) and ends
in ``.part``, and :func:`os.replace` is atomic on one file system.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import OutputError

__all__ = ["atomic_path", "is_partial", "PARTIAL_SUFFIX"]

#: Suffix of temporary outputs (see :func:`atomic_path`); readers and slide discovery skip them.
PARTIAL_SUFFIX = ".part"


def is_partial(path) -> bool:
    """True for the temporary name of an output being written by :func:`atomic_path`."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    Write the file (or folder, e.g. an OME-Zarr) at the yielded path. When the
    block ends without an exception the temporary is moved onto ``path`` with
    :func:`os.replace` (an existing folder at ``path`` is replaced as a whole);
    when it raises, the temporary is removed and ``path`` is left untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Final output path. Its parent folder is created if needed.

    Yields
    ------
    pathlib.Path
        A hidden temporary path in the same folder (same file system, so the
        final rename is atomic).

    Examples
    --------
    >>> with atomic_path(tmp_path / "cells.csv") as tmp:  # doctest: +SKIP
    ...     table.to_csv(tmp, index=False)
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"expected a writable folder for the output, found {err}", path=path) from err
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"expected the writer to create {tmp.name}, found nothing written", path=path)
        if tmp.is_dir() and path.exists():
            # os.replace cannot replace a non-empty folder: move the old one aside first
            old = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
