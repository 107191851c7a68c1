"""Read back what a finished ``OUT/<slide>/`` folder holds, for the exporters."""

from __future__ import annotations

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
    from .. import outputs

    folder = Path(slide_dir)
    if not folder.is_dir():
        raise InputError("expected a slide output folder (OUT/<slide>) written by qdplex run, found no folder",
                         path=folder)
    found = {
        "unmixed.ome.tif": outputs.find_image(folder, "unmixed"),
        "nuclei.ome.tif": outputs.find_image(folder, "nuclei"),
        "cells.ome.tif": outputs.find_image(folder, "cells"),
        "cells.csv": _first(folder, [outputs.table_path(folder).name]),
        "run.json": _first(folder, ["run.json"]),
    }
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise InputError(f"expected the slide outputs {missing} (written by qdplex run), found them missing",
                         path=folder)
    record = outputs.read_run_record(folder)
    panel = outputs.panel_from_record(record, where=found["run.json"])
    table = pd.read_csv(found["cells.csv"])
    inputs = record.get("inputs") or []
    raw = inputs[0].get("path") if inputs and isinstance(inputs[0], dict) else None
    name = (record.get(outputs.RECORD_KEY) or {}).get("slide") or folder.name
    return SlideOutputs(folder=folder, name=str(name), unmixed=found["unmixed.ome.tif"],
                        nuclei=found["nuclei.ome.tif"], cells=found["cells.ome.tif"], table=table,
                        panel=panel, record=record, input=Path(raw) if raw else None)
