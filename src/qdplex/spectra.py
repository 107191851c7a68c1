"""Reference emission spectra and the mixing matrix they give for a channel list.

A :class:`SpectralLibrary` holds named emission spectra (wavelength → relative
intensity, peak-normalised to 1), each with a note of where it came from. For any
list of :class:`~qdplex.model.Channel` it gives the C×K mixing matrix by
integrating each spectrum over each channel's emission band (λ-stack bands of a
few nm or filter channels of tens of nm alike); unmixing inverts that matrix.

Units: column ``k`` of :meth:`SpectralLibrary.matrix` is ``∫_band s_k(λ) dλ`` of
the peak-normalised spectrum, so an abundance is "signal per nm at the emission
peak". It does not change when the same sample is imaged with different band
widths.

Spectra come from

* :meth:`SpectralLibrary.builtin` — Qdot 525…800, DAPI and Hoechst (DNA-bound) and
  a generic broad tissue autofluorescence ``"AF"``, modelled as two-sided Gaussians
  from published peak and width figures;
* :meth:`SpectralLibrary.from_csv` — ``wavelength_nm`` then one column per fluor;
* control images — :func:`estimate_spectrum` (single-stain control) and
  :func:`estimate_autofluorescence` (unstained control, one or more components);
* :meth:`SpectralLibrary.load` — a library saved with :meth:`SpectralLibrary.save`.

:func:`library_for_panel` assembles the library a panel needs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .errors import InputError, SpectraError
from .model import Channel, MultiplexImage
from .panel import AUTOFLUORESCENCE, canonical_fluor

__all__ = [
    "Spectrum",
    "SpectralLibrary",
    "BUILTIN_NAMES",
    "estimate_spectrum",
    "estimate_autofluorescence",
    "choose_af_components",
    "library_for_panel",
    "lambda_grid",
]

#: File format tag and version written by :meth:`SpectralLibrary.save`.
LIBRARY_FORMAT = "qdplex-spectral-library"
LIBRARY_VERSION = 1

#: A spectrum may stop short of a channel band only where it has tailed off to at
#: most this fraction of its peak; beyond its ends it is then taken as zero.
EDGE_TOLERANCE = 0.1

# name: (peak nm, FWHM nm, red/blue asymmetry = right HWHM / left HWHM, provenance)
_QD_NOTE = (
    "Thermo Fisher / Invitrogen Qdot nanocrystal product data (Molecular Probes Handbook, "
    "section 6.6): nominal emission peak and FWHM; mild red-tail asymmetry of CdSe/ZnS emission"
)
_BUILTIN_MODELS: dict[str, tuple[float, float, float, str]] = {
    "QD525": (525.0, 28.0, 1.1, _QD_NOTE),
    "QD565": (565.0, 30.0, 1.1, _QD_NOTE),
    "QD585": (585.0, 28.0, 1.3, _QD_NOTE),
    "QD605": (605.0, 26.0, 1.15, _QD_NOTE),
    "QD625": (625.0, 28.0, 1.2, _QD_NOTE),
    "QD655": (655.0, 28.0, 1.3, _QD_NOTE),
    "QD705": (705.0, 62.0, 1.3, _QD_NOTE + "; broad CdSeTe core"),
    "QD800": (792.0, 75.0, 0.75, _QD_NOTE + "; broad CdSeTe core with a blue shoulder"),
    "DAPI": (461.0, 95.0, 1.3, "DAPI bound to dsDNA: emission maximum 461 nm, FWHM ~95 nm, red tail "
             "(Kapuscinski 1995, Biotech. Histochem. 70:220)"),
    "Hoechst": (457.0, 90.0, 1.4, "Hoechst 33342/33258 bound to dsDNA: emission maximum 455-461 nm, "
                "FWHM ~90 nm, red tail (Thermo Fisher product data)"),
    AUTOFLUORESCENCE: (510.0, 160.0, 1.6, "generic broad tissue autofluorescence (flavin/collagen-like, "
                       "peak ~510 nm, FWHM ~160 nm, long red tail; Croce & Bottiroli 2014, "
                       "Eur. J. Histochem. 58:2461); estimate it from an unstained control for real work"),
}
#: Names of the built-in spectra, in library order.
BUILTIN_NAMES = tuple(_BUILTIN_MODELS)
_BUILTIN_GRID = np.arange(300.0, 1000.0 + 0.25, 0.5)


def _two_sided_gaussian(wl: np.ndarray, peak: float, fwhm: float, asym: float) -> np.ndarray:
    left = fwhm / (1.0 + asym)
    right = fwhm - left
    sigma = np.where(wl < peak, left, right) / math.sqrt(2.0 * math.log(2.0))
    out = np.exp(-0.5 * ((wl - peak) / sigma) ** 2)
    out[out < 1e-6] = 0.0  # no emission far from the band (not 1e-30 "signal")
    return out


@dataclass(frozen=True)
class Spectrum:
    """One emission spectrum, peak-normalised, sampled at increasing wavelengths.

    Consecutive equal wavelengths are allowed (a step, as in spectra measured on
    a λ-stack's bands); the spectrum is piecewise linear between samples and
    undefined outside ``[wavelength_nm[0], wavelength_nm[-1]]``.
    """

    name: str
    wavelength_nm: np.ndarray
    intensity: np.ndarray
    source: str = ""

    @property
    def peak_nm(self) -> float:
        return float(self.wavelength_nm[int(np.argmax(self.intensity))])

    @property
    def range_nm(self) -> tuple[float, float]:
        return float(self.wavelength_nm[0]), float(self.wavelength_nm[-1])

    @cached_property
    def _samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(wavelengths, intensities, integral at each sample), contiguous float64: what the
        compiled integrals (:mod:`qdplex._integrals`) take."""
        w = np.ascontiguousarray(self.wavelength_nm, dtype=np.float64)
        v = np.ascontiguousarray(self.intensity, dtype=np.float64)
        return w, v, np.concatenate([[0.0], np.cumsum(np.diff(w) * (v[1:] + v[:-1]) / 2.0)])

    def cumulative(self, x: np.ndarray) -> np.ndarray:
        """``∫ s(λ) dλ`` from the first sample to each ``x`` (clipped to the defined range;
        the spectrum is linear between samples)."""
        from ._integrals import cumulative_into

        x = np.asarray(x, dtype=np.float64)
        flat = np.ascontiguousarray(x.ravel())
        out = np.empty_like(flat)
        cumulative_into(*self._samples, flat, out)
        return out.reshape(x.shape) if x.ndim else out[0]

    def sample(self, x) -> np.ndarray:
        """Intensity at wavelengths ``x`` (zero outside the defined range)."""
        return np.interp(np.asarray(x, dtype=float), self.wavelength_nm, self.intensity, left=0.0, right=0.0)


def _make_spectrum(name, wavelengths, values, source, *, where=None) -> Spectrum:
    w = np.asarray(wavelengths, dtype=float).ravel()
    v = np.asarray(values, dtype=float).ravel()
    where = where or f"spectrum {name!r}"
    if w.shape != v.shape:
        raise SpectraError(f"{where}: expected as many intensities as wavelengths, found {v.size} and {w.size}")
    keep = np.isfinite(w) & np.isfinite(v)
    w, v = w[keep], v[keep]
    if w.size < 2:
        raise SpectraError(f"{where}: expected at least 2 finite (wavelength, intensity) samples, found {w.size}")
    order = np.argsort(w, kind="stable")
    w, v = w[order], v[order]
    if np.any(v < 0):
        v = np.clip(v, 0.0, None)
    peak = v.max()
    if not peak > 0:
        raise SpectraError(f"{where}: expected a spectrum with positive intensities, found all zero")
    return Spectrum(str(name), w, v / peak, str(source))


def _channel_band(ch: Channel) -> tuple[float, float]:
    if ch.emission_nm is None or not np.isfinite(ch.emission_nm):
        raise SpectraError(
            f"channel {ch.name!r}: expected an emission wavelength (emission_nm, bandwidth_nm) to "
            f"sample spectra on, found none; give it in the OME metadata or a channel sidecar CSV"
        )
    return ch.band  # type: ignore[return-value]


def lambda_grid(start_nm: float = 420.0, stop_nm: float = 720.0, step_nm: float = 10.0) -> list[Channel]:
    """Channels of a λ-stack: bands of ``step_nm`` centred on ``start_nm … stop_nm``."""
    n = int(round((stop_nm - start_nm) / step_nm)) + 1
    return [Channel(f"{c:g}nm", emission_nm=float(c), bandwidth_nm=float(step_nm))
            for c in start_nm + step_nm * np.arange(n)]


class SpectralLibrary:
    """Named emission spectra with provenance; gives mixing matrices for channel lists.

    Parameters
    ----------
    spectra : iterable of Spectrum, optional
        Initial spectra (names must be unique).

    Examples
    --------
    >>> lib = SpectralLibrary.builtin(["DAPI", "QD605", "QD655", "AF"])
    >>> lib.names
    ['DAPI', 'QD605', 'QD655', 'AF']
    >>> M = lib.matrix(lambda_grid(420, 720, 10))   # 31 × 4
    """

    def __init__(self, spectra: Iterable[Spectrum] = ()):
        #: how the autofluorescence components were chosen (set by
        #: :func:`estimate_autofluorescence`; kept by :meth:`merge` and :meth:`subset`), or None
        self.autofluorescence: dict | None = None
        self._spectra: dict[str, Spectrum] = {}
        for s in spectra:
            if s.name in self._spectra:
                raise SpectraError(f"expected unique spectrum names, found {s.name!r} twice")
            self._spectra[s.name] = s

    # --- construction ------------------------------------------------------
    @classmethod
    def builtin(cls, names: Sequence[str] | None = None) -> "SpectralLibrary":
        """The built-in spectra (all of :data:`BUILTIN_NAMES`, or ``names`` in that order).

        Each is a two-sided Gaussian with the published emission peak and full width
        at half maximum of the dye (see each spectrum's ``source``); Qdot names may
        be given in any usual spelling (``"Qdot 655"``).
        """
        wanted = list(BUILTIN_NAMES) if names is None else [_builtin_key(n) for n in names]
        out = cls()
        for n in wanted:
            peak, fwhm, asym, note = _BUILTIN_MODELS[n]
            src = f"builtin: two-sided Gaussian, peak {peak:g} nm, FWHM {fwhm:g} nm, asymmetry {asym:g}; {note}"
            out.add(n, _BUILTIN_GRID, _two_sided_gaussian(_BUILTIN_GRID, peak, fwhm, asym), source=src)
        return out

    @classmethod
    def from_csv(cls, path) -> "SpectralLibrary":
        """Read spectra from a CSV: ``wavelength_nm``, then one column per fluor.

        Column names are canonicalised (``"Qdot 655"`` → ``"QD655"``). Empty cells are
        allowed (spectra measured over different ranges); each spectrum is peak-normalised.
        A malformed file is refused, never repaired: wavelengths must be positive and
        strictly increasing or decreasing (no duplicates), intensities finite and ≥ 0,
        and each fluor must have one column only.

        Raises
        ------
        SpectraError
            Naming the file, the column or row, what was expected and what was found.
            Until the header is recognised as a spectra header, nothing of the file's
            content is quoted (it may be any file).
        """
        from .io.checks import quotable_header, require_regular

        path = Path(path)
        if not path.exists() and not path.is_symlink():
            raise SpectraError("expected a spectra CSV file, found no such file", path=path)
        require_regular(path, what="a spectra CSV file", error=SpectraError)
        if path.stat().st_size > _MAX_CSV_BYTES:
            raise SpectraError(f"expected a spectra CSV of at most {_MAX_CSV_BYTES // 2**20} MiB, "
                               f"found {path.stat().st_size} bytes", path=path)
        try:
            df = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, skip_blank_lines=True).fillna("")
        except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise SpectraError(f"expected a readable CSV (wavelength_nm, then one column per fluor), found "
                               f"{type(e).__name__}", path=path) from None
        if df.empty:
            raise SpectraError("expected a header 'wavelength_nm,<fluor>,…', found an empty file", path=path)
        cols = [str(c).strip() for c in df.iloc[0]]
        first = cols[0]
        if first.lower() not in ("wavelength_nm", "wavelength", "nm", "lambda_nm"):
            shown = f"{first!r}" if first and quotable_header(cols) else "a first line that is no CSV header"
            raise SpectraError(f"expected a first column 'wavelength_nm', found {shown}", path=path)
        if len(cols) < 2:
            raise SpectraError("expected one column per fluor after 'wavelength_nm', found none", path=path)
        body = df.iloc[1:]
        rows = np.arange(2, 2 + len(body))  # 1-based file lines (header is line 1)
        wl = pd.to_numeric(body[0].str.strip(), errors="coerce").to_numpy(float)
        bad = ~np.isfinite(wl) | (wl <= 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise SpectraError(f"column {first!r}: expected a positive wavelength in nm on every row, found "
                               f"{body[0].iloc[i]!r} at row {rows[i]}", path=path)
        if wl.size < 2:
            raise SpectraError(f"expected at least 2 wavelength rows, found {wl.size}", path=path)
        step = np.diff(wl)
        if not (np.all(step > 0) or np.all(step < 0)):
            i = int(np.argmax(step == 0)) if np.any(step == 0) else int(np.argmax(np.sign(step) != np.sign(step[0])))
            what = "a duplicate" if step[i] == 0 else "a change of direction"
            raise SpectraError(f"column {first!r}: expected strictly increasing (or decreasing) wavelengths, found "
                               f"{what} at row {rows[i + 1]} ({wl[i]:g} then {wl[i + 1]:g} nm)", path=path)
        seen: dict[str, str] = {}
        for j, c in enumerate(cols[1:], start=1):
            if not c:
                raise SpectraError(f"expected a fluor name heading column {j + 1}, found an empty name", path=path)
            key = _ALIASES.get(_squash(canonical_fluor(c)), _squash(canonical_fluor(c)))
            if key in seen:
                raise SpectraError(f"expected one column per fluor, found columns {seen[key]!r} and {c!r} for "
                                   f"{canonical_fluor(c)}", path=path)
            seen[key] = c
        out = cls()
        for j, c in enumerate(cols[1:], start=1):
            text = body[j].str.strip() if j in body.columns else pd.Series([""] * len(body))
            vals = pd.to_numeric(text.replace("", np.nan), errors="coerce").to_numpy(float)
            given = (text != "").to_numpy()
            bad = given & ~np.isfinite(vals)
            if bad.any():
                i = int(np.argmax(bad))
                raise SpectraError(f"column {c!r}: expected numbers, found {text.iloc[i]!r} at row {rows[i]}",
                                   path=path)
            neg = given & (vals < 0)
            if neg.any():
                i = int(np.argmax(neg))
                raise SpectraError(f"column {c!r}: expected intensities ≥ 0, found {vals[i]:g} at row {rows[i]}",
                                   path=path)
            out.add(c, wl, vals, source=f"csv: {path.resolve()} column {c!r}",
                    where=f"{path}: column {c!r}")
        return out

    @classmethod
    def load(cls, path) -> "SpectralLibrary":
        """Load a library written by :meth:`save` (checks the format tag and version)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SpectraError("expected a saved spectral library, found no such file", path=path) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SpectraError(f"expected a JSON spectral library, found {type(e).__name__}: {e}", path=path) from None
        if not isinstance(raw, dict) or raw.get("format") != LIBRARY_FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise SpectraError(f"expected format {LIBRARY_FORMAT!r}, found {found!r}", path=path)
        if raw.get("version") != LIBRARY_VERSION:
            raise SpectraError(f"expected library version {LIBRARY_VERSION}, found {raw.get('version')!r}", path=path)
        out = cls()
        for i, s in enumerate(raw.get("spectra", [])):
            try:
                out.add(s["name"], s["wavelength_nm"], s["intensity"], source=s.get("source", ""),
                        where=f"{path}: spectra[{i}]")
            except (KeyError, TypeError):
                raise SpectraError(f"spectra[{i}]: expected name, wavelength_nm, intensity, found {s!r:.80}",
                                   path=path) from None
        return out

    def save(self, path) -> Path:
        """Write the library as versioned JSON recording each spectrum's source (atomically)."""
        from .io.atomic import atomic_path

        from . import __version__

        path = Path(path)
        doc = {
            "format": LIBRARY_FORMAT,
            "version": LIBRARY_VERSION,
            "qdplex_version": __version__,
            "spectra": [
                {"name": s.name, "source": s.source, "peak_nm": s.peak_nm,
                 "wavelength_nm": s.wavelength_nm.tolist(), "intensity": s.intensity.tolist()}
                for s in self._spectra.values()
            ],
        }
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=1), encoding="utf-8")
        return path

    # --- editing -----------------------------------------------------------
    def add(self, name: str, wavelengths, values, *, source: str = "", where: str | None = None) -> "SpectralLibrary":
        """Add (or replace) the spectrum ``name``; returns ``self``."""
        name = canonical_fluor(name)
        self._spectra[name] = _make_spectrum(name, wavelengths, values, source, where=where)
        return self

    def merge(self, other: "SpectralLibrary") -> "SpectralLibrary":
        """A new library: this one's spectra, with ``other``'s added or overriding (same order)."""
        out = SpectralLibrary(self._spectra.values())
        for s in other._spectra.values():
            out._spectra[s.name] = s
        out.autofluorescence = other.autofluorescence or self.autofluorescence
        return out

    def subset(self, names: Sequence[str]) -> "SpectralLibrary":
        """A new library holding ``names`` in the order given, under those names; SpectraError lists missing ones."""
        keys = [self._key(n) for n in names]
        missing = [n for n, k in zip(names, keys) if k is None]
        if missing:
            raise SpectraError(f"expected spectra for {missing} in the library, found only {self.names}")
        # spectra take the caller's spelling (e.g. a panel's "Hoechst 33342" for the built-in "Hoechst")
        out = SpectralLibrary(replace(self._spectra[k], name=canonical_fluor(n)) for n, k in zip(names, keys))
        out.autofluorescence = self.autofluorescence
        return out

    # --- access ------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._spectra)

    def __len__(self) -> int:
        return len(self._spectra)

    def __iter__(self):
        return iter(self._spectra.values())

    def __contains__(self, name) -> bool:
        return self._key(name) is not None

    def __getitem__(self, name) -> Spectrum:
        k = self._key(name)
        if k is None:
            raise SpectraError(f"expected a spectrum named {name!r}, found only {self.names}")
        return self._spectra[k]

    def __repr__(self) -> str:
        return f"SpectralLibrary({self.names})"

    def _key(self, name) -> str | None:
        n = canonical_fluor(str(name))
        if n in self._spectra:
            return n
        low = _ALIASES.get(_squash(n), _squash(n))
        for k in self._spectra:
            if _squash(k) == low:
                return k
        return None

    def peak_nm(self, name: str) -> float:
        """Wavelength of the spectrum's maximum."""
        return self[name].peak_nm

    def sources(self) -> dict[str, str]:
        """Provenance of each spectrum."""
        return {n: s.source for n, s in self._spectra.items()}

    # --- sampling ----------------------------------------------------------
    def matrix(self, channels) -> np.ndarray:
        """Mixing matrix C×K: spectrum ``k`` integrated over the band of channel ``c``.

        Parameters
        ----------
        channels : sequence of Channel, or MultiplexImage
            Each channel needs ``emission_nm``; ``bandwidth_nm`` gives the band width
            (a channel without a width samples the spectrum at its centre).

        Raises
        ------
        SpectraError
            When a channel has no emission wavelength, when a spectrum does not
            cover the channels' range (and has not tailed off below
            :data:`EDGE_TOLERANCE` of its peak at its end), or when a spectrum has no
            emission at all in these channels; the message names the fluor and ranges.
        """
        if isinstance(channels, MultiplexImage):
            channels = channels.channels
        channels = list(channels)
        if not channels:
            raise SpectraError("expected at least one channel to sample spectra on, found none")
        if not self._spectra:
            raise SpectraError("expected at least one spectrum in the library, found an empty library")
        bands = np.array([_channel_band(c) for c in channels], dtype=float)
        lo, hi = bands[:, 0], bands[:, 1]
        ch_range = (float(lo.min()), float(hi.max()))
        out = np.empty((len(channels), len(self._spectra)), dtype=float)
        for k, s in enumerate(self._spectra.values()):
            w0, w1 = s.range_nm
            for end, beyond, value in (("short", ch_range[0] < w0, s.intensity[0]),
                                       ("long", ch_range[1] > w1, s.intensity[-1])):
                if beyond and value > EDGE_TOLERANCE:
                    raise SpectraError(
                        f"spectrum {s.name!r} covers {w0:g}–{w1:g} nm but the channels span "
                        f"{ch_range[0]:g}–{ch_range[1]:g} nm, and at its {end}-wavelength end it is still "
                        f"{100 * value:.0f}% of its peak (expected a spectrum that covers the channels or "
                        f"has tailed off below {100 * EDGE_TOLERANCE:.0f}%); source: {s.source}"
                    )
            width = hi - lo
            col = np.where(width > 0, s.cumulative(hi) - s.cumulative(lo), s.sample((lo + hi) / 2.0))
            if not np.any(col > 0):
                raise SpectraError(
                    f"spectrum {s.name!r} (defined {w0:g}–{w1:g} nm, peak {s.peak_nm:g} nm) has no emission in "
                    f"the channels spanning {ch_range[0]:g}–{ch_range[1]:g} nm; expected some overlap"
                )
            out[:, k] = col
        return out


#: Largest spectra CSV read (a spectrum is a few thousand rows).
_MAX_CSV_BYTES = 64 * 2**20


def _squash(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


# other spellings of built-in names (after lower-casing and dropping spaces and dashes)
_ALIASES = {"hoechst33342": "hoechst", "hoechst33258": "hoechst", "autofluorescence": "af"}


def _builtin_key(name: str) -> str:
    n = canonical_fluor(name)
    low = _ALIASES.get(_squash(n), _squash(n))
    for k in BUILTIN_NAMES:
        if _squash(k) == low:
            return k
    raise SpectraError(f"expected a built-in spectrum name in {list(BUILTIN_NAMES)}, found {name!r}")


# --- spectra from control images ---------------------------------------------


def _pixel_spectra(image: MultiplexImage, max_pixels: int, offset) -> np.ndarray:
    """A strided subsample of the image's pixel spectra, N×C float64, offset subtracted."""
    c, y, x = image.shape
    stride = max(1, int(math.ceil(math.sqrt(y * x / max_pixels))))
    arr = np.asarray(image.data[:, ::stride, ::stride].compute(), dtype=np.float64)
    arr = arr.reshape(c, -1).T
    if offset is not None:
        arr = arr - np.broadcast_to(np.asarray(offset, dtype=float), (c,))
    finite = np.all(np.isfinite(arr), axis=1)
    if not finite.any():
        raise InputError("expected finite pixel values in the control image, found none",
                         path=image.source or image.name)
    return arr[finite]


def _saturation_level(image: MultiplexImage, saturation):
    if saturation is not None:
        return float(saturation)
    dt = np.dtype(image.data.dtype)
    return float(np.iinfo(dt).max) if dt.kind in "ui" else np.inf


def _step_spectrum(channels: Sequence[Channel], per_channel: np.ndarray):
    """Per-nm spectrum from per-channel signals: a step over each band (a point without a band).
    ``per_channel`` is C values, or C×n for n spectra at once (then the densities are rows × n)."""
    bands = np.array([_channel_band(c) for c in channels], dtype=float)
    order = np.argsort(bands.mean(axis=1))
    bands, vals = bands[order], np.asarray(per_channel, float)[order]
    width = bands[:, 1] - bands[:, 0]
    if vals.ndim == 2:
        width = width[:, None]
    overlapping = np.any(bands[1:, 0] < bands[:-1, 1] - 1e-9)
    if overlapping or np.any(width <= 0):
        return bands.mean(axis=1), vals / np.where(width > 0, width, 1.0)
    dens = vals / width
    wl = np.repeat(bands, 1, axis=0).ravel()  # lo0, hi0, lo1, hi1, ...
    return wl, np.repeat(dens, 2, axis=0)


def estimate_spectrum(image: MultiplexImage, *, name: str | None = None, offset=None,
                      saturation=None, foreground_fraction: float = 0.05,
                      max_pixels: int = 1_000_000) -> SpectralLibrary:
    """Estimate a fluor's emission spectrum from a single-stain control image.

    The brightest ``foreground_fraction`` of pixels (by total signal, unsaturated)
    carry the stain; the median spectrum of the dimmest half is the background
    (autofluorescence, offset, stray light) and is subtracted. The spectrum is the
    sum of the background-subtracted stained-pixel spectra, per nm of each band.

    Parameters
    ----------
    image : MultiplexImage
        The control: one fluor only, channels with emission bands.
    name : str, optional
        Name of the fluor (default: the image's name).
    offset : float or sequence of float, optional
        Camera offset (per channel or one value) subtracted first.
    saturation : float, optional
        Raw level at or above which a pixel is saturated (default: the integer
        dtype's maximum); saturated pixels are left out.
    foreground_fraction : float
        Fraction of the brightest pixels taken as stained.

    Returns
    -------
    SpectralLibrary
        One spectrum, sampled as a step over each channel band, with its source.
    """
    name = canonical_fluor(name or image.name)
    where = image.source or image.name
    sat = _saturation_level(image, saturation)
    raw = _pixel_spectra(image, max_pixels, None)
    ok = np.all(raw < sat, axis=1)
    pix = raw[ok] - (0.0 if offset is None else np.broadcast_to(np.asarray(offset, float), (raw.shape[1],)))
    if pix.shape[0] < 20:
        raise InputError(f"expected at least 20 unsaturated pixels in the single-stain control, found {pix.shape[0]}",
                         path=where)
    total = pix.sum(axis=1)
    bg = np.median(pix[total <= np.quantile(total, 0.5)], axis=0)
    fg = pix[total >= np.quantile(total, 1.0 - foreground_fraction)]
    signal = np.clip((fg - bg).sum(axis=0), 0.0, None)
    if not signal.max() > 0:
        raise InputError("expected stained pixels brighter than the background in the single-stain control, "
                         "found none", path=where)
    wl, dens = _step_spectrum(image.channels, signal)
    lib = SpectralLibrary()
    lib.add(name, wl, dens, source=f"estimated: single-stain control {where} ({fg.shape[0]} stained pixels, "
                                    f"background-subtracted)")
    return lib


#: most autofluorescence components ``n_components="auto"`` tries
MAX_AF_COMPONENTS = 4
#: a further component is kept while it removes at least this share of the remaining residual
AF_GAIN = 0.3
#: pixels averaged together before the factorisation
AF_BIN = 16


def _nmf(pix: np.ndarray, k: int, random_state: int):
    """Rank-k non-negative factorisation of N×C ``pix``: (N×k weights, k×C components)."""
    if k == 1:  # the least-squares rank-1 non-negative fit: the leading singular pair
        u, sv, vt = np.linalg.svd(pix, full_matrices=False)
        v = np.abs(vt[0])
        return np.clip(pix @ v, 0, None)[:, None], v[None, :]
    from sklearn.decomposition import NMF

    model = NMF(n_components=k, init="nndsvda", max_iter=1000, tol=1e-5, random_state=random_state)
    return model.fit_transform(pix), model.components_


def _nmf_spectra(pix: np.ndarray, binned: np.ndarray, k: int, random_state: int):
    """NMF components of the single pixels ``pix`` (N×C, offset removed, not clipped) or
    of the binned ones. Clipping noise at zero lifts every dim spectral tail; where more
    than 0.5 % of the values are negative (dim, noisy data) the binned pixels (noise
    averaged before clipping) are factorised instead — binning mixes neighbouring
    pixels, which costs purity only where abundances change from pixel to pixel."""
    if binned is not pix and float(np.mean(pix < 0)) > 0.005:
        h = _nmf(binned, k, random_state)[1]
        from .unmix import unmix_array

        w = np.clip(unmix_array(np.ascontiguousarray(pix.T, dtype=np.float32), h.T).T, 0.0, None)
        return w, h
    return _nmf(np.clip(pix, 0.0, None), k, random_state)


def _sharpen_sparse_components(w: np.ndarray, h: np.ndarray, *, floor: float = 0.05):
    """NMF autofluorescence components with the sparse ones pushed to the edge of the cone.

    A factorisation ``pix ≈ w h`` is not unique: ``h_j − α h_d`` with ``w_d + α w_j`` fits
    as well. The dominant component ``d`` (most total signal: tissue autofluorescence,
    present everywhere) has pixels of its own and comes out close to its true spectrum;
    a sparse one (e.g. lipofuscin granules) is only ever seen on top of the tissue, and
    NMF leaves part of the tissue's spectrum in it (on a slide made with two measured-like
    species: cosine 0.993 to the true granule spectrum, 15 % tissue in it). Each
    non-dominant component therefore gives up as much of the dominant spectrum as it can
    while staying non-negative — ``α`` = its smallest ratio to ``h_d`` over the channels
    where ``h_d`` reaches ``floor`` of its peak (then cosine 0.9999 on that slide) — and the
    weights take it over. This assumes that each sparse component is dark in some band
    where the dominant one emits (lipofuscin is red-shifted against the blue-green tissue
    autofluorescence). Returns ``(w, h, alphas)``.
    """
    w, h = w.copy(), h.copy()
    k = h.shape[0]
    peak = np.where(h.max(axis=1) > 0, h.max(axis=1), 1.0)
    d = int(np.argmax((w * peak[None, :]).sum(axis=0)))
    hd = h[d] / peak[d]
    band = hd >= floor
    alphas = [0.0] * k
    for j in range(k):
        if j == d or not band.any():
            continue
        hj = h[j] / peak[j]
        a = max(float(np.min(hj[band] / hd[band])), 0.0)
        if a <= 0.0:
            continue
        h[j] = np.clip(hj - a * hd, 0.0, None) * peak[j]
        w[:, d] += w[:, j] * (a * peak[j] / peak[d])
        alphas[j] = round(a, 4)
    return w, h, alphas


def choose_af_components(pix: np.ndarray, *, max_components: int = MAX_AF_COMPONENTS,
                         gain: float = AF_GAIN, random_state: int = 0) -> dict:
    """How many autofluorescence spectra the control's pixels ``pix`` (N×C) hold.

    The (binned) pixel spectra are factorised with 1, 2, … components; a further component is added while it
    removes at least ``gain`` of the residual left by the previous ones (a spectrum the
    others cannot make removes most of it; fitting noise removes about 1/C of it) and
    the residual is still above 0.1 % of the signal.

    Returns
    -------
    dict
        ``components`` (the choice), ``residual_share`` (residual / signal energy per
        number tried), ``rule``.
    """
    binned = pix
    energy = float((binned ** 2).sum())
    shares, k = [], 1
    for k in range(1, int(max_components) + 1):
        w, h = _nmf(binned, k, random_state)
        shares.append(float(((binned - w @ h) ** 2).sum()) / max(energy, 1e-30))
        if k > 1 and (shares[-2] - shares[-1]) < gain * shares[-2]:
            k -= 1
            break
        if shares[-1] < 1e-3:
            break
    return {"components": int(k), "residual_share": [round(v, 6) for v in shares],
            "rule": f"add a component while it removes ≥ {gain:.0%} of the remaining residual "
                    f"(at most {max_components})"}


def estimate_autofluorescence(image: MultiplexImage, n_components=1, *, offset=None,
                              saturation=None, max_pixels: int = 200_000,
                              random_state: int = 0) -> SpectralLibrary:
    """Estimate autofluorescence spectra from an unstained control image.

    Pixel spectra (offset subtracted, unsaturated) are factorised by non-negative
    matrix factorisation (:class:`sklearn.decomposition.NMF`) into
    ``n_components`` spectra — e.g. a broad flavin/collagen-like and a red-shifted
    lipofuscin-like component; the components other than the dominant one are then
    freed of the dominant one's spectrum as far as non-negativity allows
    (:func:`_sharpen_sparse_components`, recorded as ``sharpened``). With one component the result is the mean pixel
    spectrum. With ``n_components="auto"`` the number is chosen from the data
    (:func:`choose_af_components`). Components are ordered by their total signal and
    named ``"AF"``, ``"AF2"``, …. The returned library's ``autofluorescence`` records
    the choice and the offset used.

    Parameters
    ----------
    image : MultiplexImage
        The unstained control, channels with emission bands.
    n_components : int or "auto"
        Number of autofluorescence spectra (≥ 1), or ``"auto"``.
    offset : float, sequence of float, "auto" or None
        Camera offset subtracted first (as in :func:`estimate_spectrum`); ``"auto"``:
        the control's recorded offset, else estimated from its darkest pixels with a
        constant endmember beside the built-in ``"AF"`` (:mod:`qdplex.unmix.offset`).
    saturation
        As in :func:`estimate_spectrum`.
    max_pixels : int
        Pixels used (a regular subsample of the image).

    Returns
    -------
    SpectralLibrary
    """
    where = image.source or image.name
    auto = isinstance(n_components, str)
    if auto and n_components != "auto":
        raise SpectraError(f"expected n_components ≥ 1 or 'auto', found {n_components!r}")
    if not auto and (isinstance(n_components, bool) or int(n_components) < 1):
        raise SpectraError(f"expected n_components ≥ 1, found {n_components!r}")
    sat = _saturation_level(image, saturation)
    offset_rec = None
    if isinstance(offset, str) or (offset is None and n_components == "auto"):
        from .unmix._sample import pixel_sample
        from .unmix.offset import resolve_offset

        off, offset_rec = resolve_offset("auto", image, lambda: pixel_sample(image, saturation=sat),
                                         SpectralLibrary.builtin([AUTOFLUORESCENCE]).matrix(image.channels))
        offset = off
    raw = _pixel_spectra(image, max_pixels, None)
    pix = raw[np.all(raw < sat, axis=1)]
    if offset is not None:
        pix = pix - np.broadcast_to(np.asarray(offset, float), (pix.shape[1],))
    need = 10 * (MAX_AF_COMPONENTS if auto else int(n_components))
    if pix.shape[0] < need or not np.clip(pix, 0, None).sum() > 0:
        raise InputError(f"expected an unstained control with signal in at least {need} unsaturated "
                         f"pixels, found {pix.shape[0]} pixels and total signal {np.clip(pix, 0, None).sum():g}",
                         path=where)
    # average groups of AF_BIN pixels before clipping at zero: noise averages away, the
    # spectra stay (mixtures of the components are still their non-negative mixtures);
    # clipping single noisy pixels would lift every spectrum's dim tail
    nb = pix.shape[0] // AF_BIN
    binned = np.clip(pix[: nb * AF_BIN].reshape(nb, AF_BIN, -1).mean(axis=1) if nb >= need else pix, 0.0, None)
    choice = choose_af_components(binned, random_state=random_state) if auto else None
    n_components = choice["components"] if auto else int(n_components)
    sharpened = None
    if n_components == 1:
        comps, weights = np.clip(pix.mean(axis=0), 0.0, None)[None, :], np.ones(1)
    else:
        w, comps, sharpened = _sharpen_sparse_components(*_nmf_spectra(pix, binned, n_components, random_state))
        scale = comps.max(axis=1, keepdims=True)
        scale[scale == 0] = 1.0
        comps = comps / scale
        weights = (w * scale.T).sum(axis=0)
    lib = SpectralLibrary()
    for rank, k in enumerate(np.argsort(-weights)):
        nm = AUTOFLUORESCENCE if rank == 0 else f"{AUTOFLUORESCENCE}{rank + 1}"
        if not comps[k].max() > 0:
            raise InputError(f"autofluorescence component {rank + 1} of {n_components} is empty; "
                             f"expected fewer components", path=where)
        wl, dens = _step_spectrum(image.channels, comps[k])
        lib.add(nm, wl, dens, source=f"estimated: unstained control {where}, "
                                     f"{'mean pixel spectrum' if n_components == 1 else 'NMF'} component "
                                     f"{rank + 1} of {n_components} ({pix.shape[0]} pixels)")
    lib.autofluorescence = {"control": str(where), "components": int(n_components),
                            "chosen": "auto" if auto else "given", "names": lib.names,
                            **({"selection": choice} if choice else {}),
                            **({"sharpened": {"rule": "sparse components give up the dominant one's spectrum "
                                                      "down to non-negativity",
                                              "alpha": [sharpened[k] for k in np.argsort(-weights)]}}
                               if sharpened else {}),
                            **({"offset": offset_rec} if offset_rec else {})}
    return lib


def library_for_panel(panel, channels=None) -> SpectralLibrary:
    """The library a panel needs: built-ins, the panel's spectra files, autofluorescence.

    Built-in spectra are overridden by the panel's ``[spectra] files`` (in order).
    Autofluorescence comes from the panel's unstained control
    (``[autofluorescence] control``, ``components`` spectra; camera offset from
    ``[unmixing] offset``, else the control's metadata) or else the built-in
    generic ``"AF"``. The result holds ``panel.fluors`` then the AF names, in order.

    Parameters
    ----------
    panel : qdplex.panel.Panel
    channels : sequence of Channel or MultiplexImage, optional
        When given, the library is checked to cover them (:meth:`SpectralLibrary.matrix`).

    Raises
    ------
    SpectraError
        When a panel fluor has no spectrum (names the fluor and the panel file).
    """
    lib = SpectralLibrary.builtin()
    for f in panel.spectra_files:
        lib = lib.merge(SpectralLibrary.from_csv(f))
    if panel.autofluorescence_control is not None:
        from .io import read_image

        control = read_image(panel.autofluorescence_control)
        offset = panel.camera_offset_for(control)
        af = estimate_autofluorescence(control, panel.autofluorescence_components,
                                       offset="auto" if offset is None else offset)
    else:
        af = SpectralLibrary.builtin([AUTOFLUORESCENCE])
    lib = lib.merge(af)
    missing = [f for f in panel.fluors if f not in lib]
    if missing:
        raise SpectraError(
            f"expected a spectrum for each panel fluor, found none for {missing}; add them to a "
            f"[spectra] files CSV (built-ins: {list(BUILTIN_NAMES)})", path=panel.path)
    out = lib.subset(list(panel.fluors) + [n for n in af.names if n not in panel.fluors])
    if channels is not None:
        out.matrix(channels)
    return out
