"""Turn qdplex objects into napari layer-data tuples ``(data, kwargs, layer_type)``.

Every layer made here carries ``metadata["qdplex"]``, a dict saying what it is
(``kind``: ``"slide"``, ``"abundance"``, ``"residual"``, ``"nuclei"`` or ``"cells"``)
and which slide it belongs to; the cells layer's dict is the plugin's state for the
slide (panel, thresholds, summary, library, raw image), read by the widgets.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from ._colors import emission_nm, wavelength_to_rgb

__all__ = [
    "slide_layer",
    "abundance_layers",
    "label_layers",
    "result_layers",
    "features_for",
    "plane_colormap",
]

#: planes that are not a fluor: shown in grey (autofluorescence) or hidden (residual)
_RESIDUAL = "residual"
#: lazy unmixed stacks up to this size are computed once (not once per plane) before display
_MATERIALIZE_BYTES = 1 << 30
#: numbers each pipeline run, so widgets can tell a re-run's cells layer from an edit
_RUNS = itertools.count(1)


def plane_colormap(channel, library=None):
    """A black → emission-colour napari Colormap for one unmixed plane (grey when unknown)."""
    from napari.utils.colormaps import Colormap

    nm = emission_nm(channel, library)
    if nm is None:
        return "gray"
    rgb = wavelength_to_rgb(nm)
    return Colormap(
        colors=np.array([[0.0, 0.0, 0.0, 1.0], [*rgb, 1.0]]),
        name=f"qdplex-{int(round(nm))}nm",
        display_name=f"{int(round(nm))} nm",
    )


def _contrast(plane) -> tuple[float, float]:
    """Display limits from the 0.5th–99.8th percentiles of a (subsampled) plane."""
    step = max(1, max(plane.shape) // 1024)
    a = np.asarray(plane[::step, ::step], dtype=float)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(a, [0.5, 99.8])
    return (float(lo), float(hi if hi > lo else lo + 1.0))


def _scale(pixel_size_um):
    return None if not pixel_size_um else (float(pixel_size_um), float(pixel_size_um))


def slide_layer(image, *, panel_path=None) -> tuple:
    """The raw slide (C×Y×X, lazy) as one grey image layer with a slider over channels."""
    meta = {"kind": "slide", "slide": image.name, "image": image}
    if panel_path is not None:
        meta["panel_path"] = str(panel_path)
    scale = _scale(image.pixel_size_um)
    kwargs = {
        "name": image.name,
        "colormap": "gray",
        "metadata": {"qdplex": meta},
        "visible": False,
        "axis_labels": ("channel", "y", "x"),
    }
    if scale:
        kwargs["scale"] = (1.0, *scale)
    return (image.data, kwargs, "image")


def abundance_layers(abundances, *, library=None, residual=None, slide=None) -> list[tuple]:
    """One additive image layer per unmixed plane, named by marker, coloured by emission.

    Parameters
    ----------
    abundances : qdplex.model.MultiplexImage
        Unmixed planes (named by marker, fluor in ``Channel.fluor``); a plane
        named ``residual`` is shown hidden with the ``magma`` colormap.
    library : qdplex.spectra.SpectralLibrary, optional
        Gives emission peaks for planes whose channel lacks ``emission_nm``.
    residual : array-like, optional
        The per-pixel RMS misfit, added as a hidden ``residual`` layer.
    slide : str, optional
        Slide name recorded in the layers' metadata.
    """
    slide = slide or abundances.name
    scale = _scale(abundances.pixel_size_um)
    data = abundances.data
    if hasattr(data, "compute") and data.nbytes <= _MATERIALIZE_BYTES:
        data = data.compute()
    out = []
    for i, ch in enumerate(abundances.channels):
        plane = data[i]
        is_res = ch.name == _RESIDUAL
        kwargs = {
            "name": ch.name,
            "colormap": "magma" if is_res else plane_colormap(ch, library),
            "blending": "additive",
            "visible": not is_res,
            "contrast_limits": _contrast(plane),
            "metadata": {"qdplex": {"kind": _RESIDUAL if is_res else "abundance", "slide": slide, "channel": ch}},
        }
        if scale:
            kwargs["scale"] = scale
        out.append((plane, kwargs, "image"))
    if residual is not None:
        res = np.asarray(residual)
        kwargs = {
            "name": _RESIDUAL,
            "colormap": "magma",
            "blending": "additive",
            "visible": False,
            "contrast_limits": _contrast(res),
            "metadata": {"qdplex": {"kind": _RESIDUAL, "slide": slide}},
        }
        if scale:
            kwargs["scale"] = scale
        out.append((res, kwargs, "image"))
    return out


def features_for(table: pd.DataFrame) -> pd.DataFrame:
    """The cell table as a napari Labels ``features`` table (an ``index`` column = label ID)."""
    t = table
    if "CellID" not in t.columns:
        t = t.reset_index()
        if "CellID" not in t.columns:
            t = t.rename(columns={t.columns[0]: "CellID"})
    t = t.reset_index(drop=True)
    if "index" in t.columns:
        t = t.drop(columns="index")
    t.insert(0, "index", t["CellID"].to_numpy().astype(np.int64))
    return t


def label_layers(nuclei, cells, *, table=None, state=None, pixel_size_um=None, slide="slide") -> list[tuple]:
    """Nuclei and cells as labels layers; the cell table is the cells layer's ``features``.

    ``state`` (a dict) becomes the cells layer's ``metadata["qdplex"]`` (plus
    ``kind="cells"`` and the slide name).
    """
    scale = _scale(pixel_size_um)
    base = {} if not scale else {"scale": scale}
    nuc = (
        np.asarray(nuclei),
        {**base, "name": "nuclei", "visible": False, "metadata": {"qdplex": {"kind": "nuclei", "slide": slide}}},
        "labels",
    )
    meta = dict(state or {})
    meta.update(kind="cells", slide=slide)
    kw = {**base, "name": "cells", "opacity": 0.6, "metadata": {"qdplex": meta}}
    if table is not None:
        kw["features"] = features_for(table)
    return [nuc, (np.asarray(cells), kw, "labels")]


def _unmix_offset(result) -> float:
    """The camera offset the pipeline removed before unmixing (as :func:`qdplex.slide.run_slide` picks it)."""
    used = getattr(result.unmixed, "offset", None)  # given, from the file, or estimated from the slide
    if used is not None:
        used = np.asarray(used, dtype=float)
        return float(used.flat[0]) if used.size and np.all(used == used.flat[0]) else used
    v = result.panel.camera_offset_for(result.image)
    return 0.0 if v is None else v


def result_layers(result) -> list[tuple]:
    """All layers for a :class:`qdplex.slide.SlideResult`: unmixed planes, residual, nuclei, cells."""
    image = result.image
    ab = result.unmixed.abundances
    residual = getattr(result.unmixed, "residual", None)
    if residual is not None and _RESIDUAL in ab.channel_names:
        residual = None
    layers = abundance_layers(ab, library=result.library, residual=residual, slide=image.name)
    state = {
        "run_id": next(_RUNS),
        "panel": result.panel,
        "thresholds": dict(result.thresholds or {}),
        "summary": result.summary,
        "library": result.library,
        "image": image,
        # the exact fit: mixing matrix (C×K, columns = abundance planes) and camera offset used
        "matrix": getattr(result.unmixed, "matrix", None),
        "endmembers": [c.fluor or c.name for c in ab.channels],
        "offset": _unmix_offset(result),
    }
    seg = result.segmentation
    layers += label_layers(
        seg.nuclei, seg.cells, table=result.table, state=state, pixel_size_um=image.pixel_size_um, slide=image.name
    )
    return layers
