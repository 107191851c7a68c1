"""Many slides on dask.distributed: one task per slide, a manifest, resume, nothing lost.

:func:`run_batch` is what ``qdplex run`` and :func:`qdplex.pipeline.run` call::

    manifest = run_batch(["slides/"], panel, "out/")                 # local cluster
    manifest = run_batch(["slides/"], panel, "out/", scheduler="tcp://head:8786")

How nothing is lost
-------------------
* Every slide is one independent task (:func:`qdplex.pipeline.process_slide`). A
  slide that fails — corrupt or truncated file, wrong channel count, missing
  metadata, a worker that dies — becomes a ``failed`` row of ``OUT/manifest.csv``
  with its error, and the batch goes on.
* A slide is computed into ``OUT/.qdplex-staging/`` and its folder is renamed to
  ``OUT/<slide>/`` only once every file is written and ``run.json`` records the
  input's SHA-256, the panel's SHA-256, the qdplex version and the size of every
  output file. An interrupted run (even ``kill -9``) therefore never leaves an
  ``OUT/<slide>/`` that looks complete and is not.
* Rerunning resumes: a slide whose ``OUT/<slide>/run.json`` matches the input,
  panel and version, and whose files are all there with their recorded sizes, is
  skipped (``action = "skipped"``); ``force=True`` recomputes it.
* qdplex never writes into input folders: an ``OUT`` inside an input folder (or the
  folder of an input file) is refused with :class:`~qdplex.errors.OutputError`.
* ``OUT/manifest.csv`` is rewritten (atomically) after every slide, ``OUT/run.json``
  holds the batch's provenance and ``OUT/qdplex.log`` every event.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from .errors import OutputError, QdplexError
from .progress import BatchProgress

__all__ = [
    "run_batch",
    "check_output_location",
    "completed_slides",
    "MANIFEST_COLUMNS",
    "STAGING",
    "LOCK",
]

#: Columns of ``OUT/manifest.csv``, in order.
MANIFEST_COLUMNS = [
    "slide", "input", "status", "error", "seconds", "input_sha256", "outputs",
    "action", "panel_sha256", "qdplex_version", "worker", "finished",
]
#: Folder in OUT where slides are computed before being moved into place.
STAGING = ".qdplex-staging"
#: Lock file in OUT held by the running batch.
LOCK = ".qdplex.lock"
#: Key of the completion record that :mod:`qdplex.batch` adds to ``<slide>/run.json``.
RECORD_KEY = "batch"
#: Names in OUT that belong to the batch itself (never slide names, never replaced by a slide).
RESERVED_NAMES = (STAGING, LOCK, "manifest.csv", "cohort_summary.csv", "report.html", "run.json", "qdplex.log")

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
    tile: int | None = None,
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
    fmt : {"tiff", "zarr"}
        Image output format (tiled pyramidal OME-TIFF, or OME-Zarr).
    report : bool
        Write each slide's QC report.
    tile : int, optional
        Process every slide tile by tile (:mod:`qdplex.wholeslide`) with this tile size;
        by default only slides above :data:`qdplex.wholeslide.WHOLESLIDE_PIXELS` are.
    stream : file-like, optional
        Where progress goes (default ``sys.stderr``).

    Returns
    -------
    pandas.DataFrame
        The manifest (also in ``OUT/manifest.csv``): one row per slide, columns
        :data:`MANIFEST_COLUMNS`; ``status`` is ``"ok"`` or ``"failed"``, ``action``
        is ``"computed"``, ``"skipped"`` (outputs were complete) or ``"failed"``.

    Raises
    ------
    OutputError
        OUT inside an input folder, or another live batch writing into OUT.
    QdplexError
        No slides found, unknown format, unreachable scheduler.
    """
    from . import provenance as prov
    from .io import find_slides
    from .panel import Panel, read_panel

    t_start = time.perf_counter()
    if fmt not in ("tiff", "zarr"):
        raise QdplexError(f"expected output format 'tiff' or 'zarr', found {fmt!r}")
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
        raise OutputError(f"expected a folder to write into, found {type(e).__name__}: {e.strerror or e}", path=out) from None
    lock = _acquire_lock(out)
    progress = None
    try:
        staging = out / STAGING
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run
        staging.mkdir()
        panel_sha = prov.panel_sha256(panel)
        version = prov.qdplex_version()
        known = {} if force else completed_slides(out, panel_sha256=panel_sha, qdplex_version=version)
        progress = BatchProgress(len(slides), log_file=out / "qdplex.log", quiet=quiet, stream=stream)
        params = {
            "scheduler": _describe(scheduler), "workers": workers, "include": include, "exclude": exclude,
            "force": force, "fmt": fmt, "report": report, "tile": tile,
        }
        progress.header(out, params)  # one line on the stream; the options in full to the log

        rows: dict[int, dict] = {}
        claimed: dict[str, str] = {}
        state = _State(out, slides, rows, progress)

        def done(i: int, result: Mapping[str, Any]) -> None:
            row = _commit(dict(result), out, claimed, panel_sha, version)
            rows[i] = row
            progress.finish(row["slide"], row["status"], row.get("seconds"), row.get("error") or None,
                            skipped=row["action"] == "skipped", key=_slide_guess(Path(row["input"])))
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

        common = {"panel": panel, "fmt": fmt, "report": report, "known": known, "tile": tile}
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
    finally:
        if progress is not None:
            progress.close("batch interrupted")
        _release_lock(lock)


def check_output_location(inputs: Iterable, out, slides: Iterable | None = None) -> None:
    """Refuse an output folder that could overwrite or delete an input.

    Two rules, both before anything is written:

    * OUT is not an input folder nor inside one (each folder given as input and the
      folder holding each input file; an OME-Zarr slide, a folder itself, counts too).
    * No input lies under a path qdplex writes in OUT: ``OUT/<slide>`` for every slide
      of the batch, the staging folder, the lock and the batch files
      (:data:`RESERVED_NAMES`). An input inside OUT elsewhere (``OUT/raw/s1.tif``) is
      left alone.

    Raises
    ------
    OutputError
        Naming the output folder and the input that it would overwrite.
    """
    out = Path(out).expanduser().resolve()
    given = []
    for p in inputs:
        p = Path(p).expanduser().resolve()
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


def completed_slides(out, *, panel_sha256: str, qdplex_version: str) -> dict[tuple[str, str], dict]:
    """Slides in ``out`` whose outputs are complete for this panel and qdplex version.

    A slide folder is complete when its ``run.json`` holds a batch record (written
    last, before the folder was moved into place) with this panel hash and version,
    and every output file it lists is present with its recorded size.

    Returns
    -------
    dict
        ``(input_sha256, input file name) → record`` (the record includes ``slide``).
    """
    out = Path(out)
    found: dict[tuple[str, str], dict] = {}
    if not out.is_dir():
        return found
    for run_json in sorted(out.glob("*/run.json")):
        rec = _read_record(run_json.parent)
        if rec is None:
            continue
        if rec.get("panel_sha256") != panel_sha256 or rec.get("qdplex_version") != qdplex_version:
            continue
        found[(rec["input_sha256"], Path(rec["input"]).name)] = rec
    return found


# --------------------------------------------------------------------------- the task
def _slide_task(path, *, panel, fmt, report, known, stage_dir, progress=None, threads=None, tile=None) -> dict:
    """Run one slide (on a worker): hash it, skip it if complete, else process it into ``stage_dir``.

    Never raises: any failure becomes a ``failed`` row with a one-line error.
    """
    from .provenance import file_sha256

    path = Path(path)
    t0 = time.perf_counter()
    row: dict[str, Any] = {"slide": _slide_guess(path), "input": str(path), "stage_dir": str(stage_dir),
                           "worker": socket.gethostname()}
    try:
        sha = file_sha256(path)
        row["input_sha256"] = sha
        hit = known.get((sha, path.name))
        if hit is not None:
            row.update(status="ok", action="skipped", slide=hit["slide"], seconds=hit.get("seconds"),
                       error="", outputs=";".join(f"{hit['slide']}/{k}" for k in hit.get("outputs", {})))
            return row
        from .pipeline import process_slide

        kwargs = {"fmt": fmt, "report": report}
        accepted = inspect.signature(process_slide).parameters
        if progress is not None and "progress" in accepted:
            kwargs["progress"] = progress
        if tile is not None:
            if "tile" not in accepted:
                raise QdplexError("expected qdplex.pipeline.process_slide to accept tile=, found it does not")
            kwargs["tile"] = int(tile)
        Path(stage_dir).mkdir(parents=True, exist_ok=True)
        import dask

        with dask.config.set(scheduler="threads", num_workers=threads or os.cpu_count()):
            res = process_slide(path, panel, stage_dir, **kwargs)
        res = dict(res or {})
        status = res.get("status", "ok")
        row.update(
            status="ok" if status == "ok" else "failed",
            action="computed" if status == "ok" else "failed",
            slide=res.get("slide") or row["slide"],
            error=str(res.get("error") or ""),
            stage_outputs=res.get("outputs"),
            timings=res.get("timings"),
        )
    except QdplexError as e:
        row.update(status="failed", action="failed", error=_one_line(str(e)))
    except MemoryError:
        row.update(status="failed", action="failed", error=f"{path}: out of memory while processing the slide")
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
    stage_outputs = result.pop("stage_outputs", None)
    timings = result.pop("timings", None)
    row = {c: result.get(c) for c in MANIFEST_COLUMNS}
    row["panel_sha256"], row["qdplex_version"] = panel_sha, version
    row["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    row["error"] = row.get("error") or ""
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
            files = _seal(made, row, timings, stage_outputs)
            _swap_into_place(made, out / slide, out / STAGING)
            row["outputs"] = ";".join(f"{slide}/{f}" for f in files)
        if row["status"] == "ok":
            claimed[slide] = row["input"]
    except QdplexError as e:
        row.update(status="failed", action="failed", error=_one_line(str(e)))
    except OSError as e:
        row.update(status="failed", action="failed",
                   error=_one_line(f"{out / slide}: could not move the outputs into place ({e})"))
    finally:
        if stage and stage.exists() and stage.parent.name == STAGING:
            shutil.rmtree(stage, ignore_errors=True)
    row["outputs"] = row.get("outputs") or ""
    return row


def _find_slide_dir(stage: Path, slide: str) -> Path:
    cand = stage / slide
    if cand.is_dir():
        return cand
    dirs = [d for d in stage.iterdir() if d.is_dir()] if stage.is_dir() else []
    if len(dirs) == 1:
        return dirs[0]
    raise OutputError(f"expected process_slide to write one slide folder, found {[d.name for d in dirs]}", path=stage)


def _seal(slide_dir: Path, row: dict, timings, stage_outputs) -> list[str]:
    """Add the completion record to ``slide_dir/run.json`` (atomically); return the output files."""
    from .io import atomic_path
    from .provenance import run_record, to_jsonable

    run_json = slide_dir / "run.json"
    files = sorted(p.relative_to(slide_dir).as_posix() for p in slide_dir.rglob("*")
                   if p.is_file() and p != run_json)
    sizes = {f: (slide_dir / f).stat().st_size for f in files}
    doc: dict = {}
    if run_json.is_file():
        try:
            doc = json.loads(run_json.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = {}
    if not doc:
        doc = run_record(inputs=[row["input"]], input_hashes={row["input"]: row["input_sha256"]},
                         timings=timings or {})
    doc[RECORD_KEY] = to_jsonable({
        "complete": True,
        "slide": slide_dir.name,
        "input": str(Path(row["input"]).resolve()),
        "input_sha256": row["input_sha256"],
        "panel_sha256": row["panel_sha256"],
        "qdplex_version": row["qdplex_version"],
        "seconds": row.get("seconds"),
        "finished": row["finished"],
        "worker": row.get("worker"),
        "outputs": sizes,
    })
    with atomic_path(run_json) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return files + ["run.json"]


def _read_record(slide_dir: Path) -> dict | None:
    try:
        doc = json.loads((slide_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rec = doc.get(RECORD_KEY) if isinstance(doc, dict) else None
    if not isinstance(rec, dict) or not rec.get("complete") or not rec.get("input_sha256"):
        return None
    for f, size in (rec.get("outputs") or {}).items():
        p = slide_dir / f
        try:
            if p.stat().st_size != size:
                return None
        except OSError:
            return None
    rec = dict(rec)
    rec["slide"] = slide_dir.name
    return rec


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
    try:
        doc = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no qdplex run.json in it"
    rec = doc.get(RECORD_KEY) if isinstance(doc, dict) else None
    if not isinstance(rec, dict) or not isinstance(rec.get("outputs"), dict):
        return "a run.json without qdplex's completion record"
    listed = set(rec["outputs"]) | {"run.json"}
    for p in folder.rglob("*"):
        if p.is_symlink() or (p.is_file() and p.relative_to(folder).as_posix() not in listed):
            return f"{p.relative_to(folder).as_posix()}, a file qdplex did not write"
        if not (p.is_file() or p.is_dir()):
            return f"{p.relative_to(folder).as_posix()}, not a regular file"
    return ""


def _bad_slide_name(name: str) -> str:
    """Why ``name`` cannot be a folder in OUT ("" when it can)."""
    if not name or not name.strip():
        return "empty"
    if name in (".", "..") or set(name) <= {"."}:
        return "only dots"
    if "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        return "a path separator"
    if name in RESERVED_NAMES:
        return "a name qdplex uses for its own files"
    return ""


# --------------------------------------------------------------------------- manifest, summary, record
class _State:
    def __init__(self, out: Path, slides: list[Path], rows: dict, progress: BatchProgress):
        self.out, self.slides, self.rows, self.progress = out, slides, rows, progress

    def write_manifest(self) -> pd.DataFrame:
        from .io import atomic_path

        recs = [self.rows[i] for i in sorted(self.rows)]
        df = pd.DataFrame(recs, columns=MANIFEST_COLUMNS)
        with atomic_path(self.out / "manifest.csv") as tmp:
            _manifest_for_csv(df).to_csv(tmp, index=False)
        return df


def _manifest_for_csv(df: pd.DataFrame) -> pd.DataFrame:
    """Hash columns written as ``sha256:<hex>``.

    A bare hex digest such as ``86e24171…`` looks like a float with a huge exponent to
    CSV readers: pandas' C parser infers a number and (pandas 2.3) crashes on it. The
    prefix keeps the column text for every reader; run.json keeps the bare digest.
    """
    out = df.copy()
    for col in ("input_sha256", "panel_sha256"):
        vals = out[col].astype("object")
        mask = vals.notna() & (vals.astype(str) != "")
        out[col] = vals.where(~mask, "sha256:" + vals[mask].astype(str))
    return out


def _write_cohort_summary(out: Path, manifest: pd.DataFrame, panel, progress: BatchProgress) -> None:
    from .io import atomic_path
    from .score import cohort_summary

    summaries = {}
    for slide in manifest.loc[manifest["status"] == "ok", "slide"]:
        try:
            summaries[slide] = json.loads((out / slide / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            progress.info(f"{slide}: no readable summary.json for the cohort summary ({e})")
    if not summaries:
        return
    df = cohort_summary(summaries, panel)
    with atomic_path(out / "cohort_summary.csv") as tmp:
        df.to_csv(tmp, index=False)


def _write_cohort_report(out: Path, progress: BatchProgress) -> None:
    """``OUT/report.html`` across slides; a report failure is logged, never fatal."""
    from .report import write_cohort_report

    try:
        progress.info(f"cohort QC report: {write_cohort_report(out)}", stream=False)  # the CLI's summary names it
    except Exception as e:  # the tables are what matter; the report must not lose them
        progress.info(f"cohort QC report not written: {type(e).__name__}: {e}")


def _write_batch_record(out: Path, panel, manifest: pd.DataFrame, params: dict, total_s: float, prov) -> None:
    from .io import atomic_path

    doc = prov.run_record(panel=panel, parameters=params, timings={"total": total_s})
    doc["inputs"] = [
        {"path": str(Path(r["input"]).resolve()), "sha256": r["input_sha256"] or None}
        for _, r in manifest.iterrows()
    ]
    doc["slides"] = prov.to_jsonable(manifest.drop(columns=["outputs"]).to_dict(orient="records"))
    with atomic_path(out / "run.json") as tmp:
        Path(tmp).write_text(json.dumps(prov.to_jsonable(doc), indent=2), encoding="utf-8")


# --------------------------------------------------------------------------- lock
def _acquire_lock(out: Path) -> Path:
    lock = out / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                held = {}
            if held.get("host") == me["host"] and not _alive(held.get("pid")):
                lock.unlink(missing_ok=True)  # left by a run that was killed
                continue
            raise OutputError(
                f"expected no other qdplex batch writing to this folder, found one running "
                f"(host {held.get('host')}, pid {held.get('pid')}); delete {lock} if it is not running",
                path=out,
            ) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        return lock
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
