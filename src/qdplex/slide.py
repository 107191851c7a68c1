"""The one slide path: unmix → segment → quantify → score, for a slide of any size.

:func:`run_slide` runs the same stage sequence on a 256² sample and on a 100k²
whole slide. Where the intermediate arrays live is a *storage* choice inside that
path, not a second implementation:

* ``storage="memory"``: the unmixed planes and label images are numpy arrays;
* ``storage="disk"``: they are raw chunk files in a scratch folder (:class:`_TileFile`),
  written and read tile by tile, so memory is bounded by the tile size, not the slide;
* ``storage="auto"`` (default): memory up to :data:`MEMORY_PIXELS` Y×X pixels, disk above.

Every stage works tile by tile in both storages, with the same tiles, so the two
give the same tables and scores:

1. **unmix** — :func:`qdplex.unmix.unmix` per ``tile × tile`` block, stored;
2. **segment** — :func:`qdplex.segment.segment_tiled` (nuclei owned by the tile
   holding their centroid, global IDs), then cells (:func:`qdplex.segment.expand_nuclei`)
   and the membrane ring (:func:`qdplex.segment.membrane_ring`) per tile with a halo;
3. **quantify** — :func:`qdplex.quantify.quantify` accumulates per-cell sums block by
   block; medians and quantiles are computed per tile for the cells whose centroid it
   holds (a window around the tile covers each such cell whole), so no whole plane is
   ever loaded;
4. **score** — :func:`qdplex.score.score_table`; HER2 membrane completeness is measured
   on the membrane ring's pixels, tile by tile.

Tiles are dask tasks on the scheduler in use: the local threads, or — inside a
:mod:`distributed` worker, or with ``scheduler=`` a :class:`distributed.Client` — every
worker of the cluster (disk storage on a folder the workers share).
Writing is :func:`qdplex.outputs.write_slide`'s.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import uuid
import warnings as _warnings
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import dask
import dask.array as da
import numpy as np
import pandas as pd

from .errors import InputError, QdplexError
from .model import Channel, MultiplexImage, Segmentation
from .panel import Panel

__all__ = ["SlideResult", "run_slide", "choose_storage", "STORAGES", "MEMORY_PIXELS", "DEFAULT_TILE"]

#: Storage choices of :func:`run_slide` (``qdplex run --storage``).
STORAGES = ("auto", "memory", "disk")
#: ``storage="auto"`` keeps slides up to this many Y×X pixels in memory (4096²).
MEMORY_PIXELS = 4096 * 4096
#: Default tile side in pixels (unmixing, quantification, cells, scratch chunks;
#: nuclei are segmented on tiles of twice this side plus their overlap).
DEFAULT_TILE = 1024

Progress = Callable[[str, float], None]
#: Warning categories that speak to developers, not to the user of a slide's results.
_NOT_FOR_USERS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ResourceWarning, ImportWarning)


@dataclass
class SlideResult:
    """Everything :func:`run_slide` computed for one slide (one type for every storage).

    Attributes
    ----------
    image : MultiplexImage
        The raw slide.
    panel : Panel
    library : SpectralLibrary
        The reference spectra used.
    unmixed : qdplex.unmix.UnmixResult
        Abundance planes named by marker, residual and saturation mask, read from storage.
    segmentation : Segmentation
        Nuclei, cells and the membrane ring (numpy, or scratch arrays read by slices).
    table : pandas.DataFrame
        One row per cell (MCQuant order, scores added).
    summary, thresholds : dict
        Slide scores and the positivity threshold per marker.
    timings : dict
        Stage → seconds.
    warnings : list of str
        One line per thing the user should know (from any stage).
    records : dict
        Per-stage records for ``run.json`` (``records["unmixing"]`` ...).
    storage : {"memory", "disk"}
    tile : int
    pixel_size_um : float
    """

    image: MultiplexImage
    panel: Panel
    library: object
    unmixed: object
    segmentation: Segmentation
    table: pd.DataFrame
    summary: dict
    thresholds: dict
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    records: dict = field(default_factory=dict)
    storage: str = "memory"
    tile: int = DEFAULT_TILE
    pixel_size_um: float | None = None
    scratch: Path | None = None

    @property
    def shape(self) -> tuple:
        """C×Y×X of the raw slide."""
        return tuple(int(s) for s in self.image.shape)

    def close(self) -> None:
        """Remove the scratch storage (disk); the result's images are unreadable afterwards."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- choices
def choose_storage(image: MultiplexImage, storage: str = "auto", *, max_pixels: int = MEMORY_PIXELS) -> str:
    """``"memory"`` or ``"disk"`` for ``image``: as asked, or by size for ``"auto"``."""
    if storage not in STORAGES:
        raise QdplexError(f"expected storage one of {STORAGES}, found {storage!r}")
    if storage != "auto":
        return storage
    _, h, w = image.shape
    return "disk" if h * w > max_pixels else "memory"


def pixel_size_for(image: MultiplexImage, panel: Panel) -> float:
    """Pixel size in µm: the file's, else the panel's ``[image] pixel_size_um``; InputError if neither."""
    px = image.pixel_size_um or panel.pixel_size_um
    if not px:
        raise InputError(
            "expected a pixel size (OME PhysicalSizeX in the file, or [image] pixel_size_um in the panel), found none",
            path=image.source or image.name,
        )
    return float(px)


def _name_planes_by_marker(unmixed, panel: Panel):
    """Rename the unmixed planes from fluor to marker name (fluor kept in ``Channel.fluor``)."""
    mapping = panel.fluor_to_marker()
    chans = [
        Channel(mapping.get(c.name, c.name), c.emission_nm, c.bandwidth_nm, c.fluor or c.name)
        for c in unmixed.abundances.channels
    ]
    return replace(unmixed, abundances=replace(unmixed.abundances, channels=chans))


def _unmix_options(image: MultiplexImage, panel: Panel) -> dict:
    """Keywords of :func:`qdplex.unmix.unmix` from the panel's typed ``[unmixing]`` settings.

    The camera offset: the panel's, else the file's, else ``"auto"`` (estimated from the
    slide by :mod:`qdplex.unmix.offset`); the same rule as ``qdplex.unmix(image, library)``.
    """
    u = panel.settings.unmixing
    offset = panel.camera_offset_for(image)
    return {
        "method": u.method,
        "offset": "auto" if offset is None else offset,
        "refine": u.refine,
        "saturation": u.saturation,
        "exclude_saturated": u.exclude_saturated,
        "nuclear_stain": panel.nuclear_stain,
    }


# --------------------------------------------------------------------------- storage
def _spans(key, shape) -> tuple[list, list] | None:
    """``(start, stop)`` per axis and the axes an integer drops, for a key of slices (step 1)
    and integers; None for anything else."""
    key = key if isinstance(key, tuple) else (key,)
    if len(key) > len(shape) or any(k is Ellipsis or k is None for k in key):
        return None
    key = key + (slice(None),) * (len(shape) - len(key))
    spans, drop = [], []
    for i, (k, n) in enumerate(zip(key, shape)):
        if isinstance(k, slice):
            a, b, step = k.indices(n)
            if step != 1:
                return None
            spans.append((a, max(a, b)))
        elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            j = int(k) + (n if k < 0 else 0)
            if not 0 <= j < n:
                raise IndexError(f"index {int(k)} is out of bounds for axis {i} with size {n}")
            spans.append((j, j + 1))
            drop.append(i)
        else:
            return None
    return spans, drop


class _TileFile:
    """A Y×X or C×Y×X array in one file of raw chunks (disk storage's scratch arrays).

    Chunk after chunk in C order of the chunk grid, each chunk whole (edge chunks padded)
    in C order, so a chunk's rows are contiguous bytes: a region is read and written with
    one ``preadv``/``pwrite`` per chunk row span, in the calling thread. (A zarr array
    funnels every chunk through zarr's one I/O thread: measured on the 8192² slide, that
    thread was busy about 19 s of the run, the tiles waiting on it.) The file starts as a
    hole (zeros). Sliced like numpy (slices of step 1 and integers); picklable (path and
    layout), so threads and processes sharing the folder read and write it; regions
    written at once by different writers must not share a chunk row.
    """

    def __init__(self, path, shape, dtype, chunks):
        self.path = str(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.chunks = tuple(int(c) for c in chunks)
        self.ndim = len(self.shape)
        self.grid = tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))
        self.chunk_bytes = int(np.prod(self.chunks)) * self.dtype.itemsize
        with open(self.path, "wb") as fh:
            fh.truncate(int(np.prod(self.grid)) * self.chunk_bytes)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __dask_tokenize__(self):
        return ("qdplex-tile-file", self.path, self.shape, str(self.dtype), self.chunks)

    def __array__(self, dtype=None, copy=None):
        a = self[tuple(slice(None) for _ in self.shape)]
        return a if dtype is None else a.astype(dtype, copy=False)

    def _pieces(self, spans):
        """Per chunk row span touched by ``spans``: (file offset, rows, chunk columns [a, b),
        the region's index of that span)."""
        ch = self.chunks
        lead = spans[:-2]
        (y0, y1), (x0, x1) = spans[-2:]
        cy, cx = ch[-2:]
        item = self.dtype.itemsize
        for idx in np.ndindex(*[b - a for a, b in lead]) if lead else [()]:
            pos = tuple(a + i for (a, _), i in zip(lead, idx))
            cpos = tuple(p // c for p, c in zip(pos, ch[:-2]))
            within = 0
            for p, c in zip(pos, ch[:-2]):
                within = within * c + p % c
            for gy in range(y0 // cy, -(-y1 // cy)):
                ya, yb = max(y0, gy * cy), min(y1, (gy + 1) * cy)
                for gx in range(x0 // cx, -(-x1 // cx)):
                    xa, xb = max(x0, gx * cx), min(x1, (gx + 1) * cx)
                    flat = 0
                    for g, n in zip(cpos + (gy, gx), self.grid):
                        flat = flat * n + g
                    off = flat * self.chunk_bytes + ((within * cy + (ya - gy * cy)) * cx) * item
                    yield off, yb - ya, (xa - gx * cx, xb - gx * cx), (idx, (ya - y0, yb - y0), (xa - x0, xb - x0))

    def __getitem__(self, key):
        sp = _spans(key, self.shape)
        if sp is None:
            return np.asarray(self[tuple(slice(None) for _ in self.shape)])[key]
        spans, drop = sp
        out = np.zeros(tuple(b - a for a, b in spans), self.dtype)
        if out.size:
            cx = self.chunks[-1]
            fd = os.open(self.path, os.O_RDONLY)
            try:
                buf = None
                for off, rows, (ca, cb), (idx, (ra, rb), (xa, xb)) in self._pieces(spans):
                    dst = out[idx + (slice(ra, rb), slice(xa, xb))]
                    if ca == 0 and cb == cx and dst.flags.c_contiguous:
                        got = os.preadv(fd, [dst], off)
                    else:
                        if buf is None or buf.shape[0] < rows:
                            buf = np.empty((self.chunks[-2], cx), self.dtype)
                        got = os.preadv(fd, [buf[:rows]], off)
                        dst[...] = buf[:rows, ca:cb]
                    if got != rows * cx * self.dtype.itemsize:
                        raise OSError(f"short read in scratch array {self.path}")
            finally:
                os.close(fd)
        return out.squeeze(axis=tuple(drop)) if drop else out

    def __setitem__(self, key, value):
        sp = _spans(key, self.shape)
        if sp is None:
            raise QdplexError(f"internal: scratch arrays are written by slices, found key {key!r}")
        spans, drop = sp
        region = tuple(b - a for a, b in spans)
        value = np.asarray(value, dtype=self.dtype)
        if drop:
            value = np.expand_dims(value, tuple(drop)) if value.ndim == len(region) - len(drop) else value
        value = np.broadcast_to(value, region)
        cx = self.chunks[-1]
        fd = os.open(self.path, os.O_RDWR)
        try:
            for off, rows, (ca, cb), (idx, (ra, rb), (xa, xb)) in self._pieces(spans):
                src = value[idx + (slice(ra, rb), slice(xa, xb))]
                if not (ca == 0 and cb == cx):  # part of the chunk's width: read, modify, write
                    buf = np.empty((rows, cx), self.dtype)
                    os.preadv(fd, [buf], off)
                    buf[:, ca:cb] = src
                    src = buf
                os.pwrite(fd, np.ascontiguousarray(src), off)
        finally:
            os.close(fd)


class _Store:
    """Where a slide's intermediate arrays live: numpy arrays, or raw chunk files
    (:class:`_TileFile`) in a scratch folder."""

    def __init__(self, kind: str, tile: int, scratch: Path | None = None):
        self.kind, self.tile, self.root = kind, int(tile), None
        if kind == "disk":
            base = Path(scratch) if scratch is not None else Path(tempfile.gettempdir())
            try:
                base.mkdir(parents=True, exist_ok=True)
                self.root = base / f".qdplex-scratch-{uuid.uuid4().hex[:8]}"
                self.root.mkdir()
            except OSError as e:
                raise QdplexError(f"expected a writable scratch folder, found {type(e).__name__}: "
                                  f"{e.strerror or e}", path=base) from None

    def chunks(self, shape) -> tuple:
        t = self.tile
        c = (t, t) if len(shape) == 2 else (1, t, t)
        return tuple(min(a, s) for a, s in zip(c, shape))

    def empty(self, name: str, shape, dtype):
        """A zero-filled array to write into (numpy, or a scratch file chunked by tile)."""
        if self.kind == "memory":
            return np.zeros(shape, dtype)
        try:
            return _TileFile(self.root / f"{name}.raw", shape, dtype, self.chunks(shape))
        except OSError as e:
            raise QdplexError(f"expected a writable scratch folder, found {type(e).__name__}: "
                              f"{e.strerror or e}", path=self.root) from None

    def put(self, arrays: dict) -> dict:
        """Compute lazy arrays (in one pass: they may share their graph) into storage."""
        if self.kind == "memory":
            vals = dask.compute(*arrays.values())
            return {k: np.ascontiguousarray(v) for k, v in zip(arrays, vals)}
        targets = {k: self.empty(k, a.shape, a.dtype) for k, a in arrays.items()}
        da.store([a.rechunk(targets[k].chunks) for k, a in arrays.items()], list(targets.values()), lock=False)
        return targets

    def lazy(self, arr):
        """A dask view of a stored array, chunked by tile (channels whole)."""
        chunks = (self.tile, self.tile) if arr.ndim == 2 else (arr.shape[0], self.tile, self.tile)
        return da.from_array(arr, chunks=chunks)


def _scheduler_context(scheduler, kind: str):
    """Run the stages on ``scheduler`` (a Client or any dask scheduler name); by default, a
    slide on disk storage inside a distributed worker runs its tiles on the worker's whole
    cluster (through a seceded worker client), anything else on the scheduler in use."""
    if scheduler is not None:
        return dask.config.set(scheduler=scheduler)
    if kind != "disk":
        return nullcontext()
    try:
        from distributed import get_worker, worker_client

        get_worker()
    except (ImportError, ValueError):
        return nullcontext()
    return _on_cluster(worker_client)


class _on_cluster:
    def __init__(self, worker_client):
        self._wc, self._cm, self._cfg = worker_client, None, None

    def __enter__(self):
        self._cm = self._wc(separate_thread=True)
        client = self._cm.__enter__()
        self._cfg = dask.config.set(scheduler=client)
        self._cfg.__enter__()
        return client

    def __exit__(self, *exc):
        self._cfg.__exit__(*exc)
        return self._cm.__exit__(*exc)


def _workers() -> int:
    """Tiles worth running at once: the cluster's threads on a distributed client, else dask's
    ``num_workers`` setting (a batch worker sets its share of the machine), else the CPU count."""
    client = dask.config.get("scheduler", None)
    if hasattr(client, "nthreads"):
        try:
            return max(1, int(sum(client.nthreads().values())))
        except Exception:  # a client that cannot answer: the local count still works
            pass
    n = dask.config.get("num_workers", None)
    return int(n or os.cpu_count() or 1)


# --------------------------------------------------------------------------- the path
def run_slide(
    image: MultiplexImage,
    panel: Panel,
    *,
    storage: str = "auto",
    tile: int | None = None,
    library=None,
    scratch=None,
    scheduler=None,
    progress: Progress | None = None,
    on_segmented: Callable | None = None,
) -> SlideResult:
    """Unmix, segment, quantify and score one slide (any size).

    Parameters
    ----------
    image : MultiplexImage
        The raw λ-stack or filter-channel image (lazy dask data, e.g. from
        :func:`qdplex.io.read_image`).
    panel : Panel
        Markers, fluors, compartments and per-stage settings.
    storage : {"auto", "memory", "disk"}
        Where the intermediate arrays live (see the module docstring); the results do
        not depend on it.
    tile : int, optional
        Tile side in pixels (≥ 64, default :data:`DEFAULT_TILE`). Memory grows with ``tile²``.
    library : SpectralLibrary, optional
        Reference spectra; by default :func:`qdplex.spectra.library_for_panel`.
    scratch : path, optional
        Folder for the disk storage (default: the system's temporary folder); the
        scratch arrays are removed by :meth:`SlideResult.close` (or when the result is
        garbage-collected).
    scheduler : optional
        A :class:`distributed.Client` (or a dask scheduler name) to run the tiles on;
        default: the scheduler in use (inside a distributed worker: its cluster).
    progress : callable, optional
        Called as ``progress(stage, fraction_done)`` after each stage.
    on_segmented : callable, optional
        Called as ``on_segmented(unmixed, segmentation, pixel_size_um=, tile=)`` once the
        unmixed planes and the labels are stored, before quantification: e.g.
        :meth:`qdplex.outputs.ImageWriter.start`, which writes the images while the last
        stages run. It must only read them.

    Returns
    -------
    SlideResult
    """
    from .quantify import quantify
    from .score import score_table
    from .segment import expand_nuclei, membrane_ring, segment_tiled
    from .spectra import library_for_panel
    from .tables import cell_table
    from .unmix import unmix

    kind = choose_storage(image, storage)
    tile = DEFAULT_TILE if tile is None else tile
    if not (isinstance(tile, (int, np.integer)) and not isinstance(tile, bool) and tile >= 64):
        raise QdplexError(f"expected a tile size of at least 64 pixels, found {tile!r}")
    tile = int(tile)
    report = progress or (lambda stage, frac: None)
    px = pixel_size_for(image, panel)
    C, H, W = (int(s) for s in image.shape)
    timings: dict[str, float] = {}
    records: dict[str, dict] = {}
    if kind == "disk":  # memory bounded by the tiles in flight, not by the tiles done (qdplex._malloc)
        from ._malloc import bound_arenas

        bound_arenas(max(2, _workers()))
    store = _Store(kind, tile, scratch)
    ok = False
    try:
        with _warnings.catch_warnings(record=True) as caught, _scheduler_context(scheduler, kind):
            _warnings.simplefilter("always")
            nw = _workers()
            # 1. unmix ----------------------------------------------------------------------
            t = time.perf_counter()
            lib = library if library is not None else library_for_panel(panel, image.channels)
            res = _name_planes_by_marker(unmix(image, lib, chunk=tile, **_unmix_options(image, panel)), panel)
            lazy = {"abundances": res.abundances.data.astype(np.float32)}
            if getattr(res, "residual", None) is not None:
                lazy["residual"] = da.asarray(res.residual).astype(np.float32)
            if getattr(res, "saturated", None) is not None:
                lazy["saturated"] = da.asarray(res.saturated).astype(np.uint8)
            stored = store.put(lazy)
            unmixed = replace(
                res,
                abundances=replace(res.abundances, data=store.lazy(stored["abundances"])),
                **({"residual": store.lazy(stored["residual"])} if "residual" in stored else {}),
                **({"saturated": store.lazy(stored["saturated"]).astype(bool)} if "saturated" in stored else {}),
            )
            records["unmixing"] = _unmix_record(res)
            timings["unmix"] = time.perf_counter() - t
            report("unmix", 0.25)

            # 2. segment --------------------------------------------------------------------
            t = time.perf_counter()
            seg, records["segmentation"] = _segment(unmixed, panel, px, store, tile, nw,
                                                    segment_tiled, expand_nuclei, membrane_ring)
            timings["segment"] = time.perf_counter() - t
            report("segment", 0.5)
            if on_segmented is not None:
                on_segmented(unmixed, seg, pixel_size_um=px, tile=tile)

            # 3. quantify -------------------------------------------------------------------
            t = time.perf_counter()
            q = panel.quantification
            stats = tuple(q.get("stats", ("mean", "std", "sum")))
            quantiles = tuple(float(v) for v in q.get("quantiles", ()))
            for v in quantiles:
                if not 0.0 <= v <= 1.0:
                    raise InputError(f"expected quantiles in [0, 1], found {v}")
            # medians and quantiles: exact, per chunk for the cells whose centroid it holds (bounded memory)
            quant = quantify(unmixed, seg, panel, stats=stats, quantiles=quantiles, pixel_size_um=px)
            table = cell_table(quant, panel)
            timings["quantify"] = time.perf_counter() - t
            report("quantify", 0.75)

            # 4. score ----------------------------------------------------------------------
            t = time.perf_counter()
            ids = table["CellID"].to_numpy()

            def completeness(marker, threshold):
                # HER2 membrane completeness measured on the membrane ring's pixels, tile by tile
                return _fraction_above(stored["abundances"], unmixed.abundances.channel_names.index(marker),
                                       seg.membrane, threshold, ids, tile)

            table, thresholds, summary = score_table(table, panel, completeness=completeness)
            timings["score"] = time.perf_counter() - t
            report("score", 1.0)
        found = list(getattr(res, "warnings", None) or [])
        found += [_one_line(f"{w.category.__name__}: {w.message}") for w in caught
                  if not issubclass(w.category, _NOT_FOR_USERS)]
        records["storage"] = {"storage": kind, "tile": tile, "scratch": None if store.root is None else str(store.root)}
        result = SlideResult(image, panel, lib, unmixed, seg, table, summary, thresholds, timings,
                             warnings=list(dict.fromkeys(found)), records=records, storage=kind, tile=tile,
                             pixel_size_um=px, scratch=store.root)
        if store.root is not None:
            weakref.finalize(result, shutil.rmtree, str(store.root), True)
        ok = True
        return result
    finally:
        if not ok and store.root is not None:
            shutil.rmtree(store.root, ignore_errors=True)


def _unmix_record(res) -> dict:
    rec = getattr(res, "record", None)
    if callable(rec):
        return dict(rec())
    return {"method": getattr(res, "method", None),
            "endmembers": list(res.abundances.channel_names)}


def _segment(unmixed, panel, px, store, tile, nw, segment_tiled, expand_nuclei, membrane_ring):
    """Nuclei tile by tile, then cells and the membrane ring per tile with a halo."""
    segopts = panel.segmentation
    abund = unmixed.abundances
    H, W = abund.shape[1:]
    nuclear = abund.plane(panel.nuclear_stain)
    nuclei = store.empty("nuclei", (H, W), np.uint32)
    seg_tile = int(segopts.get("tile", 2 * tile))
    kw = {k: segopts[k] for k in ("method", "model", "overlap", "diameter_um") if segopts.get(k) is not None}
    segment_tiled(nuclear, tile=seg_tile, pixel_size_um=px, out=nuclei, workers=nw, **kw)
    expand_px = float(segopts.get("expand_um", 5.0)) / px
    width_px = max(float(segopts.get("membrane_width_um", 1.0)) / px, 1.0)
    nuc = store.lazy(nuclei)
    depth = int(math.ceil(expand_px)) + 2
    planes = [m.name for m in panel.markers if m.compartment == "membrane"] if segopts.get("membrane_guided") else []
    if planes:
        guide = abund.select(planes).data.sum(axis=0).rechunk(nuc.chunks)
        cells_lazy = da.map_overlap(lambda n, m: expand_nuclei(n, expand_px, membrane=m), nuc, guide,
                                    depth=depth, boundary="none", dtype=np.uint32, trim=True)
    else:
        cells_lazy = nuc.map_overlap(lambda n: expand_nuclei(n, expand_px), depth=depth,
                                     boundary="none", dtype=np.uint32, trim=True)
    cells = store.put({"cells": cells_lazy})["cells"]
    ring_depth = int(math.ceil(width_px)) + 2
    ring = store.lazy(cells).map_overlap(lambda c: membrane_ring(c, width_px), depth=ring_depth,
                                         boundary="none", dtype=np.uint32, trim=True)
    membrane = store.put({"membrane": ring})["membrane"]
    seg = Segmentation(nuclei, cells, membrane_width_px=width_px, stored_membrane=membrane)
    record = {"method": segopts.get("method"), "tile": seg_tile, "expand_px": expand_px,
              "membrane_width_px": width_px, "membrane_guided": bool(planes)}
    return seg, record


def _tiles(H: int, W: int, tile: int):
    return [(y, min(y + tile, H), x, min(x + tile, W)) for y in range(0, H, tile) for x in range(0, W, tile)]


def _compute(tasks):
    """Run delayed tile tasks on the scheduler in use."""
    return list(dask.compute(*tasks)) if tasks else []


def _stream(fn, tiles):
    """``fn(*tile)`` for every tile, as dask tasks on the scheduler in use, a few batches of
    workers at a time, yielded in order: results are consumed as they come, so what is held
    at once is bounded by the workers, not by the number of tiles."""
    step = 4 * _workers()
    for i in range(0, len(tiles), step):
        yield from _compute([dask.delayed(fn)(*t) for t in tiles[i:i + step]])


# --------------------------------------------------------------------------- tile-by-tile statistics
def _fraction_above(abundances, channel: int, labels, threshold: float, ids, tile: int) -> np.ndarray:
    """Per cell in ``ids``, the fraction of its ``labels`` pixels with value ≥ ``threshold``,
    accumulated tile by tile (NaN for a cell without such pixels)."""
    ids = np.asarray(ids, dtype=np.int64)
    n_lab = int(ids.max()) + 1 if ids.size else 1
    H, W = labels.shape

    def one(y0, y1, x0, x1):
        lab = np.asarray(labels[y0:y1, x0:x1]).ravel()
        nz = np.flatnonzero(lab)
        if nz.size == 0:
            return 0, np.zeros(0), np.zeros(0)
        lab = lab[nz].astype(np.int64)
        val = np.asarray(abundances[channel, y0:y1, x0:x1]).ravel()[nz] >= threshold
        lo = int(lab.min())  # counts over this tile's ID range only (IDs run in tile order)
        return lo, np.bincount(lab - lo), np.bincount(lab - lo, weights=val)

    n = np.zeros(n_lab, np.float64)
    k = np.zeros(n_lab, np.float64)
    for lo, cnt, hit in _stream(one, _tiles(H, W, tile)):
        m = max(0, min(cnt.size, n_lab - lo))
        n[lo:lo + m] += cnt[:m]
        k[lo:lo + m] += hit[:m]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n[ids] > 0, k[ids] / n[ids], np.nan)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
