"""Whole slides out of core: unmix → segment → quantify → write, tile by tile.

A slide larger than memory never exists as one array here. Each stage streams
tiles between on-disk Zarr arrays in a scratch folder beside the outputs:

1. **unmix** — :func:`qdplex.unmix.unmix` on the lazy (dask) image, stored tile by
   tile into ``unmixed`` (K×Y×X float32), ``residual`` and ``saturated``;
2. **segment** — :func:`qdplex.segment.segment_tiled` reads the nuclear plane tile
   by tile (with overlap) and writes global nucleus IDs into ``nuclei``; cells and
   the membrane ring are local operations, computed with ``dask.array.map_overlap``
   (:func:`qdplex.segment.expand_nuclei`, :func:`qdplex.segment.membrane_ring`) and
   stored into ``cells`` and ``membrane``;
3. **quantify** — :func:`qdplex.quantify.quantify` accumulates per-cell sums one
   tile at a time (its block accumulator reads the label arrays from disk);
   the table (one row per cell) and the scores are the only whole-slide objects in
   memory;
4. **write** — tiled, pyramidal OME-TIFF (or OME-Zarr) written from the Zarr arrays by
   :mod:`qdplex.io`, then the tables and ``summary.json``.

Peak memory is bounded by the tile size (and the number of tiles processed at once),
not by the slide size. :func:`run_wholeslide` is what
:func:`qdplex.pipeline.process_slide` calls for slides above
:data:`WHOLESLIDE_PIXELS` pixels (see :func:`needs_wholeslide`).
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import dask
import dask.array as da
import numpy as np

from .errors import QdplexError
from .model import Channel, MultiplexImage, Segmentation
from .panel import Panel

__all__ = [
    "run_wholeslide",
    "needs_wholeslide",
    "DiskSegmentation",
    "WholeSlideResult",
    "WHOLESLIDE_PIXELS",
    "DEFAULT_TILE",
]

#: Slides with more Y×X pixels than this go through :func:`run_wholeslide` (4096²).
WHOLESLIDE_PIXELS = 4096 * 4096
#: Default tile side (pixels) for unmixing, segmentation and quantification.
DEFAULT_TILE = 1024

Progress = Callable[[str, float], None]


@dataclass
class WholeSlideResult:
    """What :func:`run_wholeslide` computed and wrote for one slide."""

    table: object  # pandas.DataFrame
    summary: dict
    thresholds: dict
    paths: dict
    timings: dict = field(default_factory=dict)
    n_cells: int = 0
    shape: tuple = ()
    unmixing: dict = field(default_factory=dict)  # UnmixResult.record()


class DiskSegmentation(Segmentation):
    """A :class:`~qdplex.model.Segmentation` whose label images stay on disk (Zarr arrays).

    Label images are read by slices only (as :func:`qdplex.quantify.accumulate_block`
    does), so nothing of slide size is loaded. ``membrane`` is stored, not derived.

    Parameters
    ----------
    nuclei, cells, membrane : array-like
        Y×X uint32 label arrays supporting slicing (zarr, memmap, numpy).
    membrane_width_px : float
        Width of the membrane ring that ``membrane`` holds.
    """

    def __init__(self, nuclei, cells, membrane, membrane_width_px: float):
        shapes = {tuple(a.shape) for a in (nuclei, cells, membrane)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise QdplexError(f"expected three Y×X label arrays of one shape, found shapes {sorted(shapes)}")
        self.nuclei = nuclei
        self.cells = cells
        self.membrane_width_px = float(membrane_width_px)
        self.__dict__["membrane"] = membrane  # overrides the computed ring of the base class

    @property
    def cytoplasm(self):  # type: ignore[override]
        nuc = da.from_zarr(self.nuclei) if not isinstance(self.nuclei, da.Array) else self.nuclei
        cel = da.from_zarr(self.cells) if not isinstance(self.cells, da.Array) else self.cells
        return da.where(nuc > 0, 0, cel)

    @property
    def n_cells(self) -> int:
        cel = da.from_zarr(self.cells) if not isinstance(self.cells, da.Array) else self.cells
        return int(da.unique(cel[cel > 0]).size.compute()) if cel.size else 0


def needs_wholeslide(image: MultiplexImage, *, max_pixels: int = WHOLESLIDE_PIXELS) -> bool:
    """True when ``image`` has more Y×X pixels than ``max_pixels`` (use :func:`run_wholeslide`)."""
    _, h, w = image.shape
    return h * w > max_pixels


def run_wholeslide(
    image: MultiplexImage,
    panel: Panel,
    slide_dir,
    *,
    library=None,
    tile: int = DEFAULT_TILE,
    fmt: str = "tiff",
    workers: int | None = None,
    progress: Progress | None = None,
    provenance: dict | None = None,
) -> WholeSlideResult:
    """Unmix, segment, quantify, score and write one slide tile by tile.

    Parameters
    ----------
    image : MultiplexImage
        The raw slide (lazy dask data, e.g. from :func:`qdplex.io.read_image`).
    panel : Panel
    slide_dir : path
        The slide's output folder (``OUT/<slide>``); a hidden scratch folder is made
        inside it and removed at the end.
    library : SpectralLibrary, optional
        Default :func:`qdplex.spectra.library_for_panel`.
    tile : int
        Tile side in pixels (unmixing, quantification, chunking of the scratch arrays;
        segmentation uses 2 × ``tile`` plus its overlap). Memory grows with ``tile²``.
    fmt : {"tiff", "zarr"}
        Image outputs as tiled pyramidal OME-TIFF or OME-Zarr.
    workers : int, optional
        Tiles processed at once (default: dask's ``num_workers`` setting, else the CPU count).
    progress : callable, optional
        ``progress(stage, fraction)`` after ``unmix``, ``segment``, ``quantify``, ``score``.
    provenance : dict, optional
        Extra provenance for ``run.json`` (passed to :func:`qdplex.tables.write_tables`).

    Returns
    -------
    WholeSlideResult
    """
    from .pipeline import name_planes_by_marker, pixel_size_for, quantify_and_score, unmix_options
    from .segment import expand_nuclei, membrane_ring, segment_tiled
    from .spectra import library_for_panel
    from .unmix import unmix

    if fmt not in ("tiff", "zarr"):
        raise QdplexError(f"expected output format 'tiff' or 'zarr', found {fmt!r}")
    if not (isinstance(tile, (int, np.integer)) and tile >= 64):
        raise QdplexError(f"expected a tile size of at least 64 pixels, found {tile!r}")
    report = progress or (lambda stage, frac: None)
    # tiles at once: as asked, else as many threads as the surrounding dask config allows
    # (a batch worker sets num_workers to its share of the machine), else the CPU count
    nw = int(workers or dask.config.get("num_workers", None) or os.cpu_count() or 1)
    px = pixel_size_for(image, panel)
    slide_dir = Path(slide_dir)
    slide_dir.mkdir(parents=True, exist_ok=True)
    scratch = slide_dir / f".wholeslide-{uuid.uuid4().hex[:8]}"
    timings: dict[str, float] = {}
    C, H, W = image.shape
    try:
        store = _Scratch(scratch, (H, W), tile)
        with dask.config.set(scheduler="threads", num_workers=nw):
            # 1. unmix, tile by tile, into the scratch store --------------------------------
            t = time.perf_counter()
            lib = library if library is not None else library_for_panel(panel, image.channels)
            raw = image
            res = unmix(raw, lib, chunk=tile, **unmix_options(image, panel))
            res = name_planes_by_marker(res, panel)
            abund = res.abundances
            K = len(abund.channels)
            z_ab = store.array("abundances", (K, H, W), np.float32)  # one plane per chunk: cheap to write per channel
            targets = [(abund.data.astype(np.float32), z_ab)]
            if getattr(res, "residual", None) is not None:
                z_res = store.array("residual", (H, W), np.float32)
                targets.append((da.asarray(res.residual).astype(np.float32), z_res))
            if getattr(res, "saturated", None) is not None:
                z_sat = store.array("saturated", (H, W), np.uint8)
                targets.append((da.asarray(res.saturated).astype(np.uint8), z_sat))
            da.store([s.rechunk(z.chunks) for s, z in targets], [z for _, z in targets], lock=False)
            lazy = replace(
                res,
                abundances=replace(abund, data=da.from_zarr(z_ab)),
                **({"residual": da.from_zarr(store.get("residual"))} if store.has("residual") else {}),
                **({"saturated": da.from_zarr(store.get("saturated")).astype(bool)} if store.has("saturated") else {}),
            )
            timings["unmix"] = time.perf_counter() - t
            report("unmix", 0.25)

            # 2. segment: nuclei tile by tile with overlap, then cells and membranes ---------
            t = time.perf_counter()
            segopts = panel.segmentation
            nuclear = lazy.abundances.plane(panel.nuclear_stain)
            z_nuc = store.array("nuclei", (H, W), np.uint32)
            seg_tile = int(segopts.get("tile", 2 * tile))
            segment_tiled(
                nuclear, tile=seg_tile, overlap=segopts.get("overlap"),
                diameter_um=segopts.get("diameter_um"), pixel_size_um=px,
                method=segopts.get("method", "classical"), out=z_nuc, workers=nw,
            )
            expand_px = float(segopts.get("expand_um", 5.0)) / px
            width_px = max(float(segopts.get("membrane_width_um", 1.0)) / px, 1.0)
            nuc_da = da.from_zarr(z_nuc)
            depth = int(math.ceil(expand_px)) + 2
            if segopts.get("membrane_guided"):
                planes = [m.name for m in panel.markers if m.compartment == "membrane"]
            else:
                planes = []
            if planes:
                mem_img = lazy.abundances.select(planes).data.sum(axis=0)
                cells_da = da.map_overlap(
                    lambda n, m: expand_nuclei(n, expand_px, membrane=m), nuc_da, mem_img.rechunk(nuc_da.chunks),
                    depth=depth, boundary="none", dtype=np.uint32, trim=True,
                )
            else:
                cells_da = nuc_da.map_overlap(lambda n: expand_nuclei(n, expand_px), depth=depth,
                                              boundary="none", dtype=np.uint32, trim=True)
            z_cel = store.array("cells", (H, W), np.uint32)
            da.store(cells_da, z_cel, lock=False)
            ring_depth = int(math.ceil(width_px)) + 2
            mem_da = da.from_zarr(z_cel).map_overlap(lambda c: membrane_ring(c, width_px), depth=ring_depth,
                                                     boundary="none", dtype=np.uint32, trim=True)
            z_mem = store.array("membrane", (H, W), np.uint32)
            da.store(mem_da, z_mem, lock=False)
            seg = DiskSegmentation(z_nuc, z_cel, z_mem, width_px)
            timings["segment"] = time.perf_counter() - t
            report("segment", 0.5)

            # 3. quantify one tile at a time -------------------------------------------------
            table, thresholds, summary = quantify_and_score(lazy, seg, panel, px, timings=timings, progress=report)
            summary["warnings"] = list(res.warnings)

            # 4. write the outputs from the scratch arrays ----------------------------------
            t = time.perf_counter()
            paths = _write_images(slide_dir, lazy, z_nuc, z_cel, px, fmt)
            timings["write"] = time.perf_counter() - t
        from .pipeline import write_json
        from .tables import write_tables

        prov = dict(provenance or {})
        prov.setdefault("timings_s", timings)
        prov.setdefault("thresholds", thresholds)
        prov.setdefault("wholeslide", {"tile": tile, "workers": nw, "shape": [C, H, W]})
        paths.update(write_tables(table, slide_dir, panel, provenance=prov))
        paths["summary"] = slide_dir / "summary.json"
        write_json(paths["summary"], summary)
        report("score", 1.0)
        return WholeSlideResult(table, summary, thresholds, paths, timings, n_cells=len(table), shape=(C, H, W),
                                unmixing=res.record())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_images(slide_dir: Path, unmixed, z_nuc, z_cel, px: float, fmt: str) -> dict:
    """Write unmixed planes and label images from the scratch arrays (tile by tile, by qdplex.io)."""
    from . import io as qio

    img = unmixed.to_image()
    paths: dict[str, Path] = {}
    nuc = da.from_zarr(z_nuc)
    cel = da.from_zarr(z_cel)
    if fmt == "zarr":
        paths["unmixed"] = slide_dir / "unmixed.ome.zarr"
        qio.write_ome_zarr(paths["unmixed"], img.data.astype(np.float32), img.channels, pixel_size_um=px)
        paths["nuclei"] = slide_dir / "nuclei.ome.zarr"
        qio.write_ome_zarr(paths["nuclei"], nuc[None], [Channel("nuclei")], pixel_size_um=px)
        paths["cells"] = slide_dir / "cells.ome.zarr"
        qio.write_ome_zarr(paths["cells"], cel[None], [Channel("cells")], pixel_size_um=px)
    else:
        paths["unmixed"] = slide_dir / "unmixed.ome.tif"
        qio.write_ome_tiff(paths["unmixed"], img.data.astype(np.float32), img.channels, pixel_size_um=px)
        paths["nuclei"] = slide_dir / "nuclei.ome.tif"
        qio.write_labels(paths["nuclei"], nuc, pixel_size_um=px, name="nuclei")
        paths["cells"] = slide_dir / "cells.ome.tif"
        qio.write_labels(paths["cells"], cel, pixel_size_um=px, name="cells")
    return paths


class _Scratch:
    """Zarr arrays in a scratch folder, chunked by tile."""

    def __init__(self, root: Path, shape_yx, tile: int):
        import zarr

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=False)
        self.group = zarr.open_group(str(self.root), mode="w")
        self.shape_yx = tuple(shape_yx)
        self.tile = int(tile)

    def array(self, name: str, shape, dtype, chunks=None):
        if chunks is None:
            chunks = (self.tile, self.tile) if len(shape) == 2 else (1, self.tile, self.tile)
        chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
        return self.group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0,
                                       compressors=None, overwrite=True)

    def has(self, name: str) -> bool:
        return name in self.group

    def get(self, name: str):
        return self.group[name]
