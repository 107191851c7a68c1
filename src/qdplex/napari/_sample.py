"""npe2 sample data: a synthetic multiplexed QD slide made by :func:`qdplex.synth.make_slide`."""

from __future__ import annotations

from ._layers import slide_layer

__all__ = ["SAMPLE_PANEL", "sample_panel", "make_sample_data"]

#: The panel of the sample slide: a breast five-plex (the panel in sample_data/panel.toml).
SAMPLE_PANEL = {
    "name": "breast-5plex-sample",
    "nuclear_stain": "DAPI",
    "markers": [
        {"name": "HER2", "fluor": "QD655", "compartment": "membrane"},
        {"name": "ER", "fluor": "QD605", "compartment": "nucleus"},
        {"name": "PR", "fluor": "QD565", "compartment": "nucleus"},
        {"name": "EGFR", "fluor": "QD705", "compartment": "membrane"},
        {"name": "mTOR", "fluor": "QD525", "compartment": "cytoplasm"},
    ],
    "image": {"pixel_size_um": 0.5},
}


def sample_panel():
    """The sample slide's :class:`qdplex.panel.Panel`."""
    from qdplex.panel import panel_from_dict

    return panel_from_dict(SAMPLE_PANEL)


def make_sample_data(shape=(256, 256), seed: int = 0):
    """A synthetic λ-stack QD slide (420–720 nm, 10 nm bands) as one image layer.

    The slide's panel is kept in the layer metadata (``metadata["qdplex"]["panel"]``)
    so the run widget can process it without a panel file.
    """
    from qdplex.synth import make_slide

    panel = sample_panel()
    slide = make_slide(panel, shape=tuple(shape), pixel_size_um=0.5, seed=seed, name="qdplex-sample")
    data, kwargs, kind = slide_layer(slide.image)
    kwargs["metadata"]["qdplex"]["panel"] = panel
    kwargs["visible"] = True
    return [(data, kwargs, kind)]
