"""QC reports: one self-contained HTML page per slide and one for the cohort.

Layering (pure → from disk → CLI)::

    slide_report_html(...)        arrays, tables and dicts → HTML text (figures inline)
    write_slide_report(slide_dir, panel=..., record=...)   the written images of OUT/<slide>/
                                  and what the caller has → slide_dir/qc/report.html
    slide_report_from_outputs(slide_dir)        the same, everything read from OUT/<slide>/
    cohort_report_html(manifest, table, ...)    tables → HTML text
    write_cohort_report(out)                    OUT/manifest.csv + cohort_summary.csv → OUT/report.html
    report_from_outputs(out)                    every slide's report, then the cohort's (``qdplex report OUT``)

The pages load nothing from the network: figures are inline base64 PNGs and the
style sheet is inline, so a report can be mailed or archived as one file.
Every figure is drawn on a subsampled preview (at most ``max_side`` pixels a side,
see :func:`qdplex.figures.preview`), so reports of whole slides stay small and cheap.
"""

from __future__ import annotations

import html
import json
import math
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from . import figures
from .errors import InputError, OutputError, QdplexError

__all__ = [
    "slide_report_html",
    "write_slide_report",
    "slide_report_from_outputs",
    "cohort_report_html",
    "write_cohort_report",
    "report_from_outputs",
]

#: File name of the reports (``OUT/<slide>/qc/report.html`` and ``OUT/report.html``).
REPORT_NAME = "report.html"

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
color:#1d1d1f;background:#fff;padding:0 16px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
.meta{color:#555;font-size:13px}.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}
figure{margin:0}figure img{width:100%;height:auto;border:1px solid #ddd}figcaption{font-size:12px;color:#555}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td.l,th.l{text-align:left}.bad{color:#b00020;font-weight:600}.ok{color:#1b7f3b}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:6px 10px;font-size:13px;margin:6px 0}
.scroll{overflow-x:auto;max-width:100%}
img.px{image-rendering:pixelated;background:#000}figcaption.t{font-size:14px;font-weight:600;color:#1d1d1f;margin-bottom:4px}
.sw{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;vertical-align:middle;border:1px solid #999}
.cbar{display:flex;align-items:center;gap:6px;margin:4px 0}.cbar .grad{display:inline-block;width:200px;height:12px}
table.heat td{min-width:44px}
.err{background:#fdecea;border-left:4px solid #b00020;padding:6px 10px;font-size:13px;margin:6px 0}
"""


# --------------------------------------------------------------------------- html helpers
def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f):
            return ""
        return f"{f:.4g}"
    return str(v)


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _table(df: pd.DataFrame, *, left: Sequence[str] = (), raw_html: Sequence[str] = (), index: bool = False) -> str:
    """An HTML table; columns in ``raw_html`` are inserted unescaped (links)."""
    cols = list(df.columns)
    head = ""
    if index:
        head += f"<th class=l>{_e(df.index.name or '')}</th>"
    head += "".join(f"<th class={'l' if c in left else 'r'}>{_e(c)}</th>" for c in cols)
    rows = []
    for idx, row in df.iterrows():
        cells = f"<td class=l>{_e(idx)}</td>" if index else ""
        for c in cols:
            v = row[c]
            text = str(v) if c in raw_html else _e(_fmt(v))
            cells += f"<td class={'l' if c in left or c in raw_html else 'r'}>{text}</td>"
        rows.append(f"<tr>{cells}</tr>")
    return f"<div class=scroll><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def _figure_html(make, caption: str) -> str:
    """Render ``make()`` (→ Figure) inline; a failing figure becomes a visible error box."""
    try:
        uri = figures.to_data_uri(make())
    except Exception as e:  # a QC figure must not sink the slide; say what went wrong instead
        return f"<div class=err>{_e(caption)}: not drawn ({_e(type(e).__name__)}: {_e(e)})</div>"
    return f"<figure><img alt=\"{_e(caption)}\" src=\"{uri}\"><figcaption>{_e(caption)}</figcaption></figure>"


def _image_html(make_rgb, title: str, caption_html: str, fmt: str = "png") -> str:
    """Inline an RGB preview (``make_rgb()`` → Y×X×3) pixel for pixel; a failure becomes an error box."""
    try:
        uri = figures.rgb_to_data_uri(make_rgb(), fmt)
    except Exception as e:  # a QC figure must not sink the slide; say what went wrong instead
        return f"<div class=err>{_e(title)}: not drawn ({_e(type(e).__name__)}: {_e(e)})</div>"
    return (f"<figure><figcaption class=t>{_e(title)}</figcaption><img class=px alt=\"{_e(title)}\" src=\"{uri}\">"
            f"<figcaption>{caption_html}</figcaption></figure>")


def _rgb_css(rgb) -> str:
    return "#" + "".join(f"{int(round(255 * min(max(float(c), 0.0), 1.0))):02x}" for c in rgb[:3])


def _legend(items) -> str:
    """Colour swatches with names, as inline HTML."""
    return " ".join(f"<span class=sw style=\"background:{_rgb_css(c)}\"></span>{_e(n)}" for n, c in items)


def _heat_table(df: pd.DataFrame, *, cmap: str = "viridis") -> str:
    """A numeric table with each cell shaded by its value (0 → the table's maximum)."""
    from matplotlib import colormaps

    data = df.to_numpy(dtype=float)
    vmax = float(np.nanmax(np.abs(data))) if data.size and np.isfinite(data).any() else 1.0
    cm = colormaps[cmap]
    head = f"<th class=l>{_e(df.index.name or '')}</th>" + "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    rows = []
    for name, vals in zip(df.index, data):
        cells = f"<td class=l>{_e(name)}</td>"
        for v in vals:
            if not np.isfinite(v):
                cells += "<td></td>"
                continue
            frac = min(max(v / vmax if vmax > 0 else 0.0, 0.0), 1.0)
            text = "#000" if frac > 0.6 else "#fff"
            cells += f"<td style=\"background:{_rgb_css(cm(frac))};color:{text}\">{v:.1f}</td>"
        rows.append(f"<tr>{cells}</tr>")
    return f"<div class=scroll><table class=heat><tr>{head}</tr>{''.join(rows)}</table></div>"


def _atomic_write_text(path: Path, text: str) -> Path:
    from .io import atomic_path

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    except OSError as e:
        raise OutputError(f"expected a writable report file, found {type(e).__name__}: {e}", path=path) from None
    return path


# --------------------------------------------------------------------------- summary → tables
def summary_tables(summary: Mapping[str, Any], markers: Sequence[str] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a slide summary into a per-marker table and a table of the remaining scalars.

    Parameters
    ----------
    summary : mapping
        ``summary.json`` of a slide (JSON-able, possibly nested).
    markers : sequence of str
        Marker names; nested entries keyed by a marker become rows of the marker table.

    Returns
    -------
    per_marker : pandas.DataFrame
        One row per marker (index), one column per score (flattened ``a.b`` names).
    scalars : pandas.DataFrame
        Columns ``key``, ``value`` for everything else.
    """
    marker_set = set(markers)
    rows: dict[str, dict[str, Any]] = {}
    scalars: list[tuple[str, Any]] = []

    def flat(prefix: str, value, marker: str | None):
        if isinstance(value, Mapping):
            for k, v in value.items():
                k = str(k)
                if marker is None and k in marker_set:
                    flat(prefix, v, k)
                else:
                    flat(f"{prefix}.{k}" if prefix else k, v, marker)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            for i, v in enumerate(value):
                name = v.get("marker") or v.get("name") if isinstance(v, Mapping) else None
                if marker is None and name in marker_set:
                    flat(prefix, {k: x for k, x in v.items() if k not in ("marker", "name")}, name)
                else:
                    flat(f"{prefix}[{i}]", v, marker)
        else:
            if isinstance(value, (list, tuple)):
                value = ", ".join(_fmt(v) for v in value)
            if marker is None:
                scalars.append((prefix, value))
            else:
                rows.setdefault(marker, {})[prefix] = value

    flat("", summary, None)
    per_marker = pd.DataFrame.from_dict(rows, orient="index")
    # the main per-marker block loses its prefix (markers.HER2.h_score → h_score), others keep it (allred.total)
    cols = [str(c) for c in per_marker.columns]
    prefixes = [c.split(".", 1)[0] for c in cols if "." in c]
    if prefixes:
        main = max(set(prefixes), key=prefixes.count)
        short = [c.split(".", 1)[1] if c.startswith(main + ".") else c for c in cols]
        per_marker.columns = [sh if short.count(sh) == 1 else c for c, sh in zip(cols, short)]
    if len(per_marker):
        per_marker = per_marker.reindex([m for m in markers if m in rows])
        per_marker.index.name = "marker"
    return per_marker, pd.DataFrame(scalars, columns=["key", "value"])


def _drop_repeated_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Drop columns whose values repeat an earlier column (e.g. a summary's ``thresholds`` block)."""
    keep: list[str] = []
    for c in df.columns:
        col = df[c].astype(str)
        if not any(col.equals(df[k].astype(str)) for k in keep):
            keep.append(c)
    return df[keep]


# --------------------------------------------------------------------------- library, crosstalk
def _library_curves(library, names: Sequence[str], step_nm: float = 1.0):
    """``(wavelengths, {name: curve})``: the library's spectra for ``names`` on one common grid."""
    spectra = [library[n] for n in names if n in library]
    if not spectra:
        return np.array([]), {}
    lo = min(s.range_nm[0] for s in spectra)
    hi = max(s.range_nm[1] for s in spectra)
    wl = np.arange(lo, hi + step_nm, step_nm)
    return wl, {s.name: s.sample(wl) for s in spectra}


def _crosstalk_html(library, channels) -> str:
    """The spectral pre-flight check (:func:`qdplex.crosstalk.check_panel`) as HTML: warnings,
    per-endmember table and the expected crosstalk heat map."""
    from .crosstalk import check_panel

    if not channels:
        return "<div class=warn>the raw image's channels are unknown: no crosstalk check</div>"
    try:
        check = check_panel(library, channels)
    except Exception as e:  # a singular library is itself the finding to report
        return f"<div class=err>spectral check failed: {_e(type(e).__name__)}: {_e(e)}</div>"
    parts = [f"<p>condition number of the column-normalised mixing matrix: "
             f"<b>{check.condition_number:.3g}</b> (1 = orthogonal spectra)</p>"]
    parts += [f"<div class=warn>{_e(w)}</div>" for w in check.warnings]
    per = pd.DataFrame({"peak channel": check.peak_channel, "coverage %": 100 * check.coverage,
                        "noise amplification": check.noise_amplification})
    per.index.name = "endmember"
    parts.append(_table(per, left=["peak channel"], index=True))
    parts.append("<p><b>Expected crosstalk without unmixing (%)</b>: the signal of each fluor (rows) in the peak "
                 "channel of each other fluor (columns), as % of its own peak-channel signal — what reading "
                 "channels without unmixing would give.</p>")
    parts.append(_heat_table(100 * check.crosstalk))
    return "\n".join(parts)


# --------------------------------------------------------------------------- slide report
def slide_report_html(
    *,
    name: str,
    panel,
    abundances,
    nuclei,
    cells,
    table: pd.DataFrame,
    thresholds: Mapping[str, float] | None = None,
    summary: Mapping[str, Any] | None = None,
    residual=None,
    saturated=None,
    library=None,
    channels=None,
    timings: Mapping[str, float] | None = None,
    source: str | None = None,
    image_shape: tuple[int, int] | None = None,
    max_side: int = 1024,
    warnings: Sequence[str] = (),
) -> str:
    """The QC report of one slide as a self-contained HTML page.

    Parameters
    ----------
    name : str
        Slide name.
    panel : qdplex.panel.Panel
        The panel the slide was run with.
    abundances : qdplex.model.MultiplexImage
        Unmixed planes named by marker (plus the nuclear stain, ``AF``...).
    nuclei, cells : Y×X label arrays (numpy or dask)
        The segmentation (only subsampled previews are computed).
    table : pandas.DataFrame
        The cell table (one column per marker, MCQuant order).
    thresholds : mapping marker → float, optional
        Positivity thresholds, drawn on the histograms.
    summary : mapping, optional
        Slide scores (``summary.json``).
    residual, saturated : Y×X arrays (numpy or dask), optional
        Per-pixel unmixing residual and saturation mask.
    library : qdplex.spectra.SpectralLibrary, optional
        Reference spectra used for unmixing (plotted with the channel bands).
    channels : sequence of qdplex.model.Channel, optional
        The raw image's channels (bands for the spectra plot, crosstalk check).
    timings : mapping stage → seconds, optional
    source : str, optional
        The input file.
    image_shape : (int, int), optional
        Full-resolution Y×X size, when ``abundances`` is a reduced pyramid level.
    max_side : int
        Longest side of image previews in pixels.
    warnings : sequence of str
        The slide's warnings (from any stage), shown under the title.

    Returns
    -------
    str
        The HTML page.
    """
    thresholds = dict(thresholds or {})
    summary = dict(summary or {})
    markers = [m.name for m in panel.markers]
    nuclear_name = panel.nuclear_stain
    present = set(abundances.channel_names)
    n_cells = int(len(table))

    parts = [f"<h1>QC report: {_e(name)}</h1>"]
    meta = [f"panel <b>{_e(panel.name)}</b>", f"{n_cells} cells",
            "image {}×{} px".format(*(image_shape or abundances.shape[1:]))]
    if source:
        meta.append(f"input {_e(source)}")
    from . import __version__

    meta.append(f"qdplex {__version__}, {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    parts.append(f"<p class=meta>{' · '.join(meta)}</p>")
    parts += [f"<div class=warn>warning: {_e(w)}</div>" for w in warnings]

    # scores
    parts.append("<h2>Scores</h2>")
    per_marker, scalars = summary_tables(summary, markers)
    thr = pd.DataFrame(
        {"fluor": [m.fluor for m in panel.markers], "compartment": [m.compartment for m in panel.markers],
         "threshold": [thresholds.get(m.name) for m in panel.markers]},
        index=pd.Index(markers, name="marker"),
    )
    if len(per_marker):
        thr = thr.join(per_marker.drop(columns=[c for c in per_marker.columns if c in thr.columns]), how="left")
        thr = _drop_repeated_columns(thr)
    parts.append(_table(thr, left=["fluor", "compartment"], index=True))
    if len(scalars):
        parts.append(_table(scalars, left=["key"]))
    if timings:
        t = pd.DataFrame({"stage": list(timings), "seconds": [float(v) for v in timings.values()]})
        parts.append(_table(t, left=["stage"]))

    # images: every preview in one computation (lazy planes of one unmixing share their graph)
    parts.append("<h2>Images</h2><div class=grid>")
    shown = [m for m in markers if m in present]
    colors = [figures.PALETTE[i % len(figures.PALETTE)] for i in range(len(shown))]
    nuc_color = tuple(0.6 * c for c in figures.NUCLEAR_RGB)
    has_nuc = nuclear_name in present
    try:
        *marker_prev, nuc_prev, nuclei_prev, cells_prev, res, sat = figures.previews(
            [abundances.plane(m) for m in shown] + [abundances.plane(nuclear_name) if has_nuc else None,
                                                    nuclei, cells, residual, saturated], max_side)
    except Exception as e:  # unreadable planes: the rest of the report still helps
        parts.append(f"<div class=err>images not drawn ({_e(type(e).__name__)}: {_e(e)})</div></div>")
    else:
        def composite():
            planes = list(marker_prev) + ([nuc_prev] if has_nuc else [])
            tops = [2.0 * thresholds[m] if thresholds.get(m) is not None else None for m in shown]
            return figures.composite_rgb(planes, list(colors) + ([nuc_color] if has_nuc else []),
                                         tops + ([None] if has_nuc else []))

        legend = _legend(list(zip(shown, colors)) + ([(nuclear_name, nuc_color)] if has_nuc else []))
        parts.append(_image_html(composite, "Unmixed channels", legend +
                                 "<br>each marker plane from its 1st percentile (black) to the larger of its 99.5th "
                                 "percentile and twice its positivity threshold (full colour), so a marker without "
                                 "positive cells stays dark; over the nuclear stain", fmt="jpeg"))
        parts.append(_image_html(lambda: figures.segmentation_rgb(nuc_prev, nuclei_prev, cells_prev), "Segmentation",
                                 _legend([("nuclei", figures.NUCLEUS_EDGE), ("cells", figures.CELL_EDGE)]) +
                                 f"<br>{n_cells} cells on the {_e(nuclear_name)} plane"))
        if res is not None:
            res = res.astype(np.float32)
            finite = res[np.isfinite(res)]
            vmax = float(np.percentile(finite, 99.5)) if finite.size else 1.0
            stats = (f"median {np.median(finite):.4g}, 99th percentile {np.percentile(finite, 99):.4g}"
                     if finite.size else "")
            if sat is not None:
                stats += f"; {float(np.mean(sat)) * 100:.2f}% of pixels saturated" + \
                    _legend([("saturated", figures.SATURATED_RGB)])
            bar = (f"<div class=cbar><span>0</span><span class=grad style=\"background:"
                   f"{figures.colormap_css('magma')}\"></span><span>{vmax:.3g}</span></div>")
            parts.append(_image_html(lambda: figures.residual_rgb(res, sat, vmax=vmax)[0],
                                     "Unmixing residual (RMS misfit per pixel)", bar + stats, fmt="jpeg"))
        parts.append("</div>")

    # histograms
    parts.append("<h2>Per-cell intensities</h2>")
    cols = {m: table[m].to_numpy() for m in markers if m in table.columns}
    if cols:
        parts.append(_figure_html(lambda: figures.histogram_figure(cols, thresholds),
                                  "Per-cell mean abundance of each marker in its compartment; red line: positivity threshold"))
    else:
        parts.append(f"<div class=warn>the cell table has no marker columns {markers}</div>")

    # spectra and crosstalk
    parts.append("<h2>Spectra and expected crosstalk</h2>")
    if library is not None:
        endmembers = [panel.nuclear_stain] + [m.fluor for m in panel.markers]
        endmembers += [n for n in getattr(library, "names", []) if str(n).upper().startswith("AF")]
        labels = {m.fluor: f"{m.fluor} ({m.name})" for m in panel.markers}
        colors = {m.fluor: figures.PALETTE[i % len(figures.PALETTE)] for i, m in enumerate(panel.markers)}
        colors[panel.nuclear_stain] = figures.NUCLEAR_RGB
        colors.update({n: figures.AF_RGB for n in endmembers if str(n).upper().startswith("AF")})
        bands = [c.band for c in (channels or []) if getattr(c, "band", None)]

        def spectra():
            wl, curves = _library_curves(library, endmembers)
            return figures.spectra_figure(wl, curves, bands=bands, labels=labels, colors=colors)

        parts.append(_figure_html(spectra, "Reference spectra of the library used for unmixing; lighter band: the range the image's channels cover"))
        parts.append(_crosstalk_html(library, channels))
    else:
        parts.append("<div class=warn>no spectral library recorded for this slide</div>")

    return _page(f"qdplex QC: {name}", "\n".join(parts))


def write_slide_report(slide_dir, *, panel, record: Mapping[str, Any] | None = None, table: pd.DataFrame | None = None,
                       summary: Mapping[str, Any] | None = None, library=None, channels=None,
                       max_side: int = 1024) -> Path:
    """Write ``slide_dir/qc/report.html`` for a slide whose images are written in ``slide_dir``.

    The one report writer for every slide (any storage, just computed or rebuilt by
    ``qdplex report``): the image previews come from the written (pyramidal) images,
    read at the coarsest level still ``max_side`` pixels across, so the report of a
    whole slide reads a few MB.

    Parameters
    ----------
    slide_dir : path
        ``OUT/<slide>`` holding ``unmixed``, ``nuclei`` and ``cells`` images (either format).
    panel : qdplex.panel.Panel
    record : mapping, optional
        The slide's ``run.json`` (thresholds, timings, inputs, warnings).
    table, summary : optional
        The cell table and the slide scores (default: read from ``slide_dir``).
    library : SpectralLibrary, optional
        The spectra used for unmixing (spectra plot and crosstalk check).
    channels : sequence of Channel, optional
        The raw image's channels.

    Returns
    -------
    Path
        The written report (written atomically). A report that cannot be built
        becomes a short page saying why, with a RuntimeWarning.
    """
    from . import outputs
    from .io import read_image

    slide_dir = Path(slide_dir)
    rec = dict(record or {})
    name = slide_dir.name
    try:
        paths = {k: outputs.find_image(slide_dir, k) for k in outputs.IMAGE_KINDS}
        missing = [k for k, p in paths.items() if p is None]
        if missing:
            raise InputError(f"expected the slide images {missing} to build its report, found them missing",
                             path=slide_dir)
        if table is None:
            tp = outputs.table_path(slide_dir, "parquet")
            table = pd.read_parquet(tp) if tp.is_file() else pd.read_csv(outputs.table_path(slide_dir, "csv"))
        if summary is None:
            sp = slide_dir / outputs.SUMMARY_JSON
            summary = outputs.read_json(sp) if sp.is_file() else {}
        abundances = _read_for_preview(paths["unmixed"], max_side)  # lazy: only previews are computed
        nuclei = _read_for_preview(paths["nuclei"], max_side).data[0]
        cells = _read_for_preview(paths["cells"], max_side).data[0]
        residual = abundances.plane("residual") if "residual" in abundances.channel_names else None
        thresholds = rec.get("thresholds") or dict(summary).get("thresholds") or {}
        inputs = rec.get("inputs") or []
        source = inputs[0].get("path") if inputs and isinstance(inputs[0], Mapping) else None
        text = slide_report_html(
            name=name, panel=panel, abundances=abundances, nuclei=nuclei, cells=cells, table=table,
            thresholds={k: float(v) for k, v in thresholds.items() if v is not None},
            summary=summary, residual=residual, library=library, channels=channels,
            timings=rec.get("timings") or {}, source=source,
            image_shape=read_image(paths["unmixed"]).shape[1:], max_side=max_side,
            warnings=rec.get("warnings") or dict(summary).get("warnings") or (),
        )
    except Exception as e:  # the slide's tables and images are valid: keep them, say why the report is short
        warnings.warn(f"{name}: QC report not built ({type(e).__name__}: {e})", RuntimeWarning)
        text = _page(f"qdplex QC: {name}",
                     f"<h1>QC report: {_e(name)}</h1><div class=err>the report could not be built: "
                     f"{_e(type(e).__name__)}: {_e(e)}</div>")
    return _atomic_write_text(outputs.report_path(slide_dir), text)


# --------------------------------------------------------------------------- from disk
def _read_for_preview(path: Path, max_side: int):
    """Read ``path`` lazily at the coarsest pyramid level still ≥ ``max_side`` on its longer side.

    Whole-slide outputs are pyramidal OME-TIFFs (see :mod:`qdplex.io.writers`); reading a
    reduced level makes a report of a 50,000² slide read a few MB instead of the slide.
    """
    from .io import read_image

    img = read_image(path)
    for level in range(int(img.metadata.get("levels") or 1) - 1, 0, -1):
        try:
            low = read_image(path, level=level)
        except Exception:  # a level the reader cannot give: the full resolution still works
            continue
        if max(low.shape[1:]) >= max_side:
            return low
    return img


def slide_report_from_outputs(slide_dir, *, max_side: int = 1024) -> Path:
    """Rebuild ``slide_dir/qc/report.html`` from the files in a slide's output folder.

    Reads ``run.json`` (panel, thresholds, timings, input, warnings) through
    :mod:`qdplex.outputs`, then :func:`write_slide_report`. The spectra are the
    panel's library on the input's channels when the input is still readable.
    The completion record in ``run.json`` is updated with the new report's hash.

    Returns
    -------
    Path
        The written report.
    """
    from . import outputs
    from .io import read_image

    slide_dir = Path(slide_dir)
    rec = outputs.read_run_record(slide_dir)
    missing = [f"{k}{outputs.FORMATS['tiff']}" for k in outputs.IMAGE_KINDS if outputs.find_image(slide_dir, k) is None]
    if not any(outputs.table_path(slide_dir, f).is_file() for f in ("parquet", "csv")):
        missing.append("cells.csv")
    if missing:
        raise InputError(f"expected the slide outputs {missing} to rebuild its report, found them missing",
                         path=slide_dir)
    panel = outputs.panel_from_record(rec, where=slide_dir / outputs.RUN_JSON)
    inputs = rec.get("inputs") or []
    source = inputs[0].get("path") if inputs and isinstance(inputs[0], Mapping) else None
    library = channels = None
    if source and Path(source).exists():
        try:
            from .spectra import library_for_panel

            channels = read_image(source).channels
            library = library_for_panel(panel, channels)
        except Exception:  # the input moved or changed: the report goes without spectra
            library = channels = None
    path = write_slide_report(slide_dir, panel=panel, record=rec, library=library, channels=channels,
                              max_side=max_side)
    outputs.register_outputs(slide_dir, [path])
    return path


# --------------------------------------------------------------------------- cohort
def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        elif not isinstance(v, (list, tuple)):
            out[key] = v
    return out


def cohort_report_html(manifest: pd.DataFrame, scores: pd.DataFrame | None = None, *,
                       title: str = "qdplex cohort report", links: Mapping[str, str] | None = None,
                       max_distributions: int = 24) -> str:
    """The cohort report as a self-contained HTML page.

    Parameters
    ----------
    manifest : pandas.DataFrame
        One row per slide with at least ``slide`` and ``status`` (``"ok"``/``"failed"``);
        ``error``, ``input`` and ``seconds`` when present.
    scores : pandas.DataFrame, optional
        One row per slide, a ``slide`` column and numeric slide scores (``cohort_summary.csv``).
    links : mapping slide → relative URL, optional
        Per-slide report links.

    Returns
    -------
    str
    """
    links = dict(links or {})
    man = manifest.copy()
    if "slide" not in man.columns or "status" not in man.columns:
        raise InputError(f"expected a manifest with columns 'slide' and 'status', found {list(man.columns)}")
    man["slide"] = man["slide"].astype(str)
    ok = man["status"].astype(str) == "ok"
    parts = [f"<h1>{_e(title)}</h1>",
             f"<p class=meta>{len(man)} slides: <span class=ok>{int(ok.sum())} ok</span>, "
             f"<span class={'bad' if (~ok).any() else 'ok'}>{int((~ok).sum())} failed</span></p>"]

    parts.append("<h2>Failures</h2>")
    if (~ok).any():
        cols = [c for c in ("slide", "input", "error") if c in man.columns]
        parts.append(_table(man.loc[~ok, cols], left=cols))
    else:
        parts.append("<p>none</p>")

    table = man[[c for c in ("slide", "status", "seconds", "input") if c in man.columns]].copy()
    numeric: list[str] = []
    text_cols: list[str] = []
    if scores is not None and len(scores):
        sc = scores.copy()
        sc["slide"] = sc["slide"].astype(str)
        cols = [c for c in sc.columns if c != "slide" and c not in table.columns and sc[c].notna().any()]
        numeric = [c for c in cols if pd.api.types.is_numeric_dtype(sc[c]) and not pd.api.types.is_bool_dtype(sc[c])]
        text_cols = [c for c in cols if c not in numeric]
        numeric.sort(key=_score_priority)
        table = table.merge(sc[["slide"] + cols], on="slide", how="left")
    table.insert(0, "report", [f"<a href=\"{_e(links[s])}\">{_e(s)}</a>" if s in links else _e(s)
                               for s in table["slide"]])
    table = table.drop(columns=["slide"])
    parts.append("<h2>Slides</h2>")
    parts.append(_table(table, left=["status", "input"] + text_cols, raw_html=["report"]))

    parts.append("<h2>Score distributions</h2>")
    if numeric:
        shown = numeric[:max_distributions]
        sc_ok = table  # includes failed slides as NaN rows, which the plot drops
        parts.append(_figure_html(lambda: figures.distribution_figure(sc_ok, shown),
                                  "One point per slide; boxes: quartiles" +
                                  (f" (first {max_distributions} of {len(numeric)} scores)" if len(numeric) > len(shown) else "")))
    else:
        parts.append("<p>no slide scores yet</p>")
    return _page(title, "\n".join(parts))


_SCORE_ORDER = ("percent_positive", "pct_positive", "h_score", "allred", "score_value", "percent_complete", "load")


def _score_priority(column: str) -> tuple[int, str]:
    """Sort key putting the clinically read scores first in the distribution plots."""
    for i, suffix in enumerate(_SCORE_ORDER):
        if column.endswith(suffix):
            return (i, column)
    return (len(_SCORE_ORDER), column)


def _cohort_scores(out: Path, manifest: pd.DataFrame) -> pd.DataFrame | None:
    from . import outputs

    path = out / outputs.COHORT_SUMMARY
    if path.is_file():
        return pd.read_csv(path)
    rows = []
    for slide in manifest["slide"].astype(str):
        try:
            f = outputs.slide_dir_in(out, slide) / outputs.SUMMARY_JSON
        except QdplexError:
            continue
        if f.is_file():
            rows.append({"slide": slide, **_flatten(json.loads(f.read_text(encoding="utf-8")))})
    return pd.DataFrame(rows) if rows else None


def write_cohort_report(out) -> Path:
    """Write ``OUT/report.html`` from ``OUT/manifest.csv`` and ``OUT/cohort_summary.csv``.

    When ``cohort_summary.csv`` is absent the slides' ``summary.json`` files are used.

    Returns
    -------
    Path
        The written report.
    """
    from . import outputs

    out = Path(out)
    manifest = outputs.read_manifest(out)
    links = {}
    for slide in manifest["slide"].astype(str):
        try:
            d = outputs.slide_dir_in(out, slide)
        except QdplexError:  # a row naming '../x' or a link out of OUT is listed, never followed
            continue
        if outputs.report_path(d).is_file():
            links[slide] = f"{slide}/qc/{REPORT_NAME}"
    text = cohort_report_html(manifest, _cohort_scores(out, manifest),
                              title=f"qdplex cohort report: {out.resolve().name}", links=links)
    return _atomic_write_text(out / REPORT_NAME, text)


def report_from_outputs(out, *, max_side: int = 1024) -> list[Path]:
    """Rebuild every slide's QC report and the cohort report from the files in ``OUT``.

    Slides whose status in ``manifest.csv`` is not ``ok`` are listed in the cohort
    report only. This is what ``qdplex report OUT`` runs.

    Raises
    ------
    InputError
        When OUT has no manifest, or when some slide folders are unreadable (after
        writing every other report; the message names each folder and what is missing).

    Returns
    -------
    list of Path
        The slide reports, then the cohort report.
    """
    from . import outputs

    out = Path(out)
    manifest = outputs.read_manifest(out)
    written, failed = [], []
    for _, row in manifest.iterrows():
        if str(row.get("status")) != "ok":
            continue
        try:
            written.append(slide_report_from_outputs(outputs.slide_dir_in(out, row["slide"]), max_side=max_side))
        except QdplexError as e:  # one unreadable slide folder must not stop the others
            failed.append(str(e))
    written.append(write_cohort_report(out))
    if failed:
        raise InputError(f"expected readable outputs for every successful slide, found {len(failed)} "
                         f"that are not (the other reports were written): " + "; ".join(failed), path=out)
    return written
