"""npe2 reader: QD slides (OME-TIFF / TIFF) and qdplex output folders (``OUT/<slide>/``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._layers import abundance_layers, label_layers, slide_layer

__all__ = ["napari_get_reader", "read_slide", "read_output_folder", "is_output_folder"]

_TIFF = (".tif", ".tiff")


def _output(folder: Path, kind: str) -> Path | None:
    """The slide's ``kind`` image in either output format (names owned by :mod:`qdplex.outputs`)."""
    from qdplex.outputs import find_image

    return find_image(folder, kind)


def is_output_folder(path) -> bool:
    """True when ``path`` is a qdplex slide output folder (holds unmixed.ome.tif/.zarr or cells.ome.tif/.zarr)."""
    p = Path(path)
    return p.is_dir() and (_output(p, "unmixed") is not None or _output(p, "cells") is not None)


def napari_get_reader(path):
    """Return a reader for ``path`` when qdplex can read it, else None (npe2 ``get_reader``)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.is_dir():
        if is_output_folder(p):
            return read_output_folder
        return read_slide if p.suffix.lower() == ".zarr" else None
    if p.suffix.lower() in _TIFF and p.is_file():
        return read_slide
    return None


def _one(path):
    return path[0] if isinstance(path, (list, tuple)) else path


def read_slide(path) -> list[tuple]:
    """Read one image file (or OME-Zarr folder) with :func:`qdplex.io.read_image`.

    A single-plane integer image is a label image (a labels layer); an image with
    fluor-named planes (an unmixed ``unmixed.ome.tif``) gives one coloured layer per
    plane; anything else is a raw slide: one grey layer with a channel slider.
    """
    from qdplex.io import read_image

    path = Path(_one(path))
    img = read_image(path)
    if img.shape[0] == 1 and np.issubdtype(img.data.dtype, np.integer) and img.data.dtype.itemsize >= 2 and _looks_like_labels(img):
        return [(np.asarray(img.data[0]), {"name": img.name, "metadata": {"qdplex": {"kind": "labels", "slide": img.name}}}, "labels")]
    unmixed = "residual" in img.channel_names or (
        any(c.fluor for c in img.channels) and all(c.bandwidth_nm in (None, 0) for c in img.channels)
    )
    if unmixed:
        return abundance_layers(img, library=_builtin_library(), slide=img.name)
    return [slide_layer(img)]


def _looks_like_labels(img) -> bool:
    name = (img.name or "").lower()
    return name in ("nuclei", "cells") or img.data.dtype in (np.uint32, np.int32, np.uint64, np.int64)


def _builtin_library():
    try:
        from qdplex.spectra import SpectralLibrary

        return SpectralLibrary.builtin()
    except Exception:  # the library only refines colours: the reader works without it
        return None


def _fit_library(panel, image):
    """The library the slide was unmixed with (rebuilt from its panel), else the built-ins."""
    if panel is not None:
        try:
            from qdplex.spectra import library_for_panel

            return library_for_panel(panel, None if image is None else image.channels)
        except Exception:  # e.g. a moved control image: fall back to the built-ins
            pass
    return _builtin_library()


def _read_json(path: Path) -> dict:
    from qdplex.errors import QdplexError
    from qdplex.outputs import read_json

    try:
        return read_json(path) if path.is_file() else {}
    except QdplexError:
        return {}


def _panel_from_run(run: dict):
    """The panel recorded in run.json (:func:`qdplex.outputs.panel_from_record`), or None."""
    import warnings

    from qdplex.errors import QdplexError
    from qdplex.outputs import panel_from_record

    if not isinstance(run.get("panel"), dict):
        return None
    try:
        return panel_from_record(run)
    except QdplexError as e:  # an unreadable panel only disables scoring widgets: say so
        warnings.warn(f"the panel in run.json cannot be read back ({e}); scoring widgets are off", RuntimeWarning)
        return None


def _input_image(run: dict):
    """The raw slide recorded in run.json (``inputs[0].path``), read lazily, or None when it is gone."""
    from qdplex.io import read_image

    candidates = [i.get("path") if isinstance(i, dict) else i for i in run.get("inputs") or []]
    candidates += [run.get(k) for k in ("input", "source")]
    for v in candidates:
        if isinstance(v, str) and Path(v).exists():
            try:
                return read_image(v)
            except Exception:  # provenance points at a file we cannot read any more
                return None
    return None


def read_output_folder(path) -> list[tuple]:
    """Read a qdplex slide output folder ``OUT/<slide>/`` (see docs/architecture.md).

    Gives the unmixed planes (coloured by emission, named by marker), nuclei and
    cells labels, and cells.csv as the cells layer's features; the panel,
    thresholds and summary come from run.json and summary.json.
    """
    import pandas as pd

    from qdplex.io import read_image

    from qdplex.outputs import RUN_JSON, SUMMARY_JSON, table_path

    folder = Path(_one(path))
    slide = folder.name
    run = _read_json(folder / RUN_JSON)
    summary = _read_json(folder / SUMMARY_JSON)
    layers: list[tuple] = []
    image = _input_image(run)
    if image is not None:
        layers.append(slide_layer(image))
    panel = _panel_from_run(run)
    library = _fit_library(panel, image)
    pixel_size = image.pixel_size_um if image is not None else None
    unmixed = _output(folder, "unmixed")
    if unmixed is not None:
        ab = read_image(unmixed)
        ab.name = slide
        pixel_size = pixel_size or ab.pixel_size_um
        layers += abundance_layers(ab, library=library, slide=slide)
    cells_path = _output(folder, "cells")
    if cells_path is not None:
        cells = _labels(cells_path)
        nuc_path = _output(folder, "nuclei")
        nuclei = _labels(nuc_path) if nuc_path is not None else np.zeros_like(cells)
        csv = table_path(folder, "csv")
        table = pd.read_csv(csv) if csv.is_file() else None
        thresholds = summary.get("thresholds") or run.get("thresholds") or {}
        state = {
            "panel": panel,
            "thresholds": {k: float(v) for k, v in thresholds.items() if v is not None},
            "summary": summary,
            "library": library,
            "image": image,
            "folder": str(folder),
            **_recorded_fit(run),
        }
        layers += label_layers(nuclei, cells, table=table, state=state, pixel_size_um=pixel_size, slide=slide)
    return layers


def _recorded_fit(run: dict) -> dict:
    """The mixing matrix, its endmembers and the camera offset the slide was unmixed with,
    as ``run.json`` records them (``stages.unmixing``); empty when not recorded."""
    rec = ((run or {}).get("stages") or {}).get("unmixing") or {}
    out: dict = {}
    if rec.get("matrix") and rec.get("endmembers"):
        out["matrix"], out["endmembers"] = np.asarray(rec["matrix"], dtype=float), list(rec["endmembers"])
    values = (rec.get("offset") or {}).get("values")
    if values is not None:
        v = np.asarray(values, dtype=float)
        out["offset"] = float(v.flat[0]) if v.size and np.all(v == v.flat[0]) else v
    return out


def _labels(path: Path) -> np.ndarray:
    from qdplex.io import read_image

    return np.asarray(read_image(path).data[0]).astype(np.uint32, copy=False)
