"""OME-Zarr (NGFF) images: multiscale read of any level lazily; atomic multiscale writes.

Reading understands NGFF 0.1–0.5 ``multiscales`` (Zarr v2 ``.zattrs`` or v3
``zarr.json`` ``ome`` attributes); channel names come from ``omero.channels``
labels, and emission bands / fluors from qdplex's own ``qdplex.channels``
attribute when present. Writing produces NGFF 0.4 (Zarr v2, read by napari,
QuPath / Bio-Formats and ome-zarr-py) with the metadata written by
``ome_zarr.writer``; level 0 is stored first and the pyramid is built from the
stored level, so the source graph is computed once. Every chunk is written, even one
that holds only zeros, so that a reader can tell a complete store from a damaged one:
:func:`read_ome_zarr_array` refuses an array with fewer chunk files than its declared
shape needs (a missing chunk would read as zeros, and a ``.zarray`` that declares a
100000² image over 256² of data would be processed as 100000²).
"""

from __future__ import annotations

import math
import os
import re

from pathlib import Path
from typing import Sequence

import dask.array as da
import numpy as np
import zarr

from ..errors import InputError, OutputError
from ..model import Channel, MultiplexImage
from .atomic import atomic_path
from .channels import apply_channels
from .checks import MAX_CHUNK_BYTES, check_pixel_dtype
from .discover import is_ome_zarr, slide_stem
from .omexml import to_um

__all__ = ["read_ome_zarr", "read_ome_zarr_array", "write_ome_zarr", "write_labels_zarr"]

#: Zarr chunk side of written arrays.
ZARR_CHUNK = 1024
#: Pyramid levels are added until the longest side is at most this.
MIN_LEVEL_SIDE = 512


def _attrs(group) -> dict:
    attrs = dict(group.attrs)
    if "ome" in attrs and isinstance(attrs["ome"], dict):  # NGFF 0.5 (Zarr v3)
        merged = dict(attrs["ome"])
        merged.update({k: v for k, v in attrs.items() if k != "ome"})
        return merged
    return attrs


def _open(path) -> tuple[zarr.Group, dict, dict]:
    from .discover import zarr_metadata_error

    path = Path(path)
    if not is_ome_zarr(path):
        raise InputError(zarr_metadata_error(path) or "expected an OME-Zarr folder with 'multiscales' metadata, "
                         "found none", path=path)
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as err:
        raise InputError(f"expected a readable Zarr group, found {type(err).__name__}: {err}", path=path) from err
    attrs = _attrs(group)
    if "multiscales" not in attrs and "bioformats2raw.layout" in attrs and "0" in group:
        group = group["0"]  # bioformats2raw: the (first) image is the sub-group "0"
        attrs = _attrs(group)
    ms = attrs.get("multiscales")
    if not isinstance(ms, list) or not ms or not ms[0].get("datasets"):
        raise InputError(f"expected 'multiscales' with datasets, found {ms!r:.200}", path=path)
    return group, attrs, ms[0]


def _axes(ms: dict, ndim: int, *, path) -> str:
    axes = ms.get("axes")
    if axes is None:  # NGFF 0.1/0.2: always tczyx
        names = "tczyx"[-ndim:]
    else:
        names = "".join((a["name"] if isinstance(a, dict) else str(a))[0].lower() for a in axes)
    if len(names) != ndim:
        raise InputError(f"expected {ndim} axes in 'multiscales', found {names!r}", path=path)
    return names


def _check_metadata_files(folder: Path, path) -> None:
    """Refuse array metadata (``.zarray``, ``.zattrs``, ``zarr.json``) that is a special file or oversized."""
    from .checks import path_kind
    from .discover import MAX_METADATA_BYTES

    for meta in (".zarray", ".zattrs", "zarr.json"):
        m = folder / meta
        kind = path_kind(m)
        if kind == "nothing":
            continue
        if kind != "a regular file":
            raise InputError(f"expected {meta} to be a regular file, found {kind}", path=m)
        if m.stat().st_size > MAX_METADATA_BYTES:
            raise InputError(f"expected {meta} of at most {MAX_METADATA_BYTES // 2**20} MiB, "
                             f"found {m.stat().st_size} bytes", path=m)


_CHUNK_KEY = re.compile(r"^(?:c[./])?\d+(?:[./]\d+)*$")
#: Above this many chunks a failing check gives the count of chunk files, not the first missing one.
_NAMED_CHECK_MAX = 1_000_000


def _check_stored(arr, folder: Path, path, *, complete: bool = True) -> None:
    """Raise InputError unless ``folder`` holds one regular chunk file per chunk of the declared shape.

    Also refuses chunks that decode to more than :data:`MAX_CHUNK_BYTES` and special
    files (devices, FIFOs) among the chunk files, which would never finish reading.
    With ``complete=False`` absent chunks are allowed (they read as the fill value).
    """
    grid = tuple(arr.shards or arr.chunks)
    chunk_bytes = math.prod(arr.chunks) * np.dtype(arr.dtype).itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise InputError(
            f"expected Zarr chunks of at most {MAX_CHUNK_BYTES // 2**20} MiB, found chunks {tuple(arr.chunks)} "
            f"of {chunk_bytes // 2**20} MiB ({arr.dtype})",
            path=path,
        )
    counts = tuple(math.ceil(n / c) if n else 0 for n, c in zip(arr.shape, grid))
    expected = math.prod(counts)
    n_found = 0
    pending = [("", str(folder))]
    while pending:  # scandir: the file type comes with the listing, one stat per special entry only
        prefix, where = pending.pop()
        with os.scandir(where) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                rel = prefix + e.name
                if e.is_dir():
                    pending.append((rel + "/", e.path))
                elif _CHUNK_KEY.match(rel):
                    if not e.is_file():
                        from .checks import path_kind

                        raise InputError(f"expected chunk files, found {path_kind(e.path)} at chunk {rel!r}",
                                         path=path)
                    n_found += 1
    if n_found >= expected or not complete:
        return
    missing = ""
    if expected <= _NAMED_CHECK_MAX:  # name the first missing chunk
        import itertools

        for coords in itertools.product(*(range(c) for c in counts)):
            key = arr.metadata.encode_chunk_key(coords)
            if not os.path.isfile(os.path.join(folder, key)):
                missing = f", first missing chunk {key!r}"
                break
    raise InputError(
        f"expected {expected} chunk files for the declared shape {tuple(arr.shape)} in chunks {grid}, found "
        f"{n_found}{missing} (a missing chunk would read as zeros)",
        path=path,
    )


def read_ome_zarr_array(path, *, level: int = 0, complete: bool = True) -> tuple[da.Array, str]:
    """The lazy array of pyramid ``level`` of an OME-Zarr and its axes (e.g. ``"cyx"``).

    Parameters
    ----------
    path : path-like
        The OME-Zarr folder.
    level : int
        Pyramid level.
    complete : bool
        Require one chunk file per chunk of the declared shape (see the module
        docstring); label images, whose absent chunks mean background, may pass False.

    Raises
    ------
    InputError
        Not an OME-Zarr, a missing level, pixels that are no intensities (bool,
        complex), oversized chunks, or missing chunk files.
    """
    path = Path(path)
    group, _, ms = _open(path)
    datasets = ms["datasets"]
    if level < 0 or level >= len(datasets):
        raise InputError(f"expected a pyramid level in 0..{len(datasets) - 1}, found level={level}", path=path)
    _check_metadata_files(path / group.path / str(datasets[level]["path"]), path)
    try:
        arr = group[datasets[level]["path"]]
    except Exception as err:
        raise InputError(
            f"expected the array {datasets[level]['path']!r} named in 'multiscales', found {type(err).__name__}: {err}",
            path=path,
        ) from err
    check_pixel_dtype(arr.dtype, path=path)
    folder = path / group.path / datasets[level]["path"]
    _check_stored(arr, folder, path, complete=complete)
    guarded = _Guarded(arr, path, folder if complete else None)
    lazy = da.from_array(guarded, chunks=arr.chunks, lock=False, asarray=False,
                         meta=np.empty((0,) * arr.ndim, arr.dtype),
                         name=f"ome-zarr-{da.core.tokenize(str(path.resolve()), level, arr.shape, str(arr.dtype))}")
    return lazy, _axes(ms, arr.ndim, path=path)


class _Guarded:
    """A Zarr array whose every read is checked: chunk files present and whole, errors as InputError.

    Before a block is read, each chunk file it covers must exist (an absent chunk would
    read as the fill value), an uncompressed chunk must hold the chunk's bytes, and a
    Blosc chunk must be as long as its header says (Blosc decodes a truncated chunk
    into garbage without an error).
    """

    def __init__(self, arr, path, folder=None):
        self.arr, self.path = arr, str(path)
        self.shape, self.dtype, self.ndim = tuple(arr.shape), np.dtype(arr.dtype), arr.ndim
        self.folder = None if folder is None or arr.shards is not None else str(folder)
        self.grid = tuple(arr.chunks)
        comps = tuple(getattr(arr, "compressors", ()) or ())
        filters = tuple(getattr(arr, "filters", ()) or ())
        self.raw_bytes = math.prod(arr.chunks) * self.dtype.itemsize if not comps and not filters else None
        self.blosc = bool(comps) and type(comps[-1]).__name__.lower().startswith("blosc")

    def __getstate__(self):
        return self.__dict__.copy()

    def _verify(self, key) -> None:
        if self.folder is None or not isinstance(key, tuple) or len(key) != self.ndim:
            return
        import itertools

        ranges = []
        for k, n, c in zip(key, self.shape, self.grid):
            if isinstance(k, slice):
                start, stop, _ = k.indices(n)
            elif isinstance(k, (int, np.integer)):
                start, stop = int(k), int(k) + 1
            else:
                return
            if stop <= start:
                return
            ranges.append(range(start // c, (stop - 1) // c + 1))
        for coords in itertools.product(*ranges):
            rel = self.arr.metadata.encode_chunk_key(coords)
            f = os.path.join(self.folder, rel)
            try:
                size = os.stat(f).st_size
            except FileNotFoundError:
                raise InputError(f"expected Zarr chunk {rel!r}, found no such file (it would read as zeros)",
                                 path=self.path) from None
            if self.raw_bytes is not None and size != self.raw_bytes:
                raise InputError(f"expected {self.raw_bytes} bytes in uncompressed Zarr chunk {rel!r}, found {size} "
                                 f"(short chunk)", path=self.path)
            if self.blosc:
                with open(f, "rb") as fh:
                    head = fh.read(16)
                cbytes = int.from_bytes(head[12:16], "little") if len(head) == 16 else -1
                if cbytes != size:
                    raise InputError(f"expected a Blosc chunk of {max(cbytes, 0)} bytes in {rel!r} (as its header "
                                     f"says), found {size} bytes (short or corrupt chunk)", path=self.path)

    def __getitem__(self, key):
        self._verify(key)
        try:
            return np.asarray(self.arr[key])
        except Exception as err:
            raise InputError(
                f"expected readable Zarr chunks, found {type(err).__name__}: {err} (corrupt chunk?)", path=self.path
            ) from err


def _scale_um(ms: dict, level: int, axes: str, *, path) -> float | None:
    def scale_of(transforms):
        for t in transforms or []:
            if t.get("type") == "scale":
                return t.get("scale")
        return None

    scale = scale_of(ms["datasets"][level].get("coordinateTransformations"))
    outer = scale_of(ms.get("coordinateTransformations"))
    if scale is None or "x" not in axes:
        return None
    value = float(scale[axes.index("x")]) * (float(outer[axes.index("x")]) if outer else 1.0)
    unit = None
    for a in ms.get("axes") or []:
        if isinstance(a, dict) and a.get("name", "").lower() == "x":
            unit = a.get("unit")
    units = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm", "meter": "m",
             "angstrom": "Å", "picometer": "pm", "inch": "in"}
    if unit is None:
        return None  # unitless: pixels, not a physical size
    return to_um(value, units.get(unit, unit), path=path, what="x scale")


def read_ome_zarr(path, *, channels=None, name=None, level: int = 0) -> MultiplexImage:
    """Read an OME-Zarr image lazily at pyramid ``level`` as a C×Y×X MultiplexImage.

    Axes ``t`` and ``z`` must have size 1; an image without a ``c`` axis is one
    channel. Channel names come from ``omero.channels[*].label`` (or the
    ``channels`` argument); a count mismatch raises :class:`InputError`.
    """
    path = Path(path)
    arr, axes = read_ome_zarr_array(path, level=level)
    group, attrs, ms = _open(path)
    for ax in axes:
        if ax not in "tczyx":
            raise InputError(f"expected axes from 'tczyx', found {axes!r}", path=path)
    for ax in "tz":
        if ax in axes and arr.shape[axes.index(ax)] != 1:
            raise InputError(
                f"expected a single-plane image ({ax} of size 1), found axes {axes!r} with shape {arr.shape}",
                path=path,
            )
    index = tuple(0 if ax in "tz" else slice(None) for ax in axes)
    arr = arr[index]
    axes = "".join(ax for ax in axes if ax not in "tz")
    if "c" not in axes:
        arr, axes = arr[None], "c" + axes
    if axes != "cyx":
        arr = arr.transpose([axes.index(a) for a in "cyx"])
    n = arr.shape[0]
    found = None
    ours_meta = attrs.get("qdplex") if isinstance(attrs.get("qdplex"), dict) else {}
    ours = ours_meta.get("channels")
    omero = (attrs.get("omero") or {}).get("channels") or []
    if ours and len(ours) == n:
        found = [Channel(str(c["name"]), _opt_float(c.get("emission_nm")), _opt_float(c.get("bandwidth_nm")),
                         c.get("fluor") or None) for c in ours]
    elif omero and all(c.get("label") for c in omero):
        found = [Channel(str(c["label"])) for c in omero]
    chans = apply_channels(found, channels, n, path=path, what=f"{n} plane(s) of {arr.shape[1]}×{arr.shape[2]}")
    if arr.chunksize[0] != n:
        arr = arr.rechunk({0: n, 1: min(arr.shape[1], ZARR_CHUNK), 2: min(arr.shape[2], ZARR_CHUNK)})
    return MultiplexImage(
        data=arr,
        channels=chans,
        pixel_size_um=_scale_um(ms, level, _axes(ms, len(ms.get("axes") or axes), path=path), path=path),
        name=name or slide_stem(path),
        source=str(path),
        metadata={"format": "ome-zarr", "levels": len(ms["datasets"]), "level": level,
                  "ngff_version": ms.get("version") or attrs.get("version"),
                  **({"camera_offset": float(ours_meta["camera_offset"])}
                     if ours_meta.get("camera_offset") is not None else {})},
    )


def _opt_float(value) -> float | None:
    return None if value is None else float(value)


def _levels(shape_yx, levels) -> int:
    if levels is not None:
        return int(levels)
    n, side = 0, max(shape_yx)
    while side > MIN_LEVEL_SIDE and min(shape_yx) // 2 ** (n + 1) >= 16:
        side //= 2
        n += 1
    return n


def _store_level(group, key: str, arr: da.Array, chunk) -> da.Array:
    cy, cx = min(arr.shape[1], chunk), min(arr.shape[2], chunk)
    arr = arr.rechunk({1: cy, 2: cx})
    z = group.create_array(key, shape=arr.shape, chunks=(1, cy, cx), dtype=arr.dtype,
                           chunk_key_encoding={"name": "v2", "separator": "/"},
                           config={"write_empty_chunks": True})  # complete stores: see the module docstring
    da.store(arr, z, lock=False)
    return da.from_zarr(z)


def _write(path, data, chans: list[Channel], *, pixel_size_um, levels, chunk, labels: bool, name,
           camera_offset: float | None = None) -> Path:
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscales_metadata

    from .writers import halve

    path = Path(path)
    arr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks=(1, chunk, chunk))
    n_levels = _levels(arr.shape[1:], levels)
    px = float(pixel_size_um) if pixel_size_um else 1.0
    unit = "micrometer" if pixel_size_um else None
    try:
        with atomic_path(path) as tmp:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
            base = lev = _store_level(group, "0", arr, chunk)
            datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, px, px]}]}]
            for k in range(1, n_levels + 1):
                lev = _store_level(group, str(k), halve(lev, labels), chunk)
                f = px * base.shape[2] / lev.shape[2]
                datasets.append({"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [1.0, f, f]}]})
            axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
            if unit:
                axes[1]["unit"] = axes[2]["unit"] = unit
            write_multiscales_metadata(group, datasets, fmt=FormatV04(), axes=axes, name=name)
            extra = {
                "omero": {"channels": [{"label": c.name, "active": True} for c in chans]},
                "qdplex": {"channels": [
                    {"name": c.name, "emission_nm": c.emission_nm, "bandwidth_nm": c.bandwidth_nm, "fluor": c.fluor}
                    for c in chans
                ]},
            }
            extra["qdplex"]["labels"] = bool(labels)
            if camera_offset is not None:
                extra["qdplex"]["camera_offset"] = float(camera_offset)
            group.attrs.update(extra)
    except OSError as err:
        raise OutputError(f"expected to write an OME-Zarr here, found {err}", path=path) from err
    return path


def write_ome_zarr(
    path,
    data,
    channels: Sequence[Channel | str] | None = None,
    *,
    pixel_size_um: float | None = None,
    levels: int | None = None,
    chunk: int = ZARR_CHUNK,
    name: str | None = None,
    labels: bool = False,
    camera_offset: float | None = None,
) -> Path:
    """Write a C×Y×X image as a multiscale OME-Zarr (NGFF 0.4), atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output folder (``.ome.zarr``); an existing one is replaced as a whole.
    data : numpy.ndarray, dask.array.Array or MultiplexImage
        C×Y×X pixels (float64 is stored as float32).
    channels : sequence of Channel or str
        One per plane (omero labels; bands and fluors in ``qdplex.channels``).
    pixel_size_um : float, optional
        Pixel size; written as the level-0 scale in micrometers.
    levels : int, optional
        Number of reduced levels (mean-downsampled by 2 each); default until
        the longest side is at most 512.
    chunk : int
        Chunk side in Y and X (one channel per chunk).
    labels : bool
        The planes are label images: reduced levels are nearest-neighbour
        downsampled instead of averaged (see also :func:`write_labels_zarr`).
    camera_offset : float, optional
        The camera's dark level in counts (``qdplex.camera_offset`` in the group
        attributes; NGFF has no field for it). Taken from a MultiplexImage's metadata
        when not given.
    """
    from .writers import unpack_image

    data, channels, pixel_size_um, name, camera_offset = unpack_image(
        data, channels, pixel_size_um, name, camera_offset, path=path)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise OutputError(f"expected C×Y×X data, found shape {tuple(data.shape)}", path=path)
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    chans = [c if isinstance(c, Channel) else Channel(str(c)) for c in channels]
    if len(chans) != data.shape[0]:
        raise OutputError(f"expected one channel per plane ({data.shape[0]}), found {len(chans)}", path=path)
    return _write(path, data, chans, pixel_size_um=pixel_size_um, levels=levels, chunk=chunk, labels=labels,
                  name=name or slide_stem(path), camera_offset=camera_offset)


def write_labels_zarr(path, labels, *, pixel_size_um: float | None = None, name: str = "labels",
                      levels: int | None = None, chunk: int = ZARR_CHUNK) -> Path:
    """Write a Y×X label image as a uint32 multiscale OME-Zarr with one channel, atomically.

    Reduced levels are nearest-neighbour downsampled. Read back with
    :func:`qdplex.io.read_labels`.
    """
    from .writers import label_stack

    lab = label_stack(labels, path=path)
    return _write(path, lab, [Channel(name)], pixel_size_um=pixel_size_um, levels=levels, chunk=chunk,
                  labels=True, name=name)
