"""Panel files: which marker rides on which fluor, where it is scored, and the settings.

A panel is a small TOML file (examples in ``pipelines/``)::

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

Every validation error names the file, the key, what was expected and what was found.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PanelError
from .model import COMPARTMENTS

__all__ = ["Marker", "Panel", "read_panel", "canonical_fluor", "AUTOFLUORESCENCE"]

#: Name of the (first) autofluorescence endmember in libraries and unmixed images.
AUTOFLUORESCENCE = "AF"

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
    "autofluorescence": {"control", "components", "spectrum"},
    "image": {"pixel_size_um", "camera_offset"},
    "unmixing": {"method", "offset", "saturation", "exclude_saturated", "chunk"},
    "segmentation": {
        "method", "diameter_um", "expand_um", "membrane_width_um", "membrane_guided", "tile", "overlap", "model",
    },
    "quantification": {"stats", "quantiles", "compartments"},
    # read by qdplex.score (its module docstring gives each key's meaning)
    "scoring": {"method", "control_quantile", "cutoffs", "phenotype", "allred", "complete", "her2"},
}


def canonical_fluor(name: str) -> str:
    """Canonical fluor name: ``"Qdot 655"``, ``"qd655"``, ``"QD-655"`` → ``"QD655"``; others unchanged."""
    m = _QD_RE.match(str(name))
    return f"QD{m.group(1)}" if m else str(name).strip()


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
        (``"otsu"``, ``"gmm"``); None means the panel's scoring default.
    """

    name: str
    fluor: str
    compartment: str = "cell"
    threshold: float | str | None = None


@dataclass
class Panel:
    """A validated panel (see module docstring for the file format)."""

    name: str
    markers: list[Marker]
    nuclear_stain: str = "DAPI"
    spectra_files: list[Path] = field(default_factory=list)
    autofluorescence_control: Path | None = None
    autofluorescence_components: int = 1
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

    def camera_offset_for(self, image) -> float | None:
        """The camera offset to subtract from ``image`` before unmixing.

        The panel's ``[unmixing] offset``, else its ``[image] camera_offset``, else the
        image's recorded ``metadata["camera_offset"]`` (OME ``DetectorSettings/@Offset``,
        or :mod:`qdplex.synth`), else None.
        """
        for value in (self.unmixing.get("offset"), self.camera_offset,
                      getattr(image, "metadata", {}).get("camera_offset") if image is not None else None):
            if value is not None:
                return value
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (for run.json / provenance)."""
        return {
            "name": self.name,
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
            "unmixing": dict(self.unmixing),
            "segmentation": dict(self.segmentation),
            "quantification": dict(self.quantification),
            "scoring": dict(self.scoring),
            "path": None if self.path is None else str(self.path),
        }


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


def _number(d, key, path, where, *, positive=True, integer=False, default=None):
    if key not in d:
        return default
    v = d[key]
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (positive and v <= 0):
        kind = "an integer" if integer else "a number"
        raise _err(path, where + key, f"{'a positive ' + kind[2:] if positive else kind}", v)
    return v


def _check_keys(d: dict, allowed, path, where):
    for k in d:
        if k not in allowed:
            raise _err(path, where + k, f"one of the keys {sorted(allowed)}", k)


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
        On any missing, unknown or ill-typed key; the message names the file,
        the key, the expected and the found value.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PanelError("expected a panel TOML file, found no such file", path=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PanelError(f"expected a readable UTF-8 TOML file, found {type(e).__name__}: {e}", path=path) from None
    except tomllib.TOMLDecodeError as e:
        raise PanelError(f"expected valid TOML, found a syntax error: {e}", path=path) from None
    return panel_from_dict(raw, path=path)


def panel_from_dict(raw: dict, *, path=None, base_dir=None) -> Panel:
    """Validate a panel given as a dict (as parsed from TOML); see :func:`read_panel`."""
    path = None if path is None else Path(path)
    base = Path(base_dir) if base_dir is not None else (path.parent if path is not None else Path.cwd())
    _check_keys(raw, _TOP_KEYS, path, "")
    name = _str(raw, "name", path, "")
    nuclear = canonical_fluor(_str(raw, "nuclear_stain", path, "", required=False, default="DAPI"))

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
        fluor = canonical_fluor(_str(m, "fluor", path, where))
        comp = _str(m, "compartment", path, where, required=False, default="cell")
        if comp not in COMPARTMENTS:
            raise _err(path, where + "compartment", "one of " + " | ".join(COMPARTMENTS), comp)
        thr = m.get("threshold")
        if thr is not None and not (
            (isinstance(thr, (int, float)) and not isinstance(thr, bool) and thr >= 0)
            or (isinstance(thr, str) and thr in ("otsu", "gmm", "control"))
        ):
            raise _err(path, where + "threshold", "a number ≥ 0 or one of 'otsu', 'gmm', 'control'", thr)
        markers.append(Marker(mname, fluor, comp, float(thr) if isinstance(thr, (int, float)) else thr))

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
    reserved = {"AF", "residual"}
    bad = sorted(set(names) & reserved | set(fl) & reserved)
    if bad:
        raise _err(path, "markers[]", f"names other than the reserved {sorted(reserved)}", bad)

    sections: dict[str, dict] = {}
    for sec, allowed in _SECTION_KEYS.items():
        v = raw.get(sec, {})
        if not isinstance(v, dict):
            raise _err(path, sec, f"a [{sec}] table", v)
        _check_keys(v, allowed, path, sec + ".")
        sections[sec] = v
    for sec in ("synth",):
        v = raw.get(sec, {})
        if not isinstance(v, dict):
            raise _err(path, sec, f"a [{sec}] table", v)
        sections[sec] = v

    files = sections["spectra"].get("files", [])
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise _err(path, "spectra.files", "a list of CSV paths", files)
    spectra_files = []
    for f in files:
        p = (base / f) if not Path(f).is_absolute() else Path(f)
        if not p.is_file():
            raise _err(path, "spectra.files", "an existing CSV file", str(p))
        spectra_files.append(p)

    af = sections["autofluorescence"]
    control = None
    if "control" in af:
        c = _str(af, "control", path, "autofluorescence.")
        control = (base / c) if not Path(c).is_absolute() else Path(c)
        if not control.exists():
            raise _err(path, "autofluorescence.control", "an existing unstained control image", str(control))
    components = _number(af, "components", path, "autofluorescence.", integer=True, default=1)

    pixel_size = _number(sections["image"], "pixel_size_um", path, "image.", default=None)
    camera_offset = _number(sections["image"], "camera_offset", path, "image.", positive=False, default=None)
    if camera_offset is not None and camera_offset < 0:
        raise _err(path, "image.camera_offset", "a number ≥ 0 (the camera's dark level in counts)", camera_offset)

    unm = dict(sections["unmixing"])
    if "method" in unm and unm["method"] not in ("nnls", "ols", "poisson"):
        raise _err(path, "unmixing.method", "one of 'nnls', 'ols', 'poisson'", unm["method"])
    seg = dict(sections["segmentation"])
    seg.setdefault("method", "auto")  # qdplex's shipped nucleus model
    if seg["method"] not in ("auto", "classical", "cellpose", "stardist"):
        raise _err(path, "segmentation.method", "one of 'auto', 'classical', 'cellpose', 'stardist'", seg["method"])
    if "model" in seg:  # an ONNX nucleus model, relative to the panel file
        m = Path(_str(seg, "model", path, "segmentation."))
        seg["model"] = str(m if m.is_absolute() else base / m)
        if not Path(seg["model"]).is_file():
            raise _err(path, "segmentation.model", "an existing .onnx nucleus model file", seg["model"])
    for k in ("diameter_um", "expand_um", "membrane_width_um"):
        if k in seg:
            _number(seg, k, path, "segmentation.", positive=(k != "expand_um"))
    return Panel(
        name=name,
        markers=markers,
        nuclear_stain=nuclear,
        spectra_files=spectra_files,
        autofluorescence_control=control,
        autofluorescence_components=int(components),
        pixel_size_um=None if pixel_size is None else float(pixel_size),
        camera_offset=None if camera_offset is None else float(camera_offset),
        unmixing=unm,
        segmentation=seg,
        quantification=dict(sections["quantification"]),
        scoring=dict(sections["scoring"]),
        synth=dict(sections["synth"]),
        description=str(raw.get("description", "")),
        path=path,
    )
