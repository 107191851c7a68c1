"""Checks made before any pixel is read: what is at a path, and what the pixels are.

Reading ``/dev/zero`` or a named pipe never ends, and a symlink loop surfaces as an
internal ``RuntimeError`` from :meth:`pathlib.Path.resolve`; every reader asks
:func:`require_regular` (or :func:`path_kind`) first, so each of them becomes one
:class:`~qdplex.errors.InputError` line naming the path and what was found. Pixels
must be real numbers, one value per channel (:func:`check_pixel_dtype`).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import numpy as np

from ..errors import InputError

__all__ = ["path_kind", "require_regular", "resolve_input", "check_pixel_dtype", "check_plain_name", "plain_name_problem", "quotable_header",
           "MAX_CHUNK_BYTES"]

#: Largest decoded chunk (Zarr chunk, compressed TIFF strip or tile) a reader allocates.
MAX_CHUNK_BYTES = 512 * 2**20


def path_kind(path) -> str:
    """What is at ``path``, in words.

    Returns
    -------
    str
        ``"a regular file"``, ``"a folder"``, ``"a character device"``, ``"a block
        device"``, ``"a FIFO (named pipe)"``, ``"a socket"``, ``"a symlink loop"``,
        ``"a broken symlink"``, ``"nothing"`` or ``"an unreadable path (…)"``.
    """
    p = os.fspath(path)
    try:
        mode = os.stat(p).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if isinstance(e, FileNotFoundError) or e.errno == errno.ENOTDIR:
            return "a broken symlink" if os.path.islink(p) else "nothing"
        return f"an unreadable path ({e.strerror or type(e).__name__})"
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def require_regular(path, *, what: str = "a file", folder_ok: bool = False, error=InputError) -> Path:
    """``path`` when it is a regular file (or, with ``folder_ok``, a folder); else ``error``.

    Parameters
    ----------
    path : path-like
    what : str
        What was expected, for the message (``"a spectra CSV"``).
    folder_ok : bool
        Accept a folder too (an OME-Zarr, a folder of channel TIFFs).
    error : type
        The :class:`~qdplex.errors.QdplexError` subclass to raise.
    """
    kind = path_kind(path)
    if kind == "a regular file" or (folder_ok and kind == "a folder"):
        return Path(path)
    plain = "regular file" + (" or folder" if folder_ok else "")
    raise error(f"expected {what} ({'a ' + plain}), found {kind}", path=path)


def resolve_input(path) -> Path:
    """``Path(path).expanduser().resolve()``, with a symlink loop as an :class:`InputError`."""
    p = Path(path).expanduser()
    try:
        return p.resolve()
    except (RuntimeError, OSError):
        raise InputError("expected a slide file or folder, found a symlink loop", path=p) from None


def check_pixel_dtype(dtype, *, path) -> np.dtype:
    """``dtype`` when it holds measured intensities (integers or floats); else InputError.

    Boolean masks, complex numbers and structured or object pixels are refused with a
    message about the pixel type (not about channel names).
    """
    dt = np.dtype(dtype)
    if dt.kind in "uif" and dt.fields is None:
        return dt
    what = {"b": "boolean", "c": "complex", "O": "Python object", "V": "structured",
            "S": "byte-string", "U": "string", "M": "datetime", "m": "timedelta"}.get(dt.kind, "non-numeric")
    raise InputError(f"expected integer or floating-point pixels (intensities), found {what} pixels of dtype {dt}",
                     path=path)


def plain_name_problem(name) -> str:
    """Why ``name`` is not a plain file name ("" when it is).

    A plain name is non-empty, is not only dots (``.``, ``..``), holds no path separator
    or NUL and does not start with a dot (hidden files are never slides), so a file
    named after it stays inside the folder it is written to.
    """
    n = name if isinstance(name, str) else ""
    if not n.strip():
        return "an empty name"
    if set(n) <= {"."}:
        return "only dots"
    if any(c in n for c in ("/", "\\", "\0")) or os.sep in n or (os.altsep and os.altsep in n):
        return "a path separator"
    if n.startswith("."):
        return "a hidden name (leading dot)"
    return ""


def check_plain_name(name, *, what: str = "a slide name", error=None) -> str:
    """``name`` when it is a plain file name (:func:`plain_name_problem`); else an error
    (an :class:`~qdplex.errors.OutputError` by default)."""
    from ..errors import OutputError

    problem = plain_name_problem(name)
    if problem:
        raise (error or OutputError)(f"expected {what} that is a plain file name (no path separators, not '.' "
                                     f"or '..', no leading dot), found {problem}: {name!r}")
    return name


_HEADER_FIELD = re.compile(r"[\w .()/µ-]{0,40}")


def quotable_header(fields) -> bool:
    """True when CSV header ``fields`` may be quoted in an error message.

    Only short names of letters, digits, spaces and ``. ( ) / µ -`` qualify: the first
    line of a file that is no CSV (a password file named by mistake) is never echoed.
    """
    return all(isinstance(f, str) and _HEADER_FIELD.fullmatch(f) for f in fields)
