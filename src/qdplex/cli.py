"""The ``qdplex`` command line: a thin shell over the Python API.

Each subcommand is registered by a small ``_add_<name>(subparsers)`` function that
sets ``func`` to a handler taking the parsed arguments and returning an exit code.
Errors from qdplex (:class:`qdplex.errors.QdplexError`) are printed as one line on
stderr, without a traceback, and give a non-zero exit code; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import QdplexError

__all__ = ["build_parser", "main"]


# --------------------------------------------------------------------------- run
def _add_run(sub) -> None:
    p = sub.add_parser(
        "run",
        help="unmix, segment, quantify and score slides into per-cell tables",
        description="Run the full pipeline on each slide. Each INPUT is a slide file "
        "(OME-TIFF, TIFF with a channel sidecar, OME-Zarr) or a folder searched for slides.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", type=Path, help="slide file or folder of slides")
    p.add_argument("--panel", required=True, type=Path, help="panel TOML file (see pipelines/)")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not be inside an input folder)")
    p.add_argument("--no-report", action="store_true", help="do not write the QC reports")
    # batch options (qdplex.batch.run_batch)
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="an existing dask scheduler, e.g. tcp://HOST:PORT (default: a local cluster sized to "
                   "this machine; 'synchronous' runs slides one by one in this process)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local worker processes (default: CPU count); with --scheduler, wait for N workers")
    p.add_argument("--include", action="append", default=None, metavar="GLOB",
                   help="only slides whose path matches GLOB (repeatable)")
    p.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                   help="skip slides whose path matches GLOB (repeatable)")
    p.add_argument("--force", action="store_true", help="recompute slides whose outputs are already complete")
    p.add_argument("--quiet", action="store_true",
                   help="print only errors and the closing summary (OUT/qdplex.log is still written)")
    p.add_argument("--json", dest="as_json", action="store_true",
                   help="print the closing summary as one JSON object on stdout (counts, output paths, failures)")
    p.add_argument("--format", dest="fmt", choices=("tiff", "zarr", "spatialdata"), default="tiff",
                   help="image outputs as tiled pyramidal OME-TIFF (default) or OME-Zarr; spatialdata: "
                   "OME-Zarr plus one SpatialData store per slide (<slide>/spatialdata.zarr, needs qdplex[spatialdata])")
    p.add_argument("--geojson", action="store_true",
                   help="also write <slide>/cells.geojson: QuPath cell objects (outline, nucleus, measurements, "
                   "positivity as the class)")
    p.add_argument("--storage", choices=("auto", "memory", "disk"), default="auto",
                   help="where a slide's intermediate arrays live: in memory, or tile by tile in scratch "
                   "storage on disk (bounded memory); auto (default) chooses by slide size. The outputs "
                   "do not depend on it")
    p.set_defaults(func=_cmd_run)


def _run_options(args) -> dict:
    """Keyword options for :func:`qdplex.batch.run_batch` taken from the parsed arguments."""
    opts = {"report": not args.no_report}
    for name in ("scheduler", "workers", "include", "exclude", "force", "quiet", "fmt", "storage", "geojson"):
        if getattr(args, name, None) is not None:
            opts[name] = getattr(args, name)
    return opts


def _quiet_shutdown() -> None:
    """After the one line of an interrupted run: nothing more on stderr. A signal that lands
    while zarr's I/O loop (a library thread) has reads in flight otherwise ends the process
    with "Exception ignored … Event loop is closed" and "Task was destroyed but it is
    pending!" for each of them, printed by the interpreter's shutdown (seen in CI's SIGTERM test)."""
    import os

    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _cmd_run(args) -> int:
    import json
    import time

    from .batch import run_batch
    from .panel import read_panel
    from .progress import batch_summary, format_summary

    t0 = time.perf_counter()
    panel = read_panel(args.panel)
    try:
        manifest = run_batch(args.inputs, panel, args.out, **_run_options(args))  # raises when it finds no slide
    except KeyboardInterrupt as e:
        why = e.args[0] if e.args else "Ctrl-C"
        print(f"qdplex: interrupted ({why}); the slides completed so far are listed in "
              f"{Path(args.out) / 'manifest.csv'}; rerun to resume", file=sys.stderr)
        _quiet_shutdown()
        return 143 if why == "SIGTERM" else 130
    summary = batch_summary(manifest, args.out, time.perf_counter() - t0)
    if args.quiet:  # otherwise the progress lines showed them as they happened
        for failure in summary["failures"]:
            print(f"qdplex: failed {failure['slide']}: {failure['error']}", file=sys.stderr)
    print(json.dumps(summary, indent=2) if args.as_json else format_summary(summary))
    return 1 if summary["failed"] else 0


# --------------------------------------------------------------------------- synth
def _add_synth(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="make a synthetic multiplexed QD slide with ground truth",
        description="Write DIR/slides/NAME.ome.tif, its ground truth in DIR/truth/NAME/ and, "
        "with --unstained, an unstained control in DIR/controls/.",
    )
    p.add_argument("--panel", required=True, type=Path, help="panel TOML file")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--name", default="synthetic", help="slide name (default: synthetic)")
    p.add_argument("--shape", nargs=2, type=int, default=(512, 512), metavar=("Y", "X"), help="image size in pixels")
    p.add_argument("--pixel-size", type=float, default=0.5, help="pixel size in µm (default 0.5)")
    p.add_argument("--mode", choices=("lambda", "filter"), default="lambda", help="λ-stack or filter channels")
    p.add_argument("--wavelengths", nargs=3, type=float, default=(420.0, 720.0, 10.0),
                   metavar=("FIRST", "LAST", "STEP"), help="λ-stack band centres in nm (default 420 720 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--unstained", action="store_true", help="also write an unstained control")
    p.add_argument("--crowded", action="store_true", help="dense, touching nuclei")
    p.add_argument("--uneven", action="store_true", help="dim and bright nuclei and a background gradient")
    p.add_argument("--photons", type=float, default=200.0,
                   help="photo-electrons in a fluor's peak 10 nm band for a typical positive cell (default 200)")
    p.add_argument("--autofluorescence", type=float, default=1.0, help="tissue autofluorescence scale, 0 = none (default 1)")
    p.add_argument("--spectral-shift", type=float, default=0.0, metavar="NM",
                   help="s.d. of random per-fluor emission shifts in nm: spectra differ from the library (default 0)")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args) -> int:
    from .io.checks import check_plain_name
    from .synth import make_slide, read_synth_panel, write_slide

    check_plain_name(args.name, what="--name")  # before the slide is made: its files must stay inside --out
    panel = read_synth_panel(args.panel)  # its unstained control may be what this run writes
    slide = make_slide(
        panel,
        shape=tuple(args.shape),
        pixel_size_um=args.pixel_size,
        mode=args.mode,
        wavelengths=tuple(args.wavelengths),
        crowded=args.crowded,
        uneven=args.uneven,
        unstained=args.unstained,
        photons=args.photons,
        autofluorescence=args.autofluorescence,
        spectral_shift_nm=args.spectral_shift,
        seed=args.seed,
        name=args.name,
    )
    paths = write_slide(slide, args.out)
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


# --------------------------------------------------------------------------- report
def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="(re)write the QC reports of an output folder",
        description="Rebuild OUT/<slide>/qc/report.html for every slide that succeeded, from the files "
        "in its folder, and the cohort report OUT/report.html from OUT/manifest.csv.",
    )
    p.add_argument("out", metavar="OUT", type=Path, help="a qdplex output folder (holding manifest.csv)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from .report import report_from_outputs

    for path in report_from_outputs(args.out):
        print(path)
    return 0


# --------------------------------------------------------------------------- agree
def _add_agree(sub) -> None:
    p = sub.add_parser(
        "agree",
        help="agreement of slide scores with orthogonal measurements (IHC, FISH, Western blot)",
        description="Compare OUT/cohort_summary.csv with a reference CSV (one row per slide): Pearson and "
        "Spearman for continuous columns, Cohen's kappa (weighted for ordinal scores such as HER2 0/1+/2+/3+) "
        "and Bland-Altman bias and limits. By default every column present in both files is compared.",
    )
    p.add_argument("cohort", metavar="COHORT_SUMMARY", type=Path, help="cohort_summary.csv written by qdplex run")
    p.add_argument("reference", metavar="REFERENCE", type=Path, help="reference CSV with a slide column")
    p.add_argument("--on", default="slide", help="column naming the slide in both files (default: slide)")
    p.add_argument("--pair", action="append", default=[], metavar="OURS=REF",
                   help="compare cohort column OURS with reference column REF (repeatable)")
    p.add_argument("--weights", choices=("linear", "quadratic"), default="linear",
                   help="kappa weights for ordinal scores (default: linear)")
    p.add_argument("--out", type=Path, help="also write the results to this CSV")
    p.set_defaults(func=_cmd_agree)


def _cmd_agree(args) -> int:
    import pandas as pd

    from .agree import agree_files

    pairs = None
    if args.pair:
        pairs = {}
        for item in args.pair:
            ours, sep, ref = item.partition("=")
            if not sep or not ours or not ref:
                raise QdplexError(f"expected --pair OURS=REF, found {item!r}")
            pairs[ours] = ref
    res = agree_files(args.cohort, args.reference, on=args.on, pairs=pairs, weights=args.weights, out=args.out)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(res.dropna(axis=1, how="all").to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


# --------------------------------------------------------------------------- check-panel
def _add_check_panel(sub) -> None:
    p = sub.add_parser(
        "check-panel",
        help="pre-flight check of a panel's spectral library: condition number, angles, crosstalk",
        description="For the panel's spectral library (built-ins, its spectra files, its autofluorescence) on "
        "the channels of SLIDE (or, without --image, a default λ-stack grid 420–720 nm in 10 nm steps: 31 bands, each 10 nm wide), print "
        "the condition number, pairwise spectral angles and the expected crosstalk matrix, and warn on "
        "near-collinear pairs. A singular library is refused with an error naming the pair.",
    )
    p.add_argument("panel", metavar="PANEL", type=Path, help="panel TOML file")
    p.add_argument("--image", type=Path, metavar="SLIDE", help="a slide whose channels to check on")
    p.set_defaults(func=_cmd_check_panel)


def _cmd_check_panel(args) -> int:
    from .crosstalk import check_panel_for, format_panel_check
    from .panel import read_panel

    image = None
    if args.image is not None:
        from .io import read_image

        image = read_image(args.image)
    check = check_panel_for(read_panel(args.panel), image)
    print(format_panel_check(check))
    return 0


# --------------------------------------------------------------------------- export
def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a finished slide folder for other tools: SpatialData (scverse) or QuPath GeoJSON",
        description="Read OUT/<slide> as written by 'qdplex run' and write, per slide folder, "
        "'spatialdata': OUT/<slide>/spatialdata.zarr (raw and unmixed images, nuclei and cells labels, the cell "
        "table annotating the cells; needs pip install 'qdplex[spatialdata]'), or 'geojson': "
        "OUT/<slide>/cells.geojson (QuPath cell objects with nucleus, measurements and positivity).",
    )
    p.add_argument("what", choices=("spatialdata", "geojson"), help="the format to write")
    p.add_argument("slides", nargs="+", metavar="SLIDE_DIR", type=Path, help="a slide output folder OUT/<slide>")
    p.add_argument("--out", type=Path, default=None, metavar="PATH",
                   help="where to write (only with one SLIDE_DIR; default inside SLIDE_DIR)")
    p.add_argument("--raw", type=Path, default=None, metavar="SLIDE",
                   help="spatialdata: the raw slide file, when it moved from the path run.json records")
    p.add_argument("--no-raw", action="store_true", help="spatialdata: leave the raw image out")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from .progress import show_path

    if args.out is not None and len(args.slides) > 1:
        raise QdplexError(f"expected one SLIDE_DIR with --out, found {len(args.slides)}")
    if args.what == "spatialdata":
        from .export.spatialdata import write_spatialdata

        raw = False if args.no_raw else args.raw
        for slide in args.slides:
            print(f"qdplex: {show_path(write_spatialdata(slide, args.out, raw=raw))}")
    else:
        if args.raw is not None or args.no_raw:
            raise QdplexError("expected --raw/--no-raw only with 'qdplex export spatialdata'")
        from .export.geojson import write_cells_geojson

        for slide in args.slides:
            print(f"qdplex: {show_path(write_cells_geojson(slide, args.out))}")
    return 0


# --------------------------------------------------------------------------- train-nuclei
def _add_train_nuclei(sub) -> None:
    p = sub.add_parser(
        "train-nuclei",
        help="train a nucleus model on annotated images (needs the 'train' extra: PyTorch)",
        description="Train qdplex's nucleus model (a small U-Net, see docs/models.md) on IMAGES/NAME.tif with "
        "instance masks MASKS/NAME.tif, holding out a tenth of the images to choose the best weights, and write "
        "it as ONNX to --out; use it with [segmentation] model = \"that.onnx\". Needs pip install 'qdplex[train]'.",
    )
    p.add_argument("images", metavar="IMAGES", type=Path, help="folder of 2-D .tif nuclear images")
    p.add_argument("masks", metavar="MASKS", type=Path, help="folder of instance masks (same file names, 0 = background)")
    p.add_argument("--out", type=Path, required=True, help="the ONNX model file to write")
    p.add_argument("--minutes", type=float, default=60.0, help="training wall time (default 60)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--init", metavar="MODEL", default=None,
                   help="fine-tune this ONNX nucleus model ('shipped' = the model inside qdplex) instead of training from scratch")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3, or 5e-4 with --init)")
    p.set_defaults(func=_cmd_train_nuclei)


def _cmd_train_nuclei(args) -> int:
    from .segment.train import require_torch, train_nuclei

    require_torch()
    init = args.init
    if init == "shipped":
        from .segment.infer import DEFAULT_MODEL as init
    lr = args.lr if args.lr is not None else (2e-3 if init is None else 5e-4)
    rec = train_nuclei(args.images, args.masks, args.out, minutes=args.minutes, max_steps=args.max_steps, seed=args.seed,
                       init=init, lr=lr)
    print(f"wrote {args.out}: {rec['steps']} steps in {rec['train_minutes']} min, best validation loss {rec['best_val_loss']}")
    return 0


_REGISTRY = [_add_run, _add_synth, _add_report, _add_agree, _add_check_panel, _add_export, _add_train_nuclei]


#: Optional imports → the extra that brings them (pyproject.toml [project.optional-dependencies]).
_EXTRAS = {"ome_zarr": "omezarr", "imagecodecs": "codecs", "spatialdata": "spatialdata",
           "napari": "napari"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qdplex`` command (also used to generate docs/cli.md)."""
    parser = argparse.ArgumentParser(
        prog="qdplex",
        description="Multiplexed quantum-dot immunofluorescence: spectral unmixing, "
        "segmentation and per-cell biomarker tables.",
    )
    parser.add_argument("--version", action="version", version=f"qdplex {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _REGISTRY:
        add(sub)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``qdplex`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QdplexError as e:
        if args.debug:
            raise
        print(f"qdplex: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qdplex: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:  # an optional dependency (pyproject.toml extras) not installed
        if args.debug:
            raise
        extra = _EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            print(f"qdplex: internal error: ModuleNotFoundError: {e} (rerun with --debug for the traceback)",
                  file=sys.stderr)
            return 3
        print(f"qdplex: error: this needs the optional package '{e.name}': pip install 'qdplex[{extra}]'",
              file=sys.stderr)
        return 2
    except Exception as e:  # unexpected: still one line, traceback with --debug
        if args.debug:
            raise
        print(f"qdplex: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
