"""Core data types: :class:`Channel`, :class:`MultiplexImage`, :class:`Segmentation`.

These are deliberately few and plain. Every stage of qdplex is a function that
takes and returns these (or plain numpy / dask arrays).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Sequence

import dask.array as da
import numpy as np

from .errors import InputError, SegmentationError

__all__ = ["Channel", "MultiplexImage", "Segmentation", "COMPARTMENTS"]

#: Compartment names, in the order qdplex reports them.
COMPARTMENTS = ("nucleus", "cytoplasm", "membrane", "cell")


@dataclass(frozen=True)
class Channel:
    """One image channel.

    Parameters
    ----------
    name : str
        Channel name as found in the file (or the fluor / marker for unmixed planes).
    emission_nm : float, optional
        Centre of the emission band in nm, when known.
    bandwidth_nm : float, optional
        Full width of the emission band in nm, when known. A λ-stack is a list
        of many narrow channels.
    fluor : str, optional
        The fluorophore this channel holds (unmixed planes), e.g. ``"QD655"``.
    """

    name: str
    emission_nm: float | None = None
    bandwidth_nm: float | None = None
    fluor: str | None = None

    @property
    def band(self) -> tuple[float, float] | None:
        """``(low, high)`` band edges in nm, or None when the band is unknown."""
        if self.emission_nm is None:
            return None
        width = self.bandwidth_nm if self.bandwidth_nm else 0.0
        return (self.emission_nm - width / 2.0, self.emission_nm + width / 2.0)


@dataclass
class MultiplexImage:
    """A lazy multichannel image: ``data`` is a dask array of shape C×Y×X.

    Parameters
    ----------
    data : dask.array.Array or numpy.ndarray
        C×Y×X pixel data (numpy input is wrapped in a dask array).
    channels : sequence of Channel
        One entry per plane of ``data``.
    pixel_size_um : float, optional
        Pixel size in µm (square pixels assumed), when known.
    name : str
        Slide name, used for output folders.
    source : str, optional
        Where the image came from (a path), for provenance and messages.
    """

    data: da.Array
    channels: list[Channel]
    pixel_size_um: float | None = None
    name: str = "image"
    source: str | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.data, da.Array):
            arr = np.asarray(self.data)
            self.data = da.from_array(arr, chunks=_default_chunks(arr.shape))
        self.channels = [c if isinstance(c, Channel) else Channel(str(c)) for c in self.channels]
        where = self.source or self.name
        if self.data.ndim != 3:
            raise InputError(
                f"expected a C×Y×X image, found {self.data.ndim} dimensions {tuple(self.data.shape)}",
                path=where,
            )
        if len(self.channels) != self.data.shape[0]:
            raise InputError(
                f"expected {len(self.channels)} planes for channels "
                f"{[c.name for c in self.channels]}, found {self.data.shape[0]} planes",
                path=where,
            )
        names = [c.name for c in self.channels]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InputError(f"channel names must be unique, found duplicates {dup}", path=where)

    # --- convenience -------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels]

    @property
    def wavelengths(self) -> np.ndarray:
        """Band centres in nm (NaN where unknown)."""
        return np.array([np.nan if c.emission_nm is None else c.emission_nm for c in self.channels])

    def index(self, name: str) -> int:
        """Index of the channel called ``name`` (case-insensitive); InputError if absent."""
        for i, c in enumerate(self.channels):
            if c.name == name:
                return i
        low = name.lower()
        for i, c in enumerate(self.channels):
            if c.name.lower() == low or (c.fluor and c.fluor.lower() == low):
                return i
        raise InputError(
            f"expected a channel named {name!r}, found channels {self.channel_names}",
            path=self.source or self.name,
        )

    def plane(self, name: str) -> da.Array:
        """The lazy Y×X plane of channel ``name``."""
        return self.data[self.index(name)]

    def select(self, names: Sequence[str]) -> "MultiplexImage":
        """A new image holding only ``names`` (in that order)."""
        idx = [self.index(n) for n in names]
        return replace(self, data=self.data[idx], channels=[self.channels[i] for i in idx])


def _default_chunks(shape) -> tuple:
    # whole channel axis per chunk, 2048² spatial tiles: good for per-pixel unmixing
    if len(shape) == 3:
        return (shape[0], min(shape[1], 2048), min(shape[2], 2048))
    return "auto"


@dataclass
class Segmentation:
    """Nuclei and cells as label images with equal IDs, and compartments derived from them.

    The label images live in memory (numpy) or in scratch storage (any Y×X array read
    by slices, e.g. a zarr array written tile by tile); stored arrays are never loaded
    whole.

    Parameters
    ----------
    nuclei, cells : numpy.ndarray or stored Y×X array
        uint32 label images; a cell's ID equals its nucleus's ID (0 is background).
    membrane_width_px : float
        Width in pixels of the membrane ring at the inner cell boundary.
    stored_membrane : Y×X array, optional
        The membrane ring when it was already computed (tile by tile); otherwise it is
        derived from ``cells`` on first use.
    """

    nuclei: np.ndarray
    cells: np.ndarray
    membrane_width_px: float = 2.0
    stored_membrane: object = field(default=None, repr=False)

    def __post_init__(self):
        self.nuclei = _label_array(self.nuclei)
        self.cells = _label_array(self.cells)
        if self.stored_membrane is not None:
            self.stored_membrane = _label_array(self.stored_membrane)
        shapes = {tuple(a.shape) for a in (self.nuclei, self.cells) + (
            (self.stored_membrane,) if self.stored_membrane is not None else ())}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise SegmentationError(
                f"expected nuclei and cells as two Y×X label images of one shape, "
                f"found {self.nuclei.shape} and {self.cells.shape}"
            )

    @property
    def in_memory(self) -> bool:
        """True when the label images are numpy arrays."""
        return isinstance(self.cells, np.ndarray) and isinstance(self.nuclei, np.ndarray)

    @cached_property
    def cytoplasm(self):
        """Cell minus its nucleus (uint32 labels, cell IDs); lazy (dask) for stored labels."""
        if not self.in_memory:
            return da.where(da.from_array(self.nuclei) > 0, np.uint32(0), da.from_array(self.cells))
        out = self.cells.copy()
        out[self.nuclei > 0] = 0
        return out

    @cached_property
    def membrane(self):
        """A ring of ``membrane_width_px`` at the inner boundary of each cell (cell IDs)."""
        if self.stored_membrane is not None:
            return self.stored_membrane
        from .segment import membrane_ring  # local import keeps model light

        return membrane_ring(np.asarray(self.cells), self.membrane_width_px)

    def compartment(self, name: str):
        """Label image of compartment ``name`` (one of :data:`COMPARTMENTS`)."""
        if name == "nucleus":
            return self.nuclei
        if name == "cell":
            return self.cells
        if name == "cytoplasm":
            return self.cytoplasm
        if name == "membrane":
            return self.membrane
        raise SegmentationError(f"expected a compartment in {COMPARTMENTS}, found {name!r}")

    @property
    def n_cells(self) -> int:
        if not self.in_memory:
            cel = da.from_array(self.cells)
            return int(da.unique(cel[cel > 0]).size.compute()) if cel.size else 0
        return int(np.unique(self.cells[self.cells > 0]).size)


def _label_array(a):
    """A numpy uint32 label image, or a stored one (zarr, memmap: sliceable, not a dask array) as is."""
    stored = (not isinstance(a, (np.ndarray, da.Array)) and hasattr(a, "shape") and hasattr(a, "dtype")
              and hasattr(a, "__getitem__"))
    if stored:
        if np.dtype(a.dtype) != np.uint32:
            raise SegmentationError(f"expected stored uint32 label images, found dtype {a.dtype}")
        return a
    return np.asarray(a).astype(np.uint32, copy=False)
