"""Write OME-TIFF images and label masks, atomically; large images tiled and pyramidal.

Images are written as C×Y×X (one page per channel, axes ``CYX``) so napari and
QuPath read channels, not time. Images larger than :data:`TILE_ABOVE` pixels on
a side are tiled; larger than :data:`PYRAMID_ABOVE` they also get pyramid levels
in SubIFDs (mean-downsampled for intensities, nearest for labels). Dask input is
written tile by tile and never materialised as a whole.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import dask.array as da
import numpy as np
import tifffile

from ..errors import InputError, OutputError
from ..model import Channel, MultiplexImage
from .atomic import atomic_path
from .omexml import build_ome
from .tiff import TiffArray

__all__ = ["write_ome_tiff", "write_labels", "read_labels", "TILE", "TILE_ABOVE", "PYRAMID_ABOVE"]

#: Tile side (pixels) of tiled outputs.
TILE = 512
#: Images with a side longer than this are written tiled.
TILE_ABOVE = 2048
#: Images with a side longer than this also get pyramid levels (down to about one tile).
PYRAMID_ABOVE = 4096
#: Dask images up to this many bytes are computed at once; larger ones are streamed.
IN_MEMORY_BYTES = 64 * 2**20
_WRITABLE = (np.uint8, np.uint16, np.uint32, np.int8, np.int16, np.int32, np.float32, np.float64)


def _as_channels(channels, n: int, path) -> list[Channel]:
    out = [c if isinstance(c, Channel) else Channel(str(c)) for c in channels]
    if len(out) != n:
        raise OutputError(f"expected one channel per plane ({n} planes), found {len(out)} channels", path=path)
    names = [c.name for c in out]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise OutputError(f"expected unique channel names, found duplicates {dup}", path=path)
    return out


def _tile_shape(tile, shape_yx) -> tuple[int, int] | None:
    if tile is False or tile == 0:
        return None
    if tile is None:
        return (TILE, TILE) if max(shape_yx) > TILE_ABOVE else None
    if isinstance(tile, int):
        tile = (tile, tile)
    tile = tuple(int(t) for t in tile)
    if len(tile) != 2 or any(t <= 0 or t % 16 for t in tile):
        raise OutputError(f"expected a tile size that is a positive multiple of 16, found {tile}")
    return tile


def _n_levels(pyramid, shape_yx, tile) -> int:
    """Number of reduced levels (SubIFDs) below full resolution."""
    if pyramid is False or pyramid == 0:
        return 0
    if pyramid is None:
        if max(shape_yx) <= PYRAMID_ABOVE or tile is None:
            return 0
        n, side = 0, max(shape_yx)
        while side // 2 >= tile[0] and min(shape_yx) // 2 ** (n + 1) >= 16:
            side //= 2
            n += 1
        return n
    n = int(pyramid)
    if n < 0 or min(shape_yx) // 2**n < 1:
        raise OutputError(f"expected 0..{int(np.log2(min(shape_yx)))} pyramid levels, found {pyramid}")
    return n


def _halve_np(arr: np.ndarray, labels: bool) -> np.ndarray:
    """Halve a C×Y×X numpy array (2×2 block mean, or nearest for labels); odd edges are dropped."""
    c, y, x = arr.shape
    if labels:
        return np.ascontiguousarray(arr[:, : y // 2 * 2 : 2, : x // 2 * 2 : 2])
    wide = np.float32 if arr.dtype in (np.float32, np.uint8, np.int8, np.uint16, np.int16) else np.float64
    acc = arr[:, 0 : y // 2 * 2 : 2, 0 : x // 2 * 2 : 2].astype(wide)
    acc += arr[:, 1 : y // 2 * 2 : 2, 0 : x // 2 * 2 : 2]
    acc += arr[:, 0 : y // 2 * 2 : 2, 1 : x // 2 * 2 : 2]
    acc += arr[:, 1 : y // 2 * 2 : 2, 1 : x // 2 * 2 : 2]
    acc *= 0.25
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        np.clip(np.round(acc, out=acc), info.min, info.max, out=acc)
    return acc.astype(arr.dtype, copy=False)


def halve(arr, labels: bool = False):
    """Halve a C×Y×X numpy or dask array in Y and X: 2×2 block mean (nearest for ``labels``).

    Dask chunks must be even in Y and X except the last ones (odd edges are dropped).
    """
    if not isinstance(arr, da.Array):
        return _halve_np(np.asarray(arr), labels)
    chunks = (arr.chunks[0],) + tuple(tuple(n // 2 for n in ax) for ax in arr.chunks[1:])
    if any(n % 2 for ax in arr.chunks[1:] for n in ax[:-1]):
        arr = arr.rechunk({1: max(2, arr.chunksize[1] // 2 * 2), 2: max(2, arr.chunksize[2] // 2 * 2)})
        chunks = (arr.chunks[0],) + tuple(tuple(n // 2 for n in ax) for ax in arr.chunks[1:])
    chunks = (chunks[0],) + tuple(tuple(n for n in ax if n) or (0,) for ax in chunks[1:])
    return arr.map_blocks(_halve_np, labels, chunks=chunks, dtype=arr.dtype)


def _tiles(arr, tile: tuple[int, int]) -> Iterator[np.ndarray]:
    """Tiles of a C×Y×X (per-channel-cheap dask) array in TIFF order: channel, tile row, tile column."""
    th, tw = tile
    c, y, x = arr.shape
    for ci in range(c):
        for y0 in range(0, y, th):
            band = np.asarray(arr[ci, y0 : y0 + th])
            for x0 in range(0, x, tw):
                yield band[:, x0 : x0 + tw]


def _planes(arr) -> Iterator[np.ndarray]:
    for ci in range(arr.shape[0]):
        yield np.asarray(arr[ci])


class _Spool:
    """Temporary uncompressed Zarr beside the output holding each level once, channel by channel.

    TIFF stores channel after channel; a dask graph whose chunks hold several
    channels (unmixing output) would otherwise be recomputed once per channel,
    and each pyramid level once per level.
    """

    def __init__(self, folder: Path, tile):
        import zarr

        from .atomic import PARTIAL_SUFFIX

        self.path = folder / f".spool-{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}"
        self.group = zarr.open_group(str(self.path), mode="w", zarr_format=2)
        self.tile = tile or (TILE, TILE)
        self.count = 0

    def store(self, arr: da.Array) -> da.Array:
        th, tw = self.tile
        chunks = (1, min(arr.shape[1], th), min(arr.shape[2], 4 * tw))
        arr = arr.rechunk(chunks)
        z = self.group.create_array(str(self.count), shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                                    compressors=None)
        self.count += 1
        da.store(arr, z, lock=False)
        return da.from_zarr(z)

    def close(self):
        shutil.rmtree(self.path, ignore_errors=True)


class _HoleFile(io.FileIO):
    """A file whose all-zero writes leave holes: the file grows (``ftruncate``) without
    writing the bytes, which read back as zeros all the same.

    tifffile lays out an uncompressed tiled image written from ``data=None`` by writing
    every tile as zeros; the blocks are then written in place (:class:`_TileTarget`),
    so each byte would otherwise go to the disk twice (measured: 7 s of an 8192² ×
    8-plane float32 image's 8 s went to the zeros).
    """

    MIN_HOLE = 1 << 16

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        if n >= self.MIN_HOLE and not np.frombuffer(b, np.uint8).any():
            end = self.tell() + n
            fd = self.fileno()
            if end > os.fstat(fd).st_size:
                os.ftruncate(fd, end)
            self.seek(end)
            return n
        return super().write(b)


def _write_tiff(
    path,
    data,
    *,
    xml: str,
    pixel_size_um: float | None,
    tile,
    pyramid,
    compression,
    labels: bool,
) -> Path:
    path = Path(path)
    if isinstance(data, da.Array) and data.nbytes <= IN_MEMORY_BYTES:
        data = np.asarray(data.compute())
    c, y, x = data.shape
    tile = _tile_shape(tile, (y, x))
    n_sub = _n_levels(pyramid, (y, x), tile)
    if n_sub and tile is None:
        tile = (TILE, TILE)
    nbytes = data.dtype.itemsize * c * y * x
    bigtiff = nbytes * 4 / 3 > 2**31 - 2**25
    opts = dict(photometric="minisblack", compression=compression, metadata=None)
    if compression is not None and np.issubdtype(data.dtype, np.integer):
        opts["predictor"] = True

    def level_opts(k):
        out = dict(opts)
        if pixel_size_um:
            r = 1e4 / (pixel_size_um * 2**k)
            out.update(resolution=(r, r), resolutionunit="CENTIMETER")
        return out

    if isinstance(data, da.Array) and compression is None:
        # uncompressed: lay out the file, then write every block once, in place, in parallel
        tile = tile or (TILE, TILE)
        try:
            with atomic_path(path) as tmp:
                with _HoleFile(tmp, "w+") as fh, tifffile.TiffWriter(fh, bigtiff=bigtiff, ome=False) as tw:
                    tw.write(None, shape=data.shape, dtype=data.dtype, tile=tile,
                             description=xml.encode("utf-8"), subifds=n_sub or None, **level_opts(0))
                    shape = data.shape
                    for k in range(1, n_sub + 1):
                        shape = (c, shape[1] // 2, shape[2] // 2)
                        tw.write(None, shape=shape, dtype=data.dtype, tile=tile, subfiletype=1, **level_opts(k))
                targets = _TileTarget.for_levels(tmp, n_sub + 1, tile)
                da.store(_align(data, tile), targets[0], lock=False)
                for k in range(1, n_sub + 1):
                    prev = targets[k - 1]
                    src = da.from_array(
                        TiffArray(tmp, 0, k - 1, prev.shape, prev.dtype),
                        chunks=(1,) + tuple(min(n, 4 * t) for n, t in zip(prev.shape[1:], tile)),
                        lock=False, asarray=False, meta=np.empty((0, 0, 0), prev.dtype),
                    )
                    da.store(_align(halve(src, labels), tile), targets[k], lock=False)
        except OSError as err:
            raise OutputError(f"expected to write an OME-TIFF here, found {err}", path=path) from err
        return path

    spool = None
    try:
        with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=False) as tw:
            desc = dict(description=xml.encode("utf-8"), subifds=n_sub or None)
            if isinstance(data, np.ndarray):
                lev = data
                tw.write(lev, tile=tile, **desc, **level_opts(0))
                for k in range(1, n_sub + 1):
                    lev = halve(lev, labels)
                    tw.write(lev, tile=tile, subfiletype=1, **level_opts(k))
            else:
                # compressed dask output, written through tifffile's encoder in TIFF order
                # (channel by channel). One channel per chunk: taken as cheap to read per channel
                # (e.g. stored tiles); several: computed once into the spool, else each channel
                # would recompute them all.
                lev = data
                if n_sub or any(n > 1 for n in data.chunks[0]):
                    spool = _Spool(path.parent, tile)
                if any(n > 1 for n in data.chunks[0]):
                    lev = spool.store(lev)
                it = _tiles(lev, tile) if tile else _planes(lev)
                tw.write(it, shape=lev.shape, dtype=lev.dtype, tile=tile, **desc, **level_opts(0))
                for k in range(1, n_sub + 1):
                    lev = spool.store(halve(lev, labels))
                    tw.write(_tiles(lev, tile), shape=lev.shape, dtype=lev.dtype, tile=tile, subfiletype=1,
                             **level_opts(k))
    except OSError as err:
        raise OutputError(f"expected to write an OME-TIFF here, found {err}", path=path) from err
    finally:
        if spool is not None:
            spool.close()
    return path


def _align(arr: da.Array, tile) -> da.Array:
    """Rechunk so that chunk edges fall on tile edges (all channels of a region in one chunk)."""
    th, tw = tile
    cy = max(th, round(arr.chunksize[1] / th) * th)
    cx = max(tw, round(arr.chunksize[2] / tw) * tw)
    ok_y = all(n % th == 0 for n in arr.chunks[1][:-1])
    ok_x = all(n % tw == 0 for n in arr.chunks[2][:-1])
    if ok_y and ok_x:
        return arr
    return arr.rechunk({1: min(cy, arr.shape[1]), 2: min(cx, arr.shape[2])})


class _TileTarget:
    """``da.store`` target writing tile-aligned blocks straight into an uncompressed tiled TIFF.

    Picklable (holds the path and the tile offsets), so blocks can be written
    from threads or worker processes on the same file system; regions written
    by different blocks never overlap.
    """

    def __init__(self, path, offsets: np.ndarray, shape, dtype, tile):
        self.path = str(path)
        self.offsets = offsets  # C × tiles_y × tiles_x byte offsets
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.tile = tuple(tile)
        self.ndim = 3

    @classmethod
    def for_levels(cls, path, n_levels: int, tile) -> list["_TileTarget"]:
        out = []
        with tifffile.TiffFile(path) as tif:
            byteorder = tif.byteorder
            levels = tif.series[0].levels
            for k in range(n_levels):
                lev = levels[k]
                pages = list(lev.pages)
                c = len(pages)
                y, x = lev.shape[-2:]
                ny, nx = -(-y // tile[0]), -(-x // tile[1])
                offs = np.array([np.asarray(p.dataoffsets, np.int64) for p in pages]).reshape(c, ny, nx)
                out.append(cls(path, offs, (c, y, x), lev.dtype.newbyteorder(byteorder), tile))
        return out

    def __setitem__(self, key, value):
        cs, ys, xs = (k if isinstance(k, slice) else slice(k, k + 1) for k in key)
        c0, y0, x0 = cs.start or 0, ys.start or 0, xs.start or 0
        th, tw = self.tile
        if y0 % th or x0 % tw:
            raise OutputError(f"internal: block at ({y0}, {x0}) is not aligned to {self.tile} tiles", path=self.path)
        value = np.asarray(value).astype(self.dtype, copy=False)
        buf = np.zeros((th, tw), self.dtype)
        with open(self.path, "r+b") as fh:
            fd = fh.fileno()
            for ci in range(value.shape[0]):
                for ty in range(0, value.shape[1], th):
                    for tx in range(0, value.shape[2], tw):
                        blk = value[ci, ty : ty + th, tx : tx + tw]
                        if blk.shape != (th, tw):
                            buf[:] = 0
                            buf[: blk.shape[0], : blk.shape[1]] = blk
                            blk = buf
                        off = self.offsets[c0 + ci, (y0 + ty) // th, (x0 + tx) // tw]
                        os.pwrite(fd, np.ascontiguousarray(blk).tobytes(), int(off))


def unpack_image(data, channels, pixel_size_um, name, camera_offset, *, path):
    """Writer arguments with blanks filled from ``data`` when it is a MultiplexImage.

    Returns ``(array, channels, pixel_size_um, name, camera_offset)``; raises
    OutputError when no channel names are known.
    """
    if isinstance(data, MultiplexImage):
        channels = data.channels if channels is None else channels
        pixel_size_um = data.pixel_size_um if pixel_size_um is None else pixel_size_um
        name = name or data.name
        if camera_offset is None:
            camera_offset = data.metadata.get("camera_offset")
        data = data.data
    if channels is None:
        raise OutputError("expected channel names for the planes, found channels=None", path=path)
    return data, channels, pixel_size_um, name, camera_offset


def write_ome_tiff(
    path,
    data,
    channels: Sequence[Channel | str] | None = None,
    *,
    pixel_size_um: float | None = None,
    tile=None,
    pyramid=None,
    compression=None,
    name: str | None = None,
    camera_offset: float | None = None,
) -> Path:
    """Write a C×Y×X image as OME-TIFF with named channels, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (``.ome.tif``).
    data : numpy.ndarray, dask.array.Array or MultiplexImage
        C×Y×X pixels (integer or float32; float64 is written as float32).
        Dask input is written tile by tile.
    channels : sequence of Channel or str
        One per plane: names, emission bands (``EmissionWavelength`` and an
        emission ``Filter`` with the band edges) and fluors (``Fluor``). May be
        omitted when ``data`` is a MultiplexImage.
    pixel_size_um : float, optional
        Pixel size (``PhysicalSizeX/Y`` in µm).
    tile : None, int, (int, int) or False
        Tile shape; None tiles images larger than :data:`TILE_ABOVE` pixels.
    pyramid : None, int or False
        Number of reduced resolution levels (SubIFDs); None adds them for
        images larger than :data:`PYRAMID_ABOVE`.
    compression : None or str
        A tifffile compression (e.g. ``"zlib"``); None writes uncompressed.
    name : str, optional
        OME Image name.
    camera_offset : float, optional
        The camera's dark level in counts, stored as OME ``DetectorSettings/@Offset``
        (read back into ``MultiplexImage.metadata["camera_offset"]``). Taken from a
        MultiplexImage's metadata when not given.

    Returns
    -------
    pathlib.Path
    """
    data, channels, pixel_size_um, name, camera_offset = unpack_image(
        data, channels, pixel_size_um, name, camera_offset, path=path)
    if not isinstance(data, da.Array):
        data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise OutputError(f"expected C×Y×X data, found shape {tuple(data.shape)}", path=path)
    if data.dtype == np.float64 or data.dtype == np.float16:
        data = data.astype(np.float32)
    elif data.dtype == bool:
        data = data.astype(np.uint8)
    if data.dtype.type not in _WRITABLE:
        raise OutputError(f"expected integer or float32 pixels, found dtype {data.dtype}", path=path)
    chans = _as_channels(channels, data.shape[0], path)
    from .discover import slide_stem

    xml = build_ome(data.shape, data.dtype, chans, pixel_size_um=pixel_size_um, name=name or slide_stem(path),
                    camera_offset=camera_offset)
    return _write_tiff(path, data, xml=xml, pixel_size_um=pixel_size_um, tile=tile, pyramid=pyramid,
                       compression=compression, labels=False)


def label_stack(labels, *, path) -> np.ndarray | da.Array:
    """A Y×X (or 1×Y×X) integer label image as a 1×Y×X uint32 stack for the label writers.

    Raises OutputError for other shapes, non-integer dtypes and (in-memory) negative labels.
    """
    lab = labels if isinstance(labels, da.Array) else np.asarray(labels)
    if lab.ndim == 3 and lab.shape[0] == 1:
        lab = lab[0]
    if lab.ndim != 2:
        raise OutputError(f"expected a Y×X label image, found shape {tuple(lab.shape)}", path=path)
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise OutputError(f"expected integer labels, found dtype {lab.dtype}", path=path)
    if isinstance(lab, np.ndarray) and lab.size and np.issubdtype(lab.dtype, np.signedinteger) and lab.min() < 0:
        raise OutputError(f"expected non-negative labels, found minimum {lab.min()}", path=path)
    return lab.astype(np.uint32)[None]


def write_labels(
    path,
    labels,
    *,
    pixel_size_um: float | None = None,
    name: str = "labels",
    tile=None,
    pyramid=None,
    compression="zlib",
) -> Path:
    """Write a Y×X label image as a uint32 OME-TIFF with one channel, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (``.ome.tif``).
    labels : numpy.ndarray or dask.array.Array
        Y×X non-negative integer labels (0 = background), below 2**32.
    pixel_size_um : float, optional
        Pixel size in µm.
    name : str
        Name of the single channel.
    tile, pyramid : see :func:`write_ome_tiff`
        Pyramid levels of labels are nearest-neighbour downsampled.
    compression : str or None
        Default ``"zlib"`` (label images compress well).

    Returns
    -------
    pathlib.Path
    """
    lab = label_stack(labels, path=path)
    xml = build_ome(lab.shape, np.uint32, [Channel(name)], pixel_size_um=pixel_size_um, name=name)
    return _write_tiff(path, lab, xml=xml, pixel_size_um=pixel_size_um, tile=tile, pyramid=pyramid,
                       compression=compression, labels=True)


def read_labels(path, *, level: int = 0) -> np.ndarray:
    """Read a label image (OME-TIFF, plain TIFF or OME-Zarr) as a 2-D uint32 array.

    Raises
    ------
    InputError
        Not a single-plane image, non-integer values, negative or too large labels.
    """
    from .discover import is_ome_zarr
    from .tiff import _check_stored, _quiet_tifffile, open_tiff

    path = Path(path)
    if path.is_dir():
        if not is_ome_zarr(path):
            raise InputError("expected a label TIFF or an OME-Zarr label image, found a folder", path=path)
        from .omezarr import read_ome_zarr_array

        # absent chunks are background (earlier qdplex wrote label stores without their all-zero chunks)
        lazy, _ = read_ome_zarr_array(path, level=level, complete=False)
        arr = np.asarray(lazy)
    else:
        with _quiet_tifffile(), open_tiff(path) as tif:
            series = tif.series[0]
            if level >= len(series.levels):
                raise InputError(f"expected a pyramid level in 0..{len(series.levels) - 1}, found {level}", path=path)
            _check_stored(tif, series.levels[level], path)  # before allocating the declared shape
            try:
                arr = series.levels[level].asarray()
            except Exception as err:
                raise InputError(f"expected readable label pixels, found {type(err).__name__}: {err}", path=path) from err
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise InputError(f"expected a single-plane Y×X label image, found shape {arr.shape}", path=path)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise InputError("expected integer label values, found non-integer floats", path=path)
    elif not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise InputError(f"expected integer labels, found dtype {arr.dtype}", path=path)
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.uint32).max):
        raise InputError(f"expected labels in 0..2**32-1, found range {arr.min()}..{arr.max()}", path=path)
    return arr.astype(np.uint32, copy=False)
