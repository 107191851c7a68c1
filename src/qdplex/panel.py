"""Panel files: which marker rides on which fluor, where it is scored, and the settings.

A panel is a small TOML file (examples in ``pipelines/``; every key in docs/panels.md)::

    name = "breast-5plex"
    nuclear_stain = "DAPI"

    [[markers]]
    name = "HER2"
    fluor = "QD655"
    compartment = "membrane"      # nucleus | cytoplasm | membrane | cell

    [spectra]                     # optional: spectra that add to or override the built-ins
    files = ["library.csv"]       # relative paths are taken from the panel file's folder

    [autofluorescence]            # optional
    control = "unstained.ome.tif" # an unstained image; its autofluorescence joins the library

Each stage's table (``[image]``, ``[autofluorescence]``, ``[unmixing]``,
``[segmentation]``, ``[quantification]``, ``[scoring]``) is validated by building
its typed settings object (:class:`UnmixingSettings`, :class:`SegmentationSettings`,
…), whose field defaults are the only place a default is written;
:attr:`Panel.settings` gives them all. Every validation error names the file, the
key, what was expected and what was found; a value is never echoed from a file that
is not the panel itself.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PanelError
from .model import COMPARTMENTS

__all__ = [
    "Marker",
    "Panel",
    "read_panel",
    "panel_from_dict",
    "canonical_fluor",
    "AUTOFLUORESCENCE",
    "PanelSettings",
    "ImageSettings",
    "AutofluorescenceSettings",
    "UnmixingSettings",
    "SegmentationSettings",
    "QuantificationSettings",
    "ScoringSettings",
    "STATISTICS",
    "reserved_column",
]

#: Name of the (first) autofluorescence endmember in libraries and unmixed images.
AUTOFLUORESCENCE = "AF"

#: Per-cell statistics a panel may ask for (``[quantification] stats``).
STATISTICS = ("mean", "std", "var", "sum", "count", "min", "max", "median")

_QD_RE = re.compile(r"^\s*(?:q\s*dot|qd)\s*[-_ ]?\s*(\d{3})\s*$", re.IGNORECASE)

_TOP_KEYS = {
    "name": "a panel name (string)",
    "description": "free text",
    "nuclear_stain": "the nuclear stain's fluor, e.g. 'DAPI'",
    "markers": "an array of [[markers]] tables",
    "spectra": "a [spectra] table with files = [...]",
    "autofluorescence": "an [autofluorescence] table",
    "image": "an [image] table (pixel_size_um)",
    "unmixing": "an [unmixing] table",
    "segmentation": "a [segmentation] table",
    "quantification": "a [quantification] table",
    "scoring": "a [scoring] table",
    "synth": "a [synth] table (settings for synthetic slides of this panel)",
}
_MARKER_KEYS = {"name", "fluor", "compartment", "threshold", "description", "antibody"}
_SECTION_KEYS = {
    "spectra": {"files"},
    "autofluorescence": {"control", "components"},
    "image": {"pixel_size_um", "camera_offset"},
    "unmixing": {"method", "offset", "saturation", "exclude_saturated", "refine"},
    "segmentation": {
        "method", "model", "diameter_um", "expand_um", "membrane_width_um", "membrane_guided", "tile", "overlap",
    },
    "quantification": {"stats", "quantiles", "compartments"},
    # read by qdplex.score (its module docstring gives each key's meaning)
    "scoring": {"method", "control_quantile", "cutoffs", "phenotype", "allred", "complete", "her2"},
}
#: Keys older panels could hold that were never read; refused with what to do instead.
_REMOVED_KEYS = {
    "autofluorescence.spectrum": "give an autofluorescence spectrum as a column 'AF' of a [spectra] files CSV",
    "unmixing.chunk": "qdplex chooses its unmixing blocks itself",
}

UNMIXING_METHODS = ("nnls", "ols", "poisson")
SEGMENTATION_METHODS = ("auto", "classical", "cellpose", "stardist")
SCORING_METHODS = ("mixture", "otsu", "gmm", "control")
THRESHOLD_METHODS = SCORING_METHODS
#: Most markers in ``[scoring] phenotype`` (their positivity combinations are counted: 2**n).
MAX_PHENOTYPE_MARKERS = 12

# Cell-table columns a marker name must not take (qdplex.quantify / qdplex.tables / qdplex.score).
_TABLE_COLUMNS = (
    "CellID", "X_centroid", "Y_centroid", "Area", "MajorAxisLength", "MinorAxisLength", "Eccentricity",
    "Solidity", "Extent", "Orientation", "Perimeter", "NucleusArea", "NucleusCellAreaRatio",
    "X_centroid_um", "Y_centroid_um", "residual_mean", "af_fraction", "saturated_fraction",
    "residual", "saturated", "slide", "n_cells",
)
_DERIVED_SUFFIX = re.compile(
    r"_(?:(?:" + "|".join(COMPARTMENTS) + r")_(?:" + "|".join(STATISTICS) + r"|q\d+(?:_\d+)?|completeness)"
    r"|positive|h_score|percent_positive|threshold|allred|load|percent_complete|score|score_value|mean)$",
    re.IGNORECASE,
)


def canonical_fluor(name: str) -> str:
    """Canonical fluor name: ``"Qdot 655"``, ``"qd655"``, ``"QD-655"`` → ``"QD655"``; others unchanged."""
    m = _QD_RE.match(str(name))
    return f"QD{m.group(1)}" if m else str(name).strip()


def reserved_column(name: str) -> bool:
    """True when a plane called ``name`` would collide with a cell-table column.

    The morphology and QC columns (``CellID``, ``Area``, …; any case), the
    autofluorescence planes (``AF``, ``AF2``, …) and every name ending like a derived
    column (``_<compartment>_<statistic>``, ``_positive``, ``_h_score``, …).
    """
    low = str(name).lower()
    return (low in {c.lower() for c in _TABLE_COLUMNS} or re.fullmatch(r"af\d*", low) is not None
            or _DERIVED_SUFFIX.search(str(name)) is not None)


# --------------------------------------------------------------------------- typed settings
@dataclass(frozen=True)
class ImageSettings:
    """``[image]``: facts about the slides missing from their files.

    Attributes
    ----------
    pixel_size_um : float or None
        Pixel size used when a file records none.
    camera_offset : float or None
        The camera's dark level in counts (≥ 0).
    """

    pixel_size_um: float | None = None
    camera_offset: float | None = None


@dataclass(frozen=True)
class AutofluorescenceSettings:
    """``[autofluorescence]``: autofluorescence spectra from an unstained control.

    Attributes
    ----------
    control : Path or None
        The unstained control image (a regular file or an image folder).
    components : int or "auto"
        Number of autofluorescence spectra estimated from the control, or ``"auto"``.
    """

    control: Path | None = None
    components: int | str = 1


@dataclass(frozen=True)
class UnmixingSettings:
    """``[unmixing]``.

    Attributes
    ----------
    method : str
        ``"nnls"``, ``"ols"`` or ``"poisson"``.
    offset : "auto", float or tuple of float
        Camera dark level subtracted before unmixing (one value, or one per channel);
        ``"auto"``: the panel's ``[image] camera_offset``, else the file's.
    saturation : float or None
        Raw level at or above which a value counts as saturated (None: the dtype maximum).
    exclude_saturated : bool
        Fit saturated pixels from their unsaturated channels only.
    refine : bool
        Refine the reference spectra on the slide itself.
    """

    method: str = "nnls"
    offset: str | float | tuple[float, ...] = "auto"
    saturation: float | None = None
    exclude_saturated: bool = False
    refine: bool = True


@dataclass(frozen=True)
class SegmentationSettings:
    """``[segmentation]``.

    Attributes
    ----------
    method : str
        ``"auto"``, ``"classical"``, ``"cellpose"`` or ``"stardist"``.
    model : Path or None
        A nucleus model file (e.g. ONNX), resolved against the panel file's folder.
    diameter_um : float or None
        Typical nucleus diameter (None: estimated from the image).
    expand_um : float
        How far cells grow from their nuclei.
    membrane_width_um : float
        Width of the membrane ring.
    membrane_guided : bool
        Grow cells along the membrane-marker planes.
    tile, overlap : int or None
        Tiled segmentation: tile side and overlap in pixels (None: chosen by qdplex).
    """

    method: str = "auto"
    model: Path | None = None
    diameter_um: float | None = None
    expand_um: float = 5.0
    membrane_width_um: float = 1.0
    membrane_guided: bool = False
    tile: int | None = None
    overlap: int | None = None


@dataclass(frozen=True)
class QuantificationSettings:
    """``[quantification]``.

    Attributes
    ----------
    stats : tuple of str
        Per-cell statistics (always including ``"mean"``).
    quantiles : tuple of float
        Extra per-cell quantiles in [0, 1].
    compartments : tuple of str or None
        Compartments to quantify (None: all four).
    """

    stats: tuple[str, ...] = ("mean", "std", "sum")
    quantiles: tuple[float, ...] = ()
    compartments: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ScoringSettings:
    """``[scoring]`` (meanings in :mod:`qdplex.score`).

    Attributes
    ----------
    method : str
        Threshold method of markers without their own: ``"mixture"`` (default: 1–4
        Gaussians chosen by BIC, threshold at the deepest valley), ``"otsu"``, ``"gmm"``,
        ``"control"``.
    control_quantile : float
        Quantile of a negative control used as threshold, in (0, 1).
    cutoffs : dict
        marker → (c1, c2, c3), non-decreasing cut-offs of grades 1+, 2+, 3+.
    allred, phenotype : tuple of str or None
        Markers for the Allred score / the phenotype counts (None: qdplex's choice).
    her2 : str or None
        The marker scored 0–3+ (None: the marker named HER2 / ERBB2).
    complete : float
        Fraction of the membrane ring above threshold for a complete membrane, in (0, 1].
    """

    method: str = "mixture"
    control_quantile: float = 0.99
    cutoffs: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    allred: tuple[str, ...] | None = None
    her2: str | None = None
    complete: float = 0.9
    phenotype: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PanelSettings:
    """The typed settings of every stage (:attr:`Panel.settings`)."""

    image: ImageSettings = field(default_factory=ImageSettings)
    autofluorescence: AutofluorescenceSettings = field(default_factory=AutofluorescenceSettings)
    unmixing: UnmixingSettings = field(default_factory=UnmixingSettings)
    segmentation: SegmentationSettings = field(default_factory=SegmentationSettings)
    quantification: QuantificationSettings = field(default_factory=QuantificationSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)


# --------------------------------------------------------------------------- panel
@dataclass(frozen=True)
class Marker:
    """One biomarker of a panel.

    Parameters
    ----------
    name : str
        Biomarker name (``"HER2"``); names the table column.
    fluor : str
        The fluor carrying it (canonical form, ``"QD655"``).
    compartment : str
        Where it is scored: one of ``nucleus``, ``cytoplasm``, ``membrane``, ``cell``.
    threshold : float or str, optional
        Positivity threshold: a number in unmixed abundance units, or a method name
        (``"mixture"``, ``"otsu"``, ``"gmm"``, ``"control"``); None means the panel's scoring default.
    """

    name: str
    fluor: str
    compartment: str = "cell"
    threshold: float | str | None = None


@dataclass
class Panel:
    """A validated panel (see module docstring for the file format).

    The stage tables (``unmixing``, ``segmentation``, …) hold the keys as written in
    the file (paths resolved); :attr:`settings` gives them typed, with every default.
    """

    name: str
    markers: list[Marker]
    nuclear_stain: str = "DAPI"
    spectra_files: list[Path] = field(default_factory=list)
    autofluorescence_control: Path | None = None
    autofluorescence_components: int | str = 1
    pixel_size_um: float | None = None
    camera_offset: float | None = None
    unmixing: dict[str, Any] = field(default_factory=dict)
    segmentation: dict[str, Any] = field(default_factory=dict)
    quantification: dict[str, Any] = field(default_factory=dict)
    scoring: dict[str, Any] = field(default_factory=dict)
    synth: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    path: Path | None = None

    @property
    def marker_names(self) -> list[str]:
        return [m.name for m in self.markers]

    @property
    def fluors(self) -> list[str]:
        """Fluors to unmix: the nuclear stain, then each marker's fluor (no autofluorescence)."""
        out = [self.nuclear_stain]
        for m in self.markers:
            if m.fluor not in out:
                out.append(m.fluor)
        return out

    @property
    def settings(self) -> PanelSettings:
        """The typed settings of every stage, validated (PanelError names file and key)."""
        return _settings(
            {
                "image": {k: v for k, v in (("pixel_size_um", self.pixel_size_um),
                                            ("camera_offset", self.camera_offset)) if v is not None},
                "autofluorescence": {"components": self.autofluorescence_components,
                                     **({"control": self.autofluorescence_control}
                                        if self.autofluorescence_control is not None else {})},
                "unmixing": self.unmixing,
                "segmentation": self.segmentation,
                "quantification": self.quantification,
                "scoring": self.scoring,
            },
            self.marker_names, self.path, base=None, check_files=False,
        )

    def marker(self, name: str) -> Marker:
        for m in self.markers:
            if m.name == name:
                return m
        raise PanelError(f"expected a marker in {self.marker_names}, found {name!r}", path=self.path)

    def fluor_to_marker(self) -> dict[str, str]:
        """Map fluor → marker name (the nuclear stain maps to itself)."""
        out = {self.nuclear_stain: self.nuclear_stain}
        out.update({m.fluor: m.name for m in self.markers})
        return out

    def camera_offset_for(self, image) -> float | list[float] | None:
        """The camera offset to subtract from ``image`` before unmixing.

        The panel's ``[unmixing] offset`` (unless ``"auto"``), else its ``[image]
        camera_offset``, else the image's recorded ``metadata["camera_offset"]`` (OME
        ``DetectorSettings/@Offset``, or :mod:`qdplex.synth`), else None.
        """
        given = self.unmixing.get("offset")
        for value in (None if given == "auto" else given, self.camera_offset,
                      getattr(image, "metadata", {}).get("camera_offset") if image is not None else None):
            if value is not None:
                return value
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (for run.json / provenance); :meth:`from_record` is its inverse."""
        return {
            "name": self.name,
            "description": self.description,
            "nuclear_stain": self.nuclear_stain,
            "markers": [
                {"name": m.name, "fluor": m.fluor, "compartment": m.compartment, "threshold": m.threshold}
                for m in self.markers
            ],
            "spectra_files": [str(p) for p in self.spectra_files],
            "autofluorescence_control": None if self.autofluorescence_control is None else str(self.autofluorescence_control),
            "autofluorescence_components": self.autofluorescence_components,
            "pixel_size_um": self.pixel_size_um,
            "camera_offset": self.camera_offset,
            "unmixing": _plain(self.unmixing),
            "segmentation": _plain(self.segmentation),
            "quantification": _plain(self.quantification),
            "scoring": _plain(self.scoring),
            "synth": _plain(self.synth),
            "path": None if self.path is None else str(self.path),
        }

    @classmethod
    def from_record(cls, record: dict) -> "Panel":
        """The Panel that :meth:`to_dict` recorded (e.g. in ``run.json``): its exact inverse.

        Values are validated as when a panel file is read; the files it names (spectra,
        control, model) need not exist any more. Records written before ``description``
        and ``synth`` were recorded read with their defaults.

        Raises
        ------
        PanelError
            A record that is not a valid panel (names the key, expected and found).
        """
        if not isinstance(record, dict):
            raise PanelError(f"expected a panel record (a dict from Panel.to_dict), found {type(record).__name__}")
        d = record
        path = d.get("path")
        raw: dict[str, Any] = {k: d[k] for k in ("name", "nuclear_stain") if k in d}
        if d.get("description"):
            raw["description"] = d["description"]
        markers = d.get("markers")
        raw["markers"] = ([{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in markers]
                          if isinstance(markers, list) else markers)
        raw["spectra"] = {"files": list(d.get("spectra_files") or [])}
        af: dict[str, Any] = {}
        if d.get("autofluorescence_control") is not None:
            af["control"] = d["autofluorescence_control"]
        if d.get("autofluorescence_components") is not None:
            af["components"] = d["autofluorescence_components"]
        raw["autofluorescence"] = af
        raw["image"] = {k: d[k] for k in ("pixel_size_um", "camera_offset") if d.get(k) is not None}
        for sec in ("unmixing", "segmentation", "quantification", "scoring", "synth"):
            if d.get(sec) is not None:
                raw[sec] = d[sec]
        return panel_from_dict(raw, path=path, base_dir=Path(""), check_files=False)


def _plain(d: dict) -> dict:
    """A JSON-friendly copy of a stage table (paths as strings, tuples as lists)."""
    def conv(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dict(d))


# --------------------------------------------------------------------------- validation helpers
def _err(path, key, expected, found) -> PanelError:
    return PanelError(f"key {key!r}: expected {expected}, found {found!r}", path=path)


def _str(d, key, path, where, *, required=True, default=None) -> str | None:
    if key not in d:
        if required:
            raise _err(path, where + key, "a string", "nothing (key missing)")
        return default
    v = d[key]
    if not isinstance(v, str) or not v.strip():
        raise _err(path, where + key, "a non-empty string", v)
    return v.strip()


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _range(lo, hi, lo_open, hi_open, integer) -> str:
    kind = "an integer" if integer else "a number"
    if lo is not None and hi is None:
        return f"{kind} {'>' if lo_open else '≥'} {lo:g}"
    if hi is not None and lo is None:
        return f"{kind} {'<' if hi_open else '≤'} {hi:g}"
    if lo is None:
        return f"a finite {kind[2:] if integer else 'number'}"
    return f"{kind} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _num(v, key, path, *, lo=None, hi=None, lo_open=False, hi_open=False, integer=False, what=""):
    """``v`` as a finite number in the given range, else a PanelError naming ``key``."""
    expected = _range(lo, hi, lo_open, hi_open, integer) + (f" ({what})" if what else "")
    ok = _is_number(v) and (not integer or isinstance(v, int)) and math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        raise _err(path, key, expected, v)
    return int(v) if integer else float(v)


def _bool(v, key, path) -> bool:
    if not isinstance(v, bool):
        raise _err(path, key, "true or false", v)
    return v


def _choice(v, key, path, choices) -> str:
    if not isinstance(v, str) or v not in choices:
        raise _err(path, key, "one of " + ", ".join(repr(c) for c in choices), v)
    return v


def _names(v, key, path, known, *, at_most=None) -> tuple[str, ...]:
    """A list of unique marker names from ``known``."""
    exp = f"a list of distinct markers from {list(known)}" + (f", at most {at_most}" if at_most else "")
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v) or len(set(v)) != len(v):
        raise _err(path, key, exp, v)
    bad = [x for x in v if x not in known]
    if bad or (at_most is not None and len(v) > at_most):
        raise _err(path, key, exp, bad or v)
    return tuple(v)


def _check_keys(d: dict, allowed, path, where):
    for k in d:
        if where + k in _REMOVED_KEYS:
            raise _err(path, where + k, f"no such key (it was never read; {_REMOVED_KEYS[where + k]})", k)
        if k not in allowed:
            raise _err(path, where + k, f"one of the keys {sorted(allowed)}", k)


def _kind(p: Path) -> str:
    """What is at ``p`` when it is not a regular file or folder, in words (:func:`qdplex.io.checks.path_kind`)."""
    from .io.checks import path_kind

    return path_kind(p)


def _named_file(value, key, path, base, *, check, folder_ok=False, what="an existing file") -> Path:
    """A path the panel names: relative to ``base``; when ``check``, a regular file (or folder)."""
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise _err(path, key, f"a path to {what[3:] if what.startswith('an ') else what}", value)
    p = Path(value)
    if not p.is_absolute() and base is not None:
        p = base / p
    if check:
        try:
            exists = p.exists()
        except OSError:
            exists = False
        if not exists:
            raise _err(path, key, what, str(p))
        if not (p.is_file() or (folder_ok and p.is_dir())):
            raise PanelError(
                f"key {key!r}: expected {what} (a regular file{' or an image folder' if folder_ok else ''}), "
                f"found {_kind(p)}: {str(p)!r}", path=path)
    return p


# --------------------------------------------------------------------------- stage tables → settings
def _image(t, path) -> ImageSettings:
    px = t.get("pixel_size_um")
    off = t.get("camera_offset")
    return ImageSettings(
        None if px is None else _num(px, "image.pixel_size_um", path, lo=0, hi=1000, lo_open=True, what="µm"),
        None if off is None else _num(off, "image.camera_offset", path, lo=0,
                                      what="the camera's dark level in counts"),
    )


def _autofluorescence(t, path, base, check_files) -> AutofluorescenceSettings:
    control = None
    if "control" in t:
        control = _named_file(t["control"], "autofluorescence.control", path, base, check=check_files,
                              folder_ok=True, what="an existing unstained control image")
    comp = t.get("components", AutofluorescenceSettings.components)
    if comp != "auto":
        comp = _num(comp, "autofluorescence.components", path, lo=1, hi=8, integer=True,
                    what="or 'auto'; autofluorescence spectra from the control")
    return AutofluorescenceSettings(control, comp)


def _unmixing(t, path) -> UnmixingSettings:
    d = UnmixingSettings()
    method = _choice(t.get("method", d.method), "unmixing.method", path, UNMIXING_METHODS)
    offset = t.get("offset", d.offset)
    if offset != "auto":
        exp = "'auto', a number ≥ 0 or a list of numbers ≥ 0 (one per channel; the camera's dark level in counts)"
        if isinstance(offset, list):
            if not offset or not all(_is_number(v) and math.isfinite(v) and v >= 0 for v in offset):
                raise _err(path, "unmixing.offset", exp, offset)
            offset = tuple(float(v) for v in offset)
        elif _is_number(offset) and math.isfinite(offset) and offset >= 0:
            offset = float(offset)
        else:
            raise _err(path, "unmixing.offset", exp, offset)
    sat = t.get("saturation")
    if sat is not None:
        sat = _num(sat, "unmixing.saturation", path, lo=0, lo_open=True, what="the raw saturation level in counts")
    return UnmixingSettings(
        method, offset, sat,
        _bool(t.get("exclude_saturated", d.exclude_saturated), "unmixing.exclude_saturated", path),
        _bool(t.get("refine", d.refine), "unmixing.refine", path),
    )


def _segmentation(t, path, base, check_files) -> SegmentationSettings:
    d = SegmentationSettings()
    w = "segmentation."
    method = _choice(t.get("method", d.method), w + "method", path, SEGMENTATION_METHODS)
    model = None
    if "model" in t:
        model = _named_file(t["model"], w + "model", path, base, check=check_files, what="an existing model file")
    diameter = t.get("diameter_um")
    if diameter is not None:
        diameter = _num(diameter, w + "diameter_um", path, lo=1, hi=100, what="a nucleus diameter in µm")
    tile = t.get("tile")
    if tile is not None:
        tile = _num(tile, w + "tile", path, lo=64, hi=65536, integer=True, what="tile side in pixels")
    overlap = t.get("overlap")
    if overlap is not None:
        hi = min(4096, (tile - 1) // 2) if tile is not None else 4096
        overlap = _num(overlap, w + "overlap", path, lo=0, hi=hi, integer=True,
                       what="tile overlap in pixels, less than half the tile")
    return SegmentationSettings(
        method, model, diameter,
        _num(t.get("expand_um", d.expand_um), w + "expand_um", path, lo=0, hi=50, what="µm"),
        _num(t.get("membrane_width_um", d.membrane_width_um), w + "membrane_width_um", path,
             lo=0, hi=10, lo_open=True, what="µm"),
        _bool(t.get("membrane_guided", d.membrane_guided), w + "membrane_guided", path),
        tile, overlap,
    )


def _quantification(t, path) -> QuantificationSettings:
    d = QuantificationSettings()
    w = "quantification."
    stats = t.get("stats", list(d.stats))
    exp = f"a list of distinct statistics from {list(STATISTICS)} including 'mean' (the marker columns are means)"
    if (not isinstance(stats, list) or not all(isinstance(s, str) and s in STATISTICS for s in stats)
            or len(set(stats)) != len(stats) or "mean" not in stats):
        raise _err(path, w + "stats", exp, stats)
    qs = t.get("quantiles", list(d.quantiles))
    exp = "a list of distinct numbers in [0, 1] (e.g. [0.5, 0.9])"
    if (not isinstance(qs, list) or not all(_is_number(q) and math.isfinite(q) and 0 <= q <= 1 for q in qs)
            or len(set(qs)) != len(qs)):
        raise _err(path, w + "quantiles", exp, qs)
    comps = t.get("compartments")
    if comps is not None:
        if (not isinstance(comps, list) or not comps or not all(isinstance(c, str) and c in COMPARTMENTS for c in comps)
                or len(set(comps)) != len(comps)):
            raise _err(path, w + "compartments", f"a non-empty list of distinct compartments from {list(COMPARTMENTS)}",
                       comps)
        comps = tuple(comps)
    return QuantificationSettings(tuple(stats), tuple(float(q) for q in qs), comps)


def _scoring(t, path, markers) -> ScoringSettings:
    d = ScoringSettings()
    w = "scoring."
    method = _choice(t.get("method", d.method), w + "method", path, SCORING_METHODS)
    q = _num(t.get("control_quantile", d.control_quantile), w + "control_quantile", path,
             lo=0, hi=1, lo_open=True, hi_open=True)
    complete = _num(t.get("complete", d.complete), w + "complete", path, lo=0, hi=1, lo_open=True)
    cutoffs = t.get("cutoffs", {})
    if not isinstance(cutoffs, dict):
        raise _err(path, w + "cutoffs", "a table marker = [c1, c2, c3]", cutoffs)
    cuts = {}
    for m, c in cutoffs.items():
        if m not in markers:
            raise _err(path, f"{w}cutoffs.{m}", f"a marker of the panel {list(markers)}", m)
        if (not isinstance(c, list) or len(c) != 3 or not all(_is_number(x) and math.isfinite(x) and x >= 0 for x in c)
                or list(c) != sorted(c)):
            raise _err(path, f"{w}cutoffs.{m}", "three non-decreasing numbers ≥ 0 [1+, 2+, 3+]", c)
        cuts[m] = tuple(float(x) for x in c)
    allred = _names(t["allred"], w + "allred", path, markers) if "allred" in t else None
    phen = (_names(t["phenotype"], w + "phenotype", path, markers, at_most=MAX_PHENOTYPE_MARKERS)
            if "phenotype" in t else None)
    her2 = None
    if "her2" in t:
        her2 = t["her2"]
        if not isinstance(her2, str) or her2 not in markers:
            raise _err(path, w + "her2", f"a marker of the panel {list(markers)}", her2)
    return ScoringSettings(method, q, cuts, allred, her2, complete, phen)


def _settings(sections: dict, markers, path, *, base, check_files) -> PanelSettings:
    return PanelSettings(
        image=_image(sections.get("image", {}), path),
        autofluorescence=_autofluorescence(sections.get("autofluorescence", {}), path, base, check_files),
        unmixing=_unmixing(sections.get("unmixing", {}), path),
        segmentation=_segmentation(sections.get("segmentation", {}), path, base, check_files),
        quantification=_quantification(sections.get("quantification", {}), path),
        scoring=_scoring(sections.get("scoring", {}), path, list(markers)),
    )


# --------------------------------------------------------------------------- reading
def read_panel(path) -> Panel:
    """Read and validate a panel TOML file.

    Parameters
    ----------
    path : str or Path
        The panel file.

    Returns
    -------
    Panel

    Raises
    ------
    PanelError
        On any missing, unknown, ill-typed or out-of-range key, or a named file that
        is missing or not a regular file; the message names the file, the key, the
        expected and the found value.
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            raise PanelError(f"expected a panel TOML file (a regular file), found {_kind(path)}"
                             if not path.is_dir() else "expected a panel TOML file, found a folder", path=path)
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PanelError("expected a panel TOML file, found no such file", path=path) from None
    except UnicodeDecodeError:
        raise PanelError("expected a UTF-8 TOML file, found undecodable bytes", path=path) from None
    except OSError as e:
        raise PanelError(f"expected a readable TOML file, found {type(e).__name__}: {e.strerror or e}",
                         path=path) from None
    except tomllib.TOMLDecodeError as e:
        raise PanelError(f"expected valid TOML, found a syntax error: {e}", path=path) from None
    return panel_from_dict(raw, path=path)


def panel_from_dict(raw: dict, *, path=None, base_dir=None, check_files: bool = True) -> Panel:
    """Validate a panel given as a dict (as parsed from TOML); see :func:`read_panel`.

    Parameters
    ----------
    raw : dict
        The TOML tables.
    path : path-like, optional
        The panel file (named in errors; relative paths are taken from its folder).
    base_dir : path-like, optional
        Folder for relative paths instead of the panel file's.
    check_files : bool
        Require the named files (spectra, control, model) to exist as regular files.
    """
    path = None if path is None else Path(path)
    base = Path(base_dir) if base_dir is not None else (path.parent if path is not None else Path.cwd())
    if not isinstance(raw, dict):
        raise _err(path, "", "a TOML table", type(raw).__name__)
    _check_keys(raw, _TOP_KEYS, path, "")
    name = _str(raw, "name", path, "")
    nuclear = canonical_fluor(_str(raw, "nuclear_stain", path, "", required=False, default="DAPI"))
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _err(path, "description", "a string", description)

    markers_raw = raw.get("markers")
    if not isinstance(markers_raw, list) or not markers_raw:
        raise _err(path, "markers", "at least one [[markers]] table", markers_raw if markers_raw is not None else "nothing")
    markers: list[Marker] = []
    for i, m in enumerate(markers_raw):
        where = f"markers[{i}]."
        if not isinstance(m, dict):
            raise _err(path, f"markers[{i}]", "a table with name, fluor, compartment", m)
        _check_keys(m, _MARKER_KEYS, path, where)
        mname = _str(m, "name", path, where)
        if reserved_column(mname) or any(ord(ch) < 32 for ch in mname):
            raise _err(path, where + "name",
                       "a marker name that is no cell-table column (not CellID, Area, X_centroid, … or AF…, "
                       "not ending in _<compartment>_<statistic>, _positive, …; no control characters)", mname)
        fluor = canonical_fluor(_str(m, "fluor", path, where))
        comp = _str(m, "compartment", path, where, required=False, default="cell")
        if comp not in COMPARTMENTS:
            raise _err(path, where + "compartment", "one of " + " | ".join(COMPARTMENTS), comp)
        thr = m.get("threshold")
        if thr is not None and not (
            (_is_number(thr) and math.isfinite(thr) and thr >= 0)
            or (isinstance(thr, str) and thr in THRESHOLD_METHODS)
        ):
            raise _err(path, where + "threshold", "a finite number ≥ 0 or one of " + ", ".join(repr(m) for m in THRESHOLD_METHODS), thr)
        for k in ("antibody", "description"):
            if k in m and not isinstance(m[k], str):
                raise _err(path, where + k, "a string", m[k])
        markers.append(Marker(mname, fluor, comp, float(thr) if _is_number(thr) else thr))

    names = [m.name for m in markers]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _err(path, "markers[].name", "unique marker names", dup)
    fl = [m.fluor for m in markers]
    dupf = sorted({f for f in fl if fl.count(f) > 1})
    if dupf:
        raise _err(path, "markers[].fluor", "one marker per fluor (two markers on one QD cannot be unmixed)", dupf)
    if nuclear in fl:
        raise _err(path, "nuclear_stain", "a fluor not used by a marker", nuclear)
    if nuclear in names:
        raise _err(path, "markers[].name", f"names other than the nuclear stain {nuclear!r} (its plane keeps that name)",
                   nuclear)
    reserved = {"AF", "residual"}
    bad = sorted(set(fl) & reserved)
    if bad:
        raise _err(path, "markers[].fluor", f"fluors other than the reserved {sorted(reserved)}", bad)

    sections: dict[str, dict] = {}
    for sec, allowed in _SECTION_KEYS.items():
        v = raw.get(sec, {})
        if not isinstance(v, dict):
            raise _err(path, sec, f"a [{sec}] table", v)
        _check_keys(v, allowed, path, sec + ".")
        sections[sec] = dict(v)
    synth = raw.get("synth", {})
    if not isinstance(synth, dict):
        raise _err(path, "synth", "a [synth] table", synth)

    files = sections["spectra"].get("files", [])
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not all(isinstance(f, (str, Path)) for f in files):
        raise _err(path, "spectra.files", "a list of CSV paths", files)
    spectra_files = [_named_file(f, "spectra.files", path, base, check=check_files, what="an existing CSV file")
                     for f in files]

    settings = _settings(sections, names, path, base=base, check_files=check_files)
    seg = sections["segmentation"]
    if settings.segmentation.model is not None:
        seg["model"] = str(settings.segmentation.model)  # resolved against the panel's folder
    return Panel(
        name=name,
        markers=markers,
        nuclear_stain=nuclear,
        spectra_files=spectra_files,
        autofluorescence_control=settings.autofluorescence.control,
        autofluorescence_components=settings.autofluorescence.components,
        pixel_size_um=settings.image.pixel_size_um,
        camera_offset=settings.image.camera_offset,
        unmixing=sections["unmixing"],
        segmentation=seg,
        quantification=sections["quantification"],
        scoring=sections["scoring"],
        synth=dict(synth),
        description=description,
        path=path,
    )
