"""A folder of one single-plane TIFF per channel, read as one lazy C×Y×X image.

Channel names and order come from a ``channels.csv`` in the folder (``channel``
or ``file`` column naming the file, or channel numbers in sorted file order);
without one, the files are taken in sorted order and named by their stems.
Band edges in Leica LCS metadata (``<series>.txt`` beside the TIFFs) are parsed
into emission bands when present (see :func:`parse_leica_txt`).
"""

from __future__ import annotations

import re
from pathlib import Path

import dask.array as da
import numpy as np

from ..errors import InputError
from ..model import Channel, MultiplexImage
from .channels import apply_channels, read_channels_csv
from .checks import path_kind
from .discover import TIFF_SUFFIXES, slide_stem

__all__ = ["read_channel_folder", "parse_leica_txt"]


def _read_leica_text(path: Path) -> str:
    raw = path.read_bytes()
    return raw.decode("latin-1").replace("\x00", "").replace("\r", "")


def parse_leica_txt(path) -> list[Channel] | None:
    """Emission bands of the channels of a Leica LCS series from its text metadata.

    Leica LCS (SP2) writes, per sequential scan ("HARDWARE PARAMETER #0
    SEQUENCE k"), the active laser lines (``AOTF (nm)`` > 0), the active PMTs
    and the spectral detector band of each (``SP Mirror i (left)``/``(right)``
    in nm). Channels are numbered sequence by sequence, PMT by PMT, as the
    ``..._chNN.tif`` files are.

    Returns
    -------
    list of Channel or None
        One Channel per active PMT per sequence, named
        ``ex<laser>_em<left>-<right>``, with ``emission_nm`` the band centre and
        ``bandwidth_nm`` its width; None when the file holds no such bands.
    """
    text = _read_leica_text(Path(path))
    sections = re.split(r"\n(?=HARDWARE PARAMETER #\d+ SEQUENCE \d+)", text)
    seqs = [s for s in sections if re.match(r"HARDWARE PARAMETER #\d+ SEQUENCE \d+", s)]
    if not seqs:  # a single (non-sequential) scan
        seqs = [s for s in re.split(r"\n(?=HARDWARE PARAMETER #\d+)", text) if s.startswith("HARDWARE PARAMETER")]
    out: list[Channel] = []
    for sec in seqs:
        lasers = []
        for nm, power in re.findall(r"^AOTF \((\d+)\)\s+([-\d.]+)", sec, flags=re.M):
            if float(power) > 0 and int(nm) not in lasers:
                lasers.append(int(nm))
        active = [int(i) for i, state in re.findall(r"^PMT (\d+)\s+(\w+)", sec, flags=re.M) if state == "Active"]
        left = {int(i): float(v) for i, v in re.findall(r"^SP Mirror (\d+) \(left\)\s+([\d.]+)", sec, flags=re.M)}
        right = {int(i): float(v) for i, v in re.findall(r"^SP Mirror (\d+) \(right\)\s+([\d.]+)", sec, flags=re.M)}
        ex = "+".join(str(x) for x in lasers) or "na"
        for pmt in active:
            if pmt in left and pmt in right and right[pmt] > left[pmt]:
                lo, hi = left[pmt], right[pmt]
                out.append(Channel(f"ex{ex}_em{lo:g}-{hi:g}", (lo + hi) / 2.0, hi - lo))
    return out or None


def _leica_channels(folder: Path, files: list[Path]) -> list[Channel] | None:
    """Leica bands for ``files`` when a ``<prefix>.txt`` beside them describes them."""
    m = re.match(r"^(.*?)_Series\d+", files[0].name)
    candidates = [folder / f"{m.group(1)}.txt"] if m else []
    candidates += sorted(p for p in folder.glob("*.txt") if p not in candidates)
    for cand in candidates:
        if not cand.is_file():
            continue
        try:
            chans = parse_leica_txt(cand)
        except OSError:
            continue
        if chans and len(chans) == len(files):
            return chans
    return None


def _channel_files(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.name.lower().endswith(TIFF_SUFFIXES) and not p.name.startswith(".")
    )
    if not files:
        raise InputError("expected a folder of one TIFF per channel, found no TIFF files", path=folder)
    return files


def read_channel_folder(path, *, channels=None, name=None) -> MultiplexImage:
    """Read a folder of one single-plane TIFF per channel as a lazy C×Y×X image.

    Parameters
    ----------
    path : str or os.PathLike
        The folder.
    channels : None, CSV path or sequence of str / Channel
        Overrides the names (and, with Channels, the bands) found from
        ``channels.csv``, Leica metadata or the file stems.
    name : str, optional
        Slide name; defaults to the folder name.

    Raises
    ------
    InputError
        No TIFFs, files named in ``channels.csv`` that are missing, planes of
        different shapes or dtypes, or a file that is not a single plane.
    """
    from .tiff import read_tiff

    folder = Path(path)
    files = _channel_files(folder)
    csv_path = folder / "channels.csv"
    found: list[Channel]
    if path_kind(csv_path) != "nothing":  # read_channels_csv refuses a channels.csv that is a device or FIFO
        rows = read_channels_csv(csv_path)
        by_name = {p.name: p for p in files} | {slide_stem(p): p for p in files}
        keys = [r["file"] or (r["channel"] if isinstance(r["channel"], str) else None) for r in rows]
        if all(keys):
            missing = [k for k in keys if k not in by_name and slide_stem(k) not in by_name]
            if missing:
                raise InputError(
                    f"expected every file channels.csv names, found {missing} missing "
                    f"(the folder holds {[p.name for p in files]})", path=folder)
            files = [by_name.get(k) or by_name[slide_stem(k)] for k in keys]
            twice = sorted({f.name for f in files if files.count(f) > 1})
            if twice:
                raise InputError(f"expected one channels.csv row per file, found {twice} named twice", path=folder)
        elif len(rows) != len(files):
            raise InputError(
                f"expected {len(rows)} channel TIFFs (rows of channels.csv), found {len(files)}: {[p.name for p in files]}",
                path=folder,
            )
        found = [r["channel_obj"] for r in rows]
    else:
        found = _leica_channels(folder, files) or [Channel(slide_stem(p)) for p in files]
    chans = apply_channels(found, channels, len(files), path=folder, what=f"{len(files)} channel TIFFs")

    planes = []
    shape = dtype = None
    px = None
    for f in files:
        img = read_tiff(f, channels=[f.name], name=slide_stem(f))  # each file is one plane
        if shape is None:
            shape, dtype, px = img.shape[1:], img.data.dtype, img.pixel_size_um
        elif img.shape[1:] != shape or img.data.dtype != dtype:
            raise InputError(
                f"expected every channel TIFF to be {shape[0]}×{shape[1]} {dtype}, "
                f"found {f.name} {img.shape[1]}×{img.shape[2]} {img.data.dtype}",
                path=folder,
            )
        planes.append(img.data[0])
    data = da.stack(planes, axis=0).rechunk({0: -1})
    return MultiplexImage(
        data=data,
        channels=chans,
        pixel_size_um=px,
        name=name or slide_stem(folder),
        source=str(folder),
        metadata={"format": "tiff-folder", "files": [f.name for f in files], "dtype": str(np.dtype(dtype))},
    )
