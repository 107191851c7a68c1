"""Per-cell tables that downstream tools read: MCQuant-order CSV, Parquet and AnnData.

Column order of :func:`cell_table` (docs/architecture.md, stable)::

    CellID,
    <marker> ...                       one per marker: its mean in the marker's own compartment
    <marker>_<compartment>_<stat> ...  every marker × compartment × statistic
    X_centroid, Y_centroid, Area, MajorAxisLength, MinorAxisLength,
    Eccentricity, Solidity, Extent, Orientation
    the rest                           perimeter, nucleus area, µm centroids, statistics of
                                       non-marker planes (nuclear stain, AF), QC columns,
                                       <marker>_positive, ...

Everything before ``X_centroid`` is a marker, as SCIMAP and other MCQuant readers assume.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError, OutputError
from .model import COMPARTMENTS
from .quantify import MORPHOLOGY_COLUMNS

__all__ = ["cell_table", "write_tables", "to_anndata", "MCQUANT_MORPHOLOGY", "marker_columns"]

#: The morphology block MCQuant writes after the markers, in its order.
MCQUANT_MORPHOLOGY = MORPHOLOGY_COLUMNS[:9]


_STAT_RE = re.compile(r"^(mean|std|var|sum|count|min|max|median|q\d+(_\d+)?)$")


def _stat_columns(columns, plane: str) -> list[str]:
    """Columns ``<plane>_<compartment>_<stat>`` among ``columns``, in their order."""
    out = []
    for c in columns:
        for comp in COMPARTMENTS:
            pre = f"{plane}_{comp}_"
            if c.startswith(pre) and _STAT_RE.match(c[len(pre):]):
                out.append(c)
                break
    return out


def marker_columns(table: pd.DataFrame) -> list[str]:
    """The marker block of an MCQuant-order table: every column before ``X_centroid``, minus ``CellID``."""
    cols = list(table.columns)
    if "X_centroid" not in cols:
        raise InputError(f"expected an X_centroid column in the cell table, found columns {cols[:12]}…")
    return [c for c in cols[: cols.index("X_centroid")] if c != "CellID"]


def cell_table(quant_df: pd.DataFrame, panel) -> pd.DataFrame:
    """Order a :func:`qdplex.quantify.quantify` table as MCQuant does and add the marker columns.

    Parameters
    ----------
    quant_df : pandas.DataFrame
        Output of ``quantify`` (index ``CellID``; planes named by marker or by fluor).
    panel : Panel
        Gives the markers, their fluors and their compartments.

    Returns
    -------
    pandas.DataFrame
        ``CellID`` as the first column (and a plain RangeIndex), then the column
        order in the module docstring.
    """
    df = quant_df
    if df.index.name == "CellID" and "CellID" not in df.columns:
        df = df.reset_index()
    if "CellID" not in df.columns:
        raise InputError(f"expected a CellID index or column in the quantification table, found {list(df.columns)[:8]}…")
    missing_morph = [c for c in MCQUANT_MORPHOLOGY if c not in df.columns]
    if missing_morph:
        raise InputError(f"expected morphology columns {list(MCQUANT_MORPHOLOGY)}, missing {missing_morph}")
    # planes named by fluor (quantify called without a panel) → marker names
    rename = {}
    for m in panel.markers:
        if not _stat_columns(df.columns, m.name) and _stat_columns(df.columns, m.fluor):
            for c in _stat_columns(df.columns, m.fluor):
                rename[c] = m.name + c[len(m.fluor):]
    if rename:
        df = df.rename(columns=rename)

    marker_means = {}
    stat_cols: list[str] = []
    for m in panel.markers:
        own = f"{m.name}_{m.compartment}_mean"
        if own not in df.columns:
            have = _stat_columns(df.columns, m.name)
            raise InputError(
                f"expected column {own!r} (marker {m.name} on {m.fluor}, scored in the {m.compartment}), "
                f"found {have or 'no columns for this marker'}"
            )
        marker_means[m.name] = df[own].to_numpy()
        stat_cols += _stat_columns(df.columns, m.name)
    front = ["CellID"] + list(marker_means) + stat_cols + list(MCQUANT_MORPHOLOGY)
    clash = [m for m in marker_means if m in df.columns]
    if clash:
        df = df.drop(columns=clash)
    rest = [c for c in df.columns if c not in front]
    out = pd.concat(
        [df[["CellID"]], pd.DataFrame(marker_means, index=df.index), df[stat_cols + list(MCQUANT_MORPHOLOGY) + rest]],
        axis=1,
    )
    out["CellID"] = out["CellID"].astype(np.int64)
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------- AnnData
def to_anndata(table: pd.DataFrame, panel, *, provenance: dict | None = None):
    """The cell table as an :class:`anndata.AnnData` that scanpy and squidpy read.

    ``X`` holds the marker means (the marker block of the table), ``layers`` one
    matrix per compartment × statistic (``"membrane_mean"``, ``"cell_std"`` …;
    cells × markers, NaN where a cell has no pixel in that compartment), ``obs``
    every other column (morphology, QC, positivity), ``obsm['spatial']`` the
    (X, Y) centroids in pixels, ``var`` the panel (fluor, compartment, threshold)
    and ``uns['provenance']`` / ``uns['panel']`` JSON strings.
    """
    import anndata as ad

    markers = [m.name for m in panel.markers]
    missing = [m for m in markers if m not in table.columns]
    if missing:
        raise InputError(f"expected marker columns {markers} in the cell table, missing {missing}")
    ids = table["CellID"].astype(np.int64).astype(str).to_numpy() if "CellID" in table.columns else table.index.astype(str)
    X = table[markers].to_numpy(dtype=np.float32)
    layers: dict[str, np.ndarray] = {}
    used = set(markers) | {"CellID"}
    stats_seen: list[str] = []
    for c in table.columns:
        for comp in COMPARTMENTS:
            for m in markers:
                pre = f"{m}_{comp}_"
                if c.startswith(pre):
                    st = c[len(pre):]
                    key = f"{comp}_{st}"
                    if key not in stats_seen:
                        stats_seen.append(key)
    for key in stats_seen:
        comp, st = key.split("_", 1)
        cols = [f"{m}_{comp}_{st}" for m in markers]
        arr = np.full((len(table), len(markers)), np.nan, np.float32)
        for j, c in enumerate(cols):
            if c in table.columns:
                arr[:, j] = table[c].to_numpy(dtype=np.float32)
                used.add(c)
        layers[key] = arr
    obs = table[[c for c in table.columns if c not in used]].copy()
    for c in obs.columns:
        if obs[c].dtype == object:
            obs[c] = obs[c].astype(str)
    obs.index = pd.Index(ids, name="CellID")
    var = pd.DataFrame(
        {
            "fluor": [m.fluor for m in panel.markers],
            "compartment": [m.compartment for m in panel.markers],
            "threshold": ["" if m.threshold is None else str(m.threshold) for m in panel.markers],
        },
        index=pd.Index(markers, name="marker"),
    )
    adata = ad.AnnData(X=X, obs=obs, var=var, layers=layers)
    if {"X_centroid", "Y_centroid"} <= set(table.columns):
        adata.obsm["spatial"] = table[["X_centroid", "Y_centroid"]].to_numpy(dtype=np.float64)
    adata.uns["provenance"] = json.dumps(provenance or {}, default=str)
    adata.uns["panel"] = json.dumps(panel.to_dict(), default=str)
    return adata


# --------------------------------------------------------------------------- writing
def _atomic_path():
    try:
        from .io import atomic_path
    except ImportError:  # qdplex.io without its package exports
        from .io.atomic import atomic_path
    return atomic_path


def write_tables(table: pd.DataFrame, out_dir, panel, *, provenance: dict | None = None,
                 formats=("csv", "parquet", "h5ad")) -> dict[str, Path]:
    """Write ``cells.csv``, ``cells.parquet`` and ``cells.h5ad`` into ``out_dir``, each atomically.

    Parameters
    ----------
    table : pandas.DataFrame
        A :func:`cell_table` (``CellID`` first, MCQuant order).
    out_dir : str or Path
    panel : Panel
    provenance : dict, optional
        Stored in the AnnData's ``uns['provenance']`` (JSON).
    formats : sequence of str
        Any of ``csv``, ``parquet``, ``h5ad``.

    Returns
    -------
    dict
        ``{"cells_csv": Path, "cells_parquet": Path, "cells_h5ad": Path}`` (those written).
    """
    atomic_path = _atomic_path()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"expected a writable output folder, found {err}", path=out_dir) from err
    if "CellID" not in table.columns:
        raise InputError(f"expected a CellID column (use cell_table first), found {list(table.columns)[:8]}…")
    paths: dict[str, Path] = {}
    for fmt in formats:
        path = out_dir / f"cells.{fmt}"
        with atomic_path(path) as tmp:
            if fmt == "csv":
                table.to_csv(tmp, index=False)
            elif fmt == "parquet":
                table.to_parquet(tmp, index=False)
            elif fmt == "h5ad":
                to_anndata(table, panel, provenance=provenance).write_h5ad(tmp)
            else:
                raise OutputError(f"expected table formats among csv, parquet, h5ad, found {fmt!r}", path=path)
        paths[f"cells_{fmt}"] = path
    return paths
