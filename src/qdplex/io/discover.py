"""Find slides in files and folders: what counts as one slide, and its name."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError
from .atomic import is_partial
from .checks import path_kind

__all__ = ["find_slides", "slide_stem", "is_ome_zarr", "is_zarr_like", "zarr_metadata_error", "is_channel_folder",
           "TIFF_SUFFIXES"]

#: Largest Zarr metadata file (``.zattrs``, ``.zarray``, ``zarr.json``) qdplex reads.
MAX_METADATA_BYTES = 16 * 2**20
_ZARR_META = (".zattrs", "zarr.json")

TIFF_SUFFIXES = (".tif", ".tiff")
_STRIP = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr", ".ome")

DEFAULT_INCLUDE = ("*.ome.tif", "*.ome.tiff", "*.tif", "*.tiff", "*.ome.zarr", "*.zarr")


def slide_stem(path) -> str:
    """Slide name of ``path``: its name without ``.ome.tif(f)``, ``.tif(f)``, ``.ome.zarr``, ``.zarr``."""
    name = Path(path).name
    low = name.lower()
    for suffix in _STRIP:
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def is_ome_zarr(path) -> bool:
    """True for a folder that is a Zarr group holding OME ``multiscales`` metadata.

    A bioformats2raw layout (image in the sub-group ``0``) counts too. Metadata that
    cannot be read or parsed gives False (see :func:`zarr_metadata_error`).
    """
    import json

    p = Path(path)
    if not p.is_dir():
        return False
    for meta in _ZARR_META:
        m = p / meta
        if m.is_file():
            if zarr_metadata_error(p) is not None:
                return False
            attrs = json.loads(m.read_text(encoding="utf-8"))
            if meta == "zarr.json":
                attrs = attrs.get("attributes") or {} if isinstance(attrs, dict) else {}
                if isinstance(attrs.get("ome"), dict):
                    attrs = {**attrs["ome"], **attrs}
            return isinstance(attrs, dict) and ("multiscales" in attrs or "bioformats2raw.layout" in attrs)
    return False


def is_zarr_like(path) -> bool:
    """True for a folder named ``*.zarr`` or holding Zarr group metadata (``.zgroup``, ``.zattrs``, ``zarr.json``)."""
    p = Path(path)
    return p.is_dir() and (p.name.lower().endswith(".zarr")
                           or any((p / m).exists() or (p / m).is_symlink() for m in (".zgroup",) + _ZARR_META))


def zarr_metadata_error(path) -> str | None:
    """What is wrong with a Zarr folder's group metadata, in words, or None when it reads as JSON.

    The message never quotes the file: only its name, size and the parser's position.
    """
    import json

    p = Path(path)
    for meta in (".zgroup",) + _ZARR_META:
        m = p / meta
        kind = path_kind(m)
        if kind == "nothing":
            continue
        if kind != "a regular file":
            return f"expected {meta} to be a regular file, found {kind}"
        size = m.stat().st_size
        if size > MAX_METADATA_BYTES:
            return f"expected {meta} of at most {MAX_METADATA_BYTES // 2**20} MiB, found {size} bytes"
        try:
            json.loads(m.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            return f"expected {meta} to be UTF-8 JSON, found undecodable bytes"
        except ValueError as e:
            return f"expected {meta} to be JSON, found a syntax error at line {e.lineno} column {e.colno}"
    return None


def _tiffs_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.name.lower().endswith(TIFF_SUFFIXES) and not p.name.startswith(".")
    )


def is_channel_folder(path) -> bool:
    """True for a folder of one single-plane TIFF per channel.

    Either the folder holds ``channels.csv`` and exactly as many TIFFs as it
    has rows (or every file its ``file`` column names), or it holds Leica LCS
    text metadata describing exactly as many channels as it has TIFFs.
    """
    p = Path(path)
    csv_path = p / "channels.csv"
    if not p.is_dir():
        return False
    if path_kind(csv_path) == "nothing":
        tiffs = _tiffs_in(p)
        if len(tiffs) > 1 and any(p.glob("*.txt")):
            from .folder import _leica_channels

            return _leica_channels(p, tiffs) is not None
        return False
    from .channels import read_channels_csv

    try:
        rows = read_channels_csv(csv_path)
    except InputError:
        # a broken channels.csv: one slide (the folder) whose error names it, not one failing slide per TIFF
        return bool(_tiffs_in(p))
    tiffs = _tiffs_in(p)
    files = [r["file"] or (r["channel"] if isinstance(r["channel"], str) else None) for r in rows]
    named = [f for f in files if f]
    present = {t.name for t in tiffs} | {slide_stem(t) for t in tiffs}
    if named and (any(f in present or slide_stem(f) in present for f in named)
                  or all(f.lower().endswith(TIFF_SUFFIXES) for f in named)):
        # channels.csv names files: the folder is one slide (reading it names any missing file)
        return True
    # the same number of multi-plane TIFFs sharing one channels.csv are separate slides
    return len(tiffs) == len(rows) and len(tiffs) > 1 and _single_plane(tiffs[0])


def _single_plane(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return int(np.prod([n for n, a in zip(series.shape, series.axes) if a not in "YX"])) == 1
    except Exception:
        return False


def _match(name: str, patterns: Sequence[str]) -> bool:
    low = name.lower()
    return any(fnmatch.fnmatch(low, pat.lower()) for pat in patterns)


def _excluded(path: Path, exclude: Sequence[str]) -> bool:
    return bool(exclude) and (_match(path.name, exclude) or any(fnmatch.fnmatch(str(path), pat) for pat in exclude))


def find_slides(
    inputs: Iterable | str | Path,
    *,
    include: Sequence[str] = DEFAULT_INCLUDE,
    exclude: Sequence[str] = (),
) -> list[Path]:
    """Slides in ``inputs`` (files and folders, searched recursively).

    Parameters
    ----------
    inputs : path or iterable of paths
        Slide files, OME-Zarr folders, folders of per-channel TIFFs, or folders
        to search.
    include : sequence of str
        Glob patterns a file (or Zarr folder) name must match (case-insensitive).
    exclude : sequence of str
        Glob patterns matched against the name and the full path; matching
        slides and folders are skipped.

    Returns
    -------
    list of pathlib.Path
        Sorted, deduplicated. An OME-Zarr folder and a folder of per-channel
        TIFFs (one holding ``channels.csv``) each count as one slide; hidden
        files, partial outputs and CSV sidecars are never slides.

    Raises
    ------
    InputError
        An input path that does not exist, or is a device, FIFO, socket, broken link
        or symlink loop. Devices, FIFOs and broken links named like slides inside a
        folder are returned (as slides whose reading fails with that message), as are
        Zarr folders whose metadata does not parse; symlink loops inside a folder are
        skipped (they have no name to resolve).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: set[Path] = set()

    def visit(p: Path, explicit: bool) -> None:
        if p.name.startswith(".") and not explicit:
            return
        if is_partial(p) or (_excluded(p, exclude) and not explicit):
            return
        kind = path_kind(p)
        if kind == "a folder":
            if is_zarr_like(p):
                # a Zarr that is not a readable OME-Zarr is still a slide: reading it says what is wrong
                if explicit or _match(p.name, include):
                    found.add(p.resolve())
                return
            if is_channel_folder(p):
                found.add(p.resolve())
                return
            for child in sorted(p.iterdir()):
                visit(child, False)
            return
        if p.name.lower().endswith(".csv"):
            return
        if explicit or _match(p.name, include):
            if kind == "a regular file":
                found.add(p.resolve())
            elif kind != "a symlink loop":  # a device, FIFO or broken link named like a slide: an error row
                found.add(p.resolve())

    for item in inputs:
        p = Path(item)
        kind = path_kind(p)
        if kind == "nothing":
            raise InputError("expected an existing slide file or folder, found nothing at this path", path=p)
        if kind not in ("a regular file", "a folder"):
            raise InputError(f"expected a slide file or folder (a regular file or folder), found {kind}", path=p)
        visit(p, True)
    return sorted(found)
