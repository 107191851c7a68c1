"""Provenance: versions, content hashes and host facts for ``run.json``.

Everything here is a plain function returning JSON-friendly values, so that the
pipeline (one slide) and the batch (many slides) record the same facts in the
same form::

    from qdplex import provenance
    rec = provenance.run_record(panel=panel, inputs=[path], parameters={"fmt": "tiff"})

A rerun compares a slide's identity (:func:`slide_identity`) to decide whether its
outputs are still valid (see :mod:`qdplex.batch`): the input's SHA-256 and its channel
sidecars', the panel's SHA-256 (its settings plus the *content* of the spectra and
control files it names, not their paths), the output options and the qdplex version.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import sys
import time as _time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = [
    "DEPENDENCIES",
    "qdplex_version",
    "package_versions",
    "file_sha256",
    "panel_sha256",
    "library_sha256",
    "host_info",
    "run_record",
    "slide_identity",
    "to_jsonable",
]

#: Distributions whose versions go into ``run.json``.
DEPENDENCIES = (
    "numpy", "scipy", "scikit-image", "tifffile", "imagecodecs", "dask", "distributed",
    "pandas", "fastparquet", "anndata", "numba", "zarr", "onnxruntime", "scikit-learn",
)

_CHUNK = 1 << 22  # 4 MiB reads: hashing a whole slide never holds more than this


def qdplex_version() -> str:
    """The running qdplex version (``qdplex.__version__``)."""
    from . import __version__

    return __version__


def package_versions(names: Iterable[str] = DEPENDENCIES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None when a distribution is not installed).

    Parameters
    ----------
    names : iterable of str
        Distribution names as on PyPI.

    Returns
    -------
    dict
        ``{"qdplex": ..., "python": ..., name: version, ...}``.
    """
    out: dict[str, str | None] = {"qdplex": qdplex_version(), "python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB pieces (memory does not grow with size).

    A folder (an OME-Zarr store, a folder of one TIFF per channel) hashes the sorted
    relative paths of its files together with their contents, so renaming or editing
    any file inside it changes the hash, and moving the folder does not.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    str
        Hex digest.

    Raises
    ------
    qdplex.errors.InputError
        When the path does not exist, cannot be read, or is a device, FIFO or socket.
    """
    from .errors import InputError

    path = Path(path)
    h = hashlib.sha256()
    try:
        key = _stat_key(path)
        if key in _HASHES:
            return _HASHES[key]
        if not path.is_dir():
            from .io.checks import require_regular

            require_regular(path, what="a file to hash")  # a device or FIFO would be read forever
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            for f in files:
                h.update(f.relative_to(path).as_posix().encode("utf-8") + b"\0")
                _update_from_file(h, f)
                h.update(b"\0")
        else:
            _update_from_file(h, path)
    except FileNotFoundError:
        raise InputError("expected an existing file or folder to hash, found nothing there", path=path) from None
    except OSError as e:
        raise InputError(f"expected a readable file, found {type(e).__name__}: {e.strerror or e}", path=path) from None
    digest = h.hexdigest()
    try:
        # remember it only when unchanged while read and not modified in the last seconds
        # (timestamps are coarse: a file rewritten within one tick keeps its mtime)
        newest = key[2] if key[1] == "dir" else path.stat().st_mtime
        if key == _stat_key(path) and _time.time() - newest > 2.0:
            _HASHES[key] = digest
            while len(_HASHES) > 256:
                _HASHES.pop(next(iter(_HASHES)))
    except OSError:
        pass
    return digest


#: SHA-256 of files already hashed in this process, by (path, size, mtime, inode): a slide is
#: read once even when the batch (resume check) and the pipeline (run.json) both ask.
_HASHES: dict[tuple, str] = {}


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        newest = max([st.st_mtime] + [f.stat().st_mtime for f in files])
        return (str(path.resolve()), "dir", newest,
                tuple((f.relative_to(path).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def _update_from_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)


def panel_sha256(panel) -> str:
    """SHA-256 of a panel's meaning: its settings and the contents of the files it names.

    The panel file's own location does not count, and the spectra CSVs and the
    unstained control count by content, so copying a panel and its files elsewhere
    keeps the hash while editing any of them changes it.

    Parameters
    ----------
    panel : qdplex.panel.Panel

    Returns
    -------
    str
        Hex digest.
    """
    d = panel.to_dict()
    d.pop("path", None)
    d["spectra_files"] = [file_sha256(p) for p in panel.spectra_files]
    if panel.autofluorescence_control is not None:
        d["autofluorescence_control"] = file_sha256(panel.autofluorescence_control)
    return _json_sha256(d)


def library_sha256(library) -> str:
    """SHA-256 of a spectral library's numbers: each spectrum's name, wavelengths and intensities, in order.

    Parameters
    ----------
    library : qdplex.spectra.SpectralLibrary
        Any iterable of spectra with ``name``, ``wavelength_nm`` and ``intensity``.
    """
    h = hashlib.sha256()
    for spec in library:
        h.update(str(spec.name).encode("utf-8") + b"\0")
        for arr in (spec.wavelength_nm, spec.intensity):
            a = np.ascontiguousarray(np.asarray(arr, dtype=np.float64))
            h.update(str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def _sidecars(path: Path) -> list[Path]:
    """Every file beside ``path`` that can name its channels (see :func:`qdplex.io.channels.sidecar_for`)."""
    from .io.discover import slide_stem

    if path.is_dir():
        return []  # a folder's own channels.csv is part of the folder's hash
    names = [f"{slide_stem(path)}.channels.csv", "channels.csv", "markers.csv"]
    return [path.with_name(n) for n in names if path.with_name(n).is_file()]


def slide_identity(path, panel, options: Mapping[str, Any] | None = None, *, input_sha256: str | None = None,
                   panel_sha: str | None = None) -> dict[str, Any]:
    """Everything that decides a slide's outputs, and one hash of it.

    Parameters
    ----------
    path : path
        The slide file or folder.
    panel : qdplex.panel.Panel
    options : mapping, optional
        Output options that change what is written (format, reports, tile).
    input_sha256, panel_sha : str, optional
        Already computed hashes (avoid hashing twice).

    Returns
    -------
    dict
        ``input_sha256``, ``sidecars`` (file name → SHA-256 of every channel sidecar
        beside the input: ``<stem>.channels.csv``, ``channels.csv``, ``markers.csv``),
        ``panel_sha256``, ``options``, ``qdplex_version`` and ``identity_sha256``
        (the SHA-256 of all of them).
    """
    path = Path(path)
    ident = {
        "input_sha256": input_sha256 or file_sha256(path),
        "sidecars": {p.name: file_sha256(p) for p in _sidecars(path)},
        "panel_sha256": panel_sha or panel_sha256(panel),
        "options": to_jsonable(dict(sorted((options or {}).items()))),
        "qdplex_version": qdplex_version(),
    }
    ident["identity_sha256"] = _json_sha256(ident)
    return ident


def host_info() -> dict[str, Any]:
    """Facts about the machine that ran the job (no user names, no environment)."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "pid": os.getpid(),
    }
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_bytes"] = int(pages * size)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        info["memory_bytes"] = None
    return info


def run_record(
    *,
    panel=None,
    inputs: Iterable = (),
    parameters: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    library=None,
    input_hashes: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The provenance block of ``run.json``.

    Parameters
    ----------
    panel : qdplex.panel.Panel, optional
        Recorded in full (``Panel.to_dict``) with its hash.
    inputs : iterable of path
        Input files; each is hashed unless its hash is given in ``input_hashes``.
    parameters : mapping, optional
        Run parameters (tile size, scheduler, format, ...).
    timings : mapping, optional
        Stage → seconds.
    library : SpectralLibrary, optional
        Its hash is recorded.
    input_hashes : mapping, optional
        Already computed ``{str(path): sha256}`` (avoids hashing a large slide twice).

    Returns
    -------
    dict
        JSON-friendly: ``qdplex_version``, ``versions``, ``created``, ``host``,
        ``panel``, ``panel_sha256``, ``library_sha256``, ``inputs`` (path, sha256,
        bytes), ``parameters``, ``timings``.
    """
    known = dict(input_hashes or {})
    ins = []
    for p in inputs:
        p = Path(p)
        digest = known.get(str(p)) or file_sha256(p)
        size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        ins.append({"path": str(p.resolve()), "sha256": digest, "bytes": int(size)})
    return to_jsonable(
        {
            "qdplex_version": qdplex_version(),
            "versions": package_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": host_info(),
            "panel": None if panel is None else panel.to_dict(),
            "panel_sha256": None if panel is None else panel_sha256(panel),
            "library_sha256": None if library is None else library_sha256(library),
            "inputs": ins,
            "parameters": dict(parameters or {}),
            "timings": {k: round(float(v), 4) for k, v in (timings or {}).items()},
        }
    )


def to_jsonable(obj):
    """``obj`` with numpy scalars/arrays, paths and sets turned into JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        v = obj.item()
        return None if isinstance(v, float) and not np.isfinite(v) else v
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def _json_sha256(obj) -> str:
    text = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
