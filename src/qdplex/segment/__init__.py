"""Nucleus and cell segmentation, compartments, and tiled segmentation of whole slides.

- :func:`segment_nuclei` — nuclei from a nuclear-stain image: by default
  (``method="auto"``) qdplex's own nucleus model, shipped in the package and
  run offline with onnxruntime (:mod:`.infer`; trained by :mod:`.train`, the
  two sharing :mod:`.model`; card in ``docs/models.md``); ``"classical"`` is
  model-free (background correction, scale-aware smoothing, blob seeds,
  seeded watershed, per-nucleus thresholds; :mod:`.nuclei`); or the optional
  Cellpose / StarDist backends when installed locally (:mod:`.deep`).
- :func:`expand_nuclei` — cells grown from nuclei, shared fairly between
  neighbours and bounded by the local nucleus spacing, or along a membrane
  image up to where its signal ends; :func:`membrane_ring` — the
  membrane compartment; :func:`segment` — all of it as a
  :class:`qdplex.model.Segmentation` (:mod:`.cells`).
- :func:`segment_tiled` — whole slides tile by tile on dask (:mod:`.tiles`).

All label images are ``uint32`` with 0 as background; a cell's ID equals its
nucleus's ID.
"""

from __future__ import annotations

from .cells import TYPICAL_NUCLEUS_UM, expand_nuclei, membrane_ring, segment
from .nuclei import METHODS, background, estimate_diameter, noise_sigma, segment_nuclei
from .tiles import segment_tiled

__all__ = [
    "segment",
    "segment_nuclei",
    "expand_nuclei",
    "membrane_ring",
    "segment_tiled",
    "estimate_diameter",
    "background",
    "noise_sigma",
    "METHODS",
    "TYPICAL_NUCLEUS_UM",
]
