"""Channel metadata that lives beside the pixels: sidecar CSVs and the ``channels=`` argument.

A sidecar CSV names the channels of a TIFF that carries no channel metadata::

    channel,name,emission_nm,bandwidth_nm,fluor
    1,DAPI,461,,
    2,HER2,655,20,QD655

``channel`` is the channel number (1-based as in MCMICRO ``markers.csv``; 0-based
is accepted too) or, for a folder of one TIFF per channel, a file name. The
MCMICRO / steinbock spellings ``channel_number`` and ``marker_name`` are
accepted. Only ``name`` is required.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from ..errors import InputError
from ..model import Channel

__all__ = ["read_channels_csv", "sidecar_for", "apply_channels", "ChannelRow"]

_ALIASES = {
    "channel": "channel",
    "channel_number": "channel",
    "channel_id": "channel",
    "index": "channel",
    "file": "file",
    "filename": "file",
    "name": "name",
    "marker_name": "name",
    "marker": "name",
    "label": "name",
    "emission_nm": "emission_nm",
    "emission": "emission_nm",
    "wavelength_nm": "emission_nm",
    "bandwidth_nm": "bandwidth_nm",
    "bandwidth": "bandwidth_nm",
    "fluor": "fluor",
    "fluorophore": "fluor",
}


#: Largest channel CSV read (one row per channel).
MAX_CSV_BYTES = 16 * 2**20


class ChannelRow(dict):
    """One parsed sidecar row: keys ``channel`` (int or str or None), ``file``, and a ``Channel``."""


def _float(value: str, *, path, line: int, column: str) -> float | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        out = float(value)
    except ValueError:
        raise InputError(
            f"line {line}, column {column!r}: expected a number in nm, found {value!r}", path=path
        ) from None
    if not math.isfinite(out) or out <= 0:
        raise InputError(f"line {line}, column {column!r}: expected a positive number in nm, found {value!r}", path=path)
    return out


def read_channels_csv(path) -> list[ChannelRow]:
    """Read a channel sidecar CSV.

    Parameters
    ----------
    path : str or os.PathLike
        CSV with a header holding at least ``name`` (or ``marker_name``), and
        optionally ``channel`` (or ``channel_number``), ``file``,
        ``emission_nm``, ``bandwidth_nm``, ``fluor``.

    Returns
    -------
    list of ChannelRow
        In channel order: rows sorted by their channel number when the file
        has integer channel numbers, else in file order. Each row has keys
        ``channel`` (int, str or None), ``file`` (str or None) and ``channel_obj``
        (:class:`~qdplex.model.Channel`).

    Raises
    ------
    InputError
        Missing ``name`` column, empty or duplicate names, non-numeric
        wavelengths, or channel numbers that are not 0..N-1 or 1..N.
    """
    from .checks import quotable_header, require_regular

    path = Path(path)
    require_regular(path, what="a channel CSV file")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise InputError(f"expected a channel CSV of at most {MAX_CSV_BYTES // 2**20} MiB, "
                         f"found {path.stat().st_size} bytes", path=path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            rows = [r for r in reader if any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"expected a readable channel CSV, found {err}", path=path) from err
    if not rows:
        raise InputError("expected a header 'channel,name[,emission_nm,bandwidth_nm]', found an empty file", path=path)
    header = [_ALIASES.get(h.strip().lower()) for h in rows[0]]
    if "name" not in header:
        fields = [h.strip() for h in rows[0]]
        shown = f"columns {fields}" if quotable_header(fields) else "no CSV header"
        raise InputError(f"expected a 'name' (or 'marker_name') column, found {shown}", path=path)
    out: list[ChannelRow] = []
    for lineno, row in enumerate(rows[1:], start=2):
        rec = {key: (row[i].strip() if i < len(row) else "") for i, key in enumerate(header) if key}
        name = rec.get("name", "")
        if not name:
            raise InputError(f"line {lineno}: expected a channel name, found an empty 'name'", path=path)
        chan = Channel(
            name=name,
            emission_nm=_float(rec.get("emission_nm", ""), path=path, line=lineno, column="emission_nm"),
            bandwidth_nm=_float(rec.get("bandwidth_nm", ""), path=path, line=lineno, column="bandwidth_nm"),
            fluor=rec.get("fluor") or None,
        )
        number: int | str | None = rec.get("channel") or None
        if number is not None:
            try:
                number = int(number)
            except ValueError:
                pass  # a file name / stem (folder of channel TIFFs)
        out.append(ChannelRow(channel=number, file=rec.get("file") or None, channel_obj=chan, line=lineno))
    if not out:
        raise InputError("expected at least one channel row, found only the header", path=path)
    names = [r["channel_obj"].name for r in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"expected unique channel names, found duplicates {dup}", path=path)
    numbers = [r["channel"] for r in out]
    if all(isinstance(n, int) for n in numbers):
        n = len(numbers)
        found = sorted(numbers)
        if found not in (list(range(n)), list(range(1, n + 1))):
            raise InputError(
                f"expected channel numbers 1..{n} (or 0..{n - 1}), found {found}", path=path
            )
        out.sort(key=lambda r: r["channel"])
    return out


def sidecar_for(path) -> Path | None:
    """The sidecar CSV that names the channels of ``path``, or None.

    Looks for ``<stem>.channels.csv`` beside the file (stem without
    ``.ome``/``.tif``/``.tiff``), then ``channels.csv`` in the same folder,
    then an MCMICRO-style ``markers.csv`` in the same folder.
    """
    path = Path(path)
    from .discover import slide_stem

    from .checks import path_kind

    for cand in (path.with_name(f"{slide_stem(path)}.channels.csv"), path.with_name("channels.csv"),
                 path.with_name("markers.csv")):
        kind = path_kind(cand)
        if kind == "a regular file":
            return cand
        if kind != "nothing":
            raise InputError(f"expected a channel CSV (a regular file), found {kind}", path=cand)
    return None


def apply_channels(found: list[Channel] | None, given, n: int, *, path, what: str) -> list[Channel]:
    """Resolve the channel list of an image with ``n`` planes.

    Parameters
    ----------
    found : list of Channel or None
        Channels from the file's own metadata (None when it has none).
    given : None, str, os.PathLike or sequence of (str or Channel)
        The caller's ``channels=`` argument: a sidecar CSV path, or names /
        Channels in plane order. Names replace the found names and keep the
        found wavelengths; Channel objects are used as given.
    n : int
        Number of planes in the file.
    path : path-like
        The image, for error messages.
    what : str
        Description of where ``n`` came from (e.g. ``"5 pages of 100×100"``).
    """
    if given is None:
        if found is None:
            raise InputError(
                f"expected channel names from the file's metadata or a sidecar CSV "
                f"('{Path(path).name.split('.')[0]}.channels.csv', 'channels.csv' or 'markers.csv' beside it, "
                f"columns channel,name[,emission_nm,bandwidth_nm]), found no channel metadata and {what}",
                path=path,
            )
        chans = found
        source = "the file's metadata"
    elif isinstance(given, (str, os.PathLike)):
        chans = [r["channel_obj"] for r in read_channels_csv(given)]
        source = f"channel CSV {given}"
    else:
        given = list(given)
        chans = []
        for i, g in enumerate(given):
            if isinstance(g, Channel):
                chans.append(g)
            else:
                base = found[i] if found is not None and i < len(found) else Channel(str(g))
                chans.append(Channel(str(g), base.emission_nm, base.bandwidth_nm, base.fluor))
        source = "the channels argument"
    if len(chans) != n:
        raise InputError(
            f"expected {len(chans)} channels {[c.name for c in chans]} (from {source}), found {what}",
            path=path,
        )
    return list(chans)

