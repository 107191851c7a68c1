"""Read back what a finished ``OUT/<slide>/`` folder holds, for the exporters."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import InputError


@dataclass
class SlideOutputs:
    """The files of one finished slide folder (paths; the table and panel read)."""

    folder: Path
    name: str
    unmixed: Path
    nuclei: Path
    cells: Path
    table: pd.DataFrame
    panel: object
    record: dict
    input: Path | None  # the raw slide named in run.json (None when not recorded)


def _first(folder: Path, names) -> Path | None:
    for n in names:
        if (folder / n).exists():
            return folder / n
    return None


def read_slide_outputs(slide_dir) -> SlideOutputs:
    """The outputs of one slide folder written by ``qdplex run``.

    Raises
    ------
    InputError
        A file the exporters need (images, labels, ``cells.csv``, ``run.json``) is missing.
    """
    from ..report import _panel_from_record

    folder = Path(slide_dir)
    if not folder.is_dir():
        raise InputError("expected a slide output folder (OUT/<slide>) written by qdplex run, found no folder",
                         path=folder)
    found = {
        "unmixed.ome.tif": _first(folder, ["unmixed.ome.tif", "unmixed.ome.zarr"]),
        "nuclei.ome.tif": _first(folder, ["nuclei.ome.tif", "nuclei.ome.zarr"]),
        "cells.ome.tif": _first(folder, ["cells.ome.tif", "cells.ome.zarr"]),
        "cells.csv": _first(folder, ["cells.csv"]),
        "run.json": _first(folder, ["run.json"]),
    }
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise InputError(f"expected the slide outputs {missing} (written by qdplex run), found them missing",
                         path=folder)
    record = json.loads(found["run.json"].read_text(encoding="utf-8"))
    panel = _panel_from_record(record, found["run.json"])
    table = pd.read_csv(found["cells.csv"])
    inputs = record.get("inputs") or []
    raw = inputs[0].get("path") if inputs and isinstance(inputs[0], dict) else None
    name = (record.get("batch") or {}).get("slide") or folder.name
    return SlideOutputs(folder=folder, name=str(name), unmixed=found["unmixed.ome.tif"],
                        nuclei=found["nuclei.ome.tif"], cells=found["cells.ome.tif"], table=table,
                        panel=panel, record=record, input=Path(raw) if raw else None)
