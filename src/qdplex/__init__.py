"""qdplex: multiplexed quantum-dot immunofluorescence → per-cell biomarker tables.

The public API (re-exported names only; each module is imported on first use)::

    import qdplex
    img = qdplex.read_image("slide.ome.tif")
    lib = qdplex.SpectralLibrary.builtin()
    res = qdplex.unmix(img, lib.subset(["DAPI", "QD605", "QD655", "AF"]))
    seg = qdplex.segment(res.abundances.plane("DAPI").compute(), pixel_size_um=img.pixel_size_um)
    table = qdplex.quantify(res.abundances, seg)

    result = qdplex.run_slide(img, panel)                  # one slide, any size, in memory or on disk
    qdplex.run_batch(["slides/"], panel, "out/")           # many slides into OUT/ (what `qdplex run` does)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "QdplexError": "errors",
    "InputError": "errors",
    "PanelError": "errors",
    "SpectraError": "errors",
    "SegmentationError": "errors",
    "OutputError": "errors",
    "Channel": "model",
    "MultiplexImage": "model",
    "Segmentation": "model",
    "read_image": "io",
    "write_ome_tiff": "io",
    "write_labels": "io",
    "read_labels": "io",
    "write_ome_zarr": "io",
    "find_slides": "io",
    "SpectralLibrary": "spectra",
    "library_for_panel": "spectra",
    "check_panel": "crosstalk",
    "unmix": "unmix",
    "UnmixResult": "unmix",
    "segment": "segment",
    "segment_nuclei": "segment",
    "expand_nuclei": "segment",
    "membrane_ring": "segment",
    "segment_tiled": "segment",
    "match_labels": "metrics",
    "quantify": "quantify",
    "cell_table": "tables",
    "write_tables": "tables",
    "score_slide": "score",
    "cohort_summary": "score",
    "Panel": "panel",
    "Marker": "panel",
    "read_panel": "panel",
    "run_slide": "slide",
    "SlideResult": "slide",
    "process_slide": "batch",
    "run_batch": "batch",
    "write_slide": "outputs",
    "read_run_record": "outputs",
    "panel_from_record": "outputs",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


# ``unmix``, ``segment`` and ``quantify`` name both a submodule and its main function.
# Importing a submodule sets the package attribute to the module, which would shadow
# the lazy function; binding the three functions here keeps ``qdplex.unmix(...)`` a call.
from .quantify import quantify  # noqa: E402
from .segment import segment  # noqa: E402
from .unmix import unmix  # noqa: E402


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qdplex' has no attribute {name!r}")


def __dir__():
    return __all__
