"""The output folder: the names of ``OUT/<slide>/``, the slide writer, ``run.json`` and the manifest.

This module is the one owner of the output layout (docs/architecture.md). The batch
(:mod:`qdplex.batch`), the QC reports (:mod:`qdplex.report`) and the napari reader
find files through it::

    paths = write_slide(result, "OUT/s1", fmt="tiff")      # images, tables, summary.json
    # or: the images written while quantify and score run
    with ImageWriter("OUT/s1") as images:
        result = run_slide(image, panel, on_segmented=images.start)
        paths = write_slide(result, "OUT/s1", images=images)
    write_run_record("OUT/s1", slide_record(result, inputs=[path]))
    rec = read_run_record("OUT/s1")
    panel = panel_from_record(rec)                          # the inverse of Panel.to_dict

``run.json`` has one shape for every slide and storage: ``qdplex_version``,
``versions``, ``created``, ``host``, ``panel``, ``panel_sha256``, ``library_sha256``,
``inputs``, ``parameters``, ``timings`` (stage → seconds), ``thresholds``,
``stages`` (one record per stage, e.g. ``stages["unmixing"]``), ``warnings`` and,
once the batch has moved the folder into place, ``batch`` (the completion record:
the identity of the run and the SHA-256 of every output file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .errors import InputError, OutputError, QdplexError

__all__ = [
    # names of the output folder
    "FORMATS", "IMAGE_KINDS", "RUN_JSON", "SUMMARY_JSON", "MANIFEST", "COHORT_SUMMARY", "STAGING", "LOCK",
    "RESERVED_NAMES", "RECORD_KEY", "MANIFEST_COLUMNS",
    "check_format", "image_format", "RUN_FORMATS", "image_path", "find_image", "table_path", "report_path", "bad_slide_name", "slide_dir_in",
    # the slide writer and run.json
    "write_slide", "write_images", "ImageWriter", "slide_record", "write_run_record", "read_run_record", "panel_from_record",
    "write_json", "read_json",
    # the batch's completion record and manifest
    "seal", "completion_record", "register_outputs", "write_manifest", "manifest_for_csv", "read_manifest",
]

#: Image output formats (``qdplex run --format``) and the suffix of their files.
FORMATS = {"tiff": ".ome.tif", "zarr": ".ome.zarr"}
#: The slide's images, by kind (``<kind><suffix>``).
IMAGE_KINDS = ("unmixed", "nuclei", "cells")
RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"
TABLE_FORMATS = ("csv", "parquet", "h5ad")
QC_DIR = "qc"
REPORT_NAME = "report.html"
# batch files in OUT
MANIFEST = "manifest.csv"
COHORT_SUMMARY = "cohort_summary.csv"
LOG = "qdplex.log"
#: Folder in OUT where slides are computed before being moved into place.
STAGING = ".qdplex-staging"
#: Lock file in OUT held by the running batch.
LOCK = ".qdplex.lock"
#: Names in OUT that belong to the batch itself (never slide names, never replaced by a slide).
RESERVED_NAMES = (STAGING, LOCK, MANIFEST, COHORT_SUMMARY, REPORT_NAME, RUN_JSON, LOG)
#: Key of the completion record the batch adds to ``<slide>/run.json``.
RECORD_KEY = "batch"
#: Columns of ``OUT/manifest.csv``, in order.
MANIFEST_COLUMNS = [
    "slide", "input", "status", "error", "seconds", "input_sha256", "outputs",
    "action", "panel_sha256", "qdplex_version", "worker", "finished", "warnings",
]


# --------------------------------------------------------------------------- names
#: Output formats of ``qdplex run --format``: the two image formats, and ``spatialdata``
#: (images as OME-Zarr plus ``spatialdata.zarr``, one SpatialData store per slide).
RUN_FORMATS = (*FORMATS, "spatialdata")


def check_format(fmt: str, *, allowed=None) -> str:
    """``fmt`` when it is an output format, else :class:`~qdplex.errors.QdplexError`."""
    allowed = tuple(FORMATS) if allowed is None else tuple(allowed)
    if fmt not in allowed:
        raise QdplexError(f"expected output format {' or '.join(repr(a) for a in allowed)}, found {fmt!r}")
    return fmt


def image_format(fmt: str) -> str:
    """The image format that run format ``fmt`` writes (``spatialdata`` → ``zarr``)."""
    return "zarr" if check_format(fmt, allowed=RUN_FORMATS) == "spatialdata" else fmt


def image_path(slide_dir, kind: str, fmt: str = "tiff") -> Path:
    """``slide_dir/<kind>.ome.tif`` (or ``.ome.zarr``) for ``kind`` in :data:`IMAGE_KINDS`."""
    if kind not in IMAGE_KINDS:
        raise QdplexError(f"expected an image kind in {IMAGE_KINDS}, found {kind!r}")
    return Path(slide_dir) / f"{kind}{FORMATS[check_format(fmt)]}"


def find_image(slide_dir, kind: str) -> Path | None:
    """The slide's ``kind`` image in whichever format it was written, or None."""
    for fmt in FORMATS:
        p = image_path(slide_dir, kind, fmt)
        if p.exists():
            return p
    return None


def table_path(slide_dir, fmt: str = "csv") -> Path:
    return Path(slide_dir) / f"cells.{fmt}"


def report_path(slide_dir) -> Path:
    """``slide_dir/qc/report.html``."""
    return Path(slide_dir) / QC_DIR / REPORT_NAME


def bad_slide_name(name: str) -> str:
    """Why ``name`` cannot be a folder in OUT ("" when it can): not a plain file name
    (:func:`qdplex.io.checks.plain_name_problem`), or a name of the batch's own files."""
    from .io.checks import plain_name_problem

    name = str(name)
    problem = plain_name_problem(name)
    if problem:
        return problem
    if name in RESERVED_NAMES:
        return "a name qdplex uses for its own files"
    return ""


def slide_dir_in(out, slide) -> Path:
    """``OUT/<slide>``, refusing a slide name that would lead outside OUT (``..``, ``a/b``, links).

    Raises
    ------
    OutputError
        When ``slide`` is not a plain folder name, or ``OUT/<slide>`` is a link leaving OUT.
    """
    out = Path(out)
    why = bad_slide_name(slide)
    if why:
        raise OutputError(f"expected a slide name that is a folder directly in OUT, found {str(slide)!r} ({why})",
                          path=out)
    d = out / str(slide)
    if d.is_symlink() or (d.exists() and d.resolve().parent != out.resolve()):
        raise OutputError(f"expected a slide folder directly in {out}, found a link to {d.resolve()}", path=d)
    return d


# --------------------------------------------------------------------------- json
def to_jsonable(obj):
    from .provenance import to_jsonable as _tj

    return _tj(obj)


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically (numpy values, paths and NaN made JSON)."""
    from .io import atomic_path

    path = Path(path)
    text = json.dumps(to_jsonable(obj), indent=2)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


def read_json(path) -> dict:
    """A JSON object from ``path``; :class:`~qdplex.errors.InputError` when missing or not JSON."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("expected a JSON file, found no such file", path=path) from None
    except (OSError, ValueError) as e:
        raise InputError(f"expected a JSON object, found unreadable text ({type(e).__name__})", path=path) from None
    if not isinstance(doc, dict):
        raise InputError(f"expected a JSON object, found {type(doc).__name__}", path=path)
    return doc


# --------------------------------------------------------------------------- the slide writer
def _slide_folder(slide_dir) -> Path:
    slide_dir = Path(slide_dir)
    try:
        slide_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"expected a writable slide folder, found {type(e).__name__}: {e.strerror or e}",
                          path=slide_dir) from None
    return slide_dir


def write_images(unmixed, segmentation, slide_dir, *, fmt: str = "tiff", pixel_size_um=None,
                 tile: int | None = None) -> dict[str, Path]:
    """Write a slide's images: the unmixed planes (and residual) through the image writer,
    nuclei and cells through the label writer (nearest-neighbour pyramid levels, cell IDs
    kept), read tile by tile from memory or scratch storage.

    Returns ``unmixed``, ``nuclei``, ``cells`` → the written paths.
    """
    import dask.array as da

    from . import io as qio

    check_format(fmt)
    slide_dir = _slide_folder(slide_dir)
    img = unmixed.to_image()
    seg = segmentation
    chunks = (int(tile),) * 2 if tile else getattr(seg.nuclei, "chunks", "auto")
    nuclei = da.from_array(seg.nuclei, chunks=chunks) if not isinstance(seg.nuclei, np.ndarray) else seg.nuclei
    cells = da.from_array(seg.cells, chunks=chunks) if not isinstance(seg.cells, np.ndarray) else seg.cells
    paths: dict[str, Path] = {k: image_path(slide_dir, k, fmt) for k in IMAGE_KINDS}
    data = img.data.astype(np.float32)
    px = pixel_size_um
    if fmt == "zarr":
        qio.write_ome_zarr(paths["unmixed"], data, img.channels, pixel_size_um=px)
        qio.write_labels_zarr(paths["nuclei"], nuclei, pixel_size_um=px, name="nuclei")
        qio.write_labels_zarr(paths["cells"], cells, pixel_size_um=px, name="cells")
    else:
        qio.write_ome_tiff(paths["unmixed"], data, img.channels, pixel_size_um=px)
        qio.write_labels(paths["nuclei"], nuclei, pixel_size_um=px, name="nuclei")
        qio.write_labels(paths["cells"], cells, pixel_size_um=px, name="cells")
    return paths


#: dask schedulers in this process: early image writing runs its own tasks on them
_LOCAL_SCHEDULERS = (None, "threads", "threading", "sync", "synchronous", "single-threaded")


class ImageWriter:
    """A slide's images written in a background thread while the last stages run.

    Give it to :func:`qdplex.slide.run_slide` as ``on_segmented=writer.start``: once the
    unmixed planes and the labels are stored (their final content), :func:`write_images`
    writes them from storage in a thread while quantification and scoring compute;
    :func:`write_slide` then only waits for it. Images are written where they would be
    anyway, by the same writer; only when. Not started (then :func:`write_slide` writes
    them itself) when the stages run on a distributed scheduler: the thread would send its
    tasks there. Use as a context manager (or call :meth:`close`): no thread outlives it.
    """

    def __init__(self, slide_dir, fmt: str = "tiff"):
        self.slide_dir, self.fmt = Path(slide_dir), check_format(fmt)
        self._pool = self._future = None

    def start(self, unmixed, segmentation, *, pixel_size_um=None, tile=None) -> bool:
        """Start writing (once); False when not started here (a distributed scheduler)."""
        import dask

        if self._future is not None:
            return True
        if dask.config.get("scheduler", None) not in _LOCAL_SCHEDULERS:
            return False
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="qdplex-images")
        self._future = self._pool.submit(write_images, unmixed, segmentation, self.slide_dir, fmt=self.fmt,
                                         pixel_size_um=pixel_size_um, tile=tile)
        return True

    @property
    def started(self) -> bool:
        return self._future is not None

    def result(self) -> dict[str, Path]:
        """The written paths (the writer's error, if it failed)."""
        return self._future.result()

    def close(self) -> None:
        """Wait for the thread (a failed write's error is the caller's to fetch with :meth:`result`)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_slide(result, slide_dir, *, fmt: str = "tiff", images: ImageWriter | None = None) -> dict[str, Path]:
    """Write a :class:`qdplex.slide.SlideResult`'s images, tables and ``summary.json``.

    The same writer for every storage: the images through :func:`write_images` (here,
    or already started by ``images``, an :class:`ImageWriter` given to the stages), the
    tables through :func:`qdplex.tables.write_tables`. ``run.json`` is written
    separately (:func:`write_run_record`), last.

    Parameters
    ----------
    result : qdplex.slide.SlideResult
    slide_dir : path
        ``OUT/<slide>`` (made when missing).
    fmt : {"tiff", "zarr"}
        Tiled pyramidal OME-TIFF or multiscale OME-Zarr.
    images : ImageWriter, optional
        The images' writer when it was started during the stages (same ``slide_dir`` and
        ``fmt``); waited for here.

    Returns
    -------
    dict
        ``unmixed``, ``nuclei``, ``cells``, ``cells_csv``, ``cells_parquet``,
        ``cells_h5ad``, ``summary`` → the written paths.
    """
    from .tables import write_tables

    check_format(fmt)
    slide_dir = _slide_folder(slide_dir)
    prov = {"thresholds": result.thresholds, "stages": result.records, "warnings": list(result.warnings)}
    if images is not None and images.started:
        paths = {}
        try:
            paths.update(write_tables(result.table, slide_dir, result.panel, provenance=prov))
        finally:
            images.close()  # never return (or raise) while the images are still being written
        paths = {**images.result(), **paths}
    else:
        paths = write_images(result.unmixed, result.segmentation, slide_dir, fmt=fmt,
                             pixel_size_um=result.pixel_size_um, tile=result.tile)
        paths.update(write_tables(result.table, slide_dir, result.panel, provenance=prov))
    paths["summary"] = write_json(slide_dir / SUMMARY_JSON, {**result.summary, "warnings": list(result.warnings)})
    return paths


# --------------------------------------------------------------------------- run.json
def slide_record(result, *, inputs=(), input_hashes: Mapping[str, str] | None = None,
                 parameters: Mapping[str, Any] | None = None) -> dict:
    """The ``run.json`` of one slide (same keys for every storage).

    Parameters
    ----------
    result : qdplex.slide.SlideResult
    inputs : sequence of path
        The slide's input file(s), hashed (or taken from ``input_hashes``).
    parameters : mapping, optional
        Run options (format, reports, storage, tile ...).
    """
    from .provenance import run_record

    params = {"storage": result.storage, "tile": result.tile, "shape": list(result.shape), **dict(parameters or {})}
    rec = run_record(panel=result.panel, inputs=inputs, parameters=params, timings=result.timings,
                     library=result.library, input_hashes=input_hashes)
    rec["thresholds"] = to_jsonable(result.thresholds)
    rec["stages"] = to_jsonable(result.records)
    rec["warnings"] = list(result.warnings)
    return rec


def write_run_record(slide_dir, record: Mapping[str, Any]) -> Path:
    """Write ``slide_dir/run.json`` atomically."""
    return write_json(Path(slide_dir) / RUN_JSON, dict(record))


def read_run_record(slide_dir) -> dict:
    """``slide_dir/run.json`` as a dict (:class:`~qdplex.errors.InputError` when missing or unreadable)."""
    return read_json(Path(slide_dir) / RUN_JSON)


def panel_from_record(record: Mapping[str, Any], *, where=None):
    """The :class:`~qdplex.panel.Panel` recorded in a ``run.json`` (the inverse of ``Panel.to_dict``).

    Every key of ``Panel.to_dict`` is read back: markers (with thresholds), nuclear stain,
    spectra files and the unstained control (relative to the panel's folder when it was
    read from a file), autofluorescence components, ``[image]`` pixel size and camera
    offset, and the per-stage tables.

    Raises
    ------
    InputError
        When the record holds no panel; :class:`~qdplex.errors.PanelError` when it does
        not validate (e.g. a spectra file named by it is gone).
    """
    from .panel import Panel

    d = record.get("panel") if isinstance(record, Mapping) else None
    if not isinstance(d, Mapping) or not d:
        raise InputError("expected a 'panel' entry in run.json, found none", path=where)
    return Panel.from_record(dict(d))


# --------------------------------------------------------------------------- completion record
def output_hashes(slide_dir) -> dict[str, str]:
    """SHA-256 of every file in ``slide_dir`` except ``run.json`` (relative POSIX path → hex)."""
    from .provenance import file_sha256

    slide_dir = Path(slide_dir)
    files = sorted(p for p in slide_dir.rglob("*") if p.is_file() and p.relative_to(slide_dir).as_posix() != RUN_JSON)
    return {p.relative_to(slide_dir).as_posix(): file_sha256(p) for p in files}


def seal(slide_dir, completion: Mapping[str, Any]) -> list[str]:
    """Add the batch's completion record (with every output's SHA-256) to ``slide_dir/run.json``.

    Returns the slide's files (relative paths), ``run.json`` last.
    """
    slide_dir = Path(slide_dir)
    hashes = output_hashes(slide_dir)
    try:
        doc = read_run_record(slide_dir)
    except InputError:
        doc = {}
    doc[RECORD_KEY] = to_jsonable({**dict(completion), "complete": True, "slide": slide_dir.name, "outputs": hashes})
    write_run_record(slide_dir, doc)
    return sorted(hashes) + [RUN_JSON]


def completion_record(slide_dir) -> dict | None:
    """The batch's completion record of ``slide_dir`` when every output still has its recorded
    content (SHA-256), else None."""
    slide_dir = Path(slide_dir)
    try:
        doc = read_run_record(slide_dir)
    except InputError:
        return None
    rec = doc.get(RECORD_KEY)
    if not isinstance(rec, dict) or not rec.get("complete") or not isinstance(rec.get("outputs"), dict):
        return None
    from .provenance import file_sha256

    for f, digest in rec["outputs"].items():
        p = slide_dir / f
        try:
            if not p.is_file() or file_sha256(p) != digest:
                return None
        except QdplexError:
            return None
    rec = dict(rec)
    rec["slide"] = slide_dir.name
    return rec


def register_outputs(slide_dir, written) -> bool:
    """Keep the completion record true after qdplex writes into a finished slide folder.

    Each path in ``written`` (a file, or a folder such as ``spatialdata.zarr``) inside
    ``slide_dir`` gets its files' SHA-256 in the record, replacing what an earlier write
    of the same path recorded: a rebuilt QC report, an export. ``qdplex run`` replaces a
    folder (``--force``) only when the record lists every file in it, so this keeps
    that true. Paths outside the folder and folders without a record are left alone.

    Returns
    -------
    bool
        Whether the record was updated.
    """
    from .provenance import file_sha256

    slide_dir = Path(slide_dir).resolve()
    try:
        doc = read_run_record(slide_dir)
    except InputError:
        return False
    rec = doc.get(RECORD_KEY)
    if not isinstance(rec, dict) or not isinstance(rec.get("outputs"), dict):
        return False
    added, replaced = {}, []
    for w in (Path(p).resolve() for p in written):
        if not w.is_relative_to(slide_dir):
            continue
        replaced.append(w.relative_to(slide_dir).as_posix())
        for f in ([w] if w.is_file() else sorted(p for p in w.rglob("*") if p.is_file())):
            added[f.relative_to(slide_dir).as_posix()] = file_sha256(f)
    if not added:
        return False
    for k in [k for k in rec["outputs"] if any(k == r or k.startswith(r + "/") for r in replaced)]:
        del rec["outputs"][k]
    rec["outputs"].update(added)
    write_run_record(slide_dir, doc)
    return True


# --------------------------------------------------------------------------- manifest
def write_manifest(out, rows) -> pd.DataFrame:
    """Write ``OUT/manifest.csv`` (atomically) from row dicts; returns the manifest.

    Hash columns are written as ``sha256:<hex>``: a bare hex digest such as
    ``86e24171…`` looks like a float with a huge exponent to CSV readers. ``warnings``
    joins a slide's warnings with `` | ``.
    """
    from .io import atomic_path

    df = pd.DataFrame(list(rows), columns=MANIFEST_COLUMNS)
    with atomic_path(Path(out) / MANIFEST) as tmp:
        manifest_for_csv(df).to_csv(tmp, index=False)
    return df


def manifest_for_csv(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for col in ("input_sha256", "panel_sha256"):
        vals = out[col].astype("object")
        mask = vals.notna() & (vals.astype(str) != "")
        out[col] = vals.where(~mask, "sha256:" + vals[mask].astype(str))
    if "warnings" in out.columns:
        out["warnings"] = [" | ".join(w) if isinstance(w, (list, tuple)) else ("" if w is None else w)
                           for w in out["warnings"]]
    return out


def read_manifest(out) -> pd.DataFrame:
    """``OUT/manifest.csv`` (slide names as text); :class:`~qdplex.errors.InputError` when absent."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise InputError("expected a qdplex output folder holding manifest.csv, found no manifest.csv", path=out)
    return pd.read_csv(path, dtype={"slide": str, "warnings": str})
