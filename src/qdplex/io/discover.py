"""Find slides in files and folders: what counts as one slide, and its name."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError
from .atomic import is_partial

__all__ = ["find_slides", "slide_stem", "is_ome_zarr", "is_channel_folder", "TIFF_SUFFIXES"]

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

    A bioformats2raw layout (image in the sub-group ``0``) counts too.
    """
    p = Path(path)
    if not p.is_dir():
        return False
    for meta in (".zattrs", "zarr.json"):
        if (p / meta).is_file():
            text = (p / meta).read_text(errors="replace")
            return "multiscales" in text or "bioformats2raw.layout" in text
    return False


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
    if not csv_path.is_file():
        tiffs = _tiffs_in(p)
        if len(tiffs) > 1 and any(p.glob("*.txt")):
            from .folder import _leica_channels

            return _leica_channels(p, tiffs) is not None
        return False
    from .channels import read_channels_csv

    try:
        rows = read_channels_csv(csv_path)
    except InputError:
        return False
    tiffs = _tiffs_in(p)
    files = [r["file"] or (r["channel"] if isinstance(r["channel"], str) else None) for r in rows]
    if all(files):
        names = {t.name for t in tiffs} | {slide_stem(t) for t in tiffs}
        return all(f in names or slide_stem(f) in names for f in files)
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
        An input path that does not exist.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: set[Path] = set()

    def visit(p: Path, explicit: bool) -> None:
        if p.name.startswith(".") and not explicit:
            return
        if is_partial(p) or (_excluded(p, exclude) and not explicit):
            return
        if p.is_dir():
            if is_ome_zarr(p) or p.name.lower().endswith(".zarr"):
                if explicit or _match(p.name, include):
                    if is_ome_zarr(p):
                        found.add(p.resolve())
                return
            if is_channel_folder(p):
                found.add(p.resolve())
                return
            for child in sorted(p.iterdir()):
                visit(child, False)
            return
        if p.is_file():
            if p.name.lower().endswith(".csv"):
                return
            if explicit or _match(p.name, include):
                found.add(p.resolve())

    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise InputError("expected an existing slide file or folder, found nothing at this path", path=p)
        visit(p, True)
    return sorted(found)
