"""Many slides on dask.distributed: one task per slide, a manifest, resume, nothing lost.

:func:`run_batch` is what ``qdplex run`` calls; :func:`process_slide` is one slide of it
(read → :func:`qdplex.slide.run_slide` → :func:`qdplex.outputs.write_slide` → QC report
→ ``run.json``)::

    manifest = run_batch(["slides/"], panel, "out/")                 # local cluster
    manifest = run_batch(["slides/"], panel, "out/", scheduler="tcp://head:8786")

How nothing is lost
-------------------
* Every slide is one independent task. A slide that fails — corrupt or truncated
  file, wrong channel count, missing metadata, a full disk, a worker that dies —
  becomes a ``failed`` row of ``OUT/manifest.csv`` with its error, and the batch goes on.
* A slide too large for memory (``storage="disk"``, chosen by size) runs its tiles as
  dask tasks on the scheduler in use, so one giant slide spreads over the cluster.
* A slide is computed into ``OUT/.qdplex-staging/`` and its folder is renamed to
  ``OUT/<slide>/`` only once every file is written and ``run.json`` holds the
  completion record: the slide's identity (:func:`qdplex.provenance.slide_identity`:
  input, channel sidecars, panel and the files it names, output options, qdplex
  version) and the SHA-256 of every output file. An interrupted run (even
  ``kill -9``) therefore never leaves an ``OUT/<slide>/`` that looks complete and is not.
* Rerunning resumes: a slide whose identity is unchanged and whose files all still
  have their recorded content is skipped (``action = "skipped"``); ``force=True``
  recomputes it.
* qdplex never writes into input folders nor replaces what it did not write (see
  :func:`check_output_location`).
* SIGTERM (like Ctrl-C) stops the batch cleanly: the lock and the staging folder are
  removed and the manifest lists what completed (the rest as ``interrupted``).
* ``OUT/manifest.csv`` is rewritten (atomically) after every slide, ``OUT/run.json``
  holds the batch's provenance and ``OUT/qdplex.log`` every event.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from .errors import OutputError, QdplexError
from .outputs import LOCK, MANIFEST_COLUMNS, RECORD_KEY, RESERVED_NAMES, STAGING
from .outputs import bad_slide_name as _bad_slide_name
from .progress import BatchProgress

__all__ = ["run_batch", "process_slide", "check_output_location"]

_LOCAL = (None, "local")
_SYNC = ("synchronous", "sync", "single-threaded")


# --------------------------------------------------------------------------- public
def run_batch(
    inputs,
    panel,
    out,
    *,
    scheduler=None,
    workers: int | None = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    force: bool = False,
    quiet: bool = False,
    fmt: str = "tiff",
    report: bool = True,
    storage: str = "auto",
    tile: int | None = None,
    geojson: bool = False,
    stream=None,
) -> pd.DataFrame:
    """Run the pipeline on every slide found in ``inputs``, one dask task per slide.

    Parameters
    ----------
    inputs : path or sequence of paths
        Slide files and folders (searched recursively by :func:`qdplex.io.find_slides`).
    panel : qdplex.panel.Panel or path
        The panel (a path is read with :func:`qdplex.panel.read_panel`).
    out : path
        Output folder; refused when inside an input folder.
    scheduler : None, str or distributed.Client, optional
        None or ``"local"``: a local cluster sized to the machine (one process per
        worker, one thread each). ``"tcp://HOST:PORT"`` (or ``HOST:PORT``): an existing
        dask scheduler (dask-jobqueue, Kubernetes, ``dask scheduler``); OUT must be on
        a filesystem the workers share. A :class:`distributed.Client`: use it as is.
        ``"synchronous"``: in this process, one slide after another (no dask.distributed).
    workers : int, optional
        Number of local worker processes (default: CPU count, at most one per slide).
        With an existing cluster, wait for at least this many workers (≤ 60 s).
    include, exclude : str or sequence of str, optional
        Glob patterns on slide paths, passed to :func:`qdplex.io.find_slides`.
    force : bool
        Recompute slides whose outputs are complete.
    quiet : bool
        No progress on the terminal (the log file ``OUT/qdplex.log`` is still written).
    fmt : {"tiff", "zarr", "spatialdata"}
        Image output format (tiled pyramidal OME-TIFF, or OME-Zarr); ``"spatialdata"``
        writes OME-Zarr images plus one SpatialData store per slide.
    report : bool
        Write each slide's QC report and the cohort report.
    geojson : bool
        Also write each slide's ``cells.geojson`` (QuPath cell objects).
    storage : {"auto", "memory", "disk"}
        Where each slide's intermediate arrays live (:func:`qdplex.slide.run_slide`);
        the outputs do not depend on it.
    tile : int, optional
        Tile side in pixels (default :data:`qdplex.slide.DEFAULT_TILE`).
    stream : file-like, optional
        Where progress goes (default ``sys.stderr``).

    Returns
    -------
    pandas.DataFrame
        The manifest (also in ``OUT/manifest.csv``): one row per slide, columns
        :data:`qdplex.outputs.MANIFEST_COLUMNS`; ``status`` is ``"ok"`` or ``"failed"``,
        ``action`` is ``"computed"``, ``"skipped"`` (outputs were complete), ``"failed"``
        or ``"interrupted"``; ``warnings`` lists the slide's warnings.

    Raises
    ------
    OutputError
        OUT inside an input folder, OUT not writable, or another live batch writing into OUT.
    QdplexError
        No slides found, unknown format or storage, unreachable scheduler.
    KeyboardInterrupt
        On Ctrl-C or SIGTERM (``args[0]`` names the signal), after cleaning up.
    """
    from . import provenance as prov
    from .io import find_slides
    from .outputs import RUN_FORMATS, check_format
    from .panel import Panel, read_panel
    from .slide import STORAGES

    t_start = time.perf_counter()
    check_format(fmt, allowed=RUN_FORMATS)
    if storage not in STORAGES:
        raise QdplexError(f"expected storage one of {STORAGES}, found {storage!r}")
    if not isinstance(panel, Panel):
        panel = read_panel(panel)
    inputs = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    out = Path(out).expanduser().resolve()
    check_output_location(inputs, out)
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude
    found_opts = {k: v for k, v in (("include", include), ("exclude", exclude)) if v}
    slides = [Path(s) for s in find_slides(inputs, **found_opts)]
    if not slides:
        raise QdplexError(f"expected at least one slide in {[str(p) for p in inputs]}, found none")
    check_output_location(inputs, out, slides)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"expected a folder to write into, found {_os_error(e)}", path=out) from None
    lock = _acquire_lock(out)
    progress = None
    rows: dict[int, dict] = {}
    state = None
    staging = out / STAGING
    stopped = "batch interrupted"
    restore = _on_sigterm()
    try:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run
        try:
            staging.mkdir()
        except OSError as e:
            raise OutputError(f"expected a writable output folder, found {_os_error(e)}", path=out) from None
        panel_sha = prov.panel_sha256(panel)
        version = prov.qdplex_version()
        options = {"fmt": fmt, "report": bool(report), "tile": tile, "geojson": bool(geojson)}
        known = {} if force else _completed_slides(out)
        progress = BatchProgress(len(slides), log_file=out / "qdplex.log", quiet=quiet, stream=stream)
        params = {
            "scheduler": _describe(scheduler), "workers": workers, "include": include, "exclude": exclude,
            "force": force, "fmt": fmt, "report": report, "geojson": geojson, "storage": storage, "tile": tile,
        }
        progress.header(out, params)  # one line on the stream; the options in full to the log

        claimed: dict[str, str] = {}
        state = _State(out, slides, rows, progress)

        def done(i: int, result: Mapping[str, Any]) -> None:
            row = _commit(dict(result), out, claimed, panel_sha, version)
            rows[i] = row
            progress.finish(row["slide"], row["status"], row.get("seconds"), row.get("error") or None,
                            skipped=row["action"] == "skipped", key=_slide_guess(Path(row["input"])))
            for w in row.get("warnings") or []:
                progress.info(f"{row['slide']}: warning: {w}")
            state.write_manifest()

        # two inputs named alike would write one OUT/<slide>: the later ones fail, up front
        todo = []
        first: dict[str, Path] = {}
        for i, path in enumerate(slides):
            name = _slide_guess(path)
            bad_name = _bad_slide_name(name)
            if bad_name:
                err = OutputError(f"expected a slide name usable as a folder in OUT, found {name!r} ({bad_name}); "
                                  f"rename the input", path=path)
                done(i, {"slide": name, "input": str(path), "status": "failed", "action": "failed",
                         "error": _one_line(str(err))})
            elif name in first:
                err = OutputError(f"expected a unique slide name, found {name!r} also made from {first[name]}; "
                                  f"rename one of the two inputs", path=path)
                done(i, {"slide": name, "input": str(path), "status": "failed", "action": "failed",
                         "error": _one_line(str(err))})
            else:
                first[name] = path
                todo.append((i, path))

        common = {"panel": panel, "panel_sha": panel_sha, "options": options, "known": known, "out": str(out),
                  "storage": storage}
        if not todo:
            pass
        elif scheduler in _SYNC:
            for i, path in todo:
                stage = staging / f"{i:05d}-{uuid.uuid4().hex[:8]}"
                key = _slide_guess(path)
                progress.start(key)
                done(i, _slide_task(path, stage_dir=stage, progress=progress.stage_callback(key), **common))
        else:
            _run_distributed(todo, staging, common, scheduler, workers, progress, done)

        manifest = state.write_manifest()
        _write_cohort_summary(out, manifest, panel, progress)
        if report:
            _write_cohort_report(out, progress)
        n_bad = int((manifest["status"] != "ok").sum())
        n_skip = int((manifest["action"] == "skipped").sum())
        total_s = time.perf_counter() - t_start
        summary = (f"{len(manifest) - n_bad} of {len(manifest)} slides ok ({n_skip} skipped as complete), "
                   f"{n_bad} failed, in {total_s:.1f} s")
        _write_batch_record(out, panel, manifest, params, total_s, prov)
        shutil.rmtree(staging, ignore_errors=True)
        progress.close(summary)
        progress = None
        return manifest
    except KeyboardInterrupt as e:
        why = e.args[0] if e.args else "interrupted"
        if state is not None:
            for i, path in enumerate(slides):
                rows.setdefault(i, {c: None for c in MANIFEST_COLUMNS} | {
                    "slide": _slide_guess(path), "input": str(path), "status": "failed", "action": "interrupted",
                    "error": f"not completed: the batch was stopped ({why}); rerun to resume", "outputs": ""})
            shutil.rmtree(staging, ignore_errors=True)  # free the space before writing the manifest
            try:
                state.write_manifest()
            except (OSError, QdplexError):
                pass
        raise
    except OSError as e:  # the batch's own files (manifest, log, record) could not be written
        stopped = f"batch stopped: {_os_error(e)}"
        raise OutputError(f"expected to write the batch files, found {_os_error(e)}", path=out) from None
    finally:
        restore()
        shutil.rmtree(staging, ignore_errors=True)
        if progress is not None:
            try:
                progress.close(stopped)
            except Exception:  # a full disk must not hide the reason the batch stopped
                pass
        _release_lock(lock)


def process_slide(path, panel, out_dir, *, fmt: str = "tiff", report: bool = True, storage: str = "auto",
                  tile: int | None = None, progress=None, identity: Mapping[str, Any] | None = None,
                  geojson: bool = False) -> dict:
    """Read one slide, run it (:func:`qdplex.slide.run_slide`) and write ``out_dir/<slide>/``.

    The layout of the folder is :mod:`qdplex.outputs`'s (docs/architecture.md); ``run.json``
    is written last.

    Parameters
    ----------
    path : path
        Slide file or folder (anything :func:`qdplex.io.read_image` reads).
    panel : Panel or path
    out_dir : path
        The folder that receives ``<slide name>/``.
    fmt : {"tiff", "zarr", "spatialdata"}
        Image output format; ``"spatialdata"`` writes the images as OME-Zarr and also
        ``<slide>/spatialdata.zarr`` (:func:`qdplex.export.write_spatialdata`).
    report : bool
        Also write the QC report ``<slide>/qc/report.html``.
    geojson : bool
        Also write ``<slide>/cells.geojson``, QuPath cell objects
        (:func:`qdplex.export.write_cells_geojson`).
    storage : {"auto", "memory", "disk"}
        See :func:`qdplex.slide.run_slide`; disk scratch arrays go into ``out_dir``.
    tile : int, optional
        Tile side in pixels.
    progress : callable, optional
        ``progress(stage, fraction)``.
    identity : mapping, optional
        The slide's identity (:func:`qdplex.provenance.slide_identity`), recorded in run.json.

    Returns
    -------
    dict
        ``slide``, ``input``, ``status`` ("ok"), ``error`` (""), ``seconds``,
        ``outputs`` (name → path), ``timings``, ``warnings``.

    Raises
    ------
    QdplexError
        On unreadable input or any stage's bad-input error (a batch records it).
    """
    from . import outputs
    from .io import read_image
    from .panel import Panel, read_panel

    t0 = time.perf_counter()
    if not isinstance(panel, Panel):
        panel = read_panel(panel)
    path = Path(path)
    image = read_image(path)
    slide_dir = outputs.slide_dir_in(out_dir, image.name)
    # the input's SHA-256 for run.json (unless the identity brings it): hashed in a thread
    # from the end of segmentation on, beside the stages that keep one core busy
    # (quantify, score, the writers), instead of after them (5 GB: ~4 s)
    hasher = _InputHasher(path) if not identity else None

    def stage_done(stage, fraction):
        if hasher is not None and stage == "segment":
            hasher.start()
        if progress is not None:
            progress(stage, fraction)

    try:
        return _process(path, image, panel, out_dir, slide_dir, fmt, report, storage, tile, stage_done,
                        identity, geojson, hasher, t0)
    finally:
        if hasher is not None:
            hasher.stop()


class _InputHasher:
    """:func:`qdplex.provenance.file_sha256` of one input in a background thread, started on demand."""

    def __init__(self, path):
        self.path, self._future, self._pool = path, None, None

    def start(self):
        if self._future is None:
            from concurrent.futures import ThreadPoolExecutor

            from .provenance import file_sha256

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="qdplex-hash")
            self._future = self._pool.submit(file_sha256, self.path)

    def result(self) -> str:
        self.start()
        return self._future.result()  # file_sha256's InputError, if any, is raised here

    def stop(self):
        # after result() the thread is done; after a failed stage it is not waited for
        # (it only reads the input) and its result is dropped
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _process(path, image, panel, out_dir, slide_dir, fmt, report, storage, tile, progress, identity, geojson,
             hasher, t0) -> dict:
    from . import outputs
    from .slide import run_slide

    # the images are written (by outputs) while quantify and score run; write_slide waits for them
    with outputs.ImageWriter(slide_dir, outputs.image_format(fmt)) as images, \
            run_slide(image, panel, storage=storage, tile=tile, scratch=out_dir, progress=progress,
                      on_segmented=images.start) as result:
        t = time.perf_counter()
        paths = outputs.write_slide(result, slide_dir, fmt=outputs.image_format(fmt), images=images)
        result.timings["write"] = time.perf_counter() - t
        hashes = {str(path): identity["input_sha256"]} if identity else {str(path): hasher.result()}
        record = outputs.slide_record(result, inputs=[path], input_hashes=hashes,
                                      parameters={"fmt": fmt, "report": bool(report)})
        if identity:
            record["identity"] = dict(identity)
        if report:
            from .report import write_slide_report

            t = time.perf_counter()
            paths["report"] = write_slide_report(slide_dir, panel=panel, record=record, table=result.table,
                                                 summary=result.summary, library=result.library,
                                                 channels=image.channels)
            result.timings["report"] = time.perf_counter() - t
            record["timings"]["report"] = round(result.timings["report"], 4)
        paths["run"] = outputs.write_run_record(slide_dir, record)
        # exports read the finished folder; the batch's completion record (sealed after) lists them
        if fmt == "spatialdata" or geojson:
            from . import export

            t = time.perf_counter()
            if fmt == "spatialdata":
                paths["spatialdata"] = export.write_spatialdata(slide_dir, raw=path)
            if geojson:
                paths["geojson"] = export.write_cells_geojson(slide_dir)
            result.timings["export"] = time.perf_counter() - t
        return {
            "slide": image.name,
            "input": str(path),
            "status": "ok",
            "error": "",
            "seconds": round(time.perf_counter() - t0, 3),
            "outputs": {k: str(v) for k, v in paths.items()},
            "timings": dict(result.timings),
            "warnings": list(result.warnings),
        }


def check_output_location(inputs: Iterable, out, slides: Iterable | None = None) -> None:
    """Refuse an output folder that could overwrite or delete an input.

    Two rules, both before anything is written:

    * OUT is not an input folder nor inside one (each folder given as input and the
      folder holding each input file; an OME-Zarr slide, a folder itself, counts too).
    * No input lies under a path qdplex writes in OUT: ``OUT/<slide>`` for every slide
      of the batch, the staging folder, the lock and the batch files
      (:data:`qdplex.outputs.RESERVED_NAMES`). An input inside OUT elsewhere
      (``OUT/raw/s1.tif``) is left alone.

    Raises
    ------
    OutputError
        Naming the output folder and the input that it would overwrite.
    """
    from .io.checks import resolve_input

    out = Path(out).expanduser().resolve()
    given = []
    for p in inputs:
        p = resolve_input(p)  # a symlink loop: InputError, not RuntimeError
        if not p.exists():
            raise QdplexError("expected a slide file or a folder of slides, found no such path", path=p)
        given.append(p)
        folders = [p] if p.is_dir() else [p.parent]
        for folder in folders:
            if out == folder or folder in out.parents:
                raise OutputError(
                    f"expected an output folder outside the input folders (qdplex never writes into inputs), "
                    f"found {out} inside input folder {folder}",
                    path=out,
                )
    slides = [Path(s).expanduser().resolve() for s in (slides or [])]
    written = set(RESERVED_NAMES) | {_slide_guess(s) for s in slides}
    for p in given + slides:
        if out in p.parents:
            top = p.relative_to(out).parts[0]
            if top in written:
                raise OutputError(
                    f"expected no input under a path qdplex writes, found input {p} under {out / top}; "
                    f"choose another --out (qdplex never overwrites inputs)",
                    path=out,
                )


def _completed_slides(out) -> dict[str, dict]:
    """Completion records of the slide folders in ``out``, by slide identity.

    Read without hashing: a record is trusted for a skip only after
    :func:`qdplex.outputs.completion_record` has checked every output's content.

    Returns
    -------
    dict
        ``identity_sha256 → record`` (the record includes ``slide``).
    """
    from .outputs import read_run_record
    from .errors import InputError

    out = Path(out)
    found: dict[str, dict] = {}
    if not out.is_dir():
        return found
    for run_json in sorted(out.glob("*/run.json")):
        try:
            rec = read_run_record(run_json.parent).get(RECORD_KEY)
        except InputError:
            continue
        if isinstance(rec, dict) and rec.get("complete") and isinstance(rec.get("identity"), dict):
            ident = rec["identity"].get("identity_sha256")
            if ident:
                found[ident] = {**rec, "slide": run_json.parent.name}
    return found


# --------------------------------------------------------------------------- the task
def _slide_task(path, *, panel, panel_sha, options, known, out, storage, stage_dir, progress=None,
                threads=None) -> dict:
    """Run one slide (on a worker): its identity, skip it if complete, else process it into ``stage_dir``.

    Never raises: any failure becomes a ``failed`` row with a one-line error.
    """
    from .outputs import completion_record
    from .provenance import slide_identity

    path = Path(path)
    t0 = time.perf_counter()
    row: dict[str, Any] = {"slide": _slide_guess(path), "input": str(path), "stage_dir": str(stage_dir),
                           "worker": socket.gethostname()}
    try:
        ident = slide_identity(path, panel, options, panel_sha=panel_sha)
        row["input_sha256"] = ident["input_sha256"]
        row["identity"] = ident
        hit = known.get(ident["identity_sha256"])
        if hit is not None and completion_record(Path(out) / hit["slide"]) is not None:
            row.update(status="ok", action="skipped", slide=hit["slide"], seconds=hit.get("seconds"), error="",
                       outputs=";".join(f"{hit['slide']}/{k}" for k in list(hit.get("outputs", {})) + ["run.json"]),
                       warnings=hit.get("warnings") or [])
            return row
        Path(stage_dir).mkdir(parents=True, exist_ok=True)
        import dask

        with dask.config.set(scheduler="threads", num_workers=threads or os.cpu_count()):
            res = process_slide(path, panel, stage_dir, fmt=options["fmt"], report=options["report"],
                                geojson=options.get("geojson", False),
                                storage=storage, tile=options["tile"], progress=progress, identity=ident)
        row.update(status="ok", action="computed", slide=res.get("slide") or row["slide"], error="",
                   timings=res.get("timings"), warnings=res.get("warnings") or [])
    except QdplexError as e:
        row.update(status="failed", action="failed", error=_one_line(str(e)) + _disk_full(stage_dir, str(e)))
    except MemoryError:
        row.update(status="failed", action="failed", error=f"{path}: out of memory while processing the slide")
    except OSError as e:
        msg = f"{path}: {_os_error(e)}"
        row.update(status="failed", action="failed", error=_one_line(msg) + _disk_full(stage_dir, msg))
    except Exception as e:  # an unexpected failure must not stop the batch either
        row.update(status="failed", action="failed", error=_one_line(f"{path}: {type(e).__name__}: {e}"))
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _worker_task(path, *, topic, threads, **kw) -> dict:
    """:func:`_slide_task` on a dask worker, reporting stages as scheduler events."""
    from distributed import get_worker

    worker = get_worker()
    name = _slide_guess(Path(path))

    def report(stage, fraction):
        try:
            worker.log_event(topic, {"slide": name, "stage": stage, "fraction": float(fraction)})
        except Exception:  # progress must never fail a slide
            pass

    report("start", 0.0)
    return _slide_task(path, progress=report, threads=threads, **kw)


def _run_distributed(todo, staging, common, scheduler, workers, progress, done) -> None:
    from distributed import as_completed

    client, cluster = _connect(scheduler, workers, len(todo))
    topic = f"qdplex-progress-{uuid.uuid4().hex[:8]}"

    def on_event(event):
        msg = event[1] if isinstance(event, tuple) and len(event) == 2 else event
        if msg.get("stage") == "start":
            progress.start(msg["slide"])
        else:
            progress.stage(msg["slide"], msg["stage"], msg["fraction"])

    try:
        client.subscribe_topic(topic, on_event)
        nworkers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})) or 1)
        threads = max(1, (os.cpu_count() or 1) // nworkers) if cluster is not None else None
        futures = {}
        for i, path in todo:
            stage = staging / f"{i:05d}-{uuid.uuid4().hex[:8]}"
            fut = client.submit(_worker_task, str(path), topic=topic, threads=threads, stage_dir=str(stage),
                                pure=False, key=f"qdplex-slide-{i:05d}-{uuid.uuid4().hex[:8]}", **common)
            futures[fut] = (i, path, stage)
        for fut in as_completed(list(futures)):
            i, path, stage = futures[fut]
            try:
                result = fut.result()
            except Exception as e:  # KilledWorker, lost connection, ...
                result = {"slide": _slide_guess(path), "input": str(path), "stage_dir": str(stage),
                          "status": "failed", "action": "failed",
                          "error": _one_line(f"{path}: the dask worker failed ({type(e).__name__}: {e}); "
                                             f"out of memory or crashed")}
            done(i, result)
            fut.release()
        try:
            client.unsubscribe_topic(topic)
        except Exception:
            pass
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _connect(scheduler, workers, n_slides):
    from distributed import Client, LocalCluster

    if scheduler in _LOCAL:
        n = int(workers) if workers else max(1, min(os.cpu_count() or 1, n_slides))
        # no dashboard; the scheduler's HTTP server (health routes) on a free loopback port, so no
        # "port 8787 is already in use" warning when another dask cluster runs
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=50, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
        return Client(cluster), cluster
    if isinstance(scheduler, Client):
        return scheduler, None
    addr = str(scheduler)
    if "://" not in addr:
        if ":" not in addr:
            raise QdplexError(f"expected a scheduler address tcp://HOST:PORT (or 'local', 'synchronous'), "
                              f"found {addr!r}")
        addr = "tcp://" + addr
    try:
        client = Client(addr, timeout="30s")
    except (OSError, TimeoutError) as e:
        raise QdplexError(f"expected a dask scheduler at {addr}, found none reachable ({type(e).__name__}: {e})") from None
    if workers:
        try:
            client.wait_for_workers(int(workers), timeout=60)
        except TimeoutError:
            n = len(client.scheduler_info(n_workers=-1).get("workers", {}))
            client.close()
            raise QdplexError(f"expected {workers} workers on the scheduler {addr} within 60 s, found {n}") from None
    return client, None


# --------------------------------------------------------------------------- commit
def _commit(result: dict, out: Path, claimed: dict, panel_sha: str, version: str) -> dict:
    """Move a finished slide from staging into ``OUT/<slide>`` (client side) and make its manifest row."""
    stage = Path(result.pop("stage_dir", "") or "")
    identity = result.pop("identity", None)
    result.pop("timings", None)
    row = {c: result.get(c) for c in MANIFEST_COLUMNS}
    row["panel_sha256"], row["qdplex_version"] = panel_sha, version
    row["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    row["error"] = row.get("error") or ""
    row["warnings"] = list(row.get("warnings") or [])
    slide = str(row["slide"])
    try:
        other = claimed.get(slide)
        if other is not None and other != row["input"]:
            raise OutputError(f"expected a unique slide name, found {slide!r} also made from {other}; "
                              f"rename one of the two inputs", path=row["input"])
        if row["status"] == "ok" and row["action"] == "computed":
            made = _find_slide_dir(stage, slide)
            slide = made.name
            row["slide"] = slide
            other = claimed.get(slide)
            if other is not None and other != row["input"]:
                raise OutputError(f"expected a unique slide name, found {slide!r} also made from {other}; "
                                  f"rename one of the two inputs", path=row["input"])
            files = _seal(made, row, identity)
            _swap_into_place(made, out / slide, out / STAGING)
            row["outputs"] = ";".join(f"{slide}/{f}" for f in files)
        if row["status"] == "ok":
            claimed[slide] = row["input"]
    except QdplexError as e:
        row.update(status="failed", action="failed", error=_one_line(str(e)))
    except OSError as e:
        row.update(status="failed", action="failed",
                   error=_one_line(f"{out / slide}: could not move the outputs into place ({_os_error(e)})"))
    finally:
        if stage and stage.exists() and stage.parent.name == STAGING:
            shutil.rmtree(stage, ignore_errors=True)
    row["outputs"] = row.get("outputs") or ""
    return row


def _find_slide_dir(stage: Path, slide: str) -> Path:
    cand = stage / slide
    if cand.is_dir():
        return cand
    dirs = [d for d in stage.iterdir() if d.is_dir() and not d.name.startswith(".")] if stage.is_dir() else []
    if len(dirs) == 1:
        return dirs[0]
    raise OutputError(f"expected the slide to write one slide folder, found {[d.name for d in dirs]}", path=stage)


def _seal(slide_dir: Path, row: dict, identity) -> list[str]:
    """Add the completion record (identity, SHA-256 of every output) to ``slide_dir/run.json``."""
    from .outputs import seal

    return seal(slide_dir, {
        "input": str(Path(row["input"]).resolve()),
        "input_sha256": row["input_sha256"],
        "identity": identity or {},
        "panel_sha256": row["panel_sha256"],
        "qdplex_version": row["qdplex_version"],
        "seconds": row.get("seconds"),
        "finished": row["finished"],
        "worker": row.get("worker"),
        "warnings": row.get("warnings") or [],
    })


def _swap_into_place(made: Path, target: Path, staging: Path) -> None:
    """Rename ``made`` to ``target``.

    An existing ``target`` is replaced only when qdplex wrote it: its ``run.json``
    holds qdplex's completion record and every file in it is one the record lists.
    Anything else (a user's folder, an input, a qdplex folder with a user's file added)
    is left untouched and the slide fails with :class:`~qdplex.errors.OutputError`.
    """
    if _bad_slide_name(target.name) or target.parent != staging.parent:
        raise OutputError(f"expected a slide folder directly in {staging.parent}, found {target}", path=target)
    if target.exists() or target.is_symlink():
        foreign = _not_ours(target)
        if foreign:
            raise OutputError(
                f"expected {target} to be a slide folder written by qdplex, found {foreign}; "
                f"qdplex never replaces what it did not write: move it away or choose another --out",
                path=target,
            )
        trash = staging / f"old-{target.name}-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
        os.replace(made, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(made, target)


def _not_ours(folder: Path) -> str:
    """Why ``folder`` is not a slide folder that qdplex wrote ("" when it is)."""
    if folder.is_symlink() or not folder.is_dir():
        return "a file or link, not a folder"
    from .outputs import read_run_record

    try:
        doc = read_run_record(folder)
    except QdplexError:
        return "no qdplex run.json in it"
    rec = doc.get(RECORD_KEY)
    if not isinstance(rec, dict) or not isinstance(rec.get("outputs"), dict):
        return "a run.json without qdplex's completion record"
    listed = set(rec["outputs"]) | {"run.json"}
    for p in folder.rglob("*"):
        if p.is_symlink() or (p.is_file() and p.relative_to(folder).as_posix() not in listed):
            return f"{p.relative_to(folder).as_posix()}, a file qdplex did not write"
        if not (p.is_file() or p.is_dir()):
            return f"{p.relative_to(folder).as_posix()}, not a regular file"
    return ""


# --------------------------------------------------------------------------- manifest, summary, record
class _State:
    def __init__(self, out: Path, slides: list[Path], rows: dict, progress: BatchProgress):
        self.out, self.slides, self.rows, self.progress = out, slides, rows, progress

    def write_manifest(self) -> pd.DataFrame:
        from .outputs import write_manifest

        return write_manifest(self.out, [self.rows[i] for i in sorted(self.rows)])


def _write_cohort_summary(out: Path, manifest: pd.DataFrame, panel, progress: BatchProgress) -> None:
    from .io import atomic_path
    from .outputs import COHORT_SUMMARY, SUMMARY_JSON
    from .score import cohort_summary

    summaries = {}
    for slide in manifest.loc[manifest["status"] == "ok", "slide"]:
        try:
            summaries[slide] = json.loads((out / slide / SUMMARY_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            progress.info(f"{slide}: no readable summary.json for the cohort summary ({e})")
    if not summaries:
        return
    df = cohort_summary(summaries, panel)
    with atomic_path(out / COHORT_SUMMARY) as tmp:
        df.to_csv(tmp, index=False)


def _write_cohort_report(out: Path, progress: BatchProgress) -> None:
    """``OUT/report.html`` across slides; a report failure is logged, never fatal."""
    from .report import write_cohort_report

    try:
        progress.info(f"cohort QC report: {write_cohort_report(out)}", stream=False)  # the CLI's summary names it
    except Exception as e:  # the tables are what matter; the report must not lose them
        progress.info(f"cohort QC report not written: {type(e).__name__}: {e}")


def _write_batch_record(out: Path, panel, manifest: pd.DataFrame, params: dict, total_s: float, prov) -> None:
    from .outputs import RUN_JSON, write_json

    doc = prov.run_record(panel=panel, parameters=params, timings={"total": total_s})
    doc["inputs"] = [
        {"path": str(Path(r["input"]).resolve()), "sha256": r["input_sha256"] or None}
        for _, r in manifest.iterrows()
    ]
    doc["slides"] = prov.to_jsonable(manifest.drop(columns=["outputs"]).to_dict(orient="records"))
    write_json(out / RUN_JSON, doc)


# --------------------------------------------------------------------------- signals
def _on_sigterm():
    """While the batch runs, SIGTERM raises KeyboardInterrupt("SIGTERM") (the batch cleans up and
    says what completed); returns the function restoring the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not the main interpreter
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- lock
def _acquire_lock(out: Path) -> Path:
    """Create ``OUT/.qdplex.lock`` holding this host and pid.

    The lock is created whole (written aside, then hard-linked into place), so a lock
    file that is empty or unreadable was left by a run killed long ago or by a user:
    it is stale, like a lock of a dead process on this host, and replaced.
    """
    lock = out / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(3):
        tmp = out / f"{LOCK}.{uuid.uuid4().hex[:8]}"
        try:
            tmp.write_text(json.dumps(me), encoding="utf-8")
            os.link(tmp, lock)
            return lock
        except FileExistsError:
            try:
                held = json.loads(lock.read_text(encoding="utf-8"))
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                held = None
            if not isinstance(held, dict) or (held.get("host") == me["host"] and not _alive(held.get("pid"))):
                lock.unlink(missing_ok=True)  # empty, unreadable, or left by a run that was killed
                continue
            raise OutputError(
                f"expected no other qdplex batch writing to this folder, found one running "
                f"(host {held.get('host')}, pid {held.get('pid')}); delete {lock} if it is not running",
                path=out,
            ) from None
        except OSError as e:
            e.filename = None  # the lock's temporary name means nothing to the user; OUT does
            raise OutputError(f"expected a writable output folder, found {_os_error(e)}", path=out) from None
        finally:
            try:
                tmp.unlink()
            except OSError:
                pass
    raise OutputError(f"expected to create the lock file {lock}, found it recreated by another process", path=out)


def _release_lock(lock: Path) -> None:
    try:
        lock.unlink()
    except OSError:
        pass


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- helpers
def _os_error(e: OSError) -> str:
    """An OSError as the user should read it: a full disk and a read-only folder by name."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device (disk full) writing {e.filename or 'the outputs'}"
    if e.errno in (errno.EROFS,):
        return f"a read-only file system ({e.filename or 'the output folder'})"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write {e.filename or 'the output folder'}"
    if e.errno == errno.EFBIG:
        return f"a file larger than the system allows ({e.filename or 'an output'})"
    return f"{type(e).__name__}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")


#: Free bytes below which a failed write is reported as a full disk.
_FULL = 1 << 20


def _disk_full(where, message: str) -> str:
    """``"; the disk holding OUT is full (N bytes free)"`` when it is, else "" (a short write
    or an I/O error of a stage then reads as what it is)."""
    if "disk full" in message:
        return ""
    try:
        free = shutil.disk_usage(Path(where).parent if not Path(where).exists() else where).free
    except OSError:
        return ""
    return f"; the disk holding the outputs is full ({free} bytes free)" if free < _FULL else ""


def _slide_guess(path: Path) -> str:
    from .io.discover import slide_stem

    return slide_stem(path)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe(scheduler) -> str:
    if scheduler in _LOCAL:
        return "local"
    if isinstance(scheduler, str):
        return scheduler
    return getattr(scheduler, "scheduler", None) and str(scheduler.scheduler.address) or type(scheduler).__name__
