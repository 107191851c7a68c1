"""Exports of a finished slide folder (``OUT/<slide>/``) for the tools next door.

* :func:`write_spatialdata` — one SpatialData zarr (scverse: napari-spatialdata,
  spatialdata-plot, sopa, squidpy): raw and unmixed images, nuclei and cells labels,
  the cell table annotating the cells labels. Needs ``pip install 'qdplex[spatialdata]'``.
* :func:`write_cells_geojson` — ``cells.geojson``, QuPath cell objects (cell outline,
  nucleus, measurements, positivity as the classification). Needs only the core.

Both read only the files qdplex wrote into the folder (and, for the raw image, the
input slide that ``run.json`` names) and write atomically; the command line is
``qdplex export spatialdata|geojson OUT/<slide>``.
"""

from __future__ import annotations

from .geojson import cells_geojson, write_cells_geojson
from .spatialdata import to_spatialdata, write_spatialdata

__all__ = ["write_spatialdata", "to_spatialdata", "write_cells_geojson", "cells_geojson"]
