"""A slide as one SpatialData zarr (scverse): ``OUT/<slide>/spatialdata.zarr``.

Elements (coordinate system ``"global"``, in µm — every element carries the slide's
pixel size as a :class:`spatialdata.transformations.Scale`):

* images ``raw`` — the input slide (channels named as read), and ``unmixed`` — one
  plane per marker, named by marker, plus the nuclear stain, autofluorescence and
  ``residual``; both multiscale (2× levels down to ≥ 64 px);
* labels ``nuclei`` and ``cells`` — a cell's ID equals its nucleus's ID;
* table ``table`` — the AnnData of ``cells.h5ad`` (:func:`qdplex.tables.to_anndata`),
  annotating ``cells``: ``obs["region"] == "cells"``, ``obs["instance_id"]`` = ``CellID``
  = the label value.

Needs the ``spatialdata`` extra (``pip install 'qdplex[spatialdata]'``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError, OutputError

__all__ = ["to_spatialdata", "write_spatialdata", "REGION", "INSTANCE_KEY", "REGION_KEY"]

REGION = "cells"
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"


def _spatialdata():
    try:
        import spatialdata
    except ImportError as err:
        raise OutputError("expected the 'spatialdata' package to write SpatialData, found it not installed: "
                          "pip install 'qdplex[spatialdata]'") from err
    return spatialdata


def _scale_factors(shape) -> list[int]:
    """2× pyramid levels while the smaller side stays ≥ 64 px."""
    side, out = int(min(shape[-2:])), []
    while side // 2 >= 64:
        out.append(2)
        side //= 2
    return out


def to_spatialdata(slide_dir, *, raw=None):
    """The SpatialData object of a finished slide folder (images lazy, not written).

    Parameters
    ----------
    slide_dir : str or Path
        ``OUT/<slide>`` as written by ``qdplex run``.
    raw : None, str, Path or False
        The raw slide: None = the input recorded in ``run.json``; a path = that slide
        file; False = no raw image.

    Returns
    -------
    spatialdata.SpatialData

    Raises
    ------
    InputError
        Outputs missing; the raw slide unreadable or of another size than the labels.
    OutputError
        ``spatialdata`` not installed.
    """
    sd = _spatialdata()
    from spatialdata.models import Image2DModel, Labels2DModel, TableModel
    from spatialdata.transformations import Scale

    from ..io import read_image, read_labels
    from ..tables import to_anndata
    from ._slide import read_slide_outputs

    s = read_slide_outputs(slide_dir)
    unmixed = read_image(s.unmixed)
    nuclei, cells = read_labels(s.nuclei), read_labels(s.cells)
    px = float(unmixed.pixel_size_um or 1.0)

    def tr():
        return {"global": Scale([px, px], axes=("y", "x"))}

    shape = cells.shape
    scales = _scale_factors(shape)
    images = {}
    raw_path = s.input if raw is None else (None if raw is False else Path(raw))
    if raw_path is not None:
        if not raw_path.exists():
            raise InputError("expected the raw slide named in run.json to include it in the SpatialData, found no "
                             "file (give the slide's new path, or leave the raw image out)", path=raw_path)
        img = read_image(raw_path)
        if tuple(img.data.shape[-2:]) != tuple(shape):
            raise InputError(f"expected a raw slide of {shape[0]}×{shape[1]} px like its labels, found "
                             f"{img.data.shape[-2]}×{img.data.shape[-1]}", path=raw_path)
        images["raw"] = Image2DModel.parse(img.data, dims=("c", "y", "x"), c_coords=list(img.channel_names),
                                           scale_factors=scales or None, transformations=tr())
    images["unmixed"] = Image2DModel.parse(unmixed.data, dims=("c", "y", "x"), c_coords=list(unmixed.channel_names),
                                           scale_factors=scales or None, transformations=tr())
    labels = {
        "nuclei": Labels2DModel.parse(nuclei, dims=("y", "x"), scale_factors=scales or None, transformations=tr()),
        "cells": Labels2DModel.parse(cells, dims=("y", "x"), scale_factors=scales or None, transformations=tr()),
    }
    adata = to_anndata(s.table, s.panel, provenance={"slide": s.name, "pixel_size_um": px})
    adata.obs[REGION_KEY] = pd.Categorical([REGION] * adata.n_obs)
    adata.obs[INSTANCE_KEY] = s.table["CellID"].astype(np.int64).to_numpy()
    table = TableModel.parse(adata, region=REGION, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    return sd.SpatialData(images=images, labels=labels, tables={"table": table})


def write_spatialdata(slide_dir, out_path=None, *, raw=None) -> Path:
    """Write one SpatialData zarr for a finished slide folder.

    Parameters
    ----------
    slide_dir : str or Path
        ``OUT/<slide>`` as written by ``qdplex run``.
    out_path : str or Path, optional
        The zarr folder to write (default ``slide_dir/spatialdata.zarr``); replaced
        as a whole when it exists. A zarr inside the slide folder is added to its
        ``run.json`` record of outputs.
    raw : None, str, Path or False
        As in :func:`to_spatialdata`.

    Returns
    -------
    Path
        The written ``.zarr`` folder (read it with ``spatialdata.read_zarr``).
    """
    from ..io import atomic_path
    from ..outputs import register_outputs

    out = Path(out_path) if out_path is not None else Path(slide_dir) / "spatialdata.zarr"
    sdata = to_spatialdata(slide_dir, raw=raw)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding", category=UserWarning)  # zarr's notice to libraries
        sdata.write(tmp.with_suffix(".zarr") if tmp.suffix != ".zarr" else tmp)
        if tmp.suffix != ".zarr":
            tmp.with_suffix(".zarr").rename(tmp)
    register_outputs(slide_dir, [out])  # qdplex wrote it: `qdplex run --force` may still replace the folder
    return out
