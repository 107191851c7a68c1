"""Read TIFF slides lazily: OME-TIFF (incl. pyramidal), ImageJ hyperstacks, plain multi-page TIFF.

Pixels are read chunk by chunk, so a whole-slide file is never loaded at once:
uncompressed tiled pages tile by tile straight from the file (``os.preadv`` in the
calling thread), contiguous data memory-mapped, anything else through tifffile's
Zarr interface (``aszarr``). Channel names come from metadata
(OME-XML, ImageJ slice labels) or from a sidecar CSV, never from the array shape.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import dask.array as da
import numpy as np
import tifffile
import zarr

from ..errors import InputError
from ..model import Channel, MultiplexImage
from .channels import apply_channels, sidecar_for
from .checks import MAX_CHUNK_BYTES, check_pixel_dtype, require_regular
from .discover import slide_stem
from .omexml import parse_ome

__all__ = ["read_tiff", "TiffArray", "open_tiff"]

#: Target pixels per dask chunk in Y×X (all channels are kept in one chunk).
CHUNK_PIXELS = 1024 * 1024


@contextmanager
def _quiet_tifffile():
    """Hold back tifffile's log messages while a file is parsed: qdplex reports what is wrong itself."""
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def open_tiff(path) -> tifffile.TiffFile:
    """Open a TIFF, turning every parse failure into an :class:`InputError`.

    Devices, FIFOs and symlink loops are refused before anything is read.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        require_regular(path, what="a TIFF file")
    try:
        with _quiet_tifffile():
            tif = tifffile.TiffFile(path)
        if not tif.series:
            tif.close()
            raise InputError("expected at least one image series in the TIFF, found none", path=path)
        return tif
    except InputError:
        raise
    except FileNotFoundError as err:
        raise InputError("expected an existing image file, found nothing at this path", path=path) from err
    except Exception as err:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise InputError(f"expected a readable TIFF file, found {type(err).__name__}: {err}", path=path) from err


class TiffArray:
    """A picklable, lazily opened array view of one series / level of a TIFF.

    Wrapped with :func:`dask.array.from_array`; the file is opened on first
    access in each process (so dask graphs can be shipped to distributed workers).
    """

    def __init__(self, path, series: int, level: int, shape, dtype, *, contiguous: bool = False):
        self.path = str(path)
        self.contiguous = contiguous
        self.series = series
        self.level = level
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self._z = None
        self._tiles = None  # (offsets planes × tiles_y × tiles_x, tile shape, stored dtype), or False
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_z"] = None
        state["_tiles"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _array(self):
        if self._z is None:
            with self._lock:
                if self._z is None and self.contiguous:
                    # uncompressed, contiguous data (often one strip per page): memory-map it
                    self._z = tifffile.memmap(self.path, series=self.series, level=self.level, mode="r")
                if self._z is None:
                    store = tifffile.imread(self.path, aszarr=True, series=self.series, level=self.level)
                    self._z = zarr.open_array(store=store, mode="r")
        return self._z

    def _tile_layout(self):
        """The byte offset of every tile when the pages are uncompressed, tiled, one sample
        per pixel and complete (then a region is read with one ``preadv`` per tile, in the
        calling thread, not through the Zarr store's single I/O loop); else False."""
        if self._tiles is None:
            with self._lock:
                if self._tiles is None:
                    self._tiles = _uncompressed_tiles(self.path, self.series, self.level, self.shape, self.dtype)
        return self._tiles

    def _read_tiles(self, key):
        """Pixels of ``key`` (slices and integers with step 1) read tile by tile, or None."""
        layout = self._tile_layout()
        if not layout or self.ndim not in (2, 3):
            return None
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > self.ndim or any(k is Ellipsis or k is None for k in key):
            return None
        key = key + (slice(None),) * (self.ndim - len(key))
        spans, drop = [], []
        for i, (k, n) in enumerate(zip(key, self.shape)):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    return None
                spans.append((start, max(start, stop)))
            elif isinstance(k, (int, np.integer)):
                j = int(k) + (n if k < 0 else 0)
                if not 0 <= j < n:
                    return None
                spans.append((j, j + 1))
                drop.append(i)
            else:
                return None
        if self.ndim == 2:
            spans.insert(0, (0, 1))
            drop = [d + 1 for d in drop] + [0]
        offsets, (th, tw), stored = layout
        (c0, c1), (y0, y1), (x0, x1) = spans
        out = np.empty((c1 - c0, y1 - y0, x1 - x0), self.dtype)
        if out.size:
            buf = np.empty((th, tw), stored)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                for c in range(c0, c1):
                    for ty in range(y0 // th, -(-y1 // th)):
                        for tx in range(x0 // tw, -(-x1 // tw)):
                            if os.preadv(fd, [buf], int(offsets[c, ty, tx])) != buf.nbytes:
                                raise OSError("short read: the file ends inside a tile")
                            ya, yb = max(y0, ty * th), min(y1, (ty + 1) * th)
                            xa, xb = max(x0, tx * tw), min(x1, (tx + 1) * tw)
                            out[c - c0, ya - y0 : yb - y0, xa - x0 : xb - x0] = \
                                buf[ya - ty * th : yb - ty * th, xa - tx * tw : xb - tx * tw]
            finally:
                os.close(fd)
        return out.squeeze(axis=tuple(drop)) if drop else out

    def __getitem__(self, key):
        try:
            direct = self._read_tiles(key)
            if direct is not None:
                return direct
            return np.asarray(self._array()[key])
        except Exception as err:
            raise InputError(
                f"expected readable pixel data, found {type(err).__name__}: {err} (truncated or corrupt file?)",
                path=self.path,
            ) from err


def _uncompressed_tiles(path, series: int, level: int, shape, dtype):
    """``(offsets, (tile_y, tile_x), stored dtype)`` of a level whose pages are uncompressed
    tiles of one sample per pixel, every tile stored whole (planes × tiles_y × tiles_x
    offsets, planes in C order of the leading axes); False for any other layout."""
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            lev = tif.series[series].levels[level]
            pages = [p for p in lev.pages]
            if len(shape) not in (2, 3) or tuple(lev.shape) != tuple(shape):
                return False
            planes = 1 if len(shape) == 2 else shape[0]
            if len(pages) != planes:
                return False
            k = lev.keyframe  # the other pages are frames sharing its layout
            if not (k.is_tiled and k.compression == 1 and k.samplesperpixel == 1 and k.imagedepth == 1
                    and k.tiledepth == 1 and k.fillorder == 1 and k.predictor == 1
                    and tuple(k.shape[-2:]) == tuple(shape[-2:]) and k.dtype == np.dtype(dtype)):
                return False
            th, tw = int(k.tilelength), int(k.tilewidth)
            ny, nx = -(-shape[-2] // th), -(-shape[-1] // tw)
            tile_bytes = th * tw * np.dtype(dtype).itemsize
            offs = []
            for p in pages:
                if p is None or getattr(p, "keyframe", k) is not k:
                    return False
                o = np.asarray(p.dataoffsets, np.int64)
                b = np.asarray(p.databytecounts, np.int64)
                if o.size != ny * nx or np.any(b != tile_bytes) or np.any(o <= 0):
                    return False
                offs.append(o.reshape(ny, nx))
            stored = np.dtype(dtype).newbyteorder(tif.byteorder)
            return np.stack(offs), (th, tw), stored
    except Exception:  # anything unexpected: the Zarr path reads it (and reports what is wrong)
        return False


def _imagej_channels(tif, n_channels_axis: int) -> list[Channel] | None:
    meta = tif.imagej_metadata or {}
    labels = meta.get("Labels")
    if labels and len(labels) == n_channels_axis and all(isinstance(s, str) and s.strip() for s in labels):
        return [Channel(s.strip()) for s in labels]
    return None


def _qpi_channels(series, n: int) -> list[Channel] | None:
    """Channel names (and emission filter bands) from PerkinElmer / Akoya QPTIFF page descriptions."""
    import xml.etree.ElementTree as ET

    out = []
    for page in list(series.pages)[:n]:
        try:
            root = ET.fromstring(page.description.strip())
        except (ET.ParseError, AttributeError):
            return None
        name = (root.findtext("Name") or "").strip()
        if not name:
            return None
        em = bw = None
        emf = root.find(".//EmissionFilter")
        if emf is not None:
            on, off = emf.findtext(".//Cuton"), emf.findtext(".//Cutoff")
            try:
                lo, hi = float(on), float(off)
                if hi > lo > 0:
                    em, bw = (lo + hi) / 2.0, hi - lo
            except (TypeError, ValueError):
                pass
        out.append(Channel(name, em, bw))
    return out if len(out) == n else None


def _pixel_size(tif, page, ome: dict | None) -> float | None:
    if ome is not None and ome.get("pixel_size_um"):
        return ome["pixel_size_um"]
    tags = page.tags
    xres = tags.get("XResolution")
    if xres is None:
        return None
    num, den = xres.value
    if not num or not den:
        return None
    per_unit = num / den  # pixels per unit
    if tif.is_imagej:
        unit = str((tif.imagej_metadata or {}).get("unit", "")).lower()
        if unit in ("micron", "um", "µm", "μm", "\\u00b5m"):
            return 1.0 / per_unit
        return None
    unit = tags.get("ResolutionUnit")
    if unit is not None and int(unit.value) == 3:  # centimetre
        return 1e4 / per_unit
    return None


def _channel_layout(axes: str, shape, *, path) -> tuple[list[int], str]:
    """Order (transpose) that puts channel axes first, then Y, X; and the channel axes."""
    if "Y" not in axes or "X" not in axes:
        raise InputError(f"expected an image with Y and X axes, found axes {axes!r} with shape {tuple(shape)}", path=path)
    others = [a for a in axes if a not in "YX"]
    if len(others) > 1 and sorted(others) != ["C", "S"]:
        raise InputError(
            f"expected a single-plane multichannel image (one channel axis besides Y, X), "
            f"found axes {axes!r} with shape {tuple(shape)}",
            path=path,
        )
    chan_axes = "".join(a for a in "CS" if a in others) if len(others) == 2 else "".join(others)
    order = [axes.index(a) for a in chan_axes] + [axes.index("Y"), axes.index("X")]
    return order, chan_axes


def _chunks_for(shape_cyx, file_chunks_yx) -> tuple[int, int, int]:
    c, y, x = shape_cyx
    fy, fx = file_chunks_yx
    if fx >= x:  # strips: keep whole rows per chunk, bound the pixel count
        cy = max(fy, (CHUNK_PIXELS // max(x, 1)) // max(fy, 1) * max(fy, 1))
        return (c, min(y, cy), x)
    side = 1024
    cy = max(fy, side // fy * fy) if fy else side
    cx = max(fx, side // fx * fx) if fx else side
    return (c, min(y, cy), min(x, cx))


def read_tiff(path, *, channels=None, name=None, level: int = 0) -> MultiplexImage:
    """Read a TIFF slide (OME-TIFF, ImageJ hyperstack or plain multi-page TIFF) lazily.

    Parameters
    ----------
    path : str or os.PathLike
        The TIFF file.
    channels : None, path to a CSV, or sequence of str / Channel, optional
        Channel names (or a sidecar CSV) overriding the file's metadata. When
        None, the names come from the OME-XML, the ImageJ slice labels or the
        QPTIFF page descriptions; else from a ``<stem>.channels.csv`` beside the
        file, a ``channels.csv`` or an MCMICRO ``markers.csv`` in its folder
        (``<stem>.channels.csv`` wins over the file's metadata).
    name : str, optional
        Slide name; defaults to the file name without ``.ome.tif(f)``.
    level : int
        Pyramid level (0 = full resolution).

    Returns
    -------
    MultiplexImage
        Lazy C×Y×X dask data in the file's dtype.

    Raises
    ------
    InputError
        Unreadable, truncated or unsupported file, missing channel metadata, or
        a channel count that differs from the number of planes.
    """
    path = Path(path)
    with _quiet_tifffile(), open_tiff(path) as tif:
        series = tif.series[0]
        levels = series.levels
        if level < 0 or level >= len(levels):
            raise InputError(f"expected a pyramid level in 0..{len(levels) - 1}, found level={level}", path=path)
        lev = levels[level]
        axes, shape = lev.axes, tuple(lev.shape)
        check_pixel_dtype(lev.dtype, path=path)
        colour = _colour(lev.keyframe, path)
        _check_stored(tif, lev, path)
        order, chan_axes = _channel_layout(axes, shape, path=path)
        n_planes = int(np.prod([shape[i] for i in order[:-2]])) if chan_axes else 1
        what = (
            f"{n_planes} plane(s) of {shape[order[-2]]}×{shape[order[-1]]} "
            f"(axes {axes!r}, shape {shape})"
        )
        ome = None
        found = None
        fmt = "tiff"
        if tif.is_ome and tif.ome_metadata:
            ome = parse_ome(tif.ome_metadata, image_index=0, path=path)
            found = ome["channels"] or None
            fmt = "ome-tiff"
        elif tif.is_imagej:
            found = _imagej_channels(tif, n_planes)
            fmt = "imagej-tiff"
        elif tif.pages.first.is_qpi:
            found = _qpi_channels(series, n_planes)
            fmt = "qptiff"
        page0 = series.pages[0] if series.pages else tif.pages.first
        px = _pixel_size(tif, page0, ome)
        if px is not None and level > 0:
            px = px * levels[0].shape[levels[0].axes.index("X")] / shape[axes.index("X")]
        # chunk layout of the file, for efficient dask chunks
        kp = lev.keyframe
        contiguous = lev.dataoffset is not None and not kp.is_tiled
        if contiguous:  # memory-mapped: any chunking is cheap
            file_chunks = (1, 1)
        else:
            file_chunks = (kp.tilelength or kp.rowsperstrip or shape[axes.index("Y")],
                           kp.tilewidth or shape[axes.index("X")])
        dtype = lev.dtype
        n_levels = len(levels)
        image_name = ome.get("name") if ome else None

    given = channels
    if given is None:
        side = sidecar_for(path)
        if side is not None and (side.name.endswith(".channels.csv") or found is None):
            given = side
    if colour and found is None and given is None:
        raise InputError(
            f"expected grayscale channels, found a colour image (photometric {colour}, {n_planes} sample(s) per "
            f"pixel, dtype {dtype}) whose samples no metadata names; qdplex reads colour samples as channels only "
            f"when the OME metadata or a sidecar CSV names them",
            path=path,
        )
    chans = apply_channels(found, given, n_planes, path=path, what=what)

    arr = da.from_array(
        TiffArray(path, 0, level, shape, dtype, contiguous=contiguous),
        chunks=_file_chunks(shape, axes, order, _chunks_for((n_planes, shape[order[-2]], shape[order[-1]]), file_chunks)),
        lock=False,
        asarray=False,
        name=f"tiff-{tokenize_path(path)}-{level}",
        meta=np.empty((0,) * len(shape), dtype=dtype),
    )
    arr = arr.transpose(order) if order != sorted(order) else arr
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 4:
        arr = arr.reshape((n_planes,) + arr.shape[2:])
    return MultiplexImage(
        data=arr,
        channels=chans,
        pixel_size_um=px,
        name=name or slide_stem(path),
        source=str(path),
        metadata={"format": fmt, "axes": axes, "dtype": str(dtype), "levels": n_levels, "level": level,
                  "ome_name": image_name,
                  **({"camera_offset": ome["camera_offset"]} if ome and ome.get("camera_offset") is not None else {})},
    )


_COLOUR = {"RGB", "YCBCR", "CIELAB", "ICCLAB", "ITULAB", "SEPARATED"}


def _colour(page, path) -> str | None:
    """The photometric name of a colour page (RGB, YCbCr, CMYK, …), None for grayscale.

    Palette pages count as grayscale: ImageJ stores each channel's display LUT that way,
    and the values are the measured intensities.
    """
    photometric = getattr(page.photometric, "name", str(page.photometric))
    return photometric if photometric in _COLOUR else None


def _check_stored(tif, series, path) -> None:
    """Raise InputError unless the pixel data the file stores cover the shape it declares.

    Every page must list one strip or tile per chunk of its declared size (a patched
    ImageWidth / ImageLength lists too few), none empty, none beyond the end of the file
    (a truncated copy); uncompressed data must hold the declared bytes, and a compressed
    strip or tile must decode to at most :data:`MAX_CHUNK_BYTES`. Nothing is allocated
    by a number in the file before these hold.
    """
    size = tif.filehandle.size
    key = series.keyframe
    expected = int(np.prod(key.chunked))
    chunk_bytes = int(np.prod(key.chunks)) * np.dtype(key.dtype).itemsize if key.dtype is not None else 0
    compressed = int(key.compression) != 1
    shape = "×".join(str(int(n)) for n in key.shape)
    for page in series.pages:
        if page is None:
            continue
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if offsets.size != expected:
            raise InputError(
                f"expected {expected} strips/tiles for the declared {shape} page, found {offsets.size} "
                f"(image size tags that do not match the stored data?)",
                path=path,
            )
        if counts.size and int(counts.min()) <= 0:
            raise InputError(
                f"expected pixel data in every strip/tile of the {shape} page, found {int((counts <= 0).sum())} "
                f"empty (missing data would read as zeros)",
                path=path,
            )
        if offsets.size and int((offsets + counts).max()) > size:
            raise InputError(
                f"expected pixel data up to byte {int((offsets + counts).max())}, "
                f"found a file of {size} bytes (truncated?)",
                path=path,
            )
        if not compressed and int(counts.sum()) < int(key.nbytes):
            raise InputError(
                f"expected {int(key.nbytes)} bytes of uncompressed pixels for the declared {shape} page, "
                f"found {int(counts.sum())} stored",
                path=path,
            )
    if compressed and chunk_bytes > MAX_CHUNK_BYTES:
        raise InputError(
            f"expected compressed strips/tiles of at most {MAX_CHUNK_BYTES // 2**20} MiB decoded, "
            f"found {chunk_bytes // 2**20} MiB each ({'×'.join(str(int(n)) for n in key.chunks)})",
            path=path,
        )


def _file_chunks(shape, axes, order, cyx_chunks):
    """Translate C×Y×X chunk sizes back to the file's axis order."""
    chunks = [1] * len(shape)
    cc, cy, cx = cyx_chunks
    for i in order[:-2]:
        chunks[i] = shape[i]
    chunks[axes.index("Y")] = cy
    chunks[axes.index("X")] = cx
    return tuple(chunks)


def tokenize_path(path) -> str:
    """A token for dask names that changes when the file changes (path, size, mtime)."""
    from dask.base import tokenize

    p = Path(path)
    st = p.stat()
    return tokenize(str(p.resolve()), st.st_size, st.st_mtime_ns)
