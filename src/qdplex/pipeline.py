"""One slide end to end: unmix → segment → quantify → score → write.

:func:`run_slide` works in memory on a :class:`~qdplex.model.MultiplexImage`;
:func:`process_slide` reads a slide from disk and writes its output folder
(the layout in docs/architecture.md); :func:`run` runs many slides through
:func:`qdplex.batch.run_batch`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .errors import InputError, QdplexError
from .model import Channel, MultiplexImage, Segmentation
from .panel import Panel

__all__ = ["SlideResult", "run_slide", "process_slide", "write_slide_outputs", "run", "name_planes_by_marker",
           "unmix_options", "quantify_and_score", "write_json", "pixel_size_for"]

Progress = Callable[[str, float], None]


@dataclass
class SlideResult:
    """Everything :func:`run_slide` computed for one slide."""

    image: MultiplexImage
    panel: Panel
    library: object
    unmixed: object  # qdplex.unmix.UnmixResult, planes named by marker
    segmentation: Segmentation
    table: pd.DataFrame
    summary: dict
    thresholds: dict
    timings: dict = field(default_factory=dict)


def name_planes_by_marker(unmixed, panel: Panel):
    """Rename the unmixed planes from fluor to marker name (fluor kept in ``Channel.fluor``)."""
    mapping = panel.fluor_to_marker()
    chans = [
        Channel(mapping.get(c.name, c.name), c.emission_nm, c.bandwidth_nm, c.fluor or c.name)
        for c in unmixed.abundances.channels
    ]
    return replace(unmixed, abundances=replace(unmixed.abundances, channels=chans))


def pixel_size_for(image: MultiplexImage, panel: Panel) -> float:
    """Pixel size in µm: the file's, else the panel's ``[image] pixel_size_um``; InputError if neither."""
    px = image.pixel_size_um or panel.pixel_size_um
    if not px:
        raise InputError(
            "expected a pixel size (OME PhysicalSizeX in the file, or [image] pixel_size_um in the panel), found none",
            path=image.source or image.name,
        )
    return float(px)


def run_slide(image: MultiplexImage, panel: Panel, *, library=None, progress: Progress | None = None) -> SlideResult:
    """Unmix, segment, quantify and score one slide in memory.

    Parameters
    ----------
    image : MultiplexImage
        The raw λ-stack or filter-channel image.
    panel : Panel
        Markers, fluors, compartments and per-stage settings.
    library : SpectralLibrary, optional
        Reference spectra; by default :func:`qdplex.spectra.library_for_panel`.
    progress : callable, optional
        Called as ``progress(stage, fraction_done)`` after each stage.

    Returns
    -------
    SlideResult
    """
    from .segment import segment
    from .spectra import library_for_panel
    from .unmix import unmix

    report = progress or (lambda stage, frac: None)
    timings: dict[str, float] = {}
    px = pixel_size_for(image, panel)

    t = time.perf_counter()
    lib = library if library is not None else library_for_panel(panel, image.channels)
    unmixed = name_planes_by_marker(unmix(image, lib, **unmix_options(image, panel)), panel)
    # in memory: unmix once; segmentation, quantification and writing all read the planes
    unmixed = unmixed.persist()
    timings["unmix"] = time.perf_counter() - t
    report("unmix", 0.25)

    t = time.perf_counter()
    segopts = panel.segmentation
    nuclear = np.asarray(unmixed.abundances.plane(panel.nuclear_stain).compute())
    membrane = None
    if segopts.get("membrane_guided"):
        planes = [m.name for m in panel.markers if m.compartment == "membrane"]
        if planes:
            membrane = np.asarray(unmixed.abundances.select(planes).data.sum(axis=0).compute())
    seg = segment(
        nuclear,
        pixel_size_um=px,
        diameter_um=segopts.get("diameter_um"),
        expand_um=segopts.get("expand_um", 5.0),
        membrane_width_um=segopts.get("membrane_width_um", 1.0),
        membrane_image=membrane,
        method=segopts.get("method", "classical"),
    )
    timings["segment"] = time.perf_counter() - t
    report("segment", 0.5)

    table, thresholds, summary = quantify_and_score(
        unmixed, seg, panel, px, timings=timings, progress=report, measured_completeness=True)
    summary["warnings"] = list(unmixed.warnings)
    return SlideResult(image, panel, lib, unmixed, seg, table, summary, thresholds, timings)


def unmix_options(image: MultiplexImage, panel: Panel) -> dict:
    """Keyword options for :func:`qdplex.unmix.unmix` from the panel's ``[unmixing]`` table.

    The camera offset is :meth:`qdplex.panel.Panel.camera_offset_for` the image.
    """
    opts = panel.unmixing
    return {
        "method": opts.get("method", "nnls"),
        "offset": "auto" if panel.camera_offset_for(None) is None else panel.camera_offset_for(None),
        "refine": opts.get("refine", True),
        "saturation": opts.get("saturation"),
        "exclude_saturated": opts.get("exclude_saturated", False),
    }


def quantify_and_score(unmixed, seg: Segmentation, panel: Panel, pixel_size_um: float, *,
                       timings: dict | None = None, progress: Progress | None = None,
                       measured_completeness: bool = False):
    """Per-cell table (MCQuant order), positivity thresholds and slide summary.

    Parameters
    ----------
    unmixed : UnmixResult or MultiplexImage
        Abundance planes named by marker (see :func:`name_planes_by_marker`).
    seg : Segmentation
    panel : Panel
    pixel_size_um : float
    timings : dict, optional
        Receives ``quantify`` and ``score`` seconds.
    progress : callable, optional
        ``progress(stage, fraction)``.
    measured_completeness : bool
        Measure HER2 membrane completeness on the membrane ring's pixels (needs the
        whole marker plane; the tiled whole-slide path uses the score's estimate).

    Returns
    -------
    (table, thresholds, summary)
    """
    from .quantify import fraction_above, quantify
    from .score import score_table
    from .tables import cell_table

    timings = {} if timings is None else timings
    report = progress or (lambda stage, frac: None)
    t = time.perf_counter()
    q = panel.quantification
    quant = quantify(
        unmixed,
        seg,
        panel,
        stats=tuple(q.get("stats", ("mean", "std", "sum"))),
        quantiles=tuple(q.get("quantiles", ())),
        pixel_size_um=pixel_size_um,
    )
    table = cell_table(quant, panel)
    timings["quantify"] = time.perf_counter() - t
    report("quantify", 0.75)

    t = time.perf_counter()
    completeness = None
    if measured_completeness:
        ids = table["CellID"].to_numpy()
        planes = unmixed.abundances if hasattr(unmixed, "abundances") else unmixed

        def completeness(marker, threshold):
            # HER2 membrane completeness measured on the membrane ring's pixels
            return fraction_above(planes.plane(marker), seg.membrane, threshold, ids=ids)

    table, thresholds, summary = score_table(table, panel, completeness=completeness)
    timings["score"] = time.perf_counter() - t
    report("score", 1.0)
    return table, thresholds, summary


def write_slide_outputs(result: SlideResult, slide_dir, *, fmt: str = "tiff", provenance: dict | None = None) -> dict:
    """Write one slide's images, tables and summary.json into ``slide_dir`` (run.json is
    :func:`process_slide`'s).

    Every file is written atomically. Returns a dict of the written paths.
    """
    from . import io as qio
    from .tables import write_tables

    slide_dir = Path(slide_dir)
    slide_dir.mkdir(parents=True, exist_ok=True)
    px = result.image.pixel_size_um or result.panel.pixel_size_um
    unmixed_img = result.unmixed.to_image()
    seg = result.segmentation
    paths: dict[str, Path] = {}
    if fmt == "zarr":
        paths["unmixed"] = slide_dir / "unmixed.ome.zarr"
        qio.write_ome_zarr(paths["unmixed"], unmixed_img.data, unmixed_img.channels, pixel_size_um=px)
        paths["nuclei"] = slide_dir / "nuclei.ome.zarr"
        qio.write_labels_zarr(paths["nuclei"], seg.nuclei, pixel_size_um=px, name="nuclei")
        paths["cells"] = slide_dir / "cells.ome.zarr"
        qio.write_labels_zarr(paths["cells"], seg.cells, pixel_size_um=px, name="cells")
    elif fmt == "tiff":
        paths["unmixed"] = slide_dir / "unmixed.ome.tif"
        qio.write_ome_tiff(paths["unmixed"], unmixed_img.data.astype(np.float32), unmixed_img.channels, pixel_size_um=px)
        paths["nuclei"] = slide_dir / "nuclei.ome.tif"
        qio.write_labels(paths["nuclei"], seg.nuclei, pixel_size_um=px, name="nuclei")
        paths["cells"] = slide_dir / "cells.ome.tif"
        qio.write_labels(paths["cells"], seg.cells, pixel_size_um=px, name="cells")
    else:
        raise QdplexError(f"expected output format 'tiff' or 'zarr', found {fmt!r}")
    prov = dict(provenance or {})
    prov.setdefault("timings_s", result.timings)
    prov.setdefault("thresholds", result.thresholds)
    paths.update(write_tables(result.table, slide_dir, result.panel, provenance=prov))
    paths["summary"] = slide_dir / "summary.json"
    write_json(paths["summary"], result.summary)
    return paths


def write_json(path: Path, obj) -> None:
    from .io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=_json_default), encoding="utf-8")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def process_slide(path, panel, out_dir, *, fmt: str = "tiff", report: bool = True,
                  progress: Progress | None = None, tile: int | None = None) -> dict:
    """Read one slide, run it, and write ``out_dir/<slide>/`` (layout in docs/architecture.md).

    Slides larger than :data:`qdplex.wholeslide.WHOLESLIDE_PIXELS` go through
    :func:`qdplex.wholeslide.run_wholeslide` (tile by tile, bounded memory);
    smaller ones through :func:`run_slide` in memory.

    Parameters
    ----------
    path : path
        Slide file or folder (anything :func:`qdplex.io.read_image` reads).
    panel : Panel or path
    out_dir : path
        The batch output folder; the slide's folder is ``out_dir/<slide name>``.
    fmt : {"tiff", "zarr"}
        Image output format.
    report : bool
        Also write the QC report ``<slide>/qc/report.html``.
    progress : callable, optional
        ``progress(stage, fraction)``.
    tile : int, optional
        Force tiled whole-slide processing with this tile size.

    Returns
    -------
    dict
        One manifest row: ``slide``, ``input``, ``status`` ("ok"), ``error`` (""),
        ``seconds``, ``outputs`` (name → path), ``timings``.

    Raises
    ------
    QdplexError
        On unreadable input or any stage's bad-input error (a batch records it).
    """
    from . import provenance as prov
    from .io import read_image
    from .panel import read_panel
    from .wholeslide import needs_wholeslide, run_wholeslide

    t0 = time.perf_counter()
    if not isinstance(panel, Panel):
        panel = read_panel(panel)
    path = Path(path)
    image = read_image(path)
    slide_dir = Path(out_dir) / image.name
    params = {"fmt": fmt, "report": report, "tile": tile}
    if tile is not None or needs_wholeslide(image):
        params["mode"] = "wholeslide"
        ws = run_wholeslide(image, panel, slide_dir, fmt=fmt, progress=progress, tile=tile or 1024)
        timings, paths = ws.timings, dict(ws.paths)
        record = prov.run_record(panel=panel, inputs=[path], parameters=params, timings=timings)
        record["thresholds"] = ws.thresholds
        record["unmixing"] = ws.unmixing
    else:
        params["mode"] = "in-memory"
        result = run_slide(image, panel, progress=progress)
        t = time.perf_counter()
        record = prov.run_record(panel=panel, inputs=[path], parameters=params, timings=result.timings,
                                 library=result.library)
        record["thresholds"] = result.thresholds
        record["unmixing"] = result.unmixed.record()
        paths = write_slide_outputs(result, slide_dir, fmt=fmt, provenance=record)
        result.timings["write"] = time.perf_counter() - t
        if report:
            from .report import write_slide_report

            t = time.perf_counter()
            paths["report"] = write_slide_report(result, slide_dir)
            result.timings["report"] = time.perf_counter() - t
        timings = result.timings
        record["timings"] = {k: round(float(v), 4) for k, v in timings.items()}
    paths["run"] = slide_dir / "run.json"
    write_json(paths["run"], record)
    if report and params["mode"] == "wholeslide":
        from .report import slide_report_from_outputs

        paths["report"] = slide_report_from_outputs(slide_dir)  # reads the tiled outputs' pyramids
    return {
        "slide": image.name,
        "input": str(path),
        "status": "ok",
        "error": "",
        "seconds": round(time.perf_counter() - t0, 3),
        "outputs": {k: str(v) for k, v in paths.items()},
        "timings": timings,
    }


def run(inputs, panel, out, **options):
    """Run many slides (see :func:`qdplex.batch.run_batch` for ``options``); returns the manifest."""
    from .batch import run_batch

    return run_batch(inputs, panel, out, **options)
