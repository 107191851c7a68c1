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
    name = (record.get("batch") or {}).get("slide") or folder.name
    return SlideOutputs(folder=folder, name=str(name), unmixed=found["unmixed.ome.tif"],
                        nuclei=found["nuclei.ome.tif"], cells=found["cells.ome.tif"], table=table,
                        panel=panel, record=record, input=Path(raw) if raw else None)


def register_outputs(folder, written) -> bool:
    """Add files written into a slide folder to its qdplex record (``run.json``).

    ``qdplex run`` replaces a slide folder (``--force``) only when its record lists
    every file in it; an export written inside the folder is listed so that stays true.
    Outputs outside ``folder`` and folders without the record are left alone.

    Returns
    -------
    bool
        Whether the record was updated.
    """
    from ..io import atomic_path
    from ..outputs import RECORD_KEY
    from ..provenance import file_sha256

    folder = Path(folder).resolve()
    run_json = folder / "run.json"
    try:
        doc = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    rec = doc.get(RECORD_KEY) if isinstance(doc, dict) else None
    if not isinstance(rec, dict) or not isinstance(rec.get("outputs"), dict):
        return False
    added, replaced = {}, []
    for w in written:
        w = Path(w).resolve()
        if not w.is_relative_to(folder):
            continue
        replaced.append(w.relative_to(folder).as_posix())
        for f in ([w] if w.is_file() else sorted(p for p in w.rglob("*") if p.is_file())):
            added[f.relative_to(folder).as_posix()] = file_sha256(f)  # the completion record's content hash
    if not added:
        return False
    for k in [k for k in rec["outputs"] if any(k == r or k.startswith(r + "/") for r in replaced)]:
        del rec["outputs"][k]  # an earlier export of the same path
    rec["outputs"].update(added)
    with atomic_path(run_json) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return True
